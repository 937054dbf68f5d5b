"""Typed errors raised by the shared model kernels (loading, LoRA, adapter state, training).

Every error derives from :class:`ModelError`, so a runtime can catch the whole family with one
``except`` and report it; the subclasses that describe bad input also derive from
``ValueError`` so generic callers that expect ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "AdapterStateError",
    "DataError",
    "LoraSpecError",
    "ModelError",
    "ModelLoadError",
    "QuantizationUnavailableError",
    "TrainingError",
    "UnsupportedArchitectureError",
]


class ModelError(Exception):
    """Base class of every error raised by ``algorithms.core`` model code."""


class ModelLoadError(ModelError):
    """A model directory is missing, incomplete, or cannot be loaded."""


class UnsupportedArchitectureError(ModelLoadError, ValueError):
    """The model's architecture is one cotune refuses (mixture-of-experts models); the message
    names the family and what is unsupported. Raised before any weight is read."""


class QuantizationUnavailableError(ModelLoadError):
    """A quantized load (nf4/int8) was requested with ``strict=True`` but bitsandbytes cannot
    be imported or does not work on the target device."""


class LoraSpecError(ModelError, ValueError):
    """A LoRA specification is invalid or does not fit the model it is applied to."""


class AdapterStateError(ModelError, ValueError):
    """An adapter state dict has unexpected names, shapes, dtypes or non-finite values."""


class DataError(ModelError, ValueError):
    """A dataset cannot be turned into training blocks (empty, mixed forms, bad fields)."""


class TrainingError(ModelError, ValueError):
    """A training configuration is invalid or training cannot start."""
