"""The SQL dialect layer of the state ledger: one small connection wrapper per backend.

:class:`~aggregator.state.StateStore` writes its SQL once, with ``?`` placeholders and types
both engines understand (TEXT, INTEGER, DOUBLE PRECISION, CHECK, REFERENCES,
``INSERT ... ON CONFLICT DO NOTHING``). Everything that differs lives here and nowhere else:

===================  =======================================  ===========================================
                     SQLite (embedded default)                PostgreSQL (multi-host)
===================  =======================================  ===========================================
target               a file path                              a ``postgresql://`` DSN
placeholders         ``?``                                    ``%s`` (rewritten once per statement text)
durability           WAL + ``synchronous=FULL``               the server's (``synchronous_commit``)
write transactions   ``BEGIN IMMEDIATE`` (one writer)         ``BEGIN`` + a transaction-scoped advisory
                                                              lock keyed by the schema (one writer)
autoincrement id     ``INTEGER PRIMARY KEY`` (rowid)          ``BIGSERIAL PRIMARY KEY``
table lookup         ``sqlite_master``                        ``information_schema.tables``
===================  =======================================  ===========================================

Writes are serialized on both engines, so a check made inside a write transaction still
holds at its commit. Reads run outside transactions (autocommit), each statement on its own
snapshot, as before. The statement texts never contain a literal ``?`` or ``%``.

On PostgreSQL one federation is one schema: choose it with the DSN, e.g.
``postgresql://user@host/db?options=-csearch_path%3Dfed1`` (the default is ``public``).
psycopg 3 is an optional dependency (``pip install 'cotune[postgres]'``), imported only for a
PostgreSQL target.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import zlib
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import StateError

_PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_target(target: object) -> bool:
    return isinstance(target, str) and target.startswith(_PG_SCHEMES)


def connect(target: str | os.PathLike[str]) -> Database:
    """A :class:`PostgresDatabase` for a ``postgresql://`` DSN, else a :class:`SQLiteDatabase`
    for a file path."""
    if is_postgres_target(target):
        return PostgresDatabase(str(target))
    return SQLiteDatabase(target)


class Database:
    """What the ledger needs from a connection. Statements use ``?`` placeholders."""

    backend: str
    #: the primary key clause of an autoincrementing 64-bit id column
    serial_pk: str
    #: the engine's base exception class (a failure to open is reported as StateError)
    Error: type[Exception]
    #: where the ledger lives, for messages (a path, or a DSN without its password)
    where: str

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """Run one statement; returns a cursor (``fetchone``/``fetchall``/iteration)."""
        raise NotImplementedError

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run one statement for every row (batched by the driver); returns the number of rows
        it changed, summed."""
        raise NotImplementedError

    def transaction(self) -> contextlib.AbstractContextManager[Database]:
        """A write transaction that excludes every other writer of this ledger until it commits
        (or rolls back, on any exception)."""
        raise NotImplementedError

    def table_exists(self, name: str) -> bool:
        raise NotImplementedError

    def ddl(self, statement: str) -> str:
        """A schema statement with its dialect tokens (``{serial_pk}``) filled in."""
        return statement.format(serial_pk=self.serial_pk)

    def close(self) -> None:
        raise NotImplementedError


class SQLiteDatabase(Database):
    backend = "sqlite"
    serial_pk = "INTEGER PRIMARY KEY"  # an alias of the rowid
    Error = sqlite3.Error

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; every write is an explicit
        # BEGIN IMMEDIATE ... COMMIT (transaction()), so the boundaries are the ones we state.
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open state database {self.path}: {exc}") from exc
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            self._conn.close()
            raise StateError(f"cannot open state database {self.path}: {exc}") from exc

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        return self._conn.executemany(sql, rows).rowcount

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Database]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def table_exists(self, name: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    def close(self) -> None:
        self._conn.close()


class PostgresDatabase(Database):
    backend = "postgresql"
    serial_pk = "BIGSERIAL PRIMARY KEY"

    def __init__(self, dsn: str) -> None:
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict, make_conninfo
        except ImportError:
            raise StateError(
                "a postgresql:// state target needs psycopg 3: pip install 'cotune[postgres]'"
            ) from None
        self.Error = psycopg.Error
        try:
            shown = {k: v for k, v in conninfo_to_dict(dsn).items() if k != "password"}
            self.where = "postgresql: " + make_conninfo(**shown)
        except psycopg.Error as exc:
            raise StateError(f"not a PostgreSQL connection string: {exc}") from None
        try:
            # autocommit: reads need no transaction; writes open one explicitly (transaction())
            self._conn = psycopg.connect(dsn, autocommit=True)
            schema = self._conn.execute("SELECT current_schema()").fetchone()[0]
        except psycopg.Error as exc:
            with contextlib.suppress(AttributeError, psycopg.Error):
                self._conn.close()
            raise StateError(f"cannot open state database {self.where}: {exc}") from exc
        if schema is None:
            self._conn.close()
            raise StateError(f"{self.where}: no schema on the search_path exists")
        # One writer per ledger, like SQLite's BEGIN IMMEDIATE: a lock that only cotune's
        # writers of this schema take, held until COMMIT/ROLLBACK. Readers never wait on it.
        key = zlib.crc32(f"cotune.state:{schema}".encode()) - (1 << 31)
        self._begin = f"BEGIN; SELECT pg_advisory_xact_lock({key})"

    @staticmethod
    @lru_cache(maxsize=256)
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._conn.execute(self._sql(sql), args or None)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        with self._conn.cursor() as cur:
            cur.executemany(self._sql(sql), rows)  # pipelined: one round trip per batch
            return max(cur.rowcount, 0)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Database]:
        # two statements, no parameters: sent together, never server-side prepared
        self._conn.execute(self._begin, prepare=False)
        try:
            yield self
            self._conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(self.Error):
                self._conn.execute("ROLLBACK")
            raise

    def table_exists(self, name: str) -> bool:
        row = self.execute(
            "SELECT 1 FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_name = ?",
            (name,),
        ).fetchone()
        return row is not None

    def close(self) -> None:
        self._conn.close()
