"""Lifecycle decisions (pure): transitions, timers, staff commands."""
from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from gateway.config import Policy
from gateway.desk.lifecycle import Timers, after_customer_reply, after_staff_reply, due, enter, staff_commands
from gateway.model import Kind, Status, Ticket

T0 = datetime(2026, 11, 23, 9, tzinfo=UTC)
P = Policy()
H = timedelta(hours=1)


def ticket(status: Status = Status.OPEN, **kw: object) -> Ticket:
    t = Ticket(id=1, subject="s", status=status, requester="a@c.example", cc=(), region="EMEA",
               govcloud=False, priority=3, mailbox="support@example.com", linked_ticket=None,
               created_at=T0)
    return replace(t, **kw)  # type: ignore[arg-type]


def pending_since(start: datetime) -> Ticket:
    tr = enter(Status.PENDING, start, P, cause="x")
    return ticket(Status.PENDING, reminder_due_at=tr.timers.reminder_due_at,
                  autoclose_due_at=tr.timers.autoclose_due_at)


def test_staff_reply_sets_pending_with_both_timers() -> None:
    tr = after_staff_reply(ticket(), None, True, T0, P)
    assert tr.status is Status.PENDING
    assert tr.timers == Timers(reminder_due_at=T0 + 24 * H, autoclose_due_at=T0 + 48 * H)


def test_note_changes_nothing_and_requested_status_wins() -> None:
    assert after_staff_reply(ticket(), None, False, T0, P).status is Status.OPEN
    tr = after_staff_reply(ticket(), Status.RESOLVED, True, T0, P)
    assert tr.status is Status.RESOLVED and tr.notices == (Kind.CLOSURE,)
    assert tr.stamps == {"resolved_at": T0} and tr.timers.close_due_at == T0 + timedelta(days=7)
    closed = after_staff_reply(ticket(), Status.CLOSED, False, T0, P)
    assert closed.stamps == {"closed_at": T0} and closed.timers == Timers()


def test_customer_reply_reopens_pending_and_resolved_and_clears_timers() -> None:
    for t in (pending_since(T0), ticket(Status.RESOLVED, close_due_at=T0 + 100 * H)):
        tr = after_customer_reply(t, T0 + H, P)
        assert tr.status is Status.OPEN and tr.timers == Timers()
    assert after_customer_reply(ticket(), T0, P).status is Status.OPEN


def test_due_reminder_then_autoclose_each_once() -> None:
    t = pending_since(T0)
    assert due(t, T0 + 23 * H, P) is None
    tr = due(t, T0 + 25 * H, P)
    assert tr is not None and tr.notices == (Kind.REMINDER,) and tr.status is Status.PENDING
    t2 = replace(t, reminder_due_at=tr.timers.reminder_due_at)
    assert t2.reminder_due_at is None and due(t2, T0 + 26 * H, P) is None
    close = due(t2, T0 + 49 * H, P)
    assert close is not None and close.status is Status.CLOSED and close.notices == (Kind.AUTOCLOSE,)


def test_due_after_downtime_skips_the_stale_reminder() -> None:
    tr = due(pending_since(T0), T0 + 60 * H, P)
    assert tr is not None and tr.notices == (Kind.AUTOCLOSE,) and tr.status is Status.CLOSED


def test_resolved_closes_quietly_after_the_window() -> None:
    t = ticket(Status.RESOLVED, close_due_at=T0 + 7 * 24 * H)
    assert due(t, T0 + 6 * 24 * H, P) is None
    tr = due(t, T0 + 8 * 24 * H, P)
    assert tr is not None and tr.status is Status.CLOSED and tr.notices == ()


def test_timers_left_on_an_open_ticket_are_dropped_without_mail() -> None:
    tr = due(ticket(Status.OPEN, reminder_due_at=T0), T0 + H, P)
    assert tr is not None and tr.timers == Timers() and tr.notices == ()


def test_staff_commands_parsing() -> None:
    c = staff_commands("#priority 1\n\n#escalate\n#status resolved\nFixed.\n#note later lines are text")
    assert (c.priority, c.escalate, c.status, c.note) == (1, True, Status.RESOLVED, False)
    assert c.text == "Fixed.\n#note later lines are text" and c.errors == ()
    assert staff_commands("#note\nInternal").note is True
    assert staff_commands("#Status Pending").status is Status.PENDING
    bad = staff_commands("#priority 5\n#status done\n#dance\n#escalate now\nhello")
    assert len(bad.errors) == 4 and bad.text == "hello"
    plain = staff_commands("Hello,\n#priority 1 is not a command here")
    assert plain.priority is None and plain.text.startswith("Hello")
    assert staff_commands("## heading\ntext").errors == ()
