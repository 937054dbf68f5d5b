"""The contract between an algorithm and the two runtimes.

An algorithm is one folder under ``algorithms/`` holding both halves and the payload schema
they share. The runtimes (``edge_sdk`` on the device, ``aggregator`` in the cloud) never branch
on algorithm names: they hand each half a small *context* (model, trainer, data, send/receive
helpers) and move the typed payloads the halves produce.

Server half, per round:  ``plan_round`` -> Task (config + broadcast blobs) -> clients ->
``update_spec`` validates each update -> the runtime folds it into a streaming aggregate ->
``finish_round`` runs the server-side step and returns the next global state. An algorithm whose
updates must not be averaged declares ``aggregation = "collect"``: its own
``validate_client_update`` checks each update, and ``finish_round`` receives them all.

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


class UpdateRejected(AlgorithmError):
    """A client update an algorithm refuses in ``ServerAlgorithm.validate_client_update``.
    ``reason`` is a short stable code (one of :attr:`REASONS`) that the runtime records and
    sends back to the client as a typed rejection; ``str(err)`` says what was wrong."""

    REASONS = frozenset({"names", "dtype", "shape", "non_finite", "payload", "vocabulary"})

    def __init__(self, reason: str, message: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; use one of {sorted(self.REASONS)}")
        self.reason = reason
        super().__init__(message)


def pack_state(state: Mapping[str, np.ndarray], meta: Mapping[str, str] | None = None) -> bytes:
    """A tensor dict as safetensors bytes (the payload format of every blob; never pickle)."""
    # reshape: ascontiguousarray turns a 0-d array into shape (1,)
    arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in state.items()}
    return st_save(arrays, metadata=dict(meta or {}) or None)


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

    def model(self, lora: Any, layers: Any = None) -> Any: ...  # base model + LoRA (on all or only these decoder layers), per device profile
    def use_base(self, path: Any) -> None: ...  # switch the base model (e.g. a received emulator); None: the device's own
    def workspace(self) -> Any: ...  # a directory (Path) for files kept across rounds, e.g. an unpacked emulator
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
    def model_roles(self) -> list[str]: ...  # every role model_path knows (e.g. "slm:gpt2" for FedMKT families)
    def public_data(self) -> list: ...  # the auxiliary / public set D_p
    def llm(self) -> Any: ...  # the large model backend (local weights or black box), built once
    def log(self, msg: str) -> None: ...


class ServerAlgorithm(ABC):
    """``aggregation``: "fedavg" (the default; the service config may pick another numeric rule:
    median, trimmed_mean) or "collect": updates are not combined at all (per-client top-k
    logits of different shapes). A collecting algorithm implements
    :meth:`validate_client_update`; its :meth:`finish_round` receives every accepted update."""

    name: ClassVar[str]
    aggregation: ClassVar[str] = "fedavg"

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
        the float64 result of the aggregation rule; for ``aggregation = "collect"`` it is a
        read-only mapping client id -> that client's validated tensors (loaded on access, so
        iterate rather than hold them all; ``getattr(aggregate, "weights", {})`` gives each
        client's ``update_weight``). Iterate it in a fixed order (sorted ids): arrival order
        differs between runs."""

    def validate_client_update(self, tensors: State, client: str) -> State:
        """Only for ``aggregation = "collect"`` (the runtime's shape/dtype/norm checks assume
        one spec for every client): check one client's update and return the tensors to keep;
        raise :class:`UpdateRejected` with a reason to refuse it. The other clients' updates
        and the round are unaffected by a rejection."""
        raise NotImplementedError(f"{type(self).__name__} collects updates but has no validate_client_update")

    def final_blobs(self, state: State) -> dict[str, bytes]:
        """What clients receive after the last round to apply the federation's result."""
        return {}

    def client_config(self) -> dict:
        """The JSON config a client half needs (``Task.config``, and with the final blobs)."""
        return {}


class ClientAlgorithm(ABC):
    name: ClassVar[str]
    #: True when the half trains the device's own model with ``Task.config["lora"]`` and
    #: ``["train"]`` (the runtime then checks the memory plan before it starts); False when it
    #: trains something the task brings (e.g. FedBiOT's emulator)
    trains_device_model: ClassVar[bool] = True

    @abstractmethod
    def run(self, task: Any, downloads: Mapping[str, bytes], ctx: ClientContext) -> ClientReport: ...

    def needs_blob(self, name: str, ctx: ClientContext) -> bool:
        """Whether this device needs blob ``name`` of a Task or of the final note; the runtime
        fetches only those (e.g. a FedMKT device skips the other client families' blobs).
        Default: every blob."""
        return True

    def apply_final(self, downloads: Mapping[str, bytes], ctx: ClientContext, config: Mapping | None = None) -> dict:
        """Apply the final global model after the last round; returns metrics. Optional."""
        return {}
