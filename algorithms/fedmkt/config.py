from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from algorithms.base import ConfigError
from algorithms.core.errors import TrainingError
from algorithms.core.modeling import LoraSpec
from algorithms.core.training import TrainConfig
from algorithms.fedavg.config import FedAvgConfig

MODES = ("mutual", "llm2slm")
KD_KINDS = ("ce", "kl")
KEEP_OWN = ("self", "task")
ALIGN_RULES = ("agree", "one_to_one")


def _default_llm_train() -> dict:
    return {"lr": 1e-3, "epochs": 1, "batch_size": 8, "max_steps": 20}


def _default_kd_train() -> dict:
    return {"lr": 1e-3, "epochs": 1, "batch_size": 8, "max_steps": 20}


#: fields only the server needs; everything else travels to the clients in ``Task.config``
SERVER_FIELDS = (
    "llm_lora",
    "llm_train",
    "mode",
    "public_max_samples",
    "public_max_chars",
    "public_split",
    "llm_holdout",
    "align_base",
)


@dataclass
class FedMKTConfig(FedAvgConfig):
    """FedMKT: the client fields of FedAvg (``lora``, ``train``: the client SLM's own adapter
    and local training) plus the knowledge-transfer settings. One ``lora`` reaches every
    client: with families of different architectures leave its ``target_modules`` unset (each
    model then takes its architecture's defaults) or map each ``model_type`` to its own list
    (:class:`~algorithms.core.modeling.LoraSpec`).

    - ``k``: top-k entries per position in every logits payload (both directions).
    - ``lambda_task``: the paper's lambda: ``lambda * CE + (1 - lambda) * KD`` (default 0.9);
      ``"lambda"`` is accepted as its name in a config dict. Must be in (0, 1]: the training
      loop weighs its task term 1, so the KD term gets ``(1 - lambda) / lambda`` (the same
      objective up to the factor lambda, which Adam's updates do not see).
    - ``temperature``, ``kd_kind``: the KD term: soft-target cross-entropy against the selected
      top-k distribution ("ce", the paper's) or KL to it ("kl"; same gradient). ``kd_tail``
      (default true): keep the teacher's top-k probabilities as sent and match the mass it did
      not send as one bucket; false renormalises the top-k (the paper's), which teaches that
      every other token has probability 0: on the quick benchmark that made the LLM worse than
      with no KD at all at lambda 0.5, the tail bucket made it better (temperature 1 only).
    - ``keep_own``: the samples where DualMinCE finds no teacher below the receiver's own CE:
      "self" keeps the receiver's own distribution as the KD target there (its top-k rows
      from before the step, with the same weight; the spec's first reading: it anchors the
      model where no one knows better, so the task term cannot drag it away from what it
      already predicts well), "task" skips KD on them (task loss alone). Within a sample that
      has a teacher, it also decides the rows the teacher cannot fill (``align_rule``):
      "self" its own row there, "task" a one-hot target on its own token (the paper's).
    - ``align_rule``: which receiver rows of a selected sample take the teacher's row after
      the DTW alignment of the two tokenisations. "agree" (default, the paper's): only a
      receiver token aligned one-to-one with a teacher token that agrees with it (equal normal
      forms, or the MinED map carries the teacher token onto it); "one_to_one": every
      one-to-one pair, agreeing or not (the rule before; across tokenizers about one aligned
      row in nine then carried a distribution over another word, ``thus`` against ``us``).
      The metrics report, per round and side, ``kd_aligned_fraction`` (rows that carry a
      teacher row), ``kd_one_to_one_fraction`` and ``kd_agree_fraction`` over all rows of the
      selected samples (see :func:`algorithms.fedmkt.targets.aligned_targets`).
    - ``mode``: "mutual" (the LLM learns from the clients and teaches them) or "llm2slm" (the
      LLM only teaches; its adapter never changes; works with a black-box LLM too).
    - ``fedavg_homogeneous``: also FedAvg the adapters of clients of one family (same
      tokenizer, and therefore assumed the same base model) after their local step.
    - public set D_p: the aggregator's public texts as pieces of at most ``public_max_chars``
      (cut at word boundaries; ``public_split`` true, the default: a long text gives several
      consecutive pieces, false: its first piece only, a truncation as a
      max-length tokenizer call does), the first ``public_max_samples`` pieces with two words or more; every model
      reads at most ``public_block_size`` tokens of a piece, so ``public_max_chars`` should be
      about ``public_block_size`` tokens of text (about 3 characters per token on the zoo's
      tokenizers).
    - ``align_base`` (default null, the paper's setting): DistillConfig fields over
      :data:`algorithms.core.aligned_base.ALIGN_DEFAULTS` (``{}``: the defaults). Before round
      1 the aggregator distils the base LLM into a full copy of every client family that shares
      the LLM's tokenizer (its models role must name a full checkpoint), on D_p with full
      logits; that copy becomes the family's base, sent once as the blob ``base-<vocab
      hash[:16]>`` that only devices of that family fetch. Families with another tokenizer keep
      their own base: distilling across tokenizers through the top-k alignment made the zoo's
      GPT-2 SLM worse on every domain (0.2 nats). Why: see :mod:`algorithms.core.aligned_base`.
    - ``kd_train``: a client's distillation step on D_p (TrainConfig fields), before its
      task training on D_k with ``train`` (the paper's order: step 5 of one round, step 1 of
      the next), so the private-data budget is the same as without FedMKT.
    - ``llm_lora`` / ``llm_train``: the LLM's LoRA and its training on D_p (TrainConfig
      fields; ``seed`` is offset by the round).
    - ``llm_holdout`` (default 0: off): the fraction of the public pieces the aggregator keeps
      out of D_p (every ``round(1 / fraction)``-th piece; neither the LLM nor the clients
      train on them) to judge each of the LLM's steps: a round's LLM update is applied only
      where it lowers the LLM's NLL on those pieces, otherwise the LLM and its teacher payload
      stay as they were (metric ``llm_step``). The LLM learns from D_p's task loss too and
      over-fits it within a few rounds (quick benchmark: dev gap closed 0.56 at round 3,
      0.51 at round 5); the held-out pieces see that without any private data.
    """

    k: int = 16
    lambda_task: float = 0.9
    temperature: float = 1.0
    kd_kind: str = "ce"
    kd_tail: bool = True
    mode: str = "mutual"
    keep_own: str = "task"
    align_rule: str = "agree"
    fedavg_homogeneous: bool = False
    public_max_samples: int | None = 64
    public_max_chars: int = 180  # fits one 64-token block (public_block_size) at >= 2.8 chars/token
    public_split: bool = True
    llm_holdout: float = 0.0
    public_block_size: int = 64
    payload_batch_size: int = 16
    llm_lora: dict = field(default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.0})
    llm_train: dict = field(default_factory=_default_llm_train)
    kd_train: dict = field(default_factory=_default_kd_train)
    align_base: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        errs = []
        from algorithms.core.aligned_base import align_settings

        try:
            self.align_base = align_settings(self.align_base)
        except ConfigError as exc:
            errs.append(str(exc))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= 1024:
            errs.append(
                f"k must be an integer in [1, 1024] (the paper uses 16..128), got {self.k!r}"
            )
        lam = self.lambda_task
        if not (_num(lam) and 0 < lam <= 1):
            errs.append(f"lambda_task must be in (0, 1] (0.9: 90% task loss, 10% KD), got {lam!r}")
        if not (_num(self.temperature) and self.temperature > 0):
            errs.append(f"temperature must be a number > 0, got {self.temperature!r}")
        if not isinstance(self.kd_tail, bool):
            errs.append(f"kd_tail must be true or false, got {self.kd_tail!r}")
        elif self.kd_tail and self.temperature != 1.0:
            errs.append("kd_tail needs temperature 1 (the payload holds log-probabilities at temperature 1)")
        if self.kd_kind not in KD_KINDS:
            errs.append(f"kd_kind must be one of {KD_KINDS}, got {self.kd_kind!r}")
        if self.keep_own not in KEEP_OWN:
            errs.append(f"keep_own must be one of {KEEP_OWN}, got {self.keep_own!r}")
        if self.align_rule not in ALIGN_RULES:
            errs.append(f"align_rule must be one of {ALIGN_RULES}, got {self.align_rule!r}")
        if self.mode not in MODES:
            errs.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.fedavg_homogeneous, bool):
            errs.append(
                f"fedavg_homogeneous must be true or false, got {self.fedavg_homogeneous!r}"
            )
        if self.public_max_samples is not None and not (
            _int(self.public_max_samples) and self.public_max_samples >= 1
        ):
            errs.append("public_max_samples must be None or an integer >= 1")
        if not (_int(self.public_max_chars) and self.public_max_chars >= 8):
            errs.append(f"public_max_chars must be an integer >= 8, got {self.public_max_chars!r}")
        if not isinstance(self.public_split, bool):
            errs.append(f"public_split must be true or false, got {self.public_split!r}")
        if not (_num(self.llm_holdout) and 0 <= self.llm_holdout <= 0.5):
            errs.append(f"llm_holdout must be a fraction in [0, 0.5] (0: off), got {self.llm_holdout!r}")
        if not (_int(self.public_block_size) and self.public_block_size >= 2):
            errs.append(
                f"public_block_size must be an integer >= 2, got {self.public_block_size!r}"
            )
        if not (_int(self.payload_batch_size) and self.payload_batch_size >= 1):
            errs.append(
                f"payload_batch_size must be an integer >= 1, got {self.payload_batch_size!r}"
            )
        for name, default in (("llm_train", _default_llm_train), ("kd_train", _default_kd_train)):
            value = getattr(self, name)
            if not isinstance(value, dict):
                errs.append(f"{name} must be a dict of TrainConfig fields, got {value!r}")
                continue
            setattr(self, name, {**default(), **value})  # a partial dict overrides the defaults
            try:
                TrainConfig.from_dict(getattr(self, name))
            except (TrainingError, TypeError, ValueError) as exc:
                errs.append(f"{name}: {exc}")
        try:
            self.llm_lora_spec()
        except (TrainingError, TypeError, ValueError) as exc:
            errs.append(f"llm_lora: {exc}")
        if errs:
            raise ConfigError("fedmkt config: " + "; ".join(errs))

    @property
    def kd_weight(self) -> float:
        """Weight of the KD term next to the training loop's task term of weight 1."""
        return (1.0 - self.lambda_task) / self.lambda_task

    def llm_lora_spec(self) -> LoraSpec:
        return LoraSpec.from_dict(self.llm_lora)

    def llm_train_config(self, round: int = 0) -> TrainConfig:
        cfg = TrainConfig.from_dict(self.llm_train)
        cfg.seed = cfg.seed + round
        return cfg

    def kd_train_config(self, round: int = 0) -> TrainConfig:
        cfg = TrainConfig.from_dict(self.kd_train)
        cfg.seed = cfg.seed + round
        return cfg

    def client_dict(self) -> dict:
        """What travels to clients in ``Task.config``."""
        return {k: v for k, v in asdict(self).items() if k not in SERVER_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FedMKTConfig:
        data = dict(data)
        if "lambda" in data:
            if "lambda_task" in data:
                raise ConfigError("fedmkt config: give 'lambda' or 'lambda_task', not both")
            data["lambda_task"] = data.pop("lambda")
        return super().from_dict(data)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
