from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from algorithms.base import ConfigError
from algorithms.core.emulator import EmulatorError, kept_layers
from algorithms.core.emulator_train import AlignConfig
from algorithms.fedavg.config import FedAvgConfig

BASELINES = ("fedbiot", "fedot")


def _default_align() -> dict:
    return {
        "mode": "layers",
        "max_steps": 20,
        "lr": 1e-4,
        "batch_size": 4,
        "block_size": 64,
        "lambda_kd": 1.0,
    }


@dataclass
class FedBiOTConfig(FedAvgConfig):
    """FedBiOT: the client fields are FedAvg's (``lora`` is the adapter's LoRA, put on the
    adapter layers only) plus ``proximal_mu``; the server adds the emulator plan and the
    alignment step.

    - ``drop_ratio``, ``n_adapter_top``, ``n_adapter_bottom``: the plan
      (:func:`~algorithms.core.emulator.kept_layers`): the adapter is the top (and bottom)
      layers, the middle block keeps ``round(n * (1 - drop_ratio))`` layers.
    - ``proximal_mu``: client term ``mu * ||merge(adapter) - merge(adapter_round_start)||^2``
      over the merged LoRA deltas ``B @ A * alpha / r`` (0 disables it).
    - ``align``: :class:`~algorithms.core.emulator_train.AlignConfig` fields of the server's
      per-round re-alignment (``max_steps`` per round, ``lambda_kd``, ``mode`` layers|lora...).
    - ``pre_align_steps``: alignment steps before round 1 (same settings; 0: none).
    - ``realign_every``: re-align after every k-th round (FedBiOT only).
    - ``baseline``: ``"fedbiot"``, or ``"fedot"`` for the FedOT / Offsite-Tuning baseline:
      one-shot alignment before round 1, then plain FedAvg of the adapter, no per-round
      alignment and no proximal term (``proximal_mu`` is ignored).
    - ``public_max_samples``: cap on the public set used for alignment (None: all of it).
    """

    drop_ratio: float = 0.5
    n_adapter_top: int = 2
    n_adapter_bottom: int = 0
    proximal_mu: float = 0.01
    align: dict = field(default_factory=_default_align)
    pre_align_steps: int = 50
    realign_every: int = 1
    baseline: str = "fedbiot"
    public_max_samples: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.train_config().proximal_mu > 0:
            raise ConfigError(
                f"{name}: set the top-level proximal_mu (the merged-adapter term), "
                "not train.proximal_mu (a FedProx term on the LoRA factors)"
            )
        try:  # the plan's own checks, on a model deep enough for any adapter
            kept_layers(
                self.n_adapter_top + self.n_adapter_bottom + 1,
                self.n_adapter_top,
                self.n_adapter_bottom,
                self.drop_ratio,
            )
        except EmulatorError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
        mu = self.proximal_mu
        if (
            isinstance(mu, bool)
            or not isinstance(mu, (int, float))
            or not math.isfinite(mu)
            or mu < 0
        ):
            raise ConfigError(
                f"{name}: proximal_mu must be a finite number >= 0 (e.g. 0.01), got {mu!r}"
            )
        if not isinstance(self.align, dict):
            raise ConfigError(
                f"{name}: align must be a dict of AlignConfig fields, got {self.align!r}"
            )
        self.align = {**_default_align(), **self.align}  # a partial dict overrides the defaults
        try:
            self.align_config()
        except (EmulatorError, TypeError) as exc:
            raise ConfigError(f"{name}: align: {exc}") from exc
        for key, low in (("pre_align_steps", 0), ("realign_every", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{name}: {key} must be an integer >= {low}, got {v!r}")
        if self.baseline not in BASELINES:
            raise ConfigError(f"{name}: baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.public_max_samples is not None and (
            isinstance(self.public_max_samples, bool)
            or not isinstance(self.public_max_samples, int)
            or self.public_max_samples < 1
        ):
            raise ConfigError(f"{name}: public_max_samples must be None or an integer >= 1")

    def align_config(self, max_steps: int | None = None, seed_offset: int = 0) -> AlignConfig:
        cfg = AlignConfig.from_dict(self.align)
        if max_steps is not None:
            cfg.max_steps = max_steps
        cfg.seed = cfg.seed + seed_offset
        return cfg

    @property
    def per_round_alignment(self) -> bool:
        return self.baseline == "fedbiot"

    def client_proximal_mu(self) -> float:
        return float(self.proximal_mu) if self.baseline == "fedbiot" else 0.0

    def client_dict(self) -> dict:
        """What travels to clients in ``Task.config``: FedAvg's fields plus the proximal weight
        the client applies (0 under the FedOT baseline). The adapter layers come with the
        emulator (its plan), not with the config."""
        names = {f.name for f in fields(FedAvgConfig)}
        out = {k: v for k, v in asdict(self).items() if k in names}
        out["proximal_mu"] = self.client_proximal_mu()
        return out
