"""FedBiOT end to end: plug-back through the algorithm halves, the emulator blob, the merged
proximal term, the client's content-addressed blob cache, and a federation over Mosquitto.

Models: the 6-layer tiny Llama (``tiny_llm6_path``; adapter = top 2 layers, drop 0.5 keeps 2
of the 4 middle layers: full layers 0, 3, 4, 5) and the 3-layer one (``tiny_llm_path``)."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
import torch

from aggregator.context import ServerContext
from algorithms.base import ConfigError
from algorithms.core.emulator import emulator_to_full_adapter, kept_layers
from algorithms.core.emulator_train import attach_adapter_lora
from algorithms.core.modeling import adapter_state, load_adapter_state, load_causal_lm
from algorithms.core.state_parts import client_part, part, to_torch
from algorithms.core.training import train_causal_lm
from algorithms.fedbiot import FedBiOTClient, FedBiOTConfig, FedBiOTServer
from algorithms.fedbiot.merge import MergedProximal, merged_sq_distance
from algorithms.fedbiot.payload import EmulatorBlobError, read_emulator_meta, unpack_emulator
from bridge.broker import MosquittoBroker, find_mosquitto
from bridge.messages import BlobRef, Task
from edge_sdk.blob_cache import BlobCache
from edge_sdk.context import DeviceContext
from tests.tiny_models import TINY_CORPUS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = {"lr": 5e-3, "epochs": 1, "batch_size": 4, "block_size": 16, "max_steps": 3}
ALIGN = {"max_steps": 2, "batch_size": 4, "block_size": 16, "eval_batches": 1}
BASE = {
    "train": TRAIN,
    "eval_block_size": 16,
    "lora": {"r": 4, "alpha": 8},
    "align": ALIGN,
    "pre_align_steps": 2,
}
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])


def _ctx(llm, tmp_path, public=TINY_CORPUS[:8]) -> ServerContext:
    return ServerContext(str(tmp_path), 0, {"llm": str(llm)}, list(public))


def _device(name, tmp_path, data=None, model="unused-model-path") -> DeviceContext:
    data = TINY_CORPUS[:8] if data is None else data
    return DeviceContext(
        name, model, data, TINY_CORPUS[12:], progress=None, work_dir=tmp_path / name
    )


def _logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _one_round(server, device, round=1):
    state = server.initial_state()
    plan = server.plan_round(round, state)
    report = FedBiOTClient().run(
        Task(round=round, algorithm="fedbiot", config=plan.config), plan.blobs, device
    )
    aggregate = {k: v.astype(np.float64) for k, v in report.tensors.items()}
    return state, plan, report, server.finish_round(round, state, aggregate)


def test_config_is_validated_with_actionable_errors(tmp_path, tiny_llm6_path):
    for bad in (
        {"drop_ratio": -0.1},
        {"n_adapter_top": 0},
        {"proximal_mu": float("nan")},
        {"baseline": "offsite"},
        {"realign_every": 0},
        {"align": {"mode": "full"}},
        {"train": {**TRAIN, "proximal_mu": 0.1}},
    ):
        with pytest.raises(ConfigError):
            FedBiOTConfig.from_dict({**BASE, **bad})
    assert (
        FedBiOTConfig.from_dict({**BASE, "baseline": "fedot"}).client_dict()["proximal_mu"] == 0.0
    )


def test_blackbox_llm_is_refused(tmp_path, tiny_llm_path):
    class BlackBox:
        kind = "blackbox"

    ctx = _ctx(tiny_llm_path, tmp_path)
    ctx.llm_backend = BlackBox()
    with pytest.raises(ConfigError, match="local"):
        FedBiOTServer(BASE, ctx).initial_state()


def test_drop_ratio_zero_plug_back_equals_training_on_the_full_model(tmp_path, tiny_llm6_path):
    """With no layer dropped the emulator is the full model: an adapter trained by the client
    half on the received emulator, aggregated and plugged back by the server half, equals
    the same LoRA trained directly on the full LLM (same init, data, seed and proximal term)."""
    cfg = {
        **BASE,
        "drop_ratio": 0.0,
        "n_adapter_top": 2,
        "n_adapter_bottom": 1,
        "wire_dtype": "fp32",
        "pre_align_steps": 0,
        "proximal_mu": 0.5,
    }
    server = FedBiOTServer(cfg, _ctx(tiny_llm6_path, tmp_path))
    device = _device("c0", tmp_path)
    state, _, report, outcome = _one_round(server, device)
    plugged = server.full_adapter(outcome.state)

    plan = kept_layers(6, 2, 1, 0.0)
    full, tok, _ = load_causal_lm(tiny_llm6_path)
    ref = attach_adapter_lora(full, FedBiOTConfig.from_dict(cfg).lora_spec(), plan, seed=0)
    load_adapter_state(ref, emulator_to_full_adapter(to_torch(client_part(state)), plan))
    train_causal_lm(
        ref,
        device.private_data(),
        FedBiOTConfig.from_dict(cfg).train_config(),
        progress=None,
        tokenizer=tok,
        extra_loss=MergedProximal(ref, 0.5),
    )
    expected = adapter_state(ref)
    assert sorted(plugged) == sorted(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(plugged[k], v.numpy(), rtol=0, atol=1e-6, err_msg=k)
    assert report.metrics["merged_distance"] > 0


def test_plug_back_by_layer_position_and_merged_full_model(tmp_path, tiny_llm6_path):
    server = FedBiOTServer({**BASE, "wire_dtype": "fp32"}, _ctx(tiny_llm6_path, tmp_path))
    _, _, report, outcome = _one_round(server, _device("c0", tmp_path))
    assert server.plan.origin == (0, 3, 4, 5)
    emu_layers = {int(k.split(".")[2]) for k in client_part(outcome.state)}
    full_layers = {int(k.split(".")[2]) for k in server.full_adapter(outcome.state)}
    assert (emu_layers, full_layers) == (
        {2, 3},
        {4, 5},
    )  # emulator layers 2, 3 are full layers 4, 5
    # the server's merged "full LLM + adapter" is the peft model carrying the plugged adapter
    full, _, _ = load_causal_lm(tiny_llm6_path)
    peft = attach_adapter_lora(full, server.config.lora_spec(), server.plan, seed=0)
    load_adapter_state(peft, to_torch(server.full_adapter(outcome.state)))
    with server.full_with(outcome.state) as merged:
        torch.testing.assert_close(_logits(merged), _logits(peft), rtol=1e-5, atol=1e-5)
    # and the merge is undone exactly
    torch.testing.assert_close(
        _logits(server._full), _logits(load_causal_lm(tiny_llm6_path)[0]), rtol=0, atol=0
    )
    assert outcome.metrics["align_steps"] == ALIGN["max_steps"]
    assert outcome.metrics["emulator_delta_norm"] > 0  # FedBiOT re-aligned the emulator


def test_emulator_blob_is_deterministic_and_loads_to_the_same_logits(tmp_path, tiny_llm6_path):
    s1 = FedBiOTServer(BASE, _ctx(tiny_llm6_path, tmp_path / "a"))
    state = s1.initial_state()
    blob = s1.plan_round(1, state).blobs["emulator"]
    # a restarted aggregator (fresh backend and server) re-plans the very same bytes
    s2 = FedBiOTServer(BASE, _ctx(tiny_llm6_path, tmp_path / "b"))
    assert s2.plan_round(1, state).blobs["emulator"] == blob
    assert s1.final_blobs(state)["emulator"] == blob
    meta = read_emulator_meta(blob)
    assert meta["plan"] == s1.plan and {"config.json", "tokenizer.json"} <= set(meta["files"])
    # pre-alignment moved the kept middle layers away from the LLM's
    full, _, _ = load_causal_lm(tiny_llm6_path)
    aligned = part(state, "emulator")["model.layers.1.self_attn.q_proj.weight"]
    assert not np.allclose(aligned, full.model.layers[3].self_attn.q_proj.weight.detach().numpy())
    # unpacked on a device it is an ordinary checkpoint with the server's logits
    d = unpack_emulator(blob, tmp_path / "device" / hashlib.sha256(blob).hexdigest())
    emu, _, _ = load_causal_lm(d)
    with s2.emulator_with(state) as server_emu:  # initial adapter: B = 0, so no change
        torch.testing.assert_close(_logits(emu), _logits(server_emu), rtol=0, atol=0)
    with pytest.raises(EmulatorBlobError):
        read_emulator_meta(blob[:100])


def test_client_trains_on_the_emulator_not_its_own_model(tmp_path, tiny_llm6_path, tiny_llama_path):
    server = FedBiOTServer(BASE, _ctx(tiny_llm6_path, tmp_path))
    device = _device("c0", tmp_path, model=tiny_llama_path)
    _, plan, _, outcome = _one_round(server, device)
    assert device.base_path != device.model_path and device.base_path.endswith(
        hashlib.sha256(plan.blobs["emulator"]).hexdigest()
    )
    # adapter + emulator on the device == adapter + emulator on the server
    final = server.final_blobs(outcome.state)
    metrics = FedBiOTClient().apply_final(final, device, server.client_config())
    assert np.isfinite(metrics["nll_final"])
    with server.emulator_with(outcome.state) as emu:
        torch.testing.assert_close(_logits(device._peft), _logits(emu), rtol=1e-5, atol=1e-5)


def test_fedot_baseline_aligns_once_and_has_no_proximal_term(tmp_path, tiny_llm6_path):
    server = FedBiOTServer(
        {**BASE, "baseline": "fedot", "proximal_mu": 0.5}, _ctx(tiny_llm6_path, tmp_path)
    )
    state, plan, report, outcome = _one_round(server, _device("c0", tmp_path))
    assert plan.config["proximal_mu"] == 0.0 and "merged_distance" not in report.metrics
    assert "align_steps" not in outcome.metrics
    assert server.plan_round(2, outcome.state).blobs["emulator"] == plan.blobs["emulator"]


def test_merged_proximal_equals_the_explicit_frobenius_norm():
    g = torch.Generator().manual_seed(0)
    a, b, a0, b0 = (torch.randn(s, generator=g) for s in ((4, 11), (7, 4), (4, 11), (7, 4)))
    explicit = ((b @ a - b0 @ a0) ** 2).sum()
    torch.testing.assert_close(merged_sq_distance(a, b, a0, b0), explicit, rtol=1e-5, atol=1e-5)
    a.requires_grad_(True)
    b.requires_grad_(True)
    merged_sq_distance(a, b, a0, b0).backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    ((b @ a - b0 @ a0) ** 2).sum().backward()
    torch.testing.assert_close(ga, a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, b.grad, rtol=1e-4, atol=1e-5)


# -- the client's blob cache ---------------------------------------------------------------------


def test_blob_cache_verifies_and_evicts(tmp_path):
    cache = BlobCache(tmp_path / "blobs", max_bytes=250)
    blobs = [bytes([i]) * 100 for i in range(3)]
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    assert cache.get(shas[0]) is None
    cache.put(shas[0], blobs[0])
    assert cache.get(shas[0]) == blobs[0]
    with pytest.raises(ValueError):
        cache.put(shas[1], blobs[0])  # a blob that does not hash to its name is refused
    (tmp_path / "blobs" / shas[0]).write_bytes(b"x" * 100)  # corrupted on disk: a miss, removed
    assert cache.get(shas[0]) is None and shas[0] not in cache
    for s, b in zip(shas, blobs, strict=True):
        cache.put(s, b)
    assert (
        shas[0] not in cache and shas[1] in cache and shas[2] in cache
    )  # least recently used went


class _CountingEndpoint:
    def __init__(self, blobs):
        self.blobs, self.calls = blobs, []

    def fetch_blob(self, ref, sender, timeout=600, round=None):
        self.calls.append(ref.sha256)

        class Result:
            def __init__(self, data):
                self.data = data

            def read(self):
                return self.data

            def discard(self):
                pass

        return Result(self.blobs[ref.sha256])


def test_an_unchanged_blob_is_not_fetched_again(tmp_path, make_federation, tiny_llama_path):
    from edge_sdk.client import EdgeClient

    paths = make_federation("cachefed", ["alice"])
    client = EdgeClient(
        paths.party_config("alice"),
        tiny_llama_path,
        TINY_CORPUS[:4],
        profile=None,
        work_dir=tmp_path / "alice",
        progress=None,
    )
    emulator, adapter1, adapter2 = b"E" * 5000, b"a1" * 10, b"a2" * 10
    refs = {
        b: BlobRef(hashlib.sha256(b).hexdigest(), len(b), 1024, "x")
        for b in (emulator, adapter1, adapter2)
    }
    fake = _CountingEndpoint({r.sha256: b for b, r in refs.items()})
    client.endpoint = fake
    for adapter in (adapter1, adapter2):  # two rounds: the adapter changes, the emulator does not
        assert client._download(refs[emulator], "aggregator", 1)[0] == emulator
        assert client._download(refs[adapter], "aggregator", 1)[0] == adapter
    assert fake.calls.count(refs[emulator].sha256) == 1
    assert client.blob_stats == {
        "fetched": 3,
        "fetched_bytes": 5040,
        "cache_hits": 1,
        "cache_hit_bytes": 5000,
    }


# -- a federation over Mosquitto -----------------------------------------------------------------

SHARDS = {"alice": TINY_CORPUS[0::2], "bob": TINY_CORPUS[1::2][:5]}


@pytest.mark.mosquitto
@pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto (CI installs it)")
def test_two_rounds_over_mosquitto(make_federation, tmp_path, tiny_llama_path, tiny_llm_path):
    """FedBiOT on the 3-layer LLM (adapter = top layer, middle 2 -> 1) with re-alignment every
    2nd round: round 2 reuses round 1's emulator, which the aggregator does not send again:
    alice serves it from her blob cache; bob keeps no cache and pulls it (resume request after
    the stall timeout). The final emulator is the re-aligned one."""
    from aggregator.config import AggregatorConfig
    from aggregator.service import AggregatorService
    from aggregator.state import StateStore
    from edge_sdk.client import EdgeClient

    paths = make_federation("fedbiot", list(SHARDS))
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    algo = {**BASE, "n_adapter_top": 1, "realign_every": 2}
    try:
        clients = [
            EdgeClient(
                paths.party_config(n),
                tiny_llama_path,
                SHARDS[n],
                eval_data=TINY_CORPUS[12:],
                profile=None,
                work_dir=tmp_path / n,
                progress=None,
                blob_cache_bytes=0 if n == "bob" else 2**30,
            )
            for n in SHARDS
        ]
        threads = [
            threading.Thread(target=c.run, kwargs={"max_idle_s": 60}, daemon=True) for c in clients
        ]
        for t in threads:
            t.start()
        cfg = AggregatorConfig(
            party_config=str(paths.party_config("aggregator")),
            state_dir=str(tmp_path / "agg"),
            algorithm="fedbiot",
            algorithm_config=algo,
            rounds=2,
            min_clients=2,
            round_deadline_s=60,
            wait_for_clients_s=30,
            final_wait_s=20,
            models={"slm": str(tiny_llama_path), "llm": str(tiny_llm_path)},
            public_data=TINY_CORPUS[:8],
        )
        status = AggregatorService(cfg, progress=None).run()
        for t in threads:
            t.join(60)
    finally:
        broker.stop()
    assert status["rounds_committed"] == 2
    with StateStore(tmp_path / "agg" / "state.db") as store:
        g1 = store.load_global(store.load_round(1, with_partial=False).info.global_digest).tensors
        g2 = store.load_global(store.load_round(2, with_partial=False).info.global_digest).tensors
        r1 = store.load_round(1, with_partial=False).info.metrics
        r2 = store.load_round(2, with_partial=False).info.metrics
    assert "align_steps" not in r1 and r2["align_steps"] == ALIGN["max_steps"]
    emulator_keys = [k for k in g1 if k.startswith("emulator/")]
    assert emulator_keys and any(
        not np.array_equal(g2[k], g1[k]) for k in emulator_keys
    )  # re-aligned
    alice, bob = clients
    emulator_bytes = alice.blob_stats["cache_hit_bytes"]  # round 2's emulator, read from the cache
    assert emulator_bytes > 0 and bob.blob_stats["cache_hits"] == 0
    for c in clients:
        assert [h["round"] for h in c.history] == [1, 2]
        assert "emulator" not in c.history[0]["blobs_from_cache"]
        assert c.history[0]["wire_bytes_down"] > emulator_bytes
        assert np.isfinite(c.final["nll_final"])  # the final, re-aligned emulator was fetched
        assert c.ctx.base_path != c.ctx.model_path  # trained on the emulator it received
    assert "emulator" in alice.history[1]["blobs_from_cache"]
    assert alice.history[1]["wire_bytes_down"] < emulator_bytes  # not sent again
    assert bob.history[1]["wire_bytes_down"] > emulator_bytes  # pulled on bob's own topic
