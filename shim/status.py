"""The operator's view of a running shim: one JSON document for ``/api/status``.

``StatusBoard`` samples the shim's own Prometheus counters once a second (a bounded ring,
``keep`` samples: five minutes by default) so that rates and latency percentiles cover a
recent window rather than the whole uptime, and the page can chart the last minutes.
Everything else comes from the components' ``describe()`` dicts, whatever components the
shim has: known keys ("backends", "ownership", "shadow", "rollout") get dedicated views on
the page, any other component is shown generically under its key.

The document (all times in seconds since the epoch, rates as fractions 0..1)::

    {"time": 1764536400.1, "uptime_s": 12.3, "mode": "split", "accepting": true,
     "weights": {"mma": 90.0, "mms": 10.0}, "inflight": 0,
     "counts": {"requests": 40, "replies": 40, ...},
     "backends": {"mma": {"dialect": "mma", "healthy": true, "ejected": false,
                          "weight": 90.0, "inflight": 0, "requests_total": 36,
                          "errors_total": 0, "timeouts_total": 0, "rps": 1.2,
                          "error_rate": 0.0, "timeout_rate": 0.0,
                          "latency_ms": {"p50": 1.0, "p95": 2.5, "p99": 5.0},
                          "vram_used_mb": 1200.0, "vram_budget_mb": 8000.0}, ...},
     "ownership": {...Ownership.describe()...},
     "shadow": {"activity": {...}, "actions": {"status": {"compared": 4, "mismatch": 1,
                "mismatch_rate": 0.25, "paths": [{"path": "...", "count": 1}]}}},
     "rollout": {...}, "audit": [{...audit line...}], "history": {...},
     "<other component>": {...}}
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

if TYPE_CHECKING:
    from shim.config import ShimConfig
    from shim.metrics import Metrics
    from shim.proxy import Proxy


class StatusSource(Protocol):
    """What the status board reads of a running shim (shim.app's ``Shim`` is one): the
    config it started with, its metrics, when it started, the proxy once started, the
    components to describe (``extras``, and ``rollout``/``ejection``/``recorder``/
    ``ownership``/``shadow`` where set), and the health description."""

    cfg: ShimConfig
    metrics: Metrics
    started: float
    proxy: Proxy | None
    extras: list[Any]

    def describe_health(self) -> dict[str, Any]: ...

log = logging.getLogger("mmshim.status")

#: Audit lines shown, newest last; read from the end of the audit file only.
AUDIT_LINES = 20
AUDIT_TAIL_BYTES = 32 * 1024
#: Seconds of history the rates and percentiles are computed over.
RATE_WINDOW_S = 60.0
#: How often the diff log's top paths are re-read at most (a file read, off the loop).
DIFFS_REFRESH_S = 5.0
#: Components whose describe() the page knows; others are rendered generically.
KNOWN_SECTIONS = ("backends", "ownership", "shadow", "rollout")


@dataclass(slots=True)
class BackendCounts:
    """Cumulative counters of one backend at one instant (from the metrics registry)."""

    requests: float = 0.0
    errors: float = 0.0
    timeouts: float = 0.0
    #: Latency histogram: cumulative count per upper bound (seconds), +Inf last.
    buckets: dict[float, float] = field(default_factory=dict)


@dataclass(slots=True)
class Sample:
    t: float
    backends: dict[str, BackendCounts]
    weights: dict[str, float]


def read_counts(shim: StatusSource) -> dict[str, BackendCounts]:
    """Per-backend totals from the shim's own counters (``shim_requests_total``,
    ``shim_timeouts_total``, ``shim_request_latency_seconds``)."""
    m = shim.metrics
    out: dict[str, BackendCounts] = {}

    def get(name: str) -> BackendCounts:
        return out.setdefault(name, BackendCounts())

    for family in m.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                c = get(s.labels["backend"])
                c.requests += s.value
                if s.labels["outcome"] != "ok":
                    c.errors += s.value
    for family in m.timeouts.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                get(s.labels["backend"]).timeouts += s.value
    for family in m.latency.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                c = get(s.labels["backend"])
                le = float(s.labels["le"])
                c.buckets[le] = c.buckets.get(le, 0.0) + s.value
    return out


def percentile(buckets: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a cumulative histogram, interpolated linearly within
    its bucket as Prometheus' ``histogram_quantile`` does; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            frac = (rank - lower_count) / width if width > 0 else 1.0
            return lower_bound + (bound - lower_bound) * frac
        lower_bound, lower_count = bound, count
    return lower_bound


def _delta(new: BackendCounts, old: BackendCounts | None) -> BackendCounts:
    if old is None:
        return new
    return BackendCounts(
        requests=new.requests - old.requests, errors=new.errors - old.errors,
        timeouts=new.timeouts - old.timeouts,
        buckets={le: v - old.buckets.get(le, 0.0) for le, v in new.buckets.items()})


def _ratio(part: float, whole: float) -> float:
    return round(part / whole, 6) if whole > 0 else 0.0


def tail_lines(path: Path, count: int, max_bytes: int = AUDIT_TAIL_BYTES) -> list[str]:
    """The last ``count`` complete lines of a file, reading at most ``max_bytes`` of it."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    if size > max_bytes:
        lines = lines[1:]  # the first one is cut
    return [ln.decode("utf-8", "replace") for ln in lines if ln.strip()][-count:]


def section_key(component: Any) -> str:
    """The /api/status key of a component: its ``status_key`` attribute, else a name
    derived from its class (``RolloutEngine`` -> ``rollout``, ``Ownership`` -> ...)."""
    key = getattr(component, "status_key", None)
    if isinstance(key, str) and key:
        return key
    name = type(component).__name__.lower()
    for known in ("rollout", "ownership", "shadow", "eject", "record"):
        if known in name:
            return {"eject": "ejection", "record": "recorder"}.get(known, known)
    return name


class StatusBoard:
    """Samples the counters every ``interval_s`` and builds the /api/status document."""

    def __init__(self, shim: StatusSource, *, interval_s: float = 1.0, keep: int = 300) -> None:
        self._shim = shim
        self.interval_s = interval_s
        self.samples: deque[Sample] = deque(maxlen=keep)
        self._task: asyncio.Task[None] | None = None
        self._diffs: dict[str, Any] = {}
        self._diffs_read_at = -math.inf
        self._diffs_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        for task in (self._task, self._diffs_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.sample()
            except Exception:  # the status page must never take the shim down
                log.exception("status: cannot sample the counters")

    def sample(self) -> None:
        self._shim.metrics.refresh()
        proxy = self._shim.proxy
        weights = dict(proxy.runtime.weights) if proxy is not None else {}
        self.samples.append(Sample(time.time(), read_counts(self._shim), weights))

    # -- the document -------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The whole /api/status document (see the module docstring)."""
        shim = self._shim
        proxy = shim.proxy
        if proxy is None:
            return {"time": time.time(), "starting": True}
        shim.metrics.refresh()
        rt = proxy.runtime
        now = time.time()
        doc: dict[str, Any] = {
            "time": now,
            "uptime_s": round(now - shim.started, 3),
            "mode": rt.mode,
            "accepting": proxy.accepting,
            "weights": dict(rt.weights),
            "inflight": proxy.inflight,
            "counts": dict(proxy.counts),
            "backends": self._backends(),
        }
        ownership = getattr(shim, "ownership", None)
        if ownership is not None:
            doc["ownership"] = ownership.describe()
        doc["shadow"] = self._shadow()
        # Components in the shim's extras, or hung on it by name (another addon's engine).
        named = [getattr(shim, attr) for attr in ("rollout", "ejection", "recorder")
                 if getattr(shim, attr, None) is not None]
        for extra in [*shim.extras, *named]:
            describe = getattr(extra, "describe", None)
            key = section_key(extra)
            if callable(describe) and key not in doc:
                try:
                    doc[key] = describe()
                except Exception as exc:  # one broken component must not hide the rest
                    doc[key] = {"error": f"describe() failed: {exc}"}
        doc["audit"] = self._audit()
        doc["history"] = self._history()
        return doc

    def _window(self) -> tuple[Sample | None, Sample | None]:
        if not self.samples:
            return None, None
        last = self.samples[-1]
        first = next((s for s in self.samples if last.t - s.t <= RATE_WINDOW_S), last)
        return first, last

    def _backends(self) -> dict[str, Any]:
        shim = self._shim
        assert shim.proxy is not None
        rt = shim.proxy.runtime
        now_counts = read_counts(shim)
        first, _ = self._window()
        span = time.time() - first.t if first is not None else 0.0
        health = shim.describe_health()["details"]["backends"] \
            if getattr(shim, "prober", None) else {}
        out: dict[str, Any] = {}
        for name, backend in shim.proxy.pool.backends.items():
            total = now_counts.get(name, BackendCounts())
            recent = _delta(total, first.backends.get(name) if first else None)
            ejected = shim.metrics.registry.get_sample_value("shim_backend_ejected",
                                                             {"backend": name})
            h = health.get(name, {})
            out[name] = {
                "dialect": backend.dialect,
                "healthy": backend.healthy,
                "ejected": bool(ejected) if ejected is not None else None,
                "weight": rt.weights.get(name, 0.0),
                "share": rt.table.share(name),
                "inflight": backend.inflight,
                "requests_total": int(total.requests),
                "errors_total": int(total.errors),
                "timeouts_total": int(total.timeouts),
                "rps": round(recent.requests / span, 3) if span > 0.5 else 0.0,
                "error_rate": _ratio(recent.errors, recent.requests),
                "timeout_rate": _ratio(recent.timeouts, recent.requests),
                "latency_ms": {
                    f"p{round(q * 100)}": (None if (v := percentile(recent.buckets, q)) is None
                                           else round(v * 1000, 3))
                    for q in (0.5, 0.95, 0.99)},
                "vram_used_mb": h.get("vram_used_mb"),
                "vram_budget_mb": h.get("vram_budget_mb"),
            }
        return out

    def _shadow(self) -> dict[str, Any]:
        """Mismatch rates by action from ``shim_shadow_total``; top differing paths from
        the diff log (re-read in a thread at most every DIFFS_REFRESH_S)."""
        shim = self._shim
        actions: dict[str, dict[str, Any]] = {}
        for family in shim.metrics.shadow.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    a = actions.setdefault(s.labels["action"], {"compared": 0})
                    a[s.labels["outcome"]] = int(s.value)
        for a in actions.values():
            a["compared"] = a.get("match", 0) + a.get("mismatch", 0)
            a["mismatch_rate"] = _ratio(a.get("mismatch", 0), a["compared"])
        self._refresh_diffs()
        for action, report in self._diffs.get("actions", {}).items():
            actions.setdefault(action, {"compared": 0})["paths"] = [
                {"path": p["path"], "count": p["count"]} for p in report.get("paths", [])]
        out: dict[str, Any] = {"actions": dict(sorted(actions.items()))}
        shadow = getattr(shim, "shadow", None)
        if shadow is not None:
            out["activity"] = shadow.describe()
        return out

    def _refresh_diffs(self) -> None:
        shadow = getattr(self._shim, "shadow", None)
        if shadow is None or time.monotonic() - self._diffs_read_at < DIFFS_REFRESH_S:
            return
        if self._diffs_task is not None and not self._diffs_task.done():
            return
        self._diffs_read_at = time.monotonic()
        path = self._shim.cfg.shadow.diff_log

        def read() -> dict[str, Any]:
            from shim.difflog import Tally, log_files, read_records

            return Tally().add_all(read_records(path)).as_json(5) if log_files(path) else {}

        async def refresh() -> None:
            try:
                self._diffs = await asyncio.to_thread(read)
            except Exception as exc:
                log.warning("status: cannot read the diff log %s: %s", path, exc)

        with contextlib.suppress(RuntimeError):  # no running loop (a sync caller)
            self._diffs_task = asyncio.get_running_loop().create_task(refresh())

    def _audit(self) -> list[Any]:
        from shim.admin import audit_path

        out: list[Any] = []
        for line in tail_lines(audit_path(self._shim.cfg.shim), AUDIT_LINES):
            try:
                out.append(msgspec.json.decode(line))
            except msgspec.DecodeError:
                out.append({"line": line})
        return out

    def _history(self) -> dict[str, Any]:
        """Per-interval rates over the kept samples, for the page's charts."""
        samples = list(self.samples)
        t: list[float] = []
        rps: dict[str, list[float]] = {}
        errors: dict[str, list[float]] = {}
        weights: dict[str, list[float]] = {}
        for prev, cur in itertools.pairwise(samples):
            dt = cur.t - prev.t
            if dt <= 0:
                continue
            t.append(round(cur.t, 3))
            for name in cur.backends.keys() | cur.weights.keys():
                d = _delta(cur.backends.get(name, BackendCounts()), prev.backends.get(name))
                rps.setdefault(name, []).append(round(d.requests / dt, 3))
                errors.setdefault(name, []).append(_ratio(d.errors, d.requests))
                weights.setdefault(name, []).append(cur.weights.get(name, 0.0))
        return {"t": t, "rps": rps, "error_rate": errors, "weights": weights}
