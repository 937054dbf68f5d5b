"""Pretrain one zoo model, in this process or as ``python -m algorithms.zoo.worker JOB.json``.

A build runs its models in parallel lanes (one process and one thread each): on a small CPU
one thread per model is nearly as fast as two, so two lanes halve the wall time, and a lane
does not stall when another program takes the other core. Jobs and results are JSON files;
nothing is pickled between the processes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .datasets import domain_split, domains, general_text
from .recipes import ZooRecipe


def corpora(recipe: ZooRecipe) -> dict[str, list[str]]:
    """The texts a build uses, by role: tokenizer training, pretraining and evaluation."""
    stride = recipe.doc_stride
    bible = general_text("train", "kjv")[::stride]
    modern = general_text("train", "fortunes")[::stride]
    public = [t for d in domains() for t in domain_split(d, "public")]
    return {
        "tokenizer": bible + modern + public,
        "pretrain": bible + modern * recipe.modern_repeat,
        "eval_general": general_text("test")[::stride],
        "eval_domains": [t for d in domains() for t in domain_split(d, "test")][::stride],
    }


def train_one(job: dict) -> dict:
    """Build, pretrain, evaluate and save the model that ``job`` names; return its report.

    ``job``: recipe (``ZooRecipe.to_json()``), model (name), tokenizer_dir, out, progress
    (bool), t0 (``time.time()`` at the start of the whole build, for log lines). Thread count
    and library verbosity are the caller's business (see ``main``).
    """
    from transformers import AutoTokenizer

    from algorithms.core.tokenizer import save_tokenizer

    from .pretrain import evaluate, make_model, pack_windows, param_counts, pretrain, token_stream

    recipe = ZooRecipe.from_json(job["recipe"])
    spec = recipe.model(job["model"])
    t0 = float(job.get("t0", time.time()))
    progress = bool(job.get("progress", True))

    def log(msg: str) -> None:
        if progress:
            print(f"[zoo {time.time() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    kernels = _kernels(recipe)
    start = time.perf_counter()
    texts = corpora(recipe)
    tok = AutoTokenizer.from_pretrained(job["tokenizer_dir"])
    windows = pack_windows(token_stream(tok, texts["pretrain"]), recipe.seq_len)
    model = make_model(spec, tok)
    counts = param_counts(model)
    log(
        f"{spec.name}: {spec.arch}, {counts['total']:,} params "
        f"({counts['embedding_share']:.0%} embeddings), {spec.train_tokens:,} tokens "
        f"from {windows.numel():,} available"
    )
    at_init = evaluate(model, tok, texts["eval_general"], recipe.seq_len)
    stats = pretrain(model, windows, spec, recipe, log)
    general = evaluate(model, tok, texts["eval_general"], recipe.seq_len)
    domain = evaluate(model, tok, texts["eval_domains"], recipe.seq_len)
    out = Path(job["out"])
    model.save_pretrained(str(out))
    save_tokenizer(tok, out)
    seconds = time.perf_counter() - start
    log(
        f"{spec.name}: held-out general loss {at_init['loss']:.3f} -> {general['loss']:.3f} "
        f"({general['bits_per_byte']:.3f} bits/byte), domain loss {domain['loss']:.3f}, "
        f"{seconds:.0f}s"
    )
    return {
        "path": spec.name,
        "arch": spec.arch,
        "tokenizer": spec.tokenizer,
        "vocab_size": len(tok),
        "params": counts,
        "pretrain": stats,
        "eval": {
            "general_test": general,
            "general_test_at_init": at_init,
            "domains_test": domain,
        },
        "build_seconds": round(seconds, 1),
        "kernels": kernels,
    }


def _kernels(recipe: ZooRecipe) -> dict:
    """Hold this process to the recipe's kernels (deterministic algorithms; the CPU branch
    comes from the environment the build set) and say which ones it runs."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if recipe.reproducible is not None:
        torch.use_deterministic_algorithms(True)
        if capability != "AVX2":
            from .build import ZooError

            raise ZooError(f"reproducible build: torch runs its {capability} kernels, not AVX2; "
                           "the worker must start with ATEN_CPU_CAPABILITY=avx2 (build_zoo sets it)")
    return {
        "cpu_capability": capability,
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "bf16_autocast": recipe.bf16_autocast,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m algorithms.zoo.worker JOB.json", file=sys.stderr)
        return 2
    import torch
    import transformers

    job = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(int(job.get("threads", 1)))
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    report = train_one(job)
    Path(job["result"]).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
