"""The contract between an algorithm and the two runtimes.

An algorithm is one folder under ``algorithms/`` holding both halves and the payload schema
they share. The runtimes (``edge_sdk`` on the device, ``aggregator`` in the cloud) never branch
on algorithm names: they hand each half a small *context* (model, trainer, data, send/receive
helpers) and move the typed payloads the halves produce.

Server half, per round:  ``plan_round`` -> Task (config + broadcast blobs) -> clients ->
``update_spec`` validates each update -> the runtime folds it into a streaming aggregate ->
``finish_round`` runs the server-side step and returns the next global state.

Client half, per task:   ``run(task, downloads, ctx)`` -> :class:`ClientReport`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

State = dict[str, np.ndarray]


class AlgorithmError(Exception):
    """Base of errors raised by algorithm halves (bad config, incompatible payloads)."""


class ConfigError(AlgorithmError, ValueError):
    """An algorithm configuration that cannot work; the message says what to change."""


def pack_state(state: Mapping[str, np.ndarray], meta: Mapping[str, str] | None = None) -> bytes:
    """A tensor dict as safetensors bytes (the payload format of every blob; never pickle)."""
    return st_save({k: np.ascontiguousarray(v) for k, v in state.items()}, metadata=dict(meta or {}) or None)


def unpack_state(data: bytes | bytearray) -> State:
    try:
        return dict(st_load(bytes(data)))
    except Exception as exc:  # safetensors raises several internal types
        raise AlgorithmError(f"payload is not a valid safetensors blob: {exc}") from exc


@dataclass
class RoundPlan:
    """What the server sends in a round: JSON config for ``Task.config`` and named blobs that
    are broadcast once to all selected clients (encrypted under a per-round content key)."""

    config: dict
    blobs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class ClientReport:
    """What a client half returns: the update tensors (validated against ``update_spec`` on the
    server), the number of local examples (the FedAvg weight) and metrics for the round table."""

    num_examples: int
    tensors: State
    metrics: dict = field(default_factory=dict)


@dataclass
class RoundOutcome:
    state: State
    metrics: dict = field(default_factory=dict)


class ClientContext(Protocol):
    """What a client half may use on the device (implemented by ``edge_sdk``)."""

    party_id: str
    round: int

    def model(self, lora: Any) -> Any: ...  # the base model with a LoRA adapter, loaded per device profile
    def tokenizer(self) -> Any: ...
    def private_data(self) -> list: ...  # texts or prompt/response pairs; never leaves the device
    def eval_data(self) -> list: ...  # held-out texts for before/after metrics (may be empty)
    def train(self, data: Any, cfg: Any, extra_loss: Any = None) -> Any: ...  # -> TrainResult
    def evaluate(self, texts: list, block_size: int) -> Any: ...  # -> EvalResult
    def log(self, msg: str) -> None: ...


class ServerContext(Protocol):
    """What a server half may use in the cloud (implemented by ``aggregator``)."""

    work_dir: str
    seed: int

    def model_path(self, role: str) -> str: ...  # "slm", "llm": local checkpoints the service holds
    def public_data(self) -> list: ...  # the auxiliary / public set D_p
    def llm(self) -> Any: ...  # the large model backend (local weights or black box), built once
    def log(self, msg: str) -> None: ...


class ServerAlgorithm(ABC):
    name: ClassVar[str]
    aggregation: ClassVar[str] = "fedavg"  # default rule; the service config may override

    def __init__(self, config: Mapping[str, Any], ctx: ServerContext):
        self.ctx = ctx

    @abstractmethod
    def initial_state(self) -> State:
        """The global state before round 1 (e.g. a freshly initialised LoRA adapter)."""

    @abstractmethod
    def plan_round(self, round: int, state: State) -> RoundPlan: ...

    @abstractmethod
    def update_spec_state(self, state: State) -> State:
        """The tensors (names, shapes, wire dtypes) a valid client update must have, as an
        example state; the runtime derives the validation spec and norm reference from it."""

    def update_weight(self, report_metrics: Mapping[str, Any], num_examples: int) -> float:
        return float(num_examples)

    @abstractmethod
    def finish_round(self, round: int, state: State, aggregate: State) -> RoundOutcome:
        """Server-side step after aggregation (distillation, alignment, ...). ``aggregate`` is
        the float64 result of the aggregation rule."""

    def final_blobs(self, state: State) -> dict[str, bytes]:
        """What clients receive after the last round to apply the federation's result."""
        return {}

    def client_config(self) -> dict:
        """The JSON config a client half needs (``Task.config``, and with the final blobs)."""
        return {}


class ClientAlgorithm(ABC):
    name: ClassVar[str]

    @abstractmethod
    def run(self, task: Any, downloads: Mapping[str, bytes], ctx: ClientContext) -> ClientReport: ...

    def apply_final(self, downloads: Mapping[str, bytes], ctx: ClientContext, config: Mapping | None = None) -> dict:
        """Apply the final global model after the last round; returns metrics. Optional."""
        return {}
