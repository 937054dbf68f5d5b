"""Typed errors of :mod:`firmware_profiles` (device profiles and the memory planner).

Every error derives from :class:`ProfileError`, so a runtime can catch the whole family with one
``except``. Errors that describe bad input also derive from ``ValueError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .planner import Plan

__all__ = [
    "DoesNotFit",
    "ModelConfigError",
    "ProfileError",
    "UnknownProfileError",
    "UnsupportedModelError",
    "WorkloadError",
]


class ProfileError(Exception):
    """Base class of every error raised by ``firmware_profiles``."""


class UnknownProfileError(ProfileError, KeyError):
    """No device profile has the requested id; ``suggestions`` holds the closest ids."""

    def __init__(self, profile_id: str, suggestions: list[str], known: list[str]) -> None:
        self.profile_id = profile_id
        self.suggestions = list(suggestions)
        self.known = list(known)
        hint = (
            f"did you mean {', '.join(repr(s) for s in self.suggestions)}?"
            if self.suggestions
            else f"known profiles: {', '.join(self.known)}"
        )
        super().__init__(f"unknown device profile {profile_id!r}; {hint}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ModelConfigError(ProfileError, ValueError):
    """A model ``config.json`` is unreadable or lacks the fields the planner needs."""


class UnsupportedModelError(ModelConfigError):
    """A model family no path of cotune takes (mixture-of-experts models): the message names
    the family and what is unsupported; ``model_type`` is the config's."""

    def __init__(self, message: str, model_type: str = "") -> None:
        super().__init__(message)
        self.model_type = model_type


class WorkloadError(ProfileError, ValueError):
    """A workload (quantization, LoRA rank, batch, sequence length, ...) is invalid."""


class DoesNotFit(ProfileError):
    """A training/inference job does not fit the device's memory budget.

    ``plan`` is the :class:`~firmware_profiles.planner.Plan` that did not fit (for
    :func:`~firmware_profiles.planner.recommend`: the smallest configuration it tried);
    ``short_by_bytes`` how much memory is missing; ``suggestion`` a plan that fits (or None).
    """

    def __init__(self, message: str, plan: Plan, suggestion: Plan | None = None) -> None:
        super().__init__(message)
        self.plan = plan
        self.suggestion = suggestion

    @property
    def short_by_bytes(self) -> int:
        return max(0, -int(self.plan.headroom_bytes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": str(self),
            "short_by_bytes": self.short_by_bytes,
            "plan": self.plan.to_dict(),
            "suggestion": self.suggestion.to_dict() if self.suggestion is not None else None,
        }
