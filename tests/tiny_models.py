"""Tiny random-init causal LMs saved like a user's checkpoint, for tests.

``make_tiny_llama`` / ``make_tiny_gpt2`` build a model from a config (no download), train a
tokenizer on :data:`TINY_CORPUS` with ``algorithms.core.tokenizer.train_tokenizer`` and save both
with ``save_pretrained`` (safetensors), so tests load them through the same
``load_causal_lm`` path a real checkpoint takes. Results are cached per process by their
arguments; :func:`session_model` backs the session fixtures ``tiny_llama_path`` /
``tiny_gpt2_path`` of ``tests/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = [
    "LLAMA_7B_CONFIG",
    "TINY_CORPUS",
    "TINY_PAIRS",
    "make_random_adapter",
    "make_tiny_causal_lm",
    "make_tiny_gpt2",
    "make_tiny_llama",
    "session_model",
]

TINY_CORPUS: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "All that glitters is not gold.",
    "The early bird catches the worm, but the second mouse gets the cheese.",
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "Knowledge speaks, but wisdom listens.",
    "Edge devices train small language models on private data.",
    "The aggregator averages adapters from many clients every round.",
    "Low rank adapters keep the frozen base model small and the update tiny.",
    "Quantized weights use four bits for each number in the matrix.",
    "A watched pot never boils, and a rolling stone gathers no moss.",
    "Time flies like an arrow; fruit flies like a banana.",
    "Federated learning keeps raw data on the device where it was created.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.",
    'Punctuation, quotes "like this", and (parentheses) appear too!',
]

TINY_PAIRS: list[tuple[str, str]] = [
    ("Question: what colour is the sky? Answer:", " The sky is blue."),
    ("Question: what do bees make? Answer:", " Bees make honey."),
    ("Question: how many legs has a spider? Answer:", " A spider has eight legs."),
    ("Question: where does the sun rise? Answer:", " The sun rises in the east."),
]

_CACHE: dict[tuple, Path] = {}


def _tokenizer(vocab_size: int, style: str):
    from algorithms.core.tokenizer import train_tokenizer

    texts = TINY_CORPUS + [p + r for p, r in TINY_PAIRS]
    return train_tokenizer(texts, vocab_size, style=style)


def make_tiny_llama(
    path: str | Path,
    vocab_size: int = 400,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_positions: int = 256,
    seed: int = 0,
    tokenizer_style: str = "metaspace",
) -> Path:
    """A Llama-architecture model directory (weights + tokenizer) at ``path``."""
    key = (
        "llama",
        str(path),
        vocab_size,
        hidden,
        layers,
        heads,
        kv_heads,
        intermediate,
        max_positions,
        seed,
        tokenizer_style,
    )
    if key in _CACHE and (_CACHE[key] / "config.json").exists():
        return _CACHE[key]
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(vocab_size, tokenizer_style)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _CACHE[key] = out
    return out


def make_tiny_gpt2(
    path: str | Path,
    vocab_size: int = 400,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
    tokenizer_style: str = "bytelevel",
) -> Path:
    """A GPT-2-architecture model directory (weights + tokenizer) at ``path``."""
    key = (
        "gpt2",
        str(path),
        vocab_size,
        hidden,
        layers,
        heads,
        max_positions,
        seed,
        tokenizer_style,
    )
    if key in _CACHE and (_CACHE[key] / "config.json").exists():
        return _CACHE[key]
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer(vocab_size, tokenizer_style)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _CACHE[key] = out
    return out


def make_tiny_causal_lm(
    path: str | Path,
    config_class: str,
    seed: int = 0,
    vocab_size: int = 400,
    tokenizer_style: str = "metaspace",
    pad_vocab: int = 0,
    **config: object,
) -> Path:
    """A model of any architecture from its transformers config class (by name, e.g.
    ``"MistralConfig"``) and ``config`` fields, with a tokenizer, saved at ``path``.
    ``pad_vocab``: embedding rows beyond the tokenizer's ids (checkpoints often round their
    vocabulary up, e.g. Qwen2 or Phi-3)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(vocab_size, tokenizer_style)
    cfg = getattr(transformers, config_class)(
        vocab_size=len(tok) + pad_vocab,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **config,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


_FIXTURE_CACHE: dict[str, Path] = {}


def session_model(kind: str, factory: pytest.TempPathFactory) -> Path:
    """The default tiny model of ``kind`` ("llama" or "gpt2"), built once per process.

    Several test modules (or a conftest) may define their own fixtures on top of this; they
    all share one directory per kind.
    """
    path = _FIXTURE_CACHE.get(kind)
    if path is None or not (path / "config.json").exists():
        maker = make_tiny_llama if kind == "llama" else make_tiny_gpt2
        path = maker(factory.mktemp(f"tiny-{kind}"))
        _FIXTURE_CACHE[kind] = path
    return path


# Llama-2-7B's config.json (no weights: the memory planner reads the config only)
LLAMA_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def make_random_adapter(base, out, seed=1, scale=0.2):
    """A peft LoRA adapter on ``base`` with non-zero random B (peft starts B at zero, which
    would make an adapter invisible), saved in the standard peft format at ``out``."""
    import torch

    from algorithms.core.modeling import LoraSpec, attach_lora, load_causal_lm, save_peft_adapter

    model, _, _ = load_causal_lm(base)
    peft_model = attach_lora(model, LoraSpec(r=4, alpha=8.0), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in peft_model.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * scale)
    return save_peft_adapter(peft_model, base, out)


def saved_bytes(model, batch: int, seq: int) -> int:
    """Unique bytes autograd saves for backward in one forward of ``model`` (parameters and
    buffers excluded): what the planner's activation term must equal."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and t.numel() > 1:  # skip python-scalar constants
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    ids = torch.randint(3, 90, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return sum(seen.values())
