"""The device-side runtime context handed to an algorithm's client half: the model (loaded
once, quantized as the device profile allows, LoRA attached), the private data, training and
evaluation. Private data never leaves this object except as what the algorithm computes.

The base model is the device's own ``model_path`` unless an algorithm switches it with
:meth:`DeviceContext.use_base` (FedBiOT trains on the emulator the aggregator sends); files an
algorithm keeps across rounds (such as that emulator) live under :meth:`DeviceContext.workspace`."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from algorithms.core.modeling import LoraSpec, attach_lora, load_causal_lm
from algorithms.core.textdata import EvalResult, evaluate_nll
from algorithms.core.training import TrainConfig, TrainResult, train_causal_lm

log = logging.getLogger("cotune.edge")


class DeviceContext:
    def __init__(self, party_id: str, model_path: str | Path, private_data: list, eval_data: list | None = None, *,
                 quant: str = "fp32", device: str = "cpu", gradient_checkpointing: bool = False,
                 progress: Any = "log", eval_batch_size: int = 8, work_dir: str | Path | None = None):
        self.party_id = party_id
        self.round = 0
        self.model_path = str(model_path)  # the device's own model
        self.base_path = self.model_path  # what model() loads now (see use_base)
        self._work_dir = Path(work_dir) if work_dir is not None else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._peft_key: str | None = None
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
                self.base_path, quant=self.quant, device=self.device,
                gradient_checkpointing=self.gradient_checkpointing)
            for note in self.load_report.notes:
                log.warning("%s: %s", self.party_id, note)

    def model(self, lora: LoraSpec, layers: Sequence[int] | None = None) -> Any:
        """The base model with a LoRA adapter of ``lora``'s shape, on every decoder layer or only
        on ``layers`` (indices); created once, a different spec or layer set rebuilds it."""
        key = json.dumps([lora.to_dict(), sorted(int(i) for i in layers) if layers is not None else None])
        if self._peft is not None and key != self._peft_key:
            log.info("%s: LoRA spec changed, re-attaching", self.party_id)
            self._peft = None
            self._base, self._tok = None, None  # peft wrapped the old base in place
        self._load_base()
        if self._peft is None:
            if layers is None:
                self._peft = attach_lora(self._base, lora, seed=0)
            else:
                from algorithms.core.emulator_train import attach_layer_lora

                self._peft = attach_layer_lora(self._base, lora, layers, seed=0)
            self._peft_key = key
        return self._peft

    def use_base(self, path: str | Path | None) -> None:
        """Load a different base model from now on (e.g. one the aggregator sent, unpacked under
        :meth:`workspace`); None goes back to the device's own ``model_path``. The same path
        again keeps the loaded model and adapter."""
        new = str(path) if path is not None else self.model_path
        if new != self.base_path:
            log.info("%s: base model is now %s", self.party_id, new)
            self.base_path = new
            self._base = self._peft = self._tok = None
            self._peft_key = None

    def workspace(self) -> Path:
        """A directory the algorithm halves may keep files in across rounds: ``work_dir`` when
        given, else a temporary directory removed with this context."""
        if self._work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"cotune-{self.party_id}-")
            self._work_dir = Path(self._tmp.name)
        self._work_dir.mkdir(parents=True, exist_ok=True)
        return self._work_dir

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
        if self.gradient_checkpointing and not cfg.gradient_checkpointing:  # chosen for this device
            cfg = dataclasses.replace(cfg, gradient_checkpointing=True)
        return train_causal_lm(self._peft, data, cfg, progress=self.progress, extra_loss=extra_loss,
                               tokenizer=self._tok, **kw)

    def evaluate(self, texts: list, block_size: int) -> EvalResult:
        model = self._peft if self._peft is not None else self._base
        return evaluate_nll(model, self.tokenizer(), texts, block_size=block_size, batch_size=self.eval_batch_size)

    def log(self, msg: str) -> None:
        log.info("%s: %s", self.party_id, msg)
