"""Virtual devices: thousands of real wire parties per process, without training.

Each :class:`VirtualDevice` is a provisioned party with its own identity, its own MQTT
connection (own client id, own client certificate under mTLS) and its own
:class:`bridge.envelope.Sealer`. It answers the aggregator exactly as an edge device does:
KeyGrant -> content key; broadcast chunks -> decrypted and verified with that key; Task ->
fetch the listed blobs (asking for missing chunks when a transfer stalls) -> an Update of the
spec the global blob implies, inline when it fits in one message, else as a chunked blob
(chunks, then the Update with ``blobs={"update": ref}``), as ``bridge.endpoint.Endpoint``
sends it; ChunkRequest -> resend; BlobAck -> release; ErrorReport -> recorded; Note "done" ->
fetch the final blobs and report back.

The update is random (small values) but deterministic in (seed, party, round): see
:func:`fake_update`, so a test can recompute what every device sent.

Lightweight: no thread per device. A worker process (:func:`worker_main`) drives all its
devices with paho-mqtt 2's external-loop API (``loop_read`` / ``loop_write`` / ``loop_misc``)
from one selector; identical broadcast blobs are assembled once per worker (content-addressed,
verified by SHA-256) while every device still decrypts and authenticates its own frames.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import os
import resource
import selectors
import ssl
import time
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from bridge.blobs import DEFAULT_CHUNK_SIZE, from_ranges, to_ranges
from bridge.codec import decode, encode
from bridge.endpoint import CHUNK
from bridge.envelope import ReplayGuard, Sealer, UnknownKey, fits_one_message
from bridge.errors import BridgeError, MalformedMessage, TamperedMessage
from bridge.keys import Directory, Identity, read_json
from bridge.messages import (
    BlobAck,
    BlobRef,
    ChunkRequest,
    ErrorReport,
    KeyGrant,
    Note,
    SecAggNeighbours,
    SecAggShares,
    SecAggUnmask,
    Task,
    Update,
)
from bridge.provision import load_party_config
from bridge.topics import Topics
from edge_sdk.secure_upload import open_session

#: numeric libraries: one thread per process (set before numpy/torch start their pools)
THREAD_ENV = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}


def raise_nofile_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit; returns the new soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


# ---------------------------------------------------------------------------------------------
# the update a device sends


def _seed_int(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def num_examples_for(party: str, round: int, seed: int = 0) -> int:
    """The (positive) number of examples a virtual device reports: 1..100, deterministic."""
    return 1 + _seed_int("n", seed, party, round) % 100


def fake_update(spec: dict[str, tuple[tuple[int, ...], str]], party: str, round: int,
                seed: int = 0, scale: float = 0.01) -> dict[str, np.ndarray]:
    """A random adapter of ``spec`` ({name: (shape, numpy dtype name)}): normal(0, scale),
    deterministic in (seed, party, round). bfloat16 tensors (carried as uint16) get the bits
    of the float32 values."""
    rng = np.random.default_rng(_seed_int("u", seed, party, round))
    out = {}
    for name in sorted(spec):
        shape, dtype = spec[name]
        vals = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        if dtype == "uint16":  # bfloat16 bits
            out[name] = (vals.view(np.uint32) >> 16).astype(np.uint16)
        else:
            out[name] = vals.astype(dtype)
    return out


def spec_of(state: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {n: (tuple(int(d) for d in a.shape), a.dtype.name) for n, a in state.items()}


def pack(tensors: dict[str, np.ndarray]) -> bytes:
    """Safetensors bytes, the payload format of update blobs (``algorithms.base.pack_state``)."""
    return st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


# ---------------------------------------------------------------------------------------------
# configuration handed to a worker process


@dataclass
class WorkerConfig:
    federation_dir: str
    parties: list[str]
    host: str
    port: int
    auth: str = "mtls"  # "mtls": per-device certificate; "password": shared CA context
    protocol: str = "5"  # "5" | "3.1.1"
    tls: bool | None = None  # None: as provisioned; False: plain TCP (the envelope still protects)
    keepalive: int = 60
    seed: int = 0
    scale: float = 0.01
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_message_bytes: int = 1_048_576
    stall_timeout_s: float = 3.0
    max_uploads: int = 32  # chunked uploads in flight per worker (bounds memory for big updates)
    record_path: str | None = None  # JSONL: one line per update sent
    blobs_dir: str | None = None  # keep every blob received (by hash), for checks
    index: int = 0
    answer_delay_s: float = 0.0  # answer a Task this long after it could be answered
    final_delay_s: float = 0.0  # report on the final model this long after it could
    #: secure rounds: party -> the step at which it falls silent ("keys": trains but never
    #: advertises; "shares": advertises only; "masked": shares its keys but uploads nothing;
    #: "reveal": uploads its masked input, then never reveals), to measure dropout recovery
    secagg_drop: dict = field(default_factory=dict)


@dataclass
class WorkerStats:
    index: int = 0
    devices: int = 0
    connected: int = 0
    connects: int = 0
    disconnects: int = 0
    drops: int = 0  # disconnects this side did not ask for (broker closed, network, takeover)
    tasks: int = 0
    updates_sent: int = 0
    update_bytes: int = 0
    inline: int = 0
    blobs: int = 0
    chunk_requests_sent: int = 0
    chunk_requests_answered: int = 0
    finals: int = 0
    late_tasks: int = 0
    errors: dict = field(default_factory=dict)  # ErrorReport code -> count
    rejected: dict = field(default_factory=dict)  # frames this side refused, by code
    max_rss_mb: float = 0.0
    cpu_s: float = 0.0
    sent_by_round: dict = field(default_factory=dict)
    #: MQTT payload bytes published / received by the devices (envelopes included)
    bytes_out: int = 0
    bytes_in: int = 0


# ---------------------------------------------------------------------------------------------
# blobs shared by the devices of one worker


class SharedBlob:
    """One content-addressed blob being assembled once for every device of a worker. Each
    device still decrypts and authenticates every chunk it receives; the bytes are identical
    (same hash), so they are stored once."""

    def __init__(self, ref: BlobRef):
        self.ref = ref
        self.buf = bytearray(ref.size)
        self.filled: set[int] = set()
        self.data: bytes | None = None
        self.bad = False
        self.spec: dict | None = None

    def add(self, index: int, data: bytes) -> None:
        if self.data is None and index not in self.filled:
            start = index * self.ref.chunk_size
            self.buf[start:start + len(data)] = data
            self.filled.add(index)
            if len(self.filled) == self.ref.total_chunks:
                if hashlib.sha256(self.buf).hexdigest() == self.ref.sha256:
                    self.data = bytes(self.buf)
                else:
                    self.bad = True
                    self.filled.clear()
                self.buf = bytearray()


class Blobs:
    def __init__(self, keep: int = 8):
        self.keep = keep
        self._blobs: OrderedDict[str, SharedBlob] = OrderedDict()

    def get(self, ref: BlobRef) -> SharedBlob:
        b = self._blobs.get(ref.sha256)
        if b is None or b.bad:
            b = self._blobs[ref.sha256] = SharedBlob(ref)
            while len(self._blobs) > self.keep:
                self._blobs.popitem(last=False)
        self._blobs.move_to_end(ref.sha256)
        return b

    def __contains__(self, sha: str) -> bool:
        return sha in self._blobs

    def complete(self, sha: str) -> SharedBlob | None:
        b = self._blobs.get(sha)
        return b if b is not None and b.data is not None else None


# ---------------------------------------------------------------------------------------------
# one device


@dataclass
class _Job:
    """Something waiting for downloads: a Task, or the final Note."""

    kind: str  # "task" | "final"
    round: int
    refs: dict  # name -> BlobRef
    message: object
    t0: float


@dataclass
class _Upload:
    data: bytes
    ref: BlobRef
    round: int


def _presence(state: str) -> bytes:
    return json.dumps({"state": state, "ts": round(time.time(), 3)}).encode()


class VirtualDevice:
    __slots__ = ("worker", "party", "sealer", "client", "aggregator", "down", "up", "status",
                 "connected", "next_retry", "backoff", "parked", "have", "progress", "requests",
                 "jobs", "uploads", "sock", "started", "pc", "secure")

    def __init__(self, worker: Worker, party: str, identity: Identity, directory: Directory,
                 client: mqtt.Client, pc=None):
        self.worker, self.party, self.client = worker, party, client
        self.pc = pc  # the provisioned party config (certificate and CA for secure rounds)
        self.secure = None  # (session, Update without tensors) of the open secure round
        self.sealer = Sealer(identity, directory, max_message_bytes=worker.cfg.max_message_bytes,
                             replay=ReplayGuard())
        t = worker.topics
        self.aggregator = directory.aggregator()
        self.down, self.up, self.status = t.down(party), t.up(party), t.status(party)
        self.connected = False
        self.next_retry = 0.0
        self.backoff = 1.0
        self.parked: deque = deque(maxlen=16)  # frames waiting for their content key
        self.have: dict[str, set[int] | None] = {}  # blob sha -> chunks received (None: complete)
        self.progress: dict[str, float] = {}  # blob sha -> last progress (monotonic)
        self.requests: Counter = Counter()
        self.jobs: list[_Job] = []
        self.uploads: dict[str, _Upload] = {}
        self.sock = None
        self.started = False

    # -- sending ------------------------------------------------------------------------------
    def send(self, message, round: int = 0) -> None:
        frame = self.sealer.seal(self.aggregator, message.TYPE, encode(message), round=round)
        self.publish(frame)

    def publish(self, frame: bytes) -> None:
        self.worker.stats.bytes_out += len(frame)
        info = self.client.publish(self.up, frame, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.worker.count_reject(f"publish_{info.rc}")

    def publish_chunks(self, up: _Upload, indices) -> None:
        ref = up.ref
        eph = X25519PrivateKey.generate()  # one key agreement per transfer, as Endpoint does
        for i in indices:
            start = i * ref.chunk_size
            frame = self.sealer.seal(self.aggregator, CHUNK, up.data[start:start + ref.chunk_size],
                                     round=up.round, blob=ref.sha256, chunk=i, total=ref.total_chunks,
                                     bsize=ref.size, csize=ref.chunk_size, ephemeral=eph)
            self.publish(frame)

    # -- receiving ----------------------------------------------------------------------------
    def on_frame(self, topic: str, payload: bytes) -> None:
        if topic != self.down and topic != self.worker.topics.bcast:
            self.worker.count_reject("topic")
            return
        try:
            opened = self.sealer.open(payload)
            h = opened.header
            if h.type == CHUNK:
                self.on_chunk(h, opened.plaintext)
                return
            msg = decode(opened.plaintext)
            if msg.TYPE != h.type:
                raise MalformedMessage(f"envelope says {h.type!r} but body is {msg.TYPE!r}")
        except UnknownKey:
            self.parked.append((topic, payload))
            return
        except BridgeError as exc:
            self.worker.count_reject(exc.code)
            return
        self.dispatch(msg, h.round)

    def dispatch(self, msg, round: int) -> None:
        w = self.worker
        if isinstance(msg, KeyGrant):
            kid = self.sealer.add_content_key(base64.b64decode(msg.key))
            if kid != msg.key_id:
                w.count_reject(TamperedMessage.code)
                return
            frames = list(self.parked)
            self.parked.clear()
            for topic, payload in frames:
                self.on_frame(topic, payload)
        elif isinstance(msg, Task):
            w.stats.tasks += 1
            if msg.deadline and time.time() > msg.deadline:
                w.stats.late_tasks += 1
                return
            for sha in [s for s, u in self.uploads.items() if u.round < msg.round]:
                del self.uploads[sha]  # a new round: the aggregator no longer asks for those
            for sha in [s for s in self.have if s not in w.blobs]:
                del self.have[sha]  # blobs of past rounds the worker no longer holds
            refs = {name: msg.blob(name) for name in msg.downloads}
            self.jobs.append(_Job("task", msg.round, refs, msg, time.monotonic()))
            self.try_jobs()
        elif isinstance(msg, ChunkRequest):
            up = self.uploads.get(msg.sha256)
            if up is None:
                self.send(ErrorReport("unknown_blob", "blob no longer held; request it again", msg.sha256),
                          round=round)
                return
            w.stats.chunk_requests_answered += 1
            self.publish_chunks(up, from_ranges(msg.missing, up.ref.total_chunks))
        elif isinstance(msg, BlobAck):
            if self.uploads.pop(msg.sha256, None) is not None:
                w.upload_done(self, msg.sha256)
        elif isinstance(msg, ErrorReport):
            w.stats.errors[msg.code] = w.stats.errors.get(msg.code, 0) + 1
        elif isinstance(msg, (SecAggNeighbours, SecAggShares, SecAggUnmask)):
            self.on_secagg(msg)
        elif isinstance(msg, Note) and msg.kind == "secagg_abort":
            w.stats.errors["secagg_abort"] = w.stats.errors.get("secagg_abort", 0) + 1
            self.secure = None
        elif isinstance(msg, Note) and msg.kind == "done":
            refs = {n: BlobRef.from_json(r) for n, r in (msg.data.get("downloads") or {}).items()}
            self.jobs.append(_Job("final", msg.round, refs, msg, time.monotonic()))
            self.try_jobs()

    def on_chunk(self, h, data: bytes) -> None:
        if not h.blob or h.csize <= 0:
            raise MalformedMessage("chunk without blob hash or chunk size")
        ref = BlobRef(h.blob, h.bsize, h.csize)
        w = self.worker
        if h.blob in self.have and self.have[h.blob] is None:
            return  # a late duplicate of a blob this device completed
        shared = w.blobs.get(ref)
        if (shared.ref.size, shared.ref.chunk_size) != (ref.size, ref.chunk_size) or h.total != ref.total_chunks:
            raise MalformedMessage(f"chunk of blob {ref.sha256[:12]} disagrees with its size/chunking")
        got = self.have.setdefault(h.blob, set())
        got.add(h.chunk)
        self.progress[h.blob] = time.monotonic()
        shared.add(h.chunk, data)
        if len(got) == ref.total_chunks:
            if shared.bad:
                w.count_reject("blob_integrity")
                self.have.pop(h.blob, None)
                return
            self.have[h.blob] = None  # complete
            w.keep_blob(shared)
            self.progress.pop(h.blob, None)
            self.requests.pop(h.blob, None)
            try:
                self.send(BlobAck(h.blob), round=h.round)
            except BridgeError as exc:
                w.count_reject(exc.code)
            self.try_jobs()

    def holds(self, sha: str) -> bool:
        return sha in self.have and self.have[sha] is None and self.worker.blobs.complete(sha) is not None

    def try_jobs(self) -> None:
        if not self.jobs:
            return
        waiting = []
        for job in self.jobs:
            if all(self.holds(r.sha256) for r in job.refs.values()):
                cfg = self.worker.cfg
                delay = cfg.answer_delay_s if job.kind == "task" else cfg.final_delay_s
                if delay > 0:
                    self.worker.later(delay, self, job)
                else:
                    self.run_job(job)
            else:
                for r in job.refs.values():
                    if not self.holds(r.sha256):
                        self.progress.setdefault(r.sha256, time.monotonic())
                waiting.append(job)
        self.jobs = waiting

    def run_job(self, job: _Job) -> None:
        w = self.worker
        if job.kind == "final":
            w.stats.finals += 1
            w.record({"party": self.party, "round": job.round, "final": True,
                      "global_sha": {n: r.sha256 for n, r in job.refs.items()}})
            self.send(Note("final", {"simulated": True}, round=job.round), round=job.round)
            return
        task: Task = job.message
        ref = task.blob("global") if "global" in task.downloads else next(iter(job.refs.values()), None)
        if ref is None:
            self.send(ErrorReport("does_not_fit", "virtual device: task without a global blob",
                                  round=task.round), round=task.round)
            return
        spec = w.spec_for(ref.sha256)
        secure = "secure_aggregation" in task.config
        size = w.payload_size(ref.sha256) * (2 if secure else 1)  # masked: 4 bytes a value
        inline = fits_one_message(size, w.cfg.max_message_bytes)
        if not inline and not secure and w.uploads_in_flight >= w.cfg.max_uploads:
            w.deferred.append((self, job))  # sent when an upload slot frees
            return
        tensors = fake_update(spec, self.party, task.round, w.cfg.seed, w.cfg.scale)
        n = num_examples_for(self.party, task.round, w.cfg.seed)
        metrics = {"simulated": True, "seconds": round(time.monotonic() - job.t0, 4)}
        if secure:
            self.start_secure(task, ref, tensors, n, metrics)
            return
        self.upload(Update(round=task.round, algorithm=task.algorithm, num_examples=n, metrics=metrics), tensors,
                    ref.sha256)

    def upload(self, update: Update, tensors: dict[str, np.ndarray], global_sha: str) -> None:
        """Send ``update`` with ``tensors``: inline when it fits one message, else as a blob."""
        w = self.worker
        payload = pack(tensors)
        digest = hashlib.sha256(payload).hexdigest()
        inline = fits_one_message(len(payload), w.cfg.max_message_bytes)
        t_send = time.time()
        if inline:
            update = Update(round=update.round, algorithm=update.algorithm, num_examples=update.num_examples,
                            metrics=update.metrics, tensors=tensors)
            w.stats.inline += 1
        else:
            up = _Upload(payload, BlobRef(digest, len(payload), w.cfg.chunk_size, "update"), update.round)
            self.uploads[digest] = up
            self.publish_chunks(up, range(up.ref.total_chunks))
            update = Update(round=update.round, algorithm=update.algorithm, num_examples=update.num_examples,
                            metrics=update.metrics, blobs={"update": up.ref.to_json()})
            w.stats.blobs += 1
            w.upload_started(self, digest)
        self.send(update, round=update.round)
        w.stats.updates_sent += 1
        w.stats.update_bytes += len(payload)
        w.stats.sent_by_round[update.round] = w.stats.sent_by_round.get(update.round, 0) + 1
        w.record({"party": self.party, "round": update.round, "num_examples": update.num_examples,
                  "sha256": digest, "global_sha": global_sha, "bytes": len(payload), "inline": inline,
                  "t_send": t_send, "t_done": time.time()})

    # -- secure rounds (aggregator/secure_round.py) ----------------------------------------------
    def start_secure(self, task: Task, ref: BlobRef, tensors: dict, n: int, metrics: dict) -> None:
        w = self.worker
        if w.cfg.secagg_drop.get(self.party) == "keys":
            return
        try:
            session, info = open_session(self.pc, task.config, task.round, tensors, w.reference_for(ref.sha256), n)
            keys = session.start()
        except BridgeError as exc:
            w.stats.errors[exc.code] = w.stats.errors.get(exc.code, 0) + 1
            self.send(ErrorReport("secagg", str(exc)[:300], round=task.round), round=task.round)
            return
        self.secure = (session, Update(round=task.round, algorithm=task.algorithm, num_examples=n,
                                       metrics={**metrics, **info}), ref.sha256)
        self.send(keys, round=task.round)

    def on_secagg(self, msg) -> None:
        w = self.worker
        if self.secure is None or self.secure[0].round != msg.round:
            w.count_reject("secagg_out_of_round")
            return
        session, update, global_sha = self.secure
        drop = w.cfg.secagg_drop.get(self.party)
        try:
            if isinstance(msg, SecAggNeighbours):
                if drop == "shares":
                    return
                self.send(session.on_neighbours(msg), round=msg.round)
            elif isinstance(msg, SecAggShares):
                if drop == "masked":
                    return
                self.upload(update, {"masked": session.on_shares(msg)}, global_sha)
            else:
                self.secure = None
                if drop == "reveal":
                    return
                self.send(session.on_unmask(msg), round=msg.round)
        except BridgeError as exc:
            w.stats.errors[exc.code] = w.stats.errors.get(exc.code, 0) + 1
            self.secure = None
            self.send(ErrorReport("secagg", str(exc)[:300], round=msg.round), round=msg.round)

    def check_stalls(self, now: float) -> None:
        """Ask the aggregator for the chunks of a wanted blob that stopped arriving."""
        w = self.worker
        for job in self.jobs:
            for r in job.refs.values():
                sha = r.sha256
                if self.holds(sha) or now - self.progress.get(sha, now) <= w.cfg.stall_timeout_s:
                    continue
                if self.requests[sha] >= 50:
                    continue
                got = self.have.get(sha) or set()
                missing = [i for i in range(r.total_chunks) if i not in got]
                if not missing:
                    continue
                self.requests[sha] += 1
                self.progress[sha] = now
                w.stats.chunk_requests_sent += 1
                self.send(ChunkRequest(sha, to_ranges(missing)), round=job.round)


# ---------------------------------------------------------------------------------------------
# paho callbacks (userdata = the device), shared by every client of a worker


def _on_connect(client, dev: VirtualDevice, flags, reason_code, properties) -> None:
    if reason_code.is_failure:
        dev.worker.count_reject(f"connack_{reason_code}")
        return
    dev.connected = True
    dev.backoff = 1.0
    w = dev.worker
    w.stats.connects += 1
    w.stats.connected += 1
    client.subscribe([(dev.down, 1), (w.topics.bcast, 1)])
    client.publish(dev.status, _presence("online"), qos=1, retain=True)


def _on_disconnect(client, dev: VirtualDevice, flags, reason_code, properties) -> None:
    w = dev.worker
    if dev.connected:
        w.stats.connected -= 1
    dev.connected = False
    w.stats.disconnects += 1
    if not w.stopping:
        w.stats.drops += 1
        dev.next_retry = time.monotonic() + dev.backoff
        dev.backoff = min(30.0, dev.backoff * 2)


def _on_message(client, dev: VirtualDevice, msg) -> None:
    dev.worker.stats.bytes_in += len(msg.payload)
    dev.on_frame(msg.topic, msg.payload)


def _on_socket_open(client, dev: VirtualDevice, sock) -> None:
    dev.sock = sock
    dev.worker.sel.register(sock, selectors.EVENT_READ, dev)


def _on_socket_close(client, dev: VirtualDevice, sock) -> None:
    dev.sock = None
    try:
        dev.worker.sel.unregister(sock)
    except (KeyError, ValueError):
        pass


def _on_register_write(client, dev: VirtualDevice, sock) -> None:
    try:
        dev.worker.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, dev)
    except (KeyError, ValueError):
        pass


def _on_unregister_write(client, dev: VirtualDevice, sock) -> None:
    try:
        dev.worker.sel.modify(sock, selectors.EVENT_READ, dev)
    except (KeyError, ValueError):
        pass


# ---------------------------------------------------------------------------------------------
# a worker process


class Worker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        root = Path(cfg.federation_dir)
        self.federation = read_json(root / "federation.json")["federation"]
        self.topics = Topics(self.federation)
        self.sel = selectors.DefaultSelector()
        self.blobs = Blobs()
        self.stats = WorkerStats(index=cfg.index, devices=len(cfg.parties))
        self.stopping = False
        self._in_flight: dict[tuple[str, str], float] = {}
        self.deferred: deque = deque()
        self.delayed: list = []  # (due, seq, device, job): answers held back (answer_delay_s)
        self._specs: dict[str, dict] = {}
        self._sizes: dict[str, int] = {}
        self._record = open(cfg.record_path, "a", encoding="utf-8") if cfg.record_path else None
        self._rejected: Counter = Counter()
        self._shared_ctx: ssl.SSLContext | None = None
        self.devices: list[VirtualDevice] = []
        self._root = root

    # -- bookkeeping --------------------------------------------------------------------------
    def count_reject(self, code: str) -> None:
        self._rejected[code] += 1

    def record(self, row: dict) -> None:
        if self._record is not None:
            self._record.write(json.dumps(row) + "\n")

    def keep_blob(self, blob: SharedBlob) -> None:
        if self.cfg.blobs_dir and blob.data is not None:
            path = Path(self.cfg.blobs_dir) / f"{blob.ref.sha256}.safetensors"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_bytes(blob.data)
                os.replace(tmp, path)

    def upload_started(self, dev: VirtualDevice, digest: str) -> None:
        self._in_flight[(dev.party, digest)] = time.monotonic()

    def upload_done(self, dev: VirtualDevice, digest: str) -> None:
        self._in_flight.pop((dev.party, digest), None)
        self._run_deferred()

    def later(self, delay_s: float, dev: VirtualDevice, job: _Job) -> None:
        heapq.heappush(self.delayed, (time.monotonic() + delay_s, id(job), dev, job))

    def run_due(self) -> float:
        """Run the held-back answers that are due; returns seconds until the next one (1.0 if
        none)."""
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            _, _, dev, job = heapq.heappop(self.delayed)
            dev.run_job(job)
        return self.delayed[0][0] - now if self.delayed else 1.0

    @property
    def uploads_in_flight(self) -> int:
        return len(self._in_flight)

    def _run_deferred(self) -> None:
        # an upload never acknowledged (lost ack, aggregator gone) frees its slot after a while
        now = time.monotonic()
        for key in [k for k, t in self._in_flight.items() if now - t > 60]:
            del self._in_flight[key]
        while self.deferred and self.uploads_in_flight < self.cfg.max_uploads:
            dev, job = self.deferred.popleft()
            dev.run_job(job)

    def payload_size(self, sha: str) -> int:
        """Bytes of an update of the spec of blob ``sha`` (same names and shapes: same size)."""
        size = self._sizes.get(sha)
        if size is None:
            spec = self.spec_for(sha)
            size = self._sizes[sha] = len(pack({n: np.zeros(s, d) for n, (s, d) in spec.items()}))
        return size

    def reference_for(self, sha: str) -> dict[str, np.ndarray]:
        """The tensors of the global blob ``sha`` (what a secure update is a delta to)."""
        return st_load(self.blobs.complete(sha).data)

    def spec_for(self, sha: str) -> dict:
        spec = self._specs.get(sha)
        if spec is None:
            spec = self._specs[sha] = spec_of(st_load(self.blobs.complete(sha).data))
            while len(self._specs) > 8:
                self._specs.pop(next(iter(self._specs)))
        return spec

    def snapshot(self) -> dict:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.stats.max_rss_mb = ru.ru_maxrss / 1024
        self.stats.cpu_s = ru.ru_utime + ru.ru_stime
        self.stats.rejected = dict(self._rejected)
        return asdict(self.stats)

    # -- devices ------------------------------------------------------------------------------
    def _tls_context(self, pc) -> ssl.SSLContext:
        if self.cfg.auth == "password":  # server-authenticated TLS: one context for all
            if self._shared_ctx is None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_verify_locations(str(pc.ca_cert))
                self._shared_ctx = ctx
            return self._shared_ctx
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # mTLS: the device's own certificate
        ctx.load_verify_locations(str(pc.ca_cert))
        ctx.load_cert_chain(str(pc.client_cert), str(pc.client_key))
        return ctx

    def make_device(self, party: str) -> VirtualDevice:
        """A device from its provisioned party directory (``load_party_config``: identity,
        certificate, the aggregator's certified keys)."""
        pc = load_party_config(self._root / "parties" / party)
        v5 = self.cfg.protocol == "5"
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=f"{pc.federation}-{party}",
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else False)
        dev = VirtualDevice(self, party, pc.identity, pc.directory, client, pc)
        client.user_data_set(dev)
        client.max_inflight_messages_set(64)
        if pc.tls and self.cfg.tls is not False:
            client.tls_set_context(self._tls_context(pc))
        if self.cfg.auth == "password":
            client.username_pw_set(party, pc.password)
        client.will_set(dev.status, _presence("offline"), qos=1, retain=True)
        client.on_connect = _on_connect
        client.on_disconnect = _on_disconnect
        client.on_message = _on_message
        client.on_socket_open = _on_socket_open
        client.on_socket_close = _on_socket_close
        client.on_socket_register_write = _on_register_write
        client.on_socket_unregister_write = _on_unregister_write
        return dev

    def connect(self, dev: VirtualDevice) -> bool:
        kwargs = {}
        if self.cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 7 * 24 * 3600
            kwargs = {"clean_start": False, "properties": props}
        try:
            if dev.started:  # connected before: same settings
                dev.client.reconnect()
            else:
                dev.started = True
                dev.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive, **kwargs)
            return True
        except (OSError, ssl.SSLError) as exc:
            self.count_reject(f"connect_{exc.__class__.__name__}")
            dev.next_retry = time.monotonic() + dev.backoff
            dev.backoff = min(30.0, dev.backoff * 2)
            return False

    # -- the loop -----------------------------------------------------------------------------
    def poll(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            dev: VirtualDevice = key.data
            if not isinstance(dev, VirtualDevice):
                dev()  # the control channel
                continue
            client = dev.client
            if mask & selectors.EVENT_READ:
                client.loop_read()
                sock = dev.sock
                # TLS keeps decrypted records the selector cannot see: drain them
                while sock is not None and isinstance(sock, ssl.SSLSocket) and sock.pending():
                    if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                        break
                    sock = dev.sock
            if mask & selectors.EVENT_WRITE and dev.sock is not None:
                client.loop_write()

    def sweep(self) -> None:
        self._run_deferred()
        now = time.monotonic()
        for dev in self.devices:
            if dev.sock is not None:
                dev.client.loop_misc()
                if dev.jobs:
                    dev.check_stalls(now)
            elif not self.stopping and dev.next_retry and now >= dev.next_retry:
                dev.next_retry = 0.0
                self.connect(dev)

    def close(self) -> None:
        self.stopping = True
        for dev in self.devices:
            if dev.sock is not None and dev.connected:
                dev.client.publish(dev.status, _presence("offline"), qos=1, retain=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(d.sock is not None and d.client.want_write()
                                                  for d in self.devices):
            self.poll(0.05)
        for dev in self.devices:
            if dev.sock is not None:
                dev.client.disconnect()
                if dev.sock is not None:
                    dev.client.loop_write()
        self.poll(0.1)
        if self._record is not None:
            self._record.close()


def worker_main(cfg: WorkerConfig, emit, stop_fd: int | None = None) -> None:
    """Run one device worker: connect every device, serve until ``stop_fd`` (a readable file
    descriptor, e.g. stdin) reaches EOF or says "stop"; ``emit(dict)`` reports progress about
    four times a second and the final stats once."""
    for k, v in THREAD_ENV.items():
        os.environ.setdefault(k, v)
    raise_nofile_limit()
    w = Worker(cfg)
    last_report = 0.0
    last_sweep = time.monotonic()
    stop = [False]
    if stop_fd is not None:
        os.set_blocking(stop_fd, False)

        def on_ctrl() -> None:
            try:
                data = os.read(stop_fd, 4096)
            except BlockingIOError:
                return
            if not data or b"stop" in data:
                stop[0] = True

        w.sel.register(stop_fd, selectors.EVENT_READ, on_ctrl)

    def report(kind: str = "progress") -> None:
        emit({"type": kind, "worker": cfg.index, "stats": w.snapshot()})

    try:
        for party in cfg.parties:
            dev = w.make_device(party)
            w.devices.append(dev)
            w.connect(dev)
            w.poll(0)
            if time.monotonic() - last_report > 0.25:
                report()
                last_report = time.monotonic()
        while not stop[0]:
            w.poll(max(0.0, min(0.05, w.run_due())))
            w.run_due()
            now = time.monotonic()
            if now - last_sweep > 1.0:
                w.sweep()
                last_sweep = now
            if now - last_report > 0.25:
                report()
                last_report = now
    finally:
        if stop_fd is not None:
            w.sel.unregister(stop_fd)
        w.close()
        report("final")


def main(argv: list[str] | None = None) -> int:
    """``python -m cotune.fleet.device CONFIG.json``: one worker process; status as JSON lines
    on stdout, stops when stdin closes."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    cfg = WorkerConfig(**json.loads(Path(argv[0]).read_text()))
    out = sys.stdout

    def emit(doc: dict) -> None:
        out.write(json.dumps(doc) + "\n")
        out.flush()

    worker_main(cfg, emit, sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
