"""Buffered asynchronous aggregation (FedBuff): staleness weights, the buffer's closed form,
checkpoint/restore, rejections, config validation, and an asynchronous in-process federation
on tiny real models against synchronous FedAvg."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator.aggregation import WeightedMean
from aggregator.buffered import (
    BufferedConfig,
    DeltaBuffer,
    buffer_from_state,
    check_staleness,
    client_delta,
    staleness_weight,
)
from aggregator.context import ServerContext
from aggregator.errors import AggregatorError, InvalidUpdate, SpecError, StateError
from aggregator.state import CheckpointStore
from aggregator.validation import UpdateSpec
from cotune.simulate import ClientTiming, simulate, simulate_async
from edge_sdk.context import DeviceContext
from tests.tiny_models import TINY_CORPUS

# -- staleness weights -----------------------------------------------------------------------


def test_staleness_weights_by_hand():
    # polynomial (1 + tau)^-0.5
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == 0.5
    assert staleness_weight(8) == pytest.approx(1 / 3, rel=1e-15)
    assert staleness_weight(3, "polynomial", 1.0) == 0.25
    assert staleness_weight(5, "polynomial", 0.0) == 1.0
    # constant
    assert staleness_weight(0, "constant") == staleness_weight(100, "constant") == 1.0
    # hinge (FedAsync): 1 up to b, then 1 / (a (tau - b) + 1); a = 0.5, b = 4
    assert staleness_weight(4, "hinge", 0.5, 4) == 1.0
    assert staleness_weight(6, "hinge", 0.5, 4) == 0.5
    assert staleness_weight(10, "hinge", 0.5, 4) == 0.25
    assert staleness_weight(5, "hinge", 10.0, 4) == 1 / 11
    cfg = BufferedConfig(staleness="hinge", staleness_exponent=0.5, hinge_cutoff=4)
    assert cfg.weight(10) == 0.25
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError):
            staleness_weight(bad)
    with pytest.raises(ValueError, match="unknown staleness kind"):
        staleness_weight(1, "linear")


# -- the buffer's math -----------------------------------------------------------------------

SPEC = UpdateSpec.from_state({"a": np.zeros((1, 2), np.float32), "h": np.zeros(3, np.float16)},
                             keep_reference=False)
D0 = {"a": np.array([[3.0, 6.0]]), "h": np.array([1.0, 0.0, 2.0])}
D1 = {"a": np.array([[-2.0, 4.0]]), "h": np.array([0.0, 4.0, 2.0])}
D2 = {"a": np.array([[9.0, -3.0]]), "h": np.array([3.0, 3.0, -6.0])}
CURRENT = {"a": np.array([[1.0, -1.0]], np.float32), "h": np.array([0.5, 0.25, 1.0], np.float16),
           "llm/x": np.ones(2, np.float32)}


def _buffer(cfg: BufferedConfig, version: int = 10) -> DeltaBuffer:
    buf = DeltaBuffer(cfg)
    buf.begin(SPEC, version)
    return buf


def test_three_update_buffer_equals_the_closed_form():
    # K = 3, staleness 0 / 3 / 8 -> s = 1, 1/2, 1/3; unweighted: divide by K = 3; server_lr 0.5
    buf = _buffer(BufferedConfig(buffer_size=3, max_staleness=8, server_lr=0.5))
    assert buf.add("c0", D0, staleness=0) == 1.0
    assert buf.add("c1", D1, staleness=3) == 0.5
    assert not buf.full
    with pytest.raises(AggregatorError, match="partial=True"):
        buf.apply(CURRENT)
    buf.add("c2", D2, staleness=8)
    assert buf.full and buf.count == 3 and buf.histogram() == {0: 1, 3: 1, 8: 1}
    # sum_i s_i delta_i: "a" [3 - 1 + 3, 6 + 2 - 1] = [5, 7]
    #                    "h" [1 + 0 + 1, 0 + 2 + 1, 2 + 1 - 2] = [2, 3, 1]
    step = buf.step()
    np.testing.assert_allclose(step["a"], [[0.5 * 5 / 3, 0.5 * 7 / 3]], rtol=1e-15)
    np.testing.assert_allclose(step["h"], [0.5 * 2 / 3, 0.5 * 3 / 3, 0.5 * 1 / 3], rtol=1e-15)
    new = buf.apply(CURRENT)
    assert set(new) == {"a", "h"}  # only the buffered tensors; other parts stay the caller's
    assert new["a"].dtype == np.float32 and new["h"].dtype == np.float16  # dtypes preserved
    np.testing.assert_array_equal(new["a"], np.array([[1 + 5 / 6, -1 + 7 / 6]], np.float32))
    np.testing.assert_array_equal(new["h"], np.array([0.5 + 1 / 3, 0.75, 1 + 1 / 6], np.float16))
    wide = buf.apply(CURRENT, cast=False)
    assert wide["a"].dtype == np.float64
    np.testing.assert_allclose(wide["a"], [[1 + 5 / 6, -1 + 7 / 6]], rtol=1e-7)


def test_example_weighting_is_capped_and_normalised_by_data_weight():
    cfg = BufferedConfig(buffer_size=3, example_weighting=True, max_examples=200)
    assert [cfg.data_weight(n) for n in (100, 500, 50)] == [100.0, 200.0, 50.0]
    with pytest.raises(InvalidUpdate) as e:
        cfg.data_weight(0, client="c")
    assert e.value.reason == "weight"
    assert BufferedConfig().data_weight(None) == 1.0  # unweighted: num_examples is not used
    buf = _buffer(cfg)
    for name, d, n, tau in (("c0", D0, 100, 0), ("c1", D1, 500, 3), ("c2", D2, 50, 8)):
        buf.add(name, d, weight=cfg.data_weight(n), staleness=tau)
    # (1*100*[3,6] + 0.5*200*[-2,4] + (1/3)*50*[9,-3]) / (100+200+50) = [250, 950] / 350
    np.testing.assert_allclose(buf.step()["a"], [[250 / 350, 950 / 350]], rtol=1e-15)


def test_merged_worker_buffers_equal_one_buffer():
    cfg = BufferedConfig(buffer_size=3, server_lr=0.5)
    one, w1, w2 = _buffer(cfg), _buffer(cfg), _buffer(cfg)
    for buf, name, d, tau in ((one, "c0", D0, 0), (one, "c1", D1, 3), (one, "c2", D2, 8),
                              (w1, "c0", D0, 0), (w2, "c1", D1, 3), (w2, "c2", D2, 8)):
        buf.add(name, d, staleness=tau)
    w1.merge(w2)
    assert w1.full and w1.clients == ("c0", "c1", "c2") and w1.histogram() == one.histogram()
    for k, v in one.apply(CURRENT, cast=False).items():
        np.testing.assert_allclose(w1.apply(CURRENT, cast=False)[k], v, rtol=1e-15)
    with pytest.raises(InvalidUpdate, match="both buffers"):
        w1.merge(w2)
    with pytest.raises(AggregatorError, match="different versions"):
        w1.merge(_buffer(cfg, version=11))


def test_partial_apply_normalises_by_what_was_buffered():
    buf = _buffer(BufferedConfig(buffer_size=3))
    buf.add("c0", D0, staleness=3)
    new = buf.apply(CURRENT, partial=True, cast=False)
    np.testing.assert_allclose(new["a"], [[1 + 0.5 * 3, -1 + 0.5 * 6]], rtol=1e-15)


def test_fresh_full_buffer_is_one_synchronous_fedavg_round():
    """tau = 0 everywhere, server_lr 1, examples weighting, K = every client: the buffered step
    equals the sample-weighted mean of the full states (FedAvg), float32 wire."""
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(4, 3)).astype(np.float32),
            "b": rng.normal(size=5).astype(np.float32)}
    spec = UpdateSpec.from_state(base)
    updates = [{k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32)
                for k, v in base.items()} for _ in range(3)]
    sizes = [10, 30, 60]
    cfg = BufferedConfig(buffer_size=3, example_weighting=True)
    buf = DeltaBuffer(cfg)
    buf.begin(spec, 0)
    mean = WeightedMean()
    mean.begin(spec)
    for i, (u, n) in enumerate(zip(updates, sizes, strict=True)):
        buf.add(f"c{i}", client_delta(u, spec), weight=cfg.data_weight(n), staleness=0)
        mean.add(f"c{i}", u, weight=n)
    got, want = buf.apply(base, cast=False), mean.result(cast=False)
    for k in base:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-12)


def test_client_delta_is_against_the_wire_state_the_client_received():
    base = {"w": np.array([0.1, 1 / 3, 2.0], np.float32)}
    spec = UpdateSpec.from_state({"w": base["w"].astype(np.float16)})  # broadcast as fp16
    update = {"w": np.array([0.5, 0.25, 2.0], np.float16)}
    delta = client_delta(update, spec)
    assert delta["w"].dtype == np.float64
    want = update["w"].astype(np.float64) - base["w"].astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(delta["w"], want)
    assert delta["w"][2] == 0.0  # an unchanged tensor is no progress, whatever fp16 rounding did
    with pytest.raises(InvalidUpdate) as e:
        client_delta({"w": update["w"].astype(np.float32)}, spec)
    assert e.value.reason == "dtype"
    with pytest.raises(SpecError, match="reference"):
        client_delta(update, UpdateSpec(spec.tensors))


# -- checkpoint / restore --------------------------------------------------------------------


def test_checkpoint_restore_is_bit_identical(tmp_path):
    cfg = BufferedConfig(buffer_size=3, server_lr=0.7, staleness="hinge", staleness_exponent=2.0,
                         hinge_cutoff=1, example_weighting=True, max_examples=64)
    rng = np.random.default_rng(1)
    deltas = [{"a": rng.normal(size=(1, 2)), "h": rng.normal(size=3)} for _ in range(3)]
    live = _buffer(cfg, version=7)
    live.add("c0", deltas[0], weight=cfg.data_weight(33), staleness=0)
    live.add("c1", deltas[1], weight=cfg.data_weight(1000), staleness=3)
    store = CheckpointStore(tmp_path)
    digest = store.put(live.state_dict().tensors, live.state_dict().meta)
    ckpt = store.get(digest)
    # a rebuilt buffer (other concurrency: scheduling only) holds exactly the same state
    restored = buffer_from_state(ckpt, BufferedConfig(**{**cfg.to_dict(), "concurrency": 99}))
    assert restored.version == 7 and restored.clients == ("c0", "c1")
    assert restored.staleness == (0, 3) and restored.config.concurrency == 99
    assert store.put(restored.state_dict().tensors, restored.state_dict().meta) == digest
    for buf in (live, restored):
        buf.add("c2", deltas[2], weight=cfg.data_weight(5), staleness=2)
    a, b = live.apply(CURRENT, cast=False), restored.apply(CURRENT, cast=False)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes()
    # a state written under other math is refused
    other = DeltaBuffer(BufferedConfig(buffer_size=3))
    with pytest.raises(StateError, match="built with"):
        other.load_state_dict(ckpt)


# -- rejections ------------------------------------------------------------------------------


def test_too_stale_and_other_bad_updates_are_rejected_without_trace():
    cfg = BufferedConfig(buffer_size=2, max_staleness=2)
    assert check_staleness(cfg, 5, 3) == 2
    with pytest.raises(InvalidUpdate) as e:
        check_staleness(cfg, 5, 2, client="slow")
    assert e.value.reason == "stale" and "3 versions behind" in str(e.value)
    with pytest.raises(InvalidUpdate) as e:
        check_staleness(cfg, 5, 6)
    assert e.value.reason == "round"

    buf = _buffer(cfg)
    before = buf.state_dict()
    bad_nan = {"a": np.array([[np.nan, 0.0]]), "h": np.zeros(3)}
    cases = [
        (dict(delta=D0, staleness=3), "stale"),
        (dict(delta=D0, staleness=-1), "round"),
        (dict(delta=D0, staleness=0, weight=0.0), "weight"),
        (dict(delta=bad_nan, staleness=0), "non_finite"),
        (dict(delta={"a": D0["a"]}, staleness=0), "names"),
        (dict(delta={"a": np.zeros((2, 1)), "h": D0["h"]}, staleness=0), "shape"),
        (dict(delta={"a": np.zeros((1, 2), np.int64), "h": D0["h"]}, staleness=0), "dtype"),
    ]
    for kw, reason in cases:
        with pytest.raises(InvalidUpdate) as e:
            buf.add("c0", **kw)
        assert e.value.reason == reason, kw
    after = buf.state_dict()
    assert buf.count == 0 and after.meta == before.meta
    assert all(np.array_equal(after.tensors[k], before.tensors[k]) for k in before.tensors)
    buf.add("c0", D0, staleness=2)
    with pytest.raises(InvalidUpdate) as e:
        buf.add("c0", D1, staleness=0)
    assert e.value.reason == "duplicate"
    buf.add("c1", D1, staleness=0)
    with pytest.raises(AggregatorError, match="full"):
        buf.add("c2", D2, staleness=0)


# -- config validation -----------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    ({"buffer_size": 0}, "buffer_size must be an integer >= 1"),
    ({"buffer_size": True}, "buffer_size must be an integer >= 1"),
    ({"buffer_size": 2.0}, "buffer_size must be an integer >= 1"),
    ({"max_staleness": -1}, "max_staleness must be an integer >= 0"),
    ({"concurrency": 0}, "concurrency must be an integer >= 1"),
    ({"max_examples": 0}, "max_examples must be an integer >= 1"),
    ({"staleness": "linear"}, "staleness must be one of polynomial, constant, hinge"),
    ({"staleness_exponent": float("nan")}, "staleness_exponent must be a finite number >= 0"),
    ({"staleness_exponent": -0.5}, "staleness_exponent must be a finite number >= 0"),
    ({"server_lr": 0.0}, "server_lr must be a finite number > 0"),
    ({"server_lr": float("inf")}, "server_lr must be a finite number > 0"),
    ({"example_weighting": "yes"}, "example_weighting must be true or false"),
])
def test_config_validation_messages(kw, message):
    with pytest.raises(SpecError, match=message):
        BufferedConfig(**kw)


def test_config_from_dict_round_trips_and_names_unknown_keys():
    cfg = BufferedConfig(buffer_size=3, staleness="constant")
    assert BufferedConfig.from_dict(cfg.to_dict()) == cfg
    assert BufferedConfig.from_dict(None) == BufferedConfig()
    with pytest.raises(SpecError, match=r"unknown keys \['K'\]; valid keys"):
        BufferedConfig.from_dict({"K": 3})
    with pytest.raises(SpecError, match="dropout"):
        ClientTiming(dropout=1.0)


# -- in-process federations on tiny real models ----------------------------------------------

TRAIN = {"lr": 2e-2, "epochs": 1, "batch_size": 4, "block_size": 16, "max_steps": 4}
#: every linear layer and the LM head, so that a few steps move the held-out NLL visibly
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
FEDAVG = {"train": TRAIN, "eval_block_size": 16,
          "lora": {"r": 4, "alpha": 8, "target_modules": TARGETS}}
HELD_OUT = TINY_CORPUS[12:]


@pytest.fixture
def server_ctx(tmp_path, tiny_llama_path):
    return ServerContext(str(tmp_path), 0, {"slm": str(tiny_llama_path)}, TINY_CORPUS[:8])


def _clients(path, n=3):
    return [DeviceContext(f"c{i}", path, TINY_CORPUS[i:12:n], HELD_OUT, progress=None)
            for i in range(n)]


def _mean_final(res) -> float:
    return sum(m["nll_final"] for m in res.final.values()) / len(res.final)


@pytest.mark.usefixtures("one_torch_thread")
def test_async_with_a_full_fresh_buffer_is_synchronous_fedavg(server_ctx, tiny_llama_path):
    """K = concurrency = every client, max_staleness 0, example weighting, fp32 wire: each
    version waits for every client's update on the previous one, i.e. the synchronous rounds;
    the whole async path (plans per version, deltas, buffer, finish_round) must give the same
    global state."""
    cfg = {**FEDAVG, "wire_dtype": "fp32"}
    sync = simulate("fedavg", cfg, server_ctx, _clients(tiny_llama_path), rounds=2, progress=None,
                    apply_final=False)
    buffered = BufferedConfig(buffer_size=3, concurrency=3, max_staleness=0,
                              example_weighting=True)
    res = simulate_async("fedavg", cfg, server_ctx, _clients(tiny_llama_path), buffered=buffered,
                         updates=6, progress=None, apply_final=False)
    assert [v.staleness for v in res.versions] == [{0: 3}, {0: 3}]
    assert not res.rejected and res.dropped == 0
    for k in sync.state:
        np.testing.assert_allclose(res.state[k], sync.state[k], rtol=0, atol=1e-6)
    assert any(np.abs(sync.state[k]).max() > 0.01 for k in sync.state if "lora_B" in k)


@pytest.mark.usefixtures("one_torch_thread")
def test_async_fedavg_reaches_the_sync_loss(server_ctx, tiny_llama_path):
    """Same client updates (3 clients x 2 rounds = 6), stragglers: FedBuff with K = 2 ends
    within a loose band of synchronous FedAvg and far below the starting NLL, in less
    simulated time (no barrier waits for the straggler)."""
    timing = ClientTiming(median_seconds=10.0, stragglers=0.34, straggler_factor=4.0, seed=3)
    sync = simulate("fedavg", FEDAVG, server_ctx, _clients(tiny_llama_path), rounds=2,
                    progress=None, timing=timing)
    start = sum(m["nll_before"] for m in sync.rounds[0].clients.values()) / 3
    seen = []
    res = simulate_async("fedavg", FEDAVG, server_ctx, _clients(tiny_llama_path),
                         buffered=BufferedConfig(buffer_size=2, concurrency=3, max_staleness=4),
                         updates=6, timing=timing, progress=None,
                         after_version=lambda rec, state, server: seen.append(rec.version))
    assert res.accepted == 6 and res.unapplied == 0 and seen == [1, 2, 3]
    assert [v.updates for v in res.versions] == [2, 4, 6]
    assert all(sum(v.staleness.values()) == 2 for v in res.versions)
    assert any(tau > 0 for v in res.versions for tau in v.staleness)  # really asynchronous
    assert len(res.stragglers) == 1
    sync_time = sum(r.sim_seconds for r in sync.rounds)
    assert res.sim_time < sync_time
    nll_sync, nll_async = _mean_final(sync), _mean_final(res)
    gain_sync, gain_async = start - nll_sync, start - nll_async
    assert gain_sync > 0.3, (start, nll_sync)  # the run is long enough to mean something
    assert gain_async > 0.5 * gain_sync, (start, nll_sync, nll_async)
    assert abs(nll_async - nll_sync) < 0.25 * gain_sync + 0.05, (nll_sync, nll_async)
    assert set(res.state) == set(sync.state)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in res.state.values())


@pytest.mark.usefixtures("one_torch_thread")
def test_async_tolerates_dropouts_and_rejects_stale_updates(server_ctx, tiny_llama_path):
    """K = 1 and max_staleness 0: whatever was in flight when a version is applied comes back
    stale and is rejected with that reason; dropped tasks only free their slot."""
    timing = ClientTiming(median_seconds=5.0, dropout=0.3, seed=7)
    res = simulate_async("fedavg", FEDAVG, server_ctx, _clients(tiny_llama_path),
                         buffered=BufferedConfig(buffer_size=1, concurrency=3, max_staleness=0),
                         updates=3, timing=timing, progress=None, apply_final=False)
    assert res.accepted == 3 and len(res.versions) == 3
    assert all(v.staleness == {0: 1} for v in res.versions)
    assert res.rejected.get("stale", 0) >= 1
    assert set(res.rejected) <= {"stale"}
    assert res.dropped >= 1
    # deterministic: the same seed replays the same schedule
    again = simulate_async("fedavg", FEDAVG, server_ctx, _clients(tiny_llama_path),
                           buffered=BufferedConfig(buffer_size=1, concurrency=3, max_staleness=0),
                           updates=3, timing=timing, progress=None, apply_final=False)
    assert [(v.sim_time, v.clients) for v in again.versions] == [
        (v.sim_time, v.clients) for v in res.versions]
    for k in res.state:
        np.testing.assert_array_equal(again.state[k], res.state[k])


def test_async_refuses_what_it_cannot_buffer(server_ctx, tiny_llama_path, tiny_llm_path, tmp_path):
    clients = _clients(tiny_llama_path)
    with pytest.raises(SpecError, match="a budget"):
        simulate_async("fedavg", FEDAVG, server_ctx, clients)
    with pytest.raises(SpecError, match="buffer_size 4 exceeds the 3 clients"):
        simulate_async("fedavg", FEDAVG, server_ctx, clients, updates=4,
                       buffered=BufferedConfig(buffer_size=4))
    with pytest.raises(SpecError, match="'median' does not apply"):
        simulate_async("fedavg", FEDAVG, server_ctx, clients, updates=2, aggregation="median")
    mkt_ctx = ServerContext(str(tmp_path), 0, {"slm": str(tiny_llama_path),
                                               "llm": str(tiny_llm_path)}, TINY_CORPUS[:8])
    with pytest.raises(SpecError, match="collects its clients' updates"):
        simulate_async("fedmkt", {"train": TRAIN, "k": 8}, mkt_ctx, clients, updates=2)
    with pytest.raises(SpecError, match="no dropouts"):
        simulate("fedavg", FEDAVG, server_ctx, clients, rounds=1, timing=ClientTiming(dropout=0.1))
    assert math.isfinite(ClientTiming().clock(["a", "b"]).task_seconds("a"))
