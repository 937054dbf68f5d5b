"""FedMKT (mutual knowledge transfer, arXiv 2406.02224): heterogeneous client SLMs (each with
its own tokenizer) and a server LLM teach each other through top-k logits on a public set D_p,
aligned across tokenizers (:mod:`algorithms.core.token_alignment`) and selected per sample by
DualMinCE. Updates are per-client payloads that are collected, never averaged.

The payload schema both halves share is :mod:`algorithms.fedmkt.payload`; the public-set and
vocabulary blobs are :mod:`algorithms.fedmkt.public`.
"""

from .client import FedMKTClient
from .config import FedMKTConfig
from .server import FedMKTServer

__all__ = ["FedMKTClient", "FedMKTConfig", "FedMKTServer"]
