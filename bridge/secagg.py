"""Secure aggregation (SecAgg+, Bell et al. 2020, after Bonawitz et al. 2017): the aggregator
learns only the sum of a round's (weighted) client updates. Pure protocol core, no I/O: the wire
carries the dicts and arrays these objects produce.

Protocol (one round; U1 ⊇ U2 ⊇ U3 ⊇ U4 are the clients still taking part after each step):

0. *Advertise.* Each client draws two X25519 pairs, ``c`` (encrypts shares) and ``s`` (mask
   agreement), and signs (federation, round, id, c_pk, s_pk) with its Ed25519 identity key.
   The server checks the signatures; U1 = advertisers. It draws a random ``degree``-regular
   graph over U1 (a ring over a seeded permutation; complete when degree >= |U1| - 1) and sends
   each client its neighbours' signed keys.
1. *Share keys.* A client checks its neighbours' signatures, draws a self-mask seed ``b`` and
   Shamir-splits ``b`` and its ``s`` private key (threshold ``t``) among its neighbours; each
   pair of shares is AES-256-GCM encrypted under a key agreed from the ``c`` keys, so the
   server only relays ciphertexts. U2 = clients whose shares arrived.
2. *Masked input.* A client with senders S = U2 ∩ N(u) uploads
   ``y_u = x_u + PRG(b_u) + sum_{v in S} ±PRG(s_uv)`` mod 2**32, where ``s_uv`` is agreed from
   the ``s`` keys and the sign is + when u < v, so pair masks cancel in the sum. The server
   keeps a running sum only. U3 = clients whose masked input arrived.
3. *Unmask.* The server announces survivors (U3) and dropped (U2 \\ U3) per neighbourhood;
   each survivor returns, for every neighbour, the share of ``b`` (neighbour survived) or of
   ``s`` (neighbour dropped), never both. With ``t`` shares the server rebuilds the ``b`` of
   survivors and the ``s`` key of dropped clients, removes ``PRG(b_u)`` and the pair masks
   survivors added for dropped neighbours, and decodes the sum. U4 = clients that revealed.

Fixed point: arithmetic in Z_{2**32}. A coordinate ``v`` in [-clip, clip] is encoded as
``round(v * value_scale)`` with ``value_scale = (2**31 - 1) // (max_clients * clip)``, so a sum
of up to ``max_clients`` inputs stays inside int32 and decodes through two's complement; the
error of a sum of n inputs is at most ``n * 0.5 / value_scale`` per coordinate. The weight
(in (0, 1]) rides as one more coordinate with ``weight_scale = (2**31 - 1) // max_clients``.
Values are pre-weighted by the client (it sends ``w * x`` and ``w``).

Threat model: the server is semi-honest but may lie about who dropped out: it may tell some
neighbours of u that u survived and others that u dropped. Each honest client reveals one kind
of share per neighbour, and ``2 * threshold > degree`` (enforced by :class:`SecAggParams`), so
the server cannot gather ``t`` shares of both ``b_u`` and ``s_u`` for a client whose masked
input it holds, unless it colludes with enough of u's neighbours (up to ``2t - degree - 1``
colluding neighbours are tolerated; the random graph makes a larger colluding share of one
neighbourhood unlikely while the corrupted fraction is small). Key substitution is prevented
by the signatures, whose public keys the caller checks against certificates. The server
chooses the graph seed; an adversarial choice of graph is outside this model. Clients are
trusted to follow the protocol for privacy (a cheating client can abort the round or spoil the
sum, not learn others' inputs).

Lost with secure aggregation: everything that needs individual updates. The server cannot
clip or norm-check updates, run Byzantine-robust rules (median, trimmed mean, Krum), detect
outliers or poisoning, or weigh clients by what they sent: clipping and weights are the
clients' own (an honest client's range is checked locally; a malicious client can add any
vector mod 2**32, and the server cannot tell).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from . import shamir
from .errors import BridgeError
from .keys import b64d, b64e

INT_MAX = 2**31 - 1
_DOMAIN = b"cotune/secagg/v1/"
_AD_DOMAIN = _DOMAIN + b"advertise"
_SHARE_KEY_DOMAIN = _DOMAIN + b"share-key"
_SHARE_AD_DOMAIN = _DOMAIN + b"share-ad"
_MASK_DOMAIN = _DOMAIN + b"mask"
_NONCE = 12
_MIN_CT = _NONCE + 16  # nonce + GCM tag


# ---------------------------------------------------------------------------------- errors


class SecAggError(BridgeError):
    """A secure-aggregation call that cannot be honoured (bad parameters, a step out of order,
    malformed shares)."""

    code = "secagg"


class _ReasonedError(SecAggError):
    """A SecAgg error with a short stable ``reason`` and a free-form ``detail``."""

    what = ""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.what}: {reason}" + (f" ({detail})" if detail else ""))


class SecAggAbort(_ReasonedError):
    """The round's secure aggregation cannot complete (or an honest client refuses a request):
    typed ``reason`` (short stable string), nothing is revealed."""

    code = "secagg_abort"
    what = "secure aggregation aborted"


class SecAggRejected(_ReasonedError):
    """The server refuses one client's message (bad signature, duplicate, wrong recipients or
    length); the round goes on without it."""

    code = "secagg_rejected"
    what = "secure aggregation message rejected"


def _step(name: str):
    """Method decorator: check the object is in stage ``name``, mark it aborted on
    :class:`SecAggAbort`, and add the call's wall time to ``seconds[name]``."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(self, *args, **kwargs):
            if self.stage != name:
                raise SecAggError(f"{fn.__name__}() called in stage {self.stage!r}, needs {name!r}")
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            except SecAggAbort:
                self.stage = "aborted"
                raise
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        return inner

    return wrap


# ---------------------------------------------------------------------------------- parameters


def _binom_below(k: int, p: float, t: int) -> float:
    """P[Binomial(k, p) < t], exact."""
    return float(sum(math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(t)))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SecAggParams:
    """Parameters every party of a round must share (send them with the round's config)."""

    clip: float  # every coordinate of a client's (pre-weighted) input lies in [-clip, clip]
    max_clients: int  # most inputs ever summed in one round (bounds overflow)
    degree: int  # neighbours per client (even >= 2, or n - 1 for a complete graph)
    threshold: int  # Shamir threshold t: 2 <= t <= degree and 2 * t > degree
    bits: int = 32  # arithmetic in Z_{2**bits}; only 32 is supported
    min_clients: int = 2  # fewer advertisers than this -> SecAggAbort("too_few_clients")

    def __post_init__(self) -> None:
        clip = self.clip
        if (
            isinstance(clip, bool)
            or not isinstance(clip, (int, float))
            or not math.isfinite(clip)
            or clip <= 0
        ):
            raise SecAggError(f"clip must be a positive finite number, got {clip!r}")
        for name in ("max_clients", "degree", "threshold", "bits", "min_clients"):
            if not _is_int(getattr(self, name)):
                raise SecAggError(f"{name} must be an int, got {getattr(self, name)!r}")
        if self.bits != 32:
            raise SecAggError(f"only 32-bit arithmetic is supported, got bits={self.bits}")
        if self.min_clients < 2 or self.max_clients < self.min_clients:
            raise SecAggError(
                f"need 2 <= min_clients <= max_clients, got {self.min_clients}, {self.max_clients}"
            )
        if self.degree < 2:
            raise SecAggError(f"degree must be >= 2, got {self.degree}")
        if not 2 <= self.threshold <= self.degree:
            raise SecAggError(f"need 2 <= threshold <= degree, got {self.threshold}, {self.degree}")
        if 2 * self.threshold <= self.degree:
            # below this a server that lies about dropouts can collect both kinds of shares
            raise SecAggError(
                f"threshold {self.threshold} must exceed half the degree {self.degree} "
                "(threshold_fraction >= 0.5)"
            )
        self.value_scale()

    @classmethod
    def for_clients(
        cls,
        n: int,
        clip: float,
        *,
        max_clients: int | None = None,
        threshold_fraction: float = 0.5,
        min_clients: int = 2,
        dropout_rate: float = 0.0,
        failure: float = 1e-6,
        degree: int | None = None,
    ) -> SecAggParams:
        """SecAgg+ sizing for about ``n`` clients: degree = smallest even number >= 3*log2(n)
        (logarithmic growth) such that, when each client drops out independently with
        probability ``dropout_rate``, the chance that some client keeps fewer than ``threshold``
        of its neighbours is at most ``failure`` (union bound over the n clients, exact binomial
        tail); capped at n - 1 (then everyone is a neighbour, as in SecAgg). The degree needed
        grows like log(n) / (1/2 - dropout_rate)^2: sparse graphs pay off for large n and
        moderate dropout rates; an explicit ``degree`` replaces that search (still capped);
        threshold = max(2, ceil(fraction * degree) + 1), capped at degree. A fraction below 0.5
        may give ``2 * threshold <= degree``, which is refused (see the threat model). For
        n < 3 the degree is 2 and every round aborts (``too_few_clients``): with two clients the
        sum tells each the other's input anyway."""
        if not _is_int(n) or n < 1:
            raise SecAggError(f"need a positive number of clients, got {n!r}")
        if not 0 < threshold_fraction <= 1:
            raise SecAggError(f"threshold_fraction must be in (0, 1], got {threshold_fraction!r}")
        if not 0 <= dropout_rate < 0.5:
            raise SecAggError(f"dropout_rate must be in [0, 0.5), got {dropout_rate!r}")

        def threshold_of(k: int) -> int:
            return min(k, max(2, math.ceil(threshold_fraction * k) + 1))

        if degree is None:
            degree = max(2, math.ceil(3 * math.log2(n)))
            degree += degree % 2
            while degree < n - 1 and n * _binom_below(degree, 1 - dropout_rate, threshold_of(degree)) > failure:
                degree += 2
        degree = min(degree, max(n - 1, 2))
        threshold = threshold_of(degree)
        return cls(
            clip=float(clip),
            max_clients=n if max_clients is None else max_clients,
            degree=degree,
            threshold=threshold,
            min_clients=min_clients,
        )

    def graph_degree(self, n: int) -> int:
        """Degree of the graph over ``n`` advertisers: complete when ``degree >= n - 1``, else
        ``degree`` rounded down to even (a ring needs an even degree)."""
        if self.degree >= n - 1:
            return max(n - 1, 0)
        return self.degree - self.degree % 2

    def value_scale(self) -> float:
        scale = float(INT_MAX // (self.max_clients * self.clip))
        if scale < 1:
            raise SecAggError(
                f"clip {self.clip} with {self.max_clients} clients leaves no precision in 32 bits"
            )
        return scale

    def weight_scale(self) -> float:
        return float(INT_MAX // self.max_clients)

    def to_json(self) -> dict:
        return {
            "clip": float(self.clip),
            "max_clients": self.max_clients,
            "degree": self.degree,
            "threshold": self.threshold,
            "bits": self.bits,
            "min_clients": self.min_clients,
        }

    @classmethod
    def from_json(cls, d) -> SecAggParams:
        required = {"clip", "max_clients", "degree", "threshold"}
        if (
            not isinstance(d, Mapping)
            or not required <= set(d)
            or not set(d) <= required | {"bits", "min_clients"}
        ):
            raise SecAggError(f"bad secagg params: {d!r}")
        return cls(**dict(d))


# ---------------------------------------------------------------------------------- primitives


def _pack(*parts) -> bytes:
    """Unambiguous encoding of strings, ints and bytes (each length-prefixed)."""
    out = bytearray()
    for p in parts:
        if isinstance(p, str):
            p = p.encode("utf-8")
        elif _is_int(p):
            p = p.to_bytes(8, "big", signed=True)
        out += len(p).to_bytes(4, "big") + p
    return bytes(out)


def _unpack(data: bytes, count: int) -> list[bytes]:
    parts, i = [], 0
    while i < len(data):
        n = int.from_bytes(data[i : i + 4], "big")
        parts.append(data[i + 4 : i + 4 + n])
        i += 4 + n
        if i > len(data):
            raise ValueError("truncated")
    if len(parts) != count:
        raise ValueError(f"expected {count} parts, got {len(parts)}")
    return parts


def _raw_pub(key) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_priv(key) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _ad_message(federation: str, round: int, party: str, c_pk: bytes, s_pk: bytes) -> bytes:
    return _pack(_AD_DOMAIN, federation, round, party, c_pk, s_pk)


def _signed_keys(federation: str, round: int, party: str, ad: Mapping, sign_pub: bytes) -> tuple[bytes, bytes]:
    """(c_pk, s_pk) of ``party``'s advertisement, its signature checked with ``sign_pub``;
    ValueError (and friends) when malformed, InvalidSignature when forged."""
    c_pk, s_pk, sig = b64d(ad["c_pk"]), b64d(ad["s_pk"]), b64d(ad["sig"])
    verify = Ed25519PublicKey.from_public_bytes(bytes(sign_pub))
    if len(c_pk) != 32 or len(s_pk) != 32 or len(sig) != 64:
        raise ValueError("wrong key or signature length")
    verify.verify(sig, _ad_message(federation, round, party, c_pk, s_pk))
    return c_pk, s_pk


def _pair_info(domain: bytes, federation: str, round: int, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return _pack(domain, federation, round, lo, hi)


def _mask_seed(
    s_sk: X25519PrivateKey, s_pk_other: bytes, federation: str, round: int, a: str, b: str
) -> bytes:
    shared = s_sk.exchange(X25519PublicKey.from_public_bytes(s_pk_other))
    return _hkdf(shared, _pair_info(_MASK_DOMAIN, federation, round, a, b))


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 words of the AES-256-CTR keystream under key ``seed`` (32 bytes),
    counter block starting at zero: block i is AES_seed(i as a 128-bit big-endian integer).
    AES-CTR rather than ChaCha20: with AES-NI it expands a mask about six times faster here,
    and mask expansion is most of a client's secure-round cost. Read-only array."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != 32:
        raise SecAggError("prg seed must be 32 bytes")
    if not _is_int(length) or length < 0:
        raise SecAggError(f"prg length must be a non-negative int, got {length!r}")
    enc = Cipher(algorithms.AES(bytes(seed)), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(enc.update(bytes(4 * length)), dtype="<u4")


def neighbour_graph(clients: Sequence[str], degree: int, seed: bytes) -> dict[str, list[str]]:
    """Symmetric regular graph (Harary-style ring: each node linked to degree/2 on each side)
    over a permutation of sorted(clients) drawn from ``seed`` (deterministic). Each list sorted.
    degree >= n-1 gives the complete graph."""
    ids = sorted(clients)
    if not isinstance(seed, (bytes, bytearray)):
        raise SecAggError("graph seed must be bytes")
    if len(set(ids)) != len(ids):
        raise SecAggError("client ids must be distinct")
    n = len(ids)
    if degree >= n - 1:
        return {u: [v for v in ids if v != u] for u in ids}
    if not _is_int(degree) or degree < 2 or degree % 2:
        raise SecAggError(f"a ring graph needs an even degree >= 2, got {degree!r}")
    # permutation: order by a keyed hash of the id (a random oracle keyed by the seed)
    ring = sorted(
        ids, key=lambda u: (hmac.new(bytes(seed), u.encode("utf-8"), hashlib.sha256).digest(), u)
    )
    half = degree // 2
    out = {}
    for i, u in enumerate(ring):
        out[u] = sorted(ring[(i + k) % n] for k in range(-half, half + 1) if k)
    return out


def shamir_split(secret: bytes, xs: Sequence[int], t: int) -> dict[int, bytes]:
    """Shares of a 32-byte ``secret`` at the distinct nonzero ``xs``, threshold ``t`` (see
    :mod:`bridge.shamir`)."""
    try:
        return shamir.split(secret, xs, t)
    except shamir.ShamirError as exc:
        raise SecAggError(str(exc)) from exc


def shamir_combine(shares: Mapping[int, bytes], t: int) -> bytes:
    """The 32-byte secret from the first ``t`` shares sorted by x (Lagrange at 0)."""
    try:
        return shamir.combine(shares, t)
    except shamir.ShamirError as exc:
        raise SecAggError(str(exc)) from exc


# ---------------------------------------------------------------------------------- fixed point


def encode_input(values: np.ndarray, weight: float, params: SecAggParams) -> np.ndarray:
    """uint32[len + 1]: ``round(v * value_scale)`` per coordinate (two's complement), then
    ``round(weight * weight_scale)``. Values must be finite and within clip (1e-9 relative
    slack), weight in (0, 1]; else ``SecAggAbort("bad_input")``."""
    v = np.asarray(values)
    if v.ndim != 1 or v.dtype.kind not in "fiu":
        raise SecAggAbort("bad_input", "values must be a 1-D numeric array")
    v = v.astype(np.float64, copy=False)
    top = float(np.max(np.abs(v))) if v.size else 0.0  # NaN propagates: checked here too
    if not math.isfinite(top):
        raise SecAggAbort("bad_input", "non-finite value")
    if top > params.clip * (1 + 1e-9):
        raise SecAggAbort("bad_input", f"a value exceeds clip {params.clip}")
    if (
        isinstance(weight, bool)
        or not isinstance(weight, numbers.Real)
        or not math.isfinite(weight)
        or not 0 < weight <= 1
    ):
        raise SecAggAbort("bad_input", f"weight must be in (0, 1], got {weight!r}")
    scale = params.value_scale()
    # max_clients * bound <= 2**31 - 1 (the min guards against float rounding up)
    bound = min(math.floor(params.clip * scale), INT_MAX // params.max_clients)
    out = np.empty(v.size + 1, dtype=np.int32)
    q = np.rint(v * scale)
    if top * scale > bound:  # only within the 1e-9 slack: bring the few edge values in
        np.minimum(q, bound, out=q)
        np.maximum(q, -bound, out=q)
    out[:-1] = q
    out[-1] = round(float(weight) * params.weight_scale())
    return out.view(np.uint32)


def decode_sum(total: np.ndarray, params: SecAggParams) -> tuple[np.ndarray, float]:
    """uint32[L + 1] sum -> (float64 sum of the pre-weighted values [L], sum of weights)."""
    t = np.asarray(total)
    if t.ndim != 1 or t.size < 1 or t.dtype.kind != "u" or t.dtype.itemsize != 4:
        raise SecAggError("a secagg sum is a 1-D uint32 array with the weight last")
    ints = t.astype(np.uint32).view(np.int32)
    values = ints[:-1].astype(np.float64) / params.value_scale()
    return values, float(ints[-1]) / params.weight_scale()


# ---------------------------------------------------------------------------------- client


class SecAggClient:
    """One client's side of one round. Steps in order: :meth:`advertise`, :meth:`share_keys`,
    :meth:`receive_shares`, :meth:`masked_input`, :meth:`reveal`; ``stage`` names the next one
    ("aborted" after a :class:`SecAggAbort`, "done" at the end)."""

    def __init__(
        self,
        party_id: str,
        federation: str,
        round: int,
        params: SecAggParams,
        sign_key: Ed25519PrivateKey,
    ):
        if not isinstance(party_id, str) or not party_id:
            raise SecAggError("party_id must be a non-empty string")
        self.party_id = party_id
        self.federation = federation
        self.round = round
        self.params = params
        self._sign_key = sign_key
        self.stage = "advertise"
        self.seconds: dict[str, float] = {}
        self._c_sk: X25519PrivateKey | None = None
        self._s_sk: X25519PrivateKey | None = None
        self._peers: dict[str, tuple[bytes, bytes]] = {}  # neighbour -> (c_pk, s_pk)
        self._b: bytes | None = None
        self._held: dict[str, tuple[int, bytes, bytes]] = {}  # sender -> (x, b share, s share)
        self._reveal_asked = False

    @_step("advertise")
    def advertise(self) -> dict:
        """Fresh c and s X25519 pairs, signed: ``{"c_pk", "s_pk", "sig"}`` in base64."""
        self._c_sk, self._s_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        c_pk, s_pk = _raw_pub(self._c_sk.public_key()), _raw_pub(self._s_sk.public_key())
        sig = self._sign_key.sign(
            _ad_message(self.federation, self.round, self.party_id, c_pk, s_pk)
        )
        self.stage = "share_keys"
        return {"c_pk": b64e(c_pk), "s_pk": b64e(s_pk), "sig": b64e(sig)}

    def _share_aead(self, peer: str) -> AESGCM:
        shared = self._c_sk.exchange(X25519PublicKey.from_public_bytes(self._peers[peer][0]))
        info = _pair_info(_SHARE_KEY_DOMAIN, self.federation, self.round, self.party_id, peer)
        return AESGCM(_hkdf(shared, info))

    def _share_ad(self, sender: str, recipient: str) -> bytes:
        return _pack(_SHARE_AD_DOMAIN, self.federation, self.round, sender, recipient)

    @_step("share_keys")
    def share_keys(self, neighbours: Mapping[str, Mapping]) -> dict[str, bytes]:
        """Check the neighbours' signed keys, Shamir-share ``b`` and the s key among them;
        returns ``{neighbour: ciphertext}``."""
        p = self.params
        if self.party_id in neighbours:
            raise SecAggAbort("bad_request", "own id among the neighbours")
        if len(neighbours) < p.threshold:
            raise SecAggAbort("too_few_neighbours", f"{len(neighbours)} < threshold {p.threshold}")
        if len(neighbours) > p.degree:
            raise SecAggAbort("bad_request", f"{len(neighbours)} neighbours > degree {p.degree}")
        own = {_raw_pub(self._c_sk.public_key()), _raw_pub(self._s_sk.public_key())}
        seen = set(own)
        peers = {}
        for v, ad in neighbours.items():
            try:
                c_pk, s_pk = _signed_keys(self.federation, self.round, v, ad, b64d(ad["sign_pub"]))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise SecAggAbort("bad_request", f"{v}: malformed keys ({exc})") from exc
            except InvalidSignature:
                raise SecAggAbort("bad_signature", v) from None
            if c_pk in seen or s_pk in seen or c_pk == s_pk:
                raise SecAggAbort("bad_request", f"{v}: repeated public key")
            seen |= {c_pk, s_pk}
            peers[v] = (c_pk, s_pk)
        self._peers = peers
        order = sorted(peers)
        xs = [1 + i for i in range(len(order))]
        self._b = os.urandom(32)
        b_shares = shamir_split(self._b, xs, p.threshold)
        s_shares = shamir_split(_raw_priv(self._s_sk), xs, p.threshold)
        out = {}
        for i, v in enumerate(order):
            x = xs[i]
            plain = _pack(self.party_id, v, x, b_shares[x], s_shares[x])
            nonce = os.urandom(_NONCE)
            try:
                aead = self._share_aead(v)
            except ValueError as exc:  # low-order point: the neighbour's key is unusable
                raise SecAggAbort("bad_request", f"{v}: unusable key") from exc
            out[v] = nonce + aead.encrypt(nonce, plain, self._share_ad(self.party_id, v))
        self.stage = "receive_shares"
        return out

    @_step("receive_shares")
    def receive_shares(self, ciphertexts: Mapping[str, bytes]) -> None:
        """Decrypt the shares neighbours sent (U2 ∩ N(self)); those senders are the set this
        client masks with."""
        held = {}
        for u, ct in ciphertexts.items():
            if u not in self._peers:
                raise SecAggAbort("bad_request", f"shares from non-neighbour {u!r}")
            try:
                ct = bytes(ct)
                plain = self._share_aead(u).decrypt(
                    ct[:_NONCE], ct[_NONCE:], self._share_ad(u, self.party_id)
                )
                sender, recipient, x, b_sh, s_sh = _unpack(plain, 5)
                x = int.from_bytes(x, "big", signed=True)
                if sender.decode("utf-8") != u or recipient.decode("utf-8") != self.party_id:
                    raise ValueError("names other parties")
                if not 1 <= x <= self.params.degree:
                    raise ValueError(f"share index {x}")
                shamir.share_to_int(b_sh)
                shamir.share_to_int(s_sh)
            except (InvalidTag, ValueError, TypeError) as exc:
                raise SecAggAbort("bad_share", u) from exc
            held[u] = (x, b_sh, s_sh)
        if len(held) < self.params.threshold:
            raise SecAggAbort(
                "too_few_neighbours", f"{len(held)} senders < threshold {self.params.threshold}"
            )
        self._held = held
        self.stage = "masked_input"

    @_step("masked_input")
    def masked_input(self, values: np.ndarray, weight: float) -> np.ndarray:
        """``encode_input(values, weight) + PRG(b) + sum ±PRG(s_uv)`` mod 2**32."""
        y = encode_input(values, weight, self.params)
        y += prg(self._b, y.size)
        for v in sorted(self._held):
            mask = prg(
                _mask_seed(
                    self._s_sk, self._peers[v][1], self.federation, self.round, self.party_id, v
                ),
                y.size,
            )
            if self.party_id < v:
                y += mask
            else:
                y -= mask
        self._b = None  # the secrets now live only in the neighbours' shares
        self._s_sk = None
        self.stage = "reveal"
        return y

    def reveal(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, dict]:
        """Unmask step: the ``b`` share of each surviving sender, the ``s`` share of each dropped
        one; never both for one client. Refuses (``unmask_refused``) a second request, and
        requests that do not account for every sender, overlap, drop this client, or leave
        fewer than threshold survivors (this client included)."""
        if self._reveal_asked:
            self.stage = "aborted"
            raise SecAggAbort("unmask_refused", "asked to reveal twice")
        return self._reveal(survivors, dropped)

    @_step("reveal")
    def _reveal(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, dict]:
        self._reveal_asked = True
        surv, drop = set(survivors), set(dropped)
        senders = set(self._held)
        if surv & drop:
            raise SecAggAbort("unmask_refused", f"both survivor and dropped: {sorted(surv & drop)}")
        if self.party_id in drop:
            raise SecAggAbort("unmask_refused", "this client listed as dropped")
        missing = senders - surv - drop
        if missing:
            raise SecAggAbort("unmask_refused", f"senders not accounted for: {sorted(missing)}")
        if len(surv & senders) + 1 < self.params.threshold:
            raise SecAggAbort("unmask_refused", f"{len(surv & senders) + 1} survivors < threshold")
        out = {}
        for v in sorted(senders):
            x, b_sh, s_sh = self._held[v]
            out[v] = {"x": x, "b": b64e(b_sh)} if v in surv else {"x": x, "s": b64e(s_sh)}
        self._held = {}
        self.stage = "done"
        return out


# ---------------------------------------------------------------------------------- server


class SecAggServer:
    """The aggregator's side of one round. Per step, ``add_*`` calls (each may raise
    :class:`SecAggRejected` for one client without harming the round) then one ``close_*``
    call; :meth:`finish` ends the round. ``stage`` names the current step."""

    def __init__(self, federation: str, round: int, params: SecAggParams, graph_seed: bytes):
        self.federation = federation
        self.round = round
        self.params = params
        self.graph_seed = bytes(graph_seed)
        self.stage = "advertise"
        self.seconds: dict[str, float] = {}
        self._ads: dict[str, tuple[bytes, bytes, bytes, bytes]] = {}  # c_pk, s_pk, sig, sign_pub
        self._keys_seen: set[bytes] = set()
        self.graph: dict[str, list[str]] = {}
        self._x: dict[str, dict[str, int]] = {}  # owner -> {holder: share x}
        self._cts: dict[str, dict[str, bytes]] = {}
        self.u2: list[str] = []
        self._length: int | None = None
        self._sum: np.ndarray | None = None
        self._masked: set[str] = set()
        self.survivors: list[str] = []
        self.dropped: list[str] = []
        # revealer -> {owner: (x, share)}
        self._reveals: dict[str, dict[str, tuple[int, bytes]]] = {}

    # -- step 0
    @_step("advertise")
    def add_advertisement(self, client: str, ad: Mapping, sign_pub: bytes) -> None:
        if client in self._ads:
            raise SecAggRejected("duplicate", client)
        if len(self._ads) >= self.params.max_clients:
            raise SecAggRejected("round_full", f"{self.params.max_clients} clients already")
        try:
            c_pk, s_pk = _signed_keys(self.federation, self.round, client, ad, bytes(sign_pub))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SecAggRejected("bad_request", f"{client}: {exc}") from exc
        except InvalidSignature:
            raise SecAggRejected("bad_signature", client) from None
        if c_pk == s_pk or c_pk in self._keys_seen or s_pk in self._keys_seen:
            raise SecAggRejected("duplicate", f"{client}: repeated public key")
        probe = X25519PrivateKey.generate()
        try:
            probe.exchange(X25519PublicKey.from_public_bytes(c_pk))
            probe.exchange(X25519PublicKey.from_public_bytes(s_pk))
        except ValueError:
            raise SecAggRejected("bad_request", f"{client}: low-order public key") from None
        self._keys_seen |= {c_pk, s_pk}
        self._ads[client] = (c_pk, s_pk, b64d(ad["sig"]), bytes(sign_pub))

    @_step("advertise")
    def close_advertise(self) -> dict[str, dict[str, dict]]:
        """U1 = advertisers; returns each client's neighbours' signed keys."""
        u1 = sorted(self._ads)
        if len(u1) < self.params.min_clients:
            raise SecAggAbort(
                "too_few_clients", f"{len(u1)} advertised, need {self.params.min_clients}"
            )
        degree = self.params.graph_degree(len(u1))
        if degree < self.params.threshold:
            raise SecAggAbort(
                "too_few_clients", f"{len(u1)} clients give degree {degree} < threshold"
            )
        self.graph = neighbour_graph(u1, degree, self.graph_seed)
        self._x = {u: {v: 1 + i for i, v in enumerate(nb)} for u, nb in self.graph.items()}
        out = {}
        for u, nb in self.graph.items():
            out[u] = {}
            for v in nb:
                c_pk, s_pk, sig, sign_pub = self._ads[v]
                out[u][v] = {
                    "c_pk": b64e(c_pk),
                    "s_pk": b64e(s_pk),
                    "sig": b64e(sig),
                    "sign_pub": b64e(sign_pub),
                }
        self.stage = "shares"
        return out

    # -- step 1
    @_step("shares")
    def add_shares(self, client: str, ciphertexts: Mapping[str, bytes]) -> None:
        if client not in self.graph:
            raise SecAggRejected("unknown_client", client)
        if client in self._cts:
            raise SecAggRejected("duplicate", client)
        if set(ciphertexts) != set(self.graph[client]):
            raise SecAggRejected("bad_request", f"{client}: recipients are not its neighbours")
        if not all(
            isinstance(ct, (bytes, bytearray)) and len(ct) >= _MIN_CT for ct in ciphertexts.values()
        ):
            raise SecAggRejected("bad_request", f"{client}: malformed ciphertext")
        self._cts[client] = {v: bytes(ct) for v, ct in ciphertexts.items()}

    def _check_neighbourhoods(self, owners, present: set[str]) -> None:
        t = self.params.threshold
        short = [u for u in owners if sum(v in present for v in self.graph[u]) < t]
        if short:
            raise SecAggAbort(
                "too_few_neighbours", f"fewer than {t} neighbours left for {short[:5]}"
            )

    @_step("shares")
    def close_shares(self) -> dict[str, dict[str, bytes]]:
        """U2 = clients whose shares arrived; returns each of them the ciphertexts addressed to
        it by its neighbours in U2."""
        self.u2 = sorted(self._cts)
        if len(self.u2) < self.params.min_clients:
            raise SecAggAbort(
                "too_few_clients", f"{len(self.u2)} shared keys, need {self.params.min_clients}"
            )
        u2 = set(self.u2)
        self._check_neighbourhoods(self.u2, u2)
        out = {v: {u: self._cts[u][v] for u in self.graph[v] if u in u2} for v in self.u2}
        self._cts = {}
        self.stage = "masked"
        return out

    # -- step 2
    @_step("masked")
    def set_length(self, n: int) -> None:
        """Expected length of every masked input (values + 1 weight slot)."""
        if not _is_int(n) or n < 1:
            raise SecAggError(f"length must be a positive int, got {n!r}")
        if self._length is not None and self._length != n:
            raise SecAggError(f"length already {self._length}")
        self._length = n

    @_step("masked")
    def add_masked(self, client: str, y: np.ndarray) -> None:
        if client not in self.u2:
            raise SecAggRejected("unknown_client", f"{client} is not in U2")
        if client in self._masked:
            raise SecAggRejected("duplicate", client)
        if (
            not isinstance(y, np.ndarray)
            or y.ndim != 1
            or y.dtype.kind != "u"
            or y.dtype.itemsize != 4
        ):
            raise SecAggRejected(
                "bad_request", f"{client}: masked input must be a 1-D uint32 array"
            )
        if self._length is not None and y.size != self._length:
            raise SecAggRejected(
                "bad_request", f"{client}: length {y.size}, expected {self._length}"
            )
        if y.size < 1:
            raise SecAggRejected("bad_request", f"{client}: empty masked input")
        if self._sum is None:
            self._length = y.size
            self._sum = np.zeros(y.size, dtype=np.uint32)
        np.add(self._sum, y.astype(np.uint32, copy=False), out=self._sum)
        self._masked.add(client)

    @_step("masked")
    def close_masked(self) -> tuple[list[str], list[str]]:
        """U3 = clients whose masked input arrived; returns (survivors, dropped = U2 \\ U3).
        Checks before anyone reveals that every client of U2 keeps ``threshold`` neighbours in
        U3 (each secret must be rebuildable)."""
        self.survivors = sorted(self._masked)
        self.dropped = sorted(set(self.u2) - self._masked)
        if len(self.survivors) < self.params.min_clients:
            raise SecAggAbort(
                "too_few_clients",
                f"{len(self.survivors)} masked inputs, need {self.params.min_clients}",
            )
        self._check_neighbourhoods(self.u2, self._masked)
        self.stage = "unmask"
        return list(self.survivors), list(self.dropped)

    # -- step 3
    def unmask_request(self, client: str) -> tuple[list[str], list[str]]:
        """What to ask survivor ``client``: (its neighbours in U3, its neighbours in U2 \\ U3)."""
        if self.stage != "unmask":
            raise SecAggError(f"unmask_request() called in stage {self.stage!r}, needs 'unmask'")
        if client not in self._masked:
            raise SecAggError(f"{client!r} is not a survivor")
        nb = self.graph[client]
        surv, drop = self._masked, set(self.dropped)
        return [v for v in nb if v in surv], [v for v in nb if v in drop]

    @_step("unmask")
    def add_reveal(self, client: str, shares: Mapping[str, Mapping]) -> None:
        if client not in self._masked:
            raise SecAggRejected("unknown_client", f"{client} is not a survivor")
        if client in self._reveals:
            raise SecAggRejected("duplicate", client)
        surv, drop = self.unmask_request(client)
        kinds = {v: "b" for v in surv} | {v: "s" for v in drop}
        got = {}
        try:
            for v, entry in shares.items():
                kind = kinds.get(v)
                if kind is None or set(entry) != {"x", kind}:
                    raise ValueError(f"unexpected entry for {v!r}")
                if entry["x"] != self._x[v][client]:
                    raise ValueError(f"wrong share index for {v!r}")
                raw = b64d(entry[kind])
                shamir.share_to_int(raw)
                got[v] = (entry["x"], raw)
        except (TypeError, ValueError, AttributeError) as exc:
            raise SecAggRejected("bad_share", f"{client}: {exc}") from exc
        self._reveals[client] = got

    @_step("unmask")
    def finish(self) -> tuple[np.ndarray, float, dict]:
        """Rebuild the survivors' ``b`` and the dropped clients' ``s`` keys, remove the masks and
        decode: (sum of pre-weighted values, sum of weights, stats). ``stats``: sizes of U1..U4,
        graph degree, threshold, secrets rebuilt, and seconds spent in the server's calls per
        step (``finish`` on its own)."""
        t0 = time.perf_counter()
        t = self.params.threshold
        shares: dict[str, dict[int, bytes]] = {u: {} for u in self.u2}
        for revealed in self._reveals.values():
            for owner, (x, raw) in revealed.items():
                shares[owner][x] = raw
        short = [u for u in self.u2 if len(shares[u]) < t]
        if short:
            raise SecAggAbort("too_few_reveals", f"fewer than {t} shares for {short[:5]}")
        total = self._sum
        n = total.size
        for u in self.survivors:
            try:
                b = shamir.recover(shares[u], t)
            except shamir.ShamirError as exc:
                raise SecAggAbort("bad_share", f"self-mask seed of {u}: {exc}") from exc
            total -= prg(b, n)
        for u in self.dropped:
            s_pk = self._ads[u][1]
            try:
                raw = shamir.recover(
                    shares[u],
                    t,
                    accept=lambda k, s_pk=s_pk: (
                        _raw_pub(X25519PrivateKey.from_private_bytes(k).public_key()) == s_pk
                    ),
                )
            except shamir.ShamirError as exc:
                raise SecAggAbort("bad_share", f"mask key of {u}: {exc}") from exc
            s_sk = X25519PrivateKey.from_private_bytes(raw)
            for v in self.graph[u]:
                if v not in self._masked:
                    continue
                mask = prg(_mask_seed(s_sk, self._ads[v][1], self.federation, self.round, u, v), n)
                if v < u:  # v added +mask for u
                    total -= mask
                else:
                    total += mask
        values, weight = decode_sum(total, self.params)
        self.seconds["finish"] = time.perf_counter() - t0
        stats = {
            "u1": len(self.graph),
            "u2": len(self.u2),
            "u3": len(self.survivors),
            "u4": len(self._reveals),
            "degree": self.params.graph_degree(len(self.graph)),
            "threshold": t,
            "b_reconstructed": len(self.survivors),
            "s_reconstructed": len(self.dropped),
            "seconds": dict(self.seconds),
        }
        self._sum = None
        self.stage = "done"
        return values, weight, stats
