from __future__ import annotations

from algorithms.fedavg.client import FedAvgClient


class FedCoLLMClient(FedAvgClient):
    """The device half is FedAvg-LoRA's: load the broadcast SLM adapter, train it on the private
    data with the task loss, upload it. The co-tuning happens on the server."""

    name = "fedcollm"
