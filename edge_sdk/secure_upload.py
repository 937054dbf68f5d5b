"""What a device feeds into secure aggregation (aggregator/secure_round.py): its update as a delta
to the global it received, clipped, noised (distributed DP) and weighted, flattened in the order
the aggregator unflattens it (tensor names sorted).

The checks the aggregator can no longer make on a masked update happen here: the delta's L2
norm is clipped to ``clip`` and non-finite values are refused before anything is masked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from algorithms.core.wire_values import dtype_name, to_float64
from bridge.secagg import SecAggAbort


def flat_delta(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> np.ndarray:
    """The update's delta to ``reference`` as one float64 vector (names sorted)."""
    if set(update) != set(reference):
        raise SecAggAbort("bad_input", f"update tensors {sorted(set(update) ^ set(reference))[:5]} differ from "
                                       "the global's")
    parts = []
    for name in sorted(reference):
        u, ref = update[name], reference[name]
        if u.shape != ref.shape:
            raise SecAggAbort("bad_input", f"{name}: shape {u.shape} differs from the global's {ref.shape}")
        parts.append((to_float64(u, dtype_name(u)) - to_float64(ref, dtype_name(ref))).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def secure_input(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *, clip: float,
                 value_range: float, num_examples: int, weight_cap: int, noise_std: float = 0.0,
                 unweighted: bool = False, rng: np.random.Generator | None = None) -> tuple[np.ndarray, float, dict]:
    """(pre-weighted values in [-value_range, value_range], weight in (0, 1], metrics).

    The delta is clipped to L2 norm ``clip``; ``noise_std`` > 0 adds this client's share of
    the Gaussian noise (distributed DP); the result is multiplied by the weight
    min(num_examples, weight_cap) / weight_cap (1 when ``unweighted``). Values beyond
    ``value_range`` (clip plus eight noise deviations, so practically never) are clamped."""
    delta = flat_delta(update, reference)
    if not np.all(np.isfinite(delta)):
        raise SecAggAbort("bad_input", "the update has non-finite values")
    norm = float(np.linalg.norm(delta))
    clipped = norm > clip
    if clipped:
        delta *= clip / norm * (1 - 1e-9)
    if noise_std > 0:
        rng = rng or np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
        delta += rng.normal(0.0, noise_std, size=delta.shape)
    weight = 1.0 if unweighted else min(max(1, int(num_examples)), weight_cap) / weight_cap
    values = delta * weight if weight != 1.0 else delta
    if noise_std > 0:  # only noise can leave the range (practically never)
        np.minimum(values, value_range, out=values)
        np.maximum(values, -value_range, out=values)
    return values, weight, {"norm": norm, "clipped": clipped, "secure_weight": weight}


def open_session(party, task_config: Mapping, round: int, update: Mapping[str, np.ndarray],
                 reference: Mapping[str, np.ndarray], num_examples: int, *, rng: np.random.Generator | None = None):
    """A device's secure round from a Task's config: its update clipped, noised (central dp:
    this client's share) and weighted (unweighted under dp), in a
    :class:`bridge.secagg_session.ClientSession` for the provisioned ``party``. Returns
    ``(session, metrics)``; SecAggAbort when the task cannot be taken part in."""
    from bridge.secagg_session import secure_params, session_for

    params, clip, cap, noise = secure_params(task_config)
    dp = task_config.get("dp") or {}
    values, weight, info = secure_input(update, reference, clip=clip, value_range=params.clip,
                                        num_examples=num_examples, weight_cap=cap,
                                        noise_std=noise if dp.get("mode") == "central" else 0.0,
                                        unweighted=bool(dp), rng=rng)
    return session_for(party, round, params, values, weight), info
