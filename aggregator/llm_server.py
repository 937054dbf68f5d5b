"""``cotune llm serve --model PATH``: a local causal LM behind the OpenAI-compatible completions
API, with the vLLM extensions the black-box backend uses (``prompt_logprobs``,
``return_tokens_as_token_ids``, ``/tokenize``). It exists so black-box mode is tested end to end
without a GPU; in production put vLLM at the same URL.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /tokenize``, ``GET /health``.
One model, requests served one at a time (a lock around the forward pass), threads for I/O.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from algorithms.core.modeling import load_causal_lm

log = logging.getLogger("cotune.llm_server")

MAX_BODY = 16 * 2**20


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and an OpenAI-style error object."""


class CompletionModel:
    def __init__(self, path: str, name: str | None = None, quant: str = "fp32", max_logprobs: int | None = None,
                 max_prompt_tokens: int = 4096):
        self.model, self.tok, self.report = load_causal_lm(path, quant=quant)
        self.model.eval()
        self.name = name or path.rstrip("/").rsplit("/", 1)[-1]
        self.vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_logprobs = int(max_logprobs or self.vocab)
        self.max_prompt_tokens = max_prompt_tokens
        self.lock = threading.Lock()

    # -- helpers ----------------------------------------------------------------------------
    def _prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("prompt must be a string, a list of strings, a list of token ids or a list of lists")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = self.tok(p, add_special_tokens=False)["input_ids"]
            elif isinstance(p, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
                ids = list(p)
            else:
                raise RequestError("each prompt must be a string or a list of token ids")
            if not ids:
                raise RequestError("empty prompt")
            if any(i < 0 or i >= self.vocab for i in ids):
                raise RequestError(f"token ids must be in [0, {self.vocab})")
            if len(ids) > self.max_prompt_tokens:
                raise RequestError(f"prompt of {len(ids)} tokens exceeds {self.max_prompt_tokens}")
            out.append(ids)
        return out

    def _key(self, tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else self.tok.decode([tid])

    def _top(self, lp: torch.Tensor, k: int, as_ids: bool) -> dict:
        vals, ids = torch.topk(lp, k)
        return {self._key(int(i), as_ids): float(v) for v, i in zip(vals.tolist(), ids.tolist(), strict=True)}

    # -- the API ----------------------------------------------------------------------------
    def complete(self, body: dict) -> dict:
        prompts = self._prompts(body.get("prompt"))
        max_tokens = int(body.get("max_tokens", 16))
        if not 0 <= max_tokens <= 4096:
            raise RequestError("max_tokens must be in [0, 4096]")
        k = body.get("logprobs")
        pk = body.get("prompt_logprobs")
        for name, val in (("logprobs", k), ("prompt_logprobs", pk)):
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or not 0 <= val <= self.max_logprobs):
                raise RequestError(f"{name} must be an integer in [0, {self.max_logprobs}]")
        if int(body.get("n", 1)) != 1:
            raise RequestError("only n=1 is supported")
        temperature = float(body.get("temperature", 1.0))
        top_p = float(body.get("top_p", 1.0))
        if not (temperature >= 0 and math.isfinite(temperature) and 0 < top_p <= 1):
            raise RequestError("temperature must be >= 0 and top_p in (0, 1]")
        as_ids = bool(body.get("return_tokens_as_token_ids", False))
        echo = bool(body.get("echo", False))
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        gen = torch.Generator().manual_seed(int(body.get("seed", 0) or 0))
        choices = []
        n_prompt = n_gen = 0
        with self.lock, torch.no_grad():
            for index, ids in enumerate(prompts):
                choice = self._one(ids, max_tokens, k, pk, temperature, top_p, as_ids, echo, stop, gen)
                choice["index"] = index
                choices.append(choice)
                n_prompt += len(ids)
                n_gen += choice.pop("_generated")
        return {"id": f"cmpl-{secrets.token_hex(8)}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}

    def _one(self, ids, max_tokens, k, pk, temperature, top_p, as_ids, echo, stop, gen) -> dict:
        x = torch.tensor([ids])
        out = self.model(input_ids=x, use_cache=True)
        lp = torch.log_softmax(out.logits[0].float(), dim=-1)  # [T, V]
        past = out.past_key_values
        prompt_logprobs = None
        if pk is not None:
            prompt_logprobs = [None]
            for t in range(1, len(ids)):
                row = self._top(lp[t - 1], pk, as_ids) if pk else {}
                row[self._key(ids[t], as_ids)] = float(lp[t - 1, ids[t]])  # vLLM also includes the actual token
                prompt_logprobs.append(row)
        tokens, token_lps, tops = [], [], []
        if echo:
            for t, tid in enumerate(ids):
                tokens.append(self._key(tid, as_ids))
                token_lps.append(None if t == 0 else float(lp[t - 1, tid]))
                tops.append(None if t == 0 or not k else self._top(lp[t - 1], k, as_ids))
        cur = lp[-1]
        text_ids: list[int] = []
        finish = "length"
        for _ in range(max_tokens):
            if temperature == 0:
                nxt = int(torch.argmax(cur))
            else:
                probs = torch.softmax(cur / temperature, dim=-1)
                if top_p < 1.0:
                    sp, si = torch.sort(probs, descending=True)
                    keep = torch.cumsum(sp, 0) - sp < top_p
                    probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
                nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
            tokens.append(self._key(nxt, as_ids))
            token_lps.append(float(cur[nxt]))
            tops.append(self._top(cur, k, as_ids) if k else None)
            text_ids.append(nxt)
            if nxt == self.tok.eos_token_id:
                finish = "stop"
                break
            text = self.tok.decode(text_ids)
            if any(s and s in text for s in stop):
                finish = "stop"
                break
            out = self.model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            cur = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        text = self.tok.decode(text_ids)
        for s in stop:
            if s and s in text:
                text = text[: text.index(s)]
        if echo:
            text = self.tok.decode(ids) + text
        logprobs = None
        if k is not None:
            logprobs = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": None}
        return {"text": text, "logprobs": logprobs, "finish_reason": finish, "prompt_logprobs": prompt_logprobs,
                "_generated": len(text_ids)}

    def tokenize(self, body: dict) -> dict:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string")
        ids = self.tok(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]
        return {"tokens": list(ids), "count": len(ids), "max_model_len": self.max_prompt_tokens}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "cotune",
                                            "max_logprobs": self.max_logprobs, "vocab_size": self.vocab}]}


def make_handler(model: CompletionModel, api_key: str | None):
    class Handler(BaseHTTPRequestHandler):
        server_version = "cotune-llm/1"

        def log_message(self, fmt, *args):  # route to logging, not stderr
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, msg: str, kind: str = "invalid_request_error") -> None:
            self._send(code, {"error": {"message": msg, "type": kind, "code": code}})

        def _authorised(self) -> bool:
            if not api_key:
                return True
            if secrets.compare_digest(self.headers.get("Authorization", ""), f"Bearer {api_key}"):
                return True
            self._error(401, "missing or wrong API key", "authentication_error")
            return False

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                return self._send(200, {"status": "ok"})
            if not self._authorised():
                return
            if self.path == "/v1/models":
                return self._send(200, model.models())
            self._error(404, f"no route {self.path}")

        def do_POST(self):  # noqa: N802
            if not self._authorised():
                return
            routes = {"/v1/completions": model.complete, "/tokenize": model.tokenize}
            fn = routes.get(self.path)
            if fn is None:
                return self._error(404, f"no route {self.path}")
            try:
                n = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                return self._error(400, "bad Content-Length")
            if n <= 0 or n > MAX_BODY:
                return self._error(413 if n > MAX_BODY else 400, f"body must be 1..{MAX_BODY} bytes")
            try:
                body = json.loads(self.rfile.read(n))
                if not isinstance(body, dict):
                    raise RequestError("the body must be a JSON object")
                return self._send(200, fn(body))
            except (json.JSONDecodeError, RequestError, TypeError, ValueError) as exc:
                return self._error(400, str(exc))
            except Exception as exc:  # the server keeps serving; the client gets a 500
                log.exception("completion failed")
                return self._error(500, f"{type(exc).__name__}: {exc}", "server_error")

    return Handler


class LLMServer:
    """The HTTP server in a background thread (tests, demo) or the foreground (CLI)."""

    def __init__(self, model_path: str, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None,
                 quant: str = "fp32", max_logprobs: int | None = None, name: str | None = None):
        self.model = CompletionModel(model_path, name=name, quant=quant, max_logprobs=max_logprobs)
        self.httpd = ThreadingHTTPServer((host, port), make_handler(self.model, api_key))
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LLMServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="llm-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def llm_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="cotune llm", description="serve a local model through the "
                                 "OpenAI-compatible completions API (what vLLM serves)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve --model PATH")
    s.add_argument("--model", required=True, help="local Hugging Face model directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", default=None, help="model name in the API (default: directory name)")
    s.add_argument("--quant", default="fp32", choices=["fp32", "bf16", "fp16", "nf4", "int8"])
    s.add_argument("--max-logprobs", type=int, default=None, help="cap on logprobs per position (default: vocabulary)")
    s.add_argument("--api-key-env", default=None, help="require 'Authorization: Bearer $VAR'")
    args = ap.parse_args(argv)
    import os

    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        ap.error(f"{args.api_key_env} is not set")
    srv = LLMServer(args.model, args.host, args.port, api_key=key, quant=args.quant,
                    max_logprobs=args.max_logprobs, name=args.name)
    print(f"serving {srv.model.name} ({srv.model.vocab} tokens) at {srv.url}/v1/completions", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()
    return 0
