"""Shamir secret sharing of 32-byte secrets over the prime field GF(2**521 - 1), for
:mod:`bridge.secagg`.

A secret (read as a big-endian integer, below 2**256) is the constant term of a random
polynomial of degree ``t - 1``; a share is the polynomial's value at a nonzero ``x``, written as
a fixed 66-byte big-endian integer. Any ``t`` shares give the secret back by Lagrange
interpolation at 0; ``t - 1`` shares are independent of it.

Pure arithmetic: errors are :class:`ShamirError` (a :class:`ValueError`); :mod:`bridge.secagg`
turns them into its own typed errors.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Mapping, Sequence

#: the Mersenne prime 2**521 - 1: every 32-byte secret is a field element
P = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)
#: x coordinates travel as 4-byte integers
MAX_X = 2**32 - 1


class ShamirError(ValueError):
    """Bad arguments or shares (too few, duplicated x, out of range, wrong length)."""


def eval_poly(coeffs: Sequence[int], x: int) -> int:
    """``coeffs[0] + coeffs[1]*x + ...`` mod P (Horner)."""
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % P
    return acc


def lagrange_at(points: Mapping[int, int], x: int = 0) -> int:
    """Value at ``x`` of the unique polynomial of degree < len(points) through ``points``
    ({x_i: y_i}, distinct x_i), mod P."""
    xs = list(points)
    total = 0
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (x - xj) % P
                den = den * (xi - xj) % P
        total = (total + points[xi] * num * pow(den, -1, P)) % P
    return total


def int_to_share(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_to_int(raw: bytes) -> int:
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != SHARE_BYTES:
        raise ShamirError(f"a share is {SHARE_BYTES} bytes")
    y = int.from_bytes(raw, "big")
    if y >= P:
        raise ShamirError("share value outside the field")
    return y


def _check_t(t: int) -> None:
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ShamirError(f"threshold must be a positive int, got {t!r}")


def _check_x(x: int) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= MAX_X:
        raise ShamirError(f"share x must be an int in [1, {MAX_X}], got {x!r}")


def split_with_coeffs(coeffs: Sequence[int], xs: Sequence[int]) -> dict[int, bytes]:
    """Shares of the polynomial ``coeffs`` (constant term = secret) at ``xs``."""
    for x in xs:
        _check_x(x)
    if len(set(xs)) != len(xs):
        raise ShamirError("share x values must be distinct")
    return {x: int_to_share(eval_poly(coeffs, x)) for x in xs}


def split(secret: bytes, xs: Sequence[int], t: int) -> dict[int, bytes]:
    """Shares of ``secret`` (32 bytes) at ``xs``; any ``t`` of them recover it."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
        raise ShamirError(f"the secret is {SECRET_BYTES} bytes")
    _check_t(t)
    if len(xs) < t:
        raise ShamirError(f"{len(xs)} shares cannot reach threshold {t}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(P) for _ in range(t - 1)]
    return split_with_coeffs(coeffs, xs)


def _points(shares: Mapping[int, bytes]) -> dict[int, int]:
    out = {}
    for x, raw in shares.items():
        _check_x(x)
        out[x] = share_to_int(raw)
    return out


def _to_secret(value: int) -> bytes:
    if value >= 2 ** (8 * SECRET_BYTES):
        raise ShamirError("shares do not interpolate to a 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")


def combine(shares: Mapping[int, bytes], t: int) -> bytes:
    """The secret from the first ``t`` shares sorted by x (Lagrange at 0)."""
    _check_t(t)
    if len(shares) < t:
        raise ShamirError(f"{len(shares)} shares, threshold is {t}")
    points = _points(shares)
    first = {x: points[x] for x in sorted(points)[:t]}
    return _to_secret(lagrange_at(first, 0))


def recover(
    shares: Mapping[int, bytes],
    t: int,
    accept: Callable[[bytes], bool] | None = None,
    max_tries: int = 512,
) -> bytes:
    """Like :func:`combine`, tolerating some wrong shares when more than ``t`` are given.

    With ``accept`` (a check of a candidate secret, e.g. "derives the advertised public key"),
    t-subsets are tried in order until one passes. Without it, the candidate polynomial from a
    t-subset must agree with at least ``(len(shares) + t) / 2`` of the shares (the unique
    decoding radius: wrong shares up to ``(len - t) / 2`` are corrected). Exactly ``t`` shares
    cannot be checked and are taken as they are. At most ``max_tries`` subsets are tried."""
    _check_t(t)
    if len(shares) < t:
        raise ShamirError(f"{len(shares)} shares, threshold is {t}")
    points = _points(shares)
    xs = sorted(points)
    for subset in itertools.islice(itertools.combinations(xs, t), max_tries):
        base = {x: points[x] for x in subset}
        try:
            secret = _to_secret(lagrange_at(base, 0))
        except ShamirError:
            continue
        if accept is not None:
            if accept(secret):
                return secret
            continue
        agree = t + sum(1 for x in xs if x not in base and lagrange_at(base, x) == points[x])
        if 2 * agree >= len(xs) + t:
            return secret
    raise ShamirError("no t-subset of the shares gives a consistent secret")
