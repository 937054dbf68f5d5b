"""The hypothesis settings every fuzz property test runs under: deterministic in CI
(derandomized, no example database), modest example counts; the long runs are bench/fuzz.py."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

FAST = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
