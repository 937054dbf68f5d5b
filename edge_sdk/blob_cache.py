"""A content-addressed cache of downloaded blobs on the device.

Blobs are named by their SHA-256 (the hash every Task download carries), so a blob the device
already holds, such as an unchanged FedBiOT emulator, is read from disk instead of fetched
again. Every read is verified against the name; a corrupted file is deleted and counts as a
miss. The cache is bounded: least recently used blobs go first once ``max_bytes`` is passed
(the blob just written always stays).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("cotune.edge")

DEFAULT_MAX_BYTES = 4 * 2**30
_SHA = re.compile(r"^[0-9a-f]{64}$")


class BlobCache:
    def __init__(self, root: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    def _path(self, sha256: str) -> Path:
        if not _SHA.match(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / sha256

    def get(self, sha256: str) -> bytes | None:
        """The blob's bytes if cached and intact, else None."""
        p = self._path(sha256)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            log.warning("blob cache: %s is corrupted; dropped", sha256[:12])
            p.unlink(missing_ok=True)
            return None
        os.utime(p)  # recently used
        return data

    def put(self, sha256: str, data: bytes | bytearray) -> bool:
        """Store a blob (its hash is checked); False when it does not fit the budget."""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"blob does not hash to {sha256[:12]}")
        if len(data) > self.max_bytes:
            return False
        p = self._path(sha256)
        if not p.exists():
            tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, p)
        os.utime(p)
        self.prune(keep=sha256)
        return True

    def prune(self, keep: str | None = None) -> None:
        entries = []
        for p in self.root.iterdir():
            if _SHA.match(p.name):
                st = p.stat()
                entries.append((st.st_mtime, p.name, st.st_size, p))
        total = sum(e[2] for e in entries)
        for _, name, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            if name == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size

    def __contains__(self, sha256: str) -> bool:
        return self._path(sha256).exists()
