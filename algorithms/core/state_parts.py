"""A server algorithm's global state is one flat tensor dict (checkpointed atomically by the
aggregator). Algorithms with more than one model keep each extra part under a prefix
(``"llm/"``, ``"expert/"``); the unprefixed tensors are what clients train."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

SEP = "/"


def client_part(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if SEP not in k}


def part(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    p = prefix + SEP
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def join(client: Mapping[str, np.ndarray], **parts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: np.asarray(v, dtype=np.float32) for k, v in client.items()}
    for prefix, tensors in parts.items():
        out.update({f"{prefix}{SEP}{k}": np.asarray(v, dtype=np.float32) for k, v in tensors.items()})
    return out


def to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() for k, v in state.items()}


def to_torch(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}


def delta_norm(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2))
                             for k in a)))
