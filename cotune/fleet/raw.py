"""The broker's own throughput, as a baseline for update ingest: the same bytes (one blob per
device, in chunks of the same size) published with plain paho through the same broker, on the
devices' own up topics (mTLS, ACL), without envelopes, to one subscriber that holds the
aggregator's certificate. MiB/s = bytes / (first publish -> last byte received)."""

from __future__ import annotations

import os
import ssl
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def _client(pc, client_id: str) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv311, clean_session=True)
    if pc.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(pc.ca_cert))
        ctx.load_cert_chain(str(pc.client_cert), str(pc.client_key))
        c.tls_set_context(ctx)
    c.max_inflight_messages_set(64)
    return c


def raw_throughput(fed_dir, parties: list[str], blob_bytes: int, chunk_size: int,
                   timeout: float = 300.0) -> dict:
    """Publish ``blob_bytes`` from each of ``parties`` (concurrently) to the subscriber."""
    from bridge.provision import FederationPaths, load_party_config

    paths = FederationPaths.open(fed_dir)
    agg = load_party_config(paths.party_config("aggregator"))
    chunks = [min(chunk_size, blob_bytes - i) for i in range(0, blob_bytes, chunk_size)]
    total = len(parties) * blob_bytes
    got = [0]
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(client, userdata, msg) -> None:
        got[0] += len(msg.payload)
        if got[0] >= total:
            done.set()

    sub = _client(agg, f"{agg.federation}-raw-sub-{os.getpid()}")
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe(agg.topics.up_wildcard, qos=1)
    sub.connect(agg.host, agg.port, keepalive=60)
    sub.loop_start()
    if not subscribed.wait(30):
        raise RuntimeError("raw baseline: the subscriber did not subscribe")
    pubs = []
    for p in parties:
        pc = load_party_config(paths.party_config(p))
        c = _client(pc, f"{pc.federation}-raw-{p}")
        ready = threading.Event()
        c.on_connect = lambda *a, ready=ready: ready.set()
        c.connect(pc.host, pc.port, keepalive=60)
        c.loop_start()
        # one TLS handshake at a time: hundreds at once time out at the broker on a busy host
        if not ready.wait(30):
            raise RuntimeError(f"raw baseline: publisher {p} did not connect")
        pubs.append((c, pc.topics.up(p), ready))
    payloads = [os.urandom(n) for n in sorted(set(chunks))]
    by_size = {len(b): b for b in payloads}
    t0 = time.monotonic()

    def publish(c: mqtt.Client, topic: str) -> None:
        for n in chunks:
            c.publish(topic, by_size[n], qos=1)

    threads = [threading.Thread(target=publish, args=(c, t)) for c, t, _ in pubs]
    for t in threads:
        t.start()
    finished = done.wait(timeout)
    seconds = time.monotonic() - t0
    for t in threads:
        t.join()
    for c, _, _ in pubs:
        c.disconnect()
        c.loop_stop()
    sub.disconnect()
    sub.loop_stop()
    return {"publishers": len(parties), "bytes": got[0], "seconds": round(seconds, 3),
            "complete": finished, "MBps": round(got[0] / 2**20 / seconds, 3)}
