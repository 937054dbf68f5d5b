"""Content-addressed blobs split into chunks, and their reassembly.

A blob is named by its SHA-256 and cut into fixed-size chunks (the last one shorter). Each
chunk travels in its own envelope whose header carries (blob hash, chunk index, total, blob
size), so a receiver can start an assembly from any chunk, in any order, and ask for exactly
the chunks it lacks after a disconnect or a broker restart.

Memory: a sender reads chunks from the bytes it was given or from a file (``pread``), never
copying the whole blob; a receiver keeps small blobs in memory and spills larger ones to a
sparse temporary file, so its memory stays O(chunk) however large the blob is.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import BlobIntegrityError, MalformedMessage, OversizedMessage
from .messages import BlobRef

DEFAULT_CHUNK_SIZE = 256 * 1024
DEFAULT_SPILL_THRESHOLD = 16 * 1024 * 1024
#: what a receiver accepts to reassemble, whatever a chunk header declares: the per-chunk
#: bookkeeping (one byte per chunk) and the sparse spill file are sized from these numbers
MAX_BLOB_BYTES = 1 << 40
MAX_BLOB_CHUNKS = 1 << 22


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, bufsize: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def to_ranges(indices: Iterable[int]) -> list[list[int]]:
    """Sorted indices -> half-open ranges: [0,1,2,5] -> [[0,3],[5,6]]."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def from_ranges(ranges: Iterable[list[int]], total: int) -> list[int]:
    out = []
    for start, stop in ranges:
        out.extend(range(max(0, start), min(stop, total)))
    return out


class OutgoingBlob:
    """A blob a sender offers: bytes in memory or a file on disk."""

    def __init__(self, source: bytes | memoryview | str | os.PathLike, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 kind: str = "", sha256: str | None = None):
        if chunk_size <= 0:
            raise ValueError("chunk_size must be > 0")
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._data: memoryview | None = memoryview(source)
            self._path: Path | None = None
            size = len(self._data)
            digest = sha256 or sha256_bytes(self._data)
        else:
            self._data, self._path = None, Path(source)
            size = self._path.stat().st_size
            digest = sha256 or sha256_file(self._path)
        self.ref = BlobRef(digest, size, chunk_size, kind)
        self.created = time.monotonic()

    def chunk(self, index: int) -> bytes | memoryview:
        ref = self.ref
        if not 0 <= index < ref.total_chunks:
            raise IndexError(f"chunk {index} out of range 0..{ref.total_chunks - 1}")
        start = index * ref.chunk_size
        stop = min(start + ref.chunk_size, ref.size)
        if self._data is not None:
            return self._data[start:stop]
        fd = os.open(self._path, os.O_RDONLY)
        try:
            return os.pread(fd, stop - start, start)
        finally:
            os.close(fd)


class OutgoingStore:
    """Blobs a party has offered and may be asked to resend, kept for ``ttl_s``."""

    def __init__(self, ttl_s: float = 3600.0):
        self.ttl_s = ttl_s
        self._blobs: dict[str, OutgoingBlob] = {}
        self._lock = threading.Lock()

    def put(self, blob: OutgoingBlob) -> None:
        with self._lock:
            self._expire()
            self._blobs[blob.ref.sha256] = blob

    def get(self, sha256: str) -> OutgoingBlob | None:
        with self._lock:
            return self._blobs.get(sha256)

    def release(self, sha256: str) -> None:
        with self._lock:
            self._blobs.pop(sha256, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, b in self._blobs.items() if now - b.created > self.ttl_s]:
            del self._blobs[k]

    def __len__(self) -> int:
        return len(self._blobs)


@dataclass
class BlobResult:
    """A verified blob: in memory (``data``) or in a file the caller now owns (``path``)."""

    ref: BlobRef
    data: bytes | bytearray | None = None
    path: Path | None = None

    def read(self) -> bytes | bytearray:
        if self.data is not None:
            return self.data
        return self.path.read_bytes()

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class Assembly:
    """Reassembles one blob from chunks arriving in any order, with duplicates."""

    def __init__(self, ref: BlobRef, spill_dir: str | os.PathLike | None = None,
                 spill_threshold: int = DEFAULT_SPILL_THRESHOLD):
        if ref.size > MAX_BLOB_BYTES or ref.total_chunks > MAX_BLOB_CHUNKS:
            raise OversizedMessage(
                f"blob {ref.sha256[:12]} of {ref.size} bytes in {ref.total_chunks} chunks is over "
                f"the receiver's limit ({MAX_BLOB_BYTES} bytes, {MAX_BLOB_CHUNKS} chunks)")
        self.ref = ref
        self.total = ref.total_chunks
        self._have = bytearray(self.total)  # 0/1 per chunk
        self.received = 0
        self.last_progress = time.monotonic()
        # the content hash is computed while chunks arrive: chunks that extend the contiguous
        # prefix are hashed at once, so finish() has (almost) nothing left to do
        self._hasher = hashlib.sha256()
        self._hashed = 0  # chunks [0, _hashed) are in the hash
        if ref.size > spill_threshold:
            fd, name = tempfile.mkstemp(prefix=f"blob-{ref.sha256[:12]}-", suffix=".part", dir=spill_dir)
            os.ftruncate(fd, ref.size)  # sparse: costs no disk until written
            self._fd: int | None = fd
            self._path: Path | None = Path(name)
            self._parts: dict[int, bytes] | None = None
        else:
            # chunks are kept as they come, not in a buffer of the declared size: memory follows
            # what the sender really sent, whatever size its (authenticated) header claims
            self._fd, self._path, self._parts = None, None, {}
        self.received_bytes = 0

    def expected_len(self, index: int) -> int:
        if index < self.total - 1:
            return self.ref.chunk_size
        return self.ref.size - (self.total - 1) * self.ref.chunk_size

    def add(self, index: int, data: bytes | memoryview) -> bool:
        """Store a chunk; returns False for a duplicate. Raises MalformedMessage on a chunk that
        cannot belong to this blob."""
        if not 0 <= index < self.total:
            raise MalformedMessage(f"chunk {index} out of range for blob {self.ref.sha256[:12]} ({self.total} chunks)")
        if len(data) != self.expected_len(index):
            raise MalformedMessage(f"chunk {index} of blob {self.ref.sha256[:12]} has {len(data)} bytes, "
                                   f"expected {self.expected_len(index)}")
        if self._have[index]:
            return False
        offset = index * self.ref.chunk_size
        if self._parts is not None:
            self._parts[index] = bytes(data)
        else:
            os.pwrite(self._fd, data, offset)
        self._have[index] = 1
        self.received += 1
        self.received_bytes += len(data)
        self.last_progress = time.monotonic()
        if index == self._hashed:
            self._hasher.update(data)
            self._hashed += 1
            self._catch_up()
        return True

    def _catch_up(self) -> None:
        while self._hashed < self.total and self._have[self._hashed]:
            offset = self._hashed * self.ref.chunk_size
            n = self.expected_len(self._hashed)
            if self._parts is not None:
                self._hasher.update(self._parts[self._hashed])
            else:
                self._hasher.update(os.pread(self._fd, n, offset))
            self._hashed += 1

    @property
    def in_memory(self) -> bool:
        return self._parts is not None

    @property
    def complete(self) -> bool:
        return self.received == self.total

    def missing(self) -> list[int]:
        return [i for i, h in enumerate(self._have) if not h]

    def finish(self) -> BlobResult:
        """Verify the content hash and hand the blob over. On mismatch the parts are discarded
        and :class:`BlobIntegrityError` is raised."""
        if not self.complete:
            raise BlobIntegrityError(f"blob {self.ref.sha256[:12]} incomplete: {len(self.missing())} chunks missing")
        self._catch_up()
        digest = self._hasher.hexdigest()
        if self._parts is not None:
            parts, self._parts = self._parts, None
            if digest != self.ref.sha256:
                raise BlobIntegrityError(f"blob {self.ref.sha256[:12]} failed its SHA-256 check")
            return BlobResult(self.ref, data=b"".join(parts[i] for i in range(self.total)))
        os.close(self._fd)
        self._fd = None
        if digest != self.ref.sha256:
            self._path.unlink(missing_ok=True)
            raise BlobIntegrityError(f"blob {self.ref.sha256[:12]} failed its SHA-256 check")
        final = self._path.with_suffix(".blob")
        os.replace(self._path, final)
        return BlobResult(self.ref, path=final)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        self._parts = None
