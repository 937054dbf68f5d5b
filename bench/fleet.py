"""Fleet scale: rounds with N virtual devices over the real wire, measured as an operator would.

Each N is a fresh federation: real provisioning, Mosquitto with mTLS + ACL, the real aggregator
service in its own process (``python -m cotune aggregator serve``), N lightweight virtual
devices (``cotune.fleet``) answering every Task with a valid random FedAvg-LoRA update: "tiny"
~4.4 KB (inline), "big" ~1.26 MB (chunked blob). After the big runs, the broker's raw
throughput for the same bytes (plain paho, no envelope, same broker, same topics) is measured
as the baseline of update ingest.

    --quick: tiny N = 100, 1,000; big N = 50        (a couple of minutes)
    full:    tiny N = 100, 1,000, 3,000, 10,000; big N = 50, 200, 500

Figures (last line ``BENCH fleet {...}``):
  round_s_1000 / round_s_10000  median round seconds (round opened -> committed) at that N
  cpu_per_update_growth         aggregator CPU per accepted update at the largest tiny N / at N=100
  big_ingest_MBps               update MiB / (first update sent -> last accepted), largest big N
  big_ingest_vs_raw             big_ingest_MBps / raw Mosquitto MiB/s measured in the same run
  rss_growth_mb_per_1000        aggregator peak RSS growth per 1,000 clients (N=100 -> largest)
  disk_per_round_mb             state directory growth per round at the largest tiny N
  big_ingest_per_agg_cpu_MBps   update MiB / aggregator CPU seconds: what one core of the service
                                takes in with nothing else on it (the devices share the cores here)
  big_per_cpu_vs_raw            big_ingest_per_agg_cpu_MBps / raw Mosquitto MiB/s
Results (JSON, per-round table, plot) go to bench/results/fleet-{quick,full}.*.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def _growth(rows, key: str) -> float | None:
    vals = [getattr(r, key) for r in rows]
    if len(vals) < 2:
        return None
    return round((vals[-1] - vals[0]) / (len(vals) - 1), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny N = 100, 1,000; big N = 50")
    ap.add_argument("--rounds", type=int, help="rounds per N (default 3, quick 2)")
    ap.add_argument("--tiny", help="comma-separated tiny fleet sizes (overrides the mode's)")
    ap.add_argument("--big", help="comma-separated big fleet sizes (overrides the mode's)")
    ap.add_argument("--auth", default="mtls", choices=["mtls", "password"])
    ap.add_argument("--progress", action="store_true", help="progress bars")
    args = ap.parse_args()

    from cotune.fleet.driver import FleetOptions, plot, run_fleet, table
    from cotune.fleet.raw import raw_throughput

    mode = "quick" if args.quick else "full"
    tiny = [int(x) for x in (args.tiny or ("100,1000" if args.quick else "100,1000,3000,10000")).split(",")]
    big = [int(x) for x in (args.big or ("50" if args.quick else "50,200,500")).split(",") if x]
    rounds = args.rounds or (2 if args.quick else 3)
    t_start = time.time()
    runs, raw = [], {}

    def say(text: str) -> None:
        print(text, flush=True)

    for n in tiny:
        run = run_fleet(FleetOptions(clients=n, rounds=rounds, size="tiny", auth=args.auth,
                                     progress=args.progress))
        runs.append(run)
        say(f"tiny N={n}: round s {[r.seconds for r in run.rounds]}, CPU/update ms "
            f"{[r.cpu_per_update_ms for r in run.rounds]}, ok={run.ok} {run.note}")

    for n in big:
        def baseline(ctx, n=n) -> None:
            r = ctx.run
            try:
                raw[n] = raw_throughput(ctx.paths.root, ctx.parties, r.update_bytes or 1, 256 * 1024)
            except RuntimeError as exc:  # the baseline's own harness; the fleet run stands
                print(f"raw baseline at N={n} failed: {exc}", flush=True)

        run = run_fleet(FleetOptions(clients=n, rounds=rounds, size="big", auth=args.auth,
                                     progress=args.progress), after=baseline)
        runs.append(run)
        say(f"big N={n}: round s {[r.seconds for r in run.rounds]}, ingest MiB/s "
            f"{[r.ingest_mbps for r in run.rounds]}, raw {raw.get(n)}, ok={run.ok} {run.note}")

    tiny_runs = {r.clients: r for r in runs if r.size == "tiny"}
    big_runs = {r.clients: r for r in runs if r.size == "big"}
    lo, hi = min(tiny_runs), max(tiny_runs)

    def median(n: int, key: str, table_=tiny_runs):
        run = table_.get(n)
        value = None if run is None else run.median(key)
        return None if value is None else round(value, 3)

    cpu_lo, cpu_hi = median(lo, "cpu_per_update_ms"), median(hi, "cpu_per_update_ms")
    hwm_lo = max((r.hwm_mb for r in tiny_runs[lo].rounds), default=None)
    hwm_hi = max((r.hwm_mb for r in tiny_runs[hi].rounds), default=None)
    # the largest big fleet with a raw baseline beside it (a baseline may fail at scale)
    measured = [n for n in big_runs if n in raw]
    big_n = max(measured) if measured else (max(big_runs) if big_runs else None)
    ingest = median(big_n, "ingest_mbps", big_runs) if big_n else None
    raw_mbps = raw[big_n]["MBps"] if big_n in raw else None
    per_cpu = None
    if big_n:
        rows = big_runs[big_n].rounds
        agg_cpu = sum(r.agg_cpu_s for r in rows)
        per_cpu = round(sum(r.update_mb for r in rows) / agg_cpu, 1) if agg_cpu else None
    result = {
        "round_s_1000": median(1000, "seconds"),
        "round_s_10000": median(10000, "seconds"),
        "cpu_per_update_growth": round(cpu_hi / cpu_lo, 3) if cpu_lo and cpu_hi else None,
        "big_ingest_MBps": ingest,
        "big_ingest_vs_raw": round(ingest / raw_mbps, 3) if ingest and raw_mbps else None,
        "big_ingest_per_agg_cpu_MBps": per_cpu,
        "big_per_cpu_vs_raw": round(per_cpu / raw_mbps, 3) if per_cpu and raw_mbps else None,
        "rss_growth_mb_per_1000": (round((hwm_hi - hwm_lo) / ((hi - lo) / 1000), 2)
                                   if hi > lo and hwm_lo and hwm_hi else None),
        "disk_per_round_mb": _growth(tiny_runs[hi].rounds, "disk_mb") if tiny_runs[hi].rounds else None,
        # context
        "mode": mode, "rounds": rounds, "auth": args.auth, "tiny_clients": tiny, "big_clients": big,
        "cpu_per_update_ms": {n: median(n, "cpu_per_update_ms") for n in tiny_runs},
        "round_s": {f"tiny_{n}": median(n, "seconds") for n in tiny_runs}
        | {f"big_{n}": median(n, "seconds", big_runs) for n in big_runs},
        "big_ingest_by_n": {n: median(n, "ingest_mbps", big_runs) for n in big_runs},
        "raw_MBps_by_n": {n: v["MBps"] for n, v in raw.items()},
        "update_bytes": {"tiny": tiny_runs[lo].update_bytes,
                         "big": big_runs[big_n].update_bytes if big_n else None},
        "all_accepted": all(r.ok for r in runs),
        "wall_s": round(time.time() - t_start, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"fleet-{mode}.json").write_text(json.dumps(
        {"result": result, "raw": raw, "runs": [r.to_json() for r in runs]}, indent=2))
    text = table(runs)
    (RESULTS / f"fleet-{mode}.txt").write_text(text + "\n")
    plot(runs, RESULTS / f"fleet-{mode}.png", title=f"cotune fleet ({mode}, {args.auth})")
    print(text)
    print("BENCH fleet " + json.dumps({k: result[k] for k in (
        "round_s_1000", "round_s_10000", "cpu_per_update_growth", "big_ingest_MBps",
        "big_ingest_vs_raw", "rss_growth_mb_per_1000", "disk_per_round_mb", "big_ingest_per_agg_cpu_MBps",
        "big_per_cpu_vs_raw")}))


if __name__ == "__main__":
    main()
