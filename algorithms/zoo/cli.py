"""``cotune zoo ...``: build the model zoo and print what it holds."""

from __future__ import annotations

import argparse
import json
import sys

from .build import ZooError, build_zoo, default_cache_dir
from .recipes import MODEL_NAMES, QUICK, RECIPES, REPRODUCIBLE_BRANCHES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cotune zoo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the tiny pretrained LMs (cached; prints a summary)")
    b.add_argument("--quick", action="store_true", help="the much smaller variant used by tests")
    b.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="which zoo: full (default; the demo and benchmarks), quick (tests), bench (a "
                        "10-layer LLM clearly stronger than its SLMs, for the quality benchmarks; ~45 min)")
    b.add_argument("--reproducible", nargs="?", const="avx2", choices=REPRODUCIBLE_BRANCHES, default=None,
                   help="pin the kernels so that any machine with the same library versions builds "
                        "bitwise the same checkpoints (fp32, slower; 'avx2': Intel CPUs with AVX2, the "
                        "default; 'compatible': any x86-64 CPU with AVX2). The zoo is named "
                        "<recipe>-repro and cached apart")
    b.add_argument(
        "--cache-dir",
        default=None,
        help=f"cache folder (default $COTUNE_ZOO or {default_cache_dir()})",
    )
    b.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    b.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    return p


def summary(manifest: dict, root: str) -> str:
    """A short human-readable table of a zoo manifest."""
    lines = [
        f"zoo {manifest['recipe']['name']} {manifest['key']} at {root} "
        f"(built in {manifest['build_seconds']:.0f}s)",
        f"{'model':<10} {'arch':<6} {'tok':<10} {'vocab':>6} {'params':>10} {'emb':>5} "
        f"{'tokens':>10} {'loss':>6} {'bits/B':>6} {'domain':>6}",
    ]
    for name in MODEL_NAMES:
        m, ev = manifest["models"][name], manifest["models"][name]["eval"]
        lines.append(
            f"{name:<10} {m['arch']:<6} {m['tokenizer_style']:<10} {m['vocab_size']:>6} "
            f"{m['params']['total']:>10,} {m['params']['embedding_share']:>5.0%} "
            f"{m['pretrain']['tokens']:>10,} {ev['general_test']['loss']:>6.3f} "
            f"{ev['general_test']['bits_per_byte']:>6.3f} {ev['domains_test']['loss']:>6.3f}"
        )
    lines.append("loss: held-out general text (nats/token); domain: held-out domain text")
    return "\n".join(lines)


def zoo_cli(args: list[str]) -> int:
    """Entry point for ``cotune zoo``; returns the process exit code."""
    ns = _parser().parse_args(args)
    try:
        recipe = RECIPES[ns.recipe] if ns.recipe else None
        if ns.reproducible:
            recipe = (recipe or (QUICK if ns.quick else RECIPES["full"])).reproducible_variant(ns.reproducible)
        paths = build_zoo(cache_dir=ns.cache_dir, quick=ns.quick, progress=not ns.quiet, recipe=recipe)
    except (ZooError, OSError) as exc:
        print(f"cotune zoo: {exc}", file=sys.stderr)
        return 1
    if ns.json:
        print(json.dumps(paths.manifest, indent=2, sort_keys=True))
    else:
        print(summary(paths.manifest, str(paths.root)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(zoo_cli(sys.argv[1:]))
