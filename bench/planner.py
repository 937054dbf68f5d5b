"""Planner benchmark: predicted vs measured peak memory of real LoRA training steps (CPU).

For every configuration of a grid (Llama-, Qwen2- and GPT-2-architecture models built from
configs; quant fp32/bf16/nf4/int8; LoRA rank; batch; sequence length; activation
checkpointing on/off; fused or eager attention), and for one tiny model of every other family
of ``firmware_profiles/families.py`` (Mistral, Qwen3, Gemma, Gemma-2, Gemma-3, Phi-3,
GPT-NeoX, OPT, Falcon, each in its own layout) at a few (quant, sequence length) points, the
peak memory of real training is MEASURED and compared with
``firmware_profiles.planner.plan(config, generic-cpu, workload)``.

Measurement: every configuration runs in a FRESH Python subprocess (``--jobs`` of them at a
time), which

  1. imports torch, transformers, peft, bitsandbytes, the model classes and cotune's training
     code, builds its token dataset and records its RSS: the post-import baseline;
  2. loads the model with ``algorithms.core.modeling.load_causal_lm`` and attaches LoRA;
  3. resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5, so the load's own
     transient is excluded) and runs 2 real optimizer steps of
     ``algorithms.core.training.train_causal_lm`` (AdamW; the second step is the first with
     optimizer state);
  4. reports ``VmHWM - baseline``: the measured peak of weights + training.

The prediction is the plan's ``total_bytes`` minus its ``runtime`` term (the import RSS, which
the baseline already contains). ``rel_error = |predicted - measured| / measured``.

Honesty rules. The planner is first principles (see firmware_profiles/planner.py) plus a few
constants: the import RSS (not part of this comparison) and the CPU workspace constants,
measured once with ``--calibrate`` on a tiny model that is NOT part of the evaluated grids.
Nothing is fitted per configuration, and the grids were not used to choose any constant.
The checkpoints are saved in bf16 like most published ones, so fp32/nf4/int8 loads copy out
of the file and bf16 loads map it (zero-copy; counted once the first forward touches it).

Allocator. glibc raises its mmap threshold dynamically after freeing large blocks; from then
on freed activations stay in the heap and peak RSS tracks allocation history rather than what
the job needs (tens of percent above the live peak, varying run to run). The processes
therefore pin ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc's own initial value, made static), the
setting the planner's CPU notes recommend; ``--malloc default`` measures glibc's default
behaviour instead, and the full run reports that too, for the record.

Last line: ``BENCH planner {"max_rel_error": .., "median_rel_error": .., "configs": N,
"families": F, "max_rel_error_by_family": {model_type: ..}, ...}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from firmware_profiles.planner import (  # noqa: E402
    CPU_IMPORT_RSS_BYTES,
    CPU_WORKSPACE_BYTES,
    CPU_WORKSPACE_REDUCED_PRECISION_EXTRA,
    Workload,
    plan,
)
from firmware_profiles.profiles import get_profile  # noqa: E402

PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}
STEPS = 2
MIB = 1 << 20

# Model configs (beyond these fields everything is the transformers default).
MODELS: dict[str, dict] = {
    "llama-xs": {
        "arch": "llama",
        "vocab_size": 8192,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
    "qwen2-xs": {
        "arch": "qwen2",
        "vocab_size": 12288,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
    "gpt2-xs": {
        "arch": "gpt2",
        "vocab_size": 4096,
        "n_embd": 128,
        "n_layer": 4,
        "n_head": 4,
        "n_positions": 1024,
    },
    "llama-s": {
        "arch": "llama",
        "vocab_size": 8192,
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
    "qwen2-s": {
        "arch": "qwen2",
        "vocab_size": 12288,
        "hidden_size": 192,
        "intermediate_size": 512,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
    "gpt2-s": {
        "arch": "gpt2",
        "vocab_size": 8192,
        "n_embd": 256,
        "n_layer": 4,
        "n_head": 8,
        "n_positions": 1024,
    },
    # one tiny model per family of firmware_profiles/families.py beyond the three above, each
    # with its family's layout (fused q/k/v, parallel blocks, post-norms, soft-caps, MQA, ...)
    "mistral-xs": {
        "arch": "mistral",
        "vocab_size": 8192,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
    "qwen3-xs": {
        "arch": "qwen3",
        "vocab_size": 12288,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
    "gemma-xs": {  # multi-query, like Gemma-2B
        "arch": "gemma",
        "vocab_size": 8192,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 1024,
    },
    "gemma2-xs": {  # eager attention, soft-caps (config defaults), four norms per layer
        "arch": "gemma2",
        "vocab_size": 8192,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 1024,
    },
    "gemma3-xs": {
        "arch": "gemma3_text",
        "vocab_size": 8192,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 1024,
    },
    "phi3-xs": {  # fused qkv_proj and gate_up_proj
        "arch": "phi3",
        "vocab_size": 8192,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
    "neox-xs": {  # parallel residual, partial rotary
        "arch": "gpt_neox",
        "vocab_size": 8192,
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 1024,
    },
    "opt-xs": {  # learned positions, ReLU, dropout 0.1
        "arch": "opt",
        "vocab_size": 8192,
        "hidden_size": 128,
        "ffn_dim": 512,
        "word_embed_proj_dim": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 1024,
    },
    "falcon-xs": {  # multi-query, one LayerNorm for a parallel block, a materialized mask
        "arch": "falcon",
        "vocab_size": 8192,
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    # calibration only (held out of both grids): measures the CPU workspace constants
    "cal-llama": {
        "arch": "llama",
        "vocab_size": 6144,
        "hidden_size": 160,
        "intermediate_size": 448,
        "num_hidden_layers": 3,
        "num_attention_heads": 5,
        "num_key_value_heads": 5,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
}


def cfg(model, quant, rank=8, batch=2, seq=128, ckpt=False, attn=None):
    return {
        "model": model,
        "quant": quant,
        "rank": rank,
        "batch": batch,
        "seq": seq,
        "ckpt": ckpt,
        "attn": attn,
    }


QUICK_GRID = [
    cfg("llama-xs", "fp32", batch=4, seq=128),
    cfg("llama-xs", "nf4", rank=16, batch=2, seq=256, ckpt=True),
    cfg("llama-xs", "bf16", batch=2, seq=128),
    cfg("qwen2-xs", "int8", batch=2, seq=128),
    cfg("qwen2-xs", "fp32", rank=32, batch=1, seq=512, attn="eager"),
    cfg("gpt2-xs", "fp32", batch=4, seq=128),
    cfg("gpt2-xs", "nf4", batch=2, seq=128, ckpt=True),
]

FULL_GRID = QUICK_GRID + [
    cfg("llama-xs", "fp32", batch=1, seq=64),
    cfg("llama-xs", "int8", rank=4, batch=4, seq=256),
    cfg("qwen2-xs", "bf16", batch=2, seq=256, attn="eager"),
    cfg("gpt2-xs", "bf16", batch=2, seq=256),
    cfg("gpt2-xs", "fp32", batch=1, seq=1024, attn="sdpa"),
    cfg("llama-s", "fp32", batch=4, seq=128),
    cfg("llama-s", "fp32", batch=8, seq=256),
    cfg("llama-s", "fp32", batch=4, seq=256, ckpt=True),
    cfg("llama-s", "fp32", batch=2, seq=512, attn="eager"),
    cfg("llama-s", "bf16", rank=32, batch=4, seq=128),
    cfg("llama-s", "nf4", batch=4, seq=128),
    cfg("llama-s", "int8", batch=2, seq=256, ckpt=True),
    cfg("qwen2-s", "nf4", batch=4, seq=256),
    cfg("qwen2-s", "fp32", batch=8, seq=128, ckpt=True),
    cfg("gpt2-s", "fp32", rank=32, batch=4, seq=256),
    cfg("gpt2-s", "int8", batch=2, seq=256),
]

# the families beyond llama/qwen2/gpt2: a few (quant, seq) points each; --quick takes the first
FAMILY_POINTS = [("fp32", 256), ("nf4", 512), ("bf16", 128)]
FAMILY_MODELS = [
    "mistral-xs",
    "qwen3-xs",
    "gemma-xs",
    "gemma2-xs",
    "gemma3-xs",
    "phi3-xs",
    "neox-xs",
    "opt-xs",
    "falcon-xs",
]
# the quick grid varies the point across families so that every quant mode and a long
# sequence are seen once (the full grid runs every point for every family)
_QUICK_FAMILY = {
    "mistral-xs": ("int8", 256),
    "qwen3-xs": ("fp32", 256),
    "gemma-xs": ("bf16", 256),
    "gemma2-xs": ("fp32", 512),
    "gemma3-xs": ("nf4", 256),
    "phi3-xs": ("fp32", 256),
    "neox-xs": ("nf4", 256),
    "opt-xs": ("fp32", 256),
    "falcon-xs": ("bf16", 256),
}
QUICK_GRID += [cfg(m, q, batch=2, seq=t) for m, (q, t) in _QUICK_FAMILY.items()]
for _m in FAMILY_MODELS:
    for _q, _t in dict.fromkeys([_QUICK_FAMILY[_m], *FAMILY_POINTS]):
        FULL_GRID.append(cfg(_m, _q, batch=2, seq=_t))
FULL_GRID.append(cfg("gemma2-xs", "bf16", batch=1, seq=1024))  # eager scores dominate

CALIBRATION = [
    cfg("cal-llama", "fp32", batch=2, seq=96),
    cfg("cal-llama", "fp32", batch=2, seq=96),
    cfg("cal-llama", "bf16", batch=2, seq=96),
    cfg("cal-llama", "bf16", batch=2, seq=96),
]


# --------------------------------------------------------------------------------------------
# model building (its own subprocess, so the measuring server starts from a clean heap)


def _models_key() -> str:
    blob = json.dumps(MODELS, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


#: byte-level BPE for the GPT-style families, the SentencePiece-like one for the others
BYTELEVEL = ("gpt2", "gpt_neox", "opt", "falcon")


def family_of(model: str) -> str:
    """The ``model_type`` (the family) of a model of :data:`MODELS`."""
    return MODELS[model]["arch"]


def build_models(root: Path) -> None:
    """Write every model of MODELS under ``root`` (bf16 safetensors + a tiny tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.tiny_models import make_tiny_gpt2, make_tiny_llama

    toks = {
        "metaspace": make_tiny_llama(root / "_tok-llama"),
        "bytelevel": make_tiny_gpt2(root / "_tok-gpt2"),
    }
    for name, spec in MODELS.items():
        out = root / name
        if (out / "config.json").exists():
            continue
        kw = dict(spec)
        arch = kw.pop("arch")
        tok_dir = toks["bytelevel" if arch in BYTELEVEL else "metaspace"]
        tok_cfg = json.loads((tok_dir / "config.json").read_text())
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kw[k] = tok_cfg.get(k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw))
            model = model.to(torch.bfloat16)
        tmp = root / f".{name}.tmp"
        model.save_pretrained(str(tmp))
        for f in tok_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, tmp / f.name)
        tmp.rename(out)


# --------------------------------------------------------------------------------------------
# measuring side (server + forked children)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _imports(arch: str) -> None:
    """Everything a device process has imported before it loads a model of ``arch``."""
    import importlib

    import bitsandbytes  # noqa: F401  (part of the baseline, as in a device process)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    package = "gemma3" if arch == "gemma3_text" else arch
    importlib.import_module(f"transformers.models.{package}.modeling_{package}")

    import algorithms.core.modeling  # noqa: F401
    import algorithms.core.textdata  # noqa: F401
    import algorithms.core.training  # noqa: F401


def measure(spec: dict) -> dict:
    """Runs in a fresh subprocess: measure one configuration (see the module docstring)."""
    import random

    from transformers import AutoTokenizer

    from algorithms.core.modeling import LoraSpec, attach_lora, load_causal_lm
    from algorithms.core.textdata import TokenizedDataset
    from algorithms.core.training import TrainConfig, train_causal_lm
    from tests.tiny_models import TINY_CORPUS

    path = spec["path"]
    B, T = spec["batch"], spec["seq"]
    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 1 << 20
    words = " ".join(TINY_CORPUS).split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(T)) for _ in range(B * STEPS + 2)]
    ds = TokenizedDataset(tok, texts, T)
    if ds.num_examples < B * STEPS:
        raise RuntimeError(f"dataset too small: {ds.num_examples} rows")
    base = _status()["VmRSS"]

    t0 = time.perf_counter()
    model, _, report = load_causal_lm(
        path, quant=spec["quant"], gradient_checkpointing=spec["ckpt"], strict=True
    )
    if spec.get("attn"):
        model.set_attn_implementation(spec["attn"])
    attn = getattr(model.config, "_attn_implementation", None)
    model = attach_lora(model, LoraSpec(r=spec["rank"], alpha=2.0 * spec["rank"]), seed=0)
    after_load = _status()
    reset = True
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        reset = False
    cfg_ = TrainConfig(
        batch_size=B,
        max_steps=STEPS,
        lr=1e-4,
        gradient_checkpointing=spec["ckpt"],
        shuffle=False,
    )
    t1 = time.perf_counter()
    res = train_causal_lm(model, ds, cfg_, progress=None)
    t2 = time.perf_counter()
    end = _status()
    # without a resettable counter, fall back to PeakMemory's sampled RSS (may miss spikes)
    peak = end["VmHWM"] if reset else res.peak_memory_bytes
    return {
        "baseline_rss": base,
        "load_rss": after_load["VmRSS"] - base,
        "load_peak": after_load["VmHWM"] - base,
        "measured": peak - base,
        "hwm_reset": reset,
        "steps": res.steps,
        "load_seconds": round(t1 - t0, 2),
        "train_seconds": round(t2 - t1, 2),
        "attn_impl": attn,
        "compute_dtype": report.compute_dtype,
        "quant_loaded": report.quant,
    }


# --------------------------------------------------------------------------------------------
# driver side (never imports torch)


def predict(spec: dict, model_dir: Path):
    w = Workload(
        quant=spec["quant"],
        lora_rank=spec["rank"],
        batch_size=spec["batch"],
        seq_len=spec["seq"],
        gradient_checkpointing=spec["ckpt"],
        attention=spec["attn"] or "auto",
    )
    return plan(model_dir / "config.json", get_profile("generic-cpu"), w, app_reserve_bytes=0)


def _run_worker(spec: dict, env: dict, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=str(ROOT),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"configuration {label(spec)} failed (rc={proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT ") :])


def measure_grid(grid, model_root: Path, malloc: str, jobs: int, timeout: float) -> list[dict]:
    """Measure every configuration, each in its own fresh subprocess (``jobs`` at a time)."""
    env = dict(os.environ)
    for k in PINNED_MALLOC:
        env.pop(k, None)
    if malloc == "pinned":
        env.update(PINNED_MALLOC)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    specs = [dict(s, path=str(model_root / s["model"])) for s in grid]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda s: _run_worker(s, env, timeout), specs))


def label(spec: dict) -> str:
    s = f"{spec['model']:<10} {spec['quant']:<4} r{spec['rank']:<3} b{spec['batch']:<2} "
    s += f"T{spec['seq']:<5}" + ("ckpt " if spec["ckpt"] else "     ")
    return s + f"{spec['attn'] or 'auto':<5}"


def model_root_for(args: argparse.Namespace) -> tuple[Path, bool]:
    """(folder holding the built models, whether it is temporary)."""
    if args.models:
        return Path(args.models), False
    if args.no_cache:
        return Path(tempfile.mkdtemp(prefix="cotune-bench-planner-")), True
    base = os.environ.get("COTUNE_BENCH_CACHE") or str(Path.home() / ".cache" / "cotune")
    return Path(base) / "bench-planner" / _models_key(), False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid, about a minute")
    ap.add_argument("--malloc", choices=["pinned", "default"], default="pinned")
    ap.add_argument("--calibrate", action="store_true", help="measure the CPU workspace constants")
    ap.add_argument("--jobs", type=int, default=2, help="configurations measured concurrently")
    ap.add_argument("--models", default=None, help="folder for the built models")
    ap.add_argument("--no-cache", action="store_true", help="build the models in a temp folder")
    ap.add_argument("--json", default=None, help="also write all rows to this JSON file")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--build", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        _imports(MODELS[spec["model"]]["arch"])
        print("RESULT " + json.dumps(measure(spec)), flush=True)
        return 0
    if args.build:
        build_models(Path(args.build))
        return 0

    t_start = time.perf_counter()
    model_root, temporary = model_root_for(args)
    model_root.mkdir(parents=True, exist_ok=True)
    try:
        if not all((model_root / m / "config.json").exists() for m in MODELS):
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--build", str(model_root)],
                capture_output=True,
                text=True,
                cwd=str(ROOT),
                timeout=args.timeout,
            )
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
        grid = CALIBRATION if args.calibrate else QUICK_GRID if args.quick else FULL_GRID
        measured = measure_grid(grid, model_root, args.malloc, max(1, args.jobs), args.timeout)

        print(
            f"planner benchmark: CPU, malloc={args.malloc}, {STEPS} optimizer steps per "
            "configuration; MiB above the post-import baseline (the plan's runtime term, the "
            "import RSS, is left out of 'predicted')"
        )
        print(
            f"{'configuration':<38} {'measured':>8} {'predict':>8} {'rel.err':>7}  "
            f"{'weights':>7} {'activ':>7} {'logits':>7} {'other':>6} {'phase':<9} {'train s':>7}"
        )
        rows, errors = [], []
        by_family: dict[str, float] = {}
        for spec, m in zip(grid, measured, strict=True):
            p = predict(spec, model_root / spec["model"])
            bd = p.breakdown
            pred = p.total_bytes - bd["runtime"]
            meas = m["measured"]
            err = abs(pred - meas) / meas
            errors.append(err)
            fam = family_of(spec["model"])
            by_family[fam] = max(by_family.get(fam, 0.0), err)
            other = pred - bd["weights"] - bd["activations"] - bd["logits"]
            print(
                f"{label(spec):<38} {meas / MIB:8.1f} {pred / MIB:8.1f} {err:7.1%}  "
                f"{bd['weights'] / MIB:7.1f} {bd['activations'] / MIB:7.1f} "
                f"{bd['logits'] / MIB:7.1f} {other / MIB:6.1f} {p.peak_phase[:9]:<9} "
                f"{m['train_seconds']:7.1f}"
            )
            rows.append({"config": spec, "predicted": pred, "rel_error": err, "breakdown": bd, **m})
        baselines = [m["baseline_rss"] for m in measured]
        summary = {
            "max_rel_error": round(max(errors), 4),
            "median_rel_error": round(statistics.median(errors), 4),
            "configs": len(errors),
            "families": len(by_family),
            "max_rel_error_by_family": {k: round(v, 4) for k, v in sorted(by_family.items())},
            "malloc": args.malloc,
            "import_rss_mib": round(statistics.median(baselines) / MIB, 1),
        }
        if args.calibrate:
            extra = CPU_WORKSPACE_REDUCED_PRECISION_EXTRA
            for row in rows:
                reduced = row["compute_dtype"] in ("bf16", "fp16")
                const = CPU_WORKSPACE_BYTES + (extra if reduced else 0)
                modelled = row["predicted"] - const
                print(
                    f"calibration {row['config']['quant']:<4}: measured {row['measured']} B, "
                    f"modelled without the constant {modelled} B -> workspace "
                    f"{(row['measured'] - modelled) / MIB:.1f} MiB "
                    f"(planner: {const / MIB:.1f} MiB)"
                )
            print(
                f"calibration: import RSS {summary['import_rss_mib']} MiB "
                f"(planner: {CPU_IMPORT_RSS_BYTES / MIB:.0f} MiB)"
            )
        if not args.quick and not args.calibrate and args.malloc == "pinned":
            # the same grid under glibc's default allocator, for the record
            dflt = measure_grid(grid, model_root, "default", max(1, args.jobs), args.timeout)
            excess = [m["measured"] / r["predicted"] - 1 for m, r in zip(dflt, rows, strict=True)]
            derr = [
                abs(m["measured"] - r["predicted"]) / m["measured"]
                for m, r in zip(dflt, rows, strict=True)
            ]
            summary["glibc_default_max_rel_error"] = round(max(derr), 4)
            summary["glibc_default_median_excess_over_plan"] = round(statistics.median(excess), 4)
        summary["seconds"] = round(time.perf_counter() - t_start, 1)
        if args.json:
            Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
        print("BENCH planner " + json.dumps(summary))
        return 0
    finally:
        if temporary:
            shutil.rmtree(model_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
