from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from wire_helpers import sample_task, sample_update

from bridge.codec import Message, Tensors, decode, encode, message_types, register
from bridge.errors import MalformedMessage, UnsupportedVersion
from bridge.messages import BlobRef, ChunkRequest, ErrorReport, KeyGrant, Note, Task, Update

GOLDEN = Path(__file__).parent / "golden"


def _same_update(a: Update, b: Update) -> None:
    assert (a.round, a.algorithm, a.num_examples, a.metrics, a.blobs) == (b.round, b.algorithm, b.num_examples, b.metrics, b.blobs)
    assert sorted(a.tensors) == sorted(b.tensors)
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype
        np.testing.assert_array_equal(a.tensors[k], b.tensors[k])


def _secagg_samples() -> dict:
    import base64

    from bridge.messages import (
        SecAggKeys,
        SecAggNeighbours,
        SecAggReveal,
        SecAggShares,
        SecAggUnmask,
    )

    def b(n: int, c: bytes = b"k") -> str:
        return base64.b64encode(c * n).decode()

    ad = {"c_pk": b(32), "s_pk": b(32, b"s"), "sig": b(64), "sign_pub": b(32, b"p"), "cert": ""}
    return {"secagg_keys": SecAggKeys(3, b(32), b(32, b"s"), b(64), cert="-----BEGIN CERTIFICATE-----"),
            "secagg_neighbours": SecAggNeighbours(3, {"bob": ad}),
            "secagg_shares": SecAggShares(3, {"bob": b(300)}),
            "secagg_unmask": SecAggUnmask(3, ["bob"], ["carol"]),
            "secagg_reveal": SecAggReveal(3, {"bob": {"x": 2, "b": b(66)}, "carol": {"x": 1, "s": b(66)}})}


def test_secagg_messages_refuse_malformed_fields():
    import base64

    from bridge.messages import SecAggKeys, SecAggReveal, SecAggShares

    good = base64.b64encode(b"k" * 32).decode()
    with pytest.raises(ValueError, match="32 bytes"):
        SecAggKeys(1, base64.b64encode(b"k" * 31).decode(), good, base64.b64encode(b"s" * 64).decode())
    with pytest.raises(ValueError, match="base64"):
        SecAggShares(1, {"bob": "not base64!"})
    with pytest.raises(ValueError, match="at most"):
        SecAggShares(1, {"bob": "A" * 4096})
    with pytest.raises(ValueError, match="'x', 'b'"):  # both kinds of share for one client
        SecAggReveal(1, {"bob": {"x": 1, "b": good, "s": good}})


def test_round_trip_every_registered_type():
    samples = {
        "task": sample_task(), "update": sample_update(), "key_grant": KeyGrant("k" * 32, "QUJD", 2),
        "chunk_request": ChunkRequest("ab" * 32, [[0, 3], [7, 8]]), "blob_ack": None,
        "error": ErrorReport("stale_round", "late", "mid1", 4), "note": Note("join", {"a": [1, 2]}, 1),
        **_secagg_samples(),
    }
    for mtype, cls in message_types().items():
        msg = samples.get(mtype) or cls("ab" * 32)
        back = decode(encode(msg))
        assert type(back) is cls
        if mtype == "update":
            _same_update(msg, back)
        else:
            assert back == msg


def test_seeded_random_tensors_round_trip():
    rng = np.random.default_rng(1234)
    for _ in range(20):
        tensors = {f"t{i}": rng.standard_normal(tuple(rng.integers(1, 9, size=rng.integers(1, 4)))).astype(
            rng.choice([np.float32, np.float16, np.int32])) for i in range(rng.integers(1, 6))}
        msg = Update(round=int(rng.integers(0, 100)), algorithm="fedavg", num_examples=5, tensors=tensors)
        _same_update(msg, decode(encode(msg)))


def test_golden_messages_still_decode():
    """Files written by v1: every later version must keep reading them (devices lag)."""
    _same_update(decode((GOLDEN / "update_v1.msg").read_bytes()), sample_update())
    assert decode((GOLDEN / "task_v1.msg").read_bytes()) == sample_task()


def _rewrite_header(raw: bytes, edit) -> bytes:
    magic, ver, hlen = struct.unpack_from("<3sBI", raw)
    header = json.loads(raw[8:8 + hlen])
    edit(header)
    head = json.dumps(header).encode()
    return struct.pack("<3sBI", magic, ver, len(head)) + head + raw[8 + hlen:]


def test_unknown_fields_are_ignored_with_a_warning(caplog):
    raw = _rewrite_header(encode(sample_task()), lambda h: h["fields"].update(future_field=42))
    with caplog.at_level(logging.WARNING):
        assert decode(raw) == sample_task()
    assert "future_field" in caplog.text


def test_newer_version_is_refused():
    raw = _rewrite_header(encode(sample_task()), lambda h: h.update(v=99))
    with pytest.raises(UnsupportedVersion):
        decode(raw)
    with pytest.raises(UnsupportedVersion):
        decode(b"CTM\x07" + raw[4:])


@pytest.mark.parametrize("mutate", [
    lambda r: r[:5],
    lambda r: b"XXX" + r[3:],
    lambda r: r[:8] + b"{not json" + r[8:],
    lambda r: _rewrite_header(r, lambda h: h.update(type="no_such_type")),
    lambda r: _rewrite_header(r, lambda h: h["fields"].update(round="three")),
    lambda r: _rewrite_header(r, lambda h: h["fields"].update(num_examples=True)),
    lambda r: _rewrite_header(r, lambda h: h["fields"].update(num_examples=-1)),
    lambda r: _rewrite_header(r, lambda h: h["tensors"]["tensors"].append("ghost")),
    lambda r: r[:-10],
    lambda r: struct.pack("<3sBI", b"CTM", 1, 10**6) + r[8:],
])
def test_malformed_input_gives_typed_error(mutate):
    with pytest.raises(MalformedMessage):
        decode(mutate(encode(sample_update())))


def test_encoder_refuses_non_json_and_non_array():
    with pytest.raises(MalformedMessage):
        encode(Note("x", {"bad": object()}))
    with pytest.raises(MalformedMessage):
        encode(Note("x", {"nan": float("nan")}))
    with pytest.raises(MalformedMessage):
        encode(Update(round=1, algorithm="a", num_examples=1, tensors={"t": [1, 2]}))


def test_registry_rejects_duplicates_and_unregistered():
    @dataclass
    class Loose(Message):
        TYPE = "loose"
        tensors: Tensors = field(default_factory=dict)

    with pytest.raises(MalformedMessage):
        encode(Loose())
    with pytest.raises(ValueError):
        register(type("Dup", (Note,), {"TYPE": "note"}))


def test_blob_ref_validates():
    with pytest.raises(ValueError):
        BlobRef("xyz", 1, 1)
    with pytest.raises(ValueError):
        Task(round=1, algorithm="a", downloads={"g": {"sha256": "00" * 32, "size": -1, "chunk_size": 4}})
    assert BlobRef("00" * 32, 10, 4).total_chunks == 3
    assert BlobRef("00" * 32, 0, 4).total_chunks == 1


def test_optional_field_types_are_checked():
    raw = _rewrite_header(encode(ErrorReport("x", "y", "mid", 1)), lambda h: h["fields"].update(ref=5))
    with pytest.raises(MalformedMessage):
        decode(raw)
    assert decode(encode(ErrorReport("x", "y", None, 1))).ref is None
