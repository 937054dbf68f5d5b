"""The aggregator's read-only HTTP side: ``/metrics`` (Prometheus text format) and a status page.

Off unless the aggregator config has ``status_http``::

    "status_http": {"port": 9464}                       # 127.0.0.1:9464, page + /metrics
    "status_http": {"port": 9464, "host": "0.0.0.0", "token_env": "COTUNE_STATUS_TOKEN"}

One small thread (stdlib ``ThreadingHTTPServer``) serves both. The page (``/``) is plain HTML
rendered here, a stylesheet and a short script shipped with the package
(``aggregator/status_page/``): no build step, no CDN, works offline. The script polls
``/api/status`` and ``/api/devices`` (JSON) every two seconds. Every read goes through a
:class:`~aggregator.status_view.LedgerView`, the page's own read-only ledger connection.

With ``token_env`` set (the name of an environment variable holding the token, so the secret is
not in the config file) every route needs ``Authorization: Bearer <token>`` (Prometheus'
``authorization`` / ``bearer_token_file``) or HTTP Basic with the token as the password (a
browser asks for it once).

Ingest workers (``ingest_workers: N``) are separate processes with their own counters: worker
``k`` serves its own ``/metrics`` (no page) on ``port + 1 + k``, the same host and token.
Why one port per worker rather than ``prometheus_client``'s multiprocess mode: workers may run
on other hosts (the ledger is their control plane), multiprocess mode only aggregates processes
of one host through a shared directory that must be set before the library is imported, and a
restarted worker's series would be merged with its dead predecessor's; a scrape target per
worker keeps each process' counters honest and Prometheus sums them (``sum by (job)``).
``cotune llm serve --metrics-port`` serves the LLM server's ``/metrics`` the same way.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import metrics as _metrics
from . import telemetry
from .status_view import LedgerView

log = logging.getLogger("cotune.aggregator")

PAGE_DIR = Path(__file__).resolve().parent / "status_page"
_STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class StatusHTTPConfig:
    port: int
    host: str = "127.0.0.1"
    #: the name of an environment variable holding the bearer token (None: no token)
    token_env: str | None = None
    metrics: bool = True  # serve /metrics
    page: bool = True  # serve the status page and its JSON
    workers: bool = True  # ingest worker k serves /metrics on port + 1 + k
    window: int = 50  # the device table covers the devices of the last N rounds
    cache_s: float = 1.0  # /api/status is computed at most this often

    @classmethod
    def parse(cls, data: Any) -> StatusHTTPConfig:
        if not isinstance(data, dict):
            raise ValueError("status_http must be an object, e.g. {\"port\": 9464}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"status_http: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
        if "port" not in data:
            raise ValueError("status_http needs a port (0: any free port)")
        cfg = cls(**data)
        if not isinstance(cfg.port, int) or isinstance(cfg.port, bool) or not 0 <= cfg.port <= 65535:
            raise ValueError(f"status_http.port must be an integer in [0, 65535], got {cfg.port!r}")
        if not isinstance(cfg.host, str) or not cfg.host:
            raise ValueError("status_http.host must be a host name or address")
        if cfg.token_env is not None and not (isinstance(cfg.token_env, str) and cfg.token_env):
            raise ValueError("status_http.token_env must name an environment variable")
        if not isinstance(cfg.window, int) or cfg.window < 1:
            raise ValueError("status_http.window must be an integer >= 1")
        return cfg

    def token(self) -> str | None:
        if self.token_env is None:
            return None
        token = os.environ.get(self.token_env, "").strip()
        if not token:
            raise ValueError(f"status_http.token_env names {self.token_env}, which is not set")
        return token


class StatusServer:
    """``/metrics`` and, with a ``view``, the status page and its JSON. ``live()`` adds what
    only the running process knows (presence, configuration) to ``/api/status``."""

    def __init__(self, cfg: StatusHTTPConfig, *, view: LedgerView | None = None,
                 live: Callable[[], dict] | None = None, online: Callable[[str], bool] | None = None,
                 port: int | None = None, title: str = "cotune") -> None:
        self.cfg = cfg
        self.view = view if cfg.page else None
        self.live = live or (lambda: {})
        self.online = online
        self.title = title
        self._token = cfg.token()
        self._cache: tuple[float, bytes] | None = None
        self._cache_lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"app": self})
        self.httpd = ThreadingHTTPServer((cfg.host, cfg.port if port is None else port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="cotune-status-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> StatusServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)
        if self.view is not None:
            self.view.close()

    # -- auth ---------------------------------------------------------------------------------
    def authorized(self, header: str | None) -> bool:
        if self._token is None:
            return True
        header = header or ""
        given = ""
        if header.startswith("Bearer "):
            given = header[7:].strip()
        elif header.startswith("Basic "):
            try:
                given = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                given = ""
        return secrets.compare_digest(given.encode("utf-8"), self._token.encode("utf-8"))

    # -- content --------------------------------------------------------------------------------
    def status_json(self) -> bytes:
        now = time.monotonic()
        with self._cache_lock:
            if self._cache is not None and now - self._cache[0] < self.cfg.cache_s:
                return self._cache[1]
        live = self.live()
        data = self.view.summary(quorum_fraction=live.get("quorum_fraction"))
        merge_live_counts(data.get("current"), live.pop("book", None))
        data["service"] = live
        body = json.dumps(data, default=str).encode()
        with self._cache_lock:
            self._cache = (now, body)
        return body

    def devices_json(self, query: dict[str, list[str]]) -> bytes:
        q = {k: v[0] for k, v in query.items() if v}
        page = self.view.devices(offset=_int(q.get("offset"), 0), limit=_int(q.get("limit"), 50),
                                 sort=q.get("sort", "client"), search=q.get("q") or None)
        for d in page["devices"]:
            d["online"] = self.online(d["client"]) if self.online else None
        return json.dumps(page, default=str).encode()

    def page_html(self) -> bytes:
        """The page with the current state rendered in (the script keeps it live)."""
        try:
            data = json.loads(self.status_json())
        except Exception:  # no ledger yet: an empty page that the script fills when it appears
            data = {"current": None, "rounds": [], "federation": None}
        cur = data.get("current")
        fed = data.get("federation") or {}
        if cur:
            now_line = (f"round {cur['round']} {cur['status']}: {cur['accepted']} accepted, "
                        f"{cur['rejected']} rejected, {cur['pending']} pending of {cur['selected']} selected")
        else:
            now_line = "waiting for the first round"
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_cell(r.get(k)))}</td>" for k in
                             ("round", "status", "seconds", "selected", "accepted", "quorum", "skipped")) + "</tr>"
            for r in reversed(data.get("rounds", [])[-20:]))
        template = (PAGE_DIR / "index.html").read_text(encoding="utf-8")
        fill = {
            "title": html.escape(f"{self.title} {fed.get('id') or ''}".strip()),
            "federation": html.escape(str(fed.get("id") or "-")),
            "algorithm": html.escape(str(fed.get("algorithm") or "-")),
            "now": html.escape(now_line),
            "history_rows": rows,
        }
        for key, value in fill.items():
            template = template.replace("{{" + key + "}}", value)
        return template.encode("utf-8")


class _Handler(BaseHTTPRequestHandler):
    app: StatusServer
    server_version = "cotune-status"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        log.debug("status http: " + format, *args)

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None,
              head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", _CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's name
        self._route(head_only=True)

    def do_GET(self) -> None:  # noqa: N802
        self._route()

    def _refuse(self) -> None:
        self._send(405, b"read-only\n", "text/plain; charset=utf-8", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def _route(self, head_only: bool = False) -> None:
        app = self.app
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if not app.authorized(self.headers.get("Authorization")):
            self._send(401, b"authorization required\n", "text/plain; charset=utf-8",
                       {"WWW-Authenticate": 'Basic realm="cotune status", charset="UTF-8"'}, head_only)
            return
        try:
            if path == "/metrics" and app.cfg.metrics:
                return self._send(200, _metrics.exposition(), _metrics.CONTENT_TYPE, head_only=head_only)
            if path == "/healthz":
                return self._send(200, b"ok\n", "text/plain; charset=utf-8", head_only=head_only)
            if app.view is None:
                return self._send(404, b"not found\n", "text/plain; charset=utf-8", head_only=head_only)
            if path in ("/", "/index.html"):
                return self._send(200, app.page_html(), "text/html; charset=utf-8", head_only=head_only)
            if path.startswith("/static/") and path[8:] in _STATIC:
                body = (PAGE_DIR / path[8:]).read_bytes()
                return self._send(200, body, _STATIC[path[8:]], head_only=head_only)
            if path == "/api/status":
                return self._send(200, app.status_json(), "application/json", head_only=head_only)
            if path == "/api/devices":
                return self._send(200, app.devices_json(query), "application/json", head_only=head_only)
            if path in ("/api/device", "/api/device.csv"):
                client = (query.get("id") or [""])[0]
                if not client:
                    return self._send(400, b"id= is required\n", "text/plain; charset=utf-8", head_only=head_only)
                rows = app.view.device(client)
                if path.endswith(".csv"):
                    return self._csv(rows, f"telemetry-{_safe_name(client)}.csv", head_only)
                return self._send(200, json.dumps({"client": client, "rounds": rows}).encode(),
                                  "application/json", head_only=head_only)
            if path == "/api/telemetry.csv":
                return self._csv(app.view.telemetry_rows(), "telemetry.csv", head_only)
            return self._send(404, b"not found\n", "text/plain; charset=utf-8", head_only=head_only)
        except FileNotFoundError:
            return self._send(503, b"no ledger yet\n", "text/plain; charset=utf-8", {"Retry-After": "2"},
                              head_only)
        except (BrokenPipeError, ConnectionResetError):
            return None
        except Exception as exc:
            log.warning("status http %s failed: %s", path, exc)
            return self._send(500, b"internal error\n", "text/plain; charset=utf-8", head_only=head_only)

    def _csv(self, rows: Iterable[dict], name: str, head_only: bool) -> None:
        body = telemetry.to_csv(rows).encode("utf-8")
        self._send(200, body, "text/csv; charset=utf-8",
                   {"Content-Disposition": f'attachment; filename="{name}"'}, head_only)


def _int(v: Any, default: int) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def _safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:64] or "device"


# -- wiring into the processes ------------------------------------------------------------------
def start_status_http(service: Any) -> StatusServer | None:
    """The aggregator service's page and ``/metrics`` (None when ``status_http`` is not
    configured). Called once from the service's constructor; it serves until the process ends
    (a finished federation stays on view) or :func:`stop_status_http`."""
    conf = getattr(service.cfg, "status_http", None)
    if not conf:
        return None
    cfg = StatusHTTPConfig.parse(conf)
    target = service.cfg.state_db or Path(service.cfg.state_dir) / "state.db"
    view = LedgerView(target, window=cfg.window)
    server = StatusServer(cfg, view=view, live=lambda: _service_live(service), online=_presence_of(service),
                          title=f"cotune {service.party.federation}")
    server.source = _metrics.register_source(lambda: _service_samples(service, view))
    log.info(json.dumps({"event": "status_http", "url": server.url, "metrics": cfg.metrics, "page": cfg.page}))
    if service.progress:
        service.progress(f"status page and /metrics at {server.url}")
    return server.start()


def stop_status_http(server: StatusServer | None) -> None:
    if server is not None:
        _metrics.unregister_source(getattr(server, "source", None))
        server.close()


def start_worker_metrics(worker: Any) -> StatusServer | None:
    """Ingest worker ``k``'s ``/metrics`` on ``status_http.port + 1 + k`` (any free port when
    the port is 0); None when not configured."""
    conf = getattr(worker.cfg, "status_http", None)
    if not conf:
        return None
    cfg = StatusHTTPConfig.parse(conf)
    if not cfg.workers or not cfg.metrics:
        return None
    port = 0 if cfg.port == 0 else cfg.port + 1 + worker.index
    server = StatusServer(cfg, view=None, port=port)
    server.source = _metrics.register_source(lambda: _worker_samples(worker))
    log.info(json.dumps({"event": "worker_metrics", "worker": worker.index, "url": server.url}))
    return server.start()


def _online(service: Any) -> int:
    """Clients whose retained presence says online (the aggregator's own presence left out)."""
    me = getattr(service.endpoint, "me", None)
    return sum(1 for c, p in list(service.endpoint.presence.items()) if c != me and p.get("state") == "online")


def _service_live(service: Any) -> dict:
    cfg = service.cfg
    conf = StatusHTTPConfig.parse(cfg.status_http)
    workers = cfg.ingest_workers if conf.workers and conf.metrics and conf.port else 0
    wire = service.endpoint.wire_stats()
    return {
        "algorithm": cfg.algorithm, "mode": cfg.mode, "rounds": cfg.rounds, "quorum_fraction": cfg.quorum,
        "round_deadline_s": cfg.round_deadline_s, "aggregation": service.rule,
        "clients_online": _online(service), "ingest_workers": cfg.ingest_workers,
        "worker_metrics_ports": [conf.port + 1 + k for k in range(workers)],
        "wire": {k: v for k, v in wire.items() if k != "rejected"},
        "book": _live_book(service),
    }


def _live_book(service: Any) -> dict | None:
    """The open round's counts from the service's in-memory index (the ledger learns accepted
    updates at the next checkpoint)."""
    book = getattr(service.intake, "book", None)
    if book is None:
        return None
    statuses = list(book.status.values())
    return {"round": book.round, "selected": book.n_selected, "accepted": len(book.accepted),
            "rejected": statuses.count("rejected"), "pending": statuses.count("selected")}


def merge_live_counts(current: dict | None, book: dict | None) -> None:
    """Counts of the open round from the running process, where it is ahead of the ledger."""
    if not current or not book or current.get("status") != "open" or current.get("round") != book["round"]:
        return
    if book["accepted"] >= current.get("accepted", 0):
        current.update({k: book[k] for k in ("accepted", "rejected", "pending")})


def _presence_of(service: Any) -> Callable[[str], bool]:
    return lambda c: (service.endpoint.presence.get(c) or {}).get("state") == "online"


def _wire_samples(endpoint: Any, role: str) -> Iterable[tuple]:
    stats = endpoint.wire_stats()
    lab = {"role": role}
    yield ("cotune_wire_received_bytes_total", "Bytes received over MQTT (envelopes included)", lab,
           stats["bytes_in"])
    yield ("cotune_wire_sent_bytes_total", "Bytes sent over MQTT (envelopes included)", lab, stats["bytes_out"])
    yield ("cotune_wire_received_messages_total", "MQTT messages received", lab, stats["messages_in"])
    yield ("cotune_wire_sent_messages_total", "MQTT messages sent", lab, stats["messages_out"])
    for reason, n in sorted(stats.get("rejected", {}).items()):
        yield ("cotune_wire_rejected_total",
               "Frames the wire refused before they became messages (replayed, tampered, stale...)",
               {"role": role, "reason": str(reason)[:48]}, n)


def _dir_bytes(path: Path) -> tuple[int, int]:
    files = size = 0
    if not path.is_dir():
        return 0, 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            try:
                size += os.stat(os.path.join(root, n)).st_size
                files += 1
            except OSError:
                pass
    return files, size


def _service_samples(service: Any, view: LedgerView) -> Iterable[tuple]:
    cfg = service.cfg
    yield ("cotune_info", "This process: federation, algorithm, round mode",
           {"role": "aggregator", "federation": service.party.federation, "algorithm": cfg.algorithm,
            "mode": cfg.mode}, 1)
    yield ("cotune_clients_online", "Clients whose retained presence says online", {}, _online(service))
    yield ("cotune_rounds_configured", "Rounds this federation runs", {}, cfg.rounds)
    yield from _wire_samples(service.endpoint, "aggregator")
    state_dir = Path(cfg.state_dir)
    files, size = _dir_bytes(state_dir / "state.db.checkpoints")
    yield ("cotune_checkpoint_bytes", "Bytes of checkpoint files (global states, partial aggregates)", {}, size)
    yield ("cotune_checkpoint_files", "Checkpoint files", {}, files)
    yield ("cotune_wal_bytes", "Bytes of the ingest write-ahead logs", {}, _dir_bytes(state_dir / "wal")[1])
    try:
        summary = json.loads(_cached_counts(view))
    except Exception:
        return
    cur = summary.get("current")
    merge_live_counts(cur, _live_book(service))
    if cur:
        yield ("cotune_round", "The current (latest) round", {}, cur["round"])
        yield ("cotune_round_open", "1 while the current round accepts updates", {}, cur["status"] == "open")
        for st in ("selected", "accepted", "rejected", "dropped", "pending"):
            yield ("cotune_round_participants", "Participants of the current round by status",
                   {"status": st}, cur[st])
    yield ("cotune_devices_seen", "Devices that took part in the last status_http.window rounds", {},
           summary.get("devices_seen", 0))


_counts_cache: dict[int, tuple[float, str]] = {}


def _cached_counts(view: LedgerView) -> str:
    key = id(view)
    hit = _counts_cache.get(key)
    now = time.monotonic()
    if hit is not None and now - hit[0] < 1.0:
        return hit[1]
    data = view.summary(rejections=0)
    data = {"current": data.get("current"), "devices_seen": data.get("devices_seen")}
    text = json.dumps(data, default=str)
    _counts_cache[key] = (now, text)
    return text


def _worker_samples(worker: Any) -> Iterable[tuple]:
    yield ("cotune_info", "This process: federation, algorithm, round mode",
           {"role": f"ingest-{worker.index}", "federation": worker.party.federation,
            "algorithm": worker.cfg.algorithm, "mode": worker.cfg.mode}, 1)
    yield ("cotune_ingest_round", "The round this ingest worker serves", {}, worker.intake.current_round)
    yield from _wire_samples(worker.endpoint, f"ingest-{worker.index}")


# -- cotune llm serve -------------------------------------------------------------------------
def add_llm_metrics_args(parser: Any) -> None:
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus /metrics on this port (off by default)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of /metrics (default 127.0.0.1)")
    parser.add_argument("--metrics-token-env", default=None,
                        help="require 'Authorization: Bearer TOKEN' on /metrics, TOKEN in this variable")


def start_llm_metrics(args: Any, srv: Any) -> StatusServer | None:
    """``cotune llm serve --metrics-port N``: the LLM server's ``/metrics`` (requests and tokens,
    queue, 429s) on its own port and thread."""
    if getattr(args, "metrics_port", None) is None:
        return None
    cfg = StatusHTTPConfig.parse({"port": args.metrics_port, "host": args.metrics_host,
                                  "token_env": args.metrics_token_env, "page": False})
    server = StatusServer(cfg, view=None)
    server.source = _metrics.register_source(lambda: _llm_samples(srv))
    print(f"metrics at {server.url}/metrics", flush=True)
    return server.start()


def _llm_samples(srv: Any) -> Iterable[tuple]:
    load = srv.scheduler.load()
    yield ("cotune_info", "This process", {"role": "llm", "model": str(srv.model.name)[:64]}, 1)
    yield ("cotune_llm_queue_pending", "Admitted requests waiting for the model worker", {}, load["pending"])
    yield ("cotune_llm_queue_active", "Requests the model worker is advancing", {}, load["active"])
    yield ("cotune_llm_admission_rejected_total", "Requests refused at admission (HTTP 429: queue or budget full)",
           {}, load["rejected"])
