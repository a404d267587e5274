"""Outlier ejection: a backend whose requests fail is taken out of rotation for a while.

Envoy's model (envoyproxy.io, "Outlier detection"): ``consecutive_failures`` request
failures in a row (timeouts, connections lost with requests in flight; a reply of any
content is a success at this level) eject the backend for ``base_ejection_ms`` times the
number of ejections in a row, capped at ``max_ejection_ms``. A passing health probe
does not re-admit it (a backend whose request socket hangs while its health socket
answers would flap). When the time is up it is back on trial: at most
``trial_inflight`` requests at once, and one failure ejects it again for longer; after
``readmit_successes`` real requests succeed it is fully back and the multiplier resets.

Ejection only steers traffic that may go anywhere. A model's owner keeps its models
while ejected (shim.addons.ownership): requests that would load them elsewhere are refused.

Metrics: ``shim_backend_ejected{backend}`` (1 while ejected), ``shim_ejections_total
{backend}``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shim.config import EjectionSection
from shim.metrics import Metrics
from shim.pool import Backend

log = logging.getLogger("mmshim.ejection")


@dataclass(slots=True)
class Outlier:
    """One backend's record: failures in a row, ejections in a row, trial successes."""

    failures: int = 0
    ejections: int = 0
    successes: int = 0
    until: float = 0.0


class Ejector:
    """Fed every request outcome by the pool (``Backend.on_result``); sets
    ``Backend.ejected_until`` / ``trial_inflight``, which ``Backend.healthy`` reads."""

    def __init__(self, backends: dict[str, Backend], cfg: EjectionSection, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._backends = backends
        self._cfg = cfg
        self._metrics = metrics
        self._clock = clock
        self.records = {name: Outlier() for name in backends}
        for backend in backends.values():
            backend.on_result = self.record
            # The pool's own trip-and-reset (reset by passing probes) is replaced.
            backend.failure_limit = 1 << 30
            metrics.ejected.labels(backend.name).set_function(
                functools.partial(self._gauge, backend.name))

    def record(self, name: str, ok: bool) -> None:
        """One request to ``name`` ended: a reply came (``ok``) or it failed."""
        rec = self.records.get(name)
        if rec is None:
            return
        backend = self._backends[name]
        now = self._clock()
        if ok:
            rec.failures = 0
            if rec.ejections:
                rec.successes += 1
                if rec.successes >= self._cfg.readmit_successes:
                    log.info("backend %s re-admitted after %d successful requests",
                             name, rec.successes)
                    rec.ejections = rec.successes = 0
                    backend.trial_inflight = 0
                    backend.ejected_until = 0.0
            return
        if now < rec.until:
            return  # already out (a late failure of a request sent before)
        rec.failures += 1
        on_trial = rec.ejections > 0
        if on_trial or rec.failures >= self._cfg.consecutive_failures:
            self._eject(name, rec, backend, now)

    def _eject(self, name: str, rec: Outlier, backend: Backend, now: float) -> None:
        rec.ejections += 1
        rec.failures = rec.successes = 0
        seconds = min(self._cfg.base_ejection_ms * rec.ejections,
                      self._cfg.max_ejection_ms) / 1000
        rec.until = now + seconds
        backend.ejected_until = rec.until
        backend.trial_inflight = max(0, self._cfg.trial_inflight)
        self._metrics.ejections.labels(name).inc()
        log.warning("backend %s ejected for %.1f s (ejection %d in a row)", name, seconds,
                    rec.ejections)

    def _gauge(self, name: str) -> float:
        return 1.0 if self.ejected(name) else 0.0

    def ejected(self, name: str) -> bool:
        """Out of rotation now (not counting the trial after it)."""
        return self._clock() < self.records[name].until

    def describe(self) -> dict[str, Any]:
        now = self._clock()
        return {name: {"ejected": now < r.until,
                       "for_s": round(max(0.0, r.until - now), 3),
                       "ejections_in_a_row": r.ejections,
                       "on_trial": bool(r.ejections) and now >= r.until}
                for name, r in self.records.items()}
