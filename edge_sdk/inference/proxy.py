"""Proxy-tuned generation (FedPT inference) with optional speculative block verification.

At every position ``z = z_large + alpha * (z_tuned_small - z_base_small)`` over the common
vocabulary (the longer logit vectors are truncated to the shortest; the tokenizers must agree
on every id of that range, else :class:`TokenizerMismatchError`), then greedy or sampling
exactly as in :mod:`.generate`. The large model may return log-probabilities instead of
logits: softmax is shift-invariant per position, so the proxy distribution is the same.

The large model sits behind :class:`LargeModel`, one method and one counter, so a local
model, an OpenAI-compatible logprobs endpoint or an over-the-wire client plug in alike.
:class:`LocalLargeModel` is a local causal LM (torch eager by default) that counts requests
like a remote one and reuses its KV cache across requests that share a prefix.

The small pair. When the tuned model is the base plus an adapter, one gated graph runs tuned
and base as a batch of 2 (:meth:`SmallPair.gated`); two unrelated checkpoints run as two
sessions (:meth:`SmallPair.separate`). Both keep their own KV caches and roll back.

Speculation (``speculative=k``). The tuned small model drafts up to ``k`` tokens greedily; ONE
large-model request returns its distributions at all ``k + 1`` positions; the proxy
combination is applied position by position; the agreeing prefix is accepted plus the first
proxy token that differs (or a bonus token when all ``k`` agree); the small caches roll back
to the accepted length. Greedy output is exactly that of plain proxy decoding. With sampling,
draft ``d`` is accepted with probability ``p(d)`` and otherwise a token is drawn from ``p``
without ``d`` (speculative sampling with a deterministic draft), so every token still follows
the proxy distribution, though the random stream differs from plain decoding's.

Without speculation, the large-model request for a position runs on a worker thread while the
small pair computes the same position (``overlap=True``), as a device would while waiting on a
remote LLM.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import GenerationConfigError, InferenceError, TokenizerMismatchError
from .generate import (
    Decoder,
    GenerationResult,
    SamplingConfig,
    TextStream,
    choose_token,
    encode_prompt,
    load_backend,
    merge_config,
    next_token_probs,
    run_to_end,
    sample_from,
)

__all__ = [
    "LargeModel",
    "LocalLargeModel",
    "ProxyGenerator",
    "SmallPair",
    "check_vocabularies",
    "large_only_stream",
    "log_softmax",
    "proxy_logits",
]

log = logging.getLogger("cotune.edge.inference")


# --------------------------------------------------------------------------------------------
# arithmetic and vocabularies


def proxy_logits(
    z_large: np.ndarray, z_tuned: np.ndarray, z_base: np.ndarray, alpha: float = 1.0
) -> np.ndarray:
    """``z_large + alpha * (z_tuned - z_base)`` over the common vocabulary (last axis cut to
    the shortest of the three). Works on [V] or [positions, V] arrays."""
    v = min(z_large.shape[-1], z_tuned.shape[-1], z_base.shape[-1])
    zl = z_large[..., :v].astype(np.float32, copy=False)
    return zl + np.float32(alpha) * (z_tuned[..., :v] - z_base[..., :v])


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64, returned as float32."""
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return (z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))).astype(np.float32)


def _vocab_of(obj: Any) -> Mapping[str, int] | None:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj
    get = getattr(obj, "get_vocab", None)
    return get() if callable(get) else None


def check_vocabularies(named: Mapping[str, Any]) -> int | None:
    """Refuse models that cannot be combined token by token.

    ``named`` maps a label ("large", "tuned", "base") to a tokenizer, a ``token -> id``
    mapping, or None (unknown; skipped). Every pair must map each id of their common range
    ``[0, min(size))`` to the same token string. Returns that common size (None when fewer
    than two vocabularies are known). Raises :class:`TokenizerMismatchError`.
    """
    known = {k: v for k, v in ((k, _vocab_of(t)) for k, t in named.items()) if v is not None}
    if len(known) < 2:
        return None
    inverse = {k: {i: tok for tok, i in v.items()} for k, v in known.items()}
    size = min(max(inv) + 1 for inv in inverse.values() if inv)
    labels = list(inverse)
    ref = labels[0]
    for other in labels[1:]:
        diff = [i for i in range(size) if inverse[ref].get(i) != inverse[other].get(i)]
        if diff:
            i = diff[0]
            raise TokenizerMismatchError(
                f"the {ref} and {other} tokenizers differ on {len(diff)} of the first {size} "
                f"ids (e.g. id {i}: {inverse[ref].get(i)!r} vs {inverse[other].get(i)!r}); "
                "proxy-tuning needs models that share one vocabulary"
            )
    return size


# --------------------------------------------------------------------------------------------
# the large model


@runtime_checkable
class LargeModel(Protocol):
    """What proxy-tuning needs from the large model; one call is one round trip.

    ``logprobs(ids, positions)`` returns float32 [positions, V]: log-probabilities (or logits)
    of the next token after each of the LAST ``positions`` prefixes of ``ids``, i.e. row j is
    the distribution after ``ids[: len(ids) - positions + j + 1]``. ``requests`` counts calls.
    A client for a top-k-only API fills the ids it was not given with ``-inf``. Optionally a
    ``get_vocab() -> {token: id}`` method lets the caller check the vocabulary.
    """

    requests: int

    def logprobs(self, ids: Sequence[int], positions: int = 1) -> np.ndarray: ...


class LocalLargeModel:
    """A local causal LM behind :class:`LargeModel` (also an emulator of a remote one).

    Keeps one KV cache: a request whose ids extend (or share a prefix with) the previous
    request's reuses it, rolling back as needed, so plain decoding costs one new position per
    request. ``incremental=True`` evaluates the new positions one at a time, which makes the
    results bitwise identical however requests are split (useful in exactness tests);
    the default evaluates them in one forward. ``logits=True`` returns raw logits.
    """

    def __init__(
        self,
        backend: Any,
        tokenizer: Any | None = None,
        *,
        incremental: bool = False,
        logits: bool = False,
    ):
        self.backend = backend
        self.tokenizer = tokenizer if tokenizer is not None else backend.tokenizer
        self.vocab_size = int(backend.vocab_size)
        self.incremental = incremental
        self.return_logits = logits
        self.requests = 0
        self.positions_returned = 0
        self.tokens_evaluated = 0
        self._dec = Decoder(backend)

    @classmethod
    def load(cls, model: str | Path, *, backend: str = "torch", **kw: Any) -> LocalLargeModel:
        """From a HF model directory; ``backend`` and ``kw`` as in :func:`load_backend`
        (torch eager by default, standing in for a server-side model)."""
        opts = {k: kw.pop(k) for k in ("incremental", "logits") if k in kw}
        return cls(load_backend(model, backend=backend, **kw), **opts)

    def get_vocab(self) -> Mapping[str, int]:
        return self.tokenizer.get_vocab()

    def reset_counters(self) -> None:
        self.requests = self.positions_returned = self.tokens_evaluated = 0

    def logprobs(self, ids: Sequence[int], positions: int = 1) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not 1 <= positions <= len(ids):
            raise InferenceError(f"positions must be in [1, {len(ids)}], got {positions}")
        self.requests += 1
        self.positions_returned += positions
        dec = self._dec
        common = 0
        for a, b in zip(dec.tokens, ids, strict=False):
            if a != b:
                break
            common += 1
        keep = min(common, len(ids) - positions)
        dec.rollback(keep)
        new = ids[keep:]
        self.tokens_evaluated += len(new)
        if self.incremental:
            rows = np.stack([dec.step(t)[0] for t in new])
        else:
            rows = dec.feed(new)[0]
        rows = rows[-positions:]
        return rows.astype(np.float32, copy=False) if self.return_logits else log_softmax(rows)


# --------------------------------------------------------------------------------------------
# the small pair


class SmallPair:
    """Tuned (expert) and base (anti-expert) small models on the same tokens.

    ``prefill``/``step`` return ``(z_tuned, z_base)``, each [V]; ``rollback`` forgets tokens.
    """

    def __init__(self, decoders: Sequence[Decoder], tokenizer: Any):
        if len(decoders) not in (1, 2) or (len(decoders) == 1 and decoders[0].rows != 2):
            raise GenerationConfigError("a SmallPair is one 2-row gated decoder or two decoders")
        self.decoders = list(decoders)
        self.tokenizer = tokenizer
        self.batched = len(decoders) == 1

    @classmethod
    def gated(cls, backend: Any) -> SmallPair:
        """One gated graph (base + adapter, unmerged) as a batch of 2: rows = tuned, base."""
        return cls([Decoder(backend, [1.0, 0.0])], backend.tokenizer)

    @classmethod
    def separate(cls, tuned: Any, base: Any) -> SmallPair:
        """Two backends (two sessions). Refuses tokenizers that differ."""
        check_vocabularies({"tuned": tuned.tokenizer, "base": base.tokenizer})
        return cls([Decoder(tuned), Decoder(base)], tuned.tokenizer)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.decoders[0].backend.eos_token_ids)

    @property
    def length(self) -> int:
        return self.decoders[0].length

    @property
    def forwards(self) -> int:
        return sum(d.forwards for d in self.decoders)

    def _split(self, outs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if self.batched:
            return outs[0][0], outs[0][1]
        return outs[0][0], outs[1][0]

    def prefill(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        return self._split([d.prefill(ids) for d in self.decoders])

    def step(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        return self._split([d.step(token) for d in self.decoders])

    def rollback(self, length: int) -> None:
        for d in self.decoders:
            d.rollback(length)


# --------------------------------------------------------------------------------------------
# generation


@dataclass
class _Counters:
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    blocks: int = 0


def _verify(
    z: np.ndarray, draft: int, cfg: SamplingConfig, rng: np.random.Generator
) -> tuple[int, bool]:
    """(token, draft accepted) at one position of a speculative block."""
    if cfg.greedy:
        tok = int(np.argmax(z))
        return tok, tok == draft
    p = next_token_probs(z, cfg)
    if draft < p.size and rng.random() < p[draft]:
        return draft, True
    if draft < p.size:
        p[draft] = 0.0
        if p.sum() <= 0.0:  # p was one-hot on the draft (and the draw still failed: u == 1)
            return draft, True
    return sample_from(p / p.sum(), rng), False


class ProxyGenerator:
    """Proxy-tuned decoding: ``large`` + ``alpha`` * (tuned - base) from ``small``.

    ``speculative``: draft length k (0 = one large request per token). ``overlap``: run the
    large request of plain decoding concurrently with the small pair's step.
    One stream at a time per generator: the small pair's caches belong to the running stream.
    """

    def __init__(
        self,
        large: LargeModel,
        small: SmallPair,
        *,
        alpha: float = 1.0,
        speculative: int = 0,
        overlap: bool = True,
    ):
        if not isinstance(large, LargeModel):
            raise GenerationConfigError(
                "large must implement logprobs(ids, positions) and "
                "a requests counter (see LargeModel)"
            )
        if not np.isfinite(alpha):
            raise GenerationConfigError(f"alpha must be finite, got {alpha!r}")
        if isinstance(speculative, bool) or not isinstance(speculative, int) or speculative < 0:
            raise GenerationConfigError(f"speculative must be an integer >= 0, got {speculative!r}")
        large_vocab = getattr(large, "get_vocab", None)
        self.common_size = check_vocabularies(
            {
                "large": large_vocab() if callable(large_vocab) else None,
                "small": small.tokenizer,
            }
        )
        if self.common_size is None:
            log.warning(
                "the large model exposes no vocabulary; proxy-tuning assumes it shares "
                "the small models' tokenizer"
            )
        self.large, self.small = large, small
        self.tokenizer = small.tokenizer
        self.alpha = float(alpha)
        self.speculative = speculative
        self.overlap = overlap
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def load(
        cls,
        large: LargeModel | str | Path,
        model: str | Path,
        *,
        base: str | Path | None = None,
        adapter: str | Path | None = None,
        backend: str = "auto",
        export_dir: str | Path | None = None,
        threads: int | None = None,
        **kw: Any,
    ) -> ProxyGenerator:
        """Build from directories. With ``adapter`` and no other ``base`` (or ``base ==
        model``), tuned and base are one gated graph run as a batch of 2; otherwise ``model``
        (tuned) and ``base`` are loaded as two backends. ``large`` may be a model directory
        (a :class:`LocalLargeModel` on torch eager)."""
        opts = {"backend": backend, "export_dir": export_dir, "threads": threads}
        if adapter is not None and (base is None or Path(base).resolve() == Path(model).resolve()):
            small = SmallPair.gated(load_backend(model, adapter=adapter, lora_mode="gated", **opts))
        else:
            if base is None:
                raise GenerationConfigError(
                    "proxy-tuning needs a base (anti-expert) model: "
                    "pass base=..., or adapter=... on a base model"
                )
            small = SmallPair.separate(
                load_backend(model, adapter=adapter, **opts), load_backend(base, **opts)
            )
        if not isinstance(large, LargeModel):
            large = LocalLargeModel.load(large, threads=threads)
        return cls(large, small, **kw)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _combine(self, z_large: np.ndarray, zt: np.ndarray, zb: np.ndarray) -> np.ndarray:
        return proxy_logits(z_large, zt, zb, self.alpha)

    def stream(
        self, prompt: str | Sequence[int], cfg: SamplingConfig | None = None, **overrides: Any
    ) -> TextStream:
        cfg = merge_config(cfg, overrides)
        ids = encode_prompt(self.tokenizer, prompt)
        rng = np.random.default_rng(cfg.seed)
        c = _Counters()
        req0, fw0 = self.large.requests, self.small.forwards
        eos = set() if cfg.ignore_eos else set(self.small.eos_token_ids)
        if self.speculative > 0:
            source = self._speculative(list(ids), cfg, rng, c, eos)
        else:
            source = self._plain(list(ids), cfg, rng, c)

        def stats() -> dict[str, Any]:
            requests = self.large.requests - req0
            return {
                "mode": f"proxy speculative k={self.speculative}" if self.speculative else "proxy",
                "alpha": self.alpha,
                "small_batched": self.small.batched,
                "small_backend": self.small.decoders[0].backend.name,
                "small_forwards": self.small.forwards - fw0,
                "large_requests": requests,
                "requests_per_token": requests / c.tokens if c.tokens else 0.0,
                "drafted": c.drafted,
                "accepted": c.accepted,
                "acceptance_rate": c.accepted / c.drafted if c.drafted else 0.0,
            }

        return TextStream(self.tokenizer, ids, cfg, source, self.small.eos_token_ids, stats)

    def generate(
        self, prompt: str | Sequence[int], cfg: SamplingConfig | None = None, **overrides: Any
    ) -> GenerationResult:
        return run_to_end(self.stream(prompt, cfg, **overrides))

    def _plain(
        self, ids: list[int], cfg: SamplingConfig, rng: np.random.Generator, c: _Counters
    ) -> Iterator[int]:
        if self.overlap and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cotune-large")

        def both(first: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            if self._pool is not None:
                fut = self._pool.submit(self.large.logprobs, list(ids), 1)
                zt, zb = self.small.prefill(ids) if first else self.small.step(ids[-1])
                return fut.result()[-1], zt, zb
            zt, zb = self.small.prefill(ids) if first else self.small.step(ids[-1])
            return self.large.logprobs(ids, 1)[-1], zt, zb

        zl, zt, zb = both(True)
        while True:
            tok = choose_token(self._combine(zl, zt, zb), cfg, rng)
            c.tokens += 1
            yield tok
            ids.append(tok)
            zl, zt, zb = both(False)

    def _speculative(
        self,
        ids: list[int],
        cfg: SamplingConfig,
        rng: np.random.Generator,
        c: _Counters,
        eos: set[int],
    ) -> Iterator[int]:
        small, k = self.small, self.speculative
        zt, zb = small.prefill(ids)
        while True:
            remaining = cfg.max_new_tokens - c.tokens
            base_len = len(ids)
            drafts: list[int] = []
            dists = [(zt, zb)]  # small logits after ids + drafts[:j]
            for _ in range(max(0, min(k, remaining - 1))):
                d = int(np.argmax(zt[: self.common_size]))
                drafts.append(d)
                if d in eos:  # nothing worth drafting after EOS
                    break
                zt, zb = small.step(d)
                dists.append((zt, zb))
            positions = len(dists)
            zl = self.large.logprobs(ids + drafts[: positions - 1], positions)
            c.blocks += 1
            c.drafted += len(drafts)
            accepted = 0
            for j in range(positions):
                z = self._combine(zl[j], *dists[j])
                if j < len(drafts):
                    tok, ok = _verify(z, drafts[j], cfg, rng)
                else:
                    tok, ok = choose_token(z, cfg, rng), False
                c.tokens += 1
                if ok:
                    accepted += 1
                    c.accepted += 1
                yield tok
                ids.append(tok)
                if not ok:
                    break
            # the small pair has seen base_len + positions - 1 tokens: keep the accepted ones,
            # then feed what it has not seen yet (the corrected or bonus token)
            small.rollback(min(small.length, base_len + accepted))
            while small.length < len(ids):
                zt, zb = small.step(ids[small.length])


def large_only_stream(
    large: LargeModel,
    tokenizer: Any,
    prompt: str | Sequence[int],
    cfg: SamplingConfig | None = None,
    eos_token_ids: Sequence[int] = (),
    **overrides: Any,
) -> TextStream:
    """Decoding with the large model alone through the same protocol (one request per
    token): the baseline proxy-tuning is compared with."""
    cfg = merge_config(cfg, overrides)
    ids = encode_prompt(tokenizer, prompt)
    rng = np.random.default_rng(cfg.seed)
    req0 = large.requests

    def tokens() -> Iterator[int]:
        seq = list(ids)
        while True:
            tok = choose_token(large.logprobs(seq, 1)[-1], cfg, rng)
            yield tok
            seq.append(tok)

    eos = list(eos_token_ids) or [
        i for i in [getattr(tokenizer, "eos_token_id", None)] if i is not None
    ]
    return TextStream(
        tokenizer,
        ids,
        cfg,
        tokens(),
        eos,
        lambda: {"mode": "large only", "large_requests": large.requests - req0},
    )
