"""Proxy-tuned generation with the large model's log-probabilities served by the aggregator over
the encrypted wire (real Mosquitto, mTLS): exactness against the local large model, speculative
greedy generation, error responses, out-of-round requests, and the codec of both messages."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from aggregator.llm import LocalLLM
from aggregator.logits_service import LogitsServer
from bridge.broker import find_mosquitto
from bridge.codec import decode, encode
from bridge.endpoint import EndpointConfig, load_endpoint
from bridge.errors import MalformedMessage
from bridge.messages import LogitsRequest, LogitsResponse, Note
from edge_sdk.inference import InferenceError
from edge_sdk.inference.generate import SamplingConfig, load_backend
from edge_sdk.inference.proxy import LargeModel, LocalLargeModel, ProxyGenerator, SmallPair
from edge_sdk.inference.wire import WireInferenceError, WireLargeModel

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]
needs_broker = pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto (CI installs it)")

PROMPT = "The quick brown"


# --------------------------------------------------------------------------------------------
# messages


def test_both_messages_round_trip_through_the_codec():
    req = LogitsRequest("r1", [5, 9, 13], positions=2, top_k=7)
    assert decode(encode(req)) == req and req.problem() == ""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float16):
        resp = LogitsResponse("r1", {"values": rng.standard_normal((2, 7)).astype(dtype),
                                     "ids": rng.integers(0, 100, (2, 7)).astype(np.int32)})
        back = decode(encode(resp))
        assert isinstance(back, LogitsResponse) and back.request_id == "r1" and back.error == ""
        assert back.values.dtype == dtype and back.ids.dtype == np.int32
        np.testing.assert_array_equal(back.values, resp.values)
        np.testing.assert_array_equal(back.ids, resp.ids)
    err = LogitsResponse("r2", error="positions out of range")
    assert decode(encode(err)) == err


def test_message_validation():
    assert "positions" in LogitsRequest("r", [1, 2], positions=3).problem()
    assert "positions" in LogitsRequest("r", [1, 2], positions=0).problem()
    assert "top_k" in LogitsRequest("r", [1, 2], top_k=0).problem()
    assert "empty" in LogitsRequest("r", []).problem()
    assert "[0, 10)" in LogitsRequest("r", [1, 12]).problem(vocab_size=10)
    for bad in (dict(ids=[1, "2"]), dict(ids=[True]), dict(positions=1.5)):
        with pytest.raises(ValueError):
            LogitsRequest("r", **{"ids": [1], **bad})
    with pytest.raises(ValueError):
        LogitsRequest("", [1])
    ok = {"values": np.zeros((2, 3), np.float32), "ids": np.zeros((2, 3), np.int32)}
    for bad in ({**ok, "ids": np.zeros((2, 4), np.int32)}, {**ok, "ids": np.zeros((2, 3), np.int64)},
                {**ok, "values": np.zeros((2, 3), np.float64)}, {"values": ok["values"]},
                {**ok, "values": np.zeros((6,), np.float32), "ids": np.zeros((6,), np.int32)}):
        with pytest.raises(ValueError):
            LogitsResponse("r", bad)
    with pytest.raises(ValueError):
        LogitsResponse("r", ok, error="both")
    # a frame whose body breaks the structure is refused by the codec as malformed
    raw = encode(LogitsResponse("r", ok)).replace(b'"request_id":"r"', b'"request_id":""')
    with pytest.raises(MalformedMessage):
        decode(raw)


# --------------------------------------------------------------------------------------------
# over a real broker


@pytest.fixture(scope="module")
def parties(federation, mosquitto):
    eps = {p: load_endpoint(federation.party_config(p), EndpointConfig()).start() for p in ("aggregator", "alice")}
    yield eps
    for ep in eps.values():
        ep.close()


@pytest.fixture(scope="module")
def llm(tiny_llm_path):
    return LocalLLM(str(tiny_llm_path))


@pytest.fixture
def server(parties, llm):
    srv = LogitsServer(parties["aggregator"], llm)
    stop = threading.Event()
    t = threading.Thread(target=srv.serve_forever, args=(stop, 0.1), daemon=True)
    t.start()
    yield srv
    stop.set()
    t.join(5)


@pytest.fixture(scope="module")
def local_large(tiny_llm_path):
    return LocalLargeModel.load(tiny_llm_path)


@pytest.fixture(scope="module")
def small_pair(tiny_llama_path, tmp_path_factory):
    from test_proxy_generation import make_adapter

    adapter = make_adapter(tiny_llama_path, tmp_path_factory.mktemp("adapter"))
    return SmallPair.gated(load_backend(tiny_llama_path, adapter=adapter, lora_mode="gated", backend="torch"))


def _wire(parties, local_large, **kw) -> WireLargeModel:
    kw.setdefault("top_k", local_large.vocab_size)
    return WireLargeModel(parties["alice"], "aggregator", local_large.vocab_size,
                          tokenizer=local_large.tokenizer, timeout_s=kw.pop("timeout_s", 30.0), **kw)


@needs_broker
def test_wire_logprobs_equal_the_local_large_model(parties, server, local_large, small_pair):
    wire = _wire(parties, local_large)
    assert isinstance(wire, LargeModel)
    ids = list(small_pair.tokenizer(PROMPT)["input_ids"]) + [7, 11, 3]
    for positions in (1, 3, len(ids)):
        got = wire.logprobs(ids, positions)
        want = local_large.logprobs(ids, positions)
        assert got.shape == want.shape == (positions, local_large.vocab_size) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert wire.requests == 3 and server.served >= 3
    # top-k only: the k given entries are exact, the rest share the remaining mass
    top = _wire(parties, local_large, top_k=5).logprobs(ids, 2)
    want = local_large.logprobs(ids, 2)
    for row, ref in zip(top, want, strict=True):
        best = np.argsort(ref)[::-1][:5]
        np.testing.assert_allclose(row[best], ref[best], atol=1e-4)
        assert abs(np.logaddexp.reduce(row.astype(np.float64))) < 1e-3


@needs_broker
def test_proxy_generation_over_the_wire_equals_local(parties, server, local_large, small_pair):
    cfg = SamplingConfig(max_new_tokens=20, ignore_eos=True)
    wire = _wire(parties, local_large)
    got = ProxyGenerator(wire, small_pair, speculative=3).generate(PROMPT, cfg)
    ref = ProxyGenerator(local_large, small_pair, speculative=3).generate(PROMPT, cfg)
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert got.stats["large_requests"] == wire.requests <= 20
    assert got.stats["drafted"] > 0


@needs_broker
def test_bad_requests_get_error_responses_and_the_server_keeps_serving(parties, server, local_large):
    alice, agg = parties["alice"], parties["aggregator"]
    agg.set_round_floor(7)  # mid-federation: logits requests are out of round and still served
    for req, words in ((LogitsRequest("bad-pos", [1, 2, 3], positions=5, top_k=3), "positions"),
                       (LogitsRequest("bad-id", [1, 10**6], positions=1, top_k=3), "token ids"),
                       (LogitsRequest("bad-k", [1, 2], positions=1, top_k=0), "top_k")):
        alice.send("aggregator", req)
        got = alice.recv(timeout=20)
        assert isinstance(got.message, LogitsResponse) and got.message.request_id == req.request_id
        assert words in got.message.error and not got.message.tensors
    assert server.errors >= 3 and agg.rejected["stale_round"] == 0
    wire = _wire(parties, local_large, top_k=4)
    assert wire.logprobs([1, 2, 3], 2).shape == (2, local_large.vocab_size)  # still serving
    with pytest.raises(WireInferenceError):  # refused before sending
        wire.logprobs([1, 2], 3)


@needs_broker
def test_error_response_and_timeout_raise_typed_errors_and_keep_other_messages(parties, local_large, llm):
    alice, agg = parties["alice"], parties["aggregator"]
    wire = _wire(parties, local_large, top_k=4, timeout_s=1.0)
    with pytest.raises(InferenceError, match="no logits response"):
        wire.logprobs([1, 2, 3])  # nobody serves
    pending = agg.recv(timeout=10)
    assert isinstance(pending.message, LogitsRequest)

    # a server that sends something else first, answers the stale request, then the new one
    srv = LogitsServer(agg, llm, max_positions=2)

    def serve():
        srv.handle(pending)  # the answer to the request that timed out: dropped by the client
        inbound = agg.recv(timeout=20)
        agg.send("alice", Note("interleaved", {"n": 1}))
        srv.handle(inbound)
        srv.handle(agg.recv(timeout=20))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    wire.timeout_s = 20.0
    assert wire.logprobs([1, 2, 3], 2).shape == (2, local_large.vocab_size)
    with pytest.raises(WireInferenceError, match="limit of 2"):
        wire.logprobs([1, 2, 3], 3)
    t.join(20)
    assert wire.stale_dropped == 1
    other = alice.recv(timeout=5)
    assert isinstance(other.message, Note) and other.message.kind == "interleaved"
    assert alice.recv(timeout=0.3) is None


@needs_broker
def test_aggregator_service_answers_logits_requests_when_configured(make_federation, tiny_llama_path,
                                                                    tiny_llm_path, local_large, tmp_path):
    from aggregator.config import AggregatorConfig
    from aggregator.service import AggregatorService
    from bridge.broker import MosquittoBroker

    paths = make_federation("logitsfed", ["alice"])
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    cfg = AggregatorConfig(party_config=str(paths.party_config("aggregator")), state_dir=str(tmp_path / "state"),
                           models={"slm": str(tiny_llama_path), "llm": str(tiny_llm_path)}, serve_logits=True)
    svc = AggregatorService(cfg, progress=None)
    alice = load_endpoint(paths.party_config("alice"))
    try:
        svc.endpoint.start()
        alice.start()
        svc.endpoint.set_round_floor(3)
        ids = [5, 9, 13, 2]
        alice.send("aggregator", LogitsRequest("svc-1", ids, positions=2, top_k=local_large.vocab_size))
        inbound = svc.endpoint.recv(timeout=20)
        svc.on_other(inbound)  # what the intake does with a message that is not an Update
        got = alice.recv(timeout=20).message
        assert isinstance(got, LogitsResponse) and got.request_id == "svc-1" and not got.error
        dense = np.full((2, local_large.vocab_size), -np.inf, np.float32)
        np.put_along_axis(dense, got.ids.astype(np.int64), got.values, axis=1)
        np.testing.assert_allclose(dense, local_large.logprobs(ids, 2), atol=1e-4)
    finally:
        alice.close()
        svc.endpoint.close()
        broker.stop()
