"""`gateway.desk.stats` (pure): the figures the public support pages report
(issue 19), from plain tickets."""
from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gateway.cli import UsageError, month_span
from gateway.desk import stats
from gateway.model import Status, Ticket

T0 = datetime(2025, 12, 1, 9, 0, tzinfo=UTC)


def ticket(n: int, *, answered_min: float | None = None, resolved_h: float | None = None, due_min: float = 60,
           escalated: bool = False, outcome: str | None = None, plan: str = "professional",
           status: Status = Status.OPEN) -> Ticket:
    return Ticket(id=n, subject="s", status=status, requester="a@c.example", cc=(), region="EMEA", govcloud=False,
                  priority=2, mailbox="support@example.com", linked_ticket=None, created_at=T0, plan=plan,
                  first_response_at=T0 + timedelta(minutes=answered_min) if answered_min is not None else None,
                  resolved_at=T0 + timedelta(hours=resolved_h) if resolved_h is not None else None,
                  response_due_at=T0 + timedelta(minutes=due_min), escalated=escalated, sla_outcome=outcome)


def test_figures_count_opened_resolved_and_the_share_of_targets_met() -> None:
    ts = [ticket(1, answered_min=30, resolved_h=10, status=Status.RESOLVED),      # met
          ticket(2, answered_min=90, resolved_h=26, status=Status.RESOLVED),      # missed
          ticket(3, answered_min=50, resolved_h=100, escalated=True, status=Status.RESOLVED),  # met, escalated
          ticket(4, outcome="missed"),                                            # breached, unanswered
          ticket(5)]                                                              # still running
    f = stats.figures(ts)
    assert (f["opened"], f["resolved_count"], f["closed_count"]) == (5, 3, 0)
    assert (f["targets_met"], f["targets_missed"], f["targets_met_share"]) == (2, 2, 0.5)
    assert f["first_response_avg_s"] == pytest.approx((30 + 90 + 50) * 60 / 3)
    assert f["resolution_avg_s"] == pytest.approx(18 * 3600)                      # escalated #3 left out
    assert f["escalated_excluded"] == 1 and f["open"] == 2


def test_the_recorded_outcome_wins_over_the_times() -> None:
    # answered after a due time that a pause moved: the ticket recorded "met"
    assert stats.outcome(ticket(1, answered_min=90, outcome="met")) == "met"
    assert stats.outcome(ticket(2, answered_min=90)) == "missed"
    assert stats.outcome(ticket(3)) is None


def test_report_breaks_down_by_plan_and_the_month_reads_like_ninjaones_page() -> None:
    rep = stats.report([ticket(1, answered_min=51, resolved_h=18), ticket(2, answered_min=51, resolved_h=18,
                                                                          plan="advanced")])
    assert set(rep["by_plan"]) == {"advanced", "professional"} and rep["by_plan"]["advanced"]["opened"] == 1
    assert stats.month_line("2025-12", rep) == \
        "December 2025: first response 51 minutes, resolution 18 hours, escalated tickets excluded"
    assert "plan advanced" in stats.table(rep)


@pytest.mark.parametrize(("seconds", "text"), [(None, "none yet"), (42, "42 seconds"), (60, "1 minute"),
                                               (3000, "50 minutes"), (7200, "2 hours"), (5400, "90 minutes"),
                                               (3 * 86400, "3 days")])
def test_durations_are_spoken(seconds: float | None, text: str) -> None:
    assert stats.spoken(seconds) == text


def test_month_span() -> None:
    assert month_span("2025-12") == (datetime(2025, 12, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC))
    assert month_span("2026-02") == (datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC))
    for bad in ("2025-13", "12/2025", "2025-1"):
        with pytest.raises(UsageError):
            month_span(bad)


def test_weeks_start_on_monday_in_utc_and_are_cut_to_the_period() -> None:
    assert stats.week_start(datetime(2025, 11, 9, 23, 59, tzinfo=UTC)) == datetime(2025, 11, 3, tzinfo=UTC)
    assert stats.week_start(datetime(2025, 11, 10, tzinfo=UTC)) == datetime(2025, 11, 10, tzinfo=UTC)
    # T0 is Monday 1 December 2025; one ticket then, one three weeks later: the weeks between are there, empty
    ts = [ticket(1, answered_min=30), ticket(2, answered_min=90)]
    ts[1] = replace(ts[1], created_at=T0 + timedelta(days=17), first_response_at=T0 + timedelta(days=17, minutes=90),
                    response_due_at=T0 + timedelta(days=17, minutes=60))
    weeks = stats.weekly(ts)
    assert [w["week"] for w in weeks] == ["2025-W49", "2025-W50", "2025-W51"]
    assert [w["opened"] for w in weeks] == [1, 0, 1]
    assert [w["targets_met"] for w in weeks] == [1, 0, 0] and weeks[2]["targets_missed"] == 1
    assert weeks[0]["first_response_avg_s"] == 1800 and weeks[1]["first_response_avg_s"] is None
    # each week is `report` over its tickets: the same figures, the same breakdowns
    assert {k: v for k, v in weeks[2].items() if k not in ("week", "since", "until")} == stats.report([ts[1]])
    cut = stats.weekly(ts, T0 + timedelta(hours=1), T0 + timedelta(days=18))
    assert (cut[0]["since"], cut[0]["until"]) == (T0 + timedelta(hours=1), datetime(2025, 12, 8, tzinfo=UTC))
    assert cut[-1]["until"] == T0 + timedelta(days=18) and cut[0]["opened"] == 0
    assert stats.weekly([]) == []


def test_by_agent_counts_assigned_answered_first_responses_and_leaves_escalations_out_of_resolution() -> None:
    a, b = "ann@staff.example", "bob@staff.example"
    ts = [replace(ticket(1, answered_min=30, resolved_h=10, status=Status.RESOLVED), owner=a),
          replace(ticket(2, answered_min=90, resolved_h=100, escalated=True, status=Status.RESOLVED), owner=a),
          replace(ticket(3, answered_min=60), owner=b),
          ticket(4)]
    agents = stats.by_agent(ts, {1: a, 2: b, 3: b}, {a: 3, b: 2}, {b: 1, "carl@staff.example": 2})
    assert list(agents) == [a, b, "carl@staff.example"]
    assert agents[a] == {"assigned": 2, "answered": 3, "first_responses": 1, "first_response_avg_s": 1800,
                         "resolution_count": 1, "resolution_avg_s": 36000, "escalated_excluded": 1, "open_now": 0}
    assert (agents[b]["assigned"], agents[b]["first_responses"], agents[b]["first_response_avg_s"]) == (1, 2, 4500)
    assert agents[b]["resolution_avg_s"] is None and agents[b]["open_now"] == 1
    assert agents["carl@staff.example"]["assigned"] == 0 and agents["carl@staff.example"]["open_now"] == 2
    table = stats.table({**stats.report(ts), "by_agent": agents})
    assert "open now" in table and any(line.startswith(a) for line in table.splitlines())
    assert stats.by_agent([], {}, {}, {}) == {}
