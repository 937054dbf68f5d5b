"""Checks an incoming client update against the global state before it can touch the
aggregate.

Why here and not in the aggregation rules: a rule only sees numbers, and one bad update
(a wrong shape, a NaN, a huge delta from a faulty or hostile device) would silently poison the
whole round. Every check fails with :class:`~aggregator.errors.InvalidUpdate` carrying a
machine-readable reason, so the service can reject, count and carry on.

Dtypes: adapters arrive as float32 or float16. bfloat16 is accepted only for tensors whose
spec declares it, and is then carried on the wire as raw ``uint16`` bits (numpy has no
bfloat16; an ``ml_dtypes.bfloat16`` array is accepted too and viewed as its bits). Arrays are
never modified: results are read-only views, or new arrays when clipping had to change them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from algorithms.core.wire_values import WIRE_DTYPES, encode, to_float64

from .errors import InvalidUpdate, SpecError

__all__ = ["WIRE_DTYPES", "UpdateSpec", "TensorSpec", "ValidatedUpdate", "encode", "to_float64",
           "validate_update", "check_structure"]



@dataclass(frozen=True)
class TensorSpec:
    """Shape and declared dtype of one tensor of an update."""

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in WIRE_DTYPES:
            raise SpecError(
                f"dtype {self.dtype!r} is not supported; use one of {sorted(WIRE_DTYPES)}"
            )


@dataclass(frozen=True)
class UpdateSpec:
    """What a valid update looks like: tensor names, shapes and declared dtypes, plus the
    reference (global) state the norm bound is measured from.

    ``reference`` is optional; without one the norm is that of the update itself. It is not
    serialised by :meth:`to_json` (an aggregate needs only names, shapes and dtypes).
    """

    tensors: Mapping[str, TensorSpec]
    reference: Mapping[str, np.ndarray] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_state(
        cls,
        global_state: Mapping[str, np.ndarray],
        *,
        declared: Mapping[str, str] | None = None,
        keep_reference: bool = True,
    ) -> UpdateSpec:
        """Spec of updates to ``global_state``. ``declared`` names tensors whose dtype cannot be
        told from the array, i.e. ``{"name": "bfloat16"}`` for uint16-carried bfloat16."""
        declared = dict(declared or {})
        unknown = set(declared) - set(global_state)
        if unknown:
            raise SpecError(f"declared dtypes for tensors not in the state: {sorted(unknown)}")
        tensors: dict[str, TensorSpec] = {}
        for name in sorted(global_state):
            arr = global_state[name]
            if not isinstance(arr, np.ndarray):
                raise SpecError(
                    f"global tensor {name!r} is {type(arr).__name__}, not a numpy array"
                )
            dtype = declared.get(name) or _dtype_name(arr)
            if dtype is None:
                raise SpecError(
                    f"global tensor {name!r} has dtype {arr.dtype}; only float32/float16 are "
                    "inferred, declare bfloat16 tensors (carried as uint16) with declared={name: 'bfloat16'}"
                )
            spec = TensorSpec(tuple(int(d) for d in arr.shape), dtype)
            if _wire_view(arr, spec) is None:
                raise SpecError(f"global tensor {name!r} has dtype {arr.dtype}, declared {dtype}")
            tensors[name] = spec
        reference = (
            {n: _readonly(_wire_view(global_state[n], tensors[n])) for n in tensors}
            if keep_reference
            else None
        )
        return cls(tensors, reference)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.tensors))

    def reference64(self, name: str) -> np.ndarray:
        """The reference tensor as float64, converted once per spec (not once per update)."""
        cache = self.__dict__.get("_ref64")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_ref64", cache)
        ref = cache.get(name)
        if ref is None:
            ref = to_float64(self.reference[name], self.tensors[name].dtype)
            ref.flags.writeable = False
            cache[name] = ref
        return ref

    def num_elements(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def to_json(self) -> dict[str, Any]:
        return {
            n: {"shape": list(t.shape), "dtype": t.dtype} for n, t in sorted(self.tensors.items())
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> UpdateSpec:
        try:
            return cls(
                {
                    n: TensorSpec(tuple(int(d) for d in t["shape"]), str(t["dtype"]))
                    for n, t in obj.items()
                }
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"malformed update spec: {exc}") from exc


@dataclass(frozen=True)
class ValidatedUpdate:
    """An update that passed every check. ``tensors`` are in their wire dtypes (read-only);
    ``norm`` is the L2 norm of the delta to the reference *before* any clipping."""

    tensors: dict[str, np.ndarray]
    norm: float
    clipped: bool


def validate_update(
    update: Mapping[str, np.ndarray],
    spec: UpdateSpec,
    *,
    max_norm: float | None = None,
    clip: bool = False,
    client: str | None = None,
) -> ValidatedUpdate:
    """Check names, dtypes, shapes, finiteness and the delta norm bound, in that order.

    With ``max_norm`` set, a delta above it is scaled down onto the bound when ``clip`` is true
    (after re-encoding to float16/bfloat16 the norm may exceed the bound by rounding) and
    rejected with reason ``"norm"`` otherwise. Memory: one tensor's float64 delta at a time.
    """
    if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
        raise SpecError(f"max_norm must be a finite positive number, got {max_norm!r}")
    wire = check_structure(update, spec, client=client)
    # one pass: a NaN or Inf anywhere makes the squared norm non-finite (the reference is a
    # finite global, and no finite wire value squares to an overflow in float64); only then
    # is each tensor checked, to name the offender
    sq = 0.0
    for name in spec.names:
        delta = _delta(wire[name], spec, name)
        flat = delta.ravel()
        sq += float(np.dot(flat, flat))
    if not math.isfinite(sq):
        for name, view in wire.items():
            if not _all_finite(view, spec.tensors[name].dtype):
                raise InvalidUpdate("non_finite", f"tensor {name!r} contains NaN or Inf", client=client)
    norm = math.sqrt(sq)

    if max_norm is None or norm <= max_norm:
        return ValidatedUpdate({n: _readonly(a) for n, a in wire.items()}, norm, False)
    if not clip:
        raise InvalidUpdate(
            "norm", f"delta L2 norm {norm:.6g} exceeds the bound {max_norm:.6g}", client=client
        )
    scale = max_norm / norm
    clipped: dict[str, np.ndarray] = {}
    for name in spec.names:
        ts = spec.tensors[name]
        values = _delta(wire[name], spec, name) * scale
        if spec.reference is not None:
            values += to_float64(spec.reference[name], ts.dtype)
        clipped[name] = _readonly(encode(values, ts.dtype))
    return ValidatedUpdate(clipped, norm, True)


def check_structure(
    update: Mapping[str, np.ndarray], spec: UpdateSpec, *, client: str | None = None
) -> dict[str, np.ndarray]:
    """The cheap checks (names, dtypes, shapes) without touching the values; returns the
    tensors as wire-dtype views in spec order. Aggregators run this too, so a caller that
    skipped :func:`validate_update` still cannot half-fold a malformed update."""
    if not isinstance(update, Mapping):
        raise InvalidUpdate(
            "names",
            f"update is a {type(update).__name__}, not a name->array mapping",
            client=client,
        )
    _check_names(update.keys(), spec, client)
    wire: dict[str, np.ndarray] = {}
    for name in spec.names:
        ts = spec.tensors[name]
        arr = update[name]
        view = _wire_view(arr, ts) if isinstance(arr, np.ndarray) else None
        if view is None:
            got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
            raise InvalidUpdate(
                "dtype", f"tensor {name!r} is {got}, declared {ts.dtype}", client=client
            )
        if view.shape != ts.shape:
            raise InvalidUpdate(
                "shape",
                f"tensor {name!r} has shape {view.shape}, expected {ts.shape}",
                client=client,
            )
        wire[name] = view
    return wire


def _check_names(names: Any, spec: UpdateSpec, client: str | None) -> None:
    got = set(names)
    want = set(spec.tensors)
    if got == want:
        return
    missing, extra = sorted(want - got), _sorted_any(got - want)
    parts = []
    if missing:
        parts.append(f"missing {_preview(missing)}")
    if extra:
        parts.append(f"unexpected {_preview(extra)}")
    raise InvalidUpdate("names", "; ".join(parts), client=client)


def _sorted_any(names: set[Any]) -> list[Any]:
    """Sorted names; keys of mixed types (a str and an int) are ordered by repr, not a TypeError."""
    try:
        return sorted(names)
    except TypeError:
        return sorted(names, key=repr)


def _preview(names: list[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"


def _dtype_name(arr: np.ndarray) -> str | None:
    if arr.dtype == np.float32:
        return "float32"
    if arr.dtype == np.float16:
        return "float16"
    if arr.dtype.name == "bfloat16":  # ml_dtypes.bfloat16, without importing ml_dtypes
        return "bfloat16"
    return None


def _wire_view(arr: np.ndarray, spec: TensorSpec) -> np.ndarray | None:
    """The array as its wire dtype without copying, or None if it is not the declared dtype."""
    if spec.dtype == "bfloat16":
        if arr.dtype == np.uint16:
            return arr
        if arr.dtype.name == "bfloat16" and arr.dtype.itemsize == 2:
            return arr.view(np.uint16)
        return None
    return arr if arr.dtype == WIRE_DTYPES[spec.dtype] else None


def _all_finite(arr: np.ndarray, dtype: str) -> bool:
    if dtype == "bfloat16":  # exponent bits all ones <=> Inf or NaN
        return not bool(np.any((arr & np.uint16(0x7F80)) == np.uint16(0x7F80)))
    return bool(np.isfinite(arr).all())


def _delta(arr: np.ndarray, spec: UpdateSpec, name: str) -> np.ndarray:
    dtype = spec.tensors[name].dtype
    values = to_float64(arr, dtype)
    if spec.reference is not None:
        values -= spec.reference64(name)
    return values


def _readonly(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view
