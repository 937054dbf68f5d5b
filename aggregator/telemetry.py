"""Device telemetry over time: what each accepted update said about its device, per round.

An update carries metrics beside its tensors (``edge_sdk.client``): training time, peak memory
and how it was measured (CUDA allocator or process RSS), bytes down, tokens/s, the held-out
perplexity before and after local training, and, on a Jetson with ``tegrastats`` or jtop, a
power summary (``edge_sdk.tegrastats.TegraSummary.to_dict()`` under ``power``). The service
stores them with the participant row of that round (plus ``bytes_up``, measured on its side),
so the ledger already holds the device's history; this module picks the known, numeric fields
out of it. Client-supplied metrics are never shown wholesale: a field not listed in
:data:`FIELDS` does not reach a page, a table or a CSV, and a value of the wrong type becomes
empty.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

#: (column, description) in the order of tables and CSV files
FIELDS: tuple[tuple[str, str], ...] = (
    ("round", "round number"),
    ("client", "device id"),
    ("status", "accepted / rejected / dropped / selected"),
    ("received_at", "when the update arrived (unix seconds)"),
    ("num_examples", "examples trained on"),
    ("seconds", "task time on the device: download, train, evaluate"),
    ("peak_memory_bytes", "peak memory of the task"),
    ("peak_memory_kind", "how the peak was measured (cuda allocator, process RSS)"),
    ("bytes_up", "bytes the aggregator received from the device this round"),
    ("bytes_down", "bytes the device received since its previous round"),
    ("tokens_per_s", "training throughput"),
    ("train_loss", "mean training loss"),
    ("ppl_before", "held-out perplexity before local training"),
    ("ppl_after", "held-out perplexity after local training"),
    ("power_mean_w", "mean power while the task ran (tegrastats / jtop)"),
    ("power_peak_w", "peak power"),
    ("energy_j", "energy of the task"),
    ("temperature_peak_c", "hottest sensor while the task ran"),
    ("quant", "weights' precision on the device"),
)
COLUMNS = tuple(name for name, _ in FIELDS)

_WORD = re.compile(r"[^A-Za-z0-9_.+\-]")


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _word(value: Any, limit: int = 24) -> str | None:
    """A short label (a memory kind, a precision): letters, digits and ``_.+-`` only."""
    if not isinstance(value, str) or not value:
        return None
    return _WORD.sub("", value)[:limit] or None


def _dig(m: Mapping[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(m, Mapping):
            return None
        m = m.get(key)
    return m


def _temperature(value: Any) -> float | None:
    if isinstance(value, Mapping):
        temps = [t for t in (_num(v) for v in value.values()) if t is not None and t > -100]
        return max(temps) if temps else None
    return _num(value)


def extract(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The known telemetry fields of one update's metrics (None where absent or malformed)."""
    m = metrics if isinstance(metrics, Mapping) else {}
    power = m.get("power") if isinstance(m.get("power"), Mapping) else {}
    mw_mean = _num(power.get("power_mean_mw")) if power else None
    mw_peak = _num(power.get("power_peak_mw")) if power else None
    if mw_mean is None:
        mw_mean = _num(m.get("power_mean_mw"))
    if mw_peak is None:
        mw_peak = _num(m.get("power_peak_mw"))
    temp = _temperature(power.get("temperature_peak_c")) if power else None
    if temp is None:
        temp = _temperature(m.get("temperature_peak_c"))
    tps = _num(_dig(m, "train", "tokens_per_s"))
    return {
        "seconds": _num(m.get("seconds")),
        "peak_memory_bytes": _num(m.get("peak_memory_bytes")),
        "peak_memory_kind": _word(m.get("peak_memory_kind")),
        "bytes_up": _num(m.get("bytes_up")),
        "bytes_down": _num(m.get("bytes_down")),
        "tokens_per_s": tps if tps is not None else _num(m.get("tokens_per_s")),
        "train_loss": _num(_dig(m, "train", "loss_mean")),
        "ppl_before": _num(m.get("ppl_before")),
        "ppl_after": _num(m.get("ppl_after")),
        "power_mean_w": None if mw_mean is None else mw_mean / 1000.0,
        "power_peak_w": None if mw_peak is None else mw_peak / 1000.0,
        "energy_j": _num(power.get("energy_j")) if power else _num(m.get("energy_j")),
        "temperature_peak_c": temp,
        "quant": _word(m.get("quant")),
    }


def row(round: int, client: str, status: str, received_at: float | None, num_examples: int | None,
        metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"round": round, "client": client, "status": status, "received_at": received_at,
            "num_examples": num_examples, **extract(metrics)}


def to_csv(rows: Iterable[Mapping[str, Any]], out: io.TextIOBase | None = None) -> str | None:
    """Rows as CSV with a header (:data:`COLUMNS`); written to ``out``, else returned."""
    buf = out if out is not None else io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(c) is None else _csv_value(r.get(c)) for c in COLUMNS])
    return None if out is not None else buf.getvalue()


def _csv_value(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v)
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@"):  # no formulas in a spreadsheet
        return "'" + v
    return v
