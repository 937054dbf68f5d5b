"""The large model of proxy-tuned generation behind an OpenAI-compatible completions endpoint
(vLLM, or ``cotune llm serve``): one HTTP request per :meth:`logprobs` call, which returns the
next-token distributions at the last ``positions`` prefixes (vLLM's ``prompt_logprobs`` for the
earlier ones, the generated token's ``top_logprobs`` for the last). Only the top-k entries come
back; the rest of the mass is spread evenly over the other ids, so the proxy arithmetic sees a
full, normalised distribution. Speculative verification asks for k+1 positions in one request.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from algorithms.core.openai_api import CompletionsClient


def complete_topk_np(values: np.ndarray, ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Dense log-probabilities ``[rows, vocab_size]`` from top-k rows (``-inf`` = padding): the
    aggregator's completion (:func:`algorithms.core.kd.complete_topk`) on numpy arrays."""
    import torch

    from algorithms.core.kd import complete_topk

    dense = complete_topk(torch.from_numpy(np.asarray(values, dtype=np.float32)),
                          torch.from_numpy(np.asarray(ids, dtype=np.int64)), int(vocab_size))
    return dense.numpy().astype(np.float32, copy=False)


class RemoteLargeModel:
    """:class:`edge_sdk.inference.proxy.LargeModel` over HTTP. ``vocab_size``: the tokenizer's
    size (the common vocabulary of the proxy); ``top_k``: entries per position the server
    returns (vLLM's ``--max-logprobs`` caps it)."""

    def __init__(self, url: str, vocab_size: int, *, model: str | None = None, top_k: int = 20,
                 api_key: str | None = None, timeout_s: float = 60.0, tokenizer=None):
        self.client = CompletionsClient(url, model, api_key=api_key, top_k=top_k, timeout_s=timeout_s)
        self.vocab_size = int(vocab_size)
        self._tok = tokenizer

    @property
    def requests(self) -> int:
        return self.client.requests

    def get_vocab(self):
        return self._tok.get_vocab() if self._tok is not None else None

    def logprobs(self, ids: Sequence[int], positions: int = 1) -> np.ndarray:
        if not 1 <= positions <= len(ids):
            raise ValueError(f"positions must be in [1, {len(ids)}], got {positions}")
        top = self.client.prompt_logprobs([list(ids)])[0]
        rows = slice(len(ids) - positions, len(ids))
        return complete_topk_np(top.values[rows], top.ids[rows], self.vocab_size)
