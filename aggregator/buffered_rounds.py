"""Buffered asynchronous rounds over the wire (FedBuff): the service's ``mode: "buffered"``.

The ledger's round ``r`` is the buffer that produces global version ``r`` from version
``r - 1``. There is no barrier: ``concurrency`` clients train at once, each on the version it
was sent (a Task of round ``t`` carries version ``t - 1``); an update that arrives while round
``r`` is open was trained ``tau = r - t`` versions behind, is validated against *that* version,
turned into a delta (:func:`~aggregator.buffered.client_delta`) and folded into the round's
:class:`~aggregator.buffered.DeltaBuffer` with its staleness weight. After ``buffer_size``
accepted updates the round closes, the buffer is applied and committed, the clients that
delivered get a Task of the next round and fresh clients fill the concurrency; the ones still
training are carried over (they are this round's participants again). A client whose task is
more than ``max_staleness`` versions old is released. Stragglers and dropouts therefore never
hold a round up; a round that sees no update before its deadline commits nothing new.

Durability is the synchronous path's: the same write-ahead log, group commit and checkpoints
(the buffer is checkpointable), the same kill -9 contract. The base versions an update can
still be measured against are kept by the retention rule (``keep_globals`` >=
``max_staleness + 2``).
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from typing import Any

from . import metrics as _metrics
from .buffered import BufferedConfig, DeltaBuffer, buffer_from_state, check_staleness, client_delta
from .errors import InvalidUpdate, SpecError, StateError
from .ingest import RoundIngest
from .intake import COLLECT
from .state import CheckpointPruned, update_digest
from .update_intake import event
from .validation import UpdateSpec, ValidatedUpdate, validate_update


class BufferedRounds:
    """The buffered-rounds policy of one :class:`~aggregator.service.AggregatorService`."""

    def __init__(self, service: Any) -> None:
        self.svc = service
        self.config = BufferedConfig.from_dict(service.cfg.buffered)
        if service.rule == COLLECT:
            raise SpecError(f"{service.cfg.algorithm} collects its updates (they cannot be averaged): "
                            "buffered rounds need averaged updates")
        keep = service.cfg.keep_globals
        if keep and keep < self.config.max_staleness + 2:
            raise SpecError(f"keep_globals {keep} would prune versions an update may still be trained on; "
                            f"use >= max_staleness + 2 = {self.config.max_staleness + 2} (or 0: keep all)")
        #: client -> the round of the task it is training on
        self.inflight: dict[str, int] = {}
        self._to_task: list[str] = []
        self._specs: OrderedDict[int, UpdateSpec] = OrderedDict()

    # -- scheduling -----------------------------------------------------------------------
    def participants(self, r: int) -> list[str]:
        """Who round ``r`` may hear from: the clients still training on a recent version, plus
        fresh tasks up to ``concurrency``."""
        svc = self.svc
        if not self.inflight and r > 1:  # after a restart: the last round's carried clients
            carried = svc.store.participant_statuses(r - 1)
            self.inflight = {c: r - 1 for c, st in carried.items() if st in ("dropped", "selected")}
        floor = r - self.config.max_staleness
        released = [c for c, t in self.inflight.items() if t < floor]
        for c in released:
            del self.inflight[c]
        pool = svc._pool(r)
        idle = sorted(c for c in pool if c not in self.inflight)
        want = max(0, self.config.concurrency - len(self.inflight))
        fresh = random.Random(f"{svc.cfg.seed}:buffered:{r}").sample(idle, min(want, len(idle)))
        for c in fresh:
            self.inflight[c] = r
        self._to_task = sorted(fresh)
        if released:
            event("released", round=r, clients=len(released))
        return sorted(self.inflight)

    # -- the intake hooks -------------------------------------------------------------------
    def check_round(self, r: int, task_round: int, client: str) -> int:
        if task_round < 1:
            raise InvalidUpdate("round", f"update for round {task_round}", client=client)
        return check_staleness(self.config, r, task_round, client=client)

    def prepare(self, r: int, client: str, upd: Any, tensors: dict) -> tuple[ValidatedUpdate, float, dict, str]:
        """Validate against the version the client trained on, then turn into a delta."""
        tau = self.check_round(r, upd.round, client)
        base = self.spec_for(upd.round)
        checked = validate_update(tensors, base, max_norm=self.svc.cfg.max_norm, clip=self.svc.cfg.clip,
                                  client=client)
        delta = client_delta(checked.tensors, base, client=client)
        weight = self.config.data_weight(upd.num_examples, client=client)
        return (ValidatedUpdate(delta, checked.norm, checked.clipped), weight, {"staleness": tau},
                update_digest(checked.tensors))

    def spec_for(self, task_round: int) -> UpdateSpec:
        """The update spec (with its reference) of version ``task_round - 1``."""
        spec = self._specs.get(task_round)
        if spec is not None:
            self._specs.move_to_end(task_round)
            return spec
        store = self.svc.store
        digest = store.load_round(task_round - 1, with_partial=False).info.global_digest
        try:
            state = store.load_global(digest).tensors
        except CheckpointPruned:
            raise InvalidUpdate("stale", f"version {task_round - 1} is no longer kept") from None
        spec = UpdateSpec.from_state(self.svc.algorithm.update_spec_state(state))
        self._specs[task_round] = spec
        while len(self._specs) > self.config.max_staleness + 2:
            self._specs.popitem(last=False)
        return spec

    # -- one round --------------------------------------------------------------------------
    def run_round(self, r: int) -> None:
        svc, store = self.svc, self.svc.store
        t0 = time.time()
        info = store.current_round()
        state = store.load_global(info.base_digest).tensors
        spec = self.spec_for(r)
        if info.status == "committed":
            return
        partial = store.checkpoints.get(info.partial_digest) if info.partial_digest else None
        if partial is not None:
            buffer = buffer_from_state(partial, self.config)
        else:
            buffer = DeltaBuffer(self.config)
            buffer.begin(spec, r - 1)
        ingest = None
        svc._current_round = svc.intake.current_round = r
        svc.endpoint.set_round_floor(max(1, r - self.config.max_staleness))
        limit = svc.intake.blob_limit(spec)
        svc.endpoint.blob_limit = lambda sender: limit
        if info.status == "open":
            ingest = RoundIngest.open(store, r, buffer, svc.state_dir / "wal", svc.cfg.ingest_settings())
            to_task = self._to_task
            if not to_task and not any(t < r for t in self.inflight.values()):
                to_task = ingest.book.pending()  # resumed: every waiting participant gets the task again
            self._to_task = []
            if to_task:
                svc.send_tasks(r, state, to_task)
            svc.intake.mode = self
            try:
                svc.intake.collect(r, ingest, spec, time.time() + svc.cfg.round_deadline_s,
                                   dict(svc.endpoint.bytes_from), until=lambda: buffer.full,
                                   close_when_complete=False)
            finally:
                svc.intake.mode = None
            ingest.close()
            svc.intake.flush_rejections()
            if svc._stop.is_set():
                return
            store.seal_round(r, reason="buffer_full" if buffer.full else "deadline")
        if buffer.count:
            aggregate = buffer.apply(state, cast=False, partial=not buffer.full)
            outcome = svc.algorithm.finish_round(r, state, aggregate)
            metrics = {**outcome.metrics, "accepted": buffer.count, "buffer_size": self.config.buffer_size,
                       "staleness": {str(k): v for k, v in sorted(buffer.histogram().items())},
                       "carried": len(self.inflight) - buffer.count, "seconds": round(time.time() - t0, 3)}
            store.close_round(r, outcome.state, metrics)
            svc.progress(f"version {r}: {buffer.count} buffered updates applied (staleness "
                         f"{dict(sorted(buffer.histogram().items()))}) in {time.time() - t0:.1f}s")
        else:
            metrics = {"skipped": "no update before the deadline", "accepted": 0,
                       "seconds": round(time.time() - t0, 3)}
            store.close_round(r, state, metrics)
        event("round_committed", round=r, process_cpu_s=round(time.process_time(), 4), **metrics)
        _metrics.round_committed(metrics)
        for c in buffer.clients:
            self.inflight.pop(c, None)
        try:
            svc._retire(r, buffer, ingest)
        except StateError as exc:  # retention is best effort; the round is committed
            event("retention_failed", round=r, detail=str(exc))
