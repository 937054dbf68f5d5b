"""MinED vocabulary mapping between two tokenizers (FedMKT), with a disk cache.

Tokens are compared through their normal forms (:mod:`algorithms.core.token_markers`).

The MinED rule (``build_vocab_map``): each token of A maps to the token of B whose normal form
has the smallest Levenshtein distance to its own; ties go to the lexicographically smallest
normal form of B (Python code-point order); B tokens sharing that normal form are ordered
regular token before byte-fallback token (the tokenizer emits ``<0x41>`` only when ``A`` is not
a piece), then by smallest id. An exact match is the distance-0 case of the same rule.

Special tokens: a special of A maps to B's special of the same role (roles tried in the order
of ``ROLES``: eos, bos, pad, unk, cls, sep, mask); when B has none of its roles it is matched by
its literal string like any other token. B's specials are only reachable through roles:
ordinary tokens never map onto them. Ids of A without a token map to B's unk (id 0 when B has
none) with distance -1.

Maps are cached on disk (``cached_vocab_map``), keyed by the SHA-256 of both vocabularies, their
styles and specials, and ``ALGORITHM_VERSION``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from algorithms.core.token_markers import AlignmentError, Vocabulary, as_vocabulary, vocab_hash

__all__ = [
    "ALGORITHM_VERSION",
    "VocabMap",
    "build_vocab_map",
    "cached_vocab_map",
    "default_cache_dir",
    "map_key",
    "nearest_strings",
]

log = logging.getLogger(__name__)

ALGORITHM_VERSION = "mined-1"  # bump when the normal form or the tie rule changes
_BLOCK_CELLS = 1 << 22  # distance-matrix cells per cdist call


# --------------------------------------------------------------------------------------------
# nearest strings (the MinED kernel)


def nearest_strings(
    queries: Sequence[str], candidates: Sequence[str], workers: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """For every query, the candidate of minimum Levenshtein distance.

    Ties: lexicographically smallest candidate string (code-point order), then the smallest
    position in ``candidates``. Returns (positions int64, distances int32), identical to a full
    scan of all pairs. Pruning: exact matches by hash; distance 1 through a deletion index
    (every string within one edit of q is one of q's one-deletions, or has q or one of q's
    one-deletions among its own one-deletions); then exact distances over a band of candidate
    lengths |len(q) - len(c)| <= D grown ring by ring for D = 2, 3, 4, ..., each pair computed
    once (a query whose minimum is <= D is final: anything outside the band is more than D
    away). ``workers`` goes to ``rapidfuzz.process.cdist`` (-1: all cores).
    """
    if len(candidates) == 0:
        raise AlignmentError("no candidate strings to map onto")
    uniq: list[str] = []
    first: list[int] = []
    for s, p in sorted(zip(candidates, range(len(candidates)), strict=True)):
        if not uniq or uniq[-1] != s:
            uniq.append(s)
            first.append(p)
    lookup = {s: u for u, s in enumerate(uniq)}
    uq = list(dict.fromkeys(queries))
    best = np.full(len(uq), -1, dtype=np.int64)
    dist = np.zeros(len(uq), dtype=np.int64)
    todo = []
    for k, q in enumerate(uq):
        u = lookup.get(q)
        if u is None:
            todo.append(k)
        else:
            best[k] = u
    todo = _within_one(uq, todo, uniq, lookup, best, dist)
    _banded(uq, todo, uniq, best, dist, workers)
    where = {q: k for k, q in enumerate(uq)}
    back = np.fromiter((where[q] for q in queries), dtype=np.int64, count=len(queries))
    return np.asarray(first, dtype=np.int64)[best[back]], dist[back].astype(np.int32)


def _deletions(s: str) -> set[str]:
    return {s[:i] + s[i + 1 :] for i in range(len(s))}


def _within_one(uq, todo, uniq, lookup, best, dist) -> list[int]:
    # A string one edit from q (length L) is q minus one character (looked up directly), or
    # has length L or L+1 and a one-deletion equal to a one-deletion of q or to q itself: so
    # only candidates of those two lengths need their deletions indexed.
    from rapidfuzz.distance import Levenshtein

    if not todo:
        return []
    lengths = {len(uq[k]) for k in todo}
    index: dict[str, list[int]] = {}
    for u, s in enumerate(uniq):
        if len(s) in lengths or len(s) - 1 in lengths:
            for key in _deletions(s):
                index.setdefault(key, []).append(u)
    rest = []
    for k in todo:
        q = uq[k]
        near = set(index.get(q, ()))
        for key in _deletions(q):
            near.update(index.get(key, ()))
            if key in lookup:
                near.add(lookup[key])
        hits = [u for u in near if Levenshtein.distance(q, uniq[u], score_cutoff=1) <= 1]
        if hits:
            best[k], dist[k] = min(hits), 1  # uniq is sorted: smallest index = smallest string
        else:
            rest.append(k)
    return rest


def _banded(uq, todo, uniq, best, dist, workers) -> None:
    # Grow a band of candidate lengths around each query length L, one ring of lengths at a
    # time, computing every pair once and exactly; a query is final when its best distance is
    # <= D, the half-width of the band computed so far.
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    if not todo:
        return
    ulen = np.fromiter(map(len, uniq), dtype=np.int64, count=len(uniq))
    by_len = np.argsort(ulen, kind="stable")
    first_of = np.searchsorted(ulen[by_len], np.arange(int(ulen.max()) + 2))
    shortest, longest = int(ulen.min()), int(ulen.max())
    groups: dict[int, list[int]] = {}
    for k in todo:
        groups.setdefault(len(uq[k]), []).append(k)
    for length, members in sorted(groups.items()):
        pending = np.asarray(members, dtype=np.int64)
        low = np.full(len(pending), np.iinfo(np.int64).max)
        pick = np.full(len(pending), len(uniq), dtype=np.int64)
        done, band = None, 2
        while len(pending):
            lo, hi = max(length - band, shortest), min(length + band, longest)
            if lo <= hi:  # some candidate lengths lie in the band
                rings = [(lo, hi)] if done is None else [(lo, done[0] - 1), (done[1] + 1, hi)]
                for a, b in rings:
                    cols = by_len[first_of[a] : first_of[b + 1]] if a <= b else by_len[:0]
                    if cols.size:
                        _update(process, Levenshtein, uq, uniq, pending, cols, low, pick, workers)
                done = (lo, hi)
            final = (low <= band) | ((lo == shortest) & (hi == longest))
            best[pending[final]], dist[pending[final]] = pick[final], low[final]
            pending, low, pick = pending[~final], low[~final], pick[~final]
            band = band + 1 if band < 16 else max(length, longest)  # then everything


def _update(process, levenshtein, uq, uniq, pending, cols, low, pick, workers) -> None:
    """Fold the exact distances of ``pending`` queries to candidates ``cols`` into the running
    (low, pick) minimum, smaller candidate index first among equal distances."""
    cols = np.sort(cols)  # argmin's first minimum is then the smallest candidate index
    strings = [uniq[u] for u in cols]
    queries = [uq[k] for k in pending]
    longest = max(map(len, strings)) + max(map(len, queries))
    dtype = np.uint8 if longest < 255 else np.int32  # a distance never exceeds either length
    rows = max(1, _BLOCK_CELLS // len(cols))
    for start in range(0, len(pending), rows):
        part = slice(start, start + rows)
        d = process.cdist(
            queries[part], strings, scorer=levenshtein.distance, dtype=dtype, workers=workers
        )
        arg = d.argmin(axis=1)
        ring_low = d[np.arange(len(arg)), arg].astype(np.int64)
        ring_pick = cols[arg]
        better = (ring_low < low[part]) | ((ring_low == low[part]) & (ring_pick < pick[part]))
        low[part] = np.where(better, ring_low, low[part])
        pick[part] = np.where(better, ring_pick, pick[part])


# --------------------------------------------------------------------------------------------
# vocabulary maps and their cache


@dataclass(frozen=True)
class VocabMap:
    """``ids[a]``: the id in B of A's token ``a``; ``distances[a]``: the edit distance between
    their normal forms (0 for exact and role matches; -1 for ids of A that have no token,
    mapped to B's unk, or id 0 when B has no unk)."""

    ids: np.ndarray  # [|A|] int64
    distances: np.ndarray  # [|A|] int32
    key: str

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def exact_fraction(self) -> float:
        return float(np.mean(self.distances == 0)) if len(self.ids) else 0.0


def map_key(src: Vocabulary, dst: Vocabulary) -> str:
    """Cache key: the algorithm version and both sides' vocab hashes, styles and specials."""
    parts = [ALGORITHM_VERSION]
    for v in (src, dst):
        parts += [vocab_hash(v), v.style, [list(r) for r in v.roles], sorted(v.special_ids)]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


def build_vocab_map(src: Any, dst: Any, workers: int = -1) -> VocabMap:
    """The MinED map from ``src`` to ``dst`` (tokenizers, token -> id maps or
    :class:`Vocabulary`); the rule is in the module docstring."""
    a, b = as_vocabulary(src), as_vocabulary(dst)
    cand_ids = sorted(
        (i for i, t in enumerate(b.tokens) if t is not None and i not in b.special_ids),
        key=lambda i: (b.is_byte_fallback(i), i),
    )
    if not cand_ids:
        raise AlignmentError("the target vocabulary has no ordinary tokens")
    b_roles = dict(b.roles)
    ids = np.empty(a.size, dtype=np.int64)
    distances = np.zeros(a.size, dtype=np.int32)
    queries, rows = [], []
    for i, token in enumerate(a.tokens):
        if token is None:
            ids[i], distances[i] = b_roles.get("unk", 0), -1
            continue
        if i in a.special_ids:
            hit = next((b_roles[r] for r, j in a.roles if j == i and r in b_roles), None)
            if hit is not None:
                ids[i] = hit
                continue
        queries.append(a.normal_form(i))
        rows.append(i)
    if queries:
        pos, d = nearest_strings(queries, [b.normal_form(i) for i in cand_ids], workers)
        ids[rows] = np.asarray(cand_ids, dtype=np.int64)[pos]
        distances[rows] = d
    return VocabMap(ids, distances, map_key(a, b))


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "cotune" / "vocab_maps"


def _checksum(ids: np.ndarray, distances: np.ndarray) -> str:
    return hashlib.sha256(ids.tobytes() + distances.tobytes()).hexdigest()


def _read_cached(path: Path, key: str, src_size: int, dst_size: int) -> VocabMap:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        ids, distances = f.get_tensor("ids"), f.get_tensor("distances")
    ok = (
        meta.get("key") == key
        and meta.get("version") == ALGORITHM_VERSION
        and ids.dtype == np.int64
        and distances.dtype == np.int32
        and ids.shape == distances.shape == (src_size,)
        and meta.get("sha256") == _checksum(ids, distances)
        and (src_size == 0 or (ids.min() >= 0 and ids.max() < dst_size))
    )
    if not ok:
        raise AlignmentError(f"cached vocabulary map {path} does not match its key or checksum")
    return VocabMap(ids, distances, key)


def cached_vocab_map(
    src: Any, dst: Any, cache_dir: str | os.PathLike | None = None, workers: int = -1
) -> VocabMap:
    """:func:`build_vocab_map`, stored under ``cache_dir`` (default
    ``~/.cache/cotune/vocab_maps``) as ``<key>.safetensors``. A cached file whose key, version,
    shapes, id range or checksum do not match is rebuilt, never trusted; writes are atomic
    (temporary file + ``os.replace``), and a failed write only logs a warning."""
    from safetensors.numpy import save

    a, b = as_vocabulary(src), as_vocabulary(dst)
    key = map_key(a, b)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{key}.safetensors"
    if path.exists():
        try:
            return _read_cached(path, key, a.size, b.size)
        except Exception as exc:  # corrupt or foreign file: rebuild it
            log.warning("rebuilding vocabulary map %s: %s", path.name, exc)
    vmap = build_vocab_map(a, b, workers)
    meta = {"key": key, "version": ALGORITHM_VERSION, "sha256": _checksum(vmap.ids, vmap.distances)}
    blob = save({"ids": vmap.ids, "distances": vmap.distances}, metadata=meta)
    try:
        _write_atomic(folder, path, blob)
    except OSError as exc:  # a read-only or full disk costs a rebuild next time, nothing more
        log.warning("could not cache vocabulary map in %s: %s", folder, exc)
    return vmap


def _write_atomic(folder: Path, path: Path, blob: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(folder), prefix=".tmp-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
