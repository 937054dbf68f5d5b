"""The model and its scheduler: one worker thread owns the model and advances every admitted
request one step at a time, round-robin (a step is one prefill chunk or one generated token),
so a long request never holds the model while others wait. Admission control (bounded queue,
per-client token budget and job count) happens in :meth:`Scheduler.submit`, before any work.
"""

from __future__ import annotations

import inspect
import logging
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import torch

from algorithms.core.modeling import load_causal_lm

from .. import metrics as _metrics
from .schema import APIError, CompletionRequest, ServerLimits

log = logging.getLogger("cotune.llm_server")

__all__ = ["CompletionModel", "Job", "Scheduler"]

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (as vLLM does): 1e-300 stays finite


class CompletionModel:
    """A causal LM and its tokenizer, with the per-step pieces the scheduler calls."""

    def __init__(self, path: str, name: str | None = None, quant: str = "fp32"):
        self.model, self.tok, self.report = load_causal_lm(path, quant=quant)
        self.model.eval()
        self.name = name or path.rstrip("/").rsplit("/", 1)[-1]
        self.vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.eos = self.tok.eos_token_id
        cfg = self.model.config
        self.max_len = int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 0
        )
        # newer transformers name the key/value cache argument `cache`, older `past_key_values`
        self._cache_kw = (
            "cache"
            if "cache" in inspect.signature(self.model.forward).parameters
            else "past_key_values"
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def key(self, tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else self.tok.decode([tid])

    def top(self, lp: torch.Tensor, k: int, as_ids: bool) -> dict:
        vals, ids = torch.topk(lp, k)
        return {
            self.key(int(i), as_ids): float(v)
            for v, i in zip(vals.tolist(), ids.tolist(), strict=True)
        }

    def forward(self, ids: list[int], past: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True, **{self._cache_kw: past})
        return torch.log_softmax(out.logits[0].float(), dim=-1), getattr(out, self._cache_kw)

    def models(self, max_logprobs: int, max_model_len: int) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "cotune",
                    "max_logprobs": max_logprobs,
                    "vocab_size": self.vocab,
                    "max_model_len": max_model_len or None,
                }
            ],
        }


class _Seq:
    """One completion (one prompt, one of its n samples) in progress."""

    def __init__(self, index: int, ids: list[int]):
        self.index, self.ids = index, ids
        self.pos = 0  # prompt tokens prefilled
        self.past: Any = None
        self.cur: torch.Tensor | None = None  # log-probabilities of the next token
        self.prompt_logprobs: list[dict | None] = [None]
        self.tokens: list[str] = []
        self.token_lps: list[float | None] = []
        self.tops: list[dict | None] = []
        self.text_ids: list[int] = []
        self.text = ""  # detokenized so far (see Scheduler._detokenize)
        self.prefix_off = self.read_off = 0
        self.sent = 0  # characters of generated text already streamed
        self.started = False  # first chunk streamed
        self.finish: str | None = None


class Job:
    """One admitted completions request. ``emit(kind, payload)`` is called from the worker
    thread: ``("chunk", choice)`` while streaming, then ``("done", result)`` or
    ``("error", APIError)`` exactly once."""

    def __init__(
        self,
        req: CompletionRequest,
        client: str,
        emit: Callable[[str, Any], None],
        timeout_s: float,
    ):
        self.req, self.client, self.emit = req, client, emit
        self.id = f"cmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.deadline = time.monotonic() + timeout_s
        self.cost = req.prompt_tokens + req.requested_tokens
        self.specs = [
            (p * req.n + j, ids) for p, ids in enumerate(req.prompts) for j in range(req.n)
        ]
        self.next_spec = 0
        self.seq: _Seq | None = None
        self.choices: list[dict] = []
        self.prompt_tokens = self.completion_tokens = 0
        self.gen = torch.Generator().manual_seed(req.seed)
        self.cancelled: str | None = None
        self.steps = 0

    def cancel(self, reason: str) -> None:
        if self.cancelled is None:
            self.cancelled = reason

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class Scheduler:
    """Admission control and the model worker (see the module doc)."""

    def __init__(self, model: CompletionModel, limits: ServerLimits):
        self.model, self.limits = model, limits
        self.cond = threading.Condition()
        self.pending: deque[Job] = deque()
        self.active: list[Job] = []
        self.per_client: Counter[str] = Counter()
        self.window: dict[str, deque[tuple[float, int]]] = {}
        self.stopping = False
        self.completed = self.rejected = 0
        self.thread = threading.Thread(target=self._run, name="llm-worker", daemon=True)
        self.thread.start()

    # -- admission (event-loop thread) -------------------------------------------------------------
    def submit(self, job: Job) -> None:
        lim, now = self.limits, time.monotonic()
        with self.cond:
            if self.stopping:
                raise APIError(503, "the server is shutting down", "server_error")
            if len(self.pending) + len(self.active) >= lim.max_queue:
                self.rejected += 1
                raise APIError(
                    429,
                    f"server busy: {lim.max_queue} requests in progress, retry later",
                    "rate_limit_error",
                    headers={"Retry-After": "1"},
                )
            if self.per_client[job.client] >= lim.max_client_jobs:
                self.rejected += 1
                raise APIError(
                    429,
                    f"this client already has {lim.max_client_jobs} requests in progress",
                    "rate_limit_error",
                    headers={"Retry-After": "1"},
                )
            if lim.client_tokens_per_window:
                win = self.window.setdefault(job.client, deque())
                while win and win[0][0] <= now - lim.client_window_s:
                    win.popleft()
                used = sum(c for _, c in win)
                if used + job.cost > lim.client_tokens_per_window:
                    self.rejected += 1
                    wait = max(1, int(win[0][0] + lim.client_window_s - now + 1)) if win else 1
                    if not win:
                        del self.window[job.client]
                    raise APIError(
                        429,
                        f"token budget of this client exceeded: {used} + {job.cost} tokens in "
                        f"{lim.client_window_s:g} s, limit {lim.client_tokens_per_window}",
                        "rate_limit_error",
                        headers={"Retry-After": str(wait)},
                    )
                win.append((now, job.cost))
                if len(self.window) > 10_000:  # forget idle clients
                    for c in [
                        c
                        for c, w in self.window.items()
                        if not w or w[-1][0] <= now - lim.client_window_s
                    ]:
                        del self.window[c]
            self.per_client[job.client] += 1
            self.pending.append(job)
            self.cond.notify()

    def load(self) -> dict:
        with self.cond:
            return {
                "pending": len(self.pending),
                "active": len(self.active),
                "completed": self.completed,
                "rejected": self.rejected,
            }

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(30)
        with self.cond:
            for job in list(self.pending) + self.active:
                job.emit("error", APIError(503, "the server is shutting down", "server_error"))
            self.pending.clear()
            self.active.clear()

    # -- the worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.pending and not self.active and not self.stopping:
                        self.cond.wait()
                    if self.stopping:
                        return
                    while self.pending and len(self.active) < self.limits.max_active:
                        self.active.append(self.pending.popleft())
                    batch = list(self.active)
                for job in batch:  # round robin: one step of every active request
                    self._advance(job)
                time.sleep(0)  # let the event loop thread take the GIL between rounds

    def _end(self, job: Job, kind: str, payload: Any) -> bool:
        """Retire ``job``, then answer it (so a client that got its answer sees the counts of
        :meth:`load` without it)."""
        with self.cond:
            self.active.remove(job)
            self.per_client[job.client] -= 1
            if self.per_client[job.client] <= 0:
                del self.per_client[job.client]
            self.completed += 1
        _metrics.llm_request_done(kind, job, self.limits.request_timeout_s)
        job.emit(kind, payload)
        return True

    def _advance(self, job: Job) -> bool:
        """One step of ``job``; True when it is over (answered or failed)."""
        if job.cancelled:
            return self._end(
                job, "error", APIError(499, f"cancelled: {job.cancelled}", "cancelled")
            )
        if time.monotonic() > job.deadline:
            err = APIError(
                504,
                f"request timed out after {self.limits.request_timeout_s:g} s "
                f"({job.completion_tokens} tokens generated)",
                "timeout_error",
            )
            return self._end(job, "error", err)
        try:
            job.steps += 1
            if job.seq is None:
                index, ids = job.specs[job.next_spec]
                job.next_spec += 1
                job.seq = _Seq(index, ids)
                if index % job.req.n == 0:  # usage counts a prompt once, whatever n
                    job.prompt_tokens += len(ids)
            seq = job.seq
            if seq.pos < len(seq.ids):
                self._prefill(job, seq)
            else:
                self._decode(job, seq)
            if seq.finish:
                self._close(job, seq)
                job.seq = None
                if job.next_spec == len(job.specs):
                    job.choices.sort(key=lambda c: c["index"])
                    return self._end(job, "done", {"choices": job.choices, "usage": job.usage()})
            return False
        except Exception as exc:  # the worker keeps serving; this request gets a 500
            log.exception("completion failed")
            return self._end(
                job, "error", APIError(500, f"{type(exc).__name__}: {exc}", "server_error")
            )

    def _prefill(self, job: Job, seq: _Seq) -> None:
        m, r = self.model, job.req
        chunk = seq.ids[seq.pos : seq.pos + self.limits.prefill_chunk]
        if seq.pos == 0 and r.echo:
            seq.tokens.append(m.key(seq.ids[0], r.as_ids))
            seq.token_lps.append(None)
            seq.tops.append(None)
        lp, seq.past = m.forward(chunk, seq.past)
        for i in range(len(chunk)):
            t = seq.pos + i + 1  # the prompt token that row i predicts
            if t >= len(seq.ids):
                break
            tid = seq.ids[t]
            if r.prompt_logprobs is not None:
                row = m.top(lp[i], r.prompt_logprobs, r.as_ids) if r.prompt_logprobs else {}
                row[m.key(tid, r.as_ids)] = float(lp[i, tid])  # vLLM also includes the actual token
                seq.prompt_logprobs.append(row)
            if r.echo:
                seq.tokens.append(m.key(tid, r.as_ids))
                seq.token_lps.append(float(lp[i, tid]))
                seq.tops.append(m.top(lp[i], r.logprobs, r.as_ids) if r.logprobs else None)
        seq.pos += len(chunk)
        if seq.pos == len(seq.ids):
            seq.cur = lp[-1]
            if r.stream and (r.echo or r.prompt_logprobs is not None):
                self._chunk(job, seq, first=True)

    def _sample(self, job: Job, cur: torch.Tensor) -> int:
        r = job.req
        if r.temperature < GREEDY_BELOW:
            return int(torch.argmax(cur))
        probs = torch.softmax(cur / r.temperature, dim=-1)
        if r.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, 0) - sp < r.top_p
            probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
        total = probs.sum()
        if not torch.isfinite(total) or total <= 0:
            return int(torch.argmax(cur))
        return int(torch.multinomial(probs / total, 1, generator=job.gen))

    def _decode(self, job: Job, seq: _Seq) -> None:
        m, r = self.model, job.req
        cur = seq.cur
        nxt = self._sample(job, cur)
        seq.tokens.append(m.key(nxt, r.as_ids))
        seq.token_lps.append(float(cur[nxt]))
        seq.tops.append(m.top(cur, r.logprobs, r.as_ids) if r.logprobs else None)
        seq.text_ids.append(nxt)
        job.completion_tokens += 1
        self._detokenize(seq)
        if nxt == m.eos and not r.ignore_eos:
            seq.finish = "stop"
        elif r.stop and any(s in seq.text for s in r.stop):
            seq.finish = "stop"
        elif len(seq.text_ids) >= r.max_tokens:
            seq.finish = "length"
        else:
            lp, seq.past = m.forward([nxt], seq.past)
            seq.cur = lp[-1]
        if seq.finish:
            self._detokenize(seq, final=True)
        if r.stream:
            self._chunk(job, seq)

    def _detokenize(self, seq: _Seq, final: bool = False) -> None:
        """Incremental detokenization as vLLM does it: decode a short window of ids and append
        what it adds, holding back a trailing partial character until it completes (or the
        sequence ends), so the streamed deltas and the full answer are the same text."""
        ids = seq.text_ids
        prefix = self.model.decode(ids[seq.prefix_off : seq.read_off])
        new = self.model.decode(ids[seq.prefix_off :])
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            seq.text += new[len(prefix) :]
            seq.prefix_off, seq.read_off = seq.read_off, len(ids)

    def _text(self, job: Job, seq: _Seq) -> str:
        text = seq.text
        for s in job.req.stop:
            if s in text:
                text = text[: text.index(s)]
        return text

    def _chunk(self, job: Job, seq: _Seq, first: bool = False) -> None:
        """Stream what ``seq`` has that was not sent: the prompt (echo, prompt_logprobs) first,
        then one chunk per generated token. Text that may still become a stop string is held
        back until it cannot."""
        r = job.req
        choice: dict[str, Any] = {
            "index": seq.index,
            "text": "",
            "logprobs": None,
            "finish_reason": None,
            "stop_reason": None,
        }
        if not seq.started:
            seq.started = True
            if r.echo:
                choice["text"] = self.model.decode(seq.ids)
            if r.prompt_logprobs is not None:
                choice["prompt_logprobs"] = seq.prompt_logprobs
            lo = 0  # the echoed prompt's tokens, if any, go with the first chunk
        else:
            lo = len(seq.tokens) - 1
        n_new = len(seq.tokens) - lo
        if not first:
            if seq.finish:
                text = self._text(job, seq)
                delta = text[seq.sent :]
            else:  # hold back what may still become a stop string
                hold = max((len(s) - 1 for s in r.stop), default=0)
                delta = seq.text[seq.sent : max(seq.sent, len(seq.text) - hold)]
            seq.sent += len(delta)
            choice["text"] += delta
            choice["finish_reason"] = seq.finish
        if r.logprobs is not None and n_new:
            hi = lo + n_new
            choice["logprobs"] = {
                "tokens": seq.tokens[lo:hi],
                "token_logprobs": seq.token_lps[lo:hi],
                "top_logprobs": seq.tops[lo:hi],
                "text_offset": None,
            }
        job.emit("chunk", choice)

    def _close(self, job: Job, seq: _Seq) -> None:
        r = job.req
        if r.stream:
            return
        text = self._text(job, seq)
        if r.echo:
            text = self.model.decode(seq.ids) + text
        logprobs = None
        if r.logprobs is not None:
            logprobs = {
                "tokens": seq.tokens,
                "token_logprobs": seq.token_lps,
                "top_logprobs": seq.tops,
                "text_offset": None,
            }
        job.choices.append(
            {
                "index": seq.index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": seq.finish,
                "prompt_logprobs": seq.prompt_logprobs if r.prompt_logprobs is not None else None,
            }
        )
