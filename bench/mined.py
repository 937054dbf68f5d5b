"""MinED vocabulary mapping: cotune's pruned search vs the brute-force reference.

Vocabularies: two tokenizers trained here with ``algorithms.core.tokenizer.train_tokenizer`` on
the bundled text (``general_text("train")`` plus every client domain), in different marker
conventions: byte-level BPE (GPT-2 ``"Ġ"``) 32,000 and SentencePiece-style BPE (``"▁"``, byte
fallback) 50,000 for the full run; 8,000 and 12,000 for ``--quick``. The bundled text supports
a little under 50,000 distinct metaspace tokens; the rest is topped up with SYNTHETIC tokens,
each the concatenation of two real tokens of that vocabulary (a word-start piece and a
continuation piece, so they look like the long words real 50k vocabularies hold). Their number
is printed and reported as ``synthetic_tokens``.

Timed: ``build_vocab_map`` A -> B (no cache) with ``--workers`` threads for the distance
matrices (-1: all cores); the reverse direction B -> A; ``cached_vocab_map`` into a fresh cache
folder (cold: build + atomic write) and again (warm: read + checksum).

Reference: the brute-force rule of ``tests/test_token_alignment.py`` (a Python loop over every
token pair with rapidfuzz's C Levenshtein distance, minimum of (distance, string, byte-fallback,
id)). On full-size vocabularies it would take many minutes, so it runs on a seeded random
subset of ``--ref-tokens`` source tokens per direction; the mappings must agree there
(``identical``), and its time per token is extrapolated to the whole source vocabulary
(``"reference": "extrapolated from N tokens"``). The reference is single-threaded; its wall time
is divided by the number of cores our run used (a perfectly parallel process pool), so the
``speedup`` compares equal hardware. ``speedup_vs_lookup_then_scan`` credits the reference with a
free hash lookup for exact matches (it then scans only for the other tokens). Timings on a
shared machine are noisy.

Last line: ``BENCH mined {"identical": .., "speedup": .., "seconds": .., "sizes": [..], ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from algorithms.core.token_alignment import (  # noqa: E402
    SPACE,
    Vocabulary,
    build_vocab_map,
    cached_vocab_map,
    normalize_token,
    to_style,
)

FULL_SIZES = (32000, 50000)
QUICK_SIZES = (8000, 12000)
STYLES = ("bytelevel", "metaspace")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def corpus() -> list[str]:
    from algorithms.zoo.datasets import domain_texts, domains, general_text

    return general_text("train") + [t for d in domains() for t in domain_texts(d)]


def top_up(vocab: Vocabulary, target: int, seed: int = 0) -> tuple[Vocabulary, int]:
    """``vocab`` grown to ``target`` tokens with synthetic two-piece words (see the docstring)."""
    token_to_id = vocab.token_to_id
    if len(token_to_id) >= target:
        return vocab, 0
    rng = random.Random(seed)
    ordinary = [
        i for i, t in enumerate(vocab.tokens) if t is not None and i not in vocab.special_ids
    ]
    texts = [normalize_token(vocab.tokens[i], vocab.style) for i in ordinary]
    starts = [t for t in texts if t.startswith(SPACE) and len(t) > 2]
    middles = [t for t in texts if not t.startswith(SPACE) and len(t) > 1 and "<0x" not in t]
    added, next_id = 0, vocab.size
    while len(token_to_id) < target:
        token = to_style(rng.choice(starts) + rng.choice(middles), vocab.style)
        if token not in token_to_id:
            token_to_id[token] = next_id
            next_id += 1
            added += 1
    roles = {r: vocab.tokens[i] for r, i in vocab.roles}
    specials = [vocab.tokens[i] for i in vocab.special_ids]
    return Vocabulary.from_dict(token_to_id, vocab.style, roles, specials), added


def make_vocabularies(sizes: tuple[int, int]) -> tuple[Vocabulary, Vocabulary, int]:
    from algorithms.core.tokenizer import train_tokenizer

    texts = corpus()
    out, synthetic = [], 0
    for style, size in zip(STYLES, sizes, strict=True):
        t0 = time.perf_counter()
        vocab = Vocabulary.from_tokenizer(train_tokenizer(texts, size, style=style))
        trained = vocab.size
        vocab, added = top_up(vocab, size)
        synthetic += added
        print(
            f"vocabulary {style:<9} {vocab.size:>6} tokens ({trained} trained, {added} synthetic)"
            f" in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        out.append(vocab)
    return out[0], out[1], synthetic


def reference_on_subset(src: Vocabulary, dst: Vocabulary, vmap, n: int, seed: int) -> dict:
    """Brute force on ``n`` random source tokens: identity check and per-token timings."""
    from tests.test_token_alignment import brute_force_candidates, brute_force_token

    t0 = time.perf_counter()
    cands = brute_force_candidates(dst)
    setup = time.perf_counter() - t0
    ids = random.Random(seed).sample(range(src.size), min(n, src.size))
    scan, lookup_then_scan, mismatches = 0.0, 0.0, 0
    for i in ids:
        t = time.perf_counter()
        j, d = brute_force_token(src, i, dst, cands)
        el = time.perf_counter() - t
        scan += el
        lookup_then_scan += el if d != 0 else 0.0  # an exact match costs a dict lookup
        mismatches += int(j != vmap.ids[i] or d != vmap.distances[i])
    per_token = src.size / len(ids)
    return {
        "tokens": len(ids),
        "identical": mismatches == 0,
        "mismatches": mismatches,
        "subset_seconds": round(scan, 2),
        "core_seconds": setup + scan * per_token,
        "lookup_core_seconds": setup + lookup_then_scan * per_token,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8k x 12k vocabularies, about a minute")
    ap.add_argument("--workers", type=int, default=-1, help="threads for cdist (-1: all cores)")
    ap.add_argument("--ref-tokens", type=int, default=None, help="reference subset per direction")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the summary to this JSON file")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    n_ref = args.ref_tokens or (200 if args.quick else 300)
    cores = args.workers if args.workers >= 1 else available_cores()
    src, dst, synthetic = make_vocabularies(sizes)
    if synthetic:
        print(f"NOTE: {synthetic} synthetic tokens topped the vocabularies up to {list(sizes)}")

    t0 = time.perf_counter()
    vmap = build_vocab_map(src, dst, workers=args.workers)
    ours = time.perf_counter() - t0
    print(
        f"ours {src.size} -> {dst.size}: {ours:.2f} s on {cores} cores "
        f"(exact matches {vmap.exact_fraction:.1%}, max distance {int(vmap.distances.max())})",
        flush=True,
    )
    t0 = time.perf_counter()
    back = build_vocab_map(dst, src, workers=args.workers)
    ours_back = time.perf_counter() - t0
    print(f"ours {dst.size} -> {src.size}: {ours_back:.2f} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="cotune-bench-mined-") as cache:
        t0 = time.perf_counter()
        cached_vocab_map(src, dst, cache_dir=cache, workers=args.workers)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm_map = cached_vocab_map(src, dst, cache_dir=cache, workers=args.workers)
        warm = time.perf_counter() - t0
    cache_same = bool((warm_map.ids == vmap.ids).all())
    print(f"disk cache: cold {cold:.2f} s (build + write), warm {warm:.3f} s (read + verify)")

    print(f"reference: brute force on {n_ref} random source tokens per direction ...", flush=True)
    ref = reference_on_subset(src, dst, vmap, n_ref, args.seed)
    ref_back = reference_on_subset(dst, src, back, n_ref, args.seed + 1)
    for name, r, mine in (("A -> B", ref, ours), ("B -> A", ref_back, ours_back)):
        print(
            f"reference {name}: {r['tokens']} tokens in {r['subset_seconds']} s, "
            f"extrapolated {r['core_seconds']:.0f} core-s full scan, "
            f"{r['lookup_core_seconds']:.0f} core-s lookup-then-scan; "
            f"speedup {r['core_seconds'] / cores / mine:.0f}x; identical: {r['identical']}"
        )
    identical = ref["identical"] and ref_back["identical"] and cache_same
    summary = {
        "identical": identical,
        "speedup": round(ref["core_seconds"] / cores / ours, 1),
        "seconds": round(ours, 2),
        "sizes": [src.size, dst.size],
        "reference": f"extrapolated from {ref['tokens']} tokens",
        "reference_seconds": round(ref["core_seconds"] / cores, 1),
        "speedup_vs_lookup_then_scan": round(ref["lookup_core_seconds"] / cores / ours, 1),
        "cores": cores,
        "exact_fraction": round(vmap.exact_fraction, 4),
        "reverse_seconds": round(ours_back, 2),
        "reverse_speedup": round(ref_back["core_seconds"] / cores / ours_back, 1),
        "cache_cold_seconds": round(cold, 2),
        "cache_warm_seconds": round(warm, 3),
        "synthetic_tokens": synthetic,
        "quick": args.quick,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    print("BENCH mined " + json.dumps(summary))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
