"""Fleet load testing: lightweight virtual devices over the real wire (``cotune fleet simulate``).

Names are imported on first use, so ``cotune --help`` does not load the wire stack."""

from __future__ import annotations

_EXPORTS = {
    "FleetOptions": "driver", "FleetRun": "driver", "RoundRow": "driver", "plot": "driver",
    "run_fleet": "driver", "table": "driver", "fake_update": "device", "num_examples_for": "device",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
