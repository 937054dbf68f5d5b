"""cotune edge SDK: join a federation, train LoRA adapters on private data, apply the result."""

from __future__ import annotations

__all__ = ["EdgeClient"]


def __getattr__(name: str):
    if name == "EdgeClient":  # lazy: importing edge_sdk does not import torch
        from .client import EdgeClient

        return EdgeClient
    raise AttributeError(name)
