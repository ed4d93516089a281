"""`gateway report --html FILE` (issue 19, "a report people look at"): the trends
of `gateway stats` drawn with plotly, in one self-contained HTML page.

Everything shown comes from `gateway.desk.stats`: the period's figures are the
dict `gateway stats --json` prints for the same options, the weeks are
`stats.weekly` (`stats.report` over each week's tickets). Nothing is counted
here. The numbers are also in the page as tables whose cells carry the JSON
value (`data-key`, `data-value`; a week's row its `data-since`/`data-until`),
so a script or a test reads them without parsing the charts.

plotly.js is embedded inline once (`include_plotlyjs=True` on the first chart):
the file opens with no network, from a mail attachment or a file share.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from jinja2 import Environment, FileSystemLoader, select_autoescape

from gateway.desk import stats
from gateway.store import iso

# the period's figures shown in the summary table, in this order
SUMMARY = (("opened", "Tickets opened"), ("resolved_count", "of them resolved"), ("closed_count", "of them closed"),
           ("open", "still open"), ("pending", "pending"),
           ("first_response_avg_s", "First response, average"), ("first_response_median_s", "First response, median"),
           ("first_response_count", "answered"),
           ("resolution_avg_s", "Resolution, average"), ("resolution_median_s", "Resolution, median"),
           ("resolution_count", "resolved, escalated left out"), ("escalated_excluded", "escalated (left out)"),
           ("targets_met", "First-response targets met"), ("targets_missed", "missed"),
           ("targets_met_share", "Share of targets met"))
# a week's row, and a category's or product's row over the period
COLUMNS = (("opened", "opened"), ("resolved_count", "resolved"), ("closed_count", "closed"),
           ("first_response_avg_s", "1st resp avg"), ("first_response_median_s", "median"),
           ("resolution_avg_s", "resolution avg"), ("resolution_median_s", "median"),
           ("escalated_excluded", "escal."), ("targets_met", "met"), ("targets_missed", "missed"),
           ("targets_met_share", "met share"))
PARTS = (("category", "Category"), ("product", "Product"))
CHART_HEIGHT = 380


def shown(key: str, value: Any) -> str:
    """A figure as the page prints it: durations as `stats table` does, shares in %."""
    if key.endswith("_s"):
        return stats.duration(value)
    if key.endswith("_share"):
        return "-" if value is None else f"{value:.0%}"
    return "-" if value is None else str(value)


def _names(weeks: list[dict[str, Any]], rep: dict[str, Any], part: str) -> list[str]:
    return sorted(set(rep.get(f"by_{part}", {})) | {n for w in weeks for n in w[f"by_{part}"]})


def _label(week: dict[str, Any]) -> str:
    return f"{week['week']} ({week['since']:%d %b})"


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 3600


def charts(rep: dict[str, Any], weeks: list[dict[str, Any]]) -> list[tuple[str, go.Figure]]:
    """The page's figures, each with its element id."""
    x = [_label(w) for w in weeks]
    layout: dict[str, Any] = {"template": "plotly_white", "height": CHART_HEIGHT,
                              "margin": {"l": 60, "r": 30, "t": 60, "b": 60},
                              "xaxis": {"type": "category", "title": {"text": "week (Monday 00:00 UTC)"}},
                              "legend": {"orientation": "h", "y": -0.25}}
    figures: list[tuple[str, go.Figure]] = []
    for part, title in PARTS:
        bars = [go.Bar(name=name if name != "-" else "(none)", x=x,
                       y=[w[f"by_{part}"].get(name, {}).get("opened", 0) for w in weeks])
                for name in _names(weeks, rep, part)]
        fig = go.Figure(bars, layout={**layout, "barmode": "stack", "title": {"text": f"Tickets per week by {part}"},
                                      "yaxis": {"title": {"text": "tickets opened"}}})
        figures.append((f"chart-{part}", fig))
    lines = [go.Scatter(name=name, x=x, y=[_hours(w[key]) for w in weeks], mode="lines+markers",
                        line={"dash": "dot"} if "median" in key else {})
             for key, name in (("first_response_avg_s", "first response, average"),
                               ("first_response_median_s", "first response, median"),
                               ("resolution_avg_s", "resolution, average (escalated left out)"),
                               ("resolution_median_s", "resolution, median"))]
    figures.append(("chart-times", go.Figure(lines, layout={
        **layout, "title": {"text": "First response and resolution per week"},
        "yaxis": {"title": {"text": "hours"}, "rangemode": "tozero"}})))
    share = [None if w["targets_met_share"] is None else w["targets_met_share"] * 100 for w in weeks]
    targets = [go.Bar(name="met", x=x, y=[w["targets_met"] for w in weeks], marker={"color": "#2ca02c"}),
               go.Bar(name="missed", x=x, y=[w["targets_missed"] for w in weeks], marker={"color": "#d62728"}),
               go.Scatter(name="share met (%)", x=x, y=share, yaxis="y2", mode="lines+markers",
                          line={"color": "#1f77b4"})]
    figures.append(("chart-targets", go.Figure(targets, layout={
        **layout, "barmode": "stack", "title": {"text": "First-response targets met per week"},
        "yaxis": {"title": {"text": "tickets with a known outcome"}},
        "yaxis2": {"title": {"text": "met"}, "overlaying": "y", "side": "right", "range": [0, 105], "dtick": 25,
                   "ticksuffix": "%", "showgrid": False}})))
    return figures


def page(rep: dict[str, Any], weeks: list[dict[str, Any]]) -> str:
    """The whole HTML page. `rep`: what `gateway stats --json` prints for the period;
    `weeks`: `stats.weekly` over the same tickets and period."""
    divs = [fig.to_html(full_html=False, include_plotlyjs=n == 0, div_id=div_id,
                        config={"displaylogo": False, "responsive": True})
            for n, (div_id, fig) in enumerate(charts(rep, weeks))]
    env = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["shown"] = lambda value, key: shown(key, value)
    env.filters["iso"] = iso
    return env.get_template("report.html.j2").render(
        rep=rep, weeks=weeks, charts=divs, summary=SUMMARY, columns=COLUMNS,
        parts=[(part, title, _names(weeks, rep, part)) for part, title in PARTS])
