"""Power and memory of a Jetson while a job runs: ``tegrastats`` lines parsed, sampled, summed up.

:func:`parse_tegrastats_line` turns one line of NVIDIA's ``tegrastats`` into a
:class:`TegraSample`. The format differs across JetPack releases and module families, and the
parser accepts all of them:

- JetPack 4 (Nano, TX2): ``RAM 2268/3964MB (lfb 121x4MB) SWAP 0/1982MB (cached 0MB) IRAM ...
  CPU [17%@1479,off,...] EMC_FREQ 4%@1600 GR3D_FREQ 0%@921 ... GPU@35.5C ... POM_5V_IN
  2473/2473 POM_5V_GPU 0/0``: rails as ``current/average`` milliwatts without a unit (Nano:
  ``POM_*``; TX2: ``VDD_IN``, ``VDD_SYS_*``);
- JetPack 5 (Xavier, Orin): the same with ``mW`` after each number (``VDD_IN 3832mW/3832mW``),
  ``GR3D_FREQ 0%@[305,305]`` (one clock per GPC on Orin) and ``-256C`` for switched-off sensors;
- JetPack 6 (Orin): a ``MM-DD-YYYY HH:MM:SS`` timestamp in front and lower-case sensor names
  (``cpu@48.375C``).

Without root some releases hide clocks (``EMC_FREQ 0%``); fields that are absent stay None.
tegrastats' ``MB`` are binary (it divides kB by 1024), so bytes = MB * 2**20.

Total power: the module's input rail when the device reports one (a rail whose name ends in
``_IN``: ``VDD_IN`` on TX2/Xavier NX/Orin NX/Orin Nano, ``POM_5V_IN`` on Nano), else the sum
of all rails (AGX Xavier and AGX Orin report no input rail; jetson-stats sums them too).
:attr:`TegraSample.total_source` says which.

:class:`TegraSampler` runs ``tegrastats --interval MS`` in a subprocess (or, when the binary is
absent, polls jetson-stats' ``jtop`` if that package is importable) while a job runs, and
:meth:`TegraSampler.summary` gives mean/peak power and RAM over the whole run or a time window.
On a machine with neither, ``summary()`` is None and :attr:`TegraSampler.reason` says why.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "CpuCore",
    "PowerRail",
    "TegraSample",
    "TegraSampler",
    "TegraSummary",
    "TegrastatsParseError",
    "parse_tegrastats_line",
    "summarize_samples",
]

MIB = 1 << 20
_UNIT = {"kB": 1024, "KB": 1024, "MB": MIB, "GB": 1 << 30}
#: tegrastats prints this for a thermal zone that is switched off
_OFFLINE_TEMP_C = -256.0

_TIMESTAMP = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
_RAM = re.compile(r"(?<![A-Z])RAM (\d+)/(\d+)([kKMG]B)(?: \(lfb (\d+)x(\d+)([kKMG]B)\))?")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)([kKMG]B)(?: \(cached (\d+)([kKMG]B)\))?")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@(\[[\d,\s]*\]|\d+))?")
_TEMP = re.compile(r"(?<![\w%])([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C(?=\s|$)")
_RAIL = re.compile(r"(?<!\S)([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_NOT_RAILS = {"RAM", "SWAP", "IRAM"}


class TegrastatsParseError(ValueError):
    """A line is not tegrastats output (none of RAM, CPU or power rails found in it)."""


@dataclass(frozen=True)
class CpuCore:
    """One core: load in percent and clock in MHz (None where the line omits it)."""

    load_pct: int
    freq_mhz: int | None = None


@dataclass(frozen=True)
class PowerRail:
    """One INA3221 channel: instantaneous and running-average power in milliwatts."""

    name: str
    current_mw: int
    average_mw: int


@dataclass(frozen=True)
class TegraSample:
    """One parsed tegrastats line. Sizes in bytes; ``cpu`` has None for an offline core;
    ``gpu_freq_mhz`` is the highest clock when the line lists one per GPC."""

    timestamp: datetime | None = None
    ram_used_bytes: int | None = None
    ram_total_bytes: int | None = None
    lfb_blocks: int | None = None
    lfb_block_bytes: int | None = None
    swap_used_bytes: int | None = None
    swap_total_bytes: int | None = None
    swap_cached_bytes: int | None = None
    cpu: tuple[CpuCore | None, ...] = ()
    emc_load_pct: int | None = None
    emc_freq_mhz: int | None = None
    gpu_load_pct: int | None = None
    gpu_freq_mhz: int | None = None
    gpu_freqs_mhz: tuple[int, ...] = ()
    temperatures_c: dict[str, float] = field(default_factory=dict)
    rails: dict[str, PowerRail] = field(default_factory=dict)
    raw: str = ""

    @property
    def input_rail(self) -> str | None:
        """The module's input rail (name ending in ``_IN``), or None."""
        for name in self.rails:
            if name.endswith("_IN"):
                return name
        return None

    @property
    def total_power_mw(self) -> int | None:
        """Input-rail power, else the sum of all rails, else None (no rails on the line)."""
        rail = self.input_rail
        if rail is not None:
            return self.rails[rail].current_mw
        if self.rails:
            return sum(r.current_mw for r in self.rails.values())
        return None

    @property
    def total_source(self) -> str | None:
        """Where :attr:`total_power_mw` comes from: the rail's name, ``"sum of rails"``, None."""
        rail = self.input_rail
        if rail is not None:
            return rail
        return "sum of rails" if self.rails else None

    @property
    def cpu_load_mean_pct(self) -> float | None:
        """Mean load of the online cores."""
        online = [c.load_pct for c in self.cpu if c is not None]
        return sum(online) / len(online) if online else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "timestamp": self.timestamp.isoformat() if self.timestamp else None,
            "ram_used_bytes": self.ram_used_bytes,
            "ram_total_bytes": self.ram_total_bytes,
            "swap_used_bytes": self.swap_used_bytes,
            "swap_total_bytes": self.swap_total_bytes,
            "cpu": [None if c is None else [c.load_pct, c.freq_mhz] for c in self.cpu],
            "emc_load_pct": self.emc_load_pct,
            "emc_freq_mhz": self.emc_freq_mhz,
            "gpu_load_pct": self.gpu_load_pct,
            "gpu_freq_mhz": self.gpu_freq_mhz,
            "temperatures_c": dict(self.temperatures_c),
            "rails_mw": {n: [r.current_mw, r.average_mw] for n, r in self.rails.items()},
            "total_power_mw": self.total_power_mw,
            "total_source": self.total_source,
        }


def _size(value: str, unit: str) -> int:
    return int(value) * _UNIT[unit if unit != "KB" else "kB"]


def parse_tegrastats_line(line: str) -> TegraSample:
    """Parse one line of ``tegrastats`` output (any JetPack 4/5/6 format, see the module
    docstring). Raises :class:`TegrastatsParseError` when the line has no RAM, CPU or power
    field; fields a line lacks are None/empty in the sample."""
    text = line.strip()
    kw: dict[str, Any] = {"raw": text}
    m = _TIMESTAMP.match(text)
    if m:
        try:
            kw["timestamp"] = datetime.strptime(m.group(1), "%m-%d-%Y %H:%M:%S")
        except ValueError:
            kw["timestamp"] = None
        text = text[m.end() :]
    m = _RAM.search(text)
    if m:
        kw["ram_used_bytes"] = _size(m.group(1), m.group(3))
        kw["ram_total_bytes"] = _size(m.group(2), m.group(3))
        if m.group(4):
            kw["lfb_blocks"] = int(m.group(4))
            kw["lfb_block_bytes"] = _size(m.group(5), m.group(6))
    m = _SWAP.search(text)
    if m:
        kw["swap_used_bytes"] = _size(m.group(1), m.group(3))
        kw["swap_total_bytes"] = _size(m.group(2), m.group(3))
        if m.group(4):
            kw["swap_cached_bytes"] = _size(m.group(4), m.group(5))
    m = _CPU.search(text)
    if m:
        cores: list[CpuCore | None] = []
        for item in m.group(1).split(","):
            item = item.strip()
            core = _CORE.match(item)
            if core:
                freq = int(core.group(2)) if core.group(2) else None
                cores.append(CpuCore(int(core.group(1)), freq))
            elif item:  # "off" (a parked core)
                cores.append(None)
        kw["cpu"] = tuple(cores)
    m = _EMC.search(text)
    if m:
        kw["emc_load_pct"] = int(m.group(1))
        kw["emc_freq_mhz"] = int(m.group(2)) if m.group(2) else None
    m = _GR3D.search(text)
    if m:
        kw["gpu_load_pct"] = int(m.group(1))
        freqs = tuple(int(f) for f in re.findall(r"\d+", m.group(2) or ""))
        kw["gpu_freqs_mhz"] = freqs
        kw["gpu_freq_mhz"] = max(freqs) if freqs else None
    temps = {}
    for name, value in _TEMP.findall(text):
        t = float(value)
        if t > _OFFLINE_TEMP_C:
            temps[name] = t
    kw["temperatures_c"] = temps
    rails = {}
    for name, cur, avg in _RAIL.findall(text):
        if name not in _NOT_RAILS:
            rails[name] = PowerRail(name, int(cur), int(avg))
    kw["rails"] = rails
    if "ram_used_bytes" not in kw and "cpu" not in kw and not rails:
        raise TegrastatsParseError(f"not a tegrastats line: {line.strip()[:120]!r}")
    return TegraSample(**kw)


# ------------------------------------------------------------------------------------------
# summaries


@dataclass(frozen=True)
class TegraSummary:
    """Aggregate of the samples taken while a job ran. Power in milliwatts, sizes in bytes.

    ``ram_used_*`` is the whole system's used RAM (on Jetson shared by CPU and GPU);
    ``ram_used_rise_bytes`` is the peak minus the first sample, i.e. what the job added.
    ``energy_j`` integrates the total power over the samples' times.
    """

    source: str
    samples: int
    seconds: float
    interval_ms: int
    power_mean_mw: float | None
    power_peak_mw: int | None
    power_source: str | None
    energy_j: float | None
    rails_mean_mw: dict[str, float]
    rails_peak_mw: dict[str, int]
    ram_used_mean_bytes: float | None
    ram_used_peak_bytes: int | None
    ram_used_rise_bytes: int | None
    ram_total_bytes: int | None
    gpu_load_mean_pct: float | None
    cpu_load_mean_pct: float | None
    temperature_peak_c: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_samples(
    timed: list[tuple[float, TegraSample]], source: str = "tegrastats", interval_ms: int = 0
) -> TegraSummary | None:
    """Aggregate ``(unix time, sample)`` pairs; None when there are none."""
    if not timed:
        return None
    samples = [s for _, s in timed]
    times = [t for t, _ in timed]
    power = [(t, s.total_power_mw) for t, s in timed if s.total_power_mw is not None]
    energy = None
    if len(power) >= 2:
        energy = 0.0
        for (t0, p0), (t1, p1) in zip(power, power[1:], strict=False):  # trapezoids, mW * s -> J
            energy += 0.5 * (p0 + p1) * (t1 - t0) / 1000.0
    rails: dict[str, list[int]] = {}
    for s in samples:
        for name, rail in s.rails.items():
            rails.setdefault(name, []).append(rail.current_mw)
    ram = [s.ram_used_bytes for s in samples if s.ram_used_bytes is not None]
    temps: dict[str, float] = {}
    for s in samples:
        for name, t in s.temperatures_c.items():
            temps[name] = max(t, temps.get(name, -math.inf))
    sources = [s.total_source for s in samples if s.total_source]
    totals = [s.ram_total_bytes for s in samples if s.ram_total_bytes]
    return TegraSummary(
        source=source,
        samples=len(samples),
        seconds=round(times[-1] - times[0], 3) if len(times) > 1 else 0.0,
        interval_ms=interval_ms,
        power_mean_mw=_mean([p for _, p in power]),
        power_peak_mw=max((p for _, p in power), default=None),
        power_source=sources[-1] if sources else None,
        energy_j=round(energy, 4) if energy is not None else None,
        rails_mean_mw={n: sum(v) / len(v) for n, v in rails.items()},
        rails_peak_mw={n: max(v) for n, v in rails.items()},
        ram_used_mean_bytes=_mean([float(r) for r in ram]),
        ram_used_peak_bytes=max(ram) if ram else None,
        ram_used_rise_bytes=max(ram) - ram[0] if ram else None,
        ram_total_bytes=totals[-1] if totals else None,
        gpu_load_mean_pct=_mean(
            [float(s.gpu_load_pct) for s in samples if s.gpu_load_pct is not None]
        ),
        cpu_load_mean_pct=_mean([c for s in samples if (c := s.cpu_load_mean_pct) is not None]),
        temperature_peak_c=temps,
    )


# ------------------------------------------------------------------------------------------
# sampling


def _jtop_importable() -> tuple[bool, str]:
    try:
        import jtop  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"jetson-stats (jtop) is not importable ({type(exc).__name__}: {exc})"
    return True, "jetson-stats (jtop)"


class TegraSampler:
    """Samples a Jetson's power rails and RAM in the background while a job runs.

    Sources, in order: the ``tegrastats`` binary (``binary`` or the one on ``PATH``), run as
    ``tegrastats --interval MS``; else jetson-stats' ``jtop`` service when its Python package
    is importable (``use_jtop``). With neither, :meth:`start` does nothing, :meth:`summary`
    returns None and :attr:`reason` explains::

        with TegraSampler(interval_ms=200) as ts:
            run_job()
        print(ts.summary() or ts.reason)
    """

    def __init__(
        self, interval_ms: int = 500, *, binary: str | None = None, use_jtop: bool = True
    ) -> None:
        if isinstance(interval_ms, bool) or not isinstance(interval_ms, int) or interval_ms < 10:
            raise ValueError(f"interval_ms must be an integer >= 10, got {interval_ms!r}")
        self.interval_ms = interval_ms
        self.binary = binary
        self.use_jtop = use_jtop
        self.source: str | None = None
        self.reason = ""
        self.bad_lines = 0
        self.error: str | None = None
        self._samples: list[tuple[float, TegraSample]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def probe(binary: str | None = None, use_jtop: bool = True) -> tuple[str | None, str]:
        """``(source, reason)``: ``"tegrastats"`` / ``"jtop"`` / None, and why."""
        path = shutil.which(binary or "tegrastats")
        if path:
            return "tegrastats", f"tegrastats at {path}"
        why = f"no {binary or 'tegrastats'} binary on PATH (not a Jetson, or L4T tools missing)"
        if use_jtop:
            ok, jwhy = _jtop_importable()
            if ok:
                return "jtop", jwhy
            why += f"; {jwhy}"
        return None, why

    @property
    def available(self) -> bool:
        return self.source is not None

    def samples(self) -> list[tuple[float, TegraSample]]:
        with self._lock:
            return list(self._samples)

    def start(self) -> TegraSampler:
        source, why = self.probe(self.binary, self.use_jtop)
        self.source, self.reason = source, why
        if source is None:
            return self
        self._stop.clear()
        if source == "tegrastats":
            path = shutil.which(self.binary or "tegrastats")
            assert path is not None
            try:
                self._proc = subprocess.Popen(
                    [path, "--interval", str(self.interval_ms)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    bufsize=1,
                )
            except OSError as exc:
                self.source, self.reason = None, f"cannot run {path}: {exc}"
                return self
            target = self._read_tegrastats
        else:
            target = self._poll_jtop
        self._thread = threading.Thread(target=target, name="cotune-tegrastats", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> TegraSummary | None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._proc = None
        return self.summary()

    def __enter__(self) -> TegraSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def summary(
        self, since: float | None = None, until: float | None = None
    ) -> TegraSummary | None:
        """Aggregate of the samples taken between the unix times ``since`` and ``until``
        (default: all). None without a source or without samples in the window."""
        if self.source is None:
            return None
        picked = [
            (t, s)
            for t, s in self.samples()
            if (since is None or t >= since) and (until is None or t <= until)
        ]
        if not picked and self.error and not self.reason.endswith(self.error):
            self.reason += f"; {self.error}"
        return summarize_samples(picked, self.source, self.interval_ms)

    # -- sources ---------------------------------------------------------------------------
    def _add(self, sample: TegraSample) -> None:
        with self._lock:
            self._samples.append((time.time(), sample))

    def _read_tegrastats(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            if not line.strip():
                continue
            try:
                self._add(parse_tegrastats_line(line))
            except TegrastatsParseError:
                self.bad_lines += 1

    def _poll_jtop(self) -> None:
        try:
            from jtop import jtop

            with jtop(interval=self.interval_ms / 1000.0) as jetson:
                while not self._stop.is_set() and jetson.ok():
                    sample = _sample_from_jtop(jetson)
                    if sample is not None:
                        self._add(sample)
        except Exception as exc:  # the jtop service is down, or a different jtop version
            self.error = f"jtop failed: {type(exc).__name__}: {exc}"


def _sample_from_jtop(jetson: Any) -> TegraSample | None:
    """A :class:`TegraSample` from jetson-stats 4.x (``jetson.power`` rails in mW,
    ``jetson.memory['RAM']`` in kB); None when this jtop version exposes neither."""
    rails: dict[str, PowerRail] = {}
    power = getattr(jetson, "power", None) or {}
    for name, rail in (power.get("rail") or {}).items():
        if isinstance(rail, dict) and "power" in rail:
            rails[name] = PowerRail(name, int(rail["power"]), int(rail.get("avg", rail["power"])))
    tot = power.get("tot")
    if isinstance(tot, dict) and "power" in tot and not any(n.endswith("_IN") for n in rails):
        name = str(tot.get("name") or "VDD_IN")
        name = name if name.endswith("_IN") else "TOTAL_IN"
        rails[name] = PowerRail(name, int(tot["power"]), int(tot.get("avg", tot["power"])))
    ram = (getattr(jetson, "memory", None) or {}).get("RAM") or {}
    used = ram.get("used")
    total = ram.get("tot")
    if not rails and used is None:
        return None
    return TegraSample(
        ram_used_bytes=int(used) * 1024 if used is not None else None,
        ram_total_bytes=int(total) * 1024 if total is not None else None,
        rails=rails,
        raw="jtop",
    )
