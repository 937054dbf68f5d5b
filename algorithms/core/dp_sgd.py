"""Record-level differential privacy on the device: DP-SGD over the LoRA parameters.

``TrainConfig(dp_sgd={...})`` makes :func:`~algorithms.core.training.train_causal_lm` train with
DP-SGD (Abadi et al. 2016) through Opacus (the ``dpsgd`` extra): every example's gradient of the
trainable (LoRA) parameters is computed by Opacus's ``GradSampleModule`` hooks, clipped to L2
norm ``max_grad_norm`` (C), summed, and N(0, (z C)^2) is added to each coordinate before the
sum is divided by the expected batch size and handed to AdamW. The frozen base may be fp32/bf16
or a bitsandbytes nf4/int8 model: its quantized layers hold no trainable parameters, so only the
LoRA ``nn.Linear`` layers need per-example gradients.

Config keys (:data:`DP_SGD_KEYS`):

- exactly one of ``noise_multiplier`` (z >= 0; 0 gives clipping only and epsilon = inf) or
  ``target_epsilon`` (z is solved with Opacus's ``get_noise_multiplier`` for the planned steps);
- ``max_grad_norm``: the per-example clip bound C (required);
- ``delta`` (default 1e-5) and ``accountant``: ``"rdp"`` (default) or ``"prv"``;
- ``seed``: None (default) draws the sampling and noise generators' seed from ``os.urandom``;
  an integer makes a run reproducible, for tests only: whoever knows it (e.g. the aggregator,
  which sets ``TrainConfig.seed``) can regenerate the noise and the batches, which voids the
  guarantee. ``TrainConfig.seed`` still seeds dropout.

Sampling: each optimizer step draws a Poisson sample of the rows (each row independently with
probability q = batch_size * grad_accum / rows, capped at 1), the sampling that Opacus's
accountants analyse; an epoch is the same number of steps as without DP, and a step may draw
no row (it then applies noise only). The logical batch is processed in micro-batches of at most
``batch_size`` rows with Opacus's virtual steps, so ``grad_accum`` only sets q. Each example's
loss is its own mean token NLL, so its gradient does not depend on the other rows of the batch.
The accountant (Opacus's RDP or PRV one) charges one step per noised gradient;
:attr:`TrainResult.dp_sgd_epsilon` is the epsilon at ``delta`` after the steps actually taken.

Interactions: ``TrainConfig.max_grad_norm`` (the global clip) is not applied under DP-SGD, the
per-example clip replaces it; the FedProx proximal gradient does not depend on the data and is
added after the noise (post-processing); activation checkpointing and ``extra_loss`` are
refused (:class:`DPSGDUnsupportedError`): with checkpointing Opacus's hooks get no per-example
gradient, and an extra loss may not decompose per example (a term computed straight from the
parameters would be dropped silently).

The guarantee covers the trained adapter only: the losses and token counts that
:class:`~algorithms.core.training.TrainResult` holds are computed on the raw rows, not noised.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from algorithms.core.errors import TrainingError

__all__ = [
    "DEFAULT_DELTA",
    "DP_SGD_ACCOUNTANTS",
    "DP_SGD_KEYS",
    "DPSGDPlan",
    "DPSGDUnsupportedError",
    "DPSGDRun",
    "dp_sgd_epsilon",
    "normalize_dp_sgd",
    "opacus_status",
    "per_example_nll",
    "plan_dp_sgd",
]

logger = logging.getLogger(__name__)

DP_SGD_ACCOUNTANTS = ("rdp", "prv")
DP_SGD_KEYS = ("noise_multiplier", "target_epsilon", "max_grad_norm", "delta", "accountant", "seed")
DEFAULT_DELTA = 1e-5
_IGNORE_INDEX = -100


class DPSGDUnsupportedError(TrainingError):
    """DP-SGD cannot run with this model, configuration or environment (the message says why
    and what to change)."""


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def normalize_dp_sgd(d: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """``(config with defaults filled in, errors)`` for a ``TrainConfig.dp_sgd`` value."""
    if d is None:
        return None, []
    if not isinstance(d, Mapping):
        return None, [
            f"dp_sgd must be None or a dict like {{'noise_multiplier': 1.0, 'max_grad_norm': 1.0}}"
            f", got {type(d).__name__}"
        ]
    errs: list[str] = []
    unknown = sorted(set(d) - set(DP_SGD_KEYS), key=str)
    if unknown:
        errs.append(f"dp_sgd has unknown keys {unknown}; known: {list(DP_SGD_KEYS)}")
    z, eps = d.get("noise_multiplier"), d.get("target_epsilon")
    if (z is None) == (eps is None):
        errs.append(
            "dp_sgd needs exactly one of 'noise_multiplier' (e.g. 1.0) or 'target_epsilon' "
            "(e.g. 8.0)"
        )
    if z is not None and (not _num(z) or z < 0):
        errs.append(f"dp_sgd noise_multiplier must be a finite number >= 0, got {z!r}")
    if eps is not None and (not _num(eps) or eps <= 0):
        errs.append(f"dp_sgd target_epsilon must be a finite number > 0, got {eps!r}")
    c = d.get("max_grad_norm")
    if c is None:
        errs.append("dp_sgd needs 'max_grad_norm', the per-example clip bound (e.g. 1.0)")
    elif not _num(c) or c <= 0:
        errs.append(f"dp_sgd max_grad_norm must be a finite number > 0, got {c!r}")
    delta = d.get("delta", DEFAULT_DELTA)
    if not _num(delta) or not 0 < delta < 1:
        errs.append(
            f"dp_sgd delta must be in (0, 1), typically below 1/rows (e.g. 1e-5), got {delta!r}"
        )
    acc = d.get("accountant", "rdp")
    if acc not in DP_SGD_ACCOUNTANTS:
        errs.append(f"dp_sgd accountant must be one of {DP_SGD_ACCOUNTANTS}, got {acc!r}")
    seed = d.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        errs.append(f"dp_sgd seed must be None (OS entropy) or an integer >= 0, got {seed!r}")
    if errs:
        return None, errs
    out = {
        "noise_multiplier": None if z is None else float(z),
        "target_epsilon": None if eps is None else float(eps),
        "max_grad_norm": float(c),
        "delta": float(delta),
        "accountant": acc,
        "seed": seed,
    }
    return out, []


def opacus_status() -> tuple[bool, str]:
    """``(usable, reason)``: whether Opacus imports."""
    try:
        import opacus  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def _require_opacus() -> None:
    ok, why = opacus_status()
    if not ok:
        raise DPSGDUnsupportedError(
            f"dp_sgd needs the optional dependency opacus ({why}); install the 'dpsgd' extra "
            "(pip install 'cotune[dpsgd]')"
        )


def dp_sgd_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps, by Opacus's
    accountant (``"rdp"`` or ``"prv"``); ``inf`` without noise, 0 for no step."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    _require_opacus()
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(acc.get_epsilon(delta=delta))


@dataclass
class DPSGDPlan:
    """The DP-SGD parameters of one training run, resolved from the config and the data."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    sample_rate: float
    expected_batch_size: float
    rows: int
    planned_steps: int
    target_epsilon: float | None
    seed: int | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("seed")
        return d


def plan_dp_sgd(
    dp_sgd: Mapping[str, Any], rows: int, logical_batch: int, planned_steps: int
) -> DPSGDPlan:
    """Sample rate q = min(1, logical_batch / rows), and the noise multiplier (solved for
    ``target_epsilon`` over ``planned_steps`` when that is given)."""
    _require_opacus()
    cfg, errs = normalize_dp_sgd(dp_sgd)
    if errs or cfg is None:
        raise TrainingError("invalid dp_sgd: " + "; ".join(errs))
    if rows < 1:
        raise TrainingError("dp_sgd needs at least one training row")
    q = min(1.0, logical_batch / rows)
    if q >= 1.0:
        logger.warning(
            "dp_sgd: batch_size * grad_accum (%d) >= rows (%d): every step uses all rows, so "
            "there is no amplification by sampling",
            logical_batch,
            rows,
        )
    z = cfg["noise_multiplier"]
    if z is None:
        from opacus.accountants.utils import get_noise_multiplier

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the")
                z = float(
                    get_noise_multiplier(
                        target_epsilon=cfg["target_epsilon"],
                        target_delta=cfg["delta"],
                        sample_rate=q,
                        steps=max(1, planned_steps),
                        accountant=cfg["accountant"],
                    )
                )
        except ValueError as exc:
            raise TrainingError(
                f"dp_sgd target_epsilon={cfg['target_epsilon']} is not reachable at "
                f"delta={cfg['delta']} with q={q:.4g} over {planned_steps} steps ({exc}); raise "
                "it, or lower the steps or the batch"
            ) from exc
    if z == 0:
        logger.warning("dp_sgd: noise_multiplier=0 clips per example but gives no privacy")
    return DPSGDPlan(
        noise_multiplier=float(z),
        max_grad_norm=cfg["max_grad_norm"],
        delta=cfg["delta"],
        accountant=cfg["accountant"],
        sample_rate=q,
        expected_batch_size=q * rows,
        rows=rows,
        planned_steps=planned_steps,
        target_epsilon=cfg["target_epsilon"],
        seed=cfg["seed"],
    )


def per_example_nll(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed token NLL per row, target tokens per row)`` in fp32 (position i predicts
    ``labels[i + 1]``; ``-100`` targets are skipped)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=_IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    return nll.sum(dim=1), (shift_labels != _IGNORE_INDEX).sum(dim=1)


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


class DPSGDRun:
    """Opacus's per-example gradients, clipping, noise and accounting for one training run.

    Wraps ``model`` in a ``GradSampleModule`` and ``optimizer`` in a ``DPOptimizer`` (the
    inner optimizer still takes the step, so its scheduler keeps working); :meth:`close`
    removes the hooks and the per-parameter attributes again.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        params: Mapping[str, torch.nn.Parameter],
        plan: DPSGDPlan,
        device: torch.device,
    ) -> None:
        _require_opacus()
        from opacus import GradSampleModule
        from opacus.accountants import create_accountant
        from opacus.optimizers import DPOptimizer

        self.plan = plan
        self.params = dict(params)
        seed = plan.seed if plan.seed is not None else _random_seed()
        self._sampler = torch.Generator().manual_seed(seed)
        self._noise = torch.Generator(device=device).manual_seed((seed * 2654435761 + 1) % 2**63)
        try:
            self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        except NotImplementedError as exc:
            raise DPSGDUnsupportedError(
                f"Opacus cannot compute per-example gradients for this model's trainable layers: "
                f"{exc}"
            ) from exc
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            expected_batch_size=plan.expected_batch_size,
            loss_reduction="mean",
            generator=self._noise,
        )
        self.accountant = create_accountant(plan.accountant)
        self.noised_steps = 0
        self.empty_steps = 0

    def groups(
        self, dataset: Any, steps: int, micro_batch: int
    ) -> Iterator[list[dict[str, torch.Tensor]]]:
        """``steps`` Poisson-sampled logical batches, each as micro-batches of at most
        ``micro_batch`` rows (an empty list when no row was drawn)."""
        n = self.plan.rows
        for _ in range(steps):
            picked = torch.rand(n, generator=self._sampler) < self.plan.sample_rate
            idx = picked.nonzero().flatten().tolist()
            yield [
                dataset.collate(idx[i : i + micro_batch]) for i in range(0, len(idx), micro_batch)
            ]

    def accumulate(self, micro_batches: Sequence[Mapping[str, torch.Tensor]]) -> tuple[float, bool]:
        """Per-example clipped, summed and noised gradient of one logical batch into ``.grad``.

        Returns ``(mean task NLL over the batch's tokens (nan when empty), every loss was
        finite)``. On success the step has been charged to the accountant.
        """
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        device = next(iter(self.params.values())).device
        total_nll = 0.0
        n_targets = 0
        with warnings.catch_warnings():
            # the base's inputs need no grad; Opacus's full backward hooks still fire correctly
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for k, mb in enumerate(micro_batches):
                batch = {key: v.to(device) for key, v in mb.items()}
                out = self.gsm(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    use_cache=False,
                )
                nll, count = per_example_nll(out.logits, batch["labels"])
                # mean over rows of each row's mean token NLL: Opacus's "mean" reduction turns
                # it back into per-row gradients, and no row's gradient depends on another row
                loss = (nll / count.clamp_min(1)).mean()
                total_nll += float(nll.detach().sum())
                n_targets += int(count.sum())
                if not bool(torch.isfinite(loss.detach())):
                    opt.zero_grad(set_to_none=True)
                    return total_nll / max(n_targets, 1), False
                loss.backward()
                del out, loss
                self._check_grad_samples()
                if k < len(micro_batches) - 1:  # Opacus virtual step: clip and accumulate only
                    opt.signal_skip_step(do_skip=True)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        if not micro_batches:  # nothing drawn: the step still releases noise
            self.empty_steps += 1
            for p in self.params.values():
                p.grad_sample = p.new_zeros((0, *p.shape))
        opt.pre_step()  # clip, sum, add N(0, (zC)^2), divide by the expected batch size
        self.accountant.step(
            noise_multiplier=self.plan.noise_multiplier, sample_rate=self.plan.sample_rate
        )
        self.noised_steps += 1
        loss_value = total_nll / n_targets if n_targets else math.nan
        return loss_value, True

    def _check_grad_samples(self) -> None:
        missing = [n for n, p in self.params.items() if getattr(p, "grad_sample", None) is None]
        if missing:
            raise DPSGDUnsupportedError(
                f"{len(missing)} trainable parameter(s) got no per-example gradient from Opacus, "
                f"e.g. {missing[:2]}: they are not reached through a layer Opacus supports, or "
                "activation checkpointing is on"
            )

    def epsilon(self) -> float:
        if self.noised_steps == 0:
            return 0.0
        if self.plan.noise_multiplier <= 0:
            return math.inf
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(self.accountant.get_epsilon(delta=self.plan.delta))

    def report(self) -> dict[str, Any]:
        """What the run spent: epsilon at delta, and the mechanism's parameters."""
        d = self.plan.to_dict()
        d.update(epsilon=self.epsilon(), steps=self.noised_steps, empty_steps=self.empty_steps)
        return d

    def close(self) -> None:
        """Remove Opacus's hooks and per-parameter attributes (the model is usable as before)."""
        try:
            self.gsm._close()
        finally:
            for p in self.params.values():
                for attr in ("grad_sample", "summed_grad", "_current_grad_sample",
                             "_forward_counter", "_norm_sample"):
                    if hasattr(p, attr):
                        delattr(p, attr)
