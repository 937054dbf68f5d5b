"""The large model's next-token log-probabilities served over the encrypted wire.

A device running proxy-tuned generation (:class:`edge_sdk.inference.wire.WireLargeModel`)
sends a :class:`~bridge.messages.LogitsRequest`; :class:`LogitsServer` runs the aggregator's
LLM backend (``LocalLLM`` or ``BlackBoxLLM``: anything with ``logprobs(input_ids,
attention_mask) -> [B, T, V]``) on the ids, keeps the last ``positions`` rows and answers with
the top-k of each row in a :class:`~bridge.messages.LogitsResponse` carrying the same
``request_id``. A request that cannot be answered gets a response with ``error`` set; the
server never raises into its caller's receive loop.

Two ways to run it: the :class:`~aggregator.service.AggregatorService` hands it the
non-update messages of its receive loop (``serve_logits: true`` in the aggregator config), or
a dedicated process calls :meth:`LogitsServer.serve_forever` on its own endpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from bridge.endpoint import Endpoint, Inbound
from bridge.errors import BridgeError
from bridge.messages import LogitsRequest, LogitsResponse

log = logging.getLogger("cotune.aggregator.logits")


class LogitsServer:
    """Answers :class:`LogitsRequest` messages arriving at ``endpoint``.

    ``llm_backend``: the backend, or a zero-argument callable that builds it on first use
    (e.g. ``ServerContext.llm``). ``max_top_k``: the most entries per position returned
    (larger requests are clamped; ``None`` = the vocabulary size). ``max_positions``: the most
    rows one request may ask for. ``dtype``: of the returned values (float32 keeps 1e-6
    precision; float16 halves the bytes)."""

    def __init__(self, endpoint: Endpoint, llm_backend: Any | Callable[[], Any], *, max_top_k: int | None = None,
                 max_positions: int = 64, dtype: Any = np.float32):
        if max_top_k is not None and max_top_k < 1:
            raise ValueError("max_top_k must be >= 1")
        self.endpoint = endpoint
        self._llm = llm_backend
        self.max_top_k = max_top_k
        self.max_positions = int(max_positions)
        self.dtype = np.dtype(dtype)
        self.served = 0
        self.errors = 0
        self._lock = threading.Lock()  # one forward at a time (the model is shared)

    @property
    def llm(self) -> Any:
        if callable(self._llm) and not hasattr(self._llm, "logprobs"):
            self._llm = self._llm()
        return self._llm

    def handle(self, inbound: Inbound) -> bool:
        """Answer ``inbound`` if it is a LogitsRequest (True); leave anything else (False)."""
        req = inbound.message
        if not isinstance(req, LogitsRequest):
            return False
        try:
            resp = self.answer(req)
        except Exception as exc:  # a failing backend is reported to the requester, not raised
            log.exception("logits request %s from %s failed", req.request_id, inbound.sender)
            resp = LogitsResponse(req.request_id, error=f"server error: {type(exc).__name__}: {exc}"[:500])
        self._reply(inbound.sender, resp)
        return True

    def answer(self, req: LogitsRequest) -> LogitsResponse:
        """The response to one request (an error response when it cannot be answered)."""
        llm = self.llm
        vocab = int(llm.vocab_size)
        problem = req.problem(vocab)
        if not problem and req.positions > self.max_positions:
            problem = f"positions {req.positions} exceeds this server's limit of {self.max_positions}"
        if problem:
            return LogitsResponse(req.request_id, error=problem)
        import torch

        k = min(req.top_k, vocab, self.max_top_k or vocab)
        with self._lock:
            lp = llm.logprobs(torch.tensor([req.ids], dtype=torch.long), None)
        rows = lp[0, -req.positions:].float()
        top = torch.topk(rows, k, dim=-1)
        values = top.values.cpu().numpy().astype(self.dtype)
        ids = top.indices.cpu().numpy().astype(np.int32)
        return LogitsResponse(req.request_id, {"values": values, "ids": ids})

    def _reply(self, recipient: str, resp: LogitsResponse) -> None:
        try:
            self.endpoint.send(recipient, resp)
        except BridgeError as exc:  # e.g. oversized: tell the requester why, in a small message
            if resp.error:
                log.warning("could not answer %s (%s): %s", recipient, resp.request_id, exc)
                return
            self._reply(recipient, LogitsResponse(resp.request_id, error=f"response not sent: {exc}"[:500]))
            return
        if resp.error:
            self.errors += 1
        else:
            self.served += 1

    def serve_forever(self, stop_event: threading.Event, poll_s: float = 0.5) -> None:
        """A standalone loop on a dedicated endpoint: answers requests until ``stop_event`` is
        set; other messages are logged and dropped."""
        while not stop_event.is_set():
            inbound = self.endpoint.recv(timeout=poll_s)
            if inbound is None:
                continue
            if not self.handle(inbound):
                log.info("logits server ignores %s from %s", inbound.message.TYPE, inbound.sender)
