from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from algorithms.base import ConfigError
from algorithms.core.errors import TrainingError
from algorithms.core.modeling import LoraSpec
from algorithms.fedavg.config import DistillingConfig


@dataclass
class FedCoLLMConfig(DistillingConfig):
    """FedCoLLM: the client fields are FedAvg's (clients run FedAvg-LoRA on the SLM); the server
    adds the LLM's LoRA shape and the mutual-distillation step on the public set D_a.

    ``distill``: :class:`DistillConfig` as a dict (``lambda_kd`` is the paper's lambda, default
    1.0; ``lr`` the SLM's, ``lr_llm`` the LLM's learning rate)."""

    DISTILL_DEFAULTS: ClassVar[dict] = {"epochs": 1, "batch_size": 8, "block_size": 64, "lr": 1e-3,
                                        "lr_llm": 3e-3, "lambda_kd": 1.0, "task_weight": 1.0, "max_steps": 60,
                                        "warmup": 5}
    llm_lora: dict = field(default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.0})
    #: what the LLM distils from: "slm" (the paper) or "proxy", the proxy-tuned LLM
    #: ``z_LLM + proxy_alpha * (z_SLM - z_SLM_base)``: the SLM's adaptation without its errors
    llm_teacher: str = "slm"
    proxy_alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.llm_teacher not in ("slm", "proxy"):
            raise ConfigError(f"llm_teacher must be 'slm' or 'proxy', got {self.llm_teacher!r}")
        try:
            self.llm_lora_spec()
        except (TrainingError, TypeError, ValueError) as exc:
            raise ConfigError(f"FedCoLLMConfig: {exc}") from exc

    def llm_lora_spec(self) -> LoraSpec:
        return LoraSpec.from_dict(self.llm_lora)
