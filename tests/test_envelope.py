from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from wire_helpers import fixed_federation, fixed_identity, sample_update

from bridge.codec import decode, encode
from bridge.envelope import ENVELOPE_OVERHEAD, ReplayGuard, Sealer, UnknownKey
from bridge.errors import (
    MalformedMessage,
    OversizedMessage,
    ReplayedMessage,
    TamperedMessage,
    UnknownRecipient,
    UnknownSender,
    UnsupportedVersion,
)
from bridge.keys import Identity

GOLDEN = Path(__file__).parent / "golden"
NOW = 1_800_000_000.0
LIMIT = 64 * 1024


@pytest.fixture
def fed():
    ids, directory = fixed_federation(("alice", "bob"))
    clock = [NOW]
    sealers = {p: Sealer(i, directory, max_message_bytes=LIMIT, clock=lambda: clock[0]) for p, i in ids.items()}
    return ids, directory, sealers, clock


def test_direct_round_trip_and_header_fields(fed):
    _, _, s, _ = fed
    frame = s["alice"].seal("aggregator", "update", b"hello", round=4)
    opened = s["aggregator"].open(frame)
    assert opened.plaintext == b"hello"
    h = opened.header
    assert (h.sender, h.recipient, h.round, h.type, h.federation) == ("alice", "aggregator", 4, "update", "goldfed")
    assert b"hello" not in frame  # the broker never sees the body


def test_only_the_recipient_can_open(fed):
    _, _, s, _ = fed
    frame = s["aggregator"].seal("alice", "task", b"for alice only")
    with pytest.raises(UnknownRecipient):
        s["bob"].open(frame)


def _flip(frame: bytes, pos: int) -> bytes:
    b = bytearray(frame)
    b[pos] ^= 0x01
    return bytes(b)


def test_any_flipped_bit_is_detected(fed):
    _, _, s, _ = fed
    frame = s["alice"].seal("aggregator", "update", os.urandom(300), round=1)
    hlen = struct.unpack_from("<I", frame, 4)[0]
    positions = [8 + hlen + 5, len(frame) - 70, len(frame) - 1, len(frame) - 64]  # ciphertext, tag, signature
    for pos in positions:
        with pytest.raises(TamperedMessage):
            s["aggregator"].open(_flip(frame, pos))


def test_header_edit_is_detected_even_when_valid_json(fed):
    _, _, s, _ = fed
    frame = s["alice"].seal("aggregator", "update", b"x" * 100, round=1)
    hlen = struct.unpack_from("<I", frame, 4)[0]
    header = json.loads(frame[8:8 + hlen])
    header["round"] = 2
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    forged = frame[:4] + struct.pack("<I", len(head)) + head + frame[8 + hlen:]
    with pytest.raises(TamperedMessage):
        s["aggregator"].open(forged)


def test_impersonation_is_detected(fed):
    ids, directory, s, clock = fed
    mallory = Identity("alice", "client", fixed_identity("mallory", "client").sign_key, ids["alice"].kx_key)
    fake = Sealer(mallory, directory, max_message_bytes=LIMIT, clock=lambda: clock[0])
    with pytest.raises(TamperedMessage):
        s["aggregator"].open(fake.seal("aggregator", "update", b"evil"))


def test_unknown_sender(fed):
    ids, directory, s, clock = fed
    eve = fixed_identity("eve", "client")
    eve_sealer = Sealer(eve, directory.with_party(eve.public), max_message_bytes=LIMIT, clock=lambda: clock[0])
    with pytest.raises(UnknownSender):
        s["aggregator"].open(eve_sealer.seal("aggregator", "update", b"hi"))


def test_replay_and_clock_window(fed):
    _, _, s, clock = fed
    frame = s["alice"].seal("aggregator", "update", b"once")
    s["aggregator"].open(frame)
    with pytest.raises(ReplayedMessage):
        s["aggregator"].open(frame)
    old = s["alice"].seal("aggregator", "update", b"old")
    clock[0] += 601
    with pytest.raises(ReplayedMessage):
        s["aggregator"].open(old)
    future = s["alice"].seal("aggregator", "update", b"future")
    clock[0] -= 200  # the receiver's clock is 200 s behind the sender's (allowed skew: 120 s)
    with pytest.raises(ReplayedMessage):
        s["aggregator"].open(future)


def test_replay_guard_memory_is_pruned():
    clock = [NOW]
    guard = ReplayGuard(window_s=10, clock=lambda: clock[0])
    ids, directory = fixed_federation()
    sealer = Sealer(ids["alice"], directory, max_message_bytes=LIMIT, clock=lambda: clock[0])
    receiver = Sealer(ids["aggregator"], directory, max_message_bytes=LIMIT, replay=guard, clock=lambda: clock[0])
    for _ in range(50):
        receiver.open(sealer.seal("aggregator", "note", b"."))
        clock[0] += 1
    assert len(guard) <= 11


def test_oversized_refused_before_any_work(fed):
    _, _, s, _ = fed
    with pytest.raises(OversizedMessage):
        s["alice"].seal("aggregator", "update", b"x" * (LIMIT - ENVELOPE_OVERHEAD + 1))
    with pytest.raises(OversizedMessage):
        s["aggregator"].open(b"CTE" + b"\x00" * LIMIT)


@pytest.mark.parametrize("frame", [b"", b"garbage", b"CTE\x01" + b"\xff\xff\xff\x7f" + b"x" * 200,
                                   b"CTE\x01" + struct.pack("<I", 5) + b"nojsn" + b"x" * 100])
def test_malformed_frames(fed, frame):
    _, _, s, _ = fed
    with pytest.raises(MalformedMessage):
        s["aggregator"].open(frame)


def test_unsupported_envelope_version(fed):
    _, _, s, _ = fed
    frame = s["alice"].seal("aggregator", "update", b"x")
    with pytest.raises(UnsupportedVersion):
        s["aggregator"].open(frame[:3] + b"\x02" + frame[4:])


def test_broadcast_content_key_is_wrapped_per_recipient(fed):
    _, _, s, _ = fed
    key = os.urandom(32)
    kid = s["aggregator"].add_content_key(key)
    frame = s["aggregator"].seal("*", "chunk", b"same bytes for all", kid=kid)
    with pytest.raises(UnknownKey):
        s["alice"].open(frame)  # no grant yet
    for p in ("alice", "bob"):  # a grant travels direct-encrypted to each recipient
        grant = s["aggregator"].seal(p, "key_grant", key)
        s[p].add_content_key(s[p].open(grant).plaintext)
    assert s["alice"].open(frame).plaintext == b"same bytes for all"
    assert s["bob"].open(frame).plaintext == b"same bytes for all"


def test_golden_envelope_still_opens():
    """An envelope sealed by v1 code with fixed keys: later versions must still open it."""
    ids, directory = fixed_federation()
    receiver = Sealer(ids["aggregator"], directory, max_message_bytes=1 << 20, clock=lambda: 1_790_000_000.0)
    opened = receiver.open((GOLDEN / "update_v1.env").read_bytes())
    assert opened.header.sender == "alice" and opened.header.round == 3
    msg = decode(opened.plaintext)
    assert encode(msg) == encode(sample_update())


def test_shared_ephemeral_key_for_a_blob_still_authenticates_each_chunk(fed):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    _, _, s, _ = fed
    eph = X25519PrivateKey.generate()
    frames = [s["alice"].seal("aggregator", "chunk", os.urandom(500), ephemeral=eph) for _ in range(3)]
    nonces = {s["aggregator"].parse(f)[0].nonce for f in frames}
    assert len(nonces) == 3  # one key, a fresh nonce per message
    for f in frames[:2]:
        s["aggregator"].open(f)
    with pytest.raises(TamperedMessage):
        s["aggregator"].open(_flip(frames[2], len(frames[2]) - 80))
    with pytest.raises(UnknownRecipient):  # a cached key never opens a message for someone else
        s["bob"].open(frames[2])


def test_only_a_verified_signature_seeds_the_per_transfer_key_cache(fed):
    """Later chunks under one ephemeral key are authenticated by the AEAD tag, but only after a
    message under that key passed the signature check."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    _, _, s, _ = fed
    eph = X25519PrivateKey.generate()
    first, second = (s["alice"].seal("aggregator", "chunk", os.urandom(300), ephemeral=eph) for _ in range(2))
    with pytest.raises(TamperedMessage):
        s["aggregator"].open(_flip(first, len(first) - 1))  # bad signature, good ciphertext
    with pytest.raises(TamperedMessage):
        s["aggregator"].open(_flip(second, len(second) - 1))  # still not cached: still verified
    s["aggregator"].open(first)
    # now cached: the tag carries the authentication, a tampered body still fails
    with pytest.raises(TamperedMessage):
        s["aggregator"].open(_flip(second, len(second) - 70))
