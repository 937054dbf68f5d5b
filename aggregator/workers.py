"""Scale-out ingest: worker processes that decrypt, verify, validate and fold the updates of a
shard of the fleet, each into its own partial aggregate and write-ahead log; the coordinator
(the aggregator service) merges the partials when the round closes.

Sharding: worker ``k`` of ``n`` subscribes to the up topics of the clients with
``crc32(id) % n == k``. Why not one ``$share/<group>/cotune/F/up/+`` subscription: brokers
distribute a shared subscription message by message (Mosquitto round-robin, RabbitMQ's MQTT
plugin does not offer it on 3.1.1), so the chunks of one client's update blob would be spread
over several workers, none of which could reassemble it. Explicit per-client subscriptions
keep each client on one worker with any MQTT 3.1.1 broker, clustered or not; an EMQX cluster's
``hash_clientid`` shared-subscription strategy would also do (``EndpointConfig.up_topics``).

Control plane: the ledger. The coordinator opens a round (participants rows), workers poll
``current_round()``; a worker's checkpoints go into the ledger in the same transaction that
marks its clients accepted (``worker_partials``); the coordinator watches the counts, asks the
workers to close (``request_close``), waits for their final partials and merges them. A worker
that does not answer in time is recovered by the coordinator from the worker's own checkpoint
and log (they live in the shared state directory), with the same code a restart uses. Workers
may run on other hosts when the ledger is PostgreSQL and the state directory is shared.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time
import zlib
from pathlib import Path

from threadpoolctl import threadpool_limits

from algorithms import registry
from bridge.endpoint import Endpoint, EndpointConfig, broker_config_for
from bridge.messages import ErrorReport, Note
from bridge.provision import load_party_config

from .config import AggregatorConfig
from .context import ServerContext
from .ingest import RoundIngest
from .intake import aggregation_rule, open_aggregator
from .state import open_store
from .status_http import start_worker_metrics
from .update_intake import UpdateIntake, event
from .validation import UpdateSpec

log = logging.getLogger("cotune.aggregator")


def shard_of(client: str, count: int) -> int:
    """The ingest worker that takes ``client``'s up topic (stable across restarts and hosts)."""
    return zlib.crc32(client.encode()) % count


def worker_log_dir(state_dir: str | Path, index: int) -> Path:
    return Path(state_dir) / "wal" / f"worker-{index}"


def open_worker_aggregator(store, rule: str, spec: UpdateSpec, digest: str | None, state_dir: Path,
                           trim_fraction: float):
    partial = store.checkpoints.get(digest) if digest else None
    return open_aggregator(rule, spec, partial=partial, spill_dir=state_dir / "spill", trim_fraction=trim_fraction)


class IngestWorker:
    """Worker ``index`` of ``count``: serves every open round until stopped."""

    def __init__(self, config: AggregatorConfig, index: int, count: int, *, progress=print, poll_s: float = 0.2,
                 on_ready=None):
        if not 0 <= index < count:
            raise ValueError(f"worker index {index} out of range for {count} workers")
        self.cfg, self.index, self.count = config, index, count
        self.progress = progress or (lambda *_: None)
        self.poll_s = poll_s
        self.on_ready = on_ready  # called once connected and subscribed
        self.state_dir = Path(config.state_dir)
        pc = load_party_config(config.party_config)
        self.party = pc
        chunking = {"chunk_size": config.chunk_size} if config.chunk_size else {}
        ep_cfg = EndpointConfig(max_message_bytes=pc.max_packet_bytes, spill_dir=str(self.state_dir),
                                # until a round sets its own limit from the update spec
                                max_blob_bytes=config.max_update_bytes or 512 * 1024 * 1024,
                                up_topics="explicit", instance=f"ingest-{index}",
                                shared_blob_dir=str(self.state_dir / "outgoing"), **chunking)
        broker = broker_config_for(pc, **{"instance": f"ingest-{index}", **config.broker})
        self.endpoint = Endpoint(pc.identity, pc.directory, broker, ep_cfg)
        ctx = ServerContext(str(self.state_dir), config.seed, config.models, config.public_data, config.llm)
        self.algorithm = registry.get(config.algorithm).server(config.algorithm_config, ctx)
        self.rule = aggregation_rule(self.algorithm, config.aggregation)
        self._stop = threading.Event()
        self.intake = UpdateIntake(self.endpoint, self.algorithm, self.rule, config, None, stop=self._stop,
                                   progress=self.progress, on_other=self._on_other)

    def _on_other(self, inbound) -> None:
        msg = inbound.message
        if isinstance(msg, Note) and msg.kind == "final" and self.intake.store is not None:
            self.intake.store.record_event("final_metrics", round=msg.round or None, client=inbound.sender,
                                           detail=json.dumps(msg.data, default=str)[:20000])
        elif isinstance(msg, ErrorReport):
            event("client_error", client=inbound.sender, code=msg.code, detail=msg.detail)

    def mine(self, client: str) -> bool:
        return shard_of(client, self.count) == self.index

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        store = open_store(self.cfg.state_db or self.state_dir / "state.db",
                           checkpoints=self.state_dir / "state.db.checkpoints")
        self.intake.store = store
        with threadpool_limits(limits=1):
            try:
                self.endpoint.subscribe_up([c for c in self.party.directory.clients() if self.mine(c)])
                self.endpoint.start()
                self.metrics_http = start_worker_metrics(self)  # its own /metrics, when status_http is set
                if self.on_ready is not None:
                    self.on_ready()
                done: set[int] = set()
                while not self._stop.is_set():
                    info = store.current_round()
                    if (info is None or info.status != "open" or info.round in done
                            or store.closing_round() >= info.round and self._final(store, info.round)):
                        self._stop.wait(self.poll_s)
                        continue
                    self._serve(store, info)
                    done.add(info.round)
            finally:
                self.endpoint.close()
                store.close()

    def _final(self, store, r: int) -> bool:
        return store.worker_partials(r).get(self.index, (None, False))[1]

    def _serve(self, store, info) -> None:
        r = info.round
        state = store.load_global(info.base_digest).tensors
        spec = UpdateSpec.from_state(self.algorithm.update_spec_state(state))
        digest = store.worker_partials(r).get(self.index, (None, False))[0]
        agg = open_worker_aggregator(store, self.rule, spec, digest, self.state_dir, self.cfg.trim_fraction)
        ingest = RoundIngest.open(store, r, agg, worker_log_dir(self.state_dir, self.index),
                                  self.cfg.ingest_settings(), worker=self.index, shard=self.mine)
        self.intake.current_round = r
        self.endpoint.set_round_floor(r)
        limit = self.intake.blob_limit(spec)
        self.endpoint.blob_limit = lambda sender: limit
        event("worker_round", round=r, worker=self.index, clients=ingest.book.n_selected, replayed=ingest.replayed)
        closing = {"checked": 0.0}

        def close_requested() -> bool:
            now = time.monotonic()
            if now - closing["checked"] < self.poll_s:
                return False
            closing["checked"] = now
            return store.closing_round() >= r

        self.intake.collect(r, ingest, spec, float("inf"), dict(self.endpoint.bytes_from), until=close_requested,
                            close_when_complete=False)
        ingest.close()
        self.intake.flush_rejections()
        if self._stop.is_set():
            return
        store.set_worker_partial(r, self.index, ingest.partial_digest, final=True)
        event("worker_closed", round=r, worker=self.index, accepted=len(ingest.book.accepted))


def _worker_main(config_dict: dict, index: int, count: int, ready=None) -> None:
    import signal

    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    worker = IngestWorker(AggregatorConfig(**config_dict), index, count, progress=None,
                          on_ready=None if ready is None else ready.set)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    worker.run()


class LocalWorkers:
    """The coordinator's own ingest workers on this host (``ingest_workers: n``): started as
    separate processes (spawned, so nothing of the coordinator's threads is inherited) and
    restarted if one dies."""

    def __init__(self, config: AggregatorConfig, count: int):
        from dataclasses import asdict

        self.config, self.count = asdict(config), count
        self._ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, multiprocessing.Process] = {}
        self.ready: dict = {}

    def start(self, timeout: float = 120.0) -> None:
        """Start every worker and wait until each is connected and subscribed: an update sent
        to an up topic nobody has subscribed yet would be dropped by the broker."""
        for k in range(self.count):
            self._start(k)
        deadline = time.monotonic() + timeout
        for k, ev in self.ready.items():
            if not ev.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"ingest worker {k} did not connect within {timeout}s "
                                   f"(exit code {self.procs[k].exitcode})")
        time.sleep(0.2)  # the subscriptions travel ahead of the first Task; a margin for the broker

    def _start(self, k: int) -> None:
        self.ready[k] = self._ctx.Event()
        p = self._ctx.Process(target=_worker_main, args=(self.config, k, self.count, self.ready[k]),
                              name=f"cotune-ingest-{k}", daemon=True)
        p.start()
        self.procs[k] = p

    def supervise(self) -> None:
        for k, p in list(self.procs.items()):
            if not p.is_alive():
                log.warning("ingest worker %d exited with %s; restarting it", k, p.exitcode)
                self._start(k)

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.procs.values():
            try:
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
        return total

    def stop(self, timeout: float = 2.0) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1)
