"""FedMKT sequence side: DTW between two tokenisations, top-k projection, DualMinCE selection.

The same text tokenised by the *base* model (the receiver) and the *blending* model (the
teacher) gives two token sequences. ``align_sequences`` aligns them by dynamic time warping with
the edit distance between token texts (markers stripped, see ``token_markers.token_text``) as
the cost. A base position aligned one-to-one with a blending position takes that position's
top-k distribution, carried into the base vocabulary by the MinED map (``project_topk``);
every other base position falls back to a one-hot target on the base token itself.

Row convention: row ``i`` of a distribution array is the distribution *over token i* (the
model's output at position ``i - 1``), so the one-hot fallback on base token ``i`` is exactly
the label at that row. Callers shift logits accordingly before aligning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from algorithms.core.token_markers import AlignmentError, token_text

__all__ = [
    "Alignment",
    "ProjectedTopK",
    "align_sequences",
    "align_tokens",
    "dual_min_ce",
    "dual_min_ce_batch",
    "project_topk",
]


@dataclass(frozen=True)
class Alignment:
    """A DTW alignment of ``n`` base tokens with ``m`` blending tokens.

    ``path``: [P, 2] int64 pairs (base position, blend position) from (0, 0) to (n-1, m-1),
    both coordinates non-decreasing, each step advancing one or both. ``base_to_blend``: [n]
    int64, the blending position of a one-to-one pair (the only pair of that base position and
    the only pair of that blend position), -1 otherwise. ``cost``: total edit distance on the
    path.
    """

    path: np.ndarray
    base_to_blend: np.ndarray
    cost: int

    @property
    def matched(self) -> np.ndarray:
        return self.base_to_blend >= 0


def align_sequences(base_tokens: Sequence[str], blend_tokens: Sequence[str]) -> Alignment:
    """DTW of two token-text sequences with Levenshtein cost; O(n*m) time and memory.

    Backtrace tie rule: from (i, j) step to the predecessor of smallest accumulated cost,
    preferring the diagonal (i-1, j-1), then (i-1, j), then (i, j-1). An empty side aligns
    nothing (empty path, every base position -1, cost 0).
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    n, m = len(base_tokens), len(blend_tokens)
    if n == 0 or m == 0:
        return Alignment(np.zeros((0, 2), dtype=np.int64), np.full(n, -1, dtype=np.int64), 0)
    # a path has at most n + m steps, each costing at most the longer token's length
    bound = (n + m) * max(max(map(len, base_tokens)), max(map(len, blend_tokens)), 1)
    dtype = np.int32 if bound < 2**31 - 1 else np.int64  # int32 halves the two n*m arrays
    cost = process.cdist(
        list(base_tokens), list(blend_tokens), scorer=Levenshtein.distance, dtype=dtype, workers=1
    )
    acc = np.empty((n, m), dtype=dtype)
    acc[0] = np.cumsum(cost[0])
    reach = np.empty(m, dtype=dtype)
    for i in range(1, n):
        prev = acc[i - 1]
        reach[0] = prev[0]
        np.minimum(prev[:-1], prev[1:], out=reach[1:])  # best of diagonal and vertical entry
        # acc[i, j] = cost[i, j] + min(reach[j], acc[i, j-1]) unrolled into a prefix minimum:
        # acc[i, j] = C[j] + min over k <= j of (reach[k] - C[k-1]), C = cumsum(cost[i])
        run = np.cumsum(cost[i], dtype=dtype)
        acc[i] = run + np.minimum.accumulate(reach - (run - cost[i]))
    i, j = n - 1, m - 1
    steps = [(i, j)]
    while i > 0 or j > 0:
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            diag, up, left = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
            if diag <= up and diag <= left:
                i, j = i - 1, j - 1
            elif up <= left:
                i -= 1
            else:
                j -= 1
        steps.append((i, j))
    path = np.asarray(steps[::-1], dtype=np.int64)
    bi, bj = path[:, 0], path[:, 1]
    single = (np.bincount(bi, minlength=n)[bi] == 1) & (np.bincount(bj, minlength=m)[bj] == 1)
    base_to_blend = np.full(n, -1, dtype=np.int64)
    base_to_blend[bi[single]] = bj[single]
    return Alignment(path, base_to_blend, int(acc[n - 1, m - 1]))


def align_tokens(
    base_tokens: Sequence[str], base_style: str, blend_tokens: Sequence[str], blend_style: str
) -> Alignment:
    """:func:`align_sequences` on raw token strings of the given marker styles (markers are
    stripped through the normal form first)."""
    return align_sequences(
        [token_text(t, base_style) for t in base_tokens],
        [token_text(t, blend_style) for t in blend_tokens],
    )


@dataclass(frozen=True)
class ProjectedTopK:
    """Targets in the base vocabulary, per base position: ``values`` [n, k] float32 in
    descending order with ``-inf`` padding (log-probabilities when the blending values are, as
    in the FedMKT payload), ``ids`` [n, k] int64 base ids (0 where padded), ``matched`` [n]
    bool (False: one-hot fallback, a single value 0.0 = log 1 on the base token; its softmax
    is one-hot whatever the temperature)."""

    values: np.ndarray
    ids: np.ndarray
    matched: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return np.isfinite(self.values)


def project_topk(
    base_to_blend: np.ndarray,
    base_ids: np.ndarray,
    blend_values: np.ndarray,
    blend_ids: np.ndarray,
    vocab_map: Any,
) -> ProjectedTopK:
    """Carry the blending top-k of one-to-one aligned positions into the base vocabulary.

    ``base_to_blend`` [n] (an ``Alignment.base_to_blend``), ``base_ids`` [n] the base token ids,
    ``blend_values`` / ``blend_ids`` [m, k] the blending top-k log-probabilities (or logits)
    and ids (row j is the distribution over blend token j; ``-inf`` entries are absent),
    ``vocab_map`` a ``VocabMap`` or int array from blending ids to base ids. Ids that land on
    the same base id keep the highest value; a row is sorted by value descending, then by id.
    Unmatched rows, and matched rows with no finite entry, become one-hot on ``base_ids``.
    """
    table = np.asarray(getattr(vocab_map, "ids", vocab_map), dtype=np.int64)
    link = np.asarray(base_to_blend, dtype=np.int64)
    base_ids = np.asarray(base_ids, dtype=np.int64)
    vals = np.asarray(blend_values, dtype=np.float32)
    bids = np.asarray(blend_ids, dtype=np.int64)
    if vals.ndim != 2 or vals.shape != bids.shape or vals.shape[1] < 1:
        raise AlignmentError(f"blend top-k shapes {vals.shape} / {bids.shape}; want equal [m, k]")
    n, (m, k) = len(link), vals.shape
    if link.ndim != 1 or base_ids.shape != (n,):
        raise AlignmentError("base_to_blend and base_ids must both be [n]")
    if n and (link.min() < -1 or link.max() >= m):
        raise AlignmentError(f"base_to_blend points outside the {m} blending positions")
    if bids.size and (bids.min() < 0 or bids.max() >= len(table)):
        raise AlignmentError(f"blending ids outside the vocabulary map (size {len(table)})")
    if np.isnan(vals).any() or np.isposinf(vals).any():
        raise AlignmentError("blending values must be finite (or -inf for absent)")

    values = np.full((n, k), -np.inf, dtype=np.float32)
    ids = np.zeros((n, k), dtype=np.int64)
    rows = np.nonzero(link >= 0)[0]
    row = np.repeat(np.arange(len(rows)), k)
    tid = table[bids[link[rows]]].ravel()
    val = vals[link[rows]].ravel()
    live = val > -np.inf
    row, tid, val = row[live], tid[live], val[live]
    order = np.lexsort((-val, tid, row))  # per row and id, highest value first
    row, tid, val = row[order], tid[order], val[order]
    first = np.ones(len(row), dtype=bool)
    first[1:] = (row[1:] != row[:-1]) | (tid[1:] != tid[:-1])
    row, tid, val = row[first], tid[first], val[first]
    order = np.lexsort((tid, -val, row))  # per row: value descending, then id
    row, tid, val = row[order], tid[order], val[order]
    col = np.arange(len(row)) - np.searchsorted(row, row, side="left")
    values[rows[row], col] = val
    ids[rows[row], col] = tid
    matched = np.zeros(n, dtype=bool)
    matched[rows[np.unique(row)]] = True
    values[~matched, 0] = 0.0
    ids[~matched, 0] = base_ids[~matched]
    return ProjectedTopK(values, ids, matched)


def dual_min_ce(teacher_ces: Sequence[float], own_ce: float) -> int | None:
    """DualMinCE for one sample: the index of the teacher to learn from, or None to keep the
    receiver's own distribution.

    The teacher of smallest CE is chosen (ties: lowest index; NaN CEs are never chosen) and
    used only if its CE is strictly below ``own_ce`` (a NaN ``own_ce`` counts as +inf).
    """
    best: int | None = None
    for t, ce in enumerate(teacher_ces):
        if not math.isnan(ce) and (best is None or ce < teacher_ces[best]):
            best = t
    own = math.inf if math.isnan(own_ce) else own_ce
    return best if best is not None and teacher_ces[best] < own else None


def dual_min_ce_batch(teacher_ces: np.ndarray, own_ce: np.ndarray) -> np.ndarray:
    """:func:`dual_min_ce` for S samples at once: ``teacher_ces`` [T, S], ``own_ce`` [S];
    returns [S] int64 teacher indices, -1 where the receiver keeps its own distribution."""
    ces = np.asarray(teacher_ces, dtype=np.float64)
    own = np.asarray(own_ce, dtype=np.float64)
    if ces.ndim != 2 or own.shape != (ces.shape[1],):
        raise AlignmentError(f"teacher CEs {ces.shape} and own CEs {own.shape}; want [T, S], [S]")
    if ces.shape[0] == 0:
        return np.full(own.shape, -1, dtype=np.int64)
    ces = np.where(np.isnan(ces), np.inf, ces)
    best = ces.argmin(axis=0)  # first minimum: lowest index
    use = ces[best, np.arange(ces.shape[1])] < np.where(np.isnan(own), np.inf, own)
    return np.where(use, best, -1).astype(np.int64)
