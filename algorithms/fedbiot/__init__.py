"""FedBiOT (arXiv 2406.17706): clients never receive the full LLM. The aggregator cuts the LLM
into an adapter (top, optionally bottom, decoder layers) and an emulator (the middle block
thinned by uniform layer dropping), aligns the emulator with the full LLM on public data
(L2n on the middle block's output + lambda_kd * KL), and sends it once per change; clients
train the adapter's LoRA through the frozen emulator with a proximal term on the merged
adapter; the aggregator averages the adapters and plugs them into the full LLM by layer
position. ``baseline: "fedot"`` runs the FedOT / Offsite-Tuning baseline (one-shot alignment,
then plain FedAvg of the adapter)."""

from .client import FedBiOTClient
from .config import FedBiOTConfig
from .server import FedBiOTServer

__all__ = ["FedBiOTClient", "FedBiOTConfig", "FedBiOTServer"]
