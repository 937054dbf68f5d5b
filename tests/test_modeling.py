"""Model loading, quantization, LoRA and adapter state on real tiny models (CPU, no mocks)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from algorithms.core import lora_state, modeling
from algorithms.core.errors import (
    AdapterStateError,
    LoraSpecError,
    ModelError,
    ModelLoadError,
    QuantizationUnavailableError,
)
from algorithms.core.memory import PeakMemory, tensor_bytes
from algorithms.core.modeling import (
    LoraSpec,
    adapter_state,
    attach_lora,
    load_adapter_state,
    load_causal_lm,
    load_peft_adapter,
    save_peft_adapter,
)

bnb = pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = LoraSpec(r=4, alpha=8.0, dropout=0.0)




def _random_adapter(model, seed: int = 1, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A random adapter state (LoRA B is zero at init, which would hide gradient bugs)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=gen) * scale for n, t in adapter_state(model).items()}


def _batch(vocab: int, seed: int = 0, rows: int = 2, cols: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (rows, cols), generator=gen)


def _lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def _lora_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient reached {n}"
            out[n] = p.grad.detach().clone()
    return out


def _dequantized_reference(path, qmodel, kind: str):
    """fp32 model whose quantized linear weights are replaced by their dequantized values."""
    ref, _, _ = load_causal_lm(path, quant="fp32")
    n = 0
    for name, mod in qmodel.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            w = mod.weight.data.float() * mod.weight.SCB.float().unsqueeze(1) / 127.0
        else:
            continue
        ref.get_submodule(name).weight.data.copy_(w)
        n += 1
    assert n > 0, f"no {kind} layers found"
    return ref


def _packed_layers(model) -> int:
    return sum(
        1
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
        and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    )


# ---------------------------------------------------------------------------------------------
# quantized LoRA gradients (guards the bitsandbytes avx512_bf16 CPU repacking trap)


def test_nf4_lora_grads_match_dequantized_fp32_after_eval_forward(tiny_llama_path):
    qmodel, tok, report = load_causal_lm(tiny_llama_path, quant="nf4")
    assert report.quant == "nf4" and not report.fell_back
    assert report.cpu_repacking_disabled == 14  # 7 linear layers x 2 decoder layers
    assert all(
        m.support_avx512bf16_for_cpu is False
        for m in qmodel.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )
    ref = _dequantized_reference(tiny_llama_path, qmodel, "nf4")
    pq = attach_lora(qmodel, SPEC, seed=0)
    pr = attach_lora(ref, SPEC, seed=0)
    state = _random_adapter(pq)
    load_adapter_state(pq, state)
    load_adapter_state(pr, state)
    ids = _batch(len(tok))

    # An eval-mode no-grad forward is what triggers the repacking on avx512_bf16 CPUs.
    pq.eval()
    pr.eval()
    with torch.no_grad():
        lq, lr = pq(input_ids=ids).logits, pr(input_ids=ids).logits
    assert _packed_layers(pq) == 0
    torch.testing.assert_close(lq, lr, atol=1e-4, rtol=1e-4)

    pq.train()
    pr.train()
    loss_q, loss_r = _lm_loss(pq, ids), _lm_loss(pr, ids)
    loss_q.backward()
    loss_r.backward()
    gq, gr = _lora_grads(pq), _lora_grads(pr)
    assert gq.keys() == gr.keys() and len(gq) == 2 * 14
    assert abs(loss_q.item() - loss_r.item()) < 1e-5
    for n in gq:
        # dequantized weights are the exact operands, so only summation order differs
        torch.testing.assert_close(gq[n], gr[n], atol=1e-6, rtol=1e-4, msg=n)
    assert max(float(g.abs().max()) for g in gr.values()) > 1e-4  # gradients are not trivially 0


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="CPU lacks avx512_bf16: no repacking to repair"
)
def test_already_repacked_nf4_layers_are_repaired(tiny_llama_path):
    qmodel, tok, _ = load_causal_lm(tiny_llama_path, quant="nf4")
    ids = _batch(len(tok))
    qmodel.train()
    with torch.no_grad():
        before = qmodel(input_ids=ids).logits
    for m in qmodel.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on this CPU
    qmodel.eval()
    with torch.no_grad():
        qmodel(input_ids=ids)
    assert _packed_layers(qmodel) == 14  # the trap is real on this machine
    assert modeling.disable_cpu_weight_repacking(qmodel) == 14
    assert _packed_layers(qmodel) == 0
    # the layers are consistent again: training-mode forward and LoRA gradients equal those of
    # an fp32 model holding their dequantized weights ...
    ref = _dequantized_reference(tiny_llama_path, qmodel, "nf4")
    pq, pr = attach_lora(qmodel, SPEC, seed=0), attach_lora(ref, SPEC, seed=0)
    state = _random_adapter(pq)
    load_adapter_state(pq, state)
    load_adapter_state(pr, state)
    pq.train()
    pr.train()
    _lm_loss(pq, ids).backward()
    _lm_loss(pr, ids).backward()
    gq, gr = _lora_grads(pq), _lora_grads(pr)
    for n in gq:
        torch.testing.assert_close(gq[n], gr[n], atol=1e-6, rtol=1e-4, msg=n)
    # ... and the repacking only left the bf16 rounding of the block scales behind
    with torch.no_grad(), pq.disable_adapter():
        after = pq(input_ids=ids).logits
    drift = float((after - before).abs().max())
    assert drift < 5e-3 * float(before.abs().max()), drift


def test_int8_lora_grads_match_dequantized_fp32(tiny_llama_path):
    qmodel, tok, report = load_causal_lm(tiny_llama_path, quant="int8")
    assert report.quant == "int8"
    ref = _dequantized_reference(tiny_llama_path, qmodel, "int8")
    pq = attach_lora(qmodel, SPEC, seed=0)
    pr = attach_lora(ref, SPEC, seed=0)
    state = _random_adapter(pq)
    load_adapter_state(pq, state)
    load_adapter_state(pr, state)
    ids = _batch(len(tok))
    pq.eval()
    with torch.no_grad():
        pq(input_ids=ids)
    pq.train()
    pr.train()
    _lm_loss(pq, ids).backward()
    _lm_loss(pr, ids).backward()
    gq, gr = _lora_grads(pq), _lora_grads(pr)
    for n in gq:
        # int8 on CPU computes the training matmul from the dequantized weight; allow 1e-3
        rel = float((gq[n] - gr[n]).norm() / gr[n].norm().clamp_min(1e-12))
        assert rel < 1e-3, (n, rel)


def test_nf4_save_after_eval_does_not_corrupt(tiny_llama_path, tmp_path):
    qmodel, tok, _ = load_causal_lm(tiny_llama_path, quant="nf4")
    ref = _dequantized_reference(tiny_llama_path, qmodel, "nf4")
    pq = attach_lora(qmodel, SPEC, seed=0)
    pr = attach_lora(ref, SPEC, seed=0)
    state = _random_adapter(pq, seed=3)
    load_adapter_state(pq, state)
    load_adapter_state(pr, state)
    ids = _batch(len(tok), seed=5)
    pq.eval()
    pr.eval()
    with torch.no_grad():
        before = pq(input_ids=ids).logits
        expected = pr(input_ids=ids).logits
    pq.save_pretrained(str(tmp_path / "peft"))
    saved, spec = load_peft_adapter(tmp_path / "peft")
    mem = adapter_state(pq)
    assert saved.keys() == mem.keys()
    for n in mem:
        torch.testing.assert_close(saved[n], mem[n], atol=0, rtol=0)
    assert spec.r == SPEC.r and spec.alpha == SPEC.alpha
    with torch.no_grad():
        after = pq(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# peft-format export


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_adapter_loads_with_peft_and_gives_same_logits(arch, request, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = request.getfixturevalue(f"tiny_{arch}_path")
    model, tok, _ = load_causal_lm(base, quant="fp32")
    pm = attach_lora(model, SPEC, seed=0)
    load_adapter_state(pm, _random_adapter(pm, seed=7))
    ids = _batch(len(tok), seed=9)
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=ids).logits

    out = save_peft_adapter(pm, base, tmp_path / "a")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["peft_type"] == "LORA"

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(out))
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the adapter changed the output (a zero adapter would make this test vacuous)
    with torch.no_grad(), pm.disable_adapter():
        plain = pm(input_ids=ids).logits
    assert float((plain - want).abs().max()) > 1e-3

    # a bare state dict + spec writes the same files as peft's own save_pretrained
    out2 = save_peft_adapter(adapter_state(pm), base, tmp_path / "b", spec=SPEC)
    pm.save_pretrained(str(tmp_path / "c"))
    from safetensors.torch import load_file

    ours, peft_own = (
        load_file(str(out2 / "adapter_model.safetensors")),
        load_file(str(tmp_path / "c" / "adapter_model.safetensors")),
    )
    assert ours.keys() == peft_own.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], peft_own[k], atol=0, rtol=0)


def test_save_state_with_wrong_spec_is_rejected(tiny_llama_path, tmp_path):
    model, _, _ = load_causal_lm(tiny_llama_path)
    pm = attach_lora(model, SPEC, seed=0)
    with pytest.raises(AdapterStateError, match="rank"):
        save_peft_adapter(adapter_state(pm), tiny_llama_path, tmp_path, spec=LoraSpec(r=8))
    with pytest.raises(LoraSpecError):
        save_peft_adapter(adapter_state(pm), tiny_llama_path, tmp_path)  # spec missing


# ---------------------------------------------------------------------------------------------
# adapter state in and out


def test_adapter_state_round_trip_and_errors(tiny_llama_path):
    model, _, _ = load_causal_lm(tiny_llama_path)
    pm = attach_lora(model, SPEC, seed=0)
    st = adapter_state(pm)
    assert len(st) == 28
    name = "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert name in st and st[name].shape == (4, 64)
    assert st["model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    for t in st.values():
        assert t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
    # a copy, not a view of the parameters
    st[name].add_(1.0)
    assert not torch.equal(adapter_state(pm)[name], st[name])

    new = _random_adapter(pm, seed=11)
    load_adapter_state(pm, new)
    back = adapter_state(pm)
    for n in new:
        torch.testing.assert_close(back[n], new[n], atol=0, rtol=0)

    bad_shape = dict(new)
    bad_shape[name] = torch.zeros(5, 64)
    with pytest.raises(AdapterStateError, match="shape"):
        load_adapter_state(pm, bad_shape)
    extra = dict(new)
    extra["model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    with pytest.raises(AdapterStateError, match="unexpected"):
        load_adapter_state(pm, extra)
    missing = dict(new)
    del missing[name]
    with pytest.raises(AdapterStateError, match="missing"):
        load_adapter_state(pm, missing)
    nan = dict(new)
    nan[name] = torch.full((4, 64), float("nan"))
    with pytest.raises(AdapterStateError, match="non-finite"):
        load_adapter_state(pm, nan)
    # nothing was written by the failed loads
    for n in new:
        torch.testing.assert_close(adapter_state(pm)[n], new[n], atol=0, rtol=0)
    # non-strict: a partial state is applied; shapes still checked
    partial = {name: torch.ones(4, 64)}
    load_adapter_state(pm, partial, strict=False)
    assert torch.equal(adapter_state(pm)[name], torch.ones(4, 64))
    with pytest.raises(AdapterStateError):
        load_adapter_state(pm, {name: torch.ones(3, 64)}, strict=False)
    assert isinstance(AdapterStateError("x"), ModelError)


def test_adapter_state_needs_lora(tiny_llama_path):
    model, _, _ = load_causal_lm(tiny_llama_path)
    with pytest.raises(AdapterStateError, match="attach_lora"):
        adapter_state(model)


# ---------------------------------------------------------------------------------------------
# lora_state helpers


def test_wire_round_trip_and_tolerances(tmp_path):
    from safetensors.numpy import load_file, save_file

    gen = torch.Generator().manual_seed(0)
    state = {
        "m.q_proj.lora_A.weight": torch.randn(4, 64, generator=gen),
        "m.q_proj.lora_B.weight": torch.randn(64, 4, generator=gen) * 1e-3,
    }
    exact = lora_state.from_wire(lora_state.to_wire(state, "fp32"))
    for n in state:
        assert torch.equal(exact[n], state[n])
    # round-to-nearest: fp16 keeps 11 significant bits (relative error <= 2**-11) down to
    # 6.1e-5, below that a fixed step of 2**-24 (absolute error <= 2**-25); bf16 keeps 8 bits
    # (relative error <= 2**-8) over the whole fp32 range.
    for dtype, rel_tol, abs_tol in (("fp16", 2.0**-11, 2.0**-25), ("bf16", 2.0**-8, 0.0)):
        wire = lora_state.to_wire(state, dtype)
        path = tmp_path / f"{dtype}.safetensors"
        save_file(wire, str(path))
        back = lora_state.from_wire(load_file(str(path)), dtype=dtype)
        assert lora_state.wire_dtype_of(wire) == dtype
        assert (
            wire["m.q_proj.lora_A.weight"].dtype == {"fp16": np.float16, "bf16": np.uint16}[dtype]
        )
        for n in state:
            excess = (back[n] - state[n]).abs() - (rel_tol * state[n].abs() + abs_tol)
            assert float(excess.max()) <= 1e-12, (dtype, n, float(excess.max()))
            assert back[n].dtype == torch.float32
    with pytest.raises(AdapterStateError, match="65504"):
        lora_state.to_wire({"x.lora_A.weight": torch.tensor([[7e4]])}, "fp16")
    big = lora_state.from_wire(lora_state.to_wire({"x": torch.tensor([7e4])}, "bf16"))
    assert abs(float(big["x"][0]) - 7e4) / 7e4 < 2.0**-8
    with pytest.raises(AdapterStateError, match="non-finite"):
        lora_state.to_wire({"x": torch.tensor([float("inf")])}, "fp32")
    with pytest.raises(AdapterStateError):
        lora_state.from_wire(lora_state.to_wire(state, "fp16"), dtype="bf16")


def test_state_math():
    gen = torch.Generator().manual_seed(1)
    a = {
        "m.l0.q.lora_A.weight": torch.randn(2, 6, generator=gen),
        "m.l0.q.lora_B.weight": torch.randn(5, 2, generator=gen),
    }
    sig = lora_state.state_signature(a)
    assert sig == {
        "m.l0.q.lora_A.weight": ((2, 6), "float32"),
        "m.l0.q.lora_B.weight": ((5, 2), "float32"),
    }
    vec, sig2 = lora_state.flatten(a)
    assert vec.shape == (22,) and sig2 == sig
    back = lora_state.unflatten(vec, sig)
    assert all(torch.equal(back[n], a[n]) for n in a)
    with pytest.raises(AdapterStateError):
        lora_state.unflatten(vec[:-1], sig)
    want = math.sqrt(sum(float(t.double().pow(2).sum()) for t in a.values()))
    assert abs(lora_state.l2_norm(a) - want) < 1e-9 * max(want, 1)
    assert lora_state.is_finite(a)
    assert not lora_state.is_finite({"x": torch.tensor([float("nan")])})
    delta = lora_state.merged_delta(a, 2.0)
    torch.testing.assert_close(
        delta["m.l0.q"], 2.0 * a["m.l0.q.lora_B.weight"] @ a["m.l0.q.lora_A.weight"]
    )
    with pytest.raises(AdapterStateError):
        lora_state.merged_delta({"m.q.lora_A.weight": torch.zeros(2, 3)}, 1.0)
    with pytest.raises(AdapterStateError, match="shape"):
        lora_state.check_compatible(a, {**a, "m.l0.q.lora_A.weight": torch.zeros(3, 6)})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_delta_equals_peft_merge(arch, request):
    base = request.getfixturevalue(f"tiny_{arch}_path")
    model, _, _ = load_causal_lm(base)
    pm = attach_lora(model, SPEC, seed=0)
    state = _random_adapter(pm, seed=4)
    load_adapter_state(pm, state)
    names = {
        n: mod.weight.detach().clone()
        for n, mod in pm.get_base_model().named_modules()
        if hasattr(mod, "lora_A")
    }
    base_w = {
        n: pm.get_base_model().get_submodule(n).base_layer.weight.detach().clone() for n in names
    }
    merged = pm.merge_and_unload()
    delta = lora_state.merged_delta(state, SPEC.scaling)
    assert len(delta) == len(base_w) > 0
    for n, w0 in base_w.items():
        d = delta[n]
        if arch == "gpt2":  # Conv1D stores (in, out)
            d = d.T
        torch.testing.assert_close(merged.get_submodule(n).weight - w0, d, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# LoRA spec


def test_lora_spec_validation_and_defaults(tiny_llama_path, tiny_gpt2_path):
    for bad in (
        {"r": 0},
        {"r": 2.5},
        {"alpha": -1},
        {"alpha": float("nan")},
        {"dropout": 1.0},
        {"target_modules": "q_proj"},
        {"target_modules": ()},
        {"target_modules": ("q_proj", "q_proj")},
        {"target_modules": {}},
        {"target_modules": {"llama": "q_proj"}},
        {"target_modules": {"": ["q_proj"]}},
        {"target_modules": {"llama": []}},
    ):
        with pytest.raises(LoraSpecError):
            LoraSpec(**bad)
    with pytest.raises(LoraSpecError):
        LoraSpec.from_dict({"target_modules": "q_proj"})  # not split into letters
    assert LoraSpec(r=4, alpha=8).scaling == 2.0
    assert LoraSpec().resolved_targets("llama") == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    assert LoraSpec().resolved_targets("gpt2") == ("c_attn", "c_proj", "c_fc")
    with pytest.raises(LoraSpecError, match="target_modules explicitly"):
        LoraSpec().resolved_targets("mystery")
    assert LoraSpec.from_dict(LoraSpec(r=2, target_modules=["a"]).to_dict()) == LoraSpec(
        r=2, target_modules=("a",)
    )

    model, _, _ = load_causal_lm(tiny_gpt2_path)
    with pytest.raises(LoraSpecError, match="c_attn"):  # message lists the real layer names
        attach_lora(model, LoraSpec(target_modules=("q_proj",)))
    pm = attach_lora(model, LoraSpec(r=2))
    assert modeling.lora_spec_of(pm).target_modules == ("c_attn", "c_fc", "c_proj")
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    with pytest.raises(LoraSpecError, match="already"):
        attach_lora(pm, SPEC)


def test_lora_spec_per_architecture_targets(tiny_llama_path, tiny_gpt2_path):
    """One spec reaches a mixed fleet: the Llama model gets its defaults plus its LM head, the
    GPT-2 model its own defaults; an architecture the mapping does not name is refused."""
    llama_targets = ["q_proj", "v_proj", "lm_head"]
    spec = LoraSpec.from_dict({"r": 2, "target_modules": {"llama": llama_targets, "gpt2": None}})
    assert spec.resolved_targets("llama") == tuple(llama_targets)
    assert spec.resolved_targets("gpt2") == ("c_attn", "c_proj", "c_fc")
    with pytest.raises(LoraSpecError, match="not 'opt'"):
        spec.resolved_targets("opt")
    assert LoraSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    for path, want in ((tiny_llama_path, {"q_proj", "v_proj", "lm_head"}), (tiny_gpt2_path, {"c_attn", "c_proj", "c_fc"})):
        model, _, _ = load_causal_lm(path)
        pm = attach_lora(model, spec)
        adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in pm.named_parameters() if ".lora_A" in n}
        assert adapted == want


# ---------------------------------------------------------------------------------------------
# loading and fallback


def test_bitsandbytes_missing_falls_back(tiny_llama_path, monkeypatch, caplog):
    def no_bnb():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(modeling, "_import_bitsandbytes", no_bnb)
    with caplog.at_level("WARNING", logger="algorithms.core.modeling"):
        model, tok, report = load_causal_lm(tiny_llama_path, quant="nf4")
    assert report.requested_quant == "nf4" and report.quant == "fp32" and report.fell_back
    assert any("bitsandbytes cannot be imported" in n for n in report.notes)
    assert "nf4 unavailable" in caplog.text
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert next(model.parameters()).dtype == torch.float32
    assert report.bitsandbytes is None
    with pytest.raises(QuantizationUnavailableError, match="strict=True"):
        load_causal_lm(tiny_llama_path, quant="int8", strict=True)
    # plain modes never need bitsandbytes
    _, _, rep = load_causal_lm(tiny_llama_path, quant="bf16", strict=True)
    assert rep.quant == "bf16" and not rep.notes


def test_load_errors_and_report(tiny_llama_path, tmp_path):
    with pytest.raises(ModelLoadError, match="never downloads"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="quant"):
        load_causal_lm(tiny_llama_path, quant="int4")
    with pytest.raises(ModelLoadError, match="compute dtype"):
        load_causal_lm(tiny_llama_path, quant="nf4", compute_dtype="int3")
    m32, tok, r32 = load_causal_lm(tiny_llama_path, quant="fp32")
    m4, _, r4 = load_causal_lm(tiny_llama_path, quant="nf4")
    assert r32.model_type == "llama" and r32.num_parameters == r4.num_parameters
    assert r4.weight_bytes < r32.weight_bytes
    buffers = sum(b.numel() * b.element_size() for b in m32.buffers())
    assert tensor_bytes(m32) == 4 * r32.num_parameters + buffers
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert r4.to_dict()["fell_back"] is False


def test_peak_memory_and_tensor_bytes(tiny_llama_path):
    with PeakMemory("cpu", interval_s=0.001) as pm:
        block = torch.ones(16 * 1024 * 1024)  # 64 MiB, touched
        block.add_(1)
        time.sleep(0.02)
    del block
    assert pm.kind == "process_rss"
    assert pm.delta_bytes >= 48 * 1024 * 1024, pm.to_dict()
    model, _, _ = load_causal_lm(tiny_llama_path)
    pmodel = attach_lora(model, SPEC, seed=0)
    lora_numel = sum(t.numel() for t in adapter_state(pmodel).values())
    assert tensor_bytes(pmodel, trainable_only=True) == 4 * lora_numel


def test_concurrent_loads_in_threads_do_not_share_meta_tensors(tmp_path_factory):
    """Several EdgeClients in one process load their models at the same time."""
    import threading

    from algorithms.zoo import build_zoo

    # a zoo checkpoint: tied embeddings saved without lm_head.weight, which is where the race showed
    path = build_zoo(cache_dir=tmp_path_factory.mktemp("zoo"), quick=True, progress=False)["slm-llama"]
    results: list = []
    errors: list = []

    def load():
        try:
            results.append(load_causal_lm(path, quant="fp32")[0])
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for m in results:
        assert not any(p.is_meta for p in m.parameters())
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr() or not m.config.tie_word_embeddings
