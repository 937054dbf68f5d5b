"""FedBiOT / Offsite-Tuning model surgery: split a decoder LM into an adapter and an emulator.

The **adapter** is the top ``n_adapter_top`` decoder layers (nearest the LM head) plus,
optionally, the bottom ``n_adapter_bottom`` layers (the Offsite-Tuning "sandwich"). The ``n``
layers in between (the **middle block**) are compressed by uniform layer dropping into the
**emulator** part. The emulator model = embeddings + bottom adapter + kept middle layers + top
adapter + final norm + LM head, all deep copies of the full model's modules, all frozen.

Kept middle layers (:func:`kept_layers`). ``k = floor(n * (1 - drop_ratio) + 1/2)``, computed
on the decimal value of ``drop_ratio`` (``repr``), so halves round up: n=5, drop 0.5 keeps 3
(Python's ``round(2.5)`` would give 2). Middle-block positions ``i = 0..k-1`` keep
``floor(i * (n - 1) / (k - 1) + 1/2)`` (integer arithmetic, halves up): the first (i=0) and the
last (i=k-1) middle layers are always kept and the indices are strictly increasing because the
stride ``(n-1)/(k-1)`` is >= 1. ``k = 1`` keeps only the first middle layer; ``k = 0``
(drop_ratio near 1) keeps none. Example: n=10, drop 0.5 -> k=5, positions 0, 2, 5, 7, 9.

Plug-back. Every emulator layer records the full-model layer it was copied from
(:attr:`EmulatorPlan.origin`). LoRA state keys carry the layer index
(``model.layers.4.self_attn.q_proj.lora_A.weight``); :func:`emulator_to_full_adapter` and
:func:`full_to_emulator_adapter` rename them by layer position, so an adapter trained on the
emulator plugs into the full LLM and back.

The emulator is a normal checkpoint: :func:`save_emulator` writes ``save_pretrained`` output
plus :data:`EMULATOR_PLAN_NAME` with the plan, and a client loads it with
:func:`~algorithms.core.modeling.load_causal_lm` like any other model.

Supported: transformers 5.x Llama-style models (``model.model.layers``: llama, mistral, qwen2,
qwen3, ...) and GPT-2-style models (``model.transformer.h``); tested on llama and gpt2.
The training side (adapter LoRA, middle-block output, losses, the server's alignment step)
lives in :mod:`algorithms.core.emulator_train`.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from algorithms.core.errors import ModelError
from algorithms.core.modeling import (
    LoraSpec,
    is_quantized,
    load_causal_lm,
    model_type_of,
    unwrap_model,
)

__all__ = [
    "EMULATOR_PLAN_NAME",
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "ROLES",
    "EmulatorError",
    "EmulatorPlan",
    "adapter_layer_map",
    "adapter_layers",
    "build_emulator",
    "decoder_layers",
    "emulator_to_full_adapter",
    "full_to_emulator_adapter",
    "kept_layers",
    "layer_lora_kwargs",
    "layer_target_regex",
    "load_emulator",
    "load_emulator_plan",
    "middle_keep_positions",
    "save_emulator",
    "which_model",
]

EMULATOR_PLAN_NAME = "emulator.json"
PLAN_FORMAT = "cotune.emulator_plan"
PLAN_VERSION = 1
ROLE_BOTTOM, ROLE_EMULATOR, ROLE_TOP = "adapter_bottom", "emulator", "adapter_top"
ROLES = (ROLE_BOTTOM, ROLE_EMULATOR, ROLE_TOP)

# (path to the decoder-layer ModuleList) for the architectures this module knows
_LAYER_PATHS: tuple[tuple[str, ...], ...] = (("model", "layers"), ("transformer", "h"))
# first ".<container>.<index>." segment of a parameter name, as peft's layers_pattern matches
_LAYER_KEY = re.compile(r"^(?P<pre>(?:[^.]+\.)*?(?:layers|h)\.)(?P<idx>\d+)(?P<post>\..+)$")


class EmulatorError(ModelError, ValueError):
    """An emulator plan, model or adapter state that does not fit (bad input: a ValueError)."""


# --------------------------------------------------------------------------------------------
# the plan


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise EmulatorError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_drop(drop_ratio: Any) -> float:
    if isinstance(drop_ratio, bool) or not isinstance(drop_ratio, (int, float)):
        raise EmulatorError(f"drop_ratio must be a number in [0, 1], got {drop_ratio!r}")
    if not math.isfinite(drop_ratio) or not 0.0 <= drop_ratio <= 1.0:
        raise EmulatorError(
            f"drop_ratio must be in [0, 1] (0 keeps every middle layer, 0.5 half), "
            f"got {drop_ratio!r}"
        )
    return float(drop_ratio)


def middle_keep_positions(n: int, drop_ratio: float) -> list[int]:
    """Positions (0..n-1) kept from a middle block of ``n`` layers; see the module docstring."""
    _check_int("n", n, 0)
    keep = 1 - Fraction(repr(_check_drop(drop_ratio)))
    k = math.floor(n * keep + Fraction(1, 2))
    if k == 0:
        return []
    if k == 1:
        return [0]
    return [(2 * i * (n - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]


@dataclass(frozen=True)
class EmulatorPlan:
    """Which full-model layer every emulator layer comes from, and its role.

    ``origin[i]`` is the full-model index of emulator layer ``i``; ``roles[i]`` is one of
    :data:`ROLES`. Layers are in model order: bottom adapter, kept middle layers, top adapter.
    Validation is structural (adapters are the outer layers, kept middle layers increase), so
    a hand-made selection loads too; :func:`kept_layers` makes the uniform one.
    """

    n_layers: int
    n_adapter_top: int
    n_adapter_bottom: int
    drop_ratio: float
    origin: tuple[int, ...]
    roles: tuple[str, ...]

    def __post_init__(self) -> None:
        n = _check_int("n_layers", self.n_layers, 1)
        top = _check_int("n_adapter_top", self.n_adapter_top, 1)
        bottom = _check_int("n_adapter_bottom", self.n_adapter_bottom, 0)
        object.__setattr__(self, "drop_ratio", _check_drop(self.drop_ratio))
        if top + bottom > n:
            raise EmulatorError(
                f"the adapter ({bottom} bottom + {top} top layers) is larger than the model's "
                f"{n} layers; use fewer adapter layers"
            )
        object.__setattr__(self, "origin", tuple(self.origin))
        object.__setattr__(self, "roles", tuple(self.roles))
        if len(self.origin) != len(self.roles):
            raise EmulatorError("origin and roles must have one entry per emulator layer")
        expected = [ROLE_BOTTOM] * bottom + [ROLE_EMULATOR] * (len(self.origin) - bottom - top)
        expected += [ROLE_TOP] * top
        if list(self.roles) != expected:
            raise EmulatorError(f"roles {list(self.roles)} are not bottom/emulator/top in order")
        for o in self.origin:
            _check_int("origin index", o, 0)
        if list(self.origin[:bottom]) != list(range(bottom)) or list(
            self.origin[len(self.origin) - top :]
        ) != list(range(n - top, n)):
            raise EmulatorError("adapter layers must be copies of the model's outer layers")
        middle = self.origin[bottom : len(self.origin) - top]
        if any(not bottom <= o < n - top for o in middle) or list(middle) != sorted(set(middle)):
            raise EmulatorError(f"kept middle layers {list(middle)} are not increasing in range")

    @property
    def n_emulator_layers(self) -> int:
        return len(self.origin)

    @property
    def kept_middle(self) -> tuple[int, ...]:
        """Full-model indices of the kept middle layers."""
        return tuple(o for o, r in zip(self.origin, self.roles, strict=True) if r == ROLE_EMULATOR)

    @property
    def middle_emulator_indices(self) -> tuple[int, ...]:
        """Emulator indices of the kept middle layers (what the alignment step trains)."""
        return tuple(i for i, r in enumerate(self.roles) if r == ROLE_EMULATOR)

    def middle_output_index(self, where: str) -> int:
        """Index of the first top-adapter layer in the ``"emulator"`` or ``"full"`` model."""
        total = {"emulator": self.n_emulator_layers, "full": self.n_layers}.get(where)
        if total is None:
            raise EmulatorError(f"where must be 'emulator' or 'full', got {where!r}")
        return total - self.n_adapter_top

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "n_layers": self.n_layers,
            "n_adapter_top": self.n_adapter_top,
            "n_adapter_bottom": self.n_adapter_bottom,
            "drop_ratio": self.drop_ratio,
            "layers": [
                {"index": i, "origin": o, "role": r}
                for i, (o, r) in enumerate(zip(self.origin, self.roles, strict=True))
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmulatorPlan:
        if not isinstance(d, Mapping) or d.get("format") != PLAN_FORMAT:
            raise EmulatorError(f"not an emulator plan (format must be {PLAN_FORMAT!r})")
        version = d.get("version")
        if not isinstance(version, int) or version > PLAN_VERSION:
            raise EmulatorError(
                f"emulator plan version {version!r} is newer than this cotune understands "
                f"({PLAN_VERSION}); upgrade cotune"
            )
        try:
            layers = list(d["layers"])
            if [e["index"] for e in layers] != list(range(len(layers))):
                raise EmulatorError("emulator plan layers are not numbered 0..n-1")
            return cls(
                n_layers=d["n_layers"],
                n_adapter_top=d["n_adapter_top"],
                n_adapter_bottom=d["n_adapter_bottom"],
                drop_ratio=d["drop_ratio"],
                origin=tuple(e["origin"] for e in layers),
                roles=tuple(e["role"] for e in layers),
            )
        except (KeyError, TypeError) as exc:
            raise EmulatorError(f"malformed emulator plan: {type(exc).__name__}: {exc}") from exc


def kept_layers(
    n_layers: int, n_adapter_top: int = 2, n_adapter_bottom: int = 0, drop_ratio: float = 0.5
) -> EmulatorPlan:
    """The :class:`EmulatorPlan` for a model of ``n_layers`` decoder layers.

    Adapter = bottom ``n_adapter_bottom`` + top ``n_adapter_top`` (>= 1) layers; the middle
    block between them is thinned by :func:`middle_keep_positions`.
    """
    n = _check_int("n_layers", n_layers, 1)
    top = _check_int("n_adapter_top", n_adapter_top, 1)
    bottom = _check_int("n_adapter_bottom", n_adapter_bottom, 0)
    drop = _check_drop(drop_ratio)
    if top + bottom > n:
        raise EmulatorError(
            f"the adapter ({bottom} bottom + {top} top layers) is larger than the model's {n} "
            "layers; use fewer adapter layers"
        )
    middle = [bottom + p for p in middle_keep_positions(n - top - bottom, drop)]
    origin = list(range(bottom)) + middle + list(range(n - top, n))
    roles = [ROLE_BOTTOM] * bottom + [ROLE_EMULATOR] * len(middle) + [ROLE_TOP] * top
    return EmulatorPlan(n, top, bottom, drop, tuple(origin), tuple(roles))


# --------------------------------------------------------------------------------------------
# model surgery


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """``(parent, attribute, layers)`` of a (possibly peft-wrapped) model's decoder layers."""
    base = unwrap_model(model)
    for path in _LAYER_PATHS:
        parent: Any = base
        for part in path[:-1]:
            parent = getattr(parent, part, None)
        layers = getattr(parent, path[-1], None) if parent is not None else None
        if isinstance(layers, torch.nn.ModuleList):
            return parent, path[-1], layers
    raise EmulatorError(
        f"cannot find the decoder layers of {type(base).__name__}; supported are Llama-style "
        "(model.layers) and GPT-2-style (transformer.h) causal LMs"
    )


def which_model(model: torch.nn.Module, plan: EmulatorPlan) -> str:
    """``"emulator"`` or ``"full"``, by the model's number of decoder layers (drop 0: either)."""
    n = len(decoder_layers(model)[2])
    if n == plan.n_emulator_layers:
        return "emulator"
    if n == plan.n_layers:
        return "full"
    raise EmulatorError(
        f"model has {n} decoder layers; the plan expects {plan.n_layers} (full model) or "
        f"{plan.n_emulator_layers} (emulator)"
    )


def build_emulator(model: torch.nn.Module, plan: EmulatorPlan) -> torch.nn.Module:
    """A new causal LM of the same class holding deep copies of the plan's layers, frozen.

    ``model`` is the full base model (no LoRA, not quantized: load it in bf16/fp32). It is not
    changed. The copy's config has the new layer count (``num_hidden_layers`` / ``n_layer``) and
    re-indexed ``layer_types``; every ``layer_idx`` attribute (KV-cache slot) is renumbered.
    The result is in eval mode with ``requires_grad=False`` everywhere.
    """
    if unwrap_model(model) is not model:
        raise EmulatorError("build the emulator from the base model, not a peft-wrapped one")
    if is_quantized(model):
        raise EmulatorError(
            "cannot build an emulator from a quantized model; load the full model with "
            "quant='bf16' or 'fp32'"
        )
    parent, attr, layers = decoder_layers(model)
    if len(layers) != plan.n_layers:
        raise EmulatorError(f"model has {len(layers)} decoder layers, the plan {plan.n_layers}")
    config = model.config
    if getattr(config, "is_heterogeneous", False):
        raise EmulatorError("models with a heterogeneous per-layer config are not supported")
    renumbered = list(plan.origin) != list(range(plan.n_emulator_layers))
    if renumbered and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise EmulatorError(
            "scale_attn_by_inverse_layer_idx=True ties attention scaling to the layer index, "
            "so dropped layers would change the kept layers' outputs after reloading"
        )
    if any(hasattr(m, "lora_A") for m in layers.modules()):
        raise EmulatorError("the model's layers carry LoRA modules; pass the plain base model")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != plan.n_layers:
        raise EmulatorError(f"config.layer_types has {len(layer_types)} entries")

    # Deep-copy the model with only the kept layers in place, so dropped layers are never copied.
    kept = torch.nn.ModuleList([layers[o] for o in plan.origin])
    setattr(parent, attr, kept)
    try:
        emulator = copy.deepcopy(model)
    finally:
        setattr(parent, attr, layers)

    cfg = emulator.config
    cfg.num_hidden_layers = plan.n_emulator_layers
    if layer_types is not None:
        cfg.layer_types = [layer_types[o] for o in plan.origin]
    for i, layer in enumerate(decoder_layers(emulator)[2]):
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = i
    for prm in emulator.parameters():
        prm.requires_grad_(False)
    return emulator.eval()


def save_emulator(
    model: torch.nn.Module,
    plan: EmulatorPlan,
    path: str | Path,
    tokenizer: Any = None,
    *,
    source: str | None = None,
) -> Path:
    """Write the emulator as a normal checkpoint plus :data:`EMULATOR_PLAN_NAME`.

    ``tokenizer``: saved alongside (``load_causal_lm`` needs tokenizer files). ``source``: an
    optional note about the full model it came from (recorded in the plan file, never read).
    """
    if unwrap_model(model) is not model:
        raise EmulatorError("save the emulator base model, not a peft-wrapped one")
    n = len(decoder_layers(model)[2])
    if n != plan.n_emulator_layers:
        raise EmulatorError(
            f"model has {n} decoder layers, the plan's emulator has {plan.n_emulator_layers}"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    meta = plan.to_dict()
    if source is not None:
        meta["source"] = str(source)
    (out / EMULATOR_PLAN_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def load_emulator_plan(path: str | Path) -> EmulatorPlan:
    """The plan saved next to an emulator checkpoint by :func:`save_emulator`."""
    p = Path(path) / EMULATOR_PLAN_NAME
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EmulatorError(f"cannot read the emulator plan {p}: {exc}") from exc
    return EmulatorPlan.from_dict(d)


def load_emulator(path: str | Path, **load_kwargs: Any) -> tuple[Any, Any, Any, EmulatorPlan]:
    """``load_causal_lm(path, **load_kwargs)`` plus the saved plan: model, tok, report, plan."""
    plan = load_emulator_plan(path)
    model, tok, report = load_causal_lm(path, **load_kwargs)
    if len(decoder_layers(model)[2]) != plan.n_emulator_layers:
        raise EmulatorError(f"{path}: checkpoint and {EMULATOR_PLAN_NAME} disagree on layers")
    return model, tok, report, plan


# --------------------------------------------------------------------------------------------
# adapter placement and plug-back


def adapter_layers(plan: EmulatorPlan, where: str) -> list[int]:
    """Adapter layer indices in the ``"emulator"`` or the ``"full"`` model (bottom, then top)."""
    if where == "emulator":
        return [i for i, r in enumerate(plan.roles) if r != ROLE_EMULATOR]
    if where == "full":
        return [o for o, r in zip(plan.origin, plan.roles, strict=True) if r != ROLE_EMULATOR]
    raise EmulatorError(f"where must be 'emulator' or 'full', got {where!r}")


def adapter_layer_map(plan: EmulatorPlan) -> dict[int, int]:
    """Emulator layer index -> full-model layer index, for the adapter layers."""
    return dict(zip(adapter_layers(plan, "emulator"), adapter_layers(plan, "full"), strict=True))


def _rename_layers(
    state: Mapping[str, torch.Tensor], mapping: Mapping[int, int], what: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _LAYER_KEY.match(key)
        if m is None:  # not inside a decoder layer (e.g. lm_head): same module in both models
            new = key
        else:
            idx = int(m.group("idx"))
            if idx not in mapping:
                raise EmulatorError(
                    f"{key!r} belongs to {what} layer {idx}, which is not an adapter layer "
                    f"(adapter layers: {sorted(mapping)})"
                )
            new = f"{m.group('pre')}{mapping[idx]}{m.group('post')}"
        if new in out:
            raise EmulatorError(f"two adapter tensors map to {new!r}")
        out[new] = value
    return dict(sorted(out.items()))


def emulator_to_full_adapter(
    state: Mapping[str, torch.Tensor], plan: EmulatorPlan
) -> dict[str, torch.Tensor]:
    """Rename an adapter state trained on the emulator to the full model's layer indices.

    Keys outside decoder layers pass through unchanged; a key on a middle (emulator) layer
    raises :class:`EmulatorError`. Tensors are shared, not copied.
    """
    return _rename_layers(state, adapter_layer_map(plan), "emulator")


def full_to_emulator_adapter(
    state: Mapping[str, torch.Tensor], plan: EmulatorPlan
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`emulator_to_full_adapter`."""
    inverse = {f: e for e, f in adapter_layer_map(plan).items()}
    return _rename_layers(state, inverse, "full-model")


def layer_lora_kwargs(model: torch.nn.Module, layers: Sequence[int]) -> dict[str, Any]:
    """peft ``LoraConfig`` keywords restricting LoRA to the given decoder layer indices."""
    _, attr, mods = decoder_layers(model)
    idx = sorted({int(i) for i in layers})
    if not idx or idx[0] < 0 or idx[-1] >= len(mods):
        raise EmulatorError(f"layer indices {list(layers)} not in 0..{len(mods) - 1}")
    return {"layers_to_transform": idx, "layers_pattern": attr}


def layer_target_regex(model: torch.nn.Module, spec: LoraSpec, layers: Sequence[int]) -> str:
    """A peft ``target_modules`` regex (full match) for ``spec``'s targets in ``layers`` only."""
    kw = layer_lora_kwargs(model, layers)
    base = unwrap_model(model)
    parent, attr, _ = decoder_layers(base)
    prefix = next(n for n, m in base.named_modules() if m is parent)
    container = f"{prefix}.{attr}" if prefix else attr
    targets = spec.resolved_targets(model_type_of(base))
    nums = "|".join(str(i) for i in kw["layers_to_transform"])
    names = "|".join(re.escape(t) for t in targets)
    return rf"{re.escape(container)}\.(?:{nums})\.(?:.*\.)?(?:{names})"
