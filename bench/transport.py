"""Transport benchmark: the cost of the envelope, hashing and reassembly over raw MQTT.

In one run, through the same Mosquitto (mTLS, the generated ACL), the same payload travels
  (a) raw:    plain paho QoS 1 publishes of the same chunk size, concatenated by a plain subscriber;
  (b) bridge: cotune's encrypted, signed, chunked transfer, reassembled and SHA-256 verified;
  (c) single: one unchunked QoS 1 publish of the whole payload, for reference.
Repetitions alternate (a) and (b); medians are reported. Last line:
  BENCH transport {"raw_MBps": .., "bridge_MBps": .., "ratio": .., "single_publish_MBps": ..}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from bridge.broker import MosquittoBroker, find_mosquitto, free_port  # noqa: E402
from bridge.endpoint import EndpointConfig, load_endpoint  # noqa: E402
from bridge.provision import load_party_config, provision  # noqa: E402
from bridge.transport import acked  # noqa: E402

CHUNK = 256 * 1024


def raw_client(pc, name: str, on_message=None) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(pc.ca_cert), certfile=str(pc.client_cert), keyfile=str(pc.client_key),
              tls_version=ssl.PROTOCOL_TLS_CLIENT)
    c.max_inflight_messages_set(64)
    if on_message:
        c.on_message = on_message
    ready = threading.Event()
    c.on_connect = lambda *a: ready.set()
    c.connect(pc.host, pc.port)
    c.loop_start()
    ready.wait(10)
    return c


def run_raw(agg_pc, edge_pc, topic: str, payload: bytes, chunk: int) -> float:
    """Seconds for the payload to go edge -> broker -> aggregator as raw chunks."""
    parts: list[bytes] = []
    n = (len(payload) + chunk - 1) // chunk
    done = threading.Event()

    def on_message(client, userdata, msg):
        parts.append(msg.payload)
        if len(parts) == n:
            done.set()

    sub = raw_client(agg_pc, f"bench-raw-sub-{os.getpid()}", on_message)
    sub.subscribe(topic, qos=1)
    time.sleep(0.3)
    pub = raw_client(edge_pc, f"bench-raw-pub-{os.getpid()}")
    t0 = time.perf_counter()
    window = []
    for i in range(n):
        window.append(pub.publish(topic, payload[i * chunk:(i + 1) * chunk], qos=1))
        while len(window) >= 32:
            if acked(window[0]):
                window.pop(0)
            else:
                time.sleep(0.0005)
    if not done.wait(300):
        raise RuntimeError("raw transfer incomplete")
    joined = b"".join(parts)
    seconds = time.perf_counter() - t0
    assert joined == payload, "raw path reordered or lost data"
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    return seconds


def run_bridge(agg, edge, payload: bytes) -> float:
    t0 = time.perf_counter()
    ref = edge.send_blob("aggregator", payload, round=1)
    res = agg.fetch_blob(ref, edge.me, timeout=300)
    seconds = time.perf_counter() - t0
    assert res.read() == payload
    res.discard()
    return seconds


def run_single(agg_pc, edge_pc, topic: str, payload: bytes) -> float:
    got = threading.Event()
    sub = raw_client(agg_pc, f"bench-single-sub-{os.getpid()}", lambda *a: got.set())
    sub.subscribe(topic, qos=1)
    time.sleep(0.3)
    pub = raw_client(edge_pc, f"bench-single-pub-{os.getpid()}")
    t0 = time.perf_counter()
    pub.publish(topic, payload, qos=1)
    if not got.wait(300):
        raise RuntimeError("single publish never arrived")
    seconds = time.perf_counter() - t0
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 MB, 3 repetitions")
    ap.add_argument("--mb", type=float, help="payload size in MB (default 64, quick 20)")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--chunk", type=int, default=CHUNK)
    args = ap.parse_args()
    size = int((args.mb or (20 if args.quick else 64)) * 1024 * 1024)
    reps = args.reps or (3 if args.quick else 5)
    if find_mosquitto() is None:
        sys.exit("bench/transport.py needs mosquitto (apt-get install mosquitto)")
    root = Path(tempfile.mkdtemp(prefix="cotune-bench-", dir="/tmp"))
    os.chmod(root, 0o755)
    paths = provision(root / "fed", "bench", ["edge"], port=free_port(), max_packet_bytes=size + (1 << 20))
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    payload = os.urandom(size)
    agg_pc, edge_pc = (load_party_config(paths.party_config(p)) for p in ("aggregator", "edge"))
    cfg = EndpointConfig(chunk_size=args.chunk, max_message_bytes=args.chunk + 8192, spill_dir=str(root),
                         spill_threshold=2 * size)
    agg = load_endpoint(paths.party_config("aggregator"), cfg).start()
    edge = load_endpoint(paths.party_config("edge"), cfg).start()
    topic = paths.topics.up("edge")
    raw_s, bridge_s = [], []
    try:
        run_bridge(agg, edge, payload[: 4 * args.chunk])  # warm-up
        for r in range(reps):
            raw_s.append(run_raw(agg_pc, edge_pc, topic, payload, args.chunk))
            bridge_s.append(run_bridge(agg, edge, payload))
            print(f"rep {r + 1}/{reps}: raw {size / raw_s[-1] / 1e6:.1f} MB/s, "
                  f"bridge {size / bridge_s[-1] / 1e6:.1f} MB/s", flush=True)
        single = run_single(agg_pc, edge_pc, topic, payload)
    finally:
        edge.close()
        agg.close()
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)
    raw_mbps = size / statistics.median(raw_s) / 1e6
    bridge_mbps = size / statistics.median(bridge_s) / 1e6
    result = {"raw_MBps": round(raw_mbps, 1), "bridge_MBps": round(bridge_mbps, 1),
              "ratio": round(bridge_mbps / raw_mbps, 3), "single_publish_MBps": round(size / single / 1e6, 1),
              "payload_MB": round(size / 1e6, 1), "chunk_bytes": args.chunk, "reps": reps, "tls": True}
    print("BENCH transport " + json.dumps(result))


if __name__ == "__main__":
    main()
