"""The distillation kernels against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms.core.distill import DistillConfig, distill, mutual_distill
from algorithms.core.errors import TrainingError
from algorithms.core.kd import (
    VocabularyMismatch,
    check_shared_vocabulary,
    complete_topk,
    kd_loss,
    prediction_mask,
    proxy_logits,
)


def test_kd_loss_hand_computed():
    # one position, two tokens: teacher p = (0.75, 0.25), student q = (0.5, 0.5)
    t = torch.log(torch.tensor([[[0.75, 0.25]]]))
    s = torch.zeros(1, 1, 2)
    mask = torch.ones(1, 1)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    ce = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5))
    assert float(kd_loss(s, t, mask)) == pytest.approx(kl, abs=1e-6)
    assert float(kd_loss(s, t, mask, kind="ce")) == pytest.approx(ce, abs=1e-6)
    assert float(kd_loss(t, t, mask)) == pytest.approx(0.0, abs=1e-7)
    # masked positions do not count; the mean is over the unmasked ones
    s2 = torch.cat([s, torch.tensor([[[5.0, -5.0]]])], dim=1)
    t2 = torch.cat([t, t], dim=1)
    assert float(kd_loss(s2, t2, torch.tensor([[1.0, 0.0]]))) == pytest.approx(kl, abs=1e-6)


def test_kd_loss_temperature_scales_by_t_squared():
    t = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    s = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(1))
    m = torch.ones(2, 3)
    tt = 2.0
    p = torch.softmax(t / tt, -1)
    expect = (p * (torch.log_softmax(t / tt, -1) - torch.log_softmax(s / tt, -1))).sum(-1).mean() * tt * tt
    assert float(kd_loss(s, t, m, temperature=tt)) == pytest.approx(float(expect), rel=1e-5)


def test_proxy_logits_arithmetic_and_truncation():
    large = torch.tensor([[1.0, 2.0, 3.0, 9.0]])  # one extra (padded) vocab entry
    tuned = torch.tensor([[0.5, 0.0, 1.0]])
    base = torch.tensor([[0.0, 1.0, 1.0]])
    z = proxy_logits(large, tuned, base, alpha=2.0)
    assert z.tolist() == [[2.0, 0.0, 3.0]]
    assert proxy_logits(large, tuned, base, alpha=0.0).tolist() == [[1.0, 2.0, 3.0]]


def test_complete_topk_spreads_the_missing_mass_evenly():
    p = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    vals, ids = torch.topk(torch.log(p), 2)
    dense = complete_topk(vals, ids, 5).exp()
    assert dense.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert dense[0].item() == pytest.approx(0.5) and dense[1].item() == pytest.approx(0.3)
    assert dense[2:].tolist() == pytest.approx([0.2 / 3] * 3, abs=1e-6)
    # the full vocabulary given: the identity
    vals, ids = torch.topk(torch.log(p), 5)
    assert complete_topk(vals, ids, 5).exp().tolist() == pytest.approx(p.tolist(), abs=1e-6)
    # padding entries (-inf) never overwrite a real id, even id 0
    vals = torch.tensor([math.log(0.5), -math.inf])
    ids = torch.tensor([0, 0])
    dense = complete_topk(vals, ids, 3).exp()
    assert dense.tolist() == pytest.approx([0.5, 0.25, 0.25], abs=1e-6)


def test_prediction_mask_follows_the_labels():
    labels = torch.tensor([[5, 6, -100, 7]])
    assert prediction_mask(labels).tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_vocabulary_mismatch_is_refused(tiny_llama_path, tiny_gpt2_path, tiny_llm_path):
    from transformers import AutoTokenizer

    a, b, c = (AutoTokenizer.from_pretrained(str(p)) for p in (tiny_llama_path, tiny_gpt2_path, tiny_llm_path))
    check_shared_vocabulary(a, c)  # the same tokenizer
    with pytest.raises(VocabularyMismatch, match="FedMKT"):
        check_shared_vocabulary(a, b)


def test_distill_config_validates():
    with pytest.raises(TrainingError, match="lambda_kd"):
        DistillConfig(lambda_kd=-1)
    with pytest.raises(TrainingError, match="nothing to train"):
        DistillConfig(lambda_kd=0, task_weight=0)
    with pytest.raises(TrainingError, match="unknown"):
        DistillConfig.from_dict({"lamda": 1})


def test_distill_pulls_the_student_to_the_teacher(tiny_llama_path, tiny_llm_path):
    from algorithms.core.modeling import LoraSpec, attach_lora, load_causal_lm
    from tests.tiny_models import TINY_CORPUS

    torch.set_num_threads(1)
    slm, tok, _ = load_causal_lm(tiny_llama_path)
    slm = attach_lora(slm, LoraSpec(r=4, alpha=8), seed=0)
    teacher_model, _, _ = load_causal_lm(tiny_llm_path)

    def teacher(batch):
        return torch.log_softmax(teacher_model(input_ids=batch["input_ids"]).logits, -1)

    cfg = DistillConfig(lr=1e-2, task_weight=0.0, lambda_kd=1.0, batch_size=4, block_size=16, epochs=4)
    m = distill(slm, TINY_CORPUS, teacher, cfg, tokenizer=tok)
    assert m["kd_last"] < 0.8 * m["kd_first"]


def test_mutual_distill_moves_both_adapters(tiny_llama_path, tiny_llm_path):
    from algorithms.core.modeling import LoraSpec, adapter_state, attach_lora, load_causal_lm
    from tests.tiny_models import TINY_CORPUS

    torch.set_num_threads(1)
    slm, tok, _ = load_causal_lm(tiny_llama_path)
    slm = attach_lora(slm, LoraSpec(r=4, alpha=8), seed=0)
    llm, _, _ = load_causal_lm(tiny_llm_path)
    llm = attach_lora(llm, LoraSpec(r=4, alpha=8), seed=0)
    s0, l0 = adapter_state(slm), adapter_state(llm)
    cfg = DistillConfig(lr=1e-2, batch_size=4, block_size=16, max_steps=3)
    m = mutual_distill(llm, slm, TINY_CORPUS, cfg, tokenizer=tok)
    assert m["steps"] == 3
    s1, l1 = adapter_state(slm), adapter_state(llm)
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)
    assert any(not torch.equal(l0[k], l1[k]) for k in l0)


def test_mutual_distill_with_the_proxy_as_the_llm_teacher(tiny_llama_path, tiny_llm_path):
    """llm_teacher="proxy": the LLM's target is base LLM + alpha * (SLM - base SLM). With alpha 0
    it is the base LLM itself, which a fresh LoRA (B = 0) reproduces exactly: zero KD at step 1."""
    from algorithms.core.modeling import LoraSpec, attach_lora, load_causal_lm
    from tests.tiny_models import TINY_CORPUS

    torch.set_num_threads(1)
    slm, tok, _ = load_causal_lm(tiny_llama_path)
    slm = attach_lora(slm, LoraSpec(r=4, alpha=8), seed=0)
    llm, _, _ = load_causal_lm(tiny_llm_path)
    llm = attach_lora(llm, LoraSpec(r=4, alpha=8), seed=0)
    cfg = DistillConfig(lr=1e-2, batch_size=4, block_size=16, max_steps=2)
    m = mutual_distill(llm, slm, TINY_CORPUS, cfg, tokenizer=tok, llm_teacher="proxy", alpha=0.0)
    assert m["kd_llm_first"] == pytest.approx(0.0, abs=1e-6)
    m = mutual_distill(llm, slm, TINY_CORPUS, cfg, tokenizer=tok, llm_teacher="proxy", alpha=1.0)
    assert m["kd_llm_first"] > 0
    with pytest.raises(TrainingError, match="llm_teacher"):
        mutual_distill(llm, slm, TINY_CORPUS, cfg, tokenizer=tok, llm_teacher="oracle")
