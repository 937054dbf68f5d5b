"""Device profiles as data: the Jetson family, generic CUDA GPUs and this host's CPU.

The profiles live in ``devices.json`` next to this module (sizes in GiB, one shared
``software_stacks`` entry per JetPack branch merged into every profile that names it). They are
loaded once, validated, and exposed as frozen :class:`DeviceProfile` objects::

    from firmware_profiles import get_profile
    orin = get_profile("orin-nano-8gb")
    orin.available_bytes(app_reserve_bytes=256 << 20)   # what a training job may use
    orin.default_quant()                                  # "nf4"

Memory model of a profile: ``memory_bytes`` is the module's total DRAM. On Jetson it is shared
by CPU and GPU (``unified_memory``), so the planner budgets the whole process (Python, torch,
CUDA context, weights, activations) against ``memory_bytes - os_reserved_bytes - app reserve``.
``os_reserved_bytes`` is an estimate per device of what firmware carve-outs plus a headless L4T
keep (the note of each profile says how it was derived); override it with
:meth:`DeviceProfile.with_overrides` after measuring a unit with ``free -b``. On a discrete GPU
the budget is GPU memory only. ``generic-cpu`` reads this host's ``/proc/meminfo`` when loaded.

Only the standard library is used, so profiles and the planner work on any machine.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ProfileError, UnknownProfileError

__all__ = [
    "DEVICES_JSON",
    "GIB",
    "MIB",
    "QUANT_MODES",
    "DeviceProfile",
    "get_profile",
    "host_memory",
    "list_profiles",
    "load_profiles",
]

GIB = 1 << 30
MIB = 1 << 20
DEVICES_JSON = Path(__file__).with_name("devices.json")
QUANT_MODES: tuple[str, ...] = ("nf4", "int8", "bf16", "fp16", "fp32")
KINDS = ("jetson", "cuda", "cpu")


def host_memory() -> tuple[int, int]:
    """``(total, available)`` bytes of this host: ``/proc/meminfo`` (MemTotal, MemAvailable),
    else ``sysconf`` (available then taken as 90% of total)."""
    try:
        info: dict[str, int] = {}
        with open("/proc/meminfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    info[key] = int(parts[0]) * 1024  # kB
        total = info["MemTotal"]
        avail = info.get("MemAvailable", info.get("MemFree", total))
        return total, min(avail, total)
    except (OSError, KeyError):
        pass
    try:
        total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError) as exc:
        raise ProfileError(f"cannot read this host's memory size: {exc}") from exc
    return total, int(total * 0.9)


@dataclass(frozen=True)
class DeviceProfile:
    """One device: memory budget, GPU, software stack and what it can run.

    Sizes are bytes. ``compute_capability`` is ``"major.minor"`` (None on CPU). ``tops`` is
    NVIDIA's headline figure, explained by ``tops_note``. ``cuda_context_bytes`` is the
    estimated CUDA context + library workspace a PyTorch process pays on this device.
    """

    id: str
    name: str
    kind: str  # jetson | cuda | cpu
    accelerator: str  # cuda | cpu
    memory_bytes: int
    unified_memory: bool
    os_reserved_bytes: int
    os_reserved_note: str
    memory_type: str | None
    memory_bandwidth_gbps: float | None
    gpu_arch: str | None
    compute_capability: str | None
    gpu_cuda_cores: int | None
    gpu_tensor_cores: int | None
    cuda_version: str | None
    jetpack: str | None
    l4t: str | None
    ubuntu: str | None
    python_version: str | None
    bf16: bool
    fp16: bool
    training_supported: bool
    training_note: str
    bitsandbytes_usable: bool
    bitsandbytes_note: str
    onnxruntime_gpu: bool
    onnxruntime_note: str
    cuda_context_bytes: int
    cuda_context_note: str
    tops: float | None = None
    tops_note: str = ""
    power_modes: tuple[str, ...] = ()
    super_mode: bool = False
    base_profile: str | None = None
    aliases: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    software: str | None = None
    memory_from_host: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    # -- derived -------------------------------------------------------------------------
    @property
    def is_jetson(self) -> bool:
        return self.kind == "jetson"

    @property
    def cc(self) -> tuple[int, int] | None:
        """Compute capability as ``(major, minor)``, or None without a GPU."""
        if not self.compute_capability:
            return None
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    def available_bytes(self, app_reserve_bytes: int = 0) -> int:
        """Memory a job may use: total minus the OS's share minus ``app_reserve_bytes``
        (what the rest of the application keeps). Never negative."""
        if app_reserve_bytes < 0:
            raise ProfileError(f"app_reserve_bytes must be >= 0, got {app_reserve_bytes}")
        return max(0, self.memory_bytes - self.os_reserved_bytes - int(app_reserve_bytes))

    def compute_dtype(self, quant: str) -> str:
        """Activation dtype a load with ``quant`` uses here (mirrors ``load_causal_lm``):
        plain modes compute in their own dtype; nf4 in bf16 (fp16 without bf16) on CUDA; int8
        in fp16 on CUDA; both in fp32 on CPU."""
        if quant not in QUANT_MODES:
            raise ProfileError(f"unknown quant mode {quant!r}; choose one of {list(QUANT_MODES)}")
        if quant in ("bf16", "fp16", "fp32"):
            return quant
        if self.accelerator != "cuda":
            return "fp32"
        if quant == "int8":
            return "fp16"
        return "bf16" if self.bf16 else "fp16"

    def default_quant(self) -> str:
        """nf4 when bitsandbytes is usable for training here, else bf16 when the GPU has it,
        else fp16 on a GPU, else fp32."""
        if self.bitsandbytes_usable:
            return "nf4"
        if self.accelerator == "cuda":
            return "bf16" if self.bf16 else "fp16"
        return "fp32"

    def supported_quants(self) -> tuple[str, ...]:
        """Quant modes this device can train with (bitsandbytes modes only when usable)."""
        out = []
        if self.bitsandbytes_usable:
            out += ["nf4", "int8"]
        if self.bf16:
            out.append("bf16")
        if self.fp16 and self.accelerator == "cuda":
            out.append("fp16")
        out.append("fp32")
        return tuple(out)

    def with_overrides(self, **changes: Any) -> DeviceProfile:
        """A copy with some fields replaced, e.g. ``os_reserved_bytes`` measured on a unit."""
        try:
            new = dataclasses.replace(self, **changes)
        except TypeError as exc:
            raise ProfileError(f"cannot override profile {self.id!r}: {exc}") from exc
        _validate_profile(new)
        return new

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra", None)
        d["power_modes"] = list(self.power_modes)
        d["aliases"] = list(self.aliases)
        d["notes"] = list(self.notes)
        d["available_bytes"] = self.available_bytes()
        d["default_quant"] = self.default_quant()
        return d

    def describe(self) -> str:
        """Human-readable multi-line summary."""

        def gib(n: int) -> str:
            return f"{n / GIB:.2f} GiB"

        gpu = (
            f"{self.gpu_arch}, compute capability {self.compute_capability}"
            + (f", {self.gpu_cuda_cores} CUDA cores" if self.gpu_cuda_cores else "")
            + (f", {self.gpu_tensor_cores} tensor cores" if self.gpu_tensor_cores else "")
            if self.compute_capability
            else "none (CPU only)"
        )
        mem_kind = (
            "shared CPU/GPU"
            if self.unified_memory and self.accelerator == "cuda"
            else ("host RAM" if self.accelerator == "cpu" else "GPU memory")
        )
        lines = [
            f"{self.name}  [{self.id}]",
            f"  memory        {gib(self.memory_bytes)} {mem_kind}"
            + (f", {self.memory_type}" if self.memory_type and self.memory_type != mem_kind else "")
            + (f", {self.memory_bandwidth_gbps:g} GB/s" if self.memory_bandwidth_gbps else ""),
            f"  OS reserve    {gib(self.os_reserved_bytes)}  ({self.os_reserved_note})",
            f"  available     {gib(self.available_bytes())} before the application's own reserve",
            f"  GPU           {gpu}",
        ]
        if self.accelerator == "cuda":
            lines.append(
                f"  CUDA context  ~{gib(self.cuda_context_bytes)}  ({self.cuda_context_note})"
            )
        sw = []
        if self.jetpack:
            sw.append(f"JetPack {self.jetpack} (L4T {self.l4t}, Ubuntu {self.ubuntu})")
        if self.cuda_version:
            sw.append(f"CUDA {self.cuda_version}")
        if self.python_version:
            sw.append(f"Python {self.python_version}")
        if sw:
            lines.append("  software      " + ", ".join(sw))
        lines += [
            f"  precision     bf16 {'yes' if self.bf16 else 'no'}, fp16 "
            f"{'yes' if self.fp16 else 'no'}; default quant {self.default_quant()}",
            f"  training      {'supported' if self.training_supported else 'NOT supported'}: "
            f"{self.training_note}",
            f"  bitsandbytes  {'usable' if self.bitsandbytes_usable else 'unavailable'}: "
            f"{self.bitsandbytes_note}",
            f"  ONNX Runtime  {'GPU build available' if self.onnxruntime_gpu else 'CPU'}: "
            f"{self.onnxruntime_note}",
        ]
        if self.tops is not None:
            lines.append(f"  TOPS          {self.tops:g}  ({self.tops_note})")
        if self.power_modes:
            lines.append(f"  power modes   {', '.join(self.power_modes)}")
        if self.base_profile:
            lines.append(f"  variant of    {self.base_profile}")
        for n in self.notes:
            lines.append(f"  note          {n}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# loading and validation

_STR_OR_NONE = (
    "memory_type",
    "gpu_arch",
    "compute_capability",
    "cuda_version",
    "jetpack",
    "l4t",
    "ubuntu",
    "python_version",
    "base_profile",
    "software",
)
_REQUIRED_TEXT = (
    "id",
    "name",
    "kind",
    "accelerator",
    "os_reserved_note",
    "training_note",
    "bitsandbytes_note",
    "onnxruntime_note",
)
_REQUIRED_BOOL = (
    "unified_memory",
    "bf16",
    "fp16",
    "training_supported",
    "bitsandbytes_usable",
    "onnxruntime_gpu",
)


def _gib_to_bytes(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ProfileError(f"{what} must be a number of GiB >= 0, got {value!r}")
    return int(round(float(value) * GIB))


def _bytes_field(raw: dict[str, Any], name: str, where: str, default: int | None = None) -> int:
    if f"{name}_bytes" in raw and raw[f"{name}_bytes"] is not None:
        v = raw[f"{name}_bytes"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ProfileError(f"{where}: {name}_bytes must be an integer >= 0, got {v!r}")
        return v
    if f"{name}_gib" in raw and raw[f"{name}_gib"] is not None:
        return _gib_to_bytes(raw[f"{name}_gib"], f"{where}: {name}_gib")
    if default is not None:
        return default
    raise ProfileError(f"{where}: needs {name}_gib or {name}_bytes")


def _build(raw: dict[str, Any], stacks: dict[str, Any]) -> DeviceProfile:
    where = f"devices.json profile {raw.get('id', '?')!r}"
    merged: dict[str, Any] = {}
    sw = raw.get("software")
    if sw is not None:
        if sw not in stacks:
            raise ProfileError(f"{where}: unknown software stack {sw!r}; known: {sorted(stacks)}")
        merged.update(stacks[sw])
    merged.update(raw)
    if merged.get("memory_from_host"):
        total, avail = host_memory()
        merged["memory_bytes"] = total
        merged["os_reserved_bytes"] = total - avail
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(DeviceProfile)}
    kwargs["memory_bytes"] = _bytes_field(merged, "memory", where)
    kwargs["os_reserved_bytes"] = _bytes_field(merged, "os_reserved", where)
    kwargs["cuda_context_bytes"] = _bytes_field(merged, "cuda_context", where, default=0)
    extra = {}
    for key, value in merged.items():
        if key in ("memory_gib", "os_reserved_gib", "cuda_context_gib"):
            continue
        if key in kwargs:
            continue
        if key in names:
            kwargs[key] = value
        else:
            extra[key] = value
    for key in ("power_modes", "aliases", "notes"):
        v = kwargs.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ProfileError(f"{where}: {key} must be a list of strings, got {v!r}")
        kwargs[key] = tuple(v)
    kwargs.setdefault("cuda_context_note", "")
    kwargs["extra"] = extra
    try:
        prof = DeviceProfile(**kwargs)
    except TypeError as exc:
        raise ProfileError(f"{where}: {exc}") from exc
    _validate_profile(prof)
    return prof


def _validate_profile(p: DeviceProfile) -> None:
    where = f"device profile {p.id!r}"
    for name in _REQUIRED_TEXT:
        v = getattr(p, name)
        if not isinstance(v, str) or not v.strip():
            raise ProfileError(f"{where}: {name} must be a non-empty string, got {v!r}")
    for name in _REQUIRED_BOOL + ("super_mode", "memory_from_host"):
        if not isinstance(getattr(p, name), bool):
            raise ProfileError(f"{where}: {name} must be true/false, got {getattr(p, name)!r}")
    for name in _STR_OR_NONE:
        v = getattr(p, name)
        if v is not None and (not isinstance(v, str) or not v):
            raise ProfileError(f"{where}: {name} must be a string or null, got {v!r}")
    if p.id != p.id.strip().lower() or " " in p.id:
        raise ProfileError(f"{where}: ids are lower-case without spaces")
    if p.kind not in KINDS:
        raise ProfileError(f"{where}: kind must be one of {KINDS}, got {p.kind!r}")
    if p.accelerator not in ("cuda", "cpu"):
        raise ProfileError(f"{where}: accelerator must be 'cuda' or 'cpu', got {p.accelerator!r}")
    if p.memory_bytes <= 0:
        raise ProfileError(f"{where}: memory must be > 0")
    if not 0 <= p.os_reserved_bytes < p.memory_bytes:
        raise ProfileError(
            f"{where}: os_reserved_bytes ({p.os_reserved_bytes}) must be >= 0 and below the "
            f"total memory ({p.memory_bytes})"
        )
    if p.cuda_context_bytes < 0:
        raise ProfileError(f"{where}: cuda_context_bytes must be >= 0")
    if p.accelerator == "cuda":
        cc = p.compute_capability
        parts = cc.split(".") if isinstance(cc, str) else []
        if len(parts) != 2 or not all(x.isdigit() for x in parts):
            raise ProfileError(f"{where}: compute_capability must look like '8.7', got {cc!r}")
        if not p.fp16:
            raise ProfileError(f"{where}: every CUDA GPU profiled here supports fp16")
        if p.bf16 and int(parts[0]) < 8:
            raise ProfileError(f"{where}: bf16 needs compute capability >= 8.0 (Ampere)")
    if p.kind == "jetson":
        if not p.unified_memory:
            raise ProfileError(f"{where}: Jetson memory is unified (shared CPU/GPU)")
        for name in ("jetpack", "l4t", "cuda_version", "python_version"):
            if not getattr(p, name):
                raise ProfileError(f"{where}: Jetson profiles need {name}")
        py = tuple(int(x) for x in str(p.python_version).split(".")[:2])
        if p.training_supported and py < (3, 10):
            raise ProfileError(f"{where}: training needs Python >= 3.10 (JetPack 6)")
    if p.tops is not None and (
        isinstance(p.tops, bool) or not isinstance(p.tops, (int, float)) or p.tops <= 0
    ):
        raise ProfileError(f"{where}: tops must be a positive number or null, got {p.tops!r}")
    for name in ("memory_bandwidth_gbps",):
        v = getattr(p, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise ProfileError(f"{where}: {name} must be a positive number or null, got {v!r}")
    for name in ("gpu_cuda_cores", "gpu_tensor_cores"):
        v = getattr(p, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ProfileError(f"{where}: {name} must be an integer >= 0 or null, got {v!r}")


_CACHE: dict[str, dict[str, DeviceProfile]] = {}


def load_profiles(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """All profiles of ``path`` (default: the bundled ``devices.json``), keyed by id, validated.

    Raises :class:`ProfileError` naming the profile and field when the file is malformed.
    The bundled file is parsed once per process (``generic-cpu`` is re-read from the host on
    every call, so it reflects the memory available now).
    """
    p = Path(path) if path is not None else DEVICES_JSON
    key = str(p.resolve())
    cached = _CACHE.get(key)
    if cached is not None:
        return {k: (_refresh_host(v) if v.memory_from_host else v) for k, v in cached.items()}
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProfileError(f"cannot read device profiles from {p}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("profiles"), list):
        raise ProfileError(f"{p}: expected an object with a 'profiles' list")
    if doc.get("schema") != 1:
        raise ProfileError(f"{p}: unsupported schema {doc.get('schema')!r} (expected 1)")
    stacks = doc.get("software_stacks", {})
    if not isinstance(stacks, dict):
        raise ProfileError(f"{p}: software_stacks must be an object")
    out: dict[str, DeviceProfile] = {}
    names: dict[str, str] = {}
    for raw in doc["profiles"]:
        if not isinstance(raw, dict):
            raise ProfileError(f"{p}: every profile must be an object, got {raw!r}")
        prof = _build(raw, stacks)
        for name in (prof.id, *prof.aliases):
            if name in names:
                raise ProfileError(
                    f"{p}: name {name!r} used by both {names[name]!r} and {prof.id!r}"
                )
            names[name] = prof.id
        out[prof.id] = prof
    for prof in out.values():
        if prof.base_profile is not None and prof.base_profile not in out:
            raise ProfileError(f"{p}: {prof.id!r} names unknown base_profile {prof.base_profile!r}")
        if prof.base_profile is not None:
            base = out[prof.base_profile]
            if base.memory_bytes != prof.memory_bytes:
                raise ProfileError(f"{p}: {prof.id!r} must have the memory of {base.id!r}")
    _CACHE[key] = out
    return dict(out)


def _refresh_host(p: DeviceProfile) -> DeviceProfile:
    total, avail = host_memory()
    return dataclasses.replace(p, memory_bytes=total, os_reserved_bytes=total - avail)


def list_profiles(kind: str | None = None, path: str | Path | None = None) -> list[DeviceProfile]:
    """Profiles in file order, optionally only one ``kind`` (jetson | cuda | cpu)."""
    if kind is not None and kind not in KINDS:
        raise ProfileError(f"kind must be one of {KINDS}, got {kind!r}")
    profs = list(load_profiles(path).values())
    return [p for p in profs if kind is None or p.kind == kind]


def get_profile(profile_id: str, path: str | Path | None = None) -> DeviceProfile:
    """The profile with this id or alias (case-insensitive).

    Raises :class:`~firmware_profiles.errors.UnknownProfileError` (a :class:`ProfileError`)
    listing the closest known ids when there is none.
    """
    if isinstance(profile_id, DeviceProfile):
        return profile_id
    if not isinstance(profile_id, str) or not profile_id.strip():
        raise ProfileError(f"profile id must be a non-empty string, got {profile_id!r}")
    profs = load_profiles(path)
    want = profile_id.strip().lower().replace("_", "-")
    if want in profs:
        return profs[want]
    for prof in profs.values():
        if want in prof.aliases:
            return prof
    names = list(profs) + [a for p in profs.values() for a in p.aliases]
    close = difflib.get_close_matches(want, names, n=4, cutoff=0.5)
    close += [n for n in profs if want in n and n not in close]
    resolved = []
    for n in close:
        pid = n if n in profs else next(p.id for p in profs.values() if n in p.aliases)
        if pid not in resolved:
            resolved.append(pid)
    raise UnknownProfileError(profile_id, resolved[:5], list(profs))
