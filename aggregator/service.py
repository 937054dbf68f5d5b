"""The aggregator service: orchestrates rounds over the wire, validates and folds updates into
a streaming aggregate, runs the algorithm's server step and commits everything to the state
store, so that a ``kill -9`` at any instant and a restart resume the same round without losing
an accepted update.

One round: select clients -> broadcast the round's blobs (encrypted once, key granted per
client) -> ``Task`` to each selected client -> accept ``Update``s until every selected client
answered or the deadline passed -> quorum? aggregate + server step : keep the global -> commit.
On restart an open round is re-planned (deterministically: the same blobs, the same hashes)
and the Task is sent again to the selected clients whose update is not yet accepted; clients
answer a repeated Task from their cache, so the result is identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from pathlib import Path

import numpy as np

from algorithms import registry
from algorithms.base import State, unpack_state
from bridge.codec import Message
from bridge.endpoint import Endpoint, EndpointConfig, Inbound, broker_config_for
from bridge.errors import BridgeError
from bridge.messages import ErrorReport, Note, Task, Update
from bridge.provision import load_party_config

from .aggregation import Aggregator
from .config import AggregatorConfig
from .context import ServerContext
from .errors import AggregatorError, InvalidUpdate
from .intake import aggregation_rule, check_update, open_aggregator
from .state import StateStore, update_digest
from .validation import UpdateSpec

log = logging.getLogger("cotune.aggregator")


def _event(kind: str, **fields) -> None:
    """Structured log line: one JSON object per event."""
    log.info(json.dumps({"event": kind, **fields}, default=str, sort_keys=True))


class AggregatorService:
    def __init__(self, config: AggregatorConfig, *, progress=print):
        self.cfg = config
        self.progress = progress or (lambda *_: None)
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store: StateStore | None = None  # opened in run(): SQLite connections belong to one thread
        _attach_event_log(self.state_dir / "events.jsonl")
        pc = load_party_config(config.party_config)
        self.party = pc
        broker = broker_config_for(pc, **config.broker)
        chunking = {"chunk_size": config.chunk_size} if config.chunk_size else {}
        ep_cfg = EndpointConfig(max_message_bytes=pc.max_packet_bytes, spill_dir=str(self.state_dir), **chunking)
        self.endpoint = Endpoint(pc.identity, pc.directory, broker, ep_cfg)
        self.endpoint.on_reject = self._on_bridge_reject
        self._current_round = 0
        ctx = ServerContext(str(self.state_dir), config.seed, config.models, config.public_data, config.llm)
        self.algorithm = registry.get(config.algorithm).server(config.algorithm_config, ctx)
        self.logits_server = None
        if config.serve_logits:  # the LLM is built on the first request
            from .logits_service import LogitsServer

            self.logits_server = LogitsServer(self.endpoint, ctx.llm)
        #: the round's rule: the configured numeric one, or "collect" when the algorithm says so
        self.rule = aggregation_rule(self.algorithm, config.aggregation)
        self._stop = threading.Event()
        #: blob hash -> clients this process already sent it to (they cache downloads by hash)
        self._delivered: dict[str, set[str]] = {}

    # -- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> dict:
        self.store = StateStore(self.state_dir / "state.db")
        try:
            return self._run()
        finally:
            self.store.close()

    def _run(self) -> dict:
        fed = self.store.federation()
        if fed is None:
            self.progress(f"initialising federation {self.party.federation!r} ({self.cfg.algorithm})")
            self.store.init_federation(self.party.federation, self.cfg.algorithm, self.cfg.algorithm_config,
                                       self.algorithm.initial_state())
        elif fed.algorithm != self.cfg.algorithm:
            raise AggregatorError(f"state in {self.state_dir} belongs to algorithm {fed.algorithm!r}, "
                                  f"config says {self.cfg.algorithm!r}; use another state_dir")
        self.endpoint.start()
        try:
            while not self._stop.is_set():
                info = self.store.current_round()
                if info.status == "committed":
                    if info.round >= self.cfg.rounds:
                        break
                    selected = self._select(info.round + 1)
                    info = self.store.open_round(selected, deadline=time.time() + self.cfg.round_deadline_s)
                    _event("round_opened", round=info.round, selected=list(info.selected))
                else:
                    _event("round_resumed", round=info.round, status=info.status)
                    self.progress(f"resuming round {info.round} ({info.status}) after a restart")
                self._run_round(info.round)
            if not self._stop.is_set():
                self._finish()
        finally:
            self.endpoint.close()
        return self.store.status()

    # -- selection ------------------------------------------------------------------------
    def _select(self, round: int) -> list[str]:
        """A seeded sample of ``fraction`` of the clients that are online (retained presence),
        at least ``min_clients``. Before round 1 the service waits up to
        ``wait_for_clients_s`` for every registered client to show up."""
        clients = self.party.directory.clients()
        if round == 1:
            deadline = time.monotonic() + self.cfg.wait_for_clients_s
            while time.monotonic() < deadline and not self._stop.is_set():
                if len(self._online(clients)) == len(clients):
                    break
                time.sleep(0.2)
        online = self._online(clients)
        pool = online if len(online) >= self.cfg.min_clients else clients
        k = min(len(pool), max(self.cfg.min_clients, round_half_up(self.cfg.fraction * len(pool))))
        rng = random.Random(f"{self.cfg.seed}:{round}")
        return sorted(rng.sample(sorted(pool), k))

    def _online(self, clients: list[str]) -> list[str]:
        return [c for c in clients if self.endpoint.presence.get(c, {}).get("state") == "online"]

    # -- one round ------------------------------------------------------------------------
    def _run_round(self, r: int) -> None:
        t0 = time.time()
        rs = self.store.load_round(r)
        info = rs.info
        state = self.store.load_global(info.base_digest).tensors
        spec = UpdateSpec.from_state(self.algorithm.update_spec_state(state))
        agg = self._aggregator(rs.partial, spec)
        self._current_round = r
        self.endpoint.set_round_floor(r)
        bytes_at_start = dict(self.endpoint.bytes_from)
        if info.status == "open":
            pending = [c for c in info.selected if c not in rs.accepted]
            if pending:
                self._send_tasks(r, state, pending)
            deadline = info.deadline or time.time() + self.cfg.round_deadline_s
            if deadline < time.time() + 1.0:  # resumed after an outage longer than the round: a fresh window
                deadline = time.time() + self.cfg.round_deadline_s
            self._collect(r, agg, spec, deadline, bytes_at_start)
            self.store.seal_round(r, reason="deadline" if self._pending(r) else "complete")
        accepted = self.store.load_round(r, with_partial=False).accepted
        quorum = self.cfg.quorum_count(len(info.selected))
        if len(accepted) >= quorum and agg.count == len(accepted):
            aggregate = agg.result(cast=False)
            outcome = self.algorithm.finish_round(r, state, aggregate)
            metrics = {**outcome.metrics, "accepted": accepted, "quorum": quorum, "seconds": round(time.time() - t0, 3)}
            self.store.close_round(r, outcome.state, metrics)
            self.progress(f"round {r}: {len(accepted)}/{len(info.selected)} updates aggregated "
                          f"({self.rule}) in {time.time() - t0:.1f}s")
        else:
            metrics = {"skipped": f"quorum not met: {len(accepted)} < {quorum}", "accepted": accepted,
                       "quorum": quorum, "seconds": round(time.time() - t0, 3)}
            self.store.close_round(r, state, metrics)
            self.progress(f"round {r}: quorum not met ({len(accepted)}/{quorum}); global state unchanged")
        _event("round_committed", round=r, **{k: v for k, v in metrics.items() if k != "accepted"})
        if hasattr(agg, "discard"):
            agg.discard()

    def _aggregator(self, partial, spec: UpdateSpec) -> Aggregator:
        return open_aggregator(self.rule, spec, partial=partial, spill_dir=self.state_dir / "spill",
                               trim_fraction=self.cfg.trim_fraction)

    def _send_tasks(self, r: int, state: State, clients: list[str]) -> None:
        plan = self.algorithm.plan_round(r, state)
        refs = {}
        for name, blob in plan.blobs.items():
            refs[name] = self._distribute(clients, blob, name, r)
        info = self.store.load_round(r, with_partial=False).info
        deadline = info.deadline or time.time() + self.cfg.round_deadline_s
        for c in clients:
            self.endpoint.send(c, Task(round=r, algorithm=self.cfg.algorithm, config=plan.config, downloads=refs,
                                       deadline=deadline), round=r)
        _event("tasks_sent", round=r, clients=clients, blobs={k: v["size"] for k, v in refs.items()})

    def _distribute(self, clients: list[str], blob: bytes, name: str, r: int) -> dict:
        """Broadcast a blob; when this process already sent the same content to every recipient
        (an unchanged emulator), only grant its key: clients serve it from their blob cache, and
        one that lost it pulls the chunks. Returns the blob reference (JSON)."""
        sha = hashlib.sha256(blob).hexdigest()
        known = self._delivered.setdefault(sha, set())
        while len(self._delivered) > 256:  # adapters change every round; keep the recent hashes
            del self._delivered[next(iter(self._delivered))]
        push = not set(clients) <= known
        ref = self.endpoint.broadcast_blob(clients, blob, kind=name, round=r, push=push)
        known.update(clients)
        if not push:
            _event("blob_not_resent", round=r, blob=name, sha256=sha[:12], size=len(blob))
        return ref.to_json()

    def _pending(self, r: int) -> list[str]:
        """Selected clients without an accepted update. A client whose update was rejected may
        send a corrected one until the deadline, so it stays pending."""
        rs = self.store.load_round(r, with_partial=False)
        return [c for c, p in rs.participants.items() if p.status in ("selected", "rejected")]

    def _collect(self, r: int, agg: Aggregator, spec: UpdateSpec, deadline: float,
                 bytes_at_start: dict) -> None:
        while not self._stop.is_set():
            if not self._pending(r):
                return
            remaining = deadline - time.time()
            if remaining <= 0:
                _event("deadline", round=r, pending=self._pending(r))
                return
            inbound = self.endpoint.recv(timeout=min(0.5, remaining))
            if inbound is None:
                continue
            if isinstance(inbound.message, Update):
                self._on_update(r, inbound, agg, spec, deadline, bytes_at_start)
            else:
                self._on_other(inbound)

    def _on_update(self, r: int, inbound: Inbound, agg: Aggregator, spec: UpdateSpec, deadline: float,
                   bytes_at_start: dict) -> None:
        upd: Update = inbound.message
        client = inbound.sender
        try:
            if upd.round != r:
                raise InvalidUpdate("round", f"update for round {upd.round}, current round is {r}", client=client)
            rs = self.store.load_round(r, with_partial=False)
            if client not in rs.participants:
                raise InvalidUpdate("not_selected", f"{client} was not selected for round {r}", client=client)
            if rs.participants[client].status == "accepted":
                raise InvalidUpdate("duplicate", f"{client} already has an accepted update in round {r}", client=client)
            if upd.algorithm != self.cfg.algorithm:
                raise InvalidUpdate("names", f"update for algorithm {upd.algorithm!r}, federation runs "
                                             f"{self.cfg.algorithm!r}", client=client)
            tensors = self._payload(upd, client, deadline)
            checked = check_update(self.algorithm, self.rule, tensors, spec, client=client, max_norm=self.cfg.max_norm,
                                   clip=self.cfg.clip)
            weight = self.algorithm.update_weight(upd.metrics, upd.num_examples)
        except InvalidUpdate as exc:
            self._reject(r, client, exc.reason, str(exc))
            return
        except (BridgeError, AggregatorError) as exc:
            self._reject(r, client, getattr(exc, "code", "payload"), str(exc))
            return
        snapshot = agg.state_dict() if agg.count else None
        try:
            agg.add(client, checked.tensors, weight=weight)
            metrics = {**upd.metrics, "num_examples": upd.num_examples, "norm": checked.norm, "clipped": checked.clipped,
                       "bytes_up": self.endpoint.bytes_from[client] - bytes_at_start.get(client, 0)}
            self.store.accept_update(r, client, agg.state_dict(), update_digest(checked.tensors), upd.num_examples,
                                     metrics)
        except InvalidUpdate as exc:
            self._restore(agg, snapshot, spec)
            self._reject(r, client, exc.reason, str(exc))
            return
        except Exception:
            self._restore(agg, snapshot, spec)
            raise
        _event("accepted", round=r, client=client, num_examples=upd.num_examples, norm=round(checked.norm, 6))
        self.progress(f"round {r}: accepted {client} ({upd.num_examples} examples, |delta| {checked.norm:.3g})")

    def _restore(self, agg: Aggregator, snapshot, spec: UpdateSpec) -> None:
        """Put the in-memory aggregate back to the last durable state (never half-folded)."""
        if snapshot is None:
            agg.begin(spec)
        else:
            agg.load_state_dict(snapshot)

    def _payload(self, upd: Update, client: str, deadline: float) -> dict[str, np.ndarray]:
        if upd.tensors:
            return dict(upd.tensors)
        if "update" not in upd.blobs:
            raise InvalidUpdate("names", "update carries neither inline tensors nor an 'update' blob", client=client)
        res = self.endpoint.fetch_blob(upd.blob("update"), client, timeout=max(5.0, deadline - time.time()))
        try:
            return unpack_state(res.read())
        except Exception as exc:
            raise InvalidUpdate("names", f"update blob is not a tensor file: {exc}", client=client) from None
        finally:
            res.discard()

    def _reject(self, r: int, client: str, reason: str, detail: str) -> None:
        self.store.reject_update(r, client, reason, detail)
        _event("rejected", round=r, client=client, reason=reason, detail=detail)
        self.progress(f"round {r}: rejected update from {client}: {reason}: {detail}")
        try:
            self.endpoint.send(client, ErrorReport(reason, detail, round=r), round=r)
        except BridgeError as exc:
            log.warning("could not tell %s about the rejection: %s", client, exc)

    def _on_bridge_reject(self, exc: BridgeError, sender: str | None) -> None:
        """Frames the bridge refused (replayed, tampered, stale...) are recorded as events too."""
        try:
            with StateStore(self.state_dir / "state.db") as store:  # own connection: receive thread
                store.record_event("wire_rejected", round=self._current_round or None, client=sender,
                                   reason=exc.code, detail=str(exc)[:500])
        except Exception:
            log.exception("could not record a wire rejection")

    def _on_other(self, inbound: Inbound) -> None:
        msg: Message = inbound.message
        if self.logits_server is not None and self.logits_server.handle(inbound):
            return
        if isinstance(msg, ErrorReport):
            _event("client_error", client=inbound.sender, code=msg.code, detail=msg.detail)
        else:
            _event("ignored", client=inbound.sender, type=msg.TYPE)

    # -- end of the federation -------------------------------------------------------------
    def _finish(self) -> None:
        state = self.store.load_global().tensors
        clients = self.party.directory.clients()
        blobs = self.algorithm.final_blobs(state)
        refs = {n: self._distribute(clients, b, n, self.cfg.rounds) for n, b in blobs.items()}
        for c in clients:
            self.endpoint.send(c, Note("done", {"downloads": refs, "config": self.algorithm.client_config(),
                                                "algorithm": self.cfg.algorithm, "rounds": self.cfg.rounds,
                                                "stop": self.cfg.stop_clients_when_done}, round=self.cfg.rounds),
                               round=self.cfg.rounds)
        self.progress(f"federation finished after {self.cfg.rounds} rounds; final model sent to {len(clients)} clients")
        # collect the final evaluations of the last round's participants, for reports
        last = self.store.load_round(self.cfg.rounds, with_partial=False).accepted
        deadline = time.time() + self.cfg.final_wait_s
        waiting = set(last) & set(self._online(clients))
        while waiting and time.time() < deadline and not self._stop.is_set():
            inbound = self.endpoint.recv(timeout=0.5)
            if inbound is not None and self.logits_server is not None and self.logits_server.handle(inbound):
                continue
            if inbound is not None and isinstance(inbound.message, Note) and inbound.message.kind == "final":
                self.store.record_event("final_metrics", round=self.cfg.rounds, client=inbound.sender,
                                        detail=json.dumps(inbound.message.data))
                waiting.discard(inbound.sender)


def _attach_event_log(path: Path) -> None:
    """Structured events (one JSON object per line) always go to ``state_dir/events.jsonl``,
    whatever the console log level is."""
    target = str(path.resolve())
    if any(getattr(h, "baseFilename", None) == target for h in log.handlers):
        return
    handler = logging.FileHandler(target)
    handler.setFormatter(logging.Formatter('{"at": "%(asctime)s", "level": "%(levelname)s", "record": %(message)s}'))
    handler.setLevel(logging.INFO)
    handler.addFilter(lambda rec: rec.getMessage().startswith("{"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


def round_half_up(x: float) -> int:
    return int(x + 0.5)
