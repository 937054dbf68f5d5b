"""Memory planner: will this (quantized) LoRA fine-tuning job fit this device?

:func:`plan` predicts the peak memory of training (or of inference) from a model's
``config.json``, a :class:`~firmware_profiles.profiles.DeviceProfile` and a :class:`Workload`,
with a breakdown by term, and estimates the training speed; :func:`recommend` searches
quantization, LoRA rank, batch, sequence length and checkpointing for the FASTEST
configuration that fits with a margin (not the largest). Standard library only: the planner
never imports torch, so it runs on any machine.

How the numbers are derived (first principles, per token unless said otherwise; ``c`` = bytes
of the compute dtype, ``h`` hidden, ``i`` intermediate, ``kv`` = kv_heads * head_dim, ``nh``
heads, ``T`` sequence length, ``V`` vocabulary, ``L`` layers, ``N = B*T`` tokens of a step):

weights
    quantized linear layers (every decoder Linear/Conv1D; the LM head is never quantized):
    nf4 = numel/2 bytes + one absmax per 64-value block (fp32, or with double quantization an
    uint8 per block + an fp32 per 256 blocks + a 256-entry fp32 code per layer); int8 = numel
    bytes + an fp32 scale per output row. Embeddings, LM head (once when tied), norms and
    biases stay in the compute dtype. Plain modes: every parameter in that dtype.
LoRA / gradients / optimizer
    ``r * (in + out)`` fp32 parameters per adapted layer (peft keeps adapters in fp32);
    gradients of the trainable parameters only; AdamW keeps two states of the parameter's
    dtype (8 bytes per fp32 parameter), bitsandbytes' 8-bit AdamW 2 bytes + blockwise scales
    (fp32 states for tensors under 4096 values), SGD none (with momentum one).
activations
    the tensors autograd saves for backward, derived per decoder layer from the forward code of
    each family's transformers decoder layer (and peft's LoRA layer), with the family's layout
    from :mod:`firmware_profiles.families` (and checked there against what autograd saves, every
    family, fp32 and bf16): a frozen Linear saves nothing; a LoRA layer saves its input (a
    separate fp32 copy per adapter when the compute dtype is bf16/fp16, because peft casts the
    input to the adapter's dtype) and its rank-r intermediate; an int8 base layer saves its
    input; RMSNorm saves an fp32 copy of its input plus rsqrt (LayerNorm: input, mean, rstd);
    SwiGLU saves gate, silu(gate) and up (+ their product for a LoRA down_proj); GPT-2's
    tanh-GELU is written in Python and saves 4 tensors of size ``i``; CPU dropout saves its
    noise in the compute dtype (CUDA: a bool mask); ReLU (OPT) saves its output, which is the
    down projection's input. Attention runs as transformers runs it for the family
    (:attr:`Family.attn_implementation`: eager for Gemma-2, SDPA otherwise). Fused SDPA (flash /
    memory-efficient, and PyTorch's CPU flash kernel) saves q, k, v, the output and a fp32
    logsumexp; where q/k/v are views of one fused projection (Phi-3, GPT-NeoX, Falcon, GPT-2)
    the saved v keeps that whole output alive; a rotary embedding that concatenates (Phi-3,
    GPT-NeoX) makes the output projection read a copy; a materialized mask (Falcon always; a
    sliding window narrower than the sequence) is saved per layer in the compute dtype and makes
    transformers repeat grouped k/v. Eager attention saves the softmax ``nh*T`` per token (fp32
    + a compute-dtype copy, GPT-2 in the compute dtype; + dropout; + the tanh of a soft-cap,
    Gemma-2), and contiguous copies of q and the repeated k/v; SDPA's math fallback (used on CPU
    when attention dropout is on) saves the same in fp32 whatever the dtype. Norms per layer: 2,
    4 with post-norms (Gemma-2/3), a parallel block's one or two norms sharing their input
    (GPT-NeoX, Falcon). The first layer's input does not require grad (embeddings are frozen)
    and the final norm saves its input. With activation checkpointing (non-reentrant) only each
    layer's input is kept, and one layer is recomputed at a time during backward; bitsandbytes'
    int8 matmul keeps its input as a ``ctx`` attribute, which checkpointing cannot drop, so int8
    layers' inputs stay alive anyway.
logits
    ``N*V`` logits in the compute dtype stay alive through backward; cross-entropy upcasts to
    fp32 and its backward briefly holds three fp32 ``N*V`` tensors (log-softmax output, the
    incoming gradient and the result): ``(c + 12) * N * V`` bytes, often the largest term for
    small models with big vocabularies. A final-logit soft-cap (Gemma-2) keeps its tanh output
    too: another ``N*V`` in the compute dtype.
phases
    the peak is the largest of (A) the start of backward: persistent + saved activations +
    logits/loss; (B) the last layer's backward (or a recomputed layer with checkpointing):
    persistent + activations + logits + gradient temporaries of one layer + a dequantized
    weight; (C) the optimizer step: persistent + gradients + optimizer temporaries.
runtime and workspace
    runtime = what the process holds before the model loads: on CPU the RSS of Python + torch +
    transformers + peft + bitsandbytes imports (:data:`CPU_IMPORT_RSS_BYTES`, measured); on
    Jetson that plus the CUDA context (profile data); on a discrete GPU only the context.
    workspace = allocator and library overhead: on CPU a constant (:data:`CPU_WORKSPACE_BYTES`,
    measured once on a held-out tiny model), on CUDA :data:`CUDA_FRAGMENTATION` of the
    transient bytes (caching-allocator rounding and fragmentation; an assumption, not
    measured here).

speed
    :func:`_estimate_speed`: a roofline sum per training step, FLOPs at the device's matmul
    rate (from the profile's TOPS) plus memory traffic at its bandwidth (weights read per
    pass, a quantized weight dequantized per pass, activations and logits written and read);
    a rough estimate for ranking configurations, not a benchmark.

Assumptions: packed training blocks without padding (so attention gets no mask and GQA runs
without repeating k/v), peft LoRA with fp32 adapters, batch = micro-batch, the training loop of
``algorithms.core.training`` (AdamW, ``zero_grad(set_to_none=True)``), no CPU offload. On CPU
the plan is for live memory; glibc's dynamic mmap threshold can keep freed activations
resident and add 30-60% to the peak RSS unless ``MALLOC_MMAP_THRESHOLD_`` is pinned (the bench
measures with it pinned and reports the default too).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import DoesNotFit, ModelConfigError, WorkloadError
from .families import (
    FAMILIES,
    LM_HEAD,
    Family,
    Linear,
    check_supported,
    fallback_family,
    layer_linears,
)
from .profiles import GIB, MIB, QUANT_MODES, DeviceProfile, get_profile

__all__ = [
    "BANDWIDTH_EFFICIENCY",
    "CPU_BLAS_POOL_FACTOR",
    "CPU_IMPORT_RSS_BYTES",
    "CPU_WORKSPACE_BYTES",
    "CPU_WORKSPACE_REDUCED_PRECISION_EXTRA",
    "CUDA_FRAGMENTATION",
    "DEFAULT_APP_RESERVE_BYTES",
    "DEFAULT_LORA_TARGETS",
    "DEFAULT_MARGIN",
    "DEFAULT_SPEED_TOLERANCE",
    "LM_HEAD",
    "MATMUL_EFFICIENCY",
    "OPTIMIZERS",
    "Linear",
    "ModelShape",
    "Plan",
    "Workload",
    "device_rates",
    "fmt_bytes",
    "load_model_config",
    "plan",
    "recommend",
    "targets_for_model_type",
    "require_fit",
]

# ------------------------------------------------------------------------------------------
# constants (each measured or assumed once; none is fitted to the benchmark grid)

#: RSS of a Python process after ``import torch, transformers, peft, bitsandbytes`` (torch 2.13
#: CPU, transformers 5.23, peft 0.21, bitsandbytes 0.50, Python 3.11, x86-64 Linux), measured
#: by bench/planner.py as its post-import baseline: 459-462 MiB over several runs with a warm
#: page cache, ~400 MiB right after the page cache was dropped (fewer code pages mapped).
#: Used as the runtime term on CPU and, as an assumption for aarch64, the host part on Jetson.
CPU_IMPORT_RSS_BYTES = 460 * MIB
#: Extra resident memory of a CPU training step beyond the tensors the model accounts for:
#: library code paged in by the first forward/backward (~11 MiB of file-backed RSS), MKL's
#: per-thread GEMM buffers, thread pools, the model's Python objects and the batch. Measured
#: once with ``bench/planner.py --calibrate`` on a held-out model (llama-style, vocab 6144,
#: hidden 160, 3 layers, MHA, batch 2 x 96; not part of the evaluated grids): 26.1 MiB in
#: total (two runs: 26.5, 25.7) of which the MKL pool below accounts for 3.75 MiB. A tiny
#: model (hidden 64) gives 16.2 MiB: MKL skips its packing buffers for very small GEMMs.
CPU_WORKSPACE_BYTES = int(22.4 * MIB)
#: Additional CPU workspace when the compute dtype is bf16/fp16: those GEMMs run through
#: oneDNN, whose JIT kernels and primitive cache add code and scratch (same calibration, bf16
#: load of the same model: 32.0 and 32.5 MiB in total, no MKL pool).
CPU_WORKSPACE_REDUCED_PRECISION_EXTRA = int(9.9 * MIB)
#: x86 CPUs: MKL's memory manager keeps the buffer it packs a GEMM's weight operand into, so
#: after the first fp32 matmul with the LM head about one copy of the largest fp32 weight
#: matrix stays resident (measured: retained RSS = weight size + ~3 MiB, gone with
#: MKL_DISABLE_FAST_MM=1; bf16 GEMMs run through oneDNN and keep ~2 MiB). Modelled as
#: ``CPU_BLAS_POOL_FACTOR`` x that matrix when the compute dtype is fp32.
CPU_BLAS_POOL_FACTOR = 1.0
#: CUDA caching allocator overhead as a fraction of the transient (activation/logit) bytes:
#: block rounding and fragmentation; a typical figure, assumed (no GPU was available to measure).
CUDA_FRAGMENTATION = 0.10
#: Default memory kept back for the rest of the application (transport, data, other threads).
DEFAULT_APP_RESERVE_BYTES = 256 * MIB
#: recommend(): a configuration counts as fitting when its planned peak is at most
#: ``(1 - margin)`` of the available memory (room for the planner's own error).
DEFAULT_MARGIN = 0.10
#: recommend(): configurations within this fraction of the best estimated tokens/s count as
#: equally fast (the time model is an estimate) and are ordered by the tie-break.
DEFAULT_SPEED_TOLERANCE = 0.05
#: The time model (:func:`_estimate_speed`): the share of the peak matmul rate and of the
#: memory bandwidth a training step reaches. Assumptions, not measured: they set the printed
#: tokens/s; the ranking of configurations depends only on their ratio.
MATMUL_EFFICIENCY = 0.5
BANDWIDTH_EFFICIENCY = 0.7
#: Rates for profiles that give no figure (generic CUDA GPUs: an RTX 30-class card; the CPU
#: profile: a few cores with AVX2/AVX-512). Assumptions.
ASSUMED_GPU_HALF_FLOPS = 60e12
ASSUMED_GPU_BANDWIDTH = 500e9
ASSUMED_CPU_FLOPS = 0.5e12
ASSUMED_CPU_BANDWIDTH = 20e9

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "sgd_momentum")
ATTENTION = ("auto", "sdpa", "eager")
#: The default LoRA targets per architecture, from the one family table
#: (:mod:`firmware_profiles.families`) that the loader reads too.
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    mt: fam.default_targets for mt, fam in FAMILIES.items()
}


def targets_for_model_type(target_modules: Any, model_type: str | None) -> Any:
    """A LoRA ``target_modules`` setting as it applies to one architecture: a mapping (a mixed
    fleet's one config: ``model_type`` -> names, or None for that architecture's defaults)
    gives this type's entry, and a type it does not name is refused (never a silent default);
    anything else is returned as it is."""
    if not isinstance(target_modules, Mapping):
        return target_modules
    if model_type not in target_modules:
        raise WorkloadError(
            f"target_modules names the model types {sorted(target_modules)}, not "
            f"{model_type!r}: add an entry for it (null: its defaults)"
        )
    return target_modules[model_type]

# precision ranking used by recommend(): higher is better
_PRECISION = {"fp32": 4, "bf16": 3, "fp16": 3, "int8": 2, "nf4": 1}
_NF4_BLOCK = 64
_NF4_NESTED_BLOCK = 256
_ADAM8_BLOCK = 256
_ADAM8_MIN_SIZE = 4096


def fmt_bytes(n: float) -> str:
    """``1.23 GiB`` / ``456.7 MiB`` / ``12.0 KiB`` / ``5 B``."""
    a = abs(n)
    if a >= GIB:
        return f"{n / GIB:.2f} GiB"
    if a >= MIB:
        return f"{n / MIB:.1f} MiB"
    if a >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} B"


# ------------------------------------------------------------------------------------------
# model shape


def _get(cfg: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    return default


def _int(cfg: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    v = _get(cfg, *keys, default=default)
    if v is None:
        raise ModelConfigError(f"model config lacks {' / '.join(keys)}")
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ModelConfigError(
            f"model config field {keys[0]} must be a positive integer, got {v!r}"
        )
    return v


def _partial_rotary(cfg: Mapping[str, Any]) -> float:
    """The fraction of each head that gets rotary positions (GPT-NeoX: 0.25 by default)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    for v in (
        cfg.get("partial_rotary_factor"),
        cfg.get("rotary_pct"),
        rope.get("partial_rotary_factor") if isinstance(rope, Mapping) else None,
    ):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1:
            return float(v)
    return 0.25 if cfg.get("model_type") == "gpt_neox" else 1.0


def _softcaps(cfg: Mapping[str, Any], fam: Family) -> dict[str, float | None]:
    """Attention and final-logit soft-caps: the config's fields, else the config class's
    defaults (a config that omits Gemma-2's fields still gets 50 and 30; null switches off)."""
    out: dict[str, float | None] = {}
    for name, key, default in zip(
        ("attn_softcap", "final_softcap"),
        (fam.attn_softcap_key, fam.final_softcap_key),
        fam.softcap_defaults,
        strict=True,
    ):
        v = cfg.get(key, default) if key else None
        out[name] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return out


def _window(cfg: Mapping[str, Any], fam: Family, layers: int) -> dict[str, Any]:
    """``sliding_window`` (the width, None for plain causal attention) and ``sliding_layers``
    (how many layers attend through it: all, or those ``layer_types`` names sliding; all when
    a per-layer family's config omits ``layer_types``, which over- rather than under-states)."""
    none = {"sliding_window": None, "sliding_layers": 0}
    if not fam.window_key or cfg.get("use_sliding_window") is False:
        return none
    v = cfg.get(fam.window_key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        return none
    n = layers
    types = cfg.get("layer_types")
    if fam.window_layers == "layer_types" and isinstance(types, list):
        n = sum(1 for t in types[:layers] if t == "sliding_attention")
    return {"sliding_window": v, "sliding_layers": n} if n else none


def load_model_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A model config as a dict: a mapping, a ``config.json`` path, a model directory, or a
    JSON string."""
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, str) and source.lstrip().startswith("{"):
        try:
            cfg = json.loads(source)
        except ValueError as exc:
            raise ModelConfigError(f"model config is not valid JSON: {exc}") from exc
    else:
        p = Path(source)
        if p.is_dir():
            p = p / "config.json"
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelConfigError(f"cannot read model config {str(p)!r}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ModelConfigError("model config must be a JSON object")
    return cfg


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from a Hugging Face ``config.json``.

    ``family`` is the memory model's style: ``"llama"`` (Llama, Qwen2/3, Mistral, Gemma,
    Phi-3: RMSNorm, RoPE, gated MLP, grouped-query attention) or ``"gpt2"`` (GPT-2, GPT-NeoX,
    OPT, Falcon: LayerNorm, ungated MLP). The layer's linear layers (names, fused projections,
    default LoRA targets) and how transformers runs it (attention implementation, norms,
    parallel blocks) come from :attr:`description`, the family table's entry; the config's
    own switches (soft-caps, parallel residual, partial rotary, sliding window) are read here.
    """

    family: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    max_positions: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    activation: str = "silu"
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    embd_dropout: float = 0.0
    lm_head_in: int | None = None  # the LM head's input width when it is not hidden_size
    post_norms: bool = False  # a norm on each sublayer's output too (4 per layer)
    parallel_norms: int = 0  # attention and MLP read one input: through 1 shared norm or 2 norms
    rotary_dim: int = 0  # rotary width per head (0: learned / no rotary positions)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    sliding_layers: int = 0  # layers attending through the window
    name: str = ""
    notes: tuple[str, ...] = ()

    @property
    def description(self) -> Family:
        """This model type's entry in the family table (a llama-style guess when unknown)."""
        return FAMILIES.get(self.model_type) or fallback_family(self.model_type)

    @classmethod
    def from_config(cls, source: str | Path | Mapping[str, Any]) -> ModelShape:
        cfg = load_model_config(source)
        check_supported(cfg)  # mixture-of-experts and the like: refused by name, not mis-planned
        mt = str(cfg.get("model_type", "") or "")
        # some configs nest the text model (e.g. multimodal wrappers)
        if "text_config" in cfg and "hidden_size" not in cfg and "n_embd" not in cfg:
            cfg = dict(cfg["text_config"])
            mt = str(cfg.get("model_type", mt) or mt)
        name = str(cfg.get("_name_or_path") or (cfg.get("architectures") or [mt])[0] or mt)
        notes: list[str] = []
        if mt == "gpt2" or ("n_embd" in cfg and "n_layer" in cfg):
            h = _int(cfg, "n_embd", "hidden_size")
            heads = _int(cfg, "n_head", "num_attention_heads")
            if h % heads:
                raise ModelConfigError(f"n_embd {h} is not divisible by n_head {heads}")
            return cls(
                family="gpt2",
                model_type=mt or "gpt2",
                vocab_size=_int(cfg, "vocab_size"),
                hidden_size=h,
                intermediate_size=_int(cfg, "n_inner", default=4 * h),
                num_layers=_int(cfg, "n_layer", "num_hidden_layers"),
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=h // heads,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                max_positions=_int(cfg, "n_positions", "max_position_embeddings", default=1024),
                qkv_bias=True,
                o_bias=True,
                mlp_bias=True,
                activation=str(cfg.get("activation_function", "gelu_new")),
                attn_dropout=float(cfg.get("attn_pdrop", 0.1)),
                resid_dropout=float(cfg.get("resid_pdrop", 0.1)),
                embd_dropout=float(cfg.get("embd_pdrop", 0.1)),
                name=name,
            )
        if mt in FAMILIES and FAMILIES[mt].style == "gpt2":
            return cls._gpt_style(cfg, FAMILIES[mt], name)
        if "hidden_size" not in cfg or "num_hidden_layers" not in cfg:
            raise ModelConfigError(
                f"unsupported model config (model_type {mt!r}): the planner understands "
                "llama/qwen2/mistral-style configs (hidden_size, intermediate_size, "
                "num_hidden_layers, num_attention_heads) and gpt2-style ones (n_embd, n_layer)"
            )
        if mt not in FAMILIES:
            notes.append(
                f"model_type {mt!r} treated as a llama-style decoder (the loader has no default "
                "LoRA targets for it: pass target_modules)"
            )
        h = _int(cfg, "hidden_size")
        heads = _int(cfg, "num_attention_heads")
        kv = _int(cfg, "num_key_value_heads", default=heads)
        if heads % kv:
            raise ModelConfigError(f"num_attention_heads {heads} not divisible by kv heads {kv}")
        head_dim = _get(cfg, "head_dim")
        if head_dim is None:
            if h % heads:
                raise ModelConfigError(f"hidden_size {h} not divisible by {heads} heads")
            head_dim = h // heads
        attention_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = True if mt == "qwen2" else attention_bias
        fam = FAMILIES.get(mt) or fallback_family(mt or "llama")
        return cls(
            family="llama",
            model_type=mt or "llama",
            vocab_size=_int(cfg, "vocab_size"),
            hidden_size=h,
            intermediate_size=_int(cfg, "intermediate_size"),
            num_layers=_int(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=int(head_dim),
            tie_word_embeddings=bool(
                cfg.get("tie_word_embeddings", mt in FAMILIES and FAMILIES[mt].tied_by_default)
            ),
            max_positions=_get(cfg, "max_position_embeddings"),
            qkv_bias=qkv_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=fam.qk_norm,
            activation=str(cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))),
            attn_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
            resid_dropout=float(cfg.get("resid_pdrop", 0.0) or 0.0),
            post_norms=fam.post_norms,
            rotary_dim=int(int(head_dim) * _partial_rotary(cfg)),
            **_softcaps(cfg, fam),
            **_window(cfg, fam, _int(cfg, "num_hidden_layers")),
            name=name,
            notes=tuple(notes),
        )

    @classmethod
    def _gpt_style(cls, cfg: Mapping[str, Any], fam: Family, name: str) -> ModelShape:
        """GPT-NeoX, OPT and Falcon: LayerNorm decoders with an ungated MLP whose config
        fields differ from Llama's (``ffn_dim`` / ``ffn_hidden_size``, Falcon's multi-query
        and new-architecture kv heads, OPT's word-embedding projection)."""
        mt = fam.model_type
        h = _int(cfg, "hidden_size", "n_embed")
        heads = _int(cfg, "num_attention_heads", "n_head")
        if h % heads:
            raise ModelConfigError(f"hidden_size {h} is not divisible by {heads} heads")
        kv = heads
        if mt == "falcon":
            if cfg.get("new_decoder_architecture"):
                kv = _int(cfg, "num_kv_heads", default=heads)
            elif cfg.get("multi_query", True):
                kv = 1
        inter = fam.intermediate_size(dict(cfg), h)
        if inter is None:
            raise ModelConfigError(f"model config lacks {' / '.join(fam.intermediate_keys)}")
        parallel = 0
        if fam.parallel_key and cfg.get(fam.parallel_key, True):
            # GPT-NeoX: two norms read the layer input; Falcon: one (two in the new architecture)
            parallel = 2
            if mt == "falcon":
                parallel = int(
                    cfg.get("num_ln_in_parallel_attn")
                    or (2 if cfg.get("new_decoder_architecture") else 1)
                )
        rotary = 0
        if mt == "gpt_neox" or (mt == "falcon" and not cfg.get("alibi")):
            rotary = int((h // heads) * _partial_rotary(cfg))
        if mt == "opt":
            bias = bool(cfg.get("enable_bias", True))
            qkv_bias = o_bias = mlp_bias = bias
            resid, attn, act = cfg.get("dropout", 0.1), cfg.get("attention_dropout", 0.0), "relu"
            proj = _get(cfg, "word_embed_proj_dim")
            lm_in = int(proj) if proj and proj != h else None
        elif mt == "falcon":
            qkv_bias = o_bias = mlp_bias = bool(cfg.get("bias", False))
            resid, attn = cfg.get("hidden_dropout", 0.0), cfg.get("attention_dropout", 0.0)
            act = "gelu"
            lm_in = None
        else:  # gpt_neox
            qkv_bias = o_bias = bool(cfg.get("attention_bias", True))
            mlp_bias = True
            resid, attn = cfg.get("hidden_dropout", 0.0), cfg.get("attention_dropout", 0.0)
            act = str(cfg.get("hidden_act", "gelu"))
            lm_in = None
        return cls(
            family=fam.style,
            model_type=mt,
            vocab_size=_int(cfg, "vocab_size"),
            hidden_size=h,
            intermediate_size=_int({"i": inter}, "i"),
            num_layers=_int(cfg, "num_hidden_layers", "n_layer"),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=h // heads,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", fam.tied_by_default)),
            max_positions=_get(cfg, "max_position_embeddings"),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            activation=str(cfg.get("activation_function", act)),
            attn_dropout=float(attn or 0.0),
            resid_dropout=float(resid or 0.0),
            lm_head_in=lm_in,
            parallel_norms=parallel,
            rotary_dim=rotary,
            name=name,
        )

    # -- parameters ------------------------------------------------------------------------
    def linears(self) -> list[Linear]:
        """The linear layers of ONE decoder layer (names are LoRA target names), from the
        family table."""
        return layer_linears(
            self.description,
            hidden=self.hidden_size,
            intermediate=self.intermediate_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            qkv_bias=self.qkv_bias,
            o_bias=self.o_bias,
            mlp_bias=self.mlp_bias,
        )

    @property
    def default_targets(self) -> tuple[str, ...]:
        """The family's default LoRA targets (the loader's, from the same table)."""
        return self.description.default_targets

    def target_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(lin.name for lin in self.linears()))

    @property
    def embedding_params(self) -> int:
        n = self.vocab_size * self.lm_head_width
        if self.description.learned_positions:
            rows = (self.max_positions or 1024) + self.description.position_offset
            n += rows * self.hidden_size
        if self.lm_head_in:  # OPT's project_in / project_out
            n += 2 * self.lm_head_in * self.hidden_size
        return n

    @property
    def lm_head_width(self) -> int:
        """The LM head's input width (= the token embedding width)."""
        return self.lm_head_in or self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.lm_head_width

    @property
    def norms_per_layer(self) -> int:
        """Decoder-layer norms: 2, 4 with post-norms (Gemma-2/3), 1 or 2 in a parallel block."""
        if self.post_norms:
            return 4
        return self.parallel_norms or 2

    @property
    def norm_params(self) -> int:
        per = self.hidden_size * (2 if self.family == "gpt2" else 1)  # LayerNorm has a bias
        extra = 2 * self.head_dim * self.num_layers if self.qk_norm else 0
        return per * (self.norms_per_layer * self.num_layers + 1) + extra

    @property
    def linear_params(self) -> int:
        return self.num_layers * sum(lin.numel for lin in self.linears())

    @property
    def bias_params(self) -> int:
        return self.num_layers * sum(lin.out_features for lin in self.linears() if lin.bias)

    @property
    def num_params(self) -> int:
        return (
            self.embedding_params
            + self.lm_head_params
            + self.norm_params
            + self.linear_params
            + self.bias_params
        )

    def summary(self) -> str:
        return (
            f"{self.name or self.model_type} ({self.model_type}, {self.num_params / 1e6:.1f}M "
            f"params: vocab {self.vocab_size}, hidden {self.hidden_size}, intermediate "
            f"{self.intermediate_size}, {self.num_layers} layers, {self.num_heads} heads / "
            f"{self.num_kv_heads} kv, {'tied' if self.tie_word_embeddings else 'untied'} "
            "embeddings)"
        )


# ------------------------------------------------------------------------------------------
# workload


@dataclass(frozen=True)
class Workload:
    """What to run. ``lora_rank=None`` means full fine-tuning (plain dtypes only).

    ``mode``: ``"train"`` or ``"infer"`` (then ``seq_len`` is the whole context, prompt plus
    generated tokens, kept in the KV cache). ``compute_dtype`` defaults to what
    ``load_causal_lm`` picks on the device. ``attention``: ``auto`` (what transformers picks for
    the family: fused SDPA, except the math fallback on CPU when the model has attention
    dropout; eager for Gemma-2), ``sdpa`` (a family without SDPA still runs eager) or ``eager``.
    """

    quant: str = "nf4"
    lora_rank: int | None = 8
    batch_size: int = 1
    seq_len: int = 256
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    lora_targets: tuple[str, ...] | None = None
    lora_dropout: float = 0.0
    double_quant: bool = True
    attention: str = "auto"
    compute_dtype: str | None = None
    mode: str = "train"

    def __post_init__(self) -> None:
        errs = []
        if self.quant not in QUANT_MODES:
            errs.append(f"quant must be one of {list(QUANT_MODES)}, got {self.quant!r}")
        if self.lora_rank is not None and (
            isinstance(self.lora_rank, bool)
            or not isinstance(self.lora_rank, int)
            or self.lora_rank < 1
        ):
            errs.append(f"lora_rank must be a positive integer or None, got {self.lora_rank!r}")
        if self.lora_rank is None and self.quant in ("nf4", "int8") and self.mode == "train":
            errs.append("full fine-tuning (lora_rank=None) needs bf16/fp16/fp32 weights")
        for name in ("batch_size", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                errs.append(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.seq_len, int) and self.seq_len < 2 and self.mode == "train":
            errs.append("seq_len must be >= 2 for training")
        if self.optimizer not in OPTIMIZERS:
            errs.append(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.attention not in ATTENTION:
            errs.append(f"attention must be one of {list(ATTENTION)}, got {self.attention!r}")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPE_BYTES:
            errs.append(f"compute_dtype must be one of {list(DTYPE_BYTES)} or None")
        if self.mode not in ("train", "infer"):
            errs.append(f"mode must be 'train' or 'infer', got {self.mode!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            errs.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.lora_targets is not None:
            if isinstance(self.lora_targets, str) or not all(
                isinstance(t, str) and t for t in self.lora_targets
            ):
                errs.append(
                    f"lora_targets must be a list of module names, got {self.lora_targets!r}"
                )
            elif not self.lora_targets:
                errs.append("lora_targets is empty; pass None for the architecture's defaults")
            else:
                object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if errs:
            raise WorkloadError("invalid workload: " + "; ".join(errs))

    def describe(self) -> str:
        if self.mode == "infer":
            return f"inference {self.quant}, batch {self.batch_size}, context {self.seq_len}"
        lora = f"LoRA r={self.lora_rank}" if self.lora_rank else "full fine-tuning"
        ck = ", checkpointing" if self.gradient_checkpointing else ""
        return (
            f"{self.quant} {lora}, batch {self.batch_size} x seq {self.seq_len}{ck}, "
            f"{self.optimizer}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Workload:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise WorkloadError(f"unknown workload fields {sorted(unknown)}")
        d = dict(d)
        if d.get("lora_targets") is not None:
            d["lora_targets"] = tuple(d["lora_targets"])
        return cls(**d)


# ------------------------------------------------------------------------------------------
# plan


@dataclass
class Plan:
    """A memory prediction. ``breakdown`` lists the terms present at the peak phase (they sum
    to ``total_bytes``); ``phases`` the total of every phase considered; ``details`` the
    intermediate numbers (parameter counts, per-token bytes, terms that are not at the peak).
    """

    device: str
    model: str
    workload: Workload
    breakdown: dict[str, int]
    total_bytes: int
    available_bytes: int
    peak_phase: str
    phases: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.available_bytes

    @property
    def tokens_per_s(self) -> float | None:
        """The time model's estimate of training tokens per second (None for inference)."""
        speed = self.details.get("speed")
        return speed["tokens_per_s"] if speed else None

    @property
    def headroom_bytes(self) -> int:
        """``available - total`` (negative when it does not fit)."""
        return self.available_bytes - self.total_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "model": self.model,
            "workload": self.workload.to_dict(),
            "breakdown": dict(self.breakdown),
            "total_bytes": self.total_bytes,
            "available_bytes": self.available_bytes,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "peak_phase": self.peak_phase,
            "phases": dict(self.phases),
            "details": self.details,
            "notes": list(self.notes),
        }

    def explain(self) -> str:
        """A few lines: the job, each term with its bytes and share, the verdict."""
        w = self.workload
        lines = [f"{self.model}", f"on {self.device}: {w.describe()}"]
        lines.append(f"peak phase: {_PHASE_TEXT.get(self.peak_phase, self.peak_phase)}")
        width = max(len(k) for k in self.breakdown) if self.breakdown else 10
        for k, v in self.breakdown.items():
            if not v:
                continue
            share = v / self.total_bytes if self.total_bytes else 0.0
            why = self.details.get("why", {}).get(k, "")
            lines.append(f"  {k:<{width}} {fmt_bytes(v):>11} {share:6.1%}  {why}")
        lines.append(f"  {'total':<{width}} {fmt_bytes(self.total_bytes):>11}")
        for k, v in self.details.get("off_peak", {}).items():
            lines.append(f"  (not at the peak: {k} {fmt_bytes(v)})")
        if len(self.phases) > 1:
            lines.append(
                "  phases: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.phases.items())
            )
        verdict = (
            f"FITS: {fmt_bytes(self.total_bytes)} of {fmt_bytes(self.available_bytes)} "
            f"available, headroom {fmt_bytes(self.headroom_bytes)}"
            if self.fits
            else f"DOES NOT FIT: needs {fmt_bytes(self.total_bytes)}, "
            f"{fmt_bytes(self.available_bytes)} available, short by "
            f"{fmt_bytes(-self.headroom_bytes)}"
        )
        lines.append(verdict)
        speed = self.details.get("speed")
        if speed:
            lines.append(
                f"estimated speed: {speed['tokens_per_s']:,.0f} tokens/s ({speed['bound']}-bound "
                f"step of {speed['step_seconds'] * 1e3:,.1f} ms; {speed['rates']}; a rough "
                "estimate for comparing configurations)"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


_PHASE_TEXT = {
    "loss_backward": "start of backward (all saved activations + logits/loss gradients)",
    "layer_backward": "backward through the last layer (activations + logits + one layer's "
    "gradient temporaries)",
    "recompute_backward": "backward through a recomputed layer (checkpoints + logits + one "
    "layer's activations and gradients)",
    "optimizer_step": "optimizer step (gradients + optimizer temporaries)",
    "inference": "prefill of the prompt (weights + KV cache + one layer's activations)",
}


# ------------------------------------------------------------------------------------------
# the model of memory


@dataclass(frozen=True)
class _Ctx:
    shape: ModelShape
    w: Workload
    c: int  # compute dtype bytes
    compute: str
    lora_b: int  # adapter dtype bytes (peft keeps fp32)
    targets: frozenset[str]
    full_ft: bool
    int8: bool
    # "fused" (SDPA's flash / memory-efficient kernels), "eager" (the model's own code) or
    # "math" (SDPA's math fallback: computes in fp32 even for bf16/fp16 inputs)
    attention: str
    mask_b: int  # bytes per element of a saved dropout mask/noise
    on_cuda: bool


def _input_saves(ctx: _Ctx, names: Iterable[str], width: int) -> tuple[int, int]:
    """``(shared, copies)`` bytes per token saved for the input (``width`` wide) of the
    linear layers ``names`` that read the same tensor."""
    shared = False
    copies = 0
    for name in names:
        if ctx.full_ft or ctx.int8:
            shared = True  # weight grad (full FT) / bitsandbytes int8 ctx keep the input
        if name in ctx.targets:
            if ctx.w.lora_dropout > 0:
                # peft: cast to the adapter dtype, then dropout -> output + noise/mask saved
                copies += width * ctx.lora_b + width * (ctx.lora_b if not ctx.on_cuda else 1)
            elif ctx.lora_b != ctx.c:
                copies += width * ctx.lora_b  # a separate cast copy per adapter
            else:
                shared = True
    return (width * ctx.c if shared else 0), copies


def _lora_intermediate(ctx: _Ctx, names: Iterable[str]) -> int:
    r = ctx.w.lora_rank or 0
    return sum(r * ctx.lora_b for n in names if n in ctx.targets)


def _norm_bytes(ctx: _Ctx) -> tuple[int, int]:
    """``(input, statistics)`` bytes per token one norm saves: RMSNorm (written in Python) an
    fp32 copy of its input and the fp32 rsqrt; LayerNorm its input and mean/rstd (fp32 on CUDA,
    the compute dtype on CPU)."""
    s, c = ctx.shape, ctx.c
    if s.family == "llama":
        return s.hidden_size * 4, 4
    return s.hidden_size * c, 2 * (4 if ctx.on_cuda else c)


def _attention_saved(ctx: _Ctx, T: int, windowed: bool) -> dict[str, int]:
    """Bytes per token one layer's attention (between the q/k/v projections and the output
    projection's input) saves for backward. ``windowed``: the layer attends through a sliding
    window narrower than ``T`` (so transformers materializes its mask)."""
    s, c = ctx.shape, ctx.c
    fam = s.description
    nh, kvh = s.num_heads, s.num_kv_heads
    q_w, kv_w = nh * s.head_dim, kvh * s.head_dim
    out: dict[str, int] = {}
    if s.qk_norm:  # RMSNorm per head on q and k: fp32 inputs + rsqrt
        out["qk_norm"] = (q_w + kv_w) * 4 + (nh + kvh) * 4
    o_sh, o_cp = _input_saves(ctx, (fam.attn_out,), q_w)
    if ctx.attention == "fused":
        # SDPA saves q, k, v, its output and a fp32 logsumexp. transformers repeats grouped k/v
        # (a copy; a view for one kv head) when it hands SDPA a mask or head_dim > 256.
        mask = fam.sdpa_mask or windowed
        copy_kv = (mask or s.head_dim > 256) and kvh not in (1, nh)
        k_b = q_w if copy_kv else kv_w
        if len(fam.attn_in) == 1 and not copy_kv:
            # q/k/v are views of one fused projection output: v (and q, k without rotary
            # positions) keep the whole output alive
            fused = q_w + 2 * kv_w
            qkv = fused if not s.rotary_dim else q_w + k_b + fused
        else:
            qkv = q_w + k_b + (q_w if copy_kv else kv_w)
        out["attention"] = (qkv + q_w) * c + nh * 4
        if mask:  # the mask converted to the compute dtype, per layer
            out["attention_mask"] = T * c
        # the output projection reads SDPA's output in place, or a contiguous copy of it
        out["o_input"] = o_cp + (o_sh if fam.attn_out_copy else 0)
        return out
    if ctx.attention == "math":  # SDPA's math fallback: everything in fp32
        out["attention_scores"] = nh * T * 4 + (nh * T * 8 if s.attn_dropout > 0 else 0)
        out["attention"] = 3 * q_w * 4
        out["o_input"] = o_sh + o_cp
        return out
    # eager: the scores' softmax (fp32 + a cast copy, or GPT-2's in the compute dtype), a
    # soft-cap's tanh output, dropout; contiguous copies of q and the repeated k and v
    t2 = nh * T * 4 + (nh * T * c if c != 4 else 0) if fam.eager_softmax_fp32 else nh * T * c
    if s.attn_softcap is not None:
        t2 += nh * T * c
    if s.attn_dropout > 0:
        t2 += nh * T * (ctx.mask_b + c)
    out["attention_scores"] = t2
    out["attention"] = 3 * q_w * c
    out["o_input"] = o_sh + o_cp
    return out


def _layer_saved(ctx: _Ctx, T: int, windowed: bool = False) -> dict[str, int]:
    """Bytes per token that one decoder layer (whose input requires grad) saves for backward;
    ``windowed``: see :func:`_attention_saved`."""
    s, c = ctx.shape, ctx.c
    fam = s.description
    h, i = s.hidden_size, s.intermediate_size
    out: dict[str, int] = {}
    names = [lin.name for lin in s.linears()]
    out["lora_rank_r"] = _lora_intermediate(ctx, names)
    norm_in, norm_stats = _norm_bytes(ctx)
    norm = norm_in + norm_stats
    if ctx.full_ft and s.family == "llama":
        norm += h * c  # normalized tensor for the norm weight's grad
    if s.parallel_norms and s.family != "llama":
        # attention and MLP read the same layer input: LayerNorms share their saved input
        out["norms"] = norm + (s.parallel_norms - 1) * norm_stats
    else:
        out["norms"] = s.norms_per_layer * norm
    sh, cp = _input_saves(ctx, fam.attn_in, h)
    out["qkv_input"] = sh + cp
    out.update(_attention_saved(ctx, T, windowed))
    sh, cp = _input_saves(ctx, fam.mlp_in, h)
    # one norm feeding both attention and MLP: the MLP input is the q/k/v input
    out["mlp_input"] = (0 if s.parallel_norms == 1 else sh) + cp
    sh, cp = _input_saves(ctx, (fam.mlp_out,), i)
    act = s.activation
    if fam.gated:  # activation input (+ internals), its output, up (the product is down's input)
        out["mlp"] = ((4 if act == "gelu_new" else 1) + 2) * i * c
        out["down_input"] = sh + cp
    elif act == "relu":  # saves its output, which is the down projection's input
        out["mlp"] = i * c
        out["down_input"] = cp
    else:  # GPT-2's tanh-GELU is written in Python and saves 4 tensors; fused ones the input
        out["mlp"] = (4 if act == "gelu_new" else 1) * i * c
        out["down_input"] = sh + cp
    if s.resid_dropout > 0:
        out["dropout"] = 2 * h * ctx.mask_b
    return out


def _layer_backward_transient(ctx: _Ctx, T: int) -> int:
    """Bytes per token of gradient temporaries alive inside one layer's backward (estimate:
    the MLP's three intermediate-size gradients, or attention's score gradients)."""
    s, c = ctx.shape, ctx.c
    i, nh = s.intermediate_size, s.num_heads
    mlp = 3 * i * c + (i * 4 if ctx.lora_b != c else 0)
    if ctx.attention == "fused":
        attn = (2 * s.num_heads * s.head_dim + 2 * s.num_kv_heads * s.head_dim) * max(c, 4)
    else:
        attn = 2 * nh * T * 4
    return max(mlp, attn)


def _quantized_linear_bytes(lin: Linear, quant: str, double_quant: bool) -> int:
    n = lin.numel
    if quant == "nf4":
        blocks = -(-n // _NF4_BLOCK)
        b = -(-n // 2) + 16 * 4  # packed nibbles + the 16-value nf4 code
        if double_quant:
            b += blocks + (-(-blocks // _NF4_NESTED_BLOCK)) * 4 + 256 * 4 + 4
        else:
            b += blocks * 4
        return b
    if quant == "int8":
        return n + lin.out_features * 4
    raise AssertionError(quant)


def _optimizer_bytes(optimizer: str, tensors: list[tuple[int, int]]) -> int:
    """Optimizer state bytes for trainable tensors given as ``(numel, dtype_bytes)``."""
    total = 0
    for n, b in tensors:
        if optimizer == "adamw":
            total += 2 * n * b
        elif optimizer == "adamw8bit":
            if n >= _ADAM8_MIN_SIZE:
                total += 2 * n + 2 * (-(-n // _ADAM8_BLOCK)) * 4 + 2 * 256 * 4
            else:
                total += 2 * n * 4
        elif optimizer == "sgd_momentum":
            total += n * b
    return total


def _resolve_attention(w: Workload, shape: ModelShape, profile: DeviceProfile) -> str:
    """``fused`` (flash / memory-efficient SDPA: no T x T scores saved), ``eager`` (the
    model's own attention code) or ``math`` (SDPA's math fallback, which PyTorch uses on CPU
    when attention dropout is on; it computes in fp32 whatever the input dtype). ``auto`` is
    what transformers picks for the family (:attr:`Family.attn_implementation`: eager for
    Gemma-2, SDPA otherwise); a family without SDPA runs eager whatever is asked."""
    if w.attention == "eager" or shape.description.attn_implementation == "eager":
        return "eager"
    if profile.accelerator != "cuda" and shape.attn_dropout > 0:
        return "math"
    return "fused"


# ------------------------------------------------------------------------------------------
# the model of time (what recommend() ranks by)


def device_rates(profile: DeviceProfile, compute: str) -> tuple[float, float, str]:
    """``(matmul FLOP/s, memory bytes/s, where they come from)`` of ``profile`` for GEMMs in
    the ``compute`` dtype, before the efficiency factors. Jetsons: NVIDIA's TOPS figure is
    sparse INT8 on parts with tensor cores, so dense fp16/bf16 is a quarter of it (Orin Nano
    8GB: 40 TOPS -> 10 TFLOPS, what 8 SMs x 1024 FMA x 625 MHz give); on the Nano and TX2 the
    profile's figure is already fp16 TFLOPS. fp32 GEMMs run on the CUDA cores: 1/8 of the
    tensor-core rate (1/2 without tensor cores, where fp16 runs at twice fp32). Bandwidth is
    the profile's. Profiles without figures (generic CUDA, CPU) use the ``ASSUMED_*`` rates."""
    if profile.accelerator == "cuda":
        tensor_cores = (
            bool(profile.gpu_tensor_cores)
            if profile.gpu_tensor_cores is not None
            else (profile.cc or (0, 0)) >= (7, 0)
        )
        if profile.tops:
            half = profile.tops * 1e12 / (4 if tensor_cores else 1)
            src = f"{profile.tops:g} TOPS"
        else:
            half, src = ASSUMED_GPU_HALF_FLOPS, "assumed GPU rate"
        flops = half if compute in ("bf16", "fp16") else half / (8 if tensor_cores else 2)
        if profile.memory_bandwidth_gbps:
            bw = profile.memory_bandwidth_gbps * 1e9
            src += f", {profile.memory_bandwidth_gbps:g} GB/s"
        else:
            bw = ASSUMED_GPU_BANDWIDTH
            src += ", assumed bandwidth"
        return flops, bw, src
    return ASSUMED_CPU_FLOPS, ASSUMED_CPU_BANDWIDTH, "assumed CPU rates"


def _estimate_speed(
    shape: ModelShape,
    w: Workload,
    profile: DeviceProfile,
    *,
    compute: str,
    targets: frozenset[str],
    full_ft: bool,
    attention: str,
    activations: int,
    logits: int,
    trainable_params: int,
) -> dict[str, Any]:
    """Estimated time of one training step: ``FLOPs / (rate x MATMUL_EFFICIENCY) + bytes /
    (bandwidth x BANDWIDTH_EFFICIENCY)``, a roofline sum (each kernel is compute- or
    memory-bound, and they do not overlap). FLOPs: every frozen linear layer and the LM head
    forward and input-gradient (``4 N numel``; full fine-tuning adds the weight gradient), the
    adapters ``6 N r (in + out)``, attention ``QK^T`` and ``PV`` (``4 N T q_width`` per layer,
    half of it for fused SDPA, which skips the causally masked blocks) forward + twice that
    backward, and with checkpointing one more forward of the layers. Bytes: the weights read
    once per pass (forward, backward, a recomputation); a quantized weight is read packed,
    then written and read back dequantized in the compute dtype each pass (nf4 ``0.5 +
    2c`` bytes per value, int8 ``1 + 2c``; int8 also quantizes each layer's input); the
    saved activations three times (written, read, their gradient) and the logits and loss
    tensors three times; the optimizer reads and writes parameters, gradients and states.
    Not modelled: kernel-launch and Python overhead per step (which favour more tokens per
    step: the tie-break of :func:`recommend`), and bitsandbytes' int8 outlier handling."""
    B, T = w.batch_size, w.seq_len
    N = B * T
    L = shape.num_layers
    c = DTYPE_BYTES[compute]
    lin = shape.linears()
    p_lin = L * sum(x.numel for x in lin)
    head = shape.vocab_size * shape.lm_head_width
    grad_passes = 3 if full_ft else 2  # forward, input gradient (+ weight gradient)
    r = w.lora_rank or 0
    lora_io = L * sum(x.in_features + x.out_features for x in lin if x.name in targets)
    if LM_HEAD in targets:
        lora_io += shape.lm_head_width + shape.vocab_size
    q_w = shape.num_heads * shape.head_dim
    attn_fwd = 4 * N * T * q_w * L * (0.5 if attention == "fused" else 1.0)
    flops = 2 * N * (p_lin + head) * grad_passes + 6 * N * r * lora_io + 3 * attn_fwd
    passes = 2
    if w.gradient_checkpointing:
        flops += 2 * N * p_lin + 2 * N * r * lora_io + attn_fwd
        passes = 3
    if w.quant in ("nf4", "int8"):
        packed = L * sum(_quantized_linear_bytes(x, w.quant, w.double_quant) for x in lin)
        weight_pass = packed + 2 * c * p_lin
        if w.quant == "int8":  # each layer's input quantized to int8 (read c, write 1)
            weight_pass += N * L * sum(x.in_features for x in lin) * (c + 1)
    else:
        weight_pass = p_lin * DTYPE_BYTES[w.quant]
    head_b = head * (c if w.quant in ("nf4", "int8") else DTYPE_BYTES[w.quant])
    traffic = (
        passes * (weight_pass + head_b)
        + 3 * activations
        + 3 * logits
        + 32 * trainable_params  # AdamW: read + write fp32 param, grad and two states
    )
    peak_flops, bandwidth, source = device_rates(profile, compute)
    t_compute = flops / (peak_flops * MATMUL_EFFICIENCY)
    t_memory = traffic / (bandwidth * BANDWIDTH_EFFICIENCY)
    step = t_compute + t_memory
    return {
        "tokens_per_s": N / step,
        "step_seconds": step,
        "flops_per_step": flops,
        "bytes_per_step": traffic,
        "compute_seconds": t_compute,
        "memory_seconds": t_memory,
        "bound": "compute" if t_compute >= t_memory else "memory",
        "rates": source,
    }


def _resolve(model_config: Any) -> ModelShape:
    if isinstance(model_config, ModelShape):
        return model_config
    return ModelShape.from_config(model_config)


def plan(
    model_config: str | Path | Mapping[str, Any] | ModelShape,
    device_profile: DeviceProfile | str,
    workload: Workload | None = None,
    *,
    app_reserve_bytes: int = DEFAULT_APP_RESERVE_BYTES,
) -> Plan:
    """Predict peak memory of ``workload`` (default: nf4 LoRA r=8, batch 1, seq 256) for the
    model of ``model_config`` (HF ``config.json`` dict, path, model directory or JSON string)
    on ``device_profile`` (a profile or its id). Never raises for a job that does not fit:
    check :attr:`Plan.fits` or call :func:`require_fit`."""
    shape = _resolve(model_config)
    profile = get_profile(device_profile) if isinstance(device_profile, str) else device_profile
    w = workload or Workload()
    notes = list(shape.notes)
    compute = w.compute_dtype or profile.compute_dtype(w.quant)
    c = DTYPE_BYTES[compute]
    on_cuda = profile.accelerator == "cuda"
    if w.quant == "bf16" and not profile.bf16:
        notes.append(f"{profile.id} has no bf16; this load would fail or be emulated")
    if w.quant in ("nf4", "int8") and not profile.bitsandbytes_usable:
        notes.append(
            f"bitsandbytes is not usable on {profile.id}; load_causal_lm would fall back to "
            f"{profile.default_quant()} weights"
        )
    if w.mode == "train" and not profile.training_supported:
        notes.append(f"training is not supported on {profile.id}: {profile.training_note}")
    if shape.max_positions and w.seq_len > shape.max_positions:
        msg = (
            f"seq_len {w.seq_len} exceeds the model's max_position_embeddings {shape.max_positions}"
        )
        if shape.description.learned_positions:
            raise WorkloadError(msg)
        notes.append(msg)

    # -- weights ---------------------------------------------------------------------------
    lin = shape.linears()
    L = shape.num_layers
    quantized = w.quant in ("nf4", "int8")
    weight_dtype_b = c if quantized else DTYPE_BYTES[w.quant]
    other_params = shape.embedding_params + shape.lm_head_params + shape.norm_params
    if quantized:
        linear_b = L * sum(_quantized_linear_bytes(x, w.quant, w.double_quant) for x in lin)
        bias_b = shape.bias_params * c
        dequant = max(x.numel for x in lin) * c + max(x.numel for x in lin) // _NF4_BLOCK * 4
    else:
        linear_b = shape.linear_params * weight_dtype_b
        bias_b = shape.bias_params * weight_dtype_b
        dequant = 0
    weights = linear_b + bias_b + other_params * weight_dtype_b

    # -- LoRA, gradients, optimizer -----------------------------------------------------------
    full_ft = w.lora_rank is None and w.mode == "train"
    valid = shape.target_names() + (LM_HEAD,)
    if w.lora_targets is not None:
        bad = [t for t in w.lora_targets if t not in valid]
        if bad:
            raise WorkloadError(
                f"LoRA target(s) {bad} are not linear layers of this {shape.model_type}; "
                f"it has {list(valid)}"
            )
        targets = frozenset(w.lora_targets)
    else:
        targets = frozenset(shape.default_targets)
    lora_b = 4
    trainable: list[tuple[int, int]] = []
    if not full_ft and w.lora_rank:  # the adapter (also held for inference)
        r = int(w.lora_rank)
        for x in lin:
            if x.name in targets:
                trainable += [(r * x.in_features, lora_b), (x.out_features * r, lora_b)] * L
        if LM_HEAD in targets:  # once, hidden -> vocab (tied or not: the adapter is its own)
            trainable += [(r * shape.lm_head_width, lora_b), (shape.vocab_size * r, lora_b)]
    elif full_ft:
        trainable = [(x.numel, weight_dtype_b) for x in lin] * L
        trainable += [(shape.vocab_size * shape.lm_head_width, weight_dtype_b)]
        if shape.lm_head_params:
            trainable += [(shape.lm_head_params, weight_dtype_b)]
        rest = (
            shape.norm_params
            + shape.bias_params
            + (shape.embedding_params - shape.vocab_size * shape.lm_head_width)
        )
        trainable += [(rest, weight_dtype_b)]
    trainable_b = sum(n * b for n, b in trainable)
    lora = trainable_b if not full_ft else 0
    grads = trainable_b if w.mode == "train" else 0
    optim = _optimizer_bytes(w.optimizer, trainable) if w.mode == "train" else 0
    largest_trainable = max((n * b for n, b in trainable), default=0)

    # -- runtime ----------------------------------------------------------------------------
    if on_cuda:
        runtime = profile.cuda_context_bytes + (
            CPU_IMPORT_RSS_BYTES if profile.unified_memory else 0
        )
    else:
        runtime = CPU_IMPORT_RSS_BYTES
    why = {
        "runtime": (
            "Python+torch imports + CUDA context"
            if on_cuda and profile.unified_memory
            else "CUDA context"
            if on_cuda
            else "Python + torch/transformers/peft imports (RSS)"
        ),
    }

    B, T = w.batch_size, w.seq_len
    N = B * T
    details: dict[str, Any] = {
        "params": shape.num_params,
        "quantized_linear_params": shape.linear_params if quantized else 0,
        "trainable_params": sum(n for n, _ in trainable),
        "compute_dtype": compute,
        "tokens_per_step": N,
        "lora_targets": sorted(targets) if not full_ft else "all (full fine-tuning)",
    }
    largest_matrix = max(shape.vocab_size * shape.hidden_size, max(x.numel for x in lin))
    blas_pool = int(CPU_BLAS_POOL_FACTOR * largest_matrix * 4) if not on_cuda and c == 4 else 0
    details["cpu_blas_pool_bytes"] = blas_pool
    cpu_workspace = CPU_WORKSPACE_BYTES + blas_pool
    if c != 4:
        cpu_workspace += CPU_WORKSPACE_REDUCED_PRECISION_EXTRA

    if w.mode == "infer":
        kv_w = (
            (2 * shape.hidden_size)
            if shape.family == "gpt2"
            else 2 * shape.num_kv_heads * shape.head_dim
        )
        kv_cache = L * kv_w * N * c
        fused = _resolve_attention(w, shape, profile) == "fused"
        per_tok = 2 * shape.hidden_size * c + 3 * shape.intermediate_size * c
        scores = 0 if fused else B * shape.num_heads * T * T * 4 * 2
        act = per_tok * N + scores + dequant
        logits = B * shape.vocab_size * 4 * 2  # last position only, fp32 + sampling copy
        workspace = int(CUDA_FRAGMENTATION * (act + kv_cache)) if on_cuda else cpu_workspace
        breakdown = {
            "runtime": runtime,
            "weights": weights,
            "lora": lora,
            "kv_cache": kv_cache,
            "activations": act,
            "logits": logits,
            "workspace": workspace,
        }
        why.update(
            weights=f"{w.quant} weights",
            lora="LoRA adapter (fp32)" if lora else "",
            kv_cache=f"{L} layers x {kv_w} values x {N} tokens x {c} B",
            activations="one layer's prefill temporaries",
            logits="last-position logits",
            workspace="allocator/library overhead",
        )
        details["why"] = why
        total = sum(breakdown.values())
        return Plan(
            device=profile.id,
            model=shape.summary(),
            workload=w,
            breakdown=breakdown,
            total_bytes=total,
            available_bytes=profile.available_bytes(app_reserve_bytes),
            peak_phase="inference",
            phases={"inference": total},
            details=details,
            notes=notes,
        )

    # -- activations --------------------------------------------------------------------------
    attn_kind = _resolve_attention(w, shape, profile)
    if w.attention == "sdpa" and attn_kind == "eager":
        notes.append(
            f"transformers runs {shape.model_type} with eager attention (no SDPA: it soft-caps "
            "the attention scores); planned as eager, with the seq x seq scores"
        )
    ctx = _Ctx(
        shape=shape,
        w=w,
        c=c,
        compute=compute,
        lora_b=lora_b,
        targets=targets if not full_ft else frozenset(),
        full_ft=full_ft,
        int8=w.quant == "int8",
        attention=attn_kind,
        mask_b=c if not on_cuda else 1,
        on_cuda=on_cuda,
    )
    per_layer = _layer_saved(ctx, T)
    layer_tok = sum(per_layer.values())
    # layers attending through a sliding window narrower than T get a materialized mask
    narrow = shape.sliding_window is not None and T > shape.sliding_window
    windowed_layers = shape.sliding_layers if narrow else 0
    windowed_extra = (
        sum(_layer_saved(ctx, T, windowed=True).values()) - layer_tok if windowed_layers else 0
    )
    norm_in, norm_stats = _norm_bytes(ctx)
    final_norm = norm_in + norm_stats
    # layer 0's first norm reads the (frozen) embeddings, which do not require grad: it saves
    # nothing, and neither does a second norm of a parallel block reading the same input
    first_in = per_layer["norms"] if shape.parallel_norms else norm_in + norm_stats
    rope = 2 * T * shape.rotary_dim * c  # cos/sin, shared by all layers
    if full_ft:
        final_norm += 2 * shape.hidden_size * c  # norm weight grad + lm_head input
    ckpt = w.gradient_checkpointing
    # what the layers save without checkpointing (with it they are recomputed): time model
    layers_saved = (L * layer_tok + windowed_layers * windowed_extra + final_norm) * N + rope
    if ckpt:
        ckpt_tok = L * shape.hidden_size * c + final_norm
        if ctx.int8:
            # bitsandbytes' int8 matmul keeps its input as ``ctx.A`` (an attribute, not a saved
            # tensor), which non-reentrant checkpointing cannot drop: the inputs of every
            # int8 layer stay alive (attention input, attention output, MLP input, MLP act)
            q_w = shape.num_heads * shape.head_dim
            ckpt_tok += L * (2 * shape.hidden_size + q_w + shape.intermediate_size) * c
        if shape.family == "gpt2" and shape.embd_dropout > 0:
            ckpt_tok += shape.hidden_size * ctx.mask_b
        saved = ckpt_tok * N + rope
    else:
        saved_tok = L * layer_tok - (0 if full_ft else first_in) + final_norm
        saved_tok += windowed_layers * windowed_extra
        saved = saved_tok * N + rope
    details["activation_bytes_per_token_per_layer"] = layer_tok
    details["activation_terms_per_token_per_layer"] = per_layer
    details["final_softcap"] = shape.final_softcap
    details["attention"] = {
        "fused": "fused SDPA (no T x T scores saved)",
        "eager": "eager (T x T scores saved)",
        "math": "SDPA math fallback (T x T scores saved, in fp32)",
    }[attn_kind] + (" + soft-cap" if attn_kind == "eager" and shape.attn_softcap else "")

    # -- logits and loss ----------------------------------------------------------------------
    V = shape.vocab_size
    logits_c = N * V * c
    if shape.final_softcap is not None:
        logits_c += N * V * c  # cap * tanh(logits / cap): the saved tanh output and the result
    loss_extra = 12 * B * (T - 1) * V  # fp32 log-softmax output + its incoming and outgoing grads

    # -- phases -------------------------------------------------------------------------------
    layer_bwd = _layer_backward_transient(ctx, T) * N + dequant
    lm_grad = (
        shape.vocab_size * shape.hidden_size * weight_dtype_b if full_ft else 0
    )  # LM-head weight grad, produced right after the loss
    dynamic_common = {"weights": weights, "lora": lora, "optimizer": optim}
    phases: dict[str, dict[str, int]] = {}
    phases["loss_backward"] = {
        **dynamic_common,
        "gradients": 0,
        "activations": saved,
        "logits": logits_c + loss_extra,
        "transient": 0,
    }
    if ckpt:
        phases["recompute_backward"] = {
            **dynamic_common,
            "gradients": grads if not full_ft else lm_grad,
            "activations": saved + layer_tok * N,
            "logits": logits_c,
            "transient": layer_bwd,
        }
    else:
        phases["layer_backward"] = {
            **dynamic_common,
            "gradients": grads if not full_ft else lm_grad,
            "activations": saved,
            "logits": logits_c,
            "transient": layer_bwd,
        }
    phases["optimizer_step"] = {
        **dynamic_common,
        "gradients": grads,
        "activations": 0,
        "logits": 0,
        "transient": 2 * largest_trainable,
    }

    def finish(terms: dict[str, int]) -> dict[str, int]:
        transient = terms["activations"] + terms["logits"] + terms["transient"]
        ws = int(CUDA_FRAGMENTATION * transient) if on_cuda else cpu_workspace
        return {
            "runtime": runtime,
            "weights": terms["weights"],
            "lora": terms["lora"],
            "gradients": terms["gradients"],
            "optimizer": terms["optimizer"],
            "activations": terms["activations"],
            "logits": terms["logits"],
            "transient": terms["transient"],
            "workspace": ws,
        }

    full = {name: finish(t) for name, t in phases.items()}
    totals = {name: sum(b.values()) for name, b in full.items()}
    peak = max(totals, key=lambda k: totals[k])
    breakdown = full[peak]
    off_peak = {}
    if breakdown["gradients"] < grads:
        off_peak["gradients"] = grads
    if peak == "optimizer_step":
        off_peak["activations"] = saved
        off_peak["logits"] = logits_c + loss_extra

    why.update(
        weights=(
            f"{w.quant} linear layers"
            + (" (double-quantized scales)" if w.quant == "nf4" and w.double_quant else "")
            + f" + embeddings/norms in {compute}"
            if quantized
            else f"all {shape.num_params / 1e6:.1f}M params in {w.quant}"
        ),
        lora=f"{details['trainable_params']:,} fp32 adapter params" if not full_ft else "",
        gradients="of the trainable params",
        optimizer=f"{w.optimizer} states",
        activations=(
            f"checkpoints: {L} layer inputs x {N} tokens"
            + (" + one recomputed layer" if peak == "recompute_backward" else "")
            if ckpt
            else f"{L} layers x {N} tokens x {fmt_bytes(layer_tok)}/token/layer saved for backward"
        ),
        logits=(
            f"{N} x {V} logits in {compute} + fp32 log-softmax and its gradients"
            if peak == "loss_backward"
            else f"{N} x {V} logits in {compute}"
        ),
        transient=(
            "optimizer-step temporaries (2 x the largest trainable tensor)"
            if peak == "optimizer_step"
            else "one layer's gradient temporaries" + (" + a dequantized weight" if dequant else "")
        ),
        workspace=(
            f"CUDA caching allocator, {CUDA_FRAGMENTATION:.0%} of transient bytes"
            if on_cuda
            else "runtime code pages, threads, model objects (measured constant)"
            + (f" + MKL's pooled GEMM packing buffer {fmt_bytes(blas_pool)}" if blas_pool else "")
        ),
    )
    if w.optimizer == "adamw8bit" and not profile.bitsandbytes_usable:
        notes.append("adamw8bit needs bitsandbytes, which is not usable on this device")
    details["why"] = why
    details["off_peak"] = off_peak
    details["speed"] = _estimate_speed(
        shape,
        w,
        profile,
        compute=compute,
        targets=ctx.targets,
        full_ft=full_ft,
        attention=attn_kind,
        activations=layers_saved,
        logits=logits_c + loss_extra,
        trainable_params=sum(n for n, _ in trainable),
    )
    return Plan(
        device=profile.id,
        model=shape.summary(),
        workload=w,
        breakdown=breakdown,
        total_bytes=totals[peak],
        available_bytes=profile.available_bytes(app_reserve_bytes),
        peak_phase=peak,
        phases=totals,
        details=details,
        notes=notes,
    )


def require_fit(p: Plan, suggestion: Plan | None = None) -> Plan:
    """Return ``p`` when it fits, else raise :class:`DoesNotFit` saying by how much."""
    if p.fits:
        return p
    msg = (
        f"{p.workload.describe()} does not fit {p.device}: needs {fmt_bytes(p.total_bytes)}, "
        f"{fmt_bytes(p.available_bytes)} available (short by {fmt_bytes(-p.headroom_bytes)}); "
        f"largest term: {max(p.breakdown, key=lambda k: p.breakdown[k])}"
    )
    if suggestion is not None:
        msg += (
            f". What fits: {suggestion.workload.describe()} ({fmt_bytes(suggestion.total_bytes)})"
        )
    raise DoesNotFit(msg, p, suggestion)


# ------------------------------------------------------------------------------------------
# recommend


_DEFAULT_CANDIDATES: dict[str, list[Any]] = {
    "lora_rank": [32, 16, 8, 4],
    "batch_size": [16, 8, 4, 2, 1],
    "seq_len": [2048, 1024, 512, 256, 128],
    "gradient_checkpointing": [False, True],
    "optimizer": ["adamw"],
}
#: the dimensions a request may bound (a user's rank / batch / sequence length)
_REQUESTABLE = ("lora_rank", "batch_size", "seq_len")


def _candidate_space(
    profile: DeviceProfile,
    shape: ModelShape,
    candidates: Mapping[str, Any] | None,
    requested: Mapping[str, int] | None = None,
) -> dict[str, list[Any]]:
    space = {k: list(v) for k, v in _DEFAULT_CANDIDATES.items()}
    quants = [q for q in profile.supported_quants()]
    if profile.accelerator == "cuda" and ("bf16" in quants or "fp16" in quants):
        quants = [q for q in quants if q != "fp32"]  # fp32 weights on a GPU waste memory
    if profile.accelerator != "cuda":
        quants = [q for q in quants if q in ("fp32", "nf4", "int8")]
    space["quant"] = quants
    if shape.max_positions:
        space["seq_len"] = [s for s in space["seq_len"] if s <= shape.max_positions] or [
            shape.max_positions
        ]
    if candidates:
        for k, v in candidates.items():
            if k not in Workload.__dataclass_fields__:
                raise WorkloadError(f"unknown candidate dimension {k!r}")
            space[k] = list(v) if isinstance(v, (list, tuple, set)) else [v]
            if not space[k]:
                raise WorkloadError(f"candidate list {k!r} is empty")
    for k, v in (requested or {}).items():
        if k not in _REQUESTABLE:
            raise WorkloadError(f"requested limits only {list(_REQUESTABLE)}, not {k!r}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise WorkloadError(f"requested {k} must be a positive integer, got {v!r}")
        # a bound, not a target: the grid's values up to it, and the value itself
        space[k] = sorted({x for x in space[k] if x is not None and x <= v} | {v}, reverse=True)
    return space


def _tie_break_key(p: Plan) -> tuple:
    """Among equally fast configurations: higher LoRA rank, higher precision, more tokens per
    step (it amortizes the per-step overhead the time model leaves out), less memory."""
    w = p.workload
    return (
        w.lora_rank or 10**6,
        _PRECISION.get(w.quant, 0),
        w.batch_size * w.seq_len,
        -p.total_bytes,
    )


def recommend(
    model_config: str | Path | Mapping[str, Any] | ModelShape,
    profile: DeviceProfile | str,
    candidates: Mapping[str, Any] | None = None,
    *,
    app_reserve_bytes: int = DEFAULT_APP_RESERVE_BYTES,
    margin: float = DEFAULT_MARGIN,
    requested: Mapping[str, int] | None = None,
    min_seq_len: int = 256,
    speed_tolerance: float = DEFAULT_SPEED_TOLERANCE,
) -> Plan:
    """The FASTEST training configuration that fits with a margin, as a :class:`Plan`.

    Candidates: ``candidates`` maps :class:`Workload` fields to the values to try (a single
    value fixes that field), e.g. ``{"quant": ["nf4"], "seq_len": [512, 1024]}``; unspecified
    fields use a default grid (quant: what the device supports, rank 32..4, batch 16..1, seq
    2048..128, checkpointing off/on, AdamW). ``requested`` holds the user's ``lora_rank``,
    ``batch_size`` and ``seq_len`` as bounds, not targets: that dimension tries the grid's
    values up to the request and the request itself, and a requested ``seq_len`` is also the
    minimum length preferred (shorter only when nothing at that length fits).

    Policy:

    1. fits: the planned peak is at most ``(1 - margin)`` of the available memory (``margin``
       default :data:`DEFAULT_MARGIN`, for the planner's own error);
    2. sequences of at least ``min_seq_len`` tokens; when none of those fits, only the longest
       sequence length that fits;
    3. fastest: the time model's estimated training tokens/s (:func:`_estimate_speed`: FLOPs
       at the device's matmul rate plus memory traffic, including dequantizing quantized
       weights, at its bandwidth). Configurations within ``speed_tolerance`` (default 5%) of
       the best count as equally fast;
    4. tie-break among those: higher LoRA rank (never above a requested one), higher
       precision (fp32 > bf16/fp16 > int8 > nf4), more tokens per step, less memory.

    Bigger is therefore not better by itself: a batch or sequence length only wins when the
    time model says it is faster (e.g. it amortizes reading the weights), and checkpointing
    (a recomputed forward) only when nothing faster fits. ``details["recommendation"]`` of
    the returned plan records the margin, the budget, the counts and the runner-up.
    Raises :class:`DoesNotFit` (with the smallest plan tried) when nothing fits.
    """
    if not 0 <= margin < 1:
        raise WorkloadError(f"margin must be in [0, 1), got {margin!r}")
    if not 0 <= speed_tolerance < 1:
        raise WorkloadError(f"speed_tolerance must be in [0, 1), got {speed_tolerance!r}")
    shape = _resolve(model_config)
    prof = get_profile(profile) if isinstance(profile, str) else profile
    space = _candidate_space(prof, shape, candidates, requested)
    if requested and requested.get("seq_len"):
        min_seq_len = int(requested["seq_len"])
    keys = list(space)
    plans: list[Plan] = []
    for combo in itertools.product(*(space[k] for k in keys)):
        kw = dict(zip(keys, combo, strict=True))
        try:
            w = Workload(**kw)
        except WorkloadError:
            continue
        if w.mode != "train":
            continue
        try:
            plans.append(plan(shape, prof, w, app_reserve_bytes=app_reserve_bytes))
        except WorkloadError:
            continue
    if not plans:
        raise WorkloadError("no valid training workload among the candidates")
    available = plans[0].available_bytes
    budget = int((1 - margin) * available)
    fitting = [p for p in plans if p.total_bytes <= budget]
    if not fitting:
        smallest = min(plans, key=lambda p: p.total_bytes)
        raise DoesNotFit(
            f"nothing fits {prof.id}: even the smallest configuration tried "
            f"({smallest.workload.describe()}) needs {fmt_bytes(smallest.total_bytes)}, "
            f"{fmt_bytes(smallest.available_bytes)} available (short by "
            f"{fmt_bytes(-smallest.headroom_bytes)}; largest term "
            f"{max(smallest.breakdown, key=lambda k: smallest.breakdown[k])}). "
            "Try a device with more memory, a smaller model, or shorter sequences.",
            smallest,
        )
    pool = [p for p in fitting if p.workload.seq_len >= min_seq_len]
    if not pool:
        longest = max(p.workload.seq_len for p in fitting)
        pool = [p for p in fitting if p.workload.seq_len == longest]
    speed = {id(p): p.tokens_per_s or 0.0 for p in pool}
    fastest = max(speed.values())
    tied = [p for p in pool if speed[id(p)] >= (1 - speed_tolerance) * fastest]
    ranked = sorted(tied, key=_tie_break_key, reverse=True)
    best = ranked[0]
    runner_up = max(
        (p for p in pool if p is not best), key=lambda p: speed[id(p)], default=None
    )
    best.details["recommendation"] = {
        "policy": (
            f"fastest estimated tokens/s among configurations whose peak is <= "
            f"{1 - margin:.0%} of the available memory (margin {margin:.0%}); within "
            f"{speed_tolerance:.0%} of the fastest: higher LoRA rank, higher precision, more "
            "tokens per step, less memory"
        ),
        "margin": margin,
        "budget_bytes": budget,
        "available_bytes": available,
        "speed_tolerance": speed_tolerance,
        "min_seq_len": min_seq_len,
        "requested": dict(requested or {}),
        "candidates": len(plans),
        "fitting": len(fitting),
        "equally_fast": len(tied),
        "fastest_tokens_per_s": fastest,
        "tokens_per_s": best.tokens_per_s,
        "runner_up": (
            {
                "workload": runner_up.workload.describe(),
                "tokens_per_s": runner_up.tokens_per_s,
                "total_bytes": runner_up.total_bytes,
            }
            if runner_up is not None
            else None
        ),
    }
    return best
