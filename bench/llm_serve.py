"""`cotune llm serve` under load: small requests per second and their p50/p99 latency, on an
idle server and while one abusive request (32 prompts x 250 new tokens) runs.

The server runs in its own process (one torch thread) with a tiny Llama (hidden 96, 3 layers,
256 positions); ``--clients`` threads send small completions (8-token prompt, 4 new tokens,
greedy) over keep-alive connections. ``--server-module FILE`` serves from another
implementation of ``LLMServer`` instead (e.g. the previous stdlib server, taken from git), so
the two are measured the same way.

Last line: ``BENCH llm_serve {"idle": {...}, "abuse": {...}, "refused_ms": ..}``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVE = """
import importlib.util, sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
if {module!r}:
    spec = importlib.util.spec_from_file_location("baseline_llm_server", {module!r})
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
else:
    import aggregator.llm_server as mod
srv = mod.LLMServer({model!r}, name="tiny")
srv.start()
print(srv.port, flush=True)
sys.stdin.read()
"""

SMALL = {"model": "tiny", "prompt": [5, 6, 7, 8, 9, 10, 11, 12], "max_tokens": 4, "temperature": 0}
ABUSE = {
    "model": "tiny",
    "prompt": [[5, 6, 7]] * 32,
    "max_tokens": 250,
    "temperature": 0,
    "ignore_eos": True,
}


def request(conn: http.client.HTTPConnection, body: dict) -> int:
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def load(port: int, clients: int, seconds: float) -> dict:
    lat: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            code = request(conn, SMALL)
            with lock:
                lat.append(time.perf_counter() - t0)
                codes[code] = codes.get(code, 0) + 1
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else lat * 99
    return {
        "requests": len(lat),
        "wall_s": round(wall, 2),
        "rps": round(len(lat) / wall, 1),
        "p50_ms": round(q[49] * 1e3, 1),
        "p99_ms": round(q[98] * 1e3, 1),
        "max_ms": round(lat[-1] * 1e3, 1),
        "codes": codes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s phases instead of 10 s")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument(
        "--server-module", default="", help="a file defining LLMServer to measure instead"
    )
    args = ap.parse_args()
    seconds = 3.0 if args.quick else 10.0
    from tests.tiny_models import make_tiny_llama

    tmp = tempfile.mkdtemp(prefix="llm-serve-bench-")
    model = make_tiny_llama(
        Path(tmp) / "llm", hidden=96, layers=3, heads=4, kv_heads=2, intermediate=192, seed=1
    )
    code = SERVE.format(
        root=str(ROOT),
        module=os.path.abspath(args.server_module) if args.server_module else "",
        model=str(model),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(proc.stdout.readline())
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for _ in range(5):
            request(conn, SMALL)  # warm up
        t0 = time.perf_counter()
        refused = (
            request(conn, {**SMALL, "prompt": ["hi"] * 8, "max_tokens": 4096})
            if not args.server_module
            else 0
        )
        refused_ms = round((time.perf_counter() - t0) * 1e3, 1)
        idle = load(port, args.clients, seconds)
        abuse_out: dict = {}

        def abuse() -> None:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
            t = time.perf_counter()
            abuse_out["status"] = request(c, ABUSE)
            abuse_out["seconds"] = round(time.perf_counter() - t, 2)

        th = threading.Thread(target=abuse)
        th.start()
        time.sleep(0.3)
        under = load(port, args.clients, seconds)
        th.join()
        summary = {
            "idle": idle,
            "abuse": under,
            "abusive_request": abuse_out,
            "refused_status": refused,
            "refused_ms": refused_ms,
            "clients": args.clients,
            "phase_s": seconds,
            "server": os.path.basename(args.server_module) or "aggregator.llm_server",
            "cores": os.cpu_count(),
        }
    finally:
        proc.stdin.close()
        proc.wait(30)
    print("BENCH llm_serve " + json.dumps(summary))


if __name__ == "__main__":
    main()
