"""Math and wire encoding for adapter state dicts.

An adapter state is a plain ``dict[str, torch.Tensor]`` as returned by
:func:`algorithms.core.modeling.adapter_state`: canonical peft-independent names such as
``"model.layers.0.self_attn.q_proj.lora_A.weight"`` mapped to fp32, contiguous CPU tensors.
Helpers here never depend on a model, so the aggregator can use them without loading one.

Wire encoding (:func:`to_wire` / :func:`from_wire`) produces numpy arrays that safetensors can
store directly. ``"fp16"`` halves the size (relative error about 5e-4; values whose magnitude
exceeds 65504 are rejected instead of silently becoming inf); ``"bf16"`` keeps fp32's range
with about 3 significant digits and is carried as a ``uint16`` view, because numpy has no
bfloat16; ``"fp32"`` is exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from algorithms.core.errors import AdapterStateError

__all__ = [
    "WIRE_DTYPES",
    "Signature",
    "check_compatible",
    "flatten",
    "from_wire",
    "is_finite",
    "l2_norm",
    "merged_delta",
    "module_names",
    "num_parameters",
    "signature_diff",
    "state_bytes",
    "state_signature",
    "to_wire",
    "unflatten",
    "wire_dtype_of",
]

# name -> (shape, dtype string such as "float32")
Signature = dict[str, tuple[tuple[int, ...], str]]

WIRE_DTYPES = ("fp16", "bf16", "fp32")
_FP16_MAX = 65504.0
_NP_WIRE = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32), "bf16": np.dtype(np.uint16)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_state(state: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(state, Mapping):
        raise AdapterStateError(f"adapter state must be a mapping, got {type(state).__name__}")
    for name, t in state.items():
        if not isinstance(name, str):
            raise AdapterStateError(f"adapter state key {name!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise AdapterStateError(
                f"adapter state entry {name!r} is {type(t).__name__}, expected torch.Tensor"
            )


def state_signature(state: Mapping[str, torch.Tensor]) -> Signature:
    """``{name: (shape, dtype)}`` sorted by name; two states can be averaged iff the shapes match."""
    _check_state(state)
    return {
        n: (tuple(int(s) for s in state[n].shape), _dtype_name(state[n].dtype))
        for n in sorted(state)
    }


def signature_diff(expected: Signature, got: Signature, check_dtype: bool = False) -> list[str]:
    """Human-readable differences between two signatures (empty list when compatible)."""
    problems: list[str] = []
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
    for n in sorted(set(expected) & set(got)):
        (es, ed), (gs, gd) = expected[n], got[n]
        if tuple(es) != tuple(gs):
            problems.append(f"{n}: shape {tuple(gs)} != expected {tuple(es)}")
        elif check_dtype and ed != gd:
            problems.append(f"{n}: dtype {gd} != expected {ed}")
    return problems


def check_compatible(
    reference: Mapping[str, torch.Tensor] | Signature,
    state: Mapping[str, torch.Tensor] | Signature,
    check_dtype: bool = False,
) -> None:
    """Raise :class:`AdapterStateError` when ``state`` does not have ``reference``'s names/shapes."""
    ref_sig = reference if _is_signature(reference) else state_signature(reference)  # type: ignore[arg-type]
    sig = state if _is_signature(state) else state_signature(state)  # type: ignore[arg-type]
    problems = signature_diff(ref_sig, sig, check_dtype=check_dtype)  # type: ignore[arg-type]
    if problems:
        raise AdapterStateError("adapter state does not match: " + "; ".join(problems[:8]))


def _is_signature(obj: object) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, tuple) for v in obj.values())


def num_parameters(state: Mapping[str, torch.Tensor]) -> int:
    return sum(int(t.numel()) for t in state.values())


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(int(t.numel()) * t.element_size() for t in state.values())


def flatten(state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Signature]:
    """Concatenate all tensors (sorted by name) into one fp32 vector; returns it and the signature."""
    sig = state_signature(state)
    if not sig:
        return torch.zeros(0, dtype=torch.float32), sig
    parts = [state[n].detach().to("cpu", torch.float32).reshape(-1) for n in sig]
    return torch.cat(parts), sig


def unflatten(vector: torch.Tensor, signature: Signature) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`: fp32 contiguous tensors with the signature's shapes."""
    if vector.dim() != 1:
        raise AdapterStateError(f"flat vector must be 1-D, got shape {tuple(vector.shape)}")
    need = sum(math.prod(shape) for shape, _ in signature.values())
    if vector.numel() != need:
        raise AdapterStateError(
            f"flat vector has {vector.numel()} values but the signature needs {need}"
        )
    out: dict[str, torch.Tensor] = {}
    offset = 0
    v = vector.detach().to("cpu", torch.float32)
    for name in sorted(signature):
        shape = tuple(signature[name][0])
        n = math.prod(shape)
        out[name] = v[offset : offset + n].reshape(shape).clone()
        offset += n
    return out


def l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors, accumulated in float64."""
    _check_state(state)
    total = 0.0
    for t in state.values():
        total += float(t.detach().to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def is_finite(state: Mapping[str, torch.Tensor]) -> bool:
    """True when no tensor holds NaN or +-inf."""
    _check_state(state)
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def module_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the adapted modules (``"...q_proj"``) in sorted order."""
    mods = set()
    for name in state:
        for tag in (".lora_A.", ".lora_B."):
            if tag in name:
                mods.add(name.split(tag)[0])
    return sorted(mods)


def merged_delta(
    state: Mapping[str, torch.Tensor], scaling: float | Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """``{module: scaling * B @ A}`` for every LoRA pair, in fp32.

    The result has ``nn.Linear`` orientation ``(out_features, in_features)``; for GPT-2 style
    ``Conv1D`` layers (peft ``fan_in_fan_out=True``) the weight delta is its transpose.
    ``scaling`` is ``alpha / r`` (one number, or a mapping module -> scaling).
    """
    _check_state(state)
    out: dict[str, torch.Tensor] = {}
    for mod in module_names(state):
        a_key, b_key = f"{mod}.lora_A.weight", f"{mod}.lora_B.weight"
        if a_key not in state or b_key not in state:
            raise AdapterStateError(f"module {mod!r} lacks {a_key!r} or {b_key!r}")
        a = state[a_key].detach().to(torch.float32)
        b = state[b_key].detach().to(torch.float32)
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise AdapterStateError(
                f"module {mod!r}: lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)} is not a valid product"
            )
        s = scaling[mod] if isinstance(scaling, Mapping) else scaling
        out[mod] = (b @ a) * float(s)
    return out


def to_wire(state: Mapping[str, torch.Tensor], dtype: str = "fp16") -> dict[str, np.ndarray]:
    """Encode a state as contiguous numpy arrays for safetensors (``dtype`` fp16|bf16|fp32).

    bf16 arrays are ``uint16`` bit patterns (round-to-nearest-even from fp32). Non-finite values
    and fp16 overflow raise :class:`AdapterStateError`.
    """
    if dtype not in WIRE_DTYPES:
        raise AdapterStateError(f"wire dtype must be one of {WIRE_DTYPES}, got {dtype!r}")
    _check_state(state)
    out: dict[str, np.ndarray] = {}
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise AdapterStateError(f"tensor {name!r} has non-finite values; refusing to encode")
        if dtype == "fp32":
            arr = t.numpy().copy()
        elif dtype == "fp16":
            peak = float(t.abs().max()) if t.numel() else 0.0
            if peak > _FP16_MAX:
                raise AdapterStateError(
                    f"tensor {name!r} has |value| {peak:.3g} > 65504, which fp16 cannot carry; "
                    "use dtype='bf16' or 'fp32'"
                )
            arr = t.to(torch.float16).numpy().copy()
        else:
            arr = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()
        out[name] = np.ascontiguousarray(arr)
    return out


def wire_dtype_of(arrays: Mapping[str, np.ndarray]) -> str:
    """The wire dtype of encoded arrays (all must agree)."""
    kinds = set()
    for name, arr in arrays.items():
        for k, np_dtype in _NP_WIRE.items():
            if arr.dtype == np_dtype:
                kinds.add(k)
                break
        else:
            raise AdapterStateError(f"wire array {name!r} has unsupported dtype {arr.dtype}")
    if len(kinds) > 1:
        raise AdapterStateError(f"wire arrays mix dtypes {sorted(kinds)}")
    return kinds.pop() if kinds else "fp32"


def from_wire(
    arrays: Mapping[str, np.ndarray], dtype: str | None = None
) -> dict[str, torch.Tensor]:
    """Decode :func:`to_wire` output into fp32 contiguous CPU tensors.

    ``dtype`` (optional) is the expected wire dtype; by default it is inferred from the numpy
    dtype (float16 -> fp16, float32 -> fp32, uint16 -> bf16). Non-finite decoded values raise.
    """
    got = wire_dtype_of(arrays)
    if dtype is not None:
        if dtype not in WIRE_DTYPES:
            raise AdapterStateError(f"wire dtype must be one of {WIRE_DTYPES}, got {dtype!r}")
        if arrays and got != dtype:
            raise AdapterStateError(f"wire arrays are {got}, expected {dtype}")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        if got == "bf16":
            t = torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(arr.copy())
        t = t.to(torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise AdapterStateError(f"decoded tensor {name!r} has non-finite values")
        out[name] = t
    return out
