"""Per-request metrics as an addon: recorded from the flow once the client has its reply.

``after_reply`` counts every answered request, the shim's own error replies included:
``shim_requests_total{backend, action, outcome}`` and
``shim_request_latency_seconds{backend, action}`` (``Metrics.record_request``), with the
labels the flow carries (``served_by``, ``action``, ``outcome``) and the time from the
request's arrival to its reply. The weight gauges (``shim_weight_percent{backend}``)
follow the RuntimeStore: they subscribe to it and change with every swap.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from shim.addons.base import Addon, Flow
from shim.metrics import Metrics
from shim.runtime import Runtime, RuntimeStore


class RequestMetrics(Addon):
    """The metrics addon (``backends``: the running backends, for the weight gauges)."""

    name = "metrics"

    def __init__(self, metrics: Metrics, store: RuntimeStore, backends: Iterable[str]) -> None:
        self._metrics = metrics
        self._record = metrics.record_request
        self._backends = list(backends)
        store.subscribe(self._weights)

    def _weights(self, old: Runtime, new: Runtime) -> None:
        for name in self._backends:
            self._metrics.weight.labels(name).set(new.weights.get(name, 0.0))

    def fastpath_quiet(self, rt: Runtime) -> bool:
        """The compiled core keeps these counts itself (shim.fastpath adds them in)."""
        return True

    def after_reply(self, flow: Flow) -> None:
        self._record(flow.served_by, flow.action, flow.outcome,
                     time.perf_counter() - flow.started)


__all__ = ["RequestMetrics"]
