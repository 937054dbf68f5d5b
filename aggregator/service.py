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
import logging.handlers
import random
import threading
import time
from pathlib import Path

from threadpoolctl import threadpool_limits

from algorithms import registry
from algorithms.base import State
from bridge.codec import Message
from bridge.endpoint import Endpoint, EndpointConfig, Inbound, broker_config_for
from bridge.messages import ErrorReport, Note, Task
from bridge.provision import load_party_config

from . import metrics as _metrics
from .aggregation import Aggregator
from .config import AggregatorConfig
from .context import ServerContext
from .dp import PrivacyBudgetExhausted, spent_rounds
from .dp import epsilon as dp_epsilon
from .errors import AggregatorError, StateError
from .ingest import RoundIngest
from .ingest_log import IngestLog
from .intake import aggregation_rule, open_aggregator
from .state import open_store
from .status_http import start_status_http
from .update_intake import UpdateIntake, event
from .validation import UpdateSpec
from .workers import LocalWorkers, open_worker_aggregator, shard_of, worker_log_dir

log = logging.getLogger("cotune.aggregator")


_event = event


class AggregatorService:
    def __init__(self, config: AggregatorConfig, *, progress=print):
        self.cfg = config
        self.progress = progress or (lambda *_: None)
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = None  # opened in run(): SQLite connections belong to one thread
        _attach_event_log(self.state_dir / "events.jsonl")
        pc = load_party_config(config.party_config, strict=config.strict_keys)
        self.party = pc
        broker = broker_config_for(pc, **config.broker)
        chunking = {"chunk_size": config.chunk_size} if config.chunk_size else {}
        ep_cfg = EndpointConfig(max_message_bytes=pc.max_packet_bytes, spill_dir=str(self.state_dir),
                                # until a round sets its own limit from the update spec
                                max_blob_bytes=config.max_update_bytes or 512 * 1024 * 1024,
                                up_topics="none" if config.ingest_workers else "all",
                                shared_blob_dir=str(self.state_dir / "outgoing") if config.ingest_workers else None,
                                **chunking)
        self.endpoint = Endpoint(pc.identity, pc.directory, broker, ep_cfg)
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
        self._stop_at = 0.0
        #: blob hash -> clients this process already sent it to (they cache downloads by hash)
        self._delivered: dict[str, set[str]] = {}
        #: worker mode: ingest runs in these processes, the service coordinates and merges
        self.workers = LocalWorkers(config, config.ingest_workers) if config.ingest_workers else None
        if self.workers is not None and config.serve_logits:
            raise AggregatorError("serve_logits needs the service to read the up topics; it cannot be combined "
                                  "with ingest_workers")
        self.buffered = None
        if config.mode == "buffered":
            from .buffered_rounds import BufferedRounds

            if self.workers is not None:
                raise AggregatorError("buffered rounds run in the service itself; set ingest_workers to 0")
            self.buffered = BufferedRounds(self)
        self.secure = None
        if config.secure_aggregation:
            from .secure_round import SecureAggConfig, SecureRound

            self.secure = SecureRound(self, SecureAggConfig.parse(
                config.secure_aggregation, algorithm=config.algorithm, aggregation=config.aggregation,
                ingest_workers=config.ingest_workers, mode=config.mode, dp=config.dp))
        self.intake = UpdateIntake(self.endpoint, self.algorithm, self.rule, config, None, stop=self._stop,
                                   progress=self.progress, on_other=self.on_other)
        self.dp = self.intake.dp  # client-level DP (aggregator/dp.py), None when off
        self._pool_size = 0
        self.stopped_by = None  # a PrivacyBudgetExhausted that ended the federation early
        self._dp_plan: dict = {}
        self.status_http = start_status_http(self)  # the read-only page and /metrics, when configured

    # -- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop_at = time.monotonic()
        self._stop.set()

    def run(self) -> dict:
        self.store = open_store(self.cfg.state_db or self.state_dir / "state.db",
                                checkpoints=self.state_dir / "state.db.checkpoints")
        self.intake.store = self.store
        # numeric libraries on one thread: BLAS threads fight the receive and ingest threads
        # (measured 2.3x slower rounds with large updates)
        with threadpool_limits(limits=1):
            try:
                return self._run()
            finally:
                try:
                    self.intake.flush_rejections()  # what the receive thread refused until it stopped
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
        if self.workers is not None:
            self.workers.start()
        try:
            while not self._stop.is_set():
                info = self.store.current_round()
                if info.status == "committed":
                    if info.round >= self.cfg.rounds:
                        break
                    nxt = info.round + 1
                    selected = self.buffered.participants(nxt) if self.buffered else self._select(nxt)
                    if self.dp is not None and not self._dp_may_open(nxt, len(selected)):
                        break
                    info = self.store.open_round(selected, deadline=time.time() + self.cfg.round_deadline_s)
                    if self.secure is not None:
                        self.secure.opened_here.add(info.round)
                    if self.dp is not None:  # the round's sampling rate, for its release (after a restart too)
                        self.store.record_event("dp_planned", round=info.round, detail=json.dumps(self._dp_plan))
                    # process_cpu_s (all threads, ns clock): load tests read a round's CPU from
                    # the events, exact at the instant, instead of sampling /proc in 10 ms ticks
                    _event("round_opened", round=info.round, selected=len(info.selected),
                           process_cpu_s=round(time.process_time(), 4),
                           first=list(info.selected[:20]))
                    _metrics.round_opened()
                else:
                    _event("round_resumed", round=info.round, status=info.status)
                    self.progress(f"resuming round {info.round} ({info.status}) after a restart")
                if self.buffered is not None:
                    self.buffered.run_round(info.round)
                else:
                    self._run_round(info.round)
            if not self._stop.is_set():
                self._finish(self.store.current_round().round if self.stopped_by else None)
        finally:
            if self.workers is not None:
                self.workers.stop()
            self.endpoint.close()
        self.intake.flush_rejections()
        if self._stop.is_set():
            _event("stopped", after_s=round(time.monotonic() - self._stop_at, 3))
        return self.store.status()

    # -- selection ------------------------------------------------------------------------
    def _select(self, round: int) -> list[str]:
        """A seeded sample of ``fraction`` of the clients that are online (retained presence),
        at least ``min_clients``."""
        pool = self._pool(round)
        k = min(len(pool), max(self.cfg.min_clients, round_half_up(self.cfg.fraction * len(pool))))
        self._pool_size = len(pool)
        # with dp, amplification by sampling assumes nobody can predict who is selected: the draw
        # is from the OS's CSPRNG (the ledger records it, so a restart keeps the same set)
        rng = random.SystemRandom() if self.dp is not None else random.Random(f"{self.cfg.seed}:{round}")
        return sorted(rng.sample(sorted(pool), k))

    def _pool(self, round: int) -> list[str]:
        """The clients a round may choose from: the online ones (all registered clients when
        fewer than ``min_clients`` are online). Before round 1 the service waits up to
        ``wait_for_clients_s`` for every registered client to show up."""
        clients = self.party.directory.clients()
        if round == 1:
            deadline = time.monotonic() + self.cfg.wait_for_clients_s
            while time.monotonic() < deadline and not self._stop.is_set():
                if len(self._online(clients)) == len(clients):
                    break
                time.sleep(0.2)
        online = self._online(clients)
        return online if len(online) >= self.cfg.min_clients else clients

    def _online(self, clients: list[str]) -> list[str]:
        return [c for c in clients if self.endpoint.presence.get(c, {}).get("state") == "online"]

    # -- one round ------------------------------------------------------------------------
    def _run_round(self, r: int) -> None:
        t0 = time.time()
        info = self.store.current_round()
        if info.round != r:
            raise AggregatorError(f"round {r} is not the current round ({info.round})")
        state = self.store.load_global(info.base_digest).tensors
        spec = UpdateSpec.from_state(self.algorithm.update_spec_state(state))
        partial = self.store.checkpoints.get(info.partial_digest) if info.partial_digest else None
        agg = self._aggregator(partial, spec)
        self._current_round = self.intake.current_round = r
        self.endpoint.set_round_floor(r)
        limit = self.intake.blob_limit(spec)
        self.endpoint.blob_limit = lambda sender: limit
        bytes_at_start = dict(self.endpoint.bytes_from)
        if self.secure is not None:
            self.secure.run_round(r, info, state, spec, t0)
            return
        ingest = None
        if info.status == "open" and self.workers is not None:
            agg = self._collect_from_workers(r, state, spec, info)
            if agg is None:
                return  # stopped: the round stays open; workers and a restart resume it
            self.store.seal_round(r, reason="complete" if agg.count == len(info.selected) else "deadline")
        elif info.status == "open":
            ingest = RoundIngest.open(self.store, r, agg, self.state_dir / "wal", self.cfg.ingest_settings())
            if ingest.replayed:
                _event("log_replayed", round=r, updates=ingest.replayed)
                self.progress(f"round {r}: {ingest.replayed} logged updates recovered from the ingest log")
            pending = ingest.book.pending()
            if pending:
                self.send_tasks(r, state, pending)
            deadline = info.deadline or time.time() + self.cfg.round_deadline_s
            if deadline < time.time() + 1.0:  # resumed after an outage longer than the round: a fresh window
                deadline = time.time() + self.cfg.round_deadline_s
            self.intake.collect(r, ingest, spec, deadline, bytes_at_start)
            ingest.close()
            self.intake.flush_rejections()
            if self._stop.is_set():
                return  # the round stays open; a restart resumes it from the ledger and the log
            self.store.seal_round(r, reason="deadline" if ingest.book.pending_count else "complete")
        accepted = list(agg.clients)
        quorum = self.cfg.quorum_count(len(info.selected))
        aggregate, metrics = None, {"accepted": len(accepted), "quorum": quorum}
        if len(accepted) >= quorum and agg.count == len(accepted):
            aggregate = agg.result(cast=False)
            if ingest is not None:
                metrics["ingest"] = dict(ingest.stats)
        else:
            metrics["skipped"] = f"quorum not met: {len(accepted)} < {quorum}"
        self.commit_round(r, state, aggregate, metrics, t0, count=agg.count, spec=spec, selected=len(info.selected))
        self._retire(r, agg, ingest)

    def commit_round(self, r: int, state: State, aggregate: dict | None, metrics: dict, t0: float, *,
                     count: int = 0, spec: UpdateSpec | None = None, selected: int = 0, secure: bool = False) -> None:
        """Close round ``r``: with an ``aggregate``, release it (differential privacy unless the
        caller did: ``secure``), run the algorithm's server step and commit its state; without,
        keep the global state and record why (``metrics["skipped"]``)."""
        if aggregate is not None:
            dp_metrics = {}
            if self.dp is not None and not secure:
                aggregate, dp_metrics = self.dp_release(r, aggregate, count, spec, selected)
            outcome = self.algorithm.finish_round(r, state, aggregate)
            metrics = {**outcome.metrics, **dp_metrics, **metrics, "seconds": round(time.time() - t0, 3)}
            self.store.close_round(r, outcome.state, metrics)
            self.progress(f"round {r}: {metrics.get('accepted')}/{selected} updates aggregated "
                          f"({'secure sum' if secure else self.rule}) in {time.time() - t0:.1f}s")
        else:
            metrics = {**metrics, "seconds": round(time.time() - t0, 3)}
            if self.dp is not None:  # nothing released, nothing spent: the running total carries over
                metrics["dp_epsilon"] = self._dp_spent_epsilon(r - 1)
            self.store.close_round(r, state, metrics)
            self.progress(f"round {r}: {metrics['skipped']}; global state unchanged")
        _event("round_committed", round=r, process_cpu_s=round(time.process_time(), 4), **metrics)
        _metrics.round_committed(metrics)
        if secure:  # no ingest log, partial or workers of its own: retention only
            self._retire(r, None, None)

    def stopping(self) -> bool:
        return self._stop.is_set()

    def _collect_from_workers(self, r: int, state: State, spec: UpdateSpec, info) -> Aggregator | None:
        """Worker mode: send the Tasks, watch the ledger's counts until everyone answered or the
        deadline, ask the workers to close, merge their final partials (recovering a worker that
        does not answer from its own checkpoint and log), and checkpoint the merged partial as
        the round's before it is sealed."""
        statuses = self.store.participant_statuses(r)
        pending = [c for c, st in statuses.items() if st in ("selected", "rejected")]
        if pending:
            self.send_tasks(r, state, pending)
        deadline = info.deadline or time.time() + self.cfg.round_deadline_s
        if deadline < time.time() + 1.0:
            deadline = time.time() + self.cfg.round_deadline_s
        n = self.workers.count
        while not self._stop.is_set():
            self.workers.supervise()
            if self.store.counts(r).get("accepted", 0) >= len(statuses) or time.time() >= deadline:
                break
            inbound = self.endpoint.recv(timeout=0.25)
            if inbound is not None:
                self.on_other(inbound)
        if self._stop.is_set():
            return None
        self.store.request_close(r)
        wait_until = time.time() + self.cfg.worker_close_timeout_s
        while time.time() < wait_until and not self._stop.is_set():
            finals = self.store.worker_partials(r)
            if all(finals.get(k, (None, False))[1] for k in range(n)):
                break
            self._stop.wait(0.1)
        if self._stop.is_set():
            return None
        merged = self._aggregator(None, spec)
        finals = self.store.worker_partials(r)
        for k in range(n):
            digest, final = finals.get(k, (None, False))
            if not final:  # the worker is gone: its checkpoint and log are in the shared state dir
                _event("worker_recovered", round=r, worker=k)
                wagg = open_worker_aggregator(self.store, self.rule, spec, digest, self.state_dir,
                                              self.cfg.trim_fraction)
                ing = RoundIngest.open(self.store, r, wagg, worker_log_dir(self.state_dir, k),
                                       self.cfg.ingest_settings(), worker=k,
                                       shard=lambda c, k=k: shard_of(c, n) == k)
                ing.close()
                digest = ing.partial_digest
                self.store.set_worker_partial(r, k, digest, final=True)
            if digest:
                merged.merge(self.store.checkpoints.get(digest))
        if merged.count:
            st = merged.state_dict()
            self.store.set_partial(r, self.store.checkpoints.put(st.tensors, st.meta))
        _event("workers_merged", round=r, workers=n, accepted=merged.count)
        return merged

    # -- differential privacy (aggregator/dp.py) ---------------------------------------------
    def _dp_spent(self, last_round: int) -> list[tuple[float, float]]:
        # a committed round's metrics never change: read each once (not all rounds every round)
        cache = self.__dict__.setdefault("_dp_metrics", {})

        def metrics(i: int) -> dict:
            if i not in cache:
                info = self.store.round_info(i)
                if info.status != "committed":
                    return info.metrics
                cache[i] = info.metrics
            return cache[i]

        return spent_rounds(metrics, last_round)

    def _dp_spent_epsilon(self, last_round: int) -> float:
        c = self.dp.cfg
        return dp_epsilon(self._dp_spent(last_round), c.delta, mode=c.mode, accountant=c.accountant)

    def _dp_may_open(self, r: int, selected: int) -> bool:
        """Whether round ``r`` fits the privacy budget; when not, the refusal is logged and
        recorded, and no round is opened."""
        q = min(1.0, selected / max(1, self._pool_size or selected))
        try:
            nxt = self.dp.check_budget(r, q, self._dp_spent(r - 1))
        except PrivacyBudgetExhausted as exc:
            self.stopped_by = exc
            _event("dp_budget_exhausted", round=r, epsilon_next=exc.epsilon_next, budget=exc.budget,
                   epsilon_spent=exc.epsilon_spent)
            self.store.record_event("dp_budget_exhausted", reason="dp_budget", detail=str(exc))
            self.progress(str(exc))
            return False
        self._dp_plan = {"q": q, "epsilon_after": nxt}
        return True

    def dp_release(self, r: int, mean: dict, count: int, spec: UpdateSpec, selected: int, *,
                   noised_by_clients: bool = False) -> tuple[dict, dict]:
        q = 1.0  # conservative when the planned rate was not recorded
        for ev in self.store.events(round=r, kind="dp_planned")[-1:]:
            q = float(json.loads(ev.detail)["q"])
        return self.dp.release(mean, count, spec, selected=selected, round=r, q=q, spent=self._dp_spent(r - 1),
                               noised_by_clients=noised_by_clients)

    def _retire(self, r: int, agg: Aggregator | None, ingest: RoundIngest | None) -> None:
        """After a commit: the round's log, partial checkpoint and spills go; global states
        beyond the retention window go too."""
        if ingest is not None:
            ingest.discard()
        else:
            IngestLog.discard_round(self.state_dir / "wal", r)
        if self.workers is not None:
            for k, (digest, _) in self.store.worker_partials(r).items():
                IngestLog.discard_round(worker_log_dir(self.state_dir, k), r)
                if digest:
                    self.store.checkpoints.delete(digest)
        if hasattr(agg, "discard"):
            agg.discard()
        if self.cfg.keep_globals:
            try:
                self.store.prune(self.cfg.keep_globals)
            except StateError as exc:
                log.warning("retention: %s", exc)

    def _aggregator(self, partial, spec: UpdateSpec) -> Aggregator:
        return open_aggregator(self.rule, spec, partial=partial, spill_dir=self.state_dir / "spill",
                               trim_fraction=self.cfg.trim_fraction)

    def send_tasks(self, r: int, state: State, clients: list[str], *, extra: dict | None = None) -> None:
        plan = self.algorithm.plan_round(r, state)
        refs = {}
        for name, blob in plan.blobs.items():
            refs[name] = self._distribute(clients, blob, name, r)
        info = self.store.current_round()
        deadline = info.deadline or time.time() + self.cfg.round_deadline_s
        config = dict(plan.config)
        if self.dp is not None:
            config["dp"] = self.dp.cfg.task_config()
        config.update(extra or {})
        for i, c in enumerate(clients):
            if i % 256 == 0 and self._stop.is_set():
                return
            self.endpoint.send(c, Task(round=r, algorithm=self.cfg.algorithm, config=config, downloads=refs,
                                       deadline=deadline), round=r)
        _event("tasks_sent", round=r, clients=len(clients), blobs={k: v["size"] for k, v in refs.items()})

    def _distribute(self, clients: list[str], blob: bytes, name: str, r: int) -> dict:
        """Broadcast a blob; when this process already sent the same content to every recipient
        (an unchanged emulator), only grant its key: clients serve it from their blob cache, and
        one that lost it pulls the chunks. Returns the blob reference (JSON)."""
        sha = hashlib.sha256(blob).hexdigest()
        known = self._delivered.setdefault(sha, set())
        while len(self._delivered) > 256:  # adapters change every round; keep the recent hashes
            del self._delivered[next(iter(self._delivered))]
        push = not set(clients) <= known
        ref = self.endpoint.broadcast_blob(clients, blob, kind=name, round=r, push=push, stop=self._stop)
        known.update(clients)
        if not push:
            _event("blob_not_resent", round=r, blob=name, sha256=sha[:12], size=len(blob))
        return ref.to_json()

    def on_other(self, inbound: Inbound) -> None:
        msg: Message = inbound.message
        if self.logits_server is not None and self.logits_server.handle(inbound):
            return
        if isinstance(msg, ErrorReport):
            _event("client_error", client=inbound.sender, code=msg.code, detail=msg.detail)
        else:
            _event("ignored", client=inbound.sender, type=msg.TYPE)

    # -- end of the federation -------------------------------------------------------------
    def _finish(self, final_round: int | None = None) -> None:
        """``final_round``: the last committed round when the federation ended early (privacy
        budget spent), else the configured number of rounds."""
        final_round = self.cfg.rounds if final_round is None else final_round
        state = self.store.load_global().tensors
        clients = self.party.directory.clients()
        blobs = self.algorithm.final_blobs(state)
        refs = {n: self._distribute(clients, b, n, final_round) for n, b in blobs.items()}
        for c in clients:
            self.endpoint.send(c, Note("done", {"downloads": refs, "config": self.algorithm.client_config(),
                                                "algorithm": self.cfg.algorithm, "rounds": final_round,
                                                "stop": self.cfg.stop_clients_when_done}, round=final_round),
                               round=final_round)
        self.progress(f"federation finished after {final_round} rounds; final model sent to {len(clients)} clients")
        if self.workers is not None:
            return  # the workers read the up topics; they record the final evaluations
        # collect the final evaluations of the last round's participants, for reports
        last = self.store.load_round(final_round, with_partial=False).accepted
        deadline = time.time() + self.cfg.final_wait_s
        waiting = set(last) & set(self._online(clients))
        while waiting and time.time() < deadline and not self._stop.is_set():
            inbound = self.endpoint.recv(timeout=0.5)
            if inbound is not None and self.logits_server is not None and self.logits_server.handle(inbound):
                continue
            if inbound is not None and isinstance(inbound.message, Note) and inbound.message.kind == "final":
                self.store.record_event("final_metrics", round=final_round, client=inbound.sender,
                                        detail=json.dumps(inbound.message.data))
                waiting.discard(inbound.sender)


def _attach_event_log(path: Path) -> None:
    """Structured events (one JSON object per line) always go to ``state_dir/events.jsonl``,
    whatever the console log level is."""
    target = str(path.resolve())
    if any(getattr(h, "baseFilename", None) == target for h in log.handlers):
        return
    handler = logging.handlers.RotatingFileHandler(target, maxBytes=16 << 20, backupCount=3)
    handler.setFormatter(logging.Formatter('{"at": "%(asctime)s", "level": "%(levelname)s", "record": %(message)s}'))
    handler.setLevel(logging.INFO)
    handler.addFilter(lambda rec: rec.getMessage().startswith("{"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


def round_half_up(x: float) -> int:
    return int(x + 0.5)
