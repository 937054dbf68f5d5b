"""Abuse: one hostile member floods the wire during a FedAvg round.

Real provisioning, Mosquitto with mTLS and the ACL, the real aggregator service in its own
process and four virtual devices (``cotune.fleet``), as in ``bench/fleet.py``. A fifth member is
provisioned with a valid device certificate and envelope keys but is never selected: it shows
no presence, so the service selects the four online devices (``wait_for_clients_s`` is short).
It runs in its own process with plain paho and ``bridge.envelope.Sealer`` and, once the round
opens, publishes on its own up topic (the only one the ACL lets it write) one stream, sealed
beforehand and sent as fast as paho goes (QoS 1):

- 10,000 junk frames of 32 bytes;
- spread evenly through them, 32 small validly signed chunk frames, each declaring a 16 MiB
  blob (distinct hashes), and 96 validly signed frames of ~1 MiB encrypted under a content key
  (``kid``) that the aggregator never granted;

and tries to take over client ids: every connection of the attack asks for the MQTT client id
of the aggregator or of a selected device (``<federation>-<party>``, the ids ``Endpoint``
uses), alternately: the two flood connections, then short extra connections.

Each invocation runs the same setup twice (fresh federation, broker and service each time):
a baseline with the fifth member silent, then the attack. Devices answer the Task
``--answer-delay`` seconds after they could (both runs), so that their updates travel while
the flood is on the wire.

Figures (last line ``BENCH abuse {...}``):
  genuine_latency_ratio    median accept latency of the genuine updates under attack / baseline
                           (latency = device send time -> the ledger's ``received_at``, the
                           instant the service accepted and folded the update)
  aggregator_rss_growth_mb aggregator VmHWM at exit - VmRSS when the round opened (attack run)
  victim_disconnects       connections of the aggregator or of a genuine device closed during
                           the attack run: Mosquitto's "already connected, closing old
                           connection" for their ids + the aggregator's own "disconnected"
                           warnings + disconnects the devices did not ask for
  round_completed          the attacked round committed with every selected update accepted
Results: bench/results/abuse-{quick,full}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
ATTACKER = "mallory"
CLIENTS = 4
TARGETS = {"genuine_latency_ratio": 3.0, "aggregator_rss_growth_mb": 50.0, "victim_disconnects": 0}


# ---------------------------------------------------------------------------------------------
# the hostile member (its own process: python bench/abuse.py --attacker CONFIG.json)


def attacker_main(cfg_path: str) -> int:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from bridge.endpoint import CHUNK
    from bridge.envelope import Sealer
    from bridge.provision import FederationPaths, load_party_config

    cfg = json.loads(Path(cfg_path).read_text())
    pc = load_party_config(FederationPaths.open(cfg["federation_dir"]).party_config(cfg["party"]))
    sealer = Sealer(pc.identity, pc.directory, max_message_bytes=pc.max_packet_bytes)
    agg = pc.directory.aggregator()
    up = pc.topics.up(cfg["party"])
    fed = pc.federation
    rnd = cfg["round"]

    # everything is sealed before the round opens: the flood then runs as fast as paho does
    t0 = time.monotonic()
    chunk = 256 * 1024
    oversize = [
        sealer.seal(
            agg,
            CHUNK,
            os.urandom(1024),
            round=rnd,
            blob=os.urandom(32).hex(),
            chunk=0,
            total=cfg["oversize_bytes"] // chunk,
            bsize=cfg["oversize_bytes"],
            csize=chunk,
        )
        for _ in range(cfg["oversize"])
    ]
    kid = sealer.add_content_key(os.urandom(32))  # never granted to anyone
    body = os.urandom(pc.max_packet_bytes - 4096)
    blob = os.urandom(32).hex()
    ungranted = [
        sealer.seal(
            agg,
            CHUNK,
            body,
            round=rnd,
            kid=kid,
            blob=blob,
            chunk=i,
            total=cfg["kid_frames"],
            bsize=len(body) * cfg["kid_frames"],
            csize=len(body),
        )
        for i in range(cfg["kid_frames"])
    ]
    junk = [os.urandom(cfg["junk_bytes"]) for _ in range(cfg["junk"])]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pc.ca_cert))
    ctx.load_cert_chain(str(pc.client_cert), str(pc.client_key))
    _emit(
        {"ready": True, "seal_s": round(time.monotonic() - t0, 3), "frame_bytes": len(ungranted[0])}
    )

    if not sys.stdin.readline():  # "go", or EOF: the bench gave up
        return 0
    start = time.time()
    ids = [f"{fed}-{agg}", f"{fed}-{cfg['victim']}"]
    connections: list[dict] = []
    phases: dict[str, dict] = {}

    def connect(client_id: str) -> tuple[mqtt.Client, dict]:
        info = {
            "asked_id": client_id,
            "at": round(time.time() - start, 3),
            "connack": None,
            "assigned_id": None,
            "kicked": False,
        }
        done = threading.Event()

        def on_connect(client, userdata, flags, reason_code, properties) -> None:
            info["connack"] = str(reason_code)
            info["assigned_id"] = getattr(properties, "AssignedClientIdentifier", None)
            done.set()

        def on_disconnect(client, userdata, flags, reason_code, properties) -> None:
            if not info.get("closing"):
                info["kicked"] = True
                info["kick_reason"] = str(reason_code)
            done.set()

        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        c.tls_set_context(ctx)
        c.max_inflight_messages_set(64)
        c.max_queued_messages_set(0)
        c.on_connect, c.on_disconnect = on_connect, on_disconnect
        c.connect(pc.host, pc.port, keepalive=30)
        c.loop_start()
        done.wait(15)
        connections.append(info)
        return c, info

    def close(c: mqtt.Client, info: dict) -> None:
        info["closing"] = True
        c.disconnect()
        c.loop_stop()

    def flood(c: mqtt.Client, name: str, frames: list[bytes]) -> None:
        t = time.time()
        sent = [c.publish(up, f, qos=1) for f in frames]
        deadline = time.monotonic() + 120
        for s in sent:
            while (
                not s.is_published()
                and time.monotonic() < deadline
                and s.rc == mqtt.MQTT_ERR_SUCCESS
            ):
                time.sleep(0.001)
        phases[name] = {
            "frames": len(frames),
            "bytes": sum(map(len, frames)),
            "acked": sum(s.is_published() for s in sent),
            "start": round(t - start, 3),
            "end": round(time.time() - start, 3),
        }

    # one mixed stream: the signed frames spread evenly through the junk, so that whatever
    # instant a genuine update is sent at, the same mix is on the wire
    stream = _interleave(junk, oversize, ungranted)
    half = len(stream) // 2
    c, info = connect(ids[0])  # takeover attempt 1: the aggregator's client id
    flood(c, "flood_1", stream[:half])
    close(c, info)
    c, info = connect(ids[1])  # takeover attempt 2: a selected device's client id
    flood(c, "flood_2", stream[half:])
    close(c, info)
    for i in range(cfg["extra_takeovers"]):
        c, info = connect(ids[i % 2])
        time.sleep(cfg["hold_s"])
        close(c, info)
    _emit(
        {
            "result": {
                "start": start,
                "end": time.time(),
                "phases": phases,
                "connections": connections,
            }
        }
    )
    return 0


def _interleave(base: list[bytes], *others: list[bytes]) -> list[bytes]:
    """``base`` with each list of ``others`` spread evenly through it."""
    keyed = [(i / len(base), 0, f) for i, f in enumerate(base)]
    for k, frames in enumerate(others, 1):
        keyed += [((i + 0.5) / len(frames), k, f) for i, f in enumerate(frames)]
    return [f for _, _, f in sorted(keyed, key=lambda x: x[:2])]


def _emit(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# one run (baseline or attack)


def _proc_status(pid: int) -> dict[str, float]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


class Watcher:
    """Follows the service from outside: waits for ``round_opened`` in events.jsonl, then
    records the aggregator's RSS, starts the attacker, and samples VmHWM and CPU until the
    service exits."""

    def __init__(self, ctx, attacker: subprocess.Popen | None):
        from cotune.fleet.driver import proc_cpu_s

        self._cpu = proc_cpu_s
        self.ctx, self.attacker = ctx, attacker
        self.pid = ctx.aggregator.pid
        self.opened_at = None
        self.rss_before = self.hwm_before = None
        self.hwm = 0.0
        self.cpu_before = self.cpu_last = None
        self.go_at = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        events = self.ctx.state_dir / "events.jsonl"
        agg = self.ctx.aggregator
        pos, buf = 0, b""
        while agg.poll() is None and self.opened_at is None:
            if events.exists():
                with open(events, "rb") as fh:
                    fh.seek(pos)
                    new = fh.read()
                pos += len(new)
                *lines, buf = (buf + new).split(b"\n")
                for line in lines:
                    try:
                        rec = json.loads(line)["record"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    if rec.get("event") == "round_opened":
                        self.opened_at = time.time()
                        break
            if self.opened_at is None:
                time.sleep(0.005)
        if self.opened_at is None:
            return
        st = _proc_status(self.pid)
        self.rss_before, self.hwm_before = st.get("VmRSS"), st.get("VmHWM")
        self.cpu_before = self._cpu(self.pid)
        if self.attacker is not None:
            self.go_at = time.time()
            self.attacker.stdin.write(b"go\n")
            self.attacker.stdin.flush()
        while agg.poll() is None:
            st = _proc_status(self.pid)
            cpu = self._cpu(self.pid)
            if st.get("VmHWM"):
                self.hwm = max(self.hwm, st["VmHWM"])
            if cpu is not None:
                self.cpu_last = cpu
            time.sleep(0.02)


def _ledger(state_dir: Path) -> dict:
    db = sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        head = db.execute(
            "SELECT status, selected, metrics, opened_at, closed_at FROM rounds WHERE round = 1"
        ).fetchone()
        parts = db.execute(
            "SELECT client, status, reason, received_at FROM participants WHERE round = 1"
        ).fetchall()
        # one row per (round, sender, reason) and flush, its detail a JSON summary: frames, span
        rows = db.execute(
            "SELECT reason, client, detail, at FROM events WHERE kind = 'wire_rejected'"
        ).fetchall()
        rejected = db.execute(
            "SELECT client, reason, COUNT(*) FROM participants WHERE status = 'rejected'"
            " GROUP BY client, reason"
        ).fetchall()
    finally:
        db.close()
    not_itemised = 0
    by_reason: dict[str, int] = {}
    senders: dict[str, int] = {}
    first = last = None
    for reason, client, detail, at in rows:
        try:
            summary = json.loads(detail)
            n, lo, hi = int(summary["frames"]), at, at + float(summary.get("last_s", 0.0))
        except (TypeError, ValueError, KeyError):
            n, lo, hi = 1, at, at
        by_reason[reason] = by_reason.get(reason, 0) + n
        senders[client or "?"] = senders.get(client or "?", 0) + n
        first = lo if first is None else min(first, lo)
        last = hi if last is None else max(last, hi)
    metrics = json.loads(head[2]) if head else {}
    selected = json.loads(head[1]) if head else []
    accepted = {c: at for c, s, _, at in parts if s == "accepted"}
    return {
        "round_status": head[0] if head else None,
        "selected": selected,
        "round_metrics": metrics,
        "accepted_at": accepted,
        "participants": {c: {"status": s, "reason": r} for c, s, r, _ in parts},
        "round_completed": bool(
            head
            and head[0] == "committed"
            and selected
            and len(accepted) == len(selected)
            and "skipped" not in metrics
        ),
        "wire_rejected_itemised": by_reason,
        "wire_rejected_not_itemised": not_itemised,
        "wire_rejected_total": sum(by_reason.values()) + not_itemised,
        "wire_rejected_by_sender": senders,
        "wire_rejected_first_at": first,
        "wire_rejected_last_at": last,
        "update_rejections": [list(r) for r in rejected],
    }


_TAKEOVER = re.compile(r"Client (\S+) already connected, closing old connection")
_CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(")


def _broker_log(path: Path) -> dict:
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = text.splitlines()
    return {
        "takeovers": [m.group(1) for line in lines if (m := _TAKEOVER.search(line))],
        "connected_as": dict(
            Counter(m.group(1) for line in lines if (m := _CONNECTED.search(line)))
        ),
        "dropping": sum("dropped" in line.lower() for line in lines),
        "interesting": [
            line
            for line in lines
            if any(
                k in line for k in ("already connected", "dropped", "exceeded", "rror", "Denied")
            )
        ][:20],
    }


def one_run(attack: bool, args) -> dict:
    from cotune.fleet.driver import FleetOptions, run_fleet

    out: dict = {"attack": attack}
    state: dict = {}

    def during(ctx) -> None:
        attacker = None
        if attack:
            cfg = {
                "federation_dir": str(ctx.paths.root),
                "party": ATTACKER,
                "victim": ctx.parties[0],
                "round": 1,
                "junk": args.junk,
                "junk_bytes": 32,
                "oversize": args.oversize,
                "oversize_bytes": 16 * 2**20,
                "kid_frames": args.kid_frames,
                "extra_takeovers": args.takeovers - 2,
                "hold_s": 0.25,
            }
            path = ctx.work / "attacker.json"
            path.write_text(json.dumps(cfg))
            nice = ["nice", "-n", str(args.attacker_nice)] if args.attacker_nice else []
            attacker = subprocess.Popen(
                [*nice, sys.executable, str(Path(__file__).resolve()), "--attacker", str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=open(ctx.work / "attacker.log", "wb"),
                start_new_session=True,
            )
            state["attacker"] = attacker
        state["watcher"] = Watcher(ctx, attacker)

    def after(ctx) -> None:
        w: Watcher = state["watcher"]
        w.thread.join(10)
        lat = {}
        sends = {}
        for rec in sorted(ctx.work.glob("sent-*.jsonl")):
            for line in rec.read_text().splitlines():
                r = json.loads(line)
                if not r.get("final") and r["round"] == 1:
                    sends[r["party"]] = r["t_send"]
        led = _ledger(ctx.state_dir)
        for party, t in sends.items():
            at = led["accepted_at"].get(party)
            if at is not None:
                lat[party] = round(1000 * (at - t), 2)
        agg_log = (ctx.work / "aggregator.log").read_text(errors="replace")
        out.update(
            latency_ms=lat,
            latency_median_ms=round(statistics.median(lat.values()), 2) if lat else None,
            latency_max_ms=max(lat.values()) if lat else None,
            sends_after_open_s={p: round(t - w.opened_at, 3) for p, t in sends.items()}
            if w.opened_at
            else {},
            rss_before_mb=w.rss_before,
            hwm_before_mb=w.hwm_before,
            hwm_mb=w.hwm,
            rss_growth_mb=round(w.hwm - w.rss_before, 1) if w.rss_before else None,
            agg_cpu_s=round(w.cpu_last - w.cpu_before, 2)
            if w.cpu_before is not None and w.cpu_last
            else None,
            ledger=led,
            aggregator_disconnect_warnings=[
                ln for ln in agg_log.splitlines() if "disconnected (" in ln
            ][:10],
            aggregator_errors=[
                ln for ln in agg_log.splitlines() if "Traceback" in ln or " ERROR " in ln
            ][:10],
            device_drops=ctx.run.device_stats.get("drops", 0),
        )
        if args.keep:
            out["work"] = str(ctx.work)
        attacker = state.get("attacker")
        if attacker is not None:
            try:
                text, _ = attacker.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                attacker.kill()
                text, _ = attacker.communicate()
            docs = [json.loads(x) for x in text.decode().splitlines() if x.strip().startswith("{")]
            res = next((d["result"] for d in docs if "result" in d), None)
            ready = next((d for d in docs if d.get("ready")), {})
            out["attacker"] = {
                "seal_s": ready.get("seal_s"),
                "frame_bytes": ready.get("frame_bytes"),
                "exit": attacker.returncode,
                **(res or {"note": "no result"}),
            }
            if res:
                out["attack_frames"] = sum(ph["frames"] for ph in res["phases"].values())
                out["absorbed"] = f"{led['wire_rejected_total']}/{out['attack_frames']}"
            if res and w.go_at:
                out["attacker"]["go_to_start_ms"] = round(1000 * (res["start"] - w.go_at), 1)
                out["sends_in_attack_window"] = sum(
                    res["start"] <= t <= res["end"] for t in sends.values()
                )
                out["attack_window_s"] = round(res["end"] - res["start"], 3)
                out["sends_after_attack_start_s"] = {
                    p: round(t - res["start"], 3) for p, t in sends.items()
                }
        genuine = [
            *ctx.parties,
            "aggregator",
        ]  # run_fleet provisions the aggregator as "aggregator"
        state["guarded"] = {f"{ctx.paths.federation}-{p}" for p in genuine} | set(genuine)
        state["broker_log"] = ctx.broker.log_path

    opts = FleetOptions(
        clients=CLIENTS,
        rounds=1,
        size="tiny",
        progress=False,
        extra_parties=[ATTACKER],
        round_deadline_s=args.deadline,
        answer_delay_s=args.answer_delay,
        final_delay_s=args.final_delay,
        aggregator_overrides={"wait_for_clients_s": 2.0, "final_wait_s": args.final_delay + 10.0},
    )
    t0 = time.monotonic()
    work = Path(
        tempfile.mkdtemp(prefix="cotune-abuse-", dir="/tmp" if os.path.isdir("/tmp") else None)
    )
    opts.work_dir = str(work)
    try:
        run = run_fleet(opts, after=after, during=during)
        # Mosquitto's log is block-buffered while it runs: read it once the broker has stopped
        out["broker"] = _broker_log(state["broker_log"])
    finally:
        attacker = state.get("attacker")
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    kicks = [c for c in out["broker"]["takeovers"] if c in state["guarded"]]
    out["victim_disconnects"] = (
        len(kicks) + len(out["aggregator_disconnect_warnings"]) + int(out["device_drops"])
    )
    out["victim_disconnects_detail"] = {
        "broker_takeovers_of_genuine_ids": kicks,
        "aggregator_disconnects": len(out["aggregator_disconnect_warnings"]),
        "device_drops": out["device_drops"],
    }
    out["wall_s"] = round(time.monotonic() - t0, 1)
    out["round_s"] = run.rounds[0].seconds if run.rounds else None
    out["fleet_ok"], out["note"] = run.ok, run.note
    return out


# ---------------------------------------------------------------------------------------------
# report


def _fmt(v, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def table(runs: list[dict]) -> str:
    head = [
        "run",
        "accepted",
        "lat med ms",
        "lat max ms",
        "round s",
        "RSS MB",
        "HWM MB",
        "growth MB",
        "agg CPU s",
        "victim disc",
        "wire rejected",
    ]
    rows = [head]
    for r in runs:
        led = r["ledger"]
        rows.append(
            [
                "attack" if r["attack"] else "baseline",
                f"{len(led['accepted_at'])}/{len(led['selected'])}",
                _fmt(r["latency_median_ms"], ".1f"),
                _fmt(r["latency_max_ms"], ".1f"),
                _fmt(r["round_s"], ".2f"),
                _fmt(r["rss_before_mb"], ".0f"),
                _fmt(r["hwm_mb"], ".0f"),
                _fmt(r["rss_growth_mb"], ".1f"),
                _fmt(r["agg_cpu_s"], ".2f"),
                str(r["victim_disconnects"]),
                str(led["wire_rejected_total"]),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--attacker":
        raise SystemExit(attacker_main(sys.argv[2]))
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="one baseline and one attack run (about a minute)"
    )
    ap.add_argument("--repeats", type=int, help="baseline/attack pairs (default: quick 1, full 3)")
    ap.add_argument("--junk", type=int, default=10_000, help="junk frames of 32 bytes")
    ap.add_argument("--oversize", type=int, default=32, help="chunk frames declaring a 16 MiB blob")
    ap.add_argument(
        "--kid-frames", type=int, default=96, help="~1 MiB frames under a never-granted key"
    )
    ap.add_argument(
        "--takeovers", type=int, default=6, help="connections asking for a genuine client id (>= 2)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directories (printed)")
    ap.add_argument(
        "--answer-delay",
        type=float,
        default=0.4,
        help="devices answer the Task this long after they could (both runs)",
    )
    ap.add_argument(
        "--final-delay",
        type=float,
        default=4.0,
        help="devices report on the final model this long after they could: keeps the "
        "service up while the rest of the flood arrives (both runs)",
    )
    ap.add_argument("--deadline", type=float, default=60.0, help="round deadline (s)")
    ap.add_argument(
        "--attacker-nice",
        type=int,
        default=0,
        help="run the attacker process at this niceness (diagnostic: on a shared machine its "
        "CPU competes with the broker, the devices and the aggregator)",
    )
    args = ap.parse_args()
    args.takeovers = max(2, args.takeovers)
    mode = "quick" if args.quick else "full"
    repeats = args.repeats or (1 if args.quick else 3)
    t_start = time.time()
    runs = []
    for i in range(repeats):
        for attack in (False, True):
            r = one_run(attack, args)
            runs.append(r)
            print(
                f"{'attack' if attack else 'baseline'} #{i + 1}: latency ms {r['latency_ms']}, "
                f"round_completed={r['ledger']['round_completed']}, "
                f"rss growth {r['rss_growth_mb']} MB, "
                f"wire rejected {r['ledger']['wire_rejected_itemised']} "
                f"(+{r['ledger']['wire_rejected_not_itemised']} not itemised), "
                f"victim disconnects {r['victim_disconnects_detail']}",
                flush=True,
            )
    base = [r for r in runs if not r["attack"]]
    hit = [r for r in runs if r["attack"]]

    def med(rs, key):
        vals = [r[key] for r in rs if r[key] is not None]
        return statistics.median(vals) if vals else None

    b_med, a_med = med(base, "latency_median_ms"), med(hit, "latency_median_ms")
    b_max, a_max = med(base, "latency_max_ms"), med(hit, "latency_max_ms")
    growth = max((r["rss_growth_mb"] for r in hit if r["rss_growth_mb"] is not None), default=None)
    result = {
        "genuine_latency_ratio": round(a_med / b_med, 2) if a_med and b_med else None,
        "aggregator_rss_growth_mb": growth,
        "victim_disconnects": sum(r["victim_disconnects"] for r in hit),
        "round_completed": all(r["ledger"]["round_completed"] for r in hit),
        # context
        "latency_ratio_of_max": round(a_max / b_max, 2) if a_max and b_max else None,
        "latency_ms": {
            "baseline_median": b_med,
            "baseline_max": b_max,
            "attack_median": a_med,
            "attack_max": a_max,
        },
        "baseline_rss_growth_mb": max(
            (r["rss_growth_mb"] for r in base if r["rss_growth_mb"] is not None), default=None
        ),
        "baseline_round_completed": all(r["ledger"]["round_completed"] for r in base),
        "wire_rejected": [
            {
                **r["ledger"]["wire_rejected_itemised"],
                "not_itemised": r["ledger"]["wire_rejected_not_itemised"],
            }
            for r in hit
        ],
        "sends_in_attack_window": [r.get("sends_in_attack_window") for r in hit],
        "mode": mode,
        "repeats": repeats,
        "clients": CLIENTS,
        "answer_delay_s": args.answer_delay,
        "attack": {
            "junk": args.junk,
            "oversize": args.oversize,
            "kid_frames": args.kid_frames,
            "takeovers": args.takeovers,
        },
        "targets": TARGETS,
        "wall_s": round(time.time() - t_start, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"abuse-{mode}.json").write_text(
        json.dumps({"result": result, "runs": runs}, indent=2)
    )
    print(table(runs))
    print(
        "BENCH abuse "
        + json.dumps(
            {
                k: result[k]
                for k in (
                    "genuine_latency_ratio",
                    "aggregator_rss_growth_mb",
                    "victim_disconnects",
                    "round_completed",
                )
            }
        )
    )


if __name__ == "__main__":
    main()
