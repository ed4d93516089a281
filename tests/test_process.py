"""The process rules' pure decisions (issue 17): tier-2 region, wording tables, commands."""
from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gateway.config import ConfigError, Escalation, Policy, parse
from gateway.desk import lifecycle
from gateway.model import Kind, Status, Ticket
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
    # tier 2 is support's own: the customer is not told (NinjaOne tells of the engineers' review)
    second = lifecycle.escalate(ticket(), engineering=False, by="a", now=now, config=Escalation(),
                                hours=HOURS, owner=None)
    assert second is not None and second.tier == 2 and not second.tell_customer
    assert "customer_told_at" not in second.fields


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


# -- lifecycle per mailbox and plan ------------------------------------------

KASEYA = Policy(reminders=(timedelta(hours=48), timedelta(hours=96), timedelta(hours=144)),
                autoclose_after=timedelta(hours=168), no_reply="resolve")


def test_repeated_reminders_one_at_a_time_and_none_stale_after_downtime() -> None:
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    pending = replace(ticket(), **lifecycle.enter(Status.PENDING, t0, KASEYA, cause="x").timers.__dict__)
    assert pending.reminder_due_at == t0 + timedelta(hours=48)
    assert lifecycle.due(pending, t0 + timedelta(hours=47), KASEYA) is None
    first = lifecycle.due(pending, t0 + timedelta(hours=48), KASEYA)
    assert first is not None and first.notices == (Kind.REMINDER,)
    assert first.timers.reminder_due_at == t0 + timedelta(hours=96)
    # down from 40 h to 100 h: one reminder, and the next one is the 144 h one, not a burst
    late = lifecycle.due(pending, t0 + timedelta(hours=100), KASEYA)
    assert late is not None and late.notices == (Kind.REMINDER,)
    assert late.timers.reminder_due_at == t0 + timedelta(hours=144)
    last = lifecycle.due(replace(pending, reminder_due_at=t0 + timedelta(hours=144)),
                         t0 + timedelta(hours=150), KASEYA)
    assert last is not None and last.timers.reminder_due_at is None
    end = lifecycle.due(pending, t0 + timedelta(hours=168), KASEYA)
    assert end is not None and end.status is Status.RESOLVED and end.notices == (Kind.AUTOCLOSE,)
    assert end.timers.close_due_at == t0 + timedelta(hours=168) + KASEYA.reopen_within
    none = Policy(reminders=())
    assert lifecycle.enter(Status.PENDING, t0, none, cause="x").timers.reminder_due_at is None


def test_policy_for_merges_key_by_key_mailbox_over_plan_over_default() -> None:
    config = parse({"lifecycle": {"reopen_days": 14, "plans": {"advanced": {"reminder_after_hours": 12}}},
                    "mailbox": [{"address": "support@example.com"},
                                {"address": "kaseya@example.com",
                                 "lifecycle": {"autoclose_after_hours": 168, "no_reply": "resolve",
                                               "plans": {"basic": {"reminder_after_hours": [24, 72]}}}}]})
    default = config.policy_for("support@example.com", "professional")
    assert (default.reminders, default.reopen_within) == ((timedelta(hours=24),), timedelta(days=14))
    assert config.policy_for("support@example.com", "advanced").reminders == (timedelta(hours=12),)
    k = config.policy_for("kaseya@example.com", "advanced")
    assert (k.reminders, k.autoclose_after, k.no_reply, k.reopen_within) == (
        (timedelta(hours=12),), timedelta(hours=168), "resolve", timedelta(days=14))
    assert config.policy_for("kaseya@example.com", "basic").reminders == (timedelta(hours=24), timedelta(hours=72))
    assert config.policy_for("gone@example.com", "advanced") == config.policy_for("", "advanced")


@pytest.mark.parametrize(("table", "problem"), [
    ({"reminder_after_hours": 48}, "lifecycle.reminder_after_hours: expected ascending hours > 0 and below"),
    ({"reminder_after_hours": [1, "2"]}, "lifecycle.reminder_after_hours: expected hours or a list"),
    ({"no_reply": "archive"}, "lifecycle.no_reply: expected one of close, resolve"),
    ({"reopen_days": 0}, "lifecycle.reopen_days: expected days > 0"),
    ({"autoclose_after_hours": True}, "lifecycle.autoclose_after_hours: expected hours > 0"),
    ({"remind": 3}, "lifecycle.remind: unknown key"),
    ({"plans": {"gold": {}}}, "lifecycle.plans.gold: no such plan 'gold'"),
])
def test_a_bad_lifecycle_value_is_named(table: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse({"lifecycle": table})
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


# -- one ticket per problem ---------------------------------------------------

def test_same_problem_needs_the_requester_the_subject_an_open_ticket_and_the_window() -> None:
    from gateway.desk.conversation import Placement, same_problem
    new = Placement(None, None, "new conversation")
    t = replace(ticket(), subject="Re: [Support #1] Backup  fails", status=Status.OPEN)
    now = t.created_at + timedelta(hours=10)

    def placed(subject: str, sender: str = "ann@c.example", within: float = 72, **changes: object) -> int | None:
        return same_problem(new, sender=sender, subject=subject, ticket_tag="Support",
                            candidates=[replace(t, **changes)], now=now,   # type: ignore[arg-type]
                            within=timedelta(hours=within)).ticket_id
    assert placed("AW: backup fails") == 1 and placed("Fwd: Re: BACKUP FAILS") == 1
    assert placed("backup fails", status=Status.PENDING) == 1
    assert placed("Backup fails again") is None
    assert placed("backup fails", sender="bob@c.example") is None
    assert placed("backup fails", status=Status.RESOLVED) is None
    assert placed("backup fails", within=9) is None and placed("backup fails", within=0) is None
    assert same_problem(new, sender="ann@c.example", subject="Re:", ticket_tag="Support",   # no subject
                        candidates=[replace(t, subject="Re: ")], now=now, within=timedelta(hours=72)) is new
    linked = Placement(None, 7, "subject tag from a non-participant: new linked ticket")
    assert same_problem(linked, sender="ann@c.example", subject="backup fails", ticket_tag="Support",
                        candidates=[t], now=now, within=timedelta(hours=72)) is linked


# -- authorised contacts ------------------------------------------------------

def test_contact_standing_certified_until_expiry_authorised_or_unlisted() -> None:
    from datetime import date

    from gateway.rules import contacts
    from gateway.rules.settings import Certified, Customer, CustomerDirectory
    acme = Customer("Acme", ("acme.example",), contacts=("ann@acme.example", "bob@acme.example"),
                    contacts_policy="restrict", certified=(Certified("cy@acme.example", date(2027, 6, 30)),))
    day = date(2027, 6, 30)
    assert contacts.standing(acme, "CY@acme.example", day).rank == "certified"           # the last valid day
    late = contacts.standing(acme, "cy@acme.example", date(2027, 7, 1))
    assert late.rank == "authorised" and "certificate expired 2027-06-30" in late.why
    zed = contacts.standing(acme, "zed@acme.example", day)
    assert zed.rank == "unlisted" and zed.refused and not zed.flagged
    assert contacts.standing(replace(acme, contacts_policy="flag"), "zed@acme.example", day).flagged
    assert not contacts.standing(replace(acme, contacts_policy="open"), "zed@acme.example", day).refused
    assert contacts.standing(Customer("Open", ("open.example",)), "x@open.example", day) is None
    directory = CustomerDirectory((acme, Customer("Other", ("other.example",), contacts=("o@other.example",))))
    assert contacts.colleagues(directory, "bob@acme.example", "ann@acme.example", day) == "Acme"
    assert contacts.colleagues(directory, "bob@mail.acme.example", "ann@acme.example", day) is None
    assert contacts.colleagues(directory, "zed@acme.example", "ann@acme.example", day) is None
    assert contacts.colleagues(directory, "o@other.example", "ann@acme.example", day) is None


@pytest.mark.parametrize(("entry", "problem"), [
    ({"contacts_policy": "closed"}, "rules.customer[0].contacts_policy: expected one of open, flag, restrict"),
    ({"contacts": "ann@acme.example"}, "rules.customer[0].contacts"),
    ({"certified": [{"address": "a@acme.example", "expires": "soon"}]},
     "rules.customer[0].certified[0].expires: expected a date like 2027-06-30"),
    ({"certified": [{"address": "a@acme.example", "expires": "2027-06-30", "level": 2}]},
     "rules.customer[0].certified[0].level"),
])
def test_a_bad_contacts_entry_is_named(entry: dict[str, object], problem: str) -> None:
    from gateway.rules.settings import parse_rules
    _, problems = parse_rules({"rules": {"customer": [{"organisation": "Acme", "domains": ["acme.example"], **entry}]}})
    assert any(p.startswith(problem) for p in problems), problems


def test_a_certified_target_is_shorter_and_other_priorities_keep_the_plans() -> None:
    from gateway.rules.settings import parse_rules
    rules, problems = parse_rules({"rules": {"plans": {"professional": {
        "p2": {"hours": 6}, "p3": {"hours": 9}, "certified": {"p3": {"hours": 1}}}}}})
    assert problems == []
    plan = rules.plans["professional"]
    assert plan.target(3, certified=True).hours == 1 and plan.target(3).hours == 9
    assert plan.target(2, certified=True).hours == 6
