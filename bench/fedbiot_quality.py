"""FedBiOT figures of ``bench/quality.py --algorithm fedbiot`` (kept apart from FedCoLLM / FedPT).

Setup: the zoo LLM (6.7M parameters) has only 5 decoder layers. The adapter is the top 2
(FedBiOT's default); drop_ratio 0.5 thins the 3 middle layers to 2 (full-model layers 0 and 2
are kept, 1 is dropped), so the emulator has 4 of the 5 layers plus the shared embedding/LM
head: a mild compression, far from the paper's 32-layer models. One client per domain, its
private split; D_a = the public slices. FedBiOT and its baseline FedOT (one-shot alignment
before round 1, then FedAvg of the adapter, no per-round alignment, no proximal term) run with
the same data, rounds, steps and seeds. Metric: mean held-out (test) token NLL / perplexity per
domain, evaluated on the aggregator side.

Figures:
- ``adapter_full_vs_fedot``: mean over domains of ppl(FedBiOT adapter + full LLM) /
  ppl(FedOT adapter + full LLM); < 1: FedBiOT is better. ``adapter_emulator_vs_fedot``: the
  same for adapter + emulator.
- zero-shot references: ``nll_llm_zero_shot``, ``nll_emulator_raw`` (the cut, not aligned),
  ``nll_emulator_aligned`` (pre-aligned, no adapter).
- ``client_memory_ratio``: peak training memory of a client training the adapter on the
  emulator / of LoRA (same rank and targets) on every layer of the full LLM, each measured in
  a fresh process (CPU: process RSS above the post-import baseline; CUDA: allocator peak).
  ``client_memory_ratio_same_adapter``: / LoRA on the same top layers of the full LLM (the
  weights-only saving). ``client_memory_ratio_sized_60m``: the first ratio on bench/round.py's
  ~60M-parameter 8-layer Llama (random init; memory depends on shapes only), where drop 0.5
  keeps 3 of the 6 middle layers (emulator: 5 of 8 layers).
- ``download_ratio``: emulator blob bytes / the full LLM's weight file bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# LoRA on every linear map of the adapter layers; the LM head stays frozen (FedBiOT)
LORA = {
    "r": 8,
    "alpha": 16,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
TRAIN = {"lr": 3e-3, "epochs": 100, "batch_size": 8, "block_size": 64, "warmup": 2}
PEAK_MODES = ("emulator", "full_lora", "full_adapter")


def settings(quick: bool) -> dict:
    return {
        "lora": LORA,
        "train": {**TRAIN, "max_steps": 20 if quick else 40},
        "eval_block_size": 64,
        "drop_ratio": 0.5,
        "n_adapter_top": 2,
        "n_adapter_bottom": 0,
        # chosen on the dev split from {0, 0.001, 0.01} (quick settings: dev NLL of adapter + LLM
        # 5.2283, 5.2310, 5.2420; FedOT 5.2281): in 3 short rounds the term only slows the adapter
        "proximal_mu": 0.0,
        "align": {
            "mode": "layers",
            "max_steps": 10 if quick else 20,
            "lr": 5e-4,
            "batch_size": 8,
            "block_size": 64,
            "lambda_kd": 1.0,
        },
        "pre_align_steps": 40 if quick else 100,
        "realign_every": 1,
    }


def _server_ctx(b, llm):
    from aggregator.context import ServerContext

    return ServerContext(
        tempfile.gettempdir(),
        0,
        {"llm": b.llm_path},
        b.public,
        {"backend": "local"},
        llm_backend=llm,
    )


def run(b) -> None:
    """Both variants on the same clients; results go into ``b.results``."""
    import numpy as np

    from aggregator.llm import LocalLLM
    from algorithms.core.emulator import build_emulator
    from algorithms.fedbiot.payload import unpack_emulator
    from cotune.simulate import simulate
    from edge_sdk.context import DeviceContext

    cfg = settings(b.args.quick)
    if getattr(b.args, "drop_ratio", None) is not None:
        cfg["drop_ratio"] = float(b.args.drop_ratio)
    b.results["fedbiot_settings"] = cfg
    llm = LocalLLM(b.llm_path)
    tok = llm.tokenizer()
    blob = None
    for variant in ("fedot", "fedbiot"):
        clients = [
            DeviceContext(d, b.llm_path, b.private[d], b.test[d], progress=None) for d in b.domains
        ]
        res = simulate(
            "fedbiot",
            {**cfg, "baseline": variant},
            _server_ctx(b, llm),
            clients,
            b.s["rounds"],
            progress=None,
            apply_final=False,
            after_round=lambda r, *_, v=variant: b.say(f"{v} round {r} done"),
        )
        server = res.server
        with server.full_with(res.state) as m:
            b.results[f"llm_full_{variant}"] = b.eval_domains(m, tok)
        with server.emulator_with(res.state) as m:
            b.results[f"emulator_{variant}"] = b.eval_domains(m, tok)
        b.results[f"{variant}_rounds"] = [r.server for r in res.rounds]
        b.say(
            f"{variant}: adapter + full LLM test NLL {b.mean(b.results[f'llm_full_{variant}']):.4f}, "
            f"adapter + emulator {b.mean(b.results[f'emulator_{variant}']):.4f}"
        )
        if variant == "fedot":  # the emulator never changes after the pre-alignment: its zero-shot
            no_adapter = {
                k: (np.zeros_like(v) if ".lora_B." in k else v) for k, v in res.state.items()
            }
            with server.emulator_with(no_adapter) as m:
                b.results["emulator_aligned_zero_shot"] = b.eval_domains(m, tok)
        blob = server.emulator_blob(res.state)
        plan = server.plan
    b.results["emulator_raw_zero_shot"] = b.eval_domains(
        build_emulator(llm.model, plan).eval(), tok
    )
    b.results["fedbiot_plan"] = plan.to_dict()
    b.results["emulator_blob_bytes"] = len(blob)
    b.results["llm_weight_bytes"] = sum(
        p.stat().st_size for p in Path(b.llm_path).glob("*.safetensors")
    )
    with tempfile.TemporaryDirectory(prefix="cotune-bench-emulator-") as tmp:
        emulator_dir = str(unpack_emulator(blob, Path(tmp) / "emulator"))
        b.results["fedbiot_peaks"] = peaks(b, emulator_dir, b.llm_path, cfg, "zoo LLM")
    b.results["fedbiot_peaks_sized"] = sized_peaks(b, cfg)


def peaks(b, emulator_dir: str, full_path: str, cfg: dict, label: str) -> dict:
    """Each mode in a fresh process (imports done before the baseline)."""
    found = {}
    for mode in PEAK_MODES:
        model = emulator_dir if mode == "emulator" else full_path
        argv = [
            sys.executable,
            __file__,
            "--measure-peak",
            mode,
            "--model",
            model,
            "--emulator",
            emulator_dir,
            "--config",
            json.dumps(cfg),
            "--steps",
            str(6 if b.args.quick else 12),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(argv, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"peak {mode} failed:\n{out.stderr[-2000:]}")
        found[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        b.say(
            f"{label}: client training peak, {mode}: {found[mode]['peak_mb']} MB ({found[mode]['kind']})"
        )
    return found


def sized_peaks(b, cfg: dict) -> dict:
    """The same three peaks on bench/round.py's ~60M-parameter, 8-layer Llama (random init:
    memory depends on shapes only), whose middle block of 6 keeps 3 at drop 0.5."""
    from round import sized_model

    from algorithms.core.emulator import build_emulator, kept_layers, save_emulator
    from algorithms.core.modeling import load_causal_lm

    path = sized_model(b.slm_path)
    full, tok, _ = load_causal_lm(path)
    plan = kept_layers(
        full.config.num_hidden_layers,
        cfg["n_adapter_top"],
        cfg["n_adapter_bottom"],
        cfg["drop_ratio"],
    )
    with tempfile.TemporaryDirectory(prefix="cotune-bench-emulator-") as tmp:
        save_emulator(build_emulator(full, plan), plan, tmp, tok)
        del full
        found = peaks(b, tmp, path, cfg, "sized 60M llama")
    found["plan"] = plan.to_dict()
    return found


def measure_peak(mode: str, model_path: str, emulator_dir: str, cfg: dict, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import peft  # noqa: F401  (imported before the baseline, like the rest)
    import transformers.models.llama.modeling_llama  # noqa: F401

    from algorithms.core.emulator import load_emulator_plan
    from algorithms.core.emulator_train import attach_adapter_lora
    from algorithms.core.memory import PeakMemory
    from algorithms.core.modeling import LoraSpec, attach_lora, load_causal_lm
    from algorithms.core.training import TrainConfig, train_causal_lm
    from algorithms.fedbiot.merge import MergedProximal
    from algorithms.zoo.datasets import domain_split

    texts = domain_split("computers", "private")[:200]
    spec = LoraSpec.from_dict(cfg["lora"])
    train = TrainConfig.from_dict({**cfg["train"], "max_steps": steps})
    plan = load_emulator_plan(emulator_dir)
    with PeakMemory() as peak:
        model, tok, _ = load_causal_lm(model_path)
        extra = None
        if mode == "full_lora":
            model = attach_lora(model, spec, seed=0)
        else:  # the adapter layers of the emulator, or the same layers of the full LLM
            model = attach_adapter_lora(model, spec, plan, seed=0)
            if mode == "emulator" and cfg["proximal_mu"] > 0:  # as the client half does
                extra = MergedProximal(model, cfg["proximal_mu"])
        result = train_causal_lm(
            model, texts, train, progress=None, tokenizer=tok, extra_loss=extra
        )
    return {
        "mode": mode,
        "peak_mb": round(peak.delta_bytes / 2**20, 2),
        "kind": peak.kind,
        "steps": result.steps,
    }


def figures(b) -> dict:
    r, m = b.results, b.mean
    pk, sz = r["fedbiot_peaks"], r["fedbiot_peaks_sized"]
    plan = r["fedbiot_plan"]
    return {
        "domains": len(b.domains),
        "rounds": b.s["rounds"],
        "llm_layers": plan["n_layers"],
        "emulator_layers": len(plan["layers"]),
        "kept_full_layers": [e["origin"] for e in plan["layers"]],
        "adapter_full_vs_fedot": round(b.ratio_ppl("llm_full_fedbiot", "llm_full_fedot"), 4),
        "adapter_emulator_vs_fedot": round(b.ratio_ppl("emulator_fedbiot", "emulator_fedot"), 4),
        "nll_full_fedbiot": round(m(r["llm_full_fedbiot"]), 4),
        "nll_full_fedot": round(m(r["llm_full_fedot"]), 4),
        "nll_emulator_fedbiot": round(m(r["emulator_fedbiot"]), 4),
        "nll_emulator_fedot": round(m(r["emulator_fedot"]), 4),
        "nll_llm_zero_shot": round(m(r["llm_zero_shot"]), 4),
        "nll_emulator_raw": round(m(r["emulator_raw_zero_shot"]), 4),
        "nll_emulator_aligned": round(m(r["emulator_aligned_zero_shot"]), 4),
        "client_memory_ratio": round(pk["emulator"]["peak_mb"] / pk["full_lora"]["peak_mb"], 4),
        "client_memory_ratio_same_adapter": round(
            pk["emulator"]["peak_mb"] / pk["full_adapter"]["peak_mb"], 4
        ),
        "peak_mb": {k: v["peak_mb"] for k, v in pk.items()},
        "memory_kind": pk["emulator"]["kind"],
        "client_memory_ratio_sized_60m": round(
            sz["emulator"]["peak_mb"] / sz["full_lora"]["peak_mb"], 4
        ),
        "sized_60m_layers": [sz["plan"]["n_layers"], len(sz["plan"]["layers"])],
        "sized_60m_peak_mb": {k: sz[k]["peak_mb"] for k in PEAK_MODES},
        "download_ratio": round(r["emulator_blob_bytes"] / r["llm_weight_bytes"], 4),
    }


def plot(b, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    r = b.results
    rows = [
        ("LLM zero-shot", "llm_zero_shot"),
        ("emulator, cut", "emulator_raw_zero_shot"),
        ("emulator, aligned", "emulator_aligned_zero_shot"),
        ("FedOT: adapter + emulator", "emulator_fedot"),
        ("FedBiOT: adapter + emulator", "emulator_fedbiot"),
        ("FedOT: adapter + LLM", "llm_full_fedot"),
        ("FedBiOT: adapter + LLM", "llm_full_fedbiot"),
    ]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.8 / len(rows)
    for i, (label, key) in enumerate(rows):
        ax.bar(
            [j + i * w for j in range(len(b.domains))],
            [r[key][d]["nll"] for d in b.domains],
            w,
            label=label,
        )
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(b.domains))])
    ax.set_xticklabels(b.domains)
    ax.set_ylim(min(r[k][d]["nll"] for _, k in rows for d in b.domains) - 0.3, None)
    ax.set_ylabel("held-out token NLL (nats, lower is better)")
    ax.set_title("cotune quality benchmark: FedBiOT vs FedOT")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # one peak measurement, in a fresh process (see peaks())
    ap = argparse.ArgumentParser()
    ap.add_argument("--measure-peak", choices=PEAK_MODES, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--emulator", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    print(
        json.dumps(measure_peak(a.measure_peak, a.model, a.emulator, json.loads(a.config), a.steps))
    )
