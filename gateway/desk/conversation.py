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
   answers from per-ticket subaddresses uses them).
   From anyone else it opens a new ticket linked to the old one, and nothing
   of the old ticket is sent to them.
3. A mail for a closed ticket (or a resolved one past its reopen window)
   opens a new ticket linked to it: closed tickets are never reopened.
4. Anything else opens a new ticket.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.desk.lifecycle import is_closed
from gateway.model import Ticket


@dataclass(frozen=True)
class Placement:
    ticket_id: int | None          # the ticket to join; None: open a new one
    linked_ticket: int | None      # for a new ticket: the ticket it follows up
    reason: str                    # for logs and `explain`


def place(*, sender: str, sender_is_staff: bool, by_reference: Ticket | None,
          by_tag: Ticket | None, now: datetime) -> Placement:
    """Decide where a mail goes, given the tickets its headers point at.

    `by_reference` is the ticket whose message (or genuine token) the mail
    answers; `by_tag` the ticket its subject tag names, if that exists.
    """
    if by_reference is not None:
        return _join_unless_closed(by_reference, "answers a message of the ticket", now)
    if by_tag is not None:
        if sender_is_staff or by_tag.is_participant(sender):
            return _join_unless_closed(by_tag, "subject tag from a participant", now)
        return Placement(None, by_tag.id, "subject tag from a non-participant: new linked ticket")
    return Placement(None, None, "new conversation")


def _join_unless_closed(ticket: Ticket, reason: str, now: datetime) -> Placement:
    if is_closed(ticket, now):
        return Placement(None, ticket.id, f"{reason}, but it is closed: new linked ticket")
    return Placement(ticket.id, None, reason)
