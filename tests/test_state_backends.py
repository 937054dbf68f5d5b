"""The state store's batch API, retention and backend layer, on both ledger backends
(``state_backend``: SQLite, and a real PostgreSQL server when installed). Expected values are
written out by hand."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.aggregation import make_aggregator
from aggregator.errors import InvalidUpdate, SchemaVersionError, StateError
from aggregator.state import (
    SCHEMA_VERSION,
    AcceptRecord,
    CheckpointPruned,
    EventRecord,
    StateStore,
    open_store,
    update_digest,
)
from aggregator.validation import UpdateSpec

GLOBAL0 = {"w": np.zeros(4, np.float32)}


class Clock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def new_store(backend, clock: Clock | None = None, **kw) -> StateStore:
    store = backend.open(clock=clock or Clock(), **kw)
    store.init_federation("fed", "fedavg_lora", {}, GLOBAL0)
    return store


def fake_partial(store: StateStore, clients: list[str]) -> str:
    """A checkpoint standing in for the partial aggregate of ``clients``."""
    return store.checkpoints.put({"w": np.full(4, len(clients), np.float32)}, {"clients": clients})


def snapshot(store: StateStore, rnd: int):
    return store.load_round(rnd, with_partial=False), store.events()


# --------------------------------------------------------------------------- batch accept


def test_accept_many_marks_the_batch_and_points_at_the_partial(state_backend) -> None:
    clock = Clock()
    store = new_store(state_backend, clock)
    assert store.backend == state_backend.name == store.status()["backend"]
    store.open_round(["a", "b", "c", "d", "e"], deadline=1_010.0)
    store.reject_update(1, "b", "non_finite", "NaN in w")  # rejected may still be accepted
    clock.t = 1_002.0
    p1 = fake_partial(store, ["a", "b"])
    store.accept_many(
        1,
        [
            AcceptRecord("a", "a" * 64, 3, {"loss": 0.5}, 1_001.5),
            AcceptRecord("b", "b" * 64, np.int64(7)),  # received_at None: the batch's time
        ],
        p1,
    )
    rs = store.load_round(1)
    a, b = rs.participants["a"], rs.participants["b"]
    assert (a.status, a.reason, a.num_examples, a.update_digest, a.metrics, a.received_at) == (
        "accepted", None, 3, "a" * 64, {"loss": 0.5}, 1_001.5,
    )  # fmt: skip
    assert (b.status, b.reason, b.num_examples, b.update_digest, b.metrics, b.received_at) == (
        "accepted", None, 7, "b" * 64, {}, 1_002.0,
    )  # fmt: skip
    assert rs.info.partial_digest == p1 and rs.partial.meta["clients"] == ["a", "b"]
    assert store.participant_statuses(1) == {
        "a": "accepted", "b": "accepted", "c": "selected", "d": "selected", "e": "selected",
    }  # fmt: skip
    assert store.counts(1) == {"selected": 3, "accepted": 2, "rejected": 0, "dropped": 0}

    # no partial digest: rows accepted, the round keeps naming p1 (checkpointed later)
    clock.t = 1_020.0  # past the deadline: a batch is not re-checked against it
    store.accept_many(1, [AcceptRecord("c", "c" * 64, 1)], None)
    assert store.current_round().partial_digest == p1
    assert store.participant_statuses(1)["c"] == "accepted"
    p2 = fake_partial(store, ["a", "b", "c"])
    store.set_partial(1, p2)
    assert store.current_round().partial_digest == p2
    assert not store.checkpoints.exists(p1)  # superseded, deleted after the commit
    store.accept_many(1, [], None)  # an empty batch is a no-op
    assert store.counts(1) == {"selected": 2, "accepted": 3, "rejected": 0, "dropped": 0}
    with pytest.raises(StateError, match="no round 7"):
        store.participant_statuses(7)
    with pytest.raises(StateError, match="no round 7"):
        store.counts(7)
    store.close()


def test_accept_many_violations_change_nothing(state_backend) -> None:
    clock = Clock()
    store = new_store(state_backend, clock)
    store.open_round(["a", "b", "c", "d"], deadline=2_000.0)
    p1 = fake_partial(store, ["a"])
    store.accept_many(1, [AcceptRecord("a", "a" * 64, 1)], p1)
    state_backend.sql("UPDATE participants SET status = 'dropped' WHERE client = 'd'")
    p2 = fake_partial(store, ["a", "b"])
    before = snapshot(store, 1)

    def refused(reason: str, records, rnd: int = 1, client: str | None = "?") -> None:
        with pytest.raises(InvalidUpdate) as err:
            store.accept_many(rnd, records, p2)
        assert err.value.reason == reason
        if client != "?":
            assert err.value.client == client
        assert snapshot(store, 1) == before

    ok = AcceptRecord("b", "b" * 64, 2)
    refused("round", [ok], rnd=2, client=None)
    refused("duplicate", [ok, AcceptRecord("a", "a" * 64, 1)], client="a")  # b rolled back
    refused("duplicate", [ok, ok], client="b")
    refused("not_selected", [ok, AcceptRecord("zz", "z" * 64, 1)], client="zz")
    refused("late", [ok, AcceptRecord("d", "d" * 64, 1)], client="d")
    for bad in (0, -3, True, 2.5, "4"):
        refused("weight", [ok, AcceptRecord("c", "c" * 64, bad)], client="c")
    with pytest.raises(StateError, match="write it first"):
        store.accept_many(1, [ok], "0" * 64)
    with pytest.raises(StateError, match="AcceptRecord"):
        store.accept_many(1, [("b", "b" * 64, 2, {}, None)], p2)
    with pytest.raises(StateError, match="not the current round"):
        store.set_partial(2, p2)
    assert snapshot(store, 1) == before

    store.seal_round(1, reason="quorum")
    before = snapshot(store, 1)
    refused("late", [ok], client=None)
    store.close()


# --------------------------------------------------------------------------- batch rejections


def test_reject_many_and_record_events(state_backend) -> None:
    clock = Clock()
    store = new_store(state_backend, clock)
    store.open_round(["a", "b", "c"])
    store.accept_many(1, [AcceptRecord("a", "a" * 64, 1)], fake_partial(store, ["a"]))
    n0 = len(store.events())
    clock.t = 1_005.0
    store.reject_many(
        1,
        [
            ("a", "duplicate", "second copy"),  # accepted stays accepted
            ("b", "shape", "w is (3,)", 1_003.0),
            ("b", "non_finite", "NaN"),  # the latest rejection wins
            (None, "unknown_client", "mallory"),
        ],
    )
    rs = store.load_round(1)
    assert rs.participants["a"].status == "accepted" and rs.participants["a"].reason is None
    b = rs.participants["b"]
    assert (b.status, b.reason, b.received_at) == ("rejected", "non_finite", 1_005.0)
    assert rs.participants["c"].status == "selected"
    got = [(e.at, e.round, e.client, e.kind, e.reason, e.detail) for e in store.events()[n0:]]
    assert got == [
        (1_005.0, 1, "a", "rejected", "duplicate", "second copy"),
        (1_003.0, 1, "b", "rejected", "shape", "w is (3,)"),
        (1_005.0, 1, "b", "rejected", "non_finite", "NaN"),
        (1_005.0, 1, None, "rejected", "unknown_client", "mallory"),
    ]
    store.reject_many(None, [("c", "round", "for round 9")])  # no round: an event only
    assert store.participant_statuses(1)["c"] == "selected"
    assert store.status()["rejections"] == {
        "duplicate": 1, "non_finite": 1, "round": 1, "shape": 1, "unknown_client": 1,
    }  # fmt: skip

    n1 = len(store.events())
    with pytest.raises(StateError, match="reason"):
        store.reject_many(1, [("c", "shape", "x"), ("c", "", "no reason")])
    with pytest.raises(StateError):
        store.reject_many(1, [("c", "shape")])
    assert len(store.events()) == n1 and store.participant_statuses(1)["c"] == "selected"
    store.reject_many(1, [])

    store.record_events(
        [
            EventRecord("wire_rejected", client="x", reason="replay", detail="seq 4", at=1_001.0),
            {"kind": "reconnect", "round": 1},
        ]
    )
    store.record_event("step", round=1, detail="0.5 s")
    got = [(e.at, e.round, e.client, e.kind, e.reason, e.detail) for e in store.events()[n1:]]
    assert got == [
        (1_001.0, None, "x", "wire_rejected", "replay", "seq 4"),
        (1_005.0, 1, None, "reconnect", None, None),
        (1_005.0, 1, None, "step", None, "0.5 s"),
    ]
    with pytest.raises(StateError, match="kind"):
        store.record_events([EventRecord("")])
    store.close()


# --------------------------------------------------------------------------- scale


class StatementCounter:
    def __init__(self, store: StateStore, monkeypatch) -> None:
        self.n = 0
        db = store._db
        for name in ("execute", "executemany"):
            orig = getattr(db, name)

            def counted(*a, _orig=orig, **kw):
                self.n += 1
                return _orig(*a, **kw)

            monkeypatch.setattr(db, name, counted)


def test_ten_thousand_participants_in_batches(state_backend, monkeypatch) -> None:
    n, batch = 10_000, 256
    clock = Clock()
    store = new_store(state_backend, clock)
    clients = [f"d{i:05d}" for i in range(n)]
    t0 = time.perf_counter()
    store.open_round(clients)
    t_open = time.perf_counter() - t0
    partial = fake_partial(store, ["all"])
    accepted, rejected = clients[: n - 300], clients[n - 300 : n - 100]
    records = [AcceptRecord(c, "f" * 64, 1 + i % 5, {"loss": 0.1}) for i, c in enumerate(accepted)]
    t0 = time.perf_counter()
    for i in range(0, len(records), batch):
        store.accept_many(1, records[i : i + batch], partial)
    t_accept = time.perf_counter() - t0
    t0 = time.perf_counter()
    rej = [(c, "norm", "too large") for c in rejected]
    for i in range(0, len(rej), batch):
        store.reject_many(1, rej[i : i + batch])
    t_reject = time.perf_counter() - t0
    t0 = time.perf_counter()
    statuses = store.participant_statuses(1)
    t_statuses = time.perf_counter() - t0
    assert len(statuses) == n and statuses[accepted[-1]] == "accepted"

    counter = StatementCounter(store, monkeypatch)
    t0 = time.perf_counter()
    store.seal_round(1, reason="quorum")
    store.close_round(1, GLOBAL0 | {"w": np.ones(4, np.float32)}, {"n": n})
    t_seal_close = time.perf_counter() - t0
    assert counter.n <= 20, f"{counter.n} statements for seal + close: a per-row loop?"
    monkeypatch.undo()
    assert store.counts(1) == {"selected": 0, "accepted": 9_700, "rejected": 200, "dropped": 100}
    print(
        f"\n{state_backend.name}: open {n} {t_open:.3f}s, accept_many {len(accepted)} in batches of"
        f" {batch} {t_accept:.3f}s ({t_accept / len(accepted) * 1e4:.3f}s per 10k),"
        f" reject_many {len(rej)} {t_reject:.3f}s, participant_statuses {t_statuses:.3f}s,"
        f" seal+close {t_seal_close:.3f}s"
    )
    bound = 5.0 if state_backend.name == "sqlite" else 30.0  # generous: a shared, busy machine
    assert t_accept / len(accepted) * 1e4 < bound
    store.close()


def test_writers_are_serialized(state_backend) -> None:
    """A second store (another process or host) waits for the first one's write transaction."""
    store = new_store(state_backend)
    done = threading.Event()

    def other_writer() -> None:
        with state_backend.open() as other:
            other.record_event("from_other")
        done.set()

    with store._tx() as db:
        db.execute(
            "INSERT INTO events (at, round, client, kind, reason, detail)"
            " VALUES (1, NULL, NULL, 'first', NULL, NULL)"
        )
        thread = threading.Thread(target=other_writer)
        thread.start()
        assert not done.wait(0.5)  # blocked by the open write transaction
    thread.join(30)
    assert done.is_set()
    assert [e.kind for e in store.events()][-2:] == ["first", "from_other"]
    store.close()


# --------------------------------------------------------------------------- retention


def run_round(store: StateStore, rnd: int, agg_clients: int = 3, probe=lambda: None) -> str:
    """One round through accept_update (a partial per update) and accept_many + set_partial;
    ``probe`` runs after every ledger write."""
    clients = [f"c{i}" for i in range(agg_clients + 1)]
    store.open_round(clients)
    agg = make_aggregator("fedavg")
    agg.begin(UpdateSpec.from_state(store.load_global(store.current_round().base_digest).tensors))
    for i, c in enumerate(clients[:agg_clients]):
        u = {"w": np.full(4, rnd + i, np.float32)}
        agg.add(c, u, weight=1)
        store.accept_update(rnd, c, agg.state_dict(), update_digest(u), 1)
        probe()
    last = clients[-1]
    u = {"w": np.full(4, -rnd, np.float32)}
    agg.add(last, u, weight=1)
    state = agg.state_dict()
    store.accept_many(rnd, [AcceptRecord(last, update_digest(u), 1)], None)
    probe()
    store.set_partial(rnd, store.checkpoints.put(state.tensors, state.meta))
    probe()
    digest = store.close_round(rnd, agg.result(), {"round": rnd})
    probe()
    return digest


def test_retention_keeps_disk_bounded_over_many_rounds(state_backend) -> None:
    store = new_store(state_backend, keep_globals=3)
    g0 = store.load_global().digest
    globals_ = [g0]
    seen = []

    def probe() -> None:
        seen.append(store.checkpoints.usage()["files"])

    for rnd in range(1, 31):
        globals_.append(run_round(store, rnd, probe=probe))
    files = set(store.checkpoints.digests())
    print(f"\n{state_backend.name}: 30 rounds, keep_globals=3: at most {max(seen)} files")
    assert max(seen) <= 5 and seen[-1] == 3
    assert files == set(globals_[-3:])
    status = store.status()["retention"]
    assert status == {
        "keep_globals": 3,
        "pruned_globals": 28,  # rounds 0..27
        "pruned_partials": 30,
        "oldest_global_round": 28,
    }
    assert store.garbage_collect(min_age_s=0) == []
    for digest in globals_[-3:]:
        assert store.load_global(digest).digest == digest
    with pytest.raises(CheckpointPruned, match="committed by round 0 was pruned") as err:
        store.load_global(g0)
    assert err.value.code == "checkpoint_pruned" and isinstance(err.value, StateError)
    partial5 = store.load_round(5).info.partial_digest
    with pytest.raises(CheckpointPruned, match="partial aggregate of round 5"):
        store.load_global(partial5)
    np.testing.assert_array_equal(
        store.load_global().tensors["w"], store.load_global(globals_[-1]).tensors["w"]
    )
    store.close()


def test_prune_explicit_repair_and_recommitted_content(state_backend) -> None:
    store = new_store(state_backend)  # no automatic retention
    globals_ = [store.load_global().digest] + [run_round(store, r) for r in range(1, 6)]
    assert set(store.checkpoints.digests()) == set(globals_)  # partials go at commit anyway
    with pytest.raises(StateError, match="keep_globals"):
        store.prune(0)
    pruned = store.prune(2)
    assert set(pruned) == set(globals_[:4]) and set(store.checkpoints.digests()) == set(
        globals_[4:]
    )
    assert store.prune(2) == []  # idempotent

    # a crash between the ledger's record and the deletion leaves the file: collected later
    store.checkpoints.put(GLOBAL0)  # the same bytes as round 0's global again
    assert store.checkpoints.exists(globals_[0])
    assert store.garbage_collect(min_age_s=0) == [globals_[0]]

    # a new round that commits a pruned content again makes it live again
    store.open_round(["x"])
    digest = store.close_round(6, GLOBAL0)
    assert digest == globals_[0]
    assert store.load_global(digest).digest == digest
    assert store.garbage_collect(min_age_s=0) == []
    assert store.status()["retention"]["pruned_globals"] == 3
    with pytest.raises(StateError, match="keep_globals"):
        state_backend.open(keep_globals=0)
    store.close()


def test_spilled_updates_go_with_the_committed_partial(state_backend, tmp_path: Path) -> None:
    spill_dir = tmp_path / "spill"
    store = new_store(state_backend, spill=spill_dir)
    store.open_round(["a", "b", "c"])
    agg = make_aggregator("median", spill_dir=spill_dir)
    agg.begin(UpdateSpec.from_state(GLOBAL0))
    for i, c in enumerate(["a", "b", "c"]):
        u = {"w": np.full(4, i, np.float32)}
        agg.add(c, u, weight=1)
        store.accept_update(1, c, agg.state_dict(), update_digest(u), 1)
    partial = store.current_round().partial_digest
    assert len(store.spill.digests()) == 3 and len(store.checkpoints.digests()) == 2
    store.close_round(1, agg.result())
    assert store.spill.digests() == [] and not store.checkpoints.exists(partial)
    with pytest.raises(CheckpointPruned):
        store.load_global(partial)
    store.close()


# --------------------------------------------------------------------------- backends


def test_schema_version_1_is_migrated(state_backend) -> None:
    new_store(state_backend).close()
    state_backend.sql("DROP TABLE pruned")
    state_backend.sql("DROP TABLE worker_partials")
    state_backend.sql("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    store = state_backend.open()
    assert store.status()["schema_version"] == SCHEMA_VERSION == 3
    assert [e.detail for e in store.events(kind="schema_migrated")] == ["1 -> 3"]
    assert store.prune(1) == [] and store.status()["retention"]["pruned_globals"] == 0
    assert store.worker_partials(1) == {}
    store.close()
    state_backend.sql("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    with pytest.raises(SchemaVersionError, match="schema version 4"):
        state_backend.open()


def test_postgres_target_errors_need_no_server(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(StateError, match="checkpoints="):
        open_store("postgresql://cotune@/nowhere")
    with pytest.raises(StateError) as err:
        open_store(
            f"postgresql://cotune:s3cret@/nowhere?host={tmp_path}&connect_timeout=2",
            checkpoints=tmp_path / "ckpt",
        )
    assert "cannot open state database" in str(err.value) and "s3cret" not in str(err.value)


def test_sqlite_default_checkpoint_dir_and_path(tmp_path: Path) -> None:
    with open_store(tmp_path / "s.db") as store:
        assert store.backend == "sqlite" and store.path == tmp_path / "s.db"
        assert store.checkpoints.dir == tmp_path / "s.db.checkpoints"
        assert store.status()["database"] == str(tmp_path / "s.db")
