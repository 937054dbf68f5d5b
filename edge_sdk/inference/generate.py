"""Step-by-step generation over two interchangeable backends: ONNX Runtime and torch eager.

Layers, bottom up:

- a *backend* (:class:`OrtBackend` on an export directory, :class:`TorchBackend` on a HF model
  directory) runs one forward ``(ids [B, T], KVCache, gate) -> (logits [B, T, V], KVCache)``;
  both take and return the same flat cache layout (see :mod:`.onnx_export`), so everything
  above them is backend-agnostic;
- a :class:`Decoder` is one sequence on a backend (all of its batch rows see the same tokens;
  rows differ only by LoRA gate): ``prefill(ids)``, ``step(token)``, ``feed(tokens)`` return
  next-token logits, ``rollback(length)`` and ``fork()`` are free because caches are
  immutable (a step returns a new cache; rollback slices one);
- a :class:`Generator` turns a prompt into text: greedy / temperature / top-k / top-p
  sampling (seeded), ``max_new_tokens``, EOS, stop strings (generation stops when the text
  contains one; the text returned excludes it) and streaming (:class:`TextStream` yields
  text pieces, holding back incomplete UTF-8 characters and anything that may still become a
  stop string; the pieces always concatenate to ``result.text``).

:func:`load_backend` picks ONNX Runtime when it is importable (exporting the model into a
cache directory on first use) and otherwise logs why and runs torch eager.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import (
    BackendUnavailableError,
    ExportUnsupportedError,
    GenerationConfigError,
    InferenceError,
)

__all__ = [
    "Decoder",
    "GenerationResult",
    "Generator",
    "KVCache",
    "OrtBackend",
    "SamplingConfig",
    "TextStream",
    "TorchBackend",
    "choose_token",
    "load_backend",
    "next_token_probs",
]

log = logging.getLogger("cotune.edge.inference")


# --------------------------------------------------------------------------------------------
# sampling


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. ``temperature == 0`` is greedy (``top_k``/``top_p``/``seed`` are
    then unused); ``top_k == 0`` and ``top_p == 1`` switch those filters off. ``stop``:
    strings that end generation (excluded from the text). ``ignore_eos`` keeps generating past
    EOS (benchmarks that need a fixed token count)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise GenerationConfigError(
                f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}"
            )
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationConfigError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationConfigError(
                f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise GenerationConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise GenerationConfigError(f"stop strings must be non-empty strings, got {stop!r}")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def next_token_probs(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """The distribution ``cfg`` samples from (float64, sums to 1): temperature, then top-k,
    then top-p (the smallest set of most likely tokens whose mass reaches ``top_p``; the most
    likely token is always kept). Greedy configs give the one-hot of the argmax."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if cfg.greedy:
        p = np.zeros_like(z)
        p[int(np.argmax(z))] = 1.0
        return p
    z = z / cfg.temperature
    if 0 < cfg.top_k < z.size:
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - np.max(z))
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = int(np.searchsorted(cum, cfg.top_p - 1e-9, side="left")) + 1  # 1e-9: rounding
        mask = np.zeros(p.size, dtype=bool)
        mask[order[:keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


def sample_from(p: np.ndarray, rng: np.random.Generator) -> int:
    cum = np.cumsum(p)
    return int(min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), p.size - 1))


def choose_token(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """Greedy argmax (first index on ties) or one seeded draw from :func:`next_token_probs`."""
    if cfg.greedy:
        return int(np.argmax(logits))
    return sample_from(next_token_probs(logits, cfg), rng)


# --------------------------------------------------------------------------------------------
# caches and backends


class KVCache:
    """Immutable per-layer key/value tensors (numpy for ORT, torch for torch) of ``length``
    positions; :meth:`truncate` returns a new cache."""

    __slots__ = ("length", "tensors")

    def __init__(self, tensors: tuple, length: int):
        self.tensors = tensors
        self.length = int(length)

    def truncate(self, length: int) -> KVCache:
        if not 0 <= length <= self.length:
            raise InferenceError(f"cannot roll a cache of {self.length} back to {length}")
        if length == self.length:
            return self
        if self.tensors and isinstance(self.tensors[0], np.ndarray):
            ts = tuple(np.ascontiguousarray(t[:, :, :length]) for t in self.tensors)
        else:
            ts = tuple(t[:, :, :length].contiguous() for t in self.tensors)
        return KVCache(ts, length)


class OrtBackend:
    """ONNX Runtime session over an export directory (see :mod:`.onnx_export`).

    ``threads``: intra-op threads of this session (None = ONNX Runtime's default, all cores).
    ``providers``: execution providers (default CPU; pass e.g. ``["CUDAExecutionProvider",
    "CPUExecutionProvider"]`` where an onnxruntime-gpu build is installed).
    """

    name = "ort"

    def __init__(
        self,
        export_dir: str | Path,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        from .onnx_export import load_manifest

        self.path = Path(export_dir)
        self.manifest = load_manifest(self.path)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            str(self.path / self.manifest["model_file"]),
            so,
            providers=list(providers or ["CPUExecutionProvider"]),
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        m = self.manifest
        self.num_layers, self.kv_heads, self.head_dim = (
            m["num_layers"],
            m["num_kv_heads"],
            m["head_dim"],
        )
        self.vocab_size = int(m["vocab_size"])
        self.max_positions = m.get("max_positions")
        self.eos_token_ids = [int(i) for i in m.get("eos_token_ids", [])]
        self.gated = m.get("gate_input") is not None
        self._past_names = m["inputs"][3 : 3 + 2 * self.num_layers]

    def empty_cache(self, rows: int) -> KVCache:
        z = np.zeros((rows, self.kv_heads, 0, self.head_dim), np.float32)
        return KVCache((z,) * (2 * self.num_layers), 0)

    def forward(
        self, ids: np.ndarray, cache: KVCache, gate: np.ndarray | None
    ) -> tuple[np.ndarray, KVCache]:
        rows, seq = ids.shape
        past = cache.length
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((rows, past + seq), np.int64),
            "position_ids": np.broadcast_to(
                np.arange(past, past + seq, dtype=np.int64), (rows, seq)
            ).copy(),
        }
        feed.update(zip(self._past_names, cache.tensors, strict=True))
        if self.gated:
            feed["lora_gate"] = gate
        out = self.session.run(None, feed)
        return out[0], KVCache(tuple(out[1:]), past + seq)


class TorchBackend:
    """torch eager forward of a HF causal LM (+ optional adapter, merged or gated) with the
    same flat cache layout as :class:`OrtBackend`. Uses torch's global thread setting."""

    name = "torch"

    def __init__(self, kv_model: Any, device: str = "cpu"):
        import torch

        self._torch = torch
        self.kv = kv_model
        self.module = kv_model.module
        self.device = torch.device(device)
        self.tokenizer = kv_model.tokenizer
        self.num_layers, self.kv_heads, self.head_dim = (
            kv_model.num_layers,
            kv_model.kv_heads,
            kv_model.head_dim,
        )
        self.vocab_size = kv_model.vocab_size
        self.max_positions = kv_model.max_positions
        self.eos_token_ids = list(kv_model.eos_token_ids)
        self.gated = self.module.gated
        # a gated module holds the current gate while it runs: one forward at a time
        self._lock = threading.Lock() if self.gated else contextlib.nullcontext()

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        adapter: str | Path | None = None,
        lora_mode: str = "merge",
        device: str = "cpu",
    ) -> TorchBackend:
        from .onnx_export import load_kv_model

        return cls(load_kv_model(model_path, adapter, lora_mode, device=device), device)

    def empty_cache(self, rows: int) -> KVCache:
        z = self._torch.zeros((rows, self.kv_heads, 0, self.head_dim), device=self.device)
        return KVCache((z,) * (2 * self.num_layers), 0)

    def forward(
        self, ids: np.ndarray, cache: KVCache, gate: np.ndarray | None
    ) -> tuple[np.ndarray, KVCache]:
        torch = self._torch
        rows, seq = ids.shape
        past = cache.length
        x = torch.from_numpy(np.ascontiguousarray(ids)).to(self.device)
        args = [
            x,
            torch.ones((rows, past + seq), dtype=torch.long, device=self.device),
            (torch.arange(seq, device=self.device) + past)[None].expand(rows, seq),
            *cache.tensors,
        ]
        if self.gated:
            args.append(torch.from_numpy(np.asarray(gate, np.float32)).to(self.device))
        with self._lock, torch.no_grad():
            out = self.module(*args)
        return out[0].float().cpu().numpy(), KVCache(tuple(out[1:]), past + seq)


def load_backend(
    model: str | Path,
    *,
    adapter: str | Path | None = None,
    lora_mode: str = "merge",
    backend: str = "auto",
    export_dir: str | Path | None = None,
    threads: int | None = None,
    strict: bool = False,
    device: str = "cpu",
    exporter: str = "auto",
    providers: Sequence[str] | None = None,
):
    """A backend for ``model`` (a HF model directory, or an export directory for ORT).

    ``backend``: ``"ort"``, ``"torch"`` or ``"auto"`` (ORT when importable). When ORT is asked
    for but onnxruntime cannot be imported, the export fails, or the model uses a feature the
    export refuses (:class:`~edge_sdk.inference.ExportUnsupportedError`, e.g. an attention
    pattern it cannot reproduce exactly), this logs why and returns a torch backend, unless
    ``strict=True`` (then the error is raised). A HF model is exported on first use into
    ``export_dir`` (default ``~/.cache/cotune/onnx``), keyed by its config/weights/adapter
    hashes. ``threads``/``providers`` go to ONNX Runtime, ``device`` to torch.
    """
    from .onnx_export import MANIFEST_NAME, ensure_exported, ort_status

    if backend not in ("auto", "ort", "torch"):
        raise GenerationConfigError(f"unknown backend {backend!r}; use ort, torch or auto")
    path = Path(model)
    is_export = (path / MANIFEST_NAME).is_file()
    if backend in ("auto", "ort"):
        ok, why = ort_status()
        if ok:
            try:
                if is_export:
                    if adapter is not None:
                        raise BackendUnavailableError(
                            f"{path} is an ONNX export; export it again with the adapter instead "
                            "of passing --adapter"
                        )
                    return OrtBackend(path, threads, providers)
                out = ensure_exported(
                    path, export_dir, adapter=adapter, lora_mode=lora_mode, exporter=exporter
                )
                return OrtBackend(out, threads, providers)
            except BackendUnavailableError:
                raise
            except InferenceError as exc:
                if strict:
                    raise
                if isinstance(exc, ExportUnsupportedError):
                    why = f"the model is not exportable ({exc})"
                else:
                    why = f"ONNX export failed ({exc})"
        elif strict:
            raise BackendUnavailableError(why)
        log.warning("ONNX Runtime backend unavailable: %s; using the torch eager backend", why)
    if is_export:
        raise BackendUnavailableError(
            f"{path} is an ONNX export; the torch backend needs the Hugging Face model directory"
        )
    return TorchBackend.from_pretrained(path, adapter, lora_mode, device=device)


# --------------------------------------------------------------------------------------------
# one sequence on a backend


class Decoder:
    """One token sequence decoded step by step; logits come back as float32 [rows, ..., V].

    ``gates``: one LoRA gate per batch row for a gated backend (default ``[1.0]``, the tuned
    model); ``[1.0, 0.0]`` runs tuned and base as a batch of 2 on the same tokens.
    """

    def __init__(self, backend: Any, gates: Sequence[float] | None = None):
        if gates is not None and not backend.gated:
            raise GenerationConfigError("gates need a backend exported with lora_mode='gated'")
        if backend.gated and gates is None:
            gates = [1.0]
        self.backend = backend
        self.gates = None if gates is None else np.asarray(gates, dtype=np.float32)
        self.rows = 1 if gates is None else len(gates)
        self.tokens: list[int] = []
        self.forwards = 0
        self._cache = backend.empty_cache(self.rows)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens``; logits after each of them, [rows, len(tokens), V]."""
        if len(tokens) == 0:
            raise InferenceError("feed() needs at least one token")
        limit = getattr(self.backend, "max_positions", None)
        if limit is not None and self.length + len(tokens) > limit:
            raise GenerationConfigError(
                f"{self.length + len(tokens)} tokens exceed the model's {limit} positions; "
                "shorten the prompt or lower max_new_tokens"
            )
        ids = np.tile(np.asarray(tokens, dtype=np.int64)[None, :], (self.rows, 1))
        logits, self._cache = self.backend.forward(ids, self._cache, self.gates)
        self.tokens.extend(int(t) for t in tokens)
        self.forwards += 1
        return logits

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Start over with ``ids``; next-token logits [rows, V]."""
        self.reset()
        return self.feed(ids)[:, -1]

    def step(self, token: int) -> np.ndarray:
        """Append one token; next-token logits [rows, V]."""
        return self.feed([token])[:, -1]

    def rollback(self, length: int) -> None:
        """Forget everything after the first ``length`` tokens (a slice of the cache)."""
        self._cache = self._cache.truncate(length)
        del self.tokens[length:]

    def fork(self) -> Decoder:
        """An independent decoder at the same position (shares the immutable cache)."""
        other = Decoder.__new__(Decoder)
        other.backend, other.gates, other.rows = self.backend, self.gates, self.rows
        other.tokens, other.forwards, other._cache = list(self.tokens), 0, self._cache
        return other

    def reset(self) -> None:
        self.tokens = []
        self._cache = self.backend.empty_cache(self.rows)


# --------------------------------------------------------------------------------------------
# text: incremental detokenization, stop strings, streaming


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


class TextStream(Iterator[str]):
    """Iterator of text pieces from a token source; ``result`` is set once it is exhausted.

    Decoding is incremental over a window that starts a few tokens back (so word-start
    markers decode to spaces), and a piece is released only when the window no longer ends in
    an incomplete character. A tail that is a prefix of a stop string is held back until it
    is decided. Closing the stream early closes the token source (no further model calls).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        cfg: SamplingConfig,
        source: Iterator[int],
        eos_token_ids: Sequence[int],
        stats: Callable[[], dict[str, Any]] | None = None,
    ):
        self.tokenizer, self.cfg, self._source = tokenizer, cfg, source
        self._eos = set() if cfg.ignore_eos else set(eos_token_ids)
        self._stats = stats
        # decoding window: a few prompt tokens of context, then the generated ones;
        # [_prefix, _read) is already turned into text, [_read, end) not yet
        self._ids = [int(i) for i in prompt_ids[-4:]]
        self._prefix, self._read = 0, len(self._ids)
        self._held = self._decode(self._ids)  # text of [_prefix, _read)
        self._prompt_tokens = len(prompt_ids)
        self.tokens: list[int] = []
        self._text = ""  # decoded so far (stop strings not yet cut)
        self._emitted = 0
        self._scan = 0
        self.result: GenerationResult | None = None
        self._t0 = time.perf_counter()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while self.result is None:
            reason = self._advance()
            if reason is not None:
                return self._finish(reason)
            piece = self._release()
            if piece:
                return piece
        raise StopIteration

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _advance(self) -> str | None:
        """Pull one token; a finish reason when generation is over."""
        try:
            tok = int(next(self._source))
        except StopIteration:
            return "length"
        if tok in self._eos:
            self.tokens.append(tok)
            return "eos"
        self.tokens.append(tok)
        self._ids.append(tok)
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(self._held) and not new_text.endswith("\ufffd"):
            self._text += new_text[len(self._held) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._held = self._decode(self._ids[self._prefix : self._read])
        if self.cfg.stop and self._cut_at_stop():
            return "stop"
        if len(self.tokens) >= self.cfg.max_new_tokens:
            return "length"
        return None

    def _cut_at_stop(self) -> bool:
        longest = max(len(s) for s in self.cfg.stop)
        start = max(0, self._scan - longest + 1)
        hits = [i for i in (self._text.find(s, start) for s in self.cfg.stop) if i >= 0]
        self._scan = len(self._text)
        if not hits:
            return False
        self._text = self._text[: min(hits)]
        return True

    def _release(self) -> str:
        safe = len(self._text)
        for s in self.cfg.stop:  # hold back a tail that may still grow into a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if self._text.endswith(s[:n]):
                    safe = min(safe, len(self._text) - n)
                    break
        safe = max(safe, self._emitted)
        piece = self._text[self._emitted : safe]
        self._emitted = safe
        return piece

    def _finish(self, reason: str) -> str:
        self.close()
        if reason != "stop":  # flush bytes held back as an incomplete character
            rest = self._decode(self._ids[self._prefix :])
            if len(rest) > len(self._held):
                self._text += rest[len(self._held) :]
                if self.cfg.stop and self._cut_at_stop():
                    reason = "stop"
        piece = self._text[self._emitted :]
        self._emitted = len(self._text)
        seconds = time.perf_counter() - self._t0
        stats = {
            "new_tokens": len(self.tokens),
            "seconds": round(seconds, 6),
            "tokens_per_second": len(self.tokens) / seconds if seconds > 0 else 0.0,
        }
        if self._stats is not None:
            stats.update(self._stats())
        self.result = GenerationResult(
            self._text, list(self.tokens), reason, self._prompt_tokens, seconds, stats
        )
        return piece


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    else:
        ids = [int(i) for i in prompt]
    if not ids:  # an empty prompt starts from BOS
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise GenerationConfigError("empty prompt and the tokenizer has no BOS token")
        ids = [int(bos)]
    return ids


def merge_config(cfg: SamplingConfig | None, overrides: dict[str, Any]) -> SamplingConfig:
    try:
        return replace(cfg or SamplingConfig(), **overrides)
    except TypeError as exc:
        raise GenerationConfigError(str(exc)) from exc


# --------------------------------------------------------------------------------------------
# the generator


def run_to_end(stream: TextStream) -> GenerationResult:
    """Consume a stream and return its result (``generate`` of every generator)."""
    for _ in stream:
        pass
    assert stream.result is not None
    return stream.result


class Generator:
    """Text generation on one backend. ``gate`` selects tuned (1.0) or base (0.0) on a gated
    backend. :meth:`decoder` exposes the per-step logits API (prefill / step / rollback)."""

    def __init__(self, backend: Any, tokenizer: Any | None = None, gate: float | None = None):
        self.backend = backend
        self.tokenizer = tokenizer if tokenizer is not None else backend.tokenizer
        self.gate = gate
        self.eos_token_ids = list(backend.eos_token_ids)

    @classmethod
    def load(cls, model: str | Path, **kw: Any) -> Generator:
        """``Generator(load_backend(model, **kw))`` (see :func:`load_backend`)."""
        return cls(load_backend(model, **kw))

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def decoder(self) -> Decoder:
        return Decoder(self.backend, None if self.gate is None else [self.gate])

    def stream(
        self, prompt: str | Sequence[int], cfg: SamplingConfig | None = None, **overrides: Any
    ) -> TextStream:
        cfg = merge_config(cfg, overrides)
        ids = encode_prompt(self.tokenizer, prompt)
        dec = self.decoder()
        rng = np.random.default_rng(cfg.seed)

        def tokens() -> Iterator[int]:
            logits = dec.prefill(ids)[0]
            while True:
                tok = choose_token(logits, cfg, rng)
                yield tok
                logits = dec.step(tok)[0]

        return TextStream(
            self.tokenizer,
            ids,
            cfg,
            tokens(),
            self.eos_token_ids,
            stats=lambda: {"backend": self.backend.name, "forwards": dec.forwards},
        )

    def generate(
        self, prompt: str | Sequence[int], cfg: SamplingConfig | None = None, **overrides: Any
    ) -> GenerationResult:
        return run_to_end(self.stream(prompt, cfg, **overrides))
