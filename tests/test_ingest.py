"""The fleet-scale ingest: the write-ahead log (framing, torn tails, segments), the round's
in-memory index, group commit + checkpoints against the real ledger, and kill -9 at random
instants (no acknowledged update lost, none counted twice)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.aggregation import aggregator_from_state, make_aggregator
from aggregator.errors import InvalidUpdate
from aggregator.ingest import IngestSettings, RoundBook, RoundIngest
from aggregator.ingest_log import IngestLog, LogRecord
from aggregator.state import StateStore
from aggregator.validation import UpdateSpec, ValidatedUpdate

REPO = Path(__file__).resolve().parents[1]
GLOBAL0 = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}


def client_update(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + i)
    return {"a": rng.standard_normal((3, 4)).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float32)}


def _record(i: int, round: int = 1) -> LogRecord:
    return LogRecord(round, f"c{i:03d}", float(i + 1), i + 1, f"{i:064x}", 1000.0 + i, {"i": i}, client_update(i))


# --------------------------------------------------------------------------- the log itself


def test_log_round_trip_and_segments(tmp_path: Path) -> None:
    log = IngestLog(tmp_path, 1)
    for i in range(3):
        log.append(_record(i))
    assert log.unsynced == 3
    assert [r.client for r in log.sync()] == ["c000", "c001", "c002"]
    assert log.sync() == []  # nothing new: no fsync, nothing returned
    seq = log.rotate()
    log.append(_record(3))
    log.close()
    got = list(IngestLog.replay(tmp_path, 1))
    assert [r.client for r in got] == ["c000", "c001", "c002", "c003"]
    for r in got:
        i = int(r.client[1:])
        assert (r.weight, r.num_examples, r.metrics) == (i + 1, i + 1, {"i": i})
        for n, arr in client_update(i).items():
            np.testing.assert_array_equal(r.tensors[n], arr)
    assert list(IngestLog.replay(tmp_path, 2)) == []  # another round's log is separate
    freed = IngestLog(tmp_path, 1).drop_before(seq)
    assert freed > 0
    assert [r.client for r in IngestLog.replay(tmp_path, 1)] == ["c003"]
    assert IngestLog.discard_round(tmp_path, 1) > 0
    assert list(IngestLog.replay(tmp_path, 1)) == []


@pytest.mark.parametrize("damage", ["torn", "flipped", "garbage"])
def test_a_damaged_tail_is_cut_off_and_the_rest_survives(tmp_path: Path, damage: str) -> None:
    log = IngestLog(tmp_path, 4)
    for i in range(4):
        log.append(_record(i, 4))
    log.close()
    path = next(tmp_path.glob("round-000004-*.wal"))
    data = path.read_bytes()
    one = len(_record(3, 4).encode())
    if damage == "torn":  # a crash inside the last write
        path.write_bytes(data[: len(data) - one // 2])
    elif damage == "flipped":  # a bit flipped inside the last record
        b = bytearray(data)
        b[len(data) - one // 3] ^= 0x40
        path.write_bytes(bytes(b))
    else:
        path.write_bytes(data + b"\x00garbage that is not a record")
    kept = [r.client for r in IngestLog.replay(tmp_path, 4)]
    assert kept == (["c000", "c001", "c002", "c003"] if damage == "garbage" else ["c000", "c001", "c002"])
    # the damaged bytes were truncated, so the log can be appended to again
    assert path.stat().st_size == (len(data) if damage == "garbage" else len(data) - one)
    log = IngestLog(tmp_path, 4)
    log.append(_record(9, 4))
    log.close()
    assert [r.client for r in IngestLog.replay(tmp_path, 4)][-1] == "c009"


def test_round_book_is_an_index_with_the_ledger_rules() -> None:
    book = RoundBook(3, {"a": "selected", "b": "accepted", "c": "rejected", "d": "dropped"})
    assert (book.n_selected, book.pending_count, book.accepted) == (4, 3, ["b"])
    with pytest.raises(InvalidUpdate) as e:
        book.check("zz")
    assert e.value.reason == "not_selected"
    with pytest.raises(InvalidUpdate) as e:
        book.check("b")
    assert e.value.reason == "duplicate"
    with pytest.raises(InvalidUpdate) as e:
        book.check("d")
    assert e.value.reason == "late"
    book.check("c")  # a rejected client may send a corrected update
    book.accept("a")
    assert book.pending_count == 2  # (a dropped participant exists only after the seal)
    assert book.pending() == ["c"]


# --------------------------------------------------------------------------- against the ledger


def _new_round(tmp_path: Path, clients: list[str]) -> StateStore:
    store = StateStore(tmp_path / "state.db")
    store.init_federation("fed", "fedavg", {}, GLOBAL0)
    store.open_round(clients)
    return store


def _ingest(store: StateStore, tmp_path: Path, **kw) -> RoundIngest:
    info = store.current_round()
    partial = store.checkpoints.get(info.partial_digest) if info.partial_digest else None
    if partial is None:
        agg = make_aggregator("fedavg")
        agg.begin(UpdateSpec.from_state(GLOBAL0))
    else:
        agg = aggregator_from_state(partial)
    return RoundIngest.open(store, info.round, agg, tmp_path / "wal", IngestSettings(**kw))


def _accept(ing: RoundIngest, i: int) -> None:
    u = client_update(i)
    ing.accept(f"c{i:03d}", ValidatedUpdate(u, 0.0, False), weight=float(i + 1), num_examples=i + 1,
               update_digest=f"{i:064x}", metrics={"i": i})


def _expected(clients: list[str]) -> dict[str, np.ndarray]:
    w = [int(c[1:]) + 1 for c in clients]
    return {n: sum(client_update(int(c[1:]))[n].astype(np.float64) * wi for c, wi in zip(clients, w, strict=True)) / sum(w)
            for n in GLOBAL0}


def test_group_commit_checkpoints_in_batches_and_restart_replays_the_log(tmp_path: Path) -> None:
    clients = [f"c{i:03d}" for i in range(10)]
    store = _new_round(tmp_path, clients)
    ing = _ingest(store, tmp_path, checkpoint_every=4, checkpoint_interval_s=3600)
    for i in range(6):
        _accept(ing, i)
    assert store.participant_statuses(1)["c000"] == "selected"  # nothing durable yet
    assert [r.client for r in ing.sync()] == clients[:6]
    assert ing.checkpoint_due()
    digest = ing.checkpoint()
    statuses = store.participant_statuses(1)
    assert [c for c in clients if statuses[c] == "accepted"] == clients[:6]
    assert store.current_round().partial_digest == digest
    for i in range(6, 8):
        _accept(ing, i)
    ing.sync()  # durable in the log, not in a checkpoint: a crash now must keep them
    with pytest.raises(InvalidUpdate) as e:
        _accept(ing, 3)
    assert e.value.reason == "duplicate"
    store.close()  # "crash": the ingest object is dropped without a checkpoint

    store = StateStore(tmp_path / "state.db")
    ing = _ingest(store, tmp_path, checkpoint_every=4, checkpoint_interval_s=3600)
    assert ing.replayed == 2
    assert sorted(ing.book.accepted) == clients[:8]
    assert [c for c, s in store.participant_statuses(1).items() if s == "accepted"] == clients[:8]
    got = ing.agg.result(cast=False)
    for n, arr in _expected(clients[:8]).items():
        np.testing.assert_allclose(got[n], arr, rtol=1e-12)
    ing.discard()
    assert not list((tmp_path / "wal").glob("*.wal"))
    store.close()


def test_the_blob_as_received_is_logged_and_replayed_as_the_update(tmp_path: Path) -> None:
    """The wire path logs the received safetensors bytes (with the sender's own metadata
    header) and their verified SHA-256 instead of serialising the update again: a restart
    folds exactly those tensors, and the digest in the ledger is the blob's."""
    import hashlib

    import safetensors.numpy as stn

    from aggregator.update_intake import _as_parsed

    clients = ["c000", "c001"]
    store = _new_round(tmp_path, clients)
    ing = _ingest(store, tmp_path, checkpoint_every=100, checkpoint_interval_s=3600)
    raw = stn.save(client_update(0), metadata={"sender": "whatever it likes"})
    parsed = stn.load(raw)
    checked = ValidatedUpdate(parsed, 1.0, False)
    assert _as_parsed(checked, parsed)
    digest = hashlib.sha256(raw).hexdigest()
    assert ing.accept("c000", checked, weight=1.0, num_examples=1, update_digest=digest, metrics={},
                      tensor_bytes=raw) == digest
    ing.sync()
    store.close()  # crash before any checkpoint: only the log holds it
    assert [r.update_digest for r in IngestLog.replay(tmp_path / "wal", 1)] == [digest]

    store = StateStore(tmp_path / "state.db")
    ing = _ingest(store, tmp_path, checkpoint_every=100, checkpoint_interval_s=3600)
    assert ing.replayed == 1
    got = ing.agg.result(cast=False)
    for n, arr in client_update(0).items():
        np.testing.assert_array_equal(got[n], arr.astype(np.float64))
    ing.discard()
    store.close()
    # anything validation changed is serialised again: the log must hold what was folded
    assert not _as_parsed(ValidatedUpdate(parsed, 1.0, True), parsed)  # clipped
    f16 = {n: a.astype(np.float16) for n, a in parsed.items()}
    assert not _as_parsed(ValidatedUpdate(f16, 1.0, False), parsed)  # another dtype
    assert not _as_parsed(ValidatedUpdate({"a": parsed["a"]}, 1.0, False), parsed)


CHILD = f"""
import sys, random, time
sys.path.insert(0, {str(REPO)!r})
from tests.test_ingest import _ingest, _accept
from aggregator.state import StateStore
from pathlib import Path
tmp, n, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
store = StateStore(tmp / "state.db")
ing = _ingest(store, tmp, checkpoint_every=5, checkpoint_interval_s=3600)
print("ready", flush=True)
for i in range(n):
    if ing.book.status[f"c{{i:03d}}"] == "accepted":
        continue
    _accept(ing, i)
    time.sleep(0.003)  # a round takes longer than the kill window, whatever the machine's load
    if rng.random() < 0.4:
        for rec in ing.sync():
            sys.stdout.write(f"acked {{rec.client}}\\n")
        sys.stdout.flush()
    if ing.checkpoint_due():
        ing.checkpoint()
for rec in ing.sync():
    sys.stdout.write(f"acked {{rec.client}}\\n")
ing.close()
print("done", flush=True)
"""


def test_kill_at_random_instants_loses_no_acknowledged_update_and_counts_none_twice(tmp_path: Path) -> None:
    n = 40
    clients = [f"c{i:03d}" for i in range(n)]
    _new_round(tmp_path, clients).close()
    rng = np.random.default_rng(7)
    acked: set[str] = set()
    kills = 0
    for attempt in range(12):
        errfile = tmp_path / f"stderr-{attempt}"
        with open(errfile, "w") as errs:  # one pipe only: communicate() then reads what readline buffered
            child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(n), str(attempt)],
                                     stdout=subprocess.PIPE, stderr=errs, text=True)
        assert child.stdout.readline() == "ready\n", errfile.read_text()
        if attempt < 8:
            time.sleep(float(rng.uniform(0.0, 0.08)))
            child.send_signal(signal.SIGKILL)
        out = child.stdout.read()  # (communicate() with a timeout would skip what readline buffered)
        child.wait(60)
        err = errfile.read_text()
        acked.update(ln.split()[1] for ln in out.splitlines(keepends=True)
                     if ln.startswith("acked c") and ln.endswith("\n"))
        finished = out.endswith("done\n")  # (a kill may land after the last line: still finished)
        kills += child.returncode == -signal.SIGKILL and not finished
        assert finished or child.returncode == -signal.SIGKILL, (out[-80:], err)
        if finished:
            break
    assert finished, err
    assert kills >= 1
    store = StateStore(tmp_path / "state.db")
    ing = _ingest(store, tmp_path)
    assert ing.replayed == 0  # the clean finish checkpointed everything
    accepted = [c for c, s in store.participant_statuses(1).items() if s == "accepted"]
    assert acked <= set(accepted), "an acknowledged update was lost"
    assert sorted(accepted) == clients
    listed = list(ing.agg.clients)
    assert sorted(listed) == clients and len(set(listed)) == len(listed)  # nobody twice
    got = ing.agg.result(cast=False)
    for name, arr in _expected(listed).items():
        np.testing.assert_allclose(got[name], arr, rtol=1e-12)
    store.close()


def test_per_update_cost_does_not_grow_with_the_round_size(tmp_path: Path) -> None:
    """Accepting into a round of 10,000 costs about what it costs in a round of 100."""
    per_update = {}
    for n in (100, 10_000):
        d = tmp_path / str(n)
        store = _new_round(d, [f"c{i:05d}" for i in range(n)])
        ing = _ingest(store, d, checkpoint_every=256, checkpoint_interval_s=3600, fsync=False)
        u = ValidatedUpdate(client_update(0), 0.0, False)
        t0 = time.perf_counter()
        for i in range(100):
            ing.accept(f"c{i:05d}", u, weight=1.0, num_examples=1, update_digest="0" * 64, metrics={})
        ing.sync()
        ing.checkpoint()
        per_update[n] = (time.perf_counter() - t0) / 100
        store.close()
    print("seconds per update", per_update)
    assert per_update[10_000] < 3 * per_update[100] + 2e-4


@pytest.mark.parametrize("rule", ["fedavg", "median"])
def test_partials_of_two_workers_merge_into_the_single_process_aggregate(tmp_path: Path, rule: str) -> None:
    spec = UpdateSpec.from_state(GLOBAL0)
    kw = {} if rule == "fedavg" else {"spill_dir": str(tmp_path / "spill")}
    parts = []
    for shard in (range(0, 7), range(7, 12)):
        agg = make_aggregator(rule, **kw)
        agg.begin(spec)
        for i in shard:
            agg.add(f"c{i:03d}", client_update(i), weight=i + 1)
        parts.append(agg.state_dict())
    merged = make_aggregator(rule, **kw)
    merged.begin(spec)
    for p in parts:
        merged.merge(p)
    single = make_aggregator(rule, **kw)
    single.begin(spec)
    for i in range(12):
        single.add(f"c{i:03d}", client_update(i), weight=i + 1)
    assert merged.count == 12
    for n, arr in single.result(cast=False).items():
        np.testing.assert_allclose(merged.result(cast=False)[n], arr, rtol=1e-12)
    if rule == "fedavg":
        np.testing.assert_allclose(merged.result(cast=False)["b"], _expected([f"c{i:03d}" for i in range(12)])["b"],
                                   rtol=1e-12)
    with pytest.raises(Exception, match="overlap"):
        merged.merge(parts[0])  # the same clients twice is refused, and nothing changed
    assert merged.count == 12
