from __future__ import annotations

from collections.abc import Mapping

from algorithms.core.checkpoint_blob import CheckpointBlobError, read_checkpoint_meta, use_checkpoint_blob
from algorithms.fedavg.client import FedAvgClient

BASES_DIR = "fedpt-bases"


class BaseBlobError(CheckpointBlobError):
    """The aligned SLM base the aggregator sent is malformed, of another format or too new."""


def use_sent_base(downloads: Mapping[str, bytes], ctx) -> None:
    """Train on the aligned SLM base when the aggregator sent one (``align_base``), else on the
    device's own model. The blob is checked before anything is written and unpacked once (by
    content hash); it has the architecture of the device's own SLM, so the device's memory plan
    still holds."""
    from .server import BASE, BASE_FORMAT, BASE_VERSION

    blob = downloads.get(BASE)
    if blob is None:
        ctx.use_base(None)
        return
    meta = read_checkpoint_meta(blob, fmt=BASE_FORMAT, max_version=BASE_VERSION, error=BaseBlobError)
    use_checkpoint_blob(blob, ctx, BASES_DIR, meta)


class FedPTClient(FedAvgClient):
    """The device half is FedAvg-LoRA's, on the SLM base the aggregator aligned to the LLM (when
    it sends one); proxy-tuning and its distillation run on the server."""

    name = "fedpt"

    def run(self, task, downloads: Mapping[str, bytes], ctx):
        use_sent_base(downloads, ctx)
        return super().run(task, downloads, ctx)

    def apply_final(self, downloads: Mapping[str, bytes], ctx, config: Mapping | None = None) -> dict:
        use_sent_base(downloads, ctx)
        return super().apply_final(downloads, ctx, config)
