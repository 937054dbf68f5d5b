"""The proxy-tuned LLM as a teacher and as a model to evaluate.

``z = z_LLM + alpha * (z_expert - z_anti)``: the expert is the SLM carrying the federation's
adapter, the anti-expert the same SLM with the adapter disabled (its base), so only one small
model is held. LLM scores come from a backend (``logprobs(input_ids, attention_mask)``); a
black-box LLM's scores of a public row never change (its weights do not), so they are memoised
per row and each row costs one request per federation, not one per round and epoch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from algorithms.core.kd import proxy_logits
from algorithms.core.textdata import EvalResult, TokenizedDataset, causal_lm_token_stats


class LLMRowCache:
    def __init__(self, backend: Any, max_rows: int = 100_000):
        self.backend, self.max_rows = backend, max_rows
        self.rows: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    @staticmethod
    def _key(ids: torch.Tensor, mask: torch.Tensor) -> bytes:
        # the real tokens only: the same row batched with other rows is padded differently
        return hashlib.sha1(ids[mask.bool()].numpy().tobytes()).digest()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if getattr(self.backend, "kind", "local") == "local":
            return self.backend.logprobs(input_ids, attention_mask)  # cheap, and a LoRA may change it
        keys = [self._key(input_ids[i], attention_mask[i]) for i in range(input_ids.shape[0])]
        todo = [i for i, k in enumerate(keys) if k not in self.rows]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if len(self.rows) + len(todo) > self.max_rows:
            return self.backend.logprobs(input_ids, attention_mask)  # over budget: no memo
        fresh = self.backend.logprobs(input_ids[todo], attention_mask[todo]) if todo else None
        for j, i in enumerate(todo):
            self.rows[keys[i]] = fresh[j][attention_mask[i].bool()].to(torch.float16)
        v = next(iter(self.rows.values())).shape[-1] if self.rows else self.backend.vocab_size
        out = torch.full((*input_ids.shape, v), -math.log(v))
        for i, k in enumerate(keys):
            out[i, attention_mask[i].bool()] = self.rows[k].float()
        return out


class ProxyTeacher:
    """Callable ``teacher(batch) -> [B, T, V]`` proxy-tuned log-probabilities."""

    def __init__(self, llm: Any, expert: torch.nn.Module, alpha: float = 1.0):
        self.llm = llm if isinstance(llm, LLMRowCache) else LLMRowCache(llm)
        self.expert = expert
        self.alpha = float(alpha)

    @torch.no_grad()
    def small_pair(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        was = self.expert.training
        self.expert.eval()
        try:
            tuned = self.expert(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
            with self.expert.disable_adapter():
                base = self.expert(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
        finally:
            self.expert.train(was)
        return tuned, base

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor], alpha: float | None = None) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        large = self.llm(ids, mask)
        tuned, base = self.small_pair(ids, mask)
        z = proxy_logits(large, tuned, base, self.alpha if alpha is None else alpha)
        return torch.log_softmax(z, dim=-1)


@torch.no_grad()
def evaluate_proxy(llm: Any, expert: torch.nn.Module, tokenizer: Any, texts: Sequence[Any] | TokenizedDataset,
                   alphas: Sequence[float], block_size: int = 64, batch_size: int = 8) -> dict[float, EvalResult]:
    """Token NLL / perplexity / next-token accuracy of the proxy-tuned LLM at each alpha, in
    one pass (the three models run once per batch). ``alpha=0`` is the LLM alone."""
    ds = texts if isinstance(texts, TokenizedDataset) else TokenizedDataset(tokenizer, texts, block_size)
    teacher = ProxyTeacher(llm, expert)
    sums = {a: [0.0, 0, 0] for a in alphas}
    for batch in ds.batches(batch_size, shuffle=False):
        large = teacher.llm(batch["input_ids"], batch["attention_mask"])
        tuned, base = teacher.small_pair(batch["input_ids"], batch["attention_mask"])
        for a in alphas:
            nll, correct, n = causal_lm_token_stats(proxy_logits(large, tuned, base, a), batch["labels"])
            s = sums[a]
            s[0] += float(nll)
            s[1] += int(correct)
            s[2] += int(n)
    out = {}
    for a, (nll, correct, n) in sums.items():
        mean = nll / max(n, 1)
        out[a] = EvalResult(nll=mean, ppl=math.exp(min(mean, 700.0)), accuracy=correct / max(n, 1), tokens=n)
    return out
