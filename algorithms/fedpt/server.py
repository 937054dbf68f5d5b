from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from algorithms.base import RoundOutcome, ServerAlgorithm, State, pack_state
from algorithms.core.aligned_base import AlignedBaseServer, batch_teacher
from algorithms.core.distill import distill
from algorithms.core.kd import check_shared_vocabulary
from algorithms.core.modeling import adapter_state, attach_lora, load_adapter_state
from algorithms.core.state_parts import delta_norm, join, part, to_numpy, to_torch
from algorithms.fedavg.server import SlmAdapterRounds, wire_cast

from .config import FedPTConfig
from .proxy import LLMRowCache, ProxyTeacher

EXPERT = "expert"


class FedPTServer(AlignedBaseServer, SlmAdapterRounds, ServerAlgorithm):
    """Global state: the small model's adapter (unprefixed; what clients train next round),
    under ``expert/`` the last round's aggregate (the expert of proxy-tuned inference) and,
    with ``align_base``, under ``base/`` the SLM aligned to the LLM before round 1.

    Round: FedAvg of the clients' adapters -> expert; student := expert; distil the proxy-tuned
    LLM (LLM + alpha * (expert - anti-expert)) into the student on D_a -> next round's adapter.
    The anti-expert is the SLM base: the aligned one with ``align_base`` (sent to the clients
    once as the ``base`` blob), else the device's own."""

    name = "fedpt"

    def __init__(self, config: Mapping[str, Any], ctx):
        super().__init__(config, ctx)
        self.config = FedPTConfig.from_dict(dict(config))
        self._student = None
        self._expert = None
        self._rows = None
        self._teacher = None

    def llm_rows(self) -> LLMRowCache:
        """The LLM's log-probabilities, memoised per public row for a black box (the alignment
        and every round's distillation ask for the same rows)."""
        if self._rows is None:
            self._rows = LLMRowCache(self.ctx.llm())
        return self._rows

    def align_teacher(self):
        return batch_teacher(self.llm_rows())

    def _models(self, state: State | None = None):
        if self._student is None:
            plain, _ = self.slm_base(state)
            spec = self.config.lora_spec()
            self._student = attach_lora(copy.deepcopy(plain), spec, seed=self.config.lora_seed)
            self._expert = attach_lora(copy.deepcopy(plain), spec, seed=self.config.lora_seed)
            for p in self._expert.parameters():
                p.requires_grad_(False)
        return self._student, self._expert

    def teacher(self) -> ProxyTeacher:
        if self._teacher is None:
            _, expert = self._models()
            check_shared_vocabulary(self.ctx.llm().tokenizer(), self._plain_tok, "FedPT's SLM and LLM (proxy-tuning)")
            self._teacher = ProxyTeacher(self.llm_rows(), expert, self.config.alpha)
        return self._teacher

    def initial_state(self) -> State:
        student, _ = self._models()
        theta = to_numpy(adapter_state(student))
        return join(theta, **{EXPERT: theta}, **self.base_part())

    def finish_round(self, round: int, state: State, aggregate: State) -> RoundOutcome:
        expert_state = {k: v for k, v in aggregate.items()}
        metrics: dict = {"expert_delta_norm": delta_norm(expert_state, part(state, EXPERT))}
        if round == 1:
            metrics.update(self.align_metrics)
        keep = self.base_part(state)
        if self.config.distill_rounds == "none":
            return RoundOutcome(join(expert_state, **{EXPERT: expert_state}, **keep), metrics)
        student, expert = self._models(state)
        public = self.public_for_distillation()
        teacher = self.teacher()
        load_adapter_state(expert, to_torch(expert_state))
        load_adapter_state(student, to_torch(expert_state))
        cfg = self.config.distill_config()
        cfg.seed = cfg.seed + round
        metrics.update(distill(student, public, teacher, cfg, tokenizer=self._plain_tok, progress=self.ctx.log,
                               label=f"round {round} proxy distillation"))
        theta = to_numpy(adapter_state(student))
        metrics["distill_shift"] = delta_norm(theta, expert_state)
        metrics["llm_cache_misses"] = teacher.llm.misses
        return RoundOutcome(join(theta, **{EXPERT: expert_state}, **keep), metrics)

    def final_blobs(self, state: State) -> dict[str, bytes]:
        blobs = super().final_blobs(state)
        blobs["expert"] = pack_state(wire_cast(part(state, EXPERT), self.config.wire_dtype))
        return blobs

    def expert_with(self, state: State):
        _, expert = self._models(state)
        load_adapter_state(expert, to_torch(part(state, EXPERT)))
        return expert
