"""Durable state of a federation: a SQLite ledger plus content-addressed checkpoint files.

Why two stores: tensors are large and immutable, so they live in files named by their
SHA-256 (written tmp + fsync + rename + fsync dir, never overwritten); the ledger is small and
transactional, so it lives in SQLite (WAL, ``synchronous=FULL``) and refers to files only by
digest. The schema uses plain types and portable SQL so it can move to PostgreSQL unchanged
(apart from the ``?`` placeholders and the SQLite pragmas); one store holds one federation.

Crash contract (``kill -9`` at any instant, then restart): accepting an update first writes
the new partial-aggregate checkpoint file, then ONE transaction marks the participant accepted
and points the round at that file. Either both happened or the ledger still names the old
partial, so a participant row is ``accepted`` exactly when its contribution is inside the
partial aggregate the round references. A file written by a killed accept is merely
unreferenced and goes away with :meth:`StateStore.garbage_collect`.

Round life cycle: round 0 is the initial global state (committed by
:meth:`StateStore.init_federation`); then ``open`` (accepting) -> ``closed`` (sealed by quorum
or deadline, server-side step running; optional) -> ``committed`` (new global checkpoint).
One single writer (the aggregator service) is assumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from .errors import CheckpointCorrupt, InvalidUpdate, SchemaVersionError, StateError

SCHEMA_VERSION = 1
CHECKPOINT_FORMAT = "cotune.checkpoint"
CHECKPOINT_VERSION = 1
_META_KEY = "cotune"  # the only safetensors metadata key, so the header bytes are deterministic
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = ".safetensors"


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
    # INTEGER PRIMARY KEY is SQLite's rowid; on PostgreSQL this column becomes BIGSERIAL.
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        round INTEGER,
        client TEXT,
        kind TEXT NOT NULL,
        reason TEXT,
        detail TEXT)""",
    "CREATE INDEX events_round ON events (round)",
)


# --------------------------------------------------------------------------- the store


class StateStore:
    """The federation ledger (SQLite) plus its :class:`CheckpointStore`.

    ``checkpoints`` defaults to ``<path>.checkpoints/`` beside the database. ``clock`` returns
    seconds since the epoch; tests inject one to move deadlines.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        checkpoints: CheckpointStore | str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not isinstance(checkpoints, CheckpointStore):
            checkpoints = CheckpointStore(checkpoints or Path(f"{self.path}.checkpoints"))
        self.checkpoints = checkpoints
        self._clock = clock
        # isolation_level=None: no implicit transactions; every write is an explicit
        # BEGIN IMMEDIATE ... COMMIT below, so the boundaries are the ones we state.
        try:
            self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open state database {self.path}: {exc}") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._init_schema()
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise StateError(f"cannot open state database {self.path}: {exc}") from exc
            raise

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _init_schema(self) -> None:
        with self._tx() as db:
            exists = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            if not exists:
                for stmt in _SCHEMA:
                    db.execute(stmt)
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                return
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        found = row[0] if row else None
        if found != str(SCHEMA_VERSION):
            raise SchemaVersionError(
                f"{self.path} has schema version {found}, this build reads {SCHEMA_VERSION}; "
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
            raise StateError(f"{self.path} already holds federation {self.federation().id!r}")
        digest = self.checkpoints.put(initial_global, global_meta)
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO federation (id, algorithm, config, created) VALUES (?, ?, ?, ?)",
                (federation_id, algorithm, _dumps(config), now),
            )
            db.execute(
                "INSERT INTO rounds (round, status, selected, opened_at, closed_at, global_digest, metrics)"
                " VALUES (0, 'committed', '[]', ?, ?, ?, '{}')",
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
        current = self.current_round()
        if current is None:
            raise StateError("no federation yet: call init_federation first")
        if current.status != "committed":
            raise StateError(
                f"round {current.round} is still {current.status}; commit it before opening another"
            )
        number, now = current.round + 1, self._clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO rounds (round, status, selected, deadline, opened_at, base_digest, metrics)"
                " VALUES (?, 'open', ?, ?, ?, ?, '{}')",
                (number, _dumps(clients), deadline, now, current.global_digest),
            )
            db.executemany(
                "INSERT INTO participants (round, client, status, metrics) VALUES (?, ?, 'selected', '{}')",
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
        self._check_acceptable(round, client, num_examples)
        listed = list(partial.meta.get("clients", []))
        expected = set(self.load_round(round, with_partial=False).accepted) | {client}
        if len(listed) != len(set(listed)) or set(listed) != expected:
            raise StateError(
                f"partial aggregate lists clients {sorted(listed)} but the ledger expects {sorted(expected)};"
                " the aggregate and the ledger diverged"
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
            self._check_acceptable(round, client, num_examples)  # again, under the write lock
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

    def _check_acceptable(self, round: int, client: str, num_examples: int) -> None:
        info = self._round_info_or_none(round)
        if info is None or info.round != self._max_round():
            raise InvalidUpdate("round", f"round {round} is not the current round", client=client)
        if info.status != "open":
            raise InvalidUpdate("late", f"round {round} is {info.status}", client=client)
        if info.deadline is not None and self._clock() > info.deadline:
            raise InvalidUpdate("late", f"round {round} deadline has passed", client=client)
        row = self._db.execute(
            "SELECT status FROM participants WHERE round = ? AND client = ?", (round, client)
        ).fetchone()
        if row is None:
            raise InvalidUpdate(
                "not_selected", f"client is not selected for round {round}", client=client
            )
        if row[0] == "accepted":
            raise InvalidUpdate(
                "duplicate", f"client already contributed to round {round}", client=client
            )
        if row[0] == "dropped":
            raise InvalidUpdate("late", f"client was dropped from round {round}", client=client)
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

    def reject_update(
        self, round: int | None, client: str | None, reason: str, detail: str = ""
    ) -> None:
        """Log a rejected update. A selected (or earlier rejected) participant is marked
        rejected and may still send a good update before the deadline; an accepted one stays
        accepted (e.g. a rejected duplicate)."""
        if not reason:
            raise StateError("a rejection needs a reason")
        with self._tx() as db:
            self._event(db, "rejected", round=round, client=client, reason=reason, detail=detail)
            if round is not None and client is not None:
                db.execute(
                    "UPDATE participants SET status = 'rejected', reason = ?, received_at = ?"
                    " WHERE round = ? AND client = ? AND status IN ('selected', 'rejected')",
                    (reason, self._clock(), round, client),
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
        with self._tx() as db:
            self._event(db, kind, round=round, client=client, reason=reason, detail=detail)

    def seal_round(self, round: int, *, reason: str = "deadline") -> RoundInfo:
        """Stop accepting (quorum or deadline): open -> closed; still-selected clients are
        marked dropped with ``reason``."""
        info = self._round_info(round)
        if info.status != "open":
            raise StateError(f"round {round} is {info.status}, only an open round can be sealed")
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
        """Write the new global checkpoint, then in one transaction mark the round committed
        and point it at that checkpoint. Returns the global digest."""
        info = self._round_info(round)
        if info.status == "committed":
            raise StateError(f"round {round} is already committed")
        digest = self.checkpoints.put(global_state, global_meta)
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "UPDATE rounds SET status = 'committed', global_digest = ?, closed_at = COALESCE(closed_at, ?),"
                " metrics = ? WHERE round = ? AND status <> 'committed'",
                (digest, now, _dumps(metrics or {}), round),
            )
            self._drop_pending(db, round, "round_closed")
            self._event(db, "committed", round=round, detail=digest)
        return digest

    # -- reads -----------------------------------------------------------------------------

    def current_round(self) -> RoundInfo | None:
        """The latest round (open, closed or committed), None before init_federation."""
        number = self._max_round()
        return None if number is None else self._round_info(number)

    def load_round(self, round: int, *, with_partial: bool = True) -> RoundState:
        info = self._round_info(round)
        rows = self._db.execute(
            "SELECT round, client, status, reason, num_examples, update_digest, metrics, received_at"
            " FROM participants WHERE round = ? ORDER BY client",
            (round,),
        ).fetchall()
        participants = {
            r[1]: Participant(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7])
            for r in rows
        }
        partial = None
        if with_partial and info.status != "committed" and info.partial_digest:
            partial = self.checkpoints.get(info.partial_digest)
        return RoundState(info, participants, partial)

    def load_global(self, digest: str | None = None) -> Checkpoint:
        """A global checkpoint; by default the one committed by the latest committed round."""
        if digest is None:
            row = self._db.execute(
                "SELECT global_digest FROM rounds WHERE status = 'committed' ORDER BY round DESC LIMIT 1"
            ).fetchone()
            if row is None:
                raise StateError("no committed global state yet: call init_federation first")
            digest = row[0]
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
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "database": str(self.path),
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
                    "SELECT reason, COUNT(*) FROM events WHERE kind = 'rejected' GROUP BY reason ORDER BY reason"
                ).fetchall()
            ),
            "events": self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0],
            "checkpoints": self.checkpoints.usage(),
        }
        if current is not None:
            counts = dict(
                self._db.execute(
                    "SELECT status, COUNT(*) FROM participants WHERE round = ? GROUP BY status",
                    (current.round,),
                ).fetchall()
            )
            out["round"] = {
                "round": current.round,
                "status": current.status,
                "selected": len(current.selected),
                **{s: counts.get(s, 0) for s in PARTICIPANT_STATUSES if s != "selected"},
                "pending": counts.get("selected", 0),
                "deadline": current.deadline,
                "opened_at": current.opened_at,
                "closed_at": current.closed_at,
                "base_digest": current.base_digest,
                "partial_digest": current.partial_digest,
            }
            row = self._db.execute(
                "SELECT round, global_digest, closed_at, metrics FROM rounds WHERE status = 'committed'"
                " ORDER BY round DESC LIMIT 1"
            ).fetchone()
            out["last_committed"] = {
                "round": row[0],
                "global_digest": row[1],
                "closed_at": row[2],
                "metrics": json.loads(row[3]),
            }
        return out

    def garbage_collect(self, *, min_age_s: float = 60.0) -> list[str]:
        """Delete checkpoint files no round refers to: every global and base state is kept,
        partial aggregates only while their round is not committed. Returns removed digests."""
        keep: set[str] = set()
        for base, partial, glob, status in self._db.execute(
            "SELECT base_digest, partial_digest, global_digest, status FROM rounds"
        ):
            keep.update(d for d in (base, glob) if d)
            if partial and status != "committed":
                keep.add(partial)
        return self.checkpoints.sweep(keep, min_age_s=min_age_s)

    # -- helpers ---------------------------------------------------------------------------

    def _max_round(self) -> int | None:
        return self._db.execute("SELECT MAX(round) FROM rounds").fetchone()[0]

    def _round_info_or_none(self, round: int) -> RoundInfo | None:
        row = self._db.execute(
            "SELECT round, status, selected, deadline, opened_at, closed_at, base_digest, partial_digest,"
            " global_digest, metrics FROM rounds WHERE round = ?",
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
            raise StateError(f"no round {round} in {self.path}")
        return info

    def _drop_pending(self, db: sqlite3.Connection, round: int, reason: str) -> None:
        # A rejected participant keeps its status and reason: more telling than "dropped".
        db.execute(
            "UPDATE participants SET status = 'dropped', reason = ? WHERE round = ? AND status = 'selected'",
            (reason, round),
        )

    def _event(
        self,
        db: sqlite3.Connection,
        kind: str,
        *,
        round: int | None = None,
        client: str | None = None,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO events (at, round, client, kind, reason, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (self._clock(), round, client, kind, reason, detail),
        )


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
