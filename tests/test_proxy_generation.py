"""Proxy-tuned generation: the arithmetic by hand, alpha=0 == large-only greedy, speculative
greedy == plain greedy exactly (with fewer large-model requests), speculative sampling follows
the proxy distribution, and mismatched tokenizers are refused with the typed error."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.inference import GenerationConfigError, TokenizerMismatchError
from edge_sdk.inference.generate import (
    Generator,
    KVCache,
    SamplingConfig,
    TorchBackend,
    load_backend,
    next_token_probs,
)
from edge_sdk.inference.proxy import (
    LargeModel,
    LocalLargeModel,
    ProxyGenerator,
    SmallPair,
    _verify,
    check_vocabularies,
    large_only_stream,
    log_softmax,
    proxy_logits,
)
from tests.tiny_models import make_random_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "The quick brown"


def have_ort() -> bool:
    from edge_sdk.inference.onnx_export import ort_status

    return ort_status()[0]


make_adapter = make_random_adapter


@pytest.fixture(scope="module")
def adapter(tiny_llama_path, tmp_path_factory):
    return make_adapter(tiny_llama_path, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def large_path(tiny_llm_path):
    """The "LLM": a wider, deeper tiny Llama with the same tokenizer as the small one."""
    return tiny_llm_path


@pytest.fixture(scope="module", params=["torch", "ort"])
def pair(request, tiny_llama_path, adapter, tmp_path_factory):
    """Tuned (base + adapter) and base as ONE gated graph, a batch of 2, on each backend."""
    if request.param == "ort" and not have_ort():
        pytest.skip("onnxruntime is not installed")
    backend = load_backend(
        tiny_llama_path,
        adapter=adapter,
        lora_mode="gated",
        backend=request.param,
        export_dir=tmp_path_factory.mktemp("onnx"),
        strict=True,
    )
    assert backend.name == request.param
    return SmallPair.gated(backend)


# --------------------------------------------------------------------------------------------
# a bigram "model": exact, fast, for the speculative logic on many random cases


class BigramBackend:
    """logits(next) = table[last token]; no real cache (a bigram needs none)."""

    name = "bigram"
    gated = False

    def __init__(self, table, tokenizer, eos=1):
        self.table, self.tokenizer = table.astype(np.float32), tokenizer
        self.vocab_size = table.shape[1]
        self.eos_token_ids = [eos]

    def empty_cache(self, rows):
        return KVCache((), 0)

    def forward(self, ids, cache, gate):
        return self.table[ids], KVCache((), cache.length + ids.shape[1])


def bigram_setup(tokenizer, seed, v=None, sharpen=3.0, eos_bias=-1.0):
    """Large/tuned/base bigram tables where the tuned drafts agree with the proxy often."""
    rng = np.random.default_rng(seed)
    v = v or len(tokenizer)
    base = rng.normal(size=(v, v)) * sharpen
    large = base + rng.normal(size=(v, v)) * 0.8 * sharpen
    tuned = large + rng.normal(size=(v, v)) * 0.5 * sharpen
    for t in (base, large, tuned):
        t[:, 1] += eos_bias * sharpen  # EOS (id 1) rare but possible
    return (
        LocalLargeModel(BigramBackend(large, tokenizer)),
        SmallPair.separate(BigramBackend(tuned, tokenizer), BigramBackend(base, tokenizer)),
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_path))


# --------------------------------------------------------------------------------------------
# arithmetic and vocabularies


def test_proxy_arithmetic_by_hand():
    z_large = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    z_tuned = np.array([0.5, 0.0, 2.0, -1.0, 9.0], np.float32)  # one extra id: truncated
    z_base = np.array([0.0, 1.0, 1.0, 1.0, 9.0], np.float32)
    np.testing.assert_allclose(proxy_logits(z_large, z_tuned, z_base, 1.0), [1.5, 1.0, 4.0, 2.0])
    np.testing.assert_allclose(proxy_logits(z_large, z_tuned, z_base, 0.5), [1.25, 1.5, 3.5, 3.0])
    np.testing.assert_allclose(proxy_logits(z_large, z_tuned, z_base, 0.0), z_large)
    rows = proxy_logits(
        np.stack([z_large, z_large]), np.stack([z_tuned] * 2), np.stack([z_base] * 2)
    )
    assert rows.shape == (2, 4)
    # log-probs instead of logits for the large model: same proxy distribution
    cfg = SamplingConfig(temperature=1.0)
    a = next_token_probs(proxy_logits(z_large, z_tuned, z_base), cfg)
    b = next_token_probs(proxy_logits(log_softmax(z_large), z_tuned, z_base), cfg)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_vocabulary_check():
    a = {"<s>": 0, "</s>": 1, "a": 2, "b": 3}
    assert check_vocabularies({"x": a, "y": dict(a, c=4)}) == 4  # extra ids beyond: fine
    assert check_vocabularies({"x": a, "y": None}) is None  # unknown: not checked
    with pytest.raises(TokenizerMismatchError, match="id 2: 'a' vs 'b'"):
        check_vocabularies({"x": a, "y": {"<s>": 0, "</s>": 1, "b": 2, "a": 3}})


def test_mismatched_tokenizers_refused(tiny_llama_path, tiny_gpt2_path):
    llama = TorchBackend.from_pretrained(tiny_llama_path)
    gpt2 = TorchBackend.from_pretrained(tiny_gpt2_path)
    assert abs(llama.vocab_size - gpt2.vocab_size) < 50  # similar sizes, different vocabularies
    with pytest.raises(TokenizerMismatchError, match="tuned and base"):
        SmallPair.separate(llama, gpt2)
    with pytest.raises(TokenizerMismatchError, match="large and small"):
        ProxyGenerator(LocalLargeModel(gpt2), SmallPair.separate(llama, llama))
    with pytest.raises(TokenizerMismatchError):
        ProxyGenerator.load(tiny_gpt2_path, tiny_llama_path, base=tiny_llama_path, backend="torch")


# --------------------------------------------------------------------------------------------
# the large model


def test_local_large_model_protocol_and_prefix_reuse(large_path):
    import torch
    from transformers import AutoModelForCausalLM

    large = LocalLargeModel.load(large_path)
    assert isinstance(large, LargeModel)
    ids = large.tokenizer(PROMPT + " fox jumps", add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(large_path)).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).numpy()
    got = large.logprobs(ids, positions=3)
    np.testing.assert_allclose(got, ref[-3:], atol=1e-4)
    evaluated = large.tokens_evaluated
    np.testing.assert_allclose(large.logprobs([*ids, 7])[0], large.logprobs([*ids, 7])[-1])
    assert large.requests == 3 and large.tokens_evaluated == evaluated + 2  # 1 new, 1 re-done


# --------------------------------------------------------------------------------------------
# proxy-tuned decoding on real models


def test_alpha_zero_equals_large_only_greedy(pair, large_path):
    large = LocalLargeModel.load(large_path)
    cfg = SamplingConfig(max_new_tokens=20, ignore_eos=True)
    got = ProxyGenerator(large, pair, alpha=0.0).generate(PROMPT, cfg)
    ref = Generator(TorchBackend.from_pretrained(large_path)).generate(PROMPT, cfg)
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert got.stats["large_requests"] == 20 and got.stats["requests_per_token"] == 1.0
    via_protocol = large_only_stream(large, pair.tokenizer, PROMPT, cfg)
    assert "".join(via_protocol) == ref.text


def test_proxy_actually_moves_the_large_model(pair, large_path):
    large = LocalLargeModel.load(large_path)
    cfg = SamplingConfig(max_new_tokens=20, ignore_eos=True)
    a = ProxyGenerator(large, pair, alpha=0.0).generate(PROMPT, cfg).token_ids
    b = ProxyGenerator(large, pair, alpha=4.0).generate(PROMPT, cfg).token_ids
    assert a != b


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_equals_plain_greedy(pair, large_path, k):
    # incremental: the large model evaluates a block one position at a time, so its numbers
    # are bitwise those of plain decoding and the comparison is exact, not within a tolerance
    large = LocalLargeModel.load(large_path, incremental=True)
    cfg = SamplingConfig(max_new_tokens=30, ignore_eos=True)
    plain = ProxyGenerator(large, pair).generate(PROMPT, cfg)
    spec = ProxyGenerator(large, pair, speculative=k).generate(PROMPT, cfg)
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert plain.stats["large_requests"] == 30
    assert spec.stats["large_requests"] <= 30 and spec.stats["drafted"] > 0
    assert 0.0 <= spec.stats["acceptance_rate"] <= 1.0


def test_speculation_saves_requests_when_drafts_agree(pair, tiny_llama_path):
    # large = the base small model itself: proxy = large + tuned - base = tuned, so the tuned
    # model's greedy drafts are accepted and each request yields up to k + 1 tokens
    large = LocalLargeModel.load(tiny_llama_path, incremental=True)
    cfg = SamplingConfig(max_new_tokens=30, ignore_eos=True)
    plain = ProxyGenerator(large, pair).generate(PROMPT, cfg)
    spec = ProxyGenerator(large, pair, speculative=4).generate(PROMPT, cfg)
    assert spec.token_ids == plain.token_ids
    assert spec.stats["acceptance_rate"] > 0.9
    assert spec.stats["requests_per_token"] < 0.35 < plain.stats["requests_per_token"]


def test_streaming_and_stop_strings_in_proxy_mode(pair, large_path):
    large = LocalLargeModel.load(large_path, incremental=True)
    gen = ProxyGenerator(large, pair, speculative=3)
    full = gen.generate(PROMPT, max_new_tokens=30, ignore_eos=True)
    stream = gen.stream(PROMPT, max_new_tokens=30, ignore_eos=True)
    assert "".join(stream) == stream.result.text == full.text
    words = [w for w in full.text.split() if w.isalpha() and len(w) >= 2]
    if words:  # a random tiny model may print no plain word at all
        stop = words[len(words) // 2]
        cut = gen.generate(PROMPT, max_new_tokens=30, ignore_eos=True, stop=(stop,))
        assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
        assert cut.stats["large_requests"] <= full.stats["large_requests"]


# --------------------------------------------------------------------------------------------
# the speculative logic on many random bigram cases (exact arithmetic, EOS included)


@pytest.mark.parametrize("seed", range(6))
def test_speculative_equals_plain_on_random_bigrams(tokenizer, seed):
    large, small = bigram_setup(tokenizer, seed, v=64)
    for k in (1, 2, 4, 7):
        for n in (1, 5, 40):
            for ignore_eos in (True, False):
                cfg = SamplingConfig(max_new_tokens=n, ignore_eos=ignore_eos)
                plain = ProxyGenerator(large, small, alpha=1.5).generate([5, 9], cfg)
                spec = ProxyGenerator(large, small, alpha=1.5, speculative=k).generate([5, 9], cfg)
                assert spec.token_ids == plain.token_ids, (k, n, ignore_eos)
                assert spec.finish_reason == plain.finish_reason
                assert spec.stats["large_requests"] <= plain.stats["large_requests"]


def test_speculative_sampling_is_reproducible_and_valid(tokenizer):
    large, small = bigram_setup(tokenizer, 0, v=64)
    gen = ProxyGenerator(large, small, speculative=3)
    cfg = SamplingConfig(max_new_tokens=25, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    a = gen.generate([5], cfg)
    assert gen.generate([5], cfg).token_ids == a.token_ids
    assert a.new_tokens == 25 and a.stats["drafted"] > 0


def test_draft_verification_keeps_the_proxy_distribution():
    """Accept the draft with probability p(d), else draw from p without d: the token's
    distribution is exactly p (checked empirically)."""
    z = np.log(np.array([0.1, 0.45, 0.3, 0.15]))
    cfg = SamplingConfig(temperature=1.0)
    rng = np.random.default_rng(0)
    for draft in (1, 3):
        counts = np.zeros(4)
        for _ in range(20000):
            tok, ok = _verify(z, draft, cfg, rng)
            assert ok == (tok == draft)
            counts[tok] += 1
        np.testing.assert_allclose(counts / counts.sum(), [0.1, 0.45, 0.3, 0.15], atol=0.015)


def test_generator_validates_its_settings(tokenizer):
    large, small = bigram_setup(tokenizer, 0, v=16)
    with pytest.raises(GenerationConfigError):
        ProxyGenerator(large, small, speculative=-1)
    with pytest.raises(GenerationConfigError):
        ProxyGenerator(large, small, alpha=float("nan"))
    with pytest.raises(GenerationConfigError, match="logprobs"):
        ProxyGenerator(object(), small)


def test_cli_proxy_speculative(tiny_llama_path, adapter, large_path, capsys):
    from edge_sdk.inference.cli import infer_cli

    rc = infer_cli(
        [
            "--model",
            str(tiny_llama_path),
            "--adapter",
            str(adapter),
            "--large",
            str(large_path),
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "12",
            "--backend",
            "torch",
            "--speculative",
            "3",
            "--alpha",
            "0.8",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip()
    assert "large_requests=" in err and "requests_per_token=" in err and "acceptance_rate" in err


def test_remote_large_model_over_http_matches_local(pair, large_path):
    """(c) of the issue: the large model behind an OpenAI-compatible logprobs endpoint. With the
    full vocabulary requested the distributions equal the local ones, and speculative proxy
    decoding through the endpoint gives the local tokens with fewer round trips."""
    from aggregator.llm_server import LLMServer
    from edge_sdk.inference.remote import RemoteLargeModel, complete_topk_np

    local = LocalLargeModel.load(large_path, incremental=True)
    v = len(pair.tokenizer)
    ids = pair.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with LLMServer(str(large_path)) as srv:
        remote = RemoteLargeModel(srv.url, v, top_k=v, tokenizer=pair.tokenizer, model=srv.model.name)
        got = remote.logprobs(ids, positions=3)
        ref = local.logprobs(ids, positions=3)
        assert got.shape == (3, v)
        np.testing.assert_allclose(got, ref[:, :v] - np.log(np.exp(ref[:, :v]).sum(-1, keepdims=True)), atol=1e-4)
        cfg = SamplingConfig(max_new_tokens=12, ignore_eos=True)
        plain = ProxyGenerator(local, pair).generate(PROMPT, cfg)
        spec = ProxyGenerator(remote, pair, speculative=3).generate(PROMPT, cfg)
        before = remote.requests
        spec = ProxyGenerator(remote, pair, speculative=3).generate(PROMPT, cfg)
        assert spec.token_ids == plain.token_ids
        assert remote.requests - before == spec.stats["large_requests"] <= 12
    # top-k rows become normalised full distributions with the top-k kept
    vals = np.array([[np.log(0.6), np.log(0.3), -np.inf]])
    dense = complete_topk_np(vals, np.array([[2, 0, 0]]), 4)
    np.testing.assert_allclose(np.exp(dense), [[0.3, 0.05, 0.6, 0.05]], atol=1e-6)
