"""The large model of proxy-tuned generation served by the AGGREGATOR over the encrypted MQTT
wire (:mod:`aggregator.logits_service`): one :class:`~bridge.messages.LogitsRequest` /
:class:`~bridge.messages.LogitsResponse` round trip per :meth:`WireLargeModel.logprobs` call,
correlated by a fresh ``request_id`` in the message body (inside the envelope, so it is
encrypted and signed like everything else). Like :class:`.remote.RemoteLargeModel`, only the
top-k entries per position come back and the rest of the mass is spread evenly over the other
ids (:func:`.remote.complete_topk_np`).

Other messages that arrive on the endpoint while a request waits are not lost: they are put
back into the endpoint's inbox, in their order, once the response arrived (or the wait
ended). A dedicated endpoint for inference avoids the reordering this implies relative to
messages arriving during the put-back; stale responses (of requests that timed out) are
dropped.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import numpy as np

from bridge.endpoint import Endpoint, Inbound
from bridge.errors import BridgeError
from bridge.messages import LogitsRequest, LogitsResponse

from . import InferenceError
from .remote import complete_topk_np


class WireInferenceError(InferenceError):
    """The aggregator did not answer in time, answered with an error, or the request could not
    be sent."""


class WireLargeModel:
    """:class:`edge_sdk.inference.proxy.LargeModel` whose log-probabilities come from the
    aggregator ``aggregator_id`` over ``endpoint`` (a started client endpoint)."""

    def __init__(self, endpoint: Endpoint, aggregator_id: str, vocab_size: int, *, top_k: int = 20,
                 timeout_s: float = 30.0, tokenizer=None):
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        self.endpoint = endpoint
        self.aggregator_id = aggregator_id
        self.vocab_size = int(vocab_size)
        self.top_k = int(top_k)
        self.timeout_s = float(timeout_s)
        self.requests = 0
        self.stale_dropped = 0
        self._tok = tokenizer

    def get_vocab(self):
        return self._tok.get_vocab() if self._tok is not None else None

    def logprobs(self, ids: Sequence[int], positions: int = 1) -> np.ndarray:
        ids = [int(i) for i in ids]
        req = LogitsRequest(uuid.uuid4().hex, ids, int(positions), self.top_k)
        problem = req.problem(self.vocab_size)
        if problem:
            raise WireInferenceError(problem)
        self.requests += 1
        try:
            self.endpoint.send(self.aggregator_id, req)
        except BridgeError as exc:
            raise WireInferenceError(f"logits request not sent: {exc}") from exc
        resp = self._await(req.request_id)
        if resp.error:
            raise WireInferenceError(f"the aggregator refused the logits request: {resp.error}")
        if not resp.tensors:
            raise WireInferenceError("empty logits response")
        values, top_ids = resp.values.astype(np.float32), resp.ids.astype(np.int64)
        if values.shape[0] != positions or (top_ids < 0).any() or (top_ids >= self.vocab_size).any():
            raise WireInferenceError(f"logits response of shape {values.shape} with ids outside the vocabulary "
                                     f"or the wrong number of positions (asked {positions})")
        return complete_topk_np(values, top_ids, self.vocab_size)

    def _await(self, request_id: str) -> LogitsResponse:
        deadline = time.monotonic() + self.timeout_s
        others: list[Inbound] = []
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WireInferenceError(f"no logits response from {self.aggregator_id} within {self.timeout_s}s")
                inbound = self.endpoint.recv(timeout=min(remaining, 0.5))
                if inbound is None:
                    continue
                msg = inbound.message
                if isinstance(msg, LogitsResponse) and inbound.sender == self.aggregator_id:
                    if msg.request_id == request_id:
                        return msg
                    self.stale_dropped += 1  # the answer to a request that timed out
                    continue
                others.append(inbound)
        finally:
            for inbound in others:  # not ours: back to the application, in order
                self.endpoint._inbox.put(inbound)
