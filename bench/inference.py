"""Edge inference benchmark on the zoo models: ONNX Runtime vs torch eager, proxy-tuning cost,
and large-model round trips with and without speculative blocks.

Setup. Every figure is single-threaded on both sides (``torch.set_num_threads(1)``, ONNX
Runtime ``intra_op_num_threads=1``), greedy, a fixed number of new tokens (``ignore_eos``),
the same prompts (openings of held-out zoo text), KV cache on both sides. Variants alternate
within every round; each ratio is the median over rounds of (summed time of one variant /
summed time of the other).

- ``ort_speedup``: tokens/s of the zoo SLM (slm-llama) on ONNX Runtime (dynamo export) over
  torch eager. The torch figure is the faster of the SDK's torch backend and a bare
  transformers loop with its own ``DynamicCache`` (``torch_native``), so the speedup is not
  inflated by wrapper overhead. Greedy tokens must match across backends.
- ``proxy_overhead``: proxy-tuned decoding time / large-only decoding time. Large = the zoo
  LLM as a ``LocalLargeModel`` on torch eager (it stands in for the cloud model; both runs
  reach it through the same protocol, one request per token). Tuned = slm-llama + a random
  rank-8 LoRA (seeded), base = slm-llama: ONE gated ONNX graph run as a batch of 2.
  ``proxy_overhead`` lets the large request run while the small pair computes (the default);
  ``proxy_overhead_sequential`` does not.
- ``rtt_per_token_plain`` / ``rtt_per_token_speculative``: large-model requests per generated
  token without and with speculation (k drafts per request), with the acceptance rate and
  the speculative decoding time relative to large-only decoding.

Last line: ``BENCH inference {"ort_speedup": .., "proxy_overhead": .., "rtt_per_token_plain":
.., "rtt_per_token_speculative": .., ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_cache() -> Path:
    base = os.environ.get("COTUNE_BENCH_CACHE") or str(Path.home() / ".cache" / "cotune")
    return Path(base) / "bench-inference"


def random_adapter(slm: Path, out: Path, seed: int = 0) -> Path:
    """A seeded random rank-8 LoRA on ``slm`` (peft layout); deterministic, so exports of it
    are found in the export cache on the next run."""
    import torch

    from algorithms.core.modeling import LoraSpec, attach_lora, load_causal_lm, save_peft_adapter

    if (out / "adapter_model.safetensors").is_file():
        return out
    model, _, _ = load_causal_lm(slm)
    peft_model = attach_lora(model, LoraSpec(r=8, alpha=16.0), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, prm in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter)
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    save_peft_adapter(peft_model, slm, tmp)
    os.replace(tmp, out)
    return out


def prompts(n: int, words: int = 8) -> list[str]:
    from algorithms.zoo import general_text

    texts = [t for t in general_text("test") if len(t.split()) > words]
    step = max(1, len(texts) // n)
    return [" ".join(texts[i * step].split()[:words]) for i in range(n)]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def native_torch_loop(model, tokenizer, prompt: str, n: int) -> list[int]:
    """Greedy decoding with transformers' own forward and DynamicCache (no SDK code)."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out_ids: list[int] = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        for _ in range(n):
            tok = int(out.logits[0, -1].argmax())
            out_ids.append(tok)
            if len(out_ids) == n:
                break
            out = model(
                input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True
            )
    return out_ids


def measure(variants: dict, plist: list[str], rounds: int, n_tok: int, unit: str = "tok/s"):
    """Time every variant on every prompt, interleaved per (round, prompt) in a rotating
    order so that load drift on a shared machine hits all variants alike. Returns
    ``({variant: [seconds per (round, prompt)]}, [[outputs of each variant] per run])``."""
    names = list(variants)
    for fn in variants.values():
        fn(plist[0])  # warm-up
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs = []
    for r in range(rounds):
        for i, p in enumerate(plist):
            order = names[(r + i) % len(names) :] + names[: (r + i) % len(names)]
            outs = {}
            for name in order:
                dt, outs[name] = timed(lambda fn=variants[name], p=p: fn(p))
                times[name].append(dt)
            outputs.append([outs[n] for n in names])
        last = {n: sum(times[n][-len(plist) :]) for n in names}
        if unit == "tok/s":
            line = "   ".join(f"{n} {len(plist) * n_tok / t:7.1f} tok/s" for n, t in last.items())
        else:
            ref = last[names[0]]
            line = "   ".join(f"{n} {t:.3f}s ({t / ref:.2f}x)" for n, t in last.items())
        print(f"  round {r}: {line}", flush=True)
    return times, outputs


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer prompts and rounds, ~1 minute")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per generation")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--k", type=int, default=4, help="speculative draft length")
    ap.add_argument("--export-dir", default=None, help="ONNX export cache")
    ap.add_argument("--json", default=None, help="also write the summary to this file")
    args = ap.parse_args(argv)

    import torch

    from algorithms.zoo import build_zoo
    from edge_sdk.inference.generate import (
        Generator,
        OrtBackend,
        SamplingConfig,
        TorchBackend,
    )
    from edge_sdk.inference.onnx_export import ensure_exported, ort_status
    from edge_sdk.inference.proxy import (
        LocalLargeModel,
        ProxyGenerator,
        SmallPair,
        large_only_stream,
    )

    ok, why = ort_status()
    if not ok:
        print(f"inference benchmark needs onnxruntime: {why}", file=sys.stderr)
        return 1
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    n_tok = args.tokens or (48 if args.quick else 128)
    rounds = args.rounds or (4 if args.quick else 7)
    plist = prompts(3 if args.quick else 6)
    cfg = SamplingConfig(max_new_tokens=n_tok, ignore_eos=True)
    cache = bench_cache()
    export_dir = Path(args.export_dir) if args.export_dir else cache / "onnx"

    zoo = build_zoo(quick=False)
    slm, llm = zoo["slm-llama"], zoo["llm"]
    print(
        f"inference benchmark: zoo {zoo.key}, single-threaded torch and ONNX Runtime, "
        f"{len(plist)} prompts x {n_tok} new tokens, {rounds} rounds",
        flush=True,
    )

    # ---- 1. ONNX Runtime vs torch eager on the SLM ------------------------------------------
    t0 = time.perf_counter()
    slm_onnx = ensure_exported(slm, export_dir)
    manifest = json.loads((slm_onnx / "cotune_onnx.json").read_text())
    print(
        f"export slm-llama: {manifest['exporter']} opset {manifest['opset']}, verified max "
        f"|diff| {manifest['verification']['max_abs_diff_with_past']:.2e} "
        f"({time.perf_counter() - t0:.1f}s incl. cache lookup)",
        flush=True,
    )
    ort_gen = Generator(OrtBackend(slm_onnx, threads=1))
    torch_backend = TorchBackend.from_pretrained(slm)
    torch_gen = Generator(torch_backend)
    native_model = torch_backend.module.model
    tok = torch_backend.tokenizer

    variants = {
        "ort": lambda p: ort_gen.generate(p, cfg).token_ids,
        "torch": lambda p: torch_gen.generate(p, cfg).token_ids,
        "native": lambda p: native_torch_loop(native_model, tok, p, n_tok),
    }
    times, match = measure(variants, plist, rounds, n_tok)
    match = all(len(set(map(tuple, outs))) == 1 for outs in match)
    ort_speedup = min(
        median_ratio(times["torch"], times["ort"]), median_ratio(times["native"], times["ort"])
    )
    ort_tps = n_tok / statistics.median(times["ort"])
    torch_tps = n_tok / statistics.median(times["torch"])
    native_tps = n_tok / statistics.median(times["native"])
    print(f"ORT vs torch eager: {ort_speedup:.2f}x (greedy tokens identical: {match})", flush=True)

    # ---- 2. proxy-tuning cost and round trips --------------------------------------------------
    t0 = time.perf_counter()
    adapter = random_adapter(slm, cache / "random-lora-r8-seed0")
    gated_dir = ensure_exported(slm, export_dir, adapter=adapter, lora_mode="gated")
    print(
        f"export slm-llama + LoRA (gated, batch of 2): {time.perf_counter() - t0:.1f}s", flush=True
    )
    pair = SmallPair.gated(OrtBackend(gated_dir, threads=1))
    large = LocalLargeModel(TorchBackend.from_pretrained(llm))
    proxy = ProxyGenerator(large, pair, alpha=1.0)
    proxy_seq = ProxyGenerator(large, pair, alpha=1.0, overlap=False)
    proxy_spec = ProxyGenerator(large, pair, alpha=1.0, speculative=args.k)

    def large_only(p):
        stream = large_only_stream(large, tok, p, cfg)
        for _ in stream:
            pass
        return stream.result

    variants = {
        "large": large_only,
        "proxy": lambda p: proxy.generate(p, cfg),
        "sequential": lambda p: proxy_seq.generate(p, cfg),
        "speculative": lambda p: proxy_spec.generate(p, cfg),
    }
    times, results = measure(variants, plist, rounds, n_tok, unit="s")
    plain = [r[1] for r in results]
    spec = [r[3] for r in results]
    rtt_plain = sum(x.stats["large_requests"] for x in plain) / sum(x.new_tokens for x in plain)
    rtt_spec = sum(x.stats["large_requests"] for x in spec) / sum(x.new_tokens for x in spec)
    drafted = sum(x.stats["drafted"] for x in spec)
    accept = sum(x.stats["accepted"] for x in spec) / drafted if drafted else 0.0
    exact = all(a.token_ids == b.token_ids for a, b in zip(plain, spec, strict=True))
    for gen in (proxy, proxy_seq, proxy_spec):
        gen.close()
    summary = {
        "ort_speedup": round(ort_speedup, 3),
        "proxy_overhead": round(median_ratio(times["proxy"], times["large"]), 3),
        "rtt_per_token_plain": round(rtt_plain, 4),
        "rtt_per_token_speculative": round(rtt_spec, 4),
        "speculative_k": args.k,
        "acceptance_rate": round(accept, 4),
        "proxy_overhead_sequential": round(median_ratio(times["sequential"], times["large"]), 3),
        "speculative_time_vs_large_only": round(
            median_ratio(times["speculative"], times["large"]), 3
        ),
        "speculative_equals_plain_greedy": exact,
        "ort_tokens_per_s": round(ort_tps, 1),
        "torch_backend_tokens_per_s": round(torch_tps, 1),
        "torch_native_tokens_per_s": round(native_tps, 1),
        "greedy_match_ort_torch": match,
        "exporter": manifest["exporter"],
        "threads": 1,
        "new_tokens": n_tok,
        "prompts": len(plist),
        "rounds": rounds,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    print("BENCH inference " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
