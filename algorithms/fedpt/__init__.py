"""FedPT (federated proxy-tuning, arXiv 2410.00362): the LLM is a black box that only returns
next-token log-probabilities. Clients run FedAvg-LoRA on the SLM; the aggregator forms the
proxy-tuned LLM ``z_LLM + alpha * (z_SLM_tuned - z_SLM_base)`` and distils it into the
aggregated SLM on D_a; that SLM is next round's small model. Works with the local and the
black-box LLM backends; SLM and LLM must share a tokenizer."""

from .client import FedPTClient
from .config import FedPTConfig
from .proxy import ProxyTeacher, evaluate_proxy
from .server import FedPTServer

__all__ = ["FedPTClient", "FedPTConfig", "FedPTServer", "ProxyTeacher", "evaluate_proxy"]
