"""Request limits, the guarded JSON parser and the validation of a completions request.

Everything here runs before any model work: a body is measured (size, nesting depth) before
``json.loads`` sees it, numbers must be finite and in range, and the tokens a request asks for
are counted against :class:`ServerLimits`. Every refusal is an :class:`APIError` that the HTTP
layer turns into an OpenAI-style error object with a 4xx status.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "APIError",
    "CompletionRequest",
    "RequestError",
    "ServerLimits",
    "parse_body",
    "parse_completion",
]


class APIError(Exception):
    """An HTTP error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status,
            }
        }


class RequestError(APIError, ValueError):
    """A bad request: HTTP 400."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(400, message, "invalid_request_error", param)


@dataclass
class ServerLimits:
    """What one request, one client and the whole server may ask for. Defaults suit a
    development server; ``cotune llm serve --help`` lists the flags that set them."""

    max_body_bytes: int = 4 * 2**20  # request body
    max_json_depth: int = 16  # nesting of arrays/objects (a completions body needs 4)
    max_prompts: int = 64  # prompts in one request
    max_prompt_tokens: int = 4096  # tokens in one prompt
    max_tokens: int = 2048  # max_tokens of one completion
    max_model_len: int = (
        0  # prompt + completion tokens (0: the model's position limit, if it has one)
    )
    max_n: int = 8  # completions per prompt
    max_request_tokens: int = 8192  # generated tokens asked for: prompts x n x max_tokens
    max_logprobs: int | None = None  # logprobs / prompt_logprobs (None: the vocabulary)
    max_logprob_entries: int = 4 * 2**20  # positions x (k + 1) over the request, bounds the answer
    max_stop: int = 16  # stop strings, each at most 256 characters
    client_tokens_per_window: int = 2_000_000  # prompt + requested tokens per client (0: no limit)
    client_window_s: float = 60.0
    max_client_jobs: int = 8  # admitted, unfinished requests per client
    max_queue: int = 32  # admitted, unfinished requests in all (then HTTP 429)
    max_active: int = 8  # requests generating concurrently (round-robin, one step each)
    prefill_chunk: int = 512  # prompt tokens per forward pass: a long prompt yields between chunks
    request_timeout_s: float = 300.0  # admission to the last token
    header_timeout_s: float = 10.0  # until the request line and headers are in
    body_timeout_s: float = 30.0  # until the body is in
    keep_alive_s: float = 5.0  # idle keep-alive connection
    max_connections: int = 256  # open connections (then HTTP 503)

    def __post_init__(self) -> None:
        for name, val in self.__dict__.items():
            if val is not None and (
                not isinstance(val, (int, float)) or isinstance(val, bool) or val < 0
            ):
                raise ValueError(f"limit {name} must be a number >= 0, got {val!r}")
        if self.max_active < 1 or self.max_queue < 1 or self.prefill_chunk < 1:
            raise ValueError("max_active, max_queue and prefill_chunk must be >= 1")


# -- JSON with size and depth limits ---------------------------------------------------------------
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def json_depth(raw: bytes) -> int:
    """Maximum nesting of ``[``/``{`` outside strings, in C-speed passes (regex + numpy)."""
    bare = _STRING.sub(b"", raw)
    if not bare:
        return 0
    steps = _OPEN[np.frombuffer(bare, np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def _bad_constant(name: str) -> Any:
    raise RequestError(f"{name} is not valid JSON (numbers must be finite)")


def _float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise RequestError(f"number {text[:40]} is out of range (numbers must be finite)")
    return v


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 19:
        raise RequestError(f"integer {text[:40]}... is out of range")
    return int(text)


def parse_body(raw: bytes, limits: ServerLimits) -> dict:
    """``raw`` -> a JSON object, refusing oversize, too-deep and non-finite input cheaply."""
    if len(raw) > limits.max_body_bytes:
        raise APIError(413, f"request body over {limits.max_body_bytes} bytes")
    if not raw.strip():
        raise RequestError("empty request body: a JSON object is expected")
    depth = json_depth(raw)
    if depth > limits.max_json_depth:
        raise RequestError(f"JSON nested {depth} deep, more than {limits.max_json_depth}")
    try:
        body = json.loads(raw, parse_float=_float, parse_int=_int, parse_constant=_bad_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RequestError(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


# -- field validation ------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_field(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v) or not lo <= v <= hi:
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {v!r:.40}", name)
    return v


def _num_field(
    body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False
) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise RequestError(f"{name} must be a finite number, got {v!r:.40}", name)
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise RequestError(
            f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", name
        )
    return float(v)


def _bool_field(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"{name} must be a boolean", name)
    return v


@dataclass
class CompletionRequest:
    """A validated ``POST /v1/completions`` body; ``prompts`` are token ids."""

    prompts: list[list[int]]
    max_tokens: int = 16
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    echo: bool = False
    as_ids: bool = False
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts) * self.n

    @property
    def requested_tokens(self) -> int:
        """Generated tokens asked for (the expensive part): prompts x n x max_tokens."""
        return len(self.prompts) * self.n * self.max_tokens


# Known OpenAI/vLLM fields this server does not implement: refused when set, never ignored.
_UNSUPPORTED = {
    "suffix": "",
    "best_of": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "repetition_penalty": 1,
    "min_tokens": 0,
    "use_beam_search": False,
    "guided_json": None,
    "response_format": None,
    "tools": None,
}


def parse_completion(
    body: dict, tokenize, vocab: int, limits: ServerLimits, model_name: str, max_model_len: int = 0
) -> CompletionRequest:
    """Validate ``body`` field by field (``tokenize(str) -> list[int]``) and check the token
    budget of the request; raises :class:`APIError`. ``max_model_len``: the context length
    (0: unbounded)."""
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(
            404, f"the model `{str(model)[:100]}` does not exist", "not_found_error", "model"
        )
    for name, neutral in _UNSUPPORTED.items():
        if name in body and body[name] is not None and body[name] != neutral:
            raise RequestError(f"{name} is not supported by this server", name)
    max_logprobs = limits.max_logprobs if limits.max_logprobs is not None else vocab
    req = CompletionRequest(
        prompts=[],
        max_tokens=_int_field(body, "max_tokens", 16, 1, limits.max_tokens),
        n=_int_field(body, "n", 1, 1, limits.max_n),
        temperature=_num_field(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_num_field(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        logprobs=_int_field(body, "logprobs", None, 0, max_logprobs),
        prompt_logprobs=_int_field(body, "prompt_logprobs", None, 0, max_logprobs),
        echo=_bool_field(body, "echo"),
        as_ids=_bool_field(body, "return_tokens_as_token_ids"),
        seed=_int_field(body, "seed", 0, -(2**63), 2**63 - 1),
        stream=_bool_field(body, "stream"),
        ignore_eos=_bool_field(body, "ignore_eos"),
    )
    opts = body.get("stream_options")
    if opts is not None:
        if not req.stream:
            raise RequestError("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(opts, dict):
            raise RequestError("stream_options must be an object", "stream_options")
        req.include_usage = _bool_field(opts, "include_usage")
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stop, list)
            or len(stop) > limits.max_stop
            or not all(isinstance(s, str) and len(s) <= 256 for s in stop)
        ):
            raise RequestError(
                f"stop must be a string or a list of at most {limits.max_stop} strings "
                "of at most 256 characters",
                "stop",
            )
        req.stop = [s for s in stop if s]
    req.prompts = _prompts(body.get("prompt"), tokenize, vocab, limits)
    if req.requested_tokens > limits.max_request_tokens:
        raise RequestError(
            f"the request asks for {len(req.prompts)} prompts x n={req.n} x max_tokens="
            f"{req.max_tokens} = {req.requested_tokens} tokens, more than "
            f"{limits.max_request_tokens}",
            "max_tokens",
        )
    longest = max(len(p) for p in req.prompts)
    if max_model_len and longest + req.max_tokens > max_model_len:
        raise RequestError(
            f"this model's maximum context length is {max_model_len} tokens, but "
            f"{longest + req.max_tokens} were requested ({longest} in the prompt, "
            f"{req.max_tokens} for the completion)",
            "max_tokens",
        )
    entries = 0
    if req.prompt_logprobs is not None:
        entries += req.prompt_tokens * (req.prompt_logprobs + 1)
    if req.logprobs is not None:
        entries += (req.requested_tokens + (req.prompt_tokens if req.echo else 0)) * (
            req.logprobs + 1
        )
    if entries > limits.max_logprob_entries:
        raise RequestError(
            f"the answer would hold {entries} log-probabilities, more than "
            f"{limits.max_logprob_entries}: ask for fewer per position or split the request",
            "logprobs",
        )
    return req


def _prompts(prompt: Any, tokenize, vocab: int, limits: ServerLimits) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(
            "prompt must be a string, a list of strings, a list of token ids or a list of lists",
            "prompt",
        )
    if all(_is_int(x) for x in prompt):
        prompt = [prompt]
    if len(prompt) > limits.max_prompts:
        raise RequestError(
            f"{len(prompt)} prompts in one request, more than {limits.max_prompts}", "prompt"
        )
    out = []
    for p in prompt:
        if isinstance(p, str):
            if len(p) > 64 * limits.max_prompt_tokens:  # no tokenizer run on a huge string
                raise RequestError(f"prompt of {len(p)} characters is too long", "prompt")
            ids = list(tokenize(p))
        elif isinstance(p, list) and all(_is_int(x) for x in p):
            ids = list(p)
        else:
            raise RequestError("each prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise RequestError("empty prompt", "prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise RequestError(
                f"prompt of {len(ids)} tokens exceeds {limits.max_prompt_tokens}", "prompt"
            )
        if any(i < 0 or i >= vocab for i in ids):
            raise RequestError(f"token ids must be in [0, {vocab})", "prompt")
        out.append(ids)
    return out
