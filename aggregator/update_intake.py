"""The path of a client's update from the inbox to a durable, acknowledged contribution.

One implementation, used by the aggregator service (single-process ingest) and by each ingest
worker process (several per host, or on several hosts): admit (the round's in-memory index),
take the blob once it is complete without holding up anyone else, validate, fold and log
(:class:`~aggregator.ingest.RoundIngest`), commit the log per batch and acknowledge the batch,
and write rejections to the ledger in batches.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from algorithms.base import AlgorithmError, unpack_state
from bridge.blobs import BlobRef
from bridge.endpoint import Endpoint, Inbound
from bridge.errors import BridgeError
from bridge.messages import ErrorReport, Note, Update

from . import metrics as _metrics
from .dp import ServerDP
from .errors import InvalidUpdate
from .ingest import RoundIngest
from .intake import check_update
from .state import EventRecord
from .validation import UpdateSpec

log = logging.getLogger("cotune.aggregator")


@dataclass
class TakenBlob:
    """An update whose blob completed: its parsed tensors and the bytes they came from (with
    their verified SHA-256), or why it could not be used (``error``: reason, detail)."""

    client: str
    update: Update
    tensors: dict | None = None
    raw: tuple[bytes, str] | None = None
    error: tuple[str, str] | None = None


class BlobWaiter:
    """The update blobs asked for and not yet taken, one per client: a round's intake (and a
    secure round's masked step) takes each once it is complete, never waiting on one sender."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.waiting: dict[str, tuple[Update, BlobRef]] = {}

    def __len__(self) -> int:
        return len(self.waiting)

    def want(self, r: int, client: str, upd: Update, ref: BlobRef) -> None:
        """Ask for ``client``'s blob; a different blob it asked for before is given up."""
        previous = self.waiting.pop(client, None)
        if previous is not None and previous[1].sha256 != ref.sha256:
            self.endpoint.drop_blob(previous[1], client)
        self.endpoint.want_blob(ref, client, round=r)
        self.waiting[client] = (upd, ref)

    def take_completed(self) -> Iterator[TakenBlob]:
        """Each blob that completed since the last call, parsed (its parts deleted either way)."""
        for client in [c for c, (_, ref) in self.waiting.items() if self.endpoint.blob_done(ref, c)]:
            upd, ref = self.waiting.pop(client)
            try:
                res = self.endpoint.take_blob(ref, client)
            except BridgeError as exc:
                yield TakenBlob(client, upd, error=("transport", str(exc)))
                continue
            try:
                data = res.read()
                tensors = unpack_state(data)
            except Exception as exc:  # noqa: BLE001 - any bad blob is one client's problem
                yield TakenBlob(client, upd, error=("names", f"update blob is not a tensor file: {exc}"))
                continue
            finally:
                res.discard()
            yield TakenBlob(client, upd, tensors, (data, ref.sha256))

    def drop_all(self) -> list[str]:
        """Give up every blob still awaited (the step closed); returns their senders."""
        clients = list(self.waiting)
        for client, (_upd, ref) in self.waiting.items():
            self.endpoint.drop_blob(ref, client)
        self.waiting = {}
        return clients


def _as_parsed(checked, parsed: dict) -> bool:
    """Validation passed the parsed tensors through: not clipped, same names and dtypes (a
    reinterpreted wire dtype would log other bytes than the ones folded)."""
    return not checked.clipped and checked.tensors.keys() == parsed.keys() and all(
        a.dtype == parsed[n].dtype and a.shape == parsed[n].shape for n, a in checked.tensors.items())


def event(kind: str, **fields) -> None:
    """Structured log line: one JSON object per event."""
    log.info(json.dumps({"event": kind, **fields}, default=str, sort_keys=True))


_event = event


class UpdateIntake:
    """Takes updates for the open round from an endpoint's inbox. ``on_other`` receives every
    inbound message that is not an Update."""

    def __init__(self, endpoint: Endpoint, algorithm: Any, rule: str, cfg: Any, store: Any, *,
                 stop: threading.Event, progress: Callable[[str], None],
                 on_other: Callable[[Inbound], None] | None = None) -> None:
        self.endpoint, self.algorithm, self.rule, self.cfg = endpoint, algorithm, rule, cfg
        self.store = store
        self.stop = stop
        self.progress = progress
        self.on_other = on_other or (lambda inbound: _event("ignored", client=inbound.sender,
                                                            type=inbound.message.TYPE))
        self.current_round = 0
        #: None: synchronous rounds; else the buffered-rounds policy (aggregator/buffered_rounds.py)
        self.mode = None
        #: client-level DP (aggregator/dp.py): clipped updates, unit weights; None when off
        self.dp = ServerDP.build(getattr(cfg, "dp", None), algorithm=cfg.algorithm, rule=rule,
                                 fraction=cfg.fraction, rounds=cfg.rounds, mode=cfg.mode)
        self.blobs = BlobWaiter(endpoint)
        self.rejections: list[tuple[int, str, str, str]] = []
        #: (round, sender, reason) -> [frames, first at, last at, first detail]
        self.wire_rejections: dict[tuple, list] = {}
        self._wire_lock = threading.Lock()
        self._last_flush = time.monotonic()
        endpoint.on_reject = self.on_bridge_reject

    def collect(self, r: int, ingest: RoundIngest, spec: UpdateSpec, deadline: float,
                bytes_at_start: dict, *, until: Callable[[], bool] | None = None,
                close_when_complete: bool = True) -> None:
        """Take updates until every selected client answered (``close_when_complete``), the
        deadline passed or ``until()`` says so. Each loop pass handles one message, hands over
        blobs that completed, and commits the log when the inbox ran dry or the batch is full
        (group commit), acknowledging that batch."""
        self.blobs.drop_all()
        self.book = ingest.book  # the status page's live counts (the ledger lags by a checkpoint)
        while not self.stop.is_set():
            if close_when_complete and ingest.book.pending_count == 0:
                break
            if until is not None and until():
                break
            now = time.time()
            if now >= deadline:
                _event("deadline", round=r, pending=len(ingest.book.pending()))
                break
            wait = 0.0 if ingest.log.unsynced else min(0.25 if self.blobs else 0.5, deadline - now)
            inbound = self.endpoint.recv(timeout=wait) if wait > 0 else self.endpoint.recv_nowait()
            if inbound is not None:
                if isinstance(inbound.message, Update):
                    self.on_update(r, inbound.sender, inbound.message, ingest, spec, bytes_at_start)
                else:
                    self.on_other(inbound)
            if self.blobs:
                self.take_blobs(r, ingest, spec, bytes_at_start)
            idle = inbound is None or self.endpoint.inbox_size() == 0
            if ingest.sync_due(idle):
                self.acknowledge(r, ingest.sync())
            if ingest.checkpoint_due():
                ingest.checkpoint()
            if self.flush_due(idle):
                self.flush_rejections()
        self.acknowledge(r, ingest.sync())
        for client in self.blobs.drop_all():
            if not self.stop.is_set():
                self.reject(r, client, "transport", "the update blob did not arrive before the round closed",
                             ingest)

    def on_update(self, r: int, client: str, upd: Update, ingest: RoundIngest, spec: UpdateSpec,
                   bytes_at_start: dict) -> None:
        try:
            if self.mode is not None:
                self.mode.check_round(r, upd.round, client)
            elif upd.round != r:
                raise InvalidUpdate("round", f"update for round {upd.round}, current round is {r}", client=client)
            ingest.book.check(client)
            if upd.algorithm != self.cfg.algorithm:
                raise InvalidUpdate("names", f"update for algorithm {upd.algorithm!r}, federation runs "
                                             f"{self.cfg.algorithm!r}", client=client)
            if not upd.tensors:
                if "update" not in upd.blobs:
                    raise InvalidUpdate("names", "update carries neither inline tensors nor an 'update' blob",
                                        client=client)
                # the blob is taken once complete, without holding up other clients' updates
                self.blobs.want(r, client, upd, upd.blob("update"))
                return
        except InvalidUpdate as exc:
            self.reject(r, client, exc.reason, str(exc), ingest)
            return
        self.ingest(r, client, upd, dict(upd.tensors), ingest, spec, bytes_at_start)

    def take_blobs(self, r: int, ingest: RoundIngest, spec: UpdateSpec, bytes_at_start: dict) -> None:
        for t in self.blobs.take_completed():
            if t.error is not None:
                self.reject(r, t.client, *t.error, ingest)
            else:
                # the blob as received (its SHA-256 checked against the reference) can be the
                # log's copy of the update when validation leaves the tensors as they came
                self.ingest(r, t.client, t.update, t.tensors, ingest, spec, bytes_at_start, raw=t.raw)

    def ingest(self, r: int, client: str, upd: Update, tensors: dict, ingest: RoundIngest, spec: UpdateSpec,
                bytes_at_start: dict, raw: tuple[bytes, str] | None = None) -> None:
        """Validate, weigh, fold and log one update. ``raw``: the safetensors bytes the tensors
        were parsed from and their verified SHA-256; logged as they are (no second
        serialisation, no second hash) when validation returned the parsed tensors unchanged."""
        started = time.perf_counter()
        tensor_bytes = None
        try:
            fold: dict = {}
            if self.mode is not None:  # buffered rounds: a delta against the version it trained on
                checked, weight, fold, digest = self.mode.prepare(r, client, upd, tensors)
            elif self.dp is not None:  # clipped to C, unweighted (aggregator/dp.py)
                checked, weight = self.dp.check(tensors, spec, client, max_norm=self.cfg.max_norm,
                                                clip=self.cfg.clip)
                digest = None
            else:
                checked = check_update(self.algorithm, self.rule, tensors, spec, client=client,
                                       max_norm=self.cfg.max_norm, clip=self.cfg.clip)
                weight = self.algorithm.update_weight(upd.metrics, self.capped_examples(upd.num_examples))
                digest = None  # computed from the bytes the log writes anyway
                if raw is not None and _as_parsed(checked, tensors):
                    tensor_bytes, digest = raw
            metrics = {**upd.metrics, "num_examples": upd.num_examples, "norm": checked.norm,
                       "clipped": checked.clipped, **fold,
                       "bytes_up": self.endpoint.bytes_from[client] - bytes_at_start.get(client, 0)}
            ingest.accept(client, checked, weight=weight, num_examples=upd.num_examples,
                          update_digest=digest, metrics=metrics, fold=fold, tensor_bytes=tensor_bytes)
        except InvalidUpdate as exc:
            self.reject(r, client, exc.reason, str(exc), ingest)
            return
        except (BridgeError, AlgorithmError) as exc:
            self.reject(r, client, "payload", str(exc), ingest)
            return
        _metrics.update_accepted(time.perf_counter() - started)
        if self.cfg.log_accepts:
            _event("accepted", round=r, client=client, num_examples=upd.num_examples, norm=round(checked.norm, 6))
        if ingest.book.n_selected <= 64:
            self.progress(f"round {r}: accepted {client} ({upd.num_examples} examples, |delta| {checked.norm:.3g})")
        elif len(ingest.book.accepted) % 1000 == 0:
            self.progress(f"round {r}: {len(ingest.book.accepted)}/{ingest.book.n_selected} updates accepted")

    def capped_examples(self, n):
        """The weight-bearing example count: num_examples capped by ``max_num_examples``
        (a non-integer is left to the ledger's check, which rejects it with reason weight)."""
        cap = self.cfg.max_num_examples
        if cap is not None and isinstance(n, int) and not isinstance(n, bool) and n > cap:
            return cap
        return n

    def blob_limit(self, spec: UpdateSpec) -> int:
        """The largest update blob this round accepts from one client."""
        if self.cfg.max_update_bytes is not None:
            return int(self.cfg.max_update_bytes)
        if self.rule == "collect":
            return 512 * 1024 * 1024
        size = sum(math.prod(t.shape) * (4 if t.dtype == "float32" else 2) for t in spec.tensors.values())
        return int(size * 1.1) + (1 << 20)

    def acknowledge(self, r: int, records: list) -> None:
        """Tell each sender of a now-durable update that it is counted (after the group commit,
        never before: an acknowledged update survives any crash)."""
        if not self.cfg.acknowledge_updates:
            return
        for rec in records:
            try:
                self.endpoint.send(rec.client, Note("accepted", {"update_digest": rec.update_digest}, round=r),
                                   round=r)
            except BridgeError as exc:
                log.info("could not acknowledge %s: %s", rec.client, exc)

    def reject(self, r: int, client: str, reason: str, detail: str, ingest: RoundIngest | None = None) -> None:
        """Counted in memory and written to the ledger in batches: a flood of bad updates costs
        one transaction per batch, not one per update."""
        if ingest is not None:
            ingest.book.reject(client)
        self.rejections.append((r, client, reason, detail[:500]))
        _metrics.update_rejected(reason)
        if self.cfg.log_accepts or len(self.rejections) < 64:
            _event("rejected", round=r, client=client, reason=reason, detail=detail[:500])
        if ingest is None or ingest.book.n_selected <= 64:
            self.progress(f"round {r}: rejected update from {client}: {reason}: {detail}")
        try:
            self.endpoint.send(client, ErrorReport(reason, detail[:500], round=r), round=r)
        except BridgeError as exc:
            log.warning("could not tell %s about the rejection: %s", client, exc)

    def flush_rejections(self) -> None:
        rows, self.rejections = self.rejections, []
        with self._wire_lock:
            wire, self.wire_rejections = self.wire_rejections, {}
        self._last_flush = time.monotonic()
        by_round: dict[int, list] = {}
        for r, client, reason, detail in rows:
            by_round.setdefault(r, []).append((client, reason, detail))
        for r, items in by_round.items():
            self.store.reject_many(r, items)
        if wire:
            self.store.record_events([
                EventRecord("wire_rejected", r, sender, code,
                            json.dumps({"frames": w[0], "last_s": round(w[2] - w[1], 3), "first": w[3]}), w[1])
                for (r, sender, code), w in wire.items()])

    def flush_due(self, idle: bool) -> bool:
        return bool(self.rejections or self.wire_rejections) and (
            len(self.rejections) >= 256 or (idle and time.monotonic() - self._last_flush >= 1.0))

    def on_bridge_reject(self, exc: BridgeError, sender: str | None) -> None:
        """Frames the bridge refused (replayed, tampered, stale, rate-limited...): counted by the
        endpoint, summarised here per (round, sender, reason) and written by the ingest loop in
        one transaction per second at most (this runs on the receive thread, which must never
        wait for the database). A flood therefore costs one ledger row per sender and reason,
        holding the frame count, the span and the first frame's detail."""
        now = time.time()
        key = (self.current_round or None, sender, exc.code)
        with self._wire_lock:
            w = self.wire_rejections.get(key)
            if w is None:
                if len(self.wire_rejections) >= 10_000:  # bounded: more senders fold into one row
                    key = (key[0], None, exc.code)
                    w = self.wire_rejections.get(key)
                if w is None:
                    self.wire_rejections[key] = [1, now, now, str(exc)[:300]]
                    return
            w[0] += 1
            w[2] = now

