"""The model a simulated federation runs on.

The aggregator's FedAvg half builds its global LoRA state from a real checkpoint
(``models.slm``), so a load test needs one. Two presets, random-initialised Llama checkpoints
saved like a user's own (weights + tokenizer), sized by the update a device sends back:

- ``tiny``: about 4.4 KB per update (fp16 on the wire), sent inline in one message;
- ``big``: about 1.26 MB per update, sent as a chunked blob.

An operator load-testing a deployment passes its own model directory and LoRA settings instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PRESETS: dict[str, dict] = {
    "tiny": {
        "model": {"hidden": 32, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 80},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    },
    "big": {
        "model": {"hidden": 256, "layers": 8, "heads": 4, "kv_heads": 4, "intermediate": 688},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    },
}

_CORPUS = [
    "Edge devices train small language models on private data.",
    "The aggregator averages adapters from many clients every round.",
    "Low rank adapters keep the frozen base model small and the update tiny.",
    "A load test connects thousands of virtual devices to the broker at once.",
    "Every payload is encrypted end to end and signed by its sender.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.",
]


def default_cache_dir() -> Path:
    env = os.environ.get("COTUNE_FLEET_MODELS")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/cotune/fleet-models").expanduser()


def preset_model(size: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The checkpoint of preset ``size``, built once into the cache (a few seconds)."""
    if size not in PRESETS:
        raise ValueError(f"unknown fleet model size {size!r}; choose one of {sorted(PRESETS)}")
    shape = PRESETS[size]["model"]
    key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = root / f"{size}-{key}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from algorithms.core.tokenizer import train_tokenizer

    tok = train_tokenizer(_CORPUS * 4, 400, style="metaspace")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=shape["hidden"],
                      intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, out)
    return out
