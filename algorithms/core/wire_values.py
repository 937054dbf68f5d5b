"""Numeric values of wire tensors, shared by both runtimes: fp32 and fp16 travel as themselves,
bfloat16 as its uint16 bits (numpy has no bfloat16)."""

from __future__ import annotations

import numpy as np

#: declared dtype name -> numpy dtype the tensor has on the wire
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
}


def dtype_name(arr: np.ndarray) -> str:
    """The declared dtype of a wire array (uint16 carries bfloat16)."""
    return {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
            np.dtype(np.uint16): "bfloat16"}.get(arr.dtype, str(arr.dtype))


def to_float64(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Numeric value of a wire array as a new float64 array (decodes uint16 bfloat16 bits)."""
    # np.asarray throughout: arithmetic on 0-d arrays returns numpy scalars, not arrays
    if dtype == "bfloat16":
        return np.asarray(
            np.asarray(arr.astype(np.uint32) << 16).view(np.float32), dtype=np.float64
        )
    return arr.astype(np.float64)


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """Float values -> a new array in the wire dtype; bfloat16 rounds to nearest even."""
    if dtype == "bfloat16":
        bits = np.array(values, dtype=np.float32, order="C").view(np.uint32)  # keeps 0-d shape
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        return np.asarray((bits + rounding) >> 16).astype(np.uint16)
    return np.asarray(values).astype(WIRE_DTYPES[dtype])
