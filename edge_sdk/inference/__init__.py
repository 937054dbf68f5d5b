"""On-device inference: ONNX export with a KV cache, step-by-step generation on ONNX Runtime
or torch eager, and proxy-tuned generation against a large model with speculative blocks.

    from edge_sdk.inference import Generator, SamplingConfig
    gen = Generator.load("models/slm", backend="auto", export_dir="~/.cache/cotune/onnx")
    print(gen.generate("Question: ...", SamplingConfig(max_new_tokens=32)).text)

Modules: :mod:`.onnx_export` (export + verification + manifest), :mod:`.generate` (backends,
decoder with cache rollback, sampling, streaming, stop strings), :mod:`.proxy` (proxy-tuned
decoding, the :class:`~.proxy.LargeModel` protocol, speculative block verification),
:mod:`.cli` (``infer_cli``). onnxruntime is optional: without it the torch eager backend runs
and a log line says so. Importing this package imports neither torch nor onnxruntime.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "ExportError",
    "ExportUnsupportedError",
    "ExportVerificationError",
    "GenerationConfigError",
    "Generator",
    "InferenceError",
    "LargeModel",
    "LocalLargeModel",
    "ProxyGenerator",
    "SamplingConfig",
    "TokenizerMismatchError",
    "export_onnx",
    "infer_cli",
]


class InferenceError(Exception):
    """Base class of every error raised by ``edge_sdk.inference``."""


class ExportError(InferenceError):
    """A model could not be exported to ONNX (exporter missing or failed)."""


class ExportUnsupportedError(ExportError):
    """The model uses a feature the ONNX export cannot reproduce exactly (e.g. an attention
    pattern beyond causal + sliding window); the export refuses it before loading weights and
    :func:`~.generate.load_backend` runs the model on torch eager instead, logging why."""


class ExportVerificationError(ExportError):
    """The exported graph's logits differ from the torch model's beyond the tolerance."""


class BackendUnavailableError(InferenceError):
    """A requested backend cannot run here (e.g. ``backend='ort'`` with ``strict=True`` and no
    onnxruntime), or an export directory is missing or incomplete."""


class GenerationConfigError(InferenceError, ValueError):
    """A sampling / generation setting is invalid."""


class TokenizerMismatchError(InferenceError, ValueError):
    """Models combined token by token (proxy-tuning) do not share one vocabulary."""


_LAZY = {
    "Generator": ".generate",
    "SamplingConfig": ".generate",
    "LargeModel": ".proxy",
    "LocalLargeModel": ".proxy",
    "ProxyGenerator": ".proxy",
    "export_onnx": ".onnx_export",
    "infer_cli": ".cli",
}


def __getattr__(name: str):
    if name in _LAZY:  # lazy: importing the package does not import torch or onnxruntime
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
