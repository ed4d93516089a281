"""The process rules' pure decisions (issue 17): tier-2 region, wording tables, commands."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.config import Escalation
from gateway.desk import lifecycle
from gateway.model import Status, Ticket
from gateway.rules import process
from gateway.rules.settings import default_rules

HOURS = default_rules().hours


def ticket(region: str = "EMEA", tier: int = 1) -> Ticket:
    return Ticket(id=1, subject="x", status=Status.PENDING, requester="ann@c.example", cc=(),
                  region=region, govcloud=False, priority=3, mailbox="support@example.com",
                  linked_ticket=None, created_at=datetime(2026, 12, 1, tzinfo=UTC), tier=tier)


@pytest.mark.parametrize(("region", "at", "expected"), [
    ("EMEA", datetime(2026, 12, 2, 10, 0, tzinfo=UTC), "EMEA"),     # Wednesday, Europe open
    ("EMEA", datetime(2026, 12, 2, 20, 0, tzinfo=UTC), "AMER"),     # Europe closed, Americas open
    ("AMER", datetime(2026, 12, 3, 2, 0, tzinfo=UTC), "APAC"),      # Americas closed, Asia open
])
def test_tier2_goes_to_the_region_whose_desk_is_open(region: str, at: datetime, expected: str) -> None:
    assert lifecycle.tier2_region(region, at, HOURS)[0] == expected


def test_tier2_on_a_weekend_goes_to_the_desk_that_opens_first() -> None:
    region, why = lifecycle.tier2_region("EMEA", datetime(2026, 12, 5, 12, 0, tzinfo=UTC), HOURS)
    assert "every desk closed" in why and region in ("APAC", "EMEA", "AMER")


def test_escalation_clears_pending_timers_and_tells_the_customer_once() -> None:
    now = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    esc = lifecycle.escalate(ticket(), engineering=True, by="a@x.example", now=now, config=Escalation(),
                             hours=HOURS, owner="a@x.example")
    assert esc is not None and esc.tier == 3 and esc.queue == Escalation().engineering
    assert esc.tell_customer and esc.fields["reminder_due_at"] is None
    assert lifecycle.escalate(ticket(tier=3), engineering=True, by="a", now=now, config=Escalation(),
                              hours=HOURS, owner=None) is None


@pytest.mark.parametrize(("text", "language"), [
    ("Could you please escalate this?", "en"),
    ("Ich bitte um Eskalation des Tickets.", "de"),
    ("至急エスカレーションをお願いします。", "ja"),
])
def test_escalation_request_wording(text: str, language: str) -> None:
    found = process.escalation_request(text)
    assert found is not None and found.language == language


def test_ordinary_mail_is_no_escalation_request() -> None:
    assert process.escalation_request("The backup fails again with 0x80040115.") is None


def test_escalate_commands() -> None:
    assert lifecycle.staff_commands("#escalate engineering\nText").engineering
    assert lifecycle.staff_commands("#escalate\nText").escalate
    assert lifecycle.staff_commands("#escalate nowhere").errors


@pytest.mark.parametrize(("text", "language"), [
    ("Type: emergency\nAll servers down.", "en"),
    ("Typ: Notfall\nAlle Server sind ausgefallen.", "de"),
    ("種類：緊急\nサーバーが停止しました。", "ja"),
    ("EMERGENCY: production backup is gone", "en"),
    ("Das ist ein Notfall, bitte sofort melden.", "de"),
    ("緊急のお願いです。", "ja"),
])
def test_emergency_wording_and_type_lines(text: str, language: str) -> None:
    found = process.emergency(text)
    assert found is not None and found.language == language


@pytest.mark.parametrize("text", [
    "This is not an emergency, just a question.",
    "Kein Notfall, aber bitte prüfen.",
    "緊急ではありませんが、確認をお願いします。",
    "Type: question\nHow do I restore one file?",
])
def test_no_emergency_when_negated_or_other_type(text: str) -> None:
    assert process.emergency(text) is None


@pytest.mark.parametrize(("text", "language"), [
    ("Any update? What is the status?", "en"),
    ("Hallo, wie ist der Stand bei meinem Ticket?", "de"),
    ("進捗はいかがでしょうか。", "ja"),
])
def test_status_request_wording(text: str, language: str) -> None:
    found = process.status_request(text)
    assert found is not None and found.language == language


def test_a_long_reply_that_mentions_the_status_is_no_status_request() -> None:
    assert process.status_request("Any update? " + "Here is the full log of the failure. " * 20) is None


@pytest.mark.parametrize(("text", "language"), [
    ("Solved, thanks! You can close the ticket.", "en"),
    ("Problem gelöst, danke!", "de"),
    ("おかげさまで解決しました。", "ja"),
])
def test_solved_wording(text: str, language: str) -> None:
    found = process.solved(text)
    assert found is not None and found.language == language


@pytest.mark.parametrize("text", [
    "It is not solved, the backup still fails.",
    "Das Problem ist noch nicht gelöst.",
    "まだ解決していません。",
    "Is it solved on your side?",
    "Please don't close the ticket yet.",
])
def test_negated_or_asked_solved_wording_does_not_close(text: str) -> None:
    assert process.solved(text) is None


def test_customer_confirmation_resolves_unless_escalated() -> None:
    from gateway.config import Policy
    now = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    tr = lifecycle.after_customer_reply(ticket(), now, Policy(), solved=True)
    assert tr.status is Status.RESOLVED and tr.notices and tr.timers.close_due_at is not None
    from dataclasses import replace
    held = lifecycle.after_customer_reply(replace(ticket(), escalated=True), now, Policy(), solved=True)
    assert held.status is Status.OPEN


def test_status_answer_at_most_once_per_interval() -> None:
    from datetime import timedelta
    now = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    four = timedelta(hours=4)
    assert lifecycle.status_answer_due(ticket(), None, now, four)
    assert not lifecycle.status_answer_due(ticket(), now - timedelta(hours=1), now, four)
    assert lifecycle.status_answer_due(ticket(), now - four, now, four)
