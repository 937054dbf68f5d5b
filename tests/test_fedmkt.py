"""FedMKT: heterogeneous clients (a tiny Llama with a metaspace tokenizer and a tiny GPT-2 with
a byte-level one) and a server LLM over real Mosquitto; tampered payloads rejected with a
reason while the round closes with the other client; DualMinCE on hand-made payloads; LLM2SLM
leaves the LLM alone; the "collect" rule resumes after a restart."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from aggregator.aggregation import Collect, aggregator_from_state
from aggregator.config import AggregatorConfig
from aggregator.context import ServerContext
from aggregator.errors import InvalidUpdate, SpecError
from aggregator.intake import COLLECT, aggregation_rule, check_update
from aggregator.service import AggregatorService
from aggregator.state import StateStore
from aggregator.validation import UpdateSpec
from algorithms import registry
from algorithms.base import ConfigError, unpack_state
from algorithms.core.state_parts import part
from algorithms.core.token_alignment import Vocabulary, vocab_hash
from algorithms.fedmkt import FedMKTClient, FedMKTConfig
from algorithms.fedmkt.payload import LogitsPayload
from algorithms.fedmkt.public import family_adapter_blob, select_public, vocab_hash_array
from bridge.broker import MosquittoBroker, find_mosquitto
from bridge.codec import decode
from bridge.messages import Task
from cotune.simulate import simulate
from edge_sdk.client import EdgeClient
from edge_sdk.context import DeviceContext
from tests.tiny_models import TINY_CORPUS

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_mosquitto = pytest.mark.skipif(
    find_mosquitto() is None, reason="needs mosquitto (CI installs it)"
)

SHARDS = {"alice": TINY_CORPUS[0::2], "bob": TINY_CORPUS[1::2]}
TRAIN = {"lr": 5e-3, "max_steps": 2, "batch_size": 4, "block_size": 16}
CONFIG = {
    "train": TRAIN,
    "eval_block_size": 16,
    "k": 8,
    "lora": {"r": 4, "alpha": 8},
    "llm_lora": {"r": 4, "alpha": 8},
    "llm_train": {"max_steps": 2, "batch_size": 4},
}
PUBLIC = TINY_CORPUS[:8]
ALIGN = {"max_steps": 3, "batch_size": 4, "block_size": 16, "warmup": 0}  # align_base, small


@pytest.fixture
def models(tiny_llama_path, tiny_gpt2_path, tiny_llm_path):
    """Two client families (different tokenizers) and the LLM (the Llama family's tokenizer)."""
    return {"slm": str(tiny_llama_path), "slm:gpt2": str(tiny_gpt2_path), "llm": str(tiny_llm_path)}


@pytest.fixture
def fed(make_federation):
    paths = make_federation("mktfed", list(SHARDS))
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    yield paths
    broker.stop()


def _run_federation(fed, tmp_path, models, paths, *, rounds, config=CONFIG, **cfg_kw):
    cfg = AggregatorConfig(
        party_config=str(fed.party_config("aggregator")),
        state_dir=str(tmp_path / "agg"),
        rounds=rounds,
        algorithm="fedmkt",
        algorithm_config=config,
        models=models,
        llm={"backend": "local"},
        public_data=PUBLIC,
        min_clients=2,
        wait_for_clients_s=30,
        final_wait_s=10,
        **{"round_deadline_s": 60, **cfg_kw},
    )
    work = tmp_path / "clients"
    clients = [
        EdgeClient(
            fed.party_config(n),
            paths[n],
            SHARDS[n],
            eval_data=TINY_CORPUS[:3],
            profile=None,
            work_dir=work / n,
            progress=None,
        )
        for n in SHARDS
    ]
    threads = [
        threading.Thread(target=c.run, kwargs={"max_idle_s": 90}, daemon=True) for c in clients
    ]
    for t in threads:
        t.start()
    status = AggregatorService(cfg, progress=None).run()
    for t in threads:
        t.join(60)
    return status, clients, work


@needs_mosquitto
def test_heterogeneous_federation_over_mosquitto(
    fed, tmp_path, models, tiny_llama_path, tiny_gpt2_path
):
    status, clients, work = _run_federation(
        fed, tmp_path, models, {"alice": tiny_llama_path, "bob": tiny_gpt2_path}, rounds=2,
        config={**CONFIG, "align_base": ALIGN, "llm_holdout": 0.25},
    )
    assert status["last_committed"]["round"] == 2
    # the aligned base of alice's family (the LLM's tokenizer) reached alice and only alice
    from algorithms.core.aligned_base import BASE_FORMAT
    from algorithms.core.checkpoint_blob import CheckpointBlobError, read_checkpoint_meta

    def bases_fetched(name):
        found = 0
        for f in (work / name / "blobs").iterdir():
            try:
                read_checkpoint_meta(f.read_bytes(), fmt=BASE_FORMAT, max_version=1)
                found += 1
            except CheckpointBlobError:
                pass
        return found

    assert bases_fetched("alice") == 1 and bases_fetched("bob") == 0
    assert "aligned-bases" in clients[0].ctx.base_path and clients[1].ctx.base_path == str(tiny_gpt2_path)
    with StateStore(tmp_path / "agg" / "state.db") as store:
        r1, r2 = (store.load_round(r, with_partial=False) for r in (1, 2))
        assert sorted(r1.accepted) == sorted(r2.accepted) == sorted(SHARDS)
        # every 4th public text is held out of D_p to judge the LLM's steps
        assert r1.info.metrics["steps"] == 2 and r1.info.metrics["public_samples"] == len(PUBLIC) - 2
        assert r1.info.metrics["llm_step"] == "applied"
        g0 = store.load_global(r1.info.base_digest).tensors
        g2 = store.load_global().tensors
    assert g2["llm_holdout/nll"][0] < g0["llm_holdout/nll"][0]  # persisted with the state
    # the LLM learned (its LoRA and its teacher payload changed) and nothing was averaged
    assert any(not np.array_equal(g0[k], g2[k]) for k in g0 if k.startswith("llm/"))
    assert not np.array_equal(g0["llm_topk/topk_values"], g2["llm_topk/topk_values"])
    # the two families sent payloads of different shapes: their own tokenisations of D_p
    sent = {}
    for n in SHARDS:
        msg = work / n / "updates" / "round-00001.msg"
        sent[n] = decode(msg.read_bytes()).tensors or unpack_state(
            msg.with_suffix(".blob").read_bytes()
        )
    assert sent["alice"]["vocab_hash"].tobytes() != sent["bob"]["vocab_hash"].tobytes()
    assert sent["alice"]["offsets"][-1] != sent["bob"]["offsets"][-1]
    assert (
        sent["alice"]["topk_ids"].dtype == np.int32
    )  # integer tensors on the wire, never averaged
    for c in clients:
        assert [h["round"] for h in c.history] == [1, 2]
        # round 1's Task carries no LLM payload (the base LLM has learned nothing yet); round
        # 2's carries the LLM after its round 1 step, and the final blobs the last one
        assert "kd_samples" not in c.history[0]
        assert c.history[1]["kd_samples"] >= 0 and "kd_agree_fraction" in c.history[1]
        assert c.final["kd_final"]["kd_samples"] >= 0  # the last LLM->SLM transfer reached it
        assert np.isfinite(c.final["nll_final"])


@needs_mosquitto
def test_tampered_payload_is_rejected_and_the_round_closes_with_the_other(
    fed, tmp_path, models, tiny_llama_path, tiny_gpt2_path, monkeypatch
):
    honest = FedMKTClient.run

    def run(self, task, downloads, ctx):
        report = honest(self, task, downloads, ctx)
        if ctx.party_id == "bob":
            values = report.tensors["topk_values"].copy()
            values[0, 0] = np.nan
            report.tensors["topk_values"] = values
        return report

    monkeypatch.setattr(FedMKTClient, "run", run)
    status, clients, _ = _run_federation(
        fed,
        tmp_path,
        models,
        {"alice": tiny_llama_path, "bob": tiny_gpt2_path},
        rounds=1,
        quorum=0.5,
        round_deadline_s=20,
    )
    assert status["last_committed"]["round"] == 1
    with StateStore(tmp_path / "agg" / "state.db") as store:
        r1 = store.load_round(1, with_partial=False)
        assert r1.accepted == ["alice"]
        assert (
            r1.participants["bob"].status == "rejected"
            and r1.participants["bob"].reason == "non_finite"
        )
        assert r1.info.metrics["selected"].keys() == {
            "alice"
        }  # the server step ran on alice's payload
        assert "skipped" not in r1.info.metrics
    bob = next(c for c in clients if c.party_id == "bob")
    assert any(
        h.get("error") == "non_finite" for h in bob.history
    )  # the typed rejection reached bob


# -- validation, selection and modes in process ----------------------------------------------------


@pytest.fixture
def server_ctx(tmp_path, models):
    return ServerContext(str(tmp_path / "srv"), 0, models, PUBLIC)


def _gpt2_report(server, tiny_gpt2_path):
    state = server.initial_state()
    plan = server.plan_round(1, state)
    ctx = DeviceContext("bob", tiny_gpt2_path, SHARDS["bob"], progress=None)
    return FedMKTClient().run(
        Task(round=1, algorithm="fedmkt", config=plan.config), plan.blobs, ctx
    )


def _nan(t):
    t["topk_values"] = t["topk_values"].copy()
    t["topk_values"][1, 2] = np.nan


def _id_out_of_range(t):
    t["topk_ids"] = t["topk_ids"].copy()
    t["topk_ids"][0, 0] = int(t["vocab_size"][0]) + 5


def _wrong_lengths(
    t,
):  # one row fewer in sample 0 and offsets to match: a valid payload of the wrong shape
    t["topk_values"], t["topk_ids"] = t["topk_values"][1:].copy(), t["topk_ids"][1:].copy()
    t["offsets"] = np.maximum(t["offsets"] - 1, 0)


def _unknown_vocabulary(t):
    t["vocab_hash"] = vocab_hash_array("ab" * 32)


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (_nan, "non_finite"),
        (_id_out_of_range, "payload"),
        (_wrong_lengths, "shape"),
        (_unknown_vocabulary, "vocabulary"),
    ],
)
def test_tampered_payloads_are_refused_with_a_reason(tamper, reason, server_ctx, tiny_gpt2_path):
    server = registry.get("fedmkt").server(CONFIG, server_ctx)
    report = _gpt2_report(server, tiny_gpt2_path)
    spec = UpdateSpec.from_state({})
    rule = aggregation_rule(server)
    assert rule == COLLECT
    ok = check_update(server, rule, report.tensors, spec, client="bob")
    assert set(ok.tensors) >= {"topk_values", "topk_ids", "offsets", "sample_ce", "vocab_hash"}
    bad = dict(report.tensors)
    tamper(bad)
    with pytest.raises(InvalidUpdate) as err:
        check_update(server, rule, bad, spec, client="bob")
    assert err.value.reason == reason


def _hand_payload(lengths: list[int], ces: list[float], first_id: int, k: int = 8) -> dict:
    """A valid payload: per row the ids first_id..first_id+k-1 with values -0.1, -0.6, ..."""
    rows = sum(lengths)
    values = np.tile(-0.1 - 0.5 * np.arange(k, dtype=np.float32), (rows, 1)).astype(np.float16)
    ids = np.tile(first_id + np.arange(k, dtype=np.int32), (rows, 1))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return LogitsPayload(
        values, ids, offsets, np.asarray(ces, np.float32), vocab_size=400
    ).to_arrays()


@pytest.mark.parametrize("keep_own", ["task", "self"])
def test_server_dual_min_ce_picks_the_lowest_ce_teacher_below_the_llm(
    server_ctx, monkeypatch, keep_own
):
    server = registry.get("fedmkt").server({**CONFIG, "keep_own": keep_own}, server_ctx)
    state = server.initial_state()
    lengths = [
        len(t) - 1 for t in server.llm_tokens()
    ]  # the Llama family reads D_p as the LLM does
    n = len(lengths)
    llm_ce = np.full(n, 5.0, np.float32)
    llm_ce[2] = 0.5  # nobody beats the LLM on sample 2
    state["llm_topk/sample_ce"] = llm_ce
    ce_a = np.full(n, 4.0, np.float32)
    ce_b = np.full(n, 3.0, np.float32)
    ce_a[0], ce_b[0] = 1.0, 2.0  # a is the best on sample 0, b everywhere else
    ce_b[3] = 9.0  # sample 3: a (4.0) beats the LLM (5.0), b does not
    h = next(iter(server.families()))
    hash_ = vocab_hash_array(h)
    # ids of ordinary tokens (the low ids of a metaspace vocabulary are byte-fallback tokens,
    # which MinED maps onto the regular token of the same text)
    aggregate = {
        "b": {**_hand_payload(lengths, ce_b.tolist(), 350), "vocab_hash": hash_},
        "a": {**_hand_payload(lengths, ce_a.tolist(), 300), "vocab_hash": hash_},
    }
    seen = {}

    def capture(round, st, targets):
        seen.update(targets)
        return {"llm_kd_samples": len(targets), "steps": 0}

    monkeypatch.setattr(server, "_train_llm", capture)
    metrics = server.finish_round(1, state, aggregate).metrics
    assert metrics["kept_own"] == 1 and metrics["selected"] == {"a": 2, "b": n - 3}
    if keep_own == "task":  # sample 2 trains on the task loss alone
        assert set(seen) == set(range(n)) - {2}
    else:  # sample 2 keeps the LLM's own rows from before the step as its target
        assert set(seen) == set(range(n))
        own = LogitsPayload.from_arrays(part(state, "llm_topk")).sample(2)
        np.testing.assert_array_equal(seen[2][0], own[0])
        np.testing.assert_array_equal(seen[2][1], own[1])
        assert not (seen[2][1][:, 0] == 300).all() and not (seen[2][1][:, 0] == 350).all()
    # identical tokenizers: every row aligns one-to-one and keeps its teacher's ids
    for s, want in [(0, 300), (3, 300), (1, 350)]:
        values, ids = seen[s]
        assert (
            np.isfinite(values).all()
            and (ids[:, 0] == want).all()
            and (ids[:, -1] == want + 7).all()
        )


def test_llm2slm_teaches_without_changing_the_llm(server_ctx, tiny_llama_path, tiny_gpt2_path):
    clients = [
        DeviceContext("alice", tiny_llama_path, SHARDS["alice"], TINY_CORPUS[12:], progress=None),
        DeviceContext("bob", tiny_gpt2_path, SHARDS["bob"], TINY_CORPUS[12:], progress=None),
    ]
    cfg = {**CONFIG, "mode": "llm2slm"}
    res = simulate("fedmkt", cfg, server_ctx, clients, rounds=2, progress=None)
    init = (
        registry.get("fedmkt")
        .server(cfg, ServerContext(server_ctx.work_dir, 0, server_ctx.models, PUBLIC))
        .initial_state()
    )
    assert set(res.state) == set(init)
    for k in init:
        np.testing.assert_array_equal(res.state[k], init[k])  # LLM adapter and its teacher payload
    for r in res.rounds:
        assert "steps" not in r.server  # no LLM training
    # the LLM teaches from round 2's Task on (step 5 of round 1) and in the final blobs
    taught = [*res.rounds[1].clients.values(), *(m["kd_final"] for m in res.final.values())]
    assert len(taught) == 4 and not any("kd_samples" in m for m in res.rounds[0].clients.values())
    for m in taught:
        assert m["public_samples"] == len(PUBLIC) and "kd_aligned_fraction" in m


def test_mutual_training_is_deterministic_and_moves_the_llm(
    server_ctx, tiny_llama_path, tiny_gpt2_path
):
    def run():
        clients = [
            DeviceContext("alice", tiny_llama_path, SHARDS["alice"], progress=None),
            DeviceContext("bob", tiny_gpt2_path, SHARDS["bob"], progress=None),
        ]
        return simulate(
            "fedmkt",
            CONFIG,
            ServerContext(server_ctx.work_dir, 0, server_ctx.models, PUBLIC),
            clients,
            rounds=1,
            progress=None,
            apply_final=False,
        )

    a, b = run(), run()
    for k in a.state:
        np.testing.assert_array_equal(a.state[k], b.state[k])
    assert a.rounds[0].server["llm_delta_norm"] > 0
    assert set(a.rounds[0].server["selected"]) == {"alice", "bob"}


def test_llm_holdout_applies_only_steps_that_lower_the_held_out_nll(
    server_ctx, tiny_llama_path, tiny_gpt2_path, monkeypatch
):
    """Every 4th public piece is held out of D_p; an LLM step that lowers its NLL is applied,
    one that does not is rejected and leaves the LLM and its teacher as they were. (The tiny
    LLM is near uniform, and no learning rate made its step raise the held-out NLL reliably:
    the rejected case starts from a state whose held-out bar, NLL 1.0, no step can beat.)"""
    from algorithms.fedmkt.server import HOLDOUT_NLL, LLM, TEACHER, FedMKTServer

    def run(rounds, bar=None):
        cfg = {**CONFIG, "llm_holdout": 0.25, "lambda_task": 0.5,
               "llm_train": {"max_steps": 4, "batch_size": 4, "lr": 3e-3, "warmup": 0}}
        clients = [
            DeviceContext("alice", tiny_llama_path, SHARDS["alice"], progress=None),
            DeviceContext("bob", tiny_gpt2_path, SHARDS["bob"], progress=None),
        ]
        if bar is not None:
            initial = FedMKTServer.initial_state

            def barred(self):
                return {**initial(self), HOLDOUT_NLL: np.array([bar], np.float64)}

            monkeypatch.setattr(FedMKTServer, "initial_state", barred)
        return simulate("fedmkt", cfg, ServerContext(server_ctx.work_dir, 0, server_ctx.models, PUBLIC),
                        clients, rounds=rounds, progress=None, apply_final=False)

    sane = run(1)
    server = sane.server
    pieces = select_public(PUBLIC, CONFIG.get("public_max_samples", 64), 256)
    assert server.public() == [p for i, p in enumerate(pieces) if i % 4 != 3]
    assert server._holdout == pieces[3::4] and server._holdout
    m = sane.rounds[0].server
    assert m["llm_step"] == "applied" and m["llm_delta_norm"] > 0
    assert sane.state[HOLDOUT_NLL][0] == pytest.approx(m["llm_holdout_nll"], abs=1e-4)
    assert sane.state[HOLDOUT_NLL][0] < sane.initial[HOLDOUT_NLL][0]
    wild = run(1, bar=1.0)
    m = wild.rounds[0].server
    assert m["llm_step"] == "rejected" and m["llm_holdout_nll"] > 1.0
    assert m["llm_holdout_nll"] == pytest.approx(sane.rounds[0].server["llm_holdout_nll"], abs=1e-4)
    for k, v in wild.initial.items():  # nothing of the LLM moved
        if k.startswith((LLM + "/", TEACHER + "/")) or k == HOLDOUT_NLL:
            np.testing.assert_array_equal(wild.state[k], v)
    # the clients got D_p without the held-out pieces
    assert wild.rounds[0].server["public_samples"] == len(server.public())


@pytest.mark.parametrize("keep_own", ["task", "self"])
def test_client_keeps_its_own_rows_where_the_llm_is_no_better(
    server_ctx, tiny_llama_path, tiny_gpt2_path, keep_own
):
    clients = [
        DeviceContext("alice", tiny_llama_path, SHARDS["alice"], progress=None),
        DeviceContext("bob", tiny_gpt2_path, SHARDS["bob"], progress=None),
    ]
    res = simulate("fedmkt", {**CONFIG, "keep_own": keep_own}, server_ctx, clients, rounds=1,
                   progress=None)
    # the clients' step 5 of round 1 runs in apply_final (on the final blobs)
    taught = [m["kd_final"] for m in res.final.values()]
    # both kinds of samples occur on both sides, so the two settings differ
    assert len(taught) == 2 and all(m["kd_samples"] and m["kept_own"] for m in taught)
    assert 0 < res.rounds[0].server["kept_own"] < len(PUBLIC)
    for m in taught:
        assert m["kd_samples"] + m["kept_own"] == m["public_samples"] == len(PUBLIC)
        want = m["public_samples"] if keep_own == "self" else m["kd_samples"]
        assert m["kd_targets"] == want
    # the LLM's own rows are KD targets on the server too: every sample carries one
    server = res.rounds[0].server
    assert server["llm_kd_samples"] == (
        server["public_samples"] if keep_own == "self" else server["public_samples"] - server["kept_own"]
    )



def _bases_of(blobs: dict) -> dict:
    return {n: b for n, b in blobs.items() if n.startswith("base-")}


def test_align_base_aligns_only_the_family_sharing_the_llm_tokenizer(
    server_ctx, models, tiny_llama_path, tiny_gpt2_path
):
    from algorithms.core.aligned_base import BASE_FORMAT, BASES_DIR
    from algorithms.core.checkpoint_blob import read_checkpoint_meta
    from algorithms.core.modeling import load_causal_lm
    from algorithms.fedmkt.public import family_base_blob

    cfg = {**CONFIG, "align_base": ALIGN}
    server = registry.get("fedmkt").server(cfg, server_ctx)
    state = server.initial_state()
    llama_hash = vocab_hash(Vocabulary.from_tokenizer(load_causal_lm(tiny_llama_path)[1]))
    name = family_base_blob(llama_hash)
    assert {k.split("/")[0] for k in state if k.startswith("base-")} == {name}
    assert server.align_metrics["slm"]["align_steps"] == 3
    own = load_causal_lm(tiny_llama_path, quant="fp32")[0].state_dict()
    assert any(not np.allclose(state[f"{name}/{k}"], own[k].numpy()) for k in own if f"{name}/{k}" in state)
    blobs = server.plan_round(1, state)
    assert set(_bases_of(blobs.blobs)) == {name}
    assert read_checkpoint_meta(blobs.blobs[name], fmt=BASE_FORMAT, max_version=1)  # a checked checkpoint
    # a restarted aggregator sends the identical bytes without aligning again
    again = registry.get("fedmkt").server(cfg, ServerContext(server_ctx.work_dir, 0, models, PUBLIC))
    assert again.plan_round(2, state).blobs[name] == blobs.blobs[name] and not again.align_metrics
    # a state without the base (started with align_base null) is refused, not silently re-aligned
    bare = {k: v for k, v in state.items() if not k.startswith("base-")}
    with pytest.raises(ConfigError, match="no aligned base"):
        registry.get("fedmkt").server(cfg, ServerContext(server_ctx.work_dir, 0, models, PUBLIC)).plan_round(2, bare)
    # devices: only the Llama family fetches (and trains on) the base; GPT-2 keeps its own
    clients = [
        DeviceContext("alice", tiny_llama_path, SHARDS["alice"], TINY_CORPUS[12:], progress=None),
        DeviceContext("bob", tiny_gpt2_path, SHARDS["bob"], TINY_CORPUS[12:], progress=None),
    ]
    half = FedMKTClient()
    assert half.needs_blob(name, clients[0]) and not half.needs_blob(name, clients[1])
    assert half.needs_blob("public", clients[1])
    res = simulate("fedmkt", cfg, ServerContext(server_ctx.work_dir, 0, models, PUBLIC), clients,
                   rounds=1, progress=None)
    assert BASES_DIR in clients[0].base_path and clients[1].base_path == str(tiny_gpt2_path)
    assert set(res.final) == {"alice", "bob"} and all(np.isfinite(m["nll_final"]) for m in res.final.values())


def test_align_base_needs_the_family_checkpoint(tmp_path, tiny_llama_path, tiny_gpt2_path, tiny_llm_path):
    import shutil

    tok_only = tmp_path / "llama-tokenizer"
    tok_only.mkdir()
    for f in tiny_llama_path.iterdir():
        if "token" in f.name:
            shutil.copy(f, tok_only / f.name)
    ctx = ServerContext(str(tmp_path / "srv"), 0, {"slm": str(tok_only), "slm:gpt2": str(tiny_gpt2_path),
                                                   "llm": str(tiny_llm_path)}, PUBLIC)
    registry.get("fedmkt").server(CONFIG, ctx).initial_state()  # without alignment a tokenizer is enough
    with pytest.raises(ConfigError, match="full checkpoint"):
        registry.get("fedmkt").server({**CONFIG, "align_base": ALIGN}, ctx).initial_state()


def test_collected_updates_survive_a_restart_and_are_discarded_after(tmp_path):
    spill = tmp_path / "spill"
    agg = Collect(spill_dir=spill)
    agg.begin(UpdateSpec.from_state({}))
    ups = {
        "x": {"ids": np.arange(5, dtype=np.int32), "v": np.ones((2, 3), np.float16)},
        "y": {"ids": np.arange(9, dtype=np.int32)},
    }  # different names, shapes and dtypes
    agg.add("x", ups["x"], weight=3)
    resumed = aggregator_from_state(
        agg.state_dict(), spill_dir=spill
    )  # a restart after x was accepted
    resumed.add("y", ups["y"], weight=1)
    out = resumed.result()
    assert list(out) == ["x", "y"] and out.weights == {"x": 3.0, "y": 1.0}
    for c, tensors in ups.items():
        assert set(out[c]) == set(tensors)
        for k, v in tensors.items():
            np.testing.assert_array_equal(out[c][k], v)
            assert out[c][k].dtype == v.dtype
    resumed.discard()
    assert not list(spill.glob("*.safetensors"))


def test_rules_and_config_are_checked(server_ctx):
    server = registry.get("fedmkt").server(CONFIG, server_ctx)
    assert aggregation_rule(server, "fedavg") == COLLECT  # the config default
    with pytest.raises(SpecError):
        aggregation_rule(server, "median")
    with pytest.raises(SpecError):
        aggregation_rule(registry.get("fedavg").server({}, server_ctx), COLLECT)
    assert FedMKTConfig.from_dict({"lambda": 0.8}).lambda_task == 0.8
    assert FedMKTConfig().kd_weight == pytest.approx(0.1 / 0.9)
    for bad in (
        {"lambda": 0.0},
        {"mode": "both"},
        {"k": 0},
        {"kd_kind": "mse"},
        {"llm_train": {"lr": -1}},
        {"public_split": "yes"},
        {"llm_holdout": 0.6},
        {"llm_holdout": "10%"},
    ):
        with pytest.raises(ConfigError):
            FedMKTConfig.from_dict(bad)
    client_keys = set(server.client_config())
    assert "llm_train" not in client_keys and "mode" not in client_keys and "k" in client_keys
    assert "public_split" not in client_keys  # the clients get D_p as texts
    assert part(server.initial_state(), "llm_topk")["k"].tolist() == [8]


def test_public_set_keeps_every_piece_of_a_long_text():
    long = " ".join(f"w{i}" for i in range(40))  # 40 words, 159 characters
    texts = [long, {"text": "  two words  "}, "one", {"text": 7}, "x" * 30 + " y"]
    pieces = select_public(texts, None, 24)
    assert all(len(p) <= 24 for p in pieces)
    # every word of the long text is in exactly one piece, in order, and nothing else is lost
    assert " ".join(pieces[: -2]).split() == long.split()
    assert pieces[-2:] == ["two words", "xxxxxx y"]  # mid-word cuts where a piece has no space
    # the reference implementation's truncation: the first piece of each text only
    assert select_public(texts, None, 24, split=False) == [pieces[0], "two words"]
    assert select_public(texts, 3, 24) == pieces[:3]
    with_split = FedMKTConfig.from_dict({"public_max_chars": 24, "public_max_samples": None})
    assert with_split.public_split is True


def test_fedavg_homogeneous_averages_adapters_within_a_family(
    server_ctx, tiny_llama_path, tiny_gpt2_path
):
    cfg = {**CONFIG, "fedavg_homogeneous": True}
    server = registry.get("fedmkt").server(cfg, server_ctx)
    state = server.initial_state()
    plan = server.plan_round(1, state)
    names = {family_adapter_blob(h) for h in server.families()}
    assert len(names) == 2 and names <= set(plan.blobs)
    # the final blobs: the averaged adapters and the LLM's last payload (with D_p and vocabulary)
    assert set(server.final_blobs(state)) == names | {"public", "llm_vocab", "llm_topk"}
    data = {
        "alice": (tiny_llama_path, SHARDS["alice"]),
        "carol": (tiny_llama_path, SHARDS["bob"]),
        "bob": (tiny_gpt2_path, SHARDS["bob"]),
    }
    task = Task(round=1, algorithm="fedmkt", config=plan.config)
    spec = UpdateSpec.from_state({})
    ups = {}
    for c, (path, shard) in data.items():
        report = FedMKTClient().run(task, plan.blobs, DeviceContext(c, path, shard, progress=None))
        ups[c] = check_update(server, COLLECT, report.tensors, spec, client=c).tensors
    out = server.finish_round(1, state, ups).state
    llama = family_adapter_blob(
        vocab_hash(Vocabulary.from_tokenizer(DeviceContext("x", tiny_llama_path, []).tokenizer()))
    )
    keys = [k[len("adapter/") :] for k in ups["alice"] if k.startswith("adapter/")]
    assert keys
    for k in keys:
        a, c = (ups[n]["adapter/" + k].astype(np.float64) for n in ("alice", "carol"))
        np.testing.assert_allclose(
            out[f"{llama}/{k}"], ((a + c) / 2).astype(np.float32), rtol=0, atol=1e-6
        )
    # an adapter of the wrong shape is refused like any other malformed payload
    bad = dict(ups["alice"])
    bad["adapter/" + keys[0]] = np.zeros((1, 1), np.float16)
    with pytest.raises(InvalidUpdate) as err:
        check_update(server, COLLECT, bad, spec, client="alice")
    assert err.value.reason == "shape"


def test_service_resumes_a_collect_round_from_its_persisted_partial(
    make_federation, tmp_path, models, tiny_gpt2_path
):
    """What a restarted aggregator does with an open FedMKT round: rebuild the "collect"
    aggregate from the ledger's partial checkpoint and the spill files under state_dir."""
    paths = make_federation("mktresume", ["alice", "bob"])
    cfg = AggregatorConfig(
        party_config=str(paths.party_config("aggregator")),
        state_dir=str(tmp_path / "agg"),
        algorithm="fedmkt",
        algorithm_config=CONFIG,
        models=models,
        public_data=PUBLIC,
    )
    first = AggregatorService(cfg, progress=None)
    assert first.rule == COLLECT
    report = _gpt2_report(first.algorithm, tiny_gpt2_path)
    spec = UpdateSpec.from_state({})
    checked = check_update(first.algorithm, first.rule, report.tensors, spec, client="bob")
    with StateStore(tmp_path / "agg" / "state.db") as store:
        store.init_federation("mktresume", "fedmkt", CONFIG, {"x": np.zeros(1, np.float32)})
        store.open_round(["alice", "bob"])
        agg = first._aggregator(None, spec)
        agg.add("bob", checked.tensors, weight=report.num_examples)
        store.accept_update(1, "bob", agg.state_dict(), "0" * 64, report.num_examples, {})
        partial = store.load_round(1).partial
    again = AggregatorService(cfg, progress=None)._aggregator(partial, spec)  # after a restart
    assert again.count == 1 and again.clients == ("bob",)
    got = again.result()["bob"]
    for k, v in checked.tensors.items():
        np.testing.assert_array_equal(got[k], v)
    again.discard()


def test_tail_aware_topk_kd_is_calibrated():
    """Renormalised top-k targets push the student to zero mass outside the k ids; the tail
    bucket's minimum is the teacher itself, and with k = V both equal the full soft-target CE."""
    from algorithms.fedmkt.targets import topk_kd_loss

    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 50) * 2
    logp = torch.log_softmax(teacher, -1)
    values, ids = logp.topk(8, dim=-1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    grads = {}
    for tail in (False, True):
        student = teacher.clone().requires_grad_(True)
        topk_kd_loss(student, values, ids, mask, kind="kl", tail=tail).backward()
        grads[tail] = float(student.grad.norm())
    assert grads[True] < 1e-5 < grads[False]  # the teacher is the tail-aware loss's minimum, not the other's
    student = torch.randn(2, 5, 50)
    full_v, full_i = logp.topk(50, dim=-1)
    full_ce = -(logp.exp() * torch.log_softmax(student, -1)).sum(-1).mean()
    for tail in (False, True):
        assert float(topk_kd_loss(student, full_v, full_i, mask, tail=tail)) == pytest.approx(float(full_ce), rel=1e-4)
    with pytest.raises(ValueError, match="temperature 1"):
        topk_kd_loss(student, values, ids, mask, temperature=2.0, tail=True)
    with pytest.raises(ConfigError, match="kd_tail"):
        FedMKTConfig.from_dict({"kd_tail": True, "temperature": 2.0})


def test_llm_knowledge_of_a_round_reaches_the_clients_after_it(server_ctx, tiny_llama_path):
    """The paper's order: round 1's Task carries no LLM payload (the base LLM has learned
    nothing of the clients yet); round r's carries the LLM after its round r - 1 step; the
    last step reaches the clients through the final blobs, which apply_final distils from,
    starting from the last round's adapter (applying them again gives the same model)."""
    from algorithms.fedmkt.server import TEACHER

    clients = [DeviceContext("alice", tiny_llama_path, SHARDS["alice"], TINY_CORPUS[12:], progress=None)]
    res = simulate("fedmkt", {**CONFIG, "align_rule": "one_to_one"}, server_ctx, clients, rounds=1,
                   progress=None, apply_final=False)
    server, state = res.server, res.state
    assert "llm_topk" not in server.plan_round(1, state).blobs
    assert "kd_samples" not in res.rounds[0].clients["alice"]
    sent = unpack_state(server.plan_round(2, state).blobs["llm_topk"])
    final = server.final_blobs(state)
    assert final["llm_topk"] == server.plan_round(2, state).blobs["llm_topk"]
    for k, v in part(state, TEACHER).items():  # the LLM's payload after its round 1 step
        np.testing.assert_array_equal(sent[k], v)
    assert not np.array_equal(state[TEACHER + "/topk_values"], res.initial[TEACHER + "/topk_values"])
    assert res.rounds[0].server["kd_agree_fraction"] <= res.rounds[0].server["kd_aligned_fraction"]
    half = FedMKTClient()
    once = half.apply_final(final, clients[0], server.client_config())
    assert once["kd_final"]["kd_samples"] + once["kd_final"]["kept_own"] == len(PUBLIC)
    assert once["kd_final"]["kd_train"]["steps"] > 0
    store = clients[0].workspace() / "fedmkt"
    assert (store / "final.safetensors").read_bytes() != (store / "adapter-00001.safetensors").read_bytes()
    again = FedMKTClient().apply_final(final, clients[0], server.client_config())
    assert again["nll_final"] == pytest.approx(once["nll_final"], rel=1e-6)
    with pytest.raises(ConfigError, match="align_rule"):
        FedMKTConfig.from_dict({"align_rule": "dtw"})
