"""`cotune demo --algorithm fedavg`: a real federation on one machine.

An embedded broker, the aggregator and each edge client as separate processes, provisioned
identities and the encrypted wire; tiny pretrained models from the project's zoo; each client
holds the private slice of its own text domain (non-IID: one fortune category per client) and
a held-out slice it never trains on. Prints a per-round table and writes ``report.json`` and
``report.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bridge.broker import EmbeddedBroker
from bridge.provision import provision

#: per-algorithm defaults of the demo; --quick trims steps and data
ALGORITHM_DEFAULTS = {
    "fedavg": {
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"lr": 3e-3, "epochs": 1, "batch_size": 8, "block_size": 64, "max_steps": 30, "warmup": 2},
        "wire_dtype": "fp16", "eval_block_size": 64,
    },
}
ALGORITHM_DEFAULTS["fedcollm"] = {
    **ALGORITHM_DEFAULTS["fedavg"],
    "llm_lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    # as tuned on dev in bench/quality.py: the LLM side learns faster than the SLM side
    "distill": {"epochs": 1, "batch_size": 8, "block_size": 64, "lr": 1e-3, "lr_llm": 3e-3, "lambda_kd": 1.0,
                "task_weight": 1.0, "max_steps": 40, "warmup": 5},
}
ALGORITHM_DEFAULTS["fedpt"] = {
    **ALGORITHM_DEFAULTS["fedavg"],
    "alpha": 1.0,  # on the aligned SLM base alpha 1.0 is best on dev (bench/quality.py)
    "distill": {"epochs": 1, "batch_size": 8, "block_size": 64, "lr": 1e-3, "lambda_kd": 1.0, "task_weight": 1.0,
                "max_steps": 40, "warmup": 5},
}
#: FedBiOT: the clients train the adapter (top 2 LLM layers) through the emulator the aggregator
#: cuts out of the LLM and sends them; their own model_path is not used for training
ALGORITHM_DEFAULTS["fedbiot"] = {
    **ALGORITHM_DEFAULTS["fedavg"],
    "drop_ratio": 0.5, "n_adapter_top": 2, "n_adapter_bottom": 0, "proximal_mu": 0.01,
    "align": {"mode": "layers", "max_steps": 20, "lr": 1e-4, "batch_size": 8, "block_size": 64, "lambda_kd": 1.0},
    "pre_align_steps": 40, "realign_every": 1, "baseline": "fedbiot",
}
#: FedMKT: clients of two model families (see DEMO_HETEROGENEOUS) and the LLM teach each other
#: through top-k logits on the public set; as chosen on dev in bench/quality.py: lambda 0.2 (the
#: paper's 0.9 learns less here), the receiver's own rows kept where no teacher is better, the
#: Llama family (the LLM's tokenizer) on a base aligned to the LLM, public pieces of about 64
#: tokens, a tenth of them held out to judge the LLM's steps. The clients' LoRA keeps each
#: architecture's defaults: with the LM head too, the demo's short rounds made the Llama
#: clients worse round after round (held-out ppl 218 -> 229 on computers; 209 without)
ALGORITHM_DEFAULTS["fedmkt"] = {
    **ALGORITHM_DEFAULTS["fedavg"],
    "k": 16, "lambda_task": 0.2, "keep_own": "self", "align_base": {}, "public_max_samples": 64,
    "llm_holdout": 0.1,
    "llm_lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "llm_train": {"lr": 2e-3, "epochs": 1, "batch_size": 8, "max_steps": 20},
    "kd_train": {"lr": 1e-3, "epochs": 1, "batch_size": 8, "max_steps": 20},
}
#: the demo's LLM: FedCoLLM co-tunes local weights; FedPT sees only a black box, served here by
#: `cotune llm serve` (vLLM would take its place) and reached over HTTP with top-k logprobs
DEMO_LLM_BACKEND = {"fedcollm": "local", "fedpt": "blackbox", "fedbiot": "local"}
BLACKBOX_TOP_K = 64
DEMO_LLM_BACKEND["fedmkt"] = "local"
#: algorithms whose clients may run different model families: alternating clients get the zoo's
#: Llama SLM (tokenizer t1, the LLM's) and its GPT-2 SLM (tokenizer t2)
DEMO_HETEROGENEOUS = {"fedmkt"}


def _algorithm_config(algorithm: str, quick: bool) -> dict:
    if algorithm not in ALGORITHM_DEFAULTS:
        raise SystemExit(f"the demo knows {sorted(ALGORITHM_DEFAULTS)}; got {algorithm!r}")
    cfg = json.loads(json.dumps(ALGORITHM_DEFAULTS[algorithm]))
    if quick:
        cfg["train"]["max_steps"] = 15
        if "distill" in cfg:
            cfg["distill"]["max_steps"] = 15
        if "distill" in cfg or cfg.get("align_base") is not None:
            cfg["align_base"] = {"max_steps": 60}  # the SLM base's alignment to the LLM
        for step in ("llm_train", "kd_train"):
            if step in cfg:
                cfg[step]["max_steps"] = 10
        if "align" in cfg:
            cfg["align"]["max_steps"] = 10
            cfg["pre_align_steps"] = 15
    return cfg


def run_demo(args) -> int:
    from algorithms.zoo import build_zoo
    from algorithms.zoo.datasets import domain_split, domains

    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    t_start = time.time()
    print("model zoo: building or loading from cache ...", flush=True)
    zoo = build_zoo(quick=getattr(args, "tiny_zoo", False), progress=True)
    slm = zoo["slm-llama"]
    families = [slm, zoo["slm-gpt2"]] if args.algorithm in DEMO_HETEROGENEOUS else [slm]
    names = [f"edge{i + 1}" for i in range(args.clients)]
    doms = domains()
    if args.clients > len(doms):
        raise SystemExit(f"the bundled data has {len(doms)} domains; use --clients <= {len(doms)}")
    paths = provision(out / "federation", "demo", names, check_access=False)
    broker = EmbeddedBroker().start()
    over = {"host": broker.host, "port": broker.port, "tls": False, "protocol": "3.1.1"}
    print(f"embedded broker on {broker.host}:{broker.port}; {args.clients} clients, {args.rounds} rounds, "
          f"algorithm {args.algorithm}; model {' / '.join(f.name for f in families)} from the zoo", flush=True)
    limit_private = 240 if args.quick else None
    limit_eval = 60 if args.quick else 150
    agg_cfg = {
        "party_config": str(paths.party_config("aggregator")), "state_dir": str(out / "aggregator"),
        "algorithm": args.algorithm, "algorithm_config": _algorithm_config(args.algorithm, args.quick),
        "rounds": args.rounds, "min_clients": args.clients, "round_deadline_s": 900, "wait_for_clients_s": 120,
        "models": {"slm": str(slm), "llm": str(zoo["llm"])}, "broker": over, "final_wait_s": 120,
    }
    if getattr(args, "status_port", None):
        agg_cfg["status_http"] = {"port": args.status_port}
        print(f"status page: http://127.0.0.1:{args.status_port}/  (Prometheus: /metrics)", flush=True)
    for fam in families[1:]:  # the aggregator needs every client family's tokenizer
        agg_cfg["models"][f"slm:{fam.name}"] = str(fam)
    procs = {}
    backend = DEMO_LLM_BACKEND.get(args.algorithm)
    if backend:
        # D_a: the public slice of every client's domain (the papers' in-distribution public set)
        per_domain = 40 if args.quick else 120
        agg_cfg["public_data"] = [t for d in doms[: args.clients] for t in domain_split(d, "public")[:per_domain]]
    if backend == "blackbox":
        from bridge.broker import free_port

        port = free_port()
        procs["llm"] = _spawn(["llm", "serve", "--model", str(zoo["llm"]), "--port", str(port)], out, "llm")
        _wait_http(f"http://127.0.0.1:{port}/health", procs["llm"])
        agg_cfg["llm"] = {"backend": "blackbox", "url": f"http://127.0.0.1:{port}", "tokenizer": str(zoo["llm"]),
                          "top_k": BLACKBOX_TOP_K}
        print(f"black-box LLM: `cotune llm serve` on port {port}; the aggregator sees top-{BLACKBOX_TOP_K} "
              "log-probabilities only", flush=True)
    elif backend == "local":
        agg_cfg["llm"] = {"backend": "local"}
    (out / "aggregator.json").write_text(json.dumps(agg_cfg, indent=2))
    procs["aggregator"] = _spawn(["aggregator", "serve", "--config", str(out / "aggregator.json")], out, "aggregator")
    domain_of = {}
    for i, name in enumerate(names):
        domain_of[name] = doms[i]
        cfg = {"party_config": str(paths.party_config(name)), "model_path": str(families[i % len(families)]),
               "profile": "generic-cpu",
               "data": {"zoo_domain": doms[i], "split": "private", "limit": limit_private},
               "eval": {"zoo_domain": doms[i], "split": "test", "limit": limit_eval},
               "work_dir": str(out / "clients" / name), "broker": over, "torch_threads": 1, "max_idle_s": 1800}
        (out / f"{name}.json").write_text(json.dumps(cfg, indent=2))
        procs[name] = _spawn(["edge", "run", "--config", str(out / f"{name}.json")], out, name)
    try:
        rc = _follow(procs, out / "aggregator" / "state.db", args.rounds)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
    if rc != 0:
        print(f"the aggregator failed (exit {rc}); see {out / 'logs'}", file=sys.stderr)
        return rc
    report = collect_report(out / "aggregator" / "state.db", domain_of)
    report["seconds_total"] = round(time.time() - t_start, 1)
    report["zoo"] = {"slm": str(slm), "key": zoo.key}
    print_table(report)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_report(report, out / "report.png")
    print(f"\nreport: {out / 'report.json'}  plot: {out / 'report.png'}  logs: {out / 'logs'}")
    return 0


def _spawn(argv: list[str], out: Path, name: str) -> subprocess.Popen:
    log = open(out / "logs" / f"{name}.log", "w")
    # glibc keeps freed activation memory resident unless large blocks are mmapped: the planner
    # and the measured peaks agree only with this (see firmware_profiles, generic-cpu notes)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
    return subprocess.Popen([sys.executable, "-m", "cotune", "-v", *argv], stdout=log, stderr=subprocess.STDOUT,
                            env=env)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the LLM server exited ({proc.returncode}); see its log")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the LLM server did not answer {url} within {timeout:.0f}s")


def _follow(procs: dict, db: Path, rounds: int) -> int:
    """Per-round progress lines while the processes run; returns the aggregator's exit code."""
    from aggregator.state import StateStore

    shown = 0
    agg = procs["aggregator"]
    reported: set[str] = set()
    clients = [n for n in procs if n not in ("aggregator", "llm")]
    while agg.poll() is None:
        time.sleep(1.0)
        dead = [n for n in clients if procs[n].poll() not in (None, 0)]
        for n in sorted(set(dead) - reported):
            print(f"client {n} failed (exit {procs[n].returncode}); see its log", file=sys.stderr)
            reported.add(n)
        if dead and len(dead) == len(clients):
            print("every client failed; stopping the aggregator", file=sys.stderr)
            agg.terminate()
            agg.wait(30)
            return 1
        if not db.exists():
            continue
        try:
            with StateStore(db) as store:
                cur = store.current_round()
                while cur is not None and shown < cur.round and store.load_round(shown + 1, with_partial=False).info.status == "committed":
                    shown += 1
                    rs = store.load_round(shown, with_partial=False)
                    ppl = [p.metrics.get("ppl_after") for p in rs.participants.values() if p.metrics.get("ppl_after")]
                    print(f"round {shown}/{rounds} committed: {len(rs.accepted)} updates, "
                          f"mean local held-out ppl after training {sum(ppl) / max(1, len(ppl)):.2f}, "
                          f"{rs.info.metrics.get('seconds', 0):.1f}s", flush=True)
        except Exception:  # the database may be mid-creation; try again next second
            continue
    return agg.returncode


def collect_report(db: Path, domain_of: dict) -> dict:
    from aggregator.state import StateStore

    with StateStore(db) as store:
        status = store.status()
        rounds = []
        n = status["last_committed"]["round"]
        for r in range(1, n + 1):
            rs = store.load_round(r, with_partial=False)
            clients = {}
            for c, p in sorted(rs.participants.items()):
                m = p.metrics
                clients[c] = {"status": p.status, "domain": domain_of.get(c), "num_examples": p.num_examples,
                              "ppl_before": m.get("ppl_before"), "ppl_after": m.get("ppl_after"),
                              "bytes_up": m.get("bytes_up"), "bytes_down": m.get("bytes_down"),
                              "peak_memory_mb": round(m.get("peak_memory_bytes", 0) / 2**20, 1),
                              "train_loss": (m.get("train") or {}).get("loss_mean"),
                              "tokens_per_s": (m.get("train") or {}).get("tokens_per_s"),
                              "seconds": m.get("seconds"), "quant": m.get("quant")}
            rounds.append({"round": r, "seconds": rs.info.metrics.get("seconds"), "clients": clients,
                           "global_delta_norm": rs.info.metrics.get("global_delta_norm")})
        final = {e.client: json.loads(e.detail) for e in store.events(kind="final_metrics")}
    return {"federation": status["federation"], "rounds": rounds, "final": final,
            "rejections": status.get("rejections", {})}


def print_table(report: dict) -> None:
    print(f"\n{'round':>5} {'client':<8} {'domain':<14} {'ppl before':>10} {'ppl after':>10} {'up KB':>8} "
          f"{'down KB':>8} {'RSS MB':>8} {'time s':>7}")
    for r in report["rounds"]:
        for c, m in r["clients"].items():
            if m["status"] != "accepted":
                print(f"{r['round']:>5} {c:<8} {m['domain'] or '':<14} {m['status']}")
                continue
            print(f"{r['round']:>5} {c:<8} {m['domain'] or '':<14} {m['ppl_before']:>10.2f} {m['ppl_after']:>10.2f} "
                  f"{(m['bytes_up'] or 0) / 1024:>8.1f} {(m['bytes_down'] or 0) / 1024:>8.1f} "
                  f"{m['peak_memory_mb']:>8.1f} {m['seconds'] or 0:>7.1f}")
        print(f"{'':>5} round time {r['seconds']:.1f}s")
    if report["final"]:
        print("\nheld-out perplexity of the final global model on each client's own domain:")
        first = report["rounds"][0]["clients"]
        for c, m in sorted(report["final"].items()):
            start = first.get(c, {}).get("ppl_before")
            print(f"  {c:<8} {first.get(c, {}).get('domain') or '':<14} {start:.2f} -> {m.get('ppl_final'):.2f}")


def plot_report(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    clients = sorted(report["rounds"][0]["clients"])
    for c in clients:
        xs, ys = [], []
        for r in report["rounds"]:
            m = r["clients"].get(c, {})
            if m.get("ppl_before") is not None:
                xs.append(r["round"] - 1)
                ys.append(m["ppl_before"])
        if c in report["final"]:
            xs.append(len(report["rounds"]))
            ys.append(report["final"][c]["ppl_final"])
        dom = report["rounds"][0]["clients"][c].get("domain")
        ax.plot(xs, ys, marker="o", label=f"{c} ({dom})")
    ax.set_xticks(range(len(report["rounds"]) + 1))
    ax.set_xlabel("rounds completed")
    ax.set_ylabel("held-out perplexity of the global model")
    ax.set_title(f"cotune {report['federation']['algorithm']}: each client's private domain")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
