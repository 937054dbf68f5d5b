"""``cotune llm serve --model PATH``: a local causal LM behind the OpenAI-compatible completions
API, with the vLLM extensions the black-box backend uses (``prompt_logprobs``,
``return_tokens_as_token_ids``, ``/tokenize``) and ``stream: true`` as server-sent events. It
exists so black-box mode is tested end to end without a GPU; in production put vLLM at the same
URL.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /tokenize``, ``GET /health``.

Guarded against abusive clients: every request is validated and its token budget checked
before any model work (:mod:`.schema`); admitted requests wait in a bounded queue and one
worker advances them round-robin, a prefill chunk or a token at a time, so a long request
cannot hold the model (:mod:`.engine`); the HTTP side is asyncio (uvicorn) with header, body,
keep-alive and request timeouts, and cancels a request whose client went away (:mod:`.server`).
"""

from .engine import CompletionModel, Job, Scheduler
from .schema import (
    APIError,
    CompletionRequest,
    RequestError,
    ServerLimits,
    parse_body,
    parse_completion,
)
from .server import CompletionsApp, LLMServer, llm_cli

__all__ = [
    "APIError",
    "CompletionModel",
    "CompletionRequest",
    "CompletionsApp",
    "Job",
    "LLMServer",
    "RequestError",
    "Scheduler",
    "ServerLimits",
    "llm_cli",
    "parse_body",
    "parse_completion",
]
