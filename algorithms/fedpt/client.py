from __future__ import annotations

from algorithms.fedavg.client import FedAvgClient


class FedPTClient(FedAvgClient):
    """The device half is FedAvg-LoRA's (on the aligned SLM base when the aggregator sends one);
    proxy-tuning and its distillation run on the server."""

    name = "fedpt"
