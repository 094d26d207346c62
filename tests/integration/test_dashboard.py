"""The dashboard at GET / in a real browser (issue 20): headless Chromium loads it from a
live worker under a paced stream; the throughput numbers appear and change, an alert
produced during the test shows up, and the page stays readable at 1280×800 and at a
phone's width. Screenshots are saved as test artifacts (ARTIFACTS)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path

import pytest

from tests.support import REPO, LiveStream, Worker, http, unique, write_config
from tests.support_browser import Browser

ARTIFACTS = Path(os.environ.get("STREAMETL_TEST_ARTIFACTS", REPO / ".data" / "test-artifacts"))
CONFIG = {
    "pipelines": [{"name": "clean", "source": "events", "sink": "events.clean",
                   "steps": [{"op": "filter", "where": "action != 'heartbeat'"}]}],
    "windows": [{"name": "per_user", "source": "events", "key_by": "user_id", "time_field": "ts",
                 "window": {"type": "tumbling", "size": 5, "grace": 1},
                 "aggregations": [{"name": "n", "type": "count"}], "emit": "final", "sink": "per_user.out"}],
    "patterns": {"sources": ["events"], "time_field": "ts", "definitions": [
        {"name": "burst", "type": "frequency", "key_by": "user_id", "where": "action == 'alarm'",
         "count": 3, "within": 60}]},
}


def clicks():
    for i in itertools.count():
        yield {"user_id": f"u{i % 50}", "action": "click", "value": 1, "ts": time.time()}


@pytest.fixture(scope="module")
def worker(kafka):
    name = unique("dash")
    w = Worker(app_id=name, topic_prefix=f"{name}.", env={"STREAMETL_PIPELINES_FILE": write_config(CONFIG)})
    w.start(timeout=150)
    yield w
    w.kill()


def test_the_dashboard_and_its_assets_are_served_locally(worker):
    for path, kind in [("/", "text/html"), ("/static/dashboard.js", "javascript"), ("/static/dashboard.css", "text/css")]:
        import urllib.request

        with urllib.request.urlopen(worker.url + path, timeout=10) as resp:
            assert resp.status == 200 and kind in resp.headers["Content-Type"]
            body = resp.read().decode()
        assert "http://" not in body.replace("http://127.0.0.1", "") and "https://" not in body, \
            f"{path} must not load anything from another host"
    assert http("GET", worker.url + "/static/../app/settings.py")[0] == 404


async def text_of(browser: Browser, element_id: str) -> str:
    return await browser.evaluate(f"document.getElementById({element_id!r}).textContent") or ""


async def wait_for_text(browser: Browser, element_id: str, predicate, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    value = ""
    while time.monotonic() < deadline:
        value = await text_of(browser, element_id)
        if predicate(value):
            return value
        await asyncio.sleep(0.5)
    raise AssertionError(f"#{element_id} is {value!r} after {timeout}s")


def number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def test_live_numbers_change_and_an_alert_shows_up(worker):
    stream = LiveStream(f"{worker.topic_prefix}events", clicks(), key="user_id", per_chunk=50, pause=0.05)
    try:
        asyncio.run(watch(worker, stream))
    finally:
        stream.stop()


async def watch(worker: Worker, stream: LiveStream) -> None:
    async with Browser() as browser:
        await browser.viewport(1280, 800)
        await browser.open(worker.url + "/")
        first = await wait_for_text(browser, "total-in", lambda t: (number(t) or 0) > 0)
        await wait_for_text(browser, "total-in-rate", lambda t: (number(t) or 0) > 0)
        later = await wait_for_text(browser, "total-in", lambda t: (number(t) or 0) > number(first), timeout=30)
        assert number(later) > number(first)
        rows = await browser.evaluate("document.querySelectorAll('#pipelines tbody tr').length")
        assert rows == 1

        # Three alarms of one user: the frequency pattern alerts, and the page shows it.
        alarm = [{"user_id": "alarmed", "action": "alarm", "value": 1, "ts": time.time() + i} for i in range(3)]
        LiveStream(f"{worker.topic_prefix}events", alarm, key="user_id").wait(60)
        alerts = await wait_for_text(browser, "alerts", lambda t: "burst" in t and "alarmed" in t, timeout=60)
        assert "burst" in alerts
        await browser.screenshot(ARTIFACTS / "dashboard-1280x800.png")
        overflow = await browser.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than 1280"

        await browser.viewport(390, 844, mobile=True)
        await asyncio.sleep(2)
        overflow = await browser.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than a phone"
        assert number(await text_of(browser, "total-in")) > 0
        await browser.screenshot(ARTIFACTS / "dashboard-phone.png")
