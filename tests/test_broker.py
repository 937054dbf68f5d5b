"""Brokers for real: Mosquitto with the provisioned mTLS config and ACL, and the embedded amqtt
broker, driven by plain paho-mqtt 2.x clients (no cotune transport involved).

Negative checks ("alice never receives bob's message") avoid sleeping: the forbidden message is
published first and an allowed sentinel after it on the same connection; once the sentinel has
arrived, Mosquitto (which keeps per-client order) would have delivered the forbidden one too.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion

from bridge.broker import (
    EmbeddedBroker,
    MosquittoBroker,
    find_mosquitto,
    free_port,
    port_open,
    start_broker,
)
from bridge.ca import issue, make_ca
from bridge.errors import TransportError
from bridge.provision import (
    FederationPaths,
    add_client,
    load_party_config,
)

T = 5.0  # seconds to wait for anything that should happen


def needs_mosquitto(fn):
    skip = pytest.mark.skipif(
        find_mosquitto() is None, reason="mosquitto is not installed; CI installs it"
    )
    return pytest.mark.mosquitto(skip(fn))


class Peer:
    """A paho client with blocking helpers for tests."""

    def __init__(
        self, port: int, *, protocol=mqtt.MQTTv311, client_id: str | None = None, clean: bool = True
    ):
        self.protocol = protocol
        kw = {} if protocol == mqtt.MQTTv5 else {"clean_session": clean}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
            reconnect_on_failure=False,
            **kw,
        )
        self.port = port
        self.clean = clean
        self.messages: queue.Queue = queue.Queue()
        self.connack = None
        self._connected = threading.Event()
        self._acks: dict[int, object] = {}
        self._cond = threading.Condition()
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: self._connected.set()
        c.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, msg.payload))
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: self._ack(mid, rcs)
        c.on_publish = lambda _c, _u, mid, rc, _p: self._ack(mid, rc)

    def _on_connect(self, _c, _u, _flags, rc, _props):
        self.connack = rc
        self._connected.set()

    def _ack(self, mid, value):
        with self._cond:
            self._acks[mid] = value
            self._cond.notify_all()

    def _wait_ack(self, mid):
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, T), f"no ack for mid {mid}"
            return self._acks.pop(mid)

    def tls(self, fed: FederationPaths, party: str | None = None, instance: str | None = None) -> Peer:
        """TLS with the federation CA; with a client certificate when party is given (the
        aggregator ingest worker identity ``instance`` when given)."""
        pdir = fed.party_dir(party) if party else None
        cert = None
        if pdir is not None:
            cert = pdir / "instances" / f"{instance}.crt" if instance else pdir / "client.crt"
        self.client.tls_set(
            ca_certs=str(fed.ca_cert),
            certfile=str(cert) if cert else None,
            keyfile=str(cert.with_suffix(".key")) if cert else None,
        )
        return self

    def connect(self) -> bool:
        """True when the broker answered CONNACK success; False on refusal or TLS failure."""
        kw = {"clean_start": self.clean} if self.protocol == mqtt.MQTTv5 else {}
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30, **kw)
        except (ssl.SSLError, OSError):
            return False
        self.client.loop_start()
        self._connected.wait(T)
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, *topics: str):
        _, mid = self.client.subscribe([(t, 1) for t in topics])
        return self._wait_ack(mid)

    def publish(self, topic: str, payload: bytes, retain: bool = False):
        """Publish at QoS 1, wait for PUBACK, return its reason code (MQTT 5 only says why)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._wait_ack(info.mid)

    def get(self, timeout: float = T) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout)

    def until(self, topic: str) -> list[tuple[str, bytes]]:
        """Every message up to and including the first on ``topic``."""
        got = []
        while True:
            got.append(self.get())
            if got[-1][0] == topic:
                return got

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers():
    made: list[Peer] = []

    def make(port, **kw) -> Peer:
        made.append(Peer(port, **kw))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture
def party(mosquitto, federation, peers):
    """party("alice") -> a connected mTLS Peer for that party."""

    def make(pid: str, instance: str | None = None, **kw) -> Peer:
        p = peers(federation.port, **kw).tls(federation, pid, instance)
        assert p.connect(), f"{pid} could not connect: {p.connack}\n{mosquitto.log_tail()}"
        return p

    return make


# ------------------------------------------------------------------------------------------------
# Mosquitto, mTLS and ACL


@needs_mosquitto
def test_client_uses_its_own_topics(federation, party):
    t = federation.topics
    agg, alice = party("aggregator"), party("alice")
    alice.subscribe(t.down("alice"), t.bcast)
    agg.subscribe(t.up_wildcard, t.status_wildcard)

    agg.publish(t.down("alice"), b"task")
    agg.publish(t.bcast, b"global")
    assert [alice.get(), alice.get()] == [(t.down("alice"), b"task"), (t.bcast, b"global")]

    alice.publish(t.status("alice"), b"online", retain=True)
    alice.publish(t.up("alice"), b"update")
    assert [agg.get(), agg.get()] == [(t.status("alice"), b"online"), (t.up("alice"), b"update")]
    alice.publish(t.status("alice"), b"", retain=True)  # clear it for the other tests


@needs_mosquitto
def test_client_cannot_read_another_clients_topics(federation, party):
    t = federation.topics
    agg, alice, bob = party("aggregator"), party("alice"), party("bob")
    # Mosquitto 2.0 grants these SUBSCRIBEs (it does not ACL-check subscriptions) ...
    granted = alice.subscribe(t.down("bob"), f"{t.root}/#", f"$share/g/{t.root}/down/+")
    assert all(not rc.is_failure for rc in granted)
    bob.subscribe(t.down("bob"))
    # ... but checks read access on every message it delivers
    agg.publish(t.down("bob"), b"for bob only")
    agg.publish(t.status("bob"), b"bob's status")
    agg.publish(t.down("alice"), b"sentinel")
    got = alice.until(t.down("alice"))
    assert {topic for topic, _ in got} == {t.down("alice")}
    assert bob.get() == (t.down("bob"), b"for bob only")


@needs_mosquitto
def test_client_cannot_write_another_clients_topics(federation, party):
    t = federation.topics
    agg, alice = party("aggregator"), party("alice")
    agg.subscribe(f"{t.root}/#")
    for topic in (t.up("bob"), t.status("bob"), t.down("bob"), t.down("alice"), t.bcast):
        alice.publish(topic, b"forged")  # a 3.1.1 publisher gets a PUBACK and no error
    alice.publish(t.up("alice"), b"sentinel")
    assert agg.until(t.up("alice")) == [(t.up("alice"), b"sentinel")]

    alice5 = party("alice", protocol=mqtt.MQTTv5)
    assert alice5.publish(t.up("bob"), b"forged").value == 0x87  # MQTT 5: Not authorized
    assert alice5.publish(t.up("alice"), b"ok").value == 0


@needs_mosquitto
def test_shared_subscription_spreads_up_topics_over_aggregator_workers(federation, party):
    t = federation.topics
    w1 = party("aggregator")  # MQTT 3.1.1: Mosquitto serves $share to it as well
    # a second process of the aggregator has a broker identity of its own (the client id is
    # forced to the certificate identity, so one identity means one connection)
    w2 = party("aggregator", instance="ingest-0", protocol=mqtt.MQTTv5)
    for w in (w1, w2):
        assert not w.subscribe(t.shared_up("ingest"))[0].is_failure
    alice = party("alice")
    sent = {b"u%d" % i for i in range(6)}
    for payload in sorted(sent):
        alice.publish(t.up("alice"), payload)
    got = []
    deadline = time.monotonic() + T
    while len(got) < len(sent) and time.monotonic() < deadline:
        for w in (w1, w2):
            try:
                got.append(w.get(timeout=0.05)[1])
            except queue.Empty:
                pass
    assert sorted(got) == sorted(sent)  # each message once, to one worker


@needs_mosquitto
def test_connection_without_valid_certificate_is_refused(federation, mosquitto, peers, tmp_path):
    assert not peers(federation.port).tls(federation).connect()  # no client certificate

    # a certificate with CN "aggregator" from some other CA
    rogue_key, rogue_ca = make_ca("rogue", 1)
    key, cert = issue(rogue_key, rogue_ca, "aggregator", "testfed", sans=(), server=False, days=1)
    (tmp_path / "c.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "c.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    rogue = peers(federation.port)
    rogue.client.tls_set(
        ca_certs=str(federation.ca_cert),
        certfile=str(tmp_path / "c.crt"),
        keyfile=str(tmp_path / "c.key"),
    )
    assert not rogue.connect()

    # plain MQTT on the TLS port
    assert not peers(federation.port).connect()


@needs_mosquitto
def test_password_listener(federation, mosquitto, peers, party):
    alice_cfg = load_party_config(federation.party_config("alice"))

    def with_password(user, password) -> Peer:
        p = peers(federation.password_port).tls(federation)  # server-side TLS only
        p.client.username_pw_set(user, password)
        return p

    wrong = with_password("alice", alice_cfg.password + "x")
    assert not wrong.connect() and wrong.connack is not None and wrong.connack.is_failure
    assert not with_password("alice", None).connect()
    assert not peers(federation.password_port).tls(federation).connect()  # anonymous

    alice = with_password("alice", alice_cfg.password)
    assert alice.connect(), alice.connack
    # the password identity is the party id, so the same ACL applies
    agg = party("aggregator")
    t = federation.topics
    agg.subscribe(t.up_wildcard)
    alice.publish(t.up("bob"), b"forged")
    alice.publish(t.up("alice"), b"via password")
    assert agg.until(t.up("alice")) == [(t.up("alice"), b"via password")]


@needs_mosquitto
def test_kill_restart_and_persistent_session(make_federation, peers):
    fed = make_federation(clients=["bob"])
    broker = start_broker(fed.root)
    assert isinstance(broker, MosquittoBroker)
    try:
        assert broker.port == fed.port and broker.running
        t = fed.topics
        bob = peers(fed.port, client_id="bob-session", clean=False).tls(fed, "bob")
        assert bob.connect()
        bob.subscribe(t.down("bob"))
        bob.close()
        agg = peers(fed.port).tls(fed, "aggregator")
        assert agg.connect()
        agg.publish(t.down("bob"), b"queued while bob was away")
        agg.close()

        broker.restart()  # SIGTERM: Mosquitto saves sessions and queued messages to data/
        bob = peers(fed.port, client_id="bob-session", clean=False).tls(fed, "bob")
        assert bob.connect()
        assert bob.get() == (t.down("bob"), b"queued while bob was away")
        bob.close()

        pid = broker.pid
        broker.kill()
        assert not broker.running and not port_open("127.0.0.1", fed.port)
        broker.start()
        assert broker.running and broker.pid != pid and port_open("127.0.0.1", fed.port)
        assert broker.log_text().count("mosquitto version") >= 3
    finally:
        broker.stop()
    assert not port_open("127.0.0.1", fed.port)


@needs_mosquitto
def test_add_client_to_a_running_broker(make_federation, peers):
    fed = make_federation(clients=["alice"])
    with MosquittoBroker(fed.mosquitto_conf) as broker:
        add_client(fed.root, "dave")
        broker.reload()  # password file and ACL; the certificate works without it
        dave_pw = peers(fed.password_port).tls(fed)
        dave_pw.client.username_pw_set("dave", load_party_config(fed.party_dir("dave")).password)
        assert dave_pw.connect(), dave_pw.connack
        dave_pw.client.disconnect()  # one identity, one connection: the broker forces the client id
        dave = peers(fed.port).tls(fed, "dave")
        assert dave.connect()
        agg = peers(fed.port).tls(fed, "aggregator")
        assert agg.connect()
        dave.subscribe(fed.topics.bcast)
        agg.publish(fed.topics.bcast, b"welcome")
        assert dave.get() == (fed.topics.bcast, b"welcome")


@needs_mosquitto
def test_mosquitto_start_failure_reports_the_log(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text(f"listener {free_port()} 127.0.0.1\nno_such_option 1\n")
    with pytest.raises(TransportError, match="no_such_option"):
        MosquittoBroker(conf, start_timeout=5).start()


@needs_mosquitto
def test_mosquitto_refuses_a_taken_port(mosquitto, federation):
    with pytest.raises(TransportError, match="already in use"):
        MosquittoBroker(federation.mosquitto_conf).start()
    assert mosquitto.running


# ------------------------------------------------------------------------------------------------
# Embedded broker


def test_embedded_broker_relays(embedded_broker, peers):
    sub, pub = peers(embedded_broker.port), peers(embedded_broker.port)
    assert sub.connect() and pub.connect()
    sub.subscribe("cotune/demo/up/+")
    pub.publish("cotune/demo/up/alice", b"hello")
    assert sub.get() == ("cotune/demo/up/alice", b"hello")


def test_embedded_broker_refuses_mqtt5(embedded_broker, peers):
    # amqtt speaks 3.1.1 only: CONNACK return code 1 (unacceptable protocol version), which
    # paho reports to an MQTT 5 client as 0x84 "Unsupported protocol version"
    p = peers(embedded_broker.port, protocol=mqtt.MQTTv5)
    assert not p.connect()
    assert p.connack is not None and p.connack.value == 0x84


def test_embedded_broker_stop_frees_port_and_thread(peers):
    broker = EmbeddedBroker().start()
    assert broker.port and broker.running
    p = peers(broker.port)
    assert p.connect()  # stop with a client still connected
    broker.stop()
    assert not broker.running
    assert not any(th.name == "cotune-embedded-broker" for th in threading.enumerate())
    with socket.socket() as s:  # as a listener would (TIME_WAIT connections may remain)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", broker.port))
        s.listen()
    broker.start()  # and it can start again on the same port
    assert port_open("127.0.0.1", broker.port)
    broker.stop()


def test_embedded_broker_reports_a_taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(TransportError, match="did not start"):
            EmbeddedBroker("127.0.0.1", s.getsockname()[1], start_timeout=5).start()
    assert not any(th.name == "cotune-embedded-broker" for th in threading.enumerate())


def test_start_broker_embedded_says_what_it_lacks(federation, caplog):
    with caplog.at_level(logging.WARNING, logger="bridge.broker"):
        broker = start_broker(federation.root, embedded=True)
    try:
        assert isinstance(broker, EmbeddedBroker) and broker.running
        assert "no TLS" in caplog.text and "NOT for production" in caplog.text
    finally:
        broker.stop()


def test_run_broker_cli_until_sigterm():
    code = (
        "import sys; from bridge.broker import run_broker_cli; "
        "sys.exit(run_broker_cli(None, True, '127.0.0.1', int(sys.argv[1])))"
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    try:
        line = proc.stdout.readline()
        assert f"mqtt://127.0.0.1:{port}" in line
        assert port_open("127.0.0.1", port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(T) == 0
        assert "stopped" in proc.stdout.read()
        assert "NOT for production" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
