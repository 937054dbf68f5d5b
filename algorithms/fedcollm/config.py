from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from algorithms.base import ConfigError
from algorithms.core.distill import DistillConfig
from algorithms.core.errors import TrainingError
from algorithms.core.modeling import LoraSpec
from algorithms.fedavg.config import FedAvgConfig


def _default_distill() -> dict:
    return {"epochs": 1, "batch_size": 8, "block_size": 64, "lr": 2e-3, "lr_llm": 2e-3, "lambda_kd": 1.0,
            "task_weight": 1.0, "max_steps": 60, "warmup": 5}


@dataclass
class FedCoLLMConfig(FedAvgConfig):
    """FedCoLLM: the client fields are FedAvg's (clients run FedAvg-LoRA on the SLM); the server
    adds the LLM's LoRA shape and the mutual-distillation step on the public set D_a.

    ``distill``: :class:`DistillConfig` as a dict (``lambda_kd`` is the paper's lambda, default
    1.0; ``lr`` the SLM's, ``lr_llm`` the LLM's learning rate). ``public_max_samples`` caps D_a
    per round (None: all of it)."""

    llm_lora: dict = field(default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.0})
    distill: dict = field(default_factory=_default_distill)
    public_max_samples: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.distill, dict):
            raise ConfigError(f"distill must be a dict of DistillConfig fields, got {self.distill!r}")
        self.distill = {**_default_distill(), **self.distill}  # a partial dict overrides the defaults
        try:
            self.llm_lora_spec()
            self.distill_config()
        except (TrainingError, TypeError, ValueError) as exc:
            raise ConfigError(f"{type(self).__name__}: {exc}") from exc
        if self.public_max_samples is not None and self.public_max_samples < 1:
            raise ConfigError("public_max_samples must be None or >= 1")

    def llm_lora_spec(self) -> LoraSpec:
        return LoraSpec.from_dict(self.llm_lora)

    def distill_config(self) -> DistillConfig:
        return DistillConfig.from_dict(self.distill)

    def client_dict(self) -> dict:
        """What travels to clients in ``Task.config``: only FedAvg's fields."""
        names = {f.name for f in fields(FedAvgConfig)}
        return {k: v for k, v in asdict(self).items() if k in names}
