"""Sliding-window and local/global attention on ONNX Runtime: the exported graph matches
transformers at lengths well past the window, in one prefill and when decoding token by token
with the cache, for Mistral, Phi-3, Qwen2 (``use_sliding_window``), Gemma-2 (alternating local
and global layers, soft-capping) and Gemma-3's text model; a plain causal mask (what graphs had
before) is shown to fail the same checks; a pattern the export cannot reproduce is refused and
the runtime falls back to torch; a gated adapter (proxy-tuning's tuned and base rows) is exact
past the window too."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from edge_sdk.inference import (
    BackendUnavailableError,
    ExportUnsupportedError,
    ExportVerificationError,
)
from edge_sdk.inference.onnx_export import (
    MANIFEST_NAME,
    MODEL_FILE,
    KVCausalLM,
    attention_spec,
    export_onnx,
    load_manifest,
    ort_status,
)
from tests.tiny_models import make_tiny_causal_lm

pytest.importorskip("onnx", reason="onnx is not installed (pip install cotune[onnx])")
if not ort_status()[0]:
    pytest.skip(ort_status()[1], allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: ORT vs transformers, max |logit difference|: fp32 graphs land near 1e-7 on these models, a
#: plain causal mask is off by 1e-2 .. 1 past the window
ATOL = 1e-4
W = 8  # the sliding window of the tiny models
LENGTH = 3 * W  # checked sequence length (>= 2x the window)
DIMS = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 48,
    "max_position_embeddings": 128,
}
#: family -> (config class, config fields, sliding layers)
CASES = {
    "mistral": ("MistralConfig", {"sliding_window": W}, [0, 1]),
    "phi3": ("Phi3Config", {"sliding_window": W}, [0, 1]),
    # layer 0 global, layer 1 windowed (max_window_layers=1)
    "qwen2": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": W, "max_window_layers": 1},
        [1],
    ),
    # local / global alternating; small soft-caps so that they change the logits
    "gemma2": (
        "Gemma2Config",
        {
            "sliding_window": W,
            "head_dim": 16,
            "attn_logit_softcapping": 0.5,
            "final_logit_softcapping": 2.0,
        },
        [0],
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            "sliding_window": W,
            "head_dim": 16,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        [0],
    ),
}
FAMILIES = list(CASES)

_DIRS: dict[str, object] = {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    def get(family: str, **extra):
        key = (family, tuple(sorted(extra.items())))
        if key not in _DIRS:
            cls, fields, _ = CASES[family]
            _DIRS[key] = make_tiny_causal_lm(
                tmp_path_factory.mktemp(family), cls, **DIMS, **{**fields, **extra}
            )
        return _DIRS[key]

    return get


def hf_model(path):
    """The transformers reference; eager attention, which honours soft-caps on every family."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()


def ids_of(n: int, seed: int = 0) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(4, 300, n)]


def ort_logits(export_dir, ids: list[int], split: int | None = None) -> np.ndarray:
    """ORT logits [len(ids), V]: one prefill, or ``ids[:split]`` then one token at a time."""
    from edge_sdk.inference.generate import OrtBackend

    backend = OrtBackend(export_dir, threads=1)
    cache = backend.empty_cache(1)
    chunks = [ids] if split is None else [ids[:split]] + [[t] for t in ids[split:]]
    out = []
    for chunk in chunks:
        logits, cache = backend.forward(np.asarray([chunk], np.int64), cache, None)
        out.append(logits[0])
    return np.concatenate(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_ort_exact_past_the_window(family, model_dir, tmp_path):
    import torch

    from edge_sdk.inference.generate import Generator, OrtBackend, TorchBackend

    path = model_dir(family)
    man = export_onnx(path, tmp_path / "onnx", exporter="torchscript")
    assert man["attention"]["window"] == W
    assert man["attention"]["sliding_layers"] == CASES[family][2]
    ver = man["verification"]["past_window"]  # the export verified past the window itself
    assert ver["tokens"] > W and ver["greedy_prompt_tokens"] < W < ver["tokens"]
    assert ver["max_abs_diff"] <= ver["tolerance"] and ver["greedy_token_mismatches"] == 0

    model = hf_model(path)
    ids = ids_of(LENGTH)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    # one prefill of 3x the window, then a short prompt decoded token by token with the cache
    assert np.abs(ort_logits(tmp_path / "onnx", ids) - ref).max() < ATOL
    assert np.abs(ort_logits(tmp_path / "onnx", ids, split=3) - ref).max() < ATOL

    # greedy generation with the cache from inside the window to 3x past it == HF generate
    prompt, new = ids[: W - 2], LENGTH + W
    with torch.no_grad():
        want = model.generate(
            torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
    assert len(want) == new
    for backend in (OrtBackend(tmp_path / "onnx", threads=1), TorchBackend.from_pretrained(path)):
        got = Generator(backend).generate(prompt, max_new_tokens=new, ignore_eos=True)
        assert got.token_ids == want, backend.name


def test_gated_adapter_past_the_window(model_dir, tmp_path):
    """Proxy-tuning's graph (tuned and base rows, one gated adapter) on local/global layers."""
    import torch
    from peft import PeftModel

    from edge_sdk.inference.generate import OrtBackend
    from tests.tiny_models import make_random_adapter

    path = model_dir("qwen2")
    adapter = make_random_adapter(path, tmp_path / "adapter")
    man = export_onnx(
        path, tmp_path / "g", adapter=adapter, lora_mode="gated", exporter="torchscript"
    )
    assert man["verification"]["rows"] == 2
    assert man["verification"]["past_window"]["greedy_token_mismatches"] == 0
    ids = ids_of(LENGTH)
    with torch.no_grad():
        base = hf_model(path)(torch.tensor([ids])).logits[0].numpy()
        peft = PeftModel.from_pretrained(hf_model(path), str(adapter)).eval()
        tuned = peft(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(tuned - base).max() > 1e-2  # the adapter does something
    backend = OrtBackend(tmp_path / "g", threads=1)
    rows = np.asarray([ids[:3]] * 2, np.int64)
    gate = np.asarray([1.0, 0.0], np.float32)
    out, cache = backend.forward(rows, backend.empty_cache(2), gate)
    got = [out]
    for t in ids[3:]:
        out, cache = backend.forward(np.asarray([[t], [t]], np.int64), cache, gate)
        got.append(out)
    got = np.concatenate(got, axis=1)
    assert np.abs(got[0] - tuned).max() < ATOL and np.abs(got[1] - base).max() < ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_causal_mask_is_wrong_past_the_window(family, model_dir):
    """The mask the graph is traced from: windowed it equals transformers everywhere; the plain
    causal mask of earlier exports equals it up to the window and not after (so the checks above
    are sensitive to the bug)."""
    import torch

    path = model_dir(family)
    model = hf_model(path)
    spec = attention_spec(model.config)
    n = model.config.num_hidden_layers
    ids = torch.tensor([ids_of(LENGTH)])
    args = (ids, torch.ones_like(ids), torch.arange(LENGTH)[None])
    head_dim = getattr(model.config, "head_dim", None) or 32 // 4
    empty = [torch.zeros(1, 2, 0, head_dim)] * (2 * n)
    with torch.no_grad():
        ref = model(ids).logits[0]
        windowed = KVCausalLM(model, n, export_mask=True, attention=spec)(*args, *empty)[0][0]
        plain = KVCausalLM(model, n, export_mask=True, attention=None)(*args, *empty)[0][0]
    assert (windowed - ref).abs().max() < ATOL
    assert (plain[:W] - ref[:W]).abs().max() < ATOL
    assert (plain[W:] - ref[W:]).abs().amax(-1).min() > 1e-3  # every position past the window


def test_export_verification_catches_a_window_past_32_tokens(model_dir, tmp_path, monkeypatch):
    """With a window of 32 the short check (32 tokens) cannot see a missing window; the check
    past the window does (this export uses the plain causal mask of earlier versions)."""
    import edge_sdk.inference.onnx_export as ox

    path = model_dir("mistral", sliding_window=32)
    plain_mask = ox.KVCausalLM._mask

    def old_mask(self, input_ids, attention_mask):
        saved, self.attention = self.attention, None
        try:
            return plain_mask(self, input_ids, attention_mask)
        finally:
            self.attention = saved

    monkeypatch.setattr(ox.KVCausalLM, "_mask", old_mask)
    with pytest.raises(ExportVerificationError, match=r"past the sliding window \(32\)"):
        export_onnx(path, tmp_path / "bad", exporter="torchscript")
    monkeypatch.undo()
    man = export_onnx(path, tmp_path / "good", exporter="torchscript")
    assert man["verification"]["past_window"]["tokens"] == 32 + ox.VERIFY_PAST_WINDOW


def test_unexportable_pattern_is_refused_and_runs_on_torch(
    model_dir, tmp_path, caplog, monkeypatch
):
    import edge_sdk.inference.onnx_export as ox
    from edge_sdk.inference.generate import TorchBackend, load_backend

    path = model_dir("gemma3_text", use_bidirectional_attention=True)
    with monkeypatch.context() as m:
        m.setattr(ox, "load_kv_model", lambda *a, **k: pytest.fail("weights loaded"))
        with pytest.raises(ExportUnsupportedError, match="use_bidirectional_attention"):
            export_onnx(path, tmp_path / "x", exporter="torchscript")
    with pytest.raises(ExportUnsupportedError):
        load_backend(path, backend="ort", export_dir=tmp_path / "cache", strict=True)
    with caplog.at_level(logging.WARNING, logger="cotune.edge.inference"):
        backend = load_backend(path, backend="auto", export_dir=tmp_path / "cache")
    assert isinstance(backend, TorchBackend)
    assert "not exportable" in caplog.text and "use_bidirectional_attention" in caplog.text
    assert "torch eager backend" in caplog.text


def test_attention_spec_reads_the_family_table():
    def cfg(**kw):
        return SimpleNamespace(num_hidden_layers=2, **kw)

    # a family the table does not describe: plainly causal, unless the config shows a window
    assert attention_spec(cfg(model_type="newarch")).unsupported is None
    assert "sliding_window=8" in attention_spec(
        cfg(model_type="newarch", sliding_window=8)
    ).unsupported
    chunked = attention_spec(cfg(model_type="newarch", attention_chunk_size=64))
    assert "attention_chunk_size" in chunked.unsupported
    # a null window is no window; a layer type without a mask is refused
    assert attention_spec(cfg(model_type="mistral", sliding_window=None)).window is None
    odd = attention_spec(
        cfg(model_type="qwen2", sliding_window=8, layer_types=["full_attention", "chunked"])
    )
    assert "chunked" in odd.unsupported
    with pytest.raises(ExportUnsupportedError, match="torch backend"):
        odd.check_exportable()
    gemma = attention_spec(
        cfg(
            model_type="gemma2",
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    )
    assert gemma.sliding == (True, False) and gemma.window == 4
    assert gemma.attn_implementation == "eager" and gemma.final_softcap == 30.0


def test_old_export_of_a_windowed_family_is_refused(tmp_path):
    (tmp_path / MODEL_FILE).write_bytes(b"")
    man = {"format": "cotune-onnx-kv", "version": 1, "model_type": "mistral"}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(man))
    with pytest.raises(BackendUnavailableError, match="sliding window"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**man, "model_type": "llama"}))
    assert load_manifest(tmp_path)["model_type"] == "llama"


@pytest.mark.parametrize(
    "family",
    # the default exporter; Gemma-2 (per-layer masks, soft-caps) always, the others as slow
    [f if f == "gemma2" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES],
)
def test_dynamo_export_exact_past_the_window(family, model_dir, tmp_path):
    import torch

    path = model_dir(family)
    man = export_onnx(path, tmp_path / "onnx", exporter="dynamo")
    assert man["exporter"] == "dynamo"
    assert man["verification"]["past_window"]["greedy_token_mismatches"] == 0
    ids = ids_of(LENGTH, seed=1)
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ort_logits(tmp_path / "onnx", ids) - ref).max() < ATOL
    assert np.abs(ort_logits(tmp_path / "onnx", ids, split=2) - ref).max() < ATOL
