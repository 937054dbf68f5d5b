"""One FedAvg-LoRA round on the zoo SLM: communication and training memory.

comm_ratio: bytes on the wire per client per round, both directions, envelopes, key grant and
task included, measured at each client's MQTT transport, divided by the bytes of the full
model in fp32. Peaks: peak training memory of a few real steps (process RSS above the
post-import baseline on CPU; CUDA allocator peak on a GPU), each mode in a fresh process:
nf4 + LoRA, fp32 + LoRA, fp32 full fine-tuning. Last line:
  BENCH round {"comm_ratio": .., "peak_nf4_lora": .., "peak_fp32_lora": .., "peak_fp32_full": ..}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# a compact adapter, as the papers use: rank 4 on the attention query/value projections
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
# memory peaks are also measured on a ~60M-parameter Llama (random init; memory does not
# depend on the values), where the weights, not activations and logits, dominate
SIZED = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12,
         "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": True}


def sized_model(zoo_slm: str) -> str:
    """The zoo SLM's tokenizer on a larger Llama config, cached beside the zoo."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(zoo_slm).parent.parent / "bench-sized-llama"
    if (out / "config.json").exists():
        return str(out)
    tok = AutoTokenizer.from_pretrained(zoo_slm)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **SIZED))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)
TRAIN = {"lr": 2e-3, "batch_size": 8, "block_size": 64, "max_steps": 6}


def measure_peak(mode: str, model_path: str, steps: int, device: str) -> dict:
    """Runs in a fresh process: peak memory of `steps` training steps in `mode`."""
    import torch

    torch.set_num_threads(1)
    # import everything the measured code imports lazily, so the baseline excludes library code
    import peft  # noqa: F401
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    from algorithms.core.memory import PeakMemory
    from algorithms.core.modeling import LoraSpec, attach_lora, load_causal_lm
    from algorithms.core.training import TrainConfig, train_causal_lm
    from algorithms.zoo.datasets import domain_split

    texts = domain_split("computers", "private")[:200]
    cfg = TrainConfig.from_dict({**TRAIN, "max_steps": steps})
    with PeakMemory(device) as peak:
        quant = "nf4" if mode == "nf4_lora" else "fp32"
        model, tok, report = load_causal_lm(model_path, quant=quant, device=device)
        if mode.endswith("lora"):
            model = attach_lora(model, LoraSpec.from_dict(LORA), seed=0)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        result = train_causal_lm(model, texts, cfg, progress=None, tokenizer=tok)
    return {"mode": mode, "peak_mb": round(peak.delta_bytes / 2**20, 2), "kind": peak.kind,
            "quant": report.quant if hasattr(report, "quant") else quant, "fell_back": report.fell_back,
            "steps": result.steps, "loss_last": result.loss_last}


def comm_round(model_path: str, clients: int) -> dict:
    """A real round over the wire (embedded broker; Mosquitto is not needed for byte counts)."""
    import torch

    torch.set_num_threads(1)
    from aggregator.config import AggregatorConfig
    from aggregator.service import AggregatorService
    from algorithms.zoo.datasets import client_shards
    from bridge.broker import EmbeddedBroker
    from bridge.provision import provision
    from edge_sdk.client import EdgeClient

    root = Path(tempfile.mkdtemp(prefix="cotune-bench-round-"))
    broker = EmbeddedBroker().start()
    names = [f"c{i}" for i in range(clients)]
    paths = provision(root / "fed", "benchround", names, check_access=False)
    over = {"host": broker.host, "port": broker.port, "tls": False, "protocol": "3.1.1"}
    cfg = AggregatorConfig(party_config=str(paths.party_config("aggregator")), state_dir=str(root / "agg"), rounds=2,
                           models={"slm": model_path}, min_clients=clients, broker=over, final_wait_s=5,
                           algorithm_config={"lora": LORA, "train": {**TRAIN, "max_steps": 2}, "wire_dtype": "fp16"})
    shards = client_shards("computers", clients, 0)
    eds = [EdgeClient(paths.party_config(n), model_path, shards[i][:64], profile=None, work_dir=root / n,
                      broker=over, progress=None) for i, n in enumerate(names)]
    threads = [threading.Thread(target=e.run, kwargs={"max_idle_s": 120}, daemon=True) for e in eds]
    for t in threads:
        t.start()
    try:
        AggregatorService(cfg, progress=None).run()
        for t in threads:
            t.join(60)
        # round 2 is the steady state (round 1 also pays for connecting and presence)
        per_client = [h["wire_bytes_down"] + h["wire_bytes_up"] for e in eds for h in e.history if h["round"] == 2]
        adapter_bytes = sum(v.numel() * 2 for v in eds[0].adapter_state().values())  # fp16 on the wire
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {"bytes_per_client": max(per_client), "adapter_fp16_bytes": adapter_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer training steps")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", help="model directory (default: the zoo's slm-llama)")
    ap.add_argument("--measure-peak", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = args.steps or (4 if args.quick else 12)
    if args.measure_peak:
        print(json.dumps(measure_peak(args.measure_peak, args.model, steps, args.device)))
        return
    if args.model is None:
        from algorithms.zoo import build_zoo

        args.model = str(build_zoo(progress=True)["slm-llama"])
    from safetensors import safe_open

    n_params = 0
    with safe_open(str(Path(args.model) / "model.safetensors"), "np") as f:
        for k in f.keys():
            n_params += int(__import__("math").prod(f.get_slice(k).get_shape()))
    full_fp32 = 4 * n_params
    t0 = time.time()
    comm = comm_round(args.model, args.clients)
    print(f"round over the wire: {comm['bytes_per_client']} bytes per client ({time.time() - t0:.1f}s)", flush=True)
    def peaks_for(model: str, label: str) -> dict:
        found = {}
        for mode in ("nf4_lora", "fp32_lora", "fp32_full"):
            out = subprocess.run([sys.executable, __file__, "--measure-peak", mode, "--model", model, "--steps",
                                  str(steps), "--device", args.device], capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"})
            if out.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{out.stderr[-2000:]}")
            found[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{label}: {mode:>10}: peak {found[mode]['peak_mb']} MB ({found[mode]['kind']}, "
                  f"{found[mode]['steps']} steps)", flush=True)
        return found

    peaks = peaks_for(args.model, "zoo slm")
    sized_peaks = peaks_for(sized_model(args.model), "sized 60M")
    result = {
        "comm_ratio": round(comm["bytes_per_client"] / full_fp32, 5),
        "peak_nf4_lora": peaks["nf4_lora"]["peak_mb"], "peak_fp32_lora": peaks["fp32_lora"]["peak_mb"],
        "peak_fp32_full": peaks["fp32_full"]["peak_mb"],
        "bytes_per_client_round": comm["bytes_per_client"], "full_model_fp32_bytes": full_fp32,
        "adapter_fp16_bytes": comm["adapter_fp16_bytes"], "params": n_params, "lora": LORA,
        "memory_kind": peaks["fp32_full"]["kind"], "nf4_fell_back": peaks["nf4_lora"]["fell_back"],
        "sized_model": "llama " + json.dumps(SIZED), "sized_60M_peaks": {k: v["peak_mb"] for k, v in sized_peaks.items()},
    }
    print("BENCH round " + json.dumps(result))


if __name__ == "__main__":
    main()
