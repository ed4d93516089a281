"""The support domain as plain data: no I/O, no framework types.

The pure decisions (threading, rules, lifecycle) take and return these; the
store turns them into rows and back; the CLI turns them into the JSON of
CONTRACT.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

REGIONS = ("AMER", "EMEA", "APAC")


class Status(StrEnum):
    OPEN = "open"
    PENDING = "pending"      # waiting on the customer
    RESOLVED = "resolved"
    CLOSED = "closed"


class Kind(StrEnum):
    # inbound
    CUSTOMER = "customer"
    STAFF = "staff"
    NOTE = "note"
    AUTO = "auto"
    BOUNCE = "bounce"
    # outbound
    ACK = "ack"
    STAFF_NOTIFY = "staff_notify"
    STAFF_REPLY = "staff_reply"
    REMINDER = "reminder"
    AUTOCLOSE = "autoclose"
    CLOSURE = "closure"
    INFO_REQUEST = "info_request"
    REDIRECT = "redirect"
    STATUS = "status"                # the automatic answer to a status request
    ESCALATION = "escalation"        # the customer is told the ticket went to engineering
    CONTACT_REFUSED = "contact_refused"  # about no ticket: who may open tickets (contacts_policy restrict)
    DIGEST = "digest"                # about no ticket: the daily digest to a queue or an agent ([digest])


# What counts toward `[limits] auto_answers_per_*_per_hour`: the automatic
# answers a new ticket's requester gets (gateway.desk.pipeline, store's sender load)
# (the ticket-less CONTACT_REFUSED counts too: `Tx.add_refusal_load`)
AUTO_ANSWER_KINDS = frozenset({Kind.ACK.value, Kind.REDIRECT.value})
# Mail about no ticket: no ticket tag, no ticket token, no message row (gateway.outbound.compose)
UNTICKETED_KINDS = frozenset({Kind.CONTACT_REFUSED.value, Kind.DIGEST.value})


def normalize_address(address: str) -> str:
    """The comparable form of a bare address: trimmed, without <>, lower case.

    Lower-casing the local part is not strictly RFC 5321, but every support
    desk treats Ann@X and ann@x as one customer, and so do the peers.
    """
    return address.strip().strip("<>").strip().lower()


def mailbox_of(address: str) -> str:
    """The mailbox an address delivers to: normalized, `+tag` folded.

    `help+1042@x` and `Help+1043@X` reach one mailbox (RFC 5233
    subaddressing, as helpdesks and mailing lists use it for reply
    addresses): rate limits count per mailbox, and a subject tag is trusted
    from any subaddress of a participant.
    """
    local, at, domain = normalize_address(address).rpartition("@")
    if not at:
        return domain
    return local.split("+", 1)[0] + "@" + domain


def domain_of(address: str) -> str:
    return normalize_address(address).rpartition("@")[2]


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    size: int
    sha256: str
    content_id: str = ""


@dataclass(frozen=True)
class ParsedMail:
    """What the gateway needs of one inbound message, decoded once."""

    sender: str                      # bare address from From:
    sender_name: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    subject: str
    date: datetime | None            # in UTC
    date_offset_minutes: int | None  # the sender's UTC offset, from the Date header
    message_id: str                  # with <>; generated when the mail has none
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    body_text: str
    reply_text: str
    attachments: tuple[tuple[Attachment, bytes], ...] = ()
    headers: dict[str, str] = field(default_factory=dict)   # first value of each, lower-case names
    defects: tuple[str, ...] = ()
    # MIME types of every part, in order (finds reports wrapped in multipart/mixed)
    content_types: tuple[str, ...] = ()
    # the address of the From header itself; differs from `sender` when the author
    # was taken from X-Original-From/Reply-To (a list rewrote From) or from
    # Sender/Reply-To (no From): such an author is never taken as staff. None: same.
    from_address: str | None = None

    @property
    def thread_ids(self) -> tuple[str, ...]:
        """Message-IDs this mail answers, nearest first."""
        seen: dict[str, None] = {}
        for mid in (*self.in_reply_to, *reversed(self.references)):
            seen.setdefault(mid, None)
        return tuple(seen)


@dataclass(frozen=True)
class Ticket:
    id: int
    subject: str
    status: Status
    requester: str
    cc: tuple[str, ...]
    region: str
    govcloud: bool
    priority: int
    mailbox: str
    linked_ticket: int | None
    created_at: datetime
    first_response_at: datetime | None = None
    resolved_at: datetime | None = None
    closed_at: datetime | None = None
    escalated: bool = False
    # the scheduler's due times (gateway.desk.lifecycle)
    reminder_due_at: datetime | None = None
    autoclose_due_at: datetime | None = None
    close_due_at: datetime | None = None
    undeliverable: tuple[str, ...] = ()      # addresses that bounced permanently
    # the rules stage's decision (gateway.rules)
    plan: str = ""
    response_due_at: datetime | None = None  # first-response target; None: the plan has none
    sla_warned_at: datetime | None = None     # the SLA warning before the target went out
    sla_warn_at: datetime | None = None       # when it is due ([rules.sla] warn_before); None: none
    sla_breached_at: datetime | None = None   # the breach notice went out (target passed unanswered)
    sla_outcome: str | None = None            # "met" / "missed" once known; None: still due or no target
    missing: tuple[str, ...] = ()            # form fields the customer did not give
    redirect: str | None = None              # "billing", "sales": handed elsewhere
    language: str = "en"                     # the language the customer is answered in
    # escalation tiers (gateway.desk.lifecycle.escalate): 1 = the owning technician
    tier: int = 1
    owner: str | None = None                 # the tier-1 agent who owns the ticket's customer mail
    escalated_at: datetime | None = None
    escalated_by: str | None = None          # an agent's address, or "rules: ..." when automatic
    escalation_queue: str | None = None      # the tier queue that was notified
    customer_told_at: datetime | None = None  # the customer was told of the escalation (once)
    contact_due_at: datetime | None = None   # owner reminder: nobody wrote to the customer yet
    manual_close_due_at: datetime | None = None  # owner reminder: close it by hand
    emergency: bool = False                  # HKN's emergency type: P1 on a 24/7 clock
    category: str = ""                       # [rules.category] / #category; "" = none
    product: str = ""                        # [rules.product] / #product; "" = none
    contact: str = ""                        # Kaseya: certified | authorised | unlisted; "" = not listed for

    @property
    def participants(self) -> frozenset[str]:
        return frozenset((self.requester, *self.cc))

    def is_participant(self, address: str) -> bool:
        """The address is the requester's or a Cc's mailbox (case and `+tag` folded)."""
        mailbox = mailbox_of(address)
        return any(mailbox_of(p) == mailbox for p in self.participants)

    def deliverable(self, addresses: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        return tuple(a for a in addresses if a and a not in self.undeliverable)


# a canned answer's name (`#answer NAME`, the file NAME.txt in [answers] folder)
ANSWER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

SEARCH_MAX_TERMS = 16
SEARCH_MAX_TERM = 100


def search_terms(text: str) -> list[str]:
    """The words of a `tickets search` text, each matched on its own (every one
    must occur): at most 16 of at most 100 characters, quotes dropped, duplicates
    once. What the stores' query syntax means (`OR`, `*`, `NEAR`) is not taken
    from the user: each term is searched as the words it holds."""
    out: list[str] = []
    for word in text.replace('"', " ").split():
        word = word[:SEARCH_MAX_TERM]
        if word not in out:
            out.append(word)
    return out[:SEARCH_MAX_TERMS]
