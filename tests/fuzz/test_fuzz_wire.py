"""Property tests of the wire parsers: any bytes from the network give a typed BridgeError,
never another exception. Deterministic (derandomized, no example database) and short; the long
runs are ``bench/fuzz.py``."""

from __future__ import annotations

import functools
import json
import math
import struct
import time

import numpy as np
import pytest
import targets as T
from fuzz_settings import FAST
from hypothesis import assume, given
from hypothesis import strategies as st

from bridge.blobs import MAX_BLOB_BYTES, MAX_BLOB_CHUNKS, Assembly
from bridge.codec import _PREFIX as CODEC_PREFIX
from bridge.codec import decode, encode
from bridge.envelope import _PREFIX, Header, ReplayGuard
from bridge.errors import BlobIntegrityError, BridgeError, MalformedMessage, OversizedMessage
from bridge.messages import BlobRef

#: JSON values an attacker can write, NaN, Infinity and integers past every range included
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**400, 2**1024])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@functools.cache
def _valid_head() -> bytes:
    frame = T.sender("alice").seal("aggregator", "update", b"x", round=2)
    _, _, n = _PREFIX.unpack_from(frame)
    return frame[_PREFIX.size : _PREFIX.size + n]


def _valid_header() -> dict:
    return json.loads(_valid_head())


HEADER_KEYS = [
    "v",
    "fed",
    "round",
    "from",
    "to",
    "type",
    "mid",
    "ts",
    "nonce",
    "epk",
    "kid",
    "blob",
    "chunk",
    "total",
    "bsize",
    "csize",
]


# -- envelope header -------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=512))
def test_header_from_arbitrary_bytes_is_typed(raw):
    try:
        Header.from_bytes(raw)
    except MalformedMessage:
        pass


@FAST
@given(
    st.dictionaries(st.sampled_from(HEADER_KEYS), json_values, max_size=4),
    st.sets(st.sampled_from(HEADER_KEYS)),
)
def test_header_field_edits_are_typed_and_bounded(edits, dropped):
    d = {k: v for k, v in _valid_header().items() if k not in dropped}
    d.update(edits)
    try:
        h = Header.from_bytes(json.dumps(d).encode())
    except MalformedMessage:
        return
    assert math.isfinite(h.ts) and 0 <= h.ts <= 2**40
    for name in ("round", "chunk", "total", "bsize", "csize"):
        v = getattr(h, name)
        assert type(v) is int and 0 <= v < 2**63
    assert Header.from_bytes(h.to_bytes()) == h


@pytest.mark.parametrize(
    "ts",
    [
        float("nan"),
        float("inf"),
        float("-inf"),
        -1.0,
        -1,
        2.0**41,
        10**400,
        True,
        "1800000000",
        None,
        [1],
    ],
)
def test_header_refuses_non_finite_negative_huge_or_non_numeric_timestamps(ts):
    d = _valid_header()
    d["ts"] = ts
    with pytest.raises(MalformedMessage):
        Header.from_bytes(json.dumps(d).encode())


@pytest.mark.parametrize("ts", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_signed_frame_with_non_finite_timestamp_is_refused(ts):
    """Observed before the fix: a NaN timestamp passed the replay window (every comparison
    with NaN is false). A correctly signed and encrypted frame must still be refused."""
    d = _valid_header()
    head = (
        json.dumps(d, separators=(",", ":"), sort_keys=True)
        .replace(f'"ts":{d["ts"]}', f'"ts":{ts}')
        .encode()
    )
    assert ts.encode() in head
    frame, encrypted = T.seal_header(head, b"payload")
    with pytest.raises(MalformedMessage):
        T.receiver().open(frame)


def test_replay_guard_refuses_a_nan_timestamp_even_on_a_hand_built_header():
    h = Header(
        federation="f",
        round=0,
        sender="a",
        recipient="b",
        type="t",
        mid="m",
        ts=float("nan"),
        nonce=bytes(12),
        epk=bytes(32),
    )
    with pytest.raises(MalformedMessage):
        ReplayGuard(clock=lambda: T.NOW).check(h)


@pytest.mark.parametrize(
    "field,value", [("round", 2**63), ("bsize", 10**30), ("chunk", -1), ("v", True), ("v", 1.0)]
)
def test_header_refuses_out_of_range_integers_and_fake_versions(field, value):
    d = _valid_header()
    d[field] = value
    with pytest.raises(MalformedMessage):
        Header.from_bytes(json.dumps(d).encode())


# -- Sealer.open -----------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=600))
def test_open_arbitrary_bytes_is_typed(raw):
    with pytest.raises(BridgeError):
        T.receiver().open(raw)


@FAST
@given(st.binary(max_size=400))
def test_open_arbitrary_bytes_behind_a_valid_prefix_is_typed(raw):
    with pytest.raises(BridgeError):
        T.receiver().open(_PREFIX.pack(b"CTE", 1, len(raw) // 2) + raw)


@FAST
@given(
    st.integers(0, 5),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    st.integers(0, 10**6),
)
def test_any_mutation_of_a_valid_frame_is_refused(which, flips, cut):
    frame = T.seeds()["envelope"][which][1:]  # direct frames from alice, as sealed
    mutated = bytearray(frame)
    for pos, mask in flips:
        mutated[pos % len(frame)] ^= mask
    if cut % 3 == 0:
        mutated = mutated[: cut % len(frame)]
    assume(bytes(mutated) != frame)
    with pytest.raises(BridgeError):
        T.receiver().open(bytes(mutated))


@FAST
@given(
    st.dictionaries(st.sampled_from(HEADER_KEYS), json_values, max_size=3), st.binary(max_size=64)
)
def test_header_edits_resigned_and_reencrypted_are_typed(edits, body):
    """The header edited, then signed by a valid key and encrypted under the key the receiver
    derives: every check past the signature (replay window, key agreement, AEAD) runs."""
    d = _valid_header()
    d.update(edits)
    head = json.dumps(d, separators=(",", ":")).encode()
    frame, encrypted = T.seal_header(head, body)
    try:
        opened = T.receiver().open(frame)
    except BridgeError:
        return
    assert encrypted and opened.plaintext == body


@pytest.mark.parametrize(
    "epk",
    [
        bytes(32),
        (1).to_bytes(32, "little"),
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    ],
)
def test_low_order_ephemeral_key_is_refused_typed(epk):
    """X25519 with a low-order point gives an all-zero secret; cryptography raises ValueError,
    which used to escape from Sealer.open (after a valid signature)."""
    import base64

    d = _valid_header()
    d["epk"] = base64.b64encode(epk).decode()
    frame, _ = T.seal_header(json.dumps(d).encode(), b"x")
    with pytest.raises(MalformedMessage):
        T.receiver().open(frame)


@FAST
@given(st.binary(max_size=800))
def test_envelope_target(data):
    T.fuzz_envelope(data)


# -- codec -----------------------------------------------------------------------------------


def _msg(header, body: bytes = b"") -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return CODEC_PREFIX.pack(b"CTM", 1, len(head)) + head + body


@FAST
@given(st.binary(max_size=600))
def test_decode_arbitrary_bytes_is_typed(raw):
    T.fuzz_codec(raw)
    T.fuzz_codec(_msg(raw))


@FAST
@given(
    st.sampled_from([m.TYPE for m in T._sample_messages()] + ["nope", 3, None, ["update"]]),
    json_values,
    st.dictionaries(st.text(max_size=12), json_values, max_size=5),
    st.dictionaries(st.text(max_size=8), json_values, max_size=2),
)
def test_decode_arbitrary_json_headers_is_typed(mtype, version, fields, index):
    for v in (1, version):
        T.fuzz_codec(_msg({"type": mtype, "v": v, "fields": fields, "tensors": index}))


@FAST
@given(
    st.integers(0, 8),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4),
    st.integers(0, 10**6),
)
def test_decode_mutated_valid_messages_is_typed(which, flips, cut):
    data = bytearray(T.seeds()["codec"][which])
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    T.fuzz_codec(bytes(data[: len(data) - cut % 7]))


@FAST
@given(
    st.sampled_from(T._sample_messages()),
    st.sampled_from(list(T._sample_messages()[0].__dataclass_fields__)),
    json_values,
)
def test_decode_with_one_field_replaced_is_typed(msg, name, value):
    head_len = CODEC_PREFIX.unpack_from(encode(msg))[2]
    data = encode(msg)
    header = json.loads(data[CODEC_PREFIX.size : CODEC_PREFIX.size + head_len])
    header["fields"][name] = value
    T.fuzz_codec(_msg(header, data[CODEC_PREFIX.size + head_len :]))


_UPDATE = b'{"type":"update","v":1,"fields":{"round":0,"algorithm":"a","num_examples":1},'


@pytest.mark.parametrize(
    "header",
    [
        b'{"type":"task","v":1,"fields":{"round":0,"algorithm":"a","deadline":NaN},"tensors":{}}',
        b'{"type":"task","v":1,"fields":{"round":0,"algorithm":"a","deadline":1e400},"tensors":{}}',
        b'{"type":"task","v":1,"fields":{"round":0,"algorithm":"a","deadline":'
        + b"9" * 400
        + b'},"tensors":{}}',
        b'{"type":["task"],"v":1,"fields":{},"tensors":{}}',
        b'{"type":"blob_ack","v":true,"fields":{"sha256":"x"},"tensors":{}}',
        _UPDATE + b'"tensors":{"tensors":[["k"]]}}',
        _UPDATE + b'"tensors":{"round":[]}}',
        b'{"type":"logits_response","v":1,"tensors":{},'
        b'"fields":{"request_id":"r","tensors":{"values":1,"ids":2}}}',
        b'{"type":"key_grant","v":1,"tensors":{},'
        b'"fields":{"key_id":"k","key":"not base64!","round":0}}',
        b'{"type":"task","v":1,"fields":{"round":0,"algorithm":"a","downloads":{"g":{"sha256":"'
        + b"a" * 64
        + b'","size":1e300,"chunk_size":0.5}}},"tensors":{}}',
        b"[" * 100_000,
        b'{"type":"note","v":1,"fields":{"kind":"k","data":'
        + b'{"a":' * 5000
        + b"1"
        + b"}" * 5001
        + b',"tensors":{}}',
    ],
)
def test_decode_regressions(header):
    """Inputs that escaped as TypeError / OverflowError / RecursionError / AttributeError, or
    decoded to NaN/Inf fields, before the fixes."""
    with pytest.raises(MalformedMessage):
        decode(_msg(header))


def test_huge_declared_tensor_is_refused_cheaply():
    """A safetensors header may declare any shape; the parser must check it against the bytes
    present instead of allocating what it declares."""
    cases = [
        {"tensors/a": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 8]}},
        {"tensors/a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1 << 60]}},
        {"tensors/a": {"dtype": "F64", "shape": [1 << 62], "data_offsets": [0, 1 << 65]}},
    ]
    head = json.dumps(
        {
            "type": "update",
            "v": 1,
            "tensors": {"tensors": ["a"]},
            "fields": {"round": 0, "algorithm": "a", "num_examples": 1},
        }
    ).encode()
    for meta in cases:
        st_head = json.dumps(meta).encode()
        body = struct.pack("<Q", len(st_head)) + st_head + bytes(8)
        t0 = time.perf_counter()
        with pytest.raises(MalformedMessage):
            decode(_msg(head, body))
        assert time.perf_counter() - t0 < 0.5
    # and a header size that points past the end
    t0 = time.perf_counter()
    with pytest.raises(MalformedMessage):
        decode(_msg(head, struct.pack("<Q", 1 << 62) + b"{}"))
    assert time.perf_counter() - t0 < 0.5


# -- chunks and blob assembly ----------------------------------------------------------------


@FAST
@given(st.binary(max_size=400))
def test_chunks_target(data):
    T.fuzz_chunks(data)


@FAST
@given(
    st.binary(max_size=3000),
    st.integers(1, 700),
    st.data(),
)
def test_assembly_any_order_duplicates_and_corruption(blob, chunk_size, data):
    import hashlib

    ref = BlobRef(hashlib.sha256(blob).hexdigest(), len(blob), chunk_size)
    a = Assembly(ref, spill_threshold=data.draw(st.sampled_from([0, 1 << 20])))
    try:
        order = data.draw(
            st.lists(st.integers(-2, ref.total_chunks + 1), max_size=3 * ref.total_chunks + 3)
        )
        corrupt = data.draw(st.sets(st.integers(0, ref.total_chunks - 1), max_size=2))
        first_ok = {}
        for i in order:
            piece = (
                blob[i * chunk_size : (i + 1) * chunk_size] if 0 <= i < ref.total_chunks else b"?"
            )
            if i in corrupt and piece:
                piece = bytes([piece[0] ^ 1]) + piece[1:]
            try:
                if a.add(i, piece):
                    first_ok[i] = i not in corrupt or not piece
            except MalformedMessage:
                assert not 0 <= i < ref.total_chunks
        for i in sorted(set(range(ref.total_chunks)) - set(first_ok)):  # fill the gaps correctly
            a.add(i, blob[i * chunk_size : (i + 1) * chunk_size])
            first_ok[i] = True
        if all(first_ok.values()):
            result = a.finish()
            assert bytes(result.read()) == blob
            result.discard()
        else:
            with pytest.raises(BlobIntegrityError):
                a.finish()
    finally:
        a.abort()


@pytest.mark.parametrize(
    "size,chunk_size",
    [(MAX_BLOB_BYTES + 1, 1 << 20), (MAX_BLOB_CHUNKS + 1, 1), (2**63 - 1, 1), (2**62, 2**61)],
)
def test_assembly_refuses_huge_declared_blobs_before_allocating(size, chunk_size):
    ref = BlobRef("ab" * 32, size, chunk_size)
    if size <= MAX_BLOB_BYTES and ref.total_chunks <= MAX_BLOB_CHUNKS:
        pytest.skip("within the limits")
    with pytest.raises(OversizedMessage):
        Assembly(ref)


def test_blobref_total_chunks_is_exact_for_huge_sizes():
    assert BlobRef("ab" * 32, 2**60 + 1, 2**10).total_chunks == 2**50 + 1
    assert BlobRef("ab" * 32, 10**400, 1).total_chunks == 10**400


def test_decoded_arrays_are_numpy():
    msg = decode(encode(T._sample_messages()[0]))
    assert all(isinstance(v, np.ndarray) for v in msg.tensors.values())


@pytest.mark.parametrize(
    "fields",
    [
        {
            "sha256": "ab" * 32,
            "missing": [[0, 10**9]] * 1000,
        },  # one resend per range: amplification
        {"sha256": "ab" * 32, "missing": [[5, 6], [0, 3]]},
        {"sha256": "../../etc/passwd", "missing": [[0, 1]]},
        {"sha256": "ab" * 32, "missing": {"0": 1}},
    ],
)
def test_chunk_request_must_be_sorted_disjoint_ranges_of_a_real_hash(fields):
    with pytest.raises(MalformedMessage):
        decode(_msg({"type": "chunk_request", "v": 1, "fields": fields, "tensors": {}}))
    with pytest.raises(MalformedMessage):
        decode(_msg({"type": "blob_ack", "v": 1, "fields": {"sha256": "AB" * 32}, "tensors": {}}))
