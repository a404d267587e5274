"""Outlier ejection (shim.ejection) on a fake clock: failures eject for a growing time,
probes do not re-admit, a trickle of successful requests does; metrics follow."""

from __future__ import annotations

import time

from shim.config import BackendConfig, EjectionSection
from shim.ejection import Ejector
from shim.metrics import Metrics
from shim.pool import Backend


class Clock:
    """Starts at the real monotonic time (``Backend.healthy`` reads that) and moves on
    only when told; ``expired`` checks a deadline against it."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def setup(**cfg: int) -> tuple[Ejector, Backend, Clock, Metrics]:
    backend = Backend("mma", BackendConfig(dialect="mma", endpoints=["tcp://127.0.0.1:1"]))
    backend.connected_endpoints = 1
    clock, metrics = Clock(), Metrics()
    ejector = Ejector({"mma": backend}, EjectionSection(**cfg), metrics, clock)
    return ejector, backend, clock, metrics


def gauge(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"backend": "mma"})


def test_consecutive_failures_eject_for_a_time_growing_with_each_ejection() -> None:
    ejector, backend, clock, metrics = setup(consecutive_failures=3, base_ejection_ms=5000)
    for _ in range(2):
        backend.record_failure()
    assert not ejector.ejected("mma") and gauge(metrics, "shim_backend_ejected") == 0
    backend.record_success()  # a reply in between resets the run
    for _ in range(2):
        backend.record_failure()
    assert not ejector.ejected("mma")
    backend.record_failure()
    assert ejector.ejected("mma") and not backend.healthy
    assert gauge(metrics, "shim_backend_ejected") == 1
    assert gauge(metrics, "shim_ejections_total") == 1
    backend.probe_ok = True  # a passing probe alone does not re-admit it
    assert not backend.healthy
    assert backend.ejected_until - clock.now == 5.0
    clock.now += 5.1
    assert not ejector.ejected("mma") and gauge(metrics, "shim_backend_ejected") == 0
    backend.record_failure()  # on trial: one failure is enough, and it lasts twice as long
    assert ejector.ejected("mma") and gauge(metrics, "shim_ejections_total") == 2
    assert backend.ejected_until - clock.now == 10.0


def test_readmission_is_a_trickle_until_real_requests_succeed() -> None:
    ejector, backend, clock, _ = setup(consecutive_failures=1, base_ejection_ms=1000,
                                       trial_inflight=1, readmit_successes=2)
    backend.record_failure()
    clock.now += 1.1
    backend.ejected_until = time.monotonic() - 1  # its time is up (real clock)
    assert backend.healthy
    endpoint = type("E", (), {"outstanding": 1})()
    backend.endpoints.append(endpoint)  # type: ignore[arg-type]
    assert not backend.healthy  # one request on trial at a time
    endpoint.outstanding = 0
    backend.record_success()
    backend.record_success()
    endpoint.outstanding = 5
    assert backend.healthy  # fully back
    backend.record_failure()  # and the multiplier was reset: a fresh run of failures
    assert ejector.ejected("mma")
    assert ejector.describe()["mma"]["ejections_in_a_row"] == 1


def test_late_failures_while_ejected_do_not_extend_it() -> None:
    ejector, backend, clock, metrics = setup(consecutive_failures=1, base_ejection_ms=1000)
    backend.record_failure()
    backend.record_failure()
    assert gauge(metrics, "shim_ejections_total") == 1
    clock.now += 1.1
    assert not ejector.ejected("mma")
