"""Fuzz targets: every parser of bytes that come from the network, with its contract.

The contract: whatever the bytes, a parser either returns a well-formed value or raises the
typed base error of its package (:class:`~bridge.errors.BridgeError` and subclasses on the
wire, :class:`~aggregator.errors.InvalidUpdate` in update validation,
:class:`~algorithms.fedmkt.payload.PayloadError` / :class:`~algorithms.base.AlgorithmError`
for algorithm payloads). Anything else (an ``IndexError``, ``OverflowError``, a hang, a huge
allocation) is a bug.

Each ``fuzz_<name>(data: bytes) -> None`` below is an atheris / libFuzzer entry point: it
returns normally when the contract holds and lets any other exception escape (a crash). The
same functions back the hypothesis property tests (``test_fuzz_*.py``), the replay of the
seed corpus in ``corpus/<name>/`` and the long runs of ``bench/fuzz.py``.

Targets:

* ``envelope``: :meth:`Sealer.open` on a frame; the first byte picks the mode: raw bytes
  (stopped at the signature), a frame re-signed by the claimed sender, or a fuzzed header
  re-encrypted and re-signed with valid keys (reaches the replay window, X25519 and AEAD). A
  frame that opens goes on like :meth:`Endpoint._on_frame`: chunk header -> blob assembly,
  anything else -> codec.
* ``codec``: :func:`bridge.codec.decode`; a decoded message must encode and decode again.
* ``chunks``: :class:`Assembly` fed index/length sequences and correct, short or corrupted
  chunks; ``finish`` must verify the hash; declared sizes are capped.
* ``tensors``: safetensors bytes through ``unpack_state`` -> ``validate_update`` and
  ``LogitsPayload.from_arrays``, ``LogitsPayload.from_bytes`` and the codec's tensor section.
* ``arrays``: structured dict-of-arrays (names, dtypes, shapes, values from the input) through
  ``validate_update`` / ``check_structure`` and ``LogitsPayload.from_arrays``.
* ``http``: the LLM server's request validation, ``parse_body`` -> ``parse_completion``
  (body bytes in, a parsed request or an ``APIError`` out).
"""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from collections.abc import Callable
from contextlib import nullcontext as _nullcontext
from functools import cache
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.numpy import save as st_save

import bridge.messages  # noqa: F401  (registers the message types)
from aggregator.errors import InvalidUpdate
from aggregator.validation import UpdateSpec, check_structure, validate_update
from algorithms.base import AlgorithmError, unpack_state
from algorithms.fedmkt.payload import LogitsPayload, PayloadError
from bridge.blobs import MAX_BLOB_BYTES, Assembly
from bridge.codec import decode, encode
from bridge.endpoint import chunk_ref
from bridge.envelope import _PREFIX, MAGIC, SIG_LEN, Header, Sealer, _digest, _direct_key
from bridge.errors import BlobIntegrityError, BridgeError, MalformedMessage, OversizedMessage
from bridge.keys import Directory, Identity
from bridge.messages import BlobRef, Update

NOW = 1_800_000_000.0
FEDERATION = "fuzzfed"
LIMIT = 64 * 1024  # max_message_bytes of the receiver: inputs are kept small
CHUNK = "chunk"


class Reader:
    """Structured values from fuzz bytes (a minimal FuzzedDataProvider that also works
    without atheris): reads past the end give zeros."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self, nbytes: int = 4) -> int:
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "little")

    def pick(self, options: list | tuple):
        return options[self.int(1) % len(options)]

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    def __len__(self) -> int:
        return max(0, len(self.data) - self.pos)


# -- a fixed federation (deterministic keys: for tests only) --------------------------------


def fixed_identity(party_id: str, role: str) -> Identity:
    seed = hashlib.sha256(f"cotune-fuzz-sign|{party_id}".encode()).digest()
    seed2 = hashlib.sha256(f"cotune-fuzz-kx|{party_id}".encode()).digest()
    return Identity(
        party_id,
        role,
        Ed25519PrivateKey.from_private_bytes(seed),
        X25519PrivateKey.from_private_bytes(seed2),
    )


@cache
def federation() -> tuple[dict[str, Identity], Directory]:
    ids = {"aggregator": fixed_identity("aggregator", "aggregator")}
    ids.update({c: fixed_identity(c, "client") for c in ("alice", "bob")})
    return ids, Directory(FEDERATION, [i.public for i in ids.values()])


CONTENT_KEY = hashlib.sha256(b"cotune-fuzz-content-key").digest()


def receiver() -> Sealer:
    """A fresh aggregator-side sealer (fresh replay state: the same input, the same result)."""
    ids, directory = federation()
    s = Sealer(ids["aggregator"], directory, max_message_bytes=LIMIT, clock=lambda: NOW)
    s.add_content_key(CONTENT_KEY)
    return s


@cache
def sender(party: str = "alice") -> Sealer:
    ids, directory = federation()
    s = Sealer(ids[party], directory, max_message_bytes=LIMIT, clock=lambda: NOW)
    s.add_content_key(CONTENT_KEY)
    return s


def frame_of(head: bytes, ct: bytes, sign_key: Ed25519PrivateKey) -> bytes:
    return b"".join((_PREFIX.pack(MAGIC, 1, len(head)), head, ct, sign_key.sign(_digest(head, ct))))


def resign(frame: bytes) -> bytes:
    """The frame with its signature replaced by a valid one of the sender its header claims
    (when the header parses and names a party we hold keys for); otherwise unchanged."""
    ids, _ = federation()
    try:
        _, _, head_len = _PREFIX.unpack_from(frame)
        head = frame[_PREFIX.size : _PREFIX.size + head_len]
        party = Header.from_bytes(head).sender
    except (struct.error, BridgeError):
        return frame
    if party not in ids or len(frame) < _PREFIX.size + head_len + SIG_LEN:
        return frame
    ct = frame[_PREFIX.size + head_len : len(frame) - SIG_LEN]
    return frame_of(head, ct, ids[party].sign_key)


def seal_header(head: bytes, body: bytes) -> tuple[bytes, bool]:
    """A frame carrying exactly ``head`` (fuzzed JSON) whose body is encrypted under the key
    the receiver will derive from that header, signed by the claimed sender. Returns (frame,
    whether the body was encrypted correctly)."""
    ids, _ = federation()
    agg = ids["aggregator"]
    try:
        h = Header.from_bytes(head)
    except BridgeError:
        return frame_of(head, body + bytes(16), ids["alice"].sign_key), False
    signer = ids.get(h.sender, ids["alice"]).sign_key
    aead = None
    if h.kid is not None:
        aead = AESGCM(CONTENT_KEY)
    elif h.epk is not None:
        try:
            shared = agg.kx_key.exchange(X25519PublicKey.from_public_bytes(h.epk))
        except ValueError:  # low-order point: the receiver must refuse it, typed
            shared = None
        if shared is not None:
            kx_pub = sender("alice").directory.recipient("aggregator").kx_pub
            aead = AESGCM(_direct_key(shared, h.epk, kx_pub, h.federation, h.sender, "aggregator"))
    if aead is None:
        return frame_of(head, body + bytes(16), signer), False
    return frame_of(head, aead.encrypt(h.nonce, body, MAGIC + head), signer), True


# -- the pieces an endpoint runs after open ------------------------------------------------


def assemble_chunk(h: Header, data: bytes) -> None:
    """What :meth:`Endpoint._on_chunk` does with one chunk (without the endpoint's state):
    header -> BlobRef -> Assembly -> add, raising only BridgeError."""
    ref = chunk_ref(h)  # the endpoint's own header -> BlobRef step
    # in memory whatever the declared size: a fuzz run must not write sparse files
    a = Assembly(ref, spill_threshold=MAX_BLOB_BYTES)
    try:
        if a.total != h.total:
            raise MalformedMessage("chunk disagrees with its blob's chunking")
        a.add(h.chunk, data)
        if a.complete:
            a.finish()
    finally:
        a.abort()


def after_open(h: Header, plaintext: bytes) -> None:
    if h.type == CHUNK:
        assemble_chunk(h, plaintext)
        return
    msg = decode(plaintext)
    if msg.TYPE != h.type:
        raise MalformedMessage("envelope type and body type differ")


# -- targets -------------------------------------------------------------------------------


def fuzz_envelope(data: bytes) -> None:
    mode, rest = (data[0] % 3, data[1:]) if data else (0, b"")
    body = None
    if mode == 0:
        frame = rest
    elif mode == 1:
        frame = resign(rest)
    else:
        r = Reader(rest)
        head = r.take(r.int(2) % 4096)
        sealed = r.rest()
        frame, encrypted = seal_header(head, sealed)
        body = sealed if encrypted else None
    try:
        opened = receiver().open(frame)
    except BridgeError:
        return
    assert body is None or opened.plaintext == body, "opened a body other than the one sealed"
    try:
        after_open(opened.header, opened.plaintext)
    except BridgeError:
        pass


def fuzz_codec(data: bytes) -> None:
    try:
        msg = decode(data)
    except MalformedMessage:
        return
    again = decode(encode(msg))  # what decodes must encode, and decode to the same type
    assert type(again) is type(msg), (type(again), type(msg))


def fuzz_chunks(data: bytes) -> None:
    r = Reader(data)
    mode = r.int(1) % 4
    if mode == 0:  # declared sizes straight from a chunk header: refused or bounded
        size, chunk_size = r.int(8), r.int(8) % (1 << 40)
        try:
            ref = BlobRef("ab" * 32, size, chunk_size)
        except ValueError:
            return
        try:
            a = Assembly(ref, spill_threshold=MAX_BLOB_BYTES)
        except OversizedMessage:
            return
        try:
            for _ in range(min(len(r) // 3 + 1, 64)):
                index = r.int(2) - 8
                try:
                    a.add(index, r.take(r.int(1)))
                except MalformedMessage:
                    pass
        finally:
            a.abort()
        return
    size = r.int(2) % 20000
    chunk_size = 1 + r.int(2) % 4096
    seed = r.take(16)
    blob = (hashlib.sha256(seed).digest() * (size // 32 + 1))[:size]
    honest = mode != 3
    sha = hashlib.sha256(blob).hexdigest() if honest else hashlib.sha256(seed).hexdigest()
    ref = BlobRef(sha, size, chunk_size)
    with (
        tempfile.TemporaryDirectory(prefix="cotune-fuzz-") if mode == 2 else _nullcontext() as spill
    ):
        a = Assembly(ref, spill_dir=spill, spill_threshold=4096 if mode == 2 else 1 << 20)
        first: dict[int, bool] = {}  # index -> whether the first accepted copy was correct
        try:
            while len(r):
                op = r.int(1)
                index = r.int(2) % (a.total + 2) - (1 if op & 1 else 0)
                expect = a.expected_len(index) if 0 <= index < a.total else 0
                start = max(0, index) * chunk_size
                good = blob[start : start + expect]
                if op & 6 == 2:  # wrong length
                    piece = good + b"x" if op & 8 else good[:-1]
                elif op & 6 == 4 and good:  # right length, one byte changed
                    pos = r.int(2) % len(good)
                    piece = good[:pos] + bytes([good[pos] ^ (1 + (op >> 4))]) + good[pos + 1 :]
                else:
                    piece = good
                before = a.received
                try:
                    added = a.add(index, piece)
                except MalformedMessage:
                    assert not (0 <= index < a.total and len(piece) == expect)
                    continue
                assert 0 <= index < a.total and len(piece) == expect
                assert added == (index not in first)
                assert a.received == before + int(added)
                if added:
                    first[index] = piece == good
            assert sorted(a.missing()) == sorted(set(range(a.total)) - set(first))
            if not a.complete:
                try:
                    a.finish()
                except BlobIntegrityError:
                    return
                raise AssertionError("finish() accepted an incomplete blob")
            try:
                result = a.finish()
            except BlobIntegrityError:
                assert not (honest and all(first.values())), "a correct blob failed its hash"
                return
            assert honest and all(first.values()), "a corrupted blob passed its hash"
            assert bytes(result.read()) == blob
            result.discard()
        finally:
            a.abort()


def _spec() -> UpdateSpec:
    rng = np.random.default_rng(0)
    state = {
        "a": rng.standard_normal((2, 3)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float16),
        "c": (rng.standard_normal((2, 2)).astype(np.float32).view(np.uint32) >> 16).astype(
            np.uint16
        ),
    }
    return UpdateSpec.from_state(state, declared={"c": "bfloat16"})


SPEC = _spec()
_UPDATE_HEADER_FIELDS = {"round": 1, "algorithm": "fedavg", "num_examples": 1}


def _validate(tensors: dict, max_norm: float | None = None, clip: bool = False) -> None:
    try:
        check_structure(tensors, SPEC)
    except InvalidUpdate:
        pass
    try:
        v = validate_update(tensors, SPEC, max_norm=max_norm, clip=clip)
    except InvalidUpdate:
        return
    assert sorted(v.tensors) == sorted(SPEC.tensors) and np.isfinite(v.norm)
    if max_norm is not None and not clip:
        assert v.norm <= max_norm


def _logits(arrays: dict) -> None:
    try:
        p = LogitsPayload.from_arrays(arrays)
    except PayloadError:
        return
    assert LogitsPayload.from_bytes(p.to_bytes()).k == p.k
    for s in range(p.num_samples):
        p.sample(s)


def fuzz_tensors(data: bytes) -> None:
    mode, rest = (data[0] % 3, data[1:]) if data else (0, b"")
    if mode == 0:
        try:
            arrays = unpack_state(rest)
        except AlgorithmError:
            return
        _validate(arrays)
        _logits(arrays)
    elif mode == 1:
        try:
            p = LogitsPayload.from_bytes(rest)
        except PayloadError:
            return
        p.sample(0) if p.num_samples else None
    else:
        names = _tensor_names(rest)
        head = json.dumps(
            {
                "type": "update",
                "v": 1,
                "fields": _UPDATE_HEADER_FIELDS,
                "tensors": {"tensors": names},
            },
            separators=(",", ":"),
        ).encode()
        try:
            msg = decode(_PREFIX.pack(b"CTM", 1, len(head)) + head + rest)
        except MalformedMessage:
            return
        assert isinstance(msg, Update)
        _validate(msg.tensors)


def _tensor_names(st: bytes) -> list[str]:
    """The names in a safetensors header (best effort) under the ``tensors/`` prefix, so the
    codec target reaches the update validation."""
    try:
        (n,) = struct.unpack_from("<Q", st)
        meta = json.loads(st[8 : 8 + min(n, 1 << 16)])
        return [k.split("/", 1)[1] for k in meta if k.startswith("tensors/")]
    except Exception:  # noqa: BLE001 (any garbage: no names)
        return []


_DTYPES = [
    np.float32,
    np.float16,
    np.uint16,
    np.float64,
    np.int32,
    np.int64,
    np.uint8,
    np.bool_,
    np.int8,
]
_LOGITS_FIELDS = {
    "topk_values": np.float16,
    "topk_ids": np.int32,
    "offsets": np.int64,
    "sample_ce": np.float32,
    "vocab_size": np.int64,
    "k": np.int64,
    "version": np.int64,
}


def _array(r: Reader, dtype) -> np.ndarray:
    ndim = r.int(1) % 4
    shape = tuple(r.int(1) % 6 for _ in range(ndim))
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) if shape else 1
    raw = r.take(n * dt.itemsize).ljust(n * dt.itemsize, b"\0")
    if dt == np.bool_:
        raw = bytes(b & 1 for b in raw)
    return np.frombuffer(raw, dtype=dt).reshape(shape).copy()


def fuzz_arrays(data: bytes) -> None:
    r = Reader(data)
    mode = r.int(1) % 2
    if mode == 0:  # an update against SPEC
        names = ["a", "b", "c", "d", ""]
        tensors = {}
        for _ in range(r.int(1) % 5):
            tensors[r.pick(names)] = _array(r, r.pick(_DTYPES[:4] if r.int(1) % 4 else _DTYPES))
        max_norm = r.pick([None, 1.0, 1e-3, 1e6])
        _validate(tensors, max_norm=max_norm, clip=bool(r.int(1) & 1))
    else:  # a logits payload: mostly the right dtypes, so the fuzzer gets past the first checks
        arrays = {}
        for name, dtype in _LOGITS_FIELDS.items():
            flag = r.int(1)
            if flag % 16 == 0:
                continue
            arrays[name] = _array(r, dtype if flag % 8 else r.pick(_DTYPES))
        _logits(arrays)


@cache
def _http():
    from aggregator.llm_server.schema import APIError, ServerLimits, parse_body, parse_completion

    return APIError, ServerLimits(max_body_bytes=LIMIT), parse_body, parse_completion


def _byte_tokens(text: str) -> list[int]:
    return list(text.encode("utf-8", "surrogatepass"))


def fuzz_http(data: bytes) -> None:
    """The LLM server's request validation (pure: body bytes -> parsed request): only
    :class:`APIError` (an HTTP 4xx), before any model work."""
    api_error, limits, parse_body, parse_completion = _http()
    try:
        body = parse_body(data, limits)
        parse_completion(body, _byte_tokens, 256, limits, "m", max_model_len=8192)
    except api_error:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "envelope": fuzz_envelope,
    "codec": fuzz_codec,
    "chunks": fuzz_chunks,
    "tensors": fuzz_tensors,
    "arrays": fuzz_arrays,
    "http": fuzz_http,
}


# -- seed corpus -----------------------------------------------------------------------------


def _arr_bytes(arr: np.ndarray) -> bytes:
    """``arr`` in the form :func:`_array` reads (ndim, dims, raw values)."""
    return bytes([arr.ndim, *arr.shape]) + np.ascontiguousarray(arr).tobytes()


def _sample_payload() -> LogitsPayload:
    return LogitsPayload(
        np.array([[-0.1, -2.0], [-0.5, -0.9], [-0.01, -7.0]], dtype=np.float16),
        np.array([[1, 2], [3, 0], [9, 4]], dtype=np.int32),
        np.array([0, 1, 3], dtype=np.int64),
        np.array([1.5, 0.25], dtype=np.float32),
        10,
    )


def _sample_messages() -> list:
    from bridge.messages import (
        BlobAck,
        ChunkRequest,
        ErrorReport,
        KeyGrant,
        LogitsRequest,
        LogitsResponse,
        Note,
        Task,
    )

    ref = BlobRef("cd" * 32, 5000, 1024, "adapter").to_json()
    update = Update(
        round=3,
        algorithm="fedavg",
        num_examples=120,
        metrics={"loss": 1.25},
        blobs={"adapter": ref},
        tensors={
            n: np.zeros(
                t.shape,
                dtype=np.float32
                if t.dtype == "float32"
                else (np.float16 if t.dtype == "float16" else np.uint16),
            )
            for n, t in SPEC.tensors.items()
        },
    )
    return [
        update,
        Task(
            round=3,
            algorithm="fedavg",
            config={"lr": 0.001},
            downloads={"global": ref},
            deadline=1.8e9,
        ),
        KeyGrant("k" * 32, "QUJD", 2),
        ChunkRequest("ab" * 32, [[0, 3], [5, 6]]),
        BlobAck("ab" * 32),
        ErrorReport("malformed", "bad", ref="x", round=1),
        Note("join", {"a": [1, 2]}, 0),
        LogitsRequest("r1", [1, 2, 3], 2, 5),
        LogitsResponse(
            "r1", {"values": np.full((2, 3), -1.0, np.float32), "ids": np.ones((2, 3), np.int32)}
        ),
    ]


@cache
def seeds() -> dict[str, list[bytes]]:
    """Valid inputs of every target (the start of each corpus); do not modify the lists."""
    ids, _ = federation()
    msgs = _sample_messages()
    alice = sender("alice")
    frames = [alice.seal("aggregator", m.TYPE, encode(m), round=3) for m in msgs[:3]]
    frames.append(
        alice.seal(
            "aggregator",
            msgs[0].TYPE,
            encode(msgs[0]),
            round=1,
            kid=alice.add_content_key(CONTENT_KEY),
        )
    )
    blob = bytes(range(256)) * 4
    sha = hashlib.sha256(blob).hexdigest()
    for i in range(2):
        frames.append(
            alice.seal(
                "aggregator",
                CHUNK,
                blob[i * 512 : (i + 1) * 512],
                round=3,
                blob=sha,
                chunk=i,
                total=2,
                bsize=len(blob),
                csize=512,
            )
        )
    envelope = [bytes([0]) + f for f in frames] + [bytes([1]) + f for f in frames]
    agg = receiver()
    for f in frames:
        h, head, _, _ = agg.parse(f)
        plain = agg.open(f).plaintext
        envelope.append(bytes([2]) + struct.pack("<H", len(head)) + head + plain)
    payload = _sample_payload()
    update_arrays = dict(msgs[0].tensors)
    tensors = [
        bytes([0]) + st_save(update_arrays),
        bytes([0]) + payload.to_bytes(),
        bytes([1]) + payload.to_bytes(),
        bytes([2]) + st_save({f"tensors/{k}": v for k, v in update_arrays.items()}),
    ]
    arrays = [
        bytes([0, 3])
        # per tensor: name index, 1 (common dtypes), dtype index (float32, float16, uint16)
        + b"".join(bytes([i, 1, i]) + _arr_bytes(update_arrays[n]) for i, n in enumerate("abc"))
        + bytes([1, 0]),  # max_norm 1.0, no clipping
        bytes([1]) + b"".join(bytes([1]) + _arr_bytes(a) for a in payload.to_arrays().values()),
    ]
    chunks = [
        bytes([1]) + struct.pack("<HH", 3000, 1000) + bytes(16) + bytes([0, i, 0]) * 1
        for i in range(3)
    ]
    chunks += [
        bytes([2])
        + struct.pack("<HH", 9000, 4000)
        + bytes(16)
        + b"".join(bytes([0, i, 0]) for i in range(3))
    ]
    chunks += [bytes([0]) + struct.pack("<QQ", 1 << 41, 1) + bytes(4)]
    http = [
        json.dumps(b).encode()
        for b in (
            {"model": "m", "prompt": "hello", "max_tokens": 4, "logprobs": 2, "temperature": 0},
            {
                "prompt": [[1, 2, 3], [4, 5]],
                "prompt_logprobs": 1,
                "echo": True,
                "stop": ["x"],
                "n": 2,
            },
            {"prompt": ["a", "b"], "top_p": 0.5, "seed": 3, "stream": False},
        )
    ]
    return {
        "http": http,
        "envelope": envelope,
        "codec": [encode(m) for m in msgs],
        "chunks": chunks,
        "tensors": tensors,
        "arrays": arrays,
    }


CORPUS = Path(__file__).parent / "corpus"


def corpus_files(name: str) -> list[Path]:
    d = CORPUS / name
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def write_seeds(root: Path = CORPUS) -> int:
    """Write :func:`seeds` into ``root/<target>/<sha1>`` (libFuzzer's naming); returns the count."""
    n = 0
    for name, items in seeds().items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for item in items:
            (d / hashlib.sha1(item).hexdigest()).write_bytes(item)
            n += 1
    return n
