from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from algorithms.base import (
    AlgorithmError,
    ConfigError,
    RoundOutcome,
    RoundPlan,
    ServerAlgorithm,
    State,
    pack_state,
)
from algorithms.core.emulator import (
    EmulatorError,
    adapter_layers,
    build_emulator,
    decoder_layers,
    emulator_to_full_adapter,
    kept_layers,
)
from algorithms.core.emulator_train import align_emulator, attach_adapter_lora
from algorithms.core.modeling import adapter_state, is_quantized, unwrap_model
from algorithms.core.state_parts import client_part, delta_norm, join, part, to_numpy, to_torch
from algorithms.fedavg.server import wire_cast

from .config import FedBiOTConfig
from .merge import lora_merged
from .payload import pack_emulator

EMULATOR = "emulator"


class FedBiOTServer(ServerAlgorithm):
    """Global state: the adapter LoRA (unprefixed, in the EMULATOR's layer numbering: what
    clients train and send) and, under ``emulator/``, the weights of the emulator's kept middle
    layers (the only part alignment changes; embeddings, adapter layers and head are copies of
    the full LLM, rebuilt from it). A restarted aggregator rebuilds the emulator from the LLM
    and the state, so every blob and every server step comes out the same.

    Before round 1: cut the emulator out of the local LLM (uniform layer dropping) and pre-align
    it on D_a. Round: FedAvg of the adapters -> new adapter, plugged into the full LLM by layer
    position; then (FedBiOT, not FedOT) re-align the emulator against the full LLM carrying it:
    ``L2n(middle outputs) + lambda_kd * KL``. Broadcast: ``global`` (the adapter, wire dtype)
    and ``emulator`` (one self-contained checkpoint blob, see :mod:`.payload`)."""

    name = "fedbiot"

    def __init__(self, config: Mapping[str, Any], ctx):
        super().__init__(config, ctx)
        self.config = FedBiOTConfig.from_dict(dict(config))
        self._full = None
        self._emulator = None
        self._tok = None
        self.plan = None
        self._middle_names: list[str] = []
        self._blob_key: str | None = None
        self._blob: bytes | None = None
        self.pre_align_metrics: dict = {}

    # -- models, built once --------------------------------------------------------------------
    def _setup(self) -> None:
        if self._emulator is not None:
            return
        backend = self.ctx.llm()
        if getattr(backend, "kind", None) != "local":
            raise ConfigError(
                "FedBiOT cuts an emulator out of the LLM's weights, so it needs llm.backend "
                "'local' (a black-box LLM has no layers to drop; use fedpt)"
            )
        full = backend.model
        if unwrap_model(full) is not full or is_quantized(full):
            raise ConfigError(
                "FedBiOT needs the plain LLM weights (llm.quant 'fp32' or 'bf16', no adapter)"
            )
        n = len(decoder_layers(full)[2])
        c = self.config
        try:
            self.plan = kept_layers(n, c.n_adapter_top, c.n_adapter_bottom, c.drop_ratio)
            self._emulator = build_emulator(full, self.plan)
        except EmulatorError as exc:
            raise ConfigError(f"FedBiOT emulator of the {n}-layer LLM: {exc}") from exc
        self._full, self._tok = full, backend.tokenizer()
        layers = decoder_layers(self._emulator)[2]
        prefix = next(name for name, m in self._emulator.named_modules() if m is layers)
        middle = {f"{prefix}.{i}." for i in self.plan.middle_emulator_indices}
        self._middle_names = sorted(
            k for k, _ in self._emulator.named_parameters() if any(k.startswith(p) for p in middle)
        )
        self.ctx.log(
            f"FedBiOT emulator: {self.plan.n_emulator_layers} of {n} layers (full-model layers "
            f"{list(self.plan.origin)}; adapter {list(self.adapter_layers_full())})"
        )

    def adapter_layers_full(self) -> list[int]:
        return adapter_layers(self.plan, "full")

    def _middle_state(self) -> dict[str, np.ndarray]:
        params = dict(self._emulator.named_parameters())
        return {k: params[k].detach().cpu().float().numpy().copy() for k in self._middle_names}

    def _load_middle(self, state: State) -> None:
        middle = part(state, EMULATOR)
        if set(middle) != set(self._middle_names):
            raise AlgorithmError(
                "the state's emulator/ tensors do not match this configuration's emulator "
                f"(state {len(middle)}, emulator {len(self._middle_names)} middle tensors); was the "
                "federation started with another drop_ratio or LLM?"
            )
        params = dict(self._emulator.named_parameters())
        with torch.no_grad():
            for k in self._middle_names:
                p = params[k]
                src = torch.from_numpy(np.ascontiguousarray(middle[k], dtype=np.float32))
                if tuple(src.shape) != tuple(p.shape):
                    raise AlgorithmError(
                        f"emulator/{k} has shape {tuple(src.shape)}, expected {tuple(p.shape)}"
                    )
                p.copy_(src.to(device=p.device, dtype=p.dtype))

    def _public(self) -> list:
        public = self.ctx.public_data()
        if not public:
            raise ConfigError(
                "FedBiOT aligns the emulator on the public set D_a, and the aggregator has none "
                "(set public_data, or pre_align_steps 0 with baseline 'fedot')"
            )
        n = self.config.public_max_samples
        return public[:n] if n else public

    @contextmanager
    def carrying(self, model: str, adapter: Mapping[str, np.ndarray]) -> Iterator[torch.nn.Module]:
        """The ``"full"`` LLM or the ``"emulator"`` with the adapter (emulator numbering) merged
        in for the block; the weights are restored exactly afterwards."""
        self._setup()
        scaling = self.config.lora_spec().scaling
        state = to_torch(adapter)
        if model == "full":
            with lora_merged(self._full, emulator_to_full_adapter(state, self.plan), scaling) as m:
                yield m
        elif model == "emulator":
            with lora_merged(self._emulator, state, scaling) as m:
                yield m
        else:
            raise ValueError(f"model must be 'full' or 'emulator', got {model!r}")

    def _align(
        self, adapter: Mapping[str, np.ndarray], steps: int, seed_offset: int, label: str
    ) -> dict:
        if not self.plan.middle_emulator_indices:
            return {f"{label}_skipped": "the emulator keeps no middle layer"}
        cfg = self.config.align_config(max_steps=steps, seed_offset=seed_offset)
        with self.carrying("full", adapter) as full, self.carrying("emulator", adapter) as emu:
            res = align_emulator(
                emu, full, self.plan, self._public(), tokenizer=self._tok, cfg=cfg, progress=None
            )
        self.ctx.log(
            f"{label}: {res.steps} steps, loss {res.before.total:.4f} -> {res.after.total:.4f}"
        )
        return {
            f"{label}_steps": res.steps,
            f"{label}_loss_before": res.before.total,
            f"{label}_loss_after": res.after.total,
            f"{label}_l2n_after": res.after.l2n,
            f"{label}_kl_after": res.after.kl,
            f"{label}_seconds": round(res.seconds, 3),
        }

    # -- the contract ---------------------------------------------------------------------------
    def initial_state(self) -> State:
        self._setup()
        peft = attach_adapter_lora(
            self._emulator, self.config.lora_spec(), self.plan, seed=self.config.lora_seed
        )
        adapter = to_numpy(adapter_state(peft))
        # back to the plain emulator: only the adapter's initial values were wanted
        self._emulator = peft.unload()
        for p in self._emulator.parameters():
            p.requires_grad_(False)
        c = self.config
        if self.plan.middle_emulator_indices and (c.pre_align_steps > 0 or c.per_round_alignment):
            self._public()  # fail before round 1, not after it, when D_a is missing
        if self.config.pre_align_steps > 0:
            self.pre_align_metrics = self._align(
                adapter, self.config.pre_align_steps, 0, "pre_align"
            )
        return join(adapter, **{EMULATOR: self._middle_state()})

    def client_config(self) -> dict:
        return self.config.client_dict()

    def emulator_blob(self, state: State) -> bytes:
        """The emulator of ``state`` as one blob; the same state gives the same bytes."""
        self._setup()
        middle = part(state, EMULATOR)
        h = hashlib.sha256()
        for k in sorted(middle):
            h.update(k.encode())
            h.update(np.ascontiguousarray(middle[k], dtype=np.float32).tobytes())
        key = h.hexdigest()
        if key != self._blob_key:
            self._load_middle(state)
            self._blob, self._blob_key = pack_emulator(self._emulator, self.plan, self._tok), key
        return self._blob

    def _blobs(self, state: State) -> dict[str, bytes]:
        return {
            "global": pack_state(wire_cast(client_part(state), self.config.wire_dtype)),
            "emulator": self.emulator_blob(state),
        }

    def plan_round(self, round: int, state: State) -> RoundPlan:
        return RoundPlan(config=self.client_config(), blobs=self._blobs(state))

    def update_spec_state(self, state: State) -> State:
        return wire_cast(client_part(state), self.config.wire_dtype)

    def finish_round(self, round: int, state: State, aggregate: State) -> RoundOutcome:
        self._setup()
        adapter = {k: np.asarray(v, dtype=np.float32) for k, v in aggregate.items()}
        self._load_middle(state)
        metrics: dict = {"adapter_delta_norm": delta_norm(adapter, client_part(state))}
        c = self.config
        if c.per_round_alignment and round % c.realign_every == 0:
            metrics.update(
                self._align(adapter, self.config.align_config().max_steps, round, "align")
            )
        middle = self._middle_state()
        metrics["emulator_delta_norm"] = delta_norm(middle, part(state, EMULATOR))
        return RoundOutcome(join(adapter, **{EMULATOR: middle}), metrics)

    def final_blobs(self, state: State) -> dict[str, bytes]:
        return self._blobs(state)

    # -- for evaluation -------------------------------------------------------------------------
    def full_adapter(self, state: State) -> dict[str, np.ndarray]:
        """The state's adapter in the full LLM's layer numbering (the plug-back)."""
        self._setup()
        return to_numpy(emulator_to_full_adapter(to_torch(client_part(state)), self.plan))

    @contextmanager
    def full_with(self, state: State) -> Iterator[torch.nn.Module]:
        """The full LLM carrying the state's adapter (merged), e.g. to evaluate it."""
        with self.carrying("full", client_part(state)) as m:
            yield m

    @contextmanager
    def emulator_with(self, state: State) -> Iterator[torch.nn.Module]:
        """The state's emulator carrying the state's adapter (merged)."""
        self._setup()
        self._load_middle(state)
        with self.carrying("emulator", client_part(state)) as m:
            yield m

    def tokenizer(self):
        self._setup()
        return self._tok
