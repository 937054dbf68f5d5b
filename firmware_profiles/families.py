"""One description per model family: the decoder layer's linear layers (their names, which are
the LoRA target names, and how they are laid out: fused q/k/v, fused gate/up), the default LoRA
targets, the config field names, the memory model's style and the attention pattern (sliding
windows per layer, soft-caps). The planner, the loader (``algorithms.core.modeling``), the fit
check and the ONNX export all read this table, so they cannot disagree on what a LoRA adapter
of a family is or on which layers attend through a window. Standard library only.

Mixture-of-experts models (Qwen2-MoE, Mixtral, ...) are refused by every path:
:func:`unsupported_reason` names the family and what is missing, and the planner, the fit
check, the loader and the ONNX export raise their typed errors with it (see the function).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import UnsupportedModelError

__all__ = [
    "FAMILIES",
    "LM_HEAD",
    "MOE_MODEL_TYPES",
    "Family",
    "Linear",
    "check_supported",
    "family_of",
    "layer_linears",
    "unsupported_reason",
]

#: the output layer's name as a LoRA target (every family here: transformers' lm_head)
LM_HEAD = "lm_head"


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block: ``name`` (the LoRA target name), sizes, bias."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class Family:
    """How one architecture's decoder layer is built, as far as LoRA and memory care.

    ``style``: ``"llama"`` (RMSNorm, rotary positions, gated MLP) or ``"gpt2"`` (LayerNorm,
    ungated MLP); it picks the planner's activation model. ``attn_in``: the linear layer(s)
    reading the attention input (one name: a fused q/k/v projection of width
    ``(heads + 2 * kv_heads) * head_dim``; three names: q, k, v). ``attn_out``: the attention
    output projection. ``mlp_in``: the layer(s) reading the MLP input (gated: gate and up, or
    one fused gate/up of width ``2 * intermediate``; ungated: the up projection). ``mlp_out``:
    the down projection. ``intermediate_keys``: config fields naming the MLP width (first
    present wins; else ``intermediate_factor * hidden``). ``conv1d``: weights stored
    in x out (transformers' ``Conv1D``; peft needs ``fan_in_fan_out``).
    ``learned_positions``: a position embedding table (``position_offset`` extra rows).

    Attention pattern (the ONNX export builds the attention mask itself and reads these):
    ``window_key``: the config field holding the sliding-window width (None: every layer is
    plainly causal; a null value in a config also means no window). ``window_layers``:
    ``"all"`` (one window on every layer, one mask for the model) or ``"layer_types"``
    (``config.layer_types`` names each layer ``"sliding_attention"`` or ``"full_attention"``;
    the model takes one mask per layer type). ``attn_softcap_key`` / ``final_softcap_key``:
    config fields of the attention-score and final-logit soft-caps (``cap * tanh(x / cap)``;
    an attention soft-cap needs eager attention, SDPA has none). ``mask_flags``: config
    fields that, when set, change the mask beyond causal + window (the export refuses them).

    How transformers runs the layer, as far as the memory of training cares (the planner's
    activation model reads these; each was checked against the tensors autograd saves):
    ``attn_implementation``: what transformers picks when the loader asks for none:
    ``"sdpa"`` (fused scaled-dot-product attention: no ``seq x seq`` scores saved) or
    ``"eager"`` (the model's own code: the full ``[batch, heads, seq, seq]`` score matrices are
    saved; Gemma-2, whose attention soft-cap SDPA cannot apply). ``softcap_defaults``: the
    attention and final-logit soft-caps a config gets when it omits the fields (the config
    class defaults; Gemma-2: 50 and 30). ``post_norms``: a norm on each sublayer's output too
    (Gemma-2/3: four RMSNorms per layer). ``qk_norm``: RMSNorm on q and k per head (Qwen3,
    Gemma-3). ``parallel_key``: config field that, when true (the default), makes attention
    and MLP read the same layer input (GPT-NeoX ``use_parallel_residual``, Falcon
    ``parallel_attn``). ``attn_out_copy``: the rotary embedding concatenates, so SDPA's output
    is ``[batch, heads, seq, dim]``-contiguous and the output projection gets a copy (Phi-3,
    GPT-NeoX). ``sdpa_mask``: the model always hands SDPA a materialized ``[batch, 1, seq,
    seq]`` mask (Falcon): SDPA saves a float copy per layer and grouped k/v are repeated.
    ``eager_softmax_fp32``: eager attention takes its softmax in fp32 and casts back (all but
    GPT-2, whose softmax stays in the compute dtype).
    """

    model_type: str
    style: str
    attn_in: tuple[str, ...]
    attn_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    gated: bool
    default_targets: tuple[str, ...]
    intermediate_keys: tuple[str, ...] = ("intermediate_size",)
    intermediate_factor: int | None = None
    conv1d: bool = False
    learned_positions: bool = False
    position_offset: int = 0
    tied_by_default: bool = False
    window_key: str | None = None
    window_layers: str = "all"
    attn_softcap_key: str | None = None
    final_softcap_key: str | None = None
    mask_flags: tuple[str, ...] = ()
    attn_implementation: str = "sdpa"
    softcap_defaults: tuple[float | None, float | None] = (None, None)
    post_norms: bool = False
    qk_norm: bool = False
    parallel_key: str | None = None
    attn_out_copy: bool = False
    sdpa_mask: bool = False
    eager_softmax_fp32: bool = True

    @property
    def fused(self) -> dict[str, tuple[str, ...]]:
        """Fused projections: name -> the parts it computes in one matmul."""
        out: dict[str, tuple[str, ...]] = {}
        if len(self.attn_in) == 1:
            out[self.attn_in[0]] = ("q", "k", "v")
        if self.gated and len(self.mlp_in) == 1:
            out[self.mlp_in[0]] = ("gate", "up")
        return out

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every decoder-layer linear name (each a valid LoRA target), in layer order."""
        return tuple(dict.fromkeys((*self.attn_in, self.attn_out, *self.mlp_in, self.mlp_out)))

    def intermediate_size(self, cfg: dict[str, Any], hidden: int) -> int | None:
        for k in self.intermediate_keys:
            v = cfg.get(k)
            if v is not None:
                return v
        return self.intermediate_factor * hidden if self.intermediate_factor else None


_LLAMA_ATTN = ("q_proj", "k_proj", "v_proj")
_LLAMA_MLP = ("gate_proj", "up_proj")
_LLAMA_TARGETS = (*_LLAMA_ATTN, "o_proj", *_LLAMA_MLP, "down_proj")


def _llama_like(model_type: str, tied: bool = False, **attention: Any) -> Family:
    return Family(
        model_type=model_type,
        style="llama",
        attn_in=_LLAMA_ATTN,
        attn_out="o_proj",
        mlp_in=_LLAMA_MLP,
        mlp_out="down_proj",
        gated=True,
        default_targets=_LLAMA_TARGETS,
        tied_by_default=tied,
        **attention,
    )


#: one sliding window on every layer (Mistral, Phi-3): a single mask
_WINDOW_ALL = {"window_key": "sliding_window"}
#: per-layer windows from ``config.layer_types`` (Qwen2/3 with use_sliding_window, Gemma 2/3)
_WINDOW_BY_LAYER = {"window_key": "sliding_window", "window_layers": "layer_types"}
_SOFTCAPS = {
    "attn_softcap_key": "attn_logit_softcapping",
    "final_softcap_key": "final_logit_softcapping",
}

_NEOX_NAMES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

FAMILIES: dict[str, Family] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral", **_WINDOW_ALL),
    "qwen2": _llama_like("qwen2", **_WINDOW_BY_LAYER),
    "qwen3": _llama_like("qwen3", **_WINDOW_BY_LAYER, qk_norm=True),
    "gemma": _llama_like("gemma", tied=True),
    # transformers runs Gemma-2 with eager attention (SDPA has no soft-cap)
    "gemma2": _llama_like(
        "gemma2",
        tied=True,
        **_WINDOW_BY_LAYER,
        **_SOFTCAPS,
        attn_implementation="eager",
        softcap_defaults=(50.0, 30.0),
        post_norms=True,
    ),
    # Gemma 3's text model (Gemma3ForCausalLM); its bidirectional variant masks differently
    "gemma3_text": _llama_like(
        "gemma3_text",
        tied=True,
        **_WINDOW_BY_LAYER,
        **_SOFTCAPS,
        mask_flags=("use_bidirectional_attention",),
        post_norms=True,
        qk_norm=True,
    ),
    "phi3": Family(
        model_type="phi3",
        style="llama",
        attn_in=("qkv_proj",),
        attn_out="o_proj",
        mlp_in=("gate_up_proj",),
        mlp_out="down_proj",
        gated=True,
        default_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        **_WINDOW_ALL,
        attn_out_copy=True,
    ),
    "gpt2": Family(
        model_type="gpt2",
        style="gpt2",
        attn_in=("c_attn",),
        attn_out="c_proj",
        mlp_in=("c_fc",),
        mlp_out="c_proj",  # the same module name as the attention output
        gated=False,
        default_targets=("c_attn", "c_proj", "c_fc"),
        intermediate_keys=("n_inner",),
        intermediate_factor=4,
        conv1d=True,
        learned_positions=True,
        tied_by_default=True,
        eager_softmax_fp32=False,
    ),
    "gpt_neox": Family(
        model_type="gpt_neox",
        style="gpt2",
        attn_in=("query_key_value",),
        attn_out="dense",
        mlp_in=("dense_h_to_4h",),
        mlp_out="dense_4h_to_h",
        gated=False,
        default_targets=_NEOX_NAMES,
        parallel_key="use_parallel_residual",
        attn_out_copy=True,
    ),
    "opt": Family(
        model_type="opt",
        style="gpt2",
        attn_in=("q_proj", "k_proj", "v_proj"),
        attn_out="out_proj",
        mlp_in=("fc1",),
        mlp_out="fc2",
        gated=False,
        default_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        intermediate_keys=("ffn_dim",),
        learned_positions=True,
        position_offset=2,
        tied_by_default=True,
    ),
}
# Falcon is laid out like GPT-NeoX (fused query_key_value, dense_h_to_4h / dense_4h_to_h); its
# FFN width field and its tied embeddings differ, and so does how it runs attention: its rotary
# embedding keeps the layout (no copy before ``dense``) and it always materializes the mask
FAMILIES["falcon"] = replace(
    FAMILIES["gpt_neox"], model_type="falcon", intermediate_keys=("ffn_hidden_size",),
    intermediate_factor=4, tied_by_default=True, parallel_key="parallel_attn",
    attn_out_copy=False, sdpa_mask=True)

#: what an unknown model type with a llama-style config is treated as
_FALLBACK = _llama_like("llama")


def family_of(model_type: str | None) -> Family | None:
    """The description of ``model_type`` (None when the table does not know it)."""
    return FAMILIES.get(model_type or "")


def fallback_family(model_type: str) -> Family:
    """A llama-style description for an unknown ``model_type`` (the planner's guess). A
    mixture-of-experts type is not guessed: :class:`UnsupportedModelError`."""
    check_supported({"model_type": model_type})
    return Family(**{**_FALLBACK.__dict__, "model_type": model_type})


#: mixture-of-experts model types whose name does not say so (any type containing "moe" is one)
MOE_MODEL_TYPES = frozenset(
    {
        "dbrx",
        "deepseek_v2",
        "deepseek_v3",
        "gpt_oss",
        "jamba",
        "llama4",
        "llama4_text",
        "minimax",
        "mixtral",
        "switch_transformers",
    }
)
#: config fields holding a number of experts (more than one: a mixture-of-experts model)
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

_MOE_WHY = (
    "mixture-of-experts models are not supported: the memory planner does not count expert "
    "weights, bitsandbytes leaves the fused expert tensors unquantized, and the ONNX export "
    "does not reproduce expert routing; use a dense model of the family"
)


def _field(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def unsupported_reason(config: Any) -> str | None:
    """Why no path of cotune takes a model with this config (a ``config.json`` mapping or a
    transformers config), or None. Mixture-of-experts models are refused: by model type
    (:data:`MOE_MODEL_TYPES`, or a type naming "moe") or by a config field counting more than
    one expert (families this table does not list are caught too). A multimodal wrapper is
    judged by its ``text_config``."""
    text = _field(config, "text_config")
    if text is not None and not isinstance(text, (str, bytes)):
        inner = unsupported_reason(text)
        if inner is not None:
            return inner
    mt = str(_field(config, "model_type") or "")
    experts = [
        f"{k}={v}"
        for k in _EXPERT_KEYS
        if isinstance(v := _field(config, k), int) and not isinstance(v, bool) and v > 1
    ]
    if mt in MOE_MODEL_TYPES or "moe" in mt or experts:
        shown = f" ({', '.join(experts)})" if experts else ""
        return f"{mt or 'this model'}{shown}: {_MOE_WHY}"
    return None


def check_supported(config: Any) -> None:
    """Raise :class:`UnsupportedModelError` when :func:`unsupported_reason` refuses ``config``."""
    why = unsupported_reason(config)
    if why is not None:
        raise UnsupportedModelError(why, model_type=str(_field(config, "model_type") or ""))


def layer_linears(
    fam: Family,
    *,
    hidden: int,
    intermediate: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    qkv_bias: bool = False,
    o_bias: bool = False,
    mlp_bias: bool = False,
) -> list[Linear]:
    """The linear layers of ONE decoder layer of ``fam`` (names are LoRA target names)."""
    h, i = hidden, intermediate
    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    out: list[Linear] = []
    if len(fam.attn_in) == 1:
        out.append(Linear(fam.attn_in[0], h, q + 2 * kv, qkv_bias))
    else:
        out += [Linear(n, h, w, qkv_bias) for n, w in zip(fam.attn_in, (q, kv, kv), strict=True)]
    out.append(Linear(fam.attn_out, q, h, o_bias))
    if fam.gated and len(fam.mlp_in) == 1:
        out.append(Linear(fam.mlp_in[0], h, 2 * i, mlp_bias))
    else:
        out += [Linear(n, h, i, mlp_bias) for n in fam.mlp_in]
    out.append(Linear(fam.mlp_out, i, h, mlp_bias))
    return out
