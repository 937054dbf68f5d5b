"""The FedMKT logits payload: top-k log-probabilities per predicted position, one CE per sample.

A model run over S public samples is sent as a flat dict of arrays (``to_arrays`` /
``from_arrays``; ``to_bytes`` packs it as safetensors, never pickle)::

    topk_values  [N, k]  float16  top-k log-probabilities of each row (log-softmax of the
                                  logits: finite, <= 0), non-increasing along the row
    topk_ids     [N, k]  int32    their token ids: distinct within a row, in [0, vocab_size)
    offsets      [S+1]   int64    sample s owns rows offsets[s]:offsets[s+1]; offsets[0] == 0,
                                  non-decreasing, offsets[S] == N
    sample_ce    [S]     float32  the sender's CE on sample s, mean per predicted token, >= 0
    vocab_size   [1]     int64    size of the sender's vocabulary (k <= vocab_size)
    k            [1]     int64    equal to the width of topk_values
    version      [1]     int64    PAYLOAD_VERSION

Rows: a sample of L attended tokens has L - 1 rows; row r is the distribution the model put on
token r + 1 (its output at attended position r), so every row has a label. Unknown extra keys
are ignored when reading (later versions may add some); a newer ``version`` is refused.

Why log-probabilities rather than raw logits: they differ by one constant per row, so the
softmax over the top k is the same, but log-probabilities also tell the receiver how much mass
lies outside the top k (``algorithms.core.kd.complete_topk`` spreads it over the other tokens),
they cannot overflow float16 upwards, and the one-hot fallback of the token alignment (a single
0.0 = log 1) is then a target of the same kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from algorithms.base import AlgorithmError, pack_state, unpack_state

__all__ = ["PAYLOAD_VERSION", "LogitsPayload", "PayloadError", "payload_from_logits"]

PAYLOAD_VERSION = 1
_FLOAT16_MIN = float(np.finfo(np.float16).min)
_FIELDS = {
    "topk_values": (np.float16, 2),
    "topk_ids": (np.int32, 2),
    "offsets": (np.int64, 1),
    "sample_ce": (np.float32, 1),
}


class PayloadError(AlgorithmError, ValueError):
    """A logits payload that is malformed or cannot be built; the message says what is wrong."""


@dataclass(frozen=True, eq=False)
class LogitsPayload:
    """Validated on construction (see the module docstring for every rule)."""

    topk_values: np.ndarray
    topk_ids: np.ndarray
    offsets: np.ndarray
    sample_ce: np.ndarray
    vocab_size: int

    def __post_init__(self) -> None:
        for name, (dtype, ndim) in _FIELDS.items():
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != ndim:
                got = f"{arr.dtype}, {arr.ndim}-d" if isinstance(arr, np.ndarray) else type(arr)
                raise PayloadError(f"{name} must be a {ndim}-d {np.dtype(dtype)} array, got {got}")
        values, ids, offsets, ce = self.topk_values, self.topk_ids, self.offsets, self.sample_ce
        vocab = self.vocab_size
        if isinstance(vocab, bool) or not isinstance(vocab, (int, np.integer)) or vocab < 1:
            raise PayloadError(f"vocab_size must be a positive integer, got {vocab!r}")
        if values.shape != ids.shape:
            raise PayloadError(f"topk_values {values.shape} and topk_ids {ids.shape} differ")
        n, k = values.shape
        if not 1 <= k <= vocab:
            raise PayloadError(f"k={k} must be between 1 and vocab_size={vocab}")
        if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != n:
            raise PayloadError(f"offsets must start at 0 and end at the row count {n}")
        if np.any(np.diff(offsets) < 0):
            raise PayloadError("offsets must be non-decreasing")
        if ce.shape != (len(offsets) - 1,):
            raise PayloadError(f"sample_ce has {len(ce)} entries for {len(offsets) - 1} samples")
        if not np.isfinite(values).all():
            raise PayloadError("topk_values holds NaN or infinite values")
        if np.any(values > 0):
            raise PayloadError("topk_values must be log-probabilities (<= 0)")
        if not np.isfinite(ce).all() or np.any(ce < 0):
            raise PayloadError("sample_ce must be finite and non-negative")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise PayloadError(f"topk_ids outside [0, {vocab})")
        if np.any(values[:, 1:] > values[:, :-1]):
            raise PayloadError("topk_values rows must be sorted in descending order")
        ordered = np.sort(ids, axis=1)
        if np.any(ordered[:, 1:] == ordered[:, :-1]):
            raise PayloadError("topk_ids repeat an id within a row")

    @property
    def k(self) -> int:
        return int(self.topk_values.shape[1])

    @property
    def num_samples(self) -> int:
        return len(self.sample_ce)

    @property
    def lengths(self) -> np.ndarray:
        """Rows per sample, [S] int64."""
        return np.diff(self.offsets)

    def sample(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(values [L-1, k], ids [L-1, k]) of sample ``s``."""
        if not 0 <= s < self.num_samples:
            raise PayloadError(f"sample {s} outside [0, {self.num_samples})")
        lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
        return self.topk_values[lo:hi], self.topk_ids[lo:hi]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "topk_values": self.topk_values,
            "topk_ids": self.topk_ids,
            "offsets": self.offsets,
            "sample_ce": self.sample_ce,
            "vocab_size": np.array([self.vocab_size], dtype=np.int64),
            "k": np.array([self.k], dtype=np.int64),
            "version": np.array([PAYLOAD_VERSION], dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> LogitsPayload:
        missing = sorted({*_FIELDS, "vocab_size", "k", "version"} - set(arrays))
        if missing:
            raise PayloadError(f"payload lacks {missing}")
        version, vocab, k = (_scalar(arrays, name) for name in ("version", "vocab_size", "k"))
        if version > PAYLOAD_VERSION:
            raise PayloadError(
                f"payload version {version} is newer than {PAYLOAD_VERSION}; upgrade"
            )
        if version < 1:
            raise PayloadError(f"invalid payload version {version}")
        out = cls(*(arrays[name] for name in _FIELDS), vocab_size=vocab)
        if out.k != k:
            raise PayloadError(f"k={k} but topk_values has {out.k} columns")
        return out

    def to_bytes(self) -> bytes:
        return pack_state(self.to_arrays())

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> LogitsPayload:
        try:
            arrays = unpack_state(data)
        except AlgorithmError as exc:
            raise PayloadError(str(exc)) from exc
        return cls.from_arrays(arrays)


def _scalar(arrays: Mapping[str, np.ndarray], name: str) -> int:
    arr = arrays[name]
    if not isinstance(arr, np.ndarray) or arr.shape != (1,) or arr.dtype.kind not in "iu":
        raise PayloadError(f"{name} must be a one-element integer array")
    return int(arr[0])


def payload_from_logits(
    logits: Any,
    input_ids: Any,
    attention_mask: Any = None,
    k: int = 32,
    vocab_size: int | None = None,
) -> LogitsPayload:
    """Top-k payload of a batch: ``logits`` [B, T, V], ``input_ids`` [B, T] and
    ``attention_mask`` [B, T] (None: all attended) as torch tensors, left or right padded.

    For each sample the attended positions p_0 < ... < p_{L-1} give L - 1 rows: the top ``k``
    of ``log_softmax(logits[b, p_r])`` (the distribution over token ``input_ids[b, p_{r+1}]``)
    and the mean cross-entropy of those L - 1 tokens. ``vocab_size`` defaults to V; a smaller
    one drops the logits columns past it (padded embedding rows) from both.
    """
    import torch

    if logits.dim() != 3 or tuple(input_ids.shape) != tuple(logits.shape[:2]):
        raise PayloadError(f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)}")
    batch, _, width = logits.shape
    vocab = width if vocab_size is None else vocab_size
    if not 1 <= vocab <= width:
        raise PayloadError(f"vocab_size={vocab} must be between 1 and the logits width {width}")
    if not 1 <= k <= vocab:
        raise PayloadError(f"k={k} must be between 1 and the vocabulary size {vocab}")
    mask = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.bool()
    )
    values, ids, lengths, ces = [], [], [0], []
    with torch.no_grad():
        for b in range(batch):
            pos = torch.nonzero(mask[b]).flatten()
            if len(pos) < 2:
                raise PayloadError(f"sample {b} has {len(pos)} attended tokens; need at least 2")
            rows = logits[b, pos[:-1], :vocab].float()  # columns past vocab_size: padding
            logp = torch.log_softmax(rows, dim=-1)
            labels = input_ids[b, pos[1:]].long()
            if labels.min() < 0 or labels.max() >= vocab:
                raise PayloadError(f"sample {b} has token ids outside [0, {vocab})")
            top = torch.topk(logp, k, dim=-1)
            # below float16's range a probability is 0 in any precision: clamp, do not fail
            values.append(top.values.clamp(min=_FLOAT16_MIN).to(torch.float16).cpu())
            ids.append(top.indices.to(torch.int32).cpu())
            ces.append(float(-logp.gather(1, labels[:, None]).mean()))
            lengths.append(len(pos) - 1)
    return LogitsPayload(
        torch.cat(values).numpy(),
        torch.cat(ids).numpy(),
        np.cumsum(lengths, dtype=np.int64),
        np.asarray(ces, dtype=np.float32),
        int(vocab),
    )
