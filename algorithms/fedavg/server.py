from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from algorithms.base import RoundOutcome, RoundPlan, ServerAlgorithm, State, pack_state
from algorithms.core.lora_state import to_wire
from algorithms.core.modeling import adapter_state, attach_lora, load_causal_lm
from algorithms.core.state_parts import client_part

from .config import FedAvgConfig


def wire_cast(state: State, wire_dtype: str) -> State:
    """A float32 numpy state in the wire dtype (what clients receive and must send back)."""
    import torch

    return to_wire({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()},
                   wire_dtype)


class SlmAdapterRounds:
    """Round plumbing of every algorithm whose clients run FedAvg-LoRA on the SLM: the
    unprefixed part of the global state is the adapter that is broadcast, validated and
    averaged (extra server-side parts live under prefixes, see ``state_parts``)."""

    def client_config(self) -> dict:
        return self.config.client_dict()

    def plan_round(self, round: int, state: State) -> RoundPlan:
        return RoundPlan(config=self.client_config(), blobs={"global": self._global_blob(state)})

    def update_spec_state(self, state: State) -> State:
        return wire_cast(client_part(state), self.config.wire_dtype)

    def final_blobs(self, state: State) -> dict[str, bytes]:
        return {"global": self._global_blob(state)}

    def _global_blob(self, state: State) -> bytes:
        return pack_state(wire_cast(client_part(state), self.config.wire_dtype))


class FedAvgServer(SlmAdapterRounds, ServerAlgorithm):
    """Global state: the LoRA adapter of the SLM, float32. Broadcast and collected in
    ``wire_dtype``; averaged in float64 by the runtime's streaming aggregator."""

    name = "fedavg"

    def __init__(self, config: Mapping[str, Any], ctx):
        super().__init__(config, ctx)
        self.config = FedAvgConfig.from_dict(dict(config))

    def initial_state(self) -> State:
        model, _, _ = load_causal_lm(self.ctx.model_path("slm"), quant="fp32")
        peft_model = attach_lora(model, self.config.lora_spec(), seed=self.config.lora_seed)
        return {k: v.numpy().astype(np.float32) for k, v in adapter_state(peft_model).items()}

    def finish_round(self, round: int, state: State, aggregate: State) -> RoundOutcome:
        new = {k: np.asarray(v, dtype=np.float32) for k, v in aggregate.items()}
        delta = float(np.sqrt(sum(float(np.sum((new[k] - state[k]).astype(np.float64) ** 2)) for k in new)))
        return RoundOutcome(new, {"global_delta_norm": delta})
