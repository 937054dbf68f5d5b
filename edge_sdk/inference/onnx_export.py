"""Export a causal LM (optionally with a LoRA adapter) to ONNX with its KV cache, and verify it.

Graph interface (one layout for every architecture; ``L`` layers, ``H`` KV heads, ``D`` head
dim; float32):

- inputs ``input_ids`` int64 [batch, seq], ``attention_mask`` int64 [batch, total]
  (total = past + seq; 1 = attend), ``position_ids`` int64 [batch, seq], then per layer i
  ``past_key.i`` / ``past_value.i`` [batch, H, past, D] (past may be 0 for the prefill),
  and, for a *gated* adapter only, ``lora_gate`` float32 [batch];
- outputs ``logits`` [batch, seq, vocab] and ``present_key.i`` / ``present_value.i``
  [batch, H, total, D].

All of batch, seq, past and total are dynamic. The transformers 5 ``DynamicCache`` never
crosses the graph boundary: :class:`KVCausalLM` takes and returns flat tensors, rebuilds the
cache object inside, and (for export) builds the 4-D additive causal+padding mask itself, so
the graph holds no data-dependent mask logic from the library.

Attention pattern. What the mask must express comes from the family table
(``firmware_profiles.families``), read by :func:`attention_spec`: a sliding window on every
layer (Mistral, Phi-3: key ``j`` is visible to query ``i`` iff ``i - window < j <= i``), or
per layer from ``config.layer_types`` (Qwen2/3 with ``use_sliding_window``, Gemma 2/3: the model
gets one mask per layer type), plus the soft-caps (an attention soft-cap runs eager attention).
The cache keeps every position on every layer (one layout for all), so the window is applied
by the mask alone, in the prefill and in each cached decoding step alike. A pattern the export
cannot reproduce (an unknown family with a window, chunked or bidirectional attention) raises
:class:`~edge_sdk.inference.ExportUnsupportedError` before any weight is loaded; the runtime
then runs torch eager and logs why. A mixture-of-experts model is refused the same way (and the
loader refuses it too, so no backend runs it).

LoRA. ``lora_mode="merge"`` folds ``scaling * B @ A`` into the base weights (the graph is the
tuned model). ``lora_mode="gated"`` keeps the adapter unmerged and multiplies its output by a
per-row gate: one graph then serves the tuned model (gate 1), the base model (gate 0) and
both at once as a batch of 2, which is how proxy-tuning runs expert and anti-expert together.

Exporters. ``exporter="dynamo"`` uses ``torch.onnx.export(..., dynamo=True)`` (torch.export +
onnxscript; the faster graph under ONNX Runtime), ``"torchscript"`` the legacy tracer (much
quicker to export), ``"auto"`` tries dynamo and falls back to torchscript with a log line.

Verification (when onnxruntime is importable): ONNX Runtime logits must match the torch
model's (transformers' own masks) on a fixed prompt, once as a single prefill (no past) and
once fed in two halves (the second half with past), within ``max|diff| <= atol + rtol *
max|logits|`` (defaults 1e-4 and 1e-4; fp32 graphs land near 1e-6). A model with a sliding
window is also checked past it (``window + VERIFY_PAST_WINDOW`` tokens, capped at the model's
positions): the full-sequence logits, and greedy decoding with the cache from a prompt shorter
than the window to beyond it (every step's logits, and the tokens, which must be torch's
greedy choice except at a tie within the tolerance). The figures go into ``cotune_onnx.json``
beside ``model.onnx``, with the model's dimensions, attention pattern, config/weights/adapter
hashes and the tokenizer saved in the same directory, so a generator loads the whole directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import (
    BackendUnavailableError,
    ExportError,
    ExportUnsupportedError,
    ExportVerificationError,
)

__all__ = [
    "AttentionSpec",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MODEL_FILE",
    "KVCausalLM",
    "LoraGate",
    "apply_lora",
    "attention_spec",
    "default_export_cache",
    "ensure_exported",
    "export_onnx",
    "fingerprint",
    "input_names",
    "load_kv_model",
    "load_manifest",
    "ort_status",
    "output_names",
]

log = logging.getLogger("cotune.edge.inference")

FORMAT = "cotune-onnx-kv"
#: 2: sliding-window masks (version 1 graphs of windowed families ignore the window)
FORMAT_VERSION = 2
MANIFEST_NAME = "cotune_onnx.json"
MODEL_FILE = "model.onnx"
GATE_INPUT = "lora_gate"
LORA_MODES = ("merge", "gated")
EXPORTERS = ("auto", "dynamo", "torchscript")
VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. In the beginning was the word."
#: tokens verified beyond a sliding window (full-sequence logits and cached greedy steps)
VERIFY_PAST_WINDOW = 16
#: ``config.layer_types`` values the export has masks for
_LAYER_TYPES = ("full_attention", "sliding_attention")


def ort_status() -> tuple[bool, str]:
    """``(importable, reason)`` for onnxruntime."""
    try:
        import onnxruntime
    except Exception as exc:  # ImportError, or a broken native library
        return False, (
            f"onnxruntime cannot be imported ({type(exc).__name__}: {exc}); install "
            "onnxruntime (or onnxruntime-gpu / a Jetson wheel)"
        )
    return True, f"onnxruntime {onnxruntime.__version__}"


def default_export_cache() -> Path:
    """``$COTUNE_ONNX_CACHE`` or ``~/.cache/cotune/onnx``."""
    env = os.environ.get("COTUNE_ONNX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cotune" / "onnx"


def input_names(num_layers: int, gated: bool) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(num_layers):
        names += [f"past_key.{i}", f"past_value.{i}"]
    return names + ([GATE_INPUT] if gated else [])


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present_key.{i}", f"present_value.{i}"]
    return names


# --------------------------------------------------------------------------------------------
# LoRA: merged or gated per batch row


class LoraGate:
    """Holds the current forward's per-row gate for every :class:`_GatedLora` of one model."""

    def __init__(self) -> None:
        self.gate: torch.Tensor | None = None


class _GatedLora(torch.nn.Module):
    """``base(x) + gate[row] * scaling * B(A(x))``; works for Linear and GPT-2's Conv1D alike
    because LoRA's A/B always act on the input activations."""

    def __init__(
        self,
        base: torch.nn.Module,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        holder: LoraGate,
    ):
        super().__init__()
        self.base = base
        self.lora_a = torch.nn.Parameter(a.to(_weight_dtype(base)), requires_grad=False)
        self.lora_b = torch.nn.Parameter(b.to(_weight_dtype(base)), requires_grad=False)
        self.scaling = float(scaling)
        self.holder = holder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.holder.gate
        if gate is None:
            raise RuntimeError("gated LoRA called without a gate; go through KVCausalLM")
        delta = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_a), self.lora_b)
        g = self.scaling * gate.to(delta.dtype)
        if delta.dim() == 2:
            # some architectures (OPT's MLP) flatten batch x seq into one dim: dim 0 is not
            # the batch, so gate each batch row's block of tokens
            rows = delta.reshape(g.shape[0], -1, delta.shape[-1]) * g.reshape(-1, 1, 1)
            return self.base(x) + rows.reshape(delta.shape)
        shape = (-1,) + (1,) * (delta.dim() - 1)
        return self.base(x) + delta * g.reshape(shape)


def _weight_dtype(mod: torch.nn.Module) -> torch.dtype:
    w = getattr(mod, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32


def apply_lora(
    model: torch.nn.Module, adapter_dir: str | Path, mode: str = "merge"
) -> tuple[LoraGate | None, dict[str, Any]]:
    """Apply a peft LoRA adapter directory to a plain (un-wrapped) HF causal LM in place.

    ``mode="merge"``: weights += scaling * B @ A (transposed for Conv1D); returns ``(None,
    info)``. ``mode="gated"``: wraps each target in a gated LoRA module; returns the
    :class:`LoraGate` the caller sets per forward. ``info`` describes the adapter.
    """
    from transformers.pytorch_utils import Conv1D

    from algorithms.core.errors import AdapterStateError
    from algorithms.core.modeling import load_peft_adapter

    if mode not in LORA_MODES:
        raise ExportError(f"unknown lora_mode {mode!r}; choose one of {list(LORA_MODES)}")
    state, spec = load_peft_adapter(adapter_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        for tag in ("lora_A", "lora_B"):
            if f".{tag}." in name:
                pairs.setdefault(name.split(f".{tag}.")[0], {})[tag] = t
    if not pairs:
        raise AdapterStateError(f"{adapter_dir} holds no LoRA A/B tensors")
    holder = LoraGate() if mode == "gated" else None
    with torch.no_grad():
        for mod_name, ab in sorted(pairs.items()):
            if set(ab) != {"lora_A", "lora_B"}:
                raise AdapterStateError(f"{mod_name}: adapter has only {sorted(ab)}")
            try:
                mod = model.get_submodule(mod_name)
            except AttributeError as exc:
                raise AdapterStateError(
                    f"adapter module {mod_name!r} does not exist in this "
                    f"{getattr(model.config, 'model_type', 'model')}; wrong base model?"
                ) from exc
            a, b = ab["lora_A"], ab["lora_B"]
            if holder is None:
                delta = (b @ a) * spec.scaling
                if isinstance(mod, Conv1D):
                    delta = delta.T
                if tuple(delta.shape) != tuple(mod.weight.shape):
                    raise AdapterStateError(
                        f"{mod_name}: adapter delta {tuple(delta.shape)} does not fit weight "
                        f"{tuple(mod.weight.shape)}"
                    )
                mod.weight += delta.to(mod.weight.dtype)
            else:
                parent_name, _, leaf = mod_name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, leaf, _GatedLora(mod, a, b, spec.scaling, holder))
    info = {
        "sha256": _hash_files(Path(adapter_dir), ("adapter_config.json", "*.safetensors")),
        "mode": "merged" if holder is None else "gated",
        "r": spec.r,
        "alpha": spec.alpha,
        "modules": len(pairs),
    }
    return holder, info


# --------------------------------------------------------------------------------------------
# the attention pattern, from the family table


@dataclass(frozen=True)
class AttentionSpec:
    """What the exported masks must express for one model (see :func:`attention_spec`).

    ``window``: the sliding-window width (None: no layer has one). ``sliding``: per layer,
    whether it attends through the window. ``layer_types``: set when the model takes one mask
    per layer type (a dict keyed ``"full_attention"`` / ``"sliding_attention"``) rather than
    one mask. ``attn_softcap`` / ``final_softcap``: the soft-caps (the model applies them;
    an attention soft-cap needs eager attention). ``unsupported``: why the export cannot
    reproduce this model's attention (None when it can).
    """

    model_type: str
    sliding: tuple[bool, ...]
    window: int | None = None
    layer_types: tuple[str, ...] | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    unsupported: str | None = None

    @property
    def attn_implementation(self) -> str | None:
        """The attention implementation this model needs (None: any)."""
        return "eager" if self.attn_softcap is not None else None

    def check_exportable(self) -> None:
        if self.unsupported is not None:
            raise ExportUnsupportedError(
                f"{self.model_type}: {self.unsupported}; ONNX Runtime would give wrong logits, "
                "so the model is not exported (the torch backend runs it)"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "sliding_layers": [i for i, s in enumerate(self.sliding) if s],
            "layer_types": list(self.layer_types) if self.layer_types is not None else None,
            "attn_softcap": self.attn_softcap,
            "final_softcap": self.final_softcap,
        }


def attention_spec(config: Any) -> AttentionSpec:
    """The attention pattern of a transformers config, as its family (in
    ``firmware_profiles.families``) describes it. Never raises: a pattern the export cannot
    reproduce comes back with ``unsupported`` set (see :meth:`AttentionSpec.check_exportable`).
    """
    from firmware_profiles.families import family_of

    mt = str(getattr(config, "model_type", "") or "")
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    plain = (False,) * layers
    fam = family_of(mt)
    raw_types = getattr(config, "layer_types", None)
    types = tuple(str(t) for t in raw_types) if raw_types is not None else None
    if fam is None:
        # not in the table: exported as plainly causal, unless the config shows a pattern
        shown = [
            f"{k}={getattr(config, k)!r}"
            for k in ("sliding_window", "attention_chunk_size")
            if getattr(config, k, None)
        ]
        if types is not None and any(t != "full_attention" for t in types):
            shown.append(f"layer_types {sorted(set(types))}")
        why = None
        if shown:
            why = (
                f"attention pattern ({', '.join(shown)}) of a family that "
                "firmware_profiles.families does not describe"
            )
        return AttentionSpec(mt, plain, unsupported=why)

    def cap(key: str | None) -> float | None:
        v = getattr(config, key, None) if key else None
        return float(v) if v else None

    spec = AttentionSpec(
        mt, plain, attn_softcap=cap(fam.attn_softcap_key), final_softcap=cap(fam.final_softcap_key)
    )
    flags = [f for f in fam.mask_flags if getattr(config, f, None)]
    if flags:
        return replace(spec, unsupported=f"{', '.join(flags)} set (a non-causal mask)")
    window = getattr(config, fam.window_key, None) if fam.window_key else None
    if fam.window_layers == "layer_types":
        if types is None or len(types) != layers:
            return replace(
                spec,
                unsupported=f"config.layer_types {raw_types!r} does not name the {layers} layers",
            )
        odd = sorted(set(types) - set(_LAYER_TYPES))
        if odd:
            return replace(spec, layer_types=types, unsupported=f"layer types {odd}")
        spec = replace(spec, layer_types=types)
        sliding = tuple(t == "sliding_attention" for t in types)
    else:
        sliding = (True,) * layers
    if not window or not any(sliding):
        return spec
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        return replace(spec, unsupported=f"sliding window {window!r} is not a positive integer")
    return replace(spec, window=window, sliding=sliding)


def _check_family(config: Any) -> None:
    """A family no path of cotune takes (``firmware_profiles.families.unsupported_reason``:
    mixture-of-experts models) is refused before the weights are loaded."""
    from firmware_profiles.families import unsupported_reason

    why = unsupported_reason(config)
    if why is not None:
        raise ExportUnsupportedError(f"{why}; the model is not exported")


def _read_config(model_path: str | Path) -> Any | None:
    """The transformers config of a model directory (None when it cannot be read here; the
    model load then reports the problem)."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(model_path))
    except Exception as exc:  # unknown architecture, unreadable json: the loader says why
        log.debug("%s: config not readable before the load (%s)", model_path, exc)
        return None


# --------------------------------------------------------------------------------------------
# the flat-tensor wrapper


class KVCausalLM(torch.nn.Module):
    """A HF causal LM behind flat tensors: ``(input_ids, attention_mask, position_ids,
    *past, [lora_gate]) -> (logits, *present)`` (see the module docstring for shapes).

    ``export_mask=True`` builds the 4-D additive causal+padding mask here (used for export),
    windowed as ``attention`` says (one mask, or one per layer type); ``False`` hands the 2-D
    mask to transformers (its own, slightly faster, eager path; it applies windows itself).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_layers: int,
        gate: LoraGate | None = None,
        export_mask: bool = False,
        attention: AttentionSpec | None = None,
    ):
        super().__init__()
        self.model = model
        self.num_layers = int(num_layers)
        self.gate = gate
        self.export_mask = export_mask
        self.attention = attention

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def forward(self, input_ids, attention_mask, position_ids, *rest):
        from transformers.cache_utils import DynamicCache

        n = 2 * self.num_layers
        past = rest[:n]
        if self.gate is not None:
            if len(rest) != n + 1:
                raise ExportError("a gated model needs a lora_gate input after the past tensors")
            self.gate.gate = rest[n]
        mask = self._mask(input_ids, attention_mask) if self.export_mask else attention_mask
        cache = DynamicCache(
            ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        )
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
        finally:
            if self.gate is not None:
                self.gate.gate = None
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)

    def _mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive [batch, 1, seq, total] mask(s). Positions index the whole cache (past +
        new), as transformers' masks do: query ``i`` sees key ``j`` iff ``j <= i`` (and, on a
        windowed layer, ``j > i - window``) and ``attention_mask[j]`` is set."""
        seq = input_ids.shape[1]
        total = attention_mask.shape[1]
        q_pos = torch.arange(seq, device=input_ids.device) + (total - seq)
        k_pos = torch.arange(total, device=input_ids.device)
        causal = k_pos[None, :] <= q_pos[:, None]
        keep = attention_mask[:, None, None, :] > 0
        dtype = _weight_dtype(self.model.get_input_embeddings())
        zero = torch.zeros((), dtype=dtype, device=input_ids.device)

        def additive(allowed: torch.Tensor) -> torch.Tensor:
            return torch.where(allowed[None, None] & keep, zero, torch.finfo(dtype).min)

        spec = self.attention
        if spec is None or spec.window is None:
            return additive(causal)
        windowed = causal & (k_pos[None, :] > q_pos[:, None] - spec.window)
        if spec.layer_types is None:  # one window on every layer
            return additive(windowed)
        masks = {"full_attention": causal, "sliding_attention": windowed}
        return {t: additive(masks[t]) for t in sorted(set(spec.layer_types))}


@dataclass
class KVModel:
    """A loaded :class:`KVCausalLM` and what the backends need to know about it."""

    module: KVCausalLM
    tokenizer: Any
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    model_type: str
    eos_token_ids: list[int]
    adapter: dict[str, Any] | None
    max_positions: int | None = None
    attention: AttentionSpec | None = None


def load_kv_model(
    model_path: str | Path,
    adapter: str | Path | None = None,
    lora_mode: str = "merge",
    device: str = "cpu",
    export_mask: bool = False,
    attn_implementation: str = "sdpa",
) -> KVModel:
    """Load a local HF model dir (+ optional adapter) as a :class:`KVModel` in fp32 eval mode.

    With ``export_mask=True`` a model whose attention pattern cannot be exported raises
    :class:`ExportUnsupportedError`. An attention soft-cap (the family table says where a
    config has one) overrides ``attn_implementation`` with eager attention.
    """
    from algorithms.core.modeling import load_causal_lm

    model, tokenizer, _ = load_causal_lm(model_path, quant="fp32", device=device)
    spec = attention_spec(model.config)
    if export_mask:
        spec.check_exportable()
    if spec.attn_implementation is not None and attn_implementation != spec.attn_implementation:
        log.info(
            "%s: attention soft-capping (%s) needs %s attention",
            model_path,
            spec.attn_softcap,
            spec.attn_implementation,
        )
        attn_implementation = spec.attn_implementation
    try:
        model.set_attn_implementation(attn_implementation)
    except Exception as exc:  # architectures without sdpa keep their default
        log.info(
            "%s: attention %s unavailable (%s); keeping %s",
            model_path,
            attn_implementation,
            exc,
            model.config._attn_implementation,
        )
    model.eval()
    gate, adapter_info = (None, None)
    if adapter is not None:
        gate, adapter_info = apply_lora(model, adapter, lora_mode)
    layers = int(model.config.num_hidden_layers)
    module = KVCausalLM(model, layers, gate, export_mask=export_mask, attention=spec).eval()
    kv_heads, head_dim = _probe_kv_shape(module, device)
    return KVModel(
        module,
        tokenizer,
        layers,
        kv_heads,
        head_dim,
        int(model.get_output_embeddings().weight.shape[0]),
        str(model.config.model_type),
        _eos_ids(model.config, tokenizer),
        adapter_info,
        _max_positions(model.config),
        spec,
    )


def _max_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _eos_ids(config: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for src in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for i in src if isinstance(src, (list, tuple)) else [src]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def _probe_kv_shape(module: KVCausalLM, device: str) -> tuple[int, int]:
    """(kv heads, head dim) read off a one-token forward (no per-architecture config rules)."""
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    if module.gate is not None:
        module.gate.gate = torch.zeros(1, device=device)
    try:
        with torch.no_grad():
            out = module.model(input_ids=ids, use_cache=True)
    finally:
        if module.gate is not None:
            module.gate.gate = None
    keys = out.past_key_values.layers[0].keys
    return int(keys.shape[1]), int(keys.shape[3])


def _example_args(
    module: KVCausalLM,
    ids: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    kv_shape: tuple[int, int],
    past_len: int,
) -> tuple[torch.Tensor, ...]:
    """Positional arguments for ``module`` with random past tensors of length ``past_len`` and,
    when the module is gated, alternating gates 1, 0, 1, ..."""
    batch = ids.shape[0]
    heads, dim = kv_shape
    g = torch.Generator().manual_seed(0)
    past = [
        torch.randn((batch, heads, past_len, dim), generator=g).to(ids.device)
        for _ in range(2 * module.num_layers)
    ]
    args = [ids, mask, pos, *past]
    if module.gated:
        args.append(torch.tensor([float((i + 1) % 2) for i in range(batch)], device=ids.device))
    return tuple(args)


# --------------------------------------------------------------------------------------------
# fingerprints and the export cache


def _hash_files(root: Path, patterns: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    files = sorted({f for p in patterns for f in root.glob(p) if f.is_file()})
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def fingerprint(model_path: str | Path, adapter: str | Path | None = None) -> dict[str, Any]:
    """Hashes that identify what an export was made from (config, weights, adapter)."""
    p = Path(model_path)
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {p / 'config.json'}: {exc}") from exc
    cfg.pop("transformers_version", None)
    return {
        "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": _hash_files(p, ("*.safetensors", "*.bin")),
        "adapter_sha256": (
            _hash_files(Path(adapter), ("adapter_config.json", "*.safetensors"))
            if adapter is not None
            else None
        ),
        "model_type": str(cfg.get("model_type", "")),
    }


def _cache_key(fp: dict[str, Any], lora_mode: str | None, exporter: str, opset: int | None) -> str:
    import transformers

    blob = {
        "format": FORMAT_VERSION,
        **fp,
        "lora_mode": lora_mode,
        "exporter": exporter,
        "opset": opset,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def load_manifest(export_dir: str | Path) -> dict[str, Any]:
    """Read and check ``cotune_onnx.json`` of an export directory."""
    d = Path(export_dir)
    path = d / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackendUnavailableError(
            f"{d} is not a cotune ONNX export ({MANIFEST_NAME} unreadable: {exc}); create one "
            "with edge_sdk.inference.onnx_export.export_onnx"
        ) from exc
    if manifest.get("format") != FORMAT:
        raise BackendUnavailableError(f"{path} is not a {FORMAT} manifest")
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise BackendUnavailableError(
            f"{path} has format version {manifest.get('version')}, newer than this SDK's "
            f"{FORMAT_VERSION}; upgrade cotune or re-export"
        )
    if int(manifest.get("version", 0)) < 2:
        from firmware_profiles.families import family_of

        fam = family_of(manifest.get("model_type"))
        if fam is not None and fam.window_key is not None:
            raise BackendUnavailableError(
                f"{path}: a version {manifest.get('version')} export of a "
                f"{manifest.get('model_type')} model, whose graph ignores a sliding window "
                "(wrong logits past it); export it again"
            )
    if not (d / manifest.get("model_file", MODEL_FILE)).is_file():
        raise BackendUnavailableError(f"{d} lacks {manifest.get('model_file', MODEL_FILE)}")
    return manifest


def ensure_exported(
    model_path: str | Path,
    cache_dir: str | Path | None = None,
    *,
    adapter: str | Path | None = None,
    lora_mode: str = "merge",
    exporter: str = "auto",
    opset: int | None = None,
) -> Path:
    """The export directory for (model, adapter, mode) under ``cache_dir``, exporting it first
    unless an export with the same fingerprint (and torch/transformers versions) is there."""
    fp = fingerprint(model_path, adapter)
    mode = lora_mode if adapter is not None else None
    key = _cache_key(fp, mode, exporter, opset)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_export_cache()
    out = root / f"{Path(model_path).name}-{key}"
    try:
        if load_manifest(out).get("cache_key") == key:
            return out
    except BackendUnavailableError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=root))
    try:
        export_onnx(
            model_path,
            tmp,
            adapter=adapter,
            lora_mode=lora_mode,
            exporter=exporter,
            opset=opset,
            _cache_key=key,
            _fingerprint=fp,
        )
        if out.exists():  # a stale or incomplete export under our name
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished the same export first
            if load_manifest(out).get("cache_key") != key:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# export


def export_onnx(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    adapter: str | Path | None = None,
    lora_mode: str = "merge",
    exporter: str = "auto",
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    _cache_key: str | None = None,
    _fingerprint: dict | None = None,
) -> dict[str, Any]:
    """Export ``model_path`` (+ ``adapter``) to ``out_dir/model.onnx``; returns the manifest.

    Raises :class:`ExportUnsupportedError` (before loading the weights) when the model's
    attention pattern cannot be exported, :class:`ExportError` when no exporter works and
    :class:`ExportVerificationError` when ONNX Runtime's logits differ from torch's beyond the
    tolerance (see module docs).
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {list(EXPORTERS)}")
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            "ONNX export needs the onnx package (pip install onnx onnxscript onnxruntime)"
        ) from exc
    t0 = time.perf_counter()
    fp = _fingerprint or fingerprint(model_path, adapter)
    config = _read_config(model_path)
    if config is not None:  # refuse before loading the weights
        _check_family(config)
        attention_spec(config).check_exportable()
    kv = load_kv_model(model_path, adapter, lora_mode, export_mask=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / MODEL_FILE
    used, used_opset = _run_exporter(kv, onnx_path, exporter, opset)
    _name_dynamic_axes(onnx_path, kv.num_layers)
    kv.tokenizer.save_pretrained(str(out))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "source": Path(model_path).name,
        "model_type": kv.model_type,
        "num_layers": kv.num_layers,
        "num_attention_heads": int(getattr(kv.module.model.config, "num_attention_heads", 0)),
        "num_kv_heads": kv.kv_heads,
        "head_dim": kv.head_dim,
        "vocab_size": kv.vocab_size,
        "max_positions": kv.max_positions,
        "attention": kv.attention.as_dict() if kv.attention is not None else None,
        "dtype": "float32",
        "eos_token_ids": kv.eos_token_ids,
        "inputs": input_names(kv.num_layers, kv.module.gated),
        "outputs": output_names(kv.num_layers),
        "gate_input": GATE_INPUT if kv.module.gated else None,
        "adapter": kv.adapter,
        "config_sha256": fp["config_sha256"],
        "weights_sha256": fp["weights_sha256"],
        "exporter": used,
        "opset": used_opset,
        "torch": torch.__version__,
        "cache_key": _cache_key,
    }
    if verify:
        manifest["verification"] = _verify(kv, onnx_path, atol, rtol)
    manifest["export_seconds"] = round(time.perf_counter() - t0, 2)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info(
        "exported %s to %s with %s in %.1fs",
        Path(model_path).name,
        out,
        used,
        manifest["export_seconds"],
    )
    return manifest


def _run_exporter(kv: KVModel, path: Path, exporter: str, opset: int | None) -> tuple[str, int]:
    module = kv.module
    n_in = input_names(kv.num_layers, module.gated)
    n_out = output_names(kv.num_layers)
    # example sizes avoid 0 and 1, which torch.export would specialise on
    batch, seq, past = 2, 3, 4
    ids = torch.randint(0, kv.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones((batch, past + seq), dtype=torch.long)
    pos = (torch.arange(seq) + past)[None].expand(batch, seq).contiguous()
    args = _example_args(module, ids, mask, pos, (kv.kv_heads, kv.head_dim), past)
    errors = []
    if exporter in ("auto", "dynamo"):
        try:
            return "dynamo", _export_dynamo(module, args, n_in, n_out, path, opset)
        except Exception as exc:
            errors.append(f"dynamo: {type(exc).__name__}: {str(exc)[:400]}")
            if exporter == "dynamo":
                raise ExportError(f"dynamo ONNX export failed; {errors[-1]}") from exc
            log.warning(
                "dynamo ONNX export failed (%s); falling back to the torchscript exporter",
                errors[-1],
            )
    try:
        return "torchscript", _export_torchscript(module, args, n_in, n_out, path, opset)
    except Exception as exc:
        errors.append(f"torchscript: {type(exc).__name__}: {str(exc)[:400]}")
        raise ExportError("ONNX export failed: " + " | ".join(errors)) from exc


def _export_dynamo(module, args, n_in, n_out, path: Path, opset: int | None) -> int:
    import onnxscript  # noqa: F401  (the dynamo exporter needs it; fail early and clearly)
    from torch.export import Dim

    dyn = Dim.DYNAMIC
    n_past = 2 * module.num_layers
    shapes: list[Any] = [{0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}]
    past_shapes = [{0: dyn, 2: dyn} for _ in range(n_past)]
    shapes.append(tuple(past_shapes + ([{0: dyn}] if module.gated else [])))
    # the exporter logs every optional op library it cannot find (torchvision, ...)
    noisy = [logging.getLogger(n) for n in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in noisy]
    try:
        for lg in noisy:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                input_names=n_in,
                output_names=n_out,
                dynamic_shapes=tuple(shapes),
                dynamo=True,
                opset_version=opset,
                verbose=False,
                optimize=True,
            )
            program.save(str(path))
    finally:
        for lg, level in zip(noisy, levels, strict=True):
            lg.setLevel(level)
    import onnx

    return int(
        next(
            o.version
            for o in onnx.load(str(path), load_external_data=False).opset_import
            if o.domain in ("", "ai.onnx")
        )
    )


def _export_torchscript(module, args, n_in, n_out, path: Path, opset: int | None) -> int:
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    for name in n_in[3:]:
        axes[name] = {0: "batch"} if name == GATE_INPUT else {0: "batch", 2: "past"}
    for name in n_out[1:]:
        axes[name] = {0: "batch", 2: "total"}
    opset = opset or 17
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=n_in,
            output_names=n_out,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return opset


def _name_dynamic_axes(path: Path, num_layers: int) -> None:
    """Give the graph's dynamic io axes readable names (the dynamo exporter writes s0, s1..)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {
        "input_ids": ("batch", "seq"),
        "attention_mask": ("batch", "total"),
        "position_ids": ("batch", "seq"),
        GATE_INPUT: ("batch",),
        "logits": ("batch", "seq", None),
    }
    for i in range(num_layers):
        for kind in ("key", "value"):
            names[f"past_{kind}.{i}"] = ("batch", None, "past", None)
            names[f"present_{kind}.{i}"] = ("batch", None, "total", None)
    changed = False
    for vi in list(model.graph.input) + list(model.graph.output):
        want = names.get(vi.name)
        if want is None:
            continue
        for dim, label in zip(vi.type.tensor_type.shape.dim, want, strict=False):
            if label is not None and dim.HasField("dim_param") and dim.dim_param != label:
                dim.dim_param = label
                changed = True
    if changed:
        onnx.save(model, str(path))


def _verify(kv: KVModel, onnx_path: Path, atol: float, rtol: float) -> dict[str, Any]:
    """ORT vs torch logits, without past (one prefill) and with past (two halves), and for a
    model with a sliding window also past it (see the module docs)."""
    ok, why = ort_status()
    if not ok:
        log.warning("export not verified: %s", why)
        return {"skipped": why}
    import numpy as np
    import onnxruntime as ort

    text_ids = list(kv.tokenizer(VERIFY_TEXT, add_special_tokens=False)["input_ids"])
    if len(text_ids) < 4:  # a degenerate tokenizer: fall back to fixed ids
        text_ids = [i % kv.vocab_size for i in range(3, 19)]
    ids = text_ids[:32]
    rows = 2 if kv.module.gated else 1
    gate = np.array([1.0, 0.0][:rows], dtype=np.float32)
    ref_mod = KVCausalLM(kv.module.model, kv.num_layers, kv.module.gate, export_mask=False)
    full = np.array([ids] * rows, dtype=np.int64)
    empty = [np.zeros((rows, kv.kv_heads, 0, kv.head_dim), np.float32)] * (2 * kv.num_layers)

    def run_torch(x: np.ndarray) -> np.ndarray:
        args = [
            torch.from_numpy(x),
            torch.ones(x.shape, dtype=torch.long),
            torch.arange(x.shape[1])[None].expand(x.shape).contiguous(),
        ]
        args += [torch.from_numpy(e) for e in empty]
        if kv.module.gated:
            args.append(torch.from_numpy(gate))
        with torch.no_grad():
            return ref_mod(*args)[0].numpy()

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    names = input_names(kv.num_layers, kv.module.gated)

    def run_ort(x: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        p = past[0].shape[2]
        feed = {
            "input_ids": x,
            "attention_mask": np.ones((rows, p + x.shape[1]), np.int64),
            "position_ids": np.broadcast_to(np.arange(p, p + x.shape[1]), x.shape).copy(),
        }
        feed.update(zip(names[3 : 3 + len(past)], past, strict=True))
        if kv.module.gated:
            feed[GATE_INPUT] = gate
        return sess.run(None, feed)

    ref = run_torch(full)
    scale = float(np.abs(ref).max())
    tol = atol + rtol * scale
    no_past = float(np.abs(run_ort(full, empty)[0] - ref).max())
    half = len(ids) // 2
    first = run_ort(full[:, :half], empty)
    second = run_ort(full[:, half:], first[1:])
    with_past = float(
        max(np.abs(first[0] - ref[:, :half]).max(), np.abs(second[0] - ref[:, half:]).max())
    )
    result: dict[str, Any] = {
        "prompt_tokens": len(ids),
        "rows": rows,
        "max_abs_diff_no_past": no_past,
        "max_abs_diff_with_past": with_past,
        "logit_scale": scale,
        "atol": atol,
        "rtol": rtol,
        "tolerance": tol,
    }
    if not (no_past <= tol and with_past <= tol):
        raise ExportVerificationError(
            f"ONNX Runtime logits differ from torch: max |diff| {no_past:.3g} without past, "
            f"{with_past:.3g} with past, tolerance {tol:.3g}; try exporter='torchscript' or "
            "report the model architecture"
        )
    window = kv.attention.window if kv.attention is not None else None
    if window is None:
        return result

    # past the window: the full sequence, then greedy decoding with the cache from a prompt
    # shorter than the window to beyond it
    n = window + VERIFY_PAST_WINDOW
    if kv.max_positions is not None:
        n = min(n, kv.max_positions)
    if n <= window:
        result["past_window"] = {
            "window": window,
            "skipped": f"the window is not shorter than the model's {kv.max_positions} positions",
        }
        return result
    seq = np.array([(text_ids * (n // len(text_ids) + 1))[:n]] * rows, dtype=np.int64)
    ref_long = run_torch(seq)
    tol_long = atol + rtol * float(np.abs(ref_long).max())
    long_diff = float(np.abs(run_ort(seq, empty)[0] - ref_long).max())
    prompt = max(1, window // 2, window - VERIFY_PAST_WINDOW // 2)
    out = run_ort(seq[:, :prompt], empty)
    fed, got = seq[:, :prompt], [out[0][:, -1]]
    while fed.shape[1] < n:
        step = got[-1].argmax(-1).astype(np.int64)[:, None]
        out = run_ort(step, out[1:])
        fed = np.concatenate([fed, step], axis=1)
        got.append(out[0][:, -1])
    logits = np.stack(got, axis=1)  # [rows, steps + 1, V]
    want = run_torch(fed)[:, prompt - 1 :]
    greedy_diff = float(np.abs(logits - want).max())
    top2 = np.sort(want, axis=-1)[..., -2:]
    differ = logits.argmax(-1) != want.argmax(-1)
    tie = (top2[..., 1] - top2[..., 0]) <= 2 * tol_long
    wrong = int((differ & ~tie).sum())
    result["past_window"] = {
        "window": window,
        "tokens": n,
        "max_abs_diff": long_diff,
        "greedy_prompt_tokens": prompt,
        "greedy_steps": n - prompt,
        "max_abs_diff_greedy": greedy_diff,
        "greedy_token_mismatches": wrong,
        "greedy_ties": int((differ & tie).sum()),
        "tolerance": tol_long,
    }
    if not (long_diff <= tol_long and greedy_diff <= tol_long and wrong == 0):
        raise ExportVerificationError(
            f"ONNX Runtime logits differ from torch past the sliding window ({window}): max "
            f"|diff| {long_diff:.3g} over {n} tokens, {greedy_diff:.3g} in greedy decoding with "
            f"the cache ({wrong} greedy tokens differ), tolerance {tol_long:.3g}; report the "
            "model architecture"
        )
    return result
