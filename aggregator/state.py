"""Durable state of a federation: a SQL ledger plus content-addressed checkpoint files.

Why two stores: tensors are large and immutable, so they live in files named by their
SHA-256 (written tmp + fsync + rename + fsync dir, never overwritten); the ledger is small and
transactional, so it lives in a SQL database and refers to files only by digest. One store
holds one federation.

Backends (:func:`open_store`): a file path opens SQLite (WAL, ``synchronous=FULL``), the
embedded default; a ``postgresql://`` DSN opens PostgreSQL (psycopg 3, the ``postgres``
extra) for deployments where the ledger must outlive or be shared beyond one machine. Both
get the same schema, the same API and the same guarantees; the few dialect differences live
in :mod:`aggregator.state_sql`. The checkpoint directory is a filesystem directory with either
backend: a multi-host deployment puts it on shared storage (NFS, a cluster filesystem) that
every host mounts at the same path; an object-store backend for checkpoints is future work.
Writes are serialized (one write transaction at a time per ledger) on both backends; one
process (the aggregator's coordinator) is assumed to drive a federation's rounds, while others
may read and append events.

Crash contract (``kill -9`` at any instant, then restart): accepting updates first writes
the new partial-aggregate checkpoint file, then ONE transaction marks the participants
accepted and points the round at that file. Either both happened or the ledger still names the
old partial, so a participant row is ``accepted`` exactly when its contribution is inside the
partial aggregate the round references. (:meth:`StateStore.accept_many` with no partial
digest records a batch ahead of its checkpoint: the caller's write-ahead log then holds those
updates until :meth:`StateStore.set_partial` names a partial that contains them.) A file
written by a killed accept is merely unreferenced and goes away with
:meth:`StateStore.garbage_collect`; a partial superseded by a newer one is deleted once the
transaction naming the newer one has committed.

Round life cycle: round 0 is the initial global state (committed by
:meth:`StateStore.init_federation`); then ``open`` (accepting) -> ``closed`` (sealed by quorum
or deadline, server-side step running; optional) -> ``committed`` (new global checkpoint).

Retention: a committed round's partial aggregate (and, when the store knows the spill
directory, the spilled updates it lists) is deleted at commit. With ``keep_globals=N`` (or
:meth:`StateStore.prune`) only the global states of the last N committed rounds are kept, so
disk stays bounded however many rounds run. What was deleted is recorded in the ledger:
asking for it raises :class:`CheckpointPruned` instead of a bare "missing file".

The ledger is the durable copy of a round, not its index: the ingest keeps who answered in
memory (:meth:`StateStore.participant_statuses` rebuilds it) and writes accepted updates,
rejections and events in batches, one transaction each (:meth:`StateStore.accept_many`,
:meth:`StateStore.reject_many`, :meth:`StateStore.record_events`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from .errors import CheckpointCorrupt, InvalidUpdate, SchemaVersionError, StateError
from .state_sql import Database, connect, is_postgres_target

SCHEMA_VERSION = 3
CHECKPOINT_FORMAT = "cotune.checkpoint"
CHECKPOINT_VERSION = 1
_META_KEY = "cotune"  # the only safetensors metadata key, so the header bytes are deterministic
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = ".safetensors"
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is not one we wrote


class CheckpointPruned(StateError):
    """A checkpoint the ledger deliberately deleted: a global state older than the retention
    (``keep_globals``) or the partial aggregate of a committed round."""

    code = "checkpoint_pruned"


# --------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """Tensors plus JSON-able metadata; what a checkpoint file holds. ``digest`` is set when
    the checkpoint was read from or written to a :class:`CheckpointStore`."""

    tensors: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    digest: str | None = None


def encode_checkpoint(
    tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
) -> bytes:
    """Canonical safetensors bytes: tensors sorted by the format, one metadata key holding
    sorted compact JSON, so equal content gives equal bytes and an equal digest."""
    header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "meta": dict(meta or {})}
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return safetensors.numpy.save(_contiguous(tensors), metadata={_META_KEY: text})


def update_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of the canonical bytes of an update: safetensors without metadata."""
    return hashlib.sha256(safetensors.numpy.save(_contiguous(tensors))).hexdigest()


def _contiguous(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # safetensors reads raw memory: a non-contiguous view would be written scrambled.
    # (np.ascontiguousarray is avoided because it turns 0-d arrays into 1-d.)
    return {n: a if a.flags.c_contiguous else a.copy(order="C") for n, a in tensors.items()}


class CheckpointStore:
    """A directory of immutable safetensors files named ``<sha256>.safetensors``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not _DIGEST_RE.match(digest):
            raise StateError(f"not a sha256 hex digest: {digest!r}")
        return self.dir / f"{digest}{_SUFFIX}"

    def put(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> str:
        """Write durably and return the digest. Existing content is not rewritten, only
        touched, so a concurrent :meth:`garbage_collect` grace period covers it again."""
        data = encode_checkpoint(tensors, meta)
        digest = hashlib.sha256(data).hexdigest()
        final = self.path(digest)
        if final.exists():
            os.utime(final)
            return digest
        tmp = self.dir / f".tmp-{digest[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(self.dir)
        return digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def get(self, digest: str, *, verify: bool = True) -> Checkpoint:
        """Read a whole checkpoint; with ``verify`` its bytes must hash to ``digest``."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise StateError(f"checkpoint {digest} is missing from {self.dir}") from None
        if verify and hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointCorrupt(f"checkpoint {digest} does not hash to its name")
        try:
            tensors = safetensors.numpy.load(data)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointCorrupt(f"checkpoint {digest} is not valid safetensors: {exc}") from exc
        return Checkpoint(tensors, _parse_meta(_raw_metadata(data), digest), digest)

    def read_tensor(self, digest: str, name: str) -> np.ndarray:
        """One tensor of a checkpoint, without reading the others (memory-mapped header)."""
        try:
            with safetensors.safe_open(str(self.path(digest)), framework="numpy") as fh:
                return fh.get_tensor(name)
        except FileNotFoundError:
            raise StateError(f"checkpoint {digest} is missing from {self.dir}") from None
        except Exception as exc:
            raise CheckpointCorrupt(
                f"cannot read tensor {name!r} of checkpoint {digest}: {exc}"
            ) from exc

    def read_meta(self, digest: str) -> dict[str, Any]:
        """The metadata of a checkpoint, reading only its header (the bytes are not hashed)."""
        try:
            with open(self.path(digest), "rb") as fh:
                size = fh.read(8)
                n = int.from_bytes(size, "little")
                if len(size) != 8 or n > _MAX_HEADER:
                    raise CheckpointCorrupt(f"checkpoint {digest} has no safetensors header")
                header = fh.read(n)
        except FileNotFoundError:
            raise StateError(f"checkpoint {digest} is missing from {self.dir}") from None
        return _parse_meta(_raw_metadata(size + header), digest)

    def verify(self, digest: str) -> None:
        """Raise unless the file exists and hashes to its name (streamed, O(1) memory)."""
        h = hashlib.sha256()
        try:
            with open(self.path(digest), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        except FileNotFoundError:
            raise StateError(f"checkpoint {digest} is missing from {self.dir}") from None
        if h.hexdigest() != digest:
            raise CheckpointCorrupt(f"checkpoint {digest} does not hash to its name")

    def digests(self) -> list[str]:
        names = (p.name[: -len(_SUFFIX)] for p in self.dir.glob(f"*{_SUFFIX}"))
        return sorted(n for n in names if _DIGEST_RE.match(n))

    def delete(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def sweep(self, keep: set[str], *, min_age_s: float = 60.0) -> list[str]:
        """Delete files not in ``keep`` and leftover tmp files, if older than ``min_age_s``
        (the grace period protects a file written but not yet referenced)."""
        cutoff = time.time() - min_age_s
        removed = []
        for digest in self.digests():
            path = self.path(digest)
            if digest not in keep and _mtime(path) <= cutoff:
                self.delete(digest)
                removed.append(digest)
        for tmp in self.dir.glob(".tmp-*"):
            if _mtime(tmp) <= cutoff:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        if removed:
            _fsync_dir(self.dir)
        return removed

    def usage(self) -> dict[str, int]:
        files = [self.path(d) for d in self.digests()]
        return {"files": len(files), "bytes": sum(_size(p) for p in files)}


def _raw_metadata(data: bytes) -> dict[str, str]:
    # The safetensors layout: u64 little-endian header length, then the JSON header.
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        return dict(header.get("__metadata__") or {})
    except (ValueError, AttributeError) as exc:
        raise CheckpointCorrupt(f"unreadable safetensors header: {exc}") from exc


def _parse_meta(raw: Mapping[str, str], digest: str) -> dict[str, Any]:
    try:
        header = json.loads(raw[_META_KEY])
    except (KeyError, ValueError) as exc:
        raise CheckpointCorrupt(f"checkpoint {digest} has no cotune metadata") from exc
    if header.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointCorrupt(f"checkpoint {digest} is not a {CHECKPOINT_FORMAT} file")
    if header.get("version") != CHECKPOINT_VERSION:
        raise CheckpointCorrupt(
            f"checkpoint {digest} has format version {header.get('version')}, this build reads {CHECKPOINT_VERSION}"
        )
    return dict(header.get("meta") or {})


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on Windows, where it is skipped.
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return math.inf


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------- ledger records

ROUND_STATUSES = ("open", "closed", "committed")
PARTICIPANT_STATUSES = ("selected", "accepted", "rejected", "dropped")


@dataclass(frozen=True)
class FederationInfo:
    id: str
    algorithm: str
    config: dict[str, Any]
    created: float


@dataclass(frozen=True)
class RoundInfo:
    round: int
    status: str
    selected: tuple[str, ...]
    deadline: float | None
    opened_at: float
    closed_at: float | None
    base_digest: str | None  # global state the round started from
    partial_digest: str | None  # partial aggregate holding exactly the accepted updates
    global_digest: str | None  # global state committed by this round
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Participant:
    round: int
    client: str
    status: str
    reason: str | None
    num_examples: int | None
    update_digest: str | None
    metrics: dict[str, Any]
    received_at: float | None


@dataclass(frozen=True)
class Event:
    id: int
    at: float
    round: int | None
    client: str | None
    kind: str
    reason: str | None
    detail: str | None


@dataclass
class RoundState:
    """A round with its participants and, while not committed, its partial aggregate."""

    info: RoundInfo
    participants: dict[str, Participant]
    partial: Checkpoint | None

    def clients(self, status: str) -> list[str]:
        return sorted(c for c, p in self.participants.items() if p.status == status)

    @property
    def accepted(self) -> list[str]:
        return self.clients("accepted")


@dataclass(frozen=True)
class AcceptRecord:
    """One update of an :meth:`StateStore.accept_many` batch. ``received_at`` is when the
    update arrived (seconds since the epoch; None: the time of the batch)."""

    client: str
    update_digest: str
    num_examples: int
    metrics: Mapping[str, Any] = field(default_factory=dict)
    received_at: float | None = None


@dataclass(frozen=True)
class EventRecord:
    """One event of an :meth:`StateStore.record_events` batch (``at`` None: the time of the
    batch)."""

    kind: str
    round: int | None = None
    client: str | None = None
    reason: str | None = None
    detail: str | None = None
    at: float | None = None


# Portable DDL: ``{serial_pk}`` is the dialect's autoincrementing id (SQLite's rowid alias
# ``INTEGER PRIMARY KEY``, PostgreSQL's ``BIGSERIAL PRIMARY KEY``).
_PRUNED_TABLE = """CREATE TABLE pruned (
        digest TEXT PRIMARY KEY,
        round INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('global', 'partial')),
        at DOUBLE PRECISION NOT NULL)"""

# the partial aggregates of scale-out ingest workers (aggregator/workers.py), one per worker
_WORKERS_TABLE = """CREATE TABLE worker_partials (
        round INTEGER NOT NULL,
        worker INTEGER NOT NULL,
        digest TEXT,
        final INTEGER NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (round, worker))"""

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE federation (
        id TEXT PRIMARY KEY,
        algorithm TEXT NOT NULL,
        config TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE rounds (
        round INTEGER PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('open', 'closed', 'committed')),
        selected TEXT NOT NULL,
        deadline DOUBLE PRECISION,
        opened_at DOUBLE PRECISION NOT NULL,
        closed_at DOUBLE PRECISION,
        base_digest TEXT,
        partial_digest TEXT,
        global_digest TEXT,
        metrics TEXT NOT NULL)""",
    """CREATE TABLE participants (
        round INTEGER NOT NULL REFERENCES rounds (round),
        client TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('selected', 'accepted', 'rejected', 'dropped')),
        reason TEXT,
        num_examples INTEGER,
        update_digest TEXT,
        metrics TEXT NOT NULL,
        received_at DOUBLE PRECISION,
        PRIMARY KEY (round, client))""",
    """CREATE TABLE events (
        id {serial_pk},
        at DOUBLE PRECISION NOT NULL,
        round INTEGER,
        client TEXT,
        kind TEXT NOT NULL,
        reason TEXT,
        detail TEXT)""",
    "CREATE INDEX events_round ON events (round)",
    _PRUNED_TABLE,
    _WORKERS_TABLE,
)

#: schema version -> the statements that bring a ledger of that version to the next one
_MIGRATIONS: dict[int, tuple[str, ...]] = {1: (_PRUNED_TABLE,), 2: (_WORKERS_TABLE,)}

_UPSERT_WORKER = (
    "INSERT INTO worker_partials (round, worker, digest, final, updated_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (round, worker) DO UPDATE SET digest = excluded.digest, final = excluded.final,"
    " updated_at = excluded.updated_at"
)

_INSERT_EVENT = (
    "INSERT INTO events (at, round, client, kind, reason, detail) VALUES (?, ?, ?, ?, ?, ?)"
)


# --------------------------------------------------------------------------- the store


def open_store(
    target: str | os.PathLike[str],
    *,
    checkpoints: CheckpointStore | str | os.PathLike[str] | None = None,
    clock: Callable[[], float] = time.time,
    keep_globals: int | None = None,
    spill: CheckpointStore | str | os.PathLike[str] | None = None,
) -> StateStore:
    """Open (creating if needed) the ledger at ``target``: a SQLite file path, or a
    ``postgresql://`` DSN (which needs ``checkpoints``). See :class:`StateStore`."""
    return StateStore(
        target, checkpoints=checkpoints, clock=clock, keep_globals=keep_globals, spill=spill
    )


class _BatchRefused(Exception):
    """Inside accept_many: some row of the batch was not acceptable (rolls the batch back)."""


@dataclass(frozen=True)
class _Head:
    """The columns of a round a write needs, without parsing its JSON columns."""

    round: int
    status: str
    deadline: float | None
    partial_digest: str | None
    current: bool  # the latest round


class StateStore:
    """The federation ledger (SQLite or PostgreSQL) plus its :class:`CheckpointStore`.

    ``target`` is a SQLite database path or a ``postgresql://`` DSN. ``checkpoints`` defaults
    to ``<path>.checkpoints/`` beside a SQLite database; a PostgreSQL ledger needs it named
    (on shared storage when several hosts use the ledger). ``clock`` returns seconds since the
    epoch; tests inject one to move deadlines. ``keep_globals`` (None: keep all) prunes
    global states beyond the last N committed rounds at every :meth:`close_round`. ``spill``
    is the directory of the aggregators' spilled updates: given, the spill files a committed
    round's partial lists are deleted with it.
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        *,
        checkpoints: CheckpointStore | str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
        keep_globals: int | None = None,
        spill: CheckpointStore | str | os.PathLike[str] | None = None,
    ) -> None:
        if is_postgres_target(target) and checkpoints is None:
            raise StateError(
                "a PostgreSQL ledger needs checkpoints=<directory> (shared storage when several"
                " hosts use it)"
            )
        self.keep_globals = None if keep_globals is None else _retention(keep_globals)
        self._clock = clock
        self._db: Database = connect(target)
        self.backend = self._db.backend
        #: the SQLite database file (None on PostgreSQL); ``where`` names either for messages
        self.path: Path | None = getattr(self._db, "path", None)
        self.where = self._db.where
        try:
            if not isinstance(checkpoints, CheckpointStore):
                checkpoints = CheckpointStore(checkpoints or Path(f"{self.path}.checkpoints"))
            self.checkpoints = checkpoints
            if spill is not None and not isinstance(spill, CheckpointStore):
                spill = CheckpointStore(spill)
            self.spill: CheckpointStore | None = spill
            self._init_schema()
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, self._db.Error):
                raise StateError(f"cannot open state database {self.where}: {exc}") from exc
            raise

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self) -> contextlib.AbstractContextManager[Database]:
        return self._db.transaction()

    def _init_schema(self) -> None:
        with self._tx() as db:
            if not db.table_exists("meta"):
                for stmt in _SCHEMA:
                    db.execute(db.ddl(stmt))
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                return
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            found = row[0] if row else None
            if _migratable(found):
                for version in range(int(found), SCHEMA_VERSION):
                    for stmt in _MIGRATIONS[version]:
                        db.execute(db.ddl(stmt))
                db.execute(
                    "UPDATE meta SET value = ? WHERE key = 'schema_version'",
                    (str(SCHEMA_VERSION),),
                )
                self._event(db, "schema_migrated", detail=f"{found} -> {SCHEMA_VERSION}")
                return
        if found != str(SCHEMA_VERSION):
            raise SchemaVersionError(
                f"{self.where} has schema version {found}, this build reads {SCHEMA_VERSION}; "
                "use the cotune release that wrote it, or migrate the database"
            )

    # -- federation and rounds -------------------------------------------------------------

    def init_federation(
        self,
        federation_id: str,
        algorithm: str,
        config: Mapping[str, Any],
        initial_global: Mapping[str, np.ndarray],
        *,
        global_meta: Mapping[str, Any] | None = None,
    ) -> str:
        """Record the federation and commit the initial global state as round 0."""
        if self.federation() is not None:
            raise StateError(f"{self.where} already holds federation {self.federation().id!r}")
        digest = self.checkpoints.put(initial_global, global_meta)
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO federation (id, algorithm, config, created) VALUES (?, ?, ?, ?)",
                (federation_id, algorithm, _dumps(config), now),
            )
            db.execute(
                "INSERT INTO rounds (round, status, selected, opened_at, closed_at, global_digest,"
                " metrics) VALUES (0, 'committed', '[]', ?, ?, ?, '{}')",
                (now, now, digest),
            )
            self._event(
                db, "federation_created", round=0, detail=f"{algorithm}; initial global {digest}"
            )
        return digest

    def federation(self) -> FederationInfo | None:
        row = self._db.execute("SELECT id, algorithm, config, created FROM federation").fetchone()
        return FederationInfo(row[0], row[1], json.loads(row[2]), row[3]) if row else None

    def open_round(self, selected: Sequence[str], *, deadline: float | None = None) -> RoundInfo:
        """Open the next round for ``selected`` clients; the previous one must be committed."""
        clients = list(selected)
        if (
            not clients
            or len(set(clients)) != len(clients)
            or not all(isinstance(c, str) and c for c in clients)
        ):
            raise StateError(
                f"selected clients must be distinct non-empty strings, got {clients!r}"
            )
        head = self._head(self._max_round())
        if head is None:
            raise StateError("no federation yet: call init_federation first")
        if head.status != "committed":
            raise StateError(
                f"round {head.round} is still {head.status}; commit it before opening another"
            )
        number, now = head.round + 1, self._clock()
        base = self._db.execute(
            "SELECT global_digest FROM rounds WHERE round = ?", (head.round,)
        ).fetchone()[0]
        with self._tx() as db:
            db.execute(
                "INSERT INTO rounds (round, status, selected, deadline, opened_at, base_digest,"
                " metrics) VALUES (?, 'open', ?, ?, ?, ?, '{}')",
                (number, _dumps(clients), deadline, now, base),
            )
            db.executemany(
                "INSERT INTO participants (round, client, status, metrics)"
                " VALUES (?, ?, 'selected', '{}')",
                [(number, c) for c in clients],
            )
        return self._round_info(number)

    def accept_update(
        self,
        round: int,
        client: str,
        partial: Checkpoint,
        update_digest: str,
        num_examples: int,
        metrics: Mapping[str, Any] | None = None,
    ) -> str:
        """Durably count ``client``'s update: ``partial`` must be the aggregate state *after*
        folding it (its ``meta["clients"]`` = already accepted + ``client``). Writes the
        partial checkpoint, then one transaction; returns the partial digest.

        Raises :class:`InvalidUpdate` (round / late / not_selected / duplicate / weight)
        without changing anything; the caller then records it with :meth:`reject_update`.
        """
        round = int(round)
        self._check_acceptable(round, client, num_examples)
        listed = list(partial.meta.get("clients", []))
        expected = set(self._clients_with_status(round, "accepted")) | {client}
        if len(listed) != len(set(listed)) or set(listed) != expected:
            raise StateError(
                f"partial aggregate lists clients {sorted(listed)} but the ledger expects"
                f" {sorted(expected)}; the aggregate and the ledger diverged"
            )
        digest = self.checkpoints.put(partial.tensors, partial.meta)
        self._commit_accept(round, client, digest, update_digest, num_examples, metrics)
        return digest

    def _commit_accept(
        self,
        round: int,
        client: str,
        partial_digest: str,
        update_digest: str,
        num_examples: int,
        metrics: Mapping[str, Any] | None,
    ) -> None:
        with self._tx() as db:
            head = self._check_acceptable(round, client, num_examples)  # again, under the lock
            db.execute(
                "UPDATE participants SET status = 'accepted', reason = NULL, num_examples = ?,"
                " update_digest = ?, metrics = ?, received_at = ? WHERE round = ? AND client = ?",
                (
                    int(num_examples),
                    update_digest,
                    _dumps(metrics or {}),
                    self._clock(),
                    round,
                    client,
                ),
            )
            db.execute(
                "UPDATE rounds SET partial_digest = ? WHERE round = ?", (partial_digest, round)
            )
        self._discard_superseded(head.partial_digest, partial_digest)

    def _check_acceptable(self, round: int, client: str, num_examples: int) -> _Head:
        head = self._head(round)
        if head is None or not head.current:
            raise InvalidUpdate("round", f"round {round} is not the current round", client=client)
        if head.status != "open":
            raise InvalidUpdate("late", f"round {round} is {head.status}", client=client)
        if head.deadline is not None and self._clock() > head.deadline:
            raise InvalidUpdate("late", f"round {round} deadline has passed", client=client)
        row = self._db.execute(
            "SELECT status FROM participants WHERE round = ? AND client = ?", (round, client)
        ).fetchone()
        _check_participant(round, client, None if row is None else row[0])
        _check_weight(client, num_examples)
        return head

    def accept_many(
        self,
        round: int,
        records: Iterable[AcceptRecord],
        partial_digest: str | None,
        *,
        worker: int | None = None,
    ) -> None:
        """Mark every record's client accepted and point the round at ``partial_digest`` (a
        checkpoint already written, holding exactly the accepted updates including these), in
        ONE transaction. ``partial_digest`` None leaves the round's partial as it is (the
        caller checkpoints later, see :meth:`set_partial`). ``worker``: the partial is ingest
        worker ``worker``'s (see :meth:`worker_partials`), not the round's.

        The round must be the current one and open; every client selected or rejected (not
        accepted, not dropped), at most once in the batch; ``num_examples`` a positive int.
        On any violation raises :class:`InvalidUpdate` (its ``client`` names the first
        offender) and changes nothing. The deadline is not checked again: the caller checked it
        when each update arrived, and a batch may commit a little later.
        """
        round = int(round)
        now = self._clock()
        rows, seen = [], set()
        for rec in records:
            if not isinstance(rec, AcceptRecord):
                raise StateError(f"accept_many takes AcceptRecord items, got {type(rec).__name__}")
            if rec.client in seen:
                raise InvalidUpdate(
                    "duplicate", f"client is twice in one batch of round {round}", client=rec.client
                )
            seen.add(rec.client)
            _check_weight(rec.client, rec.num_examples)
            received = now if rec.received_at is None else float(rec.received_at)
            rows.append(
                (
                    int(rec.num_examples),
                    rec.update_digest,
                    _dumps(rec.metrics or {}),
                    received,
                    round,
                    rec.client,
                )
            )
        if partial_digest is not None:
            self._require_file(partial_digest)
        try:
            with self._tx() as db:
                head = self._head(round)
                if head is None or not head.current:
                    raise InvalidUpdate("round", f"round {round} is not the current round")
                if head.status != "open":
                    raise InvalidUpdate("late", f"round {round} is {head.status}")
                if rows:
                    changed = db.executemany(
                        "UPDATE participants SET status = 'accepted', reason = NULL,"
                        " num_examples = ?, update_digest = ?, metrics = ?, received_at = ?"
                        " WHERE round = ? AND client = ? AND status IN ('selected', 'rejected')",
                        rows,
                    )
                    if changed != len(rows):
                        raise _BatchRefused
                old = head.partial_digest
                if partial_digest is not None and worker is not None:
                    row = db.execute(
                        "SELECT digest FROM worker_partials WHERE round = ? AND worker = ?",
                        (round, int(worker)),
                    ).fetchone()
                    old = row[0] if row else None
                    db.execute(_UPSERT_WORKER, (round, int(worker), partial_digest, 0, now))
                elif partial_digest is not None:
                    db.execute(
                        "UPDATE rounds SET partial_digest = ? WHERE round = ?",
                        (partial_digest, round),
                    )
        except _BatchRefused:
            # rolled back; name the first offender as the ledger stands without the batch
            raise self._first_unacceptable(round, [r[5] for r in rows]) from None
        if partial_digest is not None:
            self._discard_superseded(old, partial_digest)

    # -- scale-out ingest: the ledger is the workers' control plane ------------------------

    def worker_partials(self, round: int) -> dict[int, tuple[str | None, bool]]:
        """worker -> (its latest partial digest, whether it closed the round)."""
        rows = self._db.execute(
            "SELECT worker, digest, final FROM worker_partials WHERE round = ?", (int(round),)
        ).fetchall()
        return {int(w): (d, bool(f)) for w, d, f in rows}

    def set_worker_partial(
        self, round: int, worker: int, digest: str | None, *, final: bool = False
    ) -> None:
        if digest is not None:
            self._require_file(digest)
        with self._tx() as db:
            db.execute(_UPSERT_WORKER, (int(round), int(worker), digest, int(final), self._clock()))

    def request_close(self, round: int) -> None:
        """Ask the ingest workers to close ``round`` (checkpoint, report a final partial)."""
        with self._tx() as db:
            db.execute("DELETE FROM meta WHERE key = 'closing_round'")
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('closing_round', ?)", (str(int(round)),)
            )

    def closing_round(self) -> int:
        """The latest round whose close was requested (0: none)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'closing_round'").fetchone()
        return int(row[0]) if row else 0

    def set_partial(self, round: int, digest: str) -> None:
        """Point the round (current, not committed) at a new partial-aggregate checkpoint,
        already written; the one it replaces is deleted after the commit."""
        round = int(round)
        self._require_file(digest)
        with self._tx() as db:
            head = self._head(round)
            if head is None or not head.current:
                raise StateError(f"round {round} is not the current round")
            if head.status == "committed":
                raise StateError(f"round {round} is committed; its partial is final")
            db.execute("UPDATE rounds SET partial_digest = ? WHERE round = ?", (digest, round))
        self._discard_superseded(head.partial_digest, digest)

    def reject_update(
        self, round: int | None, client: str | None, reason: str, detail: str = ""
    ) -> None:
        """Log a rejected update. A selected (or earlier rejected) participant is marked
        rejected and may still send a good update before the deadline; an accepted one stays
        accepted (e.g. a rejected duplicate)."""
        self.reject_many(round, [(client, reason, detail)])

    def reject_many(
        self,
        round: int | None,
        rejections: Iterable[Sequence[Any]],
    ) -> None:
        """Many :meth:`reject_update` in ONE transaction: ``rejections`` holds
        ``(client, reason, detail)`` tuples, optionally with a fourth item ``at`` (when the
        update was rejected; default now). ``client`` may be None (an unknown sender)."""
        now = self._clock()
        events, marks = [], []
        for item in rejections:
            if len(item) not in (3, 4):
                raise StateError(f"a rejection is (client, reason, detail[, at]), got {item!r}")
            client, reason, detail = item[0], item[1], item[2]
            at = now if len(item) == 3 or item[3] is None else float(item[3])
            if not reason or not isinstance(reason, str):
                raise StateError("a rejection needs a reason")
            events.append((at, round, client, "rejected", reason, detail))
            if round is not None and client is not None:
                marks.append((reason, at, round, client))
        if not events:
            return
        with self._tx() as db:
            db.executemany(_INSERT_EVENT, events)
            if marks:
                db.executemany(
                    "UPDATE participants SET status = 'rejected', reason = ?, received_at = ?"
                    " WHERE round = ? AND client = ? AND status IN ('selected', 'rejected')",
                    marks,
                )

    def record_event(
        self,
        kind: str,
        *,
        round: int | None = None,
        client: str | None = None,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Append a notable event (reconnects, replays, server-side step timings...)."""
        self.record_events([EventRecord(kind, round, client, reason, detail)])

    def record_events(self, events: Iterable[EventRecord | Mapping[str, Any]]) -> None:
        """Append many events in ONE transaction; items are :class:`EventRecord` or mappings
        with its field names."""
        now = self._clock()
        rows = []
        for ev in events:
            if isinstance(ev, Mapping):
                ev = EventRecord(**ev)
            if not isinstance(ev, EventRecord) or not ev.kind:
                raise StateError(f"an event needs a kind, got {ev!r}")
            at = now if ev.at is None else float(ev.at)
            rows.append((at, ev.round, ev.client, ev.kind, ev.reason, ev.detail))
        if rows:
            with self._tx() as db:
                db.executemany(_INSERT_EVENT, rows)

    def seal_round(self, round: int, *, reason: str = "deadline") -> RoundInfo:
        """Stop accepting (quorum or deadline): open -> closed; still-selected clients are
        marked dropped with ``reason``. One transaction of set-based statements."""
        round = int(round)
        head = self._head(round)
        if head is None:
            raise StateError(f"no round {round} in {self.where}")
        if head.status != "open":
            raise StateError(f"round {round} is {head.status}, only an open round can be sealed")
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "UPDATE rounds SET status = 'closed', closed_at = ? WHERE round = ?", (now, round)
            )
            self._drop_pending(db, round, reason)
            self._event(db, "sealed", round=round, reason=reason)
        return self._round_info(round)

    def close_round(
        self,
        round: int,
        global_state: Mapping[str, np.ndarray],
        metrics: Mapping[str, Any] | None = None,
        *,
        global_meta: Mapping[str, Any] | None = None,
    ) -> str:
        """Write the new global checkpoint, then in one transaction (set-based statements) mark
        the round committed and point it at that checkpoint. Afterwards the round's partial
        aggregate (and its spill files, when ``spill`` is known) is deleted and, with
        ``keep_globals``, older global states are pruned. Returns the global digest."""
        round = int(round)
        head = self._head(round)
        if head is None:
            raise StateError(f"no round {round} in {self.where}")
        if head.status == "committed":
            raise StateError(f"round {round} is already committed")
        digest = self.checkpoints.put(global_state, global_meta)
        now = self._clock()
        with self._tx() as db:
            partial = db.execute(
                "SELECT partial_digest FROM rounds WHERE round = ?", (round,)
            ).fetchone()[0]
            db.execute(
                "UPDATE rounds SET status = 'committed', global_digest = ?,"
                " closed_at = COALESCE(closed_at, ?), metrics = ?"
                " WHERE round = ? AND status <> 'committed'",
                (digest, now, _dumps(metrics or {}), round),
            )
            self._drop_pending(db, round, "round_closed")
            db.execute("DELETE FROM pruned WHERE digest = ?", (digest,))  # same content again
            if partial and partial != digest:
                db.execute(
                    "INSERT INTO pruned (digest, round, kind, at) VALUES (?, ?, 'partial', ?)"
                    " ON CONFLICT (digest) DO NOTHING",
                    (partial, round, now),
                )
            self._event(db, "committed", round=round, detail=digest)
        if partial and partial != digest:
            self._delete_pruned([(partial, "partial")])
        if self.keep_globals is not None:
            self.prune(self.keep_globals)
        return digest

    # -- retention -------------------------------------------------------------------------

    def prune(self, keep_globals: int) -> list[str]:
        """Keep the global states of the last ``keep_globals`` committed rounds (and the
        current round's base and partial); record every older global state, and every partial
        of a committed round, as pruned in the ledger, then delete their files (a
        :class:`CheckpointPruned` error names them afterwards). Returns the digests pruned by
        this call."""
        keep = _retention(keep_globals)
        now = self._clock()
        with self._tx() as db:
            committed = db.execute(
                "SELECT round, global_digest, partial_digest FROM rounds"
                " WHERE status = 'committed' ORDER BY round DESC"
            ).fetchall()
            live = {g for _, g, _ in committed[:keep] if g}
            for base, partial in db.execute(
                "SELECT base_digest, partial_digest FROM rounds WHERE status <> 'committed'"
            ):
                live.update(d for d in (base, partial) if d)
            done = {d for (d,) in db.execute("SELECT digest FROM pruned")}
            rows: list[tuple[str, int, str, float]] = []
            for i, (rnd, glob, partial) in enumerate(committed):
                for digest, kind in ((glob, "global"), (partial, "partial")):
                    if kind == "global" and i < keep:
                        continue
                    if digest and digest not in live and digest not in done:
                        rows.append((digest, rnd, kind, now))
                        done.add(digest)
            if rows:
                db.executemany(
                    "INSERT INTO pruned (digest, round, kind, at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (digest) DO NOTHING",
                    rows,
                )
                self._event(db, "pruned", detail=f"{len(rows)} checkpoints; keep_globals={keep}")
        self._delete_pruned([(d, kind) for d, _, kind, _ in rows])
        return [d for d, *_ in rows]

    def garbage_collect(
        self, *, min_age_s: float = 60.0, keep_globals: int | None = None
    ) -> list[str]:
        """Delete checkpoint files no round refers to: every global and base state not pruned
        is kept, partial aggregates only while their round is not committed; files the ledger
        records as pruned are deleted too (a crash may have interrupted that). With
        ``keep_globals``, :meth:`prune` runs first. Returns removed digests."""
        removed = [] if keep_globals is None else self.prune(keep_globals)
        pruned = self._db.execute("SELECT digest, kind FROM pruned").fetchall()
        removed += self._delete_pruned(pruned)
        removed += self.checkpoints.sweep(self._live_digests(), min_age_s=min_age_s)
        return removed

    def _live_digests(self) -> set[str]:
        """Every checkpoint the ledger still needs."""
        keep: set[str] = set()
        current: set[str] = set()
        for base, partial, glob, status in self._db.execute(
            "SELECT base_digest, partial_digest, global_digest, status FROM rounds"
        ):
            keep.update(d for d in (base, glob) if d)
            if status != "committed":
                current.update(d for d in (base, partial) if d)
        keep -= {d for (d,) in self._db.execute("SELECT digest FROM pruned")}
        return keep | current

    def _delete_pruned(self, pruned: Iterable[Sequence[str]]) -> list[str]:
        """Delete the files of pruned checkpoints (with their spill files, for partials) that
        are still on disk and needed by no round."""
        pending = [(d, k) for d, k in pruned if self.checkpoints.exists(d)]
        if not pending:
            return []
        live = self._live_digests()
        removed = []
        for digest, kind in pending:
            if digest in live:
                continue
            if kind == "partial" and self.spill is not None:
                with contextlib.suppress(StateError):
                    spilled = self.checkpoints.read_meta(digest).get("spill") or []
                    for s in spilled:
                        if isinstance(s, str) and _DIGEST_RE.match(s):
                            self.spill.delete(s)
            self.checkpoints.delete(digest)
            removed.append(digest)
        return removed

    def _discard_superseded(self, old: str | None, new: str) -> None:
        # The partial a newer one replaced (after that replacement committed), unless some
        # round still names the same content.
        if not old or old == new:
            return
        row = self._db.execute(
            "SELECT 1 FROM rounds WHERE base_digest = ? OR partial_digest = ? OR global_digest = ?"
            " LIMIT 1",
            (old, old, old),
        ).fetchone()
        if row is None:
            self.checkpoints.delete(old)

    def _require_file(self, digest: str) -> None:
        if not isinstance(digest, str) or not self.checkpoints.exists(digest):
            raise StateError(
                f"partial checkpoint {digest!r} is not in {self.checkpoints.dir}: write it first"
            )

    def _raise_if_pruned(self, digest: str) -> None:
        row = self._db.execute(
            "SELECT round, kind FROM pruned WHERE digest = ?", (digest,)
        ).fetchone()
        if row is None:
            return
        rnd, kind = row
        if kind == "global":
            raise CheckpointPruned(
                f"the global state {digest} committed by round {rnd} was pruned by the retention"
                " policy (only the last keep_globals committed global states are kept)"
            )
        raise CheckpointPruned(
            f"checkpoint {digest} was the partial aggregate of round {rnd}, deleted when the"
            " round committed"
        )

    # -- reads -----------------------------------------------------------------------------

    def current_round(self) -> RoundInfo | None:
        """The latest round (open, closed or committed), None before init_federation."""
        number = self._max_round()
        return None if number is None else self._round_info(number)

    def round_info(self, round: int) -> RoundInfo:
        """One round's row (status, digests, metrics) without its participants."""
        return self._round_info(round)

    def load_round(self, round: int, *, with_partial: bool = True) -> RoundState:
        info = self._round_info(round)
        rows = self._db.execute(
            "SELECT round, client, status, reason, num_examples, update_digest, metrics,"
            " received_at FROM participants WHERE round = ?",
            (round,),
        ).fetchall()
        rows.sort(key=lambda r: r[1])  # by code point on every backend (collations differ)
        participants = {
            r[1]: Participant(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7])
            for r in rows
        }
        partial = None
        if with_partial and info.status != "committed" and info.partial_digest:
            partial = self.checkpoints.get(info.partial_digest)
        return RoundState(info, participants, partial)

    def participant_statuses(self, round: int) -> dict[str, str]:
        """client -> status of every participant of ``round`` (the ingest's index is rebuilt
        from it); no JSON column is read."""
        round = int(round)
        self._require_round(round)
        rows = self._db.execute(
            "SELECT client, status FROM participants WHERE round = ?", (round,)
        ).fetchall()
        return dict(rows)

    def counts(self, round: int) -> dict[str, int]:
        """Participants of ``round`` per status (every status present, zero when none)."""
        round = int(round)
        self._require_round(round)
        rows = self._db.execute(
            "SELECT status, COUNT(*) FROM participants WHERE round = ? GROUP BY status", (round,)
        ).fetchall()
        found = dict(rows)
        return {s: int(found.get(s, 0)) for s in PARTICIPANT_STATUSES}

    def load_global(self, digest: str | None = None) -> Checkpoint:
        """A global checkpoint; by default the one committed by the latest committed round.
        Raises :class:`CheckpointPruned` for one the retention policy deleted."""
        if digest is None:
            row = self._db.execute(
                "SELECT global_digest FROM rounds WHERE status = 'committed'"
                " ORDER BY round DESC LIMIT 1"
            ).fetchone()
            if row is None:
                raise StateError("no committed global state yet: call init_federation first")
            digest = row[0]
        else:
            self._raise_if_pruned(digest)
        return self.checkpoints.get(digest)

    def events(
        self, *, round: int | None = None, kind: str | None = None, limit: int | None = None
    ) -> list[Event]:
        sql, args = "SELECT id, at, round, client, kind, reason, detail FROM events WHERE 1 = 1", []
        if round is not None:
            sql, args = sql + " AND round = ?", [*args, round]
        if kind is not None:
            sql, args = sql + " AND kind = ?", [*args, kind]
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql, args = sql + " LIMIT ?", [*args, int(limit)]
        return [Event(*row) for row in self._db.execute(sql, args).fetchall()][::-1]

    def status(self) -> dict[str, Any]:
        """A JSON-able summary for ``cotune aggregator status``."""
        fed = self.federation()
        current = self.current_round()
        pruned = dict(
            self._db.execute("SELECT kind, COUNT(*) FROM pruned GROUP BY kind").fetchall()
        )
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "backend": self.backend,
            "database": self.where,
            "checkpoint_dir": str(self.checkpoints.dir),
            "federation": None
            if fed is None
            else {"id": fed.id, "algorithm": fed.algorithm, "created": fed.created},
            "round": None,
            "last_committed": None,
            "rounds_committed": self._db.execute(
                "SELECT COUNT(*) FROM rounds WHERE status = 'committed' AND round > 0"
            ).fetchone()[0],
            "rejections": dict(
                self._db.execute(
                    "SELECT reason, COUNT(*) FROM events WHERE kind = 'rejected'"
                    " GROUP BY reason ORDER BY reason"
                ).fetchall()
            ),
            "events": self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0],
            "checkpoints": self.checkpoints.usage(),
            "retention": {
                "keep_globals": self.keep_globals,
                "pruned_globals": int(pruned.get("global", 0)),
                "pruned_partials": int(pruned.get("partial", 0)),
                # the oldest committed round whose global state can still be loaded
                "oldest_global_round": self._db.execute(
                    "SELECT MIN(round) FROM rounds WHERE status = 'committed' AND global_digest"
                    " NOT IN (SELECT digest FROM pruned)"
                ).fetchone()[0],
            },
        }
        if current is not None:
            counts = self.counts(current.round)
            out["round"] = {
                "round": current.round,
                "status": current.status,
                "selected": len(current.selected),
                **{s: counts[s] for s in PARTICIPANT_STATUSES if s != "selected"},
                "pending": counts["selected"],
                "deadline": current.deadline,
                "opened_at": current.opened_at,
                "closed_at": current.closed_at,
                "base_digest": current.base_digest,
                "partial_digest": current.partial_digest,
            }
            row = self._db.execute(
                "SELECT round, global_digest, closed_at, metrics FROM rounds"
                " WHERE status = 'committed' ORDER BY round DESC LIMIT 1"
            ).fetchone()
            out["last_committed"] = {
                "round": row[0],
                "global_digest": row[1],
                "closed_at": row[2],
                "metrics": json.loads(row[3]),
            }
        return out

    # -- helpers ---------------------------------------------------------------------------

    def _max_round(self) -> int | None:
        return self._db.execute("SELECT MAX(round) FROM rounds").fetchone()[0]

    def _head(self, round: int | None) -> _Head | None:
        if round is None:
            return None
        row = self._db.execute(
            "SELECT round, status, deadline, partial_digest, (SELECT MAX(round) FROM rounds)"
            " FROM rounds WHERE round = ?",
            (round,),
        ).fetchone()
        return None if row is None else _Head(row[0], row[1], row[2], row[3], row[0] == row[4])

    def _require_round(self, round: int) -> None:
        if self._db.execute("SELECT 1 FROM rounds WHERE round = ?", (round,)).fetchone() is None:
            raise StateError(f"no round {round} in {self.where}")

    def _clients_with_status(self, round: int, status: str) -> list[str]:
        rows = self._db.execute(
            "SELECT client FROM participants WHERE round = ? AND status = ?", (round, status)
        ).fetchall()
        return [r[0] for r in rows]

    def _first_unacceptable(self, round: int, clients: Sequence[str]) -> Exception:
        statuses = self.participant_statuses(round)
        for client in clients:
            try:
                _check_participant(round, client, statuses.get(client))
            except InvalidUpdate as exc:
                return exc
        return StateError(f"round {round}: participants changed while a batch was accepted")

    def _round_info_or_none(self, round: int) -> RoundInfo | None:
        row = self._db.execute(
            "SELECT round, status, selected, deadline, opened_at, closed_at, base_digest,"
            " partial_digest, global_digest, metrics FROM rounds WHERE round = ?",
            (round,),
        ).fetchone()
        if row is None:
            return None
        return RoundInfo(
            row[0],
            row[1],
            tuple(json.loads(row[2])),
            row[3],
            row[4],
            row[5],
            row[6],
            row[7],
            row[8],
            json.loads(row[9]),
        )

    def _round_info(self, round: int) -> RoundInfo:
        info = self._round_info_or_none(round)
        if info is None:
            raise StateError(f"no round {round} in {self.where}")
        return info

    def _drop_pending(self, db: Database, round: int, reason: str) -> None:
        # A rejected participant keeps its status and reason: more telling than "dropped".
        db.execute(
            "UPDATE participants SET status = 'dropped', reason = ?"
            " WHERE round = ? AND status = 'selected'",
            (reason, round),
        )

    def _event(
        self,
        db: Database,
        kind: str,
        *,
        round: int | None = None,
        client: str | None = None,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        db.execute(_INSERT_EVENT, (self._clock(), round, client, kind, reason, detail))


def _check_participant(round: int, client: str, status: str | None) -> None:
    if status is None:
        raise InvalidUpdate(
            "not_selected", f"client is not selected for round {round}", client=client
        )
    if status == "accepted":
        raise InvalidUpdate(
            "duplicate", f"client already contributed to round {round}", client=client
        )
    if status == "dropped":
        raise InvalidUpdate("late", f"client was dropped from round {round}", client=client)


def _check_weight(client: str, num_examples: Any) -> None:
    if (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, (int, np.integer))
        or num_examples <= 0
    ):
        raise InvalidUpdate(
            "weight",
            f"num_examples must be a positive integer, got {num_examples!r}",
            client=client,
        )


def _retention(keep_globals: Any) -> int:
    if isinstance(keep_globals, bool) or not isinstance(keep_globals, int) or keep_globals < 1:
        raise StateError(f"keep_globals must be an integer >= 1, got {keep_globals!r}")
    return keep_globals


def _migratable(found: str | None) -> bool:
    if found is None or not found.isdigit() or int(found) >= SCHEMA_VERSION:
        return False
    return all(v in _MIGRATIONS for v in range(int(found), SCHEMA_VERSION))


def _dumps(obj: Any) -> str:
    """Compact sorted JSON; NaN/Inf become null because PostgreSQL JSON rejects them."""
    return json.dumps(
        _finite(obj), sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default
    )


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def _json_default(obj: Any) -> Any:
    raise StateError(f"cannot store {type(obj).__name__} as JSON")
