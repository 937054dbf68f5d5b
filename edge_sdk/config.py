"""Edge client configuration file (JSON), for `cotune edge run --config FILE`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class EdgeConfig:
    party_config: str
    model_path: str
    data: dict
    eval: dict = field(default_factory=dict)
    profile: str | None = "generic-cpu"
    quant: str | None = None
    work_dir: str | None = None
    broker: dict = field(default_factory=dict)
    gradient_checkpointing: bool = False
    max_idle_s: float | None = None
    torch_threads: int | None = None
    base: str = "."

    @classmethod
    def load(cls, path: str | os.PathLike) -> EdgeConfig:
        p = Path(path)
        data = json.loads(p.read_text())
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{p}: unknown keys {sorted(unknown)}; valid keys: {sorted(known - {'base'})}")
        cfg = cls(**data)
        cfg.base = str(p.parent)
        for key in ("party_config", "model_path", "work_dir"):
            value = getattr(cfg, key)
            if value and not os.path.isabs(value):
                setattr(cfg, key, str(p.parent / value))
        return cfg
