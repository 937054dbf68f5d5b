"""Generation: ORT and torch backends agree, sampling settings, stop strings, streaming, EOS,
decoder rollback, and the fallback to torch when onnxruntime is missing."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edge_sdk.inference import BackendUnavailableError, GenerationConfigError
from edge_sdk.inference.generate import (
    Generator,
    KVCache,
    SamplingConfig,
    TextStream,
    TorchBackend,
    load_backend,
    next_token_probs,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "The quick brown"


def have_ort() -> bool:
    from edge_sdk.inference.onnx_export import ort_status

    return ort_status()[0]


needs_ort = pytest.mark.skipif(not have_ort(), reason="onnxruntime is not installed")


@pytest.fixture(scope="module")
def torch_gen(tiny_llama_path):
    return Generator(TorchBackend.from_pretrained(tiny_llama_path))


@pytest.fixture(scope="module")
def ort_gen(tiny_llama_path, tmp_path_factory):
    if not have_ort():
        pytest.skip("onnxruntime is not installed")
    backend = load_backend(
        tiny_llama_path, backend="ort", export_dir=tmp_path_factory.mktemp("onnx"), strict=True
    )
    assert backend.name == "ort"
    return Generator(backend)


class ScriptedBackend:
    """Emits ``script[position]`` with certainty: a backend whose output is known exactly."""

    name = "scripted"
    gated = False

    def __init__(self, tokenizer, script, eos=1):
        self.tokenizer, self.script = tokenizer, list(script)
        self.vocab_size = len(tokenizer)
        self.eos_token_ids = [eos]

    def empty_cache(self, rows):
        return KVCache((), 0)

    def forward(self, ids, cache, gate):
        rows, seq = ids.shape
        logits = np.zeros((rows, seq, self.vocab_size), np.float32)
        for j in range(seq):
            pos = cache.length + j + 1 - self.prompt_len
            if 0 <= pos < len(self.script):
                logits[:, j, self.script[pos]] = 10.0
        return logits, KVCache((), cache.length + seq)


def scripted(tokenizer, text, prompt_ids, eos_after=False):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    backend = ScriptedBackend(tokenizer, ids + ([1] if eos_after else []))
    backend.prompt_len = len(prompt_ids)
    return Generator(backend, tokenizer), ids


# --------------------------------------------------------------------------------------------
# backends agree


@needs_ort
def test_greedy_identical_across_backends(ort_gen, torch_gen):
    cfg = SamplingConfig(max_new_tokens=24, ignore_eos=True)
    a = ort_gen.generate(PROMPT, cfg)
    b = torch_gen.generate(PROMPT, cfg)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.stats["backend"] == "ort" and b.stats["backend"] == "torch"
    assert a.new_tokens == 24 and a.finish_reason == "length"


@needs_ort
def test_gpt2_greedy_identical_across_backends(tiny_gpt2_path, tmp_path):
    ort_g = Generator.load(
        tiny_gpt2_path, backend="ort", export_dir=tmp_path, exporter="torchscript", strict=True
    )
    torch_g = Generator.load(tiny_gpt2_path, backend="torch")
    cfg = SamplingConfig(max_new_tokens=16, ignore_eos=True)
    assert ort_g.generate(PROMPT, cfg).token_ids == torch_g.generate(PROMPT, cfg).token_ids


@needs_ort
def test_decoder_logits_match_and_rollback_is_exact(ort_gen, torch_gen):
    ids = ort_gen.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    for gen in (ort_gen, torch_gen):
        dec = gen.decoder()
        first = dec.prefill(ids)
        a = dec.step(5)
        b = dec.step(6)
        fork = dec.fork()
        dec.rollback(len(ids) + 1)  # forget token 6
        assert dec.length == len(ids) + 1 and dec.tokens == [*ids, 5]
        np.testing.assert_array_equal(dec.step(6), b)
        np.testing.assert_array_equal(fork.step(7), dec.fork().step(7))
        dec.rollback(len(ids))
        np.testing.assert_array_equal(dec.step(5), a)
        assert first.shape == (1, gen.backend.vocab_size)
    np.testing.assert_allclose(
        ort_gen.decoder().prefill(ids), torch_gen.decoder().prefill(ids), atol=1e-4
    )


def test_sequence_longer_than_the_model_is_refused(torch_gen):
    dec = torch_gen.decoder()
    limit = torch_gen.backend.max_positions
    assert limit == 256
    dec.prefill([5] * (limit - 1))
    dec.step(6)
    with pytest.raises(GenerationConfigError, match="positions"):
        dec.step(7)


# --------------------------------------------------------------------------------------------
# sampling


def test_sampling_distribution_by_hand():
    z = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = next_token_probs(z, SamplingConfig(temperature=1.0))
    np.testing.assert_allclose(p, [0.5, 0.3, 0.15, 0.05], atol=1e-12)
    p = next_token_probs(z, SamplingConfig(temperature=1.0, top_k=2))
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0], atol=1e-12)
    p = next_token_probs(z, SamplingConfig(temperature=1.0, top_p=0.8))  # 0.5 + 0.3 reaches 0.8
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0], atol=1e-12)
    p = next_token_probs(z, SamplingConfig(temperature=1.0, top_p=0.81))
    np.testing.assert_allclose(p, [0.5, 0.3, 0.15, 0] / np.float64(0.95), atol=1e-12)
    p = next_token_probs(z, SamplingConfig(temperature=0.5))  # p^2, renormalised
    np.testing.assert_allclose(p, np.array([0.25, 0.09, 0.0225, 0.0025]) / 0.365, atol=1e-12)


def test_top_p_tiny_and_top_k_one_equal_greedy(torch_gen):
    greedy = torch_gen.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids
    for kw in ({"top_p": 1e-6}, {"top_k": 1}):
        for seed in (0, 1):
            got = torch_gen.generate(
                PROMPT, max_new_tokens=16, ignore_eos=True, temperature=1.0, seed=seed, **kw
            )
            assert got.token_ids == greedy


def test_seeded_sampling_is_reproducible(torch_gen):
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    a = torch_gen.generate(PROMPT, cfg).token_ids
    assert torch_gen.generate(PROMPT, cfg).token_ids == a
    others = [torch_gen.generate(PROMPT, cfg, seed=s).token_ids for s in (8, 9, 10)]
    assert any(o != a for o in others)


def test_config_validation():
    for bad in (
        {"max_new_tokens": 0},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"stop": ("",)},
    ):
        with pytest.raises(GenerationConfigError):
            SamplingConfig(**bad)
    assert SamplingConfig(stop="###").stop == ("###",)


# --------------------------------------------------------------------------------------------
# stop strings, EOS, streaming


def test_stop_string_ends_generation_and_is_excluded(torch_gen):
    tok = torch_gen.tokenizer
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    gen, _ = scripted(tok, " The sky is blue. Bees make honey.", prompt_ids)
    full = gen.generate(PROMPT, max_new_tokens=40)
    assert full.text == " The sky is blue. Bees make honey." and full.finish_reason == "length"
    res = gen.generate(PROMPT, max_new_tokens=40, stop=("honey", "blue."))
    assert res.text == " The sky is " and res.finish_reason == "stop"
    # streamed: the tail that might become a stop string is held back, never leaked
    stream = gen.stream(PROMPT, max_new_tokens=40, stop=("Bees make",))
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text == " The sky is blue. "
    assert all("Bees" not in p for p in pieces)


def test_eos_ends_generation(torch_gen):
    tok = torch_gen.tokenizer
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    gen, ids = scripted(tok, " Bees make honey.", prompt_ids, eos_after=True)
    res = gen.generate(PROMPT, max_new_tokens=40)
    assert res.finish_reason == "eos" and res.text == " Bees make honey."
    assert res.token_ids == [*ids, 1]


def test_streaming_concatenation_equals_text(torch_gen):
    for kw in ({}, {"temperature": 1.0, "seed": 3}):
        stream = torch_gen.stream(PROMPT, max_new_tokens=30, ignore_eos=True, **kw)
        pieces = list(stream)
        assert len(pieces) > 1
        assert "".join(pieces) == stream.result.text
        assert (
            stream.result.token_ids
            == torch_gen.generate(PROMPT, max_new_tokens=30, ignore_eos=True, **kw).token_ids
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streaming_multibyte_characters(arch, request):
    """Characters spread over several tokens (byte fallback / byte-level BPE) come out whole."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(request.getfixturevalue(f"tiny_{arch}_path")))
    text = " naïve café — 東京 € 😀 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # several tokens per character somewhere
    prompt = tok("Words:", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, prompt, SamplingConfig(max_new_tokens=len(ids)), iter(ids), [])
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text == tok.decode(prompt + ids)[len("Words:") :]
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 3


# --------------------------------------------------------------------------------------------
# backend choice


def test_falls_back_to_torch_without_onnxruntime(tiny_llama_path, monkeypatch, caplog, tmp_path):
    import edge_sdk.inference.onnx_export as ox

    monkeypatch.setattr(ox, "ort_status", lambda: (False, "onnxruntime cannot be imported"))
    with caplog.at_level(logging.WARNING, logger="cotune.edge.inference"):
        backend = load_backend(tiny_llama_path, backend="ort", export_dir=tmp_path)
    assert backend.name == "torch"
    assert "onnxruntime cannot be imported" in caplog.text and "torch eager" in caplog.text
    with pytest.raises(BackendUnavailableError):
        load_backend(tiny_llama_path, backend="ort", export_dir=tmp_path, strict=True)
    assert not list(tmp_path.iterdir())  # nothing was exported


def test_cli_plain_generation(tiny_llama_path, capsys):
    from edge_sdk.inference.cli import infer_cli

    rc = infer_cli(
        [
            "--model",
            str(tiny_llama_path),
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "8",
            "--backend",
            "torch",
            "--stream",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip()
    assert "stats: backend=torch" in err and "new_tokens=" in err
    assert infer_cli(["--prompt", "x"]) == 2  # --model missing: usage error
    rc = infer_cli(
        [
            "--model",
            str(tiny_llama_path),
            "--prompt",
            "x",
            "--speculative",
            "2",
            "--backend",
            "torch",
        ]
    )
    assert rc == 1 and "--large" in capsys.readouterr().err
