"""The federation's client registry: every enrolled party with its certified public identity
(Ed25519 signing key, X25519 agreement key), certificate (and its serial), status (active /
revoked) and enrollment time. The aggregator reads it; the CA side (provisioning, enrollment, revocation)
writes it.

Storage is one SQLite file, ``DIR/registry.db`` (stdlib, no server). Why SQLite rather than an
append-only JSONL log: enrollment (possibly several concurrent requests through
``cotune enroll serve``) and revocation are writers that need atomic check-and-insert (a party id
is enrolled at most once) and in-place status changes; readers need the current state of 10^5
rows and "what changed since I last looked" without replaying or compacting a log. SQLite gives
transactions, file locking between processes, and an index on a change sequence. The default
rollback journal (not WAL) is kept on purpose: a reader then needs only read access to the file,
so the aggregator may run as another user than the CA; writes are rare and take milliseconds.

Every insert or status change stamps the row with ``seq`` = previous maximum + 1, so
:meth:`Registry.version` (``MAX(seq)``, an index lookup) says whether anything changed and
:meth:`Registry.changes_since` returns only the changed rows. :class:`RegistryDirectory` uses
both: a running aggregator sees enrollments and revocations within ``auto_refresh_s`` (default
1 s) of the change, or at once by calling ``directory.refresh()``; a refresh with no change costs
one indexed query, one with k changes costs O(k) rows plus a copy of the lookup table.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .errors import ProvisioningError
from .keys import Directory, PublicIdentity

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
ACTIVE, REVOKED = "active", "revoked"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS parties (
    party_id    TEXT PRIMARY KEY,
    role        TEXT NOT NULL,
    sign_pub    BLOB NOT NULL,
    kx_pub      BLOB NOT NULL,
    serial      TEXT NOT NULL,
    status      TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    revoked_at  REAL,
    seq         INTEGER NOT NULL UNIQUE,
    cert        BLOB NOT NULL
);
"""
_COLUMNS = "party_id, role, sign_pub, kx_pub, serial, status, enrolled_at, revoked_at, seq"


class AlreadyEnrolled(ProvisioningError):
    """The party id is already in the registry (active, or revoked: ids are never reused)."""

    code = "already_enrolled"


@dataclass(frozen=True)
class Record:
    party_id: str
    role: str
    sign_pub: bytes
    kx_pub: bytes
    serial: int  # certificate serial number
    status: str  # ACTIVE or REVOKED
    enrolled_at: float  # unix time
    revoked_at: float | None
    seq: int

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(self.party_id, self.role, self.sign_pub, self.kx_pub)

    @property
    def active(self) -> bool:
        return self.status == ACTIVE

    @classmethod
    def _from_row(cls, row) -> Record:
        pid, role, sign, kx, serial, status, at, rev, seq = row
        return cls(pid, role, bytes(sign), bytes(kx), int(serial, 16), status, at, rev, seq)


class Registry:
    """One registry file. Safe to share between threads (one connection behind a lock) and
    between processes (SQLite file locks; writers wait up to ``timeout`` seconds)."""

    def __init__(
        self, path: str | os.PathLike, *, timeout: float = 10.0, _create: str | None = None
    ):
        self.path = Path(path)
        if _create is None and not self.path.is_file():
            raise ProvisioningError(
                f"registry {self.path} does not exist; provision the federation first"
            )
        try:
            self._db = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
            self._lock = threading.Lock()
            if _create is not None:
                self._db.executescript(_SCHEMA)
                self._db.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [("schema", SCHEMA_VERSION), ("federation", _create)],
                )
            meta = dict(self._db.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as exc:
            raise ProvisioningError(f"registry {self.path} is not readable: {exc}") from exc
        if meta.get("schema") != SCHEMA_VERSION:
            raise ProvisioningError(
                f"registry {self.path} has schema {meta.get('schema')!r}; this build reads "
                f"{SCHEMA_VERSION!r}"
            )
        self.federation = meta["federation"]

    @classmethod
    def create(cls, path: str | os.PathLike, federation: str) -> Registry:
        path = Path(path)
        if path.exists():
            raise ProvisioningError(f"registry {path} already exists")
        reg = cls(path, _create=federation)
        os.chmod(path, 0o644)  # public keys only; the aggregator (maybe another user) reads it
        return reg

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writes ---------------------------------------------------------------------------------

    def add(
        self,
        parties: Iterable[tuple[PublicIdentity, x509.Certificate]],
        *,
        now: float | None = None,
    ):
        """Register parties ``(public identity, its certificate)`` as active, all in one
        transaction: AlreadyEnrolled (and nothing written) if any id is already registered."""
        now = time.time() if now is None else now
        with self._write() as db:
            first = self._max_seq(db) + 1
            rows = []
            for seq, (p, cert) in enumerate(parties, start=first):
                rows.append(
                    (
                        p.party_id,
                        p.role,
                        p.sign_pub,
                        p.kx_pub,
                        f"{cert.serial_number:x}",
                        ACTIVE,
                        now,
                        None,
                        seq,
                        cert.public_bytes(Encoding.DER),
                    )
                )
            try:
                db.executemany(
                    f"INSERT INTO parties ({_COLUMNS}, cert) VALUES (?,?,?,?,?,?,?,?,?,?)", rows
                )
            except sqlite3.IntegrityError:
                taken = [r[0] for r in rows if self._get(db, r[0]) is not None]
                raise AlreadyEnrolled(
                    f"party {', '.join(map(repr, taken[:3])) or '?'} is already registered in "
                    f"federation {self.federation!r} (ids are never reused, even after revocation)"
                ) from None

    def revoke(self, party_id: str, *, now: float | None = None) -> Record:
        """Mark a party revoked (idempotent) and return its record."""
        with self._write() as db:
            rec = self._get(db, party_id)
            if rec is None:
                raise ProvisioningError(
                    f"party {party_id!r} is not registered in federation {self.federation!r}"
                )
            if rec.active:
                at = time.time() if now is None else now
                db.execute(
                    "UPDATE parties SET status=?, revoked_at=?, seq=? WHERE party_id=?",
                    (REVOKED, at, self._max_seq(db) + 1, party_id),
                )
                rec = self._get(db, party_id)
            return rec

    # -- reads ----------------------------------------------------------------------------------

    def get(self, party_id: str) -> Record | None:
        with self._lock:
            return self._get(self._db, party_id)

    def certificate(self, party_id: str) -> x509.Certificate | None:
        """The party's certificate: what the aggregator relays when a device must check another
        party's keys with :func:`bridge.ca.certified_identity` (it holds only the CA)."""
        with self._lock:
            row = self._db.execute("SELECT cert FROM parties WHERE party_id=?", (party_id,))
            row = row.fetchone()
        return None if row is None else x509.load_der_x509_certificate(bytes(row[0]))

    def records(self, status: str | None = None) -> list[Record]:
        q = f"SELECT {_COLUMNS} FROM parties"
        args: tuple = ()
        if status is not None:
            q, args = q + " WHERE status=?", (status,)
        with self._lock:
            return [Record._from_row(r) for r in self._db.execute(q + " ORDER BY seq", args)]

    def version(self) -> int:
        """Sequence number of the last change (0 for an empty registry)."""
        with self._lock:
            return self._max_seq(self._db)

    def changes_since(self, seq: int) -> list[Record]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM parties WHERE seq > ? ORDER BY seq", (seq,)
            )
            return [Record._from_row(r) for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM parties").fetchone()[0]

    def directory(self, *, auto_refresh_s: float | None = 1.0) -> RegistryDirectory:
        return RegistryDirectory(self, auto_refresh_s=auto_refresh_s)

    # -- helpers --------------------------------------------------------------------------------

    def _write(self):
        return _WriteTx(self)

    @staticmethod
    def _max_seq(db) -> int:
        return db.execute("SELECT COALESCE(MAX(seq), 0) FROM parties").fetchone()[0]

    @staticmethod
    def _get(db, party_id: str) -> Record | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM parties WHERE party_id=?", (party_id,)).fetchone()
        return None if row is None else Record._from_row(row)


class _WriteTx:
    """``BEGIN IMMEDIATE`` (the write lock, so check-then-insert is atomic across processes),
    COMMIT on success, ROLLBACK on any exception."""

    def __init__(self, reg: Registry):
        self.reg = reg

    def __enter__(self):
        self.reg._lock.acquire()
        try:
            self.reg._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.reg._lock.release()
            raise
        return self.reg._db

    def __exit__(self, exc_type, *_):
        try:
            self.reg._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.reg._lock.release()


class RegistryDirectory(Directory):
    """The aggregator's directory: every active party of the registry; revoked ones raise
    :class:`~bridge.errors.Revoked`.

    It follows the registry by itself: lookups (``sender``, ``recipient``, ``clients``) check
    the registry's version at most every ``auto_refresh_s`` seconds (None: only on explicit
    :meth:`refresh`). Call :meth:`refresh` to apply changes now, e.g. at the start of a round.
    A registry that cannot be read during an automatic refresh keeps the last known state
    (logged); an explicit refresh raises.
    """

    def __init__(self, registry: Registry, *, auto_refresh_s: float | None = 1.0):
        self.registry = registry
        self.auto_refresh_s = auto_refresh_s
        self._refresh_lock = threading.Lock()
        records = registry.records()
        super().__init__(
            registry.federation,
            [r.public for r in records if r.active],
            revoked=[r.party_id for r in records if not r.active],
        )
        self._seq = max((r.seq for r in records), default=0)
        self._next_check = time.monotonic() + (auto_refresh_s or 0.0)

    @property
    def version(self) -> int:
        return self._seq

    def refresh(self) -> bool:
        with self._refresh_lock:
            if self.registry.version() == self._seq:
                return False
            changes = self.registry.changes_since(self._seq)
            parties, revoked = dict(self._parties), set(self._revoked)
            for r in changes:
                if r.active:
                    parties[r.party_id] = r.public
                    revoked.discard(r.party_id)
                else:
                    parties.pop(r.party_id, None)
                    revoked.add(r.party_id)
                self._seq = max(self._seq, r.seq)
            # revoked set first: a reader in between sees the party still active (a moment
            # late), never neither active nor revoked
            self._revoked = frozenset(revoked)
            self._aggregators = [p.party_id for p in parties.values() if p.role == "aggregator"]
            self._parties = parties
            return True

    def _maybe_refresh(self) -> None:
        if self.auto_refresh_s is None or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + self.auto_refresh_s
        try:
            self.refresh()
        except (ProvisioningError, sqlite3.Error) as exc:
            log.warning(
                "registry %s: refresh failed, keeping the last state: %s", self.registry.path, exc
            )

    def sender(self, party_id: str) -> PublicIdentity:
        self._maybe_refresh()
        return super().sender(party_id)

    def recipient(self, party_id: str) -> PublicIdentity:
        self._maybe_refresh()
        return super().recipient(party_id)

    def clients(self) -> list[str]:
        self._maybe_refresh()
        return super().clients()
