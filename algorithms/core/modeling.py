"""Load (optionally quantized) causal LMs, attach LoRA, and move adapter-only state in and out.

Everything here works from a LOCAL Hugging Face directory (``config.json`` + safetensors
weights + tokenizer files); nothing is ever downloaded.

Quantization. ``quant`` is one of :data:`QUANT_MODES`: ``"nf4"`` (4-bit NormalFloat, QLoRA
style, double quantization), ``"int8"`` (LLM.int8()), or plain ``"bf16"``/``"fp16"``/``"fp32"``
weights. bitsandbytes is optional at run time (Jetson wheels come from elsewhere): when it
cannot be imported, or fails a tiny quantize/dequantize probe on the device, or the quantized
load itself fails, the model is loaded as bf16 (CUDA with bf16 support) or fp32 instead, a
warning is logged and :attr:`LoadReport.notes` says why. ``strict=True`` raises
:class:`QuantizationUnavailableError` instead. A quantized load that left a decoder-layer
linear in full precision counts as failed (transformers' bitsandbytes integration skips
``nn.Linear`` subclasses and only logs it; Falcon's are loaded as plain ``nn.Linear``, which
computes the same, so that they are quantized).

Families no path takes (mixture-of-experts models, see
``firmware_profiles.families.unsupported_reason``) are refused before any weight is read:
:class:`UnsupportedArchitectureError`.

bitsandbytes CPU trap. On CPUs with AVX512-BF16, ``bnb.nn.Linear4bit`` repacks its weight into
an inference-only layout the first time it runs in eval mode without grad
(``support_avx512bf16_for_cpu`` switches this on). After that, LoRA gradients through the layer
are wrong or missing and ``state_dict()``/``save_pretrained`` rewrite the weight in place,
changing the model's outputs. :func:`disable_cpu_weight_repacking` turns the flag off (and
unpacks a layer that was already repacked); :func:`load_causal_lm`, :func:`attach_lora`, and
the train/eval loops call it.

Adapter state. :func:`adapter_state` returns the LoRA tensors of the active adapter under
canonical names, which are peft's saved names without the ``"base_model.model."`` wrapper
prefix, e.g. ``"model.layers.0.self_attn.q_proj.lora_A.weight"``; values are fp32, contiguous,
CPU copies. :func:`save_peft_adapter` writes the standard peft layout
(``adapter_config.json`` + ``adapter_model.safetensors``) that
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)`` loads.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from algorithms.core.errors import (
    AdapterStateError,
    LoraSpecError,
    ModelError,
    ModelLoadError,
    QuantizationUnavailableError,
    UnsupportedArchitectureError,
)
from algorithms.core.lora_state import signature_diff, state_signature
from firmware_profiles import FAMILIES, WorkloadError, targets_for_model_type, unsupported_reason

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "DEFAULT_LORA_TARGETS",
    "QUANT_MODES",
    "LoadReport",
    "LoraSpec",
    "QuantMode",
    "adapter_state",
    "attach_lora",
    "bitsandbytes_status",
    "disable_cpu_weight_repacking",
    "is_checkpointing",
    "is_quantized",
    "load_adapter_state",
    "load_causal_lm",
    "load_peft_adapter",
    "lora_spec_of",
    "model_type_of",
    "save_peft_adapter",
    "set_gradient_checkpointing",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

QuantMode = Literal["nf4", "int8", "bf16", "fp16", "fp32"]
QUANT_MODES: tuple[str, ...] = ("nf4", "int8", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LORA_TAGS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

#: the default LoRA targets per architecture: the family table of ``firmware_profiles.families``,
#: which the memory planner, the fit check and the ONNX export read too (one description, so
#: the planned and the loaded adapter cannot differ)
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    mt: fam.default_targets for mt, fam in FAMILIES.items()
}
# Architectures whose linear layers are transformers' Conv1D (weight stored as in x out).
_FAN_IN_FAN_OUT = {mt for mt, fam in FAMILIES.items() if fam.conv1d}


# --------------------------------------------------------------------------------------------
# bitsandbytes availability


def _import_bitsandbytes() -> Any:
    """Import hook for bitsandbytes (tests monkeypatch this to simulate a device without it)."""
    import bitsandbytes

    return bitsandbytes


_BNB_PROBE: dict[str, tuple[bool, str]] = {}


def bitsandbytes_status(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """``(usable, reason)``: whether bitsandbytes imports and quantizes on ``device``.

    The probe quantizes a 64x64 matrix to nf4 and back; results are cached per device (the
    import itself is attempted on every call so a monkeypatched hook takes effect).
    """
    try:
        bnb = _import_bitsandbytes()
    except Exception as exc:  # ImportError, or a broken native library raising at import
        return False, f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc})"
    key = str(torch.device(device))
    if key in _BNB_PROBE:
        return _BNB_PROBE[key]
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, 64, generator=gen).to(device)
        q, state = bnb.functional.quantize_4bit(x, quant_type="nf4")
        y = bnb.functional.dequantize_4bit(q, state).float()
        err = float((y - x).abs().max())
        result = (
            (True, f"bitsandbytes {getattr(bnb, '__version__', '?')} works on {key}")
            if math.isfinite(err) and err < 1.0
            else (False, f"bitsandbytes nf4 probe on {key} gave error {err:.3g}")
        )
    except Exception as exc:
        result = (False, f"bitsandbytes does not work on {key} ({type(exc).__name__}: {exc})")
    _BNB_PROBE[key] = result
    return result


def disable_cpu_weight_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes 4-bit layers from repacking weights for CPU inference; returns count.

    Sets ``support_avx512bf16_for_cpu = False`` on every module that has it
    (``bnb.nn.Linear4bit`` and subclasses) and converts any weight already repacked
    (``quant_state.packing_format_for_cpu``) back to the standard layout, so eval-mode forwards
    no longer break later training or saving. Safe to call repeatedly and on any model.
    """
    count = 0
    for mod in model.modules():
        if not hasattr(mod, "support_avx512bf16_for_cpu"):
            continue
        mod.support_avx512bf16_for_cpu = False
        count += 1
        weight = getattr(mod, "weight", None)
        qs = getattr(weight, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            _unpack_cpu_weight(mod, weight, qs)
    return count


def _unpack_cpu_weight(mod: torch.nn.Module, weight: Any, qs: Any) -> None:
    """Undo bitsandbytes' CPU inference repacking of one 4-bit layer.

    The repacking is lossy: it dequantizes nested block scales and stores them as bf16. Its own
    inverse re-quantizes them (a second rounding) when the layer was double-quantized and leaves
    them transposed in bf16 otherwise. Here the weight nibbles are restored exactly and the
    bf16 scales are kept as plain fp32 absmax (nested=False), so the layer is consistent again
    and the only residue is the bf16 rounding of the scales (relative error <= 2**-9).
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    qs.original_nested = False  # keep the inverse from re-quantizing the scales
    data, qs = _convert_weight_packed_for_cpu_inverse(weight.data, qs)
    rows, cols = int(qs.shape[0]), int(qs.shape[1])
    absmax = qs.absmax
    if absmax.dim() == 2 and tuple(absmax.shape) == (cols // qs.blocksize, rows):
        absmax = absmax.T
    qs.absmax = absmax.reshape(-1).to(torch.float32).contiguous()
    qs.nested = False
    qs.state2 = None
    qs.offset = None
    weight.data = data
    weight.quant_state = qs
    if getattr(mod, "quant_state", None) is not None:
        mod.quant_state = qs


# --------------------------------------------------------------------------------------------
# loading


@dataclass
class LoadReport:
    """What :func:`load_causal_lm` actually did (may differ from what was asked)."""

    path: str
    requested_quant: str
    quant: str
    device: str
    compute_dtype: str
    model_type: str
    num_parameters: int
    weight_bytes: int
    gradient_checkpointing: bool
    bitsandbytes: str | None
    cpu_repacking_disabled: int
    load_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def fell_back(self) -> bool:
        """True when a quantized load was requested but plain weights were loaded."""
        return self.quant != self.requested_quant

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fell_back"] = self.fell_back
        return d


def _dtype_key(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        for k, v in _DTYPES.items():
            if v == dtype:
                return k
        raise ModelLoadError(f"unsupported compute dtype {dtype}; use bf16, fp16 or fp32")
    key = _DTYPE_ALIASES.get(str(dtype).lower().replace("torch.", ""))
    if key is None:
        raise ModelLoadError(f"unsupported compute dtype {dtype!r}; use bf16, fp16 or fp32")
    return key


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {device!r}; use 'cpu', 'cuda[:N]' or 'auto'")
    return dev


def _bf16_supported(device: torch.device) -> bool:
    # On CPU bf16 matmuls are emulated/slow on most parts and lose precision for no memory
    # pressure reason, so the CPU fallback is fp32.
    return device.type == "cuda" and bool(torch.cuda.is_bf16_supported())


def _default_compute(quant: str, device: torch.device) -> str:
    if quant in _DTYPES:
        return quant
    if device.type == "cuda":
        if quant == "int8":
            return "fp16"
        return "bf16" if _bf16_supported(device) else "fp16"
    return "fp32"


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _config_json(model_dir: str | Path) -> dict[str, Any]:
    cfg_path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {cfg_path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_path} is not a JSON object")
    return cfg


def model_type_of(model_or_path: Any) -> str:
    """``config.model_type`` of a (possibly peft-wrapped) model or of a local model directory."""
    if isinstance(model_or_path, (str, Path)):
        return str(_config_json(model_or_path).get("model_type", ""))
    cfg = getattr(unwrap_model(model_or_path), "config", None)
    return str(getattr(cfg, "model_type", "") or "")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        return get_base()
    return model


def is_quantized(model: torch.nn.Module) -> bool:
    base = unwrap_model(model)
    return bool(
        getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
    )


def load_causal_lm(
    path: str | Path,
    quant: str = "fp32",
    device: str | torch.device = "cpu",
    compute_dtype: str | torch.dtype | None = None,
    gradient_checkpointing: bool = False,
    strict: bool = False,
    double_quant: bool = True,
) -> tuple[torch.nn.Module, Any, LoadReport]:
    """Load a causal LM and its tokenizer from a local Hugging Face directory.

    ``quant``: nf4 | int8 | bf16 | fp16 | fp32. ``compute_dtype``: dtype of activations and of
    the non-quantized weights (default: the quant dtype for plain modes; for nf4 bf16/fp16 on
    CUDA and fp32 on CPU; for int8 fp16 on CUDA and fp32 on CPU). ``device``: cpu, cuda[:N] or
    auto. Returns ``(model, tokenizer, report)``; the model is in eval mode with all weights
    trainable flags untouched (:func:`attach_lora` freezes the base).
    """
    t0 = time.perf_counter()
    if quant not in QUANT_MODES:
        raise ModelLoadError(f"unknown quant mode {quant!r}; choose one of {list(QUANT_MODES)}")
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelLoadError(
            f"{str(p)!r} is not a local Hugging Face model directory (needs config.json, "
            "safetensors weights and tokenizer files); cotune never downloads models"
        )
    why_not = unsupported_reason(_config_json(p))
    if why_not is not None:
        raise UnsupportedArchitectureError(f"{p}: {why_not}")
    dev = _resolve_device(device)
    notes: list[str] = []
    effective = quant
    bnb_version: str | None = None

    if quant in ("nf4", "int8"):
        ok, why = bitsandbytes_status(dev)
        if ok:
            bnb_version = str(getattr(_import_bitsandbytes(), "__version__", "?"))
        else:
            if strict:
                raise QuantizationUnavailableError(
                    f"{quant} requested with strict=True but {why}; install a bitsandbytes "
                    "build for this device or load with quant='bf16'/'fp32'"
                )
            effective = "bf16" if _bf16_supported(dev) else "fp32"
            notes.append(f"{quant} unavailable: {why}; loaded {effective} weights instead")
            logger.warning("%s: %s", p, notes[-1])

    compute_key = _dtype_key(compute_dtype) or _default_compute(effective, dev)
    if effective in _DTYPES and compute_dtype is not None and compute_key != effective:
        notes.append(f"compute_dtype {compute_key} ignored for plain {effective} weights")
        compute_key = effective
    if dev.type == "cpu" and compute_key == "fp16":
        notes.append("fp16 on CPU is slow and numerically fragile; prefer fp32 on CPU")

    model = None
    if effective in ("nf4", "int8"):
        try:
            model = _load_quantized(p, effective, dev, _DTYPES[compute_key], double_quant)
        except Exception as exc:
            if strict:
                raise QuantizationUnavailableError(
                    f"{quant} load of {p} failed on {dev}: {type(exc).__name__}: {exc}"
                ) from exc
            effective = "bf16" if _bf16_supported(dev) else "fp32"
            compute_key = effective
            notes.append(
                f"{quant} load failed ({type(exc).__name__}: {exc}); loaded {effective} weights instead"
            )
            logger.warning("%s: %s", p, notes[-1])
    if model is None:
        model = _load_plain(p, _DTYPES[effective], dev)

    repacking = disable_cpu_weight_repacking(model)
    if gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    tokenizer = _load_tokenizer(p, notes)

    from algorithms.core.memory import tensor_bytes

    report = LoadReport(
        path=str(p),
        requested_quant=quant,
        quant=effective,
        device=str(dev),
        compute_dtype=compute_key,
        model_type=model_type_of(model),
        num_parameters=_logical_num_parameters(model),
        weight_bytes=tensor_bytes(model),
        gradient_checkpointing=bool(gradient_checkpointing),
        bitsandbytes=bnb_version if effective in ("nf4", "int8") else None,
        cpu_repacking_disabled=repacking,
        load_seconds=time.perf_counter() - t0,
        notes=notes,
    )
    return model, tokenizer, report


def _logical_num_parameters(model: torch.nn.Module) -> int:
    """Parameter count with 4-bit weights counted at their logical (unpacked) shape."""
    total = 0
    for t in model.parameters():
        qs = getattr(t, "quant_state", None)
        shape = getattr(qs, "shape", None)
        total += math.prod(int(s) for s in shape) if shape is not None else int(t.numel())
    return total


def _quiet_transformers() -> None:
    """No per-load "Loading weights" bars: cotune prints its own progress lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


#: transformers' from_pretrained builds models under process-global init contexts (meta
#: device, weight tying); two threads loading at once (several EdgeClients in one process)
#: got each other's meta tensors. One load at a time per process.
_LOAD_LOCK = threading.Lock()


def _load_plain(p: Path, dtype: torch.dtype, dev: torch.device) -> torch.nn.Module:
    with _LOAD_LOCK:
        return _load_plain_unlocked(p, dtype, dev)


def _load_plain_unlocked(p: Path, dtype: torch.dtype, dev: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p), local_files_only=True, **{_dtype_kwarg(): dtype}
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {p}: {type(exc).__name__}: {exc}") from exc
    return model.to(dev)


def _load_quantized(
    p: Path, quant: str, dev: torch.device, compute: torch.dtype, double_quant: bool
) -> torch.nn.Module:
    with _LOAD_LOCK:
        return _load_quantized_unlocked(p, quant, dev, compute, double_quant)


def _load_quantized_unlocked(
    p: Path, quant: str, dev: torch.device, compute: torch.dtype, double_quant: bool
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _quiet_transformers()

    if quant == "nf4":
        qcfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=double_quant,
        )
    else:
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    device_map = {"": dev.index if dev.type == "cuda" and dev.index is not None else str(dev)}
    model_type = model_type_of(p)
    with _plain_linear_classes(model_type):
        model = AutoModelForCausalLM.from_pretrained(
            str(p),
            local_files_only=True,
            quantization_config=qcfg,
            device_map=device_map,
            **{_dtype_kwarg(): compute},
        )
    _check_quantized(model, quant, model_type)
    return model


#: decoder linears that transformers builds from a subclass of ``nn.Linear``, which its
#: bitsandbytes integration leaves alone (it converts ``type(module) is nn.Linear`` only, and
#: only logs that it found nothing): model_type -> (module, class). The subclass computes what
#: ``nn.Linear`` computes, so a quantized load builds plain ``nn.Linear`` layers instead.
_LINEAR_SUBCLASSES = {"falcon": ("transformers.models.falcon.modeling_falcon", "FalconLinear")}


@contextlib.contextmanager
def _plain_linear_classes(model_type: str) -> Any:
    """While loading (under the load lock): the family's ``nn.Linear`` subclass is
    ``nn.Linear``. A class that moved is left alone; :func:`_check_quantized` catches the rest."""
    where = _LINEAR_SUBCLASSES.get(model_type)
    module = importlib.import_module(where[0]) if where is not None else None
    saved = getattr(module, where[1], None) if where is not None else None
    if saved is None or not issubclass(saved, torch.nn.Linear):
        yield
        return
    setattr(module, where[1], torch.nn.Linear)
    try:
        yield
    finally:
        setattr(module, where[1], saved)


def _check_quantized(model: torch.nn.Module, quant: str, model_type: str) -> None:
    """A quantized load must have quantized every decoder-layer linear the family table
    names (any linear for a family it does not know); transformers only logs when it skips
    them, and the weights would stay in full precision under an nf4/int8 label."""
    bnb = _import_bitsandbytes()
    qcls = bnb.nn.Linear4bit if quant == "nf4" else bnb.nn.Linear8bitLt
    fam = FAMILIES.get(model_type)
    names = set(fam.linear_names) if fam is not None else None
    quantized, plain = 0, []
    for name, mod in model.named_modules():
        if isinstance(mod, qcls):
            quantized += 1
        elif names is not None and name.rsplit(".", 1)[-1] in names:
            w = getattr(mod, "weight", None)
            leaf = not any(True for _ in mod.children())
            if isinstance(w, torch.Tensor) and w.dim() == 2 and leaf:
                plain.append(name)
    if plain or not quantized:
        raise ModelLoadError(
            f"the {quant} load of this {model_type or 'model'} left {len(plain) or 'every'} "
            f"decoder linear layer(s) unquantized (e.g. {plain[:2]}): transformers' "
            "bitsandbytes integration does not convert them"
        )


def _load_tokenizer(p: Path, notes: list[str]) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the tokenizer from {p} ({type(exc).__name__}: {exc}); save it next to "
            "the weights with tokenizer.save_pretrained"
        ) from exc
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelLoadError(f"tokenizer in {p} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
        notes.append("tokenizer has no pad token; using eos as pad")
    return tok


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool = True) -> bool:
    """Turn activation (gradient) checkpointing on or off; returns the new state.

    transformers 5 calls it ``activation_checkpointing_enable`` (``gradient_checkpointing_enable``
    is a deprecated alias); older versions only have the latter. Non-reentrant checkpointing is
    used, so frozen-base + LoRA training needs no input-grad hack, but the embedding-output hook
    is still installed for compatibility with reentrant callers. Disables the KV cache while on.
    """
    base = unwrap_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        if enabled:
            raise ModelError(f"{type(base).__name__} does not support activation checkpointing")
        return False
    kwargs = {"use_reentrant": False}
    if enabled:
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if getattr(base, "_require_grads_hook", None) is None and hasattr(
            base, "enable_input_require_grads"
        ):
            base.enable_input_require_grads()
        if getattr(base, "config", None) is not None:
            base.config.use_cache = False
    else:
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()
    return is_checkpointing(model)


def is_checkpointing(model: torch.nn.Module) -> bool:
    base = unwrap_model(model)
    return any(bool(getattr(m, "gradient_checkpointing", False)) for m in base.modules())


# --------------------------------------------------------------------------------------------
# LoRA


@dataclass
class LoraSpec:
    """LoRA hyper-parameters.

    ``target_modules``: ``None`` picks the architecture's defaults
    (:data:`DEFAULT_LORA_TARGETS`); a list of module names applies to every model; a mapping
    from ``model_type`` to a list (or ``None``: that architecture's defaults) lets one spec
    reach a fleet of several architectures, e.g. ``{"llama": [..., "lm_head"], "gpt2": None}``;
    a model whose type it does not name is refused (never a silent default)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | dict[str, tuple[str, ...] | None] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoraSpecError(f"LoRA rank r must be a positive integer (e.g. 8), got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise LoraSpecError(f"LoRA alpha must be a number (e.g. 2*r), got {self.alpha!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise LoraSpecError(f"LoRA alpha must be finite and > 0 (e.g. 2*r), got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise LoraSpecError(f"LoRA dropout must be a number in [0, 1), got {self.dropout!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise LoraSpecError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        tm = self.target_modules
        if isinstance(tm, Mapping):
            if not tm:
                raise LoraSpecError("target_modules is an empty mapping; pass None for defaults")
            by_type: dict[str, tuple[str, ...] | None] = {}
            for model_type, mods in tm.items():
                if not isinstance(model_type, str) or not model_type:
                    raise LoraSpecError(f"target_modules keys are model types, got {model_type!r}")
                by_type[model_type] = None if mods is None else _target_names(mods)
            self.target_modules = by_type
        elif tm is not None:
            self.target_modules = _target_names(tm)

    @property
    def scaling(self) -> float:
        """LoRA output scale ``alpha / r``."""
        return self.alpha / self.r

    def resolved_targets(self, model_type: str) -> tuple[str, ...]:
        try:
            tm = targets_for_model_type(self.target_modules, model_type)
        except WorkloadError as exc:
            raise LoraSpecError(str(exc)) from None
        if tm is not None:
            return tm
        if model_type not in DEFAULT_LORA_TARGETS:
            raise LoraSpecError(
                f"no default LoRA target modules for model_type {model_type!r}; pass "
                f"target_modules explicitly (known defaults: {sorted(DEFAULT_LORA_TARGETS)})"
            )
        return DEFAULT_LORA_TARGETS[model_type]

    def to_peft_config(self, model_type: str, **extra: Any) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.resolved_targets(model_type)),
            bias="none",
            task_type="CAUSAL_LM",
            fan_in_fan_out=model_type in _FAN_IN_FAN_OUT,
            **extra,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": _targets_to_json(self.target_modules),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraSpec:
        unknown = set(d) - {"r", "alpha", "dropout", "target_modules"}
        if unknown:
            raise LoraSpecError(f"unknown LoRA spec fields {sorted(unknown)}")
        tm = d.get("target_modules")
        return cls(
            r=d.get("r", 8),
            alpha=d.get("alpha", 16.0),
            dropout=d.get("dropout", 0.0),
            target_modules=tm if tm is None or isinstance(tm, (str, Mapping)) else tuple(tm),
        )


def _target_names(mods: Any) -> tuple[str, ...]:
    if isinstance(mods, str):
        raise LoraSpecError(
            "target_modules must be a list of module names such as ['q_proj', 'v_proj'], "
            f"not the string {mods!r}"
        )
    try:
        mods = tuple(mods)
    except TypeError:
        raise LoraSpecError(f"target_modules must be a list of module names, got {mods!r}") from None
    if not mods:
        raise LoraSpecError("target_modules is empty; pass None for architecture defaults")
    for m in mods:
        if not isinstance(m, str) or not m or m != m.strip():
            raise LoraSpecError(f"invalid target module name {m!r}")
    if len(set(mods)) != len(mods):
        raise LoraSpecError(f"target_modules has duplicates: {list(mods)}")
    return mods


def _targets_to_json(tm: Any) -> Any:
    if isinstance(tm, dict):
        return {k: None if v is None else list(v) for k, v in tm.items()}
    return list(tm) if tm else None


def _linear_leaf_names(model: torch.nn.Module) -> list[str]:
    names = set()
    for name, mod in model.named_modules():
        if not name or any(True for _ in mod.children()):
            continue
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(mod, torch.nn.Embedding):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def attach_lora(
    model: torch.nn.Module,
    spec: LoraSpec,
    *,
    seed: int | None = None,
    upcast_for_stability: bool = False,
    peft_extra: Mapping[str, Any] | None = None,
) -> Any:
    """Freeze the base model and wrap it in a ``PeftModel`` with a fresh LoRA adapter.

    Quantized models are prepared like peft's ``prepare_model_for_kbit_training`` minus its
    upcast of every non-quantized fp16/bf16 weight (embeddings, LM head, norms) to fp32, which
    can double the memory of a small model; pass ``upcast_for_stability=True`` to get peft's
    exact behaviour. LoRA tensors are fp32 (peft's default). ``seed`` makes the LoRA init
    deterministic without touching the global RNG. ``peft_extra``: more ``LoraConfig`` fields
    (e.g. ``layers_to_transform`` to adapt only some decoder layers).
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if not isinstance(spec, LoraSpec):
        raise LoraSpecError(f"spec must be a LoraSpec, got {type(spec).__name__}")
    if isinstance(model, PeftModel):
        raise LoraSpecError("model already carries a peft adapter; attach LoRA to the base model")
    model_type = model_type_of(model)
    targets = spec.resolved_targets(model_type)
    leaf_names = _linear_leaf_names(model)
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        raise LoraSpecError(
            f"target module(s) {missing} not found in this {model_type or 'model'}; "
            f"linear layers it has: {leaf_names}"
        )

    checkpointing = is_checkpointing(model)
    for prm in model.parameters():
        prm.requires_grad_(False)
    if is_quantized(model) and upcast_for_stability:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    peft_cfg = spec.to_peft_config(model_type, **dict(peft_extra or {}))
    with warnings.catch_warnings():
        # peft still queries transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        if seed is None:
            peft_model = get_peft_model(model, peft_cfg)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                peft_model = get_peft_model(model, peft_cfg)
    disable_cpu_weight_repacking(peft_model)
    if checkpointing:
        set_gradient_checkpointing(peft_model, True)
    return peft_model


def lora_spec_of(model: torch.nn.Module) -> LoraSpec:
    """The :class:`LoraSpec` of a peft model's active LoRA adapter."""
    cfg_map = getattr(model, "peft_config", None)
    if not cfg_map:
        raise LoraSpecError("model has no peft adapter")
    cfg = cfg_map[_active_adapter(model)]
    tm = cfg.target_modules
    if isinstance(tm, str):
        raise LoraSpecError(
            f"adapter uses a regex target_modules {tm!r}; cannot express as LoraSpec"
        )
    return LoraSpec(
        r=int(cfg.r),
        alpha=float(cfg.lora_alpha),
        dropout=float(cfg.lora_dropout),
        target_modules=tuple(sorted(tm)) if tm else None,
    )


# --------------------------------------------------------------------------------------------
# adapter state


def _active_adapter(model: torch.nn.Module) -> str:
    name = getattr(model, "active_adapter", None)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return str(name) if name else "default"


def _canonical(name: str, adapter: str) -> str | None:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in _LORA_TAGS:
            if i + 1 < len(parts) and parts[i + 1] == adapter:
                del parts[i + 1]
                break
            return None  # another (inactive) adapter
    else:
        return None
    canon = ".".join(parts)
    if canon.startswith(_PEFT_PREFIX):
        canon = canon[len(_PEFT_PREFIX) :]
    return canon


def _lora_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    adapter = _active_adapter(model)
    out: dict[str, torch.nn.Parameter] = {}
    for name, prm in model.named_parameters():
        canon = _canonical(name, adapter)
        if canon is not None:
            out[canon] = prm
    return out


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors of the active adapter: canonical name -> fp32 contiguous CPU copy."""
    params = _lora_params(model)
    if not params:
        raise AdapterStateError("model has no LoRA parameters; call attach_lora first")
    return {
        n: p.detach().to("cpu", torch.float32).contiguous().clone()
        for n, p in sorted(params.items())
    }


def load_adapter_state(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True
) -> None:
    """Copy ``state`` into the model's active LoRA adapter (dtype/device follow the model).

    ``strict=True`` requires exactly the model's adapter names; ``strict=False`` tolerates
    missing and unexpected names but still checks shapes of the ones that match. Non-finite
    values are always rejected. Raises :class:`AdapterStateError` before writing anything.
    """
    params = _lora_params(model)
    if not params:
        raise AdapterStateError("model has no LoRA parameters; call attach_lora first")
    got = state_signature(state)
    expected = {n: (tuple(p.shape), "float32") for n, p in params.items()}
    if not strict:
        common = set(got) & set(expected)
        if not common:
            raise AdapterStateError(
                "no adapter tensor name matches the model; e.g. model has "
                f"{sorted(expected)[:2]}, state has {sorted(got)[:2]}"
            )
        expected = {n: expected[n] for n in common}
        got = {n: got[n] for n in common}
    problems = signature_diff(expected, got)
    if problems:
        raise AdapterStateError("adapter state does not fit the model: " + "; ".join(problems[:8]))
    for n in got:
        if not bool(torch.isfinite(state[n]).all()):
            raise AdapterStateError(f"adapter tensor {n!r} has non-finite values")
    with torch.no_grad():
        for n in got:
            prm = params[n]
            prm.copy_(state[n].to(device=prm.device, dtype=prm.dtype))


def save_peft_adapter(
    model_or_state: torch.nn.Module | Mapping[str, torch.Tensor],
    base_path: str | Path,
    out_dir: str | Path,
    spec: LoraSpec | None = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (standard peft layout).

    ``model_or_state``: a peft model (its active adapter is saved; ``spec`` defaults to its
    own) or an adapter state dict (``spec`` required). ``base_path`` is the local base model
    directory; it is recorded as ``base_model_name_or_path`` and tells the architecture.
    """
    from safetensors.torch import save_file

    if isinstance(model_or_state, torch.nn.Module):
        state = adapter_state(model_or_state)
        spec = spec or lora_spec_of(model_or_state)
    else:
        state = dict(model_or_state)
        if spec is None:
            raise LoraSpecError("saving a bare adapter state needs its LoraSpec (spec=...)")
    model_type = model_type_of(base_path)
    targets = spec.resolved_targets(model_type)
    _check_state_matches_spec(state, spec, targets)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = spec.to_peft_config(model_type, inference_mode=True)
    cfg.base_model_name_or_path = str(base_path)
    cfg.save_pretrained(str(out))
    tensors = {
        _PEFT_PREFIX + n: t.detach().to("cpu").contiguous() for n, t in sorted(state.items())
    }
    save_file(tensors, str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def _check_state_matches_spec(
    state: Mapping[str, torch.Tensor], spec: LoraSpec, targets: tuple[str, ...]
) -> None:
    if not state:
        raise AdapterStateError("adapter state is empty")
    for n, t in state.items():
        if ".lora_A." in n:
            mod = n.split(".lora_A.")[0]
            if t.dim() != 2 or t.shape[0] != spec.r:
                raise AdapterStateError(
                    f"{n}: shape {tuple(t.shape)} does not have rank r={spec.r}"
                )
        elif ".lora_B." in n:
            mod = n.split(".lora_B.")[0]
            if t.dim() != 2 or t.shape[1] != spec.r:
                raise AdapterStateError(
                    f"{n}: shape {tuple(t.shape)} does not have rank r={spec.r}"
                )
        else:
            raise AdapterStateError(f"{n}: not a LoRA A/B tensor")
        if mod.rsplit(".", 1)[-1] not in targets:
            raise AdapterStateError(f"{n}: module is not among the spec's targets {list(targets)}")


def load_peft_adapter(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], LoraSpec]:
    """Read a peft adapter directory into ``(canonical state, LoraSpec)`` without a model."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg_path, w_path = d / ADAPTER_CONFIG_NAME, d / ADAPTER_WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise AdapterStateError(f"{d} lacks {ADAPTER_CONFIG_NAME} or {ADAPTER_WEIGHTS_NAME}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise AdapterStateError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterStateError(f"{d} holds a {cfg.get('peft_type')} adapter, not LoRA")
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        raise AdapterStateError(f"{d}: regex target_modules {tm!r} are not supported")
    spec = LoraSpec(
        r=int(cfg["r"]),
        alpha=float(cfg.get("lora_alpha", cfg["r"])),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=tuple(sorted(tm)) if tm else None,
    )
    raw = load_file(str(w_path))
    state = {}
    for k, v in raw.items():
        name = k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k
        state[name] = v.to(torch.float32).contiguous()
    return dict(sorted(state.items())), spec
