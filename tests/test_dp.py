"""Client-level differential privacy (aggregator/dp.py): the accountant against dp_accounting,
clipping and the fixed-denominator noisy mean by hand, the noise's spread, the budget refusal,
and a DP-FedAvg federation over Mosquitto whose status carries the expected epsilon."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

dpa = pytest.importorskip("dp_accounting")

from aggregator.config import AggregatorConfig, ConfigError  # noqa: E402
from aggregator.dp import (  # noqa: E402
    RDP_ORDERS,
    DPConfig,
    DPConfigError,
    PrivacyBudgetExhausted,
    ServerDP,
    calibrate_noise,
    clip_update,
    delta_norm,
    epsilon,
    noise_rng,
    noisy_mean,
)
from aggregator.errors import InvalidUpdate  # noqa: E402
from aggregator.validation import UpdateSpec  # noqa: E402
from algorithms.core.client_dp import privatize_upload  # noqa: E402


def _spec(**ref) -> UpdateSpec:
    return UpdateSpec.from_state({k: np.asarray(v, dtype=np.float32) for k, v in ref.items()})


# -- accountant ----------------------------------------------------------------------------------

def test_epsilon_equals_dp_accounting_for_a_known_configuration():
    q, z, rounds, delta = 0.1, 1.1, 50, 1e-5
    acc = dpa.rdp.RdpAccountant(list(RDP_ORDERS))
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    expected = acc.get_epsilon(delta)
    assert epsilon([(q, z)] * rounds, delta) == pytest.approx(expected, rel=1e-12)
    # the integer orders cost (almost) nothing against the library's default grid
    default = dpa.rdp.RdpAccountant()
    default.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    assert expected == pytest.approx(default.get_epsilon(delta), rel=0.02)
    # PLD: the library's PLD accountant, and tighter than RDP
    pld = dpa.pld.PLDAccountant()
    pld.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    got = epsilon([(q, z)] * rounds, delta, accountant="pld")
    assert got == pytest.approx(pld.get_epsilon(delta), rel=1e-9) and got < expected
    # heterogeneous rounds compose in any order; q = 1 is the plain Gaussian mechanism
    mixed = [(0.1, 1.1), (0.2, 1.1), (0.1, 1.1)]
    acc = dpa.rdp.RdpAccountant(list(RDP_ORDERS))
    acc.compose(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1.1)), 2)
    acc.compose(dpa.PoissonSampledDpEvent(0.2, dpa.GaussianDpEvent(1.1)), 1)
    assert epsilon(mixed, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    g = dpa.rdp.RdpAccountant(list(RDP_ORDERS))
    g.compose(dpa.GaussianDpEvent(2.0), 3)
    assert epsilon([(1.0, 2.0)] * 3, delta) == pytest.approx(g.get_epsilon(delta), rel=1e-12)
    # local mode: no amplification, sensitivity 2C -> Gaussian with z / 2
    g = dpa.rdp.RdpAccountant(list(RDP_ORDERS))
    g.compose(dpa.GaussianDpEvent(2.0), 4)
    assert epsilon([(0.1, 4.0)] * 4, delta, mode="local") == pytest.approx(g.get_epsilon(delta), rel=1e-12)
    assert epsilon([], delta) == 0.0


def test_target_epsilon_is_solved_with_the_accountant():
    z = calibrate_noise(4.0, 1e-5, 0.25, 20)
    assert epsilon([(0.25, z)] * 20, 1e-5) <= 4.0 + 1e-6
    assert epsilon([(0.25, z * 0.98)] * 20, 1e-5) > 4.0
    cfg = DPConfig.parse({"clip": 1.0, "target_epsilon": 4.0}, fraction=0.25, rounds=20)
    assert cfg.noise_multiplier == pytest.approx(z) and cfg.sampling_rate == 0.25 and cfg.rounds == 20


def test_budget_refusal_names_the_round_and_the_epsilons():
    dp = ServerDP(DPConfig.parse({"clip": 1.0, "noise_multiplier": 1.0, "epsilon_budget": 3.0}))
    spent: list = []
    for r in range(1, 100):
        try:
            nxt = dp.check_budget(r, 0.1, spent)
        except PrivacyBudgetExhausted as exc:
            assert exc.round == r and exc.epsilon_next > 3.0 >= exc.epsilon_spent
            assert exc.epsilon_spent == pytest.approx(epsilon(spent, 1e-5))
            assert exc.code == "dp_budget" and "no round opened" in str(exc)
            break
        assert nxt <= 3.0
        spent.append((0.1, 1.0))
    else:
        pytest.fail("the budget never ran out")
    assert 1 < len(spent) < 99


# -- clipping and noise --------------------------------------------------------------------------

def test_clipping_by_hand():
    spec = _spec(a=[1.0, 1.0], b=[0.0, 0.0])
    # delta (3, 4, 0, 0): norm 5, clipped to 1 -> (0.6, 0.8, 0, 0) on top of the reference
    up = {"a": np.array([4.0, 5.0], np.float32), "b": np.zeros(2, np.float32)}
    got = clip_update(up, spec, 1.0)
    assert got.clipped and got.norm == pytest.approx(5.0)
    np.testing.assert_allclose(got.tensors["a"], [1.6, 1.8], rtol=1e-6)
    np.testing.assert_array_equal(got.tensors["b"], [0.0, 0.0])
    # under the bound: untouched
    small = {"a": np.array([1.3, 1.4], np.float32), "b": np.zeros(2, np.float32)}
    kept = clip_update(small, spec, 1.0)
    assert not kept.clipped
    np.testing.assert_array_equal(kept.tensors["a"], small["a"])
    # float16 on the wire: the folded values' delta norm is within C despite the rounding
    rng = np.random.default_rng(0)
    ref = {"w": rng.normal(0, 0.3, 4096).astype(np.float16)}
    spec16 = UpdateSpec.from_state(ref)
    upd = {"w": (ref["w"].astype(np.float64) + rng.normal(0, 0.01, 4096)).astype(np.float16)}
    got = clip_update(upd, spec16, 0.05)
    assert got.clipped and delta_norm(got.tensors, spec16) <= 0.05
    assert got.tensors["w"].dtype == np.float16 and delta_norm(got.tensors, spec16) > 0.049
    # validation still runs first
    with pytest.raises(InvalidUpdate) as ei:
        clip_update({"a": np.array([np.nan, 1], np.float32), "b": np.zeros(2, np.float32)}, spec, 1.0)
    assert ei.value.reason == "non_finite"


def test_fixed_denominator_mean_by_hand():
    spec = _spec(w=[1.0, 2.0, 3.0])
    d1, d2 = np.array([0.5, 0.0, -0.5]), np.array([0.1, 0.2, 0.3])
    ref = np.array([1.0, 2.0, 3.0])
    mean = {"w": ((ref + d1) + (ref + d2)) / 2}  # what WeightedMean gives with unit weights
    # two of three expected clients answered: the sum is divided by 3, not 2 (z = 0: no noise)
    out = noisy_mean(mean, 2, spec, clip=1.0, z=0.0, denominator=3, rng=noise_rng(0))
    np.testing.assert_allclose(out["w"], ref + (d1 + d2) / 3, rtol=1e-12)
    # with noise: the same draws the seeded generator gives, scaled by z C / n
    out = noisy_mean(mean, 2, spec, clip=0.5, z=2.0, denominator=3, rng=noise_rng(7, 1))
    noise = noise_rng(7, 1).normal(0.0, 1.0, 3)
    np.testing.assert_allclose(out["w"], ref + (d1 + d2 + noise) / 3, rtol=1e-12)


def test_noise_standard_deviation_is_z_clip_over_n():
    n, z, clip = 4, 1.3, 0.7
    spec = _spec(w=np.zeros(200_000))
    out = noisy_mean({"w": np.zeros(200_000)}, 3, spec, clip=clip, z=z, denominator=n, rng=noise_rng(123))
    std = z * clip / n
    assert np.std(out["w"]) == pytest.approx(std, rel=0.01)
    assert abs(np.mean(out["w"])) < 4 * std / math.sqrt(200_000)
    # production noise is not reproducible: seeded from the OS
    a = noisy_mean({"w": np.zeros(8)}, 1, _spec(w=np.zeros(8)), clip=1, z=1, denominator=1, rng=noise_rng())
    b = noisy_mean({"w": np.zeros(8)}, 1, _spec(w=np.zeros(8)), clip=1, z=1, denominator=1, rng=noise_rng())
    assert not np.array_equal(a["w"], b["w"])


def test_server_release_and_intake_weight():
    dp = ServerDP(DPConfig.parse({"clip": 1.0, "noise_multiplier": 1.0, "expected_clients": 5, "seed": 3}))
    spec = _spec(w=[0.0, 0.0])
    checked, weight = dp.check({"w": np.array([30.0, 40.0], np.float32)}, spec, "c")
    assert weight == 1.0 and checked.clipped
    np.testing.assert_allclose(checked.tensors["w"], [0.6, 0.8], rtol=1e-6)
    agg, m = dp.release({"w": np.array([0.6, 0.8])}, 1, spec, selected=4, round=2, q=0.5, spent=[(0.5, 1.0)])
    noise = noise_rng(3, 2).normal(0.0, 1.0, 2)
    np.testing.assert_allclose(agg["w"], (np.array([0.6, 0.8]) + noise) / 5, rtol=1e-6)
    assert m["dp_epsilon"] == pytest.approx(epsilon([(0.5, 1.0)] * 2, 1e-5))
    assert m["dp"]["denominator"] == 5 and m["dp"]["rounds_released"] == 2


def test_local_mode_client_clips_and_noises():
    ref = {"w": np.zeros(10_000, np.float32)}
    up = {"w": np.full(10_000, 0.1, np.float32)}  # norm 10
    cfg = {"mode": "local", "clip": 1.0, "noise_multiplier": 0.5, "seed": 1}
    out = privatize_upload(up, ref, cfg, salt=1)
    assert out["w"].dtype == np.float32
    noise = out["w"].astype(np.float64) - 0.01  # the clipped delta is 0.01 per coordinate
    assert np.std(noise) == pytest.approx(0.5, rel=0.03)
    np.testing.assert_array_equal(out["w"], privatize_upload(up, ref, cfg, salt=1)["w"])
    central = privatize_upload(up, ref, {"mode": "central", "clip": 1.0})
    np.testing.assert_allclose(central["w"], 0.01, rtol=1e-5)


def test_config_errors(tmp_path):
    with pytest.raises(DPConfigError):
        DPConfig.parse({"clip": 1.0})  # neither z nor a target
    with pytest.raises(DPConfigError):
        DPConfig.parse({"clip": 1.0, "noise_multiplier": 1.0, "target_epsilon": 2.0})
    with pytest.raises(DPConfigError):
        DPConfig.parse({"clip": -1.0, "noise_multiplier": 1.0})
    with pytest.raises(DPConfigError):
        DPConfig.parse({"clip": 1.0, "noise_multiplier": 1.0, "mode": "shuffle"})
    dp = {"clip": 1.0, "noise_multiplier": 1.0}
    base = dict(party_config="x", state_dir=str(tmp_path), dp=dp)
    with pytest.raises(ConfigError, match="fedmkt"):
        AggregatorConfig(**base, algorithm="fedmkt")
    with pytest.raises(ConfigError, match="aggregation"):
        AggregatorConfig(**base, aggregation="median")
    with pytest.raises(ConfigError, match="sync"):
        AggregatorConfig(**base, mode="buffered")
    AggregatorConfig(**base, algorithm="fedcollm")


# -- over the wire -------------------------------------------------------------------------------

@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("workers", [0, 2], ids=["service", "ingest-workers"])
def test_dp_fedavg_over_mosquitto_ends_with_the_expected_epsilon(make_federation, tiny_llama_path, tmp_path,
                                                               capsys, workers):
    from aggregator.service import AggregatorService
    from aggregator.state import StateStore
    from bridge.broker import MosquittoBroker, find_mosquitto
    from cotune.cli import main as cli_main
    from tests.test_federation import SHARDS, _config, _sent_update, _start_clients

    if find_mosquitto() is None:
        pytest.skip("needs mosquitto (CI installs it)")
    z, clip, delta = 0.8, 0.05, 1e-5
    eps2, eps3 = epsilon([(1.0, z)] * 2, delta), epsilon([(1.0, z)] * 3, delta)
    dp = {"mode": "central", "clip": clip, "noise_multiplier": z, "delta": delta,
          "epsilon_budget": (eps2 + eps3) / 2, "seed": 11}
    paths = make_federation(f"dptest{workers}", list(SHARDS), aggregator_instances=max(1, workers))
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    try:
        work = tmp_path / "clients"
        _, threads = _start_clients(paths, tiny_llama_path, list(SHARDS), work)
        cfg = _config(paths, tiny_llama_path, tmp_path / "agg", rounds=3, dp=dp, ingest_workers=workers)
        svc = AggregatorService(cfg, progress=None)
        status = svc.run()
        for t in threads:
            t.join(60)
    finally:
        broker.stop()
    # the budget allows two rounds: the third is refused and never opened
    assert isinstance(svc.stopped_by, PrivacyBudgetExhausted) and svc.stopped_by.round == 3
    assert status["rounds_committed"] == 2 and status["round"]["round"] == 2
    assert status["last_committed"]["metrics"]["dp_epsilon"] == pytest.approx(eps2, rel=1e-12)
    with StateStore(tmp_path / "agg" / "state.db") as store:
        assert [e.kind for e in store.events(kind="dp_budget_exhausted")] == ["dp_budget_exhausted"]
        from algorithms.fedavg.server import wire_cast

        for r in (1, 2):
            rs = store.load_round(r, with_partial=False)
            assert rs.info.metrics["dp"]["rounds_released"] == r and rs.info.metrics["dp"]["q"] == 1.0
            assert rs.info.metrics["dp_epsilon"] == pytest.approx(epsilon([(1.0, z)] * r, delta), rel=1e-12)
            prev = store.load_round(r - 1, with_partial=False).info.global_digest
            ref = wire_cast(store.load_global(prev).tensors, "fp16")
            spec = UpdateSpec.from_state(ref)
            sent = [_sent_update(work, c, r) for c in SHARDS]
            total = {n: sum(clip_update(u.tensors, spec, clip).tensors[n].astype(np.float64)
                            - ref[n].astype(np.float64) for u in sent) for n in spec.names}
            assert all(delta_norm(u.tensors, spec) <= clip for u in sent)  # the clients clipped too
            rng = noise_rng(11, r)
            got = store.load_global(rs.info.global_digest).tensors
            for n in spec.names:  # sorted names: the order the noise was drawn in
                expected = ref[n].astype(np.float64) + (total[n] + rng.normal(0, z * clip, ref[n].shape)) / 3
                np.testing.assert_allclose(got[n], expected, rtol=1e-6, atol=1e-7)
    # the CLI prints it
    cfg_path = tmp_path / "agg.json"
    cfg.save(cfg_path)
    capsys.readouterr()
    assert cli_main(["aggregator", "status", "--config", str(cfg_path)]) == 0
    assert f"epsilon {eps2:.4g} at delta 1e-05 after 2 released rounds" in capsys.readouterr().out
    assert cli_main(["aggregator", "status", "--config", str(cfg_path), "--json"]) == 0
    privacy = json.loads(capsys.readouterr().out)["privacy"]
    assert privacy["epsilon"] == pytest.approx(eps2) and privacy["rounds_released"] == 2


@pytest.mark.usefixtures("one_torch_thread")
def test_simulate_shares_the_release(tiny_llama_path, tmp_path):
    """The in-process federation takes the same DP path (clip, unit weight, noise, accountant)."""
    from aggregator.context import ServerContext
    from cotune.simulate import simulate
    from edge_sdk.context import DeviceContext
    from tests.test_federation import ALGO_CONFIG, SHARDS

    clients = [DeviceContext(n, tiny_llama_path, SHARDS[n], progress=None) for n in list(SHARDS)[:2]]
    ctx = ServerContext(str(tmp_path), 0, {"slm": str(tiny_llama_path)}, [])
    res = simulate("fedavg", ALGO_CONFIG, ctx, clients, 2,
                   progress=None, apply_final=False, dp={"clip": 0.05, "noise_multiplier": 1.0, "seed": 1})
    assert [r.server["dp"]["rounds_released"] for r in res.rounds] == [1, 2]
    assert res.rounds[-1].server["dp_epsilon"] == pytest.approx(epsilon([(1.0, 1.0)] * 2, 1e-5))


@pytest.mark.usefixtures("one_torch_thread")
def test_local_dp_over_mosquitto(make_federation, tiny_llama_path, tmp_path):
    """Local mode over the wire: each client clips and noises its own update (seeded here), the
    service averages what arrived without clipping or noise, and charges z/2 per round."""
    from aggregator.service import AggregatorService
    from aggregator.state import StateStore
    from bridge.broker import MosquittoBroker, find_mosquitto
    from tests.test_federation import SHARDS, _config, _sent_update, _start_clients

    if find_mosquitto() is None:
        pytest.skip("needs mosquitto (CI installs it)")
    z, clip, delta = 0.8, 0.05, 1e-5
    dp = {"mode": "local", "clip": clip, "noise_multiplier": z, "delta": delta, "seed": 5}
    paths = make_federation("dplocal", list(SHARDS))
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    try:
        work = tmp_path / "clients"
        _, threads = _start_clients(paths, tiny_llama_path, list(SHARDS), work)
        status = AggregatorService(_config(paths, tiny_llama_path, tmp_path / "agg", rounds=2, dp=dp),
                                   progress=None).run()
        for t in threads:
            t.join(60)
    finally:
        broker.stop()
    assert status["rounds_committed"] == 2
    assert status["last_committed"]["metrics"]["dp_epsilon"] == pytest.approx(
        epsilon([(1.0, z)] * 2, delta, mode="local"), rel=1e-12)
    with StateStore(tmp_path / "agg" / "state.db") as store:
        for r in (1, 2):
            sent = [_sent_update(work, c, r) for c in SHARDS]
            got = store.load_global(store.load_round(r, with_partial=False).info.global_digest).tensors
            prev = store.load_round(r - 1, with_partial=False).info.global_digest
            ref = store.load_global(prev).tensors
            for n in got:  # the unweighted mean of the noisy uploads, untouched by the service
                want = sum(u.tensors[n].astype(np.float64) for u in sent) / 3
                np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-7)
            # each upload moved by noise of std z C around the clipped delta
            noise = np.concatenate([(u.tensors[n].astype(np.float64) - ref[n].astype(np.float64)).ravel()
                                    for u in sent for n in got])
            assert np.std(noise) == pytest.approx(z * clip, rel=0.15)
