"""Prometheus metrics of the aggregator, its ingest workers and ``cotune llm serve``.

Every process has one registry (:data:`REGISTRY`, the ``prometheus_client`` library's own
types and text exposition): counters and histograms move through the one-line hooks below,
called where a round opens or commits and where an update is accepted or rejected; gauges that
describe the present (the current round, clients online, bytes on the wire, checkpoint disk)
are read at scrape time by collectors that a process registers for what it runs
(:func:`register_collector`). Nothing is exported unless ``status_http`` (aggregator, workers)
or ``--metrics-port`` (LLM server) is configured: see :mod:`aggregator.status_http`.

Labels are bounded sets only (a rejection reason, an outcome, a role); never a client id, so a
fleet of 10,000 devices is still a handful of series. No metric carries an update's contents.

The hooks never raise: metrics must not break a round. Without ``prometheus_client`` installed
they do nothing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger("cotune.metrics")

try:  # a core dependency; a bare device install without it still runs, unobserved
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.platform_collector import PlatformCollector
    from prometheus_client.process_collector import ProcessCollector
except ImportError:  # pragma: no cover - exercised only without the dependency
    CollectorRegistry = None  # type: ignore[assignment,misc]

AVAILABLE = CollectorRegistry is not None
CONTENT_TYPE = CONTENT_TYPE_LATEST if AVAILABLE else "text/plain; version=0.0.4; charset=utf-8"

#: round durations: a test round (seconds) up to a fleet's deadline (an hour)
_ROUND_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600, float("inf"))
#: validate + fold + log of one update: a tiny adapter (sub-ms) to a large one (seconds)
_INGEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                   10, float("inf"))
_LLM_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))

if AVAILABLE:
    REGISTRY = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, RSS, open fds (Linux)
    PlatformCollector(registry=REGISTRY)  # python_info
    ROUNDS_OPENED = Counter("cotune_rounds_opened", "Rounds opened by this aggregator process",
                            registry=REGISTRY)
    ROUNDS_COMMITTED = Counter("cotune_rounds_committed",
                               "Rounds committed (a new global state, or the old one when skipped)",
                               registry=REGISTRY)
    ROUNDS_SKIPPED = Counter("cotune_rounds_skipped",
                             "Committed rounds that kept the global state (quorum not met, nothing "
                             "buffered)", ["reason"], registry=REGISTRY)
    ROUND_SECONDS = Histogram("cotune_round_duration_seconds", "Wall time of a round, open to commit",
                              buckets=_ROUND_BUCKETS, registry=REGISTRY)
    UPDATES_ACCEPTED = Counter("cotune_updates_accepted",
                               "Updates validated, folded and logged (acknowledged once durable)",
                               registry=REGISTRY)
    UPDATES_REJECTED = Counter("cotune_updates_rejected", "Updates refused by the service, by reason",
                               ["reason"], registry=REGISTRY)
    WIRE_REJECTED = Counter("cotune_wire_rejected",
                            "Frames the wire refused before they became messages (replayed, "
                            "tampered, stale...), by reason", ["reason"], registry=REGISTRY)
    INGEST_SECONDS = Histogram("cotune_update_ingest_seconds",
                               "Validate + fold + log of one accepted update",
                               buckets=_INGEST_BUCKETS, registry=REGISTRY)
    LLM_REQUESTS = Counter("cotune_llm_requests", "Completion requests the LLM worker finished, by outcome",
                           ["outcome"], registry=REGISTRY)
    LLM_TOKENS = Counter("cotune_llm_tokens", "Tokens the LLM processed, by kind (prompt, completion)",
                         ["kind"], registry=REGISTRY)
    LLM_SECONDS = Histogram("cotune_llm_request_duration_seconds",
                            "Admission to answer of a completion request", buckets=_LLM_BUCKETS,
                            registry=REGISTRY)
    LLM_HTTP = Counter("cotune_llm_http_responses", "JSON responses of the LLM server, by HTTP status",
                       ["status"], registry=REGISTRY)
else:  # pragma: no cover
    REGISTRY = None

_epsilon: dict[str, float] = {}
_lock = threading.Lock()
#: bounded label values: anything else is counted as "other"
_MAX_LABELS = 64
_seen_labels: dict[str, set[str]] = {}


def _label(family: str, value: Any) -> str:
    v = str(value or "unknown")[:48]
    seen = _seen_labels.setdefault(family, set())
    if v in seen:
        return v
    with _lock:
        if len(seen) >= _MAX_LABELS:
            return "other"
        seen.add(v)
    return v


def _safe(fn: Callable[..., None]) -> Callable[..., None]:
    def wrapper(*args, **kwargs) -> None:
        if not AVAILABLE:
            return
        try:
            fn(*args, **kwargs)
        except Exception:  # metrics never break a round
            log.debug("metrics hook %s failed", fn.__name__, exc_info=True)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# -- hooks (one line each at the call site) ------------------------------------------------------
@_safe
def round_opened() -> None:
    ROUNDS_OPENED.inc()


@_safe
def round_committed(metrics: Mapping[str, Any]) -> None:
    """A round committed with these round metrics (``seconds``, ``skipped`` when the global
    state was kept, ``dp_epsilon``/``epsilon`` when the algorithm accounts privacy)."""
    ROUNDS_COMMITTED.inc()
    if metrics.get("skipped"):
        reason = str(metrics["skipped"]).split(":")[0].strip().replace(" ", "_") or "skipped"
        ROUNDS_SKIPPED.labels(_label("skip", reason)).inc()
    seconds = metrics.get("seconds")
    if isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0:
        ROUND_SECONDS.observe(seconds)
    for key in ("dp_epsilon", "epsilon_spent", "epsilon"):
        eps = metrics.get(key)
        if isinstance(eps, (int, float)) and math.isfinite(eps):
            _epsilon["spent"] = float(eps)
            break


@_safe
def update_accepted(seconds: float | None = None) -> None:
    UPDATES_ACCEPTED.inc()
    if seconds is not None:
        INGEST_SECONDS.observe(seconds)


@_safe
def update_rejected(reason: str) -> None:
    UPDATES_REJECTED.labels(_label("reject", reason)).inc()


@_safe
def wire_rejected(reason: str) -> None:
    WIRE_REJECTED.labels(_label("wire", reason)).inc()


@_safe
def llm_request_done(kind: str, job: Any, timeout_s: float | None = None) -> None:
    """The LLM worker finished ``job`` (``kind`` "done" or "error"); with the request timeout
    the job's deadline tells when it was admitted."""
    LLM_REQUESTS.labels("ok" if kind == "done" else "error").inc()
    LLM_TOKENS.labels("prompt").inc(max(0, int(getattr(job, "prompt_tokens", 0) or 0)))
    LLM_TOKENS.labels("completion").inc(max(0, int(getattr(job, "completion_tokens", 0) or 0)))
    deadline = getattr(job, "deadline", None)
    if timeout_s is not None and isinstance(deadline, float):
        LLM_SECONDS.observe(max(0.0, time.monotonic() - (deadline - timeout_s)))


@_safe
def llm_http(status: int) -> None:
    LLM_HTTP.labels(_label("http", int(status))).inc()


# -- scrape-time gauges -------------------------------------------------------------------------
Sample = tuple[str, str, Mapping[str, str], float]


class _LiveCollector:
    """Gauges computed when Prometheus scrapes, from every registered source: a source is a
    function yielding ``(name, help, labels, value)`` tuples (``labels`` a dict)."""

    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[Sample]]] = []

    def describe(self):  # names are known only when scraped
        return []

    def collect(self):
        families: dict[str, Any] = {}
        rows: list[Sample] = []
        for fn in list(self.sources):
            try:
                rows.extend(fn())
            except Exception:
                log.debug("metrics source failed", exc_info=True)
        if _epsilon:
            rows.append(("cotune_dp_epsilon_spent",
                         "Privacy budget spent so far (reported by the algorithm when DP is on)", {},
                         _epsilon["spent"]))
        for name, text, labels, value in rows:
            if value is None:
                continue
            keys = sorted(labels)
            fam = families.get(name)
            if fam is None:  # a name ending in _total is a counter
                fam = families[name] = (CounterMetricFamily(name[:-6], text, labels=keys) if name.endswith("_total")
                                        else GaugeMetricFamily(name, text, labels=keys))
            fam.add_metric([str(labels[k]) for k in keys], float(value))
        yield from families.values()


_LIVE = _LiveCollector()
if AVAILABLE:
    REGISTRY.register(_LIVE)


def register_source(fn: Callable[[], Iterable[Sample]]) -> Callable[[], Iterable[Sample]]:
    """Add scrape-time gauges (for the life of a service: :func:`unregister_source`)."""
    _LIVE.sources.append(fn)
    return fn


def unregister_source(fn: Callable[[], Iterable[Sample]] | None) -> None:
    if fn is not None and fn in _LIVE.sources:
        _LIVE.sources.remove(fn)


def exposition() -> bytes:
    """The registry in the Prometheus text format."""
    if not AVAILABLE:
        return b"# prometheus_client is not installed\n"
    return generate_latest(REGISTRY)
