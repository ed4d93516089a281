"""Which ticket a mail belongs to: a pure decision over plain data.

The policy (README, "Threading"):
1. A mail that answers one of the ticket's messages (In-Reply-To or
   References names a Message-ID the ticket has, or one of our own IDs with
   a genuine ticket token) joins that ticket, whoever sends it: only people
   who received our mail know those IDs. (The pipeline records it as
   automatic when the sender is not a participant and the ID is ours.)
2. A mail whose subject carries `[<tag> #<id>]` joins that ticket only when
   it comes from a participant (requester, the ticket's Cc, staff; case and
   `+tag` folded: `help+2@x` is `help+1@x`'s mailbox, as a helpdesk that
   answers from per-ticket subaddresses uses them) or from an authorised
   contact of the requester's organisation (Kaseya: colleagues answer on
   each other's tickets).
   From anyone else it opens a new ticket linked to the old one, and nothing
   of the old ticket is sent to them.
3. A mail for a closed ticket (or a resolved one past its reopen window)
   opens a new ticket linked to it: closed tickets are never reopened.
4. One ticket per problem (Kaseya, NinjaOne): a new mail (neither a reply
   nor tagged) from a ticket's requester with the same subject (tag and
   Re:/Fwd: stripped, case ignored), while that ticket is open or pending
   and within `[threading] same_problem_hours` of its creation, joins it.
5. Anything else opens a new ticket.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from gateway.desk.lifecycle import is_closed
from gateway.mail.subject import problem_key
from gateway.model import Status, Ticket


@dataclass(frozen=True)
class Placement:
    ticket_id: int | None          # the ticket to join; None: open a new one
    linked_ticket: int | None      # for a new ticket: the ticket it follows up
    reason: str                    # for logs and `explain`
    same_problem: bool = False     # joined by rule 4: a new mail about the ticket's problem
    colleague_of: str | None = None  # joined by rule 2 as an authorised contact of this organisation


def place(*, sender: str, sender_is_staff: bool, by_reference: Ticket | None,
          by_tag: Ticket | None, now: datetime, colleague_of: str | None = None) -> Placement:
    """Decide where a mail goes, given the tickets its headers point at.

    `by_reference` is the ticket whose message (or genuine token) the mail
    answers; `by_tag` the ticket its subject tag names, if that exists;
    `colleague_of` the organisation when the sender and the tagged ticket's
    requester are both its authorised contacts (gateway.rules.contacts).
    """
    if by_reference is not None:
        return _join_unless_closed(by_reference, "answers a message of the ticket", now)
    if by_tag is not None:
        if sender_is_staff or by_tag.is_participant(sender):
            return _join_unless_closed(by_tag, "subject tag from a participant", now)
        if colleague_of is not None:
            joined = _join_unless_closed(by_tag, f"subject tag from an authorised contact of {colleague_of}, "
                                                 "the requester's organisation", now)
            return replace(joined, colleague_of=colleague_of) if joined.ticket_id else joined
        return Placement(None, by_tag.id, "subject tag from a non-participant: new linked ticket")
    return Placement(None, None, "new conversation")


def _join_unless_closed(ticket: Ticket, reason: str, now: datetime) -> Placement:
    if is_closed(ticket, now):
        return Placement(None, ticket.id, f"{reason}, but it is closed: new linked ticket")
    return Placement(ticket.id, None, reason)


def same_problem(placement: Placement, *, sender: str, subject: str, ticket_tag: str,
                 candidates: Sequence[Ticket], now: datetime, within: timedelta) -> Placement:
    """Rule 4: a new conversation joins the requester's open ticket about the
    same problem. `candidates` are the sender's recent open tickets."""
    key = problem_key(subject, ticket_tag)
    if placement.ticket_id is not None or placement.linked_ticket is not None or not key or not within:
        return placement
    for t in candidates:
        if (t.requester == sender and t.status in (Status.OPEN, Status.PENDING)
                and now - t.created_at <= within and problem_key(t.subject, ticket_tag) == key):
            hours = (now - t.created_at).total_seconds() / 3600
            return Placement(t.id, None, f"same sender and subject as open ticket #{t.id}, opened {hours:.1f} h "
                                         f"ago (within {within.total_seconds() / 3600:g} h): one ticket per problem",
                             same_problem=True)
    return placement
