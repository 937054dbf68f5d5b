"""Server-side distillation loops on the public/auxiliary set D_a.

- :func:`distill`: one student learns from a fixed teacher (FedPT: the proxy-tuned LLM into the
  aggregated SLM): ``task_weight * CE + kd_weight * KD``.
- :func:`mutual_distill`: two students teach each other (FedCoLLM): the LLM's LoRA minimises
  ``CE(f) + lambda * KD(g -> f)`` and the SLM's LoRA ``CE(g) + lambda * KD(f -> g)``; the sum is
  minimised in one backward pass, each teacher side detached, as the paper's ``L_f + L_g``.

KD is KL(p_teacher || p_student) by default (:func:`algorithms.core.kd.kd_loss`). Deterministic
for a seed: data order from :class:`TokenizedDataset`, the global RNG restored afterwards.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from algorithms.core.errors import TrainingError
from algorithms.core.kd import kd_loss, prediction_mask, proxy_logits, task_loss
from algorithms.core.textdata import TokenizedDataset
from algorithms.core.training import _lr_lambda  # the same warmup + schedule as local training

log = logging.getLogger(__name__)

__all__ = ["DistillConfig", "distill", "mutual_distill"]

Teacher = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass
class DistillConfig:
    """Hyper-parameters of a server distillation step. ``lr`` is the SLM's (or the single
    student's) learning rate, ``lr_llm`` the LLM's in mutual distillation (default ``lr``)."""

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    block_size: int = 64
    lr: float = 1e-3
    lr_llm: float | None = None
    lambda_kd: float = 1.0
    task_weight: float = 1.0
    temperature: float = 1.0
    kind: str = "kl"
    warmup: float = 0.0
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        errs = []
        for name in ("epochs", "batch_size", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                errs.append(f"{name} must be an integer >= 1, got {v!r}")
        if self.block_size < 2:
            errs.append("block_size must be >= 2")
        if self.max_steps is not None and self.max_steps < 1:
            errs.append("max_steps must be None or >= 1")
        for name in ("lr", "lr_llm"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                errs.append(f"{name} must be a number > 0, got {v!r}")
        for name in ("lambda_kd", "task_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                errs.append(f"{name} must be a number >= 0, got {v!r}")
        if self.lambda_kd == 0 and self.task_weight == 0:
            errs.append("lambda_kd and task_weight are both 0: nothing to train")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            errs.append(f"temperature must be > 0, got {self.temperature!r}")
        if self.kind not in ("kl", "ce"):
            errs.append(f"kind must be 'kl' or 'ce', got {self.kind!r}")
        if self.schedule not in ("constant", "linear", "cosine"):
            errs.append(f"schedule must be constant|linear|cosine, got {self.schedule!r}")
        if errs:
            raise TrainingError("invalid DistillConfig: " + "; ".join(errs))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DistillConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise TrainingError(f"unknown DistillConfig fields {sorted(unknown)}")
        return cls(**dict(d))


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("a distillation student has no trainable parameters; attach LoRA first")
    return params


def _dataset(data: Any, tokenizer: Any, cfg: DistillConfig) -> TokenizedDataset:
    if isinstance(data, TokenizedDataset):
        return data
    if tokenizer is None:
        raise TrainingError("raw distillation data needs a tokenizer")
    return TokenizedDataset(tokenizer, data, cfg.block_size, seed=cfg.seed)


def _steps(ds: TokenizedDataset, cfg: DistillConfig) -> int:
    planned = ds.num_batches(cfg.batch_size) * cfg.epochs
    return min(planned, cfg.max_steps) if cfg.max_steps else planned


class _Loop:
    """The shared skeleton: batches over epochs, optimizers + schedules, clipping, a progress
    line every ``log_every`` steps, non-finite guard."""

    def __init__(self, ds: TokenizedDataset, cfg: DistillConfig, groups: list[tuple[list, float]],
                 progress: Any, label: str):
        self.ds, self.cfg, self.label = ds, cfg, label
        self.total = _steps(ds, cfg)
        self.opts = [torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False) for params, lr in groups]
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(cfg, self.total)) for o in self.opts]
        self.params = [p for params, _ in groups for p in params]
        self.progress = progress
        self.history: list[dict] = []

    def run(self, step_fn: Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, dict]]) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        steps, stopped = 0, "epochs"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for epoch in range(cfg.epochs):
                for batch in self.ds.batches(cfg.batch_size, epoch=epoch, shuffle=True):
                    if steps >= self.total:
                        stopped = "max_steps"
                        break
                    loss, parts = step_fn(batch)
                    if not bool(torch.isfinite(loss.detach())):
                        for o in self.opts:
                            o.zero_grad(set_to_none=True)
                        stopped = "non_finite_loss"
                        log.warning("%s: non-finite loss at step %d; stopping", self.label, steps + 1)
                        break
                    loss.backward()
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    for o, s in zip(self.opts, self.scheds, strict=True):
                        o.step()
                        s.step()
                        o.zero_grad(set_to_none=True)
                    steps += 1
                    self.history.append(parts)
                    if self.progress is not None and (steps % cfg.log_every == 0 or steps == self.total):
                        line = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
                        msg = f"{self.label}: step {steps}/{self.total} {line}"
                        self.progress(msg) if callable(self.progress) else log.info(msg)
                else:
                    continue
                break
        first = self.history[0] if self.history else {}
        last = self.history[-1] if self.history else {}
        return {"steps": steps, "seconds": round(time.perf_counter() - t0, 3), "stopped_by": stopped,
                **{f"{k}_first": v for k, v in first.items()}, **{f"{k}_last": v for k, v in last.items()}}


def distill(student: torch.nn.Module, data: Any, teacher: Teacher, cfg: DistillConfig, *,
            tokenizer: Any = None, progress: Any = None, label: str = "distill") -> dict:
    """Train ``student``'s trainable parameters on ``task_weight * CE + lambda_kd * KD`` against
    ``teacher(batch) -> [B, T, V]`` log-probabilities (or logits). Returns loss metrics."""
    ds = _dataset(data, tokenizer, cfg)
    loop = _Loop(ds, cfg, [(_trainable(student), cfg.lr)], progress, label)
    student.train()

    def step(batch):
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        with torch.no_grad():
            t = teacher(batch)
        ce = task_loss(out.logits, batch["labels"])
        kd = kd_loss(out.logits, t, prediction_mask(batch["labels"]), cfg.temperature, cfg.kind)
        loss = cfg.task_weight * ce + cfg.lambda_kd * kd
        return loss, {"loss": float(loss.detach()), "ce": float(ce.detach()), "kd": float(kd.detach())}

    return loop.run(step)


def mutual_distill(llm: torch.nn.Module, slm: torch.nn.Module, data: Any, cfg: DistillConfig, *,
                   tokenizer: Any = None, progress: Any = None, label: str = "mutual",
                   llm_teacher: str = "slm", alpha: float = 1.0) -> dict:
    """FedCoLLM's server step: ``L_f + L_g`` with ``L_f = w*CE(f) + lambda*KL(g || f)`` (the LLM
    learns from the SLM) and ``L_g = w*CE(g) + lambda*KL(f || g)`` (the SLM learns from the LLM),
    each teacher detached. The two models must share a tokenizer (checked by the caller).

    ``llm_teacher="proxy"``: the LLM learns from the proxy-tuned LLM instead of the raw SLM,
    ``f_base + alpha * (g - g_base)`` (``*_base``: each model with its adapter disabled), so it
    takes the SLM's *adaptation* without being pulled towards a weaker model's general errors."""
    if llm_teacher not in ("slm", "proxy"):
        raise TrainingError(f"llm_teacher must be 'slm' or 'proxy', got {llm_teacher!r}")
    ds = _dataset(data, tokenizer, cfg)
    lr_llm = cfg.lr_llm if cfg.lr_llm is not None else cfg.lr
    loop = _Loop(ds, cfg, [(_trainable(llm), lr_llm), (_trainable(slm), cfg.lr)], progress, label)
    llm.train()
    slm.train()

    def step(batch):
        mask = prediction_mask(batch["labels"])
        f = llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        g = slm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        ce_f, ce_g = task_loss(f, batch["labels"]), task_loss(g, batch["labels"])
        if llm_teacher == "proxy":
            # the base LLM, not the current one: a target built on the LLM's own moving logits
            # would add the SLM's delta again at every step and run away
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
            with torch.no_grad():
                with slm.disable_adapter():
                    g_base = slm(**kw).logits
                with llm.disable_adapter():
                    f_base = llm(**kw).logits
            t_f = proxy_logits(f_base, g.detach(), g_base, alpha)
        else:
            t_f = g.detach()
        kd_f = kd_loss(f, t_f, mask, cfg.temperature, cfg.kind)
        kd_g = kd_loss(g, f.detach(), mask, cfg.temperature, cfg.kind)
        loss = cfg.task_weight * (ce_f + ce_g) + cfg.lambda_kd * (kd_f + kd_g)
        return loss, {"loss": float(loss.detach()), "ce_llm": float(ce_f.detach()), "ce_slm": float(ce_g.detach()),
                      "kd_llm": float(kd_f.detach()), "kd_slm": float(kd_g.detach())}

    return loop.run(step)
