"""One description per model family: the decoder layer's linear layers (their names, which are
the LoRA target names, and how they are laid out: fused q/k/v, fused gate/up), the default LoRA
targets, the config field names and the memory model's style. The planner, the loader
(``algorithms.core.modeling``), the fit check and the ONNX export all read this table, so they
cannot disagree on what a LoRA adapter of a family is. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "FAMILIES",
    "LM_HEAD",
    "Family",
    "Linear",
    "family_of",
    "layer_linears",
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


def _llama_like(model_type: str, tied: bool = False) -> Family:
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
    )


_NEOX_NAMES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

FAMILIES: dict[str, Family] = {
    **{mt: _llama_like(mt) for mt in ("llama", "mistral", "qwen2", "qwen3")},
    **{mt: _llama_like(mt, tied=True) for mt in ("gemma", "gemma2")},
    "phi3": Family(
        model_type="phi3",
        style="llama",
        attn_in=("qkv_proj",),
        attn_out="o_proj",
        mlp_in=("gate_up_proj",),
        mlp_out="down_proj",
        gated=True,
        default_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
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
# Falcon is laid out like GPT-NeoX (fused query_key_value, dense_h_to_4h / dense_4h_to_h); only
# its FFN width field and its tied embeddings differ
FAMILIES["falcon"] = replace(
    FAMILIES["gpt_neox"], model_type="falcon", intermediate_keys=("ffn_hidden_size",),
    intermediate_factor=4, tied_by_default=True)

#: what an unknown model type with a llama-style config is treated as
_FALLBACK = _llama_like("llama")


def family_of(model_type: str | None) -> Family | None:
    """The description of ``model_type`` (None when the table does not know it)."""
    return FAMILIES.get(model_type or "")


def fallback_family(model_type: str) -> Family:
    """A llama-style description for an unknown ``model_type`` (the planner's guess)."""
    return Family(**{**_FALLBACK.__dict__, "model_type": model_type})


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
