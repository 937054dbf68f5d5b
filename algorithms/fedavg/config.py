from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from algorithms.base import ConfigError
from algorithms.core.lora_state import WIRE_DTYPES
from algorithms.core.modeling import LoraSpec
from algorithms.core.training import TrainConfig

CONFIG_VERSION = 1


def _default_train() -> dict:
    return {"lr": 2e-3, "epochs": 1, "batch_size": 8, "block_size": 64, "max_steps": 40}


@dataclass
class FedAvgConfig:
    """Everything a FedAvg-LoRA round needs; travels in ``Task.config``.

    ``lora`` and ``train`` are the dict forms of :class:`LoraSpec` / :class:`TrainConfig`
    (validated here, so a bad value fails on the server before any client trains)."""

    lora: dict = field(default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.0})
    train: dict = field(default_factory=_default_train)
    wire_dtype: str = "fp16"  # adapter encoding on the wire, both directions
    eval_block_size: int = 64
    lora_seed: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"wire_dtype must be one of {WIRE_DTYPES}, got {self.wire_dtype!r}")
        if self.version > CONFIG_VERSION:
            raise ConfigError(f"config version {self.version} is newer than this build ({CONFIG_VERSION}); upgrade cotune")
        try:
            self.lora_spec()
            self.train_config()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"fedavg config: {exc}") from exc

    def lora_spec(self) -> LoraSpec:
        return LoraSpec.from_dict(self.lora)

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.train)

    def to_dict(self) -> dict:
        return asdict(self)

    def client_dict(self) -> dict:
        """FedAvg-LoRA's fields only: what a client half needs in ``Task.config`` (subclasses
        add server-only fields that stay on the server)."""
        names = {f.name for f in fields(FedAvgConfig)}
        return {k: v for k, v in asdict(self).items() if k in names}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FedAvgConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            import logging

            logging.getLogger(__name__).warning("ignoring unknown fedavg config keys %s", sorted(unknown))
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"fedavg config: {exc}") from exc


@dataclass
class DistillingConfig(FedAvgConfig):
    """FedAvg's client fields plus a server-side distillation step on the public set D_a
    (FedCoLLM, FedPT). ``distill``: :class:`DistillConfig` fields; a partial dict overrides the
    subclass's ``DISTILL_DEFAULTS``. ``public_max_samples`` caps D_a per round (None: all).
    ``align_base``: align the SLM base to the LLM before round 1 and federate on it (see
    :mod:`algorithms.core.aligned_base`): DistillConfig fields over its ``ALIGN_DEFAULTS``
    (``{}``, the default: the defaults), or None to keep the device's own SLM."""

    DISTILL_DEFAULTS: ClassVar[dict] = {}
    distill: dict = field(default_factory=dict)
    public_max_samples: int | None = None
    align_base: dict | None = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        from algorithms.core.errors import TrainingError

        if not isinstance(self.distill, dict):
            raise ConfigError(f"distill must be a dict of DistillConfig fields, got {self.distill!r}")
        self.distill = {**self.DISTILL_DEFAULTS, **self.distill}
        try:
            self.distill_config()
        except (TrainingError, TypeError, ValueError) as exc:
            raise ConfigError(f"{type(self).__name__}: {exc}") from exc
        if self.public_max_samples is not None and self.public_max_samples < 1:
            raise ConfigError("public_max_samples must be None or >= 1")
        from algorithms.core.aligned_base import align_settings

        self.align_base = align_settings(self.align_base)

    def distill_config(self):
        from algorithms.core.distill import DistillConfig

        return DistillConfig.from_dict(self.distill)
