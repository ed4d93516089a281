"""First-response and resolution figures (pure), as the public support pages
report them: "first response 51 minutes, resolution 18 hours, escalations
excluded".

Over the tickets created in the period: first response is the first relayed
staff answer minus creation; resolution is the first of resolved/closed
minus creation. Escalated tickets are left out of the resolution figures
(`escalated_excluded` says how many escalated tickets the period has), never
out of first response.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from statistics import mean, median
from typing import Any

from gateway.model import REGIONS, Status, Ticket


def _seconds(values: Sequence[float]) -> dict[str, float | None]:
    return {"avg_s": round(mean(values), 1) if values else None,
            "median_s": round(median(values), 1) if values else None}


def figures(tickets: Iterable[Ticket]) -> dict[str, Any]:
    ts = list(tickets)
    first = [(t.first_response_at - t.created_at).total_seconds() for t in ts if t.first_response_at]
    done = [t for t in ts if not t.escalated and (t.resolved_at or t.closed_at)]
    resolution = [((t.resolved_at or t.closed_at) - t.created_at).total_seconds()  # type: ignore[operator]
                  for t in done]
    fr, rs = _seconds(first), _seconds(resolution)
    counts = {s.value: sum(1 for t in ts if t.status is s) for s in Status}
    return {
        "tickets": len(ts),
        "first_response_avg_s": fr["avg_s"], "first_response_median_s": fr["median_s"],
        "first_response_count": len(first),
        "resolution_avg_s": rs["avg_s"], "resolution_median_s": rs["median_s"],
        "resolution_count": len(resolution),
        "escalated_excluded": sum(1 for t in ts if t.escalated),
        **counts,
    }


def report(tickets: Iterable[Ticket]) -> dict[str, Any]:
    ts = list(tickets)
    out = figures(ts)
    out["by_region"] = {r: figures(t for t in ts if t.region == r and not t.govcloud) for r in REGIONS}
    out["by_region"]["GOVCLOUD"] = figures(t for t in ts if t.govcloud)
    out["by_priority"] = {str(p): figures(t for t in ts if t.priority == p) for p in (1, 2, 3, 4)}
    return out


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def table(rep: dict[str, Any]) -> str:
    head = (f"{'':<10} {'tickets':>7} {'open':>5} {'pend':>5} {'1st resp avg':>13} {'median':>10} "
            f"{'resolution avg':>15} {'median':>10} {'escal.':>6}")
    rows = [("all", rep)] + [(k, v) for k, v in rep["by_region"].items()] + \
        [(f"P{k}", v) for k, v in rep["by_priority"].items()]
    lines = [head]
    for name, f in rows:
        lines.append(f"{name:<10} {f['tickets']:>7} {f['open']:>5} {f['pending']:>5} "
                     f"{duration(f['first_response_avg_s']):>13} {duration(f['first_response_median_s']):>10} "
                     f"{duration(f['resolution_avg_s']):>15} {duration(f['resolution_median_s']):>10} "
                     f"{f['escalated_excluded']:>6}")
    lines.append("Resolution figures leave escalated tickets out; first response counts them.")
    return "\n".join(lines)
