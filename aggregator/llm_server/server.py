"""The HTTP side: an ASGI application served by uvicorn (asyncio, no thread per connection),
with a header timeout uvicorn lacks, a body timeout, and server-sent events for
``stream: true``. Model work happens only in the scheduler's worker thread."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from .. import metrics as _metrics
from ..status_http import add_llm_metrics_args, start_llm_metrics
from .engine import CompletionModel, Job, Scheduler
from .schema import APIError, RequestError, ServerLimits, parse_body, parse_completion

log = logging.getLogger("cotune.llm_server")

__all__ = ["CompletionsApp", "LLMServer", "llm_cli"]


class _Disconnected(Exception):
    pass


def _guarded_h11(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request line and headers are not in
    ``header_timeout_s`` after it opens or after its previous response (slowloris)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _armed_for: Any = None

        def _arm(self) -> None:
            if self._header_timer is None:
                self._armed_for = self.cycle
                self._header_timer = self.loop.call_later(header_timeout_s, self._header_expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_expired(self) -> None:
            self._header_timer = None
            if self.cycle is self._armed_for and not self.transport.is_closing():
                log.debug(
                    "closing a connection whose request did not arrive in %.1f s", header_timeout_s
                )
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm()
            super().data_received(data)
            if self.cycle is not self._armed_for:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


class CompletionsApp:
    """ASGI app: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
    ``POST /tokenize``."""

    def __init__(
        self,
        model: CompletionModel,
        scheduler: Scheduler,
        limits: ServerLimits,
        api_keys: list[str] | None = None,
    ):
        self.model, self.scheduler, self.limits = model, scheduler, limits
        self.api_keys = [k for k in (api_keys or []) if k]
        self.max_logprobs = limits.max_logprobs if limits.max_logprobs is not None else model.vocab
        self.max_model_len = limits.max_model_len or model.max_len

    # -- plumbing ----------------------------------------------------------------------------------
    @staticmethod
    async def _send_json(
        send, status: int, obj: dict, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(obj).encode()
        hdrs = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
        ]
        hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        _metrics.llm_http(status)
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": data})

    def _client(self, scope: dict) -> str:
        """Who a budget belongs to: the API key when the server has keys, else the address."""
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if not self.api_keys:
            return (scope.get("client") or ("?", 0))[0]
        ok = False
        for key in self.api_keys:  # no early exit: the time does not tell which key matched
            ok |= secrets.compare_digest(
                auth.encode("latin-1"), f"Bearer {key}".encode("latin-1", "replace")
            )
        if not ok:
            raise APIError(401, "missing or wrong API key", "authentication_error")
        return "key:" + hashlib.sha256(auth.encode("latin-1")).hexdigest()[:16]

    async def _body(self, scope: dict, receive) -> bytes:
        headers = dict(scope["headers"])
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                raise RequestError("bad Content-Length") from None
            if n > self.limits.max_body_bytes:
                raise APIError(
                    413,
                    f"request body over {self.limits.max_body_bytes} bytes",
                    headers={"Connection": "close"},
                )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        parts, size = [], 0
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise APIError(
                    408,
                    f"request body not received within {self.limits.body_timeout_s:g} s",
                    "timeout_error",
                    headers={"Connection": "close"},
                ) from None
            if msg["type"] == "http.disconnect":
                raise _Disconnected
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise APIError(
                    413,
                    f"request body over {self.limits.max_body_bytes} bytes",
                    headers={"Connection": "close"},
                )
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)

    # -- ASGI --------------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, receive, send)
        except APIError as exc:
            await self._send_json(send, exc.status, exc.body(), exc.headers)
        except _Disconnected:
            pass

    async def _route(self, scope, receive, send) -> None:
        method, path = scope["method"], scope["path"]
        routes = {
            ("GET", "/health"),
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("POST", "/tokenize"),
        }
        if (method, path) not in routes:
            if any(p == path for _, p in routes):
                raise APIError(405, f"method {method} not allowed on {path}")
            raise APIError(404, f"no route {path}", "not_found_error")
        if path == "/health":
            return await self._send_json(send, 200, {"status": "ok", **self.scheduler.load()})
        client = self._client(scope)
        if path == "/v1/models":
            return await self._send_json(
                send, 200, self.model.models(self.max_logprobs, self.max_model_len)
            )
        body = parse_body(await self._body(scope, receive), self.limits)
        if path == "/tokenize":
            return await self._send_json(send, 200, self._tokenize(body))
        await self._complete(body, client, receive, send)

    def _tokenize(self, body: dict) -> dict:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string", "prompt")
        if len(prompt) > 64 * self.limits.max_prompt_tokens:
            raise RequestError(f"prompt of {len(prompt)} characters is too long", "prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise RequestError("add_special_tokens must be a boolean", "add_special_tokens")
        ids = self.model.encode(prompt, add_special_tokens=special)
        return {
            "tokens": ids,
            "count": len(ids),
            "max_model_len": self.max_model_len or self.limits.max_prompt_tokens,
        }

    async def _complete(self, body: dict, client: str, receive, send) -> None:
        req = parse_completion(
            body,
            self.model.encode,
            self.model.vocab,
            self.limits,
            self.model.name,
            self.max_model_len,
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, payload: Any) -> None:  # worker thread -> this request's queue
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the loop is gone (server stopped)
                pass

        job = Job(req, client, emit, self.limits.request_timeout_s)
        self.scheduler.submit(job)  # 429 when the queue or the client's budget is full

        async def watch() -> None:  # the body is read: the next message is the disconnect
            while (await receive())["type"] != "http.disconnect":
                pass
            job.cancel("client disconnected")

        watcher = asyncio.create_task(watch())
        try:
            if req.stream:
                await self._stream(job, events, send)
                return
            kind, payload = await events.get()
            if kind == "error":
                raise payload
            await self._send_json(
                send,
                200,
                {
                    "id": job.id,
                    "object": "text_completion",
                    "created": job.created,
                    "model": self.model.name,
                    **payload,
                },
            )
        finally:
            watcher.cancel()
            job.cancel("answered")

    async def _stream(self, job: Job, events: asyncio.Queue, send) -> None:
        """Server-sent events as vLLM sends them: ``data: {chunk}`` per token, an optional usage
        chunk (``stream_options.include_usage``), then ``data: [DONE]``."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        head = {
            "id": job.id,
            "object": "text_completion",
            "created": job.created,
            "model": self.model.name,
        }

        async def event(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {data}\n\n".encode(),
                    "more_body": True,
                }
            )

        while True:
            kind, payload = await events.get()
            if kind == "chunk":
                await event({**head, "choices": [payload], "usage": None})
                continue
            if kind == "error":
                await event(payload.body())
            elif job.req.include_usage:
                await event({**head, "choices": [], "usage": payload["usage"]})
            await event("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return


class LLMServer:
    """The model behind uvicorn, in a background thread (:meth:`start`, tests, the demo) or the
    foreground (:meth:`serve_forever`, the CLI)."""

    def __init__(
        self,
        model_path: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | list[str] | None = None,
        quant: str = "fp32",
        max_logprobs: int | None = None,
        name: str | None = None,
        limits: ServerLimits | None = None,
    ):
        import uvicorn

        limits = limits or ServerLimits()
        if max_logprobs is not None:
            limits = dataclasses.replace(limits, max_logprobs=max_logprobs)
        self.limits = limits
        self.model = CompletionModel(model_path, name=name, quant=quant)
        self.scheduler = Scheduler(self.model, limits)
        keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
        self.app = CompletionsApp(self.model, self.scheduler, limits, keys)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (else Nagle's algorithm
        # and delayed ACKs add 40 ms to every answer written in two parts)
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            http=_guarded_h11(limits.header_timeout_s),
            timeout_keep_alive=limits.keep_alive_s,
            limit_concurrency=limits.max_connections or None,
            h11_max_incomplete_event_size=32768,
            timeout_graceful_shutdown=2,
            server_header=False,
            backlog=256,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LLMServer:
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="llm-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the LLM server did not start")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.sock])  # handles SIGINT/SIGTERM in the main thread
        finally:
            self.scheduler.stop()
            self.sock.close()

    def stop(self) -> None:
        self.scheduler.stop()
        self.server.should_exit = True
        if self._thread:
            self._thread.join(10)
        self.sock.close()

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_LIMIT_HELP = {
    "max_request_tokens": "generated tokens one request may ask for (prompts x n x max_tokens)",
    "client_tokens_per_window": "prompt + requested tokens per client per --client-window-s "
    "(0: no limit)",
    "max_queue": "requests admitted and unfinished in all; more get HTTP 429",
    "max_active": "requests generating at once, interleaved token by token",
    "request_timeout_s": "seconds from admission to the last token (then HTTP 504 or an "
    "error event)",
}


def llm_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="cotune llm",
        description="serve a local model through the "
        "OpenAI-compatible completions API (what vLLM serves)",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve --model PATH")
    s.add_argument("--model", required=True, help="local Hugging Face model directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", default=None, help="model name in the API (default: directory name)")
    s.add_argument("--quant", default="fp32", choices=["fp32", "bf16", "fp16", "nf4", "int8"])
    s.add_argument(
        "--api-key-env",
        default=None,
        help="require 'Authorization: Bearer KEY', KEY one of the comma-separated keys in this "
        "variable; each key has its own budget",
    )
    s.add_argument(
        "--max-logprobs",
        type=int,
        default=None,
        help="cap on logprobs per position (default: vocabulary)",
    )
    for f in dataclasses.fields(ServerLimits):
        if f.name == "max_logprobs":
            continue
        s.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f"{_LIMIT_HELP.get(f.name, 'limit (see the README)')} (default {f.default})",
        )
    add_llm_metrics_args(s)  # --metrics-port, --metrics-host, --metrics-token-env
    args = ap.parse_args(argv)
    keys = None
    if args.api_key_env:
        keys = [k.strip() for k in os.environ.get(args.api_key_env, "").split(",") if k.strip()]
        if not keys:
            ap.error(f"{args.api_key_env} is not set")
    try:
        limits = ServerLimits(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)}
        )
    except ValueError as exc:
        ap.error(str(exc))
    srv = LLMServer(
        args.model,
        args.host,
        args.port,
        api_key=keys,
        quant=args.quant,
        name=args.name,
        limits=limits,
    )
    print(
        f"serving {srv.model.name} ({srv.model.vocab} tokens) at {srv.url}/v1/completions",
        flush=True,
    )
    start_llm_metrics(args, srv)  # /metrics on its own port, when --metrics-port is given
    srv.serve_forever()
    return 0
