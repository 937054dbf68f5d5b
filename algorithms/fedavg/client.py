from __future__ import annotations

import zlib
from collections.abc import Mapping

from algorithms.base import ClientAlgorithm, ClientReport, unpack_state
from algorithms.core.aligned_base import use_sent_base
from algorithms.core.lora_state import from_wire, to_wire
from algorithms.core.modeling import adapter_state, load_adapter_state

from .config import FedAvgConfig


def held_out_metrics(ctx, block_size: int) -> dict:
    """NLL, perplexity and next-token accuracy on the client's held-out data ({} without any)."""
    held = ctx.eval_data()
    if not held:
        return {}
    r = ctx.evaluate(held, block_size)
    return {"nll": r.nll, "ppl": r.ppl, "acc": r.accuracy}


class FedAvgClient(ClientAlgorithm):
    """Train the broadcast LoRA adapter on the private data and upload it. The base is the
    device's own SLM, or the aligned SLM base when the aggregator sends one (FedCoLLM, FedPT:
    ``algorithms.core.aligned_base``)."""

    name = "fedavg"

    def run(self, task, downloads: Mapping[str, bytes], ctx) -> ClientReport:
        dp = task.config.get("dp")  # client-level DP: clip (and, local mode, noise) before upload
        cfg = FedAvgConfig.from_dict({k: v for k, v in task.config.items() if k != "dp"})
        use_sent_base(downloads, ctx)
        model = ctx.model(cfg.lora_spec())
        load_adapter_state(model, from_wire(unpack_state(downloads["global"])))
        before = held_out_metrics(ctx, cfg.eval_block_size)
        data = ctx.private_data()
        result = ctx.train(data, cfg.train_config())
        after = held_out_metrics(ctx, cfg.eval_block_size)
        metrics = {"train": result.to_dict(), **{f"{k}_before": v for k, v in before.items()},
                   **{f"{k}_after": v for k, v in after.items()}}
        tensors = to_wire(adapter_state(model), cfg.wire_dtype)
        if dp:
            from algorithms.core.client_dp import privatize_upload

            tensors = privatize_upload(tensors, unpack_state(downloads["global"]), dp,
                                       salt=zlib.crc32(f"{ctx.party_id}:{task.round}".encode()))
        return ClientReport(num_examples=len(data), tensors=tensors, metrics=metrics)

    def apply_final(self, downloads: Mapping[str, bytes], ctx, config: Mapping | None = None) -> dict:
        cfg = FedAvgConfig.from_dict(dict(config or {}))
        use_sent_base(downloads, ctx)
        model = ctx.model(cfg.lora_spec())
        load_adapter_state(model, from_wire(unpack_state(downloads["global"])))
        return {f"{k}_final": v for k, v in held_out_metrics(ctx, cfg.eval_block_size).items()}
