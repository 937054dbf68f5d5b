"""Every family of ``firmware_profiles.families`` through every path, on tiny random models built
from the real transformers config classes with each family's layout: qkv biases (Qwen2, GPT-2,
GPT-NeoX, OPT), qk-norm (Qwen3, Gemma-3), fused q/k/v and gate/up (Phi-3; fused q/k/v for
GPT-2, GPT-NeoX, Falcon), soft-caps (Gemma-2), sliding windows on every layer (Mistral, Phi-3)
or per layer (Qwen2/3 ``use_sliding_window``, Gemma-2/3 local/global), grouped-query and
multi-query attention, tied and untied embeddings, and vocabularies padded beyond the
tokenizer. Per family:

(a) the planner's LoRA parameter count equals peft's on the loaded model, and the fit check
    accepts the task;
(b) one LoRA training step on nf4 and on int8 weights (bitsandbytes on CPU) lowers the loss,
    every decoder linear really quantized;
(c) a 1-round FedAvg federation of 2 clients in one process makes a new global adapter;
(d) the ONNX export's logits on ONNX Runtime equal transformers' at 3x the sliding window, in
    one prefill and decoding with the cache;
(e) proxy-tuned generation, plain and speculative, equals a transformers + peft reference
    (large + alpha * (tuned - base), tuned and base from one PeftModel with the adapter
    enabled / disabled), tokens past the window included.

Mixture-of-experts models are refused by the planner, the fit check, the loader and the export
with typed errors naming the family. The default run covers (a)-(e) on the torch backend; the
same proxy checks on ONNX Runtime (a gated export per family) and the dynamo exporter are
``slow``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from firmware_profiles import FAMILIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W = 8  # the sliding window of the windowed tiny models
LENGTH = 3 * W  # ORT vs transformers: sequence length checked (past the window)
ATOL = 1e-4
NEW_TOKENS = 3 * W  # proxy decoding: a short prompt, then well past the window
ALPHA = 1.5
RANK = 4
LAYERS = {"num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128}
GQA = {"hidden_size": 32, "num_key_value_heads": 2, "intermediate_size": 48}


@dataclass(frozen=True)
class Case:
    """A tiny model of one family: its config class and fields, embedding rows beyond the
    tokenizer, the tokenizer style, and the sliding layers the export must find."""

    config_class: str
    fields: dict
    pad_vocab: int = 0
    tokenizer: str = "metaspace"
    sliding: tuple[int, ...] = ()
    layout: tuple[str, ...] = field(default=())  # what the case exercises (for the report)


def _windowed_by_layer(**extra: object) -> dict:
    # layer 0 global, layer 1 windowed (Qwen2/3: max_window_layers=1 names the first layer full)
    return {**GQA, "use_sliding_window": True, "sliding_window": W, "max_window_layers": 1, **extra}


CASES: dict[str, Case] = {
    "llama": Case("LlamaConfig", {**LAYERS, **GQA}, layout=("gqa", "untied")),
    "mistral": Case(
        "MistralConfig",
        {**LAYERS, **GQA, "sliding_window": W},
        sliding=(0, 1),
        layout=("gqa", "window on every layer", "untied"),
    ),
    "qwen2": Case(
        "Qwen2Config",
        {**LAYERS, **_windowed_by_layer(tie_word_embeddings=True)},
        pad_vocab=24,
        sliding=(1,),
        layout=("qkv bias", "gqa", "per-layer window", "tied", "padded vocab"),
    ),
    "qwen3": Case(
        "Qwen3Config",
        {**LAYERS, **_windowed_by_layer(head_dim=16, tie_word_embeddings=True)},
        pad_vocab=24,
        sliding=(1,),
        layout=(
            "qk-norm",
            "head_dim != hidden/heads",
            "gqa",
            "per-layer window",
            "tied",
            "padded vocab",
        ),
    ),
    "gemma": Case(
        "GemmaConfig",
        {**LAYERS, **GQA, "num_key_value_heads": 1, "head_dim": 16},
        layout=("multi-query", "head_dim != hidden/heads", "tied"),
    ),
    "gemma2": Case(
        "Gemma2Config",
        {
            **LAYERS,
            **GQA,
            "head_dim": 16,
            "sliding_window": W,
            # small soft-caps, so that they change the logits of a tiny model
            "attn_logit_softcapping": 0.5,
            "final_logit_softcapping": 2.0,
        },
        sliding=(0,),
        layout=("alternating local/global", "soft-caps", "post-norms", "gqa", "tied"),
    ),
    "gemma3_text": Case(
        "Gemma3TextConfig",
        {
            **LAYERS,
            **GQA,
            "head_dim": 16,
            "sliding_window": W,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        pad_vocab=16,
        sliding=(0,),
        layout=("alternating local/global", "qk-norm", "post-norms", "gqa", "tied", "padded vocab"),
    ),
    "phi3": Case(
        "Phi3Config",
        {**LAYERS, **GQA, "sliding_window": W},
        pad_vocab=16,
        sliding=(0, 1),
        layout=(
            "fused qkv",
            "fused gate_up",
            "window on every layer",
            "gqa",
            "untied",
            "padded vocab",
        ),
    ),
    "gpt2": Case(
        "GPT2Config",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
        tokenizer="bytelevel",
        layout=("Conv1D", "fused qkv", "qkv bias", "learned positions", "tied"),
    ),
    "gpt_neox": Case(
        "GPTNeoXConfig",
        {**LAYERS, "hidden_size": 32, "intermediate_size": 48},
        pad_vocab=16,
        tokenizer="bytelevel",
        layout=(
            "fused qkv",
            "qkv bias",
            "parallel residual",
            "partial rotary",
            "untied",
            "padded vocab",
        ),
    ),
    "opt": Case(
        "OPTConfig",
        {**LAYERS, "hidden_size": 32, "ffn_dim": 48},
        pad_vocab=8,
        tokenizer="bytelevel",
        layout=("qkv bias", "learned positions (offset 2)", "tied", "padded vocab"),
    ),
    "falcon": Case(
        "FalconConfig",
        {**LAYERS, "hidden_size": 32},
        tokenizer="bytelevel",
        layout=("fused qkv", "multi-query", "parallel attention", "tied"),
    ),
}
NAMES = sorted(CASES)
WINDOWED = [f for f in NAMES if CASES[f].sliding]

_DIRS: dict[tuple[str, int], Path] = {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """``model_dir(family, seed=0)``: the family's tiny model directory, built once per module
    (seed 1 is the proxy's "large" model: other weights, the same tokenizer)."""
    from tests.tiny_models import make_tiny_causal_lm

    def get(family: str, seed: int = 0) -> Path:
        key = (family, seed)
        if key not in _DIRS:
            case = CASES[family]
            _DIRS[key] = make_tiny_causal_lm(
                tmp_path_factory.mktemp(f"{family}-{seed}"),
                case.config_class,
                seed=seed,
                tokenizer_style=case.tokenizer,
                pad_vocab=case.pad_vocab,
                **case.fields,
            )
        return _DIRS[key]

    return get


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_every_family_has_a_case():
    assert set(CASES) == set(FAMILIES)


@pytest.mark.parametrize("family", NAMES)
def test_tiny_model_has_the_family_layout(family, model_dir):
    """What each case claims to exercise is really in the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    cfg, case, fam = model.config, CASES[family], FAMILIES[family]
    assert cfg.model_type == family
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(fam.linear_names) <= names
    layout = set(case.layout)
    v = model.get_input_embeddings().weight.shape[0]
    assert (v > len(AutoTokenizer.from_pretrained(str(path)))) == ("padded vocab" in layout)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == ("tied" in layout) == bool(cfg.tie_word_embeddings)
    if "qkv bias" in layout:
        first = fam.attn_in[0]
        assert any(n.endswith(f".{first}.bias") for n, _ in model.named_parameters())
    if "qk-norm" in layout:
        assert {"q_norm", "k_norm"} <= names
    if "gqa" in layout or "multi-query" in layout:
        kv = getattr(cfg, "num_key_value_heads", None) or (1 if cfg.multi_query else None)
        assert kv is not None and kv < cfg.num_attention_heads
        assert ("multi-query" in layout) == (kv == 1)


# ------------------------------------------------------------------------------------------
# (a) the plan and the fit check


@pytest.mark.parametrize("family", NAMES)
def test_plan_counts_the_lora_parameters_peft_trains(family, model_dir):
    """With the LM head among the targets, so that a padded vocabulary counts too."""
    from algorithms.core.modeling import LoraSpec, attach_lora, load_causal_lm
    from edge_sdk.fit import check_task_fits
    from firmware_profiles import Workload, plan

    path = model_dir(family)
    targets = (*FAMILIES[family].default_targets, "lm_head")
    p = plan(
        path, "generic-cpu", Workload(quant="nf4", lora_rank=RANK, seq_len=32, lora_targets=targets)
    )
    model, _, _ = load_causal_lm(path)
    peft_model = attach_lora(model, LoraSpec(r=RANK, alpha=8.0, target_modules=targets), seed=0)
    assert p.details["trainable_params"] == _trainable(peft_model)
    assert p.fits and not any("treated as a llama-style" in n for n in p.notes)
    lora = {"r": RANK, "alpha": 8, "target_modules": None}
    fit = check_task_fits("generic-cpu", path, lora, {"batch_size": 2, "block_size": 32}, "nf4")
    assert fit.fits, fit.message


# ------------------------------------------------------------------------------------------
# (b) a LoRA step on quantized weights


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("family", NAMES)
def test_lora_step_on_quantized_weights(family, quant, model_dir):
    from algorithms.core.modeling import (
        LoraSpec,
        adapter_state,
        attach_lora,
        bitsandbytes_status,
        load_causal_lm,
    )
    from algorithms.core.textdata import TokenizedDataset, evaluate_nll
    from algorithms.core.training import TrainConfig, train_causal_lm
    from tests.tiny_models import TINY_CORPUS

    ok, why = bitsandbytes_status()
    if not ok:
        pytest.skip(f"bitsandbytes cannot quantize on this CPU: {why}")
    import bitsandbytes as bnb

    model, tok, report = load_causal_lm(model_dir(family), quant=quant, strict=True)
    assert report.quant == quant and not report.notes
    qcls = bnb.nn.Linear4bit if quant == "nf4" else bnb.nn.Linear8bitLt
    fam = FAMILIES[family]
    quantized = [n for n, m in model.named_modules() if isinstance(m, qcls)]
    # every decoder linear the family names, in both layers (GPT-2's two c_proj included)
    per_layer = len(fam.linear_names) + (fam.attn_out == fam.mlp_out)
    assert len(quantized) == per_layer * model.config.num_hidden_layers, quantized
    peft_model = attach_lora(model, LoraSpec(r=RANK, alpha=8.0), seed=0)
    four_bit = [m for m in peft_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(m.support_avx512bf16_for_cpu is False for m in four_bit)
    ds = TokenizedDataset(tok, TINY_CORPUS[:4], block_size=16)
    before = evaluate_nll(peft_model, tok, ds, batch_size=8)
    start = {k: v.clone() for k, v in adapter_state(peft_model).items()}
    res = train_causal_lm(
        peft_model, ds, TrainConfig(lr=2e-2, max_steps=2, batch_size=8), progress=None
    )
    after = evaluate_nll(peft_model, tok, ds, batch_size=8)
    assert res.steps >= 1 and np.isfinite(res.loss_last)
    assert any(not bool((adapter_state(peft_model)[k] == v).all()) for k, v in start.items())
    assert after.nll < before.nll, (before.nll, after.nll)
    assert all(m.support_avx512bf16_for_cpu is False for m in four_bit)


# ------------------------------------------------------------------------------------------
# (c) one federated round in one process


@pytest.mark.parametrize("family", NAMES)
def test_one_fedavg_round_makes_a_new_global_adapter(family, model_dir, tmp_path):
    from aggregator.context import ServerContext
    from cotune.simulate import simulate
    from edge_sdk.context import DeviceContext
    from tests.tiny_models import TINY_CORPUS

    path = model_dir(family)
    config = {
        "train": {"lr": 1e-2, "batch_size": 4, "block_size": 16, "max_steps": 2},
        "eval_block_size": 16,
        "lora": {"r": RANK, "alpha": 8},
    }
    clients = [
        DeviceContext(
            f"c{i}", path, TINY_CORPUS[i::2], TINY_CORPUS[12:], quant="nf4", progress=None
        )
        for i in range(2)
    ]
    server = ServerContext(str(tmp_path), 0, {"slm": str(path)}, TINY_CORPUS[:8])
    res = simulate("fedavg", config, server, clients, rounds=1, progress=None)
    assert len(res.rounds) == 1 and set(res.rounds[0].clients) == {"c0", "c1"}
    assert set(res.state) == set(res.initial)
    assert all(np.isfinite(v).all() for v in res.state.values())
    assert any(not np.array_equal(res.state[k], res.initial[k]) for k in res.initial)
    assert all(np.isfinite(m["nll_final"]) for m in res.final.values())


# ------------------------------------------------------------------------------------------
# (d) ONNX Runtime vs transformers past the window


def _check_ort_past_the_window(family, path, out, exporter):
    import torch

    from edge_sdk.inference.onnx_export import export_onnx
    from tests.test_onnx_window import hf_model, ids_of, ort_logits

    man = export_onnx(path, out, exporter=exporter)
    assert man["exporter"] == exporter
    att = man["attention"]
    assert att["sliding_layers"] == list(CASES[family].sliding)
    assert att["window"] == (W if CASES[family].sliding else None)
    if CASES[family].sliding:
        ver = man["verification"]["past_window"]
        assert ver["tokens"] > W and ver["greedy_token_mismatches"] == 0
    ids = ids_of(LENGTH)
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor([ids])).logits[0].numpy()
    assert ref.shape[-1] == man["vocab_size"]  # padded rows included
    assert np.abs(ort_logits(out, ids) - ref).max() < ATOL
    assert np.abs(ort_logits(out, ids, split=3) - ref).max() < ATOL


@pytest.mark.parametrize("family", NAMES)
def test_ort_logits_equal_transformers_past_the_window(family, model_dir, tmp_path):
    from edge_sdk.inference.onnx_export import ort_status

    pytest.importorskip("onnx", reason="onnx is not installed (pip install cotune[onnx])")
    if not ort_status()[0]:
        pytest.skip(ort_status()[1])
    _check_ort_past_the_window(family, model_dir(family), tmp_path / "onnx", "torchscript")


@pytest.mark.slow
@pytest.mark.parametrize("family", NAMES)
def test_dynamo_export_equals_transformers_past_the_window(family, model_dir, tmp_path):
    from edge_sdk.inference.onnx_export import ort_status

    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    if not ort_status()[0]:
        pytest.skip(ort_status()[1])
    _check_ort_past_the_window(family, model_dir(family), tmp_path / "onnx", "dynamo")


# ------------------------------------------------------------------------------------------
# (e) proxy-tuned and speculative decoding vs transformers + peft


def _reference_proxy_logits(base, large, adapter, ids: list[int], start: int) -> np.ndarray:
    """``log_softmax(large) + ALPHA * (tuned - base)`` after each prefix ``ids[:j + 1]``, j >=
    start - 1, from transformers and peft alone: one full forward per model (no cache), the
    tuned and base logits from one PeftModel with its adapter enabled and disabled."""
    import torch
    from peft import PeftModel

    from tests.test_onnx_window import hf_model

    x = torch.tensor([ids])
    peft = PeftModel.from_pretrained(hf_model(base), str(adapter)).eval()
    with torch.no_grad():
        zl = torch.log_softmax(hf_model(large)(x).logits[0].double(), -1)
        zt = peft(x).logits[0].double()
        with peft.disable_adapter():
            zb = peft(x).logits[0].double()
    v = min(zl.shape[-1], zt.shape[-1])
    z = zl[:, :v] + ALPHA * (zt[:, :v] - zb[:, :v])
    return z[start - 1 : -1].numpy()


def _check_proxy(family, backend, model_dir, tmp_path):
    from edge_sdk.inference.generate import SamplingConfig, encode_prompt, load_backend
    from edge_sdk.inference.proxy import LocalLargeModel, ProxyGenerator, SmallPair
    from tests.test_proxy_generation import PROMPT
    from tests.tiny_models import make_random_adapter

    base, large = model_dir(family), model_dir(family, seed=1)
    adapter = make_random_adapter(base, tmp_path / "adapter")
    small = SmallPair.gated(
        load_backend(
            base,
            adapter=adapter,
            lora_mode="gated",
            backend=backend,
            export_dir=tmp_path / "onnx",
            exporter="torchscript",
            strict=True,
        )
    )
    assert small.decoders[0].backend.name == backend
    cfg = SamplingConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    # incremental: the large model's numbers do not depend on how requests split the tokens,
    # so plain and speculative decoding compare exactly
    runs = {}
    for k in (0, 3):
        llm = LocalLargeModel.load(large, incremental=True)
        runs[k] = ProxyGenerator(llm, small, alpha=ALPHA, speculative=k).generate(PROMPT, cfg)
    plain, spec = runs[0], runs[3]
    assert spec.token_ids == plain.token_ids and len(plain.token_ids) == NEW_TOKENS
    assert spec.stats["drafted"] > 0 and spec.stats["large_requests"] <= NEW_TOKENS
    prompt = encode_prompt(small.tokenizer, PROMPT)
    assert plain.prompt_tokens == len(prompt)
    ids = prompt + plain.token_ids
    assert len(ids) > 2 * W  # decoding went well past the window
    z = _reference_proxy_logits(base, large, adapter, ids, len(prompt))
    got = np.asarray(plain.token_ids)
    chosen = z[np.arange(len(got)), got]
    # each token is the reference's greedy choice (a tie within the tolerance may go either way)
    assert (chosen >= z.max(-1) - ATOL).all(), np.flatnonzero(chosen < z.max(-1) - ATOL)
    # the adapter matters: without it (alpha 0) the tokens differ somewhere
    assert (z.argmax(-1) != _reference_large_only(large, ids, len(prompt))).any()


def _reference_large_only(large, ids, start) -> np.ndarray:
    import torch

    from tests.test_onnx_window import hf_model

    with torch.no_grad():
        return hf_model(large)(torch.tensor([ids])).logits[0, start - 1 : -1].argmax(-1).numpy()


@pytest.mark.parametrize("family", NAMES)
def test_proxy_and_speculative_equal_transformers_peft(family, model_dir, tmp_path):
    _check_proxy(family, "torch", model_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", NAMES)
def test_proxy_and_speculative_on_ort_equal_transformers_peft(family, model_dir, tmp_path):
    from edge_sdk.inference.onnx_export import ort_status

    pytest.importorskip("onnx", reason="onnx is not installed (pip install cotune[onnx])")
    if not ort_status()[0]:
        pytest.skip(ort_status()[1])
    _check_proxy(family, "ort", model_dir, tmp_path)


# ------------------------------------------------------------------------------------------
# mixture-of-experts models: refused on every path

MOE = {
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            **LAYERS,
            **GQA,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 48,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
    "mixtral": (
        "MixtralConfig",
        {**LAYERS, **GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
}


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_mixture_of_experts_is_refused_on_every_path(model_type, tmp_path, monkeypatch):
    import edge_sdk.inference.onnx_export as ox
    from algorithms.core.errors import UnsupportedArchitectureError
    from algorithms.core.modeling import load_causal_lm
    from edge_sdk.fit import check_task_fits, choose_defaults
    from edge_sdk.inference import ExportUnsupportedError
    from edge_sdk.inference.generate import load_backend
    from firmware_profiles import UnsupportedModelError, Workload, plan
    from tests.tiny_models import make_tiny_causal_lm

    cls, fields = MOE[model_type]
    path = make_tiny_causal_lm(tmp_path / model_type, cls, **fields)
    why = rf"{model_type}.*mixture-of-experts models are not supported.*expert"
    with pytest.raises(UnsupportedModelError, match=why) as planned:
        plan(
            path,
            "generic-cpu",
            Workload(quant="nf4", lora_rank=RANK, seq_len=32, lora_targets=("q_proj", "v_proj")),
        )
    assert planned.value.model_type == model_type
    with pytest.raises(UnsupportedModelError, match=why):
        check_task_fits("generic-cpu", path, {"r": RANK}, {"block_size": 32}, "nf4")
    with pytest.raises(UnsupportedModelError, match=why):
        choose_defaults("generic-cpu", path)
    for quant in ("fp32", "nf4"):
        with pytest.raises(UnsupportedArchitectureError, match=why):
            load_causal_lm(path, quant=quant)
    monkeypatch.setattr(ox, "load_kv_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ExportUnsupportedError, match=why):
        ox.export_onnx(path, tmp_path / "onnx", exporter="torchscript")
    monkeypatch.undo()
    # the runtime does not fall back to running it on torch either
    with pytest.raises(UnsupportedArchitectureError, match=why):
        load_backend(path, backend="auto", export_dir=tmp_path / "cache")


def test_unsupported_reason_reads_the_config():
    from firmware_profiles import unsupported_reason

    # a family the table does not know is caught by its expert count
    assert "num_local_experts=8" in unsupported_reason(
        {"model_type": "newarch", "num_local_experts": 8}
    )
    assert "deepseek_v3" in unsupported_reason({"model_type": "deepseek_v3"})
    wrapped = {"model_type": "wrapper", "text_config": {"model_type": "x", "num_experts": 16}}
    assert "num_experts=16" in unsupported_reason(wrapped)
    # one expert, or none, is a dense model
    assert unsupported_reason({"model_type": "newarch", "num_experts": 1}) is None
    assert unsupported_reason({"model_type": "newarch", "num_experts": None}) is None
    # and the planner refuses such an unknown type itself (not only the loader and the export)
    from firmware_profiles import UnsupportedModelError
    from firmware_profiles.planner import ModelShape

    with pytest.raises(UnsupportedModelError, match="num_local_experts=8"):
        ModelShape.from_config({"model_type": "newarch", "hidden_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "intermediate_size": 128, "vocab_size": 100,
                                "num_local_experts": 8})


@pytest.mark.parametrize("family", NAMES)
def test_dense_families_are_not_refused(family):
    import transformers

    from firmware_profiles import unsupported_reason

    case = CASES[family]
    cfg = getattr(transformers, case.config_class)(**case.fields)
    assert unsupported_reason(cfg.to_dict()) is None
    assert unsupported_reason(cfg) is None


# ------------------------------------------------------------------------------------------
# a quantized load that quantizes nothing is not passed off as nf4/int8


def test_quantized_load_that_skips_the_linears_is_refused(model_dir, monkeypatch):
    """Falcon's decoder linears are an ``nn.Linear`` subclass, which transformers' bitsandbytes
    integration skips (it only logs it): without the loader's fix the nf4 weights stayed fp32
    under an "nf4" label. The check after the load catches any family where that happens."""
    import algorithms.core.modeling as modeling
    from algorithms.core.errors import QuantizationUnavailableError

    if not modeling.bitsandbytes_status()[0]:
        pytest.skip("bitsandbytes cannot quantize on this CPU")
    path = model_dir("falcon")
    monkeypatch.setattr(modeling, "_LINEAR_SUBCLASSES", {})
    with pytest.raises(QuantizationUnavailableError, match="unquantized"):
        modeling.load_causal_lm(path, quant="nf4", strict=True)
    model, _, report = modeling.load_causal_lm(path, quant="nf4")
    assert report.quant == "fp32" and "unquantized" in report.notes[0]
    assert not modeling.is_quantized(model)
