from __future__ import annotations

from collections.abc import Mapping

from algorithms.base import ClientAlgorithm, ClientReport, unpack_state
from algorithms.core.checkpoint_blob import use_checkpoint_blob
from algorithms.core.emulator import adapter_layers
from algorithms.core.lora_state import from_wire, to_wire
from algorithms.core.modeling import adapter_state, load_adapter_state
from algorithms.fedavg.client import held_out_metrics

from .config import FedBiOTConfig
from .merge import MergedProximal
from .payload import plan_file, read_emulator_meta

EMULATORS_DIR = "fedbiot-emulators"
KEEP_EMULATORS = 2  # the current one and the previous (a repeated task may still name it)


def use_emulator(blob: bytes, ctx):
    """Unpack the emulator blob under the device's workspace (named by its SHA-256, so an
    unchanged emulator is neither written nor loaded again), make it the context's base model
    and return its plan."""
    meta = read_emulator_meta(blob)  # validates before anything is written
    use_checkpoint_blob(blob, ctx, EMULATORS_DIR, meta, keep=KEEP_EMULATORS, extra_files=plan_file(meta))
    return meta["plan"]


class FedBiOTClient(ClientAlgorithm):
    """The device half: train the adapter (LoRA on the adapter layers only) through the frozen
    emulator the aggregator sent, with the proximal term on the merged adapter, and upload it.
    The device never holds the full LLM; its own ``model_path`` is not used."""

    name = "fedbiot"
    trains_device_model = False  # it trains the emulator the task brings

    def _model(self, downloads: Mapping[str, bytes], ctx, cfg: FedBiOTConfig):
        plan = use_emulator(downloads["emulator"], ctx)
        model = ctx.model(cfg.lora_spec(), layers=adapter_layers(plan, "emulator"))
        load_adapter_state(model, from_wire(unpack_state(downloads["global"])))
        return model

    def run(self, task, downloads: Mapping[str, bytes], ctx) -> ClientReport:
        cfg = FedBiOTConfig.from_dict(task.config)
        model = self._model(downloads, ctx, cfg)
        before = held_out_metrics(ctx, cfg.eval_block_size)
        data = ctx.private_data()
        extra = MergedProximal(model, cfg.proximal_mu) if cfg.proximal_mu > 0 else None
        result = ctx.train(data, cfg.train_config(), extra_loss=extra)
        after = held_out_metrics(ctx, cfg.eval_block_size)
        metrics = {
            "train": result.to_dict(),
            **{f"{k}_before": v for k, v in before.items()},
            **{f"{k}_after": v for k, v in after.items()},
        }
        if extra is not None:
            metrics["merged_distance"] = float(extra.distance().detach())
        return ClientReport(
            num_examples=len(data),
            tensors=to_wire(adapter_state(model), cfg.wire_dtype),
            metrics=metrics,
        )

    def apply_final(
        self, downloads: Mapping[str, bytes], ctx, config: Mapping | None = None
    ) -> dict:
        """Evaluate the federation's adapter on the final emulator (adapter + emulator)."""
        cfg = FedBiOTConfig.from_dict(dict(config or {}))
        self._model(downloads, ctx, cfg)
        return {f"{k}_final": v for k, v in held_out_metrics(ctx, cfg.eval_block_size).items()}
