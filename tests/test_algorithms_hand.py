"""The algorithms' server steps against values worked out by hand (in the comments), so a wrong
sign, direction, temperature or teacher fails here and not only as a worse benchmark:

- FedCoLLM's mutual distillation on a 3-token vocabulary: both KL terms (the LLM learns from the
  SLM, the SLM from the LLM), their temperature, the task terms, the gradients each model gets
  (each teacher detached) and one optimizer step moving each model towards the other; its
  proxy-tuned LLM teacher built on the *base* LLM;
- FedPT's proxy teacher (``z_LLM + alpha (z_tuned - z_base)``, local and memoised black-box
  LLM), the loss and gradient of its distillation step on one fixed batch, and the server
  distilling the proxy built on the *new* aggregate into a student that starts from it;
- FedBiOT's emulator alignment: the teacher is the full LLM carrying the *new* aggregated
  adapter (plugged in by layer position), checked against an independent weight merge;
- FedMKT across two tokenizers: a WordPiece receiver and a byte-level BPE / SentencePiece pair
  of teachers splitting the same words differently: the MinED map (with its tie rule), DualMinCE
  per sample, the target rows and the soft-target CE on them.

The 3-token "models" below are tables of logits (the same row at every position), so every
number is a few lines of arithmetic; the wiring tests use the tiny Llamas of the conftest."""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from algorithms.core.distill import DistillConfig, distill, mutual_distill
from algorithms.core.textdata import TokenizedDataset
from algorithms.core.token_alignment import Vocabulary, build_vocab_map, dual_min_ce_batch
from algorithms.fedmkt.targets import aligned_targets, topk_kd_loss
from algorithms.fedpt.proxy import ProxyTeacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LN2, LN3 = math.log(2.0), math.log(3.0)


class _Chars:
    """A tokenizer of the vocabulary a, b, c (ids 0, 1, 2; one token a character; no eos)."""

    pad_token_id = 2
    eos_token_id = None

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [["abc".index(ch) for ch in t] for t in texts]}


def _abba() -> TokenizedDataset:
    """One row "abba" = [0, 1, 1, 0]: positions 0..2 predict [1, 1, 0], so the empirical target
    distribution of the task CE is y = [1/3, 2/3, 0]."""
    ds = TokenizedDataset(_Chars(), ["abba"], block_size=4)
    assert ds.input_ids.tolist() == [[0, 1, 1, 0]] and ds.labels.tolist() == [[0, 1, 1, 0]]
    return ds


Y = torch.tensor([1 / 3, 2 / 3, 0.0])


class _Table(torch.nn.Module):
    """A model over the 3-token vocabulary whose logits are the same row at every position: a
    frozen base row plus a trainable adapter row, which ``disable_adapter`` drops (as peft's
    does). ``grads`` records the gradient of every backward pass (before clipping)."""

    def __init__(self, base, delta=(0.0, 0.0, 0.0)):
        super().__init__()
        self.register_buffer("base", torch.tensor(base, dtype=torch.float32))
        self.delta = torch.nn.Parameter(torch.tensor(delta, dtype=torch.float32))
        self.adapter_on = True
        self.grads: list[torch.Tensor] = []
        self.delta.register_hook(lambda g: self.grads.append(g.detach().clone()))

    @contextmanager
    def disable_adapter(self):
        self.adapter_on = False
        try:
            yield
        finally:
            self.adapter_on = True

    def row(self) -> torch.Tensor:
        return (self.base + self.delta) if self.adapter_on else self.base

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.row().expand(*input_ids.shape, 3))


def _p(logits) -> torch.Tensor:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), -1)


def _kl(p, q) -> float:
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    return float((p * (p / q).log()).sum())


def _close(got: torch.Tensor, want, atol=1e-6):
    np.testing.assert_allclose(got.double().numpy(), np.asarray(want, dtype=np.float64), atol=atol)


# -- FedCoLLM: mutual distillation ------------------------------------------------------------
# LLM f: logits [ln 2, 0, 0] -> f = [1/2, 1/4, 1/4]; SLM g: logits [0, 0, 0] -> g = [1/3]*3.
# The pair is not symmetric (KL(g || f) != KL(f || g)), so swapping a direction fails.


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fedcollm_both_losses_and_gradients_on_three_tokens(temperature):
    """Pins ``L_f + L_g`` with ``L_f = w CE(f) + lam T^2 KL(g_T || f_T)`` (the LLM learns from
    the SLM) and ``L_g = w CE(g) + lam T^2 KL(f_T || g_T)`` (the SLM learns from the LLM), each
    teacher detached, ``x_T = softmax(z / T)``.

    T = 1: KL(g || f) = sum 1/3 ln((1/3) / f_i) = -ln 3 + 1/3 (ln 2 + 2 ln 4) = 5/3 ln 2 - ln 3;
    KL(f || g) = ln 3 + sum f ln f = ln 3 - 3/2 ln 2.
    T = 2: f_T = [sqrt 2, 1, 1] / (2 + sqrt 2), g_T uniform; times T^2 = 4:
    4 KL(g_T || f_T) = 4 (ln(2 + sqrt 2) - ln 3 - ln 2 / 6),
    4 KL(f_T || g_T) = 4 (ln 3 + sqrt 2 / (2 + sqrt 2) ln sqrt 2 - ln(2 + sqrt 2)).
    The task terms are T-free: CE(f) over targets [1, 1, 0] = (ln 4 + ln 4 + ln 2) / 3 = 5/3 ln 2,
    CE(g) = ln 3. Gradients (d/dz of a T^2-scaled KL at T is T (student_T - teacher_T)):
    dL/dz_f = w (f - y) + lam T (f_T - g_T), dL/dz_g = w (g - y) + lam T (g_T - f_T)."""
    t, w, lam = temperature, 1.0, 0.5
    llm, slm = _Table([LN2, 0.0, 0.0]), _Table([0.0, 0.0, 0.0])
    cfg = DistillConfig(max_steps=1, batch_size=1, block_size=4, lr=0.1, lambda_kd=lam,
                        task_weight=w, temperature=t, schedule="constant")
    m = mutual_distill(llm, slm, _abba(), cfg)
    if t == 1.0:
        kd_llm, kd_slm = 5 / 3 * LN2 - LN3, LN3 - 1.5 * LN2
    else:
        s2 = math.sqrt(2.0)
        kd_llm = 4 * (math.log(2 + s2) - LN3 - LN2 / 6)
        kd_slm = 4 * (LN3 + s2 / (2 + s2) * math.log(s2) - math.log(2 + s2))
    assert abs(kd_llm - kd_slm) > 1e-3  # the directions are told apart
    assert m["kd_llm_first"] == pytest.approx(kd_llm, abs=1e-6)
    assert m["kd_slm_first"] == pytest.approx(kd_slm, abs=1e-6)
    assert m["ce_llm_first"] == pytest.approx(5 / 3 * LN2, abs=1e-6)
    assert m["ce_slm_first"] == pytest.approx(LN3, abs=1e-6)
    want = w * (5 / 3 * LN2 + LN3) + lam * (kd_llm + kd_slm)
    assert m["loss_first"] == pytest.approx(want, abs=1e-6)
    f, g = _p([LN2, 0, 0]), _p([0, 0, 0])
    f_t, g_t = _p([LN2 / t, 0, 0]), _p([0, 0, 0])
    _close(llm.grads[0], w * (f - Y.double()) + lam * t * (f_t - g_t))
    _close(slm.grads[0], w * (g - Y.double()) + lam * t * (g_t - f_t))


def test_fedcollm_one_step_moves_each_model_towards_the_other():
    """Pure KD (w = 0, lam = 1): dL/dz_f = f - g = [1/6, -1/12, -1/12] and dL/dz_g = g - f. The
    first AdamW step (no decay, constant lr 0.1) moves each logit by -lr sign(gradient) (Adam's
    first step is g / |g|), so z_f -> [ln 2 - 0.1, 0.1, 0.1] and z_g -> [0.1, -0.1, -0.1]: each
    model moves towards the other and both KLs drop, to the values of those logits. A flipped
    sign would move them apart and raise both KLs."""
    llm, slm = _Table([LN2, 0.0, 0.0]), _Table([0.0, 0.0, 0.0])
    cfg = DistillConfig(max_steps=1, batch_size=1, block_size=4, lr=0.1, lambda_kd=1.0,
                        task_weight=0.0, schedule="constant")
    mutual_distill(llm, slm, _abba(), cfg)
    _close(llm.delta.detach(), [-0.1, 0.1, 0.1])
    _close(slm.delta.detach(), [0.1, -0.1, -0.1])
    f0, g0 = _p([LN2, 0, 0]), _p([0, 0, 0])
    f1, g1 = _p([LN2 - 0.1, 0.1, 0.1]), _p([0.1, -0.1, -0.1])
    assert _kl(g1, f1) < _kl(g0, f0) and _kl(f1, g1) < _kl(f0, g0)
    # the losses after the step, recomputed by the same step on the moved tables
    cfg_eval = DistillConfig(max_steps=1, batch_size=1, block_size=4, lr=1e-9, lambda_kd=1.0,
                             task_weight=0.0, schedule="constant")
    m = mutual_distill(llm, slm, _abba(), cfg_eval)
    assert m["kd_llm_first"] == pytest.approx(_kl(g1, f1), abs=1e-6)
    assert m["kd_slm_first"] == pytest.approx(_kl(f1, g1), abs=1e-6)


def test_fedcollm_proxy_teacher_is_built_on_the_base_llm():
    """``llm_teacher="proxy"``: the LLM distils from ``f_base + alpha (g - g_base)``, not from
    the SLM and not from its own moving logits. f_base = [ln 2, 0, 0], f = f_base + [0, 0, ln 2]
    = [ln 2, 0, ln 2] -> f = [2/5, 1/5, 2/5]; g_base = 0, g = [0, ln 2, 0] -> g = [1/4, 1/2, 1/4].
    alpha 1: target [ln 2, ln 2, 0] -> p = [2/5, 2/5, 1/5] (built on the current f it would be
    uniform). KL(p || f) = 2/5 ln 2 + 1/5 ln 1/2 = 1/5 ln 2. The SLM's side is unchanged:
    KL(f || g) = 2 * 2/5 ln(8/5) + 1/5 ln(2/5). Gradients (w = 0, lam = 1): dz_f = f - p =
    [0, -1/5, 1/5]; dz_g = g - f only (the proxy target built from g is detached)."""
    llm = _Table([LN2, 0.0, 0.0], delta=[0.0, 0.0, LN2])
    slm = _Table([0.0, 0.0, 0.0], delta=[0.0, LN2, 0.0])
    cfg = DistillConfig(max_steps=1, batch_size=1, block_size=4, lr=0.1, lambda_kd=1.0,
                        task_weight=0.0, schedule="constant")
    m = mutual_distill(llm, slm, _abba(), cfg, llm_teacher="proxy", alpha=1.0)
    assert m["kd_llm_first"] == pytest.approx(LN2 / 5, abs=1e-6)
    assert m["kd_slm_first"] == pytest.approx(0.8 * math.log(1.6) + 0.2 * math.log(0.4), abs=1e-6)
    _close(llm.grads[0], [0.0, -0.2, 0.2])
    _close(slm.grads[0], [0.25 - 0.4, 0.5 - 0.2, 0.25 - 0.4])


# -- FedPT: the proxy teacher and its distillation --------------------------------------------
class _LLM:
    """A backend answering ``logprobs(ids, mask)`` with one fixed row at every position."""

    def __init__(self, row, kind="local"):
        self.row, self.kind, self.calls = torch.as_tensor(row, dtype=torch.float32), kind, 0

    def logprobs(self, input_ids, attention_mask=None):
        self.calls += 1
        return self.row.expand(*input_ids.shape, 3).clone()


@pytest.mark.parametrize(
    "alpha, want",
    [
        # z = z_LLM + alpha (z_tuned - z_base) = [0, ln 2, 0] + alpha [ln 2, 0, 0]
        (0.0, [1 / 4, 1 / 2, 1 / 4]),  # the LLM alone
        (1.0, [2 / 5, 2 / 5, 1 / 5]),  # [ln 2, ln 2, 0]
        (2.0, [4 / 7, 2 / 7, 1 / 7]),  # [2 ln 2, ln 2, 0]
        (-1.0, [1 / 7, 4 / 7, 2 / 7]),  # [-ln 2, ln 2, 0]: the sign of the difference
    ],
)
def test_fedpt_proxy_teacher_on_three_tokens(alpha, want):
    """Pins the proxy target ``log_softmax(z_LLM + alpha (z_expert - z_anti))``: the LLM's
    log-probabilities log [1/4, 1/2, 1/4], the expert = SLM base [1, 1, 1] + adapter [ln 2, 0, 0],
    the anti-expert the same SLM with the adapter disabled (the constant base row cancels)."""
    expert = _Table([1.0, 1.0, 1.0], delta=[LN2, 0.0, 0.0])
    expert.train()
    teacher = ProxyTeacher(_LLM(torch.log(torch.tensor([0.25, 0.5, 0.25]))), expert, alpha)
    batch = _abba().collate([0])
    out = teacher(batch)
    assert out.shape == (1, 4, 3)
    _close(out.exp()[0], [want] * 4)
    assert expert.training and expert.adapter_on  # the expert is handed back as it was


def test_fedpt_proxy_teacher_with_a_memoised_black_box():
    """A black-box LLM answers logits [0, 1, 0] (exact in the float16 memo); alpha 1 adds
    [ln 2, 0, 0]: p = [2, e, 1] / (3 + e). The second batch of the same row is served from the
    memo without a request."""
    llm = _LLM([0.0, 1.0, 0.0], kind="blackbox")
    teacher = ProxyTeacher(llm, _Table([0.0, 0.0, 0.0], delta=[LN2, 0.0, 0.0]))
    batch = _abba().collate([0])
    e = math.e
    for _ in range(2):
        _close(teacher(batch).exp()[0], [[2 / (3 + e), e / (3 + e), 1 / (3 + e)]] * 4)
    assert llm.calls == 1 and (teacher.llm.misses, teacher.llm.hits) == (1, 1)


def test_fedpt_distillation_step_loss_and_gradient_on_one_batch():
    """Pins ``w CE(q) + lam KL(p || q)`` of the server's distillation step, p the proxy target
    (alpha 1: p = [2/5, 2/5, 1/5], as above), q the student [0, ln 2, 0] -> [1/4, 1/2, 1/4].
    CE over targets [1, 1, 0] = (ln 2 + ln 2 + ln 4) / 3 = 4/3 ln 2;
    KL(p || q) = 2/5 ln(8/5) + 2/5 ln(4/5) + 1/5 ln(4/5) = 2/5 ln(8/5) + 3/5 ln(4/5).
    The student's gradient: w (q - y) + lam (q - p), the teacher fixed. KL(q || p) (the
    reverse) would be 1/4 ln(5/8) + 1/2 ln(5/4) + 1/4 ln(5/4), another number."""
    w, lam = 1.0, 0.5
    expert = _Table([0.0, 0.0, 0.0], delta=[LN2, 0.0, 0.0])
    teacher = ProxyTeacher(_LLM(torch.log(torch.tensor([0.25, 0.5, 0.25]))), expert, 1.0)
    student = _Table([0.0, 0.0, 0.0], delta=[0.0, LN2, 0.0])
    cfg = DistillConfig(max_steps=1, batch_size=1, block_size=4, lr=0.1, lambda_kd=lam,
                        task_weight=w, schedule="constant")
    m = distill(student, _abba(), teacher, cfg)
    kl = 0.4 * math.log(1.6) + 0.6 * math.log(0.8)
    assert abs(kl - (0.25 * math.log(5 / 8) + 0.75 * math.log(1.25))) > 1e-3
    assert m["ce_first"] == pytest.approx(4 / 3 * LN2, abs=1e-6)
    assert m["kd_first"] == pytest.approx(kl, abs=1e-6)
    assert m["loss_first"] == pytest.approx(w * 4 / 3 * LN2 + lam * kl, abs=1e-6)
    q, p = torch.tensor([0.25, 0.5, 0.25]), torch.tensor([0.4, 0.4, 0.2])
    _close(student.grads[0], w * (q - Y) + lam * (q - p))
    assert expert.grads == []  # the teacher is never differentiated


def _random_adapter(keys_shapes: dict, seed: int, scale: float = 0.3) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in keys_shapes.items()}


def test_fedpt_server_distils_the_proxy_of_the_new_aggregate(
    tmp_path, tiny_llama_path, tiny_llm_path, monkeypatch
):
    """The round's distillation target is ``log_softmax(log p_LLM + alpha (z_SLM+new -
    z_SLM))`` with the NEW aggregate as the expert (recomputed here from freshly loaded models),
    not last round's expert, and the student starts from the new aggregate."""
    import algorithms.fedpt.server as fedpt_server
    from aggregator.context import ServerContext
    from algorithms.core.modeling import attach_lora, load_adapter_state, load_causal_lm
    from algorithms.core.state_parts import client_part, join
    from tests.tiny_models import TINY_CORPUS

    alpha = 2.0
    cfg = {"train": {"lr": 5e-3, "batch_size": 4, "block_size": 16, "max_steps": 1},
           "distill": {"batch_size": 4, "block_size": 16, "max_steps": 1}, "align_base": None,
           "alpha": alpha, "lora": {"r": 4, "alpha": 8}}
    ctx = ServerContext(str(tmp_path), 0, {"slm": str(tiny_llama_path), "llm": str(tiny_llm_path)},
                        TINY_CORPUS[:4])
    server = fedpt_server.FedPTServer(cfg, ctx)
    shapes = {k: v.shape for k, v in client_part(server.initial_state()).items()}
    old, new = _random_adapter(shapes, 1), _random_adapter(shapes, 2)
    state = join(old, expert=old)

    slm, tok, _ = load_causal_lm(tiny_llama_path)
    llm, _, _ = load_causal_lm(tiny_llm_path)
    batch = TokenizedDataset(tok, TINY_CORPUS[4:6], 16).collate([0, 1])
    seen = {}
    real = fedpt_server.distill

    def spy(student, data, teacher, dcfg, **kw):
        with torch.no_grad():
            seen["target"] = teacher(batch)
            seen["student"] = student(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).logits
        return real(student, data, teacher, dcfg, **kw)

    monkeypatch.setattr(fedpt_server, "distill", spy)
    server.finish_round(1, state, new)

    def slm_with(adapter):
        m = attach_lora(copy.deepcopy(slm), server.config.lora_spec(), seed=0)
        load_adapter_state(m, {k: torch.from_numpy(v) for k, v in adapter.items()})
        return m.eval()

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        z_llm = torch.log_softmax(llm.eval()(input_ids=ids, attention_mask=mask).logits, -1)
        z_base = slm.eval()(input_ids=ids, attention_mask=mask).logits
        z_new = slm_with(new)(input_ids=ids, attention_mask=mask).logits
        z_old = slm_with(old)(input_ids=ids, attention_mask=mask).logits
    want = torch.log_softmax(z_llm + alpha * (z_new - z_base), -1)
    stale = torch.log_softmax(z_llm + alpha * (z_old - z_base), -1)
    real_rows = mask.bool()
    got = seen["target"][real_rows]
    np.testing.assert_allclose(got.numpy(), want[real_rows].numpy(), atol=1e-4)
    assert (got - stale[real_rows]).abs().max() > 1e-2
    np.testing.assert_allclose(seen["student"][real_rows].numpy(), z_new[real_rows].numpy(),
                               atol=1e-4)


# -- FedBiOT: the alignment teacher carries the new adapter -----------------------------------
def test_fedbiot_alignment_teacher_carries_the_new_adapter(tmp_path, tiny_llm6_path, monkeypatch):
    """Pins ``KL(p_emulator+adapter || p_full+adapter)``'s teacher: in ``finish_round`` the full
    LLM handed to the alignment carries the NEW aggregated adapter, plugged in by layer position
    (6 layers, top-2 adapter, drop 0.5: emulator layers 2, 3 are full layers 4, 5), and so does
    the emulator. Expected logits: a fresh copy of the LLM with ``W += (alpha / r) B A`` added
    by hand on full layers 4, 5; the old adapter's copy must differ."""
    import algorithms.fedbiot.server as fedbiot_server
    from aggregator.context import ServerContext
    from algorithms.core.modeling import load_causal_lm
    from algorithms.core.state_parts import client_part, join, part
    from tests.tiny_models import TINY_CORPUS

    cfg = {"train": {"lr": 5e-3, "batch_size": 4, "block_size": 16, "max_steps": 1},
           "lora": {"r": 4, "alpha": 8}, "pre_align_steps": 0,
           "align": {"max_steps": 1, "batch_size": 4, "block_size": 16, "eval_batches": 1}}
    server = fedbiot_server.FedBiOTServer(cfg, ServerContext(str(tmp_path), 0,
                                                             {"llm": str(tiny_llm6_path)},
                                                             TINY_CORPUS[:4]))
    first = server.initial_state()
    assert server.plan.origin == (0, 3, 4, 5)
    shapes = {k: v.shape for k, v in client_part(first).items()}
    assert {int(k.split(".")[2]) for k in shapes} == {2, 3}  # the adapter, emulator numbering
    old, new = _random_adapter(shapes, 1), _random_adapter(shapes, 2)
    state = join(old, emulator=part(first, "emulator"))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    seen = {}
    real = fedbiot_server.align_emulator

    def spy(emu, full, plan, public, **kw):
        with torch.no_grad():
            seen["full"] = full(input_ids=ids).logits.clone()
            seen["emu_q"] = {i: emu.model.layers[i].self_attn.q_proj.weight.clone() for i in (2, 3)}
        return real(emu, full, plan, public, **kw)

    monkeypatch.setattr(fedbiot_server, "align_emulator", spy)
    server.finish_round(1, state, new)
    assert "full" in seen

    def full_with(adapter):
        model, _, _ = load_causal_lm(tiny_llm6_path)
        scale = 8 / 4  # LoRA alpha / r
        with torch.no_grad():
            for key, a in adapter.items():
                if ".lora_A." not in key:
                    continue
                b = adapter[key.replace(".lora_A.", ".lora_B.")]
                name = key.split(".lora_A.")[0].split(".")
                name[2] = {"2": "4", "3": "5"}[name[2]]  # emulator layer -> full layer
                w = model.get_submodule(".".join(name)).weight
                w += scale * torch.from_numpy(b) @ torch.from_numpy(a)
        return model.eval()

    with torch.no_grad():
        want_model = full_with(new)
        want = want_model(input_ids=ids).logits
        stale = full_with(old)(input_ids=ids).logits
    np.testing.assert_allclose(seen["full"].numpy(), want.numpy(), atol=1e-4)
    assert (seen["full"] - stale).abs().max() > 1e-2
    for emu_layer, full_layer in ((2, 4), (3, 5)):
        np.testing.assert_allclose(
            seen["emu_q"][emu_layer].numpy(),
            want_model.model.layers[full_layer].self_attn.q_proj.weight.detach().numpy(),
            atol=1e-6,
        )


# -- FedMKT across two tokenizers: MinED map, DualMinCE, target rows --------------------------
# The receiver (the LLM) is WordPiece; teacher A is byte-level BPE, teacher B SentencePiece.
# "the played games": receiver the | play | ##ed | game | ##s, A Ġthe | Ġplay | ed | Ġgam | es,
# B ▁the | ▁play | ed | ▁games.
RECV = Vocabulary.from_dict(
    {"[UNK]": 0, "[SEP]": 1, "play": 2, "##ing": 3, "##ed": 4, "game": 5, "##s": 6, "the": 7},
    "wordpiece", {"unk": "[UNK]", "eos": "[SEP]"},
)
A = Vocabulary.from_dict(
    {"<|endoftext|>": 0, "Ġplay": 1, "ing": 2, "Ġgames": 3, "Ġthe": 4, "ed": 5, "Ġgam": 6,
     "s": 7, "es": 8},
    "bytelevel", {"eos": "<|endoftext|>"},
)
B = Vocabulary.from_dict(
    {"<unk>": 0, "▁the": 1, "▁play": 2, "ed": 3, "▁games": 4, "▁game": 5, "s": 6},
    "metaspace", {"unk": "<unk>"},
)
RECV_IDS, A_IDS, B_IDS = [7, 2, 4, 5, 6], [4, 1, 5, 6, 8], [1, 2, 3, 4]


def test_mined_maps_of_two_tokenizers_by_hand():
    """Normal forms: receiver ▁play, ing, ed, ▁game, s, ▁the; A ▁play, ing, ▁games, ▁the, ed,
    ▁gam, s, es. Exact matches map at distance 0; ▁games and ▁gam are one edit from ▁game;
    "es" is one edit from both "ed" and "s": the tie goes to the lexicographically smallest,
    "ed" (##ed, id 4). Specials map by role (eos -> [SEP], unk -> [UNK])."""
    a = build_vocab_map(A, RECV, workers=1)
    assert a.ids.tolist() == [1, 2, 3, 5, 7, 4, 5, 6, 4]
    assert a.distances.tolist() == [0, 0, 0, 1, 0, 0, 1, 0, 1]
    b = build_vocab_map(B, RECV, workers=1)
    assert b.ids.tolist() == [0, 7, 2, 4, 5, 5, 6]
    assert b.distances.tolist() == [0, 0, 0, 0, 1, 0, 0]


def test_dual_min_ce_targets_across_two_tokenizers_and_their_ce():
    """Two public samples of the same text. DualMinCE: sample 0, CE A 0.9 < B 1.2 and < own 1.0
    -> A; sample 1, B 0.8 < own 1.0 -> B. The receiver's rows are over play, ##ed, game, ##s.

    A (DTW on the diagonal, every pair one-to-one): row play <- A's row over Ġplay, ids
    [Ġplay, Ġgam, Ġgames] -> [2, 5, 5], the duplicate 5 keeps the higher 0.3; row ##ed <- over
    ed, [ed, es, s] -> [4, 4, 6], 4 keeps 0.6; row game <- over Ġgam (agrees through the map
    Ġgam -> game), [Ġgames, Ġgam, Ġthe] -> [5, 5, 7]; row ##s: its partner "es" maps to ##ed,
    not ##s, so they disagree: one-hot on ##s (6).
    B (▁games pairs with both game and ##s: not one-to-one): rows play and ##ed take B's rows
    ([▁play, ▁game] -> [2, 5], [ed, s] -> [4, 6]); rows game and ##s are one-hot on 5 and 6.

    The soft-target CE of a uniform student over the 8 receiver tokens is ln 8 on every row;
    with the student's logits ln[1, 1, 4, 1, 2, 2, 1, 1] (q = x / 13) the CE of a row with
    renormalised targets p is -sum p ln q."""
    chosen = dual_min_ce_batch(np.array([[0.9, 1.5], [1.2, 0.8]]), np.array([1.0, 1.0]))
    assert chosen.tolist() == [0, 1]
    ln = np.log
    a_values = ln(np.array([[0.5, 0.3, 0.1], [0.6, 0.25, 0.1], [0.4, 0.35, 0.2], [0.5, 0.3, 0.2]],
                           np.float32))
    a_ids = np.array([[1, 6, 3], [5, 8, 7], [3, 6, 4], [8, 7, 5]], np.int64)
    b_values = ln(np.array([[0.7, 0.2], [0.5, 0.4], [0.9, 0.05]], np.float32))
    b_ids = np.array([[2, 5], [3, 6], [4, 5]], np.int64)
    teachers = [(A, A_IDS, a_values, a_ids), (B, B_IDS, b_values, b_ids)]
    rows = {}
    for s, t in enumerate(chosen.tolist()):
        vocab, t_ids, values, ids = teachers[t]
        rows[s] = aligned_targets(RECV_IDS, RECV, t_ids, vocab, values, ids,
                                  build_vocab_map(vocab, RECV, workers=1))
    ta, tb = rows[0], rows[1]
    assert ta.aligned.tolist() == [True] * 4 and ta.agree.tolist() == [True, True, True, False]
    assert ta.ids.tolist() == [[2, 5, 0], [4, 6, 0], [5, 7, 0], [6, 0, 0]]
    np.testing.assert_allclose(np.exp(ta.values), [[0.5, 0.3, 0], [0.6, 0.1, 0], [0.4, 0.2, 0],
                                                   [1, 0, 0]], rtol=1e-6)
    assert tb.matched.tolist() == [True, True, False, False]
    assert tb.ids.tolist() == [[2, 5], [4, 6], [5, 0], [6, 0]]
    np.testing.assert_allclose(np.exp(tb.values), [[0.7, 0.2], [0.5, 0.4], [1, 0], [1, 0]],
                               rtol=1e-6)
    # the soft-target CE on the 8 rows (both samples, k padded to 3)
    x = np.array([1, 1, 4, 1, 2, 2, 1, 1], np.float64)
    q = x / x.sum()
    targets = [  # (ids, renormalised p) per row, by hand from the rows above
        ([2, 5], [5 / 8, 3 / 8]), ([4, 6], [6 / 7, 1 / 7]), ([5, 7], [2 / 3, 1 / 3]), ([6], [1]),
        ([2, 5], [7 / 9, 2 / 9]), ([4, 6], [5 / 9, 4 / 9]), ([5], [1]), ([6], [1]),
    ]
    want = np.mean([-sum(pi * math.log(q[i]) for i, pi in zip(row_ids, p, strict=True))
                    for row_ids, p in targets])
    values = np.concatenate([ta.values, np.pad(tb.values, ((0, 0), (0, 1)),
                                               constant_values=-np.inf)])
    ids = np.concatenate([ta.ids, np.pad(tb.ids, ((0, 0), (0, 1)))])
    logits = torch.log(torch.tensor(x, dtype=torch.float32)).expand(1, 8, 8)
    got = topk_kd_loss(logits, torch.from_numpy(values)[None], torch.from_numpy(ids)[None],
                       torch.ones(1, 8), kind="ce")
    assert float(got) == pytest.approx(want, abs=1e-5)
