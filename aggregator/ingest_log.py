"""The write-ahead log of a round's accepted updates: append, group commit, replay.

Why a log: making every accepted update durable on its own (a partial-aggregate checkpoint
plus a full-sync ledger transaction per update) costs two fsyncs and a file the size of the
aggregate per update. Here an accepted update is appended to the round's log (its validated
tensors and bookkeeping), the log is fsynced once per batch (group commit), and only then is
the sender acknowledged. The partial aggregate is checkpointed every K updates or T seconds;
after a crash the service reloads the last checkpoint and folds again the logged updates it
does not contain (its ``clients`` list says which), so an acknowledged update is never lost
and never counted twice.

Layout: ``<dir>/round-<r>-<seq>.wal`` segments. A new segment starts at each checkpoint, and
the segments a checkpoint covers are deleted once the ledger points at it; the whole round's
log is deleted when the round commits, so the disk holds at most one checkpoint interval of
updates (plus the current segment).

Record framing: ``MAGIC | u32 body length | u32 CRC-32 of body | body``; body = ``u32 meta
length | meta JSON | safetensors bytes``. A torn tail (a crash inside a write) fails its
length or CRC check and is cut off at replay; everything before it is intact because records
are only appended.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from .errors import StateError
from .state import _contiguous, _fsync_dir

MAGIC = b"CTWL"
_FRAME = struct.Struct("<4sII")
_META_LEN = struct.Struct("<I")
_SEGMENT_RE = re.compile(r"^round-(\d{6,})-(\d{6,})\.wal$")


@dataclass
class LogRecord:
    """One accepted update as it was folded: enough to fold it again after a crash."""

    round: int
    client: str
    weight: float
    num_examples: int
    update_digest: str
    received_at: float
    metrics: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    fold: dict[str, Any] = field(default_factory=dict)  # extra arguments of the rule's add

    def encode(self, tensor_bytes: bytes | None = None) -> bytes:
        """The framed record; ``tensor_bytes``: the tensors' safetensors bytes when the caller
        already made them (they also give the update digest)."""
        meta = json.dumps(
            {"round": self.round, "client": self.client, "weight": self.weight,
             "num_examples": self.num_examples, "update_digest": self.update_digest,
             "received_at": self.received_at, "metrics": self.metrics, "fold": self.fold},
            separators=(",", ":"), sort_keys=True, default=_json_default,
        ).encode()
        if tensor_bytes is None:
            tensor_bytes = safetensors.numpy.save(_contiguous(self.tensors))
        body = b"".join((_META_LEN.pack(len(meta)), meta, tensor_bytes))
        return _FRAME.pack(MAGIC, len(body), zlib.crc32(body)) + body

    @classmethod
    def decode(cls, body: bytes | memoryview) -> LogRecord:
        (n,) = _META_LEN.unpack_from(body)
        meta = json.loads(bytes(body[_META_LEN.size:_META_LEN.size + n]))
        tensors = safetensors.numpy.load(bytes(body[_META_LEN.size + n:]))
        return cls(meta["round"], meta["client"], float(meta["weight"]), int(meta["num_examples"]),
                   meta["update_digest"], float(meta["received_at"]), dict(meta.get("metrics") or {}),
                   tensors, dict(meta.get("fold") or {}))


class IngestLog:
    """The log of one round in ``directory``. One writer (the service's ingest loop).

    :meth:`append` writes a record through to the OS (not yet durable); :meth:`sync` makes
    everything appended so far durable with one fsync and returns those records, whose
    senders may now be acknowledged. :meth:`rotate` starts a new segment at a checkpoint;
    :meth:`drop_before` deletes the segments the checkpoint covers.
    """

    def __init__(self, directory: str | os.PathLike[str], round: int, *, fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.round = round
        self.fsync = fsync
        existing = [seq for r, seq in _segments(self.dir) if r == round]
        self.seq = max(existing, default=-1) + 1
        self._fh = None
        self._unsynced: list[LogRecord] = []
        self.bytes_written = 0
        self._open_segment()

    def _open_segment(self) -> None:
        self._fh = open(self.segment_path(self.seq), "ab", buffering=0)  # noqa: SIM115 - closed by rotate/close
        if self.fsync:
            _fsync_dir(self.dir)

    def segment_path(self, seq: int) -> Path:
        return self.dir / f"round-{self.round:06d}-{seq:06d}.wal"

    # -- writing ------------------------------------------------------------------------
    def append(self, record: LogRecord, tensor_bytes: bytes | None = None) -> None:
        if record.round != self.round:
            raise StateError(f"record for round {record.round} appended to the log of round {self.round}")
        data = record.encode(tensor_bytes)
        self._fh.write(data)
        self.bytes_written += len(data)
        record.tensors = {}  # folded and logged: the log, not memory, keeps the tensors now
        self._unsynced.append(record)

    @property
    def unsynced(self) -> int:
        return len(self._unsynced)

    def sync(self) -> list[LogRecord]:
        """One fsync for every record appended since the last sync; returns them."""
        if not self._unsynced:
            return []
        if self.fsync:
            os.fsync(self._fh.fileno())
        done, self._unsynced = self._unsynced, []
        return done

    def rotate(self) -> int:
        """Sync, close the current segment and open the next; returns the new segment's
        number (everything in lower-numbered segments was appended before the rotation)."""
        self.sync()
        self._fh.close()
        self.seq += 1
        self._open_segment()
        return self.seq

    def drop_before(self, seq: int) -> int:
        """Delete this round's segments numbered below ``seq``; returns bytes freed."""
        freed = 0
        for r, s in _segments(self.dir):
            if r == self.round and s < seq:
                path = self.segment_path(s)
                with contextlib.suppress(FileNotFoundError):
                    freed += path.stat().st_size
                    path.unlink()
        return freed

    def close(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None

    # -- reading ------------------------------------------------------------------------
    @staticmethod
    def replay(directory: str | os.PathLike[str], round: int) -> Iterator[LogRecord]:
        """Every intact record of ``round``'s segments, in append order. A torn or corrupt
        tail is truncated away (it was never synced, so never acknowledged)."""
        d = Path(directory)
        for r, seq in sorted(_segments(d)):
            if r != round:
                continue
            path = d / f"round-{r:06d}-{seq:06d}.wal"
            yield from _read_segment(path)

    @staticmethod
    def discard_round(directory: str | os.PathLike[str], round: int | None = None) -> int:
        """Delete the segments of ``round`` (every round's when None); returns bytes freed."""
        d = Path(directory)
        freed = 0
        for r, seq in _segments(d):
            if round is None or r == round:
                path = d / f"round-{r:06d}-{seq:06d}.wal"
                with contextlib.suppress(FileNotFoundError):
                    freed += path.stat().st_size
                    path.unlink()
        return freed


def _read_segment(path: Path) -> Iterator[LogRecord]:
    good = 0
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with fh:
        while True:
            head = fh.read(_FRAME.size)
            if len(head) < _FRAME.size:
                break
            magic, n, crc = _FRAME.unpack(head)
            if magic != MAGIC:
                break
            body = fh.read(n)
            if len(body) < n or zlib.crc32(body) != crc:
                break
            try:
                record = LogRecord.decode(body)
            except Exception:  # CRC-valid but unreadable: written by another build; stop here
                break
            good = fh.tell()
            yield record
        size = fh.seek(0, os.SEEK_END)
    if size > good:
        with open(path, "r+b") as out:
            out.truncate(good)
            out.flush()
            os.fsync(out.fileno())


def _segments(d: Path) -> list[tuple[int, int]]:
    out = []
    if not d.is_dir():
        return out
    for p in d.iterdir():
        m = _SEGMENT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2))))
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot log {type(obj).__name__} as JSON")
