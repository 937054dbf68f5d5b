"""Aggregator service configuration (a JSON file; no tomllib on Python 3.10)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import AggregatorError


class ConfigError(AggregatorError, ValueError):
    code = "config"


@dataclass
class AggregatorConfig:
    party_config: str  # the aggregator's config.json written by `cotune provision`
    state_dir: str
    algorithm: str = "fedavg"
    algorithm_config: dict = field(default_factory=dict)
    rounds: int = 3
    #: selection: a fraction of the registered clients, at least min_clients
    fraction: float = 1.0
    min_clients: int = 1
    #: the round closes at the deadline with >= quorum accepted updates (fraction of selected)
    quorum: float = 1.0
    round_deadline_s: float = 600.0
    #: before round 1, wait up to this long for min_clients to show presence
    wait_for_clients_s: float = 60.0
    aggregation: str = "fedavg"  # fedavg | median | trimmed_mean
    trim_fraction: float = 0.1
    max_norm: float | None = None  # bound on the L2 norm of an update's delta to the global
    #: a client's num_examples is self-reported and is its FedAvg weight: capped here, so one
    #: member claiming 10^9 examples cannot own the average (None: no cap)
    max_num_examples: int | None = 100_000
    #: the largest update blob accepted (None: the round's update spec size + 10% + 1 MiB; for
    #: algorithms that collect payloads, 512 MiB). Nothing is held for a larger declared blob.
    max_update_bytes: int | None = None
    clip: bool = False  # scale an over-norm update down instead of rejecting it
    models: dict = field(default_factory=dict)  # role -> local checkpoint path ("slm", "llm")
    public_data: list = field(default_factory=list)  # the auxiliary set D_p (texts)
    #: the LLM backend: {"backend": "local", "path", "quant"} or {"backend": "blackbox", "url",
    #: "tokenizer", "model", "top_k", "api_key_env"}; empty = local from models.llm
    llm: dict = field(default_factory=dict)
    seed: int = 0
    broker: dict = field(default_factory=dict)  # overrides: host, port, tls, protocol, auth
    chunk_size: int | None = None
    stop_clients_when_done: bool = True
    final_wait_s: float = 30.0  # how long to collect clients' evaluations of the final model
    serve_logits: bool = False  # answer devices' LogitsRequests with the LLM (proxy-tuned generation)
    #: refuse to start when a private key file is readable by other users (else: a warning)
    strict_keys: bool = False
    #: the ledger: None = SQLite in state_dir; or a PostgreSQL DSN ("postgresql://...") for
    #: deployments whose workers or standby run on other hosts (checkpoint files stay in state_dir)
    state_db: str | None = None
    #: retention: global states of the last N committed rounds are kept (0 = keep all)
    keep_globals: int = 5
    #: ingest durability: the log is fsynced per batch (when the inbox runs dry, after
    #: sync_batch updates or sync_wait_s), the partial aggregate checkpointed every
    #: checkpoint_every updates or checkpoint_interval_s seconds
    sync_batch: int = 256
    sync_wait_s: float = 0.05
    checkpoint_every: int = 256
    checkpoint_interval_s: float = 10.0
    #: tell each client once its update is durable (a Note "accepted")
    acknowledge_updates: bool = True
    #: one event line per accepted/rejected update in events.jsonl (rotated, bounded)
    log_accepts: bool = True
    #: scale-out ingest: this many worker processes take the updates (0: the service itself);
    #: see aggregator/workers.py. A worker that does not close its round within
    #: worker_close_timeout_s is recovered from its checkpoint and log by the service.
    ingest_workers: int = 0
    worker_close_timeout_s: float = 30.0
    #: "sync": rounds with a barrier (selection, quorum, deadline); "buffered": asynchronous
    #: FedBuff rounds, a new global version every buffer_size updates (aggregator/buffered_rounds.py)
    mode: str = "sync"
    #: buffered-mode settings (aggregator/buffered.py BufferedConfig): buffer_size,
    #: max_staleness, staleness, staleness_exponent, server_lr, concurrency, example_weighting
    buffered: dict = field(default_factory=dict)
    #: the read-only status page and Prometheus /metrics (aggregator/status_http.py); off when
    #: empty: {"port": 9464, "host": "127.0.0.1", "token_env": "VAR holding a bearer token"}
    status_http: dict = field(default_factory=dict)
    #: client-level differential privacy (aggregator/dp.py): {"mode": "central"|"local", "clip",
    #: "noise_multiplier" or "target_epsilon", "delta", "epsilon_budget", "expected_clients"}
    dp: dict = field(default_factory=dict)
    #: secure aggregation (aggregator/secure_round.py): the service sees only the round's sum.
    #: {"clip", "weight_cap", "threshold_fraction", "degree", "step_timeout_s"}
    secure_aggregation: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError("rounds must be >= 1")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_clients < 1:
            raise ConfigError("min_clients must be >= 1")
        if not 0 < self.quorum <= 1:
            raise ConfigError(f"quorum is a fraction of the selected clients in (0, 1], got {self.quorum}")
        if self.round_deadline_s <= 0:
            raise ConfigError("round_deadline_s must be > 0")
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ConfigError("max_norm must be a positive number or null")
        if self.mode not in ("sync", "buffered"):
            raise ConfigError(f"mode must be 'sync' or 'buffered', got {self.mode!r}")
        if self.buffered:
            from .buffered import BufferedConfig

            try:
                BufferedConfig.from_dict(self.buffered)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.status_http:
            from .status_http import StatusHTTPConfig

            try:
                StatusHTTPConfig.parse(self.status_http)
            except (TypeError, ValueError) as exc:
                raise ConfigError(str(exc)) from None
        if self.dp:
            from .dp import DPConfigError, ServerDP

            try:
                ServerDP.build(self.dp, algorithm=self.algorithm, rule=self.aggregation, fraction=self.fraction,
                               rounds=self.rounds, mode=self.mode)
            except DPConfigError as exc:
                raise ConfigError(str(exc)) from None
        if self.secure_aggregation:
            from .secure_round import SecureAggConfig, SecureAggConfigError

            try:
                SecureAggConfig.parse(self.secure_aggregation, algorithm=self.algorithm,
                                      aggregation=self.aggregation, ingest_workers=self.ingest_workers,
                                      mode=self.mode, dp=self.dp)
            except SecureAggConfigError as exc:
                raise ConfigError(str(exc)) from None
        if self.ingest_workers < 0:
            raise ConfigError("ingest_workers must be >= 0")
        if self.max_num_examples is not None and self.max_num_examples < 1:
            raise ConfigError("max_num_examples must be >= 1 or null")
        if self.max_update_bytes is not None and self.max_update_bytes < 1024:
            raise ConfigError("max_update_bytes must be >= 1024 or null")
        if self.keep_globals < 0:
            raise ConfigError("keep_globals must be >= 0 (0 keeps every global state)")
        try:
            self.ingest_settings()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def ingest_settings(self):
        from .ingest import IngestSettings

        return IngestSettings(checkpoint_every=self.checkpoint_every,
                              checkpoint_interval_s=self.checkpoint_interval_s,
                              sync_batch=self.sync_batch, sync_wait_s=self.sync_wait_s)

    def quorum_count(self, selected: int) -> int:
        return max(1, math.ceil(self.quorum * selected - 1e-9))

    @classmethod
    def load(cls, path: str | os.PathLike) -> AggregatorConfig:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no aggregator config at {p}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p} is not valid JSON: {exc}") from exc
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{p}: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
        base = p.parent
        for key in ("party_config", "state_dir"):
            if key in data and not os.path.isabs(data[key]):
                data[key] = str(base / data[key])
        data["models"] = {k: v if os.path.isabs(v) else str(base / v) for k, v in data.get("models", {}).items()}
        llm = dict(data.get("llm") or {})
        for key in ("path", "tokenizer"):
            if key in llm and not os.path.isabs(llm[key]):
                llm[key] = str(base / llm[key])
        if llm:
            data["llm"] = llm
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{p}: {exc}") from exc

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))
