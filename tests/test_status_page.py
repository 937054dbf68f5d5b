"""The aggregator's status page in a real headless Chromium (Selenium + chromedriver, installed
by .ci/run) while a real federation runs over Mosquitto: the round counter and the device table
update live, and a screenshot is kept (the test's tmp dir; also $COTUNE_SCREENSHOT_DIR when
set)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest

from aggregator.service import AggregatorService
from bridge.broker import MosquittoBroker, find_mosquitto
from tests.conftest import free_ports
from tests.test_federation import SHARDS, _config, _start_clients

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto (CI installs it)")]

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)


def _browser(tmp_path: Path):
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--window-size=1400,2000", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    except Exception as exc:  # e.g. a driver that does not match the browser
        pytest.skip(f"headless Chromium did not start: {type(exc).__name__}: {str(exc)[:300]}")


@pytest.fixture
def fed(make_federation):
    paths = make_federation("fedtest", list(SHARDS))
    broker = MosquittoBroker(paths.mosquitto_conf).start()
    yield paths
    broker.stop()


def test_status_page_follows_a_live_federation_in_headless_chromium(fed, tiny_llama_path, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser(tmp_path)
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}/"
    cfg = _config(fed, tiny_llama_path, tmp_path / "agg", rounds=3, wait_for_clients_s=30,
                  status_http={"port": port})
    svc = AggregatorService(cfg, progress=None)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(svc.run()), daemon=True)
    threads: list[threading.Thread] = []
    try:
        runner.start()
        browser.get(url + "?poll_ms=250")
        text = lambda css: browser.find_element(By.CSS_SELECTOR, css).text  # noqa: E731
        assert "cotune" in browser.title
        assert "waiting for the first round" in text("#round-line")
        assert text("#c-round") == "-" and not browser.find_elements(By.CSS_SELECTOR, "#device-rows tr")
        # the devices come online only now: the page, never reloaded, follows the rounds
        _, threads = _start_clients(fed, tiny_llama_path, list(SHARDS), tmp_path / "clients")
        seen: list[str] = []

        def round_is(b, want: str) -> bool:
            now = text("#c-round")
            if not seen or seen[-1] != now:
                seen.append(now)
            return now == want

        wait = WebDriverWait(browser, 90, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])
        wait.until(lambda b: round_is(b, "3") and text("#c-status") == "committed")
        assert seen[0] == "-" and seen[-1] == "3"
        assert [int(x) for x in seen[1:]] == sorted(int(x) for x in seen[1:]), seen  # never backwards

        def rows(css: str) -> list[list[str]]:  # read at once: the script redraws the tables
            return browser.execute_script(
                "return Array.from(document.querySelectorAll(arguments[0])).map("
                "r => [r.getAttribute('data-client'), r.innerText])", css)

        wait.until(lambda b: len([r for r in rows("#history-rows tr") if "committed" in r[1]]) == 3)
        # the device table: every device, its telemetry of the last accepted update
        wait.until(lambda b: len(rows("#device-rows tr")) == 3)
        wait.until(lambda b: all("→" in t and t.split("→")[1].split()[0] != "-" for _, t in rows("#device-rows tr")))
        devices = dict(rows("#device-rows tr"))
        assert sorted(devices) == sorted(SHARDS)
        assert all(("rss" in t or "cuda" in t) for t in devices.values()), devices
        # plots were drawn from the committed rounds
        assert browser.find_elements(By.CSS_SELECTOR, "#plot-time polyline")
        assert browser.find_elements(By.CSS_SELECTOR, "#plot-quality polyline")
        # a device's own telemetry, round by round
        browser.execute_script("document.querySelector(\"#device-rows tr[data-client='alice'] a.detail\").click()")
        wait.until(lambda b: len(rows("#detail-rows tr")) == 3)
        shot = tmp_path / "status-page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        keep = os.environ.get("COTUNE_SCREENSHOT_DIR")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / "status-page.png")
        # the script ran without errors, and the page holds nothing from the key files
        severe = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe
        source = browser.page_source
        with urllib.request.urlopen(url + "api/status", timeout=10) as resp:
            status = json.loads(resp.read())
        assert status["federation"]["id"] == "fedtest" and status["rounds_committed"] == 3
        fed_root = str(Path(fed.party_config("aggregator")).parents[2])
        for page in (source, json.dumps(status)):
            assert fed_root not in page and "private" not in page.lower() and str(tmp_path) not in page
    finally:
        browser.quit()
        runner.join(120)
        for t in threads:
            t.join(60)
        from aggregator.status_http import stop_status_http

        stop_status_http(svc.status_http)
    assert result.get("rounds_committed") == 3
