"""Secure aggregation over the real wire: virtual devices (own identities, mTLS, envelopes)
against a real Mosquitto and the real aggregator service run SecAgg+ rounds; the committed
global equals the weighted mean of what the surviving devices sent, within the fixed-point
error, with devices dropping out at every step."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from bridge.broker import find_mosquitto

pytestmark = pytest.mark.mosquitto

CLIP, CAP = 0.5, 50


def _run(tmp_name: str, clients: int, *, drop: dict | None = None, rounds: int = 1, deadline: float = 60,
         step_s: float = 5.0, extra: dict | None = None):
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); CI installs it")
    from cotune.fleet import FleetOptions, run_fleet

    work = Path(tempfile.mkdtemp(prefix=f"cotune-test-{tmp_name}-", dir="/tmp"))
    os.chmod(work, 0o755)
    sa = {"clip": CLIP, "weight_cap": CAP, "step_timeout_s": step_s}
    overrides = {"secure_aggregation": sa, "quorum": 0.5, **(extra or {})}
    run = run_fleet(FleetOptions(clients=clients, rounds=rounds, size="tiny", work_dir=str(work), progress=False,
                                 round_deadline_s=deadline, keep_blobs=True, aggregator_overrides=overrides,
                                 secagg_drop=drop or {}))
    return run, work


def _sent(work: Path) -> list[dict]:
    from cotune.fleet.expected import sent_rows

    return sent_rows(work)


def _expected(work: Path, rows: list[dict], round: int) -> tuple[dict, dict, int]:
    """The weighted mean the secure sum must equal: global + sum(w clip(delta)) / sum(w), over
    the devices whose masked input reached the aggregator (recomputed from the seeds)."""
    from cotune.fleet.expected import secure_mean

    want, ref, _, n = secure_mean(work, rows, round, clip=CLIP, weight_cap=CAP)
    return want, ref, n


def _final(work: Path) -> dict:
    from aggregator.state import StateStore

    with StateStore(work / "aggregator" / "state.db") as store:
        return store.load_global().tensors, store.round_info(1).metrics


def _tolerance(n: int, selected: int, weight_sum: float) -> float:
    """n inputs each rounded by at most half a step of the fixed-point grid, over the weight sum
    (itself exact to 1/weight_scale per input), plus float32 storage."""
    scale = (2**31 - 1) // int(selected * CLIP)
    return n * 0.5 / scale / weight_sum * 1.01 + 1e-6


def test_secure_round_equals_weighted_mean_of_what_devices_sent():
    run, work = _run("secagg", 10)
    try:
        assert run.aggregator_exit == 0, run.note
        assert [(r.accepted, r.rejected) for r in run.rounds] == [(10, 0)]
        rows = _sent(work)
        want, ref, n = _expected(work, rows, 1)
        assert n == 10
        got, metrics = _final(work)
        sa = metrics["secagg"]
        assert (sa["advertised"], sa["shared"], sa["survivors"], sa["dropped"]) == (10, 10, 10, 0)
        tol = _tolerance(10, 10, sa["weight_sum"])
        moved = 0.0
        for name in want:
            np.testing.assert_allclose(got[name].astype(np.float64), want[name], rtol=0, atol=tol + 1e-6 * abs(
                want[name]).max())
            moved = max(moved, float(np.abs(want[name] - ref[name]).max()))
        assert moved > 100 * tol  # the aggregate moved: the check above is not trivially met
        # the devices sent masked uint32 inputs (4 bytes a value, plus the weight), never fp16 updates
        sizes = {r["bytes"] for r in rows if not r.get("final")}
        plain = sum(a.size for a in ref.values())
        assert all(s > 4 * (plain + 1) for s in sizes)
        assert run.device_stats["errors"] == {}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_secure_round_survives_dropouts_at_every_step():
    # 12 devices, complete graph over the 11 that advertise (degree 10, threshold 7): one never
    # advertises, one advertises only, one shares its keys but never uploads, one uploads its
    # masked input and then never reveals (its input still counts): 3 gone from every
    # neighbourhood, the most a threshold of 7 of 10 survives
    parties = [f"d{i:05d}" for i in range(12)]
    drop = {parties[1]: "keys", parties[4]: "shares", parties[6]: "masked", parties[10]: "reveal"}
    run, work = _run("secagg-drop", 12, drop=drop, deadline=8, step_s=2.0)
    try:
        assert run.aggregator_exit == 0, run.note
        got, metrics = _final(work)
        sa = metrics.get("secagg")
        assert sa is not None, metrics
        assert (sa["advertised"], sa["shared"], sa["survivors"], sa["dropped"]) == (11, 10, 9, 1)
        assert (sa["degree"], sa["threshold"]) == (10, 7)
        rows = _sent(work)
        uploaded = {r["party"] for r in rows if not r.get("final") and r["round"] == 1}
        assert uploaded == set(parties) - {parties[1], parties[4], parties[6]}
        want, ref, n = _expected(work, rows, 1)
        tol = _tolerance(n, 12, sa["weight_sum"])
        for name in want:
            np.testing.assert_allclose(got[name].astype(np.float64), want[name], rtol=0,
                                       atol=tol + 1e-6 * abs(want[name]).max())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_too_many_dropouts_abandon_the_round_and_keep_the_global():
    # one more device silent before the reveal: 6 reveals for a threshold of 7
    parties = [f"d{i:05d}" for i in range(12)]
    drop = {parties[1]: "keys", parties[4]: "shares", parties[6]: "masked", parties[8]: "masked",
            parties[10]: "reveal"}
    run, work = _run("secagg-abort", 12, drop=drop, deadline=8, step_s=2.0)
    try:
        assert run.aggregator_exit == 0, run.note
        got, metrics = _final(work)
        assert metrics["secagg_abort"]["reason"] == "too_few_reveals", metrics
        assert metrics["skipped"].startswith("secure aggregation abandoned")
        rows = _sent(work)
        shas = {r["global_sha"] for r in rows if not r.get("final")}
        ref = st_load((work / "blobs" / f"{shas.pop()}.safetensors").read_bytes())
        for name, arr in ref.items():  # the global did not move
            np.testing.assert_array_equal(got[name].astype(np.float16), arr)
        assert run.device_stats["errors"].get("secagg_abort", 0) >= 1  # the devices were told
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.usefixtures("one_torch_thread")
def test_real_clients_secure_aggregation_with_distributed_dp(make_federation, tiny_llama_path, tmp_path,
                                                            monkeypatch):
    """Three EdgeClients training a real tiny Llama: secure rounds with central DP whose noise the
    clients add in shares; the global is the unweighted noisy mean over the fixed denominator,
    recomputed from what each client fed into the masking, and the status carries epsilon."""
    import edge_sdk.secure_upload as su
    from aggregator.dp import epsilon
    from aggregator.service import AggregatorService
    from aggregator.state import StateStore
    from algorithms.fedavg.server import wire_cast
    from bridge.broker import MosquittoBroker
    from tests.test_federation import SHARDS, _config, _start_clients

    if find_mosquitto() is None:
        pytest.skip("needs mosquitto (CI installs it)")
    fed_inputs: list = []
    real = su.secure_input

    def recording(*args, **kwargs):  # what each client fed into the masking (tests only)
        out = real(*args, **kwargs)
        fed_inputs.append((kwargs["noise_std"], kwargs["unweighted"], out[0].copy()))
        return out

    monkeypatch.setattr(su, "secure_input", recording)
    z, clip, delta = 0.5, 0.05, 1e-5
    paths = make_federation("sadp", list(SHARDS))
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    try:
        _, threads = _start_clients(paths, tiny_llama_path, list(SHARDS), tmp_path / "clients")
        cfg = _config(paths, tiny_llama_path, tmp_path / "agg", rounds=2,
                      dp={"mode": "central", "clip": clip, "noise_multiplier": z, "delta": delta},
                      secure_aggregation={"step_timeout_s": 20})
        status = AggregatorService(cfg, progress=None).run()
        for t in threads:
            t.join(60)
    finally:
        broker.stop()
    assert status["rounds_committed"] == 2
    assert status["last_committed"]["metrics"]["dp_epsilon"] == pytest.approx(epsilon([(1.0, z)] * 2, delta))
    assert len(fed_inputs) == 6
    assert all(std == pytest.approx(z * clip / math.sqrt(3)) and unweighted for std, unweighted, _ in fed_inputs)
    with StateStore(tmp_path / "agg" / "state.db") as store:
        for r in (1, 2):
            rs = store.load_round(r, with_partial=False)
            m = rs.info.metrics
            assert m["secagg"]["survivors"] == 3 and m["dp"]["noise"] == "distributed"
            assert m["dp"]["denominator"] == 3
            prev = store.load_round(r - 1, with_partial=False).info.global_digest
            ref = wire_cast(store.load_global(prev).tensors, "fp16")
            total = sum(v for _, _, v in fed_inputs[3 * (r - 1):3 * r])
            got = store.load_global(rs.info.global_digest).tensors
            off = 0
            for name in sorted(ref):
                size = ref[name].size
                want = ref[name].astype(np.float64) + total[off:off + size].reshape(ref[name].shape) / 3
                np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6)
                off += size
            assert off == total.size


def test_secure_aggregation_config_errors(tmp_path):
    from aggregator.config import AggregatorConfig, ConfigError

    base = dict(party_config="x", state_dir=str(tmp_path), secure_aggregation={"clip": 1.0})
    AggregatorConfig(**base)  # valid
    AggregatorConfig(**{**base, "secure_aggregation": {"step_timeout_s": 5}},
                     dp={"clip": 0.5, "noise_multiplier": 1.0})  # the clip is dp's
    for kw, match in (({"algorithm": "fedmkt"}, "collects"), ({"aggregation": "median"}, "in the clear"),
                      ({"ingest_workers": 2}, "ingest_workers"), ({"mode": "buffered"}, "synchronous"),
                      ({"secure_aggregation": {"weight_cap": 10}}, "clip"),
                      ({"secure_aggregation": {"clip": 1.0, "threshold_fraction": 0.4}}, r"\[0.5, 1\)"),
                      ({"secure_aggregation": {"clip": 1.0, "dropout_rate": 0.5}}, "dropout_rate"),
                      ({"secure_aggregation": {"clip": 1.0, "degree": 3}}, "even"),
                      ({"secure_aggregation": {"clip": 1.0, "bogus": 1}}, "unknown keys"),
                      ({"secure_aggregation": {"clip": 2.0}, "dp": {"clip": 1.0, "noise_multiplier": 1.0}},
                       "differ")):
        with pytest.raises(ConfigError, match=match):
            AggregatorConfig(**{**base, **kw})


def test_secure_dp_round_with_dropouts_ends_with_the_expected_epsilon():
    """Secure aggregation with distributed DP over the wire, devices dropping out at two steps:
    the round commits, releases with the fixed denominator, and the status carries the epsilon
    the accountant gives for it."""
    from aggregator.dp import epsilon
    from aggregator.state import StateStore

    parties = [f"d{i:05d}" for i in range(12)]
    z, clip, delta = 1.0, CLIP, 1e-5
    drop = {parties[3]: "masked", parties[9]: "reveal"}
    run, work = _run("secagg-dp", 12, drop=drop, deadline=30, step_s=2.0,
                     extra={"dp": {"mode": "central", "clip": clip, "noise_multiplier": z, "delta": delta,
                                   "expected_clients": 12}})
    try:
        assert run.aggregator_exit == 0, run.note
        with StateStore(work / "aggregator" / "state.db") as store:
            m = store.round_info(1).metrics
            status = store.status()
        assert m["secagg"]["survivors"] == 11 and m["secagg"]["dropped"] == 1, m
        assert m["dp"]["noise"] == "distributed" and m["dp"]["denominator"] == 12
        assert m["dp_epsilon"] == pytest.approx(epsilon([(1.0, z)], delta))
        assert status["last_committed"]["metrics"]["dp_epsilon"] == pytest.approx(epsilon([(1.0, z)], delta))
        assert m["secagg"]["weight_sum"] == pytest.approx(11.0, abs=1e-6)  # unweighted: one per input
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.usefixtures("one_torch_thread")
def test_fedcollm_round_under_secure_aggregation(make_federation, tiny_llama_path, tiny_llm_path, tmp_path):
    """An averaged algorithm with a server step: FedCoLLM's clients mask their adapters, the
    service unmasks the weighted mean and runs its mutual distillation on it."""
    from aggregator.service import AggregatorService
    from aggregator.state import StateStore
    from bridge.broker import MosquittoBroker
    from tests.test_federation import SHARDS, _config, _start_clients
    from tests.test_federation_llm import ALIGN, DISTILL, TRAIN
    from tests.tiny_models import TINY_CORPUS

    if find_mosquitto() is None:
        pytest.skip("needs mosquitto (CI installs it)")
    paths = make_federation("sacollm", list(SHARDS))
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    try:
        _, threads = _start_clients(paths, tiny_llama_path, list(SHARDS), tmp_path / "clients")
        cfg = _config(paths, tiny_llama_path, tmp_path / "agg", rounds=1, algorithm="fedcollm",
                      algorithm_config={"train": TRAIN, "distill": DISTILL, "align_base": ALIGN,
                                        "eval_block_size": 16, "lora": {"r": 4, "alpha": 8}},
                      models={"slm": str(tiny_llama_path), "llm": str(tiny_llm_path)}, llm={"backend": "local"},
                      public_data=TINY_CORPUS[:8], secure_aggregation={"clip": 10.0, "step_timeout_s": 20})
        status = AggregatorService(cfg, progress=None).run()
        for t in threads:
            t.join(60)
    finally:
        broker.stop()
    assert status["last_committed"]["round"] == 1
    with StateStore(tmp_path / "agg" / "state.db") as store:
        m = store.round_info(1).metrics
    assert m["secagg"]["survivors"] == 3 and m["steps"] == 2  # unmasked, then the server step ran


def test_fleet_simulate_cli_runs_secure_rounds(tmp_path, capsys):
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); CI installs it")
    from cotune.cli import main as cli_main

    out = tmp_path / "out"
    rc = cli_main(["fleet", "simulate", "--clients", "6", "--rounds", "1", "--secure", '{"step_timeout_s": 10}',
                   "--no-progress", "--deadline", "60", "--out", str(out)])
    assert rc == 0, capsys.readouterr().out
    run = json.loads((out / "fleet.json").read_text())[0]
    assert [(r["accepted"], r["rejected"]) for r in run["rounds"]] == [(6, 0)]
    assert run["update_bytes"] > 6_000  # masked uint32 inputs (7.3 KB), not the 4.4 KB fp16 updates
