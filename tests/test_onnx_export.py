"""ONNX export with a KV cache: ONNX Runtime logits == torch logits, without and with past,
for Llama- and GPT-2-style models, plain, with a merged adapter and with a gated adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_sdk.inference import BackendUnavailableError, ExportVerificationError
from edge_sdk.inference.onnx_export import (
    MANIFEST_NAME,
    ensure_exported,
    export_onnx,
    load_manifest,
    ort_status,
)
from tests.tiny_models import make_random_adapter

pytest.importorskip("onnx", reason="onnx is not installed (pip install cotune[onnx])")
if not ort_status()[0]:  # also covers a broken native library, not only a missing package
    pytest.skip(ort_status()[1], allow_module_level=True)
import onnxruntime as ort  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# fp32 graphs agree with torch to ~1e-6 on these models; this leaves two orders of margin
ATOL = 1e-4
TEXT = "The quick brown fox jumps over the lazy dog. Knowledge speaks, but wisdom listens."


make_adapter = make_random_adapter


def torch_logits(model_dir, ids, adapter=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def ort_run(export_dir, ids_rows, past=None, gate=None):
    """Raw onnxruntime on the exported graph (not through the SDK's backend)."""
    man = json.loads((export_dir / MANIFEST_NAME).read_text())
    sess = ort.InferenceSession(
        str(export_dir / man["model_file"]), providers=["CPUExecutionProvider"]
    )
    x = np.asarray(ids_rows, dtype=np.int64)
    rows, seq = x.shape
    if past is None:
        shape = (rows, man["num_kv_heads"], 0, man["head_dim"])
        past = [np.zeros(shape, np.float32)] * (2 * man["num_layers"])
    p = past[0].shape[2]
    feed = {
        "input_ids": x,
        "attention_mask": np.ones((rows, p + seq), np.int64),
        "position_ids": np.tile(np.arange(p, p + seq, dtype=np.int64), (rows, 1)),
    }
    feed.update(zip(man["inputs"][3 : 3 + len(past)], past, strict=True))
    if man["gate_input"]:
        feed[man["gate_input"]] = np.asarray(gate, np.float32)
    out = sess.run(None, feed)
    return out[0], out[1:]


def prompt_ids(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 8
    return ids


@pytest.mark.parametrize(
    "arch,exporter",
    [("llama", "dynamo"), ("gpt2", "dynamo"), ("gpt2", "torchscript")],
)
def test_ort_matches_torch_with_and_without_past(arch, exporter, request, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{arch}_path")
    man = export_onnx(model_dir, tmp_path / "onnx", exporter=exporter)
    assert man["exporter"] == exporter
    assert man["verification"]["max_abs_diff_with_past"] <= man["verification"]["tolerance"]
    assert man["model_type"] == arch and man["vocab_size"] > 0 and man["num_layers"] == 2
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()

    ids = prompt_ids(model_dir)
    ref = torch_logits(model_dir, ids)
    full, _ = ort_run(tmp_path / "onnx", [ids])
    np.testing.assert_allclose(full[0], ref, atol=ATOL, rtol=0)

    # the same prompt fed as a prefill plus single steps with past
    half = len(ids) // 2
    out, past = ort_run(tmp_path / "onnx", [ids[:half]])
    got = [out[0]]
    for t in ids[half:]:
        out, past = ort_run(tmp_path / "onnx", [[t]], past)
        got.append(out[0])
    np.testing.assert_allclose(np.concatenate(got), ref, atol=ATOL, rtol=0)
    assert past[0].shape[2] == len(ids)

    # batch of 2 works with the dynamic batch axis
    out2, _ = ort_run(tmp_path / "onnx", [ids, ids])
    np.testing.assert_allclose(out2[1], ref, atol=ATOL, rtol=0)


def test_merged_and_gated_adapter_match_peft(tiny_llama_path, tmp_path):
    adapter = make_adapter(tiny_llama_path, tmp_path / "adapter")
    ids = prompt_ids(tiny_llama_path)
    base = torch_logits(tiny_llama_path, ids)
    tuned = torch_logits(tiny_llama_path, ids, adapter)
    assert np.abs(tuned - base).max() > 1e-3  # the adapter does something

    merged = export_onnx(tiny_llama_path, tmp_path / "m", adapter=adapter, exporter="torchscript")
    assert merged["adapter"]["mode"] == "merged" and merged["gate_input"] is None
    out, _ = ort_run(tmp_path / "m", [ids])
    np.testing.assert_allclose(out[0], tuned, atol=ATOL, rtol=0)

    gated = export_onnx(
        tiny_llama_path, tmp_path / "g", adapter=adapter, lora_mode="gated", exporter="torchscript"
    )
    assert gated["gate_input"] == "lora_gate" and gated["adapter"]["mode"] == "gated"
    out, past = ort_run(tmp_path / "g", [ids[:-1], ids[:-1]], gate=[1.0, 0.0])
    step, _ = ort_run(tmp_path / "g", [ids[-1:], ids[-1:]], past, gate=[1.0, 0.0])
    np.testing.assert_allclose(np.concatenate([out[0], step[0]]), tuned, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.concatenate([out[1], step[1]]), base, atol=ATOL, rtol=0)


def test_export_cache_reuses_and_keys_on_content(tiny_gpt2_path, tmp_path, monkeypatch):
    first = ensure_exported(tiny_gpt2_path, tmp_path, exporter="torchscript")
    assert load_manifest(first)["cache_key"] in first.name

    import edge_sdk.inference.onnx_export as ox

    def fail(*a, **k):
        raise AssertionError("re-exported although cached")

    monkeypatch.setattr(ox, "export_onnx", fail)
    assert ensure_exported(tiny_gpt2_path, tmp_path, exporter="torchscript") == first
    # another exporter choice is another cache entry
    with pytest.raises(AssertionError, match="re-exported"):
        ensure_exported(tiny_gpt2_path, tmp_path, exporter="dynamo")


def test_verification_failure_is_typed(tiny_gpt2_path, tmp_path):
    with pytest.raises(ExportVerificationError, match="differ"):
        export_onnx(tiny_gpt2_path, tmp_path, exporter="torchscript", atol=-1.0, rtol=0.0)


def test_load_manifest_refuses_non_exports(tmp_path):
    with pytest.raises(BackendUnavailableError, match="not a cotune ONNX export"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "cotune-onnx-kv", "version": 99}))
    with pytest.raises(BackendUnavailableError, match="newer"):
        load_manifest(tmp_path)
