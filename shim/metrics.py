"""Prometheus metrics, on a registry of the shim's own (no module-level globals).

Label children are cached per label tuple by prometheus-client itself; the hot path
only does a dict lookup and a locked increment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0)


class Registry(CollectorRegistry):
    """prometheus-client's registry, with callbacks run before every collection
    (``before_collect``): counts kept outside these objects (the compiled core's,
    shim.fastpath) are added first, so a scrape reads them up to date."""

    def __init__(self) -> None:
        super().__init__()
        self.before_collect: list[Callable[[], None]] = []

    def refresh(self) -> None:
        """Run the ``before_collect`` callbacks (readers of metric objects call this)."""
        for callback in self.before_collect:
            callback()

    def collect(self) -> Iterator[Any]:
        self.refresh()
        yield from super().collect()


class Metrics:
    """Every metric the shim exports."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.requests = Counter("shim_requests",
                                "Requests answered, by backend, action and outcome",
                                ["backend", "action", "outcome"], registry=r)
        self.latency = Histogram("shim_request_latency_seconds", "Request latency in the shim",
                                 ["backend", "action"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("shim_inflight", "Requests waiting for a backend",
                              ["backend"], registry=r)
        self.backend_up = Gauge("shim_backend_up", "1 when the backend is healthy",
                                ["backend"], registry=r)
        self.weight = Gauge("shim_weight_percent", "Current routing weight", ["backend"],
                            registry=r)
        self.bad_requests = Counter("shim_bad_requests", "Requests refused, by reason",
                                    ["reason"], registry=r)
        self.late_replies = Counter("shim_late_replies",
                                    "Backend replies that matched no waiting request",
                                    ["backend"], registry=r)
        self.timeouts = Counter("shim_timeouts", "Backend requests that hit their deadline",
                                ["backend"], registry=r)
        self.unroutable = Counter("shim_unroutable_replies",
                                  "Replies to clients that had gone away", registry=r)
        self.dropped_replies = Counter(
            "shim_dropped_replies", "Replies dropped to bound memory, by reason: slow_reader "
            "(a client's send queue full), backend_too_large (over shim.max_reply_bytes)",
            ["reason"], registry=r)
        self.failovers = Counter("shim_failovers", "Requests retried on another backend",
                                 ["from_backend", "to_backend"], registry=r)
        self.admin_denied = Counter("shim_admin_denied", "Admin requests refused", ["reason"],
                                    registry=r)
        self.admin_changes = Counter("shim_admin_changes", "Runtime changes applied",
                                     ["command"], registry=r)
        self.shadow = Counter("shim_shadow", "Shadow comparisons by outcome",
                              ["action", "outcome"], registry=r)
        self.duplicate_models = Counter("shim_duplicate_models",
                                        "Models found loaded on two backends at once",
                                        ["model"], registry=r)
        self.duplicate_repairs = Counter("shim_duplicate_repairs",
                                         "Duplicate models unloaded from a non-owner",
                                         ["backend"], registry=r)
        self.ejected = Gauge("shim_backend_ejected",
                             "1 while the backend is ejected for failing requests",
                             ["backend"], registry=r)
        self.ejections = Counter("shim_ejections", "Outlier ejections of a backend",
                                 ["backend"], registry=r)
        self.handovers = Counter("shim_model_handovers", "Models moved between backends",
                                 ["from_backend", "to_backend"], registry=r)
        self.duplicate_joins = Counter("shim_duplicate_joins",
                                       "Re-sent duplicates answered from the request in "
                                       "flight, by how they were matched",
                                       ["kind"], registry=r)
        self.vram_used = Gauge("shim_backend_vram_used_mb", "VRAM used per backend ledger",
                               ["backend"], registry=r)
        self.vram_budget = Gauge("shim_backend_vram_budget_mb", "VRAM budget per backend ledger",
                                 ["backend"], registry=r)
        self.addon_errors = Counter("shim_addon_errors",
                                    "Exceptions an addon raised in a hook, swallowed "
                                    "(shim.addons.base): the client's reply is unchanged",
                                    ["addon", "hook"], registry=r)

    def record_request(self, backend: str, action: str, outcome: str, seconds: float) -> None:
        """Count one answered request and its latency (label children cached: hot path)."""
        key = (backend, action, outcome)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(backend, action, outcome),
                        self.latency.labels(backend, action))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def addon_failed(self, addon: str, hook: str) -> None:
        """``AddonManager``'s ``on_error``: count one swallowed addon exception."""
        self.addon_errors.labels(addon, hook).inc()

    def refresh(self) -> None:
        """Bring counts kept elsewhere (the compiled core's) into these metrics and the
        frontend counts now: what a reader of the metric objects calls first (a scrape
        does it by itself)."""
        self.registry.refresh()

    def export_counts(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Frontend totals read at scrape time (no cost on the hot path):
        ``shim_frontend_total{kind=requests|replies|unroutable}``."""
        self.registry.register(_CountsCollector(counts))

    def serve(self, address: str) -> None:
        """Expose /metrics over HTTP on ``host:port`` (a daemon thread)."""
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)


class _CountsCollector(Collector):
    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "shim_frontend", "Frontend messages: requests in, replies out, replies to clients "
            "that had gone", labels=["kind"])
        for kind, value in self._counts().items():
            family.add_metric([kind], value)
        yield family
