"""Aggregation rules with a streaming interface: ``begin(spec)``, ``add(client, tensors,
weight)`` per accepted update, ``result()`` when the round closes.

Why streaming: updates arrive one at a time over minutes, and holding every client's adapter
in memory would make the aggregator O(clients). :class:`WeightedMean` (FedAvg) folds each
update into float64 running sums, so it needs memory O(one update). The robust rules
(:class:`CoordinateMedian`, :class:`TrimmedMean`) need all values of a coordinate at once;
they spill each update to a safetensors file and, at the end, read one tensor at a time across
clients: memory O(clients x one tensor), disk O(clients x one update).

Every rule can be checkpointed after any ``add`` (``state_dict()`` -> a
:class:`~aggregator.state.Checkpoint`) and resumed bit-identically (``load_state_dict`` or
:func:`aggregator_from_state`); the state store persists that checkpoint in the same step that
marks the update accepted. Rules aggregate whatever they are given (full adapter states or
deltas); averaging states equals the global plus the averaged delta for normalised weights.

:class:`Collect` is the rule for algorithms whose updates must not be combined (FedMKT's
per-client top-k logits, one shape per tokenizer): it keeps every update as it came, spilled to
disk like the robust rules, and hands the server step a lazy ``{client: tensors}`` mapping.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .errors import AggregatorError, InvalidUpdate, SpecError, StateError
from .state import Checkpoint, CheckpointStore
from .validation import UpdateSpec, check_structure, encode, to_float64

STATE_VERSION = 1


class Aggregator(ABC):
    """Base of the rules: bookkeeping of clients and weights, checks, checkpoint format."""

    name: ClassVar[str]
    #: keeps updates on disk (then takes ``spill_dir=``, which must survive a restart)
    spills: ClassVar[bool] = False

    def __init__(self) -> None:
        self._spec: UpdateSpec | None = None
        self._clients: list[str] = []
        self._weights: list[float] = []

    # -- streaming interface ---------------------------------------------------------------

    def begin(self, spec: UpdateSpec) -> None:
        """Start an empty aggregate for updates shaped like ``spec`` (forgets earlier adds)."""
        self._spec = UpdateSpec(dict(spec.tensors))  # the reference state is not needed here
        self._clients, self._weights = [], []
        self._begin()

    def add(self, client_id: str, tensors: Mapping[str, np.ndarray], weight: float = 1.0) -> None:
        """Fold one update in (tensors in wire dtypes, normally a ValidatedUpdate's).
        Every check runs before any number changes, so a refused update leaves no trace."""
        spec = self._require_spec()
        if client_id in self._clients:
            raise InvalidUpdate(
                "duplicate", "client already added to this aggregate", client=client_id
            )
        if isinstance(weight, bool) or not isinstance(
            weight, (int, float, np.integer, np.floating)
        ):
            raise InvalidUpdate(
                "weight", f"weight must be a number, got {weight!r}", client=client_id
            )
        weight = float(weight)
        if not (math.isfinite(weight) and weight > 0):
            raise InvalidUpdate(
                "weight", f"weight must be finite and positive, got {weight!r}", client=client_id
            )
        wire = self._structure(tensors, spec, client_id)
        self._fold(client_id, wire, weight)
        self._clients.append(client_id)
        self._weights.append(weight)

    @abstractmethod
    def result(self, *, cast: bool = True) -> dict[str, np.ndarray]:
        """The aggregate, in the declared dtypes (``cast=False``: float64)."""

    @property
    def count(self) -> int:
        return len(self._clients)

    @property
    def clients(self) -> tuple[str, ...]:
        return tuple(self._clients)

    @property
    def spec(self) -> UpdateSpec:
        return self._require_spec()

    def params(self) -> dict[str, Any]:
        """Constructor parameters that change the math (persisted in the state)."""
        return {}

    # -- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> Checkpoint:
        """A snapshot (copies) of the partial aggregate; ``meta["clients"]`` lists the folded
        clients in folding order, which the state store checks against its ledger."""
        spec = self._require_spec()
        meta = {
            "aggregate": self.name,
            "state_version": STATE_VERSION,
            "params": self.params(),
            "spec": spec.to_json(),
            "clients": list(self._clients),
            "weights": list(self._weights),
            **self._state_meta(),
        }
        return Checkpoint(self._state_tensors(), meta)

    def load_state_dict(self, state: Checkpoint) -> None:
        """Restore exactly the aggregate that produced ``state``."""
        meta = state.meta
        if meta.get("aggregate") != self.name:
            raise StateError(
                f"state is for aggregator {meta.get('aggregate')!r}, not {self.name!r}"
            )
        if meta.get("state_version") != STATE_VERSION:
            raise StateError(
                f"aggregate state version {meta.get('state_version')} unsupported (reads {STATE_VERSION})"
            )
        if meta.get("params") != self.params():
            raise StateError(
                f"state was built with {meta.get('params')}, this aggregator has {self.params()}"
            )
        clients, weights = list(meta["clients"]), [float(w) for w in meta["weights"]]
        if len(clients) != len(weights) or len(set(clients)) != len(clients):
            raise StateError("aggregate state has inconsistent client and weight lists")
        self._spec = UpdateSpec.from_json(meta["spec"])
        self._clients, self._weights = clients, weights
        self._load(state)

    def merge(self, other: Checkpoint) -> None:
        """Fold in another partial aggregate of the same round (an ingest worker's
        ``state_dict()``): the result is the aggregate of both sets of updates. Disjoint
        clients, the same rule, parameters and spec; checked before anything changes."""
        meta = other.meta
        spec = self._require_spec()
        if meta.get("aggregate") != self.name or meta.get("params") != self.params():
            raise StateError(f"cannot merge a {meta.get('aggregate')!r} partial {meta.get('params')} into "
                             f"{self.name!r} {self.params()}")
        if UpdateSpec.from_json(meta["spec"]).to_json() != spec.to_json():
            raise StateError("cannot merge partial aggregates of different update specs")
        clients, weights = list(meta["clients"]), [float(w) for w in meta["weights"]]
        both = set(clients) & set(self._clients)
        if both or len(set(clients)) != len(clients) or len(clients) != len(weights):
            raise StateError(f"partial aggregates overlap or are inconsistent (clients in both: {sorted(both)[:5]})")
        self._merge(other)
        self._clients += clients
        self._weights += weights

    def _merge(self, other: Checkpoint) -> None:
        raise StateError(f"aggregate {self.name!r} cannot merge partials")

    # -- per-rule hooks --------------------------------------------------------------------

    def _structure(
        self, tensors: Mapping[str, np.ndarray], spec: UpdateSpec, client_id: str
    ) -> dict[str, np.ndarray]:
        return check_structure(tensors, spec, client=client_id)

    @abstractmethod
    def _begin(self) -> None: ...

    @abstractmethod
    def _fold(self, client_id: str, tensors: dict[str, np.ndarray], weight: float) -> None: ...

    @abstractmethod
    def _state_tensors(self) -> dict[str, np.ndarray]: ...

    def _state_meta(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def _load(self, state: Checkpoint) -> None: ...

    def _require_spec(self) -> UpdateSpec:
        if self._spec is None:
            raise AggregatorError(
                f"{type(self).__name__}: call begin(spec) or load_state_dict() first"
            )
        return self._spec

    def _require_updates(self) -> None:
        if not self._clients:
            raise AggregatorError(f"{type(self).__name__}: no updates to aggregate")

    def _output(self, name: str, values: np.ndarray, cast: bool) -> np.ndarray:
        values = np.asarray(values)  # reductions over 0-d tensors return numpy scalars
        return encode(values, self._require_spec().tensors[name].dtype) if cast else values


class WeightedMean(Aggregator):
    """Sample-weighted FedAvg: sum_i w_i x_i / sum_i w_i, folded into float64 running sums.

    Floating-point addition is not associative, so a different arrival order may change the
    float64 result in the last bits (relative ~1e-15), and occasionally the rounded float32
    result by one ulp; resuming from a checkpoint is bit-identical.
    """

    name = "fedavg"

    def _begin(self) -> None:
        spec = self._require_spec()
        self._sums = {n: np.zeros(t.shape, np.float64) for n, t in spec.tensors.items()}
        self._total = 0.0

    def _fold(self, client_id: str, tensors: dict[str, np.ndarray], weight: float) -> None:
        spec = self._require_spec()
        for name, arr in tensors.items():
            values = to_float64(arr, spec.tensors[name].dtype)
            values *= weight
            self._sums[name] += values
        self._total += weight

    @property
    def total_weight(self) -> float:
        return self._total

    def result(self, *, cast: bool = True) -> dict[str, np.ndarray]:
        self._require_updates()
        return {n: self._output(n, s / self._total, cast) for n, s in self._sums.items()}

    def _state_tensors(self) -> dict[str, np.ndarray]:
        return {n: s.copy() for n, s in self._sums.items()}

    def _state_meta(self) -> dict[str, Any]:
        return {"total_weight": self._total}  # JSON keeps a float's shortest exact repr

    def _merge(self, other: Checkpoint) -> None:
        spec = self._require_spec()
        if set(other.tensors) != set(spec.tensors) or any(
                other.tensors[n].shape != t.shape for n, t in spec.tensors.items()):
            raise StateError("fedavg partial tensors do not match its spec")
        for name in self._sums:
            self._sums[name] += np.asarray(other.tensors[name], dtype=np.float64)
        self._total += float(other.meta["total_weight"])

    def _load(self, state: Checkpoint) -> None:
        spec = self._require_spec()
        if set(state.tensors) != set(spec.tensors):
            raise StateError("fedavg state tensors do not match its spec")
        sums = {}
        for name, ts in spec.tensors.items():
            arr = state.tensors[name]
            if arr.dtype != np.float64 or arr.shape != ts.shape:
                raise StateError(
                    f"fedavg running sum {name!r} is {arr.dtype}{arr.shape}, expected float64{ts.shape}"
                )
            sums[name] = np.array(arr, dtype=np.float64)  # own, writable copy
        self._sums, self._total = sums, float(state.meta["total_weight"])


class _Spilled(Aggregator):
    """Base of rules that need every update: each is written once to ``spill_dir`` as a
    content-addressed safetensors file; the state lists the files per client.

    ``spill_dir`` must survive a restart for the state to be resumable; without one a temporary
    directory is used and removed by :meth:`discard`.
    """

    spills: ClassVar[bool] = True

    def __init__(self, spill_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self._owned_dir = spill_dir is None
        directory = (
            Path(tempfile.mkdtemp(prefix="cotune-spill-")) if spill_dir is None else Path(spill_dir)
        )
        self._spill = CheckpointStore(directory)
        self._digests: list[str] = []

    @property
    def spill_dir(self) -> Path:
        return self._spill.dir

    def _begin(self) -> None:
        self._digests = []

    def _fold(self, client_id: str, tensors: dict[str, np.ndarray], weight: float) -> None:
        self._digests.append(self._spill.put(tensors))

    def _state_tensors(self) -> dict[str, np.ndarray]:
        return {}

    def _state_meta(self) -> dict[str, Any]:
        return {"spill": list(self._digests)}

    def _load(self, state: Checkpoint) -> None:
        digests = list(state.meta.get("spill", []))
        if len(digests) != len(self._clients):
            raise StateError("spill list and client list differ in length")
        for digest in set(digests):
            self._spill.verify(digest)
        self._digests = digests

    def _merge(self, other: Checkpoint) -> None:
        digests = list(other.meta.get("spill", []))
        if len(digests) != len(other.meta["clients"]):
            raise StateError("spill list and client list differ in length")
        for digest in set(digests):
            self._spill.verify(digest)  # the workers spill into the shared spill directory
        self._digests += digests

    def discard(self) -> None:
        """Delete this aggregate's spill files (and the directory if it was temporary); call
        after the round is committed."""
        for digest in set(self._digests):
            self._spill.delete(digest)
        self._digests = []
        if self._owned_dir:
            shutil.rmtree(self._spill.dir, ignore_errors=True)


class _SpillingAggregator(_Spilled):
    """Coordinate-wise statistics over the spilled updates. Weights are recorded but, as in the
    usual definitions of these robust statistics, not used."""

    def result(self, *, cast: bool = True) -> dict[str, np.ndarray]:
        self._require_updates()
        spec = self._require_spec()
        out = {}
        for name, ts in spec.tensors.items():
            stack = np.empty((len(self._digests), *ts.shape), np.float64)
            for i, digest in enumerate(self._digests):
                stack[i] = to_float64(self._spill.read_tensor(digest, name), ts.dtype)
            out[name] = self._output(name, self._reduce(stack), cast)
        return out

    @abstractmethod
    def _reduce(self, stack: np.ndarray) -> np.ndarray:
        """Coordinate-wise statistic over axis 0 (clients); may reorder ``stack`` in place."""


class CoordinateMedian(_SpillingAggregator):
    """Coordinate-wise median (mean of the two middle values for an even count)."""

    name = "median"

    def _reduce(self, stack: np.ndarray) -> np.ndarray:
        return np.median(stack, axis=0, overwrite_input=True)


class TrimmedMean(_SpillingAggregator):
    """Coordinate-wise trimmed mean: drop the ``floor(trim_fraction * n)`` smallest and as
    many largest values of each coordinate, average the rest."""

    name = "trimmed_mean"

    def __init__(
        self, trim_fraction: float = 0.1, spill_dir: str | os.PathLike[str] | None = None
    ) -> None:
        if isinstance(trim_fraction, bool) or not (0.0 <= float(trim_fraction) < 0.5):
            raise SpecError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
        super().__init__(spill_dir)
        self.trim_fraction = float(trim_fraction)

    def params(self) -> dict[str, Any]:
        return {"trim_fraction": self.trim_fraction}

    def trimmed_per_side(self, n: int) -> int:
        # the epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 at 29
        return min(int(math.floor(self.trim_fraction * n + 1e-9)), (n - 1) // 2)

    def _reduce(self, stack: np.ndarray) -> np.ndarray:
        n = stack.shape[0]
        k = self.trimmed_per_side(n)
        stack.sort(axis=0)
        return stack[k : n - k].mean(axis=0)


class CollectedUpdates(Mapping):
    """What :meth:`Collect.result` returns: client id -> that client's tensors, each read from
    its spill file (and checked against its digest) when accessed, so a server step that goes
    through the clients one at a time holds one update in memory. ``weights``: client ->
    the weight it was added with. Iteration follows arrival order; sort for determinism."""

    def __init__(self, store: CheckpointStore, clients: list[str], digests: list[str],
                 weights: list[float]) -> None:
        self._store = store
        self._digest = dict(zip(clients, digests, strict=True))
        self.weights = dict(zip(clients, weights, strict=True))

    def __getitem__(self, client: str) -> dict[str, np.ndarray]:
        return self._store.get(self._digest[client]).tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._digest)

    def __len__(self) -> int:
        return len(self._digest)


class Collect(_Spilled):
    """No arithmetic: every accepted update is kept as it came (any dtypes and shapes; the
    algorithm's ``validate_client_update`` checked it) and :meth:`result` returns them all as a
    :class:`CollectedUpdates` mapping. Memory O(one update); resumable like the robust rules."""

    name = "collect"

    def _structure(
        self, tensors: Mapping[str, np.ndarray], spec: UpdateSpec, client_id: str
    ) -> dict[str, np.ndarray]:
        if not isinstance(tensors, Mapping) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in tensors.items()
        ):
            raise InvalidUpdate("names", "update is not a name -> numpy array mapping", client=client_id)
        return dict(tensors)

    def result(self, *, cast: bool = True) -> CollectedUpdates:
        """The collected updates (``cast`` does not apply: nothing was computed)."""
        self._require_updates()
        return CollectedUpdates(self._spill, list(self._clients), list(self._digests), list(self._weights))


#: the numeric aggregation rules by the name used in configs and persisted states
AGGREGATORS: dict[str, type[Aggregator]] = {
    WeightedMean.name: WeightedMean,
    CoordinateMedian.name: CoordinateMedian,
    TrimmedMean.name: TrimmedMean,
}
#: every rule :func:`make_aggregator` builds: the numeric ones and "collect" (which an algorithm
#: declares; it is not a choice of the service config)
RULES: dict[str, type[Aggregator]] = {**AGGREGATORS, Collect.name: Collect}


def make_aggregator(name: str, **kw: Any) -> Aggregator:
    """Build a rule by name: "fedavg", "median" (``spill_dir=``), "trimmed_mean"
    (``trim_fraction=``, ``spill_dir=``), "collect" (``spill_dir=``)."""
    try:
        cls = RULES[name]
    except (KeyError, TypeError):
        raise SpecError(
            f"unknown aggregator {name!r}; valid names: {', '.join(sorted(RULES))}"
        ) from None
    try:
        return cls(**kw)
    except TypeError as exc:
        raise SpecError(f"bad options for aggregator {name!r}: {exc}") from exc


def aggregator_from_state(state: Checkpoint, **kw: Any) -> Aggregator:
    """Rebuild the rule that wrote ``state`` (its persisted params plus runtime options such
    as ``spill_dir``) and load the state into it."""
    name = state.meta.get("aggregate")
    agg = make_aggregator(name, **{**state.meta.get("params", {}), **kw})
    agg.load_state_dict(state)
    return agg
