"""EdgeClient: the Python API an edge application embeds.

    client = EdgeClient("fed/parties/cam1/config.json", model_path="models/slm",
                        private_data=my_texts, profile="orin-nano-8gb")
    client.run()                                   # joins, trains when tasks arrive, uploads
    client.save_global_adapter("adapters/global")  # standard peft format

Every task is answered at most once per round: the update is cached on disk before it is sent,
so a repeated Task (the aggregator restarted mid-round) gets the identical update again.
Downloads are kept in a content-addressed cache (``work_dir/blobs``, see :mod:`.blob_cache`):
a blob the client already holds (an unchanged FedBiOT emulator) is not fetched again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from algorithms import registry
from algorithms.base import pack_state, unpack_state
from algorithms.core.memory import PeakMemory
from algorithms.core.modeling import adapter_state, save_peft_adapter
from bridge.codec import decode, encode
from bridge.endpoint import Endpoint, EndpointConfig, broker_config_for
from bridge.envelope import fits_one_message
from bridge.errors import BridgeError
from bridge.messages import (
    BlobRef,
    ErrorReport,
    Note,
    SecAggNeighbours,
    SecAggShares,
    SecAggUnmask,
    Task,
    Update,
)
from bridge.provision import load_party_config

from .blob_cache import DEFAULT_MAX_BYTES, BlobCache
from .context import DeviceContext
from .tegrastats import TegraSampler

log = logging.getLogger("cotune.edge")


def resolve_quant(profile: str | None, quant: str | None) -> str:
    """An explicit ``quant`` wins; otherwise the device profile's default (nf4 where
    bitsandbytes trains on that device, else bf16/fp16/fp32)."""
    if quant:
        return quant
    if profile:
        from firmware_profiles import get_profile

        return get_profile(profile).default_quant()
    return "fp32"


class EdgeClient:
    def __init__(self, party_config: str | os.PathLike, model_path: str | os.PathLike, private_data: list, *,
                 eval_data: list | None = None, profile: str | None = "generic-cpu", quant: str | None = None,
                 work_dir: str | os.PathLike | None = None, broker: dict | None = None,
                 gradient_checkpointing: bool = False, progress: Any = "log",
                 blob_cache_bytes: int = DEFAULT_MAX_BYTES):
        pc = load_party_config(party_config)
        self.party = pc
        self.party_id = pc.party_id
        self.work_dir = Path(work_dir or Path(pc.path).parent / "work")
        (self.work_dir / "updates").mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self.ctx = DeviceContext(pc.party_id, model_path, private_data, eval_data,
                                 quant=resolve_quant(profile, quant), gradient_checkpointing=gradient_checkpointing,
                                 progress=progress, work_dir=self.work_dir / "workspace")
        self.blob_cache = BlobCache(self.work_dir / "blobs", max_bytes=blob_cache_bytes)
        self.blob_stats = {"fetched": 0, "fetched_bytes": 0, "cache_hits": 0, "cache_hit_bytes": 0}
        self.endpoint = Endpoint(pc.identity, pc.directory, broker_config_for(pc, **(broker or {})),
                                 EndpointConfig(max_message_bytes=pc.max_packet_bytes, spill_dir=str(self.work_dir)))
        self.aggregator_id = pc.directory.aggregator()
        self.history: list[dict] = []
        self._wire_mark = (0, 0)  # transport (bytes_in, bytes_out) when the previous round ended
        self.final: dict = {}
        self._algorithm = None
        #: the open secure round: (session, Update without tensors); rounds ever run securely
        self._secure = None
        self._secure_rounds: set[int] = set()

    # -- main loop --------------------------------------------------------------------------
    def run(self, *, max_idle_s: float | None = None, stop_when_done: bool = True) -> list[dict]:
        """Serve tasks until the aggregator says the federation is done (or ``max_idle_s``
        passes without a message)."""
        self.endpoint.start()
        last = time.monotonic()
        try:
            while True:
                inbound = self.endpoint.recv(timeout=0.5)
                if inbound is None:
                    if max_idle_s is not None and time.monotonic() - last > max_idle_s:
                        log.info("%s: idle for %.0fs, leaving", self.party_id, max_idle_s)
                        break
                    continue
                last = time.monotonic()
                msg = inbound.message
                if isinstance(msg, Task):
                    self.handle_task(msg, inbound.sender)
                elif isinstance(msg, Note) and msg.kind == "done":
                    self._apply_final(msg, inbound.sender)
                    if stop_when_done and msg.data.get("stop", True):
                        break
                elif isinstance(msg, (SecAggNeighbours, SecAggShares, SecAggUnmask)):
                    self._on_secagg(msg, inbound.sender)
                elif isinstance(msg, Note) and msg.kind == "secagg_abort":
                    log.warning("%s: secure round %d abandoned by the aggregator: %s", self.party_id, msg.round,
                                msg.data.get("reason"))
                    self.history.append({"round": msg.round, "error": "secagg_abort", "detail": msg.data.get("reason")})
                    self._secure = None
                elif isinstance(msg, ErrorReport):
                    log.warning("%s: aggregator reported %s: %s", self.party_id, msg.code, msg.detail)
                    self.history.append({"round": msg.round, "error": msg.code, "detail": msg.detail})
        finally:
            self.endpoint.close()
        return self.history

    # -- one task --------------------------------------------------------------------------
    def _cache_path(self, round: int) -> Path:
        return self.work_dir / "updates" / f"round-{round:05d}.msg"

    def handle_task(self, task: Task, sender: str) -> None:
        if "secure_aggregation" in task.config and task.round in self._secure_rounds:
            # a secure round is never answered twice: fresh masks over the same input would let an
            # aggregator that restarts a round collect both kinds of shares for one client
            log.warning("%s: secure round %d already answered; not repeated", self.party_id, task.round)
            self._tell(sender, ErrorReport("secagg", "secure rounds are not repeated", round=task.round))
            return
        cached = self._cache_path(task.round)
        if cached.exists():
            log.info("%s: task for round %d already answered; re-sending the cached update", self.party_id, task.round)
            self._send_update(decode(cached.read_bytes()), cached.with_suffix(".blob"))
            return
        if task.deadline and time.time() > task.deadline:
            log.warning("%s: task for round %d arrived after its deadline; skipped", self.party_id, task.round)
            return
        refusal = self._does_not_fit(task)
        if refusal is not None:
            log.warning("%s: refusing round %d: %s", self.party_id, task.round, refusal)
            self.history.append({"round": task.round, "error": "does_not_fit", "detail": refusal})
            try:
                self.endpoint.send(sender, ErrorReport("does_not_fit", refusal, round=task.round), round=task.round)
            except BridgeError as exc:
                log.warning("%s: could not tell the aggregator: %s", self.party_id, exc)
            return
        t0 = time.time()
        downloads, cached_names = {}, []
        algo = registry.get(task.algorithm).client()
        for name in task.downloads:
            if not algo.needs_blob(name, self.ctx):
                continue
            downloads[name], hit = self._download(task.blob(name), sender, task.round)
            if hit:
                cached_names.append(name)
        self._algorithm = (algo, task.config)
        self.ctx.round = task.round
        # power and temperature while training, where tegrastats or jtop exist (a Jetson); a
        # no-op elsewhere. The aggregator keeps them per round and device (status page, CSV)
        with TegraSampler(interval_ms=500) as tegra, PeakMemory() as peak:
            report = algo.run(task, downloads, self.ctx)
        metrics = {**report.metrics, "seconds": round(time.time() - t0, 3), "peak_memory_bytes": peak.peak_bytes,
                   "peak_memory_kind": peak.kind, # since the previous round ended: the broadcast blobs and key grant precede the Task
                   "bytes_down": self.endpoint.transport.stats.bytes_in - self._wire_mark[0],
                   "quant": self.ctx.quant, "blobs_from_cache": cached_names}
        power = tegra.summary()
        if power is not None:
            metrics["power"] = power.to_dict()
        if "secure_aggregation" in task.config:
            self._start_secure(task, sender, downloads, report, metrics)
            return
        payload = pack_state(report.tensors)
        inline = fits_one_message(len(payload), self.endpoint.config.max_message_bytes)
        update = Update(round=task.round, algorithm=task.algorithm, num_examples=report.num_examples,
                        metrics=metrics, tensors=report.tensors if inline else {})
        blob_path = cached.with_suffix(".blob")
        if not inline:
            blob_path.write_bytes(payload)
        tmp = cached.with_suffix(".tmp")
        tmp.write_bytes(encode(update))
        os.replace(tmp, cached)  # cached before sent: a repeated task gets the same answer
        self._send_update(update, blob_path)
        stats = self.endpoint.transport.stats
        # everything on the wire since the previous round ended: key grant, task, blobs, update,
        # acknowledgements, presence; envelopes included
        wire = {"wire_bytes_down": stats.bytes_in - self._wire_mark[0], "wire_bytes_up": stats.bytes_out - self._wire_mark[1]}
        self._wire_mark = (stats.bytes_in, stats.bytes_out)
        self.history.append({"round": task.round, **metrics, **wire, "num_examples": report.num_examples})
        log.info("%s: round %d update sent (%d examples, %.1fs)", self.party_id, task.round, report.num_examples,
                 time.time() - t0)

    # -- secure aggregation (aggregator/secure_round.py) ------------------------------------------
    def _start_secure(self, task: Task, sender: str, downloads: dict, report, metrics: dict) -> None:
        """Clip, noise and weight the delta to the received global, then advertise this round's
        keys; the rest of the round follows the aggregator's messages (:meth:`_on_secagg`)."""
        from bridge.secagg import SecAggAbort

        from .secure_upload import open_session

        self._secure_rounds.add(task.round)
        try:
            session, info = open_session(self.party, task.config, task.round, report.tensors,
                                         unpack_state(downloads["global"]), report.num_examples)
            keys = session.start()
        except (SecAggAbort, KeyError) as exc:
            log.warning("%s: cannot take part in secure round %d: %s", self.party_id, task.round, exc)
            self._tell(sender, ErrorReport("secagg", str(exc)[:300], round=task.round))
            return
        update = Update(round=task.round, algorithm=task.algorithm, num_examples=report.num_examples,
                        metrics={**metrics, **info})
        self._secure = (session, update)
        self._tell(sender, keys, round=task.round)
        self.history.append({"round": task.round, **metrics, **info, "num_examples": report.num_examples,
                             "secure": True})

    def _on_secagg(self, msg, sender: str) -> None:
        from bridge.secagg import SecAggAbort

        if self._secure is None or self._secure[0].round != msg.round:
            log.info("%s: %s for round %d outside a secure round; ignored", self.party_id, msg.TYPE, msg.round)
            return
        session, update = self._secure
        try:
            if isinstance(msg, SecAggNeighbours):
                self._tell(sender, session.on_neighbours(msg), round=msg.round)
            elif isinstance(msg, SecAggShares):
                masked = session.on_shares(msg)
                self._send_masked(update, masked)
            else:
                self._tell(sender, session.on_unmask(msg), round=msg.round)
                self._secure = None
                log.info("%s: secure round %d: shares revealed", self.party_id, msg.round)
        except SecAggAbort as exc:
            log.warning("%s: secure round %d: %s", self.party_id, msg.round, exc)
            self.history.append({"round": msg.round, "error": "secagg", "detail": str(exc)})
            self._tell(sender, ErrorReport("secagg", str(exc)[:300], round=msg.round))
            self._secure = None

    def _send_masked(self, update: Update, masked) -> None:
        tensors = {"masked": masked}
        if fits_one_message(masked.nbytes, self.endpoint.config.max_message_bytes):
            self.endpoint.send(self.aggregator_id, Update(update.round, update.algorithm, update.num_examples,
                                                          update.metrics, tensors=tensors), round=update.round)
            return
        blob = self.work_dir / "updates" / f"round-{update.round:05d}.masked"
        blob.write_bytes(pack_state(tensors))
        self._send_update(update, blob)

    def _tell(self, recipient: str, message, *, round: int | None = None) -> None:
        try:
            self.endpoint.send(recipient, message, round=message.round if round is None else round)
        except BridgeError as exc:
            log.warning("%s: could not send %s: %s", self.party_id, message.TYPE, exc)

    def _download(self, ref: BlobRef, sender: str, round: int, timeout: float = 600) -> tuple[bytes, bool]:
        """A blob's bytes and whether they came from the cache; fetched blobs are cached."""
        data = self.blob_cache.get(ref.sha256)
        if data is not None and len(data) == ref.size:
            self.blob_stats["cache_hits"] += 1
            self.blob_stats["cache_hit_bytes"] += len(data)
            return data, True
        res = self.endpoint.fetch_blob(ref, sender, timeout=timeout, round=round)
        data = bytes(res.read())
        res.discard()
        self.blob_stats["fetched"] += 1
        self.blob_stats["fetched_bytes"] += len(data)
        try:
            self.blob_cache.put(ref.sha256, data)
        except (OSError, ValueError) as exc:  # a full disk must not fail the round
            log.warning("%s: could not cache blob %s: %s", self.party_id, ref.sha256[:12], exc)
        return data, False

    def _does_not_fit(self, task: Task) -> str | None:
        """The memory plan of this task on this device, checked before anything is downloaded
        or trained: a message when it cannot fit, else None. A task that fits only with
        activation checkpointing turns it on instead of being refused. Needs a device profile
        and an algorithm that trains the device's own model with the task's LoRA/train config."""
        if not self.profile or not isinstance(task.config.get("train"), dict):
            return None
        try:
            algo = registry.get(task.algorithm).client
        except Exception:
            return None
        if not getattr(algo, "trains_device_model", True):
            return None
        from .fit import check_task_fits

        ckpt = bool(task.config["train"].get("gradient_checkpointing") or self.ctx.gradient_checkpointing)
        try:
            d = check_task_fits(self.profile, self.ctx.model_path, task.config.get("lora") or {},
                                task.config["train"], self.ctx.quant, ckpt)
            if not d.fits and not ckpt:  # the device's own default: checkpoint rather than refuse
                d2 = check_task_fits(self.profile, self.ctx.model_path, task.config.get("lora") or {},
                                     task.config["train"], self.ctx.quant, True)
                if d2.fits and task.config["train"].get("dp_sgd"):
                    return (f"{d.message}; it would fit only with activation checkpointing, which DP-SGD "
                            "cannot use (no per-example gradients through recomputed activations)")
                if d2.fits:
                    log.warning("%s: round %d fits only with activation checkpointing; turning it on",
                                self.party_id, task.round)
                    self.ctx.gradient_checkpointing = True
                    return None
        except Exception as exc:  # a plan that cannot be made is not a reason to refuse
            log.info("%s: no memory plan for this task (%s); training anyway", self.party_id, exc)
            return None
        return None if d.fits else d.message

    def _send_update(self, update: Update, blob_path: Path) -> None:
        if not update.tensors and blob_path.exists():
            ref: BlobRef = self.endpoint.send_blob(self.aggregator_id, blob_path, kind="update", round=update.round)
            update = Update(round=update.round, algorithm=update.algorithm, num_examples=update.num_examples,
                            metrics=update.metrics, blobs={"update": ref.to_json()})
        self.endpoint.send(self.aggregator_id, update, round=update.round)

    def _apply_final(self, note: Note, sender: str) -> None:
        downloads = {}
        algo = registry.get(note.data.get("algorithm", "fedavg")).client()
        for name, ref in note.data.get("downloads", {}).items():
            if not algo.needs_blob(name, self.ctx):
                continue
            try:
                downloads[name], _ = self._download(BlobRef.from_json(ref), sender, note.round)
            except BridgeError as exc:
                log.warning("%s: could not fetch the final %s: %s", self.party_id, name, exc)
                return
        self._algorithm = (algo, note.data.get("config", {}))
        self.final = algo.apply_final(downloads, self.ctx, note.data.get("config", {}))
        try:
            self.endpoint.send(sender, Note("final", self.final, round=note.round), round=note.round)
        except BridgeError as exc:
            log.warning("%s: could not report final metrics: %s", self.party_id, exc)
        log.info("%s: final model applied %s", self.party_id, json.dumps(self.final))

    # -- results -------------------------------------------------------------------------------
    def save_global_adapter(self, out_dir: str | os.PathLike) -> Path:
        """The adapter currently applied (the global one after the federation finished), in
        standard peft format: ``PeftModel.from_pretrained(base, out_dir)`` loads it."""
        if self.ctx._peft is None:
            raise RuntimeError("no adapter yet: run the federation first")
        return save_peft_adapter(self.ctx._peft, self.ctx.base_path, out_dir)

    def adapter_state(self) -> dict:
        return adapter_state(self.ctx._peft)
