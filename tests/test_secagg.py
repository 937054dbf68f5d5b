"""SecAgg+ protocol core (bridge.secagg, bridge.shamir): real crypto, in-process rounds."""

from __future__ import annotations

import base64
import itertools
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from scipy.stats import chi2

from bridge import shamir
from bridge.errors import BridgeError
from bridge.secagg import (
    SecAggAbort,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggRejected,
    SecAggServer,
    _ad_message,
    decode_sum,
    encode_input,
    neighbour_graph,
    prg,
    shamir_combine,
    shamir_split,
)

FED = "fed-test"
RND = 7
P = 2**521 - 1


def raw_pub(key) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def flip(raw: bytes, i: int = 0) -> bytes:
    return raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1 :]


def flip_b64(text: str, i: int = 0) -> str:
    return b64(flip(base64.b64decode(text), i))


class Round:
    """One in-process round: n clients with seeded pre-weighted inputs and one server.
    Each step takes the clients that drop out before it (``skip``)."""

    def __init__(
        self,
        n: int,
        params: SecAggParams,
        *,
        seed: int = 0,
        length: int = 32,
        graph_seed: bytes = b"graph-seed",
    ):
        self.params = params
        self.ids = [f"dev-{i:03d}" for i in range(n)]
        self.keys = {u: Ed25519PrivateKey.generate() for u in self.ids}
        self.clients = {u: SecAggClient(u, FED, RND, params, self.keys[u]) for u in self.ids}
        self.server = SecAggServer(FED, RND, params, graph_seed)
        rng = np.random.default_rng(seed)
        self.weights = {u: float(rng.uniform(0.05, 1.0)) for u in self.ids}
        # pre-weighted inputs: w * x with x in [-clip, clip]
        self.inputs = {
            u: rng.uniform(-1, 1, length) * params.clip * self.weights[u] for u in self.ids
        }

    def advertise(self, skip=()):
        self.ads = {u: self.clients[u].advertise() for u in self.ids}
        for u in self.ids:
            if u not in skip:
                self.server.add_advertisement(u, self.ads[u], raw_pub(self.keys[u]))
        self.nbrs = self.server.close_advertise()

    def share(self, skip=()):
        for u in self.nbrs:
            if u not in skip:
                self.server.add_shares(u, self.clients[u].share_keys(self.nbrs[u]))
        self.inbox = self.server.close_shares()
        for v, cts in self.inbox.items():
            self.clients[v].receive_shares(cts)

    def mask(self, skip=()):
        for u in self.inbox:
            if u not in skip:
                self.server.add_masked(
                    u, self.clients[u].masked_input(self.inputs[u], self.weights[u])
                )
        self.survivors, self.dropped = self.server.close_masked()

    def unmask(self, skip=()):
        for u in self.survivors:
            if u not in skip:
                self.server.add_reveal(u, self.clients[u].reveal(*self.server.unmask_request(u)))
        return self.server.finish()

    def run(self, before_shares=(), before_masked=(), no_reveal=()):
        self.advertise()
        self.share(before_shares)
        self.mask(before_masked)
        return self.unmask(no_reveal)

    def check(self, result) -> dict:
        """The secure sum equals the plain weighted sum over the survivors within the
        quantization bound n * 0.5 / scale per coordinate."""
        values, wsum, stats = result
        n = len(self.survivors)
        expected = np.sum([self.inputs[u] for u in self.survivors], axis=0)
        bound = n * 0.5 / self.params.value_scale() + 1e-12
        assert values.shape == expected.shape
        assert np.max(np.abs(values - expected)) <= bound
        expected_w = sum(self.weights[u] for u in self.survivors)
        assert abs(wsum - expected_w) <= n * 0.5 / self.params.weight_scale() + 1e-12
        return stats


# ---------------------------------------------------------------------------------- Shamir


def test_shamir_any_t_of_n_recover_and_t_minus_1_do_not():
    secret = bytes(range(32))
    shares = shamir_split(secret, list(range(1, 8)), 4)
    assert len(shares) == 7 and all(len(s) == 66 for s in shares.values())
    for subset in itertools.combinations(sorted(shares), 4):
        assert shamir_combine({x: shares[x] for x in subset}, 4) == secret
    assert shamir_combine(shares, 4) == secret  # more than t: the first t are used
    target = int.from_bytes(secret, "big")
    for subset in itertools.combinations(sorted(shares), 3):
        pts = {x: shamir.share_to_int(shares[x]) for x in subset}
        assert shamir.lagrange_at(pts, 0) != target
    with pytest.raises(SecAggError):
        shamir_combine({x: shares[x] for x in (1, 2, 3)}, 4)
    # fresh randomness: a second split of the same secret gives other shares
    assert shamir_split(secret, list(range(1, 8)), 4) != shares


def test_shamir_hand_checked_lagrange():
    # f(x) = 5 + 3x + 2x^2: f(1) = 10, f(2) = 19, f(3) = 32.
    # Lagrange weights at 0 for x = 1, 2, 3: (0-2)(0-3)/((1-2)(1-3)) = 3,
    # (0-1)(0-3)/((2-1)(2-3)) = -3, (0-1)(0-2)/((3-1)(3-2)) = 1 -> 30 - 57 + 32 = 5
    shares = shamir.split_with_coeffs([5, 3, 2], [1, 2, 3])
    assert {x: int.from_bytes(s, "big") for x, s in shares.items()} == {1: 10, 2: 19, 3: 32}
    assert shamir_combine(shares, 3) == (5).to_bytes(32, "big")
    # field arithmetic: f(x) = 9 - 4x mod p gives f(3) = p - 3; from x = 1, 3 the weights are
    # 3/2 and -1/2, and 1/2 = 2**520 mod p (2 * 2**520 = 2**521 = 1 mod p)
    shares = shamir.split_with_coeffs([9, P - 4], [1, 2, 3])
    assert int.from_bytes(shares[3], "big") == P - 3
    assert pow(2, -1, P) == 2**520
    half = 2**520
    assert (5 * 3 * half - (P - 3) * half) % P == 9
    assert shamir_combine({1: shares[1], 3: shares[3]}, 2) == (9).to_bytes(32, "big")


def test_shamir_malformed_and_robust_recovery():
    secret = b"\x11" * 32
    with pytest.raises(SecAggError):
        shamir_split(secret, [1, 1, 2], 2)  # duplicate x
    with pytest.raises(SecAggError):
        shamir_split(secret, [0, 1, 2], 2)  # x = 0 would be the secret itself
    with pytest.raises(SecAggError):
        shamir_split(secret[:31], [1, 2], 2)
    shares = shamir_split(secret, [1, 2, 3, 4, 5, 6, 7], 4)
    with pytest.raises(SecAggError):
        shamir_combine({**shares, 1: shares[1][:65]}, 4)
    with pytest.raises(SecAggError):
        shamir_combine({**shares, 1: P.to_bytes(66, "big")}, 4)
    bad = {**shares, 2: flip(shares[2], 65)}
    first_t = {x: shamir.share_to_int(bad[x]) for x in (1, 2, 3, 4)}
    assert shamir.lagrange_at(first_t, 0) != int.from_bytes(secret, "big")  # plain combine fails
    # one wrong share among 7 (t = 4) is corrected; so is a wrong share with a checker
    assert shamir.recover(bad, 4) == secret
    assert shamir.recover(bad, 4, accept=lambda s: s == secret) == secret
    # two wrong shares exceed the unique-decoding radius (7 - 4) / 2 without a checker
    worse = {**bad, 5: flip(shares[5], 65)}
    with pytest.raises(shamir.ShamirError):
        shamir.recover(worse, 4)
    assert shamir.recover(worse, 4, accept=lambda s: s == secret) == secret


# ---------------------------------------------------------------------------------- prg, graph


def test_prg_deterministic_seeded_and_spread():
    a, b = prg(b"\x01" * 32, 100_000), prg(b"\x02" * 32, 100_000)
    assert a.dtype == np.uint32 and a.shape == (100_000,)
    assert np.array_equal(a, prg(b"\x01" * 32, 100_000))
    assert np.mean(a == b) < 1e-3
    assert np.array_equal(prg(b"\x01" * 32, 10), a[:10])  # a prefix of the same keystream
    assert a.min() < 2**32 // 1000 and a.max() > 2**32 - 2**32 // 1000
    assert abs(a.astype(np.float64).mean() / 2**31 - 1) < 0.01
    # the keystream is AES-256 of the counter blocks 0, 1, 2, ... (checked with AES-ECB)
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    blocks = ecb.update(b"".join(i.to_bytes(16, "big") for i in range(3))) + ecb.finalize()
    assert prg(key, 12).tobytes() == blocks
    # FIPS-197 C.3: AES-256 of 00112233...eeff under the key 000102...1f
    pt = bytes.fromhex("00112233445566778899aabbccddeeff")
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    assert (ecb.update(pt) + ecb.finalize()).hex() == "8ea2b7ca516745bfeafc49904b496089"
    with pytest.raises(SecAggError):
        prg(b"short", 4)


def test_neighbour_graph_regular_symmetric_deterministic():
    clients = [f"c{i}" for i in range(50)]
    g = neighbour_graph(clients, 8, b"seed-1")
    assert set(g) == set(clients)
    for u, nb in g.items():
        assert len(nb) == 8 and len(set(nb)) == 8 and u not in nb
        assert nb == sorted(nb)
        for v in nb:
            assert u in g[v]
    assert neighbour_graph(list(reversed(clients)), 8, b"seed-1") == g
    assert neighbour_graph(clients, 8, b"seed-2") != g
    full = neighbour_graph(clients[:9], 8, b"x")
    assert all(nb == sorted(set(clients[:9]) - {u}) for u, nb in full.items())
    assert neighbour_graph(clients[:5], 30, b"x")["c0"] == ["c1", "c2", "c3", "c4"]
    with pytest.raises(SecAggError):
        neighbour_graph(clients, 7, b"x")  # odd degree below n - 1 has no ring
    with pytest.raises(SecAggError):
        neighbour_graph(["a", "a", "b"], 2, b"x")


def test_for_clients_degree_grows_logarithmically():
    p10, p100, p1000 = (SecAggParams.for_clients(n, 1.0) for n in (10, 100, 1000))
    # 3*log2(10) = 9.97 -> 10, capped at n - 1 = 9 (complete graph); t = ceil(4.5) + 1
    assert (p10.degree, p10.threshold) == (9, 6)
    # 3*log2(100) = 19.93 -> 20; 3*log2(1000) = 29.9 -> 30
    assert (p100.degree, p100.threshold) == (20, 11)
    assert (p1000.degree, p1000.threshold) == (30, 16)
    assert p1000.degree <= 2 * p100.degree
    assert SecAggParams.for_clients(10**6, 1.0).degree == 2 * p1000.degree  # n squared: doubled
    assert (
        p1000.max_clients == 1000
        and SecAggParams.for_clients(20, 1.0, max_clients=50).max_clients == 50
    )
    # two clients: valid params, but every round aborts (the sum would reveal the other input)
    p2 = SecAggParams.for_clients(2, 1.0)
    assert (p2.degree, p2.threshold) == (2, 2)
    r = Round(2, p2)
    with pytest.raises(SecAggAbort) as exc:
        r.advertise()
    assert exc.value.reason == "too_few_clients"
    with pytest.raises(SecAggError):  # below one half, a lying server could get both shares
        SecAggParams.for_clients(100, 1.0, threshold_fraction=0.3)
    with pytest.raises(SecAggError):
        SecAggParams.for_clients(0, 1.0)


def test_params_json_and_validation():
    p = SecAggParams.for_clients(100, 0.5)
    assert SecAggParams.from_json(p.to_json()) == p
    good = p.to_json()
    for bad in (
        {**good, "bits": 64},
        {**good, "threshold": 1},
        {**good, "threshold": 10},
        {**good, "threshold": 21},
        {**good, "clip": 0.0},
        {**good, "clip": float("nan")},
        {**good, "degree": 1},
        {**good, "max_clients": 1},
        {**good, "extra": 1},
        {**good, "clip": 1e9},
        {k: v for k, v in good.items() if k != "degree"},
        {**good, "max_clients": "100"},
        [1, 2],
    ):
        with pytest.raises(SecAggError):
            SecAggParams.from_json(bad)
    assert issubclass(SecAggError, BridgeError) and SecAggError.code == "secagg"
    err = SecAggAbort("too_few_clients", "1 advertised")
    assert (err.code, err.reason, err.detail) == ("secagg_abort", "too_few_clients", "1 advertised")
    assert "too_few_clients" in str(err) and "1 advertised" in str(err)
    assert SecAggRejected("duplicate").code == "secagg_rejected"


# ---------------------------------------------------------------------------------- fixed point


def test_encode_decode_hand_computed():
    p = SecAggParams(clip=1.0, max_clients=4, degree=2, threshold=2)
    scale = (2**31 - 1) // 4
    assert p.value_scale() == p.weight_scale() == scale == 536870911
    enc = encode_input(np.array([0.5, -0.25, 1.0, -1.0, 0.0]), 0.5, p)
    # 0.5 * 536870911 = 268435455.5 -> 268435456 (round half to even);
    # -0.25 * 536870911 = -134217727.75 -> -134217728 -> 2**32 - 134217728 as uint32
    assert enc.dtype == np.uint32
    assert enc.tolist() == [
        268435456,
        2**32 - 134217728,
        536870911,
        2**32 - 536870911,
        0,
        268435456,
    ]
    total = (enc.astype(np.uint64) * 4 % 2**32).astype(np.uint32)
    values, w = decode_sum(total, p)
    assert values.tolist() == [4 * 268435456 / scale, -4 * 134217728 / scale, 4.0, -4.0, 0.0]
    assert w == 4 * 268435456 / scale
    # the extremes of 4 clients stay inside int32 both ways
    lo = sum(encode_input(np.array([-1.0]), 1.0, p).astype(np.uint64) for _ in range(4)) % 2**32
    values, w = decode_sum(lo.astype(np.uint32), p)
    assert values.tolist() == [-4.0] and w == 4.0
    # within the 1e-9 slack: accepted, held at the bound
    assert encode_input(np.array([1.0 + 1e-12]), 1.0, p)[0] == 536870911


@pytest.mark.parametrize(
    "values,weight",
    [
        ([float("nan")], 1.0),
        ([float("inf")], 1.0),
        ([1.1], 1.0),
        ([-1.0001], 1.0),
        ([0.1], 0.0),
        ([0.1], 1.5),
        ([0.1], float("nan")),
        ([0.1], -0.5),
        ([[0.1]], 1.0),
    ],
)
def test_encode_refuses_bad_input(values, weight):
    p = SecAggParams(clip=1.0, max_clients=4, degree=2, threshold=2)
    with pytest.raises(SecAggAbort) as exc:
        encode_input(np.array(values), weight, p)
    assert exc.value.reason == "bad_input"


# ---------------------------------------------------------------------------------- protocol


def test_full_round_ten_clients_matches_plain_weighted_sum():
    r = Round(10, SecAggParams.for_clients(10, clip=1.0), seed=1, length=64)
    stats = r.check(r.run())
    assert stats["u1"] == stats["u2"] == stats["u3"] == stats["u4"] == 10
    assert stats["b_reconstructed"] == 10 and stats["s_reconstructed"] == 0
    assert set(stats["seconds"]) >= {"advertise", "shares", "masked", "unmask"}
    assert r.server.stage == "done"


def test_dropout_after_advertise():
    r = Round(10, SecAggParams.for_clients(10, clip=1.0), seed=2)
    stats = r.check(r.run(before_shares=["dev-004"]))
    assert (stats["u1"], stats["u2"], stats["u3"]) == (10, 9, 9)
    assert "dev-004" not in r.survivors and r.dropped == []


def test_thirty_percent_drop_after_share_keys():
    r = Round(10, SecAggParams.for_clients(10, clip=1.0), seed=3)
    gone = ["dev-001", "dev-005", "dev-008"]
    stats = r.check(r.run(before_masked=gone))
    assert r.dropped == gone and stats["s_reconstructed"] == 3 and stats["u3"] == 7


def test_survivor_that_does_not_reveal():
    r = Round(10, SecAggParams.for_clients(10, clip=1.0), seed=4)
    stats = r.check(r.run(before_masked=["dev-002"], no_reveal=["dev-006"]))
    assert "dev-006" in r.survivors and stats["u4"] == 8


def test_too_few_reveals_aborts():
    r = Round(10, SecAggParams.for_clients(10, clip=1.0), seed=5)
    r.advertise()
    r.share()
    r.mask()
    with pytest.raises(SecAggAbort) as exc:
        r.unmask(skip=r.survivors[:4])  # each survivor holds 5 shares < t = 6
    assert exc.value.reason == "too_few_reveals" and r.server.stage == "aborted"


def test_t_minus_1_dropouts_in_a_neighbourhood_recover():
    # complete graph of 10, degree 9, t = 5: 4 = t - 1 neighbours of everyone may drop
    p = SecAggParams(clip=1.0, max_clients=10, degree=9, threshold=5)
    r = Round(10, p, seed=6)
    r.check(r.run(before_masked=["dev-000", "dev-003", "dev-004", "dev-009"]))


def _ring_round_dropping(k: int):
    p = SecAggParams.for_clients(30, clip=1.0)
    assert (p.degree, p.threshold) == (16, 9)
    r = Round(30, p, seed=7)
    r.advertise()
    r.share()
    target = r.ids[0]
    gone = r.server.graph[target][:k]
    return r, gone


def test_ring_neighbourhood_tolerates_degree_minus_t_dropouts():
    r, gone = _ring_round_dropping(16 - 9)
    r.mask(skip=gone)
    r.check(r.unmask())
    assert r.dropped == sorted(gone)


def test_too_many_dropouts_abort_before_anyone_reveals():
    r, gone = _ring_round_dropping(16 - 9 + 1)
    with pytest.raises(SecAggAbort) as exc:
        r.mask(skip=gone)
    assert exc.value.reason == "too_few_neighbours"
    assert r.server.stage == "aborted"
    # nobody was asked for shares: every client still waits to reveal
    assert all(r.clients[u].stage == "reveal" for u in r.ids if u not in gone)
    with pytest.raises(SecAggError):
        r.server.unmask_request(r.ids[0])
    with pytest.raises(SecAggError):
        r.server.finish()


def test_too_few_clients_and_neighbours_abort():
    p = SecAggParams.for_clients(10, clip=1.0, min_clients=3)
    r = Round(10, p)
    with pytest.raises(SecAggAbort) as exc:
        r.advertise(skip=r.ids[2:])
    assert exc.value.reason == "too_few_clients"
    r = Round(10, p)
    with pytest.raises(SecAggAbort) as exc:  # 5 clients: degree 4 < t = 6
        r.advertise(skip=r.ids[5:])
    assert exc.value.reason == "too_few_clients" and "degree 4" in exc.value.detail
    r = Round(10, p)
    r.advertise()
    with pytest.raises(SecAggAbort) as exc:  # 6 send shares: 5 neighbours each < 6
        r.share(skip=r.ids[6:])
    assert exc.value.reason == "too_few_neighbours"


# ---------------------------------------------------------------------------------- malicious server


def _round_ready_to_reveal(n=10, seed=8):
    r = Round(n, SecAggParams.for_clients(n, clip=1.0), seed=seed)
    r.advertise()
    r.share()
    r.mask()
    return r


def test_client_refuses_survivor_and_dropped_at_once():
    r = _round_ready_to_reveal()
    u, v = r.ids[0], r.ids[1]
    others = [w for w in r.ids if w != u]
    with pytest.raises(SecAggAbort) as exc:
        r.clients[u].reveal(others, [v])
    assert exc.value.reason == "unmask_refused"
    with pytest.raises(SecAggAbort):  # and nothing afterwards, even a fair request
        r.clients[u].reveal(others, [])


def test_client_refuses_second_request():
    r = _round_ready_to_reveal()
    u, v = r.ids[0], r.ids[1]
    others = [w for w in r.ids if w != u]
    first = r.clients[u].reveal(others, [])
    assert set(first[v]) == {"x", "b"}
    with pytest.raises(SecAggAbort) as exc:
        r.clients[u].reveal([w for w in others if w != v], [v])
    assert exc.value.reason == "unmask_refused"


@pytest.mark.parametrize("case", ["self_dropped", "unaccounted", "too_few_survivors"])
def test_client_refuses_bad_requests(case):
    r = _round_ready_to_reveal()
    u = r.ids[0]
    others = [w for w in r.ids if w != u]
    surv, drop = {
        "self_dropped": (others, [u]),
        "unaccounted": (others[:-1], []),
        "too_few_survivors": (others[:4], others[4:]),  # 4 + self = 5 < t = 6
    }[case]
    with pytest.raises(SecAggAbort) as exc:
        r.clients[u].reveal(surv, drop)
    assert exc.value.reason == "unmask_refused"


def test_split_view_never_reaches_t_shares_of_both_kinds():
    """The server tells 4 of the target's 9 neighbours that it survived and 5 that it dropped:
    with 2t > degree neither kind reaches t = 6 shares."""
    r = _round_ready_to_reveal(seed=9)
    target = r.ids[3]
    b_shares, s_shares = {}, {}
    for i, u in enumerate(w for w in r.ids if w != target):
        others = [w for w in r.ids if w not in (u, target)]
        surv, drop = (others + [target], []) if i < 4 else (others, [target])
        out = r.clients[u].reveal(surv, drop)
        assert set(out) == set(others) | {target}
        (b_shares if "b" in out[target] else s_shares)[out[target]["x"]] = out[target]
    t = r.params.threshold
    assert (len(b_shares), len(s_shares), t) == (4, 5, 6)
    # the 5 s shares do not give the target's s key
    s_pk = base64.b64decode(r.ads[target]["s_pk"])
    pts = {x: base64.b64decode(e["s"]) for x, e in s_shares.items()}
    with pytest.raises(shamir.ShamirError):
        shamir.recover(
            pts, len(pts), accept=lambda k: raw_pub(X25519PrivateKey.from_private_bytes(k)) == s_pk
        )


def test_reveal_gives_one_kind_per_client_for_any_request():
    r = _round_ready_to_reveal(seed=10)
    rng = np.random.default_rng(10)
    answered = 0
    for u in r.ids:
        pool = r.ids  # requests may name the client itself, overlap, or miss someone
        surv = [w for w in pool if rng.random() < 0.85]
        drop = [w for w in pool if w != u and (w not in surv or rng.random() < 0.05)]
        try:
            out = r.clients[u].reveal(surv, drop)
        except SecAggAbort as exc:
            assert exc.reason == "unmask_refused"
            assert (
                set(surv) & set(drop)
                or len(set(surv) - {u}) + 1 < r.params.threshold
                or set(r.ids) - {u} - set(surv) - set(drop)
            )
        else:
            answered += 1
            assert set(out) == set(r.ids) - {u}
            for v, entry in out.items():
                assert set(entry) == ({"x", "b"} if v in surv else {"x", "s"})
        with pytest.raises(SecAggAbort):
            r.clients[u].reveal(surv, drop)
    assert 0 < answered < len(r.ids)


# ---------------------------------------------------------------------------------- tampering


def test_server_rejects_bad_advertisements_and_goes_on():
    p = SecAggParams.for_clients(10, clip=1.0, max_clients=9)
    r = Round(10, p, seed=10)
    srv = r.server
    ads = {u: r.clients[u].advertise() for u in r.ids}
    a, b, c = r.ids[:3]
    cases = [
        ("bad_signature", a, {**ads[a], "sig": flip_b64(ads[a]["sig"])}, raw_pub(r.keys[a])),
        ("bad_signature", a, {**ads[a], "s_pk": ads[b]["s_pk"]}, raw_pub(r.keys[a])),  # key swap
        ("bad_signature", b, ads[a], raw_pub(r.keys[b])),  # a's ad replayed as b's
        ("bad_request", a, {"c_pk": ads[a]["c_pk"]}, raw_pub(r.keys[a])),
    ]
    for reason, who, ad, pub in cases:
        with pytest.raises(SecAggRejected) as exc:
            srv.add_advertisement(who, ad, pub)
        assert exc.value.reason == reason
    srv.add_advertisement(a, ads[a], raw_pub(r.keys[a]))
    # validly signed advertisements with a low-order key, or reusing a's key
    mallory = Ed25519PrivateKey.generate()
    for reason, c_pk in (
        ("bad_request", bytes(32)),
        ("duplicate", base64.b64decode(ads[a]["c_pk"])),
    ):
        s_pk = raw_pub(X25519PrivateKey.generate())
        sig = mallory.sign(_ad_message(FED, RND, "mallory", c_pk, s_pk))
        with pytest.raises(SecAggRejected) as exc:
            srv.add_advertisement(
                "mallory", {"c_pk": b64(c_pk), "s_pk": b64(s_pk), "sig": b64(sig)}, raw_pub(mallory)
            )
        assert exc.value.reason == reason
    with pytest.raises(SecAggRejected) as exc:
        srv.add_advertisement(a, ads[a], raw_pub(r.keys[a]))
    assert exc.value.reason == "duplicate"
    for u in r.ids[1:9]:
        srv.add_advertisement(u, ads[u], raw_pub(r.keys[u]))
    with pytest.raises(SecAggRejected) as exc:  # max_clients = 9
        srv.add_advertisement(r.ids[9], ads[r.ids[9]], raw_pub(r.keys[r.ids[9]]))
    assert exc.value.reason == "round_full"
    r.ads, r.nbrs = ads, srv.close_advertise()
    assert set(r.nbrs) == set(r.ids[:9])
    r.share()
    r.mask()
    r.check(r.unmask())
    assert c in r.survivors


def test_client_rejects_tampered_neighbour_keys():
    r = Round(10, SecAggParams.for_clients(10, clip=1.0))
    r.advertise()
    u, v = r.ids[0], r.ids[1]
    nb = {w: dict(e) for w, e in r.nbrs[u].items()}
    nb[v]["s_pk"] = r.nbrs[u][r.ids[2]]["s_pk"]  # the server substitutes a key
    with pytest.raises(SecAggAbort) as exc:
        r.clients[u].share_keys(nb)
    assert (exc.value.reason, exc.value.detail) == ("bad_signature", v)
    assert r.clients[u].stage == "aborted"
    with pytest.raises(SecAggError):
        r.clients[u].share_keys(r.nbrs[u])
    u = r.ids[3]
    cases = [
        ("bad_request", {**r.nbrs[u], u: r.nbrs[r.ids[4]][u]}),  # self among neighbours
        ("too_few_neighbours", dict(list(r.nbrs[u].items())[:5])),
        ("bad_request", {**r.nbrs[u], "x": r.nbrs[u][r.ids[4]]}),  # 10 > degree
    ]
    # a validly signed neighbour entry that reuses another neighbour's key
    mallory, w = Ed25519PrivateKey.generate(), r.ids[4]
    c_pk, s_pk = base64.b64decode(r.nbrs[u][r.ids[5]]["c_pk"]), raw_pub(X25519PrivateKey.generate())
    forged = {
        "c_pk": b64(c_pk),
        "s_pk": b64(s_pk),
        "sign_pub": b64(raw_pub(mallory)),
        "sig": b64(mallory.sign(_ad_message(FED, RND, w, c_pk, s_pk))),
    }
    cases.append(("bad_request", {**r.nbrs[u], w: forged}))
    cases.append(("bad_request", {**r.nbrs[u], w: {**r.nbrs[u][w], "sign_pub": "!!"}}))
    for reason, nbrs in cases:
        c = SecAggClient(u, FED, RND, r.params, r.keys[u])
        c.advertise()
        with pytest.raises(SecAggAbort) as exc:
            c.share_keys(nbrs)
        assert exc.value.reason == reason, exc.value


def test_tampered_or_misrouted_share_ciphertext():
    r = Round(10, SecAggParams.for_clients(10, clip=1.0))
    r.advertise()
    for u in r.ids:
        r.server.add_shares(u, r.clients[u].share_keys(r.nbrs[u]))
    inbox = r.server.close_shares()
    v, u, w = r.ids[0], r.ids[1], r.ids[2]
    tampered = {**inbox[v], u: flip(inbox[v][u], 20)}
    with pytest.raises(SecAggAbort) as exc:
        r.clients[v].receive_shares(tampered)
    assert (exc.value.reason, exc.value.detail) == ("bad_share", u)
    misrouted = {**inbox[w], u: inbox[v][u]}  # u's shares for v handed to w
    with pytest.raises(SecAggAbort) as exc:
        r.clients[w].receive_shares(misrouted)
    assert (exc.value.reason, exc.value.detail) == ("bad_share", u)
    stranger = r.ids[3]
    with pytest.raises(SecAggAbort) as exc:
        r.clients[stranger].receive_shares({**inbox[stranger], "nobody": inbox[stranger][u]})
    assert exc.value.reason == "bad_request"


def test_server_rejects_bad_shares_and_masked_inputs_without_harm():
    r = Round(10, SecAggParams.for_clients(10, clip=1.0), seed=11)
    r.advertise()
    srv = r.server
    u = r.ids[0]
    cts = r.clients[u].share_keys(r.nbrs[u])
    for bad in (
        {k: cts[k] for k in list(cts)[:-1]},
        {**cts, "stranger": b"\0" * 40},
        {**cts, r.ids[1]: b"short"},
    ):
        with pytest.raises(SecAggRejected):
            srv.add_shares(u, bad)
    srv.add_shares(u, cts)
    with pytest.raises(SecAggRejected):
        srv.add_shares(u, cts)
    for w in r.ids[1:]:
        srv.add_shares(w, r.clients[w].share_keys(r.nbrs[w]))
    r.inbox = srv.close_shares()
    for v, c in r.inbox.items():
        r.clients[v].receive_shares(c)
    ys = {w: r.clients[w].masked_input(r.inputs[w], r.weights[w]) for w in r.ids}
    srv.add_masked(u, ys[u])
    y = ys[r.ids[1]]
    for bad in (
        y[:-1],
        np.concatenate([y, y[:1]]),
        y.astype(np.int64),
        y.astype(np.float32),
        y.astype(np.uint16),
        y.reshape(1, -1),
        list(y),
    ):
        with pytest.raises(SecAggRejected):
            srv.add_masked(r.ids[1], bad)
    with pytest.raises(SecAggRejected):
        srv.add_masked(u, ys[u])  # duplicate
    with pytest.raises(SecAggRejected):
        srv.add_masked("stranger", y)
    for w in r.ids[1:]:
        srv.add_masked(w, ys[w])
    r.survivors, r.dropped = srv.close_masked()
    r.check(r.unmask())


def test_server_rejects_bad_reveals_and_still_finishes():
    r = _round_ready_to_reveal(seed=12)
    srv = r.server
    u = r.survivors[0]
    surv, drop = srv.unmask_request(u)
    assert u not in surv and set(surv) | set(drop) == set(r.server.graph[u])
    good = r.clients[u].reveal(surv, drop)
    v = surv[0]
    wrong_x = {**good, v: {**good[v], "x": good[v]["x"] + 1}}
    wrong_kind = {**good, v: {"x": good[v]["x"], "s": good[v]["b"]}}
    for bad in (wrong_x, wrong_kind, {**good, "stranger": good[v]}):
        with pytest.raises(SecAggRejected):
            srv.add_reveal(u, bad)
    srv.add_reveal(u, good)
    with pytest.raises(SecAggRejected):
        srv.add_reveal(u, good)
    r.check(r.unmask(skip=[u]))


def test_steps_out_of_order():
    p = SecAggParams.for_clients(10, clip=1.0)
    c = SecAggClient("a", FED, RND, p, Ed25519PrivateKey.generate())
    with pytest.raises(SecAggError):
        c.share_keys({})
    with pytest.raises(SecAggError):
        c.masked_input(np.zeros(3), 1.0)
    c.advertise()
    with pytest.raises(SecAggError):
        c.advertise()
    s = SecAggServer(FED, RND, p, b"seed")
    for call in (
        s.close_shares,
        s.close_masked,
        s.finish,
        lambda: s.add_masked("a", np.zeros(2, np.uint32)),
    ):
        with pytest.raises(SecAggError):
            call()
    r = _round_ready_to_reveal()
    with pytest.raises(SecAggError):
        r.clients[r.ids[0]].masked_input(r.inputs[r.ids[0]], 0.5)  # only once
    with pytest.raises(SecAggError) as exc:
        r.server.add_advertisement("late", r.ads[r.ids[0]], raw_pub(r.keys[r.ids[0]]))
    assert type(exc.value) is SecAggError


# ---------------------------------------------------------------------------------- leakage, scale


def test_masked_input_looks_uniform():
    r = Round(3, SecAggParams.for_clients(3, clip=1.0), length=100_000)
    u = r.ids[0]
    r.inputs[u] = np.zeros(100_000)
    r.advertise()
    r.share()
    y = r.clients[u].masked_input(r.inputs[u], r.weights[u])
    plain = encode_input(r.inputs[u], r.weights[u], r.params)

    def top8_chi2(a: np.ndarray) -> float:
        counts = np.bincount((a >> 24).astype(np.int64), minlength=256)
        expected = a.size / 256
        return float(np.sum((counts - expected) ** 2 / expected))

    critical = chi2.ppf(1 - 1e-6, df=255)
    assert top8_chi2(y) < critical
    assert top8_chi2(plain) > critical  # the statistic does see a non-uniform vector
    assert np.mean(y == plain) < 1e-3


def test_hundred_clients_round_is_fast():
    p = SecAggParams.for_clients(100, clip=1.0)
    t0 = time.perf_counter()
    r = Round(100, p, seed=13, length=10_000)
    stats = r.check(r.run(before_masked=[f"dev-{i:03d}" for i in (5, 50, 95)]))
    elapsed = time.perf_counter() - t0
    assert stats["degree"] == 20 and stats["s_reconstructed"] == 3
    assert elapsed < 30, f"100-client round took {elapsed:.1f} s"


def test_degree_is_sized_for_the_expected_dropout_rate():
    import math

    def survives_below(k: int, t: int, q: float) -> float:  # P[Binomial(k, 1 - q) < t], by hand
        return sum(math.comb(k, i) * (1 - q) ** i * q ** (k - i) for i in range(t))

    for n, q in ((1000, 0.3), (10_000, 0.2), (1000, 0.1)):
        p = SecAggParams.for_clients(n, 1.0, dropout_rate=q)
        k, t = p.degree, p.threshold
        assert t == math.ceil(k / 2) + 1 and k % 2 == 0
        assert n * survives_below(k, t, q) <= 1e-6  # every neighbourhood keeps t, but for 1e-6
        k2 = k - 2
        assert k2 < math.ceil(3 * math.log2(n)) or n * survives_below(k2, math.ceil(k2 / 2) + 1, q) > 1e-6
    # no dropouts expected: the logarithmic SecAgg+ degree; many: the complete graph for small n
    assert SecAggParams.for_clients(1000, 1.0).degree == 30
    assert SecAggParams.for_clients(100, 1.0, dropout_rate=0.3).degree == 99
    with pytest.raises(SecAggError):
        SecAggParams.for_clients(100, 1.0, dropout_rate=0.5)
