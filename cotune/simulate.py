"""In-process federation: the same server and client halves, validation and aggregation rules as
the real services, without the wire. Used by the contract tests and the quality benchmarks,
where what is measured is the algorithm, not the transport (the transport has its own tests
and benchmarks; ``cotune demo`` runs the algorithms over the encrypted wire).

Two modes:

- :func:`simulate`: synchronous rounds; every client trains on the round's global, the round
  closes when all have reported. With a :class:`ClientTiming` it also records the simulated
  wall time of each round: the slowest client's task (the barrier waits for stragglers).
- :func:`simulate_async`: buffered asynchronous rounds (FedBuff, :mod:`aggregator.buffered`):
  at most ``concurrency`` clients train at once, each on the global version it downloaded; a
  discrete-event clock driven by :class:`ClientTiming` (seeded heterogeneous speeds,
  stragglers, optional dropouts) decides the order in which updates arrive; every K accepted
  updates make a new version. Same algorithm halves, validation and ``finish_round``.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregator.buffered import BufferedConfig, DeltaBuffer, check_staleness, client_delta
from aggregator.context import ServerContext
from aggregator.dp import ServerDP
from aggregator.errors import InvalidUpdate, SpecError
from aggregator.intake import COLLECT, aggregation_rule, check_update, open_aggregator
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
    sim_seconds: float | None = None  # simulated wall time of the round (with a ClientTiming)


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
             apply_final: bool = True, timing: ClientTiming | None = None,
             dp: Mapping[str, Any] | None = None) -> SimResult:
    """Synchronous rounds. ``dp``: client-level differential privacy, the service's ``dp``
    config (:mod:`aggregator.dp`; every client takes part in every round, so q = 1). ``timing`` only adds the simulated wall time of each round
    (``SimRound.sim_seconds``: the slowest selected client's task); it changes nothing else,
    and a timing with dropouts is refused (this mode has no deadline to close a round on)."""
    if timing is not None and timing.dropout > 0:
        raise SpecError("the synchronous simulation models no dropouts (a round would need a "
                        "deadline); use dropout=0, or simulate_async")
    clock = timing.clock([c.party_id for c in clients]) if timing is not None else None
    spec = registry.get(algorithm)
    server = spec.server(dict(config), server_ctx)
    halves = {c.party_id: spec.client() for c in clients}
    say = progress or (lambda *_: None)
    rule = aggregation_rule(server, aggregation)
    server_dp = ServerDP.build(dp, algorithm=algorithm, rule=rule, rounds=rounds)
    spent: list[tuple[float, float]] = []
    state = initial = server.initial_state()
    history: list[SimRound] = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        plan = server.plan_round(r, state)
        uspec = UpdateSpec.from_state(server.update_spec_state(state))
        agg = open_aggregator(rule, uspec)  # spilling rules: a temporary directory, discarded below
        rec = SimRound(r)
        task = Task(round=r, algorithm=algorithm, config=plan.config if server_dp is None
                    else {**plan.config, "dp": server_dp.cfg.task_config()})
        for ctx in clients:
            ctx.round = r
            half = halves[ctx.party_id]
            report = half.run(task, _needed(half, plan.blobs, ctx), ctx)
            if server_dp is not None:  # the service's DP intake: clipped, unweighted
                checked, weight = server_dp.check(report.tensors, uspec, ctx.party_id)
            else:
                checked = check_update(server, rule, report.tensors, uspec, client=ctx.party_id)
                weight = server.update_weight(report.metrics, report.num_examples)
            agg.add(ctx.party_id, checked.tensors, weight=weight)
            rec.clients[ctx.party_id] = report.metrics
            say(f"round {r}: {ctx.party_id} trained on {report.num_examples} examples")
        dp_metrics: dict = {}
        try:
            aggregate = agg.result(cast=False)
            if server_dp is not None:  # noise on the clipped sum, fixed denominator (the service's release)
                aggregate, dp_metrics = server_dp.release(aggregate, agg.count, uspec, selected=len(clients),
                                                          round=r, q=1.0, spent=spent)
                spent.append((1.0, float(server_dp.cfg.noise_multiplier)))
            outcome = server.finish_round(r, state, aggregate)
        finally:
            if hasattr(agg, "discard"):
                agg.discard()
        state = outcome.state
        rec.server = {**outcome.metrics, **dp_metrics}
        rec.seconds = time.perf_counter() - t0
        if clock is not None:
            rec.sim_seconds = max(clock.task_seconds(c.party_id) for c in clients)
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


# --------------------------------------------------------------------------- asynchronous mode


@dataclass(frozen=True)
class ClientTiming:
    """A seeded model of how long one task (download, local training, upload) takes a client,
    in simulated seconds, and whether it reports back at all.

    Each client gets a speed once: ``median_seconds`` times a lognormal factor (sigma
    ``spread``); a ``stragglers`` fraction of the clients (at least one when the fraction is
    positive and there are two or more clients) is ``straggler_factor`` times slower. Each task
    then takes the client's time times a lognormal jitter (sigma ``jitter``). A task is lost
    with probability ``dropout`` (the device went offline; the runtime frees its slot when the
    task would have ended, as a task timeout would). The same seed gives the same clients
    the same speeds in both modes."""

    median_seconds: float = 60.0
    spread: float = 0.5
    stragglers: float = 0.25
    straggler_factor: float = 4.0
    jitter: float = 0.2
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (("median_seconds", self.median_seconds > 0), ("spread", self.spread >= 0),
                  ("stragglers", 0 <= self.stragglers <= 1),
                  ("straggler_factor", self.straggler_factor >= 1), ("jitter", self.jitter >= 0),
                  ("dropout", 0 <= self.dropout < 1))
        for name, ok in checks:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise SpecError(f"ClientTiming.{name} is out of range: {value!r} (median_seconds "
                                "> 0, spread/jitter >= 0, stragglers in [0, 1], straggler_factor "
                                ">= 1, dropout in [0, 1))")

    def clock(self, parties: Sequence[str]) -> SimClock:
        return SimClock(self, list(parties))


class SimClock:
    """The random draws of a :class:`ClientTiming` for one set of clients (speeds fixed at
    construction; task durations and dropouts drawn in call order from one seeded stream)."""

    def __init__(self, timing: ClientTiming, parties: list[str]) -> None:
        self.timing = timing
        rng = np.random.default_rng([timing.seed, 0])
        factors = np.exp(rng.normal(0.0, timing.spread, len(parties)))
        n_slow = 0
        if timing.stragglers > 0 and len(parties) > 1:
            n_slow = max(1, int(round(timing.stragglers * len(parties))))
        slow = set(rng.permutation(len(parties))[:n_slow].tolist())
        self.speeds = {p: float(timing.median_seconds * factors[i]
                                * (timing.straggler_factor if i in slow else 1.0))
                       for i, p in enumerate(parties)}
        self.stragglers = sorted(parties[i] for i in slow)
        self._rng = np.random.default_rng([timing.seed, 1])

    def task_seconds(self, party: str) -> float:
        return float(self.speeds[party] * math.exp(self._rng.normal(0.0, self.timing.jitter)))

    def drops(self) -> bool:
        return bool(self.timing.dropout > 0 and self._rng.random() < self.timing.dropout)

    def choose(self, candidates: list[str]) -> str:
        return candidates[int(self._rng.integers(len(candidates)))]


@dataclass
class SimVersion:
    """One applied buffer: the global ``version`` it made, when (simulated seconds since the
    start), the accepted updates so far, and the staleness histogram of its updates."""

    version: int
    sim_time: float
    updates: int
    staleness: dict[int, int]
    clients: list[str]
    server: dict = field(default_factory=dict)
    seconds: float = 0.0  # real compute seconds since the previous version


@dataclass
class AsyncSimResult:
    state: State
    versions: list[SimVersion]
    final: dict  # party -> metrics of apply_final
    server: Any
    initial: State | None
    accepted: int  # updates folded into some buffer (applied or not)
    rejected: dict[str, int]  # reason -> count
    dropped: int  # tasks that never reported back
    sim_time: float  # simulated seconds at the end
    unapplied: int  # updates left in the last, partial buffer (not applied)
    clients: dict = field(default_factory=dict)  # party -> [report metrics per accepted update]
    speeds: dict = field(default_factory=dict)  # party -> median task seconds
    stragglers: list = field(default_factory=list)


@dataclass(order=True)
class _Task:
    finish: float
    seq: int
    party: str = field(compare=False)
    base: int = field(compare=False)  # the global version it trains on
    lost: bool = field(compare=False)
    start: float = field(compare=False)


def simulate_async(algorithm: str, config: Mapping[str, Any], server_ctx: ServerContext,
                   clients: list[DeviceContext], *, buffered: BufferedConfig | None = None,
                   updates: int | None = None, sim_seconds: float | None = None,
                   max_updates: int | None = None, timing: ClientTiming | None = None,
                   aggregation: str = "fedavg", progress: Callable[[str], Any] | None = print,
                   after_version: Callable[[SimVersion, State, Any], None] | None = None,
                   apply_final: bool = True) -> AsyncSimResult:
    """Buffered asynchronous federation (FedBuff) in process.

    Runs until every given budget is spent: ``updates`` accepted updates and/or the simulated
    clock past ``sim_seconds``; ``max_updates`` stops it regardless. A last, partial buffer is
    not applied (``unapplied``). Clients are dispatched uniformly at random among the idle ones
    that are not already in the current buffer (one contribution per client per version), at
    most ``buffered.concurrency`` at a time. A task trains when it completes, on the blobs of
    the version it was dispatched with: the same result as training at dispatch, and a task
    whose update would be too stale, or that is lost, costs no compute.

    Only algorithms whose updates are averaged, under the "fedavg" rule: the buffer folds
    deltas to the global, which collected payloads (FedMKT's logits) and robust statistics
    (median, trimmed mean) do not have."""
    cfg = buffered if buffered is not None else BufferedConfig()
    timing = timing if timing is not None else ClientTiming()
    if updates is None and sim_seconds is None:
        raise SpecError("simulate_async needs a budget: updates=, sim_seconds= or both")
    spec = registry.get(algorithm)
    server = spec.server(dict(config), server_ctx)
    rule = aggregation_rule(server, aggregation)
    if rule == COLLECT:
        raise SpecError(f"{algorithm} collects its clients' updates (they are not averaged), so "
                        "it has no buffered asynchronous mode; run it synchronously (simulate)")
    if rule != "fedavg":
        raise SpecError(f"buffered asynchronous rounds average deltas (FedBuff); aggregation "
                        f"{rule!r} does not apply: leave it at 'fedavg'")
    parties = [c.party_id for c in clients]
    if len(set(parties)) != len(parties):
        raise SpecError("client party ids must be unique")
    if cfg.buffer_size > len(clients):
        raise SpecError(f"buffer_size {cfg.buffer_size} exceeds the {len(clients)} clients: with "
                        "one contribution per client per version the buffer could never fill")
    ctx_of = {c.party_id: c for c in clients}
    halves = {p: spec.client() for p in parties}
    clock = timing.clock(parties)
    say = progress or (lambda *_: None)

    state = initial = server.initial_state()
    version = 0
    plans: dict[int, tuple[Any, UpdateSpec]] = {}  # version -> (plan, spec with its reference)

    def plan_of(v: int):
        if v not in plans:
            plan = server.plan_round(v + 1, state)  # only ever asked for the current version
            plans[v] = (plan, UpdateSpec.from_state(server.update_spec_state(state)))
        return plans[v]

    buf = DeltaBuffer(cfg)
    buf.begin(plan_of(0)[1], 0)
    heap: list[_Task] = []
    idle = list(parties)
    now, seq, accepted, dropped = 0.0, 0, 0, 0
    rejected: Counter = Counter()
    versions: list[SimVersion] = []
    reports: dict[str, list] = {p: [] for p in parties}
    t_real = time.perf_counter()
    fruitless = 0  # completed tasks in a row that brought no accepted update

    def done() -> bool:
        if max_updates is not None and accepted >= max_updates:
            return True
        if updates is not None and accepted < updates:
            return False
        return sim_seconds is None or now >= sim_seconds  # the clock is checked at each pop too

    while not done():
        while len(heap) < cfg.concurrency:  # keep `concurrency` tasks out
            eligible = [p for p in idle if p not in buf.clients]
            if not eligible:
                break
            party = clock.choose(eligible)
            idle.remove(party)
            plan_of(version)
            seq += 1
            heapq.heappush(heap, _Task(now + clock.task_seconds(party), seq, party, version,
                                       clock.drops(), now))
        if not heap:  # cannot happen with buffer_size <= clients; a guard against a hang
            raise RuntimeError("async simulation stalled: no task in flight and nobody to send")
        task = heapq.heappop(heap)
        if sim_seconds is not None and task.finish > sim_seconds and (
                updates is None or accepted >= updates):
            now = sim_seconds
            break
        now = task.finish
        idle.append(task.party)
        fruitless += 1
        if fruitless > 100 * len(parties):
            raise RuntimeError(f"async simulation made no progress in {fruitless} tasks "
                               f"(rejected: {dict(rejected)}, dropped {dropped})")
        if task.lost:
            dropped += 1
            say(f"t={now:.0f}s: {task.party} dropped out (task on version {task.base})")
            _forget_plans(plans, heap, version)
            continue
        ctx = ctx_of[task.party]
        try:
            tau = check_staleness(cfg, version, task.base, client=task.party)
        except InvalidUpdate as exc:
            rejected[exc.reason] += 1
            say(f"t={now:.0f}s: {exc}")
            _forget_plans(plans, heap, version)
            continue
        plan, uspec = plans[task.base]
        ctx.round = task.base + 1
        half = halves[task.party]
        report = half.run(Task(round=task.base + 1, algorithm=algorithm, config=plan.config),
                          _needed(half, plan.blobs, ctx), ctx)
        try:
            checked = check_update(server, rule, report.tensors, uspec, client=task.party)
            delta = client_delta(checked.tensors, uspec, client=task.party)
            buf.add(task.party, delta, staleness=tau,
                    weight=cfg.data_weight(report.num_examples, client=task.party))
        except InvalidUpdate as exc:
            rejected[exc.reason] += 1
            say(f"t={now:.0f}s: {exc}")
            _forget_plans(plans, heap, version)
            continue
        accepted += 1
        fruitless = 0
        reports[task.party].append(report.metrics)
        if buf.full:
            aggregate = buf.apply(state, cast=False)
            outcome = server.finish_round(version + 1, state, aggregate)
            state = outcome.state
            version += 1
            rec = SimVersion(version, now, accepted, buf.histogram(), list(buf.clients),
                             outcome.metrics, time.perf_counter() - t_real)
            t_real = time.perf_counter()
            versions.append(rec)
            say(f"version {version} at t={now:.0f}s: {accepted} updates, staleness "
                f"{rec.staleness}")
            buf.begin(plan_of(version)[1], version)
            if after_version is not None:
                after_version(rec, state, server)
        _forget_plans(plans, heap, version)
    final = {}
    if apply_final:
        blobs = server.final_blobs(state)
        for ctx in clients:
            half = halves[ctx.party_id]
            final[ctx.party_id] = half.apply_final(_needed(half, blobs, ctx), ctx,
                                                   server.client_config())
    return AsyncSimResult(state, versions, final, server, initial, accepted, dict(rejected),
                          dropped, now, buf.count, reports, dict(clock.speeds),
                          list(clock.stragglers))


def _forget_plans(plans: dict, heap: list, version: int) -> None:
    """Keep the plans (and base states) of versions some task still trains on, and the current
    one: memory O(concurrency) adapters, as the service keeps recent versions' checkpoints."""
    live = {t.base for t in heap} | {version}
    for v in [v for v in plans if v not in live]:
        del plans[v]
