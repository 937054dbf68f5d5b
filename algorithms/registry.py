"""The algorithm registry: one line per algorithm. Halves are imported lazily, so a device
that runs one algorithm never imports another's dependencies."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .base import AlgorithmError

#: name -> "module:ServerClass:ClientClass"
_REGISTRY: dict[str, str] = {
    "fedavg": "algorithms.fedavg:FedAvgServer:FedAvgClient",
    "fedbiot": "algorithms.fedbiot:FedBiOTServer:FedBiOTClient",
    "fedcollm": "algorithms.fedcollm:FedCoLLMServer:FedCoLLMClient",
    "fedmkt": "algorithms.fedmkt:FedMKTServer:FedMKTClient",
    "fedpt": "algorithms.fedpt:FedPTServer:FedPTClient",
}


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    server: type
    client: type


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> AlgorithmSpec:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise AlgorithmError(f"unknown algorithm {name!r}; registered: {', '.join(names())}") from None
    module, server, client = target.split(":")
    mod = importlib.import_module(module)
    return AlgorithmSpec(name, getattr(mod, server), getattr(mod, client))
