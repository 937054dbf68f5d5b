"""An SLM base aligned to the LLM, shared by the algorithms where the LLM and the SLMs share a
tokenizer (FedCoLLM, FedPT).

Before round 1 the aggregator distils the base LLM into a full copy of the SLM on the public set
D_a (pure KD by default: the SLM learns to predict like the LLM, nothing else). That aligned SLM
becomes the base of the whole federation: clients fine-tune their LoRA on it (it travels once,
as a checked checkpoint blob the device caches by content hash), and the server's SLM sides use
it too. Why: the zoo's SLM and LLM, like real pairs, differ in what they got wrong during
pretraining. Fine-tuned from its own base, the SLM's adapter mostly repairs its own weaknesses,
which the LLM does not share; fine-tuned from an LLM-like base, the adapter is what the private
data adds to what the LLM already knows, and that is what must reach the LLM (by proxy-tuning
in FedPT, by distillation in FedCoLLM). The aligned weights live in the global state under
``base/`` so a restarted aggregator sends the identical bytes without aligning again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from algorithms.base import ConfigError, State
from algorithms.core.checkpoint_blob import (
    CheckpointBlobError,
    pack_checkpoint,
    read_checkpoint_meta,
)
from algorithms.core.distill import DistillConfig, distill
from algorithms.core.state_parts import part

BASE = "base"  # the state prefix and the blob name
BASE_FORMAT = "cotune.slm-base"
BASE_VERSION = 1
BASES_DIR = "aligned-bases"  # on the device, under its workspace
ALIGN_DEFAULTS = {"epochs": 100, "max_steps": 400, "batch_size": 8, "block_size": 64, "lr": 1e-3, "warmup": 10,
                  "lambda_kd": 1.0, "task_weight": 0.0}


class BaseBlobError(CheckpointBlobError):
    """The aligned SLM base the aggregator sent is malformed, of another format or too new."""


def align_settings(value: Any) -> dict | None:
    """A config's ``align_base``: None (off) or a dict of DistillConfig fields over
    ``ALIGN_DEFAULTS`` (``{}``: the defaults). Raises ConfigError."""
    from algorithms.core.errors import TrainingError

    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError("align_base must be a dict of DistillConfig fields ({} for the defaults) or null "
                          f"(no alignment), got {value!r}")
    merged = {**ALIGN_DEFAULTS, **value}
    try:
        DistillConfig.from_dict(merged)
    except (TrainingError, TypeError, ValueError) as exc:
        raise ConfigError(f"align_base: {exc}") from exc
    return merged


def batch_teacher(logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                  ) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """A distillation teacher (``batch -> [B, T, V]``) from ``logprobs(input_ids, mask)``."""
    return lambda batch: logprobs(batch["input_ids"], batch["attention_mask"])


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a plain model once (tied weights under their first name)."""
    return {k: p.detach() for k, p in model.named_parameters()}


def load_base_weights(model: torch.nn.Module, saved: Mapping[str, np.ndarray]) -> None:
    params = base_weights(model)
    if set(params) != set(saved):
        raise ConfigError(f"the state's aligned base does not fit the SLM: {len(saved)} tensors, the model has "
                          f"{len(params)}")
    with torch.no_grad():
        for k, p in params.items():
            src = torch.from_numpy(np.ascontiguousarray(saved[k]))
            if tuple(src.shape) != tuple(p.shape):
                raise ConfigError(f"base/{k} has shape {tuple(src.shape)}, the SLM's is {tuple(p.shape)}")
            p.copy_(src.to(p.dtype))


def prepare_base(plain: torch.nn.Module, settings: dict | None, state: State | None,
                 teacher: Callable[[], Callable[[Mapping[str, torch.Tensor]], torch.Tensor]], public: Callable[[], list],
                 tokenizer: Any, log: Callable[[str], Any], prefix: str = BASE) -> dict:
    """Make ``plain`` (the SLM as loaded) the federation's base, in place: with ``settings``
    None leave it; with a state, load its ``prefix/`` part; before round 1 (no state) align it.
    ``teacher()`` and ``public()`` are called only when aligning. Returns alignment metrics."""
    metrics: dict = {}
    if settings is not None:
        saved = part(state, prefix) if state is not None else {}
        if saved:
            load_base_weights(plain, saved)
        elif state is not None:
            raise ConfigError("align_base is set but the global state has no aligned base (the federation was "
                              "started without it); set align_base to null to go on")
        else:
            data = public()
            for p in plain.parameters():
                p.requires_grad_(True)
            out = distill(plain, data, teacher(), DistillConfig.from_dict(settings), tokenizer=tokenizer,
                          progress=log, label="aligning the SLM base to the LLM")
            metrics = {f"align_{k}": v for k, v in out.items() if isinstance(v, (int, float))}
            log(f"SLM base aligned to the LLM on {len(data)} public samples "
                f"(KD {out.get('kd_first', float('nan')):.4f} -> {out.get('kd_last', float('nan')):.4f})")
    for p in plain.parameters():
        p.requires_grad_(False)
    plain.eval()
    return metrics


def pack_base(plain: torch.nn.Module, tokenizer: Any) -> bytes:
    """The aligned SLM as one deterministic checkpoint blob (the same bytes every round, so the
    aggregator pushes it once and a device caches it)."""
    return pack_checkpoint(plain, tokenizer, fmt=BASE_FORMAT, version=BASE_VERSION)


def use_sent_base(downloads: Mapping[str, bytes], ctx: Any, name: str = BASE) -> None:
    """Device side: train on the aligned SLM base when the aggregator sent one (blob ``name``),
    else on the device's own model. The blob is checked before anything is written and unpacked
    once (by content hash); it has the architecture of the device's own SLM, so its memory plan
    holds."""
    from algorithms.core.checkpoint_blob import use_checkpoint_blob

    blob = downloads.get(name)
    if blob is None:
        ctx.use_base(None)
        return
    meta = read_checkpoint_meta(blob, fmt=BASE_FORMAT, max_version=BASE_VERSION, error=BaseBlobError)
    use_checkpoint_blob(blob, ctx, BASES_DIR, meta)


class AlignedBaseServer:
    """Server mixin (before ``SlmAdapterRounds`` in the bases) for algorithms whose config has
    ``align_base``: :meth:`slm_base` loads the SLM once, aligned or restored from the state;
    the base travels as the ``base`` blob in every plan (the same bytes, pushed once) and in the
    final blobs; :meth:`base_part` is what a state carries under ``base/``."""

    _plain: torch.nn.Module | None = None
    _plain_tok: Any = None
    _base_blob: bytes | None = None
    align_metrics: dict = {}

    def public_for_distillation(self) -> list:
        public = self.ctx.public_data()
        if not public:
            raise ConfigError(f"{self.name} distils on the public set D_a, and the aggregator has none (set "
                              "public_data in the aggregator config)")
        if self.config.public_max_samples:
            public = public[: self.config.public_max_samples]
        return public

    def align_teacher(self) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
        """The base LLM's log-probabilities of a batch (subclasses may memoise)."""
        return batch_teacher(self.ctx.llm().logprobs)

    def slm_base(self, state: State | None = None) -> tuple[torch.nn.Module, Any]:
        if self._plain is None:
            from algorithms.core.kd import check_shared_vocabulary
            from algorithms.core.modeling import load_causal_lm

            plain, tok, _ = load_causal_lm(self.ctx.model_path("slm"), quant="fp32")

            def teacher():
                check_shared_vocabulary(self.ctx.llm().tokenizer(), tok, f"{self.name}'s SLM and LLM")
                return self.align_teacher()

            self.align_metrics = prepare_base(plain, self.config.align_base, state, teacher,
                                              self.public_for_distillation, tok, self.ctx.log)
            self._plain, self._plain_tok = plain, tok
        return self._plain, self._plain_tok

    def base_part(self, state: State | None = None) -> dict:
        """``{"base": tensors}`` for a state (from ``state``, or the loaded base), or ``{}``."""
        if self.config.align_base is None:
            return {}
        if state is not None:
            return {BASE: part(state, BASE)}
        from algorithms.core.state_parts import to_numpy

        return {BASE: to_numpy(base_weights(self.slm_base()[0]))}

    def base_blob(self, state: State) -> bytes:
        if self._base_blob is None:
            plain, tok = self.slm_base(state)
            self._base_blob = pack_base(plain, tok)
        return self._base_blob

    def plan_round(self, round: int, state: State):
        plan = super().plan_round(round, state)
        if self.config.align_base is not None:
            plan.blobs[BASE] = self.base_blob(state)
        return plan

    def final_blobs(self, state: State) -> dict[str, bytes]:
        blobs = super().final_blobs(state)
        if self.config.align_base is not None:
            blobs[BASE] = self.base_blob(state)
        return blobs
