"""In-process federation: the same server and client halves, validation and aggregation rules as
the real services, without the wire. Used by the contract tests and the quality benchmarks,
where what is measured is the algorithm, not the transport (the transport has its own tests
and benchmarks; ``cotune demo`` runs the algorithms over the encrypted wire).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aggregator.context import ServerContext
from aggregator.intake import aggregation_rule, check_update, open_aggregator
from aggregator.validation import UpdateSpec
from algorithms import registry
from algorithms.base import State
from bridge.messages import Task
from edge_sdk.context import DeviceContext


@dataclass
class SimRound:
    round: int
    clients: dict = field(default_factory=dict)  # party -> report metrics
    server: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class SimResult:
    state: State
    rounds: list[SimRound]
    final: dict  # party -> metrics of apply_final
    server: Any  # the server half (holds its models, for evaluation)
    initial: State | None = None  # the server's state before round 1


def simulate(algorithm: str, config: Mapping[str, Any], server_ctx: ServerContext,
             clients: list[DeviceContext], rounds: int, *, aggregation: str = "fedavg",
             progress: Callable[[str], Any] | None = print,
             after_round: Callable[[int, State, Any], None] | None = None,
             apply_final: bool = True) -> SimResult:
    spec = registry.get(algorithm)
    server = spec.server(dict(config), server_ctx)
    halves = {c.party_id: spec.client() for c in clients}
    say = progress or (lambda *_: None)
    rule = aggregation_rule(server, aggregation)
    state = initial = server.initial_state()
    history: list[SimRound] = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        plan = server.plan_round(r, state)
        uspec = UpdateSpec.from_state(server.update_spec_state(state))
        agg = open_aggregator(rule, uspec)  # spilling rules: a temporary directory, discarded below
        rec = SimRound(r)
        task = Task(round=r, algorithm=algorithm, config=plan.config)
        for ctx in clients:
            ctx.round = r
            half = halves[ctx.party_id]
            report = half.run(task, _needed(half, plan.blobs, ctx), ctx)
            checked = check_update(server, rule, report.tensors, uspec, client=ctx.party_id)
            agg.add(ctx.party_id, checked.tensors, weight=server.update_weight(report.metrics, report.num_examples))
            rec.clients[ctx.party_id] = report.metrics
            say(f"round {r}: {ctx.party_id} trained on {report.num_examples} examples")
        try:
            outcome = server.finish_round(r, state, agg.result(cast=False))
        finally:
            if hasattr(agg, "discard"):
                agg.discard()
        state = outcome.state
        rec.server = outcome.metrics
        rec.seconds = time.perf_counter() - t0
        history.append(rec)
        say(f"round {r}: done in {rec.seconds:.1f}s")
        if after_round is not None:
            after_round(r, state, server)
    final = {}
    if apply_final:
        blobs = server.final_blobs(state)
        for ctx in clients:
            half = halves[ctx.party_id]
            final[ctx.party_id] = half.apply_final(_needed(half, blobs, ctx), ctx, server.client_config())
    return SimResult(state, history, final, server, initial=initial)


def _needed(half, blobs: dict, ctx) -> dict:
    """The blobs a device would fetch (as the edge runtime does: ``needs_blob``)."""
    return {name: b for name, b in blobs.items() if half.needs_blob(name, ctx)}
