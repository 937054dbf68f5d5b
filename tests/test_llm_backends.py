"""LLM backends end to end: `cotune llm serve` (the OpenAI-compatible API with vLLM's
prompt_logprobs) answers the black-box client, which must agree with the local backend; bad
input and failures are typed errors; FedPT runs against both backends."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import torch

from aggregator.context import ServerContext
from aggregator.llm import BlackBoxLLM, LLMConfigError, LocalLLM, make_llm_backend
from aggregator.llm_server import LLMServer
from algorithms.core.kd import VocabularyMismatch
from algorithms.core.openai_api import CompletionsClient, LLMBackendError, parse_choice
from cotune.simulate import simulate
from edge_sdk.context import DeviceContext
from tests.tiny_models import TINY_CORPUS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def served(tiny_llm_path):
    with LLMServer(str(tiny_llm_path), api_key="s3cret") as srv:
        yield srv


def _batch(tok):
    return tok(TINY_CORPUS[:3], padding=True, return_tensors="pt")


def test_blackbox_full_vocabulary_equals_local(served, tiny_llm_path):
    local = LocalLLM(str(tiny_llm_path))
    enc = _batch(local.tokenizer())
    bb = BlackBoxLLM(served.url, str(tiny_llm_path), top_k=local.vocab_size, api_key="s3cret")
    a = bb.logprobs(enc["input_ids"], enc["attention_mask"])
    b = local.logprobs(enc["input_ids"], enc["attention_mask"])
    m = enc["attention_mask"].bool()
    assert torch.allclose(a[m], b[m], atol=1e-4)
    # padding rows are uniform, not garbage
    pad = ~m
    assert torch.allclose(a[pad].exp().sum(-1), torch.ones(int(pad.sum())), atol=1e-5)


def test_blackbox_topk_keeps_the_top_and_the_mass(served, tiny_llm_path):
    local = LocalLLM(str(tiny_llm_path))
    enc = _batch(local.tokenizer())
    bb = BlackBoxLLM(served.url, str(tiny_llm_path), top_k=5, api_key="s3cret")
    a = bb.logprobs(enc["input_ids"], enc["attention_mask"])
    b = local.logprobs(enc["input_ids"], enc["attention_mask"])
    m = enc["attention_mask"].bool()
    assert torch.equal(a.argmax(-1)[m], b.argmax(-1)[m])
    assert torch.allclose(a[m].exp().sum(-1), torch.ones(int(m.sum())), atol=1e-4)
    top_vals, top_ids = torch.topk(b[m], 5)
    assert torch.allclose(a[m].gather(-1, top_ids), top_vals, atol=1e-4)


def test_server_api_shapes_and_generation(served):
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 3, "temperature": 0, "logprobs": 2, "prompt_logprobs": 2,
            "return_tokens_as_token_ids": True}
    req = urllib.request.Request(served.url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
    data = json.loads(urllib.request.urlopen(req).read())
    ch = data["choices"][0]
    assert ch["prompt_logprobs"][0] is None and len(ch["prompt_logprobs"]) == 4
    assert all(k.startswith("token_id:") for k in ch["prompt_logprobs"][1])
    assert len(ch["logprobs"]["tokens"]) == 3 and data["usage"]["completion_tokens"] == 3
    top = parse_choice(ch, 4, 2)
    assert top.values.shape == (4, 2) and np.all(np.diff(top.values, axis=1) <= 0)


def test_errors_are_typed(served, tiny_llm_path, tiny_gpt2_path):
    with pytest.raises(LLMBackendError, match="401"):
        CompletionsClient(served.url, api_key="wrong", retries=0).prompt_logprobs([[1, 2, 3]])
    good = CompletionsClient(served.url, api_key="s3cret", retries=0)
    with pytest.raises(LLMBackendError, match="400"):
        good.prompt_logprobs([[1, 10**6]])  # id outside the vocabulary
    with pytest.raises(LLMBackendError, match="empty"):
        good.prompt_logprobs([[]])
    with pytest.raises(LLMBackendError, match="unreachable"):
        CompletionsClient("http://127.0.0.1:9", retries=1, backoff_s=0.01, timeout_s=1).prompt_logprobs([[1, 2]])
    # a different model behind the URL: caught by the /tokenize probe
    bad = BlackBoxLLM(served.url, str(tiny_gpt2_path), api_key="s3cret")
    with pytest.raises(LLMBackendError, match="tokenizes differently"):
        bad.logprobs(torch.tensor([[1, 2, 3]]))
    # malformed answers
    with pytest.raises(LLMBackendError, match="prompt_logprobs"):
        parse_choice({"logprobs": {"top_logprobs": [{"token_id:1": -0.1}]}}, 3, 2)
    with pytest.raises(LLMBackendError, match="invalid log-probability"):
        parse_choice({"logprobs": {"top_logprobs": [{"token_id:1": float("nan")}]}}, 1, 2)
    with pytest.raises(LLMBackendError, match="string"):
        parse_choice({"logprobs": {"top_logprobs": [{"hello": -0.1}]}}, 1, 2)
    # the server keeps serving after all that
    assert len(good.prompt_logprobs([[1, 2, 3]])) == 1


def test_backend_config_errors(tiny_llm_path):
    with pytest.raises(LLMConfigError, match="backend"):
        make_llm_backend({"backend": "magic"}, {})
    with pytest.raises(LLMConfigError, match="url"):
        make_llm_backend({"backend": "blackbox"}, {"llm": str(tiny_llm_path)})
    with pytest.raises(LLMConfigError, match="not set"):
        make_llm_backend({"backend": "blackbox", "url": "http://x", "api_key_env": "COTUNE_NO_SUCH_VAR"},
                         {"llm": str(tiny_llm_path)})
    with pytest.raises(LLMConfigError, match="cannot be trained"):
        BlackBoxLLM("http://127.0.0.1:9", str(tiny_llm_path)).trainable(None)


@pytest.mark.parametrize("backend", ["local", "blackbox"])
def test_fedpt_round_on_both_backends(backend, served, tmp_path, tiny_llama_path, tiny_llm_path):
    if backend == "local":
        llm = {"backend": "local"}
    else:
        llm = {"backend": "blackbox", "url": served.url, "top_k": 8, "api_key_env": "COTUNE_TEST_KEY"}
    import os

    os.environ["COTUNE_TEST_KEY"] = "s3cret"
    ctx = ServerContext(str(tmp_path), 0, {"slm": str(tiny_llama_path), "llm": str(tiny_llm_path)}, TINY_CORPUS[:8], llm)
    clients = [DeviceContext(f"c{i}", tiny_llama_path, TINY_CORPUS[i::2], progress=None) for i in range(2)]
    cfg = {"train": {"lr": 5e-3, "batch_size": 4, "block_size": 16, "max_steps": 2},
           "distill": {"batch_size": 4, "block_size": 16, "epochs": 2},
           "align_base": {"batch_size": 4, "block_size": 16, "max_steps": 3}}
    res = simulate("fedpt", cfg, ctx, clients, rounds=2, progress=None, apply_final=False)
    m = res.rounds[-1].server
    assert m["steps"] >= 2 and np.isfinite(m["kd_last"])
    if backend == "blackbox":
        # each public row is scored once per federation, however many rounds and epochs
        from algorithms.core.textdata import TokenizedDataset

        rows = TokenizedDataset(ctx.llm().tokenizer(), TINY_CORPUS[:8], 16).num_examples
        memo = res.server.teacher().llm
        # the base alignment (3 steps of 4 rows) asks first; then 2 rounds x 2 epochs of every row
        assert memo.misses == rows
        assert memo.hits == 3 * 4 + rows * 2 * 2 - rows


def test_fedcollm_refuses_a_blackbox_llm_and_a_foreign_tokenizer(tmp_path, tiny_llama_path, tiny_gpt2_path,
                                                                  tiny_llm_path):
    from algorithms.base import ConfigError
    from algorithms.fedcollm import FedCoLLMServer

    ctx = ServerContext(str(tmp_path), 0, {"slm": str(tiny_llama_path), "llm": str(tiny_llm_path)}, TINY_CORPUS,
                        {"backend": "blackbox", "url": "http://127.0.0.1:9"})
    with pytest.raises(ConfigError, match="local"):
        FedCoLLMServer({}, ctx).initial_state()
    ctx = ServerContext(str(tmp_path), 0, {"slm": str(tiny_gpt2_path), "llm": str(tiny_llm_path)}, TINY_CORPUS)
    with pytest.raises(VocabularyMismatch):
        FedCoLLMServer({}, ctx).initial_state()


def test_evaluate_proxy_at_alpha_zero_is_the_llm_alone(tiny_llama_path, tiny_llm_path):
    from algorithms.core.modeling import LoraSpec, attach_lora, load_causal_lm
    from algorithms.core.textdata import evaluate_nll
    from algorithms.fedpt import evaluate_proxy

    llm = LocalLLM(str(tiny_llm_path))
    slm, tok, _ = load_causal_lm(tiny_llama_path)
    expert = attach_lora(slm, LoraSpec(r=4, alpha=8), seed=0)
    got = evaluate_proxy(llm, expert, tok, TINY_CORPUS, [0.0, 1.0], block_size=16)
    ref = evaluate_nll(llm.model, tok, TINY_CORPUS, block_size=16)
    assert got[0.0].nll == pytest.approx(ref.nll, rel=1e-5) and got[0.0].tokens == ref.tokens
    assert got[0.0].accuracy == pytest.approx(ref.accuracy)
    # a fresh LoRA (B = 0) is the base: the expert and anti-expert cancel at any alpha
    assert got[1.0].nll == pytest.approx(ref.nll, rel=1e-5)
