"""The wire and a federation round across a real 2-node RabbitMQ cluster (MQTT plugin, 3.1.1).

The aggregator (and its ingest workers) connect to node A, the clients to node B, so every
message crosses the cluster. Users are the provisioned parties with their broker passwords;
clients get topic permissions equivalent to the Mosquitto ACL. Plain TCP: the envelope
protects payloads end to end.

What RabbitMQ 3.10 does with the wire, as pinned here: messages, chunked blobs (direct and
broadcast), QoS 1 delivery to a persistent session that reconnects through the other node, live
presence and last wills cross the cluster. Retained messages do not: they are kept by the node
that received them and handed only to subscriptions with that exact topic (no wildcards) made
on the same node, so the aggregator's ``status/+`` subscription sees presence changes only
while it is connected. ``$share/`` subscriptions are not supported (a literal topic).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.endpoint import Endpoint, EndpointConfig, _presence, broker_config_for
from bridge.messages import Note
from bridge.provision import FederationPaths, load_party_config, provision
from tests.rabbitmq import RabbitCluster, find_rabbitmq, free_ports
from tests.test_fleet import _expected  # the hand-computed weighted mean of what devices sent

pytestmark = pytest.mark.rabbitmq

FED, CLIENTS = "rmqwire", ["alice", "bob", "carol"]
FLEET, DEVICES, ROUNDS = "rmqfleet", [f"d{i:02d}" for i in range(6)], 2


@pytest.fixture(scope="module")
def cluster():
    """Two clustered RabbitMQ nodes with the MQTT plugin; stopped (nothing left) at teardown."""
    if find_rabbitmq() is None:
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    c = RabbitCluster(2).start()
    print(f"\nRabbitMQ {c.version}: 2-node cluster up in {c.startup_s:.1f}s")
    try:
        yield c
    finally:
        c.stop()


def _federation(cluster: RabbitCluster, root: Path, name: str, clients: list[str], aggregator: str) -> FederationPaths:
    """Provision a federation and make its parties RabbitMQ users (password = the party's broker
    password). A client may write only its own up and status topics and read only its own down
    topic and the broadcast topic (MQTT levels are ``.``-separated routing keys in RabbitMQ)."""
    ports = free_ports(2)  # provisioning wants a Mosquitto port pair; RabbitMQ has its own
    paths = provision(root / name, name, clients, aggregator_id=aggregator, port=ports[0],
                      password_port=ports[1], check_access=False)
    users = {p: load_party_config(paths.party_config(p)).password for p in [aggregator, *clients]}
    topic = {c: (rf"^cotune\.{name}\.(up|status)\.{{username}}$", rf"^cotune\.{name}\.(down\.{{username}}|bcast)$")
             for c in clients}
    cluster.add_users(users, topic)
    return paths


@pytest.fixture(scope="module")
def work():
    d = Path(tempfile.mkdtemp(prefix="cotune-test-rmq-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def fed(cluster, work) -> FederationPaths:
    return _federation(cluster, work, FED, CLIENTS, "aggregator")


def _endpoint(paths: FederationPaths, party: str, port: int) -> Endpoint:
    pc = load_party_config(paths.party_config(party))
    broker = broker_config_for(pc, host="127.0.0.1", port=port, auth="password", tls=False, protocol="3.1.1")
    return Endpoint(pc.identity, pc.directory, broker,
                    EndpointConfig(max_message_bytes=pc.max_packet_bytes, stall_timeout_s=2.0))


def _raw(cluster, port: int, client_id: str, user: str, fed: FederationPaths, *, clean=True, will=None):
    """A bare paho client (3.1.1) with the party's password; returns (client, received list)."""
    got: list = []
    connected = threading.Event()
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv311, clean_session=clean)
    c.username_pw_set(user, load_party_config(fed.party_config(user)).password)
    if will:
        c.will_set(will[0], will[1], qos=1, retain=True)
    c.on_connect = lambda *a: connected.set()
    c.on_message = lambda cl, u, m: got.append((m.topic, bytes(m.payload), m.retain))
    c.connect("127.0.0.1", port, keepalive=10)
    c.loop_start()
    assert connected.wait(10), f"{client_id} did not connect"
    return c, got


def _stop(c: mqtt.Client) -> None:
    c.disconnect()
    c.loop_stop()


def _wait(pred, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_cluster_formed(cluster, fed):
    a, b = (n.name for n in cluster.nodes)
    assert sorted(cluster.running_nodes(node=1)) == sorted([a, b])
    # users made through node A are in the cluster's shared database
    users = cluster.ctl("list_users", "--formatter", "json", node=1)
    assert {"aggregator", *CLIENTS} <= {u["user"] for u in json.loads(users)}


def test_messages_and_blobs_cross_nodes(cluster, fed):
    port_a, port_b = cluster.nodes[0].mqtt_port, cluster.nodes[1].mqtt_port
    rng = np.random.default_rng(0)
    with _endpoint(fed, "aggregator", port_a) as agg, _endpoint(fed, "alice", port_b) as alice, \
            _endpoint(fed, "bob", port_b) as bob:
        assert agg.transport.protocol_in_use == alice.transport.protocol_in_use == "3.1.1"
        # live presence crosses the cluster (the aggregator was subscribed before they came)
        assert _wait(lambda: all(agg.presence.get(c, {}).get("state") == "online" for c in ("alice", "bob")))
        alice.send("aggregator", Note("hello", {"from": "B"}), wait=10)
        got = agg.recv(timeout=15)
        assert got is not None and got.sender == "alice" and got.message.data == {"from": "B"}
        agg.send("alice", Note("hello", {"from": "A"}), wait=10)
        got = alice.recv(timeout=15)
        assert got is not None and got.sender == "aggregator" and got.message.data == {"from": "A"}

        up = rng.bytes(2 * 2**20 + 12345)  # 9 chunks of 256 KiB
        t0 = time.monotonic()
        ref = alice.send_blob("aggregator", up, kind="update")
        assert bytes(agg.fetch_blob(ref, "alice", timeout=60).read()) == up
        up_s = time.monotonic() - t0
        down = rng.bytes(2 * 2**20 + 777)
        t0 = time.monotonic()
        ref = agg.send_blob("bob", down, kind="adapter")
        assert bytes(bob.fetch_blob(ref, "aggregator", timeout=60).read()) == down
        down_s = time.monotonic() - t0
        # broadcast: encrypted once, the content key granted to each recipient on its own topic
        cast = rng.bytes(1_000_000)
        ref = agg.broadcast_blob(["alice", "bob"], cast, kind="global")
        for ep in (alice, bob):
            assert bytes(ep.fetch_blob(ref, "aggregator", timeout=60).read()) == cast
        print(f"\n2 MiB blob B->A {up_s:.2f}s, A->B {down_s:.2f}s")
        for ep in (agg, alice, bob):
            assert sum(ep.rejected.values()) == 0, ep.rejected


def test_persistent_session_resumes_on_other_node(cluster, fed):
    """QoS 1 messages sent while a client is away wait in its session (a durable queue on the
    node it first connected to) and are delivered when it comes back through the other node."""
    port_a, port_b = cluster.nodes[0].mqtt_port, cluster.nodes[1].mqtt_port
    with _endpoint(fed, "aggregator", port_a) as agg:
        with _endpoint(fed, "carol", port_b):
            pass  # session and subscriptions made on node B
        for i in range(3):
            agg.send("carol", Note("queued", {"i": i}), wait=10)
        with _endpoint(fed, "carol", port_a) as carol:  # back through node A
            got = [carol.recv(timeout=15) for _ in range(3)]
            assert [g.message.data["i"] for g in got if g is not None] == [0, 1, 2]
            assert sum(carol.rejected.values()) == 0


def test_last_will_crosses_nodes(cluster, fed):
    port_a, port_b = cluster.nodes[0].mqtt_port, cluster.nodes[1].mqtt_port
    status = f"cotune/{FED}/status/carol"
    with _endpoint(fed, "aggregator", port_a) as agg:
        c, _ = _raw(cluster, port_b, f"{FED}-carol-will", "carol", fed, will=(status, _presence("offline")))
        c.publish(status, _presence("online"), qos=1, retain=True).wait_for_publish(10)
        assert _wait(lambda: agg.presence.get("carol", {}).get("state") == "online")
        c.loop_stop()
        c.socket().close()  # gone without DISCONNECT: node B publishes the will
        assert _wait(lambda: agg.presence.get("carol", {}).get("state") == "offline")


def test_retained_presence_is_node_local_and_exact_only(cluster, fed):
    """Pins RabbitMQ 3.10's retained-message store: kept by the node that received the publish,
    delivered only to a subscription with the exact topic on that node."""
    port_a, port_b = cluster.nodes[0].mqtt_port, cluster.nodes[1].mqtt_port
    status = f"cotune/{FED}/status/bob"
    bob, _ = _raw(cluster, port_b, f"{FED}-bob-retain", "bob", fed)
    bob.publish(status, b'{"state": "online"}', qos=1, retain=True).wait_for_publish(10)
    _stop(bob)
    subs = {}
    for name, port, topic in [("B exact", port_b, status), ("A exact", port_a, status),
                              ("B wildcard", port_b, f"cotune/{FED}/status/+"),
                              ("A wildcard", port_a, f"cotune/{FED}/status/+")]:
        c, got = _raw(cluster, port, "retain-" + name.replace(" ", "-"), "aggregator", fed)
        c.subscribe(topic, qos=1)
        subs[name] = (c, got)
    time.sleep(1.5)
    seen = {name: [t for t, _, retained in got if retained] for name, (_, got) in subs.items()}
    for c, _ in subs.values():
        _stop(c)
    assert seen == {"B exact": [status], "A exact": [], "B wildcard": [], "A wildcard": []}


def test_acl_and_shared_subscriptions(cluster, fed):
    """Topic permissions stand in for the Mosquitto ACL: a client publishing on another
    client's up topic is disconnected and nothing is delivered. ``$share/`` is not supported by
    the 3.10 MQTT plugin (hence the ingest workers' explicit per-client subscriptions)."""
    port_a, port_b = cluster.nodes[0].mqtt_port, cluster.nodes[1].mqtt_port
    watch, got = _raw(cluster, port_a, "acl-watch", "aggregator", fed)
    watch.subscribe(f"cotune/{FED}/up/+", qos=1)
    share, shared = _raw(cluster, port_a, "share-watch", "aggregator", fed)
    share.subscribe(f"$share/ingest/cotune/{FED}/up/+", qos=1)
    time.sleep(0.5)
    carol, _ = _raw(cluster, port_b, f"{FED}-carol-acl", "carol", fed)
    carol.publish(f"cotune/{FED}/up/carol", b"mine", qos=1).wait_for_publish(10)
    carol.publish(f"cotune/{FED}/up/alice", b"forged", qos=1)
    assert _wait(lambda: not carol.is_connected(), 10)
    carol.loop_stop()
    time.sleep(1.0)
    assert [(t, p) for t, p, _ in got] == [(f"cotune/{FED}/up/carol", b"mine")]
    assert shared == []
    _stop(watch)
    _stop(share)


# --------------------------------------------------------------------------- a federation round


@pytest.mark.slow  # about 45 s: the service, 2 ingest workers and a device process start
def test_federation_round_across_nodes(cluster, work):
    """The real aggregator service with 2 ingest workers on node A, 6 virtual devices on node B:
    every update accepted, the global is the weighted mean of what the devices sent."""
    from safetensors.numpy import load as st_load

    from aggregator.state import open_store
    from aggregator.workers import shard_of
    from cotune.fleet.device import WorkerConfig
    from cotune.fleet.models import PRESETS, preset_model

    assert {shard_of(d, 2) for d in DEVICES} == {0, 1}, "the test needs both shards populated"
    port_a, port_b = cluster.nodes[0].mqtt_port, cluster.nodes[1].mqtt_port
    paths = _federation(cluster, work, FLEET, DEVICES, "coordinator")
    state_dir = work / "fleet-state"
    cfg = {
        "party_config": str(paths.party_config("coordinator")), "state_dir": str(state_dir),
        "algorithm": "fedavg", "algorithm_config": {"lora": PRESETS["tiny"]["lora"], "wire_dtype": "fp16"},
        "rounds": ROUNDS, "min_clients": len(DEVICES), "quorum": 1.0, "round_deadline_s": 60.0,
        "wait_for_clients_s": 60.0, "models": {"slm": str(preset_model("tiny"))}, "final_wait_s": 15.0,
        "ingest_workers": 2,
        "broker": {"host": "127.0.0.1", "port": port_a, "auth": "password", "tls": False, "protocol": "3.1.1"},
    }
    (work / "fleet.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    agg_log = open(work / "fleet-aggregator.log", "wb")
    agg = subprocess.Popen([sys.executable, "-m", "cotune", "aggregator", "serve", "--config", str(work / "fleet.json")],
                           stdout=agg_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                           start_new_session=True)
    devices = None
    try:
        # retained presence does not reach the aggregator's wildcard subscription on RabbitMQ:
        # the devices come once it listens, so that it sees them come online
        queue = "mqtt-subscription-rmqfleet-coordinatorqos1"
        assert _wait(lambda: agg.poll() is None and queue in cluster.ctl("list_queues", "name"), 60), \
            (work / "fleet-aggregator.log").read_text(errors="replace")[-3000:]
        record, blobs = work / "fleet-sent.jsonl", work / "fleet-blobs"
        wc = WorkerConfig(str(paths.root), DEVICES, "127.0.0.1", port_b, auth="password", protocol="3.1.1",
                          tls=False, record_path=str(record), blobs_dir=str(blobs))
        (work / "fleet-devices.json").write_text(json.dumps(asdict(wc)))
        devices = subprocess.Popen([sys.executable, "-m", "cotune.fleet.device", str(work / "fleet-devices.json")],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=open(work / "fleet-devices.log", "wb"), env=env, start_new_session=True)
        try:
            agg.wait(timeout=150)
        except subprocess.TimeoutExpired:
            agg.terminate()
            agg.wait(10)
        log_tail = (work / "fleet-aggregator.log").read_text(errors="replace")[-3000:]
        assert agg.returncode == 0, log_tail
        out, _ = devices.communicate(b"stop\n", timeout=30)
        stats = [json.loads(line) for line in out.splitlines() if line.strip()][-1]["stats"]
    finally:
        for p in (agg, devices):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        agg_log.close()

    with open_store(state_dir / "state.db", checkpoints=state_dir / "state.db.checkpoints") as store:
        assert store.status()["rounds_committed"] == ROUNDS
        for r in range(1, ROUNDS + 1):
            assert store.load_round(r, with_partial=False).accepted == DEVICES  # every update, no rejection
            parts = store.worker_partials(r)  # both ingest workers folded a share
            assert sorted(parts) == [0, 1] and all(final for _, final in parts.values())
        final = store.load_global().tensors
    assert stats["updates_sent"] == len(DEVICES) * ROUNDS and stats["errors"] == {} and stats["rejected"] == {}
    assert stats["finals"] == len(DEVICES)

    rows = [json.loads(line) for line in record.read_text().splitlines()]
    r2 = {r["global_sha"] for r in rows if r["round"] == 2 and not r.get("final")}
    assert len(r2) == 1  # round 2's Task carried round 1's aggregate (fp16 on the wire)
    sent_global = st_load((blobs / f"{r2.pop()}.safetensors").read_bytes())
    spec = {n: (a.shape, a.dtype.name) for n, a in sent_global.items()}
    want1 = _expected(rows, spec, 1)
    for name, arr in sent_global.items():
        np.testing.assert_array_equal(arr, want1[name].astype(np.float32).astype(np.float16))
    want2 = _expected(rows, spec, ROUNDS)
    assert set(final) == set(want2)
    for name, arr in final.items():
        np.testing.assert_allclose(arr, want2[name].astype(np.float32), rtol=1e-6, atol=1e-9)
