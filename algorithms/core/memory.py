"""Peak-memory measurement and tensor byte counts.

What :class:`PeakMemory` measures depends on where the work runs:

- ``kind == "cuda_allocated"`` (the device is CUDA): the peak of
  ``torch.cuda.max_memory_allocated`` inside the block, i.e. bytes held by live tensors through
  PyTorch's caching allocator. It excludes the allocator's cached-but-free blocks, the CUDA
  context and other processes. ``peak_bytes`` is that absolute peak; ``baseline_bytes`` is
  ``memory_allocated`` when the block was entered.
- ``kind == "process_rss"`` (CPU, and Jetson-style unified memory seen from the host): the
  resident set size of the *whole process* (all threads, Python heap, libraries, model
  weights), sampled every ``interval_s`` seconds by a daemon thread, plus one sample at entry
  and one at exit. ``peak_bytes`` is the largest sample; a spike shorter than the sampling
  interval can be missed. Other threads of the process (e.g. a transport) are counted too.
  RSS is read with psutil when installed, else from ``/proc/self/status`` (``VmRSS``); when
  neither is readable the figures stay 0 and ``kind`` is ``"unavailable"``.

``delta_bytes`` is ``peak_bytes - baseline_bytes`` (never negative): what the block added on top
of what was already resident.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch

__all__ = ["PeakMemory", "current_rss_bytes", "tensor_bytes"]


def _rss_psutil() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    try:
        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:
        return None


def _rss_proc() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    parts = line.split()
                    return int(parts[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    """Resident set size of this process in bytes (psutil, else /proc), or None."""
    value = _rss_psutil()
    if value is None:
        value = _rss_proc()
    return value


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    return torch.device(device).type == "cuda"


class PeakMemory:
    """Context manager that records the peak memory used while its block runs.

    ``device``: a torch device (or string). CUDA devices use the CUDA allocator statistics;
    anything else samples the process RSS (see the module docstring for exact semantics).

    Example::

        with PeakMemory("cpu") as pm:
            train(...)
        print(pm.kind, pm.peak_bytes, pm.delta_bytes)
    """

    def __init__(self, device: Any = "cpu", interval_s: float = 0.01) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval_s = float(interval_s)
        self.kind = "cuda_allocated" if _is_cuda(self.device) else "process_rss"
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self.samples = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)

    def _sample(self) -> None:
        value = current_rss_bytes()
        if value is None:
            return
        self.samples += 1
        if value > self.peak_bytes:
            self.peak_bytes = value

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._t0 = time.perf_counter()
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = int(torch.cuda.memory_allocated(self.device))
            self.peak_bytes = self.baseline_bytes
            return self
        base = current_rss_bytes()
        if base is None:
            self.kind = "unavailable"
            return self
        self.baseline_bytes = base
        self.peak_bytes = base
        self.samples = 1
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cotune-peak-memory", daemon=True)
        self._thread.start()
        return self

    def update(self) -> int:
        """Take one sample now (CPU) or read the running CUDA peak; returns ``peak_bytes``."""
        if self.kind == "cuda_allocated":
            self.peak_bytes = max(
                self.peak_bytes, int(torch.cuda.max_memory_allocated(self.device))
            )
        elif self.kind == "process_rss":
            self._sample()
        return self.peak_bytes

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            self.update()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample()
        self.seconds = time.perf_counter() - self._t0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "baseline_bytes": self.baseline_bytes,
            "peak_bytes": self.peak_bytes,
            "delta_bytes": self.delta_bytes,
            "samples": self.samples,
            "seconds": round(self.seconds, 6),
        }


def _quant_state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Side tensors that bitsandbytes keeps outside ``parameters()`` (block scales, codebooks)."""
    out: list[torch.Tensor] = []
    weight = getattr(module, "weight", None)
    qs = getattr(weight, "quant_state", None)
    while qs is not None:  # 4-bit: absmax/code, nested state2 for double quantization
        for attr in ("absmax", "code", "offset"):
            t = getattr(qs, attr, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
        qs = getattr(qs, "state2", None)
    scb = getattr(weight, "SCB", None)  # 8-bit: per-row scales
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    return out


def tensor_bytes(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Bytes held by a model's tensors, each storage counted once (tied weights are shared).

    ``trainable_only=False``: parameters (quantized weights at their packed size), buffers, and
    the bitsandbytes quantization statistics stored beside the weights.
    ``trainable_only=True``: only parameters with ``requires_grad`` (e.g. the LoRA adapter),
    without optimizer state or gradients.
    """
    seen: set[tuple[str, int]] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if t.device.type == "meta":
            return
        key = (str(t.device), t.data_ptr())
        if key in seen and t.data_ptr() != 0:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        add(p)
    if not trainable_only:
        for b in model.buffers():
            add(b)
        for mod in model.modules():
            for t in _quant_state_tensors(mod):
                add(t)
    return total
