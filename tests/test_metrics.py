"""Prometheus /metrics of the aggregator (a real federation over Mosquitto, scraped while it
runs), its ingest workers and `cotune llm serve`; the telemetry export; what must never leak."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.config import AggregatorConfig, ConfigError
from aggregator.service import AggregatorService
from aggregator.status_http import StatusHTTPConfig, stop_status_http
from aggregator.telemetry import extract
from bridge.broker import MosquittoBroker, find_mosquitto
from bridge.endpoint import load_endpoint
from bridge.messages import Task, Update
from tests.conftest import free_ports
from tests.test_federation import SHARDS, _config, _expected_shapes, _start_clients

ROOT = Path(__file__).resolve().parents[1]
SENTINEL = "SENTINEL-update-contents-7f3a"
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto (CI installs it)")


@pytest.fixture
def model(tiny_llama_path):
    return tiny_llama_path


@pytest.fixture
def fed(make_federation):
    """As tests/test_federation.py's: federation fedtest (alice, bob, carol), two ingest worker
    identities, a real Mosquitto."""
    paths = make_federation("fedtest", list(SHARDS), aggregator_instances=2)
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    yield paths
    broker.stop()


def scrape(url: str, token: str | None = None) -> dict[str, float]:
    """/metrics parsed by prometheus_client's own text parser: 'name{labels}' -> value."""
    req = urllib.request.Request(url + "/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    out["__text__"] = text  # type: ignore[assignment]
    return out


def get(url: str, token: str | None = None, basic: bool = False) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token and basic:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"ops:{token}".encode()).decode())
    elif token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _key_paths(fed_paths) -> list[str]:
    """Every private key file of the federation (absolute paths and bare names)."""
    root = Path(fed_paths.party_config("aggregator")).parent.parent.parent
    keys = [p for p in root.rglob("*") if p.is_file() and ("key" in p.name or p.suffix == ".key")]
    assert keys, "the federation has key files"
    return [str(p) for p in keys] + [str(root)]


@needs_mosquitto
@pytest.mark.usefixtures("one_torch_thread")
def test_metrics_parse_and_move_as_a_round_runs_with_token_and_no_leaks(fed, model, tmp_path, monkeypatch):
    monkeypatch.setenv("COTUNE_TEST_STATUS_TOKEN", "s3cret-token")
    port = free_ports(1)[0]
    cfg = _config(fed, model, tmp_path / "agg", rounds=1, round_deadline_s=40, wait_for_clients_s=8,
                  status_http={"port": port, "token_env": "COTUNE_TEST_STATUS_TOKEN"})
    url = f"http://127.0.0.1:{port}"
    token = "s3cret-token"
    _, threads = _start_clients(fed, model, ["alice", "bob"], tmp_path / "clients")
    svc = AggregatorService(cfg, progress=None)
    assert svc.status_http is not None and svc.status_http.host == "127.0.0.1"  # localhost by default
    before = scrape(url, token)
    snapshots: list[dict] = []
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(svc.run()), daemon=True)
    runner.start()

    def watch():
        while runner.is_alive():
            try:
                snapshots.append(scrape(url, token))
            except OSError:
                pass
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # carol sends a rejected (NaN) update, then a good one whose metrics carry a sentinel
    carol = load_endpoint(fed.party_config("carol")).start()
    try:
        got = carol.recv(timeout=30)
        assert isinstance(got.message, Task)
        good = _expected_shapes(carol, got.message)
        nan = {k: v.copy() for k, v in good.items()}
        nan[sorted(nan)[0]].flat[0] = np.nan
        carol.send("aggregator", Update(round=1, algorithm="fedavg", num_examples=5, tensors=nan), round=1)
        # the round stays open until carol answers well: the metrics move while it runs
        deadline = time.time() + 60
        while time.time() < deadline:
            mid = scrape(url, token)
            if (mid.get("cotune_updates_accepted_total", 0) - before.get("cotune_updates_accepted_total", 0) == 2
                    and mid.get("cotune_round_participants{status=rejected}") == 1):
                break
            time.sleep(0.2)
        assert mid["cotune_round"] == 1 and mid["cotune_round_open"] == 1
        assert mid["cotune_round_participants{status=accepted}"] == 2
        assert mid.get("cotune_updates_rejected_total{reason=non_finite}", 0) - before.get(
            "cotune_updates_rejected_total{reason=non_finite}", 0) == 1
        assert mid.get("cotune_rounds_committed_total", 0) == before.get("cotune_rounds_committed_total", 0)
        assert mid["cotune_clients_online"] >= 2
        carol.send("aggregator", Update(round=1, algorithm="fedavg", num_examples=5, tensors=good,
                                        metrics={"note": SENTINEL, "ppl_before": "<script>x</script>",
                                                 "peak_memory_kind": "<b>rss</b>", "seconds": 1.5,
                                                 "power": {"power_mean_mw": 4200, "temperature_peak_c":
                                                           {"cpu": 51.5, "gpu": 48.0}}}), round=1)
        # mid-round the page and the metrics answer; without the token they refuse
        assert get(url + "/metrics")[0] == 401
        assert get(url + "/api/status")[0] == 401
        assert get(url + "/api/status", token, basic=True)[0] == 200  # what a browser sends
        runner.join(90)
    finally:
        carol.close()
        for t in threads:
            t.join(60)
    watcher.join(5)
    assert result["rounds_committed"] == 1
    after = snapshots[-1]

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("cotune_rounds_opened_total") == 1
    assert delta("cotune_rounds_committed_total") == 1
    assert delta("cotune_updates_accepted_total") == 3
    assert delta("cotune_updates_rejected_total{reason=non_finite}") == 1
    assert delta("cotune_round_duration_seconds_count") == 1
    assert delta("cotune_update_ingest_seconds_count") == 3
    # counters never go down between scrapes, and the round was seen open and then committed
    accepted = [s.get("cotune_updates_accepted_total", 0) for s in snapshots]
    assert accepted == sorted(accepted) and accepted[-1] > accepted[0]
    assert after["cotune_round_participants{status=accepted}"] == 3 and after["cotune_round_open"] == 0
    assert after["cotune_checkpoint_bytes"] > 0
    assert after["cotune_wire_received_bytes_total{role=aggregator}"] > 10_000
    assert after["cotune_wire_sent_bytes_total{role=aggregator}"] > 10_000
    assert after["cotune_info{algorithm=fedavg,federation=fedtest,mode=sync,role=aggregator}"] == 1

    # the ledger holds the sentinel (client-supplied metrics are stored) ...
    from aggregator.state import StateStore

    with StateStore(tmp_path / "agg" / "state.db") as store:
        rs = store.load_round(1, with_partial=False)
        assert rs.participants["carol"].metrics["note"] == SENTINEL
        digests = [p.update_digest for p in rs.participants.values() if p.update_digest]
    # ... but the page side only shows the known numeric fields; nothing names a key file
    try:  # the page stays up after the federation finished
        bodies = [scrape(url, token)["__text__"].encode()]
        for path in ("/", "/api/status", "/api/devices", "/api/device?id=carol", "/api/device.csv?id=carol",
                     "/api/telemetry.csv"):
            status, body = get(url + path, token)
            assert status == 200, path
            bodies.append(body)
        carol_rows = json.loads(get(url + "/api/device?id=carol", token)[1])["rounds"]
        assert carol_rows[0]["power_mean_w"] == pytest.approx(4.2)
        assert carol_rows[0]["temperature_peak_c"] == 51.5
        assert carol_rows[0]["ppl_before"] is None and carol_rows[0]["peak_memory_kind"] == "brssb"
        assert get(url + "/metrics", "wrong")[0] == 401
        req = urllib.request.Request(url + "/api/status", method="POST", data=b"x",
                                     headers={"Authorization": f"Bearer {token}"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=5)
        assert exc.value.code == 405  # read-only
    finally:
        stop_status_http(svc.status_http)
    forbidden = [SENTINEL, "<script>", *digests, *_key_paths(fed), str(tmp_path)]
    for body in bodies:
        text = body.decode("utf-8", "replace")
        for f in forbidden:
            assert f not in text, f"{f!r} leaked"


@needs_mosquitto
@pytest.mark.usefixtures("one_torch_thread")
def test_ingest_workers_serve_their_own_metrics(fed, model, tmp_path):
    port = free_ports(1)[0]
    # ports port+1, port+2 must be free too: take a base whose neighbours are
    for _ in range(20):
        import socket

        try:
            socks = []
            for k in (1, 2):
                s = socket.socket()
                s.bind(("127.0.0.1", port + k))
                socks.append(s)
            for s in socks:
                s.close()
            break
        except OSError:
            for s in socks:
                s.close()
            port = free_ports(1)[0]
    cfg = _config(fed, model, tmp_path / "agg", rounds=1, ingest_workers=2, checkpoint_interval_s=0.5,
                  status_http={"port": port})
    _, threads = _start_clients(fed, model, ["alice", "bob", "carol"], tmp_path / "clients")
    svc = AggregatorService(cfg, progress=None)
    seen: dict[int, dict] = {}
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(svc.run()), daemon=True)
    runner.start()
    while runner.is_alive():
        for k in (0, 1):
            try:
                seen[k] = scrape(f"http://127.0.0.1:{port + 1 + k}")
            except OSError:
                pass
        time.sleep(0.3)
    for t in threads:
        t.join(60)
    stop_status_http(svc.status_http)
    assert result["rounds_committed"] == 1
    assert sorted(seen) == [0, 1]
    # every update was taken by exactly one worker
    assert sum(seen[k].get("cotune_updates_accepted_total", 0) for k in (0, 1)) == 3
    for k in (0, 1):
        assert seen[k][f"cotune_info{{algorithm=fedavg,federation=fedtest,mode=sync,role=ingest-{k}}}"] == 1
        assert seen[k][f"cotune_wire_received_bytes_total{{role=ingest-{k}}}"] > 0


def test_llm_server_metrics_count_requests_and_tokens(tiny_llama_path):
    pytest.importorskip("uvicorn")
    from aggregator.llm_server import LLMServer
    from aggregator.status_http import start_llm_metrics, stop_status_http

    port = free_ports(1)[0]

    class Args:
        metrics_port, metrics_host, metrics_token_env = port, "127.0.0.1", None

    with LLMServer(str(tiny_llama_path)) as srv:
        mh = start_llm_metrics(Args, srv)
        try:
            before = scrape(f"http://127.0.0.1:{port}")
            body = json.dumps({"model": srv.model.name, "prompt": "The sea", "max_tokens": 4}).encode()
            req = urllib.request.Request(srv.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                usage = json.loads(resp.read())["usage"]
            bad = urllib.request.Request(srv.url + "/v1/completions", data=b'{"prompt": 1}',
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(bad, timeout=30)
            after = scrape(f"http://127.0.0.1:{port}")
        finally:
            stop_status_http(mh)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("cotune_llm_requests_total{outcome=ok}") == 1
    assert delta("cotune_llm_tokens_total{kind=prompt}") == usage["prompt_tokens"]
    assert delta("cotune_llm_tokens_total{kind=completion}") == usage["completion_tokens"] == 4
    assert delta("cotune_llm_request_duration_seconds_count") == 1
    assert delta("cotune_llm_http_responses_total{status=200}") == 1
    assert delta("cotune_llm_http_responses_total{status=400}") == 1
    assert after["cotune_llm_queue_pending"] == 0


def test_status_http_config_is_checked_and_off_by_default(tmp_path):
    base = {"party_config": "x", "state_dir": str(tmp_path)}
    assert AggregatorConfig(**base).status_http == {}
    for bad in ({"host": "127.0.0.1"}, {"port": 70000}, {"port": 9464, "colour": "red"}, {"port": "80"},
                {"port": 1, "window": 0}):
        with pytest.raises(ConfigError):
            AggregatorConfig(**base, status_http=bad)
    assert StatusHTTPConfig.parse({"port": 9464}).host == "127.0.0.1"
    with pytest.raises(ValueError, match="not set"):
        StatusHTTPConfig.parse({"port": 1, "token_env": "COTUNE_SURELY_UNSET_VAR"}).token()


def test_telemetry_takes_known_numeric_fields_only():
    t = extract({"seconds": 2.5, "peak_memory_bytes": 1 << 20, "peak_memory_kind": "cuda",
                 "train": {"tokens_per_s": 812.5, "loss_mean": 3.1}, "ppl_before": float("nan"),
                 "ppl_after": True, "power": {"power_mean_mw": 5000, "power_peak_mw": 7000, "energy_j": 12.0,
                                              "temperature_peak_c": {"cpu": 55.0, "off": -256.0}},
                 "secret": SENTINEL})
    assert t["tokens_per_s"] == 812.5 and t["train_loss"] == 3.1 and t["peak_memory_kind"] == "cuda"
    assert t["ppl_before"] is None and t["ppl_after"] is None  # NaN and bool are not numbers here
    assert (t["power_mean_w"], t["power_peak_w"], t["energy_j"], t["temperature_peak_c"]) == (5.0, 7.0, 12.0, 55.0)
    assert SENTINEL not in json.dumps(t)


def test_status_cli_table_json_device_and_csv(tmp_path):
    """`cotune aggregator status` on a ledger written through the store's own API."""
    from aggregator.state import AcceptRecord, open_store

    state = tmp_path / "agg"
    state.mkdir()
    with open_store(state / "state.db", checkpoints=state / "state.db.checkpoints") as store:
        tensors = {"w": np.zeros((2, 2), np.float32)}
        store.init_federation("clifed", "fedavg", {}, tensors)
        for r in (1, 2):
            store.open_round(["dev-a", "dev-b", "dev-c"])
            store.accept_many(r, [AcceptRecord(c, f"{r}{c}".ljust(64, "0"), 10,
                                               {"seconds": 3.0 + r, "bytes_up": 2 << 20, "ppl_before": 9.0,
                                                "ppl_after": 7.5, "train": {"tokens_per_s": 100.0},
                                                "peak_memory_bytes": 50 << 20, "peak_memory_kind": "rss"})
                                  for c in ("dev-a", "dev-b")], None)
            store.reject_update(r, "dev-c", "shape", "wrong shape")
            store.seal_round(r)
            store.close_round(r, tensors, {"seconds": 4.0, "quorum": 2, "accepted": 2})
    cfg = tmp_path / "aggregator.json"
    cfg.write_text(json.dumps({"party_config": "unused.json", "state_dir": "agg", "rounds": 2}))

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "cotune", "aggregator", "status", "--config", str(cfg), *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr
        return out.stdout

    table = cli()
    assert "federation clifed" in table and "rounds committed 2/2" in table
    lines = [ln.split() for ln in table.splitlines()]
    assert ["2", "committed", "4.0", "3", "2", "1", "2", "4.0"] == lines[-3][:8]  # round 2: 4 MB up
    assert "rejections: shape 2" in table
    data = json.loads(cli("--json"))
    assert data["rounds_committed"] == 2 and data["history"]["rounds"][1]["mean_ppl_after"] == 7.5
    dev = cli("--device", "dev-a")
    assert dev.startswith("device dev-a") and len(dev.strip().splitlines()) == 5
    assert json.loads(cli("--device", "dev-a", "--json"))["rounds"][1]["seconds"] == 5.0
    csv_text = cli("--csv", "-")
    rows = csv_text.strip().splitlines()
    assert rows[0].startswith("round,client,status,received_at") and len(rows) == 1 + 6
    assert "2,dev-a,accepted" in csv_text and "1,dev-c,rejected" in csv_text
