"""A read-only view of the ledger for the status page, ``/metrics`` and ``cotune aggregator
status``: its own connection (SQLite opened read-only, PostgreSQL with read-only
transactions), never the service's (SQLite connections belong to one thread), serialised by a
lock so that the HTTP server's request threads can share it.

Cheap at 10,000 devices: counts and per-round sums are aggregated in SQL (the numbers inside a
participant's metrics JSON through the engine's JSON functions); the device table is a page of
the devices seen in the last ``window`` rounds, grouped in SQL, and only that page's latest
metrics are parsed; per-round figures of committed rounds never change and are cached.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import telemetry
from .state_sql import connect, is_postgres_target

#: the numeric fields summed or averaged per round, as JSON paths into a participant's metrics
_ROUND_FIELDS = {
    "bytes_up": ("bytes_up",),
    "bytes_down": ("bytes_down",),
    "ppl_before": ("ppl_before",),
    "ppl_after": ("ppl_after",),
    "tokens_per_s": ("train", "tokens_per_s"),
    "peak_memory_bytes": ("peak_memory_bytes",),
    "seconds": ("seconds",),
}
DEVICE_SORTS = ("client", "last_seen")


class _ReadOnlyDB:
    def __init__(self, target: str | os.PathLike[str]):
        self.postgres = is_postgres_target(target)
        if self.postgres:
            self._db = connect(str(target))
            self._db.execute("SET default_transaction_read_only = on")
            self.execute = self._db.execute
        else:
            path = Path(target).resolve()
            if not path.exists():
                raise FileNotFoundError(f"no ledger at {path} yet")
            self._conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True,
                                         check_same_thread=False, timeout=5.0, isolation_level=None)
            self.execute = self._conn.execute

    def num(self, *path: str) -> str:
        """SQL for a numeric JSON field of ``metrics`` (NULL when absent or not a number)."""
        for p in path:
            if not p.replace("_", "").isalnum():
                raise ValueError(f"bad JSON path element {p!r}")
        if self.postgres:
            ref = "{" + ",".join(path) + "}"
            return (f"(CASE WHEN jsonb_typeof(metrics::jsonb #> '{ref}') = 'number' "
                    f"THEN (metrics::jsonb #>> '{ref}')::double precision END)")
        jp = "$." + ".".join(path)
        return (f"(CASE WHEN json_type(metrics, '{jp}') IN ('integer', 'real') "
                f"THEN json_extract(metrics, '{jp}') END)")

    def close(self) -> None:
        if self.postgres:
            self._db.close()
        else:
            self._conn.close()


class LedgerView:
    """Read-only queries over one federation's ledger. ``target``: the SQLite file or the
    PostgreSQL DSN the service uses. Thread-safe (one connection, one lock)."""

    def __init__(self, target: str | os.PathLike[str], *, window: int = 50, history: int = 200):
        self.target = target
        self.window = window
        self.history = history
        self._db: _ReadOnlyDB | None = None
        self._lock = threading.Lock()
        self._rounds_cache: dict[int, dict] = {}

    def _conn(self) -> _ReadOnlyDB:
        if self._db is None:
            self._db = _ReadOnlyDB(self.target)
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _q(self, sql: str, args: tuple | list = ()) -> list[tuple]:
        return self._conn().execute(sql, tuple(args)).fetchall()

    # -- the pieces -------------------------------------------------------------------------
    def ready(self) -> bool:
        try:
            with self._lock:
                return bool(self._q("SELECT 1 FROM rounds LIMIT 1"))
        except Exception:
            return False

    def summary(self, *, quorum_fraction: float | None = None, rejections: int = 50) -> dict[str, Any]:
        """Federation, current round (with counts), the recent rounds with per-round figures
        and the recent rejections with counts by reason."""
        with self._lock:
            fed = self._q("SELECT id, algorithm, created FROM federation LIMIT 1")
            head = self._q("SELECT MAX(round) FROM rounds")[0][0]
            out: dict[str, Any] = {
                "federation": None if not fed else {"id": fed[0][0], "algorithm": fed[0][1],
                                                    "created": fed[0][2]},
                "now": time.time(), "current": None, "rounds": [], "rejections": {}, "recent_rejections": [],
                "devices_seen": 0, "rounds_committed": 0,
            }
            if head is None:
                return out
            out["rounds_committed"] = self._q(
                "SELECT COUNT(*) FROM rounds WHERE status = 'committed' AND round > 0")[0][0]
            first = max(1, head - self.history + 1)
            rows = self._q("SELECT round, status, deadline, opened_at, closed_at, metrics FROM rounds"
                           " WHERE round >= ? ORDER BY round", (first,))
            counts: dict[int, dict[str, int]] = {}
            for r, st, n in self._q("SELECT round, status, COUNT(*) FROM participants WHERE round >= ?"
                                    " GROUP BY round, status", (first,)):
                counts.setdefault(int(r), {})[st] = int(n)
            figures = self._round_figures(first, head, {int(r[0]): r[1] for r in rows})
            history = []
            for r, st, deadline, opened, closed, metrics_json in rows:
                c = counts.get(int(r), {})
                selected = sum(c.values())
                m = _loads(metrics_json) if st == "committed" else {}
                entry = {
                    "round": int(r), "status": st, "opened_at": opened, "closed_at": closed,
                    "deadline": deadline, "selected": selected, "accepted": c.get("accepted", 0),
                    "rejected": c.get("rejected", 0), "dropped": c.get("dropped", 0),
                    "pending": c.get("selected", 0),
                    "seconds": _number(m.get("seconds")) if m else (None if closed is None else closed - opened),
                    "quorum": _int(m.get("quorum")) if m else None,
                    "skipped": str(m["skipped"])[:120] if m.get("skipped") else None,
                    **figures.get(int(r), {}),
                }
                if entry["quorum"] is None and quorum_fraction is not None and selected:
                    entry["quorum"] = max(1, math.ceil(quorum_fraction * selected - 1e-9))
                history.append(entry)
            out["rounds"] = [h for h in history if h["round"] > 0]
            out["current"] = history[-1] if history and history[-1]["round"] > 0 else None
            low = max(0, head - self.window)
            out["devices_seen"] = self._q("SELECT COUNT(DISTINCT client) FROM participants WHERE round > ?",
                                          (low,))[0][0]
            by_reason: dict[str, int] = {}
            for kind, reason, n in self._q(
                    "SELECT kind, reason, COUNT(*) FROM events WHERE kind IN ('rejected', 'wire_rejected')"
                    " AND round > ? GROUP BY kind, reason", (low,)):
                key = reason or "unknown"
                if kind == "wire_rejected":
                    key = f"wire:{key}"
                by_reason[key] = by_reason.get(key, 0) + int(n)
            out["rejections"] = dict(sorted(by_reason.items(), key=lambda kv: -kv[1]))
            out["recent_rejections"] = [
                {"at": at, "round": r, "client": c, "kind": k, "reason": reason, "detail": _short(detail)}
                for at, r, c, k, reason, detail in self._q(
                    "SELECT at, round, client, kind, reason, detail FROM events"
                    " WHERE kind IN ('rejected', 'wire_rejected') ORDER BY id DESC LIMIT ?", (int(rejections),))
            ]
            return out

    def _round_figures(self, first: int, head: int, status: dict[int, str]) -> dict[int, dict]:
        """Per-round sums and means of the accepted updates' metrics (SQL JSON functions);
        committed rounds are cached, they never change."""
        todo = [r for r in range(first, head + 1) if r not in self._rounds_cache]
        if not todo:
            return {r: self._rounds_cache[r] for r in range(first, head + 1)}
        db = self._conn()
        cols = ", ".join(
            f"{'SUM' if k.startswith('bytes') else 'MAX' if k == 'peak_memory_bytes' else 'AVG'}({db.num(*p)})"
            for k, p in _ROUND_FIELDS.items())
        found: dict[int, dict] = {}
        for row in self._q(f"SELECT round, {cols} FROM participants WHERE status = 'accepted' AND round >= ?"
                           " AND round <= ? GROUP BY round", (min(todo), head)):
            found[int(row[0])] = {k: _number(v) for k, v in zip(_ROUND_FIELDS, row[1:], strict=True)}
        out = {}
        for r in range(first, head + 1):
            if r in self._rounds_cache:
                out[r] = self._rounds_cache[r]
                continue
            fig = found.get(r, {k: None for k in _ROUND_FIELDS})
            fig = {("peak_memory_max_bytes" if k == "peak_memory_bytes" else
                    "mean_" + k if k in ("ppl_before", "ppl_after", "tokens_per_s", "seconds") else k): v
                   for k, v in fig.items()}
            fig["device_seconds_mean"] = fig.pop("mean_seconds")
            if status.get(r) == "committed":
                self._rounds_cache[r] = fig
            out[r] = fig
        return out

    def devices(self, *, offset: int = 0, limit: int = 50, sort: str = "client",
                search: str | None = None) -> dict[str, Any]:
        """A page of the devices seen in the last ``window`` rounds: counts grouped in SQL, the
        latest accepted update's telemetry of each device on the page."""
        limit = max(1, min(int(limit), 500))
        offset = max(0, int(offset))
        if sort not in DEVICE_SORTS:
            sort = "client"
        with self._lock:
            head = self._q("SELECT MAX(round) FROM rounds")[0][0] or 0
            low = max(0, head - self.window)
            where, args = "WHERE round > ?", [low]
            if search:
                where += " AND client LIKE ?"
                args.append(_like(search))
            total = self._q(f"SELECT COUNT(DISTINCT client) FROM participants {where}", args)[0][0]
            order = "client" if sort == "client" else "last_seen DESC, client"
            rows = self._q(
                "SELECT client, MAX(received_at) AS last_seen, COUNT(*),"
                " SUM(CASE WHEN status = 'accepted' THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN status = 'rejected' THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN status = 'dropped' THEN 1 ELSE 0 END)"
                f" FROM participants {where} GROUP BY client ORDER BY {order} LIMIT ? OFFSET ?",
                [*args, limit, offset])
            latest: dict[str, tuple] = {}
            if rows:
                marks = ", ".join("?" for _ in rows)
                for client, r, metrics, at, n in self._q(
                        "SELECT client, round, metrics, received_at, num_examples FROM participants"
                        f" WHERE round > ? AND status = 'accepted' AND client IN ({marks})",
                        [low, *[row[0] for row in rows]]):
                    if client not in latest or r > latest[client][0]:
                        latest[client] = (r, metrics, at, n)
        items = []
        for client, last_seen, rounds, acc, rej, drop in rows:
            lt = latest.get(client)
            tel = telemetry.extract(_loads(lt[1])) if lt else telemetry.extract({})
            items.append({"client": client, "last_seen": last_seen, "rounds": int(rounds), "accepted": int(acc or 0),
                          "rejected": int(rej or 0), "dropped": int(drop or 0),
                          "last_round": lt[0] if lt else None, **tel})
        return {"total": int(total), "offset": offset, "limit": limit, "sort": sort, "window": self.window,
                "devices": items}

    def device(self, client: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """The telemetry of one device, one row per round it took part in (oldest first)."""
        sql = ("SELECT round, client, status, received_at, num_examples, metrics FROM participants"
               " WHERE client = ? ORDER BY round")
        with self._lock:
            rows = self._q(sql, (client,))
        if limit is not None:
            rows = rows[-int(limit):]
        return [telemetry.row(r, c, st, at, n, _loads(m)) for r, c, st, at, n, m in rows]

    def telemetry_rows(self, client: str | None = None):
        """Every device's telemetry per round (for a CSV export), round by round."""
        if client is not None:
            yield from self.device(client)
            return
        with self._lock:
            head = self._q("SELECT MAX(round) FROM rounds")[0][0] or 0
        for r in range(1, head + 1):
            with self._lock:
                rows = self._q("SELECT round, client, status, received_at, num_examples, metrics FROM participants"
                               " WHERE round = ? ORDER BY client", (r,))
            for rr, c, st, at, n, m in rows:
                yield telemetry.row(rr, c, st, at, n, _loads(m))


def _loads(text: Any) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _short(detail: Any, limit: int = 200) -> str | None:
    if not detail:
        return None
    text = "".join(ch if ch.isprintable() else " " for ch in str(detail))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _like(text: str) -> str:
    return "%" + text.replace("\\", "").replace("%", "").replace("_", "") + "%"
