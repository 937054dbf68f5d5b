"""`cotune demo --algorithm wire`: two provisioned parties exchange an encrypted blob through an
embedded broker, while a plain MQTT subscriber (standing in for the broker's operator) records
everything that crossed the wire. Shows what the broker can and cannot see."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.broker import EmbeddedBroker
from bridge.endpoint import EndpointConfig, load_endpoint
from bridge.messages import Note, Update
from bridge.provision import provision


class Eavesdropper:
    """A plain subscriber to ``cotune/#``: what anyone with broker access sees."""

    def __init__(self, host: str, port: int):
        self.frames: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="eavesdropper", protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe("cotune/#", qos=1)
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.frames.append((msg.topic, bytes(msg.payload)))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _entropy_bits_per_byte(data: bytes) -> float:
    counts = Counter(data)
    n = len(data)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def run_wire_demo(size_mb: float = 20.0, out_dir: str = "demo-out") -> int:
    out = Path(out_dir)
    fed_dir = out / "wire-federation"
    if fed_dir.exists():
        shutil.rmtree(fed_dir)
    provision(fed_dir, "wiredemo", ["edge1"], port=8883, check_access=False)  # no Mosquitto here
    broker = EmbeddedBroker().start()
    print(f"embedded broker (amqtt, MQTT 3.1.1) on {broker.host}:{broker.port}; "
          f"federation provisioned in {fed_dir}")
    spy = Eavesdropper(broker.host, broker.port)
    over = {"host": broker.host, "port": broker.port, "tls": False, "protocol": "3.1.1"}  # amqtt: 3.1.1 only
    cfg = EndpointConfig(spill_dir=str(out))
    agg = load_endpoint(fed_dir / "parties" / "aggregator" / "config.json", cfg, **over).start()
    edge = load_endpoint(fed_dir / "parties" / "edge1" / "config.json", cfg, **over).start()
    try:
        # a recognisable plaintext, so we can show that it never appears on the wire
        marker = b"PRIVATE-ADAPTER-WEIGHTS::"
        payload = (marker + os.urandom(4096)) * int(size_mb * 1024 * 1024 / (len(marker) + 4096))
        t0 = time.perf_counter()
        ref = edge.send_blob("aggregator", payload, kind="adapter", round=1)
        edge.send("aggregator", Update(round=1, algorithm="wire-demo", num_examples=1, blobs={"adapter": ref.to_json()}),
                  round=1)
        update = agg.recv(timeout=120)
        assert update is not None and isinstance(update.message, Update), "no update arrived"
        blob = agg.fetch_blob(update.message.blob("adapter"), update.sender, timeout=300)
        seconds = time.perf_counter() - t0
        ok = blob.read() == payload
        agg.send("edge1", Note("ack", {"sha256": ref.sha256, "verified": ok}), round=1)
        ack = edge.recv(timeout=30)
        time.sleep(0.5)  # let the eavesdropper drain
    finally:
        edge.close()
        agg.close()
        spy.close()
        broker.stop()

    frames = spy.frames
    wire_bytes = sum(len(p) for _, p in frames)
    envelopes = [p for _, p in frames if p[:3] == b"CTE"]
    leaked = sum(marker in p for _, p in frames)
    sample = envelopes[len(envelopes) // 2] if envelopes else b""
    header = json.loads(sample[8:8 + int.from_bytes(sample[4:8], "little")]) if sample else {}
    report = {
        "blob_bytes": len(payload), "blob_sha256": ref.sha256, "verified": ok,
        "ack_received": bool(ack and isinstance(ack.message, Note) and ack.message.data.get("verified")),
        "seconds": round(seconds, 3), "MBps": round(len(payload) / seconds / 1e6, 1),
        "frames_on_wire": len(frames), "envelopes": len(envelopes), "wire_bytes": wire_bytes,
        "overhead_pct": round(100 * (wire_bytes - len(payload)) / len(payload), 3),
        "plaintext_marker_frames_on_wire": leaked,
        "ciphertext_entropy_bits_per_byte": round(_entropy_bits_per_byte(sample[200:200 + 65536]), 3) if sample else 0,
        "topics": dict(Counter(t for t, _ in frames)),
        "what_the_broker_sees_of_one_chunk": header,
    }
    print("\nwhat crossed the wire (seen by a subscriber to cotune/#):")
    for k in ("blob_bytes", "frames_on_wire", "envelopes", "wire_bytes", "overhead_pct",
              "plaintext_marker_frames_on_wire", "ciphertext_entropy_bits_per_byte", "seconds", "MBps"):
        print(f"  {k:<36} {report[k]}")
    print("  topics:")
    for t, n in report["topics"].items():
        print(f"    {t:<40} {n} frames")
    print("  header of one chunk envelope (authenticated, not secret):")
    print("    " + json.dumps(header))
    print(f"\nblob reassembled, SHA-256 verified: {ok}; aggregator's signed ack reached the edge: {report['ack_received']}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "wire_report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {out / 'wire_report.json'}")
    blob.discard()
    return 0 if ok and report["ack_received"] and leaked == 0 else 1


if __name__ == "__main__":
    raise SystemExit(run_wire_demo())
