"""FedMKT's receiving side: teacher rows carried into the receiver's tokenisation, a dataset
that holds them beside the task data, and the top-k KD term the training loop adds.

Rows and positions: a sample of n receiver tokens has n - 1 predictions; prediction t (the
model's output at position t) is over token t + 1. :func:`aligned_targets` returns one target
row per prediction; :class:`TargetDataset` stores it at position t, where the training loop's
logits for that prediction are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from algorithms.core.textdata import IGNORE_INDEX, TokenizedDataset
from algorithms.core.token_alignment import (
    Vocabulary,
    align_tokens,
    project_topk,
)

from .config import ALIGN_RULES
from .payload import PayloadError

__all__ = [
    "ALIGN_RULES",
    "AlignCounter",
    "AlignedTargets",
    "TargetDataset",
    "aligned_targets",
    "kd_term",
    "tokens_agree",
    "topk_kd_loss",
]

_FILL = -1e9  # stands for log 0 in the KD term (a finite value keeps the masked rows NaN-free)


class AlignedTargets(NamedTuple):
    """Target rows of one sample in the receiver's tokenisation (row t: the prediction over
    receiver token t + 1). ``values`` [n - 1, k] float32 log-probabilities (-inf padded),
    ``ids`` [n - 1, k] int64 receiver ids; per row, bool [n - 1]: ``matched`` (the row is the
    teacher's distribution), ``aligned`` (the receiver token has a one-to-one DTW partner) and
    ``agree`` (aligned, and the two tokens agree: see :func:`tokens_agree`)."""

    values: np.ndarray
    ids: np.ndarray
    matched: np.ndarray
    aligned: np.ndarray
    agree: np.ndarray


def tokens_agree(
    recv_ids: Sequence[int],
    recv_vocab: Vocabulary,
    teach_ids: Sequence[int],
    teach_vocab: Vocabulary,
    vocab_map: Any,
) -> np.ndarray:
    """[n] bool: receiver token i agrees with teacher token i (pairs of equal length): their
    normal forms (:meth:`~algorithms.core.token_markers.Vocabulary.normal_form`, word-start
    marker included; specials literally) are equal, or the MinED map carries the teacher token
    onto the receiver token."""
    table = np.asarray(getattr(vocab_map, "ids", vocab_map), dtype=np.int64)
    r = np.asarray(recv_ids, dtype=np.int64)
    t = np.asarray(teach_ids, dtype=np.int64)
    mapped = table[t] == r
    for i in np.nonzero(~mapped)[0].tolist():
        a, b = int(r[i]), int(t[i])
        mapped[i] = (
            recv_vocab.tokens[a] is not None
            and teach_vocab.tokens[b] is not None
            and recv_vocab.normal_form(a) == teach_vocab.normal_form(b)
        )
    return mapped


def aligned_targets(
    recv_ids: Sequence[int],
    recv_vocab: Vocabulary,
    teach_ids: Sequence[int],
    teach_vocab: Vocabulary,
    teach_values: np.ndarray,
    teach_topk: np.ndarray,
    vocab_map: Any,
    *,
    rule: str = "agree",
    own: tuple[np.ndarray, np.ndarray] | None = None,
) -> AlignedTargets:
    """The teacher's rows of one sample in the receiver's tokenisation and vocabulary.

    ``teach_values`` / ``teach_topk``: the teacher's [m - 1, k] rows for its m tokens
    ``teach_ids``; ``vocab_map``: teacher ids -> receiver ids (MinED). The two token sequences
    are aligned by DTW (:func:`~algorithms.core.seq_align.align_tokens`). Which receiver rows
    take the teacher's row (its ids carried through the map):

    - ``rule="agree"`` (the paper's, after FuseLLM's ``transform_step_logits``): only a
      receiver token aligned one-to-one with a teacher token that *agrees* with it (equal
      normal forms, or the MinED map carries the teacher token onto it: :func:`tokens_agree`);
      a one-to-one pair of different tokens (``thus`` against ``us``) is a misalignment, and
      the teacher's row there is a distribution over another word;
    - ``rule="one_to_one"``: every one-to-one pair, agreeing or not (the rule before the
      agreement check, kept for comparison).

    Every other row is the receiver's own: a one-hot target on its own token (the paper's), or
    with ``own`` = (values, ids) [n - 1, k'], the receiver's own top-k row there (its
    distribution from before the step, ``keep_own="self"``)."""
    if rule not in ALIGN_RULES:
        raise ValueError(f"align rule must be one of {ALIGN_RULES}, got {rule!r}")
    recv_ids = [int(i) for i in recv_ids]
    teach_ids = [int(i) for i in teach_ids]
    if teach_values.shape[0] != len(teach_ids) - 1:
        raise PayloadError(f"teacher has {teach_values.shape[0]} rows for {len(teach_ids)} tokens")
    if min(teach_ids) < 0 or max(teach_ids) >= teach_vocab.size:
        raise PayloadError("teacher token ids outside the teacher's vocabulary")
    al = align_tokens(
        [recv_vocab.tokens[i] or "" for i in recv_ids],
        recv_vocab.style,
        [teach_vocab.tokens[i] or "" for i in teach_ids],
        teach_vocab.style,
    )
    link = al.base_to_blend.copy()
    aligned = link >= 0
    agree = np.zeros(len(recv_ids), dtype=bool)
    pairs = np.nonzero(aligned)[0]
    agree[pairs] = tokens_agree(
        [recv_ids[i] for i in pairs], recv_vocab, [teach_ids[j] for j in link[pairs]],
        teach_vocab, vocab_map,
    )
    if rule == "agree":
        link[~agree] = -1
    k = teach_values.shape[1]
    # row j of the blending side is the distribution over teacher token j; token 0 has none
    values = np.concatenate(
        [np.full((1, k), -np.inf, np.float32), np.asarray(teach_values, np.float32)]
    )
    ids = np.concatenate([np.zeros((1, k), np.int64), np.asarray(teach_topk, np.int64)])
    proj = project_topk(link, np.asarray(recv_ids, np.int64), values, ids, vocab_map)
    values, ids, matched = proj.values[1:], proj.ids[1:], proj.matched[1:]
    if own is not None:
        own_values, own_ids = (np.asarray(a) for a in own)
        if own_values.shape[0] != len(recv_ids) - 1 or own_ids.shape != own_values.shape:
            raise PayloadError(
                f"own rows {own_values.shape} for {len(recv_ids)} receiver tokens"
            )
        width = max(k, own_values.shape[1])
        values = _widen(values, width, -np.inf, np.float32)
        ids = _widen(ids, width, 0, np.int64)
        rest = ~matched
        values[rest] = _widen(own_values[rest].astype(np.float32), width, -np.inf, np.float32)
        ids[rest] = _widen(own_ids[rest].astype(np.int64), width, 0, np.int64)
    return AlignedTargets(values, ids, matched, aligned[1:], agree[1:])


class AlignCounter:
    """Per-row counts of :class:`AlignedTargets` over the selected samples of one step; its
    :meth:`metrics` are the fractions of all their rows: ``kd_aligned_fraction`` (rows that
    carry a teacher row), ``kd_one_to_one_fraction`` (rows whose token has a one-to-one DTW
    partner) and ``kd_agree_fraction`` (one-to-one partners that agree)."""

    def __init__(self) -> None:
        self.rows = self.matched = self.aligned = self.agree = 0

    def add(self, t: AlignedTargets) -> None:
        self.rows += len(t.matched)
        self.matched += int(t.matched.sum())
        self.aligned += int(t.aligned.sum())
        self.agree += int(t.agree.sum())

    def metrics(self) -> dict[str, float]:
        def frac(x: int) -> float:
            return round(x / self.rows, 4) if self.rows else 0.0

        return {
            "kd_aligned_fraction": frac(self.matched),
            "kd_one_to_one_fraction": frac(self.aligned),
            "kd_agree_fraction": frac(self.agree),
        }


def _widen(a: np.ndarray, width: int, fill: float, dtype) -> np.ndarray:
    out = np.full((a.shape[0], width), fill, dtype=dtype)
    out[:, : a.shape[1]] = a
    return out


class TargetDataset(TokenizedDataset):
    """One row per public sample (its tokens as the receiver reads them, right-padded); the
    rows of the samples with a selected teacher carry KD targets. Batches hold ``kd_values``
    [B, T, k] (log-probabilities, -inf padded), ``kd_ids`` [B, T, k] and ``kd_mask`` [B, T]
    (1 where position t has a target) beside the usual keys; every real token carries the task
    loss."""

    def __init__(
        self,
        tokenizer: Any,
        public: Sequence[Sequence[int]],
        targets: Mapping[int, tuple[np.ndarray, np.ndarray]],
        block_size: int,
        *,
        seed: int = 0,
    ):
        if not public:
            raise PayloadError("no public samples to train on")
        width = max([block_size, *(len(s) for s in public)])
        k = max([1, *(v.shape[1] for v, _ in targets.values())])
        pad = tokenizer.pad_token_id
        pad = int(pad if pad is not None else tokenizer.eos_token_id)
        n = len(public)
        ids = torch.full((n, width), pad, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        kd_values = torch.full((n, width, k), float("-inf"), dtype=torch.float32)
        kd_ids = torch.zeros((n, width, k), dtype=torch.int32)
        kd_mask = torch.zeros((n, width), dtype=torch.float32)
        for s, sample in enumerate(public):
            t = torch.as_tensor(list(sample), dtype=torch.long)
            ids[s, : len(t)] = t
            labels[s, : len(t)] = t
            mask[s, : len(t)] = 1
            if s in targets:
                values, topk = targets[s]
                rows, kk = values.shape
                if rows != len(t) - 1:
                    raise PayloadError(f"public sample {s}: {rows} target rows for {len(t)} tokens")
                kd_values[s, :rows, :kk] = torch.from_numpy(np.asarray(values, np.float32))
                kd_ids[s, :rows, :kk] = torch.from_numpy(
                    np.asarray(topk, np.int64).astype(np.int32)
                )
                kd_mask[s, :rows] = 1.0
        self.block_size = width
        self.seed = int(seed)
        self.pad_token_id = pad
        self.eos_token_id = tokenizer.eos_token_id
        self.kind = "text"
        self.input_ids, self.labels, self.attention_mask = ids, labels, mask
        self.kd_values, self.kd_ids, self.kd_mask = kd_values, kd_ids, kd_mask
        self.num_examples = self.num_source_examples = n
        self.num_tokens = int(mask.sum())
        self.num_loss_tokens = int((labels != IGNORE_INDEX).sum())
        self.num_kd_positions = int(kd_mask.sum())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            **super().__getitem__(i),
            "kd_values": self.kd_values[i],
            "kd_ids": self.kd_ids[i],
            "kd_mask": self.kd_mask[i],
        }

    def collate(self, indices: Sequence[int], trim: bool = True) -> dict[str, torch.Tensor]:
        batch = super().collate(indices, trim)
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        width = batch["input_ids"].shape[1]
        batch["kd_values"] = self.kd_values[idx, :width].contiguous()
        batch["kd_ids"] = self.kd_ids[idx, :width].long().contiguous()
        batch["kd_mask"] = self.kd_mask[idx, :width].contiguous()
        return batch


def topk_kd_loss(
    logits: torch.Tensor,
    values: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    kind: str = "ce",
    tail: bool = False,
) -> torch.Tensor:
    """Soft-target loss against a top-k teacher, averaged over the masked positions.

    The teacher distribution is the softmax of its finite top-k ``values / T`` (renormalised
    over the k entries it sent); the student's log-probabilities are taken over its whole
    vocabulary at the teacher's ``ids``. ``kind="ce"``: ``-sum p log q`` (the paper's
    soft-target cross-entropy); ``"kl"``: ``sum p (log p - log q)``. Scaled by ``T^2``.

    ``tail=True`` (temperature 1 only): the teacher's top-k probabilities are taken as sent
    (full-vocabulary log-probabilities, not renormalised) and the mass it did not send is one
    more bucket, matched by the student's mass outside those ids. The renormalised target tells
    the student that every other token has probability 0, which makes it over-confident on
    held-out text; the tail bucket keeps its calibration."""
    if tail and temperature != 1.0:
        raise ValueError("tail-aware top-k KD needs temperature 1 (the sent values are log-probabilities)")
    vocab = logits.shape[-1]
    valid = torch.isfinite(values) & (ids < vocab) & (ids >= 0)
    fill = torch.full_like(values, _FILL, dtype=torch.float32)
    # the teacher's top-k log-probabilities: as sent (tail) or renormalised over the k ids
    logp = torch.where(valid, values.float().clamp(max=0.0), fill) if tail else \
        torch.log_softmax(torch.where(valid, values.float() / temperature, fill), dim=-1)
    p = logp.exp() * valid
    logq = torch.log_softmax(logits.float() / temperature, dim=-1).gather(
        -1, ids.clamp(0, vocab - 1).long()
    )
    per_pos = -(p * logq).sum(-1)
    if kind == "kl":
        per_pos = per_pos + (p * torch.where(valid, logp, torch.zeros_like(logp))).sum(-1)
    if tail:  # the unsent mass, one bucket each side
        p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
        logq_tail = torch.log((1.0 - (logq.exp() * valid).sum(-1)).clamp_min(1e-6))
        per_pos = per_pos - p_tail * logq_tail
        if kind == "kl":
            per_pos = per_pos + p_tail * torch.log(p_tail.clamp_min(1e-12))
    m = mask.float() * valid.any(-1).float()
    return (per_pos * m).sum() / m.sum().clamp_min(1.0) * (temperature**2)


def kd_term(weight: float, temperature: float, kind: str, tail: bool = False):
    """The training loop's ``extra_loss``: ``weight`` x :func:`topk_kd_loss` on batches of a
    :class:`TargetDataset` (zero where a batch has no target)."""

    def term(model, batch, outputs):
        mask = batch.get("kd_mask")
        if weight == 0 or mask is None or not bool(mask.any()):
            return outputs.logits.new_zeros(())
        return weight * topk_kd_loss(
            outputs.logits, batch["kd_values"], batch["kd_ids"], mask, temperature, kind, tail
        )

    return term
