from __future__ import annotations

import os
import random

import pytest

from bridge.blobs import Assembly, OutgoingBlob, OutgoingStore, from_ranges, sha256_bytes, to_ranges
from bridge.errors import BlobIntegrityError, MalformedMessage
from bridge.messages import BlobRef


@pytest.mark.parametrize("size,chunk", [(0, 4), (1, 4), (4, 4), (10, 4), (1000, 7)])
def test_shuffled_duplicated_chunks_reassemble(size, chunk, tmp_path):
    data = os.urandom(size)
    out = OutgoingBlob(data, chunk)
    for spill in (1 << 30, 0):  # in memory, then spilled to disk
        a = Assembly(out.ref, spill_dir=tmp_path, spill_threshold=spill)
        order = list(range(out.ref.total_chunks)) * 2
        random.Random(size).shuffle(order)
        for i in order:
            a.add(i, out.chunk(i))
        res = a.finish()
        assert res.read() == data
        assert (res.path is None) == (spill > 0 or size == 0)
        res.discard()


def test_file_backed_sender_and_missing_ranges(tmp_path):
    data = os.urandom(10_000)
    path = tmp_path / "emulator.bin"
    path.write_bytes(data)
    out = OutgoingBlob(path, 1024)
    assert out.ref.sha256 == sha256_bytes(data) and out.ref.total_chunks == 10
    a = Assembly(out.ref)
    for i in (0, 1, 2, 5, 9):
        a.add(i, out.chunk(i))
    assert a.missing() == [3, 4, 6, 7, 8]
    assert to_ranges(a.missing()) == [[3, 5], [6, 9]]
    assert from_ranges(to_ranges(a.missing()), 10) == a.missing()
    for i in a.missing():
        a.add(i, out.chunk(i))
    assert a.finish().read() == data


def test_corrupted_blob_is_refused_and_parts_removed(tmp_path):
    data = os.urandom(5000)
    ref = BlobRef(sha256_bytes(data), len(data), 1000)
    a = Assembly(ref, spill_dir=tmp_path, spill_threshold=0)
    bad = bytearray(data)
    bad[2500] ^= 1
    for i in range(5):
        a.add(i, bytes(bad[i * 1000:(i + 1) * 1000]))
    with pytest.raises(BlobIntegrityError):
        a.finish()
    assert list(tmp_path.iterdir()) == []


def test_chunks_that_cannot_belong_are_malformed():
    ref = BlobRef("00" * 32, 2500, 1000)
    a = Assembly(ref)
    with pytest.raises(MalformedMessage):
        a.add(3, b"x" * 1000)
    with pytest.raises(MalformedMessage):
        a.add(0, b"x" * 999)
    with pytest.raises(MalformedMessage):
        a.add(2, b"x" * 1000)  # last chunk is 500 bytes
    with pytest.raises(BlobIntegrityError):
        a.finish()


def test_spilled_assembly_uses_constant_memory(tmp_path):
    """64 MB through a spilled assembly: the process's peak RSS grows by far less than the blob."""
    import resource

    chunk = os.urandom(256 * 1024)
    import hashlib
    h = hashlib.sha256()
    for _ in range(256):
        h.update(chunk)
    ref = BlobRef(h.hexdigest(), 256 * len(chunk), len(chunk))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    a = Assembly(ref, spill_dir=tmp_path, spill_threshold=1 << 20)
    for i in range(256):
        a.add(i, chunk)
    res = a.finish()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert res.path is not None and res.path.stat().st_size == ref.size
    assert grown_mb < 32, f"peak RSS grew {grown_mb:.0f} MB for a 64 MB spilled blob"
    res.discard()


def test_outgoing_store_expires():
    store = OutgoingStore(ttl_s=0)
    store.put(OutgoingBlob(b"abc", 2))
    store.put(OutgoingBlob(b"def", 2))
    assert len(store) == 1
