"""Outlier ejection with a backend whose request socket hangs while its health socket
answers (issue 10, "health flaps"): it is ejected after a few failed requests, passing
probes do not bring it back, and the trial request after the ejection re-ejects it for
longer; callers meanwhile are served by the other backend without waiting."""

from __future__ import annotations

from pathlib import Path

from tests.procs import req
from tests.reliability.helpers import metric, served_by, wait_until
from tests.shimproc import shim_config, start_fake, start_shim

STATUS = {"action": "status"}


def test_a_hanging_backend_with_a_healthy_probe_stays_ejected(tmp_path: Path) -> None:
    hung, good = start_fake("mma", "mma", "stall"), start_fake("mms", "mma")
    shim = None
    try:
        cfg = shim_config({"mma": hung, "mms": good}, tmp_path,
                          routing={"weights": {"mma": 50, "mms": 50}},
                          ejection={"consecutive_failures": 2, "base_ejection_ms": 3000})
        cfg["backends"]["mma"]["timeout_ms"] = 300
        shim = start_shim(cfg, tmp_path)

        def ejected() -> bool:
            req(shim.endpoint, STATUS, timeout=10.0)  # status fails over: always answered
            return metric(shim.metrics(), "shim_backend_ejected", backend="mma") == 1

        wait_until(ejected, 20, "mma to be ejected")
        assert metric(shim.metrics(), "shim_ejections_total", backend="mma") == 1
        # Ejected: its probes keep passing, yet no request is tried on it (no timeout).
        timeouts = metric(shim.metrics(), "shim_timeouts_total", backend="mma")
        for _ in range(20):
            reply = req(shim.endpoint, STATUS, timeout=10.0)
            assert served_by(reply) == "mms", reply
        assert metric(shim.metrics(), "shim_timeouts_total", backend="mma") == timeouts

        # When the time is up, one trial request fails and ejects it again (twice as long).
        def ejected_again() -> bool:
            req(shim.endpoint, STATUS, timeout=10.0)
            return metric(shim.metrics(), "shim_ejections_total", backend="mma") >= 2

        wait_until(ejected_again, 30, "the failed trial to eject mma again", interval=0.1)
        assert metric(shim.metrics(), "shim_backend_ejected", backend="mma") == 1
    finally:
        if shim is not None:
            shim.stop()
        hung.kill()
        good.kill()
