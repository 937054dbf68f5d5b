"""The state store: round life cycle, checkpoints, schema versioning, and the crash contract
tested for real (a child process accepting updates is SIGKILLed at random instants), on both
ledger backends (``state_backend``: SQLite, and a real PostgreSQL server when installed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.aggregation import WeightedMean, aggregator_from_state, make_aggregator
from aggregator.errors import CheckpointCorrupt, InvalidUpdate, SchemaVersionError, StateError
from aggregator.state import CheckpointStore, StateStore, update_digest
from aggregator.validation import UpdateSpec

REPO = Path(__file__).resolve().parents[1]
GLOBAL0 = {"lora_A": np.zeros((8, 4), np.float32), "lora_B": np.zeros(16, np.float16)}

# Shared by the test and the child process (exec'd in both), so both know every update.
UPDATE_SRC = """
def client_update(i):
    rng = np.random.default_rng(1000 + i)
    return {"lora_A": rng.standard_normal((8, 4)).astype(np.float32),
            "lora_B": rng.standard_normal(16).astype(np.float16)}
"""
_ns: dict = {"np": np}
exec(UPDATE_SRC, _ns)
client_update = _ns["client_update"]


class Clock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def new_store(backend, clock: Clock | None = None) -> StateStore:
    store = backend.open(clock=clock or Clock())
    if store.federation() is None:
        store.init_federation("fed-test", "fedavg_lora", {"rounds": 3}, GLOBAL0)
    return store


def accept(store: StateStore, agg: WeightedMean, rnd: int, i: int) -> str:
    client = f"c{i:03d}"
    u = client_update(i)
    agg.add(client, u, weight=i + 1)
    return store.accept_update(
        rnd, client, agg.state_dict(), update_digest(u), i + 1, {"loss": 0.5}
    )


# --------------------------------------------------------------------------- life cycle


def test_round_life_cycle_and_reopen(state_backend) -> None:
    clock = Clock()
    store = new_store(state_backend, clock)
    assert store.current_round().round == 0 and store.current_round().status == "committed"
    np.testing.assert_array_equal(store.load_global().tensors["lora_A"], GLOBAL0["lora_A"])

    info = store.open_round(["c000", "c001", "c002", "c003"], deadline=clock.t + 60)
    assert (info.round, info.status, info.base_digest) == (
        1,
        "open",
        store.current_round().base_digest,
    )
    with pytest.raises(StateError, match="still open"):
        store.open_round(["c000"])

    agg = WeightedMean()
    agg.begin(UpdateSpec.from_state(store.load_global().tensors))
    accept(store, agg, 1, 0)
    accept(store, agg, 1, 1)
    store.reject_update(1, "c002", "non_finite", "tensor 'lora_A' contains NaN")
    store.reject_update(1, "c001", "duplicate", "second copy")  # accepted stays accepted
    store.reject_update(None, "mallory", "unknown_client")

    rs = store.load_round(1)
    assert rs.accepted == ["c000", "c001"]
    assert rs.clients("rejected") == ["c002"] and rs.participants["c002"].reason == "non_finite"
    assert rs.participants["c001"].num_examples == 2
    assert rs.participants["c001"].update_digest == update_digest(client_update(1))
    assert rs.partial.meta["clients"] == ["c000", "c001"]

    status = store.status()
    assert (
        status["round"]["accepted"],
        status["round"]["rejected"],
        status["round"]["pending"],
    ) == (2, 1, 1)
    assert status["rejections"] == {"duplicate": 1, "non_finite": 1, "unknown_client": 1}

    sealed = store.seal_round(1, reason="quorum")
    assert sealed.status == "closed"
    with pytest.raises(InvalidUpdate) as err:
        store.accept_update(1, "c003", agg.state_dict(), "0" * 64, 1)
    assert err.value.reason == "late"
    new_global = agg.result()
    digest = store.close_round(1, new_global, {"loss": 0.25, "bad": float("nan")})
    rs = store.load_round(1)
    assert rs.info.status == "committed" and rs.info.global_digest == digest
    assert rs.info.metrics == {"bad": None, "loss": 0.25}  # NaN stored as JSON null
    assert (
        rs.participants["c003"].status == "dropped" and rs.participants["c003"].reason == "quorum"
    )
    assert rs.participants["c002"].status == "rejected"
    before = (store.status(), store.load_round(1), store.events())
    store.close()

    reopened = state_backend.open(clock=clock)
    assert (reopened.status(), reopened.load_round(1), reopened.events()) == before
    for n, arr in reopened.load_global().tensors.items():
        np.testing.assert_array_equal(arr, new_global[n])
    assert reopened.open_round(["c000"]).base_digest == digest
    reopened.close()


def test_accept_refusals_change_nothing(state_backend) -> None:
    clock = Clock()
    store = new_store(state_backend, clock)
    store.open_round(["c000", "c001"], deadline=clock.t + 10)
    agg = WeightedMean()
    agg.begin(UpdateSpec.from_state(GLOBAL0))
    accept(store, agg, 1, 0)
    snapshot = store.load_round(1).info

    def refused(reason: str, **kw) -> None:
        args = {
            "round": 1,
            "client": "c001",
            "partial": agg.state_dict(),
            "update_digest": "0" * 64,
        }
        args.update(num_examples=3)
        args.update(kw)
        with pytest.raises(InvalidUpdate) as err:
            store.accept_update(**args)
        assert err.value.reason == reason

    refused("round", round=2)
    refused("not_selected", client="zz")
    refused("duplicate", client="c000")
    refused("weight", num_examples=0)
    with pytest.raises(StateError, match="diverged"):
        store.accept_update(1, "c001", agg.state_dict(), "0" * 64, 3)  # c01 not in the partial
    clock.t += 11
    refused("late")
    assert store.load_round(1).info == snapshot
    store.close()


def test_failed_transaction_leaves_old_partial_and_orphan_is_collected(
    state_backend, monkeypatch
) -> None:
    store = new_store(state_backend)
    store.open_round(["c000", "c001"])
    agg = WeightedMean()
    agg.begin(UpdateSpec.from_state(GLOBAL0))
    first = accept(store, agg, 1, 0)

    def crash(*args, **kw):
        raise RuntimeError("power cut between file and transaction")

    monkeypatch.setattr(store, "_commit_accept", crash)
    with pytest.raises(RuntimeError):
        accept(store, agg, 1, 1)
    monkeypatch.undo()
    rs = store.load_round(1)
    assert rs.accepted == ["c000"] and rs.info.partial_digest == first
    assert len(store.checkpoints.digests()) == 3  # global, first partial, orphan
    assert store.garbage_collect() == []  # the grace period protects fresh files
    removed = store.garbage_collect(min_age_s=0)
    assert len(removed) == 1 and first not in removed
    assert store.load_round(1).partial.meta["clients"] == ["c000"]

    store.close_round(1, agg.result())
    store.garbage_collect(min_age_s=0)  # the committed round's partial goes, globals stay
    assert set(store.checkpoints.digests()) == {
        store.load_round(0).info.global_digest,
        store.load_round(1).info.global_digest,
    }
    store.close()


def test_schema_version_mismatch(state_backend) -> None:
    new_store(state_backend).close()
    state_backend.sql("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(SchemaVersionError, match="999"):
        state_backend.open()
    state_backend.sql("DELETE FROM meta")
    with pytest.raises(SchemaVersionError, match="None"):
        state_backend.open()


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(StateError):
        StateStore(tmp_path / "junk.db")


def test_checkpoint_store_is_content_addressed_and_verified(tmp_path: Path) -> None:
    cs = CheckpointStore(tmp_path)
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensors = {"t": base.T, "s": np.array(2.5)}  # non-contiguous and 0-d on purpose
    d1 = cs.put(tensors, {"kind": "global"})
    assert cs.put({"s": np.array(2.5), "t": np.ascontiguousarray(base.T)}, {"kind": "global"}) == d1
    got = cs.get(d1)
    np.testing.assert_array_equal(got.tensors["t"], base.T)
    assert got.tensors["s"].shape == () and got.meta == {"kind": "global"} and got.digest == d1
    np.testing.assert_array_equal(cs.read_tensor(d1, "t"), base.T)
    assert not list(tmp_path.glob(".tmp-*"))

    path = cs.path(d1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt):
        cs.get(d1)
    with pytest.raises(StateError, match="missing"):
        cs.get("0" * 64)
    with pytest.raises(StateError):
        cs.path("../../etc/passwd")


# --------------------------------------------------------------------------- crash contract

CHILD = (
    """
import sys
import numpy as np
from aggregator.aggregation import aggregator_from_state, make_aggregator
from aggregator.state import open_store, update_digest
from aggregator.validation import UpdateSpec
"""
    + UPDATE_SRC
    + """
target, ckpt, kind, spill, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
kw = {} if kind == "fedavg" else {"spill_dir": spill}
store = open_store(target, checkpoints=ckpt or None)
rnd = store.current_round().round
rs = store.load_round(rnd)
if rs.partial is None:
    agg = make_aggregator(kind, **kw)
    agg.begin(UpdateSpec.from_state(store.load_global(rs.info.base_digest).tensors))
else:
    agg = aggregator_from_state(rs.partial, **kw)
print("ready", flush=True)
for i in range(n):
    client = f"c{i:03d}"
    if rs.participants[client].status == "accepted":
        continue
    u = client_update(i)
    agg.add(client, u, weight=i + 1)
    store.accept_update(rnd, client, agg.state_dict(), update_digest(u), i + 1, {"i": i})
    sys.stdout.write(f"accepted {client}\\n")
    sys.stdout.flush()
print("done", flush=True)
"""
)


def _ack(line: str) -> bool:
    return line.startswith("accepted c") and line.endswith("\n") and len(line.split()) == 2


def check_invariant(backend, kind: str, spill: Path, printed: set[str]) -> list[str]:
    """accepted rows == contributions in the referenced partial aggregate, exactly."""
    store = backend.open()
    try:
        rs = store.load_round(1)
        accepted = rs.accepted
        assert printed <= set(accepted), "an update acknowledged as accepted was lost"
        if rs.partial is None:
            assert accepted == []
            return accepted
        listed = rs.partial.meta["clients"]
        assert sorted(listed) == accepted and len(set(listed)) == len(listed)
        for c in accepted:
            i = int(c[1:])
            p = rs.participants[c]
            assert (p.num_examples, p.update_digest) == (i + 1, update_digest(client_update(i)))
        kw = {} if kind == "fedavg" else {"spill_dir": spill}
        resumed = aggregator_from_state(rs.partial, **kw)
        expected = make_aggregator(
            kind, **({} if kind == "fedavg" else {"spill_dir": spill.parent / "x"})
        )
        expected.begin(UpdateSpec.from_state(GLOBAL0))
        for c in listed:  # recomputed from the known inputs, in the recorded folding order
            i = int(c[1:])
            expected.add(c, client_update(i), weight=i + 1)
        if kind == "fedavg":
            for n, arr in expected.state_dict().tensors.items():
                np.testing.assert_array_equal(rs.partial.tensors[n], arr)
            assert rs.partial.meta["total_weight"] == expected.total_weight
        for n, arr in expected.result(cast=False).items():
            np.testing.assert_array_equal(resumed.result(cast=False)[n], arr)
        return accepted
    finally:
        store.close()


@pytest.mark.parametrize(("kind", "clients", "kills"), [("fedavg", 40, 6), ("median", 20, 3)])
def test_sigkill_at_random_instants_loses_and_double_counts_nothing(
    state_backend, tmp_path: Path, kind: str, clients: int, kills: int
) -> None:
    rng = np.random.default_rng(20240607)
    spill = tmp_path / "spill"
    store = new_store(state_backend)
    store.open_round([f"c{i:03d}" for i in range(clients)])
    store.close()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    ckpt = str(state_backend.checkpoints or "")
    cmd = [sys.executable, "-c", CHILD, state_backend.target, ckpt, kind, str(spill), str(clients)]
    printed: set[str] = set()
    killed, interval = 0, 0.002  # interval: measured time of one accept in the child
    for _ in range(kills + 1):
        last = killed == kills
        child = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout.readline() == "ready\n", child.stderr.read()
            target = int(rng.integers(1, 4))  # kill after 1-3 acknowledged accepts...
            seen, done, stamps = 0, False, []
            while not last and seen < target:
                line = child.stdout.readline()
                stamps.append(time.perf_counter())
                if _ack(line):
                    printed.add(line.split()[1])
                    seen += 1
                else:
                    done = line == "done\n"
                    break
            if len(stamps) > 1:
                interval = max((stamps[-1] - stamps[0]) / (len(stamps) - 1), 1e-4)
            if not last and not done:
                # ...plus a random instant within the next accept or two
                time.sleep(float(rng.uniform(0, 2 * interval)))
                child.send_signal(signal.SIGKILL)
            out, err = child.communicate(timeout=60)
            # a kill can cut the last line short; only whole lines count as acknowledged
            printed.update(ln.split()[1] for ln in out.splitlines(keepends=True) if _ack(ln))
            done = done or out.endswith("done\n")  # it may finish while we sleep
            expected_rc = 0 if done else -signal.SIGKILL
            assert child.returncode == expected_rc, (child.returncode, out[-200:], err)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        killed += not done
        accepted = check_invariant(state_backend, kind, spill, printed)
        if done:
            break
    assert killed == kills
    assert accepted == [f"c{i:03d}" for i in range(clients)]
