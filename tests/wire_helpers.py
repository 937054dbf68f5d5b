"""Deterministic identities and sample messages shared by the wire tests and the golden files."""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bridge.keys import Directory, Identity
from bridge.messages import BlobRef, Task, Update

FEDERATION = "goldfed"


def fixed_identity(party_id: str, role: str) -> Identity:
    """Keys derived from the party id: the same on every machine, for golden files only."""
    seed = hashlib.sha256(f"cotune-test-key|{party_id}".encode()).digest()
    seed2 = hashlib.sha256(f"cotune-test-kx|{party_id}".encode()).digest()
    return Identity(party_id, role, Ed25519PrivateKey.from_private_bytes(seed), X25519PrivateKey.from_private_bytes(seed2))


def fixed_federation(clients=("alice", "bob")) -> tuple[dict[str, Identity], Directory]:
    ids = {"aggregator": fixed_identity("aggregator", "aggregator")}
    ids.update({c: fixed_identity(c, "client") for c in clients})
    return ids, Directory(FEDERATION, [i.public for i in ids.values()])


def sample_update() -> Update:
    rng = np.random.default_rng(7)
    return Update(
        round=3, algorithm="fedavg", num_examples=120, metrics={"loss": 1.25, "tokens": 4096},
        blobs={"adapter": BlobRef("ab" * 32, 1000, 256, "adapter").to_json()},
        tensors={"layers.0.q.lora_A": rng.standard_normal((4, 8)).astype(np.float32),
                 "layers.0.q.lora_B": np.zeros((8, 4), dtype=np.float16)},
    )


def sample_task() -> Task:
    return Task(round=3, algorithm="fedavg", config={"lr": 0.001, "steps": 10},
                downloads={"global": BlobRef("cd" * 32, 5000, 1024, "adapter").to_json()}, deadline=1.8e9)
