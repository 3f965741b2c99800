"""The live dashboard: its rolling history, the state JSON through a server, a cluster's rows and
events (without Ray), and the page itself in a real headless Chromium (Debian's ``chromium``)."""

from __future__ import annotations

import json
import os
import re
import threading

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from shoal.engine.config import EngineConfig
from shoal.engine.outputs import InstanceLoad, RequestOutput
from shoal.server.dashboard import COLUMNS, RollingHistory, instance_rows, percentile
from shoal.server.middleware import BearerAuth
from shoal.server.tenants import KeyRing
from tests._server_util import MODEL_NAME, fast_engine, serve

KEY = "dash-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def output(req_id: str, tokens: int, arrival: float, total: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(req_id=req_id, new_token_ids=[7] * tokens, new_text="", finished=finished,
                         num_prompt_tokens=4, num_output_tokens=total, arrival_time=arrival)


def load(running: int = 1, waiting: int = 0, used: int = 32, total: int = 128) -> InstanceLoad:
    return InstanceLoad(num_running=running, num_waiting=waiting, num_swapped=0, num_total_blocks=total,
                        num_free_blocks=total - used, num_used_blocks=used, num_cached_blocks=0,
                        num_pinned_blocks=0, block_size=16, tokens_in_flight=0, waiting_prompt_tokens=0,
                        num_preemptions=0)


# ---- the rolling history ----------------------------------------------------------------------------


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        values = list(rng.exponential(size=n))
        for q in (0.5, 0.9):
            assert percentile(values, q) == pytest.approx(np.percentile(values, 100 * q))
    assert percentile([], 0.5) is None


def test_history_rates_and_latency_percentiles():
    """Ten requests finish in the interval [100, 101): its point has their tokens/s, requests/s and
    TTFT / TPOT percentiles; the idle intervals after it read zero with no percentiles."""
    history = RollingHistory(window_s=10, interval_s=1)
    ttfts = [0.05 * (i + 1) for i in range(10)]
    lengths = [2 + i for i in range(10)]  # output tokens of each
    steps = []  # (time, output): each request's first token, then the rest at 100.9 when it finishes
    for i, (ttft, n) in enumerate(zip(ttfts, lengths)):
        steps.append((100.0 + ttft, output(f"r{i}", 1, 100.0, 1)))
        steps.append((100.9, output(f"r{i}", n - 1, 100.0, n, finished=True)))
    for now, out in sorted(steps, key=lambda s: s[0]):
        history.observe([out], now)
    tpots = [(100.9 - (100.0 + ttft)) / (n - 1) for ttft, n in zip(ttfts, lengths)]

    snap = history.snapshot(103.2)
    s = snap["series"]
    assert s["t"] == pytest.approx([-2.2, -1.2, -0.2])
    assert s["tokens_per_s"] == [sum(lengths), 0, 0] and s["requests_per_s"] == [10, 0, 0]
    assert s["ttft_p50_s"][0] == pytest.approx(np.percentile(ttfts, 50), abs=1e-6)
    assert s["ttft_p90_s"][0] == pytest.approx(np.percentile(ttfts, 90), abs=1e-6)
    assert s["tpot_p50_s"][0] == pytest.approx(np.percentile(tpots, 50), abs=1e-6)
    assert s["tpot_p90_s"][0] == pytest.approx(np.percentile(tpots, 90), abs=1e-6)
    assert all(s[c][1:] == [None, None] for c in COLUMNS[2:])
    assert snap["totals"] == {"output_tokens": sum(lengths), "requests": 10}
    json.dumps(snap)  # plain JSON


def test_history_is_bounded():
    history = RollingHistory(window_s=10, interval_s=2)
    history.observe([output("a", 6, 0.0, 6, finished=True)], 0.5)
    assert history.snapshot(4.5)["series"]["tokens_per_s"] == [3.0, 0.0]  # per second of a 2 s interval
    snap = history.snapshot(10_000.0)
    assert len(snap["series"]["t"]) == 5 and snap["window_s"] == 10
    assert snap["series"]["tokens_per_s"] == [0.0] * 5 and snap["totals"]["output_tokens"] == 6
    assert min(snap["series"]["t"]) >= -10


def test_one_token_request_has_ttft_but_no_tpot():
    history = RollingHistory(window_s=10, interval_s=1)
    history.observe([output("a", 1, 0.1, 1, finished=True)], 0.4)
    s = history.snapshot(1.5)["series"]
    assert s["ttft_p50_s"] == [pytest.approx(0.3)] and s["tpot_p50_s"] == [None]


# ---- a cluster's rows and events (no Ray) -----------------------------------------------------------


def fake_cluster():
    """A ClusterEngine never started: members and scheduler views set as its life would set them,
    events from the moves it counted."""
    from shoal.cluster.cluster import ClusterEngine, Member

    cluster = ClusterEngine(EngineConfig(device="cpu"), 3, roles=["prefill", "decode", "decode"])
    for i, role in enumerate(["prefill", "decode", "decode"]):
        cluster.scheduler.add_instance(i, role, load(running=i, waiting=1, used=16 * (i + 1)))
        cluster.members[i] = Member(i, None, role)
    cluster.scheduler.set_draining(1)
    cluster.members[2].alive = False
    cluster.scheduler.remove_instance(2)
    cluster._starting[3] = "decode"
    cluster._count_move("load", "done", 1, 2)
    cluster._count_move("pd", "rolled_back", 0, None)
    return cluster


def test_cluster_rows_and_events():
    cluster = fake_cluster()
    rows = instance_rows(cluster, accepting=True)
    assert [(r["id"], r["role"], r["state"]) for r in rows] == [
        (0, "prefill", "running"), (1, "decode", "draining"), (2, "decode", "dead"), (3, "decode", "starting")]
    assert rows[1] == {"id": 1, "role": "decode", "state": "draining", "running": 1, "waiting": 1, "swapped": 0,
                       "kv_usage": 0.25}
    assert rows[2]["running"] is None and rows[3]["kv_usage"] is None
    events = [{k: v for k, v in e.items() if k != "time"} for e in cluster.events]
    assert events == [
        {"kind": "migration", "reason": "load", "outcome": "done", "from": 1, "to": 2},
        {"kind": "pd_transfer", "reason": "pd", "outcome": "rolled_back", "from": 0, "to": None}]
    json.dumps(list(cluster.events))


# ---- through a server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv():
    server, backend = serve(fast_engine(), api_key=KEY)
    yield server
    server.stop()


def complete(url: str, max_tokens: int = 8) -> int:
    body = {"model": MODEL_NAME, "prompt": "Hello there", "max_tokens": max_tokens, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200
    return r.json()["usage"]["completion_tokens"]


def test_state_json(srv):
    before = httpx.get(f"{srv.url}/dashboard/state", headers=AUTH).json()
    made = sum(complete(srv.url) for _ in range(3))
    state = httpx.get(f"{srv.url}/dashboard/state", headers=AUTH).json()
    assert state["model"] == MODEL_NAME and state["events"] == []
    [row] = state["instances"]
    assert row["id"] == 0 and row["role"] == "both" and row["state"] == "running"
    assert row["running"] == 0 and row["waiting"] == 0 and 0 <= row["kv_usage"] <= 1
    assert state["totals"]["output_tokens"] - before["totals"]["output_tokens"] == made
    assert state["totals"]["requests"] - before["totals"]["requests"] == 3
    assert set(state["series"]) == {"t", *COLUMNS} and state["interval_s"] == 1.0


def test_page_and_assets_are_local_and_public(srv):
    """The page and its assets need no key and load nothing from elsewhere; the state needs the key."""
    html = httpx.get(f"{srv.url}/dashboard")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
    assert sorted(assets) == ["dashboard/static/dashboard.css", "dashboard/static/dashboard.js"]
    for asset in assets:
        r = httpx.get(f"{srv.url}/{asset}")
        assert r.status_code == 200 and "//cdn" not in r.text
    assert httpx.get(f"{srv.url}/dashboard/state").status_code == 401
    assert "/dashboard/state" not in httpx.get(f"{srv.url}/openapi.json").text


def test_state_follows_open_metrics():
    """``open_metrics`` opens the state with /metrics; /v1 keeps its key."""
    from starlette.testclient import TestClient

    app = FastAPI()
    for path in ("/dashboard/state", "/metrics", "/v1/models"):
        app.get(path)(lambda: {})
    for open_metrics, status in ((False, 401), (True, 200)):
        client = TestClient(BearerAuth(app, KeyRing.single(KEY), open_metrics=open_metrics))
        assert client.get("/dashboard/state").status_code == status
        assert client.get("/metrics").status_code == status
        assert client.get("/v1/models").status_code == 401


# ---- in a real headless Chromium --------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian's `chromium` package)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, srv):
    """A fresh tab (its own storage) that fails the test on a script error or a request elsewhere."""
    context = browser.new_context()
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("request", lambda req: req.url.startswith(srv.url) or errors.append(f"request to {req.url}"))
    yield tab
    context.close()
    assert errors == []


def number(page, selector: str) -> float:
    return float(page.inner_text(selector))


def test_browser_shows_instance_and_updates_live(page, srv):
    page.goto(f"{srv.url}/dashboard?key={KEY}")
    page.wait_for_selector("#instances tbody tr[data-instance-id='0'][data-state='running']")
    assert "key=" not in page.url  # dropped from the address bar
    assert page.inner_text("#model") == MODEL_NAME
    page.wait_for_selector("#status[data-state='ok']")
    before = number(page, "#total-tokens")
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            complete(srv.url, max_tokens=32)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        page.wait_for_function("n => Number(document.getElementById('total-tokens').textContent) > n",
                               arg=before, timeout=30_000)
        # an interval with tokens and finished requests closes: the tile and the latency charts show it
        page.wait_for_function("() => Number(document.getElementById('tokens-per-s').textContent) > 0",
                               timeout=30_000)
        page.wait_for_function("() => Number(document.getElementById('chart-ttft').dataset.points) > 0",
                               timeout=30_000)
    finally:
        stop.set()
        sender.join(timeout=60)
    assert number(page, "#total-requests") > 0
    assert page.locator("#chart-tokens path").first.get_attribute("d").startswith("M")


def test_browser_asks_for_the_key(page, srv):
    page.goto(f"{srv.url}/dashboard")
    page.wait_for_selector("#status[data-state='auth']")
    assert page.is_visible("#auth")
    page.fill("#auth-key", KEY)
    page.click("#auth button")
    page.wait_for_selector("#instances tbody tr[data-instance-id='0']")
    assert page.is_hidden("#auth")


def test_browser_shows_cluster_rows_and_events(page, srv):
    """A cluster's state (rows and events from a ClusterEngine) rendered by the page."""
    cluster = fake_cluster()
    snap = RollingHistory().snapshot(0.0)
    state = {"model": MODEL_NAME, "time": 0, "instances": instance_rows(cluster, True),
             "events": list(cluster.events), **snap}
    page.route("**/dashboard/state", lambda route: route.fulfill(json=state))
    page.goto(f"{srv.url}/dashboard")
    page.wait_for_selector("#instances tbody tr[data-instance-id='3']")
    rows = page.locator("#instances tbody tr")
    assert [rows.nth(i).get_attribute("data-state") for i in range(4)] == ["running", "draining", "dead", "starting"]
    assert page.inner_text("tr[data-instance-id='1'] td[data-field='kv_usage']").strip() == "25.0%"
    assert page.inner_text("#queues") == "1 / 2"  # the live instances' running / waiting
    events = page.locator("#events li")
    assert events.count() == 2
    assert "P/D transfer #0 → nowhere: rolled_back" in events.nth(0).inner_text()  # newest first
    assert "migration #1 → #2 (load): done" in events.nth(1).inner_text()
    assert events.nth(1).get_attribute("data-kind") == "migration"
