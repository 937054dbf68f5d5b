"""The device's half of client-level differential privacy (aggregator/dp.py has the server's and
the accounting): clip the update's delta to the global it received to L2 norm ``clip`` *as
encoded* (the norm is measured again after re-encoding to the wire dtype and the scale shrunk
until it holds), and in local mode add N(0, (z C)^2) to every coordinate before upload."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .wire_values import dtype_name, encode, to_float64


class ClientDPError(ValueError):
    pass


def noise_rng(seed: int | None = None, *salt: int) -> np.random.Generator:
    """A Generator seeded from the OS's CSPRNG (128 bits), or from ``seed`` in tests."""
    if seed is None:
        return np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    return np.random.default_rng([int(seed), *[int(s) for s in salt]])


def _delta_norm(update: Mapping[str, np.ndarray], ref64: Mapping[str, np.ndarray]) -> float:
    sq = 0.0
    for name, r in ref64.items():
        d = (to_float64(update[name], dtype_name(update[name])) - r).ravel()
        sq += float(np.dot(d, d))
    return math.sqrt(sq)


def clip_to_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 clip: float) -> dict[str, np.ndarray]:
    """``update`` with its delta to ``reference`` scaled down to L2 norm <= ``clip`` once encoded
    in each tensor's wire dtype (unchanged when already within)."""
    if set(update) != set(reference):
        raise ClientDPError(f"update and reference differ in tensors: {sorted(set(update) ^ set(reference))[:5]}")
    ref64 = {n: to_float64(reference[n], dtype_name(reference[n])) for n in sorted(reference)}
    norm = _delta_norm(update, ref64)
    if norm <= clip:
        return dict(update)
    deltas = {n: to_float64(update[n], dtype_name(update[n])) - r for n, r in ref64.items()}
    scale = clip / norm
    for attempt in range(8):  # rounding to the wire dtype may land just outside: shrink a little
        out = {n: encode(ref64[n] + deltas[n] * scale, dtype_name(update[n])) for n in ref64}
        got = _delta_norm(out, ref64)
        if got <= clip:
            return out
        scale *= clip / got * (1.0 - 1e-7 * 10**attempt)
    raise ClientDPError(f"delta of norm {norm:.6g} cannot be clipped to {clip:.6g} within the wire dtype's precision")


def privatize_upload(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], dp: Mapping[str, Any],
                     *, salt: int = 0) -> dict[str, np.ndarray]:
    """Clip (both modes) and, in local mode, noise the update; same dtypes out."""
    clip = float(dp["clip"])
    clipped = clip_to_norm(update, reference, clip)
    if dp.get("mode") != "local":
        return clipped
    rng = noise_rng(dp.get("seed"), salt)
    std = float(dp["noise_multiplier"]) * clip
    return {n: encode(to_float64(clipped[n], dtype_name(clipped[n])) + rng.normal(0.0, std, size=clipped[n].shape),
                      dtype_name(clipped[n])) for n in sorted(clipped)}
