"""The shared contract every registered algorithm must pass (one row per algorithm in ROWS):
config validation, deterministic plans, payload round trip through the runtime's validation,
identical updates aggregating to themselves, one in-process federation round, resumability of
the server state, and the final blobs a client applies."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.context import ServerContext
from aggregator.intake import COLLECT, aggregation_rule, check_update, open_aggregator
from aggregator.validation import UpdateSpec
from algorithms import registry
from algorithms.base import ConfigError, unpack_state
from bridge.messages import Task
from cotune.simulate import simulate
from edge_sdk.context import DeviceContext
from tests.tiny_models import TINY_CORPUS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = {"lr": 5e-3, "epochs": 1, "batch_size": 4, "block_size": 16, "max_steps": 3}
DISTILL = {"batch_size": 4, "block_size": 16, "max_steps": 2}
ALIGN = {"batch_size": 4, "block_size": 16, "max_steps": 2}

#: algorithm -> (a valid small config, a config that must be refused)
ROWS = {
    "fedavg": ({"train": TRAIN, "eval_block_size": 16}, {"wire_dtype": "int3"}),
    "fedcollm": ({"train": TRAIN, "eval_block_size": 16, "distill": DISTILL, "llm_lora": {"r": 4, "alpha": 8},
                  "align_base": ALIGN},
                 {"distill": {"lambda_kd": -1.0}}),
    "fedpt": ({"train": TRAIN, "eval_block_size": 16, "distill": DISTILL, "alpha": 0.8,
               "align_base": ALIGN},
              {"alpha": float("nan")}),
    # on the 3-layer tiny LLM: adapter = the top layer, the 2 middle layers thinned to 1
    "fedbiot": ({"train": TRAIN, "eval_block_size": 16, "lora": {"r": 4, "alpha": 8}, "n_adapter_top": 1,
                 "drop_ratio": 0.5, "pre_align_steps": 2, "align": {"max_steps": 2, "batch_size": 4, "block_size": 16,
                                                                    "eval_batches": 1}},
                {"drop_ratio": 1.5}),
    # heterogeneous clients have their own test (tests/test_fedmkt.py); here every client is a tiny Llama
    "fedmkt": ({"train": TRAIN, "eval_block_size": 16, "k": 8, "llm_lora": {"r": 4, "alpha": 8},
                "llm_train": {"max_steps": 2, "batch_size": 4}}, {"lambda": 1.5}),
}


def _check(server, tensors, uspec, client="c0"):
    """The runtime's validation path: the spec checks, or a collecting algorithm's own."""
    return check_update(server, aggregation_rule(server), tensors, uspec, client=client)


def test_every_registered_algorithm_has_a_contract_row():
    assert set(registry.names()) <= set(ROWS), f"add a ROWS entry for {set(registry.names()) - set(ROWS)}"


@pytest.fixture
def server_ctx(tmp_path, tiny_llama_path, tiny_llm_path):
    return ServerContext(str(tmp_path), 0, {"slm": str(tiny_llama_path), "llm": str(tiny_llm_path)},
                         TINY_CORPUS[:8])


def _clients(path, n=2, same=False):
    return [DeviceContext(f"c{i}", path, TINY_CORPUS[: 8] if same else TINY_CORPUS[i::n], TINY_CORPUS[12:],
                          progress=None) for i in range(n)]


@pytest.mark.parametrize("name", sorted(ROWS))
def test_bad_config_is_refused_with_a_typed_error(name, server_ctx):
    with pytest.raises(ConfigError):
        registry.get(name).server(ROWS[name][1], server_ctx)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_plan_is_deterministic_and_the_update_round_trips(name, server_ctx, tiny_llama_path):
    spec = registry.get(name)
    server = spec.server(ROWS[name][0], server_ctx)
    state = server.initial_state()
    p1, p2 = server.plan_round(1, state), server.plan_round(1, state)
    assert p1.config == p2.config and p1.blobs == p2.blobs  # a restart re-plans the same bytes
    uspec = UpdateSpec.from_state(server.update_spec_state(state))
    collects = aggregation_rule(server) == COLLECT  # per-client payloads, no shared update spec
    # the adapter the plan broadcasts matches the update spec; every other blob (e.g. FedBiOT's
    # emulator) is a tensor file too, never pickle
    if not collects:
        assert set(unpack_state(p1.blobs["global"])) == set(uspec.names)
    for blob in p1.blobs.values():
        unpack_state(blob)
    ctx = _clients(tiny_llama_path, 1)[0]
    report = spec.client().run(Task(round=1, algorithm=name, config=p1.config), p1.blobs, ctx)
    checked = _check(server, report.tensors, uspec)
    assert collects or checked.norm > 0  # training moved the adapter
    assert report.num_examples == len(ctx.private_data())
    # wrong shapes and NaN are refused by the runtime's validation
    bad = dict(report.tensors)
    k = next(k for k in sorted(bad) if bad[k].dtype.kind == "f")
    bad[k] = np.full_like(bad[k], np.nan)
    with pytest.raises(Exception, match="NaN|non_finite"):
        _check(server, bad, uspec)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_identical_updates_aggregate_to_themselves(name, server_ctx, tiny_llama_path):
    spec = registry.get(name)
    server = spec.server(ROWS[name][0], server_ctx)
    state = server.initial_state()
    plan = server.plan_round(1, state)
    uspec = UpdateSpec.from_state(server.update_spec_state(state))
    reports = [spec.client().run(Task(round=1, algorithm=name, config=plan.config), plan.blobs, c)
               for c in _clients(tiny_llama_path, 2, same=True)]
    for a, b in zip(sorted(reports[0].tensors.items()), sorted(reports[1].tensors.items()), strict=True):
        np.testing.assert_array_equal(a[1], b[1])  # same data, same seed: the same update
    rule = aggregation_rule(server)
    agg = open_aggregator(rule, uspec)
    for i, r in enumerate(reports):
        agg.add(f"c{i}", _check(server, r.tensors, uspec, f"c{i}").tensors,
                weight=server.update_weight(r.metrics, r.num_examples))
    out = agg.result(cast=False)
    if rule == COLLECT:  # nothing is combined: each client's update comes back as it was sent
        for i in range(len(reports)):
            for k, v in reports[0].tensors.items():
                np.testing.assert_array_equal(out[f"c{i}"][k], v)
        agg.discard()
        return
    for k, v in reports[0].tensors.items():
        np.testing.assert_allclose(out[k], v.astype(np.float64), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_two_rounds_in_process(name, server_ctx, tiny_llama_path):
    clients = _clients(tiny_llama_path)
    res = simulate(name, ROWS[name][0], server_ctx, clients, rounds=2, progress=None)
    assert len(res.rounds) == 2
    init = registry.get(name).server(ROWS[name][0], server_ctx).initial_state()
    assert set(res.state) == set(init)
    assert all(np.isfinite(v).all() for v in res.state.values())
    assert any(not np.array_equal(res.state[k], init[k]) for k in init)
    for party, m in res.final.items():
        assert np.isfinite(m["nll_final"]), party
    # the final model a client applies is the federation's: a fresh client evaluating it agrees
    # (FedMKT leaves every client its own model: its final blobs are the LLM's last payload,
    # which each client distils into its own adapter)
    final = res.server.final_blobs(res.state)
    if final and name != "fedmkt":
        fresh = _clients(tiny_llama_path, 1)[0]
        again = registry.get(name).client().apply_final(final, fresh, res.server.client_config())
        assert again["nll_final"] == pytest.approx(res.final["c0"]["nll_final"], rel=1e-6)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_finish_round_is_deterministic(name, server_ctx, tiny_llama_path):
    """A restarted aggregator re-runs the server step of an open round: it must produce the
    same state from the same inputs (seeded distillation, fresh server object)."""
    spec = registry.get(name)
    s1 = spec.server(ROWS[name][0], server_ctx)
    state = s1.initial_state()
    plan = s1.plan_round(1, state)
    r = spec.client().run(Task(round=1, algorithm=name, config=plan.config), plan.blobs, _clients(tiny_llama_path, 1)[0])
    if aggregation_rule(s1) == COLLECT:
        aggregate = {"c0": _check(s1, r.tensors, UpdateSpec.from_state(s1.update_spec_state(state))).tensors}
    else:
        aggregate = {k: v.astype(np.float64) for k, v in r.tensors.items()}
    out1 = s1.finish_round(1, state, aggregate).state
    ctx2 = ServerContext(server_ctx.work_dir, 0, server_ctx.models, server_ctx.public)
    out2 = spec.server(ROWS[name][0], ctx2).finish_round(1, state, aggregate).state
    for k in out1:
        np.testing.assert_allclose(out1[k], out2[k], rtol=0, atol=1e-6)
