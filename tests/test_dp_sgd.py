"""Record-level DP-SGD on the device (algorithms/core/dp_sgd.py) on real tiny models (CPU).

The epsilon is checked against Opacus's own accountants, the clipping against per-example
gradients computed and clipped by hand, and fp32, nf4 and int8 bases are all trained.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from algorithms.core.dp_sgd import (
    DPSGDRun,
    DPSGDUnsupportedError,
    dp_sgd_epsilon,
    opacus_status,
    per_example_nll,
    plan_dp_sgd,
)
from algorithms.core.errors import TrainingError
from algorithms.core.modeling import (
    LoraSpec,
    adapter_state,
    attach_lora,
    bitsandbytes_status,
    is_quantized,
    load_adapter_state,
    load_causal_lm,
    set_gradient_checkpointing,
)
from algorithms.core.textdata import TokenizedDataset, evaluate_nll
from algorithms.core.training import TrainConfig, train_causal_lm
from tests.tiny_models import TINY_CORPUS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_opacus = pytest.mark.skipif(
    not opacus_status()[0], reason="opacus is not installed (the 'dpsgd' extra)"
)
SPEC = LoraSpec(r=4, alpha=8.0)
DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "seed": 1}


def _lora_model(path, quant: str = "fp32", spec: LoraSpec = SPEC):
    if quant in ("nf4", "int8") and not bitsandbytes_status()[0]:
        pytest.skip(f"bitsandbytes cannot quantize here: {bitsandbytes_status()[1]}")
    model, tok, report = load_causal_lm(path, quant=quant)
    assert report.quant == quant
    return attach_lora(model, spec, seed=0), tok


def _randomize(model, seed: int = 1, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    st = {n: torch.randn(t.shape, generator=gen) * scale for n, t in adapter_state(model).items()}
    load_adapter_state(model, st)
    return st


def _no_opacus_left(model) -> None:
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------------------------------------
# configuration


def test_dp_sgd_config_validation():
    for bad, match in (
        ([1.0], "dict"),
        ({"max_grad_norm": 1.0}, "exactly one"),
        ({"noise_multiplier": 1.0, "target_epsilon": 8.0, "max_grad_norm": 1.0}, "exactly one"),
        ({"noise_multiplier": -1.0, "max_grad_norm": 1.0}, "noise_multiplier"),
        ({"noise_multiplier": float("nan"), "max_grad_norm": 1.0}, "noise_multiplier"),
        ({"noise_multiplier": True, "max_grad_norm": 1.0}, "noise_multiplier"),
        ({"target_epsilon": 0, "max_grad_norm": 1.0}, "target_epsilon"),
        ({"noise_multiplier": 1.0}, "per-example clip"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0}, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 0}, "delta"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1.0}, "delta"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "accountant": "gdp"}, "accountant"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "seed": -1}, "seed"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "clip": 1.0}, "unknown keys"),
    ):
        with pytest.raises(TrainingError, match=match):
            TrainConfig(dp_sgd=bad)
    with pytest.raises(TrainingError, match="gradient_checkpointing"):
        TrainConfig(dp_sgd=DP, gradient_checkpointing=True)
    cfg = TrainConfig(dp_sgd={"target_epsilon": 4, "max_grad_norm": 0.5})
    assert cfg.dp_sgd == {
        "noise_multiplier": None,
        "target_epsilon": 4.0,
        "max_grad_norm": 0.5,
        "delta": 1e-5,
        "accountant": "rdp",
        "seed": None,
    }
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig().dp_sgd is None


# ---------------------------------------------------------------------------------------------
# refusals


def test_refuses_checkpointing_extra_loss_and_missing_opacus(tiny_llama_path, monkeypatch):
    model, tok = _lora_model(tiny_llama_path)
    ds = TokenizedDataset(tok, TINY_CORPUS, block_size=16)
    cfg = TrainConfig(max_steps=1, dp_sgd=DP)
    with pytest.raises(DPSGDUnsupportedError, match="extra_loss"):
        train_causal_lm(model, ds, cfg, progress=None, extra_loss=lambda m, b, o: o.logits.sum())
    set_gradient_checkpointing(model, True)
    with pytest.raises(DPSGDUnsupportedError, match="checkpointing"):
        train_causal_lm(model, ds, cfg, progress=None)
    set_gradient_checkpointing(model, False)
    monkeypatch.setitem(sys.modules, "opacus", None)  # import opacus -> ImportError
    with pytest.raises(DPSGDUnsupportedError, match="dpsgd"):
        train_causal_lm(model, ds, cfg, progress=None)
    assert issubclass(DPSGDUnsupportedError, TrainingError)


@needs_opacus
def test_unreachable_target_epsilon_is_a_config_error():
    with pytest.raises(TrainingError, match="not reachable"):
        plan_dp_sgd(
            {"target_epsilon": 1e-9, "max_grad_norm": 1.0, "delta": 1e-5}, 10, 10, 1000
        )


# ---------------------------------------------------------------------------------------------
# accounting


@needs_opacus
def test_epsilon_is_opacus_accountants(tiny_llama_path):
    from opacus.accountants import PRVAccountant, RDPAccountant

    model, tok = _lora_model(tiny_llama_path)
    ds = TokenizedDataset(tok, TINY_CORPUS, block_size=16)
    n = ds.num_examples
    q = 4 / n
    for accountant, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        dp = {"noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5, "seed": 2,
              "accountant": accountant}
        res = train_causal_lm(
            model, ds, TrainConfig(batch_size=4, max_steps=7, dp_sgd=dp), progress=None
        )
        assert res.steps == 7 and res.dp_sgd["steps"] == 7
        acc = cls()
        for _ in range(7):
            acc.step(noise_multiplier=1.1, sample_rate=q)
        expected = acc.get_epsilon(delta=1e-5)
        assert res.dp_sgd_epsilon == pytest.approx(expected, rel=1e-9)
        assert res.dp_sgd["sample_rate"] == pytest.approx(q)
        assert res.dp_sgd["noise_multiplier"] == 1.1 and res.dp_sgd["delta"] == 1e-5
        assert res.to_dict()["dp_sgd_epsilon"] == res.dp_sgd_epsilon  # reaches the metrics
        assert dp_sgd_epsilon(1.1, q, 7, 1e-5, accountant) == pytest.approx(expected, rel=1e-9)
    _no_opacus_left(model)
    assert train_causal_lm(model, ds, TrainConfig(max_steps=1), progress=None).dp_sgd is None
    assert dp_sgd_epsilon(0.0, q, 7, 1e-5) == math.inf


@needs_opacus
def test_target_epsilon_solves_the_noise(tiny_llama_path):
    model, tok = _lora_model(tiny_llama_path)
    ds = TokenizedDataset(tok, TINY_CORPUS, block_size=16)
    dp = {"target_epsilon": 3.0, "max_grad_norm": 1.0, "seed": 0}
    res = train_causal_lm(model, ds, TrainConfig(batch_size=4, max_steps=10, dp_sgd=dp),
                          progress=None)
    z = res.dp_sgd["noise_multiplier"]
    assert z > 0 and res.dp_sgd["planned_steps"] == 10
    assert 2.9 <= res.dp_sgd_epsilon <= 3.0  # Opacus solves to within 0.01 below the target
    assert res.dp_sgd_epsilon == pytest.approx(
        dp_sgd_epsilon(z, 4 / ds.num_examples, 10, 1e-5), rel=1e-9
    )


# ---------------------------------------------------------------------------------------------
# the mechanism


@needs_opacus
@pytest.mark.parametrize("quant", ["fp32", "nf4", "int8"])
def test_per_example_clipping_matches_hand_clipping(tiny_llama_path, quant):
    """noise 0: the step's gradient is the mean of the hand-clipped per-example gradients, over
    two micro-batches (Opacus's virtual steps), on plain and on quantized bases."""
    model, tok = _lora_model(tiny_llama_path, quant=quant)
    _randomize(model)
    model.train()
    ds = TokenizedDataset(tok, TINY_CORPUS, block_size=16)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = [0, 3, 5, 8]
    per_example = []
    for r in rows:
        b = ds.collate([r])
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        nll, count = per_example_nll(out.logits, b["labels"])
        per_example.append(torch.autograd.grad((nll / count).sum(), list(params.values())))
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in gs)) for gs in per_example]
    lo = sorted(norms)
    clip = (lo[0] + lo[1]) / 2  # one row kept whole, three clipped
    plan = plan_dp_sgd(
        {"noise_multiplier": 0.0, "max_grad_norm": clip}, ds.num_examples, len(rows), 1
    )
    assert plan.expected_batch_size == pytest.approx(len(rows))
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3)
    run = DPSGDRun(model, opt, params, plan, torch.device("cpu"))
    try:
        loss, ok = run.accumulate([ds.collate(rows[:2]), ds.collate(rows[2:])])
        assert ok and math.isfinite(loss)
        # Opacus's per-example gradients of the last micro-batch are the hand-computed ones
        for j, p in enumerate(params.values()):
            for i in (2, 3):
                torch.testing.assert_close(p.grad_sample[i - 2], per_example[i][j],
                                           atol=1e-6, rtol=1e-4)
        factors = [min(1.0, clip / (nrm + 1e-6)) for nrm in norms]
        assert sum(f == 1.0 for f in factors) == 1
        for j, (name, p) in enumerate(params.items()):
            expected = sum(f * gs[j] for f, gs in zip(factors, per_example, strict=True))
            torch.testing.assert_close(p.grad, expected / len(rows), atol=1e-7, rtol=1e-4,
                                       msg=name)
        # each row moves the summed gradient by at most the clip bound
        assert all(f * nrm <= clip * (1 + 1e-5) for f, nrm in zip(factors, norms, strict=True))
    finally:
        run.close()
    _no_opacus_left(model)


@needs_opacus
def test_noise_follows_the_dp_seed(tiny_llama_path):
    model, tok = _lora_model(tiny_llama_path)
    start = _randomize(model)
    ds = TokenizedDataset(tok, TINY_CORPUS, block_size=16)

    def run(dp_extra: dict) -> dict[str, torch.Tensor]:
        load_adapter_state(model, start)
        dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, **dp_extra}
        res = train_causal_lm(
            model, ds, TrainConfig(lr=1e-2, batch_size=4, max_steps=3, dp_sgd=dp), progress=None
        )
        assert res.steps == 3
        return adapter_state(model)

    a, b, c = run({"seed": 5}), run({"seed": 5}), run({"seed": 6})
    assert _same(a, b) and not _same(a, c)
    # without a seed the sampling and the noise come from OS entropy: never reproducible
    assert not _same(run({}), run({}))
    # the noise is really there: same seed (same batches), no noise -> another result
    assert not _same(a, run({"seed": 5, "noise_multiplier": 0.0}))


@needs_opacus
def test_grad_accum_is_virtual_steps(tiny_llama_path):
    """batch 2 x accum 2 draws the same Poisson batches (q = 4 / rows) and noise as batch 4 and
    gives the same trajectory; only the micro-batching differs."""
    model, tok = _lora_model(tiny_llama_path)
    start = _randomize(model)
    ds = TokenizedDataset(tok, TINY_CORPUS, block_size=16)
    out = []
    for bs, acc in ((4, 1), (2, 2)):
        load_adapter_state(model, start)
        res = train_causal_lm(
            model, ds, TrainConfig(lr=1e-3, batch_size=bs, grad_accum=acc, max_steps=3,
                                   dp_sgd={**DP, "noise_multiplier": 0.3}),
            progress=None,
        )
        out.append((res, adapter_state(model)))
    (r1, s1), (r2, s2) = out
    q = 4 / ds.num_examples
    assert r1.dp_sgd["sample_rate"] == r2.dp_sgd["sample_rate"] == pytest.approx(q)
    assert r1.examples == r2.examples and r1.tokens == r2.tokens
    for a, b in zip(r1.losses, r2.losses, strict=True):
        assert abs(a - b) < 1e-5
    for n in s1:
        torch.testing.assert_close(s2[n], s1[n], atol=1e-5, rtol=0)


@needs_opacus
def test_fedprox_term_still_pulls_under_dp(tiny_llama_path):
    model, tok = _lora_model(tiny_llama_path)
    start = _randomize(model)
    ds = TokenizedDataset(tok, TINY_CORPUS, block_size=16)

    def drift(mu: float) -> float:
        load_adapter_state(model, start)
        cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=8, proximal_mu=mu,
                          dp_sgd={**DP, "noise_multiplier": 0.5})
        train_causal_lm(model, ds, cfg, progress=None)
        now = adapter_state(model)
        return math.sqrt(sum(float((now[n] - start[n]).pow(2).sum()) for n in now))

    assert drift(1e4) < 0.5 * drift(0.0)


@needs_opacus
def test_training_still_lowers_the_loss(tiny_llama_path):
    model, tok = _lora_model(tiny_llama_path, spec=LoraSpec(r=8, alpha=16.0))
    ds = TokenizedDataset(tok, TINY_CORPUS[:8], block_size=16)
    before = evaluate_nll(model, tok, ds, batch_size=8)
    cfg = TrainConfig(lr=3e-2, epochs=15, batch_size=4, warmup=2,
                      dp_sgd={"noise_multiplier": 0.1, "max_grad_norm": 1.0, "seed": 0})
    res = train_causal_lm(model, ds, cfg, progress=None)
    after = evaluate_nll(model, tok, ds, batch_size=8)
    assert res.stopped_by == "epochs" and res.steps == 15 * math.ceil(ds.num_examples / 4)
    assert res.dp_sgd["steps"] == res.steps
    # with seed 0 one Poisson draw is empty: a noise-only step, with no loss recorded
    assert res.dp_sgd["empty_steps"] >= 1
    assert len(res.losses) == res.steps - res.dp_sgd["empty_steps"]
    assert after.nll < before.nll - 0.2, (before, after)
    assert math.isfinite(res.dp_sgd_epsilon) and res.dp_sgd_epsilon > 0


@needs_opacus
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_base_trains(tiny_llama_path, quant):
    model, tok = _lora_model(tiny_llama_path, quant=quant)
    assert is_quantized(model)
    start = adapter_state(model)
    ds = TokenizedDataset(tok, TINY_CORPUS, block_size=16)
    res = train_causal_lm(
        model, ds, TrainConfig(lr=1e-2, batch_size=4, max_steps=4, dp_sgd=DP), progress=None
    )
    assert res.steps == 4 and res.stopped_by == "max_steps"
    assert res.dp_sgd_epsilon == pytest.approx(
        dp_sgd_epsilon(1.0, 4 / ds.num_examples, 4, 1e-5), rel=1e-9
    )
    assert not _same(start, adapter_state(model))
    _no_opacus_left(model)
