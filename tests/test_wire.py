"""The bridge end to end against a real Mosquitto with mTLS and the generated ACL."""

from __future__ import annotations

import hashlib
import os
import ssl
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from wire_helpers import fixed_identity

from bridge.broker import MosquittoBroker, find_mosquitto
from bridge.codec import encode
from bridge.endpoint import EndpointConfig, load_endpoint
from bridge.envelope import Sealer
from bridge.errors import OversizedMessage
from bridge.messages import Note, Update
from bridge.provision import load_party_config

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto (CI installs it)")


def _wait(pred, timeout=20.0, step=0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


@pytest.fixture(scope="module")
def parties(federation, mosquitto, tmp_path_factory):
    spill = tmp_path_factory.mktemp("spill")
    cfg = lambda: EndpointConfig(spill_dir=str(spill), spill_threshold=8 << 20, stall_timeout_s=2.0)  # noqa: E731
    eps = {p: load_endpoint(federation.party_config(p), cfg()).start()
           for p in ("aggregator", "alice", "bob")}
    yield eps
    for ep in eps.values():
        ep.close()


def _raw_client(federation, party: str) -> mqtt.Client:
    """A plain paho client holding a party's certificate: it can publish arbitrary bytes where
    the ACL lets that party publish."""
    pc = load_party_config(federation.party_config(party))
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{party}-{os.getpid()}", protocol=mqtt.MQTTv311)
    c.tls_set(ca_certs=str(pc.ca_cert), certfile=str(pc.client_cert), keyfile=str(pc.client_key),
              tls_version=ssl.PROTOCOL_TLS_CLIENT)
    c.connect(pc.host, pc.port)
    c.loop_start()
    return c


def test_50mb_blob_round_trip_over_mtls(parties):
    alice, agg = parties["alice"], parties["aggregator"]
    data = os.urandom(50 * 1024 * 1024)
    ref = alice.send_blob("aggregator", data, kind="adapter", round=1)
    alice.send("aggregator", Update(round=1, algorithm="fedavg", num_examples=3, blobs={"a": ref.to_json()}), round=1)
    msg = agg.recv(timeout=60)
    assert isinstance(msg.message, Update) and msg.sender == "alice"
    res = agg.fetch_blob(msg.message.blob("a"), "alice", timeout=120)
    assert res.path is not None, "a 50 MB blob must be spilled to disk, not held in memory"
    assert hashlib.sha256(res.path.read_bytes()).hexdigest() == ref.sha256
    assert res.read() == data
    res.discard()
    assert alice.transport.protocol_in_use == "5"  # Mosquitto speaks MQTT 5


def test_broadcast_blob_is_encrypted_once_for_all(parties):
    agg = parties["aggregator"]
    data = os.urandom(3 * 1024 * 1024 + 17)
    before = agg.transport.stats.bytes_out
    ref = agg.broadcast_blob(["alice", "bob"], data, kind="global", round=2)
    for p in ("alice", "bob"):
        assert parties[p].fetch_blob(ref, "aggregator", timeout=60).read() == data
    sent = agg.transport.stats.bytes_out - before
    assert sent < 1.05 * len(data), f"broadcast sent {sent} bytes for a {len(data)}-byte blob"


def test_every_typed_error_is_counted_and_the_receiver_keeps_serving(federation, parties):
    agg, alice = parties["aggregator"], parties["alice"]
    raw = _raw_client(federation, "alice")
    up = agg.topics.up("alice")
    pc = load_party_config(federation.party_config("alice"))
    sealer = Sealer(pc.identity, pc.directory, max_message_bytes=1 << 20)
    good = sealer.seal("aggregator", "note", encode(Note("ping")), round=0)
    tampered = bytearray(sealer.seal("aggregator", "note", encode(Note("ping")), round=0))
    tampered[-100] ^= 0xFF
    eve = fixed_identity("eve", "client")
    foreign = Sealer(eve, pc.directory.with_party(eve.public), max_message_bytes=1 << 20)
    agg.set_round_floor(5)
    cases = {
        "malformed": b"definitely not an envelope",
        "tampered": bytes(tampered),
        "unknown_sender": foreign.seal("aggregator", "note", encode(Note("hi"))),
        "stale_round": sealer.seal("aggregator", "note", encode(Note("late")), round=4),
        "oversized": b"CTE" + b"\x00" * (agg.config.max_message_bytes + 10),
        "unsupported_version": b"CTE\x09" + good[4:],
    }
    try:
        for code, frame in cases.items():
            before = agg.rejected[code]
            raw.publish(up, frame, qos=1).wait_for_publish(10)
            assert _wait(lambda c=code, b=before: agg.rejected[c] == b + 1), f"{code} not counted: {agg.rejected}"
        # replay: the same valid frame twice
        fresh = sealer.seal("aggregator", "note", encode(Note("once")), round=5)
        before = agg.rejected["replayed"]
        raw.publish(up, fresh, qos=1).wait_for_publish(10)
        raw.publish(up, fresh, qos=1).wait_for_publish(10)
        assert _wait(lambda: agg.rejected["replayed"] == before + 1)
        first = agg.recv(timeout=10)
        assert first.message == Note("once", {}, 0)
        # ... and the receiver still serves a normal message afterwards
        alice.send("aggregator", Note("still there", round=5), round=5)
        got = agg.recv(timeout=10)
        assert got is not None and got.message.kind == "still there"
        assert agg.recv(timeout=0.3) is None  # nothing else leaked through
    finally:
        raw.disconnect()
        raw.loop_stop()
        agg.round_floor = 0


def test_oversized_message_raises_before_anything_is_published(parties):
    alice = parties["alice"]
    before = alice.transport.stats.messages_out
    big = Update(round=1, algorithm="fedavg", num_examples=1,
                 tensors={"w": __import__("numpy").zeros(alice.config.max_message_bytes // 4, dtype="float32")})
    with pytest.raises(OversizedMessage):
        alice.send("aggregator", big)
    assert alice.transport.stats.messages_out == before


def test_blob_survives_a_broker_kill_and_restart(make_federation, tmp_path):
    paths = make_federation("crashfed", ["edge"])
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    cfg = EndpointConfig(spill_dir=str(tmp_path), stall_timeout_s=1.5, publish_window=8)
    agg = load_endpoint(paths.party_config("aggregator"), cfg).start()
    edge = load_endpoint(paths.party_config("edge"), cfg).start()
    # small reconnect delays keep the test short; production uses the defaults
    for ep in (agg, edge):
        ep.transport._client.reconnect_delay_set(1, 2)
    data = os.urandom(24 * 1024 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    try:
        sent: list = []
        sender = threading.Thread(target=lambda: sent.append(edge.send_blob("aggregator", data, round=1, timeout=120)))
        sender.start()
        key = ("edge", sha)
        assert _wait(lambda: key in agg._incoming and agg._incoming[key].assembly.received >= 10, 30)
        broker.kill()
        time.sleep(1.0)
        broker.start()
        ref = agg._incoming[key].assembly.ref
        res = agg.fetch_blob(ref, "edge", timeout=120)
        sender.join(60)
        assert sent and sent[0].sha256 == sha, "the sender must finish cleanly across the restart"
        assert hashlib.sha256(res.read()).hexdigest() == sha
        assert agg.transport.stats.connects >= 2 and edge.transport.stats.connects >= 2
    finally:
        edge.close()
        agg.close()
        broker.stop()


def test_the_same_content_can_be_sent_again_after_it_was_fetched(parties):
    """Content addressing must not swallow a second transfer of identical bytes."""
    alice, agg = parties["alice"], parties["aggregator"]
    data = os.urandom(700_000)
    for _ in range(2):
        ref = alice.send_blob("aggregator", data, round=1)
        assert agg.fetch_blob(ref, "alice", timeout=30).read() == data


def test_byte_identical_blobs_from_two_senders_are_two_transfers(parties):
    """An unchanged adapter sent by two devices: each transfer completes on its own, at once
    (keyed by content hash alone, the second one used to stall and fail as 'transport')."""
    alice, bob, agg = parties["alice"], parties["bob"], parties["aggregator"]
    data = os.urandom(600_000)
    refs = [ep.send_blob("aggregator", data, round=1) for ep in (alice, bob)]
    assert refs[0].sha256 == refs[1].sha256
    t0 = time.monotonic()
    assert agg.fetch_blob(refs[1], "bob", timeout=10).read() == data
    assert agg.fetch_blob(refs[0], "alice", timeout=10).read() == data
    assert time.monotonic() - t0 < 5  # no stall-and-resume cycle


def test_password_listener_and_presence_with_last_will(federation, mosquitto, parties):
    """A device without a client certificate joins through the password listener; its retained
    presence says online, and its last will says offline when it vanishes without a goodbye."""
    import subprocess
    import sys

    agg = parties["aggregator"]
    script = f"""
import sys, time
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parents[1])!r})
from bridge.endpoint import Endpoint, broker_config_for
from bridge.messages import Note
from bridge.provision import load_party_config
pc = load_party_config({str(federation.party_config('carol'))!r})
cfg = broker_config_for(pc, auth="password")
cfg.keepalive = 1
ep = Endpoint(pc.identity, pc.directory, cfg).start()
ep.send("aggregator", Note("hello-from-password-listener"), wait=10)
print("ready", flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        got = agg.recv(timeout=10)
        assert got.sender == "carol" and got.message.kind == "hello-from-password-listener"
        assert _wait(lambda: agg.presence.get("carol", {}).get("state") == "online", 10)
        proc.kill()  # no DISCONNECT: the broker publishes the last will after 1.5 keep-alives
        assert _wait(lambda: agg.presence.get("carol", {}).get("state") == "offline", 15)
    finally:
        proc.kill()
        proc.wait()
