"""FedCoLLM (co-tuning, arXiv 2411.11707): clients run FedAvg-LoRA on the SLM; after each
aggregation the aggregator distils the SLM (LoRA) and its LLM (LoRA) into each other on the
public set D_a, and the distilled SLM adapter goes out next round. SLM and LLM share one
tokenizer (one model family)."""

from .client import FedCoLLMClient
from .config import FedCoLLMConfig
from .server import FedCoLLMServer

__all__ = ["FedCoLLMClient", "FedCoLLMConfig", "FedCoLLMServer"]
