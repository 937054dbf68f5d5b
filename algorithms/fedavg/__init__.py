"""FedAvg-LoRA ("FedIT"): clients train a LoRA adapter on a frozen, optionally quantized SLM;
the aggregator takes the sample-weighted mean. The baseline every other algorithm builds on."""

from .client import FedAvgClient
from .config import FedAvgConfig
from .server import FedAvgServer

__all__ = ["FedAvgClient", "FedAvgConfig", "FedAvgServer"]
