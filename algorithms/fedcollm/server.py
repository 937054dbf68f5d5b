from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from algorithms.base import ConfigError, RoundOutcome, ServerAlgorithm, State
from algorithms.core.aligned_base import AlignedBaseServer
from algorithms.core.distill import mutual_distill
from algorithms.core.kd import check_shared_vocabulary
from algorithms.core.modeling import adapter_state, attach_lora, load_adapter_state
from algorithms.core.state_parts import client_part, delta_norm, join, part, to_numpy, to_torch
from algorithms.fedavg.server import SlmAdapterRounds

from .config import FedCoLLMConfig

LLM = "llm"


class FedCoLLMServer(AlignedBaseServer, SlmAdapterRounds, ServerAlgorithm):
    """Global state: the SLM adapter theta (unprefixed; what clients train), the LLM adapter
    omega under ``llm/`` and, with ``align_base``, the SLM aligned to the LLM before round 1
    under ``base/`` (every client's base, sent once). Round: FedAvg of the clients' theta, then
    ``mutual_distill`` of (LLM + omega) and (SLM + theta) on D_a; the distilled theta goes out
    next round. On the aligned base the SLM that teaches the LLM predicts like the LLM plus
    what the private data taught it, instead of carrying its own pretraining errors."""

    name = "fedcollm"

    def __init__(self, config: Mapping[str, Any], ctx):
        super().__init__(config, ctx)
        self.config = FedCoLLMConfig.from_dict(dict(config))
        self._slm = None
        self._llm = None

    # -- models, loaded once and reused across rounds --------------------------------------
    def slm(self, state: State | None = None):
        if self._slm is None:
            self._require_local()
            plain, _ = self.slm_base(state)
            self._slm = attach_lora(copy.deepcopy(plain), self.config.lora_spec(), seed=self.config.lora_seed)
        return self._slm

    def _require_local(self):
        backend = self.ctx.llm()
        if getattr(backend, "kind", None) != "local":
            raise ConfigError("FedCoLLM trains the LLM's LoRA, so it needs llm.backend 'local' "
                              "(a black-box LLM cannot be co-tuned; use fedpt)")
        return backend

    def llm(self, state: State | None = None):
        if self._llm is None:
            backend = self._require_local()
            self.slm(state)
            check_shared_vocabulary(backend.tokenizer(), self._plain_tok, "FedCoLLM's SLM and LLM")
            self._llm = backend.trainable(self.config.llm_lora_spec(), seed=self.config.lora_seed)
        return self._llm

    # -- the contract -----------------------------------------------------------------------
    def initial_state(self) -> State:
        return join(to_numpy(adapter_state(self.slm())), **{LLM: to_numpy(adapter_state(self.llm()))},
                    **self.base_part())

    def finish_round(self, round: int, state: State, aggregate: State) -> RoundOutcome:
        slm, llm = self.slm(state), self.llm(state)
        public = self.public_for_distillation()
        theta_avg = {k: v for k, v in aggregate.items()}
        load_adapter_state(slm, to_torch(theta_avg))
        load_adapter_state(llm, to_torch(part(state, LLM)))
        cfg = self.config.distill_config()
        cfg.seed = cfg.seed + round
        metrics = mutual_distill(llm, slm, public, cfg, tokenizer=self._plain_tok, progress=self.ctx.log,
                                 label=f"round {round} co-distillation", llm_teacher=self.config.llm_teacher,
                                 alpha=self.config.proxy_alpha)
        theta, omega = to_numpy(adapter_state(slm)), to_numpy(adapter_state(llm))
        metrics.update({"slm_delta_norm": delta_norm(theta, client_part(state)),
                        "distill_slm_shift": delta_norm(theta, theta_avg),
                        "llm_delta_norm": delta_norm(omega, part(state, LLM))})
        if round == 1:
            metrics.update(self.align_metrics)
        return RoundOutcome(join(theta, **{LLM: omega}, **self.base_part(state)), metrics)


    # -- for evaluation and export ----------------------------------------------------------
    def llm_with(self, state: State):
        """The LLM carrying the state's LoRA omega (e.g. to evaluate or export it)."""
        llm = self.llm(state)
        load_adapter_state(llm, to_torch(part(state, LLM)))
        return llm

    def slm_with(self, state: State):
        slm = self.slm(state)
        load_adapter_state(slm, to_torch(client_part(state)))
        return slm
