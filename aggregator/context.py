"""What the aggregator hands an algorithm's server half: checkpoints by role, the public set
D_a, the LLM backend (built on first use) and a log."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .errors import AggregatorError

log = logging.getLogger("cotune.aggregator")


@dataclass
class ServerContext:
    work_dir: str
    seed: int
    models: dict
    public: list
    llm_config: dict = field(default_factory=dict)
    llm_backend: object = None  # a prebuilt backend (tests, benchmarks); else built from llm_config

    def model_path(self, role: str) -> str:
        try:
            return self.models[role]
        except KeyError:
            raise AggregatorError(f"the aggregator config has no model for role {role!r} (models: {sorted(self.models)})") from None

    def model_roles(self) -> list[str]:
        return sorted(self.models)

    def public_data(self) -> list:
        return list(self.public)

    def llm(self):
        if self.llm_backend is None:
            from .llm import make_llm_backend

            self.llm_backend = make_llm_backend(self.llm_config, self.models)
        return self.llm_backend

    def log(self, msg: str) -> None:
        log.info(msg)
