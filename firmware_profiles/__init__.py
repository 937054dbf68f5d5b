"""Device profiles (Jetson family, generic CUDA GPUs, this host) and the memory planner.

Standard library only, so it runs anywhere::

    from firmware_profiles import Workload, get_profile, plan, recommend

    orin = get_profile("orin-nano-8gb")
    p = plan("path/to/model", orin, Workload(quant="nf4", lora_rank=8, batch_size=2, seq_len=512))
    print(p.explain())
    best = recommend("path/to/model", orin)          # raises DoesNotFit when nothing fits
"""

from __future__ import annotations

from .errors import (
    DoesNotFit,
    ModelConfigError,
    ProfileError,
    UnknownProfileError,
    UnsupportedModelError,
    WorkloadError,
)
from .families import FAMILIES, Family, check_supported, family_of, unsupported_reason
from .planner import (
    DEFAULT_APP_RESERVE_BYTES,
    ModelShape,
    Plan,
    Workload,
    fmt_bytes,
    load_model_config,
    plan,
    recommend,
    require_fit,
    targets_for_model_type,
)
from .profiles import DeviceProfile, get_profile, host_memory, list_profiles, load_profiles

__all__ = [
    "DEFAULT_APP_RESERVE_BYTES",
    "FAMILIES",
    "DeviceProfile",
    "Family",
    "DoesNotFit",
    "ModelConfigError",
    "ModelShape",
    "Plan",
    "ProfileError",
    "UnknownProfileError",
    "UnsupportedModelError",
    "Workload",
    "WorkloadError",
    "check_supported",
    "family_of",
    "fmt_bytes",
    "get_profile",
    "host_memory",
    "list_profiles",
    "load_model_config",
    "load_profiles",
    "plan",
    "recommend",
    "require_fit",
    "targets_for_model_type",
    "unsupported_reason",
]
