"""Knowledge-distillation kernels shared by the algorithms: soft-target losses, the proxy-tuning
arithmetic, vocabulary checks and the completion of top-k log-probabilities.

Conventions: logits are ``[B, T, V]``; position ``t`` predicts token ``t + 1``; a ``mask`` of
``[B, T]`` marks the positions whose prediction counts (1) — for causal LM training that is
``labels[:, 1:] != -100`` shifted back by one, see :func:`prediction_mask`.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
import torch.nn.functional as F

from algorithms.core.errors import ModelError

__all__ = [
    "VocabularyMismatch",
    "check_shared_vocabulary",
    "common_vocab_size",
    "complete_topk",
    "kd_loss",
    "prediction_mask",
    "proxy_logits",
    "task_loss",
    "vocabulary_hash",
]

IGNORE_INDEX = -100


class VocabularyMismatch(ModelError, ValueError):
    """Two models whose tokens must mean the same thing (proxy-tuning, co-distillation) have
    different tokenizers."""


def vocabulary_hash(tokenizer: Any) -> str:
    """SHA-256 over the tokenizer's token -> id map (special tokens included)."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def check_shared_vocabulary(tok_a: Any, tok_b: Any, what: str = "these models") -> None:
    """Refuse unless both tokenizers map the same strings to the same ids.

    A model's embedding matrix may be padded beyond the tokenizer (e.g. to a multiple of 64);
    that is fine and handled by :func:`common_vocab_size`. Different *tokenizers* are not: the
    logits would be added position by position over tokens that mean different things."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va == vb:
        return
    only_a = sorted(set(va) - set(vb))[:5]
    only_b = sorted(set(vb) - set(va))[:5]
    moved = [t for t in set(va) & set(vb) if va[t] != vb[t]][:5]
    raise VocabularyMismatch(
        f"{what} need one shared tokenizer, but the vocabularies differ (sizes {len(va)} vs "
        f"{len(vb)}; only in the first: {only_a}; only in the second: {only_b}; different ids: "
        f"{moved}). Use models of one family, or FedMKT, which aligns different tokenizers."
    )


def common_vocab_size(*sizes: int) -> int:
    return int(min(sizes))


def prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` float mask: 1 where position ``t`` predicts a real target ``labels[t+1]``."""
    mask = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    mask[:, :-1] = (labels[:, 1:] != IGNORE_INDEX).float()
    return mask


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets of ``labels`` (-100 skipped)."""
    shift = logits[:, :-1, :].float()
    return F.cross_entropy(
        shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    kind: str = "kl",
) -> torch.Tensor:
    """Soft-target distillation loss averaged over the masked positions.

    ``kind="kl"``: KL(p_teacher || p_student) (forward KL; zero when the student equals the
    teacher). ``kind="ce"``: the soft-target cross-entropy ``-sum p_teacher log p_student``
    (same gradient, offset by the teacher's entropy). With a temperature ``T`` both
    distributions are softened and the loss is scaled by ``T^2`` (Hinton et al.), so gradients
    keep their size. ``teacher_logprobs`` are normalised log-probabilities at temperature 1, or
    any logits: they are re-normalised here. The teacher is never differentiated.
    """
    if kind not in ("kl", "ce"):
        raise ValueError(f"kd kind must be 'kl' or 'ce', got {kind!r}")
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    v = min(student_logits.shape[-1], teacher_logprobs.shape[-1])
    s = F.log_softmax(student_logits[..., :v].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logprobs[..., :v].detach().float() / temperature, dim=-1)
    p = t.exp()
    per_pos = (p * (t - s)).sum(-1) if kind == "kl" else -(p * s).sum(-1)
    m = mask.to(per_pos.dtype)
    denom = m.sum().clamp_min(1.0)
    return (per_pos * m).sum() / denom * (temperature**2)


def proxy_logits(
    large: torch.Tensor, tuned: torch.Tensor, base: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """Proxy-tuning (Liu et al. 2024): ``z = z_large + alpha * (z_tuned - z_base)`` over the
    common vocabulary (the larger logit vectors are truncated). Log-probabilities may stand in
    for logits: a per-position constant does not change the softmax. Returns float32."""
    v = common_vocab_size(large.shape[-1], tuned.shape[-1], base.shape[-1])
    return large[..., :v].float() + float(alpha) * (tuned[..., :v].float() - base[..., :v].float())


def complete_topk(
    values: torch.Tensor, ids: torch.Tensor, vocab_size: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense log-probabilities ``[..., vocab_size]`` from top-k log-probabilities.

    The known entries keep their values; the probability mass they leave over,
    ``1 - sum(exp(values))``, is spread evenly over the other tokens (the maximum-entropy
    completion: the black box says nothing about them). ``valid`` ([..., k] bool) marks real
    entries when rows carry fewer than k. With the full vocabulary given it is the identity."""
    values = values.float()
    if valid is None:
        valid = torch.isfinite(values)
    vals = torch.where(valid, values, torch.full_like(values, -math.inf))
    known = torch.logsumexp(vals, dim=-1, keepdim=True).clamp(max=0.0)  # log mass of the top-k
    n_known = valid.sum(-1, keepdim=True)
    n_rest = (vocab_size - n_known).clamp_min(1).float()
    rest_mass = (-torch.expm1(known)).clamp_min(1e-12)  # 1 - exp(known), stable near 0
    fill = torch.log(rest_mass / n_rest)
    # one spare column receives the padding entries, so they never overwrite a real id
    out = fill.expand(*values.shape[:-1], vocab_size + 1).clone()
    safe_ids = torch.where(valid, ids.long(), torch.full_like(ids, vocab_size, dtype=torch.long))
    out.scatter_(-1, safe_ids, vals)
    return out[..., :vocab_size]
