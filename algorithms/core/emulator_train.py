"""FedBiOT training-side kernels: adapter LoRA, middle-block output, losses, emulator alignment.

Model surgery (plans, building and saving emulators, adapter key renaming) is in
:mod:`algorithms.core.emulator`.

Losses. ``L2n(s, t) = mean((t - s)^2) / mean(t^2)``, i.e.
``mean(((t - s) / sqrt(mean(t^2)))^2)`` with ONE teacher RMS over all elements of the batch
(every attended position and hidden unit), not one per token, as the formula in ALGORITHMS.md
has a single mean: the loss is the MSE scaled by a per-batch constant, so its gradient points
where plain MSE's does and no low-norm token is weighted up. The teacher is detached.
``kd_kl`` is ``KL(p_teacher || p_student)`` per position at temperature ``T``, averaged over
attended positions and multiplied by ``T^2`` (so its gradient scale does not shrink with
``T``). ALGORITHMS.md writes the alignment term as ``KL(p_emulator+adapter || p_full+adapter)``;
here the full model is the teacher and the direction is the usual distillation one (forward KL);
``reverse=True`` gives ``KL(p_student || p_teacher)``.

Alignment (:func:`align_emulator`, the server's lower-level step): with the adapter frozen,
train the emulator's kept middle layers on public text so that the hidden state leaving its
middle block matches the full model's and its next-token distribution matches the full
model's: ``L = L2n + lambda_kd * KL``. ``mode="layers"`` trains the middle layers' weights;
``mode="lora"`` trains a low-rank delta on the middle layers' linear maps and folds it into
their weights at the end, so in both modes the emulator stays a plain checkpoint.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch

from algorithms.core.emulator import (
    EmulatorError,
    EmulatorPlan,
    adapter_layers,
    decoder_layers,
    layer_lora_kwargs,
    which_model,
)
from algorithms.core.modeling import (
    DEFAULT_LORA_TARGETS,
    LoraSpec,
    attach_lora,
    is_quantized,
    model_type_of,
)
from algorithms.core.textdata import TokenizedDataset
from algorithms.core.training import TrainProgress, _Reporter

__all__ = [
    "ALIGN_MODES",
    "AlignConfig",
    "AlignLosses",
    "AlignResult",
    "MiddleOutput",
    "align_emulator",
    "alignment_losses",
    "attach_adapter_lora",
    "attach_layer_lora",
    "kd_kl",
    "l2n_loss",
    "middle_block_output",
]

ALIGN_MODES = ("layers", "lora")


# --------------------------------------------------------------------------------------------
# adapter LoRA and the hidden state leaving the middle block


def attach_adapter_lora(
    model: torch.nn.Module, spec: LoraSpec, plan: EmulatorPlan, *, seed: int | None = None
) -> Any:
    """Freeze ``model`` (emulator or full) and put a fresh LoRA on its adapter layers only.

    Like :func:`~algorithms.core.modeling.attach_lora` but with peft's ``layers_to_transform``;
    the emulator and the full model get the same initial LoRA values for the same ``seed``
    (modules are created in the same order). Note: ``save_peft_adapter`` does not record the
    layer restriction; move adapters with :func:`~algorithms.core.modeling.adapter_state`.
    """
    return attach_layer_lora(model, spec, adapter_layers(plan, which_model(model, plan)), seed=seed)


def attach_layer_lora(
    model: torch.nn.Module, spec: LoraSpec, layers: Iterable[int], *, seed: int | None = None
) -> Any:
    """Freeze ``model`` and put a fresh LoRA of ``spec`` on the given decoder layers only.

    The plan-free form of :func:`attach_adapter_lora` (same initial values for the same layers
    and ``seed``), for runtimes that know the layer indices but not the plan.
    """
    from peft import PeftModel

    if not isinstance(spec, LoraSpec):
        raise EmulatorError(f"spec must be a LoraSpec, got {type(spec).__name__}")
    if isinstance(model, PeftModel):
        raise EmulatorError("model already carries a peft adapter; attach to the base model")
    return attach_lora(model, spec, seed=seed, peft_extra=layer_lora_kwargs(model, list(layers)))


class MiddleOutput(NamedTuple):
    """``hidden``: input of the first top-adapter layer ``(batch, seq, hidden)``; ``logits``."""

    hidden: torch.Tensor
    logits: torch.Tensor


def middle_block_output(
    model: torch.nn.Module,
    plan: EmulatorPlan,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> MiddleOutput:
    """One forward pass of the emulator or the full model (told apart by layer count).

    Returns the hidden state entering the first top-adapter layer, which for the emulator is
    the output of its middle block and for the full model the output of the original layer
    just below the top adapter, and the logits. Gradients flow as the caller's context allows.
    """
    layers = decoder_layers(model)[2]
    layer = layers[plan.middle_output_index(which_model(model, plan))]
    captured: list[torch.Tensor] = []

    def grab(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not captured:  # checkpointing re-runs the layer in backward; keep the forward value
            captured.append(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    if not captured:
        raise EmulatorError("the first top-adapter layer did not run in the forward pass")
    return MiddleOutput(captured[0], out.logits)


# --------------------------------------------------------------------------------------------
# losses


def _position_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(like.shape[:2]):
        raise EmulatorError(
            f"mask shape {tuple(mask.shape)} must be (batch, seq) = {tuple(like.shape[:2])}"
        )
    m = mask.to(device=like.device, dtype=torch.bool)
    if not bool(m.any()):
        raise EmulatorError("mask selects no position")
    return m


def l2n_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """``mean((t - s)^2) / mean(t^2)`` over the positions ``mask`` selects (all when None).

    Tensors are ``(batch, seq, hidden)``; ``mask`` is ``(batch, seq)`` (1 = attended). Computed
    in fp32; the teacher is detached; ``eps`` guards an all-zero teacher.
    """
    if tuple(student_hidden.shape) != tuple(teacher_hidden.shape):
        raise EmulatorError(
            f"student {tuple(student_hidden.shape)} and teacher {tuple(teacher_hidden.shape)} "
            "hidden states differ in shape"
        )
    t = teacher_hidden.detach().to(device=student_hidden.device, dtype=torch.float32)
    s = student_hidden.float()
    m = _position_mask(mask, s)
    if m is not None:
        t, s = t[m], s[m]
    return (t - s).pow(2).mean() / t.pow(2).mean().clamp_min(eps)


def kd_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    reverse: bool = False,
) -> torch.Tensor:
    """``T^2 * mean over attended positions of KL(p_teacher || p_student)`` at temperature T.

    Logits are ``(batch, seq, vocab)``; ``mask`` ``(batch, seq)``. ``reverse=True`` computes
    ``KL(p_student || p_teacher)``. fp32; the teacher is detached.
    """
    if isinstance(temperature, bool) or not temperature > 0 or not math.isfinite(temperature):
        raise EmulatorError(f"temperature must be a finite number > 0, got {temperature!r}")
    if tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise EmulatorError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits differ in shape"
        )
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = teacher_logits.detach().to(device=student_logits.device, dtype=torch.float32)
    log_t = torch.log_softmax(t / temperature, dim=-1)
    if reverse:
        per_pos = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        per_pos = (log_t.exp() * (log_t - log_s)).sum(-1)
    m = _position_mask(mask, student_logits)
    kl = per_pos[m].mean() if m is not None else per_pos.mean()
    return kl * (temperature * temperature)


class AlignLosses(NamedTuple):
    """The alignment loss of one batch (tensors) or averaged over batches (floats)."""

    total: Any
    l2n: Any
    kl: Any


def alignment_losses(
    emulator: torch.nn.Module,
    full_model: torch.nn.Module,
    plan: EmulatorPlan,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    lambda_kd: float = 1.0,
    temperature: float = 1.0,
) -> AlignLosses:
    """``L2n(middle outputs) + lambda_kd * KL(p_full || p_emulator)`` on one batch.

    The full model (teacher, with whatever adapter it carries) runs under ``no_grad`` on its own
    device; the emulator's graph is kept. Padding positions are excluded.
    """
    dev_f = _device_of(full_model)
    with torch.no_grad():
        teacher = middle_block_output(
            full_model, plan, input_ids.to(dev_f), attention_mask.to(dev_f)
        )
    dev_e = _device_of(emulator)
    mask = attention_mask.to(dev_e)
    student = middle_block_output(emulator, plan, input_ids.to(dev_e), mask)
    l2n = l2n_loss(student.hidden, teacher.hidden, mask)
    kl = kd_kl(student.logits, teacher.logits, mask, temperature)
    return AlignLosses(l2n + lambda_kd * kl, l2n, kl)


# --------------------------------------------------------------------------------------------
# alignment


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


_INT_FIELDS = {
    "max_steps": 1,
    "batch_size": 1,
    "block_size": 2,
    "lora_r": 1,
    "eval_batches": 1,
    "log_every": 1,
}
_POSITIVE_FIELDS = ("lr", "temperature", "lora_alpha")
_NON_NEGATIVE_FIELDS = ("lambda_kd", "weight_decay")


@dataclass
class AlignConfig:
    """Hyper-parameters of :func:`align_emulator` (validated on construction).

    ``max_steps`` optimizer steps of one batch each, cycling over the public data (reshuffled
    per pass, seeded by ``seed``). ``eval_batches``: the first batches of the unshuffled data,
    scored before and after training. ``lora_r``/``lora_alpha``/``lora_targets``: the low-rank
    delta of ``mode="lora"`` (targets default to the architecture's LoRA targets).
    """

    mode: str = "layers"
    max_steps: int = 50
    lr: float = 1e-4
    batch_size: int = 2
    block_size: int = 128
    lambda_kd: float = 1.0
    temperature: float = 1.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None
    eval_batches: int = 4
    log_every: int = 10

    def __post_init__(self) -> None:
        errs: list[str] = []
        if self.mode not in ALIGN_MODES:
            errs.append(f"mode must be one of {ALIGN_MODES}, got {self.mode!r}")
        for name, low in _INT_FIELDS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                errs.append(f"{name} must be an integer >= {low}, got {v!r}")
        for name in (*_POSITIVE_FIELDS, *_NON_NEGATIVE_FIELDS, "max_grad_norm"):
            v = getattr(self, name)
            if name == "max_grad_norm" and v is None:
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            low = ">= 0" if name in _NON_NEGATIVE_FIELDS else "> 0"
            if not ok or v < 0 or (v == 0 and name not in _NON_NEGATIVE_FIELDS):
                errs.append(f"{name} must be a finite number {low}, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            errs.append(f"seed must be an integer, got {self.seed!r}")
        if self.lora_targets is not None:
            tm = self.lora_targets
            if isinstance(tm, str) or not all(isinstance(t, str) and t for t in tm):
                errs.append(f"lora_targets must be a list of module names, got {tm!r}")
            else:
                self.lora_targets = tuple(tm)
        if errs:
            raise EmulatorError("invalid AlignConfig: " + "; ".join(errs))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlignConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise EmulatorError(f"unknown AlignConfig fields {sorted(unknown)}")
        return cls(**dict(d))


@dataclass
class AlignResult:
    """Outcome of :func:`align_emulator`; ``before``/``after`` are means over the eval batches.

    ``stopped_by``: max_steps | non_finite_loss | callback.
    """

    mode: str
    steps: int
    before: AlignLosses
    after: AlignLosses
    seconds: float
    stopped_by: str
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["before"], d["after"] = self.before._asdict(), self.after._asdict()
        return d


class _LowRankDelta(torch.nn.Module):
    """``base(x) + scaling * x A^T B^T`` around one frozen ``nn.Linear`` or GPT-2 ``Conv1D``."""

    def __init__(self, base: torch.nn.Module, r: int, alpha: float) -> None:
        super().__init__()
        w = base.weight
        self.conv1d = not isinstance(base, torch.nn.Linear)  # Conv1D stores (in, out)
        fan_in, fan_out = (w.shape[0], w.shape[1]) if self.conv1d else (w.shape[1], w.shape[0])
        self.base = base
        self.scaling = float(alpha) / r
        self.delta_a = torch.nn.Parameter(torch.empty(r, fan_in, device=w.device))
        self.delta_b = torch.nn.Parameter(torch.zeros(fan_out, r, device=w.device))
        torch.nn.init.kaiming_uniform_(self.delta_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        delta = (x.to(self.delta_a.dtype) @ self.delta_a.T) @ self.delta_b.T
        return y + (delta * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merged(self) -> torch.nn.Module:
        """The base module with the delta folded into its weight."""
        d = (self.delta_b @ self.delta_a) * self.scaling  # (out, in)
        w = self.base.weight
        w.add_((d.T if self.conv1d else d).to(w.dtype))
        return self.base


_Wrapped = list[tuple[torch.nn.Module, str, _LowRankDelta]]


def _wrap_middle(
    emulator: torch.nn.Module, plan: EmulatorPlan, cfg: AlignConfig, wrapped: _Wrapped
) -> None:
    """Wrap the middle layers' target modules, recording each in ``wrapped`` as it goes."""
    from transformers.pytorch_utils import Conv1D

    model_type = model_type_of(emulator)
    targets = cfg.lora_targets or DEFAULT_LORA_TARGETS.get(model_type)
    if not targets:
        raise EmulatorError(f"no default LoRA targets for {model_type!r}; set lora_targets")
    layers = decoder_layers(emulator)[2]
    for i in plan.middle_emulator_indices:
        for name, mod in list(layers[i].named_modules()):
            parent_name, _, leaf = name.rpartition(".")
            if not name or leaf not in targets:
                continue
            if type(mod) not in (torch.nn.Linear, Conv1D):
                raise EmulatorError(
                    f"layer {i} {name!r} is a {type(mod).__name__}; mode='lora' needs plain "
                    "linear layers (no LoRA or quantization on the emulator's middle block)"
                )
            wrapper = _LowRankDelta(mod, cfg.lora_r, cfg.lora_alpha)
            parent = layers[i].get_submodule(parent_name)
            setattr(parent, leaf, wrapper)
            wrapped.append((parent, leaf, wrapper))
    if not wrapped:
        raise EmulatorError(f"no module named {list(targets)} in the emulator's middle layers")


def _trainable(
    emulator: torch.nn.Module, plan: EmulatorPlan, cfg: AlignConfig, wrapped: _Wrapped
) -> list[torch.nn.Parameter]:
    """Freeze the emulator, then make the middle block (or a delta on it) trainable."""
    for p in emulator.parameters():
        p.requires_grad_(False)
    if cfg.mode == "layers":
        layers = decoder_layers(emulator)[2]
        middle = [layers[i] for i in plan.middle_emulator_indices]
        if any(hasattr(m, "lora_A") for layer in middle for m in layer.modules()):
            raise EmulatorError("the emulator's middle layers carry a LoRA; remove it")
        params = [p for layer in middle for p in layer.parameters()]
        if any(not p.is_floating_point() for p in params):
            raise EmulatorError("middle-layer weights are not floating point")
    else:
        _wrap_middle(emulator, plan, cfg, wrapped)
        params = [p for _, _, w in wrapped for p in (w.delta_a, w.delta_b)]
    for p in params:
        p.requires_grad_(True)
    return params


def _merge(wrapped: _Wrapped) -> None:
    """Fold every delta into its base weight and put the base module back (empties the list)."""
    while wrapped:
        parent, leaf, wrapper = wrapped.pop()
        setattr(parent, leaf, wrapper.merged())


def _endless_batches(
    data: TokenizedDataset, cfg: AlignConfig
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    for epoch in itertools.count():
        for batch in data.batches(cfg.batch_size, epoch=epoch, shuffle=True):
            yield epoch, batch


def _batch_losses(
    emulator: torch.nn.Module,
    full_model: torch.nn.Module,
    plan: EmulatorPlan,
    batch: Mapping[str, torch.Tensor],
    cfg: AlignConfig,
) -> AlignLosses:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return alignment_losses(emulator, full_model, plan, ids, mask, cfg.lambda_kd, cfg.temperature)


def _evaluate(
    emulator: torch.nn.Module,
    full_model: torch.nn.Module,
    plan: EmulatorPlan,
    batches: list[dict[str, torch.Tensor]],
    cfg: AlignConfig,
) -> AlignLosses:
    sums = [0.0, 0.0, 0.0]
    with torch.no_grad():
        for b in batches:
            for j, v in enumerate(_batch_losses(emulator, full_model, plan, b, cfg)):
                sums[j] += float(v)
    return AlignLosses(*(s / len(batches) for s in sums))


def align_emulator(
    emulator: torch.nn.Module,
    full_model: torch.nn.Module,
    plan: EmulatorPlan,
    public_texts: Iterable[Any] | TokenizedDataset,
    tokenizer: Any = None,
    cfg: AlignConfig | None = None,
    progress: str | Callable[[TrainProgress], Any] | None = "log",
) -> AlignResult:
    """Align the emulator's middle block with the full model on public data (in place).

    ``emulator``/``full_model``: plain or peft-wrapped models carrying the same (frozen)
    adapter; the adapter and everything outside the emulator's kept middle layers stay
    unchanged, and every ``requires_grad`` flag is restored afterwards. ``public_texts``: raw
    examples (with ``tokenizer``; ``cfg.block_size`` tokens per block) or a
    :class:`TokenizedDataset`. ``progress``: ``"log"``, ``"tqdm"``, None, or a callable taking
    :class:`~algorithms.core.training.TrainProgress` (``loss`` = total alignment loss) that
    may return True to stop. Both models run in eval mode (no dropout); the result is
    deterministic for ``cfg.seed`` on a given device.
    """
    cfg = cfg if cfg is not None else AlignConfig()
    if not isinstance(cfg, AlignConfig):
        raise EmulatorError(f"cfg must be an AlignConfig, got {type(cfg).__name__}")
    n_emu, n_full = len(decoder_layers(emulator)[2]), len(decoder_layers(full_model)[2])
    if (n_emu, n_full) != (plan.n_emulator_layers, plan.n_layers):
        raise EmulatorError(
            f"emulator/full model have {n_emu}/{n_full} decoder layers; the plan expects "
            f"{plan.n_emulator_layers}/{plan.n_layers}"
        )
    if not plan.middle_emulator_indices:
        raise EmulatorError("the plan keeps no middle layer (drop_ratio 1): nothing to align")
    if is_quantized(emulator):
        raise EmulatorError("the emulator is quantized; align a bf16/fp32 emulator")
    if isinstance(public_texts, TokenizedDataset):
        data = public_texts
    elif tokenizer is None:
        raise EmulatorError("raw public texts need tokenizer=...; or pass a TokenizedDataset")
    else:
        data = TokenizedDataset(tokenizer, public_texts, cfg.block_size, seed=cfg.seed)
    eval_set = list(itertools.islice(data.batches(cfg.batch_size, shuffle=False), cfg.eval_batches))

    flags = [(p, p.requires_grad) for p in emulator.parameters()]
    modes = [(m, m.training) for m in (emulator, full_model)]
    emulator.eval()
    full_model.eval()
    wrapped: _Wrapped = []
    losses: list[float] = []
    steps = tokens = 0
    stopped_by = "max_steps"
    dev = _device_of(emulator)
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            params = _trainable(emulator, plan, cfg, wrapped)
            before = _evaluate(emulator, full_model, plan, eval_set, cfg)
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
            reporter = _Reporter(progress, cfg.max_steps, cfg.log_every)
            for epoch, batch in _endless_batches(data, cfg):
                loss = _batch_losses(emulator, full_model, plan, batch, cfg).total
                finite = bool(torch.isfinite(loss.detach()))
                if finite:
                    loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                    finite = bool(torch.isfinite(norm))
                if not finite:
                    stopped_by = "non_finite_loss"
                    break
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
                tokens += int(batch["attention_mask"].sum())
                losses.append(float(loss.detach()))
                seconds = time.perf_counter() - t0
                report = TrainProgress(
                    steps, cfg.max_steps, epoch, losses[-1], cfg.lr, tokens, seconds
                )
                if reporter.step(report):
                    stopped_by = "callback"
                    break
                if steps >= cfg.max_steps:
                    break
        _merge(wrapped)
        after = _evaluate(emulator, full_model, plan, eval_set, cfg)
    finally:
        _merge(wrapped)  # after an exception: leave a plain model behind
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        for m, was_training in modes:
            m.train(was_training)
    seconds = time.perf_counter() - t0
    last = losses[-1] if losses else math.nan
    reporter.close(TrainProgress(steps, cfg.max_steps, 0, last, cfg.lr, tokens, seconds, True))
    return AlignResult(
        mode=cfg.mode,
        steps=steps,
        before=before,
        after=after,
        seconds=seconds,
        stopped_by=stopped_by,
        trainable_parameters=sum(int(p.numel()) for p in params),
        losses=losses,
    )
