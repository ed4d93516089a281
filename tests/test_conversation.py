"""Threading decisions (pure) and the tokens they trust."""
from __future__ import annotations

from datetime import UTC, datetime

from gateway.desk.conversation import place
from gateway.mail.subject import strip_tag, tagged_ticket_id
from gateway.model import Status, Ticket
from gateway.outbound.tokens import TicketTokens

T0 = datetime(2026, 11, 23, tzinfo=UTC)


def ticket(tid: int = 7, status: Status = Status.OPEN) -> Ticket:
    return Ticket(id=tid, subject="s", status=status, requester="ann@c.example",
                  cc=("cc@c.example",), region="EMEA", govcloud=False, priority=3,
                  mailbox="support@example.com", linked_ticket=None, created_at=T0)


def test_tag_parsing() -> None:
    assert tagged_ticket_id("Re: [Support #1042] Backup", "Support") == 1042
    assert tagged_ticket_id("Re: [ support #  12 ]", "Support") == 12
    assert tagged_ticket_id("[Other #12]", "Support") is None
    assert strip_tag("Re: [Support #12] Backup", "Support") == "Re: Backup"


def test_answer_to_a_ticket_message_joins_whoever_sends_it() -> None:
    p = place(sender="new@elsewhere.example", sender_is_staff=False, by_reference=ticket(), by_tag=None, now=T0)
    assert p.ticket_id == 7


def test_tag_joins_only_for_participants_and_staff() -> None:
    for who, staff in (("ann@c.example", False), ("cc@c.example", False), ("agent@s.example", True)):
        assert place(sender=who, sender_is_staff=staff, by_reference=None, by_tag=ticket(), now=T0).ticket_id == 7
    p = place(sender="mallory@evil.example", sender_is_staff=False, by_reference=None, by_tag=ticket(), now=T0)
    assert p.ticket_id is None and p.linked_ticket == 7


def test_closed_ticket_is_never_reopened_a_new_linked_one_is_made() -> None:
    closed = ticket(status=Status.CLOSED)
    for kwargs in ({"by_reference": closed, "by_tag": None}, {"by_reference": None, "by_tag": closed}):
        p = place(sender="ann@c.example", sender_is_staff=False, now=T0, **kwargs)  # type: ignore[arg-type]
        assert p.ticket_id is None and p.linked_ticket == 7


def test_no_evidence_means_new_ticket() -> None:
    p = place(sender="ann@c.example", sender_is_staff=False, by_reference=None, by_tag=None, now=T0)
    assert (p.ticket_id, p.linked_ticket) == (None, None)


def test_our_message_ids_carry_a_token_that_cannot_be_forged() -> None:
    tokens = TicketTokens(b"k" * 32)
    mid = tokens.message_id(42, "example.com")
    assert tokens.ticket_of(mid) == 42
    assert tokens.message_id(42, "example.com") != mid          # random part differs
    forged = mid.replace(".42.", ".43.")
    assert tokens.ticket_of(forged) is None
    assert TicketTokens(b"x" * 32).ticket_of(mid) is None        # another installation's secret
    assert tokens.ticket_of("<foo@bar>") is None


def test_resolved_ticket_past_its_reopen_window_counts_as_closed_before_the_scheduler_runs() -> None:
    from dataclasses import replace
    from datetime import timedelta
    resolved = replace(ticket(status=Status.RESOLVED), close_due_at=T0 + timedelta(days=7))
    day6 = place(sender="ann@c.example", sender_is_staff=False, by_reference=resolved, by_tag=None,
                 now=T0 + timedelta(days=6))
    day8 = place(sender="ann@c.example", sender_is_staff=False, by_reference=resolved, by_tag=None,
                 now=T0 + timedelta(days=8))
    assert day6.ticket_id == 7 and (day8.ticket_id, day8.linked_ticket) == (None, 7)
