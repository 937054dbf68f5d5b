"""Synchronous rounds under secure aggregation (``secure_aggregation`` in the aggregator config):
the service learns only the weighted sum of the round's updates, never one client's update.

The protocol is SecAgg+ (Bell et al. 2020) over the existing wire, see :mod:`bridge.secagg` for
the cryptography. One round, each step with a deadline:

1. ``Task`` (its config carries ``secure_aggregation``: the fixed-point parameters, the weight
   cap, the distributed-noise share) -> each client trains, then advertises two fresh X25519
   keys signed with its Ed25519 identity key (:class:`SecAggKeys`, with its certificate);
2. the service draws the sparse neighbour graph over the advertisers and relays to each client
   its neighbours' signed keys and certificates (:class:`SecAggNeighbours`); a client checks each
   certificate against the federation CA and each signature, so the relay cannot substitute keys;
3. each client Shamir-shares its self-mask seed and mask key among its neighbours, encrypted to
   each (:class:`SecAggShares`); the service routes them;
4. each client uploads its clipped, pre-weighted, fixed-point update plus its weight, masked
   (an ``Update`` whose tensor ``masked`` is uint32), summed here mod 2^32 as it arrives;
5. the service tells each survivor which neighbours dropped (:class:`SecAggUnmask`); survivors
   reveal self-mask shares of survivors and mask-key shares of the dropped (never both for one
   client); the masks are removed and the sum decoded.

The round completes while every client that shared its keys keeps at least ``threshold``
surviving neighbours and at least a quorum of inputs arrived; otherwise it is abandoned with a
typed reason before anything is revealed and the global state stays as it was.

What moves to the client: the norm bound (the client clips its delta to ``clip``; the fixed-point
range cannot represent more) and finiteness (the encoder refuses NaN). What is lost: robust
rules (median, trimmed mean) and per-update anomaly checks need individual updates and cannot
run on a sum; the config refuses them. A secure round does not survive a restart of the
service (the masks' secrets live only in the clients' and this process's memory): a round
found open after a restart is closed without a result and the next round starts.

With differential privacy (``dp``, central mode) the noise is distributed: each client adds
N(0, (z C)^2 / m) to its clipped delta, m the round's quorum, so any released sum of at least
m inputs carries noise of variance at least (z C)^2 and the service adds none. Each client
rounds its noisy value to the fixed-point grid (at most 0.5 / scale per coordinate); the
accountant treats the sum as the continuous Gaussian mechanism, which ignores that rounding
(the discrete Gaussian of Kairouz et al. 2021 would make it exact).
"""

from __future__ import annotations

import base64
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from algorithms.base import State
from bridge.errors import BridgeError
from bridge.messages import (
    Note,
    SecAggKeys,
    SecAggNeighbours,
    SecAggReveal,
    SecAggShares,
    SecAggUnmask,
    Update,
)
from bridge.secagg import SecAggAbort, SecAggError, SecAggParams, SecAggServer
from bridge.secagg_session import secure_task_config, value_range

from .errors import AggregatorError
from .state import AcceptRecord
from .update_intake import BlobWaiter, event
from .validation import UpdateSpec

log = logging.getLogger("cotune.aggregator")

#: algorithms whose updates are averaged (FedMKT collects logits and cannot be summed)
AVERAGED = ("fedavg", "fedcollm", "fedpt", "fedbiot")


class SecureAggConfigError(AggregatorError, ValueError):
    code = "config"


@dataclass(frozen=True)
class SecureAggConfig:
    """``secure_aggregation`` of the aggregator config.

    ``clip``: L2 bound of a client's delta to the global, enforced by the client (with ``dp``,
    ``dp.clip`` is used and this may be omitted). ``weight_cap``: a client's weight is
    min(num_examples, weight_cap) / weight_cap (unweighted with ``dp``). ``threshold_fraction``
    and ``degree`` size the neighbour graph (degree None: the smallest even degree >= 3 log2 n
    with which a round survives clients dropping out at ``dropout_rate`` except with probability
    1e-6, see :meth:`bridge.secagg.SecAggParams.for_clients`). ``step_timeout_s``:
    how long each of steps 2-5 waits for the clients (step 1 waits for training, up to the
    round deadline)."""

    clip: float | None = None
    weight_cap: int = 1000
    threshold_fraction: float = 0.5
    degree: int | None = None
    dropout_rate: float = 0.1
    step_timeout_s: float = 30.0

    @classmethod
    def parse(cls, data: Mapping[str, Any], *, algorithm: str, aggregation: str, ingest_workers: int,
              mode: str, dp: Mapping[str, Any] | None) -> SecureAggConfig:
        if not isinstance(data, Mapping):
            raise SecureAggConfigError(f"secure_aggregation must be an object, got {data!r}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SecureAggConfigError(f"secure_aggregation: unknown keys {sorted(unknown)}; valid keys: "
                                       f"{sorted(cls.__dataclass_fields__)}")
        try:
            cfg = cls(**dict(data))
        except TypeError as exc:
            raise SecureAggConfigError(f"secure_aggregation: {exc}") from None
        if algorithm not in AVERAGED:
            raise SecureAggConfigError(
                f"secure_aggregation sums averaged updates ({', '.join(AVERAGED)}); {algorithm!r} collects its "
                "clients' payloads (logits), which a masked sum cannot carry")
        if aggregation != "fedavg":
            raise SecureAggConfigError(
                f"secure_aggregation needs aggregation 'fedavg': {aggregation!r} needs every update in the clear")
        if ingest_workers:
            raise SecureAggConfigError("secure_aggregation runs in the service; set ingest_workers to 0")
        if mode != "sync":
            raise SecureAggConfigError("secure_aggregation needs synchronous rounds (mode 'sync'): the masks of "
                                       "one round cancel only within that round")
        clip = cfg.clip if cfg.clip is not None else (dp or {}).get("clip")
        if clip is None:
            raise SecureAggConfigError("secure_aggregation: clip (the L2 bound of a client's delta) is required "
                                       "without dp")
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0:
            raise SecureAggConfigError(f"secure_aggregation: clip must be a positive number, got {clip!r}")
        if dp and cfg.clip is not None and float(cfg.clip) != float(dp.get("clip", cfg.clip)):
            raise SecureAggConfigError("secure_aggregation.clip and dp.clip differ; set one")
        if isinstance(cfg.weight_cap, bool) or not isinstance(cfg.weight_cap, int) or cfg.weight_cap < 1:
            raise SecureAggConfigError("secure_aggregation: weight_cap must be an int >= 1")
        if not 0.5 <= cfg.threshold_fraction < 1:
            # below one half, an aggregator lying about dropouts could gather both kinds of shares
            # of one client from two disjoint sets of its neighbours
            raise SecureAggConfigError("secure_aggregation: threshold_fraction must be in [0.5, 1)")
        if cfg.degree is not None and (isinstance(cfg.degree, bool) or not isinstance(cfg.degree, int)
                                       or cfg.degree < 2 or cfg.degree % 2):
            raise SecureAggConfigError("secure_aggregation: degree must be an even int >= 2 or null")
        if isinstance(cfg.dropout_rate, bool) or not isinstance(cfg.dropout_rate, (int, float)) \
                or not 0 <= cfg.dropout_rate < 0.5:
            raise SecureAggConfigError("secure_aggregation: dropout_rate must be in [0, 0.5)")
        if not cfg.step_timeout_s > 0:
            raise SecureAggConfigError("secure_aggregation: step_timeout_s must be > 0")
        return cls(**{**asdict(cfg), "clip": float(clip)})

    def params(self, selected: int, quorum: int, noise_std: float = 0.0) -> SecAggParams:
        """The round's parameters: sized for ``selected`` clients, each coordinate within the
        clip (plus the noise share's range); fewer than ``quorum`` inputs are never unmasked."""
        return SecAggParams.for_clients(selected, value_range(self.clip, noise_std), max_clients=selected,
                                        threshold_fraction=self.threshold_fraction, min_clients=max(2, quorum),
                                        dropout_rate=self.dropout_rate, degree=self.degree)


def layout(spec: UpdateSpec) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, size) of each tensor, in the order both sides flatten the delta."""
    return [(n, spec.tensors[n].shape, math.prod(spec.tensors[n].shape)) for n in spec.names]


class SecureRound:
    """Runs the service's synchronous rounds under secure aggregation (module docstring)."""

    def __init__(self, service, cfg: SecureAggConfig):
        self.svc = service
        self.cfg = cfg
        self.opened_here: set[int] = set()  # rounds this process opened (others: interrupted)

    # -- one round -----------------------------------------------------------------------
    def run_round(self, r: int, info, state: State, spec: UpdateSpec, t0: float) -> None:
        svc = self.svc
        selected = list(info.selected)
        quorum = svc.cfg.quorum_count(len(selected))
        if info.status == "open" and r not in self.opened_here:
            svc.store.seal_round(r, reason="interrupted")
            svc.commit_round(r, state, None, {"skipped": "secure round interrupted by a restart: its masks' "
                                              "secrets are gone; nothing was revealed", "accepted": 0,
                                              "quorum": quorum}, t0)
            return
        if info.status != "open":  # closed before a crash: nothing to unmask any more
            svc.commit_round(r, state, None, {"skipped": "secure round closed before a restart", "accepted": 0,
                                              "quorum": quorum}, t0)
            return
        noise_std = self._noise_std(quorum)
        params = self.cfg.params(len(selected), quorum, noise_std)
        server = SecAggServer(svc.party.federation, r, params, os.urandom(32))
        length = spec.num_elements() + 1
        svc.endpoint.blob_limit = lambda sender: 4 * length + (1 << 20)
        task_cfg = secure_task_config(params, self.cfg.clip, self.cfg.weight_cap, noise_std)
        svc.send_tasks(r, state, selected, extra={"secure_aggregation": task_cfg})
        deadline = info.deadline or time.time() + svc.cfg.round_deadline_s
        steps: dict[str, float] = {}
        try:
            aggregate, metrics = self._protocol(r, server, selected, spec, deadline, steps)
        except SecAggAbort as exc:
            aggregate, metrics = None, {"skipped": f"secure aggregation abandoned: {exc.reason}",
                                        "secagg_abort": {"reason": exc.reason, "detail": exc.detail[:300]}}
            event("secagg_abandoned", round=r, reason=exc.reason, detail=exc.detail[:300])
            for c in selected:
                self._send(c, Note("secagg_abort", {"reason": exc.reason}, round=r), r)
        if svc.stopping():
            return
        if svc.store.round_info(r).status == "open":
            svc.store.seal_round(r, reason="complete" if aggregate is not None else "secagg_abort")
        metrics = {**metrics, "quorum": quorum, "secagg_steps_s": {k: round(v, 3) for k, v in steps.items()}}
        metrics.setdefault("accepted", len(svc.store.load_round(r, with_partial=False).accepted))
        svc.commit_round(r, state, aggregate, metrics, t0, secure=True, spec=spec, selected=len(selected))

    def _protocol(self, r: int, server: SecAggServer, selected: list[str], spec: UpdateSpec, deadline: float,
                  steps: dict[str, float]) -> tuple[dict | None, dict]:
        svc = self.svc
        certs: dict[str, str] = {}
        step_s = self.cfg.step_timeout_s

        # 1. keys (the clients train first: this step waits up to the round deadline)
        t = time.time()

        def on_keys(c: str, m: SecAggKeys) -> None:
            server.add_advertisement(c, m.advertisement(), svc.endpoint.directory.sender(c).sign_pub)
            certs[c] = m.cert

        self._collect(r, SecAggKeys, set(selected), deadline, on_keys)
        ads = server.close_advertise()
        for c, neighbours in ads.items():
            self._send(c, SecAggNeighbours(r, {v: {**ad, "cert": certs.get(v, "")} for v, ad in neighbours.items()}),
                       r)
        steps["keys"] = time.time() - t

        # 2. encrypted shares, routed
        t = time.time()

        def on_shares(c: str, m: SecAggShares) -> None:
            server.add_shares(c, {v: base64.b64decode(ct) for v, ct in m.shares.items()})

        self._collect(r, SecAggShares, set(ads), time.time() + step_s, on_shares)
        relay = server.close_shares()
        for v, cts in relay.items():
            self._send(v, SecAggShares(r, {u: base64.b64encode(ct).decode("ascii") for u, ct in cts.items()}), r)
        steps["shares"] = time.time() - t

        # 3. masked inputs (ordinary Updates: inline, or a chunked blob)
        t = time.time()
        records: dict[str, AcceptRecord] = {}
        server.set_length(spec.num_elements() + 1)
        self._collect_masked(r, server, set(relay), time.time() + step_s, records)
        survivors, dropped = server.close_masked()
        svc.store.accept_many(r, [records[c] for c in survivors], None)
        steps["masked"] = time.time() - t

        # 4. unmasking
        t = time.time()
        for c in survivors:
            alive, gone = server.unmask_request(c)
            self._send(c, SecAggUnmask(r, list(alive), list(gone)), r)

        def on_reveal(c: str, m: SecAggReveal) -> None:
            server.add_reveal(c, m.shares)

        self._collect(r, SecAggReveal, set(survivors), time.time() + step_s, on_reveal)
        total, weight_sum, stats = server.finish()
        steps["unmask"] = time.time() - t
        if svc.stopping():
            return None, {}
        aggregate, extra = self._release(r, total, weight_sum, len(survivors), spec, len(selected))
        metrics = {**extra, "accepted": len(survivors), "secagg": {
            "advertised": len(ads), "shared": len(relay), "survivors": len(survivors), "dropped": len(dropped),
            "degree": server.params.degree, "threshold": server.params.threshold,
            "weight_sum": round(weight_sum, 6), **{k: v for k, v in stats.items() if isinstance(v, (int, float))}}}
        return aggregate, metrics

    def _release(self, r: int, total: np.ndarray, weight_sum: float, count: int, spec: UpdateSpec,
                 selected: int) -> tuple[dict, dict]:
        """The aggregate state: reference + the weighted mean delta (or, with dp, the noisy sum
        over the fixed denominator) and the metrics to record."""
        svc = self.svc
        if svc.dp is not None:
            mean = states_from_delta(spec, total / count)  # the unweighted mean of the (noisy) clipped deltas
            return svc.dp_release(r, mean, count, spec, selected, noised_by_clients=True)
        if not weight_sum > 0:
            raise SecAggAbort("bad_input", f"the masked weights sum to {weight_sum}")
        return states_from_delta(spec, total / weight_sum), {}

    def _noise_std(self, quorum: int) -> float:
        dp = self.svc.dp
        if dp is None or dp.cfg.mode != "central":
            return 0.0
        return float(dp.cfg.noise_multiplier) * float(dp.cfg.clip) / math.sqrt(max(1, quorum))

    # -- the message pump ---------------------------------------------------------------------
    def _send(self, client: str, msg, r: int) -> None:
        try:
            self.svc.endpoint.send(client, msg, round=r)
        except BridgeError as exc:  # the client counts as dropped at the next step
            log.info("secure round %d: could not send %s to %s: %s", r, msg.TYPE, client, exc)

    def _collect(self, r: int, kind: type, expected: set[str], deadline: float,
                 handle: Callable[[str, Any], None]) -> None:
        """Messages of ``kind`` for round ``r`` from ``expected`` until each answered once or the
        deadline; a bad one is rejected (typed, recorded) and its sender treated as dropped."""
        svc, waiting = self.svc, set(expected)
        while waiting and time.time() < deadline and not svc.stopping():
            inbound = svc.endpoint.recv(timeout=min(0.25, max(0.0, deadline - time.time())))
            if inbound is None:
                continue
            msg, c = inbound.message, inbound.sender
            if isinstance(msg, kind) and getattr(msg, "round", None) == r and c in waiting:
                waiting.discard(c)
                try:
                    handle(c, msg)
                except SecAggAbort:
                    raise
                except (SecAggError, ValueError, KeyError) as exc:
                    svc.intake.reject(r, c, "secagg", f"{kind.TYPE}: {exc}")
            elif isinstance(msg, (SecAggKeys, SecAggShares, SecAggReveal, Update)):
                event("secagg_out_of_step", round=r, client=c, type=msg.TYPE)
            else:
                svc.on_other(inbound)
        svc.intake.flush_rejections()

    def _collect_masked(self, r: int, server: SecAggServer, expected: set[str], deadline: float,
                        records: dict[str, AcceptRecord]) -> None:
        svc, ep = self.svc, self.svc.endpoint
        blobs = BlobWaiter(ep)
        bytes_at_start = dict(ep.bytes_from)

        def take(c: str, upd: Update, tensors: Mapping[str, np.ndarray]) -> None:
            try:
                if set(tensors) != {"masked"}:
                    raise SecAggError(f"a masked update carries exactly the tensor 'masked', got {sorted(tensors)}")
                if upd.algorithm != svc.cfg.algorithm:
                    raise SecAggError(f"update for algorithm {upd.algorithm!r}")
                server.add_masked(c, tensors["masked"])
            except (SecAggError, ValueError) as exc:
                svc.intake.reject(r, c, "secagg", f"masked input: {exc}")
                return
            n = svc.intake.capped_examples(upd.num_examples)
            metrics = {**upd.metrics, "num_examples": upd.num_examples,
                       "bytes_up": ep.bytes_from[c] - bytes_at_start.get(c, 0)}
            records[c] = AcceptRecord(c, "", max(1, int(n)), metrics)
            if svc.cfg.log_accepts:
                event("accepted", round=r, client=c, num_examples=upd.num_examples, masked=True)

        waiting = set(expected)
        while (waiting or blobs) and time.time() < deadline and not svc.stopping():
            inbound = ep.recv(timeout=0.1 if blobs else min(0.25, max(0.0, deadline - time.time())))
            if inbound is not None:
                msg, c = inbound.message, inbound.sender
                if isinstance(msg, Update) and msg.round == r and c in waiting:
                    waiting.discard(c)
                    if msg.tensors:
                        take(c, msg, msg.tensors)
                    elif "update" in msg.blobs:
                        blobs.want(r, c, msg, msg.blob("update"))
                    else:
                        svc.intake.reject(r, c, "secagg", "masked update carries neither tensors nor a blob")
                elif isinstance(msg, (SecAggKeys, SecAggShares, SecAggReveal, Update)):
                    event("secagg_out_of_step", round=r, client=c, type=msg.TYPE)
                else:
                    svc.on_other(inbound)
            for t in blobs.take_completed():
                if t.error is not None:
                    svc.intake.reject(r, t.client, "secagg", f"masked update blob: {t.error[1]}")
                else:
                    take(t.client, t.update, t.tensors)
        blobs.drop_all()
        svc.intake.flush_rejections()


def states_from_delta(spec: UpdateSpec, mean_delta: np.ndarray) -> dict[str, np.ndarray]:
    """The full states ``reference + delta``, unflattened in :func:`layout` order (float64)."""
    out, offset = {}, 0
    for name, shape, size in layout(spec):
        out[name] = spec.reference64(name) + mean_delta[offset:offset + size].reshape(shape)
        offset += size
    return out
