"""A party on the wire: envelope + MQTT transport + blob transfer with resume.

An :class:`Endpoint` is what the edge SDK and the aggregator use. It sends typed messages
(:mod:`bridge.messages`) and blobs to other parties, receives, verifies and decrypts what is
addressed to it, and keeps serving whatever arrives: every rejected frame is counted by its
typed error code (``endpoint.rejected``) and logged, never raised into the network loop.

Routing follows DESIGN.md: a client talks only to the aggregator (its up topic) and listens on
its down topic and the broadcast topic; the aggregator listens on every up topic (or a shared
subscription when several ingest workers share the load) and the presence topics.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .blobs import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SPILL_THRESHOLD,
    Assembly,
    BlobResult,
    OutgoingBlob,
    OutgoingStore,
    from_ranges,
    to_ranges,
)
from .codec import Message, decode, encode
from .envelope import BROADCAST, ENVELOPE_OVERHEAD, Header, ReplayGuard, Sealer, UnknownKey
from .errors import (
    BlobIntegrityError,
    BridgeError,
    ConfigurationError,
    MalformedMessage,
    RateLimited,
    ResourceLimit,
    StaleRound,
    TamperedMessage,
    TransportError,
)
from .keys import Directory, Identity
from .messages import ROUNDLESS_TYPES, BlobAck, BlobRef, ChunkRequest, ErrorReport, KeyGrant
from .topics import Topics
from .transport import BrokerConfig, MqttTransport, TLSConfig, acked

log = logging.getLogger(__name__)

CHUNK = "chunk"  # envelope type of blob chunks: their body is raw bytes, not a Message


@dataclass
class EndpointConfig:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: the application's own limit per MQTT message; brokers drop or disconnect above theirs
    max_message_bytes: int = DEFAULT_CHUNK_SIZE + 2 * ENVELOPE_OVERHEAD
    spill_dir: str | None = None
    spill_threshold: int = DEFAULT_SPILL_THRESHOLD
    stall_timeout_s: float = 3.0  # no new chunk for this long -> ask for the missing ones
    orphan_ttl_s: float = 900.0  # transfers nobody fetches are dropped after this long
    max_resume_requests: int = 50
    publish_window: int = 32  # chunks in flight before the sender waits for broker acks
    replay_window_s: float = 600.0
    max_skew_s: float = 120.0
    parked_frames: int = 1024  # frames held while their content key is on its way
    share_group: str | None = None  # aggregator ingest workers: $share/<group>/... subscription
    #: the aggregator's up topics: "all" (one wildcard), "shared" (share_group), or "explicit"
    #: (only the clients given to :meth:`Endpoint.subscribe_up`: an ingest worker's shard)
    up_topics: str = "all"
    #: a second process of the same party (an ingest worker) needs its own MQTT client id and
    #: must not announce the party's presence
    instance: str | None = None
    #: receiver limits (one party can never make this endpoint hold more than these): the size
    #: of one incoming blob (None: ``blob_limit`` or unbounded), transfers held per sender
    #: (incomplete or complete-but-not-taken), bytes held in memory by incoming transfers in
    #: total, frames parked while their content key travels (clients only)
    max_blob_bytes: int | None = None
    max_blobs_per_sender: int = 4
    max_inflight_bytes: int = 512 * 1024 * 1024
    max_parked_bytes: int = 64 * 1024 * 1024
    #: per-sender allowance on the aggregator's up topics (frames per second, burst), checked
    #: before any cryptography; 0 disables it
    rate_per_sender: float = 500.0
    rate_burst: int = 4000
    #: received frames waiting for the handler: in all (the network thread waits beyond), and
    #: per up topic on the aggregator (that sender's excess is dropped; chunks are asked again)
    queue_bytes: int = 256 * 1024 * 1024
    per_sender_queue_bytes: int = 32 * 1024 * 1024
    #: a directory shared by the aggregator's processes: blobs the service sends are kept there
    #: so that an ingest worker, which receives the clients' chunk requests, can resend them
    shared_blob_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_blobs_per_sender", "max_inflight_bytes", "max_parked_bytes",
                     "parked_frames", "publish_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
        if self.chunk_size <= 0:
            raise ConfigurationError("chunk_size must be > 0")
        if self.chunk_size + ENVELOPE_OVERHEAD > self.max_message_bytes:
            raise ConfigurationError(
                f"chunk_size {self.chunk_size} + envelope overhead {ENVELOPE_OVERHEAD} exceeds max_message_bytes "
                f"{self.max_message_bytes}: lower chunk_size (brokers such as AWS IoT allow 128 KB per message)")


@dataclass
class Inbound:
    sender: str
    header: Header
    message: Message


@dataclass
class _Incoming:
    assembly: Assembly
    sender: str
    round: int
    requests: int = 0
    wanted: bool = False  # a fetch_blob() waits for it
    done: threading.Event = field(default_factory=threading.Event)
    result: BlobResult | None = None
    error: BridgeError | None = None


class Endpoint:
    def __init__(self, identity: Identity, directory: Directory, broker: BrokerConfig,
                 config: EndpointConfig | None = None, clock=time.time):
        self.identity, self.directory = identity, directory
        self.me = identity.party_id
        self.role = identity.role
        self.config = config or EndpointConfig()
        self.topics = Topics(directory.federation)
        self.sealer = Sealer(identity, directory, max_message_bytes=self.config.max_message_bytes,
                             replay=ReplayGuard(self.config.replay_window_s, self.config.max_skew_s, clock), clock=clock)
        self.rejected: Counter[str] = Counter()
        #: called (from the receive thread) for every rejected frame: (error, sender if known)
        self.on_reject = None
        #: bytes of accepted frames per sender (wire size, envelope included)
        self.bytes_from: Counter[str] = Counter()
        self.recent_errors: deque[str] = deque(maxlen=100)
        self.presence: dict[str, dict] = {}
        self.round_floor = 0
        self._inbox: queue.Queue[Inbound] = queue.Queue()
        self._outgoing = OutgoingStore()
        self._out_meta: dict[str, tuple[str | None, str, int]] = {}  # sha -> (kid, recipient, round)
        # incoming transfers by (sender, sha256): two senders may send byte-identical blobs (an
        # unchanged adapter), and each is its own transfer with its own chunks and requests
        self._incoming: dict[tuple[str, str], _Incoming] = {}
        self._finished: OrderedDict[tuple[str, str], float] = OrderedDict()  # recently handed over
        self._lock = threading.RLock()
        self._parked: dict[str, deque] = {}
        self._parked_count = 0
        self._parked_bytes = 0
        #: the largest incoming blob accepted from ``sender`` (set by the aggregator per round
        #: from the update spec); None: ``config.max_blob_bytes``
        self.blob_limit = None
        self._buckets: dict[str, list[float]] = {}  # sender -> [tokens, last refill]
        self._log_quiet: dict[tuple[str, str | None], float] = {}
        status_topic = self.topics.status(self.me)
        instance = self.config.instance
        presence = {} if instance else {"will": (status_topic, _presence("offline")),
                                        "online": (status_topic, _presence("online"))}
        # the aggregator's up topics are served fairly and each holds a bounded share of the
        # receive queue: one member's backlog neither delays nor crowds out the others
        fairness = {"per_topic_bytes": self.config.per_sender_queue_bytes,
                    "droppable": self.topics.is_up} if self.role == "aggregator" else {}
        self.transport = MqttTransport(
            broker, client_id=f"{directory.federation}-{self.me}" + (f"-{instance}" if instance else ""),
            handler=self._on_frame, queue_bytes=self.config.queue_bytes, **fairness, **presence)
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> Endpoint:
        t = self.topics
        if self.role == "aggregator":
            if self.config.share_group or self.config.up_topics == "shared":
                self.transport.subscribe(t.shared_up(self.config.share_group or "cotune-ingest"))
            elif self.config.up_topics == "all":
                self.transport.subscribe(t.up_wildcard)
            if not self.config.instance:
                self.transport.subscribe(t.status_wildcard)
        else:
            self.transport.subscribe(t.down(self.me))
            self.transport.subscribe(t.bcast)
        self.transport.connect(timeout)
        self._monitor = threading.Thread(target=self._watch_stalls, name=f"cotune-resume-{self.me}", daemon=True)
        self._monitor.start()
        return self

    def subscribe_up(self, clients) -> None:
        """Take the up topics of these clients (``up_topics="explicit"``: an ingest worker's
        shard). Works with any MQTT 3.1.1 broker, and keeps a client's chunks on one worker,
        which a round-robin ``$share`` subscription does not."""
        self.transport.subscribe_many([self.topics.up(c) for c in clients])

    def close(self) -> None:
        self._stop.set()
        presence = None if self.config.instance else (self.topics.status(self.me), _presence("offline"))
        self.transport.close(graceful_presence=presence)
        if self._monitor is not None:
            self._monitor.join(timeout=2)
        with self._lock:
            for inc in self._incoming.values():
                if not inc.done.is_set():
                    inc.assembly.abort()

    def __enter__(self) -> Endpoint:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sending --------------------------------------------------------------------------
    def _topic_to(self, recipient: str) -> str:
        if recipient == BROADCAST:
            return self.topics.bcast
        if self.role == "aggregator":
            self.directory.recipient(recipient)
            return self.topics.down(recipient)
        if recipient != self.directory.aggregator():
            raise BridgeError(f"clients talk only to the aggregator, not to {recipient!r}")
        return self.topics.up(self.me)

    def send(self, recipient: str, message: Message, *, round: int = 0, wait: float | None = None) -> str:
        """Encrypt, sign and publish one message. Raises OversizedMessage before publishing
        when it does not fit in one MQTT message (large payloads go through send_blob)."""
        topic = self._topic_to(recipient)
        frame = self.sealer.seal(recipient, message.TYPE, encode(message), round=round)
        self.transport.publish(topic, frame, wait=wait)
        return self.sealer.parse(frame)[0].mid

    def send_blob(self, recipient: str, source: bytes | str | os.PathLike, *, kind: str = "", round: int = 0,
                  timeout: float = 600.0) -> BlobRef:
        """Send a blob to one party, chunked; returns its reference (to embed in a message).
        The blob is kept for resends until acknowledged or expired."""
        blob = OutgoingBlob(source, self.config.chunk_size, kind)
        self._outgoing.put(blob)
        self._out_meta[blob.ref.sha256] = (None, recipient, round)
        self._publish_chunks(blob, recipient, range(blob.ref.total_chunks), None, round, timeout)
        return blob.ref

    def broadcast_blob(self, recipients: list[str], source: bytes | str | os.PathLike, *, kind: str = "",
                       round: int = 0, timeout: float = 600.0, push: bool = True,
                       stop: threading.Event | None = None) -> BlobRef:
        """Encrypt a blob once under a fresh content key, grant that key to each recipient
        (direct-encrypted on its own topic), then publish the chunks once on the broadcast topic.

        ``push=False`` grants the key and holds the blob without publishing it: for recipients
        that already hold this content (their cache); one that does not asks for the chunks
        when its fetch stalls (``stall_timeout_s``) and gets them on its own topic.

        ``stop``: an event that, once set, ends the grants and chunk publishing early (a
        service asked to shut down must not finish granting ten thousand keys first)."""
        if self.role != "aggregator":
            raise BridgeError("only the aggregator broadcasts")
        key = os.urandom(32)
        kid = self.sealer.add_content_key(key)
        grant = encode(KeyGrant(kid, base64.b64encode(key).decode(), round))
        for i, r in enumerate(recipients):
            if stop is not None and i % 256 == 0 and stop.is_set():
                break
            self.transport.publish(self._topic_to(r), self.sealer.seal(r, KeyGrant.TYPE, grant, round=round))
        blob = OutgoingBlob(source, self.config.chunk_size, kind)
        self._outgoing.put(blob)
        self._out_meta[blob.ref.sha256] = (kid, BROADCAST, round)
        self._share(blob, source)
        if push and not (stop is not None and stop.is_set()):
            self._publish_chunks(blob, BROADCAST, range(blob.ref.total_chunks), kid, round, timeout, stop)
        return blob.ref

    def _publish_chunks(self, blob: OutgoingBlob, recipient: str, indices, kid: str | None, round: int,
                        timeout: float, stop: threading.Event | None = None) -> None:
        topic = self._topic_to(recipient)
        ref = blob.ref
        window: deque = deque()
        deadline = time.monotonic() + timeout
        eph = X25519PrivateKey.generate() if kid is None else None  # one key agreement per transfer
        for i in indices:
            frame = self.sealer.seal(recipient, CHUNK, blob.chunk(i), round=round, kid=kid, blob=ref.sha256, chunk=i,
                                     total=ref.total_chunks, bsize=ref.size, csize=ref.chunk_size, ephemeral=eph)
            window.append(self.transport.publish(topic, frame))
            while len(window) >= self.config.publish_window:
                if acked(window[0]):
                    window.popleft()
                    continue
                if time.monotonic() > deadline:
                    raise TransportError(f"blob {ref.sha256[:12]}: broker did not acknowledge chunks within {timeout}s")
                if (stop is not None and stop.is_set()) or self._stop.is_set():
                    return
                time.sleep(0.001)

    # -- receiving ------------------------------------------------------------------------
    def recv(self, timeout: float | None = None) -> Inbound | None:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def recv_nowait(self) -> Inbound | None:
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def inbox_size(self) -> int:
        """Messages received and not yet taken with :meth:`recv` (approximate)."""
        return self._inbox.qsize()

    def fetch_blob(self, ref: BlobRef, sender: str, timeout: float = 600.0, *, round: int | None = None) -> BlobResult:
        """Wait for a blob (that may already be arriving, or may have arrived). Missing chunks
        are asked for automatically when the transfer stalls. Raises BlobIntegrityError or
        TransportError on failure. ``round``: the round the blob belongs to, used for the
        resume requests of a blob of which no chunk arrived yet (one offered, not pushed)."""
        handle = self.want_blob(ref, sender, round=round)
        if not handle.done.wait(timeout):
            inc = handle
            self.drop_blob(ref, sender)
            raise TransportError(f"blob {ref.sha256[:12]} from {sender} not complete after {timeout}s "
                                 f"({inc.assembly.received}/{inc.assembly.total} chunks)")
        return self.take_blob(ref, sender)

    def want_blob(self, ref: BlobRef, sender: str, *, round: int | None = None) -> _Incoming:
        """Start waiting for a blob without blocking: the returned handle's ``done`` event is
        set when it is complete (or failed); then :meth:`take_blob` hands it over. A wanted blob
        that stalls is asked for again (``stall_timeout_s``)."""
        inc = self._incoming_for(ref, sender, self.round_floor if round is None else round)
        inc.wanted = True
        return inc

    def blob_done(self, ref: BlobRef, sender: str) -> bool:
        """Whether a wanted blob is complete or failed (then :meth:`take_blob` returns or
        raises at once). A blob nobody wants reads as not done."""
        inc = self._incoming.get((sender, ref.sha256))
        return inc is not None and inc.done.is_set()

    def take_blob(self, ref: BlobRef, sender: str) -> BlobResult:
        """Hand over a completed blob (see :meth:`want_blob`); raises its transfer error."""
        key = (sender, ref.sha256)
        with self._lock:
            inc = self._incoming.pop(key, None)
            self._finished[key] = time.monotonic()
            while len(self._finished) > 4096:
                self._finished.popitem(last=False)
        if inc is None or not inc.done.is_set():
            raise TransportError(f"blob {ref.sha256[:12]} from {sender} is not complete")
        if inc.error is not None:
            raise inc.error
        return inc.result

    def drop_blob(self, ref: BlobRef, sender: str) -> None:
        """Give up on a transfer: its parts are deleted and later chunks start nothing."""
        key = (sender, ref.sha256)
        with self._lock:
            inc = self._incoming.pop(key, None)
            self._finished[key] = time.monotonic()
        if inc is not None:
            if inc.result is not None:
                inc.result.discard()
            else:
                inc.assembly.abort()

    def set_round_floor(self, round: int) -> None:
        """Messages for rounds below this are rejected as StaleRound from now on."""
        self.round_floor = max(self.round_floor, round)

    def wire_stats(self) -> dict:
        s = self.transport.stats
        return {"bytes_out": s.bytes_out, "bytes_in": s.bytes_in, "messages_out": s.messages_out,
                "messages_in": s.messages_in, "rejected": dict(self.rejected)}

    # -- internals (transport worker thread) ------------------------------------------------
    def _reject(self, exc: BridgeError, topic: str, sender: str | None = None) -> None:
        self.rejected[exc.code] += 1
        self.recent_errors.append(f"{exc.code}: {exc}")
        # one log line per (code, sender) per 10 s: a flood must not cost a line per frame
        key, now = (exc.code, sender), time.monotonic()
        if now - self._log_quiet.get(key, -1e9) >= 10.0:
            if len(self._log_quiet) > 10_000:
                self._log_quiet.clear()
            self._log_quiet[key] = now
            log.warning("%s rejected a frame on %s: %s: %s (more of the same within 10 s are counted, not "
                        "logged)", self.me, topic, exc.__class__.__name__, exc)
        if self.on_reject is not None:
            try:
                self.on_reject(exc, sender)
            except Exception:  # a hook must not take the receiver down
                log.exception("on_reject hook failed")

    def _on_frame(self, topic: str, payload: bytes) -> None:
        try:
            kind, party = self.topics.parse(topic)
        except ValueError:
            self._reject(MalformedMessage(f"unexpected topic {topic}"), topic)
            return
        if kind == "status":
            self._on_presence(party, payload)
            return
        sender = party if kind == "up" else None
        if sender is not None and self.config.rate_per_sender > 0 and not self._allow(sender):
            self._reject(RateLimited(f"{sender} sends faster than {self.config.rate_per_sender:g} frames/s"),
                         topic, sender)
            return
        try:
            parsed = self._precheck(sender, payload) if sender is not None else None
            opened = self.sealer.open(payload, parsed)
            h = opened.header
            self.bytes_from[h.sender] += len(payload)
            if kind == "up" and h.sender != party:
                raise TamperedMessage(f"frame on {party}'s up topic signed by {h.sender!r}")
            if h.round < self.round_floor and h.type not in ROUNDLESS_TYPES:
                raise StaleRound(f"{h.type} for round {h.round} from {h.sender}; current floor is {self.round_floor}")
            if h.type == CHUNK:
                self._on_chunk(h, opened.plaintext)
                return
            msg = decode(opened.plaintext)
            if msg.TYPE != h.type:
                raise MalformedMessage(f"envelope says {h.type!r} but body is {msg.TYPE!r}")
        except UnknownKey as exc:
            if self.role == "aggregator":  # clients never send under a content key
                self._reject(exc, topic, sender)
            else:
                self._park(exc.kid, topic, payload)
            return
        except BridgeError as exc:
            self._reject(exc, topic, sender)
            return
        self._dispatch(h, msg)

    def _dispatch(self, h: Header, msg: Message) -> None:
        if isinstance(msg, KeyGrant):
            try:
                kid = self.sealer.add_content_key(base64.b64decode(msg.key))
            except (BridgeError, ValueError) as exc:  # not a 32-byte key: a typed rejection
                self._reject(exc if isinstance(exc, BridgeError) else MalformedMessage(str(exc)), "grant", h.sender)
                return
            if kid != msg.key_id:
                self._reject(TamperedMessage("key grant id does not match its key"), "grant")
                return
            self._unpark(kid)
        elif isinstance(msg, ChunkRequest):
            self._resend(h.sender, msg, h.round)
        elif isinstance(msg, BlobAck):
            kid, recipient, _ = self._out_meta.get(msg.sha256, (None, "", 0))
            if recipient == h.sender:  # broadcast blobs stay for the other recipients
                self._outgoing.release(msg.sha256)
                self._out_meta.pop(msg.sha256, None)
        else:
            self._inbox.put(Inbound(h.sender, h, msg))

    def _on_presence(self, party: str, payload: bytes) -> None:
        try:
            state = json.loads(payload) if payload else {"state": "unknown"}
            if not isinstance(state, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            self._reject(MalformedMessage(f"bad presence payload from {party}"), "status")
            return
        self.presence[party] = state

    def _park(self, kid: str, topic: str, payload: bytes) -> None:
        with self._lock:
            if (self._parked_count >= self.config.parked_frames
                    or self._parked_bytes + len(payload) > self.config.max_parked_bytes):
                self._reject(ResourceLimit(f"parked-frame buffer full; dropped a frame for key {kid[:8]}"), topic)
                return
            self._parked.setdefault(kid, deque()).append((topic, payload))
            self._parked_count += 1
            self._parked_bytes += len(payload)

    def _unpark(self, kid: str) -> None:
        with self._lock:
            frames = self._parked.pop(kid, deque())
            self._parked_count -= len(frames)
            self._parked_bytes -= sum(len(p) for _, p in frames)
        for topic, payload in frames:
            self._on_frame(topic, payload)

    def _incoming_for(self, ref: BlobRef, sender: str, round: int) -> _Incoming:
        with self._lock:
            inc = self._incoming.get((sender, ref.sha256))
            if inc is None:
                inc = _Incoming(Assembly(ref, self.config.spill_dir, self.config.spill_threshold), sender, round)
                self._incoming[(sender, ref.sha256)] = inc
            return inc

    def _on_chunk(self, h: Header, data: bytes) -> None:
        ref = chunk_ref(h)
        if (h.sender, ref.sha256) not in self._incoming:
            self._admit(h, ref)  # before anything is held for it
        inc = self._incoming_for(ref, h.sender, h.round)
        if inc.done.is_set():
            return  # a late duplicate of a finished blob
        a = inc.assembly
        if (a.ref.size, a.ref.chunk_size, a.total) != (ref.size, ref.chunk_size, h.total):
            raise MalformedMessage(f"chunk of blob {ref.sha256[:12]} disagrees with its size/chunking")
        a.add(h.chunk, data)
        if a.complete:
            self._complete(inc)

    def _precheck(self, sender: str, payload: bytes) -> tuple:
        """Refusals the (not yet authenticated) header alone justifies, before any signature
        or decryption work, on the aggregator's up topics: a frame no honest client sends
        (content-key frames, a blob above the round's limit) costs a header parse, not a hash
        of its whole body and a signature check. Returns the parse, for ``Sealer.open``."""
        parsed = self.sealer.parse(payload)
        h = parsed[0]
        if h.kid is not None:
            raise MalformedMessage(f"{sender} sent a frame under a content key; clients never do")
        if h.type == CHUNK and h.blob and (sender, h.blob) not in self._incoming:
            limit = self._blob_limit(sender)
            if limit is not None and h.bsize > limit:
                raise ResourceLimit(f"blob {h.blob[:12]} from {sender} declares {h.bsize} bytes; "
                                    f"at most {limit} are expected")
        return parsed

    def _blob_limit(self, sender: str) -> int | None:
        """The largest blob accepted from ``sender``: ``blob_limit`` when set, else the config's."""
        return self.blob_limit(sender) if callable(self.blob_limit) else self.config.max_blob_bytes

    def _admit(self, h: Header, ref: BlobRef) -> None:
        """A new incoming transfer: its (authenticated) declared size and chunking must be
        plausible and within what this endpoint gives one sender."""
        limit = self._blob_limit(h.sender)
        if limit is not None and ref.size > limit:
            raise ResourceLimit(f"blob {ref.sha256[:12]} from {h.sender} declares {ref.size} bytes; "
                                f"at most {limit} are expected")
        if ref.chunk_size > self.config.max_message_bytes or (
                ref.size > ref.chunk_size and ref.chunk_size < 1024):
            raise MalformedMessage(f"blob {ref.sha256[:12]} declares an implausible chunk size {ref.chunk_size}")
        with self._lock:
            held = [i for (s, _), i in self._incoming.items() if s == h.sender]
            if len(held) >= self.config.max_blobs_per_sender:
                raise ResourceLimit(f"{h.sender} already has {len(held)} transfers open or not taken")
            in_memory = sum(i.assembly.received_bytes for i in self._incoming.values()
                            if i.assembly.in_memory and not i.done.is_set())
        if in_memory + min(ref.size, self.config.spill_threshold) > self.config.max_inflight_bytes:
            raise ResourceLimit(f"{in_memory} bytes of transfers in flight; blob from {h.sender} refused")

    def _allow(self, sender: str) -> bool:
        """Token bucket per sender: ``rate_per_sender`` frames/s, ``rate_burst`` at once."""
        now = time.monotonic()
        b = self._buckets.get(sender)
        if b is None:
            if len(self._buckets) > 100_000:  # bounded: forget the idle ones
                self._buckets.clear()
            b = self._buckets[sender] = [float(self.config.rate_burst), now]
        b[0] = min(float(self.config.rate_burst), b[0] + (now - b[1]) * self.config.rate_per_sender)
        b[1] = now
        if b[0] < 1.0:
            return False
        b[0] -= 1.0
        return True

    def _complete(self, inc: _Incoming) -> None:
        try:
            inc.result = inc.assembly.finish()
        except BlobIntegrityError as exc:
            inc.error = exc
            self._reject(exc, "blob")
        inc.done.set()
        if inc.result is not None:
            try:
                self.send(inc.sender, BlobAck(inc.assembly.ref.sha256), round=inc.round)
            except BridgeError as exc:
                log.info("could not acknowledge blob %s: %s", inc.assembly.ref.sha256[:12], exc)

    def _share(self, blob: OutgoingBlob, source) -> None:
        d = self.config.shared_blob_dir
        if d is None or not isinstance(source, (bytes, bytearray, memoryview)):
            return
        path = Path(d) / blob.ref.sha256
        if path.exists():
            os.utime(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(source)
        os.replace(tmp, path)
        # blobs of past rounds go: resends are asked for within a round
        cutoff = time.time() - 6 * 3600
        for old in Path(d).iterdir():
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except OSError:
                pass

    def _shared_blob(self, sha256: str) -> OutgoingBlob | None:
        d = self.config.shared_blob_dir
        if d is None or not all(c in "0123456789abcdef" for c in sha256) or len(sha256) != 64:
            return None
        path = Path(d) / sha256
        if not path.is_file():
            return None
        return OutgoingBlob(path, self.config.chunk_size, sha256=sha256)

    def _resend(self, requester: str, req: ChunkRequest, asked_in: int = 0) -> None:
        blob = self._outgoing.get(req.sha256)
        kid, _, round = self._out_meta.get(req.sha256, (None, "", asked_in))
        if blob is None:
            # another process of this party sent it (an ingest worker answers for the service):
            # resent direct-encrypted to the requester, which does not care how chunks travel
            blob, kid, round = self._shared_blob(req.sha256), None, max(asked_in, round)
        if blob is None:
            # answered in the round the request came from: a reply in round 0 would be dropped
            # as stale by a receiver that has moved on
            self.send(requester, ErrorReport("unknown_blob", "blob no longer held; request it again", req.sha256),
                      round=max(asked_in, round))
            return
        indices = from_ranges(req.missing, blob.ref.total_chunks)
        log.info("%s resends %d chunks of %s to %s", self.me, len(indices), req.sha256[:12], requester)
        # resent on the requester's own topic; broadcast blobs keep their content key
        self._publish_chunks(blob, requester, indices, kid, round, timeout=600.0)

    def _watch_stalls(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            with self._lock:
                self._drop_orphans(now)
                # a blob handed over recently may see late duplicates of its chunks: they start a
                # harmless new assembly, but only a fetch_blob() for it justifies asking for more
                stalled = [inc for inc in self._incoming.values()
                           if not inc.done.is_set() and now - inc.assembly.last_progress > self.config.stall_timeout_s
                           and (inc.wanted or (inc.sender, inc.assembly.ref.sha256) not in self._finished)]
            for inc in stalled:
                if not self.transport.connected:
                    continue  # ask once we are back; the broker may also still deliver
                inc.requests += 1
                inc.assembly.last_progress = now
                if inc.requests > self.config.max_resume_requests:
                    inc.error = TransportError(f"blob {inc.assembly.ref.sha256[:12]}: gave up after "
                                               f"{self.config.max_resume_requests} resume requests")
                    inc.assembly.abort()
                    inc.done.set()
                    continue
                missing = inc.assembly.missing()
                log.info("%s asks %s for %d missing chunks of %s", self.me, inc.sender, len(missing),
                         inc.assembly.ref.sha256[:12])
                try:
                    self.send(inc.sender, ChunkRequest(inc.assembly.ref.sha256, to_ranges(missing)), round=inc.round)
                except BridgeError as exc:
                    log.warning("resume request failed: %s", exc)


    def _drop_orphans(self, now: float) -> None:
        for key, inc in list(self._incoming.items()):
            if not inc.wanted and now - inc.assembly.last_progress > self.config.orphan_ttl_s:
                log.info("%s drops unfetched blob %s from %s", self.me, key[1][:12], key[0])
                if inc.result is not None:
                    inc.result.discard()
                else:
                    inc.assembly.abort()
                del self._incoming[key]


def chunk_ref(h: Header) -> BlobRef:
    """The blob a chunk's (authenticated) header names, or MalformedMessage."""
    if not h.blob or h.csize <= 0:
        raise MalformedMessage("chunk without blob hash or chunk size")
    try:
        return BlobRef(h.blob, h.bsize, h.csize)
    except ValueError as exc:
        raise MalformedMessage(f"bad blob reference in chunk header: {exc}") from None


def _presence(state: str) -> bytes:
    return json.dumps({"state": state, "ts": round(time.time(), 3)}).encode()


def broker_config_for(pc, *, host: str | None = None, port: int | None = None, tls: bool | None = None,
                      auth: str = "mtls", protocol: str = "auto", instance: str | None = None) -> BrokerConfig:
    """The MQTT connection settings of a provisioned party.

    ``auth="mtls"``: the party's client certificate (the default); ``auth="password"``: the
    password listener (server-authenticated TLS plus the party's broker password, for devices
    that cannot hold a client certificate); ``tls=False``: plain TCP, for the embedded broker.
    The envelope protects payloads end to end in every case. ``instance``: a second process of
    the aggregator (``ingest-<k>``) connects with its own certificate from ``instances/``: the
    broker makes the certificate identity the client id, so processes must not share one."""
    if auth not in ("mtls", "password"):
        raise ConfigurationError(f"auth must be 'mtls' or 'password', got {auth!r}")
    use_tls = pc.tls if tls is None else tls
    if auth == "password":
        if not pc.password or not pc.password_port:
            raise BridgeError(f"{pc.party_id}: this federation has no password listener "
                              "(provision with a password port)")
        return BrokerConfig(host=host or pc.host, port=port or pc.password_port, protocol=protocol,
                            username=pc.party_id, password=pc.password,
                            tls=TLSConfig(str(pc.ca_cert)) if use_tls else None)
    cert, key = pc.client_cert, pc.client_key
    if instance is not None and use_tls:
        d = Path(pc.path).parent / "instances"
        cert, key = d / f"{instance}.crt", d / f"{instance}.key"
        if not cert.is_file() or not key.is_file():
            raise BridgeError(f"{pc.party_id}: no broker identity for {instance} in {d}; provision the "
                              "federation with aggregator_instances (cotune provision --ingest-workers N)")
    return BrokerConfig(
        host=host or pc.host, port=port or pc.port, protocol=protocol,
        tls=TLSConfig(str(pc.ca_cert), str(cert), str(key)) if use_tls else None)


def load_endpoint(party_config: str | os.PathLike, config: EndpointConfig | None = None, **broker_overrides) -> Endpoint:
    """An endpoint from a provisioned party config file (``cotune provision``)."""
    from .provision import (
        load_party_config,  # provisioning pulls in x509; keep it off the hot import path
    )

    pc = load_party_config(Path(party_config))
    cfg = config or EndpointConfig(max_message_bytes=pc.max_packet_bytes)
    return Endpoint(pc.identity, pc.directory, broker_config_for(pc, **broker_overrides), cfg)
