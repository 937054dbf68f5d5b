"""MQTT transport on paho-mqtt 2.x.

QoS 1 everywhere, persistent sessions (the broker keeps our subscriptions and queues QoS 1
messages while we are away), a retained presence message with a last will, reconnect with
exponential backoff, TLS or mTLS. The cotune protocol needs only MQTT 3.1.1 semantics; with
``protocol="auto"`` we offer MQTT 5 first (message expiry, the broker's maximum packet size,
reason codes) and fall back to 3.1.1 when the broker refuses it (the embedded amqtt broker
does).

Incoming messages are handed from paho's network thread to one worker thread through a bounded
queue: decryption and verification never stall keep-alives and acknowledgements, and a slow
consumer pushes back on the broker (TCP) instead of growing memory without bound.
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .errors import ConfigurationError, TransportError

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]

#: brokers (host, port) seen refusing MQTT 5 in this process: "auto" goes straight to 3.1.1
_NO_V5: set[tuple[str, int]] = set()


@dataclass
class TLSConfig:
    ca: str
    cert: str | None = None  # with key: mutual TLS
    key: str | None = None
    insecure_skip_hostname: bool = False


@dataclass
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: TLSConfig | None = None
    username: str | None = None
    password: str | None = None
    protocol: str = "auto"  # "auto" | "5" | "3.1.1"
    keepalive: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    max_inflight: int = 64
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigurationError(f"protocol must be 'auto', '5' or '3.1.1', got {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ConfigurationError(f"bad broker port {self.port}")


@dataclass
class TransportStats:
    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    connects: int = 0
    disconnects: int = 0
    handler_errors: int = 0
    dropped: int = 0  # frames of a droppable topic over its queue share


class FairQueue:
    """Frames waiting for the handler, served round-robin by topic: a topic with a backlog (one
    member flooding its up topic) delays another topic's next frame by at most one frame of its
    own, instead of by its whole backlog.

    Bounded: ``max_bytes`` in all, beyond which the network thread waits (back-pressure, for
    trusted traffic); a topic ``droppable`` accepts (the aggregator's up topics) holds at most
    ``per_topic_bytes``, beyond which its new frames are dropped and counted (a sender's lost
    chunks are asked for again by the receiver's resume logic)."""

    def __init__(self, max_bytes: int = 256 << 20, per_topic_bytes: int | None = None,
                 droppable: Callable[[str], bool] | None = None) -> None:
        self.max_bytes, self.per_topic_bytes, self.droppable = max_bytes, per_topic_bytes, droppable
        self._topics: dict[str, collections.deque] = {}
        self._sizes: dict[str, int] = {}
        self._order: collections.deque = collections.deque()
        self._bytes = 0
        self._closed = False
        self._cv = threading.Condition()
        self.dropped = 0
        self.peak_bytes = 0

    def put(self, topic: str, payload: bytes, *, stop: Callable[[], bool] = lambda: False) -> bool:
        n = len(payload)
        with self._cv:
            if (self.per_topic_bytes is not None and self.droppable is not None
                    and self._sizes.get(topic, 0) + n > self.per_topic_bytes and self.droppable(topic)):
                self.dropped += 1
                return False
            while self._bytes + n > self.max_bytes and self._bytes > 0 and not stop():
                self._cv.wait(0.1)
            q = self._topics.get(topic)
            if q is None:
                q = self._topics[topic] = collections.deque()
                self._order.append(topic)
            q.append(payload)
            self._sizes[topic] = self._sizes.get(topic, 0) + n
            self._bytes += n
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            self._cv.notify_all()
            return True

    def get(self) -> tuple[str, bytes] | None:
        """The next frame, round-robin over topics; None once closed."""
        with self._cv:
            while not self._order and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            topic = self._order.popleft()
            q = self._topics[topic]
            payload = q.popleft()
            if q:
                self._order.append(topic)
                self._sizes[topic] -= len(payload)
            else:
                del self._topics[topic], self._sizes[topic]
            self._bytes -= len(payload)
            self._cv.notify_all()
            return topic, payload

    def drain(self) -> None:
        with self._cv:
            self._topics.clear()
            self._sizes.clear()
            self._order.clear()
            self._bytes = 0
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class MqttTransport:
    """One MQTT connection of one party."""

    def __init__(self, config: BrokerConfig, client_id: str, handler: Handler, *,
                 will: tuple[str, bytes] | None = None, online: tuple[str, bytes] | None = None,
                 queue_bytes: int = 256 << 20, per_topic_bytes: int | None = None,
                 droppable: Callable[[str], bool] | None = None):
        self.config, self.client_id, self.handler = config, client_id, handler
        self.will, self.online = will, online
        self.stats = TransportStats()
        self.protocol_in_use: str | None = None
        self.broker_max_packet: int | None = None
        self._subs: dict[str, int] = {}
        self._queue = FairQueue(queue_bytes, per_topic_bytes, droppable)
        self._connected = threading.Event()
        self._connack: tuple[bool, str] | None = None
        self._connack_event = threading.Event()
        self._client: mqtt.Client | None = None
        self._worker: threading.Thread | None = None
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------------
    def connect(self, timeout: float = 15.0) -> None:
        order = {"auto": ["5", "3.1.1"], "5": ["5"], "3.1.1": ["3.1.1"]}[self.config.protocol]
        if self.config.protocol == "auto" and (self.config.host, self.config.port) in _NO_V5:
            order = ["3.1.1"]
        last_error = "no attempt"
        for i, proto in enumerate(order):
            # a broker that does not speak MQTT 5 may never answer a v5 CONNECT (amqtt chokes on
            # its properties and keeps the socket open), so the v5 probe of "auto" gets a short
            # timeout; a v5 broker answers within milliseconds
            probe = min(timeout, 5.0) if i < len(order) - 1 else timeout
            ok, reason = self._try_connect(proto, probe)
            if ok:
                self.protocol_in_use = proto
                log.info("%s connected to %s:%d with MQTT %s", self.client_id, self.config.host, self.config.port, proto)
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, name=f"cotune-rx-{self.client_id}", daemon=True)
                    self._worker.start()
                return
            last_error = reason
            if proto == "5" and not reason.startswith("network:"):
                _NO_V5.add((self.config.host, self.config.port))
            log.info("MQTT %s refused by %s:%d (%s)", proto, self.config.host, self.config.port, reason)
        raise TransportError(f"could not connect {self.client_id} to {self.config.host}:{self.config.port}: {last_error}")

    def _try_connect(self, proto: str, timeout: float) -> tuple[bool, str]:
        cfg = self.config
        v5 = proto == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else False,
        )
        client.max_inflight_messages_set(cfg.max_inflight)
        client.reconnect_delay_set(max(1, int(cfg.reconnect_min_s)), int(cfg.reconnect_max_s))
        if cfg.tls is not None:
            client.tls_set(ca_certs=cfg.tls.ca, certfile=cfg.tls.cert, keyfile=cfg.tls.key,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            client.tls_insecure_set(cfg.tls.insecure_skip_hostname)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password)
        if self.will:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._connack, self._client = None, client
        self._connack_event.clear()
        kwargs = {}
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
            kwargs = {"clean_start": False, "properties": props}
        try:
            client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive, **kwargs)
        except (OSError, ssl.SSLError) as exc:
            return False, f"network: {exc.__class__.__name__}: {exc}"
        client.loop_start()
        if not self._connack_event.wait(timeout):
            self._stop_client(client)
            return False, "no CONNACK (timeout or connection closed)"
        ok, reason = self._connack
        if not ok:
            self._stop_client(client)
        return ok, reason

    @staticmethod
    def _stop_client(client: mqtt.Client) -> None:
        client.on_disconnect = None
        client.on_connect = None
        try:
            client.disconnect()
        except Exception:  # already gone
            pass
        client.loop_stop()

    def close(self, graceful_presence: tuple[str, bytes] | None = None) -> None:
        self._closing = True
        self._drain()  # unblocks a network thread waiting on a full queue
        client = self._client
        if client is not None:
            if graceful_presence is not None and self._connected.is_set():
                try:
                    client.publish(graceful_presence[0], graceful_presence[1], qos=1, retain=True).wait_for_publish(2)
                except (RuntimeError, ValueError):
                    pass
            self._stop_client(client)
        # frames received but not handled are dropped, not worked through: a service asked to
        # stop must stop within seconds; the protocol re-asks for anything unanswered (Tasks
        # are re-sent on restart and answered from the client's cache)
        self._drain()
        self._queue.close()
        if self._worker is not None:
            self._worker.join(timeout=5)
        self._connected.clear()

    def _drain(self) -> None:
        self._queue.drain()

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        ok = not reason_code.is_failure
        if ok:
            self.stats.connects += 1
            if properties is not None and hasattr(properties, "MaximumPacketSize"):
                self.broker_max_packet = properties.MaximumPacketSize
            _subscribe_batched(client, list(self._subs.items()))
            if self.online:
                client.publish(self.online[0], self.online[1], qos=1, retain=True)
            self._connected.set()
        self._connack = (ok, str(reason_code))
        self._connack_event.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        self.stats.disconnects += 1
        if not self._closing:
            log.warning("%s disconnected (%s); paho reconnects with backoff", self.client_id, reason_code)
        if self._connack is None:
            self._connack = (False, f"disconnected before CONNACK: {reason_code}")
            self._connack_event.set()

    def _on_message(self, client, userdata, msg) -> None:
        self.stats.messages_in += 1
        self.stats.bytes_in += len(msg.payload)
        if self._closing:
            return
        if not self._queue.put(msg.topic, msg.payload, stop=lambda: self._closing):
            self.stats.dropped += 1  # a droppable topic over its share (see FairQueue)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.handler(*item)
            except Exception:  # the receiver must keep serving whatever a handler does
                self.stats.handler_errors += 1
                log.exception("handler failed on a message from %s", item[0])

    # -- API ------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subs[topic] = qos
        if self._client is not None and self.connected:
            rc, _ = self._client.subscribe(topic, qos=qos)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                log.warning("subscribe %s returned %s (will retry on reconnect)", topic, rc)

    def subscribe_many(self, topics: list[str], qos: int = 1) -> None:
        """Many subscriptions in few SUBSCRIBE packets (an ingest worker takes thousands)."""
        fresh = [t for t in topics if t not in self._subs]
        for t in fresh:
            self._subs[t] = qos
        if self._client is not None and self.connected:
            _subscribe_batched(self._client, [(t, qos) for t in fresh])

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, wait: float | None = None,
                expiry_s: int | None = None) -> mqtt.MQTTMessageInfo:
        """QoS 1 publish. While disconnected the message is queued by paho and sent after the
        reconnect. ``wait`` blocks until the broker acknowledged it."""
        if self._client is None:
            raise TransportError("publish before connect()")
        props = None
        if expiry_s and self.protocol_in_use == "5":
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = int(expiry_s)
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        self.stats.messages_out += 1
        self.stats.bytes_out += len(payload)
        if wait:
            deadline = time.monotonic() + wait
            while not acked(info):
                if time.monotonic() > deadline:
                    raise TransportError(f"publish to {topic} not acknowledged within {wait}s")
                time.sleep(0.005)
        return info


def _subscribe_batched(client: mqtt.Client, subs: list[tuple[str, int]], batch: int = 256) -> None:
    for i in range(0, len(subs), batch):
        rc, _ = client.subscribe(subs[i:i + batch])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("subscribe of %d topics returned %s (will retry on reconnect)", len(subs[i:i + batch]), rc)


def acked(info: mqtt.MQTTMessageInfo) -> bool:
    """True once the broker acknowledged a QoS 1 publish. Unlike ``is_published()`` this does
    not raise for a message published while disconnected: paho keeps such a message queued and
    sends it after the reconnect, so it is merely not acknowledged *yet*."""
    if info.rc == mqtt.MQTT_ERR_NO_CONN:
        with info._condition:  # paho 2.x keeps the flag private; pinned to paho-mqtt < 3
            return info._published
    return info.is_published()

