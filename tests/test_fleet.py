"""`cotune fleet simulate`: a small fleet of virtual devices against a real Mosquitto (mTLS +
ACL) and the real aggregator service (a separate process) completes its rounds with every
update accepted, and the aggregate is the weighted mean of what the devices sent."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from bridge.broker import find_mosquitto

pytestmark = pytest.mark.mosquitto  # about 10 s

CLIENTS, ROUNDS = 20, 2


@pytest.fixture(scope="module")
def fleet_run():
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); CI installs it")
    from cotune.fleet import FleetOptions, run_fleet

    work = Path(tempfile.mkdtemp(prefix="cotune-test-fleet-", dir="/tmp"))
    os.chmod(work, 0o755)
    try:
        run = run_fleet(FleetOptions(clients=CLIENTS, rounds=ROUNDS, size="tiny", work_dir=str(work),
                                     progress=False, round_deadline_s=120, keep_blobs=True))
        yield run, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _sent(work: Path) -> list[dict]:
    rows = []
    for path in sorted(work.glob("sent-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def _expected(rows: list[dict], spec: dict, round: int) -> dict[str, np.ndarray]:
    """The weighted (num_examples) mean, in float64, of the updates sent in ``round``."""
    from cotune.fleet import fake_update, num_examples_for

    total = {n: np.zeros(s, np.float64) for n, (s, _) in spec.items()}
    weight = 0.0
    for r in rows:
        if r.get("final") or r["round"] != round:
            continue
        n = num_examples_for(r["party"], round)
        assert n == r["num_examples"] > 0
        upd = fake_update(spec, r["party"], round)
        for name, arr in upd.items():
            total[name] += n * arr.astype(np.float64)
        weight += n
    return {name: t / weight for name, t in total.items()}


def test_every_update_accepted(fleet_run):
    run, work = fleet_run
    assert run.aggregator_exit == 0, run.note
    assert [r.round for r in run.rounds] == list(range(1, ROUNDS + 1))
    for row in run.rounds:
        assert (row.accepted, row.rejected) == (CLIENTS, 0)
        assert row.seconds > 0 and row.agg_cpu_s > 0 and row.rss_mb > 0 and row.disk_mb > 0
    assert run.ok
    s = run.device_stats
    assert s["updates_sent"] == CLIENTS * ROUNDS and s["inline"] == CLIENTS * ROUNDS
    assert s["errors"] == {} and s["rejected"] == {}
    assert s["finals"] == CLIENTS  # every device fetched the final model and reported back
    assert 3_000 < run.update_bytes < 6_000  # the "tiny" preset: about 4.4 KB


def test_aggregate_is_weighted_mean_of_what_devices_sent(fleet_run):
    run, work = fleet_run
    rows = _sent(work)
    blobs = work / "blobs"
    # round 2's task carried round 1's aggregate (fp16 on the wire)
    r2 = {r["global_sha"] for r in rows if r["round"] == 2 and not r.get("final")}
    assert len(r2) == 1
    sent_global = st_load((blobs / f"{r2.pop()}.safetensors").read_bytes())
    spec = {n: (a.shape, a.dtype.name) for n, a in sent_global.items()}
    want1 = _expected(rows, spec, 1)
    for name, arr in sent_global.items():
        np.testing.assert_array_equal(arr, want1[name].astype(np.float32).astype(np.float16))
    # the committed global after the last round, in float32 (the aggregator's state store)
    from aggregator.state import StateStore

    with StateStore(work / "aggregator" / "state.db") as store:
        final = store.load_global().tensors
    want2 = _expected(rows, spec, ROUNDS)
    assert set(final) == set(want2)
    for name, arr in final.items():
        np.testing.assert_allclose(arr, want2[name].astype(np.float32), rtol=1e-6, atol=1e-9)
    # and the final model the devices received is the same state, in fp16
    fin = {r["global_sha"]["global"] for r in rows if r.get("final")}
    assert len(fin) == 1
    got = st_load((blobs / f"{fin.pop()}.safetensors").read_bytes())
    for name, arr in got.items():
        np.testing.assert_array_equal(arr, final[name].astype(np.float16))
