from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from algorithms.base import ConfigError
from algorithms.fedavg.config import DistillingConfig


@dataclass
class FedPTConfig(DistillingConfig):
    """FedPT: the client fields are FedAvg's; the server forms the proxy-tuned LLM
    ``z = z_LLM + alpha * (z_SLM_tuned - z_SLM_base)`` and distils it into the aggregated SLM on
    D_a (``distill``: KD plus the task CE on D_a by default; ``task_weight`` 0 is pure KD).
    ``distill_rounds``: "all" or "none" (plain FedAvg of the small model; the proxy is then used
    only at inference)."""

    DISTILL_DEFAULTS: ClassVar[dict] = {"epochs": 1, "batch_size": 8, "block_size": 64, "lr": 1e-3,
                                        "lambda_kd": 1.0, "task_weight": 1.0, "max_steps": 60, "warmup": 5}
    alpha: float = 1.0
    distill_rounds: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha must be a finite number (1.0 is plain proxy-tuning), got {self.alpha!r}")
        if self.distill_rounds not in ("all", "none"):
            raise ConfigError(f"distill_rounds must be 'all' or 'none', got {self.distill_rounds!r}")
