"""Medians, ratios to zmq.proxy, the targets, and the printed tables."""

from __future__ import annotations

import statistics
from typing import Any

from bench.scenarios import Scenario

Targets = list[dict[str, Any]]


def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _metric(sc: Scenario, phase: str, key: str) -> list[float | None]:
    return [r[phase].get(key) for r in sc.rounds]


def _ratio(sc: Scenario, ref: Scenario | None, phase: str, key: str) -> float | None:
    """Median over rounds of (this scenario / the reference), paired within each round."""
    if ref is None:
        return None
    pairs = zip(_metric(sc, phase, key), _metric(ref, phase, key), strict=False)
    return _med([a / b for a, b in pairs if a is not None and b])


def summarize(scenarios: list[Scenario]) -> dict[str, dict[str, Any]]:
    by_key = {s.key: s for s in scenarios}
    out: dict[str, dict[str, Any]] = {}
    for sc in scenarios:
        if not sc.rounds:
            out[sc.key] = {"label": sc.label, "failed": sc.failed or "not measured"}
            continue
        ref = by_key.get(sc.reference)
        direct = by_key.get("direct-rep" if sc.reference == "zmq.proxy-rep" else "direct")
        d: dict[str, Any] = {"label": sc.label, "rounds": len(sc.rounds), "note": sc.note,
                             "shim": sc.is_shim, "reference": sc.reference}
        for phase in ("dealer", "req"):
            for key in ("rate", "p50_us", "p99_us"):
                d[f"{phase}_{key}"] = _med(_metric(sc, phase, key))
                if sc is not ref:
                    d[f"{phase}_{key}_x"] = _ratio(sc, ref, phase, key)
        d["cpu_us_per_req"] = _med(_metric(sc, "dealer", "cpu_us_per_req"))
        if sc is not ref:
            d["cpu_us_per_req_x"] = _ratio(sc, ref, "dealer", "cpu_us_per_req")
        d["rss_kb"] = sc.rounds[-1].get("rss_kb")
        d["errors"] = sum(r[p]["errors"] for r in sc.rounds for p in ("dealer", "req"))
        d["lost"] = sum(r[p]["lost"] for r in sc.rounds for p in ("dealer", "req"))
        samples = [r["dealer"].get("sample_error") or r["req"].get("sample_error")
                   for r in sc.rounds]
        d["sample_error"] = next((x for x in samples if x), "")
        if direct is not None and direct.rounds and sc is not direct:
            added = [a - b for a, b in zip(_metric(sc, "req", "p50_us"),
                                           _metric(direct, "req", "p50_us"), strict=False)
                     if a is not None and b is not None]
            d["req_added_p50_us"] = _med(added)  # type: ignore[arg-type]
        base = by_key.get("shim-noshadow")
        if sc.key in ("shim-shadow", "shim-stalled") and base is not None and base.rounds:
            for phase, key in (("req", "p99_us"), ("dealer", "p99_us"), ("dealer", "rate")):
                d[f"{phase}_{key}_vs_noshadow"] = _ratio(sc, base, phase, key)
        out[sc.key] = d
    for d in out.values():  # added latency relative to zmq.proxy's (ratio of medians)
        ref_d = out.get(d.get("reference", ""), {})
        mine, theirs = d.get("req_added_p50_us"), ref_d.get("req_added_p50_us")
        if mine is not None and theirs and d is not ref_d:
            d["req_added_p50_x"] = mine / theirs
    return out


#: The end-to-end scenario the compiled core carries (bench.e2e: ownership off, so
#: generates are passed through without Python).
E2E_PASSED = "shim -> MMA (passed, no ownership)"


def targets(summary: dict[str, dict[str, Any]], rss: dict[str, Any],
            e2e: dict[str, Any] | None = None) -> Targets:
    """The targets (the first round's and issue 17's), each with figure, limit, verdict."""
    t: Targets = []

    def add(name: str, value: float | None, limit: float, ok: bool | None, detail: str) -> None:
        verdict = "n/a" if value is None or ok is None else ("PASS" if ok else "MISS")
        t.append({"target": name, "value": value, "limit": limit, "verdict": verdict,
                  "detail": detail})

    for key, what in (("shim-split", "split mma+mma"), ("shim-xlate", "split mma+MMS xlate"),
                      ("shim-split-rep", "split, REP echoes")):
        d = summary.get(key, {})
        x = d.get("dealer_rate_x")
        add(f"throughput >= 0.75 x zmq.proxy ({what})", x, 0.75,
            None if x is None else x >= 0.75,
            f"{_n(d.get('dealer_rate'))} req/s, pipelined DEALER, 200-byte JSON")
    for key, what in (("shim-split", "split mma+mma"), ("shim-xlate", "split mma+MMS xlate")):
        d = summary.get(key, {})
        x = d.get("req_added_p50_x")
        zp = summary.get("zmq.proxy", {}).get("req_added_p50_us")
        add(f"added REQ p50 <= 1.5 x zmq.proxy's ({what})", x, 1.5,
            None if x is None else x <= 1.5,
            f"shim +{_n(d.get('req_added_p50_us'))} us vs zmq.proxy +{_n(zp)} us over direct")
    for key, what in (("shim-split", "split mma+mma"), ("shim-xlate", "split mma+MMS xlate"),
                      ("shim-shadow", "shadow, 100 % mirrored")):
        d = summary.get(key, {})
        x = d.get("cpu_us_per_req_x")
        zp = summary.get("zmq.proxy", {}).get("cpu_us_per_req")
        add(f"shim CPU/req <= 2 x zmq.proxy's ({what})", x, 2.0,
            None if x is None else x <= 2.0,
            f"{_n(d.get('cpu_us_per_req'), 1)} us vs zmq.proxy {_n(zp, 1)} us per request")
    e2e_summary = (e2e or {}).get("summary", {})
    direct = e2e_summary.get("MMA direct", {})
    for name in (E2E_PASSED, "shim -> MMA (passed)"):
        d = e2e_summary.get(name)
        x = (d["dealer_rate"] / direct["dealer_rate"]
             if d and direct.get("dealer_rate") else None)
        add(f"end to end >= 0.97 x MMA direct ({name.removeprefix('shim -> ')})", x, 0.97,
            None if x is None else x >= 0.97,
            f"{_n(d.get('dealer_rate') if d else None)} req/s vs direct "
            f"{_n(direct.get('dealer_rate'))} req/s, real n-gram generation")
    stalled, base = summary.get("shim-stalled", {}), summary.get("shim-noshadow", {})
    x = stalled.get("req_p99_us_vs_noshadow")
    note = stalled.get("note", "")
    inactive = "NOT ACTIVE" in note
    add("stalled-shadow REQ p99 <= 1.1 x no-shadow p99"
        + (" [shadow inactive: no verdict]" if inactive else ""), x, 1.1,
        None if x is None or inactive else x <= 1.1,
        f"REQ p99 {_n(stalled.get('req_p99_us'))} us vs {_n(base.get('req_p99_us'))} us; "
        f"pipelined p99 x{_f(stalled.get('dealer_p99_us_vs_noshadow'))}, "
        f"req/s x{_f(stalled.get('dealer_rate_vs_noshadow'))}"
        + (f"; {note}" if note else ""))
    if rss:
        mb = rss.get("per_1m_mb")
        add(f"RSS growth < 10 MB per 1M requests ({rss.get('how', '')})", mb, 10.0,
            None if mb is None else mb < 10.0, rss.get("detail", ""))
    return t


# -- printing -----------------------------------------------------------------------------

def _n(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _x(v: float | None) -> str:
    return "" if v is None else f" ({v:.2f}x)"


def tables(summary: dict[str, dict[str, Any]], settings: Any) -> str:
    lines: list[str] = []
    w = max([len(d["label"]) for d in summary.values()] + [10])
    lines.append(f"Pipelined: {settings.sockets} DEALER sockets x {settings.window} in flight, "
                 f"one load-generator process; {settings.dealer_s:g} s per visit; CPU us/req = "
                 f"CPU time of the process under test (all its threads) / requests; "
                 f"median of {settings.rounds} alternating rounds; (Nx) = ratio to zmq.proxy "
                 f"in the same round")
    head = (f"{'scenario':{w}} | {'req/s':>16} | {'p50 ms':>13} | {'p99 ms':>13} | "
            f"{'CPU us/req':>15} | {'RSS MB':>6} | err/lost")
    lines += [head, "-" * len(head)]
    for d in summary.values():
        if "failed" in d:
            lines.append(f"{d['label']:{w}} | FAILED: {d['failed'].splitlines()[0][:80]}")
            continue
        p50 = None if d["dealer_p50_us"] is None else d["dealer_p50_us"] / 1000
        p99 = None if d["dealer_p99_us"] is None else d["dealer_p99_us"] / 1000
        rss = None if d["rss_kb"] is None else d["rss_kb"] / 1024
        lines.append(
            f"{d['label']:{w}} | {_n(d['dealer_rate']) + _x(d.get('dealer_rate_x')):>16} | "
            f"{_n(p50, 2) + _x(d.get('dealer_p50_us_x')):>13} | "
            f"{_n(p99, 2) + _x(d.get('dealer_p99_us_x')):>13} | "
            f"{_n(d['cpu_us_per_req'], 1) + _x(d.get('cpu_us_per_req_x')):>15} | "
            f"{_n(rss, 1):>6} | {d['errors']}/{d['lost']}")
    lines.append("")
    lines.append(f"Lockstep: one REQ client per scenario, all taking turns request by request "
                 f"({settings.req_s:g} s per round), so every scenario is sampled in the same "
                 f"instants; req/s = 1 / mean RTT; added = p50 minus the direct p50 to the same "
                 f"echo")
    head = (f"{'scenario':{w}} | {'req/s':>15} | {'p50 us':>15} | {'p99 us':>15} | "
            f"{'added p50 us':>18}")
    lines += [head, "-" * len(head)]
    for d in summary.values():
        if "failed" in d:
            continue
        added = d.get("req_added_p50_us")
        lines.append(
            f"{d['label']:{w}} | {_n(d['req_rate']) + _x(d.get('req_rate_x')):>15} | "
            f"{_n(d['req_p50_us']) + _x(d.get('req_p50_us_x')):>15} | "
            f"{_n(d['req_p99_us']) + _x(d.get('req_p99_us_x')):>15} | "
            f"{(_n(added) + _x(d.get('req_added_p50_x'))) if added is not None else '':>18}")
    notes = [f"  {d['label']}: {d['note']}" for d in summary.values() if d.get("note")]
    errs = [f"  {d['label']}: e.g. {d['sample_error'][:160]}" for d in summary.values()
            if d.get("sample_error")]
    if notes:
        lines += ["", "Notes:", *notes]
    if errs:
        lines += ["", "Error replies seen:", *errs]
    return "\n".join(lines)


def targets_text(t: Targets) -> str:
    w = max(len(x["target"]) for x in t)
    lines = ["Targets:"]
    for x in t:
        v = "-" if x["value"] is None else f"{x['value']:.2f}"
        lines.append(f"  [{x['verdict']:4}] {x['target']:{w}}  {v:>6} (limit {x['limit']:g})"
                     f"  {x['detail']}")
    return "\n".join(lines)
