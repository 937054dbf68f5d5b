"""`cotune llm serve` under the official `openai` client and under attack: streaming as
server-sent events, every bad input a 4xx with an OpenAI-style error object, token budgets,
a bounded queue (429), a long request that does not block other clients, cancellation on
disconnect, request/header/body timeouts, and no thread per connection."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from aggregator.llm_server import LLMServer, ServerLimits
from tests.tiny_models import TINY_CORPUS

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "s3cret"


@pytest.fixture(scope="module")
def served(tiny_llm_path):
    limits = ServerLimits(max_tokens=4096, max_request_tokens=8192, max_active=4)
    with LLMServer(str(tiny_llm_path), api_key=KEY, name="tiny", limits=limits) as srv:
        yield srv


@pytest.fixture(scope="module")
def strict(tiny_llm_path):
    """Tight limits and short timeouts; one API key per test, so each has its own budget."""
    limits = ServerLimits(
        max_tokens=4096,
        max_request_tokens=4096,
        max_queue=2,
        max_client_jobs=2,
        client_tokens_per_window=10_000,
        client_window_s=60,
        request_timeout_s=2.0,
        header_timeout_s=1.0,
        body_timeout_s=1.0,
        keep_alive_s=1.0,
    )
    keys = [f"k{i}" for i in range(8)]
    with LLMServer(str(tiny_llm_path), api_key=keys, name="tiny", limits=limits) as srv:
        yield srv


def _client(srv, key=KEY, **kw):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


def _post(srv, body, key=KEY, path="/v1/completions", method="POST", headers=None, timeout=30):
    """(status, headers, parsed body) of one raw request; ``body`` bytes are sent as they are."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", "Authorization": f"Bearer {key}", **(headers or {})}
    conn.request(method, path, data, hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw
    return resp.status, dict(resp.getheaders()), parsed


def _assert_error(status, body, code, match=""):
    assert status == code, body
    err = body["error"]
    assert err["code"] == code and isinstance(err["type"], str) and match in err["message"], err


def _health(srv):
    status, _, body = _post(srv, None, path="/health", method="GET")
    assert status == 200
    return body


def _open_request(srv, body, key=KEY) -> socket.socket:
    """Send a whole request and do not read the answer: the caller closes the socket."""
    data = json.dumps(body).encode()
    s = socket.create_connection((srv.host, srv.port))
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return s


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# -- the openai client -----------------------------------------------------------------------------
def test_openai_client_models_completions_logprobs_echo(served):
    c = _client(served)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(
        model="tiny",
        prompt=TINY_CORPUS[0],
        max_tokens=5,
        temperature=0,
        logprobs=3,
        extra_body={"return_tokens_as_token_ids": True},
    )  # byte tokens share a string
    ch = r.choices[0]
    assert len(ch.logprobs.tokens) == 5 and all(len(t) == 3 for t in ch.logprobs.top_logprobs)
    assert r.usage.completion_tokens == 5 and ch.finish_reason in ("length", "stop")
    # batched echo with prompt_logprobs (vLLM's extension) through extra_body
    r = c.completions.create(
        model="tiny",
        prompt=TINY_CORPUS[:2],
        max_tokens=1,
        temperature=0,
        echo=True,
        logprobs=2,
        extra_body={"prompt_logprobs": 2},
    )
    assert [x.index for x in r.choices] == [0, 1]
    for i, ch in enumerate(r.choices):
        assert ch.text.startswith(TINY_CORPUS[i].split()[0])
        n_prompt = len(ch.model_extra["prompt_logprobs"])
        assert len(ch.logprobs.tokens) == n_prompt + 1 and ch.logprobs.token_logprobs[0] is None
    # n samples per prompt, seeded: reproducible
    a = c.completions.create(model="tiny", prompt="The", max_tokens=4, n=3, temperature=1.0, seed=7)
    b = c.completions.create(model="tiny", prompt="The", max_tokens=4, n=3, temperature=1.0, seed=7)
    assert len(a.choices) == 3 and [x.text for x in a.choices] == [x.text for x in b.choices]


def test_stream_is_server_sent_events_like_the_plain_answer(served):
    c = _client(served)
    kw = {
        "model": "tiny",
        "prompt": TINY_CORPUS[1],
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": 2,
    }
    plain = c.completions.create(**kw).choices[0]
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text_chunks = [ch for ch in chunks if ch.choices]
    assert len(text_chunks) == 12
    assert "".join(ch.choices[0].text for ch in text_chunks) == plain.text
    assert [t for ch in text_chunks for t in ch.choices[0].logprobs.tokens] == plain.logprobs.tokens
    assert text_chunks[-1].choices[0].finish_reason == plain.finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in text_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    # stop strings: the streamed text never shows a stop string nor what follows it
    stop = plain.text[3:5]
    p2 = c.completions.create(stop=[stop], **kw).choices[0].text
    s2 = "".join(
        ch.choices[0].text
        for ch in c.completions.create(stream=True, stop=[stop], **kw)
        if ch.choices
    )
    assert s2 == p2 and stop not in s2
    # raw wire format: data: lines and a final [DONE]
    status, headers, raw = _post(served, {**kw, "stream": True, "max_tokens": 2})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert (
        all(e.startswith("data: ") for e in events)
        and events[-1] == "data: [DONE]"
        and len(events) == 3
    )


def test_openai_client_sees_typed_errors(served):
    c = _client(served)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="tiny", prompt=["a"] * 8, max_tokens=4096)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="tiny", prompt="a", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="a")
    with pytest.raises(openai.AuthenticationError):
        _client(served, key="wrong").models.list()
    with pytest.raises(openai.BadRequestError, match="stream"):
        c.completions.create(model="tiny", prompt="a", max_tokens=1, extra_body={"stream": "yes"})


# -- bad input: 4xx, never 500 ---------------------------------------------------------------------
def test_bad_inputs_are_4xx_with_an_error_object(served):
    base = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    cases = [
        (b'{"max_tokens": 1e400, "prompt": "x"}', 400, "finite"),
        (b'{"temperature": 1e400, "prompt": "x"}', 400, "finite"),
        (b'{"temperature": NaN, "prompt": "x"}', 400, "NaN"),
        (b'{"top_p": -Infinity, "prompt": "x"}', 400, "Infinity"),
        (b'{"max_tokens": 1' + b"0" * 5000 + b', "prompt": "x"}', 400, "out of range"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested"),
        (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nested"),
        (b'{"prompt": "x"', 400, "invalid JSON"),
        (b"\xff\xfe", 400, "invalid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"", 400, "empty"),
        ({**base, "max_tokens": 0}, 400, "max_tokens"),
        ({**base, "max_tokens": -1}, 400, "max_tokens"),
        ({**base, "max_tokens": "16"}, 400, "max_tokens"),
        ({**base, "max_tokens": True}, 400, "max_tokens"),
        ({**base, "max_tokens": 5000}, 400, "max_tokens"),
        ({**base, "temperature": -0.5}, 400, "temperature"),
        ({**base, "temperature": "hot"}, 400, "temperature"),
        ({**base, "top_p": 0}, 400, "top_p"),
        ({**base, "top_p": 1.5}, 400, "top_p"),
        ({**base, "n": 0}, 400, "n must"),
        ({**base, "n": 1000}, 400, "n must"),
        ({**base, "logprobs": 10**6}, 400, "logprobs"),
        ({**base, "prompt_logprobs": -1}, 400, "prompt_logprobs"),
        ({**base, "echo": "true"}, 400, "echo"),
        ({**base, "seed": 2**70}, 400, "range"),
        ({**base, "seed": 2**63}, 400, "seed"),
        ({**base, "stop": [1, 2]}, 400, "stop"),
        ({**base, "stop": ["x" * 1000]}, 400, "stop"),
        ({**base, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({**base, "logit_bias": {"1": 5}}, 400, "logit_bias"),
        ({**base, "best_of": 3}, 400, "best_of"),
        ({**base, "prompt": []}, 400, "prompt"),
        ({**base, "prompt": [[]]}, 400, "empty"),
        ({**base, "prompt": [[1, 10**6]]}, 400, "token ids"),
        ({**base, "prompt": [{"a": 1}]}, 400, "prompt"),
        ({**base, "prompt": ["a"] * 65}, 400, "prompts"),
        ({**base, "prompt": "word " * 5000}, 400, "tokens"),
        ({**base, "prompt": [1] * 4097}, 400, "4096"),
        ({**base, "prompt": [1] * 200, "max_tokens": 100}, 400, "context length is 256"),
        ({**base, "model": "other"}, 404, "does not exist"),
    ]
    for body, code, match in cases:
        t0 = time.perf_counter()
        status, _, got = _post(served, body)
        _assert_error(status, got, code, match)
        assert time.perf_counter() - t0 < 2.0, body if isinstance(body, dict) else body[:40]
    _assert_error(
        *_post(served, b"{}", headers={"Content-Length": str(64 * 2**20)})[::2], 413, "bytes"
    )
    _assert_error(*_post(served, None, path="/v1/nothing")[::2], 404)
    _assert_error(*_post(served, None, path="/v1/completions", method="GET")[::2], 405)
    _assert_error(*_post(served, base, key="wrong")[::2], 401)
    _assert_error(*_post(served, {"prompt": 5}, path="/tokenize")[::2], 400, "prompt")
    # a vanishing temperature is greedy (as in vLLM), not a division by zero
    status, _, a = _post(served, {**base, "temperature": 1e-300, "max_tokens": 6})
    _, _, b = _post(served, {**base, "temperature": 0, "max_tokens": 6})
    assert status == 200 and a["choices"][0]["text"] == b["choices"][0]["text"]
    _wait(lambda: _health(served)["active"] == 0)


def test_token_budget_refuses_the_abusive_request_before_any_work(served):
    done = _health(served)["completed"]
    t0 = time.perf_counter()
    status, _, body = _post(served, {"model": "tiny", "prompt": ["hi"] * 8, "max_tokens": 4096})
    assert time.perf_counter() - t0 < 1.0
    _assert_error(status, body, 400, "32768 tokens, more than 8192")
    assert _health(served)["completed"] == done  # never reached the model


# -- the abusive request does not block others -----------------------------------------------------
def test_long_request_does_not_block_others_and_is_cancelled_on_disconnect(served):
    long = _open_request(
        served,
        {
            "model": "tiny",
            "prompt": ["The"] * 32,
            "max_tokens": 250,
            "temperature": 1.0,
            "logprobs": 5,
            "ignore_eos": True,
        },
    )
    try:
        _wait(lambda: _health(served)["active"] == 1)
        c = _client(served)
        lat = []
        for i in range(8):
            t0 = time.perf_counter()
            r = c.completions.create(
                model="tiny", prompt=TINY_CORPUS[i], max_tokens=4, temperature=0
            )
            lat.append(time.perf_counter() - t0)
            assert r.usage.completion_tokens >= 1
        assert max(lat) < 3.0, lat
        assert _health(served)["active"] == 1  # the long one is still generating
    finally:
        long.close()
    _wait(lambda: _health(served)["active"] == 0, timeout=5)  # the disconnect cancelled it


def test_bounded_queue_and_per_client_limits_answer_429(strict):
    key = "k0"
    socks = [
        _open_request(
            strict,
            {"model": "tiny", "prompt": ["The"] * 16, "max_tokens": 250, "ignore_eos": True},
            key=k,
        )
        for k in ("k1", "k2")
    ]
    try:
        _wait(lambda: _health(strict)["pending"] + _health(strict)["active"] == 2)
        status, headers, body = _post(
            strict, {"model": "tiny", "prompt": "a", "max_tokens": 1}, key=key
        )
        _assert_error(status, body, 429, "busy")
        assert body["error"]["type"] == "rate_limit_error" and int(headers["retry-after"]) >= 1
        with pytest.raises(openai.RateLimitError):
            _client(strict, key=key).completions.create(model="tiny", prompt="a", max_tokens=1)
    finally:
        for s in socks:
            s.close()
    _wait(lambda: _health(strict)["pending"] + _health(strict)["active"] == 0)
    # the per-client token budget (10000 per minute) is charged prompt + requested tokens
    long_prompt = {"model": "tiny", "prompt": [[5] * 200] * 20, "max_tokens": 1}  # 4020 tokens
    assert [_post(strict, long_prompt, key=key)[0] for _ in range(2)] == [200, 200]
    status, headers, body = _post(strict, long_prompt, key=key)
    _assert_error(status, body, 429, "token budget")
    assert int(headers["retry-after"]) >= 1
    assert _post(strict, long_prompt, key="k3")[0] == 200  # another key, its own budget


def test_request_timeout(strict):
    body = {
        "model": "tiny",
        "prompt": ["The"] * 16,
        "max_tokens": 250,
        "logprobs": 20,
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    status, _, got = _post(strict, body, key="k4")
    _assert_error(status, got, 504, "timed out")
    assert time.perf_counter() - t0 < strict.limits.request_timeout_s + 2
    # streamed: an error event, then [DONE]
    status, _, raw = _post(strict, {**body, "stream": True}, key="k7")
    events = raw.decode().strip().split("\n\n")
    assert status == 200 and events[-1] == "data: [DONE]" and '"timeout_error"' in events[-2]


# -- slow and half-sent requests -------------------------------------------------------------------
def test_half_sent_requests_pin_no_threads_and_are_closed(strict):
    threads = threading.active_count()
    socks = []
    for i in range(200):
        s = socket.create_connection((strict.host, strict.port))
        if i % 2:  # headers never finish
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        else:  # headers in, body never finishes
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k5\r\n"
                b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt"'
            )
        socks.append(s)
    try:
        assert threading.active_count() <= threads + 1
        t0 = time.perf_counter()
        r = _client(strict, key="k6").completions.create(model="tiny", prompt="a", max_tokens=2)
        assert r.choices and time.perf_counter() - t0 < 2.0
        # all are answered (408) or closed by the server within the header/body timeouts
        deadline = time.monotonic() + 6
        for s in socks:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            data = s.recv(65536)
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:80]
        assert threading.active_count() <= threads + 1
    finally:
        for s in socks:
            s.close()
