"""deploy/prometheus and deploy/grafana, for real: ``promtool check rules`` and ``promtool
test rules`` (every alert has a firing and a silent case), then a real Prometheus (Debian's
``prometheus``) scraping a running shim: a model loaded on two backends fires
MmshimModelOnTwoBackends, and every Grafana panel query returns data.

Skipped only outside CI when the binaries are missing; with CI=true they must be there
(.ci/run installs them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.procs import Proc, free_port, req, start_backend
from tests.reliability.helpers import wait_until
from tests.shimproc import ROOT, shim_config, start_shim

PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "mmshim.json"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (.ci/run installs Debian's prometheus)")
        pytest.skip(f"{name} not installed (apt-get install prometheus)")
    return path


def alert_names() -> list[str]:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_checks_the_rules_and_the_scrape_config() -> None:
    promtool = _binary("promtool")
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]):
        done = subprocess.run([promtool, *args], cwd=PROM_DIR, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_pass_and_cover_every_alert_both_ways() -> None:
    promtool = _binary("promtool")
    done = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROM_DIR,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    cases = [case for t in yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
             for case in t.get("alert_rule_test", [])]
    for name in alert_names():
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays quiet"


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: raising a threshold out of reach breaks them."""
    promtool = _binary("promtool")
    shutil.copy(PROM_DIR / "alerts_test.yml", tmp_path)
    text = (PROM_DIR / "alerts.yml").read_text()
    broken = text.replace("increase(shim_late_replies_total[10m])) > 10",
                          "increase(shim_late_replies_total[10m])) > 100000")
    assert broken != text
    (tmp_path / "alerts.yml").write_text(broken)
    done = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "MmshimLateReplies" in done.stdout + done.stderr


# -- a real Prometheus scraping a real shim -----------------------------------------------

def prom_get(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Real MMA and MMS with the same model loaded on both behind the shim's back
    (a duplicate, as in tests/integration/test_ownership.py), a shim in shadow mode in
    front of them, and light traffic (bounded) while the test runs."""
    prometheus = _binary("prometheus")
    mma, mms = start_backend("mma"), start_backend("mms")
    started: list[Any] = [mma, mms]
    stop = threading.Event()
    try:
        assert req(mma.endpoint, {"command": "LOAD_MODEL", "model_name": "tinyllama"})[
            "status"] == "SUCCESS"
        assert req(mms.endpoint, {"action": "load_model", "model_id": "tinyllama"})[
            "status"] == "success"
        cfg = shim_config({"mma": mma, "mms": mms}, tmp_path,
                          routing={"mode": "shadow", "weights": {"mma": 50, "mms": 50}},
                          ownership={"enabled": True, "poll_interval_ms": 200,
                                     "repair": False})
        shim = start_shim(cfg, tmp_path)
        started.append(shim)

        def traffic() -> None:  # at most 600 requests, 60 s; mirrored in shadow mode
            for _i in range(600):
                if stop.wait(0.1):
                    return
                with contextlib.suppress(TimeoutError):
                    req(shim.endpoint, {"command": "GET_LOADED_MODELS_STATUS"},
                        timeout=5)

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        port = free_port()
        config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROM_DIR / "alerts.yml")]
        config["scrape_configs"][0]["static_configs"] = [
            {"targets": [f"127.0.0.1:{shim.metrics_port}"]}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = Proc([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                     f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{port}"], cwd=tmp_path)
        started.append(prom)
        yield {"port": port, "shim": shim, "prom": prom}
    finally:
        stop.set()
        for proc in reversed(started):
            proc.kill() if hasattr(proc, "kill") else proc.stop()


def test_real_prometheus_fires_the_duplicate_alert_and_every_panel_has_data(
        stack: dict[str, Any]) -> None:
    port = stack["port"]

    def firing() -> list[dict[str, Any]]:
        try:
            alerts = prom_get(port, "/api/v1/alerts")["data"]["alerts"]
        except OSError:
            return []
        return [a for a in alerts if a["state"] == "firing"]

    def duplicate_fired() -> bool:
        return any(a["labels"].get("alertname") == "MmshimModelOnTwoBackends"
                   and a["labels"].get("model") == "tinyllama" for a in firing())

    try:
        wait_until(duplicate_fired, 60, "MmshimModelOnTwoBackends to fire", interval=0.5)
    except AssertionError:
        raise AssertionError(f"not fired; firing: {firing()}\n{stack['prom'].log()[-3000:]}"
                             ) from None
    targets = prom_get(port, "/api/v1/targets")["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"]

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = {p["title"]: t["expr"] for p in dashboard["panels"] for t in p["targets"]}
    assert len(exprs) >= 10
    empty: dict[str, str] = {}

    def all_have_data() -> bool:
        empty.clear()
        for title, expr in exprs.items():
            result = prom_get(port, "/api/v1/query", query=expr)
            if result["status"] != "success" or not result["data"]["result"]:
                empty[title] = expr
        return not empty

    try:
        wait_until(all_have_data, 40, "every panel query to return data", interval=1.0)
    except AssertionError:
        raise AssertionError(f"panels without data: {empty}") from None
