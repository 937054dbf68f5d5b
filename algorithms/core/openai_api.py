"""A client of the OpenAI-compatible completions API for next-token log-probabilities, as vLLM
serves it (``cotune llm serve`` serves the same API from a local checkpoint).

What it asks for, per prompt of token ids ``x_0 .. x_{T-1}``: ``max_tokens=1``,
``prompt_logprobs=k`` (vLLM's extension: the top-k distribution at every prompt position) and
``logprobs=k`` (the distribution of the one generated token), with
``return_tokens_as_token_ids`` so every entry is keyed by token id, never by an ambiguous
string. Row ``t`` of the result is the distribution of the token after ``x_0 .. x_t``:
rows ``0 .. T-2`` come from ``prompt_logprobs[1 .. T-1]``, row ``T-1`` from the generated
token's ``top_logprobs``. Stdlib HTTP only (urllib), so a device can use it as well as the
aggregator.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from algorithms.core.errors import ModelError

log = logging.getLogger(__name__)

__all__ = ["CompletionsClient", "LLMBackendError", "TopK", "parse_choice"]


class LLMBackendError(ModelError):
    """The large model could not answer: unreachable, an HTTP error, or a malformed answer."""


@dataclass
class TopK:
    """Top-k next-token log-probabilities of one prompt: ``values [T, k]`` float32 (``-inf``
    where a row has fewer entries) and ``ids [T, k]`` int64 (0 there)."""

    values: np.ndarray
    ids: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.values)


def _entry_id(key: str, token_to_id: dict[str, int] | None) -> int:
    if key.startswith("token_id:"):
        return int(key[len("token_id:") :])
    if key.lstrip("-").isdigit():  # vLLM keys prompt_logprobs by the id itself
        return int(key)
    if token_to_id is not None and key in token_to_id:
        return token_to_id[key]
    raise LLMBackendError(
        f"log-probability entry keyed by the string {key!r}: ask the server for token ids "
        "(return_tokens_as_token_ids) or give the client the tokenizer's vocabulary"
    )


def _entry_value(v: Any) -> float:
    if isinstance(v, dict):
        v = v.get("logprob")
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise LLMBackendError(f"log-probability entry is not a number: {v!r}")
    v = float(v)
    if math.isnan(v) or v > 1e-4:
        raise LLMBackendError(f"invalid log-probability {v}")
    return v


def _row(entries: dict | None, k: int, token_to_id: dict[str, int] | None) -> list[tuple[int, float]]:
    if not entries:
        raise LLMBackendError("a position has no log-probabilities")
    pairs = sorted(((_entry_id(key, token_to_id), _entry_value(v)) for key, v in entries.items()),
                   key=lambda p: (-p[1], p[0]))
    return pairs[:k]


def parse_choice(choice: dict, n_tokens: int, k: int, token_to_id: dict[str, int] | None = None) -> TopK:
    """One completion choice -> :class:`TopK` with ``n_tokens`` rows (see the module doc)."""
    rows: list[list[tuple[int, float]]] = []
    prompt_lp = choice.get("prompt_logprobs")
    if n_tokens > 1:
        if not isinstance(prompt_lp, list) or len(prompt_lp) < n_tokens:
            raise LLMBackendError(
                "the server returned no prompt_logprobs (or too few); it must support vLLM's "
                "prompt_logprobs extension to score a sequence in one request")
        rows.extend(_row(prompt_lp[t], k, token_to_id) for t in range(1, n_tokens))
    lp = choice.get("logprobs") or {}
    top = lp.get("top_logprobs") if isinstance(lp, dict) else None
    if not isinstance(top, list) or not top:
        raise LLMBackendError("the server returned no top_logprobs for the generated token")
    rows.append(_row(top[-1], k, token_to_id))  # max_tokens=1: the one generated token
    width = max(len(r) for r in rows)
    values = np.full((len(rows), width), -np.inf, dtype=np.float32)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    for t, r in enumerate(rows):
        for j, (i, v) in enumerate(r):
            values[t, j], ids[t, j] = v, i
    return TopK(values, ids)


class CompletionsClient:
    """``POST {base_url}/v1/completions`` for top-k next-token log-probabilities.

    ``top_k``: entries per position (full vocabulary when the server allows it: vLLM caps it
    with ``--max-logprobs``). Retries connection errors and 429/5xx with exponential backoff;
    counts ``requests`` (round trips) and ``seconds`` for the benchmarks."""

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 top_k: int = 20, timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 0.5,
                 token_to_id: dict[str, int] | None = None, max_batch: int = 16):
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.model = model
        self.api_key = api_key
        self.top_k = int(top_k)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.token_to_id = token_to_id
        self.max_batch = max(1, int(max_batch))
        self.requests = 0
        self.seconds = 0.0

    # -- HTTP -------------------------------------------------------------------------------
    def _call(self, path: str, body: dict | None = None) -> dict:
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    payload = resp.read()
                self.requests += 1
                self.seconds += time.perf_counter() - t0
                try:
                    return json.loads(payload)
                except json.JSONDecodeError as exc:
                    raise LLMBackendError(f"{url} answered with invalid JSON: {exc}") from None
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:500].decode("utf-8", "replace")
                if exc.code in (429, 500, 502, 503, 504) and attempt < self.retries:
                    last = exc
                else:
                    raise LLMBackendError(f"{url}: HTTP {exc.code}: {detail}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = exc
                if attempt >= self.retries:
                    break
            time.sleep(self.backoff_s * (2**attempt))
        raise LLMBackendError(f"{url} unreachable after {self.retries + 1} attempts: {last}")

    def models(self) -> list[str]:
        data = self._call("/v1/models")
        return [m.get("id", "") for m in data.get("data", [])]

    def tokenize(self, text: str) -> list[int] | None:
        """Token ids from the server's ``/tokenize`` (a vLLM extension); None if it has none."""
        try:
            data = self._call("/tokenize", {"model": self._model(), "prompt": text, "add_special_tokens": False})
        except LLMBackendError as exc:
            if "HTTP 404" in str(exc) or "HTTP 405" in str(exc):
                return None
            raise
        return [int(t) for t in data.get("tokens", [])]

    def _model(self) -> str:
        if self.model is None:
            names = self.models()
            if not names:
                raise LLMBackendError(f"{self.base_url} serves no model")
            self.model = names[0]
        return self.model

    # -- scoring ----------------------------------------------------------------------------
    def prompt_logprobs(self, prompts: Sequence[Sequence[int]], top_k: int | None = None) -> list[TopK]:
        """Next-token top-k log-probabilities at every position of every prompt."""
        k = int(top_k or self.top_k)
        out: list[TopK] = []
        for start in range(0, len(prompts), self.max_batch):
            batch = [list(map(int, p)) for p in prompts[start : start + self.max_batch]]
            if any(not p for p in batch):
                raise LLMBackendError("cannot score an empty prompt")
            body = {"model": self._model(), "prompt": batch, "max_tokens": 1, "temperature": 0.0,
                    "logprobs": k, "prompt_logprobs": k, "return_tokens_as_token_ids": True}
            data = self._call("/v1/completions", body)
            choices = data.get("choices")
            if not isinstance(choices, list) or len(choices) != len(batch):
                raise LLMBackendError(f"expected {len(batch)} choices, got {data!r:.300}")
            for choice in sorted(choices, key=lambda c: c.get("index", 0)):
                out.append(parse_choice(choice, len(batch[int(choice.get("index", 0))]), k, self.token_to_id))
        return out
