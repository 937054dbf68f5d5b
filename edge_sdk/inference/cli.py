"""``cotune infer ...``: generate text on the device, plain or proxy-tuned.

    cotune infer --model models/slm --prompt "Question: ..." --stream
    cotune infer --model models/slm --adapter adapters/global --large models/llm \\
                 --alpha 1.0 --speculative 4 --prompt "Question: ..."

Without ``--large`` the small model (``--model``, with ``--adapter`` merged) generates alone.
With ``--large`` the output is proxy-tuned: ``large + alpha * (tuned - base)``, where the tuned
model is ``--model`` (+ ``--adapter``) and the base is ``--base`` (default: ``--model`` itself
when an adapter is given; then tuned and base run as one batch of 2). The text goes to stdout
(piece by piece with ``--stream``), one stats line to stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import InferenceError

__all__ = ["infer_cli"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cotune infer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="tuned small model dir (or a base + --adapter)")
    p.add_argument("--adapter", default=None, help="peft LoRA adapter dir applied to --model")
    p.add_argument("--base", default=None, help="base (anti-expert) small model for proxy-tuning")
    p.add_argument("--large", default=None, help="local large model dir: turns on proxy-tuning")
    p.add_argument("--large-url", default=None,
                   help="an OpenAI-compatible completions endpoint (vLLM, `cotune llm serve`) as the large model")
    p.add_argument("--large-wire", default=None, metavar="PARTY_CONFIG",
                   help="ask the aggregator (serve_logits) over the encrypted wire, as this provisioned party")
    p.add_argument("--large-top-k", type=int, default=20,
                   help="log-probabilities per position from --large-url / --large-wire")
    p.add_argument("--large-api-key-env", default=None, help="environment variable holding the endpoint's key")
    p.add_argument("--alpha", type=float, default=1.0, help="proxy strength (default 1.0)")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--backend",
        choices=["ort", "torch", "auto"],
        default="auto",
        help="small-model backend (auto: ONNX Runtime when installed)",
    )
    p.add_argument(
        "--speculative",
        type=int,
        default=0,
        metavar="K",
        help="proxy only: draft K tokens per large-model request (0 = off)",
    )
    p.add_argument(
        "--export-dir",
        default=None,
        help="cache of exported ONNX graphs (default ~/.cache/cotune/onnx)",
    )
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    return p


def _stats_line(result: Any) -> str:
    s = dict(result.stats)
    parts = [
        f"backend={s.get('small_backend', s.get('backend', '?'))}",
        f"mode={s.get('mode', 'plain')!s}".replace(" ", "_"),
        f"prompt_tokens={result.prompt_tokens}",
        f"new_tokens={result.new_tokens}",
        f"seconds={result.seconds:.3f}",
        f"tokens_per_s={s.get('tokens_per_second', 0.0):.1f}",
        f"finish={result.finish_reason}",
    ]
    if "large_requests" in s:
        parts += [
            f"large_requests={s['large_requests']}",
            f"requests_per_token={s.get('requests_per_token', 0.0):.3f}",
        ]
    if s.get("drafted"):
        parts.append(f"acceptance_rate={s['acceptance_rate']:.3f}")
    return "stats: " + " ".join(parts)


def infer_cli(argv: list[str] | None = None) -> int:
    """Entry point for ``cotune infer``; returns the process exit code."""
    try:
        ns = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    from algorithms.core.errors import ModelError

    from .generate import Generator, SamplingConfig
    from .proxy import ProxyGenerator

    try:
        prompt = sys.stdin.read() if ns.prompt == "-" else ns.prompt
        cfg = SamplingConfig(
            max_new_tokens=ns.max_new_tokens,
            temperature=ns.temperature,
            top_k=ns.top_k,
            top_p=ns.top_p,
            seed=ns.seed,
            stop=tuple(ns.stop),
        )
        opts = {"backend": ns.backend, "export_dir": ns.export_dir, "threads": ns.threads}
        if ns.large_url is not None:
            if ns.large is not None:
                raise InferenceError("give --large or --large-url, not both")
            import os

            from transformers import AutoTokenizer

            from .remote import RemoteLargeModel

            tok = AutoTokenizer.from_pretrained(ns.model)
            key = os.environ.get(ns.large_api_key_env) if ns.large_api_key_env else None
            ns.large = RemoteLargeModel(ns.large_url, len(tok), top_k=ns.large_top_k, api_key=key, tokenizer=tok)
        endpoint = None
        if ns.large_wire is not None:
            if ns.large is not None:
                raise InferenceError("give one of --large, --large-url, --large-wire")
            from transformers import AutoTokenizer

            from bridge.endpoint import load_endpoint

            from .wire import WireLargeModel

            tok = AutoTokenizer.from_pretrained(ns.model)
            endpoint = load_endpoint(ns.large_wire).start()
            ns.large = WireLargeModel(endpoint, endpoint.directory.aggregator(), len(tok), top_k=ns.large_top_k,
                                      tokenizer=tok)
        if ns.large is None:
            if ns.base is not None or ns.speculative:
                raise InferenceError("--base and --speculative need --large (proxy-tuning)")
            gen: Any = Generator.load(ns.model, adapter=ns.adapter, **opts)
        else:
            gen = ProxyGenerator.load(
                ns.large,
                ns.model,
                base=ns.base,
                adapter=ns.adapter,
                alpha=ns.alpha,
                speculative=ns.speculative,
                **opts,
            )
        stream = gen.stream(prompt, cfg)
        for piece in stream:
            if ns.stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        result = stream.result
        if not ns.stream:
            sys.stdout.write(result.text)
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(_stats_line(result), file=sys.stderr)
        if hasattr(gen, "close"):
            gen.close()
        if endpoint is not None:
            endpoint.close()
        return 0
    except (InferenceError, ModelError, OSError) as exc:
        print(f"cotune infer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(infer_cli(sys.argv[1:]))
