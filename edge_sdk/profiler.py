"""``cotune profile``: measure a training or generation job on this device and hold it against
the memory planner's prediction.

    cotune profile --device orin-nano-8gb --model models/slm --job train --steps 4 --out prof/
    cotune profile --device generic-cpu --model models/slm --job generate --max-new-tokens 32

The job runs in a FRESH Python subprocess (so the peak is the job's alone) with glibc's mmap
threshold pinned (``MALLOC_MMAP_THRESHOLD_=131072``, as the planner's CPU notes and the
benchmarks assume). The subprocess imports everything first and records its RSS (the
post-import baseline), loads the model, then resets the kernel's peak-RSS counter and runs the
job, so the reported peak is the job's steady phase with the weights resident; the load's own
transient is reported beside it (``load_peak_bytes``). On CUDA the measured peak is the
allocator's (live tensors; no CUDA context) and is compared with the plan minus its runtime
term; on CPU the process's peak RSS is compared with the plan's total, and both again above
the import baseline (``comparison.job_only``), which does not depend on how heavy this
machine's Python imports are.

Training: ``--steps`` real AdamW steps of the shared loop (``algorithms.core.training``) with
LoRA (or ``--full``), timed per step. Generation: ``edge_sdk.inference.Generator`` on ONNX
Runtime when installed (the model is exported in a separate process first, so the export does
not count) or torch eager, ``--max-new-tokens`` tokens past EOS. ``--round`` also runs two real
FedAvg rounds (this device as the only client) over an embedded broker against the aggregator
started as its own process, and reports the bytes on the wire per round; round 2 is the steady
state (round 1 also pays for connecting and presence). Power comes from
:class:`edge_sdk.tegrastats.TegraSampler` over the job's window when tegrastats or jtop exists.

Writes ``profile.json`` and ``profile.png`` (planned breakdown stacked beside the measured
peak) into ``--out``. Exit codes: 0 ok, 1 the job failed, 2 usage error, 3 the plan says the job
does not fit (refused before running unless ``--force``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from firmware_profiles import (
    DEFAULT_APP_RESERVE_BYTES,
    ModelShape,
    Plan,
    ProfileError,
    Workload,
    fmt_bytes,
    get_profile,
    plan,
)
from firmware_profiles.profiles import MIB, QUANT_MODES

__all__ = [
    "EXIT_DOES_NOT_FIT",
    "EXIT_JOB_FAILED",
    "EXIT_USAGE",
    "PINNED_MALLOC",
    "JobFailedError",
    "ProfileUsageError",
    "ProfilerError",
    "profile_cli",
]

EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}
REPORT_VERSION = 1
_ROOT = Path(__file__).resolve().parents[1]
_RESULT = "PROFILE-RESULT "


class ProfilerError(Exception):
    """Base class of the profiler's errors."""


class ProfileUsageError(ProfilerError, ValueError):
    """Bad arguments or data (exit code 2)."""


class JobFailedError(ProfilerError):
    """The profiled job could not run or did not report (its stderr tail is in the message)."""


# ------------------------------------------------------------------------------------------
# arguments


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cotune profile",
        description="Measure peak memory, speed (and power, bytes per round) of a job on this "
        "device and compare with the memory planner.",
    )
    p.add_argument("--device", required=True, help="firmware profile id, e.g. orin-nano-8gb")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--job", choices=["train", "generate"], default="train")
    p.add_argument(
        "--data",
        default="zoo:computers",
        help="zoo:DOMAIN (bundled text) or a text file, one sample per line",
    )
    p.add_argument("--out", default="profile-out", help="folder for profile.json / profile.png")
    p.add_argument("--force", action="store_true", help="run even when the plan says no fit")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    t = p.add_argument_group("training (mirrors the planner's Workload)")
    t.add_argument(
        "--quant",
        choices=QUANT_MODES,
        default=None,
        help="weights (default: the profile's default quant)",
    )
    t.add_argument("--rank", type=int, default=8, help="LoRA rank")
    t.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    t.add_argument("--targets", default=None, help="comma-separated LoRA target modules")
    t.add_argument("--lora-dropout", type=float, default=0.0)
    t.add_argument("--batch", type=int, default=4, help="micro-batch size")
    t.add_argument("--seq", type=int, default=128, help="sequence length (tokens per row)")
    t.add_argument("--steps", type=int, default=4, help="optimizer steps to measure")
    t.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    t.add_argument("--attention", choices=["auto", "sdpa", "eager"], default="auto")
    t.add_argument("--lr", type=float, default=2e-4)
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--prompt", default=None, help="default: the first sample of --data")
    g.add_argument("--backend", choices=["auto", "ort", "torch"], default="auto")
    g.add_argument(
        "--export-dir", default=None, help="ONNX export cache (default ~/.cache/cotune/onnx)"
    )
    r = p.add_argument_group("run")
    r.add_argument(
        "--round",
        action="store_true",
        help="also run FedAvg rounds over an embedded broker; report bytes per round",
    )
    r.add_argument(
        "--torch-device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: cuda when the profile has a GPU and torch sees one, else cpu",
    )
    r.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime threads")
    r.add_argument("--power-interval-ms", type=int, default=200)
    r.add_argument(
        "--app-reserve",
        type=float,
        default=DEFAULT_APP_RESERVE_BYTES / MIB,
        help="MiB kept back for the rest of the application (default %(default).0f)",
    )
    r.add_argument(
        "--os-reserved", type=float, default=None, help="override the profile's OS reserve (MiB)"
    )
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    return p


def _check_args(ns: argparse.Namespace) -> None:
    positive = {
        "--rank": ns.rank,
        "--batch": ns.batch,
        "--steps": ns.steps,
        "--max-new-tokens": ns.max_new_tokens,
    }
    for name, v in positive.items():
        if v < 1:
            raise ProfileUsageError(f"{name} must be >= 1, got {v}")
    if ns.seq < 2:
        raise ProfileUsageError(f"--seq must be >= 2, got {ns.seq}")
    if ns.threads is not None and ns.threads < 1:
        raise ProfileUsageError(f"--threads must be >= 1, got {ns.threads}")
    if ns.round and (ns.full or ns.job != "train"):
        raise ProfileUsageError(
            "--round runs FedAvg-LoRA rounds: it needs --job train without --full"
        )
    if ns.app_reserve < 0:
        raise ProfileUsageError("--app-reserve must be >= 0")


def _absolutize(ns: argparse.Namespace) -> None:
    """Resolve the user's paths against the caller's working directory, once, before anything
    reaches a worker subprocess (which runs in the repository root): ``--model``, ``--data``
    (unless ``zoo:``), ``--out`` and ``--export-dir``. ``~`` is expanded."""

    def absolute(p: str) -> str:
        return str(Path(os.path.expanduser(p)).absolute())

    ns.model = absolute(ns.model)
    if not ns.data.startswith("zoo:"):
        ns.data = absolute(ns.data)
    ns.out = absolute(ns.out)
    if ns.export_dir is not None:
        ns.export_dir = absolute(ns.export_dir)


def _load_texts(data: str) -> list[str]:
    """``zoo:DOMAIN`` (the bundled private split) or a UTF-8 file, one sample per line."""
    if data.startswith("zoo:"):
        from algorithms.zoo.datasets import domain_split, domains

        domain = data[4:]
        if domain not in domains():
            raise ProfileUsageError(f"unknown zoo domain {domain!r}; choose one of {domains()}")
        return domain_split(domain, "private")
    path = Path(data)
    try:
        texts = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileUsageError(f"cannot read --data {data!r}: {exc}") from exc
    if not texts:
        raise ProfileUsageError(f"--data {data!r} has no non-empty line")
    return texts


def _workload(ns: argparse.Namespace, quant: str, prompt_tokens: int = 0) -> Workload:
    if ns.job == "generate":
        # both inference backends run fp32 weights; the context is prompt + new tokens
        return Workload(
            quant="fp32",
            lora_rank=None,
            batch_size=1,
            mode="infer",
            seq_len=prompt_tokens + ns.max_new_tokens,
            attention=ns.attention,
        )
    targets = tuple(t for t in ns.targets.split(",") if t) if ns.targets else None
    return Workload(
        quant=quant,
        lora_rank=None if ns.full else ns.rank,
        batch_size=ns.batch,
        seq_len=ns.seq,
        gradient_checkpointing=ns.checkpointing,
        optimizer="adamw",
        lora_targets=targets,
        lora_dropout=ns.lora_dropout,
        attention=ns.attention,
    )


# ------------------------------------------------------------------------------------------
# running a job in a fresh process


def _env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PINNED_MALLOC)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    return env


def _run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "edge_sdk.profiler", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=_env(spec.get("threads")),
            timeout=timeout,
            cwd=str(_ROOT),
        )
    except subprocess.TimeoutExpired as exc:
        raise JobFailedError(f"{spec['job']} job ran past --timeout {timeout:.0f}s") from exc
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        why = (
            f"killed by signal {-proc.returncode} (out of memory?)"
            if proc.returncode < 0
            else f"exit status {proc.returncode}"
        )
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise JobFailedError(f"{spec['job']} job failed ({why}):\n{tail}")
    return json.loads(lines[-1][len(_RESULT) :])


def _status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (empty where /proc is missing)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rss_now() -> int | None:
    """This process's RSS without importing torch: psutil, else /proc."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:
        return _status().get("VmRSS")


class _RssSampler:
    """Fallback where VmHWM cannot be reset: RSS sampled every 10 ms by a thread."""

    def __init__(self) -> None:
        import threading

        self._read = _rss_now
        self.peak = self._read() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._read() or 0)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._read() or 0)


def _memory_phase(reset: bool, sampler: _RssSampler | None) -> dict:
    end = _status()
    if reset and "VmHWM" in end:
        return {"peak": end["VmHWM"], "source": "VmHWM"}
    return {"peak": sampler.stop() if sampler else end.get("VmRSS", 0), "source": "sampled RSS"}


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _import_model_code(model: str, training: bool = True) -> None:
    """Import what the load imports lazily, so the baseline holds the library code."""
    import importlib

    import transformers  # noqa: F401

    if training:
        import peft  # noqa: F401

        try:
            import bitsandbytes  # noqa: F401
        except Exception:  # optional
            pass
    mt = json.loads((Path(model) / "config.json").read_text()).get("model_type", "")
    try:
        importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    except Exception:
        pass


def _job_train(spec: dict[str, Any]) -> dict[str, Any]:
    _set_threads(spec.get("threads"))
    import torch

    _import_model_code(spec["model"])
    from transformers import AutoTokenizer

    from algorithms.core.modeling import LoraSpec, attach_lora, load_causal_lm
    from algorithms.core.textdata import TokenizedDataset
    from algorithms.core.training import TrainConfig, train_causal_lm

    batch, seq, steps = spec["batch"], spec["seq"], spec["steps"]
    notes: list[str] = []
    texts = _load_texts(spec["data"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    tok.model_max_length = 1 << 30
    ds = TokenizedDataset(tok, texts, seq)
    if ds.num_examples < batch:  # too little text for one full batch: repeat it
        reps = math.ceil(batch / ds.num_examples)
        ds = TokenizedDataset(tok, list(texts) * reps, seq)
        notes.append(f"the data gives fewer than {batch} rows of {seq} tokens; repeated {reps}x")
    device = spec["torch_device"]
    on_cuda = device.startswith("cuda")
    base = _status()
    model, _, report = load_causal_lm(
        spec["model"],
        quant=spec["quant"],
        device=device,
        gradient_checkpointing=spec["checkpointing"],
    )
    if spec["attention"] != "auto":
        model.set_attn_implementation(spec["attention"])
    if spec["full"]:
        for prm in model.parameters():
            prm.requires_grad_(True)
    else:
        targets = tuple(spec["targets"]) if spec["targets"] else None
        lora = LoraSpec(
            r=spec["rank"],
            alpha=2.0 * spec["rank"],
            dropout=spec["lora_dropout"],
            target_modules=targets,
        )
        model = attach_lora(model, lora, seed=0)
    loaded = _status()
    reset = _reset_hwm()
    sampler = None if reset else _RssSampler()
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(
        lr=spec["lr"],
        epochs=math.ceil(steps / ds.num_batches(batch)),
        max_steps=steps,
        batch_size=batch,
        block_size=seq,
        gradient_checkpointing=spec["checkpointing"],
        shuffle=False,
        log_every=1,
    )
    marks: list[float] = []
    t0 = time.time()
    res = train_causal_lm(model, ds, cfg, progress=lambda p: p.done or marks.append(p.seconds))
    t1 = time.time()
    mem = _memory_phase(reset, sampler)
    step_s = [b - a for a, b in zip([0.0, *marks], marks, strict=False)]
    out = {
        "steps": res.steps,
        "tokens": res.tokens,
        "tokens_per_step": batch * seq,
        "tokens_per_s": res.tokens_per_s,
        "seconds": res.seconds,
        "step_seconds": step_s,
        "loss_first": res.loss_first,
        "loss_last": res.loss_last,
        "stopped_by": res.stopped_by,
        "attn_impl": getattr(getattr(model, "config", None), "_attn_implementation", None),
    }
    if on_cuda:
        out["cuda_allocated_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        out["cuda_reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved())
    return _finish(out, base, loaded, mem, report, notes, (t0, t1), device)


def _job_generate(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["backend"] == "ort":  # the session gets the thread count
        import onnxruntime  # noqa: F401
        import transformers  # noqa: F401

        # the ORT load path goes through onnx_export (manifest), which imports torch
        import edge_sdk.inference.onnx_export  # noqa: F401
    else:
        _set_threads(spec.get("threads"))
        _import_model_code(spec["model"], training=False)
    from edge_sdk.inference.generate import Generator, SamplingConfig, encode_prompt

    base = _status()
    reset = _reset_hwm()
    sampler = None if reset else _RssSampler()
    t_load = time.perf_counter()
    source = spec.get("export") or spec["model"]
    gen = Generator.load(
        source,
        backend=spec["backend"],
        threads=spec.get("threads"),
        device=spec["torch_device"],
        strict=spec["backend"] == "ort",
    )
    load_s = time.perf_counter() - t_load
    loaded = _status()
    load_mem = _memory_phase(reset, sampler)
    reset = _reset_hwm()
    sampler = None if reset else _RssSampler()
    prompt_tokens = len(encode_prompt(gen.tokenizer, spec["prompt"]))
    cfg = SamplingConfig(max_new_tokens=spec["max_new_tokens"], ignore_eos=True)
    t0 = time.time()
    result = gen.generate(spec["prompt"], cfg)
    t1 = time.time()
    mem = _memory_phase(reset, sampler)
    mem["load_peak"] = max(load_mem["peak"], loaded.get("VmRSS", 0))
    out = {
        "backend": gen.backend_name,
        "prompt_tokens": prompt_tokens,
        "new_tokens": result.new_tokens,
        "seconds": result.seconds,
        "tokens_per_s": result.stats.get("tokens_per_second", 0.0),
        "load_seconds": round(load_s, 4),
        "text_head": result.text[:80],
        "torch_imported": "torch" in sys.modules,
    }
    return _finish(out, base, loaded, mem, None, [], (t0, t1), spec["torch_device"])


def _finish(
    out: dict,
    base: dict,
    loaded: dict,
    mem: dict,
    report: Any,
    notes: list[str],
    window: tuple[float, float],
    device: str,
) -> dict[str, Any]:
    out.update(
        baseline_bytes=base.get("VmRSS", 0),
        after_load_rss_bytes=loaded.get("VmRSS", 0),
        load_peak_bytes=mem.get("load_peak", loaded.get("VmHWM", 0)),
        job_peak_rss_bytes=mem["peak"],
        peak_source=mem["source"],
        window=list(window),
        torch_device=device,
        notes=notes,
    )
    if report is not None:
        out.update(
            quant=report.quant,
            compute_dtype=report.compute_dtype,
            load_seconds=round(report.load_seconds, 4),
            weight_bytes=report.weight_bytes,
            load_notes=list(report.notes),
        )
    return out


def _job_export(spec: dict[str, Any]) -> dict[str, Any]:
    from edge_sdk.inference.onnx_export import ensure_exported

    t0 = time.perf_counter()
    path = ensure_exported(spec["model"], spec.get("export_dir"))
    return {"export": str(path), "seconds": round(time.perf_counter() - t0, 3)}


def _job_round(spec: dict[str, Any]) -> dict[str, Any]:
    """Two FedAvg-LoRA rounds, this device the only client: embedded broker in this process,
    the aggregator as a separate ``cotune aggregator serve`` process (the edge runtime never
    imports the aggregator)."""
    _set_threads(spec.get("threads"))
    from bridge.broker import EmbeddedBroker
    from bridge.provision import provision
    from edge_sdk.client import EdgeClient

    root = Path(tempfile.mkdtemp(prefix="cotune-profile-round-"))
    broker = EmbeddedBroker("127.0.0.1", 0).start()
    agg = None
    try:
        paths = provision(root / "fed", "profile", ["device"], check_access=False)
        over = {"host": broker.host, "port": broker.port, "tls": False, "protocol": "3.1.1"}
        lora = {"r": spec["rank"], "alpha": 2 * spec["rank"], "dropout": spec["lora_dropout"]}
        if spec["targets"]:
            lora["target_modules"] = list(spec["targets"])
        train = {
            "lr": spec["lr"],
            "epochs": 1,
            "batch_size": spec["batch"],
            "block_size": spec["seq"],
            "max_steps": spec["steps"],
            "gradient_checkpointing": spec["checkpointing"],
        }
        cfg = {
            "party_config": str(paths.party_config("aggregator")),
            "state_dir": str(root / "agg"),
            "rounds": 2,
            "models": {"slm": spec["model"]},
            "min_clients": 1,
            "broker": over,
            "final_wait_s": 5,
            "algorithm_config": {"lora": lora, "train": train, "wire_dtype": "fp16"},
        }
        (root / "aggregator.json").write_text(json.dumps(cfg))
        agg = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cotune",
                "aggregator",
                "serve",
                "--config",
                str(root / "aggregator.json"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        client = EdgeClient(
            paths.party_config("device"),
            spec["model"],
            _load_texts(spec["data"]),
            profile=spec["profile"],
            quant=spec["quant"],
            work_dir=root / "device",
            broker=over,
            progress=None,
            gradient_checkpointing=spec["checkpointing"],
        )
        client.run(max_idle_s=spec.get("idle_s", 120))
        try:
            _, err = agg.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            agg.kill()
            _, err = agg.communicate()
        rounds = [
            {
                "round": h["round"],
                "bytes_down": h["wire_bytes_down"],
                "bytes_up": h["wire_bytes_up"],
            }
            for h in client.history
            if "wire_bytes_down" in h
        ]
        if not rounds:
            raise JobFailedError(f"no round completed; aggregator said:\n{(err or '')[-2000:]}")
        return {
            "rounds": rounds,
            "clients": 1,
            "wire_dtype": "fp16",
            "lora": lora,
            "steady": rounds[-1],
        }
    finally:
        if agg is not None and agg.poll() is None:
            agg.kill()
            agg.wait()
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


_JOBS = {"train": _job_train, "generate": _job_generate, "export": _job_export, "round": _job_round}


# ------------------------------------------------------------------------------------------
# report


def _comparison(measured: dict[str, Any], p: Plan) -> dict[str, Any]:
    runtime = p.breakdown.get("runtime", 0)
    if "cuda_allocated_peak_bytes" in measured:
        meas = measured["cuda_allocated_peak_bytes"]
        return {
            "basis": "CUDA allocator peak vs plan total minus its runtime term (context)",
            "measured_bytes": meas,
            "planned_bytes": p.total_bytes - runtime,
            "ratio": _ratio(meas, p.total_bytes - runtime),
        }
    meas = measured["job_peak_rss_bytes"]
    above = meas - measured["baseline_bytes"]
    return {
        "basis": "peak process RSS of the job vs plan total (runtime term included)",
        "measured_bytes": meas,
        "planned_bytes": p.total_bytes,
        "ratio": _ratio(meas, p.total_bytes),
        "job_only": {
            "basis": "above the post-import baseline vs plan total minus its runtime term",
            "measured_bytes": above,
            "planned_bytes": p.total_bytes - runtime,
            "ratio": _ratio(above, p.total_bytes - runtime),
        },
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None


def _plan_dict(p: Plan) -> dict[str, Any]:
    return {
        "profile": p.device,
        "total_bytes": p.total_bytes,
        "available_bytes": p.available_bytes,
        "fits": p.fits,
        "peak_phase": p.peak_phase,
        "breakdown": dict(p.breakdown),
        "workload": p.workload.to_dict(),
        "notes": list(p.notes),
    }


def _table(rep: dict[str, Any]) -> str:
    m, c, pl = rep["measured"], rep["comparison"], rep["planned"]

    def mib(n: float | None) -> str:
        return "-" if n is None else f"{n / MIB:9.1f} MiB"

    lines = [
        f"cotune profile: {rep['job']} of {rep['model']['name']} on {rep['device_profile']} "
        f"(measured on {m['torch_device']}): {rep['workload_text']}",
        f"{'':<26}{'measured':>14}{'planned':>14}{'ratio':>8}",
        f"{'peak memory':<26}{mib(c['measured_bytes']):>14}{mib(c['planned_bytes']):>14}"
        f"{c['ratio'] if c['ratio'] is not None else '-':>8}",
    ]
    if "job_only" in c:
        j = c["job_only"]
        lines.append(
            f"{'  above imports':<26}{mib(j['measured_bytes']):>14}"
            f"{mib(j['planned_bytes']):>14}{j['ratio'] if j['ratio'] is not None else '-':>8}"
        )
    lines.append(f"{'  model load peak':<26}{mib(m.get('load_peak_bytes')):>14}")
    if rep["job"] == "train":
        lines.append(
            f"{'time per step':<26}{m['seconds_per_step']:>12.3f} s"
            f"  (after the first: {m['seconds_per_step_steady']:.3f} s)"
        )
        lines.append(
            f"{'tokens/s':<26}{m['tokens_per_s']:>14.1f}  ({m['steps']} steps, "
            f"{m['tokens']} tokens)"
        )
    else:
        lines.append(
            f"{'tokens/s':<26}{m['tokens_per_s']:>14.1f}  ({m['new_tokens']} new tokens,"
            f" {m['prompt_tokens']} prompt, backend {m['backend']})"
        )
    pw = rep["power"]
    lines.append(
        f"{'power':<26}"
        + (
            f"{pw['power_mean_mw'] / 1000:>12.2f} W mean, {pw['power_peak_mw'] / 1000:.2f} W peak "
            f"({pw['power_source']}, {pw['samples']} samples)"
            if pw and pw.get("power_mean_mw") is not None
            else f"n/a: {rep['power_unavailable_reason']}"
        )
    )
    rd = rep.get("round")
    if rd:
        s = rd["steady"]
        lines.append(
            f"{'bytes per round':<26}down {fmt_bytes(s['bytes_down'])}, up "
            f"{fmt_bytes(s['bytes_up'])} (round {s['round']}, envelopes included)"
        )
    lines.append(
        "planned breakdown: "
        + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in pl["breakdown"].items() if v)
    )
    lines.append(
        f"plan: {'fits' if pl['fits'] else 'DOES NOT FIT'} in "
        f"{fmt_bytes(pl['available_bytes'])} available on {pl['profile']}"
    )
    lines += [f"note: {n}" for n in rep["notes"]]
    return "\n".join(lines)


def _plot(rep: dict[str, Any], path: Path) -> str | None:
    """Planned breakdown stacked beside the measured peak; a reason string when skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"matplotlib is not available ({type(exc).__name__}); profile.png skipped"
    m, c = rep["measured"], rep["comparison"]
    cuda = "cuda_allocated_peak_bytes" in m
    # the runtime term (imports, CUDA context) dwarfs a small job: a second panel leaves it out
    panels = [False] if cuda else [True, False]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 2, 5), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, with_runtime in zip(axes[0], panels, strict=True):
        bottom = 0.0
        for i, (k, v) in enumerate(rep["planned"]["breakdown"].items()):
            if v and (with_runtime or k != "runtime"):
                ax.bar("planned", v / MIB, bottom=bottom, color=colors[i % 10], label=k)
                bottom += v / MIB
        if cuda:
            ax.bar("measured", c["measured_bytes"] / MIB, color="0.3", label="CUDA allocator peak")
            ax.set_title("job (no CUDA context)", fontsize=9)
        elif with_runtime:
            base = m["baseline_bytes"] / MIB
            ax.bar("measured", base, color="0.75", hatch="//", label="post-import baseline")
            ax.bar(
                "measured",
                c["measured_bytes"] / MIB - base,
                bottom=base,
                color="0.3",
                label="job above baseline",
            )
            ax.set_title("whole process", fontsize=9)
        else:
            ax.bar("measured", c["job_only"]["measured_bytes"] / MIB, color="0.3")
            ax.set_title("above imports / runtime", fontsize=9)
        ax.set_ylabel("MiB")
    ratio = c["ratio"] if c["ratio"] is not None else float("nan")
    fig.suptitle(
        f"{rep['model']['name']} on {rep['device_profile']} ({rep['job']}): "
        f"{rep['workload_text']}; measured/planned = {ratio:.2f}",
        fontsize=9,
    )
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 1.9 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------
# the command


def _torch_device(choice: str, accelerator: str) -> str:
    if choice == "cpu" or (choice == "auto" and accelerator != "cuda"):
        return "cpu"
    try:
        import torch

        ok = torch.cuda.is_available()
    except Exception:
        ok = False
    if ok:
        return "cuda"
    if choice == "cuda":
        raise ProfileUsageError("--torch-device cuda but torch sees no CUDA device")
    return "cpu"


def _prepare_backend(ns: argparse.Namespace, notes: list[str]) -> tuple[str, str | None]:
    """(backend, export dir): ONNX Runtime needs the model exported, in its own process."""
    if ns.backend == "torch":
        return "torch", None
    from edge_sdk.inference.onnx_export import ort_status

    ok, why = ort_status()
    if not ok:
        if ns.backend == "ort":
            raise ProfileUsageError(f"--backend ort: {why}")
        notes.append(f"ONNX Runtime unavailable ({why}); generated with torch eager")
        return "torch", None
    try:
        out = _run_worker(
            {"job": "export", "model": ns.model, "export_dir": ns.export_dir}, ns.timeout
        )
    except JobFailedError as exc:
        if ns.backend == "ort":
            raise
        notes.append(f"ONNX export failed; generated with torch eager ({str(exc)[:200]})")
        return "torch", None
    return "ort", out["export"]


def _refuse(ns: argparse.Namespace, p: Plan, out: Path) -> int:
    print(p.explain())
    print(
        f"cotune profile: the plan says this job does not fit {p.device} (short by "
        f"{fmt_bytes(-p.headroom_bytes)}: needs {p.total_bytes} bytes, {p.available_bytes} "
        "available); refusing to run it (--force runs it anyway)",
        file=sys.stderr,
    )
    out.mkdir(parents=True, exist_ok=True)
    rep = {
        "version": REPORT_VERSION,
        "status": "does_not_fit",
        "job": ns.job,
        "device_profile": p.device,
        "planned": _plan_dict(p),
        "short_by_bytes": -p.headroom_bytes,
    }
    (out / "profile.json").write_text(json.dumps(rep, indent=2) + "\n")
    return EXIT_DOES_NOT_FIT


def profile_cli(argv: Sequence[str]) -> int:
    """Entry point of ``cotune profile``; returns the exit code (see the module docstring)."""
    try:
        ns = _parser().parse_args(list(argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    notes: list[str] = []
    try:
        _check_args(ns)
        _absolutize(ns)
        prof = get_profile(ns.device)
        if ns.os_reserved is not None:
            prof = prof.with_overrides(os_reserved_bytes=int(ns.os_reserved * MIB))
        shape = ModelShape.from_config(ns.model)
        reserve = int(ns.app_reserve * MIB)
        texts = _load_texts(ns.data)
        prompt = ns.prompt if ns.prompt is not None else texts[0][:400]
        quant = ns.quant or prof.default_quant()
        # before the run the prompt's length in tokens is bounded by its UTF-8 bytes
        est = len(prompt.encode("utf-8")) + 2 if ns.job == "generate" else 0
        p = plan(shape, prof, _workload(ns, quant, est), app_reserve_bytes=reserve)
        out = Path(ns.out)
        if not p.fits and not ns.force:
            return _refuse(ns, p, out)
        if not p.fits:
            notes.append(f"the plan says this does not fit {prof.id}; run anyway (--force)")
        device = _torch_device(ns.torch_device, prof.accelerator)
        model_dir = Path(ns.model)
        if not (model_dir / "config.json").is_file():
            raise ProfileUsageError(
                f"--model {ns.model!r} must be a local model directory to run a job"
            )
        if ns.job == "generate" and ns.quant:
            notes.append(f"--quant {ns.quant} ignored: the inference backends run fp32 weights")
    except (ProfileError, ProfileUsageError) as exc:
        print(f"cotune profile: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        spec: dict[str, Any] = {
            "job": ns.job,
            "model": str(model_dir),
            "data": ns.data,
            "threads": ns.threads,
            "torch_device": device,
            "quant": quant,
            "rank": ns.rank,
            "full": ns.full,
            "targets": list(p.workload.lora_targets or ()),
            "lora_dropout": ns.lora_dropout,
            "batch": ns.batch,
            "seq": ns.seq,
            "steps": ns.steps,
            "lr": ns.lr,
            "checkpointing": ns.checkpointing,
            "attention": ns.attention,
            "profile": prof.id,
            "prompt": prompt,
            "max_new_tokens": ns.max_new_tokens,
        }
        if ns.job == "generate":
            spec["backend"], spec["export"] = _prepare_backend(ns, notes)
        from .tegrastats import TegraSampler

        sampler = TegraSampler(ns.power_interval_ms).start()
        try:
            measured = _run_worker(spec, ns.timeout)
        finally:
            sampler.stop()
        round_info = _run_worker({**spec, "job": "round"}, ns.timeout) if ns.round else None
    except (ProfileError, ProfileUsageError) as exc:
        print(f"cotune profile: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except JobFailedError as exc:
        print(f"cotune profile: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED

    # the plan of what really ran: the loaded quant, the real prompt length, where it ran
    if ns.job == "train":
        if measured["quant"] != quant:
            notes.append(f"{quant} was not available; measured with {measured['quant']} weights")
        w = _workload(ns, measured["quant"])
        steps = measured["step_seconds"]
        measured["seconds_per_step"] = sum(steps) / len(steps) if steps else float("nan")
        steady = steps[1:] or steps
        measured["seconds_per_step_steady"] = sum(steady) / len(steady) if steady else float("nan")
    else:
        w = _workload(ns, "fp32", measured["prompt_tokens"])
        if measured["backend"] == "ort":
            notes.append(
                "the plan models torch inference (fp32 torch weights; runtime term = the RSS "
                "of torch + transformers + peft imports); ONNX Runtime holds its own session "
                "and arenas"
                + (
                    " (and still imports torch on its load path)"
                    if measured["torch_imported"]
                    else ""
                )
                + ", so the ratio is indicative only"
            )
    here = prof
    if (device == "cpu") != (prof.accelerator == "cpu"):
        here = get_profile("generic-cpu") if device == "cpu" else prof
        notes.append(
            f"{prof.id} has accelerator {prof.accelerator} but the job ran on {device}; "
            f"measured/planned uses the plan for {here.id}"
        )
    planned = plan(shape, prof, w, app_reserve_bytes=reserve)
    comparable = planned if here is prof else plan(shape, here, w, app_reserve_bytes=reserve)
    if round_info is not None:  # what the wire carries of the adapter itself, each way
        round_info["adapter_fp16_bytes"] = 2 * int(planned.details["trainable_params"])
    since, until = measured["window"]
    power = sampler.summary(since, until)
    if power is None and sampler.summary() is not None:
        power = sampler.summary()
        notes.append("no power sample fell inside the job's window; power covers the whole run")
    rep: dict[str, Any] = {
        "version": REPORT_VERSION,
        "status": "ok",
        "job": ns.job,
        "device_profile": prof.id,
        "model": {
            "path": str(model_dir),
            "name": model_dir.name,
            "summary": shape.summary(),
            "params": shape.num_params,
        },
        "workload": w.to_dict(),
        "workload_text": w.describe(),
        "run": {
            "torch_device": device,
            "threads": ns.threads,
            "data": ns.data,
            "malloc": dict(PINNED_MALLOC),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "measured": measured,
        "planned": _plan_dict(planned),
        "comparison": _comparison(measured, comparable),
        "power": power.to_dict() if power else None,
        "power_unavailable_reason": None
        if power
        else (sampler.reason if not sampler.available else "no samples during the job"),
        "round": round_info,
        "notes": notes + list(measured.get("notes", [])) + list(measured.get("load_notes", [])),
    }
    if here is not prof:
        rep["comparison"]["profile"] = here.id
    out.mkdir(parents=True, exist_ok=True)
    skipped = _plot(rep, out / "profile.png")
    if skipped:
        rep["notes"].append(skipped)
    (out / "profile.json").write_text(json.dumps(rep, indent=2) + "\n")
    print(json.dumps(rep, indent=2) if ns.json else _table(rep))
    print(
        f"wrote {out / 'profile.json'}" + ("" if skipped else f" and {out / 'profile.png'}"),
        file=sys.stderr,
    )
    return 0


def _worker_main(argv: Sequence[str]) -> int:
    spec = json.loads(argv[argv.index("--worker") + 1])
    result = _JOBS[spec["job"]](spec)
    print(_RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(_worker_main(sys.argv))
    sys.exit(profile_cli(sys.argv[1:]))
