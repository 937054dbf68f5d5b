"""Merged-LoRA arithmetic for FedBiOT: carrying an adapter by weight merging, and the client's
proximal term on the merged adapter.

:func:`lora_merged` puts an adapter state (canonical LoRA names, see
:func:`~algorithms.core.modeling.adapter_state`) into a plain model by adding each merged
delta ``B @ A * alpha / r`` to its base weight, and restores the exact original weights on
exit. The server uses it for the full LLM and for its emulator: it changes no module (no peft
wrapper), so the full model can still be cut into an emulator, and a restarted aggregator sees
bit-identical weights.

:class:`MergedProximal` is the client's ``mu * ||merge(adapter) - merge(adapter_round_start)||^2``
(ALGORITHMS.md section 4), summed over the LoRA modules. The squared Frobenius norm of a
difference of two rank-r products is computed without forming the (out x in) matrices:
with ``C = [B, -B0]`` (out x 2r) and ``D = [A; A0]`` (2r x in), ``B A - B0 A0 = C D`` and
``||C D||_F^2 = sum((C^T C) * (D D^T))`` (both 2r x 2r), which is exact, costs
``O(r^2 (in + out))`` and keeps no large activation for backward.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from algorithms.base import AlgorithmError


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> ``(A, B)`` of a canonical LoRA state."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for tag in ("lora_A", "lora_B"):
            sep = f".{tag}."
            if sep in key:
                found.setdefault(key.split(sep)[0], {})[tag] = value
                break
        else:
            raise AlgorithmError(f"{key!r} is not a LoRA A/B tensor")
    incomplete = sorted(m for m, ab in found.items() if len(ab) != 2)
    if incomplete:
        raise AlgorithmError(f"LoRA modules without both A and B: {incomplete[:4]}")
    return {m: (ab["lora_A"], ab["lora_B"]) for m, ab in sorted(found.items())}


def _is_conv1d(module: torch.nn.Module) -> bool:  # GPT-2's Conv1D stores its weight as (in, out)
    return not isinstance(module, torch.nn.Linear) and type(module).__name__ == "Conv1D"


@contextmanager
def lora_merged(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], scaling: float
) -> Iterator[torch.nn.Module]:
    """``model`` with every LoRA delta of ``state`` added to its base weight, for the block."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, (a, b) in lora_pairs(state).items():
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise AlgorithmError(
                        f"the model has no module {name!r} for the adapter"
                    ) from None
                w = module.weight
                delta = (b.float() @ a.float()) * scaling  # (out, in)
                if _is_conv1d(module):
                    delta = delta.T
                if tuple(delta.shape) != tuple(w.shape):
                    raise AlgorithmError(
                        f"adapter delta for {name!r} has shape {tuple(delta.shape)}, "
                        f"the weight {tuple(w.shape)}"
                    )
                saved.append((w, w.detach().clone()))
                w.add_(delta.to(device=w.device, dtype=w.dtype))
        yield model
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)


def _lora_modules(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``(A weight, B weight, scaling)`` of every peft LoRA module's active adapter."""
    out = []
    for module in model.modules():
        la, lb = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(la, torch.nn.ModuleDict) or not isinstance(lb, torch.nn.ModuleDict):
            continue
        active = getattr(module, "active_adapters", None) or list(la.keys())
        for name in active:
            if name in la and name in lb:
                out.append((la[name].weight, lb[name].weight, float(module.scaling[name])))
    return out


def merged_sq_distance(
    a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor
) -> torch.Tensor:
    """``||B A - B0 A0||_F^2`` through 2r x 2r Gram matrices (see the module docstring)."""
    c = torch.cat([b.float(), -b0.to(device=b.device, dtype=torch.float32)], dim=1)
    d = torch.cat([a.float(), a0.to(device=a.device, dtype=torch.float32)], dim=0)
    return ((c.T @ c) * (d @ d.T)).sum()


class MergedProximal:
    """``extra_loss`` for :func:`~algorithms.core.training.train_causal_lm`: ``mu`` times the
    squared distance of the merged adapter from its value when this object was made (the
    round's start). ``train_causal_lm`` divides it over the micro-batches of a step, so each
    optimizer step adds the term once."""

    def __init__(self, model: torch.nn.Module, mu: float):
        self.mu = float(mu)
        self.modules = _lora_modules(model)
        if not self.modules:
            raise AlgorithmError("the model has no LoRA module; attach the adapter first")
        self.reference = [
            (a.detach().float().clone(), b.detach().float().clone()) for a, b, _ in self.modules
        ]

    def distance(self) -> torch.Tensor:
        total = None
        for (a, b, s), (a0, b0) in zip(self.modules, self.reference, strict=True):
            term = merged_sq_distance(a, b, a0, b0) * (s * s)
            total = term if total is None else total + term
        return total

    def __call__(self, model, batch, outputs) -> torch.Tensor:
        return self.mu * self.distance()
