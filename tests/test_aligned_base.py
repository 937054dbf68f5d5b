"""The aligned SLM base (FedPT, FedCoLLM): the server distils the base LLM into a full copy of
the SLM before round 1; that copy is the clients' base (sent once as a checked checkpoint blob),
FedPT's anti-expert, and part of the state, so a restarted aggregator sends the same bytes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from aggregator.context import ServerContext
from algorithms.base import ConfigError
from algorithms.core.aligned_base import BASE, BASES_DIR, BaseBlobError, use_sent_base
from algorithms.core.kd import kd_loss
from algorithms.core.modeling import load_causal_lm
from algorithms.core.state_parts import part
from algorithms.core.textdata import TokenizedDataset
from algorithms.fedcollm import FedCoLLMServer
from algorithms.fedpt import FedPTConfig
from algorithms.fedpt.client import FedPTClient
from algorithms.fedpt.server import FedPTServer
from bridge.messages import Task
from edge_sdk.context import DeviceContext
from tests.tiny_models import TINY_CORPUS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = {"lr": 5e-3, "batch_size": 4, "block_size": 16, "max_steps": 2}
DISTILL = {"batch_size": 4, "block_size": 16, "max_steps": 2}
ALIGN = {"batch_size": 4, "block_size": 16, "max_steps": 30, "lr": 3e-3, "warmup": 0}


def _ctx(tmp_path, slm, llm):
    return ServerContext(str(tmp_path), 0, {"slm": str(slm), "llm": str(llm)}, TINY_CORPUS[:8])


def _kl_to_llm(model, llm, tok) -> float:
    ds = TokenizedDataset(tok, TINY_CORPUS[:8], 16)
    total, n = 0.0, 0
    with torch.no_grad():
        for b in ds.batches(8, shuffle=False):
            s = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            t = llm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(kd_loss(s, t, b["attention_mask"])) * len(b["input_ids"])
            n += len(b["input_ids"])
    return total / n


def test_alignment_moves_the_slm_base_toward_the_llm(tmp_path, tiny_llama_path, tiny_llm_path):
    server = FedPTServer({"train": TRAIN, "distill": DISTILL, "align_base": ALIGN}, _ctx(tmp_path, tiny_llama_path,
                                                                                           tiny_llm_path))
    state = server.initial_state()
    base = part(state, BASE)
    orig, tok, _ = load_causal_lm(tiny_llama_path)
    llm, _, _ = load_causal_lm(tiny_llm_path)
    assert set(base) == {k for k, _ in orig.named_parameters()}
    assert any(not np.allclose(base[k], p.detach().numpy()) for k, p in orig.named_parameters())
    assert _kl_to_llm(server._plain, llm, tok) < 0.8 * _kl_to_llm(orig, llm, tok)
    assert server.align_metrics["align_steps"] == 30
    # the student and expert start from the aligned base: a fresh adapter is the aligned base itself
    ids = tok(TINY_CORPUS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = server._plain(**ids).logits
        b = server._student(**ids).logits
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("server_cls", [FedPTServer, FedCoLLMServer])
def test_base_blob_is_deterministic_and_survives_a_restart(server_cls, tmp_path, tiny_llama_path, tiny_llm_path):
    cfg = {"train": TRAIN, "distill": DISTILL, "align_base": ALIGN, "llm_lora": {"r": 4, "alpha": 8}}
    first = server_cls(cfg, _ctx(tmp_path, tiny_llama_path, tiny_llm_path))
    state = first.initial_state()
    plan = first.plan_round(1, state)
    assert plan.blobs[BASE] == first.plan_round(2, state).blobs[BASE]
    out = first.finish_round(1, state, {k: v for k, v in state.items() if "/" not in k})
    assert set(part(out.state, BASE)) == set(part(state, BASE))  # carried, unchanged
    assert all(np.array_equal(part(out.state, BASE)[k], part(state, BASE)[k]) for k in part(state, BASE))
    # a restarted aggregator rebuilds everything from the state, without aligning again
    again = server_cls(cfg, _ctx(tmp_path, tiny_llama_path, tiny_llm_path))
    assert again.plan_round(2, out.state).blobs[BASE] == plan.blobs[BASE]
    assert again.align_metrics == {}
    # a state from a federation started without alignment is refused, not silently re-aligned
    plain = {k: v for k, v in out.state.items() if not k.startswith(BASE + "/")}
    with pytest.raises(ConfigError, match="no aligned base"):
        server_cls(cfg, _ctx(tmp_path, tiny_llama_path, tiny_llm_path)).plan_round(2, plain)


def test_client_trains_on_the_sent_base_and_refuses_a_bad_one(tmp_path, tiny_llama_path, tiny_llm_path):
    cfg = FedPTConfig.from_dict({"train": TRAIN, "distill": DISTILL, "align_base": ALIGN})
    server = FedPTServer(cfg.to_dict(), _ctx(tmp_path, tiny_llama_path, tiny_llm_path))
    state = server.initial_state()
    plan = server.plan_round(1, state)
    ctx = DeviceContext("c0", tiny_llama_path, TINY_CORPUS[:6], TINY_CORPUS[6:9], progress=None,
                        work_dir=tmp_path / "device")
    blob = plan.blobs[BASE]
    for bad, why in ((blob[:100], "too short|header"), (b"x" * 4096, "header|not a cotune"),
                     (blob.replace(b"cotune.slm-base", b"cotune.emulator"), "format")):
        with pytest.raises(BaseBlobError, match=why):
            use_sent_base({BASE: bad}, ctx)
    assert not (tmp_path / "device" / BASES_DIR).exists()  # nothing written for a refused blob
    report = FedPTClient().run(Task(round=1, algorithm="fedpt", config=plan.config), plan.blobs, ctx)
    assert ctx.base_path.endswith(hashlib.sha256(blob).hexdigest())
    assert np.isfinite(report.metrics["nll_after"])
    # the device's memory plan still holds: the sent base has its own model's architecture
    mine, _, _ = load_causal_lm(tiny_llama_path)
    sent, _, _ = load_causal_lm(ctx.base_path)
    assert [tuple(p.shape) for p in mine.parameters()] == [tuple(p.shape) for p in sent.parameters()]
    # without a base blob the device goes back to its own model
    use_sent_base({}, ctx)
    assert ctx.base_path == str(tiny_llama_path)


def test_align_base_null_keeps_the_devices_own_base(tmp_path, tiny_llama_path, tiny_llm_path):
    server = FedPTServer({"train": TRAIN, "distill": DISTILL, "align_base": None},
                         _ctx(tmp_path, tiny_llama_path, tiny_llm_path))
    state = server.initial_state()
    assert not part(state, BASE)
    assert BASE not in server.plan_round(1, state).blobs and BASE not in server.final_blobs(state)
    with pytest.raises(ConfigError, match="align_base"):
        FedPTConfig.from_dict({"align_base": {"no_such_field": 1}})
    with pytest.raises(ConfigError, match="align_base"):
        FedPTConfig.from_dict({"align_base": 5})
