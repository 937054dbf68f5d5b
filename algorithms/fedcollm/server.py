from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from algorithms.base import ConfigError, RoundOutcome, ServerAlgorithm, State
from algorithms.core.distill import mutual_distill
from algorithms.core.kd import check_shared_vocabulary
from algorithms.core.modeling import adapter_state, attach_lora, load_adapter_state, load_causal_lm
from algorithms.core.state_parts import client_part, delta_norm, join, part, to_numpy, to_torch
from algorithms.fedavg.server import SlmAdapterRounds

from .config import FedCoLLMConfig

LLM = "llm"


class FedCoLLMServer(SlmAdapterRounds, ServerAlgorithm):
    """Global state: the SLM adapter theta (unprefixed; what clients train) and the LLM adapter
    omega under ``llm/``. Round: FedAvg of the clients' theta, then ``mutual_distill`` of
    (LLM + omega) and (SLM + theta) on D_a; the distilled theta goes out next round."""

    name = "fedcollm"

    def __init__(self, config: Mapping[str, Any], ctx):
        super().__init__(config, ctx)
        self.config = FedCoLLMConfig.from_dict(dict(config))
        self._slm = None
        self._slm_tok = None
        self._llm = None

    # -- models, loaded once and reused across rounds --------------------------------------
    def slm(self):
        if self._slm is None:
            model, self._slm_tok, _ = load_causal_lm(self.ctx.model_path("slm"), quant="fp32")
            self._slm = attach_lora(model, self.config.lora_spec(), seed=self.config.lora_seed)
        return self._slm

    def llm(self):
        if self._llm is None:
            backend = self.ctx.llm()
            if getattr(backend, "kind", None) != "local":
                raise ConfigError("FedCoLLM trains the LLM's LoRA, so it needs llm.backend 'local' "
                                  "(a black-box LLM cannot be co-tuned; use fedpt)")
            self.slm()
            check_shared_vocabulary(backend.tokenizer(), self._slm_tok, "FedCoLLM's SLM and LLM")
            self._llm = backend.trainable(self.config.llm_lora_spec(), seed=self.config.lora_seed)
        return self._llm

    # -- the contract -----------------------------------------------------------------------
    def initial_state(self) -> State:
        return join(to_numpy(adapter_state(self.slm())), **{LLM: to_numpy(adapter_state(self.llm()))})

    def finish_round(self, round: int, state: State, aggregate: State) -> RoundOutcome:
        public = self.ctx.public_data()
        if not public:
            raise ConfigError("FedCoLLM distils on the public set D_a, and the aggregator has none "
                              "(set public_data in the aggregator config)")
        if self.config.public_max_samples:
            public = public[: self.config.public_max_samples]
        slm, llm = self.slm(), self.llm()
        theta_avg = {k: v for k, v in aggregate.items()}
        load_adapter_state(slm, to_torch(theta_avg))
        load_adapter_state(llm, to_torch(part(state, LLM)))
        cfg = self.config.distill_config()
        cfg.seed = cfg.seed + round
        metrics = mutual_distill(llm, slm, public, cfg, tokenizer=self._slm_tok, progress=self.ctx.log,
                                 label=f"round {round} co-distillation", llm_teacher=self.config.llm_teacher,
                                 alpha=self.config.proxy_alpha)
        theta, omega = to_numpy(adapter_state(slm)), to_numpy(adapter_state(llm))
        metrics.update({"slm_delta_norm": delta_norm(theta, client_part(state)),
                        "distill_slm_shift": delta_norm(theta, theta_avg),
                        "llm_delta_norm": delta_norm(omega, part(state, LLM))})
        return RoundOutcome(join(theta, **{LLM: omega}), metrics)


    # -- for evaluation and export ----------------------------------------------------------
    def llm_with(self, state: State):
        """The LLM carrying the state's LoRA omega (e.g. to evaluate or export it)."""
        llm = self.llm()
        load_adapter_state(llm, to_torch(part(state, LLM)))
        return llm

    def slm_with(self, state: State):
        slm = self.slm()
        load_adapter_state(slm, to_torch(client_part(state)))
        return slm
