"""FedCoLLM (local LLM) and FedPT (black-box LLM behind `cotune llm serve`) over the real wire:
Mosquitto with mTLS + ACL, the aggregator service, EdgeClients; the server step's result is
what the clients receive next round."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.llm_server import LLMServer
from aggregator.service import AggregatorService
from aggregator.state import StateStore
from bridge.broker import MosquittoBroker, find_mosquitto
from bridge.codec import decode
from edge_sdk.client import EdgeClient
from tests.tiny_models import TINY_CORPUS

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto (CI installs it)")]

SHARDS = {"alice": TINY_CORPUS[0::2], "bob": TINY_CORPUS[1::2]}
TRAIN = {"lr": 5e-3, "max_steps": 2, "batch_size": 4, "block_size": 16}
DISTILL = {"batch_size": 4, "block_size": 16, "max_steps": 2, "warmup": 0, "lr": 5e-3, "lr_llm": 5e-3}
ALIGN = {"batch_size": 4, "block_size": 16, "max_steps": 5}


@pytest.fixture
def fed(make_federation):
    paths = make_federation("llmfed", list(SHARDS))
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    yield paths
    broker.stop()


@pytest.mark.parametrize("algorithm", ["fedcollm", "fedpt"])
def test_llm_algorithms_over_mosquitto(algorithm, fed, tmp_path, tiny_llama_path, tiny_llm_path):
    server = None
    llm = {"backend": "local"}
    if algorithm == "fedpt":
        server = LLMServer(str(tiny_llm_path)).start()
        llm = {"backend": "blackbox", "url": server.url, "top_k": 16}
    try:
        cfg = AggregatorConfig(
            party_config=str(fed.party_config("aggregator")), state_dir=str(tmp_path / "agg"), rounds=2,
            algorithm=algorithm, algorithm_config={"train": TRAIN, "distill": DISTILL, "align_base": ALIGN, "eval_block_size": 16,
                                                   "lora": {"r": 4, "alpha": 8}},
            models={"slm": str(tiny_llama_path), "llm": str(tiny_llm_path)}, llm=llm, public_data=TINY_CORPUS[:8],
            min_clients=2, round_deadline_s=60, wait_for_clients_s=30, final_wait_s=10)
        work = tmp_path / "clients"
        clients = [EdgeClient(fed.party_config(n), tiny_llama_path, SHARDS[n], eval_data=TINY_CORPUS[:3],
                              profile=None, work_dir=work / n, progress=None) for n in SHARDS]
        threads = [threading.Thread(target=c.run, kwargs={"max_idle_s": 90}, daemon=True) for c in clients]
        for t in threads:
            t.start()
        status = AggregatorService(cfg, progress=None).run()
        for t in threads:
            t.join(60)
    finally:
        if server is not None:
            server.stop()
    assert status["last_committed"]["round"] == 2
    with StateStore(tmp_path / "agg" / "state.db") as store:
        r1 = store.load_round(1, with_partial=False)
        assert sorted(r1.accepted) == sorted(SHARDS)
        assert r1.info.metrics["steps"] == 2  # the server step ran
        g1 = store.load_global(store.load_round(2, with_partial=False).info.base_digest).tensors
    # the distilled adapter of round 1 (not the plain mean of the updates) went out in round 2
    ups = [decode((work / n / "updates" / "round-00001.msg").read_bytes()) for n in SHARDS]
    total = sum(u.num_examples for u in ups)
    mean = {k: sum(u.tensors[k].astype(np.float64) * u.num_examples for u in ups) / total for k in ups[0].tensors}
    client_keys = [k for k in g1 if "/" not in k]
    assert set(client_keys) == set(mean)
    assert any(np.abs(g1[k] - mean[k]).max() > 1e-3 for k in client_keys)
    if algorithm == "fedpt":  # the aligned SLM base went over the wire once and the clients trained on it
        for n in SHARDS:
            assert len(list((work / n).rglob("aligned-bases/*/model.safetensors"))) == 1
    for c in clients:
        assert [h["round"] for h in c.history] == [1, 2]
        assert np.isfinite(c.final["nll_final"])
