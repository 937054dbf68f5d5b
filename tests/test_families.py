"""One family description for the planner and the loader: for every family available as a tiny
config (real transformers config classes, random weights), the planner's LoRA parameter count
equals peft's count on the model the loader adapted, with the default targets and with the LM
head added; the planner accepts OPT's ``ffn_dim`` and Falcon's ``ffn_hidden_size``; the
table's attention implementation is what transformers picks, and the planner's activation term
equals what autograd saves on each family's model."""

from __future__ import annotations

import pytest

from algorithms.core.modeling import DEFAULT_LORA_TARGETS, LoraSpec, attach_lora
from firmware_profiles import FAMILIES, ModelShape, Workload, plan

TOK = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "vocab_size": 96}
DIMS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}


def _config(family: str):
    import transformers as tf

    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **TOK)
    if family == "opt":
        return tf.OPTConfig(ffn_dim=48, max_position_embeddings=64, **DIMS, **TOK)
    if family == "opt-proj":  # word embeddings narrower than hidden: project_in / project_out
        return tf.OPTConfig(ffn_dim=48, word_embed_proj_dim=16, **DIMS, **TOK)
    if family == "falcon":  # multi-query attention (the default)
        return tf.FalconConfig(**DIMS, **TOK)
    if family == "falcon-new":
        return tf.FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **DIMS, **TOK)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(intermediate_size=48, **DIMS, **TOK)
    if family == "phi3":
        return tf.Phi3Config(intermediate_size=48, num_key_value_heads=2, **DIMS, **TOK)
    if family == "gemma2":
        return tf.Gemma2Config(
            intermediate_size=48, num_key_value_heads=2, head_dim=16, **DIMS, **TOK
        )
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(
            intermediate_size=48, num_key_value_heads=2, head_dim=16, **DIMS, **TOK
        )
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[family]
    return cls(intermediate_size=48, num_key_value_heads=2, **DIMS, **TOK)


FAMILY_CASES = [
    "llama",
    "qwen2",
    "mistral",
    "phi3",
    "gpt2",
    "gpt_neox",
    "gemma2",
    "gemma3_text",
    "opt",
    "opt-proj",
    "falcon",
    "falcon-new",
]


def _model(family: str):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(_config(family))


def _peft_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILY_CASES)
@pytest.mark.parametrize("with_head", [False, True])
def test_planned_lora_params_equal_peft_count(family, with_head):
    model = _model(family)
    cfg = model.config.to_dict()
    mt = cfg["model_type"]
    assert mt in FAMILIES and DEFAULT_LORA_TARGETS[mt] == FAMILIES[mt].default_targets
    targets = (*FAMILIES[mt].default_targets, "lm_head") if with_head else None
    peft_model = attach_lora(model, LoraSpec(r=4, alpha=8.0, target_modules=targets), seed=0)
    w = Workload(quant="fp32", lora_rank=4, seq_len=32, lora_targets=targets)
    p = plan(cfg, "generic-cpu", w)
    assert p.details["trainable_params"] == _peft_count(peft_model)
    assert sorted(p.details["lora_targets"]) == sorted(targets or FAMILIES[mt].default_targets)


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_planned_linear_shapes_match_the_model(family):
    """Every decoder-layer linear the description names exists with the planned shape."""
    import torch

    model = _model(family)
    shape = ModelShape.from_config(model.config.to_dict())
    planned = sorted((x.name, x.in_features, x.out_features) for x in shape.linears())
    actual = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if ".0." not in f"{name}." or ".1." in name or not isinstance(w, torch.Tensor):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if w.dim() == 2 and leaf in shape.description.linear_names:
            fan_in_fan_out = shape.description.conv1d
            out_f, in_f = (w.shape[1], w.shape[0]) if fan_in_fan_out else tuple(w.shape)
            actual.append((leaf, int(in_f), int(out_f)))
    assert planned == sorted(actual)


@pytest.mark.parametrize("family", ["opt", "falcon", "falcon-new", "gpt_neox", "phi3"])
def test_planner_accepts_the_family_and_plans_a_fit(family):
    cfg = _config(family).to_dict()
    p = plan(cfg, "generic-cpu", Workload(quant="fp32", lora_rank=8, seq_len=32))
    assert p.fits and p.total_bytes == sum(p.breakdown.values())
    assert not any("treated as a llama-style" in n for n in p.notes)


def test_opt_gated_adapter_gates_each_batch_row(tmp_path):
    """OPT flattens batch x seq before its MLP: the gated export's per-row gate must still
    gate batch rows (row 0 tuned = the merged adapter, row 1 base), not crash."""
    import torch

    from algorithms.core.modeling import save_peft_adapter
    from edge_sdk.inference.onnx_export import apply_lora

    base_dir = tmp_path / "opt"
    _model("opt").save_pretrained(str(base_dir))
    peft_model = attach_lora(_model("opt"), LoraSpec(r=4, alpha=8.0), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, prm in peft_model.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
    adapter = save_peft_adapter(peft_model, base_dir, tmp_path / "adapter")

    ids = torch.tensor([[5, 9, 13, 17, 21, 25], [6, 10, 14, 18, 22, 26]])
    base, merged, gated = _model("opt").eval(), _model("opt").eval(), _model("opt").eval()
    apply_lora(merged, adapter, "merge")
    holder, _ = apply_lora(gated, adapter, "gated")
    with torch.no_grad():
        want_base = base(input_ids=ids).logits
        want_tuned = merged(input_ids=ids).logits
        holder.gate = torch.tensor([1.0, 0.0])
        got = gated(input_ids=ids).logits
    assert not torch.allclose(want_tuned, want_base, atol=1e-4)
    torch.testing.assert_close(got[0], want_tuned[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], want_base[1], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# how transformers runs each family: attention implementation, and what training saves


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_attention_implementation_is_what_transformers_picks(family):
    """The table's ``attn_implementation`` is what transformers 5 chooses for a model built
    without one: SDPA for every family but Gemma-2, which has no SDPA (it soft-caps the
    attention scores) and runs eager, saving the full [batch, heads, seq, seq] scores."""
    model = _model(family)
    fam = FAMILIES[model.config.model_type]
    assert model.config._attn_implementation == fam.attn_implementation
    assert fam.attn_implementation == ("eager" if family == "gemma2" else "sdpa")


def _saved_bytes(model, batch: int, seq: int) -> int:
    from tests.tiny_models import saved_bytes

    return saved_bytes(model, batch, seq)


@pytest.mark.parametrize("quant", ["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_planned_activations_equal_what_autograd_saves(family, quant):
    """The planner's activation term (what each layer of the family saves for backward: its
    norms, fused q/k/v views, parallel blocks, eager scores and soft-caps, Falcon's mask)
    equals the bytes autograd saves on the family's real model, at the compute dtype."""
    import torch

    model = _model(family)
    if quant == "bf16":
        model = model.to(torch.bfloat16)
    cfg = model.config.to_dict()
    peft_model = attach_lora(model, LoraSpec(r=4, alpha=8.0), seed=0)
    peft_model.train()
    B, T = 2, 48
    measured = _saved_bytes(peft_model, B, T)
    p = plan(cfg, "generic-cpu", Workload(quant=quant, lora_rank=4, batch_size=B, seq_len=T))
    planned = p.breakdown["activations"]
    if p.details["final_softcap"] is not None:  # Gemma-2: the logits' tanh, a logits term
        planned += B * T * cfg["vocab_size"] * (4 if quant == "fp32" else 2)
    # Gemma's RMSNorm saves its (1 + weight) in fp32 per norm (a constant the plan leaves
    # out, 0.25% here); every other family is exact
    assert planned == pytest.approx(measured, rel=0.005)
