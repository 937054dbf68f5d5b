"""``cotune fleet simulate``: the arguments and the report (table, JSON, plot)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    s = sub.add_parser(
        "fleet", help="load-test a deployment: virtual devices over the real wire",
        description="Provision N virtual devices, start Mosquitto (mTLS + ACL) and the aggregator "
                    "service as a separate process, run rounds and report round time, aggregator "
                    "CPU, memory and disk per round.")
    s.add_argument("action", choices=["simulate"])
    s.add_argument("--clients", required=True,
                   help="number of virtual devices; a comma-separated list runs each size in turn")
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--size", default="tiny", choices=["tiny", "big"],
                   help="update size preset: tiny ~4.4 KB (inline), big ~1.26 MB (chunked blob)")
    s.add_argument("--model", help="your own model directory instead of the preset (FedAvg-LoRA on it)")
    s.add_argument("--lora", help='LoRA settings for --model as JSON, e.g. \'{"r": 8}\'')
    s.add_argument("--workers", type=int, help="device worker processes (default: one per 2,500)")
    s.add_argument("--auth", default="mtls", choices=["mtls", "password"],
                   help="mtls: a client certificate and TLS context per device (default); password: "
                        "the password listener with one shared TLS context (lighter at 10k+)")
    s.add_argument("--protocol", default="5", choices=["5", "3.1.1"])
    s.add_argument("--deadline", type=float, default=600.0, help="round deadline (s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--secure", metavar="JSON", nargs="?", const="{}",
                   help='rounds under secure aggregation (SecAgg+); optional settings as JSON, e.g. '
                        '\'{"clip": 1.0, "dropout_rate": 0.2}\' (clip defaults to 1.0)')
    s.add_argument("--out", default="fleet-out", help="where fleet.json, fleet.png and the table go")
    s.add_argument("--keep", action="store_true", help="keep the federation and state directories")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from .driver import FleetOptions, plot, run_fleet, table

    sizes = [int(c) for c in str(args.clients).replace(" ", "").split(",") if c]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in sizes:
        overrides = None
        if args.secure is not None:
            overrides = {"secure_aggregation": {"clip": 1.0, **json.loads(args.secure)}}
        opts = FleetOptions(clients=n, rounds=args.rounds, size=args.size, model=args.model,
                            lora=json.loads(args.lora) if args.lora else None, workers=args.workers,
                            auth=args.auth, protocol=args.protocol, seed=args.seed,
                            round_deadline_s=args.deadline, keep=args.keep,
                            progress=not args.no_progress, aggregator_overrides=overrides)
        runs.append(run_fleet(opts))
        (out / "fleet.json").write_text(json.dumps([r.to_json() for r in runs], indent=2))
    text = table(runs)
    (out / "fleet-table.txt").write_text(text + "\n")
    print(text)
    if len(runs) > 1:
        png = plot(runs, out / "fleet.png")
        if png is not None:
            print(f"plot: {png}")
    print(f"results: {out / 'fleet.json'}")
    bad = [r for r in runs if not r.ok]
    for r in bad:
        print(f"warning: {r.clients} clients: not every update was accepted in every round "
              f"(aggregator exit {r.aggregator_exit}) {r.note}")
    return 1 if bad else 0
