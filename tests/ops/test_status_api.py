"""The shim's HTTP listener (shim.web): /metrics, /api/status and the status page, served
by a real ``mmshim run`` in front of two fake backends; figures checked against the
shim's own counters and the backends' own request counts after known traffic."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shim.ctl import AdminClient
from tests.procs import req
from tests.reliability.helpers import fake_counts, wait_until
from tests.shimproc import Fake, ShimProc, shim_config, start_shim

N_REQUESTS = 40


def http(shim: ShimProc, path: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of one request to the shim's HTTP listener."""
    request = urllib.request.Request(f"http://127.0.0.1:{shim.metrics_port}{path}",
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def api_status(shim: ShimProc) -> dict[str, Any]:
    code, ctype, body = http(shim, "/api/status")
    assert code == 200 and ctype.startswith("application/json"), (code, ctype, body)
    doc: dict[str, Any] = json.loads(body)
    return doc


def requests_by_backend(shim: ShimProc) -> dict[str, float]:
    """``shim_requests_total`` summed per backend, from /metrics."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(shim.metrics()):
        for s in family.samples:
            if s.name == "shim_requests_total":
                out[s.labels["backend"]] = out.get(s.labels["backend"], 0) + s.value
    return out


@pytest.fixture
def running(fakes: dict[str, Fake], tmp_path: Path) -> Iterator[ShimProc]:
    cfg = shim_config(fakes, tmp_path, routing={"weights": {"mma": 50, "mms": 50}})
    shim = start_shim(cfg, tmp_path)
    yield shim
    shim.kill()


def test_api_status_figures_match_the_counters_after_known_traffic(
        running: ShimProc, fakes: dict[str, Fake], tmp_path: Path) -> None:
    shim = running
    for i in range(N_REQUESTS):
        reply = req(shim.endpoint, {"command": "status", "conversation_id": f"c{i}"},
                    timeout=10)
        assert reply.get("status") != "error", reply
    wait_until(lambda: sum(requests_by_backend(shim).values()) == N_REQUESTS, 10,
               "the shim to count every request")
    doc = api_status(shim)
    assert doc["mode"] == "split" and doc["weights"] == {"mma": 50.0, "mms": 50.0}
    by_metrics = requests_by_backend(shim)
    served = {name: fake_counts(fake).get("status", 0) for name, fake in fakes.items()}
    for name, b in doc["backends"].items():
        # The page's figure is the shim's counter, and the backend really got that many.
        assert b["requests_total"] == by_metrics.get(name, 0) == served[name], (name, b)
        assert b["errors_total"] == 0 and b["error_rate"] == 0.0
        assert b["healthy"] is True and b["weight"] == 50.0
        if b["requests_total"]:
            assert b["latency_ms"]["p50"] is not None and \
                0 < b["latency_ms"]["p50"] <= b["latency_ms"]["p99"]
    assert sum(b["requests_total"] for b in doc["backends"].values()) == N_REQUESTS
    assert doc["counts"]["requests"] >= N_REQUESTS

    # A weight change through the admin socket shows up in the next document and in
    # the audit lines, and the history the charts draw from gets a point for it.
    token = (tmp_path / "state.token").read_text().strip()
    assert AdminClient(shim.admin_endpoint, token).call(
        "set_weights", weights={"mms": 10})["status"] == "ok"
    doc = api_status(shim)
    assert doc["weights"] == {"mma": 90.0, "mms": 10.0}
    assert doc["audit"][-1]["command"] == "set_weights"
    assert doc["audit"][-1]["new"] == {"weights.mma": 90.0, "weights.mms": 10.0}
    wait_until(lambda: api_status(shim)["history"]["weights"].get("mms", [])[-1:] == [10.0], 10,
               "the weight change in the history")


def test_http_listener_is_read_only_and_serves_the_page_and_metrics(
        running: ShimProc) -> None:
    shim = running
    code, ctype, body = http(shim, "/")
    assert code == 200 and ctype.startswith("text/html") and "api/status" in body
    assert "<script src=" not in body and "https://" not in body  # nothing from elsewhere
    code, ctype, body = http(shim, "/metrics")
    assert code == 200 and ctype.startswith("text/plain") and "shim_requests" in body
    for method in ("POST", "PUT", "DELETE"):
        assert http(shim, "/api/status", method)[0] == 405
    assert http(shim, "/nope")[0] == 404
    assert http(shim, "/metrics", "HEAD")[0] == 200


def test_unknown_components_are_in_the_document_under_their_own_key() -> None:
    from shim.status import section_key

    class RolloutEngine:
        pass

    class Widget:
        status_key = "widget"

    assert section_key(RolloutEngine()) == "rollout"
    assert section_key(Widget()) == "widget"


def test_percentiles_interpolate_like_histogram_quantile() -> None:
    from shim.status import percentile

    buckets = {0.001: 0.0, 0.01: 50.0, 0.1: 100.0, float("inf"): 100.0}
    assert percentile(buckets, 0.5) == pytest.approx(0.01)
    assert percentile(buckets, 0.25) == pytest.approx(0.0055)
    assert percentile(buckets, 0.99) == pytest.approx(0.0982)
    assert percentile({0.1: 0.0, float("inf"): 0.0}, 0.5) is None
    assert percentile({0.1: 0.0, float("inf"): 4.0}, 0.5) == 0.1  # beyond the last bound


def test_a_taken_metrics_port_stops_the_shim_with_one_line(
        fakes: dict[str, Fake], tmp_path: Path) -> None:
    import socket

    cfg = shim_config(fakes, tmp_path)
    port = int(cfg["shim"]["metrics"].rsplit(":", 1)[1])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        shim = start_shim(cfg, tmp_path, wait=False)
        wait_until(lambda: shim.proc.poll() is not None, 30, "the shim to give up")
    assert shim.proc.poll() == 3
    assert f"metrics address 127.0.0.1:{port} is already in use" in shim.proc.log()


async def test_requests_beyond_the_bound_get_503_at_once() -> None:
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from shim.web import MAX_CONCURRENT, WebServer

    server = WebServer.__new__(WebServer)  # the middleware alone: no shim needed
    server._busy = MAX_CONCURRENT
    called: list[bool] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        called.append(True)
        return web.Response(text="ok")

    resp = await server._bounded(make_mocked_request("GET", "/api/status"), handler)
    assert resp.status == 503 and not called
    server._busy = MAX_CONCURRENT - 1
    resp = await server._bounded(make_mocked_request("GET", "/api/status"), handler)
    assert resp.status == 200 and called and server._busy == MAX_CONCURRENT - 1


async def test_components_of_any_kind_appear_under_their_key(
        fakes: dict[str, Fake], tmp_path: Path) -> None:
    """A shim in this process with two components the page has no view for: one in its
    extras, one hung on it as ``shim.rollout`` (how another addon may plug in)."""
    import asyncio

    import aiohttp

    from shim.app import build_shim
    from shim.config import decode_config

    class Widget:
        status_key = "widget"

        def describe(self) -> dict[str, Any]:
            return {"spins": 3}

    class Broken:
        status_key = "broken"

        def describe(self) -> dict[str, Any]:
            raise RuntimeError("boom")

    raw = shim_config(fakes, tmp_path)
    shim = build_shim(decode_config(raw, base_dir=tmp_path))
    shim.extras += [Widget(), Broken()]
    serving = asyncio.create_task(shim.serve())
    url = f"http://{raw['shim']['metrics']}/api/status"
    try:
        async with aiohttp.ClientSession() as session:
            deadline = asyncio.get_running_loop().time() + 20
            while True:
                try:
                    async with session.get(url) as resp:
                        doc = await resp.json()
                        break
                except aiohttp.ClientConnectionError:
                    assert asyncio.get_running_loop().time() < deadline, "no HTTP listener"
                    assert not serving.done(), serving
                    await asyncio.sleep(0.05)
        assert doc["widget"] == {"spins": 3}
        # The real rollout engine (build_shim hangs it on the shim), idle.
        assert doc["rollout"]["status"] == "none"
        assert doc["broken"] == {"error": "describe() failed: boom"}
        assert set(doc["backends"]) == {"mma", "mms"}
    finally:
        shim.stop()
        assert await asyncio.wait_for(serving, 30) == 0
