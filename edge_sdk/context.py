"""The device-side runtime context handed to an algorithm's client half: the model (loaded
once, quantized as the device profile allows, LoRA attached), the private data, training and
evaluation. Private data never leaves this object except as what the algorithm computes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from algorithms.core.modeling import LoraSpec, attach_lora, load_causal_lm, lora_spec_of
from algorithms.core.textdata import EvalResult, evaluate_nll
from algorithms.core.training import TrainConfig, TrainResult, train_causal_lm

log = logging.getLogger("cotune.edge")


class DeviceContext:
    def __init__(self, party_id: str, model_path: str | Path, private_data: list, eval_data: list | None = None, *,
                 quant: str = "fp32", device: str = "cpu", gradient_checkpointing: bool = False,
                 progress: Any = "log", eval_batch_size: int = 8):
        self.party_id = party_id
        self.round = 0
        self.model_path = str(model_path)
        self._private = list(private_data)
        self._eval = list(eval_data or [])
        self.quant, self.device = quant, device
        self.gradient_checkpointing = gradient_checkpointing
        self.progress = progress
        self.eval_batch_size = eval_batch_size
        self._base = None
        self._peft = None
        self._tok = None
        self.load_report = None

    def _load_base(self) -> None:
        if self._base is None:
            self._base, self._tok, self.load_report = load_causal_lm(
                self.model_path, quant=self.quant, device=self.device,
                gradient_checkpointing=self.gradient_checkpointing)
            for note in self.load_report.notes:
                log.warning("%s: %s", self.party_id, note)

    def model(self, lora: LoraSpec) -> Any:
        """The base model with a LoRA adapter of ``lora``'s shape (created once; a different
        spec rebuilds the adapter)."""
        self._load_base()
        if self._peft is not None and lora_spec_of(self._peft).to_dict() != lora.to_dict():
            log.info("%s: LoRA spec changed, re-attaching", self.party_id)
            self._peft = None
            self._base, self._tok = None, None
            self._load_base()
        if self._peft is None:
            self._peft = attach_lora(self._base, lora, seed=0)
        return self._peft

    def tokenizer(self) -> Any:
        self._load_base()
        return self._tok

    def private_data(self) -> list:
        return self._private

    def eval_data(self) -> list:
        return self._eval

    def train(self, data: Any, cfg: TrainConfig, extra_loss: Any = None, **kw) -> TrainResult:
        if self._peft is None:
            raise RuntimeError("call model(lora) before train()")
        return train_causal_lm(self._peft, data, cfg, progress=self.progress, extra_loss=extra_loss,
                               tokenizer=self._tok, **kw)

    def evaluate(self, texts: list, block_size: int) -> EvalResult:
        model = self._peft if self._peft is not None else self._base
        return evaluate_nll(model, self.tokenizer(), texts, block_size=block_size, batch_size=self.eval_batch_size)

    def log(self, msg: str) -> None:
        log.info("%s: %s", self.party_id, msg)
