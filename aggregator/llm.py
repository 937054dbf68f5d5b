"""The aggregator's large model, behind one interface with two backends.

- :class:`LocalLLM`: weights from a local checkpoint (optionally 4-/8-bit), LoRA-trainable;
  what FedCoLLM needs, and the fastest way to give FedPT its logits.
- :class:`BlackBoxLLM`: only next-token log-probabilities from an OpenAI-compatible completions
  endpoint (vLLM, or ``cotune llm serve``); full vocabulary or top-k, the rest of the mass
  spread evenly (:func:`algorithms.core.kd.complete_topk`). It cannot be trained.

Both return ``logprobs(input_ids, attention_mask) -> [B, T, V]`` float32, where row ``t``
is the distribution of the token after position ``t`` (padding rows are uniform).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from algorithms.core.kd import complete_topk
from algorithms.core.modeling import LoraSpec, attach_lora, load_causal_lm
from algorithms.core.openai_api import CompletionsClient, LLMBackendError

from .errors import AggregatorError

log = logging.getLogger("cotune.aggregator.llm")

__all__ = ["BlackBoxLLM", "LLMBackendError", "LLMConfigError", "LocalLLM", "make_llm_backend"]

BACKENDS = ("local", "blackbox")


class LLMConfigError(AggregatorError, ValueError):
    code = "config"


class LocalLLM:
    """A causal LM held in this process. ``trainable(lora)`` wraps it in a LoRA adapter once;
    ``logprobs`` then runs with the adapter's current weights."""

    kind = "local"

    def __init__(self, path: str, quant: str = "fp32", device: str = "cpu"):
        self.path = str(path)
        self.model, self._tok, self.report = load_causal_lm(path, quant=quant, device=device)
        self.peft = None

    def tokenizer(self) -> Any:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def trainable(self, lora: LoraSpec, seed: int = 0) -> Any:
        """The model with a LoRA adapter (created on the first call; the same object after)."""
        if self.peft is None:
            self.peft = attach_lora(self.model, lora, seed=seed)
        return self.peft

    def module(self) -> torch.nn.Module:
        return self.peft if self.peft is not None else self.model

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        m = self.module()
        was = m.training
        m.eval()
        try:
            out = m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            m.train(was)
        return torch.log_softmax(out.logits.float(), dim=-1)

    def describe(self) -> dict:
        return {"backend": "local", "path": self.path, "quant": self.report.quant,
                "parameters": self.report.num_parameters}


class BlackBoxLLM:
    """Log-probabilities from a completions endpoint. The aggregator tokenizes with its own copy
    of the tokenizer (``tokenizer_path``); when the server offers ``/tokenize`` the two are
    compared on a probe text at start, so a different model behind the URL is caught early."""

    kind = "blackbox"
    PROBE = "Federated proxy-tuning: the quick brown fox jumps over the lazy dog 1234."

    def __init__(self, url: str, tokenizer_path: str, *, model: str | None = None, top_k: int = 20,
                 api_key: str | None = None, timeout_s: float = 120.0, vocab_size: int | None = None,
                 max_batch: int = 16):
        self._tok = _load_tokenizer(tokenizer_path)
        self.client = CompletionsClient(url, model, api_key=api_key, top_k=top_k, timeout_s=timeout_s,
                                        max_batch=max_batch)
        self._vocab = int(vocab_size or len(self._tok))
        self.url = url
        self._checked = False

    def tokenizer(self) -> Any:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def trainable(self, lora: LoraSpec, seed: int = 0) -> Any:
        raise LLMConfigError("a black-box LLM cannot be trained; FedCoLLM needs llm.backend='local' "
                             "(FedPT works with either)")

    def check(self) -> None:
        if self._checked:
            return
        remote = self.client.tokenize(self.PROBE)
        local = self._tok(self.PROBE, add_special_tokens=False)["input_ids"]
        if remote is not None and list(remote) != list(local):
            raise LLMBackendError(
                f"the model behind {self.url} tokenizes differently from the local tokenizer "
                f"({remote[:12]} vs {local[:12]}); point llm.tokenizer at the served model's tokenizer")
        if remote is None:
            log.warning("%s has no /tokenize endpoint; cannot verify the tokenizer matches", self.url)
        self._checked = True

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check()
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompts, spans = [], []
        for i in range(b):
            pos = torch.nonzero(attention_mask[i], as_tuple=False).flatten()
            if len(pos) == 0:
                spans.append(None)
                continue
            lo, hi = int(pos[0]), int(pos[-1]) + 1
            prompts.append(input_ids[i, lo:hi].tolist())
            spans.append((lo, hi))
        out = torch.full((b, t, self._vocab), -float(torch.log(torch.tensor(float(self._vocab)))))
        answers = iter(self.client.prompt_logprobs(prompts))
        for i, span in enumerate(spans):
            if span is None:
                continue
            top = next(answers)
            if int(top.ids.max(initial=0)) >= self._vocab:
                raise LLMBackendError(f"the server returned token id {int(top.ids.max())} >= vocab size {self._vocab}")
            vals, ids = torch.from_numpy(top.values), torch.from_numpy(top.ids)
            out[i, span[0] : span[1]] = complete_topk(vals, ids, self._vocab, torch.from_numpy(top.valid))
        return out

    def describe(self) -> dict:
        return {"backend": "blackbox", "url": self.url, "top_k": self.client.top_k,
                "requests": self.client.requests}


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise LLMConfigError(f"llm.tokenizer {path!r} is not a local tokenizer directory")
    return AutoTokenizer.from_pretrained(path)


def make_llm_backend(cfg: dict, models: dict) -> LocalLLM | BlackBoxLLM:
    """From the aggregator config's ``llm`` section (``backend`` local|blackbox) and ``models``.

    local: ``{"backend": "local", "path": ..., "quant": "fp32|bf16|nf4|int8"}`` (path defaults
    to ``models["llm"]``). blackbox: ``{"backend": "blackbox", "url": ..., "tokenizer": ...,
    "model": ..., "top_k": 20, "api_key_env": "OPENAI_API_KEY"}`` (tokenizer defaults to
    ``models["llm"]`` then ``models["slm"]``: proxy-tuning needs one shared tokenizer anyway)."""
    cfg = dict(cfg or {})
    backend = cfg.pop("backend", "local")
    if backend not in BACKENDS:
        raise LLMConfigError(f"llm.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "local":
        path = cfg.pop("path", None) or models.get("llm")
        if not path:
            raise LLMConfigError("llm.backend 'local' needs llm.path or models.llm")
        quant = cfg.pop("quant", "fp32")
        device = cfg.pop("device", "cpu")
        if cfg:
            raise LLMConfigError(f"unknown llm keys for the local backend: {sorted(cfg)}")
        return LocalLLM(path, quant=quant, device=device)
    url = cfg.pop("url", None)
    if not url:
        raise LLMConfigError("llm.backend 'blackbox' needs llm.url (e.g. http://host:8000)")
    tok = cfg.pop("tokenizer", None) or models.get("llm") or models.get("slm")
    if not tok:
        raise LLMConfigError("llm.backend 'blackbox' needs llm.tokenizer (a local tokenizer directory)")
    key_env = cfg.pop("api_key_env", None)
    api_key = os.environ.get(key_env) if key_env else None
    if key_env and not api_key:
        raise LLMConfigError(f"llm.api_key_env names {key_env!r}, which is not set")
    kw = {k: cfg.pop(k) for k in ("model", "top_k", "timeout_s", "vocab_size", "max_batch") if k in cfg}
    if cfg:
        raise LLMConfigError(f"unknown llm keys for the blackbox backend: {sorted(cfg)}")
    return BlackBoxLLM(url, tok, api_key=api_key, **kw)
