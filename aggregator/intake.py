"""One path from a received update to the round's aggregate, shared by the service and the
in-process simulator, so both validate and combine updates the same way.

- :func:`aggregation_rule`: the rule a round uses. A numeric rule comes from the service
  config ("fedavg", "median", "trimmed_mean"); an algorithm that declares
  ``aggregation = "collect"`` (its updates must not be averaged) always collects.
- :func:`check_update`: the runtime's spec checks (names, dtypes, shapes, finiteness, norm
  bound) for numeric rules; the algorithm's own ``validate_client_update`` for "collect", its
  :class:`~algorithms.base.UpdateRejected` turned into an :class:`InvalidUpdate` with the same
  reason.
- :func:`open_aggregator`: an empty aggregate, or the partial one a restart resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from algorithms.base import AlgorithmError, UpdateRejected

from .aggregation import (
    AGGREGATORS,
    RULES,
    Aggregator,
    Collect,
    aggregator_from_state,
    make_aggregator,
)
from .errors import InvalidUpdate, SpecError
from .state import Checkpoint
from .validation import UpdateSpec, ValidatedUpdate, validate_update

COLLECT = Collect.name

__all__ = ["COLLECT", "aggregation_rule", "check_update", "open_aggregator"]


def aggregation_rule(algorithm: Any, configured: str = "fedavg") -> str:
    """The rule for ``algorithm`` (a ServerAlgorithm) under the configured one. "fedavg" is the
    config default, so a collecting algorithm accepts it; any other numeric rule with a
    collecting algorithm (or "collect" with an averaging one) is a configuration error."""
    declared = getattr(algorithm, "aggregation", "fedavg")
    name = getattr(algorithm, "name", type(algorithm).__name__)
    if declared == COLLECT:
        if configured not in ("fedavg", COLLECT):
            raise SpecError(
                f"{name} collects its clients' updates (they cannot be averaged); "
                f"aggregation {configured!r} does not apply: leave it at the default"
            )
        return COLLECT
    if configured == COLLECT:
        raise SpecError(
            f"{name} averages its updates; aggregation 'collect' is only for algorithms "
            "that declare it"
        )
    if configured not in AGGREGATORS:
        raise SpecError(
            f"unknown aggregator {configured!r}; valid names: {', '.join(sorted(AGGREGATORS))}"
        )
    return configured


def check_update(
    algorithm: Any,
    rule: str,
    tensors: Mapping[str, np.ndarray],
    spec: UpdateSpec,
    *,
    client: str,
    max_norm: float | None = None,
    clip: bool = False,
) -> ValidatedUpdate:
    """A validated update, or :class:`InvalidUpdate` with a reason. Collected updates carry no
    norm bound (they are logits, not deltas of a shared state): ``norm`` is 0."""
    if rule != COLLECT:
        return validate_update(tensors, spec, max_norm=max_norm, clip=clip, client=client)
    try:
        kept = algorithm.validate_client_update(dict(tensors), client)
    except UpdateRejected as exc:
        reason = exc.reason if exc.reason in InvalidUpdate.REASONS else "payload"
        raise InvalidUpdate(reason, str(exc), client=client) from None
    except AlgorithmError as exc:  # an algorithm's other typed errors: still the client's payload
        raise InvalidUpdate("payload", str(exc), client=client) from None
    return ValidatedUpdate({n: _readonly(np.asarray(a)) for n, a in kept.items()}, 0.0, False)


def open_aggregator(
    rule: str,
    spec: UpdateSpec,
    *,
    partial: Checkpoint | None = None,
    spill_dir: str | Path | None = None,
    trim_fraction: float = 0.1,
) -> Aggregator:
    """A fresh aggregate for ``spec`` under ``rule``, or (``partial`` given) the one a restart
    resumes, rebuilt from its persisted rule and parameters. Spilling rules keep their files in
    ``spill_dir`` (a temporary directory when None: not resumable)."""
    if partial is not None:
        name = partial.meta.get("aggregate")
        cls = RULES.get(name)
        kw = (
            {"spill_dir": str(spill_dir)}
            if cls is not None and cls.spills and spill_dir is not None
            else {}
        )
        return aggregator_from_state(partial, **kw)
    kw: dict[str, Any] = {}
    if RULES[rule].spills and spill_dir is not None:
        kw["spill_dir"] = str(spill_dir)
    if rule == "trimmed_mean":
        kw["trim_fraction"] = trim_fraction
    agg = make_aggregator(rule, **kw)
    agg.begin(spec)
    return agg


def _readonly(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view
