"""Model construction, token packing, a small pretraining loop and held-out evaluation."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence

import torch

from .recipes import ModelSpec, ZooRecipe

__all__ = [
    "evaluate",
    "make_model",
    "pack_windows",
    "param_counts",
    "pretrain",
    "token_stream",
]


def make_model(spec: ModelSpec, tok) -> torch.nn.Module:
    """A freshly initialised causal LM of ``spec`` for tokenizer ``tok`` (seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    common = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(spec.seed)
    if spec.arch == "llama":
        config = LlamaConfig(
            hidden_size=spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            intermediate_size=spec.intermediate,
            max_position_embeddings=spec.max_positions,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            **common,
        )
        return LlamaForCausalLM(config)
    if spec.arch == "gpt2":
        config = GPT2Config(
            n_embd=spec.hidden,
            n_layer=spec.layers,
            n_head=spec.heads,
            n_inner=spec.intermediate,
            n_positions=spec.max_positions,
            activation_function="gelu",  # one fused op; "gelu_new" is several on CPU
            **common,
        )
        return GPT2LMHeadModel(config)
    raise ValueError(f"unknown architecture {spec.arch!r}; use 'llama' or 'gpt2'")


def param_counts(model: torch.nn.Module) -> dict:
    """Unique parameters (tied weights once) and the share held by token/position embeddings."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embedding = model.get_input_embeddings().weight.numel()
    for name, module in model.named_modules():
        if name.endswith("wpe") and isinstance(module, torch.nn.Embedding):
            embedding += module.weight.numel()  # GPT-2's learned positions
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "embedding_share": round(embedding / total, 4),
    }


def token_stream(tok, texts: Sequence[str]) -> list[int]:
    """All texts tokenised and joined, each followed by ``eos`` as a document separator."""
    eos = tok.eos_token_id
    out: list[int] = []
    # The backend directly: no per-call length warning, no special tokens added.
    for enc in tok.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        out.extend(enc.ids)
        out.append(eos)
    return out


def pack_windows(stream: Sequence[int], seq_len: int) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows over ``stream`` (the short tail is dropped)."""
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _autocast(enabled: bool):
    if enabled:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pretrain(
    model: torch.nn.Module,
    windows: torch.Tensor,
    spec: ModelSpec,
    recipe: ZooRecipe,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train ``model`` on shuffled ``windows`` for ``spec.train_tokens`` tokens.

    AdamW, linear warm-up then cosine decay to 10 %, gradient clipping at 1.0; bf16 autocast
    on CPU when the recipe says so (weights and optimiser state stay fp32).
    """
    batch = recipe.batch_size
    seq_len = windows.shape[1]
    steps = max(1, spec.train_tokens // (batch * seq_len))
    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.cat(
        [
            torch.randperm(len(windows), generator=gen)
            for _ in range(math.ceil(steps * batch / len(windows)))
        ]
    )
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    warmup = min(recipe.warmup_steps, max(1, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    every = max(1, steps // 10)
    start = last = time.perf_counter()
    running = 0.0
    for step in range(steps):
        x = windows[order[step * batch : (step + 1) * batch]]
        with _autocast(recipe.bf16_autocast):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if log is not None and ((step + 1) % every == 0 or step + 1 == steps):
            now = time.perf_counter()
            n = (step % every) + 1
            tps = n * batch * seq_len / max(now - last, 1e-9)
            log(
                f"{spec.name}: step {step + 1}/{steps} loss {running / n:.3f} "
                f"lr {sched.get_last_lr()[0]:.2e} tok/s {tps:,.0f}"
            )
            running, last = 0.0, now
    model.eval()
    seconds = time.perf_counter() - start
    return {
        "steps": steps,
        "tokens": steps * batch * seq_len,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(steps * batch * seq_len / max(seconds, 1e-9)),
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, tok, texts: Sequence[str], seq_len: int) -> dict:
    """Mean next-token loss (nats) over ``texts`` and bits per UTF-8 byte.

    The texts are joined with ``eos`` into one stream and cut into windows of ``seq_len + 1``
    that share their boundary token, so every token but the first is predicted exactly once;
    the byte count includes one byte per separator.
    """
    stream = token_stream(tok, texts)
    n_bytes = sum(len(t.encode("utf-8")) + 1 for t in texts)
    model.eval()
    total, count = 0.0, 0
    windows = [stream[i : i + seq_len + 1] for i in range(0, len(stream) - 1, seq_len)]
    for start in range(0, len(windows), 16):
        group = windows[start : start + 16]
        width = max(len(w) for w in group)
        ids = torch.full((len(group), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.bool)
        for row, w in enumerate(group):
            ids[row, : len(w)] = torch.tensor(w)
            mask[row, : len(w)] = True
        logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1].long()).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        keep = mask[:, 1:].reshape(-1)
        total += nll[keep].sum().item()
        count += int(keep.sum())
    loss = total / max(count, 1)
    return {
        "loss": round(loss, 4),
        "bits_per_byte": round(total / math.log(2) / max(n_bytes, 1), 4),
        "tokens": count,
    }
