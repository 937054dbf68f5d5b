from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from algorithms.base import ConfigError, RoundOutcome, ServerAlgorithm, State, pack_state
from algorithms.core.distill import distill
from algorithms.core.kd import check_shared_vocabulary
from algorithms.core.modeling import adapter_state, attach_lora, load_adapter_state, load_causal_lm
from algorithms.core.state_parts import delta_norm, join, part, to_numpy, to_torch
from algorithms.fedavg.server import SlmAdapterRounds, wire_cast

from .config import FedPTConfig
from .proxy import ProxyTeacher

EXPERT = "expert"


class FedPTServer(SlmAdapterRounds, ServerAlgorithm):
    """Global state: the small model's adapter (unprefixed; what clients train next round) and,
    under ``expert/``, the last round's aggregate: the expert of proxy-tuned inference.

    Round: FedAvg of the clients' adapters -> expert; student := expert; distil the proxy-tuned
    LLM (LLM + alpha * (expert - base SLM)) into the student on D_a -> next round's adapter."""

    name = "fedpt"

    def __init__(self, config: Mapping[str, Any], ctx):
        super().__init__(config, ctx)
        self.config = FedPTConfig.from_dict(dict(config))
        self._student = None
        self._expert = None
        self._tok = None
        self._teacher = None

    def _models(self):
        if self._student is None:
            base, self._tok, _ = load_causal_lm(self.ctx.model_path("slm"), quant="fp32")
            spec = self.config.lora_spec()
            expert_base = copy.deepcopy(base)
            self._student = attach_lora(base, spec, seed=self.config.lora_seed)
            self._expert = attach_lora(expert_base, spec, seed=self.config.lora_seed)
            for p in self._expert.parameters():
                p.requires_grad_(False)
        return self._student, self._expert

    def teacher(self) -> ProxyTeacher:
        if self._teacher is None:
            _, expert = self._models()
            backend = self.ctx.llm()
            check_shared_vocabulary(backend.tokenizer(), self._tok, "FedPT's SLM and LLM (proxy-tuning)")
            self._teacher = ProxyTeacher(backend, expert, self.config.alpha)
        return self._teacher

    def initial_state(self) -> State:
        student, _ = self._models()
        theta = to_numpy(adapter_state(student))
        return join(theta, **{EXPERT: theta})

    def finish_round(self, round: int, state: State, aggregate: State) -> RoundOutcome:
        expert_state = {k: v for k, v in aggregate.items()}
        metrics: dict = {"expert_delta_norm": delta_norm(expert_state, part(state, EXPERT))}
        if self.config.distill_rounds == "none":
            return RoundOutcome(join(expert_state, **{EXPERT: expert_state}), metrics)
        public = self.ctx.public_data()
        if not public:
            raise ConfigError("FedPT distils the proxy-tuned LLM on the public set D_a, and the aggregator "
                              "has none (set public_data, or distill_rounds 'none')")
        if self.config.public_max_samples:
            public = public[: self.config.public_max_samples]
        student, expert = self._models()
        teacher = self.teacher()
        load_adapter_state(expert, to_torch(expert_state))
        load_adapter_state(student, to_torch(expert_state))
        cfg = self.config.distill_config()
        cfg.seed = cfg.seed + round
        metrics.update(distill(student, public, teacher, cfg, tokenizer=self._tok, progress=self.ctx.log,
                               label=f"round {round} proxy distillation"))
        theta = to_numpy(adapter_state(student))
        metrics["distill_shift"] = delta_norm(theta, expert_state)
        metrics["llm_cache_misses"] = teacher.llm.misses
        return RoundOutcome(join(theta, **{EXPERT: expert_state}), metrics)

    def final_blobs(self, state: State) -> dict[str, bytes]:
        return {"global": self._global_blob(state),
                "expert": pack_state(wire_cast(part(state, EXPERT), self.config.wire_dtype))}

    def expert_with(self, state: State):
        _, expert = self._models()
        load_adapter_state(expert, to_torch(part(state, EXPERT)))
        return expert
