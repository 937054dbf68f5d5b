"""The shared local training loop for causal LMs (LoRA on a frozen, possibly quantized base).

:func:`train_causal_lm` runs AdamW over the parameters that require grad, with gradient
accumulation, optional activation checkpointing, warmup + schedule, gradient clipping, an
optional FedProx proximal term and an ``extra_loss`` hook for algorithm-specific terms (KD,
merged-adapter proximal terms, ...), and optional record-level DP-SGD (``TrainConfig.dp_sgd``,
:mod:`algorithms.core.dp_sgd`). It stops at the first of: ``epochs`` done, ``max_steps``
optimizer steps, ``time_budget_s`` seconds, a non-finite loss, or a progress callback asking to
stop; :attr:`TrainResult.stopped_by` says which.

Loss normalisation: the task loss of one optimizer step is the summed token NLL of all its
micro-batches divided by the number of loss tokens in the whole step, so ``batch_size=2,
grad_accum=1`` and ``batch_size=1, grad_accum=2`` give the same gradient.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from algorithms.core.errors import TrainingError
from algorithms.core.memory import PeakMemory
from algorithms.core.textdata import TokenizedDataset, causal_lm_token_stats

__all__ = [
    "SCHEDULES",
    "ExtraLoss",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "accumulate_step",
    "proximal_term",
    "train_causal_lm",
]

logger = logging.getLogger(__name__)

SCHEDULES = ("constant", "linear", "cosine")
# extra_loss(model, batch, outputs) -> scalar tensor, added to each micro-batch's loss
ExtraLoss = Callable[[torch.nn.Module, Mapping[str, torch.Tensor], Any], torch.Tensor]


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class TrainConfig:
    """Local training hyper-parameters (validated on construction).

    ``batch_size`` is the micro-batch; the effective batch is ``batch_size * grad_accum``.
    ``max_steps`` counts optimizer steps. ``warmup``: steps when >= 1, a fraction of the planned
    steps when in (0, 1). ``block_size``: used when ``train_causal_lm`` tokenizes raw data; for a
    :class:`TokenizedDataset` it may be None or must equal the dataset's. ``proximal_mu``: FedProx
    weight of ``mu/2 * ||theta - theta_ref||^2`` over trainable parameters.

    ``dp_sgd``: None, or a dict turning on record-level DP-SGD (see :mod:`algorithms.core.dp_sgd`:
    ``noise_multiplier`` or ``target_epsilon``, ``max_grad_norm`` (the per-example clip),
    ``delta``, ``accountant``, ``seed``); it is stored with its defaults filled in. Under DP-SGD
    the per-example clip replaces ``max_grad_norm`` (the global clip is not applied), each step
    Poisson-samples its rows with rate ``batch_size * grad_accum / rows`` (``shuffle`` is
    unused), and ``gradient_checkpointing`` is refused.
    """

    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None
    time_budget_s: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    block_size: int | None = None
    warmup: float = 0.0
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    proximal_mu: float = 0.0
    log_every: int = 10
    shuffle: bool = True
    #: prompt/response pairs: "auto" formats them with the tokenizer's chat template when it has
    #: one (loss on the assistant turn only), "never" concatenates (algorithms/core/textdata.py)
    chat_template: str = "auto"
    dp_sgd: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from algorithms.core.dp_sgd import normalize_dp_sgd

        errs: list[str] = []
        if self.chat_template not in ("auto", "never"):
            errs.append(f"chat_template must be 'auto' or 'never', got {self.chat_template!r}")
        if not _is_num(self.lr) or self.lr <= 0:
            errs.append(f"lr must be a finite number > 0 (e.g. 2e-4), got {self.lr!r}")
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                errs.append(f"{name} must be an integer >= 1, got {v!r}")
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool)
            or not isinstance(self.max_steps, int)
            or self.max_steps < 1
        ):
            errs.append(f"max_steps must be None or an integer >= 1, got {self.max_steps!r}")
        if self.time_budget_s is not None and (
            not _is_num(self.time_budget_s) or self.time_budget_s <= 0
        ):
            errs.append(f"time_budget_s must be None or a number > 0, got {self.time_budget_s!r}")
        if self.block_size is not None and (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or self.block_size < 2
        ):
            errs.append(f"block_size must be None or an integer >= 2, got {self.block_size!r}")
        if not _is_num(self.warmup) or self.warmup < 0:
            errs.append(f"warmup must be >= 0 (steps, or a fraction < 1), got {self.warmup!r}")
        elif 1 < self.warmup and float(self.warmup) != int(self.warmup):
            errs.append(f"warmup above 1 counts steps and must be whole, got {self.warmup!r}")
        if self.schedule not in SCHEDULES:
            errs.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            errs.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and (
            not _is_num(self.max_grad_norm) or self.max_grad_norm <= 0
        ):
            errs.append(f"max_grad_norm must be None or > 0, got {self.max_grad_norm!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            errs.append(f"seed must be an integer, got {self.seed!r}")
        if not _is_num(self.proximal_mu) or self.proximal_mu < 0:
            errs.append(f"proximal_mu must be >= 0, got {self.proximal_mu!r}")
        dp_sgd, dp_errs = normalize_dp_sgd(self.dp_sgd)
        errs.extend(dp_errs)
        if dp_sgd is not None:
            self.dp_sgd = dp_sgd
            if self.gradient_checkpointing:
                errs.append(
                    "dp_sgd cannot be combined with gradient_checkpointing: Opacus's per-example "
                    "gradient hooks get nothing from recomputed layers; turn one of them off"
                )
        if errs:
            raise TrainingError("invalid TrainConfig: " + "; ".join(errs))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise TrainingError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**dict(d))


@dataclass
class TrainProgress:
    """Passed to a progress callback after every ``log_every`` steps and at the end."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    tokens: int
    seconds: float
    done: bool = False


@dataclass
class TrainResult:
    """Outcome of :func:`train_causal_lm`.

    ``examples``: rows (blocks/pairs) consumed, repeats across epochs included. ``tokens``:
    loss-carrying tokens consumed. ``loss_*``: task loss (mean token NLL) per optimizer step,
    without extra/proximal terms. ``peak_memory_bytes``: see ``memory_kind`` and
    :mod:`algorithms.core.memory` (CUDA: peak allocated; CPU: peak process RSS).
    ``stopped_by``: epochs | max_steps | time_budget | non_finite_loss | callback.
    ``dp_sgd_epsilon``: with ``TrainConfig.dp_sgd``, the epsilon spent at its delta (Opacus's
    accountant over the steps taken; ``inf`` with noise_multiplier 0), and ``dp_sgd`` the
    mechanism (noise_multiplier, max_grad_norm, delta, accountant, sample_rate, steps, ...).
    ``losses`` then skips steps whose Poisson sample drew no row. None without DP-SGD.
    """

    steps: int
    examples: int
    tokens: int
    loss_first: float
    loss_last: float
    loss_mean: float
    tokens_per_s: float
    seconds: float
    peak_memory_bytes: int
    stopped_by: str
    memory_kind: str = ""
    losses: list[float] = field(default_factory=list)
    dp_sgd_epsilon: float | None = None
    dp_sgd: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def proximal_term(
    params: Mapping[str, torch.nn.Parameter], reference: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """``mu / 2 * sum ||p - ref||^2`` over the named parameters (FedProx)."""
    total: torch.Tensor | None = None
    for name, p in params.items():
        ref = reference[name]
        d = (p.float() - ref).pow(2).sum()
        total = d if total is None else total + d
    if total is None:
        raise TrainingError("proximal term over an empty parameter set")
    return 0.5 * mu * total


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warm = int(round(cfg.warmup * total_steps)) if 0 < cfg.warmup < 1 else int(cfg.warmup)
    warm = min(warm, max(total_steps - 1, 0))

    def fn(step: int) -> float:  # step = optimizer steps already taken
        if warm > 0 and step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant" or total_steps <= warm:
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total_steps - warm))
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return fn


def train_causal_lm(
    model: torch.nn.Module,
    dataset: TokenizedDataset | Iterable[Any],
    cfg: TrainConfig,
    progress: str | Callable[[TrainProgress], Any] | None = "log",
    extra_loss: ExtraLoss | None = None,
    *,
    tokenizer: Any = None,
    reference_state: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``dataset``; returns a :class:`TrainResult`.

    ``dataset``: a :class:`TokenizedDataset`, or raw examples plus ``tokenizer=`` (then
    ``cfg.block_size`` is required). ``progress``: ``"log"`` (logger.info lines),
    ``"tqdm"`` (a progress bar), ``None``, or a callable receiving :class:`TrainProgress`; a
    callable that returns ``True`` stops training (``stopped_by="callback"``).
    ``extra_loss(model, batch, outputs)`` is added to each micro-batch's loss divided by
    ``grad_accum`` (treat it as a per-micro-batch mean). ``reference_state``: FedProx reference
    keyed like ``model.named_parameters()`` of the trainable params *or* by canonical adapter
    names; defaults to the trainable parameters at start when ``cfg.proximal_mu > 0``.

    Training is deterministic for a given ``cfg.seed`` (data order and dropout) on a given
    device; the global RNG state is restored afterwards. The model is left in train mode.

    With ``cfg.dp_sgd`` the step is DP-SGD (:mod:`algorithms.core.dp_sgd`); it raises
    :class:`~algorithms.core.dp_sgd.DPSGDUnsupportedError` for an ``extra_loss``, a model with
    activation checkpointing on, or a missing opacus install.
    """
    from algorithms.core.modeling import (
        disable_cpu_weight_repacking,
        is_checkpointing,
        set_gradient_checkpointing,
    )

    if not isinstance(cfg, TrainConfig):
        raise TrainingError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if not isinstance(dataset, TokenizedDataset):
        if tokenizer is None or cfg.block_size is None:
            raise TrainingError(
                "raw data needs tokenizer=... and cfg.block_size; or pass a TokenizedDataset"
            )
        dataset = TokenizedDataset(tokenizer, dataset, cfg.block_size, seed=cfg.seed,
                                   chat_template=cfg.chat_template)
    elif cfg.block_size is not None and cfg.block_size != dataset.block_size:
        raise TrainingError(
            f"cfg.block_size={cfg.block_size} but the dataset was built with "
            f"block_size={dataset.block_size}; rebuild it or set cfg.block_size=None"
        )
    params = _trainable(model)
    if not params:
        raise TrainingError("model has no trainable parameters; attach a LoRA adapter first")
    if cfg.dp_sgd is not None:
        from algorithms.core.dp_sgd import DPSGDUnsupportedError

        if extra_loss is not None:
            raise DPSGDUnsupportedError(
                "dp_sgd does not support extra_loss: per-example clipping needs a loss that is a "
                "sum of per-example terms reached through the model's forward, and an extra term "
                "may mix examples or be computed straight from the parameters (then Opacus would "
                "drop it silently); train without it or without dp_sgd"
            )
        if is_checkpointing(model):
            raise DPSGDUnsupportedError(
                "dp_sgd cannot train a model with activation checkpointing on: Opacus's "
                "per-example gradient hooks get nothing from recomputed layers; call "
                "set_gradient_checkpointing(model, False) or load it without checkpointing"
            )

    disable_cpu_weight_repacking(model)
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    device = _device_of(model)

    ref: dict[str, torch.Tensor] | None = None
    if cfg.proximal_mu > 0:
        ref = _reference_for(model, params, reference_state)

    steps_per_epoch = math.ceil(dataset.num_batches(cfg.batch_size) / cfg.grad_accum)
    planned = steps_per_epoch * cfg.epochs
    total_steps = min(planned, cfg.max_steps) if cfg.max_steps is not None else planned

    optimizer = torch.optim.AdamW(
        list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    dp_plan = None
    if cfg.dp_sgd is not None:
        from algorithms.core.dp_sgd import DPSGDRun, plan_dp_sgd

        dp_plan = plan_dp_sgd(
            cfg.dp_sgd, dataset.num_examples, cfg.batch_size * cfg.grad_accum, total_steps
        )
    dp: DPSGDRun | None = None
    dp_report: dict[str, Any] | None = None
    reporter = _Reporter(progress, total_steps, cfg.log_every)

    losses: list[float] = []
    examples = tokens = steps = 0
    stopped_by = "epochs"
    step_times: list[float] = []
    fork_devices = [device] if device.type == "cuda" else []
    model.train()
    t0 = time.perf_counter()
    with PeakMemory(device) as pm, torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        try:
            if dp_plan is not None:
                dp = DPSGDRun(model, optimizer, params, dp_plan, device)
            for epoch in range(cfg.epochs):
                groups: Iterable[list[Any]]
                if dp is not None:  # Poisson-sampled logical batches, possibly empty
                    groups = dp.groups(dataset, steps_per_epoch, cfg.batch_size)
                else:
                    micro = list(
                        dataset.batches(cfg.batch_size, epoch=epoch, shuffle=cfg.shuffle)
                    )
                    groups = [
                        micro[i : i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)
                    ]
                for group in groups:
                    if cfg.max_steps is not None and steps >= cfg.max_steps:
                        stopped_by = "max_steps"
                        break
                    elapsed = time.perf_counter() - t0
                    if cfg.time_budget_s is not None and steps > 0:
                        mean_step = sum(step_times) / len(step_times)
                        if elapsed + mean_step > cfg.time_budget_s:
                            stopped_by = "time_budget"
                            break
                    ts = time.perf_counter()
                    if dp is not None:
                        # .grad = the clipped, noised, averaged per-example gradients
                        loss_value, finite = dp.accumulate(group)
                        if finite and ref is not None:  # data-independent: post-processing
                            _add_proximal_grad(params, ref, cfg.proximal_mu)
                        finite = finite and all(
                            p.grad is None or bool(torch.isfinite(p.grad).all())
                            for p in params.values()
                        )
                    else:
                        loss_value, finite = accumulate_step(
                            model,
                            group,
                            extra_loss=extra_loss,
                            proximal=(params, ref, cfg.proximal_mu) if ref is not None else None,
                        )
                        if finite:
                            max_norm = (
                                cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
                            )
                            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
                            finite = math.isfinite(loss_value) and bool(torch.isfinite(norm))
                    if not finite:
                        optimizer.zero_grad(set_to_none=True)
                        stopped_by = "non_finite_loss"
                        logger.warning(
                            "step %d: non-finite loss or gradient (task loss %s); stopping without "
                            "applying it",
                            steps + 1,
                            loss_value,
                        )
                        break
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    steps += 1
                    step_times.append(time.perf_counter() - ts)
                    if group:  # a DP-SGD step may have drawn no row
                        losses.append(loss_value)
                    examples += sum(int(b["input_ids"].shape[0]) for b in group)
                    tokens += sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
                    pm.update()
                    if reporter.step(
                        TrainProgress(
                            step=steps,
                            total_steps=total_steps,
                            epoch=epoch,
                            loss=loss_value,
                            lr=float(scheduler.get_last_lr()[0]),
                            tokens=tokens,
                            seconds=time.perf_counter() - t0,
                        )
                    ):
                        stopped_by = "callback"
                        break
                else:
                    continue
                break
            else:
                if cfg.max_steps is not None and steps >= cfg.max_steps:
                    stopped_by = "max_steps"
        finally:
            seconds = time.perf_counter() - t0
            if dp is not None:
                dp.close()
                dp_report = dp.report()
            reporter.close(
                TrainProgress(
                    step=steps,
                    total_steps=total_steps,
                    epoch=cfg.epochs,
                    loss=losses[-1] if losses else float("nan"),
                    lr=float(scheduler.get_last_lr()[0]),
                    tokens=tokens,
                    seconds=seconds,
                    done=True,
                )
            )
    nan = float("nan")
    return TrainResult(
        steps=steps,
        examples=examples,
        tokens=tokens,
        loss_first=losses[0] if losses else nan,
        loss_last=losses[-1] if losses else nan,
        loss_mean=sum(losses) / len(losses) if losses else nan,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        peak_memory_bytes=pm.peak_bytes,
        stopped_by=stopped_by,
        memory_kind=pm.kind,
        losses=losses,
        dp_sgd_epsilon=dp_report["epsilon"] if dp_report is not None else None,
        dp_sgd=dp_report,
    )


def _reference_for(
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    reference_state: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    if reference_state is None:
        return {n: p.detach().float().clone() for n, p in params.items()}
    if set(reference_state) >= set(params):
        src = {n: reference_state[n] for n in params}
    else:  # canonical adapter names -> parameter names
        from algorithms.core.modeling import _lora_params

        by_canon = _lora_params(model)
        ids = {id(p): n for n, p in params.items()}
        src = {}
        for canon, prm in by_canon.items():
            if id(prm) in ids and canon in reference_state:
                src[ids[id(prm)]] = reference_state[canon]
        missing = sorted(set(params) - set(src))
        if missing:
            raise TrainingError(
                f"reference_state lacks {len(missing)} trainable tensor(s), e.g. {missing[:2]}"
            )
    out = {}
    for n, p in params.items():
        t = src[n]
        if tuple(t.shape) != tuple(p.shape):
            raise TrainingError(
                f"reference_state[{n!r}] has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
            )
        out[n] = t.detach().to(device=p.device, dtype=torch.float32)
    return out


def _add_proximal_grad(
    params: Mapping[str, torch.nn.Parameter], reference: Mapping[str, torch.Tensor], mu: float
) -> None:
    """Add the FedProx term's gradient ``mu * (p - ref)`` to each ``.grad`` (DP-SGD path)."""
    prox = proximal_term(params, reference, mu)
    grads = torch.autograd.grad(prox, list(params.values()))
    for p, g in zip(params.values(), grads, strict=True):
        if p.grad is None:
            p.grad = g.to(p.dtype)
        else:
            p.grad.add_(g.to(p.grad.dtype))


def accumulate_step(
    model: torch.nn.Module,
    micro_batches: list[Mapping[str, torch.Tensor]],
    *,
    extra_loss: ExtraLoss | None = None,
    proximal: tuple[Mapping[str, torch.nn.Parameter], Mapping[str, torch.Tensor], float]
    | None = None,
) -> tuple[float, bool]:
    """Forward/backward over one accumulation group, adding into ``.grad``.

    The task loss is the summed token NLL of all micro-batches divided by the group's number of
    target tokens, so the gradient does not depend on how the rows are split into micro-batches.
    ``extra_loss`` values are divided by ``len(micro_batches)``. ``proximal`` is
    ``(params, reference, mu)``. Returns ``(mean task NLL, every loss was finite)``.
    """
    device = _device_of(model)
    n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    denom = max(n_targets, 1)
    total_nll = 0.0
    finite = True
    for mb in micro_batches:
        batch = {k: v.to(device) for k, v in mb.items()}
        outputs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
        nll, _, _ = causal_lm_token_stats(outputs.logits, batch["labels"])
        loss = nll / denom
        if extra_loss is not None:
            extra = extra_loss(model, batch, outputs)
            loss = loss + extra / len(micro_batches)
        total_nll += float(nll.detach())
        if not bool(torch.isfinite(loss.detach()).all()):
            finite = False
            break
        if loss.requires_grad:
            loss.backward()
        del outputs, loss
    if finite and proximal is not None and proximal[2] > 0:
        prox = proximal_term(proximal[0], proximal[1], proximal[2])
        if not bool(torch.isfinite(prox.detach())):
            finite = False
        else:
            prox.backward()
    return total_nll / denom, finite


class _Reporter:
    def __init__(self, progress: Any, total: int, every: int) -> None:
        self.every = every
        self.callback: Callable[[TrainProgress], Any] | None = None
        self.bar = None
        self.mode = "none"
        if progress is None:
            return
        if callable(progress):
            self.callback = progress
            self.mode = "callback"
        elif progress == "log":
            self.mode = "log"
        elif progress == "tqdm":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="train", unit="step")
            self.mode = "tqdm"
        else:
            raise TrainingError(
                f"progress must be 'log', 'tqdm', None or a callable, got {progress!r}"
            )

    def step(self, p: TrainProgress) -> bool:
        if self.bar is not None:
            self.bar.update(1)
            if p.step % self.every == 0:
                self.bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.lr:.2e}")
        if p.step % self.every != 0:
            return False
        if self.mode == "log":
            logger.info(
                "step %d/%d epoch %d loss %.4f lr %.2e tokens %d %.1fs",
                p.step,
                p.total_steps,
                p.epoch,
                p.loss,
                p.lr,
                p.tokens,
                p.seconds,
            )
        elif self.callback is not None:
            return self.callback(p) is True
        return False

    def close(self, p: TrainProgress) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.mode == "log":
            logger.info(
                "done: %d steps, loss %.4f, %d tokens, %.1fs", p.step, p.loss, p.tokens, p.seconds
            )
        elif self.callback is not None:
            self.callback(p)
