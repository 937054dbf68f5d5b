"""Transport benchmark: the cost of the envelope, hashing and reassembly over raw MQTT.

In one run, through the same Mosquitto (mTLS, the generated ACL), the same payload travels
  (a) raw:    plain paho QoS 1 publishes of the same chunk size, concatenated by a plain subscriber;
              (the receiver of every path runs in its own process, as on real machines)
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
import subprocess
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
from bridge.messages import Update  # noqa: E402
from bridge.provision import FederationPaths, load_party_config, provision  # noqa: E402
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


def receiver(mode: str, fed_dir: str, size: int, chunk: int) -> None:
    """Runs in its own process (sender and receiver are different machines in real life, and
    one Python process would serialise both ends on the GIL). Prints "ready", then the wall
    time at which the payload was complete and verified."""
    paths = FederationPaths.open(fed_dir)
    agg_pc = load_party_config(paths.party_config("aggregator"))
    topic = paths.topics.up("edge")
    if mode == "bridge":
        cfg = EndpointConfig(chunk_size=chunk, max_message_bytes=chunk + 8192, spill_dir=fed_dir,
                             spill_threshold=2 * size)
        agg = load_endpoint(paths.party_config("aggregator"), cfg)
        # no persistent session here: the broker must not queue the raw runs' frames for us
        agg.transport.config.session_expiry_s = 0
        agg.start()
        print("ready", flush=True)
        msg = agg.recv(timeout=300)
        res = agg.fetch_blob(msg.message.blob("payload"), "edge", timeout=300)
        done = time.time()
        ok = len(res.read()) == size  # the endpoint verified the SHA-256 already
        agg.close()
    else:
        n = 1 if mode == "single" else (size + chunk - 1) // chunk
        parts: list[bytes] = []
        complete = threading.Event()

        def on_message(client, userdata, msg):
            parts.append(msg.payload)
            if len(parts) == n:
                complete.set()

        sub = raw_client(agg_pc, f"bench-{mode}-sub-{os.getpid()}", on_message)
        sub.subscribe(topic, qos=1)
        time.sleep(0.3)
        print("ready", flush=True)
        complete.wait(300)
        joined = b"".join(parts)
        done = time.time()
        ok = len(joined) == size
        sub.disconnect()
        sub.loop_stop()
    print(json.dumps({"done_at": done, "ok": ok}), flush=True)


def timed(mode: str, paths, payload: bytes, chunk: int, send) -> float:
    proc = subprocess.Popen([sys.executable, __file__, "--receiver", mode, "--fed", str(paths.root),
                             "--size", str(len(payload)), "--chunk", str(chunk)], stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{mode} receiver did not start")
        t0 = time.time()
        send()
        result = json.loads(proc.stdout.readline())
    finally:
        proc.wait(60)
    if not result["ok"]:
        raise RuntimeError(f"{mode}: payload incomplete or wrong")
    return result["done_at"] - t0


def send_raw(pc, topic: str, payload: bytes, chunk: int) -> None:
    pub = raw_client(pc, f"bench-raw-pub-{os.getpid()}")
    window = []
    for i in range(0, len(payload), chunk):
        window.append(pub.publish(topic, payload[i:i + chunk], qos=1))
        while len(window) >= 32:
            if acked(window[0]):
                window.pop(0)
            else:
                time.sleep(0.0005)
    for info in window:
        while not acked(info):
            time.sleep(0.0005)
    pub.disconnect()
    pub.loop_stop()


def send_bridge(edge, payload: bytes) -> None:
    ref = edge.send_blob("aggregator", payload, round=1)
    edge.send("aggregator", Update(round=1, algorithm="bench", num_examples=1, blobs={"payload": ref.to_json()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 MB, 3 repetitions")
    ap.add_argument("--mb", type=float, help="payload size in MB (default 64, quick 20)")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--chunk", type=int, default=CHUNK)
    ap.add_argument("--receiver", help=argparse.SUPPRESS)
    ap.add_argument("--fed", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receiver:
        receiver(args.receiver, args.fed, args.size, args.chunk)
        return
    size = int((args.mb or (20 if args.quick else 64)) * 1024 * 1024)
    reps = args.reps or (3 if args.quick else 5)
    if find_mosquitto() is None:
        sys.exit("bench/transport.py needs mosquitto (apt-get install mosquitto)")
    root = Path(tempfile.mkdtemp(prefix="cotune-bench-", dir="/tmp"))
    os.chmod(root, 0o755)
    paths = provision(root / "fed", "bench", ["edge"], port=free_port(), max_packet_bytes=size + (1 << 20))
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    payload = os.urandom(size)
    edge_pc = load_party_config(paths.party_config("edge"))
    cfg = EndpointConfig(chunk_size=args.chunk, max_message_bytes=args.chunk + 8192)
    edge = load_endpoint(paths.party_config("edge"), cfg).start()
    topic = paths.topics.up("edge")
    raw_s, bridge_s = [], []
    try:
        for r in range(reps):
            raw_s.append(timed("raw", paths, payload, args.chunk, lambda: send_raw(edge_pc, topic, payload, args.chunk)))
            bridge_s.append(timed("bridge", paths, payload, args.chunk, lambda: send_bridge(edge, payload)))
            print(f"rep {r + 1}/{reps}: raw {size / raw_s[-1] / 1e6:.1f} MB/s, "
                  f"bridge {size / bridge_s[-1] / 1e6:.1f} MB/s", flush=True)
        single = timed("single", paths, payload, size, lambda: send_raw(edge_pc, topic, payload, size))
    finally:
        edge.close()
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)
    raw_mbps = size / statistics.median(raw_s) / 1e6
    bridge_mbps = size / statistics.median(bridge_s) / 1e6
    result = {"raw_MBps": round(raw_mbps, 1), "bridge_MBps": round(bridge_mbps, 1),
              "ratio": round(bridge_mbps / raw_mbps, 3), "single_publish_MBps": round(size / single / 1e6, 1),
              "payload_MB": round(size / 1e6, 1), "chunk_bytes": args.chunk, "reps": reps, "tls": True,
              "receiver": "separate process"}
    print("BENCH transport " + json.dumps(result))


if __name__ == "__main__":
    main()
