"""Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022) as pure math plus a
checkpointable buffer; no I/O beyond ``state_dict``.

Clients train on whichever global *version* they downloaded. When an update arrives while the
global is at version ``v``, it was trained from base version ``b`` and its staleness is
``tau = v - b``. The runtime turns it into a delta against that base (:func:`client_delta`),
rejects it when ``tau > max_staleness`` (reason ``"stale"``, :func:`check_staleness`) and folds
it into a :class:`DeltaBuffer`. After ``K = buffer_size`` accepted updates the buffer produces
version ``v + 1``::

    global_{v+1} = global_v + server_lr * sum_i s(tau_i) * d_i * delta_i / sum_i d_i

- ``s(tau)`` is the staleness weight (:func:`staleness_weight`): ``"polynomial"``
  ``(1 + tau)^-a`` (a = 0.5 by default, the FedBuff/FedAsync choice), ``"constant"`` 1, or
  ``"hinge"`` 1 for ``tau <= b`` and ``1 / (a (tau - b) + 1)`` beyond (FedAsync).
- ``d_i`` is the data weight: 1 by default, or with ``example_weighting`` the client's
  ``num_examples`` capped at ``max_examples`` (a self-reported count cannot outweigh the rest of
  the buffer without bound).

Normalisation: by the sum of the *data* weights, never by the staleness factors. Without
example weighting that sum is exactly ``K``: the paper's ``(1/K) sum_i s(tau_i) delta_i``. The
staleness factors stay un-normalised on purpose: a buffer of stale updates then takes a shorter
step, which is what ``s`` is for. Dividing by ``sum_i s(tau_i) d_i`` instead would cancel any
staleness shared by the whole buffer (with ``K = 1``, FedAsync-style, ``s`` would have no effect
at all). With example weighting the rule is FedAvg's sample-weighted mean of the deltas, each
scaled by its ``s(tau)``; with ``tau = 0`` everywhere and ``server_lr = 1`` a full buffer of
every client is one synchronous FedAvg round (exactly with an fp32 wire; with fp16/bf16 the
buffered global also keeps the float32 residual that broadcasting in the wire dtype drops).

Which tensors are deltas: FedAvg-LoRA (and every algorithm built on its round plumbing:
FedCoLLM, FedPT, FedBiOT) uploads the client's *full* adapter state in the wire dtype, and its
``finish_round`` expects the aggregate as a full adapter state (the averaged adapter). So only
the buffer holds deltas: :func:`client_delta` subtracts the base version's *wire* state (exactly
what that client downloaded and started from, so the float32 -> wire rounding of the broadcast
is not mistaken for client progress), and :meth:`DeltaBuffer.apply` turns the buffered step
back into a full state, ``current + step``, for ``finish_round``. Algorithms whose updates are
not averaged (``aggregation = "collect"``, FedMKT's logits) have no delta and no buffered mode.

Memory is O(one update): deltas are folded into float64 running sums as they arrive, like
:class:`~aggregator.aggregation.WeightedMean`. A checkpoint (``state_dict``) after any ``add``
resumes bit-identically.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .errors import AggregatorError, InvalidUpdate, SpecError, StateError
from .state import Checkpoint
from .validation import UpdateSpec, check_structure, to_float64

__all__ = [
    "STALENESS_KINDS",
    "BufferedConfig",
    "DeltaBuffer",
    "buffer_from_state",
    "check_staleness",
    "client_delta",
    "staleness_weight",
]

STATE_VERSION = 1
#: staleness functions s(tau) by config name
STALENESS_KINDS = ("polynomial", "constant", "hinge")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclass(frozen=True)
class BufferedConfig:
    """Settings of buffered asynchronous rounds.

    - ``buffer_size`` K: accepted updates per new global version (K >= 1; K = 1 applies every
      update as it arrives, FedAsync-like).
    - ``max_staleness``: updates trained on a version more than this many versions behind the
      current one are rejected with reason ``"stale"`` (0 accepts only the current version).
    - ``staleness``: ``"polynomial"`` (1 + tau)^-a, ``"constant"`` 1, ``"hinge"``: 1 up to
      ``hinge_cutoff`` b, then 1 / (a (tau - b) + 1). ``staleness_exponent`` is a.
    - ``server_lr``: the server step size on the buffered mean delta (1.0: take it as it is).
    - ``concurrency``: how many clients train at once (the runtime keeps that many tasks out).
    - ``example_weighting``: weight each delta by the client's ``num_examples``, capped at
      ``max_examples`` (off by default, as in the paper; see the module docstring for the
      normalisation).
    """

    buffer_size: int = 4
    max_staleness: int = 8
    staleness: str = "polynomial"
    staleness_exponent: float = 0.5
    hinge_cutoff: int = 4
    server_lr: float = 1.0
    concurrency: int = 8
    example_weighting: bool = False
    max_examples: int = 10_000

    def __post_init__(self) -> None:
        for name, low in (("buffer_size", 1), ("max_staleness", 0), ("hinge_cutoff", 0),
                          ("concurrency", 1), ("max_examples", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise SpecError(f"buffered: {name} must be an integer >= {low}, got {value!r}")
        if self.staleness not in STALENESS_KINDS:
            raise SpecError(
                f"buffered: staleness must be one of {', '.join(STALENESS_KINDS)}, "
                f"got {self.staleness!r}"
            )
        a = self.staleness_exponent
        if not _is_number(a) or not math.isfinite(a) or a < 0:
            raise SpecError(
                f"buffered: staleness_exponent must be a finite number >= 0 (0.5 is the usual "
                f"polynomial choice), got {a!r}"
            )
        lr = self.server_lr
        if not _is_number(lr) or not math.isfinite(lr) or lr <= 0:
            raise SpecError(f"buffered: server_lr must be a finite number > 0, got {lr!r}")
        if not isinstance(self.example_weighting, bool):
            raise SpecError(
                f"buffered: example_weighting must be true or false, got {self.example_weighting!r}"
            )

    # -- (de)serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> BufferedConfig:
        """From a config mapping; unknown keys are an error that lists the valid ones."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"buffered: unknown keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    def params(self) -> dict[str, Any]:
        """The settings that change the math of a buffer (persisted in its checkpoint; the
        concurrency is scheduling only and may change across a restart)."""
        out = self.to_dict()
        del out["concurrency"]
        return out

    # -- the two weights ------------------------------------------------------------------------

    def weight(self, staleness: int) -> float:
        """s(tau) under this config."""
        return staleness_weight(staleness, self.staleness, self.staleness_exponent,
                                self.hinge_cutoff)

    def data_weight(self, num_examples: Any = None, *, client: str | None = None) -> float:
        """d_i for an update: 1.0, or with ``example_weighting`` ``min(num_examples,
        max_examples)`` (a count that is not a positive integer is refused, reason "weight")."""
        if not self.example_weighting:
            return 1.0
        if not _is_int(num_examples) or num_examples < 1:
            raise InvalidUpdate("weight", f"num_examples must be a positive integer, got "
                                f"{num_examples!r}", client=client)
        return float(min(int(num_examples), self.max_examples))


def staleness_weight(staleness: int, kind: str = "polynomial", exponent: float = 0.5,
                     cutoff: int = 4) -> float:
    """The staleness factor s(tau) for ``tau = staleness`` versions behind (an int >= 0):
    ``"polynomial"`` (1 + tau)^-exponent, ``"constant"`` 1, ``"hinge"`` 1 for tau <= cutoff,
    else 1 / (exponent * (tau - cutoff) + 1). Always in (0, 1] and 1 at tau = 0."""
    if not _is_int(staleness) or staleness < 0:
        raise ValueError(f"staleness must be an integer >= 0, got {staleness!r}")
    tau = int(staleness)
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + tau) ** (-float(exponent)))
    if kind == "hinge":
        return 1.0 if tau <= cutoff else 1.0 / (float(exponent) * (tau - cutoff) + 1.0)
    raise ValueError(f"unknown staleness kind {kind!r}; use one of {', '.join(STALENESS_KINDS)}")


def check_staleness(config: BufferedConfig, current_version: int, base_version: int, *,
                    client: str | None = None) -> int:
    """``tau = current_version - base_version`` for an update trained on ``base_version``, or
    :class:`InvalidUpdate`: reason ``"stale"`` when tau > ``max_staleness``, ``"round"`` for a
    base version the aggregator never published (negative or in the future). Cheap: run it
    before fetching or decoding the update's tensors."""
    if not _is_int(base_version) or base_version < 0 or base_version > current_version:
        raise InvalidUpdate("round", f"base version {base_version!r} is not a published global "
                            f"version (current: {current_version})", client=client)
    tau = int(current_version) - int(base_version)
    if tau > config.max_staleness:
        raise InvalidUpdate("stale", f"trained on version {base_version}, {tau} versions behind "
                            f"the current {current_version} (max_staleness "
                            f"{config.max_staleness})", client=client)
    return tau


def client_delta(update: Mapping[str, np.ndarray], base_spec: UpdateSpec, *,
                 client: str | None = None) -> dict[str, np.ndarray]:
    """``update - base`` in float64, per tensor, for an algorithm whose updates are full states
    (FedAvg-LoRA and its relatives). ``base_spec`` is the update spec of the version the client
    trained on, *with* its reference: ``UpdateSpec.from_state(server.update_spec_state(base))``,
    i.e. the wire-dtype state that version was broadcast as. Structure is checked (names,
    dtypes, shapes: :class:`InvalidUpdate`); values are expected to have passed
    :func:`~aggregator.validation.validate_update` against the same spec (finite, norm bound)."""
    if base_spec.reference is None:
        raise SpecError("client_delta needs the base version's spec with its reference state "
                        "(UpdateSpec.from_state(..., keep_reference=True))")
    wire = check_structure(update, base_spec, client=client)
    out = {}
    for name, arr in wire.items():
        dtype = base_spec.tensors[name].dtype
        values = to_float64(arr, dtype)
        values -= to_float64(base_spec.reference[name], dtype)
        out[name] = values
    return out


class DeltaBuffer:
    """The FedBuff buffer of one future global version: ``begin(spec, version)``, then
    ``add(client, delta, weight=d_i, staleness=tau)`` per accepted update until :attr:`full`,
    then ``apply(current_global)`` -> the next global. Every check runs before any number
    changes, so a refused update leaves no trace. One contribution per client per buffer
    (reason ``"duplicate"``), matching a ledger keyed by (version, client).

    Floating-point addition is not associative: another arrival order may change the float64
    sums in the last bits; resuming from :meth:`state_dict` is bit-identical.
    """

    name = "fedbuff"

    def __init__(self, config: BufferedConfig | None = None) -> None:
        self.config = config if config is not None else BufferedConfig()
        self._spec: UpdateSpec | None = None
        self._version = 0
        self._clients: list[str] = []
        self._weights: list[float] = []
        self._staleness: list[int] = []
        self._sums: dict[str, np.ndarray] = {}
        self._data_total = 0.0

    # -- streaming interface ---------------------------------------------------------------

    def begin(self, spec: UpdateSpec, version: int) -> None:
        """Start an empty buffer for deltas shaped like ``spec`` that are measured at global
        ``version`` (the one :meth:`apply` will be given); forgets earlier adds."""
        if not _is_int(version) or version < 0:
            raise SpecError(f"version must be an integer >= 0, got {version!r}")
        self._spec = UpdateSpec(dict(spec.tensors))  # names, shapes (the reference is not kept)
        self._version = int(version)
        self._clients, self._weights, self._staleness = [], [], []
        self._sums = {n: np.zeros(t.shape, np.float64) for n, t in self._spec.tensors.items()}
        self._data_total = 0.0

    def add(self, client_id: str, delta: Mapping[str, np.ndarray], *, weight: float = 1.0,
            staleness: int) -> float:
        """Fold one delta (float arrays, normally :func:`client_delta`'s) with data weight
        ``weight`` (d_i) trained ``staleness`` versions behind; returns its effective factor
        ``s(tau) * d_i``. Refusals: :class:`InvalidUpdate` ("stale", "duplicate", "weight",
        "names", "shape", "dtype", "non_finite"); a full buffer raises
        :class:`AggregatorError` (apply it first)."""
        spec = self._require_spec()
        if self.full:
            raise AggregatorError(f"buffer for version {self._version + 1} is full "
                                  f"({self.count}/{self.config.buffer_size}); apply it first")
        if client_id in self._clients:
            raise InvalidUpdate("duplicate", f"client already in the buffer of version "
                                f"{self._version + 1}", client=client_id)
        if not _is_int(staleness) or staleness < 0:
            raise InvalidUpdate("round", f"staleness must be an integer >= 0, got {staleness!r}",
                                client=client_id)
        if staleness > self.config.max_staleness:
            raise InvalidUpdate("stale", f"{staleness} versions behind (max_staleness "
                                f"{self.config.max_staleness})", client=client_id)
        if not _is_number(weight) or not (math.isfinite(weight) and weight > 0):
            raise InvalidUpdate("weight", f"weight must be finite and positive, got {weight!r}",
                                client=client_id)
        weight = float(weight)
        values = self._check_delta(delta, spec, client_id)
        factor = self.config.weight(int(staleness)) * weight
        for name, arr in values.items():
            self._sums[name] += arr * factor
        self._data_total += weight
        self._clients.append(client_id)
        self._weights.append(weight)
        self._staleness.append(int(staleness))
        return factor

    def merge(self, other: DeltaBuffer) -> None:
        """Fold another buffer of the same version, spec and math into this one (partial sums of
        several ingest workers, merged by the coordinator): sums and data weights add, client
        lists concatenate. Clients must be disjoint. The merged buffer may hold more than K
        updates (each worker admitted its own); it is normalised by what it holds."""
        spec = self._require_spec()
        if other.config.params() != self.config.params():
            raise AggregatorError("cannot merge buffers built with different parameters")
        if other.version != self._version or other.spec.to_json() != spec.to_json():
            raise AggregatorError("cannot merge buffers of different versions or specs")
        both = set(self._clients) & set(other.clients)
        if both:
            raise InvalidUpdate("duplicate", f"clients in both buffers: {sorted(both)[:5]}")
        for name, s in other._sums.items():
            self._sums[name] += s
        self._data_total += other._data_total
        self._clients += list(other._clients)
        self._weights += list(other._weights)
        self._staleness += list(other._staleness)

    @property
    def full(self) -> bool:
        return len(self._clients) >= self.config.buffer_size

    @property
    def count(self) -> int:
        return len(self._clients)

    @property
    def version(self) -> int:
        """The global version the buffered deltas are applied to (the result is version + 1)."""
        return self._version

    @property
    def clients(self) -> tuple[str, ...]:
        return tuple(self._clients)

    @property
    def staleness(self) -> tuple[int, ...]:
        return tuple(self._staleness)

    def histogram(self) -> dict[int, int]:
        """Staleness -> how many buffered updates had it."""
        return dict(sorted(Counter(self._staleness).items()))

    @property
    def spec(self) -> UpdateSpec:
        return self._require_spec()

    def step(self) -> dict[str, np.ndarray]:
        """The float64 server step ``server_lr * sum_i s(tau_i) d_i delta_i / sum_i d_i``."""
        self._require_spec()
        if not self._clients:
            raise AggregatorError("DeltaBuffer: no updates to apply")
        scale = self.config.server_lr / self._data_total
        return {n: s * scale for n, s in self._sums.items()}

    def apply(self, current: Mapping[str, np.ndarray], *, cast: bool = True,
              partial: bool = False) -> dict[str, np.ndarray]:
        """The next global, ``current + step()``, for the buffer's tensors (``current`` may hold
        more, e.g. a server state with prefixed parts: they are not returned). ``cast``: in each
        tensor's dtype in ``current`` (float32 stays float32), else float64. A buffer that is not
        full is refused unless ``partial`` (e.g. flushing at the end of a federation); the
        normaliser is then the data weight actually buffered."""
        spec = self._require_spec()
        if not self.full and not partial:
            raise AggregatorError(f"buffer holds {self.count} of {self.config.buffer_size} "
                                  "updates; pass partial=True to apply it anyway")
        step = self.step()
        out = {}
        for name, ts in spec.tensors.items():
            if name not in current:
                raise SpecError(f"the current global has no tensor {name!r}")
            base = np.asarray(current[name])
            if base.shape != ts.shape or base.dtype.kind != "f":
                raise SpecError(f"current global {name!r} is {base.dtype}{base.shape}, expected "
                                f"a float tensor of shape {ts.shape}")
            new = np.asarray(base.astype(np.float64) + step[name])
            out[name] = new.astype(base.dtype) if cast else new
        return out

    # -- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> Checkpoint:
        """A snapshot (copies): float64 running sums as tensors; clients, data weights and
        staleness in arrival order plus the version in ``meta``."""
        spec = self._require_spec()
        meta = {
            "aggregate": self.name,
            "state_version": STATE_VERSION,
            "params": self.config.params(),
            "spec": spec.to_json(),
            "version": self._version,
            "clients": list(self._clients),
            "weights": list(self._weights),
            "staleness": list(self._staleness),
            "data_total": self._data_total,  # JSON keeps a float's shortest exact repr
        }
        return Checkpoint({n: s.copy() for n, s in self._sums.items()}, meta)

    def load_state_dict(self, state: Checkpoint) -> None:
        """Restore exactly the buffer that produced ``state``."""
        meta = state.meta
        if meta.get("aggregate") != self.name:
            raise StateError(f"state is for aggregator {meta.get('aggregate')!r}, "
                             f"not {self.name!r}")
        if meta.get("state_version") != STATE_VERSION:
            raise StateError(f"buffer state version {meta.get('state_version')} unsupported "
                             f"(reads {STATE_VERSION})")
        if meta.get("params") != self.config.params():
            raise StateError(f"state was built with {meta.get('params')}, this buffer has "
                             f"{self.config.params()}")
        try:
            clients = [str(c) for c in meta["clients"]]
            weights = [float(w) for w in meta["weights"]]
            staleness = [int(s) for s in meta["staleness"]]
            version, total = int(meta["version"]), float(meta["data_total"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"malformed buffer state: {exc}") from exc
        if not (len(clients) == len(weights) == len(staleness)) or len(set(clients)) != len(
            clients
        ):
            raise StateError("buffer state has inconsistent client, weight and staleness lists")
        spec = UpdateSpec.from_json(meta["spec"])
        if set(state.tensors) != set(spec.tensors):
            raise StateError("buffer state tensors do not match its spec")
        sums = {}
        for name, ts in spec.tensors.items():
            arr = state.tensors[name]
            if arr.dtype != np.float64 or arr.shape != ts.shape:
                raise StateError(f"buffer running sum {name!r} is {arr.dtype}{arr.shape}, "
                                 f"expected float64{ts.shape}")
            sums[name] = np.array(arr, dtype=np.float64)  # own, writable copy
        self._spec, self._version = spec, version
        self._clients, self._weights, self._staleness = clients, weights, staleness
        self._sums, self._data_total = sums, total

    # -- internals -------------------------------------------------------------------------

    def _check_delta(self, delta: Mapping[str, np.ndarray], spec: UpdateSpec,
                     client: str) -> dict[str, np.ndarray]:
        if not isinstance(delta, Mapping):
            raise InvalidUpdate("names", f"delta is a {type(delta).__name__}, not a mapping",
                                client=client)
        got, want = set(delta), set(spec.tensors)
        if got != want:
            raise InvalidUpdate("names", f"missing {sorted(want - got)[:5]}, unexpected "
                                f"{sorted(got - want)[:5]}", client=client)
        out = {}
        for name in spec.names:
            arr = delta[name]
            if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
                got_t = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
                raise InvalidUpdate("dtype", f"delta {name!r} is {got_t}, not a float array",
                                    client=client)
            if arr.shape != spec.tensors[name].shape:
                raise InvalidUpdate("shape", f"delta {name!r} has shape {arr.shape}, expected "
                                    f"{spec.tensors[name].shape}", client=client)
            values = arr.astype(np.float64)
            if not np.isfinite(values).all():
                raise InvalidUpdate("non_finite", f"delta {name!r} contains NaN or Inf",
                                    client=client)
            out[name] = values
        return out

    def _require_spec(self) -> UpdateSpec:
        if self._spec is None:
            raise AggregatorError("DeltaBuffer: call begin(spec, version) or load_state_dict() "
                                  "first")
        return self._spec


def buffer_from_state(state: Checkpoint, config: BufferedConfig | None = None) -> DeltaBuffer:
    """Rebuild the buffer that wrote ``state``: its persisted parameters (the math), with the
    ``concurrency`` of ``config`` when given (scheduling only)."""
    params = dict(state.meta.get("params") or {})
    if config is not None:
        params["concurrency"] = config.concurrency
    try:
        cfg = BufferedConfig.from_dict(params)
    except SpecError as exc:
        raise StateError(f"buffer state has unusable parameters: {exc}") from exc
    buf = DeltaBuffer(cfg)
    buf.load_state_dict(state)
    return buf
