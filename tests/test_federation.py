"""FedAvg-LoRA federations end to end: real Mosquitto (mTLS + ACL), real tiny transformers
models, the aggregator service and EdgeClients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from aggregator.state import StateStore
from bridge.broker import MosquittoBroker, find_mosquitto
from bridge.codec import decode, encode
from bridge.endpoint import load_endpoint
from bridge.messages import Task, Update
from edge_sdk.client import EdgeClient
from tests.tiny_models import TINY_CORPUS

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto (CI installs it)")]
ROOT = Path(__file__).resolve().parents[1]
ALGO_CONFIG = {"lora": {"r": 4, "alpha": 8}, "wire_dtype": "fp16", "eval_block_size": 32,
               "train": {"lr": 2e-3, "max_steps": 3, "batch_size": 4, "block_size": 32}}
SHARDS = {"alice": TINY_CORPUS[0::3], "bob": TINY_CORPUS[1::3][:4], "carol": TINY_CORPUS[2::3][:2]}


@pytest.fixture
def model(tiny_llama_path):
    return tiny_llama_path


@pytest.fixture
def fed(make_federation):
    paths = make_federation("fedtest", list(SHARDS), aggregator_instances=2)
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    yield paths
    broker.stop()


def _config(paths, model, state_dir, **kw) -> AggregatorConfig:
    base = dict(party_config=str(paths.party_config("aggregator")), state_dir=str(state_dir), rounds=2,
                models={"slm": str(model)}, algorithm_config=ALGO_CONFIG, min_clients=3, round_deadline_s=60,
                wait_for_clients_s=30, final_wait_s=10)
    base.update(kw)
    return AggregatorConfig(**base)


def _start_clients(paths, model, names, work) -> tuple[list[EdgeClient], list[threading.Thread]]:
    clients = [EdgeClient(paths.party_config(n), model, SHARDS[n], eval_data=TINY_CORPUS[:3], profile=None,
                          work_dir=work / n, progress=None) for n in names]
    threads = [threading.Thread(target=c.run, kwargs={"max_idle_s": 90}, daemon=True) for c in clients]
    for t in threads:
        t.start()
    return clients, threads


def _sent_update(work: Path, client: str, round: int) -> Update:
    return decode((work / client / "updates" / f"round-{round:05d}.msg").read_bytes())


def _weighted_mean(updates: list[Update]) -> dict[str, np.ndarray]:
    total = sum(u.num_examples for u in updates)
    names = updates[0].tensors.keys()
    return {n: sum(u.tensors[n].astype(np.float64) * u.num_examples for u in updates) / total for n in names}


def test_two_rounds_global_equals_hand_computed_weighted_mean(fed, model, tmp_path):
    work = tmp_path / "clients"
    clients, threads = _start_clients(fed, model, list(SHARDS), work)
    status = AggregatorService(_config(fed, model, tmp_path / "agg"), progress=None).run()
    for t in threads:
        t.join(60)
    assert status["rounds_committed"] == 2
    with StateStore(tmp_path / "agg" / "state.db") as store:
        for r in (1, 2):
            info = store.load_round(r, with_partial=False)
            assert info.accepted == sorted(SHARDS)
            expected = _weighted_mean([_sent_update(work, c, r) for c in SHARDS])
            got = store.load_global(info.info.global_digest).tensors
            assert sorted(got) == sorted(expected)
            for n in expected:  # float64 mean stored as float32
                np.testing.assert_allclose(got[n], expected[n], rtol=1e-6, atol=1e-9)
            # the round really moved the adapter (LoRA B starts at zero)
            assert any(np.abs(got[n]).max() > 0 for n in got if "lora_B" in n)
    # every client trained each round, applied the final model, and its held-out perplexity moved
    for c in clients:
        assert [h["round"] for h in c.history] == [1, 2]
        assert "ppl_final" in c.final and c.history[0]["ppl_before"] != c.history[-1]["ppl_after"]
    # the saved global adapter is standard peft: PeftModel.from_pretrained reproduces the logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = clients[0].save_global_adapter(tmp_path / "global-adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), out).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        a = reloaded(input_ids=ids).logits
        b = clients[0].ctx._peft.eval()(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dropped_client_and_quorum_close_the_round(fed, model, tmp_path):
    work = tmp_path / "clients"
    _, threads = _start_clients(fed, model, ["alice", "bob"], work)  # carol never shows up
    cfg = _config(fed, model, tmp_path / "agg", rounds=1, quorum=0.6, round_deadline_s=12, wait_for_clients_s=3)
    status = AggregatorService(cfg, progress=None).run()
    for t in threads:
        t.join(60)
    assert status["rounds_committed"] == 1
    with StateStore(tmp_path / "agg" / "state.db") as store:
        rs = store.load_round(1, with_partial=False)
        assert rs.accepted == ["alice", "bob"]
        assert rs.participants["carol"].status == "dropped"
        expected = _weighted_mean([_sent_update(work, c, 1) for c in ("alice", "bob")])
        got = store.load_global(rs.info.global_digest).tensors
        for n in expected:
            np.testing.assert_allclose(got[n], expected[n], rtol=1e-6, atol=1e-9)


def test_nan_wrong_shape_and_replayed_updates_are_rejected_with_reasons(fed, model, tmp_path):
    work = tmp_path / "clients"
    _, threads = _start_clients(fed, model, ["alice", "bob"], work)
    cfg = _config(fed, model, tmp_path / "agg", rounds=1, round_deadline_s=40, wait_for_clients_s=5)
    svc = AggregatorService(cfg, progress=None)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(svc.run()), daemon=True)
    runner.start()
    carol = load_endpoint(fed.party_config("carol")).start()
    raw_frames: list[bytes] = []
    try:
        got = carol.recv(timeout=30)
        assert isinstance(got.message, Task)
        task = got.message
        good = {k: v.copy() for k, v in _expected_shapes(carol, task).items()}
        nan = {k: v.copy() for k, v in good.items()}
        first = sorted(nan)[0]
        nan[first].flat[0] = np.nan
        wrong = dict(good)
        wrong[first] = np.zeros((3, 3), dtype=np.float16)
        for tensors in (nan, wrong):
            carol.send("aggregator", Update(round=1, algorithm="fedavg", num_examples=5, tensors=tensors), round=1)
            time.sleep(0.5)
        # a blob that arrives whole and signed but is no tensor file
        ref = carol.send_blob("aggregator", b"not a tensor file " * 4000, kind="update", round=1)
        carol.send("aggregator", Update(round=1, algorithm="fedavg", num_examples=5, blobs={"update": ref.to_json()}),
                   round=1)
        time.sleep(1.0)
        # a replay: capture a sealed frame and publish it twice through the transport
        frame = carol.sealer.seal("aggregator", "update", encode(Update(round=1, algorithm="fedavg", num_examples=5,
                                                                        tensors=good)), round=1)
        raw_frames.append(frame)
        for _ in range(2):
            carol.transport.publish(carol.topics.up("carol"), frame, wait=10)
        runner.join(90)
    finally:
        carol.close()
        for t in threads:
            t.join(60)
    with StateStore(tmp_path / "agg" / "state.db") as store:
        rejected = {(e.reason, e.client) for e in store.events(kind="rejected")}
        wire = {(e.reason, e.client) for e in store.events(kind="wire_rejected")}
        assert ("non_finite", "carol") in rejected
        assert ("shape", "carol") in rejected
        assert ("names", "carol") in rejected
        assert ("replayed", "carol") in wire
        rs = store.load_round(1, with_partial=False)
        assert rs.accepted == ["alice", "bob", "carol"]  # the good (first) copy counted once


def _expected_shapes(ep, task: Task) -> dict[str, np.ndarray]:
    """The global adapter of the task, as a correctly shaped (fp16) update."""
    from algorithms.base import unpack_state

    res = ep.fetch_blob(task.blob("global"), "aggregator", timeout=30)
    return unpack_state(res.read())


def _serve(config_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cotune", "aggregator", "serve", "--config", str(config_path)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_aggregator_killed_mid_round_resumes_with_identical_result(fed, model, tmp_path):
    work = tmp_path / "clients"
    cfg = _config(fed, model, tmp_path / "agg", rounds=1, round_deadline_s=120, wait_for_clients_s=4)
    cfg_path = tmp_path / "aggregator.json"
    cfg.save(cfg_path)
    db = tmp_path / "agg" / "state.db"
    _, threads = _start_clients(fed, model, ["alice", "bob"], work)
    proc = _serve(cfg_path)
    try:
        deadline = time.time() + 90
        accepted: list = []
        while time.time() < deadline and len(accepted) < 2:
            time.sleep(0.2)
            if db.exists():
                with StateStore(db) as store:
                    cur = store.current_round()
                    accepted = store.load_round(cur.round, with_partial=False).accepted if cur and cur.round else []
        assert accepted == ["alice", "bob"], f"aggregator never got the first updates: {proc.stderr.read() if proc.poll() is not None else ''}"
        proc.send_signal(signal.SIGKILL)  # mid-round: carol has not answered
        proc.wait(10)
        with StateStore(db) as store:
            assert store.current_round().status == "open"
        proc = _serve(cfg_path)
        carol_clients, carol_threads = _start_clients(fed, model, ["carol"], work)
        assert proc.wait(120) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        for t in threads + locals().get("carol_threads", []):
            t.join(60)
    with StateStore(db) as store:
        rs = store.load_round(1, with_partial=False)
        assert rs.accepted == ["alice", "bob", "carol"]
        assert store.current_round().status == "committed"
        expected = _weighted_mean([_sent_update(work, c, 1) for c in SHARDS])
        got = store.load_global(rs.info.global_digest).tensors
        for n in expected:
            np.testing.assert_allclose(got[n], expected[n], rtol=1e-6, atol=1e-9)
    events = [json.loads(line)["record"]["event"] for line in (tmp_path / "agg" / "events.jsonl").read_text().splitlines()]
    assert "round_resumed" in events
    assert os.path.exists(db)


def test_sigterm_is_honoured_within_two_seconds_mid_round(fed, model, tmp_path):
    """Asked to stop while a round waits for a straggler, the service leaves within 2 s and
    the round stays open for the restart (nothing acknowledged is lost: see the kill test)."""
    work = tmp_path / "clients"
    cfg = _config(fed, model, tmp_path / "agg", rounds=1, round_deadline_s=300, wait_for_clients_s=3)
    cfg_path = tmp_path / "aggregator.json"
    cfg.save(cfg_path)
    _, threads = _start_clients(fed, model, ["alice"], work)
    proc = _serve(cfg_path)
    events = tmp_path / "agg" / "events.jsonl"
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (events.exists() and '"accepted"' in events.read_text()):
            time.sleep(0.1)
        assert '"accepted"' in events.read_text(), "alice's update never arrived"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(10)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        for t in threads:
            t.join(1)
    stopped = [json.loads(line)["record"] for line in events.read_text().splitlines() if '"stopped"' in line]
    # the service itself is done within 2 s; the interpreter's own exit (torch) comes on top
    assert rc == 0 and stopped and stopped[-1]["after_s"] < 2.0 and took < 6.0, (rc, took, stopped)
    with StateStore(tmp_path / "agg" / "state.db") as store:
        assert store.current_round().status == "open"
        assert store.participant_statuses(1)["alice"] == "accepted"  # checkpointed on the way out


@pytest.mark.slow
@pytest.mark.parametrize("ledger", ["sqlite", "postgresql"])
def test_two_ingest_worker_processes_give_the_single_process_result(fed, model, tmp_path, ledger, request):
    """Scale-out ingest end to end: two worker processes take the up topics of their shards,
    fold their partials, the service merges them; the global is the hand-computed mean. With
    a PostgreSQL ledger, the set-up a multi-host deployment uses (workers reach the ledger
    over the network, checkpoints on shared storage)."""
    from aggregator.state import open_store
    from aggregator.workers import shard_of

    assert {shard_of(c, 2) for c in SHARDS} == {0, 1}, "the test needs both shards populated"
    dsn = request.getfixturevalue("postgresql_dsn") if ledger == "postgresql" else None
    work = tmp_path / "clients"
    clients, threads = _start_clients(fed, model, list(SHARDS), work)
    cfg = _config(fed, model, tmp_path / "agg", ingest_workers=2, checkpoint_interval_s=0.5, state_db=dsn)
    status = AggregatorService(cfg, progress=None).run()
    for t in threads:
        t.join(60)
    assert status["rounds_committed"] == 2
    target = dsn or tmp_path / "agg" / "state.db"
    with open_store(target, checkpoints=tmp_path / "agg" / "state.db.checkpoints") as store:
        for r in (1, 2):
            info = store.load_round(r, with_partial=False)
            assert info.accepted == sorted(SHARDS)
            parts = store.worker_partials(r)
            assert sorted(parts) == [0, 1] and all(final for _, final in parts.values())
            expected = _weighted_mean([_sent_update(work, c, r) for c in SHARDS])
            got = store.load_global(info.info.global_digest).tensors
            for n in expected:
                np.testing.assert_allclose(got[n], expected[n], rtol=1e-6, atol=1e-9)
    assert not list((tmp_path / "agg" / "wal").rglob("*.wal"))  # logs retired at commit


@pytest.mark.slow
def test_buffered_rounds_over_the_wire_apply_staleness_weighted_deltas(fed, model, tmp_path):
    """FedBuff over the real wire: K = 2 updates per version, three clients training at once;
    every committed version equals the previous one plus the staleness-weighted mean of its
    buffered deltas, each measured against the version its client trained on (by hand)."""
    from aggregator.buffered import staleness_weight
    from aggregator.service import AggregatorService as Service

    work = tmp_path / "clients"
    clients, threads = _start_clients(fed, model, list(SHARDS), work)
    cfg = _config(fed, model, tmp_path / "agg", rounds=3, mode="buffered", keep_globals=0,
                  buffered={"buffer_size": 2, "concurrency": 3, "max_staleness": 2})
    status = Service(cfg, progress=None).run()
    for t in threads:
        t.join(60)
    assert status["rounds_committed"] == 3
    fp16 = lambda a: np.asarray(a, np.float32).astype(np.float16).astype(np.float64)  # noqa: E731
    seen_stale = False
    with StateStore(tmp_path / "agg" / "state.db") as store:
        globals_ = {r: store.load_global(store.load_round(r, with_partial=False).info.global_digest).tensors
                    for r in range(0, 4)}
        for r in (1, 2, 3):
            rs = store.load_round(r, with_partial=False)
            assert len(rs.accepted) == 2 and rs.info.metrics["accepted"] == 2
            step = {n: np.zeros(a.shape, np.float64) for n, a in globals_[r - 1].items()}
            for c in rs.accepted:
                tau = rs.participants[c].metrics["staleness"]
                seen_stale |= tau > 0
                task_round = r - tau
                sent = _sent_update(work, c, task_round)
                base = globals_[task_round - 1]
                for n in step:
                    step[n] += staleness_weight(tau) * (sent.tensors[n].astype(np.float64) - fp16(base[n]))
            for n, prev in globals_[r - 1].items():
                expected = (prev.astype(np.float64) + step[n] / 2).astype(np.float32)
                np.testing.assert_allclose(globals_[r][n], expected, rtol=1e-6, atol=1e-7)
    # the third client was still training when the first buffer filled: its update arrived a
    # version late and was used with its staleness weight, not dropped
    assert seen_stale


def test_a_member_claiming_a_billion_examples_does_not_own_the_average(fed, model, tmp_path):
    """num_examples is self-reported and is the FedAvg weight: capped by max_num_examples."""
    work = tmp_path / "clients"
    _, threads = _start_clients(fed, model, ["alice", "bob"], work)
    cap = 7
    cfg = _config(fed, model, tmp_path / "agg", rounds=1, round_deadline_s=60, wait_for_clients_s=5,
                  max_num_examples=cap)
    svc = AggregatorService(cfg, progress=None)
    runner = threading.Thread(target=svc.run, daemon=True)
    runner.start()
    carol = load_endpoint(fed.party_config("carol")).start()
    try:
        got = carol.recv(timeout=30)
        assert isinstance(got.message, Task)
        mine = {k: (v.astype(np.float32) + 0.5).astype(v.dtype) for k, v in _expected_shapes(carol, got.message).items()}
        liar = Update(round=1, algorithm="fedavg", num_examples=10**9, tensors=mine)
        carol.send("aggregator", liar, round=1)
        runner.join(90)
    finally:
        carol.close()
        for t in threads:
            t.join(60)
    updates = [_sent_update(work, c, 1) for c in ("alice", "bob")] + [liar]
    weights = [min(u.num_examples, cap) for u in updates]
    expected = {n: sum(u.tensors[n].astype(np.float64) * w for u, w in zip(updates, weights, strict=True))
                / sum(weights) for n in mine}
    with StateStore(tmp_path / "agg" / "state.db") as store:
        rs = store.load_round(1, with_partial=False)
        assert rs.accepted == ["alice", "bob", "carol"]
        got = store.load_global(rs.info.global_digest).tensors
    for n in expected:
        np.testing.assert_allclose(got[n], expected[n], rtol=1e-5, atol=1e-6)
