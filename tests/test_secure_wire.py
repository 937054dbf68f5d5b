"""Secure aggregation over the real wire: virtual devices (own identities, mTLS, envelopes)
against a real Mosquitto and the real aggregator service run SecAgg+ rounds; the committed
global equals the weighted mean of what the surviving devices sent, within the fixed-point
error, with devices dropping out at every step."""

from __future__ import annotations

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
