from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from algorithms.base import ConfigError
from algorithms.core.distill import DistillConfig
from algorithms.core.errors import TrainingError
from algorithms.fedavg.config import FedAvgConfig


def _default_distill() -> dict:
    return {"epochs": 1, "batch_size": 8, "block_size": 64, "lr": 2e-3, "lambda_kd": 1.0,
            "task_weight": 1.0, "max_steps": 60, "warmup": 5}


@dataclass
class FedPTConfig(FedAvgConfig):
    """FedPT: the client fields are FedAvg's; the server forms the proxy-tuned LLM
    ``z = z_LLM + alpha * (z_SLM_tuned - z_SLM_base)`` and distils it into the aggregated SLM on
    D_a (``distill``: KD plus the task CE on D_a by default; ``task_weight`` 0 is pure KD).
    ``distill_rounds``: "all" or "none" (plain FedAvg of the small model; the proxy is then used
    only at inference). ``public_max_samples`` caps D_a per round."""

    alpha: float = 1.0
    distill: dict = field(default_factory=_default_distill)
    distill_rounds: str = "all"
    public_max_samples: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.distill, dict):
            raise ConfigError(f"distill must be a dict of DistillConfig fields, got {self.distill!r}")
        self.distill = {**_default_distill(), **self.distill}  # a partial dict overrides the defaults
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha must be a finite number (1.0 is plain proxy-tuning), got {self.alpha!r}")
        if self.distill_rounds not in ("all", "none"):
            raise ConfigError(f"distill_rounds must be 'all' or 'none', got {self.distill_rounds!r}")
        try:
            self.distill_config()
        except (TrainingError, TypeError, ValueError) as exc:
            raise ConfigError(f"FedPTConfig: {exc}") from exc
        if self.public_max_samples is not None and self.public_max_samples < 1:
            raise ConfigError("public_max_samples must be None or >= 1")

    def distill_config(self) -> DistillConfig:
        return DistillConfig.from_dict(self.distill)

    def client_dict(self) -> dict:
        names = {f.name for f in fields(FedAvgConfig)}
        return {k: v for k, v in asdict(self).items() if k in names}
