"""cotune: federated knowledge transfer between on-device small language models and a cloud LLM."""

__version__ = "0.1.0"
