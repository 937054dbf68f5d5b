"""``cotune fleet simulate``: load-test a deployment with virtual devices over the real wire.

One run for N clients: provision a federation of N devices (a temporary directory), start
Mosquitto with the generated mTLS + ACL config, connect N virtual devices (worker processes,
:mod:`cotune.fleet.device`), start the real aggregator service as a separate process
(``python -m cotune aggregator serve``), run R rounds and measure, per round, as an operator
would from outside the service:

- round seconds: ``round_opened`` -> ``round_committed`` in the service's ``events.jsonl``;
- aggregator CPU seconds from one commit to the next (the service's process CPU clock, which
  its round events carry; ``/proc/<pid>/stat`` in 10 ms ticks for a service that does not)
  and CPU per accepted update; the broker's CPU beside it;
- accepted / rejected updates (event log), aggregator RSS (VmRSS, VmHWM), disk used by the
  state directory after the commit.

Several N give a table and a plot of round time and aggregator CPU against the fleet size.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from .device import THREAD_ENV, WorkerConfig, raise_nofile_limit
from .models import PRESETS, preset_model

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# /proc readings (no psutil)


def proc_cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def proc_mem_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB; zeros when the process is gone."""
    rss = hwm = 0.0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, hwm


def dir_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total / 2**20


def _event_time(at: str) -> float:
    """The event log's asctime ("2024-05-01 12:00:00,123", local time) as a unix time."""
    return datetime.strptime(at, "%Y-%m-%d %H:%M:%S,%f").timestamp()


# ---------------------------------------------------------------------------------------------
# options and results


@dataclass
class FleetOptions:
    clients: int
    rounds: int = 3
    size: str = "tiny"  # a preset of cotune.fleet.models, unless model is given
    model: str | None = None  # an operator's own checkpoint directory
    lora: dict | None = None  # LoRA settings for ``model`` (default: the preset's)
    workers: int | None = None  # device worker processes (default: one per 2,500 devices)
    auth: str = "mtls"  # "mtls" (a certificate per device) | "password" (shared TLS context)
    protocol: str = "5"
    seed: int = 0
    round_deadline_s: float = 600.0
    max_uploads: int = 32  # per worker: chunked uploads in flight
    work_dir: str | None = None  # default: a temporary directory under /tmp (removed unless keep)
    keep: bool = False
    progress: bool = True
    aggregator_cmd: list[str] | None = None  # default: python -m cotune aggregator serve
    keep_blobs: bool = False  # devices keep every blob they received under work_dir/blobs
    #: members provisioned beside the simulated devices but not run by them (a caller's own
    #: client, e.g. a hostile member in bench/abuse.py); they count as registered clients
    extra_parties: list[str] = field(default_factory=list)
    #: settings merged into the generated aggregator.json (e.g. ``wait_for_clients_s``)
    aggregator_overrides: dict | None = None
    answer_delay_s: float = 0.0  # devices answer a Task this long after they can
    final_delay_s: float = 0.0  # ... and report on the final model this long after they can
    #: secure rounds: party -> the step at which that device falls silent (see WorkerConfig)
    secagg_drop: dict = field(default_factory=dict)


@dataclass
class RoundRow:
    clients: int
    round: int
    seconds: float
    agg_cpu_s: float
    cpu_per_update_ms: float
    accepted: int
    rejected: int
    rss_mb: float
    hwm_mb: float
    disk_mb: float
    broker_cpu_s: float
    devices_cpu_s: float = 0.0
    update_mb: float = 0.0
    ingest_mbps: float | None = None  # update MiB / (first update sent -> last accepted)


@dataclass
class FleetRun:
    clients: int
    size: str
    rounds: list[RoundRow] = field(default_factory=list)
    connect_s: float = 0.0
    provision_s: float = 0.0
    update_bytes: int = 0
    device_stats: dict = field(default_factory=dict)
    wire_rejected: int = 0
    aggregator_exit: int | None = None
    workers: int = 0
    auth: str = "mtls"
    ok: bool = False
    note: str = ""

    def median(self, key: str, skip_first: bool = False) -> float | None:
        rows = self.rounds[1:] if skip_first and len(self.rounds) > 1 else self.rounds
        vals = [getattr(r, key) for r in rows if getattr(r, key) is not None]
        return statistics.median(vals) if vals else None

    def to_json(self) -> dict:
        return asdict(self)


class RunContext:
    """What a hook sees: ``during`` right after the aggregator process started (``aggregator``
    is its Popen, ``state_dir`` its state directory), ``after`` once the rounds are over (broker
    still running, aggregator stopped)."""

    def __init__(self, paths, broker, parties: list[str], run: FleetRun, work: Path,
                 aggregator=None, state_dir: Path | None = None):
        self.paths, self.broker, self.parties, self.run, self.work = paths, broker, parties, run, work
        self.aggregator, self.state_dir = aggregator, state_dir


# ---------------------------------------------------------------------------------------------
# one run


def _say(progress: bool, text: str) -> None:
    if progress:
        from tqdm import tqdm

        tqdm.write(text)


def run_fleet(opts: FleetOptions, after: Callable[[RunContext], None] | None = None,
              during: Callable[[RunContext], None] | None = None) -> FleetRun:
    """One run (see the module docstring). ``during(ctx)`` is called once the aggregator
    process has started, before the rounds are followed (it must return at once: start a
    thread for longer work); ``after(ctx)`` once the service has exited."""
    from bridge.broker import MosquittoBroker, free_port
    from bridge.provision import provision

    n = opts.clients
    if n < 1:
        raise ValueError("clients must be >= 1")
    for k, v in THREAD_ENV.items():  # inherited by the workers, the aggregator and the broker
        os.environ.setdefault(k, v)
    raise_nofile_limit()
    run = FleetRun(clients=n, size=opts.size if opts.model is None else "custom", auth=opts.auth)
    model = Path(opts.model) if opts.model else preset_model(opts.size)
    lora = opts.lora or PRESETS.get(opts.size, PRESETS["tiny"])["lora"]
    if opts.work_dir:
        work = Path(opts.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="cotune-fleet-", dir="/tmp" if os.path.isdir("/tmp") else None))
    os.chmod(work, 0o755)  # a root-started Mosquitto drops to its own user, which must traverse it
    parties = [f"d{i:05d}" for i in range(n)]
    broker = None
    procs: list = []
    agg = None
    try:
        t0 = time.monotonic()
        port = free_port()
        pport = free_port() if opts.auth == "password" else None
        workers = int((opts.aggregator_overrides or {}).get("ingest_workers", 0) or 0)
        paths = provision(work / "fed", "fleet", [*parties, *opts.extra_parties], port=port,
                          password_port=pport, force=True, aggregator_instances=workers)
        run.provision_s = round(time.monotonic() - t0, 2)
        _say(opts.progress, f"fleet: provisioned {n} devices in {run.provision_s:.1f}s")
        broker = MosquittoBroker(paths.mosquitto_conf).start()
        host = broker.host
        dev_port = pport if opts.auth == "password" else port
        workers = opts.workers or max(1, min(8, math.ceil(n / 2500)))
        run.workers = workers
        status_q: queue.Queue = queue.Queue()
        stats: dict[int, dict] = {}
        finals: dict[int, dict] = {}
        records = []
        t0 = time.monotonic()
        for i in range(workers):
            rec = work / f"sent-{i}.jsonl"
            records.append(rec)
            wc = WorkerConfig(str(paths.root), parties[i::workers], host, dev_port, auth=opts.auth,
                              protocol=opts.protocol, seed=opts.seed, max_uploads=opts.max_uploads,
                              record_path=str(rec), index=i,
                              blobs_dir=str(work / "blobs") if opts.keep_blobs else None,
                              answer_delay_s=opts.answer_delay_s, final_delay_s=opts.final_delay_s,
                              secagg_drop={p: s for p, s in opts.secagg_drop.items() if p in parties[i::workers]})
            wc_path = work / f"worker-{i}.json"
            wc_path.write_text(json.dumps(asdict(wc)))
            p = subprocess.Popen([sys.executable, "-m", "cotune.fleet.device", str(wc_path)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=open(work / f"worker-{i}.log", "wb"), start_new_session=True)
            threading.Thread(target=_read_status, args=(p.stdout, status_q), daemon=True).start()
            procs.append(p)

        def drain(timeout: float = 0.0) -> None:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    msg = status_q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return
                stats[msg["worker"]] = msg["stats"]
                if msg["type"] == "final":
                    finals[msg["worker"]] = msg["stats"]

        bar = _bar(opts.progress, n, "connecting")
        while True:
            drain(0.2)
            connected = sum(s["connected"] for s in stats.values())
            _bar_to(bar, connected)
            if connected >= n:
                break
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a device worker died while connecting; see {work}/worker-*.log")
            if time.monotonic() - t0 > 120 + n / 20:
                raise RuntimeError(f"only {connected}/{n} devices connected; see {broker.log_path}")
        run.connect_s = round(time.monotonic() - t0, 2)
        _bar_close(bar)
        _say(opts.progress, f"fleet: {n} devices connected in {run.connect_s:.1f}s "
                            f"({workers} worker process{'es' if workers > 1 else ''}, {opts.auth})")

        state_dir = work / "aggregator"
        cfg = {
            "party_config": str(paths.party_config("aggregator")), "state_dir": str(state_dir),
            "algorithm": "fedavg", "algorithm_config": {"lora": lora, "wire_dtype": "fp16"},
            "rounds": opts.rounds, "min_clients": n, "quorum": 1.0,
            "round_deadline_s": opts.round_deadline_s, "wait_for_clients_s": 120.0,
            "models": {"slm": str(model)}, "seed": opts.seed, "final_wait_s": 30.0,
            **(opts.aggregator_overrides or {}),
        }
        cfg_path = work / "aggregator.json"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        cmd = opts.aggregator_cmd or [sys.executable, "-m", "cotune", "aggregator", "serve"]
        agg_log = open(work / "aggregator.log", "wb")
        agg = subprocess.Popen([*cmd, "--config", str(cfg_path)], stdout=agg_log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
        if during is not None:
            during(RunContext(paths, broker, parties, run, work, aggregator=agg,
                             state_dir=state_dir))
        last_accepted = _monitor(run, opts, agg, broker.pid, state_dir, drain, stats)
        agg.wait(timeout=120)
        run.aggregator_exit = agg.returncode
        if agg.returncode != 0:
            agg_log.flush()
            tail = (work / "aggregator.log").read_text(errors="replace").splitlines()[-12:]
            run.note = (run.note + f" aggregator exited with {agg.returncode}: " + " | ".join(tail)).strip()
            _say(opts.progress, f"fleet: aggregator exited with {agg.returncode}:\n  " + "\n  ".join(tail))
        _stop_workers(procs)
        drain(1.0)
        _merge_device_stats(run, finals or stats)
        _ingest_rates(run, records, last_accepted)
        run.ok = (run.aggregator_exit == 0 and len(run.rounds) == opts.rounds
                  and all(r.accepted == n and r.rejected == 0 for r in run.rounds))
        if after is not None:
            after(RunContext(paths, broker, parties, run, work, aggregator=agg,
                            state_dir=state_dir))
        return run
    finally:
        if agg is not None and agg.poll() is None:
            agg.terminate()
            try:
                agg.wait(10)
            except subprocess.TimeoutExpired:
                agg.kill()
        _stop_workers(procs)
        if broker is not None:
            broker.stop()
        if not opts.keep and not opts.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _read_status(stream, q: queue.Queue) -> None:
    for line in stream:
        try:
            q.put(json.loads(line))
        except ValueError:
            pass


def _stop_workers(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.stdin.write(b"stop\n")
                p.stdin.close()
            except OSError:
                pass
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _monitor(run: FleetRun, opts: FleetOptions, agg, broker_pid: int | None, state_dir: Path,
             drain, stats: dict) -> dict[int, float]:
    """Follow the event log and /proc until the service exits. Returns, per round, the time of
    its last accepted update."""
    last_accepted: dict[int, float] = {}
    n = opts.clients
    events = state_dir / "events.jsonl"
    pos = 0
    buf = b""
    cur: dict | None = None
    last_commit_cpu = None
    last_commit_broker = None
    last_dev_cpu = 0.0
    bar = None
    started = time.monotonic()
    while True:
        drain(0.05)
        alive = agg.poll() is None
        cpu = proc_cpu_s(agg.pid)
        bcpu = proc_cpu_s(broker_pid) if broker_pid else None
        new = b""
        if events.exists():
            with open(events, "rb") as fh:
                fh.seek(pos)
                new = fh.read()
                pos += len(new)
        buf += new
        *lines, buf = buf.split(b"\n")
        for line in lines:
            try:
                doc = json.loads(line)
                rec, at = doc["record"], _event_time(doc["at"])
            except (ValueError, KeyError, TypeError):
                continue
            kind = rec.get("event")
            if kind == "round_opened":
                if last_commit_cpu is None:  # startup (model load, presence) is not a round
                    last_commit_cpu, last_commit_broker = rec.get("process_cpu_s", cpu), bcpu
                    last_dev_cpu = sum(s.get("cpu_s", 0.0) for s in stats.values())
                cur = {"round": rec["round"], "opened": at, "accepted": 0, "rejected": 0}
                bar = _bar(opts.progress, n, f"round {rec['round']}", old=bar)
            elif kind == "accepted" and cur is not None:
                cur["accepted"] += 1
                cur["last_accepted"] = at
                _bar_to(bar, cur["accepted"])
            elif kind == "rejected" and cur is not None:
                cur["rejected"] += 1
            elif kind == "round_committed" and cur is not None:
                rss, hwm = proc_mem_mb(agg.pid)
                dev_cpu = sum(s.get("cpu_s", 0.0) for s in stats.values())
                # the service's own CPU clock at the commit (exact); /proc ticks when absent
                cpu = rec.get("process_cpu_s", cpu)
                agg_cpu = (cpu or 0.0) - (last_commit_cpu or 0.0)
                row = RoundRow(
                    clients=n, round=cur["round"], seconds=round(at - cur["opened"], 3),
                    agg_cpu_s=round(agg_cpu, 3),
                    cpu_per_update_ms=round(1000 * agg_cpu / max(1, cur["accepted"]), 3),
                    accepted=cur["accepted"], rejected=cur["rejected"], rss_mb=round(rss, 1),
                    hwm_mb=round(hwm, 1), disk_mb=round(dir_mb(state_dir), 2),
                    broker_cpu_s=round((bcpu or 0.0) - (last_commit_broker or 0.0), 3),
                    devices_cpu_s=round(dev_cpu - last_dev_cpu, 3))
                if "last_accepted" in cur:
                    last_accepted[row.round] = cur["last_accepted"]
                run.rounds.append(row)
                last_commit_cpu, last_commit_broker, last_dev_cpu = cpu, bcpu, dev_cpu
                _bar_close(bar)
                bar = None
                _say(opts.progress, _row_line(row))
                cur = None
        if not alive:
            break
        if time.monotonic() - started > opts.rounds * opts.round_deadline_s + 300:
            agg.terminate()
            run.note = "aggregator did not finish in time; terminated"
            break
        time.sleep(0.05)
    _bar_close(bar)
    return last_accepted


def _merge_device_stats(run: FleetRun, stats: dict) -> None:
    total: dict = {}
    for s in stats.values():
        for k, v in s.items():
            if k in ("index", "sent_by_round"):
                continue
            if isinstance(v, dict):
                d = total.setdefault(k, {})
                for kk, vv in v.items():
                    d[kk] = d.get(kk, 0) + vv
            elif k == "max_rss_mb":
                total["max_rss_mb_per_worker"] = max(total.get("max_rss_mb_per_worker", 0.0), v)
            else:
                total[k] = round(total.get(k, 0) + v, 3)
    run.device_stats = total
    if total.get("updates_sent"):
        run.update_bytes = int(total["update_bytes"] / total["updates_sent"])


def _ingest_rates(run: FleetRun, records: list[Path], last_accepted: dict[int, float]) -> None:
    """Per round: update MiB / (first update sent by a device -> last update accepted)."""
    first: dict[int, float] = {}
    nbytes: dict[int, int] = {}
    for path in records:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            r = json.loads(line)
            if r.get("final"):
                continue
            first[r["round"]] = min(first.get(r["round"], r["t_send"]), r["t_send"])
            nbytes[r["round"]] = nbytes.get(r["round"], 0) + r["bytes"]
    for row in run.rounds:
        last = last_accepted.get(row.round)
        row.update_mb = round(nbytes.get(row.round, 0) / 2**20, 3)
        if last is not None and row.round in first and last > first[row.round]:
            row.ingest_mbps = round(row.update_mb / (last - first[row.round]), 3)


# ---------------------------------------------------------------------------------------------
# output


_COLS = [("clients", "{:>7}"), ("round", "{:>5}"), ("seconds", "{:>8.2f}"), ("agg_cpu_s", "{:>9.2f}"),
         ("cpu_per_update_ms", "{:>10.2f}"), ("accepted", "{:>8}"), ("rejected", "{:>8}"),
         ("rss_mb", "{:>7.0f}"), ("disk_mb", "{:>8.1f}"), ("broker_cpu_s", "{:>10.2f}")]
_HEAD = ["clients", "round", "round s", "agg CPU s", "CPU/upd ms", "accepted", "rejected",
         "RSS MB", "disk MB", "broker CPU"]


def _row_line(row: RoundRow) -> str:
    return "  ".join(fmt.format(getattr(row, k)) for k, fmt in _COLS)


def table(runs: list[FleetRun]) -> str:
    widths = [7, 5, 8, 9, 10, 8, 8, 7, 8, 10]
    lines = ["  ".join(h.rjust(w) for h, w in zip(_HEAD, widths, strict=True))]
    for run in runs:
        lines += [_row_line(r) for r in run.rounds]
    return "\n".join(lines)


def plot(runs: list[FleetRun], path: str | os.PathLike, title: str = "cotune fleet") -> Path | None:
    """Round time and aggregator CPU per round against the number of clients (median over
    rounds), one line per update size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for size in sorted({r.size for r in runs}):
        rs = sorted((r for r in runs if r.size == size and r.rounds), key=lambda r: r.clients)
        xs = [r.clients for r in rs]
        axes[0].plot(xs, [r.median("seconds") for r in rs], "o-", label=size)
        axes[1].plot(xs, [r.median("agg_cpu_s") for r in rs], "o-", label=size)
    for ax, ylabel in zip(axes, ("round time (s)", "aggregator CPU per round (s)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# -- progress bars (tqdm; nothing when progress is off) -----------------------------------------


def _bar(progress: bool, total: int, desc: str, old=None):
    _bar_close(old)
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="dev", leave=False, dynamic_ncols=True)


def _bar_to(bar, value: int) -> None:
    if bar is not None and value > bar.n:
        bar.update(value - bar.n)


def _bar_close(bar) -> None:
    if bar is not None:
        bar.close()
