"""First-response and resolution figures (pure), as the public support pages
report them: "first response 51 minutes, resolution 18 hours, escalations
excluded".

Over the tickets created in the period: first response is the first relayed
staff answer minus creation; resolution is the first of resolved/closed
minus creation. Escalated tickets are left out of the resolution figures
(`escalated_excluded` says how many escalated tickets the period has), never
out of first response. The share of first-response targets met counts the
tickets whose outcome is known (recorded met or missed: `sla_outcome`, or a
first answer before or after its due time); a target still running counts
neither way.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from statistics import mean, median
from typing import Any

from gateway.model import REGIONS, Status, Ticket


def _seconds(values: Sequence[float]) -> dict[str, float | None]:
    return {"avg_s": round(mean(values), 1) if values else None,
            "median_s": round(median(values), 1) if values else None}


def outcome(t: Ticket) -> str | None:
    """Whether the ticket's first-response target was met: met, missed, or None
    (no target, or still running)."""
    if t.sla_outcome is not None:
        return t.sla_outcome
    if t.response_due_at is None or t.first_response_at is None:
        return None
    return "met" if t.first_response_at <= t.response_due_at else "missed"


def figures(tickets: Iterable[Ticket]) -> dict[str, Any]:
    ts = list(tickets)
    outcomes = [o for o in map(outcome, ts) if o is not None]
    met = outcomes.count("met")
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
        "opened": len(ts),
        "resolved_count": sum(1 for t in ts if t.resolved_at is not None),
        "closed_count": sum(1 for t in ts if t.closed_at is not None),
        "targets_met": met, "targets_missed": len(outcomes) - met,
        "targets_met_share": round(met / len(outcomes), 3) if outcomes else None,
        **counts,
    }


def report(tickets: Iterable[Ticket]) -> dict[str, Any]:
    ts = list(tickets)
    out = figures(ts)
    out["by_region"] = {r: figures(t for t in ts if t.region == r and not t.govcloud) for r in REGIONS}
    out["by_region"]["GOVCLOUD"] = figures(t for t in ts if t.govcloud)
    out["by_priority"] = {str(p): figures(t for t in ts if t.priority == p) for p in (1, 2, 3, 4)}
    for part in ("plan", "category", "product"):
        names = sorted({getattr(t, part) for t in ts})
        out[f"by_{part}"] = {name or "-": figures(t for t in ts if getattr(t, part) == name) for name in names}
    return out


def by_agent(tickets: Iterable[Ticket], first_by: Mapping[int, str], answered: Mapping[str, int],
             open_now: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Per agent address, over the period's tickets: `assigned` (tickets of the
    period the agent owns now), `answered` (relayed staff answers the agent sent
    in the period), `first_responses` (tickets whose first answer was theirs) and
    its average, the average resolution of their assigned tickets (escalations
    excluded, as `figures` does; `escalated_excluded` says how many), and
    `open_now` (open or pending tickets assigned to them, whenever created)."""
    ts = list(tickets)
    agents = sorted({t.owner for t in ts if t.owner} | {a for t in ts if (a := first_by.get(t.id))}
                    | set(answered) | set(open_now))
    out: dict[str, dict[str, Any]] = {}
    for agent in agents:
        owned = [t for t in ts if t.owner == agent]
        firsts = [(t.first_response_at - t.created_at).total_seconds() for t in ts
                  if t.first_response_at and first_by.get(t.id) == agent]
        done = [((t.resolved_at or t.closed_at) - t.created_at).total_seconds()  # type: ignore[operator]
                for t in owned if not t.escalated and (t.resolved_at or t.closed_at)]
        out[agent] = {"assigned": len(owned), "answered": answered.get(agent, 0),
                      "first_responses": len(firsts), "first_response_avg_s": _seconds(firsts)["avg_s"],
                      "resolution_count": len(done), "resolution_avg_s": _seconds(done)["avg_s"],
                      "escalated_excluded": sum(1 for t in owned if t.escalated),
                      "open_now": open_now.get(agent, 0)}
    return out


def agent_table(agents: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The per-agent part of `gateway stats`' table."""
    if not agents:
        return ["Per agent: none in the period"]
    width = max(18, *(len(a) for a in agents))
    lines = [(f"{'agent':<{width}} {'assigned':>8} {'answered':>8} {'1st resp':>8} {'1st resp avg':>13} "
              f"{'resolution avg':>15} {'escal.':>6} {'open now':>8}")]
    for agent, f in agents.items():
        lines.append(f"{agent:<{width}} {f['assigned']:>8} {f['answered']:>8} {f['first_responses']:>8} "
                     f"{duration(f['first_response_avg_s']):>13} {duration(f['resolution_avg_s']):>15} "
                     f"{f['escalated_excluded']:>6} {f['open_now']:>8}")
    return lines


def week_start(at: datetime) -> datetime:
    """Monday 00:00 UTC of the (ISO) week `at` is in."""
    day = at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


def weekly(tickets: Iterable[Ticket], since: datetime | None = None,
           until: datetime | None = None) -> list[dict[str, Any]]:
    """`report` per calendar week (Monday 00:00 UTC), for `gateway report`: from the
    week of the first ticket to the week of the last (weeks between them without
    tickets included), each week clipped to [since, until). A week's `since` and
    `until` are the period for which `gateway stats --since --until` gives the same
    figures: each is `report` over the tickets created in it, nothing recomputed."""
    ts = sorted(tickets, key=lambda t: t.created_at)
    if not ts:
        return []
    created = [t.created_at for t in ts]
    start = week_start(created[0]) if since is None else max(week_start(created[0]), since)
    end = week_start(created[-1]) + timedelta(days=7)
    end = end if until is None else min(end, until)
    weeks: list[dict[str, Any]] = []
    at = start
    while at < end:
        nxt = min(week_start(at) + timedelta(days=7), end)
        year, week, _ = at.astimezone(UTC).isocalendar()
        part = ts[bisect_left(created, at):bisect_left(created, nxt)]
        weeks.append({"week": f"{year}-W{week:02d}", "since": at, "until": nxt, **report(part)})
        at = nxt
    return weeks


def spoken(seconds: float | None) -> str:
    """A duration as the public support pages write it: "51 minutes", "18 hours"."""
    if seconds is None:
        return "none yet"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size * (1 if unit == "minute" else 2):
            n = round(seconds / size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{round(seconds)} seconds"


def month_line(month: str, rep: dict[str, Any]) -> str:
    """NinjaOne's monthly figure: "December 2025: first response 51 minutes,
    resolution 18 hours, escalated tickets excluded"."""
    from datetime import date
    year, m = (int(x) for x in month.split("-"))
    return (f"{date(year, m, 1):%B %Y}: first response {spoken(rep['first_response_avg_s'])}, "
            f"resolution {spoken(rep['resolution_avg_s'])}, escalated tickets excluded")


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
    head = (f"{'':<18} {'opened':>6} {'open':>5} {'pend':>5} {'resolv':>6} {'closed':>6} {'1st resp avg':>13} "
            f"{'median':>10} {'resolution avg':>15} {'median':>10} {'escal.':>6} {'met':>5}")
    rows = [("all", rep)] + [(k, v) for k, v in rep["by_region"].items()] + \
        [(f"P{k}", v) for k, v in rep["by_priority"].items()] + \
        [(f"{part} {k}"[:18], v) for part in ("plan", "category", "product")
         for k, v in rep.get(f"by_{part}", {}).items()]
    lines = [head]
    for name, f in rows:
        share = "-" if f["targets_met_share"] is None else f"{f['targets_met_share']:.0%}"
        lines.append(f"{name:<18} {f['tickets']:>6} {f['open']:>5} {f['pending']:>5} {f['resolved_count']:>6} "
                     f"{f['closed_count']:>6} "
                     f"{duration(f['first_response_avg_s']):>13} {duration(f['first_response_median_s']):>10} "
                     f"{duration(f['resolution_avg_s']):>15} {duration(f['resolution_median_s']):>10} "
                     f"{f['escalated_excluded']:>6} {share:>5}")
    lines.append("Resolution figures leave escalated tickets out; first response counts them. "
                 "met: share of first-response targets met.")
    if rep.get("by_agent") is not None:
        lines.extend(["", *agent_table(rep["by_agent"]), ""])
    if rep.get("govcloud") is not None:
        lines.append("GovCloud tickets only (the enclave)." if rep["govcloud"]
                     else "Commercial tickets only (GovCloud: --govcloud).")
    if rep.get("open_now") is not None:
        lines.append(f"Open now (open or pending, whenever created): {rep['open_now']}")
    if rep.get("summary"):
        lines.append(rep["summary"])
    return "\n".join(lines)
