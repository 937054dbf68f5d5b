"""Secure aggregation's cost: FedAvg rounds with N virtual devices over the real wire, plain vs
secure (SecAgg+, aggregator/secure_round.py), side by side in one run.

Each N is two fresh federations (real provisioning, Mosquitto with mTLS + ACL, the aggregator
service in its own process, virtual devices from ``cotune.fleet``), one plain, one with
``secure_aggregation``; then a secure run where 30 % of the devices drop out (a third each
before sharing keys, before uploading, before revealing).

    --quick: N = 10, 50, 100 with "big" updates (1.26 MB, chunked), 2 rounds each  (minutes)
    --size tiny: 4.4 KB updates (then the protocol's own messages dominate the bytes)

Figures (last line ``BENCH secagg {...}``):
  bytes_ratio_100         devices' MQTT bytes per client and round, both directions, secure / plain
  time_ratio_100          median round seconds secure / plain at N = 100
  max_abs_err             largest |secure aggregate - weighted mean of what the devices sent|
  dropout_30_recovered    the round with 30 % dropouts (dropout_rate 0.3 configured) committed a right aggregate
  bytes_per_client_growth secure bytes per client at the largest N / at the smallest
  overhead_growth         (secure - plain) bytes per client, largest N / smallest, beside
  log_growth              log2(largest N) / log2(smallest N): the logarithmic bound
Results go to bench/results/secagg-{quick,full}.json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLIP, CAP = 1.0, 100
#: device worker processes: the simulated devices compute in parallel, as real ones do (one per core)
WORKERS = 2


def _one(n: int, size: str, rounds: int, secure: bool, drop: dict | None = None, progress: bool = False,
         dropout_rate: float = 0.1) -> dict:
    from cotune.fleet.driver import FleetOptions, run_fleet
    from cotune.fleet.expected import secure_mean, sent_rows

    work = Path(tempfile.mkdtemp(prefix="cotune-bench-secagg-", dir="/tmp"))
    work.chmod(0o755)
    overrides: dict = {"quorum": 0.5}
    if secure:
        overrides["secure_aggregation"] = {"clip": CLIP, "weight_cap": CAP, "step_timeout_s": 10.0,
                                           "dropout_rate": dropout_rate}
    try:
        run = run_fleet(FleetOptions(clients=n, rounds=rounds, size=size, work_dir=str(work), progress=progress,
                                     round_deadline_s=300, keep_blobs=secure, workers=WORKERS,
                                     aggregator_overrides=overrides, secagg_drop=drop or {}))
        s = run.device_stats
        out = {"n": n, "secure": secure, "ok": run.aggregator_exit == 0 and len(run.rounds) == rounds,
               "round_s": [r.seconds for r in run.rounds], "accepted": [r.accepted for r in run.rounds],
               "agg_cpu_s": [r.agg_cpu_s for r in run.rounds], "devices_cpu_s": [r.devices_cpu_s for r in run.rounds],
               "bytes_per_client_round": (s.get("bytes_in", 0) + s.get("bytes_out", 0)) / n / rounds,
               "note": run.note[-300:] if run.aggregator_exit else ""}
        if secure:
            from aggregator.state import StateStore

            rows = sent_rows(work)
            errs, committed = [], []
            with StateStore(work / "aggregator" / "state.db") as store:
                for r in range(1, rounds + 1):
                    metrics = store.round_info(r).metrics
                    committed.append("secagg" in metrics)
                    if "secagg" not in metrics:
                        out.setdefault("skipped", []).append(metrics.get("skipped"))
                        continue
                    want, _, _, _ = secure_mean(work, rows, r, clip=CLIP, weight_cap=CAP)
                    got = store.load_global(store.round_info(r).global_digest).tensors
                    errs.append(max(float(np.abs(got[k].astype(np.float64) - want[k]).max()) for k in want))
                    out.setdefault("secagg", []).append(metrics["secagg"])
                    out.setdefault("steps_s", []).append(metrics.get("secagg_steps_s"))
            out["max_abs_err"] = max(errs) if errs else None
            out["committed"] = committed
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", help="comma-separated N (default 10,50,100)")
    ap.add_argument("--size", default="big", choices=["tiny", "big"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    sizes = [int(x) for x in (args.sizes or "10,50,100").split(",")]
    mode = "quick" if args.quick else "full"
    t0 = time.time()
    rows = []
    for n in sizes:
        for secure in (False, True):
            res = _one(n, args.size, args.rounds, secure, progress=args.progress)
            rows.append(res)
            print(f"N={n:4d} {'secure' if secure else 'plain ':6s} ok={res['ok']} round_s={res['round_s']} "
                  f"bytes/client/round={res['bytes_per_client_round'] / 1e6:.3f} MB"
                  + (f" max_abs_err={res['max_abs_err']:.2e}" if secure and res.get("max_abs_err") is not None
                     else "") + (f" note={res['note']}" if res["note"] else ""), flush=True)
    n_big = max(sizes)
    k = len(sizes)
    parties = [f"d{i:05d}" for i in range(n_big)]
    drop_n = round(0.3 * n_big)
    steps = ["shares", "masked", "reveal"]
    rng = np.random.default_rng(0)
    dropped = sorted(rng.choice(parties, drop_n, replace=False).tolist())
    drop = {p: steps[i % 3] for i, p in enumerate(dropped)}
    # the operator expects 30 % dropouts and says so: the graph is sized for it
    dres = _one(n_big, args.size, 1, True, drop=drop, progress=args.progress, dropout_rate=0.3)
    print(f"N={n_big} secure with {drop_n} dropouts: committed={dres.get('committed')} round_s={dres['round_s']} "
          f"max_abs_err={dres.get('max_abs_err')}", flush=True)

    by = {(r["n"], r["secure"]): r for r in rows}
    lo, hi = min(sizes), n_big
    plain_hi, sec_hi = by[(hi, False)], by[(hi, True)]
    overhead = {n: by[(n, True)]["bytes_per_client_round"] - by[(n, False)]["bytes_per_client_round"]
                for n in sizes}
    errs = [r["max_abs_err"] for r in rows if r["secure"] and r.get("max_abs_err") is not None]
    summary = {
        "size": args.size, "sizes": sizes, "rounds": args.rounds,
        f"bytes_ratio_{hi}": round(sec_hi["bytes_per_client_round"] / plain_hi["bytes_per_client_round"], 3),
        f"time_ratio_{hi}": round(_median(sec_hi["round_s"]) / _median(plain_hi["round_s"]), 3),
        "max_abs_err": max(errs) if errs else None,
        "dropout_30_recovered": bool(dres.get("committed") == [True] and dres.get("max_abs_err") is not None
                                     and dres["max_abs_err"] < 1e-4),
        "bytes_per_client_growth": round(by[(hi, True)]["bytes_per_client_round"]
                                         / by[(lo, True)]["bytes_per_client_round"], 3),
        "overhead_growth": round(overhead[hi] / overhead[lo], 3) if overhead[lo] > 0 else None,
        "log_growth": round(math.log2(hi) / math.log2(lo), 3),
        "overhead_bytes_per_client": {n: round(v) for n, v in overhead.items()},
        "seconds": round(time.time() - t0, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"secagg-{mode}.json").write_text(json.dumps({"summary": summary, "runs": rows, "dropout": dres},
                                                            indent=1))
    _plot(rows, sizes, RESULTS / f"secagg-{mode}.png", k)
    print("BENCH secagg " + json.dumps(summary))


def _plot(rows: list[dict], sizes: list[int], path: Path, k: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for secure, style in ((False, "o-"), (True, "s-")):
        rs = [r for r in rows if r["secure"] == secure]
        label = "secure (SecAgg+)" if secure else "plain"
        a.plot([r["n"] for r in rs], [_median(r["round_s"]) for r in rs], style, label=label)
        b.plot([r["n"] for r in rs], [r["bytes_per_client_round"] / 1e6 for r in rs], style, label=label)
    a.set(xlabel="clients per round", ylabel="median round seconds", title="round time")
    b.set(xlabel="clients per round", ylabel="MB per client and round (both directions)", title="device traffic")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
