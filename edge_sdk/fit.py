"""Will a training task fit this device? The memory planner, asked the way a device asks.

:func:`check_task_fits` plans a task as the edge client would run it (the task's LoRA and
training dicts, the client's quantization and checkpointing) on a device profile, and returns
a :class:`FitDecision` whose ``message`` carries the numbers, so a client can refuse a task it
cannot hold before it loads anything. :func:`choose_defaults` is the planner's recommendation
for a device, in the names of ``TrainConfig`` / ``LoraSpec``.

Only the model's ``config.json`` is read (no weights, no torch), so both work on any machine.
Errors are the planner's typed ones: :class:`~firmware_profiles.UnknownProfileError`,
:class:`~firmware_profiles.ModelConfigError` (:class:`~firmware_profiles.UnsupportedModelError`
for a family no path takes: mixture-of-experts models), :class:`~firmware_profiles.WorkloadError`
(all :class:`~firmware_profiles.ProfileError`), and :class:`~firmware_profiles.DoesNotFit` from
:func:`choose_defaults` when nothing fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_profiles import (
    DEFAULT_APP_RESERVE_BYTES,
    DeviceProfile,
    ModelShape,
    Plan,
    Workload,
    WorkloadError,
    check_supported,
    fmt_bytes,
    get_profile,
    load_model_config,
    plan,
    recommend,
    targets_for_model_type,
)

__all__ = [
    "DEFAULT_SEQ_LEN",
    "FitDecision",
    "check_task_fits",
    "choose_defaults",
    "effective_quant",
    "workload_for_task",
]

#: sequence length planned when a task's ``train`` dict leaves ``block_size`` unset
DEFAULT_SEQ_LEN = 256


@dataclass(frozen=True)
class FitDecision:
    """The planner's verdict on one task. ``budget_bytes`` is what the device leaves a job
    (memory - OS reserve - application reserve); ``breakdown`` the planned terms at the peak
    (they sum to ``planned_bytes``)."""

    fits: bool
    planned_bytes: int
    budget_bytes: int
    breakdown: dict[str, int]
    message: str
    profile: str = ""
    workload: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.planned_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "planned_bytes": self.planned_bytes,
            "budget_bytes": self.budget_bytes,
            "headroom_bytes": self.headroom_bytes,
            "breakdown": dict(self.breakdown),
            "message": self.message,
            "profile": self.profile,
            "workload": dict(self.workload),
            "notes": list(self.notes),
        }


def _profile(profile: str | DeviceProfile) -> DeviceProfile:
    return get_profile(profile) if isinstance(profile, str) else profile


def effective_quant(profile: DeviceProfile, quant: str) -> tuple[str, str | None]:
    """The weights ``load_causal_lm`` would end up with on ``profile`` for ``quant``, and a
    note when that differs: without a usable bitsandbytes, nf4/int8 fall back to bf16 on a
    GPU with bf16, else fp32."""
    if quant in ("nf4", "int8") and not profile.bitsandbytes_usable:
        fallback = "bf16" if profile.accelerator == "cuda" and profile.bf16 else "fp32"
        return fallback, (
            f"{quant} needs bitsandbytes, which is not usable on {profile.id}; planned the "
            f"{fallback} weights the loader falls back to"
        )
    return quant, None


def workload_for_task(
    lora: Mapping[str, Any] | None,
    train: Mapping[str, Any] | None,
    quant: str,
    gradient_checkpointing: bool = False,
    model_type: str | None = None,
) -> Workload:
    """A planner :class:`Workload` from a task's ``lora`` (LoraSpec dict: r, dropout,
    target_modules; None = full fine-tuning) and ``train`` (TrainConfig dict: batch_size,
    block_size, gradient_checkpointing) dicts. The training loop uses AdamW; the planned step
    is one micro-batch (gradient accumulation does not add memory). ``model_type`` picks the
    entry of a per-architecture ``target_modules`` mapping (as LoraSpec does)."""
    train = dict(train or {})
    ckpt = bool(gradient_checkpointing or train.get("gradient_checkpointing", False))
    seq = train.get("block_size") or DEFAULT_SEQ_LEN
    if lora is None:
        rank, targets, dropout = None, None, 0.0
    else:
        rank = lora.get("r", 8)
        tm = targets_for_model_type(lora.get("target_modules"), model_type)
        targets = tuple(tm) if tm else None
        dropout = float(lora.get("dropout", 0.0) or 0.0)
    return Workload(
        quant=quant,
        lora_rank=rank,
        batch_size=train.get("batch_size", 4),
        seq_len=seq,
        gradient_checkpointing=ckpt,
        optimizer="adamw",
        lora_targets=targets,
        lora_dropout=dropout,
    )


def _message(p: Plan, profile: DeviceProfile, model: str) -> str:
    top = sorted(((v, k) for k, v in p.breakdown.items() if v), reverse=True)[:3]
    terms = ", ".join(f"{k} {fmt_bytes(v)}" for v, k in top)
    head = f"{model} on {profile.id} ({p.workload.describe()})"
    if p.fits:
        return (
            f"fits: {head} needs {fmt_bytes(p.total_bytes)} of {fmt_bytes(p.available_bytes)} "
            f"available, headroom {fmt_bytes(p.headroom_bytes)} (largest terms: {terms})"
        )
    return (
        f"does not fit: {head} needs {fmt_bytes(p.total_bytes)} ({p.total_bytes} bytes), "
        f"{fmt_bytes(p.available_bytes)} ({p.available_bytes} bytes) available, short by "
        f"{fmt_bytes(-p.headroom_bytes)} (largest terms: {terms})"
    )


def check_task_fits(
    profile_id: str | DeviceProfile,
    model_path: str | Path | Mapping[str, Any],
    lora: Mapping[str, Any] | None,
    train: Mapping[str, Any] | None,
    quant: str,
    gradient_checkpointing: bool = False,
    *,
    app_reserve_bytes: int = DEFAULT_APP_RESERVE_BYTES,
    safety_margin: float = 0.0,
) -> FitDecision:
    """Plan the task on the device and decide whether it fits.

    ``model_path``: model directory, ``config.json`` path, or the config as a dict.
    ``quant``: the client's quantization (the plan uses what the loader would really load on
    this device). ``safety_margin``: a fraction of the planned total added before comparing
    with the budget (0 = refuse only what the plan itself says does not fit).
    """
    if not 0 <= safety_margin < 1:
        raise WorkloadError(f"safety_margin must be in [0, 1), got {safety_margin!r}")
    prof = _profile(profile_id)
    config = load_model_config(model_path)
    check_supported(config)
    shape = ModelShape.from_config(config)
    q, note = effective_quant(prof, quant)
    w = workload_for_task(lora, train, q, gradient_checkpointing, model_type=shape.model_type)
    p = plan(shape, prof, w, app_reserve_bytes=app_reserve_bytes)
    fits = p.total_bytes * (1 + safety_margin) <= p.available_bytes
    model = shape.name or shape.model_type
    msg = _message(p, prof, model)
    if fits != p.fits:  # only the margin changed the verdict
        msg = (
            f"does not fit with a {safety_margin:.0%} safety margin: {model} on {prof.id} needs "
            f"{fmt_bytes(p.total_bytes)} + margin, {fmt_bytes(p.available_bytes)} available"
        )
    notes = tuple(([note] if note else []) + list(p.notes))
    return FitDecision(
        fits=fits,
        planned_bytes=p.total_bytes,
        budget_bytes=p.available_bytes,
        breakdown=dict(p.breakdown),
        message=msg,
        profile=prof.id,
        workload=w.to_dict(),
        notes=notes,
    )


def choose_defaults(
    profile_id: str | DeviceProfile,
    model_path: str | Path | Mapping[str, Any],
    *,
    app_reserve_bytes: int = DEFAULT_APP_RESERVE_BYTES,
) -> dict[str, Any]:
    """The planner's recommended training configuration for this model on this device:
    ``quant``, ``batch_size``, ``block_size``, ``gradient_checkpointing``, ``lora_rank``, plus
    ``planned_bytes`` and ``budget_bytes``. Raises ``DoesNotFit`` when nothing fits."""
    prof = _profile(profile_id)
    config = load_model_config(model_path)
    check_supported(config)
    best = recommend(config, prof, app_reserve_bytes=app_reserve_bytes)
    w = best.workload
    return {
        "quant": w.quant,
        "batch_size": w.batch_size,
        "block_size": w.seq_len,
        "gradient_checkpointing": w.gradient_checkpointing,
        "lora_rank": w.lora_rank,
        "planned_bytes": best.total_bytes,
        "budget_bytes": best.available_bytes,
    }
