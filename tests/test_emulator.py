"""FedBiOT kernels: layer plans, emulator surgery, adapter plug-back, losses, alignment.

Models are tiny random-init Llama / GPT-2 checkpoints with 6 decoder layers (CPU, no mocks).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from algorithms.core.emulator import (
    EMULATOR_PLAN_NAME,
    EmulatorError,
    EmulatorPlan,
    adapter_layer_map,
    adapter_layers,
    build_emulator,
    decoder_layers,
    emulator_to_full_adapter,
    full_to_emulator_adapter,
    kept_layers,
    layer_target_regex,
    load_emulator,
    load_emulator_plan,
    middle_keep_positions,
    save_emulator,
)
from algorithms.core.emulator_train import (
    AlignConfig,
    align_emulator,
    attach_adapter_lora,
    kd_kl,
    l2n_loss,
    middle_block_output,
)
from algorithms.core.modeling import (
    LoraSpec,
    adapter_state,
    load_adapter_state,
    load_causal_lm,
)
from algorithms.core.training import TrainConfig, train_causal_lm
from tests.tiny_models import TINY_CORPUS, make_tiny_gpt2, make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = LoraSpec(r=4, alpha=8.0)
N_LAYERS = 6


@pytest.fixture(scope="module")
def llama6(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llama6"), layers=N_LAYERS)


@pytest.fixture(scope="module")
def gpt2_6(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2-6"), layers=N_LAYERS)


@pytest.fixture(params=["llama", "gpt2"])
def tiny6(request, llama6, gpt2_6):
    return llama6 if request.param == "llama" else gpt2_6


def _batch(tok, texts=("The quick brown fox jumps.", "Edge devices train small models.")):
    enc = tok(list(texts), return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _logits(model, ids, mask):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _random_adapter(model, seed: int = 1, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    st = {n: torch.randn(t.shape, generator=gen) * scale for n, t in adapter_state(model).items()}
    load_adapter_state(model, st)
    return st


# ---------------------------------------------------------------------------------------------
# layer plans


@pytest.mark.parametrize(
    "n_layers, top, bottom, drop, origin",
    [
        # middle n=10, k=5: positions i*9/4 = 0, 2.25, 4.5, 6.75, 9 -> 0, 2, 5, 7, 9
        (12, 2, 0, 0.5, (0, 2, 5, 7, 9, 10, 11)),
        # middle n=6, k=round(4.8)=5: i*5/4 = 0, 1.25, 2.5, 3.75, 5 -> 0, 1, 3, 4, 5
        (8, 2, 0, 0.2, (0, 1, 3, 4, 5, 6, 7)),
        (8, 2, 0, 0.0, (0, 1, 2, 3, 4, 5, 6, 7)),
        (8, 2, 0, 1.0, (6, 7)),
        # sandwich: middle = layers 2..9 (n=8), k=4: i*7/3 = 0, 2.33, 4.67, 7 -> 2, 4, 7, 9
        (12, 2, 2, 0.5, (0, 1, 2, 4, 7, 9, 10, 11)),
        # k = 1 keeps the first middle layer (n=4, 4*0.2 = 0.8 -> 1)
        (6, 2, 0, 0.8, (0, 4, 5)),
        # halves round up: n=5 drop 0.5 -> k=3 (Python's round(2.5) would give 2)
        (7, 2, 0, 0.5, (0, 2, 4, 5, 6)),
        # the decimal value counts: 5 * 0.9 = 4.5 -> 5, although 0.1 is not exact in binary
        (7, 2, 0, 0.1, (0, 1, 2, 3, 4, 5, 6)),
        # no middle block at all
        (2, 2, 0, 0.5, (0, 1)),
        (4, 1, 0, 0.5, (0, 2, 3)),
    ],
)
def test_kept_layers_hand_worked(n_layers, top, bottom, drop, origin):
    plan = kept_layers(n_layers, top, bottom, drop)
    assert plan.origin == origin
    roles = ["adapter_bottom"] * bottom
    roles += ["emulator"] * (len(origin) - top - bottom) + ["adapter_top"] * top
    assert list(plan.roles) == roles
    assert plan.n_emulator_layers == len(origin)
    assert plan.middle_output_index("emulator") == len(origin) - top
    assert plan.middle_output_index("full") == n_layers - top


def test_sandwich_roles_and_adapter_maps():
    plan = kept_layers(12, 2, 2, 0.5)
    assert plan.roles[:2] == ("adapter_bottom",) * 2
    assert plan.roles[-2:] == ("adapter_top",) * 2
    assert plan.kept_middle == (2, 4, 7, 9)
    assert plan.middle_emulator_indices == (2, 3, 4, 5)
    assert adapter_layers(plan, "emulator") == [0, 1, 6, 7]
    assert adapter_layers(plan, "full") == [0, 1, 10, 11]
    assert adapter_layer_map(plan) == {0: 0, 1: 1, 6: 10, 7: 11}


def test_middle_keep_positions_keeps_first_and_last():
    assert middle_keep_positions(10, 0.5) == [0, 2, 5, 7, 9]
    for n in range(0, 30):
        for drop in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
            pos = middle_keep_positions(n, drop)
            assert pos == sorted(set(pos))
            assert len(pos) == math.floor(n * (1 - drop) + 0.5 + 1e-9)
            if len(pos) >= 2:
                assert pos[0] == 0 and pos[-1] == n - 1


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 2, 0, 0.5), "n_layers"),
        ((6, 0, 0, 0.5), "n_adapter_top"),
        ((6, 2, -1, 0.5), "n_adapter_bottom"),
        ((6, 4, 3, 0.5), "larger than"),
        ((6, 2, 0, 1.5), r"drop_ratio must be in \[0, 1\]"),
        ((6, 2, 0, float("nan")), "drop_ratio"),
        ((6, 2, 0, True), "drop_ratio"),
        ((6.0, 2, 0, 0.5), "n_layers"),
    ],
)
def test_kept_layers_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        kept_layers(*args)
    with pytest.raises(EmulatorError):
        kept_layers(*args)


def test_plan_round_trip_and_validation():
    plan = kept_layers(12, 2, 2, 0.5)
    d = json.loads(json.dumps(plan.to_dict()))
    assert EmulatorPlan.from_dict(d) == plan
    bad = json.loads(json.dumps(d))
    bad["layers"][2]["origin"], bad["layers"][3]["origin"] = 4, 2
    with pytest.raises(EmulatorError, match="increasing"):
        EmulatorPlan.from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["layers"][0]["role"] = "emulator"
    with pytest.raises(EmulatorError, match="roles"):
        EmulatorPlan.from_dict(bad)
    with pytest.raises(EmulatorError, match="newer"):
        EmulatorPlan.from_dict({**d, "version": 99})
    with pytest.raises(EmulatorError, match="not an emulator plan"):
        EmulatorPlan.from_dict({**d, "format": "other"})
    with pytest.raises(EmulatorError, match="malformed"):
        EmulatorPlan.from_dict({k: v for k, v in d.items() if k != "n_layers"})


# ---------------------------------------------------------------------------------------------
# emulator surgery


def test_emulator_with_drop_0_equals_full_model(tiny6):
    full, tok, _ = load_causal_lm(tiny6)
    plan = kept_layers(N_LAYERS, 2, 1, 0.0)
    emu = build_emulator(full, plan)
    assert emu is not full and type(emu) is type(full)
    ids, mask = _batch(tok)
    assert torch.equal(_logits(emu, ids, mask), _logits(full, ids, mask))


def test_emulator_structure_and_origin(tiny6):
    full, tok, _ = load_causal_lm(tiny6)
    plan = kept_layers(N_LAYERS, 2, 0, 0.5)  # middle n=4, k=2: layers 0 and 3 kept
    assert plan.origin == (0, 3, 4, 5)
    emu = build_emulator(full, plan)
    emu_layers, full_layers = decoder_layers(emu)[2], decoder_layers(full)[2]
    assert len(emu_layers) == 4 and len(full_layers) == N_LAYERS  # full model untouched
    assert emu.config.num_hidden_layers == 4 and full.config.num_hidden_layers == N_LAYERS
    for i, o in enumerate(plan.origin):
        e_state, f_state = emu_layers[i].state_dict(), full_layers[o].state_dict()
        assert e_state.keys() == f_state.keys()
        assert all(torch.equal(e_state[k], f_state[k]) for k in e_state)
        assert emu_layers[i] is not full_layers[o]
        idx = {m.layer_idx for m in emu_layers[i].modules() if hasattr(m, "layer_idx")}
        assert idx == {i}
    assert not any(p.requires_grad for p in emu.parameters())
    # the KV cache (indexed by layer_idx) gives the same greedy text as no cache
    ids, mask = _batch(tok, ["The quick brown fox"])
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        cached = emu.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        uncached = emu.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_layer_types_follow_the_kept_layers(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=3,  # layers 0-2 full attention, 3-5 sliding window
    )
    torch.manual_seed(0)
    full = Qwen2ForCausalLM(cfg).eval()
    plan = kept_layers(N_LAYERS, 2, 0, 0.5)
    emu = build_emulator(full, plan)
    assert emu.config.layer_types == [full.config.layer_types[o] for o in plan.origin]
    assert emu.config.layer_types == ["full_attention"] + ["sliding_attention"] * 3
    emu.save_pretrained(str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(loaded, ids, None), _logits(emu, ids, None))


def test_build_emulator_rejects_layer_index_dependent_scaling():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4)
    cfg.scale_attn_by_inverse_layer_idx = True
    model = GPT2LMHeadModel(cfg)
    with pytest.raises(EmulatorError, match="scale_attn_by_inverse_layer_idx"):
        build_emulator(model, kept_layers(4, 1, 0, 0.5))
    build_emulator(model, kept_layers(4, 1, 0, 0.0))  # nothing renumbered: allowed


def test_build_emulator_rejects_wrong_model(llama6):
    full, _, _ = load_causal_lm(llama6)
    with pytest.raises(EmulatorError, match="decoder layers"):
        build_emulator(full, kept_layers(8, 2, 0, 0.5))
    peft_model = attach_adapter_lora(full, SPEC, kept_layers(N_LAYERS, 2, 0, 0.5), seed=0)
    with pytest.raises(EmulatorError, match="peft"):
        build_emulator(peft_model, kept_layers(N_LAYERS, 2, 0, 0.5))


def test_save_and_load_through_load_causal_lm(tiny6, tmp_path):
    full, tok, _ = load_causal_lm(tiny6)
    plan = kept_layers(N_LAYERS, 2, 1, 0.5)
    emu = build_emulator(full, plan)
    out = save_emulator(emu, plan, tmp_path / "emu", tok, source="tiny")
    assert json.loads((out / EMULATOR_PLAN_NAME).read_text())["source"] == "tiny"
    loaded, tok2, report = load_causal_lm(out)
    assert report.model_type == full.config.model_type
    assert len(decoder_layers(loaded)[2]) == plan.n_emulator_layers
    ids, mask = _batch(tok2)
    assert torch.equal(_logits(loaded, ids, mask), _logits(emu, ids, mask))
    assert load_emulator_plan(out) == plan
    assert load_emulator(out)[3] == plan


# ---------------------------------------------------------------------------------------------
# middle-block output and losses


def test_middle_block_output_matches_hidden_states(llama6):
    full, tok, _ = load_causal_lm(llama6)
    plan = kept_layers(N_LAYERS, 2, 0, 0.5)
    emu = build_emulator(full, plan)
    ids, mask = _batch(tok)
    with torch.no_grad():
        f = middle_block_output(full, plan, ids, mask)
        ref = full(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        e = middle_block_output(emu, plan, ids, mask)
        e_ref = emu(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # hidden_states[i] is the input of layer i: the full model's layer 4, the emulator's layer 2
    assert torch.equal(f.hidden, ref.hidden_states[4])
    assert torch.equal(f.logits, ref.logits)
    assert torch.equal(e.hidden, e_ref.hidden_states[2])
    assert not torch.allclose(e.hidden, f.hidden)


def test_l2n_loss_hand_computed():
    t = torch.tensor([[[1.0, -1.0], [2.0, 0.0]]], requires_grad=True)
    s = torch.tensor([[[0.0, -1.0], [2.0, 2.0]]], requires_grad=True)
    # (t-s)^2 = 1, 0, 0, 4 -> mean 1.25; t^2 = 1, 1, 4, 0 -> mean 1.5
    loss = l2n_loss(s, t)
    assert loss.item() == pytest.approx(1.25 / 1.5, abs=1e-7)
    # only position 0: (1 + 0) / 2 over (1 + 1) / 2 ; only position 1: (0 + 4) / 2 over 4 / 2
    assert l2n_loss(s, t, torch.tensor([[1, 0]])).item() == pytest.approx(0.5, abs=1e-7)
    assert l2n_loss(s, t, torch.tensor([[0, 1]])).item() == pytest.approx(1.0, abs=1e-7)
    loss.backward()
    assert t.grad is None and s.grad is not None
    # d/ds mean((t-s)^2)/1.5 = -2 (t - s) / (4 * 1.5)
    assert torch.allclose(s.grad, -2 * (t.detach() - s.detach()) / 6.0, atol=1e-7)
    assert l2n_loss(t.detach() * 3, t.detach() * 3).item() == 0.0
    with pytest.raises(EmulatorError, match="shape"):
        l2n_loss(s, t[:, :1])
    with pytest.raises(EmulatorError, match="no position"):
        l2n_loss(s, t, torch.tensor([[0, 0]]))


def test_kd_kl_hand_computed():
    teacher = torch.tensor([[[0.0, 0.0], [5.0, 1.0]]])
    student = torch.tensor([[[math.log(3.0), 0.0], [-2.0, 7.0]]], requires_grad=True)
    # p_t = (1/2, 1/2), p_s = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    kl0 = 0.5 * math.log(4.0 / 3.0)
    assert kd_kl(student, teacher, torch.tensor([[1, 0]])).item() == pytest.approx(kl0, abs=1e-6)
    # reverse: 3/4 ln(3/2) + 1/4 ln(1/2)
    rev = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    got = kd_kl(student, teacher, torch.tensor([[1, 0]]), reverse=True).item()
    assert got == pytest.approx(rev, abs=1e-6)
    # temperature 2 with logits doubled gives the same distributions, times T^2 = 4
    got = kd_kl(student * 2, teacher * 2, torch.tensor([[1, 0]]), temperature=2.0).item()
    assert got == pytest.approx(4 * kl0, abs=1e-5)
    # no mask: mean over both positions
    p_t = torch.softmax(teacher[0, 1], -1)
    kl1 = float((p_t * (p_t.log() - torch.log_softmax(student[0, 1].detach(), -1))).sum())
    assert kd_kl(student, teacher).item() == pytest.approx((kl0 + kl1) / 2, abs=1e-6)
    assert kd_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(EmulatorError, match="temperature"):
        kd_kl(student, teacher, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# adapter plug-back


def test_adapter_key_renaming_round_trip():
    plan = kept_layers(8, 2, 1, 0.5)  # middle 1..5 (n=5, k=3): 1, 3, 5
    assert plan.origin == (0, 1, 3, 5, 6, 7)
    assert adapter_layer_map(plan) == {0: 0, 4: 6, 5: 7}
    gen = torch.Generator().manual_seed(0)
    names = [
        "model.layers.4.self_attn.q_proj.lora_A.weight",
        "model.layers.5.mlp.down_proj.lora_B.weight",
        "model.layers.0.self_attn.v_proj.lora_A.weight",
        "lm_head.lora_A.weight",  # outside the decoder layers: unchanged
    ]
    state = {n: torch.randn(2, 3, generator=gen) for n in names}
    full = emulator_to_full_adapter(state, plan)
    assert sorted(full) == [
        "lm_head.lora_A.weight",
        "model.layers.0.self_attn.v_proj.lora_A.weight",
        "model.layers.6.self_attn.q_proj.lora_A.weight",
        "model.layers.7.mlp.down_proj.lora_B.weight",
    ]
    assert full["model.layers.6.self_attn.q_proj.lora_A.weight"] is state[names[0]]
    assert full_to_emulator_adapter(full, plan) == dict(sorted(state.items()))
    gpt = {"transformer.h.5.attn.c_attn.lora_A.weight": torch.zeros(1)}
    assert list(emulator_to_full_adapter(gpt, plan)) == [
        "transformer.h.7.attn.c_attn.lora_A.weight"
    ]
    with pytest.raises(EmulatorError, match="not an adapter layer"):
        emulator_to_full_adapter({"model.layers.2.mlp.up_proj.lora_A.weight": torch.zeros(1)}, plan)
    with pytest.raises(EmulatorError, match="not an adapter layer"):
        full_to_emulator_adapter({"model.layers.3.mlp.up_proj.lora_A.weight": torch.zeros(1)}, plan)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_adapter_lora_sits_on_adapter_layers_only(tiny6):
    plan = kept_layers(N_LAYERS, 2, 1, 0.5)  # middle 1..3 (n=3, k=2): origin 0, 1, 3, 4, 5
    full, _, _ = load_causal_lm(tiny6)
    emu = build_emulator(full, plan)
    regex = layer_target_regex(full, SPEC, adapter_layers(plan, "full"))
    pe = attach_adapter_lora(emu, SPEC, plan, seed=0)
    pf = attach_adapter_lora(full, SPEC, plan, seed=0)
    st_e, st_f = adapter_state(pe), adapter_state(pf)
    mapped = emulator_to_full_adapter(st_e, plan)
    assert sorted(mapped) == sorted(st_f)
    assert all(torch.equal(mapped[k], st_f[k]) for k in st_f)  # same init for the same seed
    layers = {int(k.split(".")[2]) for k in st_f}
    assert layers == {0, 4, 5}
    # the regex helper selects exactly the same modules as layers_to_transform
    from peft import get_peft_model

    full2, _, _ = load_causal_lm(tiny6)
    cfg = SPEC.to_peft_config(full2.config.model_type)
    cfg.target_modules = regex
    by_regex = adapter_state(get_peft_model(full2, cfg))
    assert sorted(by_regex) == sorted(st_f)


def test_drop_0_adapter_trained_on_emulator_equals_training_on_full(llama6):
    plan = kept_layers(N_LAYERS, 2, 0, 0.0)
    cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=2, block_size=32, seed=0)
    full, tok, _ = load_causal_lm(llama6)
    pe = attach_adapter_lora(build_emulator(full, plan), SPEC, plan, seed=0)
    start = adapter_state(pe)
    train_causal_lm(pe, TINY_CORPUS, cfg, progress=None, tokenizer=tok)
    pf = attach_adapter_lora(full, SPEC, plan, seed=0)
    train_causal_lm(pf, TINY_CORPUS, cfg, progress=None, tokenizer=tok)

    trained = adapter_state(pe)
    assert any(not torch.equal(trained[k], start[k]) for k in trained)
    plugged = attach_adapter_lora(load_causal_lm(llama6)[0], SPEC, plan, seed=7)
    load_adapter_state(plugged, emulator_to_full_adapter(trained, plan))
    ids, mask = _batch(tok)
    torch.testing.assert_close(
        _logits(plugged, ids, mask), _logits(pf, ids, mask), atol=1e-6, rtol=0
    )


def test_adapter_plugs_back_by_layer_position(llama6):
    """drop 0.5: fed the emulator's middle output, the full model's top adapter layers (with
    the plugged-back adapter) reproduce the emulator's logits."""
    plan = kept_layers(N_LAYERS, 2, 0, 0.5)
    full, tok, _ = load_causal_lm(llama6)
    pe = attach_adapter_lora(build_emulator(full, plan), SPEC, plan, seed=0)
    st = _random_adapter(pe)
    pf = attach_adapter_lora(full, SPEC, plan, seed=3)
    load_adapter_state(pf, emulator_to_full_adapter(st, plan))
    ids, mask = _batch(tok)
    pe.eval()
    pf.eval()
    with torch.no_grad():
        emu_out = middle_block_output(pe, plan, ids, mask)
        top = decoder_layers(pf)[2][plan.middle_output_index("full")]

        def swap(_m, args, kwargs):
            return (emu_out.hidden,) + tuple(args[1:]), kwargs

        handle = top.register_forward_pre_hook(swap, with_kwargs=True)
        try:
            spliced = pf(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
        unspliced = pf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(spliced, emu_out.logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unspliced, emu_out.logits, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# alignment


@pytest.mark.parametrize("mode, lr", [("layers", 1e-3), ("lora", 5e-3)])
def test_align_emulator_lowers_l2n(llama6, mode, lr):
    plan = kept_layers(N_LAYERS, 2, 0, 0.5)
    full, tok, _ = load_causal_lm(llama6)
    pf = attach_adapter_lora(full, SPEC, plan, seed=0)
    st = _random_adapter(pf)
    pe = attach_adapter_lora(build_emulator(load_causal_lm(llama6)[0], plan), SPEC, plan, seed=0)
    load_adapter_state(pe, full_to_emulator_adapter(st, plan))
    flags = {n: p.requires_grad for n, p in pe.named_parameters()}
    top_before = {k: v.clone() for k, v in decoder_layers(pe)[2][2].state_dict().items()}
    seen = []
    cfg = AlignConfig(
        mode=mode, max_steps=8, lr=lr, batch_size=4, block_size=32, lambda_kd=0.5, log_every=1
    )
    res = align_emulator(pe, pf, plan, TINY_CORPUS, tok, cfg, progress=seen.append)
    assert res.steps == 8 and res.stopped_by == "max_steps" and len(res.losses) == 8
    assert res.after.l2n < 0.8 * res.before.l2n
    assert res.after.total < res.before.total
    assert [p.step for p in seen[:-1]] == list(range(1, 9)) and seen[-1].done
    # adapter, top layers and flags untouched; the emulator stays a plain model
    st_e, expected = adapter_state(pe), full_to_emulator_adapter(st, plan)
    assert st_e.keys() == expected.keys()
    assert all(torch.equal(st_e[k], v) for k, v in expected.items())
    after = decoder_layers(pe)[2][2].state_dict()
    assert all(torch.equal(after[k], v) for k, v in top_before.items())
    assert {n: p.requires_grad for n, p in pe.named_parameters()} == flags
    assert not any("delta_" in n for n, _ in pe.named_parameters())
    assert res.to_dict()["after"]["l2n"] == res.after.l2n


def test_align_emulator_is_deterministic(gpt2_6):
    plan = kept_layers(N_LAYERS, 2, 0, 0.5)
    full, tok, _ = load_causal_lm(gpt2_6)
    cfg = AlignConfig(mode="lora", max_steps=3, lr=1e-3, block_size=32, seed=5)
    runs = []
    for _ in range(2):
        emu = build_emulator(full, plan)
        res = align_emulator(emu, full, plan, TINY_CORPUS, tok, cfg, progress=None)
        runs.append((res.losses, emu.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())


def test_align_config_and_inputs_validated(llama6):
    with pytest.raises(ValueError, match="mode"):
        AlignConfig(mode="full")
    with pytest.raises(ValueError, match="max_steps"):
        AlignConfig(max_steps=0)
    with pytest.raises(ValueError, match="lambda_kd"):
        AlignConfig(lambda_kd=-1.0)
    assert AlignConfig.from_dict(AlignConfig(lora_targets=["q_proj"]).to_dict()).lora_targets == (
        "q_proj",
    )
    full, tok, _ = load_causal_lm(llama6)
    plan = kept_layers(N_LAYERS, 2, 0, 1.0)
    with pytest.raises(EmulatorError, match="nothing to align"):
        align_emulator(build_emulator(full, plan), full, plan, TINY_CORPUS, tok, progress=None)
    plan = kept_layers(N_LAYERS, 2, 0, 0.5)
    with pytest.raises(EmulatorError, match="decoder layers"):
        align_emulator(full, full, plan, TINY_CORPUS, tok, progress=None)
