"""A round's ingest: the in-memory index of who answered, the streaming aggregate, the
write-ahead log with group commit, and periodic checkpoints to the ledger.

Per-update cost does not depend on the fleet size: admitting an update is a dict lookup in
:class:`RoundBook`, folding it is O(update), logging it is one buffered append. Durability is
paid per batch (one fsync for every update that arrived while the previous one ran) and per
checkpoint (every ``checkpoint_every`` updates or ``checkpoint_interval_s`` seconds: the
partial aggregate as a checkpoint file plus one ledger transaction for the whole batch).

Crash contract (``kill -9`` at any instant): an update whose sender was acknowledged is in a
synced log segment or in the checkpoint the ledger names; :meth:`RoundIngest.open` reloads the
checkpoint and folds again the logged updates it does not list, so nothing acknowledged is lost
and nothing is counted twice. Updates that were folded but not yet synced were never
acknowledged; their senders get the Task again after the restart and answer it from their
cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.numpy

from .aggregation import Aggregator
from .errors import InvalidUpdate, StateError
from .ingest_log import IngestLog, LogRecord
from .state import AcceptRecord, StateStore, _contiguous
from .validation import ValidatedUpdate

log = logging.getLogger("cotune.aggregator")

#: participant statuses that may still send an update (a rejected one may send a corrected one)
_OPEN = ("selected", "rejected")


class RoundBook:
    """Who is selected, who answered: the round's index, in memory (the ledger is its durable
    copy, written in batches). Every operation is O(1)."""

    def __init__(self, round: int, statuses: Mapping[str, str]) -> None:
        self.round = round
        self.status = dict(statuses)
        self.n_selected = len(self.status)
        self.accepted = [c for c, s in self.status.items() if s == "accepted"]

    def check(self, client: str) -> None:
        s = self.status.get(client)
        if s is None:
            raise InvalidUpdate("not_selected", f"{client} was not selected for round {self.round}",
                                client=client)
        if s == "accepted":
            raise InvalidUpdate("duplicate", f"{client} already has an accepted update in round "
                                             f"{self.round}", client=client)
        if s not in _OPEN:
            raise InvalidUpdate("late", f"{client} was {s} from round {self.round}", client=client)

    def accept(self, client: str) -> None:
        self.status[client] = "accepted"
        self.accepted.append(client)

    def reject(self, client: str) -> None:
        if self.status.get(client) in _OPEN:
            self.status[client] = "rejected"

    @property
    def pending_count(self) -> int:
        return self.n_selected - len(self.accepted)

    def pending(self) -> list[str]:
        """O(selected): for reports at the deadline, not for the per-update path."""
        return sorted(c for c, s in self.status.items() if s in _OPEN)


@dataclass
class IngestSettings:
    checkpoint_every: int = 256  # accepted updates between partial-aggregate checkpoints
    checkpoint_interval_s: float = 10.0  # ... or at most this long
    sync_batch: int = 256  # fsync at the latest after this many appended updates
    sync_wait_s: float = 0.05  # ... or once the oldest unsynced update waited this long
    fsync: bool = True

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1 or self.sync_batch < 1:
            raise ValueError("checkpoint_every and sync_batch must be >= 1")
        if self.checkpoint_interval_s <= 0 or self.sync_wait_s < 0:
            raise ValueError("checkpoint_interval_s must be > 0 and sync_wait_s >= 0")


class RoundIngest:
    """The accepting side of one open round. One writer: the service's ingest loop."""

    def __init__(self, store: StateStore, round: int, agg: Aggregator, book: RoundBook,
                 log_dir: str | Path, settings: IngestSettings | None = None,
                 clock: Callable[[], float] = time.time, *, worker: int | None = None) -> None:
        self.store, self.round, self.agg, self.book = store, round, agg, book
        self.worker = worker
        self.settings = settings or IngestSettings()
        self.clock = clock
        self.log_dir = Path(log_dir)
        self.log = IngestLog(self.log_dir, round, fsync=self.settings.fsync)
        self._durable: list[LogRecord] = []  # synced, not yet in a checkpoint
        self._first_unsynced = 0.0
        self._last_checkpoint = time.monotonic()
        self.partial_digest = (store.current_round().partial_digest if worker is None
                               else store.worker_partials(round).get(worker, (None, False))[0])
        self.replayed = 0
        self.stats = {"syncs": 0, "checkpoints": 0, "logged_bytes": 0}

    @classmethod
    def open(cls, store: StateStore, round: int, agg: Aggregator, log_dir: str | Path,
             settings: IngestSettings | None = None, clock: Callable[[], float] = time.time, *,
             worker: int | None = None, shard: Callable[[str], bool] | None = None) -> RoundIngest:
        """The ingest of an open round, recovered: ``agg`` holds the ledger's partial aggregate
        (the round's, or ingest worker ``worker``'s); logged updates it does not contain are
        folded again and checkpointed at once. ``shard``: which clients this ingest takes."""
        statuses = store.participant_statuses(round)
        if shard is not None:
            statuses = {c: s for c, s in statuses.items() if shard(c)}
        book = RoundBook(round, statuses)
        in_checkpoint = set(agg.clients)
        listed_accepted = set(book.accepted)
        if in_checkpoint != listed_accepted:
            raise StateError(f"round {round}: the partial aggregate holds {len(in_checkpoint)} clients, the "
                             f"ledger lists {len(listed_accepted)} accepted; they diverged")
        recovered: list[LogRecord] = []
        for rec in IngestLog.replay(log_dir, round):
            if rec.client in in_checkpoint or book.status.get(rec.client) not in _OPEN:
                continue
            agg.add(rec.client, rec.tensors, weight=rec.weight, **rec.fold)
            book.accept(rec.client)
            in_checkpoint.add(rec.client)
            rec.tensors = {}
            recovered.append(rec)
        ingest = cls(store, round, agg, book, log_dir, settings, clock, worker=worker)
        if recovered:
            ingest.replayed = len(recovered)
            ingest._durable = recovered
            ingest.checkpoint()
        return ingest

    # -- the per-update path -------------------------------------------------------------
    def accept(self, client: str, update: ValidatedUpdate, *, weight: float, num_examples: int,
               update_digest: str | None, metrics: Mapping[str, Any],
               fold: Mapping[str, Any] | None = None, tensor_bytes: bytes | None = None) -> str:
        """Fold and log one update (not yet durable: see :meth:`sync`); returns its digest.
        ``update_digest`` None: the digest of the tensors as logged (one serialisation serves
        both). ``tensor_bytes``: a safetensors file of exactly ``update.tensors`` (the blob as
        received) to log instead of serialising them again. Raises :class:`InvalidUpdate`
        without changing anything when it cannot be counted."""
        self.book.check(client)
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
            raise InvalidUpdate("weight", f"num_examples must be a positive integer, got {num_examples!r}",
                                client=client)
        fold = dict(fold or {})  # extra arguments of the rule's add (a buffer's staleness)
        self.agg.add(client, update.tensors, weight=weight, **fold)  # checks everything before it folds
        if tensor_bytes is None:
            tensor_bytes = safetensors.numpy.save(_contiguous(update.tensors))
        if update_digest is None:
            update_digest = hashlib.sha256(tensor_bytes).hexdigest()
        rec = LogRecord(self.round, client, float(weight), int(num_examples), update_digest, self.clock(),
                        dict(metrics), dict(update.tensors), fold)
        try:
            self.log.append(rec, tensor_bytes)
        except OSError as exc:
            # the aggregate now holds an update the log does not: stop; a restart recovers the
            # last checkpoint plus the log, where this update is absent (it was not acknowledged)
            raise StateError(f"cannot append to the ingest log in {self.log_dir}: {exc}") from exc
        if self.log.unsynced == 1:
            self._first_unsynced = time.monotonic()
        self.book.accept(client)
        return update_digest

    def sync_due(self, idle: bool) -> bool:
        n = self.log.unsynced
        return n > 0 and (idle or n >= self.settings.sync_batch
                          or time.monotonic() - self._first_unsynced >= self.settings.sync_wait_s)

    def sync(self) -> list[LogRecord]:
        """Group commit: one fsync makes every appended update durable; returns them (their
        senders may be acknowledged now)."""
        done = self.log.sync()
        if done:
            self.stats["syncs"] += 1
            self._durable.extend(done)
        return done

    def checkpoint_due(self) -> bool:
        """K updates, T seconds, or every selected client answered (an ingest worker's
        coordinator reads completion from the ledger: it must not wait for T)."""
        return bool(self._durable) and (
            len(self._durable) >= self.settings.checkpoint_every
            or self.book.pending_count == 0
            or time.monotonic() - self._last_checkpoint >= self.settings.checkpoint_interval_s)

    def checkpoint(self) -> str | None:
        """Write the partial aggregate and, in one ledger transaction, mark every update since
        the previous checkpoint accepted and point the round at it; then delete the log
        segments and the previous partial it replaces."""
        self.sync()
        if not self._durable:
            return self.partial_digest
        seq = self.log.rotate()
        state = self.agg.state_dict()
        digest = self.store.checkpoints.put(state.tensors, state.meta)
        records = [AcceptRecord(r.client, r.update_digest, r.num_examples, r.metrics, r.received_at)
                   for r in self._durable]
        if self.worker is None:
            self.store.accept_many(self.round, records, digest)
        else:
            self.store.accept_many(self.round, records, digest, worker=self.worker)
        self.partial_digest = digest  # the ledger deleted the partial it replaces
        self.stats["logged_bytes"] = self.log.bytes_written
        self.log.drop_before(seq)
        self._durable = []
        self._last_checkpoint = time.monotonic()
        self.stats["checkpoints"] += 1
        return digest

    def close(self) -> None:
        """Checkpoint what is left and stop logging (the round is about to be sealed)."""
        self.checkpoint()
        self.log.close()

    def discard(self) -> None:
        """After the round committed: its log and partial checkpoint are no longer needed."""
        self.log.close()
        IngestLog.discard_round(self.log_dir, self.round)
        if self.partial_digest:
            with contextlib.suppress(StateError):
                self.store.checkpoints.delete(self.partial_digest)


def durable_clients(records: Iterable[LogRecord]) -> list[str]:
    return [r.client for r in records]
