from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from algorithms.base import ConfigError, RoundOutcome, RoundPlan, ServerAlgorithm, State, pack_state
from algorithms.core.checkpoint_blob import pack_checkpoint
from algorithms.core.distill import distill
from algorithms.core.kd import check_shared_vocabulary
from algorithms.core.modeling import adapter_state, attach_lora, load_adapter_state, load_causal_lm
from algorithms.core.state_parts import delta_norm, join, part, to_numpy, to_torch
from algorithms.fedavg.server import SlmAdapterRounds, wire_cast

from .config import FedPTConfig
from .proxy import ProxyTeacher, LLMRowCache

EXPERT = "expert"
BASE = "base"  # the aligned SLM's full weights (align_base), kept in the state so a restart has them
BASE_FORMAT = "cotune.slm-base"
BASE_VERSION = 1


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a plain model once (tied weights under their first name)."""
    return {k: p.detach() for k, p in model.named_parameters()}


class FedPTServer(SlmAdapterRounds, ServerAlgorithm):
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
        self._plain = None  # the base SLM without adapters (aligned or not)
        self._student = None
        self._expert = None
        self._tok = None
        self._rows = None
        self._teacher = None
        self._base_blob = None
        self.align_metrics: dict = {}

    def llm_rows(self) -> LLMRowCache:
        if self._rows is None:
            backend = self.ctx.llm()
            self._rows = LLMRowCache(backend)
        return self._rows

    def _public(self) -> list:
        public = self.ctx.public_data()
        if not public:
            raise ConfigError("FedPT distils the (proxy-tuned) LLM on the public set D_a, and the aggregator "
                              "has none (set public_data, or distill_rounds 'none' and align_base null)")
        if self.config.public_max_samples:
            public = public[: self.config.public_max_samples]
        return public

    def _models(self, state: State | None = None):
        if self._student is None:
            plain, self._tok, _ = load_causal_lm(self.ctx.model_path("slm"), quant="fp32")
            if self.config.align_base is not None:
                saved = part(state, BASE) if state is not None else {}
                if saved:
                    self._load_base(plain, saved)
                elif state is not None:
                    raise ConfigError("FedPT is configured with align_base but the global state has no aligned "
                                      "base (it was started without it); set align_base to null to go on")
                else:
                    self._align(plain)
            for p in plain.parameters():
                p.requires_grad_(False)
            plain.eval()
            spec = self.config.lora_spec()
            self._plain = plain
            self._student = attach_lora(copy.deepcopy(plain), spec, seed=self.config.lora_seed)
            self._expert = attach_lora(copy.deepcopy(plain), spec, seed=self.config.lora_seed)
            for p in self._expert.parameters():
                p.requires_grad_(False)
        return self._student, self._expert

    @staticmethod
    def _load_base(model: torch.nn.Module, saved: Mapping[str, np.ndarray]) -> None:
        params = base_weights(model)
        if set(params) != set(saved):
            raise ConfigError(f"the state's aligned base does not fit the SLM at {type(model).__name__}: "
                              f"{len(saved)} tensors, the model has {len(params)}")
        with torch.no_grad():
            for k, p in params.items():
                src = torch.from_numpy(np.ascontiguousarray(saved[k]))
                if tuple(src.shape) != tuple(p.shape):
                    raise ConfigError(f"base/{k} has shape {tuple(src.shape)}, the SLM's is {tuple(p.shape)}")
                p.copy_(src.to(p.dtype))

    def _align(self, plain: torch.nn.Module) -> None:
        """Distil the base LLM into every weight of ``plain`` on D_a (pure KD by default)."""
        check_shared_vocabulary(self.ctx.llm().tokenizer(), self._tok, "FedPT's SLM and LLM (proxy-tuning)")
        rows = self.llm_rows()
        for p in plain.parameters():
            p.requires_grad_(True)
        cfg = self.config.align_config()
        metrics = distill(plain, self._public(), lambda batch: rows(batch["input_ids"], batch["attention_mask"]),
                          cfg, tokenizer=self._tok, progress=self.ctx.log, label="aligning the SLM base to the LLM")
        self.align_metrics = {f"align_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.ctx.log(f"FedPT: SLM base aligned to the LLM on {len(self._public())} public samples "
                     f"(KD {metrics.get('kd_first', float('nan')):.4f} -> {metrics.get('kd_last', float('nan')):.4f})")

    def teacher(self) -> ProxyTeacher:
        if self._teacher is None:
            _, expert = self._models()
            backend = self.ctx.llm()
            check_shared_vocabulary(backend.tokenizer(), self._tok, "FedPT's SLM and LLM (proxy-tuning)")
            self._teacher = ProxyTeacher(self.llm_rows(), expert, self.config.alpha)
        return self._teacher

    def initial_state(self) -> State:
        student, _ = self._models()
        theta = to_numpy(adapter_state(student))
        if self.config.align_base is None:
            return join(theta, **{EXPERT: theta})
        return join(theta, **{EXPERT: theta, BASE: to_numpy(base_weights(self._plain))})

    def plan_round(self, round: int, state: State) -> RoundPlan:
        plan = super().plan_round(round, state)
        if self.config.align_base is not None:
            plan.blobs[BASE] = self.base_blob(state)
        return plan

    def base_blob(self, state: State) -> bytes:
        """The aligned SLM as one deterministic checkpoint blob (the same bytes every round, so
        the aggregator pushes it once and a device caches it)."""
        if self._base_blob is None:
            self._models(state)
            self._base_blob = pack_checkpoint(self._plain, self._tok, fmt=BASE_FORMAT, version=BASE_VERSION)
        return self._base_blob

    def finish_round(self, round: int, state: State, aggregate: State) -> RoundOutcome:
        expert_state = {k: v for k, v in aggregate.items()}
        metrics: dict = {"expert_delta_norm": delta_norm(expert_state, part(state, EXPERT))}
        if round == 1 and self.align_metrics:
            metrics.update(self.align_metrics)
        keep = {BASE: part(state, BASE)} if self.config.align_base is not None else {}
        if self.config.distill_rounds == "none":
            return RoundOutcome(join(expert_state, **{EXPERT: expert_state}, **keep), metrics)
        public = self._public()
        student, expert = self._models(state)
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
        return RoundOutcome(join(theta, **{EXPERT: expert_state}, **keep), metrics)

    def final_blobs(self, state: State) -> dict[str, bytes]:
        blobs = {"global": self._global_blob(state),
                 "expert": pack_state(wire_cast(part(state, EXPERT), self.config.wire_dtype))}
        if self.config.align_base is not None:
            blobs[BASE] = self.base_blob(state)
        return blobs

    def expert_with(self, state: State):
        _, expert = self._models(state)
        load_adapter_state(expert, to_torch(part(state, EXPERT)))
        return expert
