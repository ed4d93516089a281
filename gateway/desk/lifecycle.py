"""Ticket status transitions and their timers (pure: no I/O, `now` passed in).

    open ──staff reply──▶ pending ──customer reply──▶ open
    pending ──24 h──▶ reminder (one or several) ──48 h──▶ closed (or resolved), with an autoclose notice
    any ──#status resolved──▶ resolved, with a closure notice
    resolved ──customer reply within 7 days──▶ open
    resolved ──7 days──▶ closed (quietly: the closure notice said so)
    closed: never reopened; a reply opens a new linked ticket (gateway.desk.conversation)

The durations are the ticket's `Policy` (per mailbox and plan, `Config.policy_for`).
Every transition returns the ticket's new timers. The timers are stored on
the ticket, so the scheduler finds due work after a restart, and a
transition that moves a ticket on clears the timers of the state it left:
no stale reminder is ever sent for a ticket that has moved on.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from email.utils import getaddresses

from gateway.config import Escalation, Policy
from gateway.mail.parse import answerable
from gateway.model import ANSWER_NAME, Kind, Status, Ticket, mailbox_of, normalize_address
from gateway.rules.sla import BusinessCalendar, next_open


@dataclass(frozen=True)
class Timers:
    reminder_due_at: datetime | None = None
    autoclose_due_at: datetime | None = None
    close_due_at: datetime | None = None



@dataclass(frozen=True)
class Transition:
    """What happens to a ticket: its new status, timers, time stamps, notices."""

    status: Status
    timers: Timers
    notices: tuple[Kind, ...] = ()
    stamps: dict[str, datetime] = field(default_factory=dict)   # resolved_at, closed_at
    cause: str = ""



def timers_of(ticket: Ticket) -> Timers:
    return Timers(ticket.reminder_due_at, ticket.autoclose_due_at, ticket.close_due_at)


def enter(status: Status, now: datetime, policy: Policy, *, cause: str,
          notices: tuple[Kind, ...] = ()) -> Transition:
    """The ticket enters `status` at `now`: the timers and stamps that go with it."""
    if status is Status.PENDING:
        first = policy.reminder_after
        return Transition(status, Timers(reminder_due_at=now + first if first is not None else None,
                                         autoclose_due_at=now + policy.autoclose_after),
                          notices, cause=cause)
    if status is Status.RESOLVED:
        return Transition(status, Timers(close_due_at=now + policy.reopen_within), notices,
                          {"resolved_at": now}, cause)
    if status is Status.CLOSED:
        return Transition(status, Timers(), notices, {"closed_at": now}, cause)
    return Transition(status, Timers(), notices, cause=cause)


def is_closed(ticket: Ticket, now: datetime) -> bool:
    """Closed, or resolved past its reopen window (the scheduler may not have run yet)."""
    if ticket.status is Status.CLOSED:
        return True
    return (ticket.status is Status.RESOLVED and ticket.close_due_at is not None
            and now >= ticket.close_due_at)


def held(ticket: Ticket, tr: Transition) -> Transition:
    """An escalated ticket is never reminded nor auto-closed (NinjaOne: escalated
    tickets are closed by hand): its pending timers are dropped. The owner's
    reminders (`owner_reminder_due`) take their place."""
    if not ticket.escalated or (tr.timers.reminder_due_at is None and tr.timers.autoclose_due_at is None):
        return tr
    return replace(tr, timers=replace(tr.timers, reminder_due_at=None, autoclose_due_at=None),
                   notices=tuple(n for n in tr.notices if n not in (Kind.REMINDER, Kind.AUTOCLOSE)))


def after_customer_reply(ticket: Ticket, now: datetime, policy: Policy, *,
                         solved: bool = False) -> Transition:
    """A customer answered: a pending or resolved ticket is open again. A customer
    who confirms the problem is solved resolves an open or pending ticket (NinjaOne),
    with the closure notice and the reopen window; an escalated one waits for its
    owner to close it by hand."""
    if solved and ticket.status in (Status.OPEN, Status.PENDING) and not ticket.escalated:
        return enter(Status.RESOLVED, now, policy, cause="customer confirmed the problem is solved",
                     notices=(Kind.CLOSURE,))
    if ticket.status in (Status.PENDING, Status.RESOLVED):
        return enter(Status.OPEN, now, policy, cause="customer reply")
    return Transition(ticket.status, timers_of(ticket), cause="customer reply")


def after_staff_reply(ticket: Ticket, requested: Status | None, relayed: bool, now: datetime,
                      policy: Policy) -> Transition:
    """Staff answered. A relayed answer sets the ticket pending unless
    `#status` asked for another status; `#status resolved|closed` sends the
    requester a closure notice."""
    status = requested or (Status.PENDING if relayed else ticket.status)
    if status is ticket.status and requested is None and not relayed:
        return Transition(ticket.status, timers_of(ticket), cause="staff note")
    notices = (Kind.CLOSURE,) if status in (Status.RESOLVED, Status.CLOSED) \
        and ticket.status not in (Status.RESOLVED, Status.CLOSED) else ()
    return held(ticket, enter(status, now, policy, cause="staff reply", notices=notices))


def due(ticket: Ticket, now: datetime, policy: Policy) -> Transition | None:
    """What the scheduler does for this ticket at `now`, if anything.

    After downtime it catches up without stale mail: when the auto-close is
    due too, the reminder is skipped and the ticket is closed at once.
    """
    t = timers_of(ticket)
    if ticket.escalated and (t.reminder_due_at or t.autoclose_due_at):
        # timers from before the escalation: an escalated ticket waits for its owner
        return held(ticket, Transition(ticket.status, t, cause="escalated: no reminder, no auto-close"))
    if ticket.status is Status.PENDING:
        if t.autoclose_due_at and now >= t.autoclose_due_at:
            if policy.no_reply == "resolve":     # Kaseya: resolved, the reopen window follows
                return enter(Status.RESOLVED, now, policy, cause="no customer reply: auto-resolve",
                             notices=(Kind.AUTOCLOSE,))
            return enter(Status.CLOSED, now, policy, cause="no customer reply: auto-close",
                         notices=(Kind.AUTOCLOSE,))
        if t.reminder_due_at and now >= t.reminder_due_at:
            return Transition(Status.PENDING, replace(t, reminder_due_at=next_reminder(t, now, policy)),
                              (Kind.REMINDER,), cause="no customer reply: reminder")
    elif ticket.status is Status.RESOLVED:
        if t.close_due_at and now >= t.close_due_at:
            return enter(Status.CLOSED, now, policy, cause="reopen window over")
    elif t != Timers():
        # timers left from a state the ticket has left: drop them, send nothing
        return Transition(ticket.status, Timers(), cause="stale timers cleared")
    return None


def next_reminder(t: Timers, now: datetime, policy: Policy) -> datetime | None:
    """The reminder after the one due at `now` (Kaseya's repeated contact attempts):
    the policy's offsets counted from when the ticket went pending. Those already
    past are skipped (after downtime one reminder goes, not a burst)."""
    if t.autoclose_due_at is None:
        return None
    since = t.autoclose_due_at - policy.autoclose_after
    return next((since + r for r in policy.reminders if since + r > now), None)


def _unanswered(ticket: Ticket) -> bool:
    return ticket.first_response_at is None and ticket.status not in (Status.RESOLVED, Status.CLOSED)


def sla_warning_due(ticket: Ticket, now: datetime) -> bool:
    """The first-response target is near ([rules.sla] warn_before) with no staff
    answer yet: warn the queue and the assignee, once. Past the target itself the
    breach notice says it instead (a scheduler that was down sends only that)."""
    return (ticket.sla_warn_at is not None and now >= ticket.sla_warn_at and ticket.sla_warned_at is None
            and (ticket.response_due_at is None or now < ticket.response_due_at) and _unanswered(ticket))


def sla_breach_due(ticket: Ticket, now: datetime) -> bool:
    """The first-response target passed with no staff answer: the breach notice, once."""
    return (ticket.response_due_at is not None and now >= ticket.response_due_at
            and ticket.sla_breached_at is None and _unanswered(ticket))


def first_response_outcome(ticket: Ticket, at: datetime) -> str | None:
    """What a first staff answer at `at` makes of the target: met or missed (None: none)."""
    if ticket.response_due_at is None:
        return None
    return "met" if at <= ticket.response_due_at else "missed"


# -- escalation tiers (NinjaOne support model, Kaseya escalation) ------------

# Follow the sun: when a region's desk closes, the next one to open takes over.
FOLLOW_THE_SUN = ("AMER", "APAC", "EMEA")
TIER_NAMES = {1: "support technician", 2: "technical support engineer", 3: "escalation engineer"}


@dataclass(frozen=True)
class Escalated:
    """Where an escalation goes, and why: written to the ticket and its record."""

    tier: int
    queue: str
    region: str | None                 # tier 2: the region whose desk took it
    by: str
    why: str
    tell_customer: bool                # first escalation: the customer is told, once
    contact_due_at: datetime | None
    fields: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"tier": self.tier, "tier_name": TIER_NAMES[self.tier], "queue": self.queue,
                "region": self.region, "by": self.by, "why": self.why}


def tier2_region(region: str, now: datetime, hours: Mapping[str, BusinessCalendar]) -> tuple[str, str]:
    """The region whose business hours are nearest: the ticket's own region when its
    desk is open, else the next region (follow the sun) that is open now, else the
    one that opens first. Returns the region and the reason."""
    start = FOLLOW_THE_SUN.index(region) if region in FOLLOW_THE_SUN else 0
    order = FOLLOW_THE_SUN[start:] + FOLLOW_THE_SUN[:start]
    opens = {r: (next_open(now, hours[r]) if r in hours else now) for r in order}
    for r in order:
        if opens[r] <= now:
            return r, (f"{r} desk open now" if r == region
                       else f"{region} desk closed; {r} open now")
    first = min(order, key=lambda r: (opens[r], order.index(r)))
    return first, f"every desk closed; {first} opens first, at {opens[first].isoformat()}"


def escalate(ticket: Ticket, *, engineering: bool, by: str, now: datetime, config: Escalation,
             hours: Mapping[str, BusinessCalendar], owner: str | None) -> Escalated | None:
    """`#escalate` (tier 2) or `#escalate engineering` (tier 3), or an automatic
    escalation. None when the ticket is at that tier or above already."""
    tier = 3 if engineering else 2
    if ticket.tier >= tier:
        return None
    if tier == 3:
        queue, region, why = config.engineering, None, "escalation engineers"
    else:
        region, why = tier2_region(ticket.region, now, hours)
        queue = config.tier2[region]
    # the customer is told once, when engineering takes it (NinjaOne: escalation
    # engineers, a review of at least 24 hours); tier 2 is support's own matter
    tell = tier == 3 and ticket.customer_told_at is None
    contact_due = now + config.contact_after
    fields: dict[str, object] = {
        "escalated": True, "tier": tier, "escalated_at": now, "escalated_by": by,
        "escalation_queue": queue, "contact_due_at": contact_due,
        "manual_close_due_at": now + config.close_reminder_after, "reminder_due_at": None, "autoclose_due_at": None}
    if ticket.owner is None and owner is not None:
        fields["owner"] = owner
    if tell:
        fields["customer_told_at"] = now
    return Escalated(tier, queue, region, by, why, tell, contact_due, fields)


def after_customer_contact(ticket: Ticket, now: datetime, config: Escalation,
                           *, by_staff: bool) -> dict[str, object]:
    """Mail went between the owner and the customer of an escalated ticket: the
    owner's reminders start again from it (fields to write; empty when not escalated)."""
    if not ticket.escalated:
        return {}
    fields: dict[str, object] = {"manual_close_due_at": now + config.close_reminder_after}
    if by_staff:
        fields["contact_due_at"] = None
    return fields


def status_answer_due(ticket: Ticket, last_answer_at: datetime | None, now: datetime,
                      interval: timedelta) -> bool:
    """A status request gets the automatic status answer: on a ticket still being
    worked on, at most one per `interval` (HKN: ask after 4 hours)."""
    if ticket.status in (Status.RESOLVED, Status.CLOSED):
        return False
    return last_answer_at is None or now - last_answer_at >= interval


def response_state(ticket: Ticket, now: datetime) -> str:
    """Whether the first-response target is met: met, missed, due or none."""
    if ticket.response_due_at is None:
        return "none"
    if ticket.sla_outcome is not None:
        return ticket.sla_outcome
    if ticket.first_response_at is not None:
        return first_response_outcome(ticket, ticket.first_response_at) or "none"
    return "missed" if now > ticket.response_due_at else "due"


def owner_reminder_due(ticket: Ticket, now: datetime) -> tuple[str, str] | None:
    """The owner's reminder due on an escalated ticket at `now`: (timer field, what to do)."""
    if not ticket.escalated or ticket.status in (Status.RESOLVED, Status.CLOSED):
        return None
    if ticket.contact_due_at is not None and now >= ticket.contact_due_at:
        return "contact_due_at", "nobody has written to the customer since the escalation: please do"
    if ticket.manual_close_due_at is not None and now >= ticket.manual_close_due_at:
        return ("manual_close_due_at", ("no mail with the customer for a while: close the ticket by hand"
                " (#status closed) when it is done; escalated tickets are never closed automatically"))
    return None


# -- commands at the top of a staff reply -----------------------------------

COMMANDS = ("note", "status", "priority", "escalate", "customer", "assign", "take", "unassign", "cc", "uncc",
            "answer", "help", "list", "category", "product", "govcloud")
MAX_CLASS_NAME = 80            # characters of a #category / #product value
MAX_COMMAND_ADDRESSES = 20     # addresses one #cc / #uncc line may name


@dataclass(frozen=True)
class StaffCommands:
    note: bool = False
    status: Status | None = None
    priority: int | None = None
    escalate: bool = False
    engineering: bool = False      # `#escalate engineering`: tier 3
    customer: bool = False         # `#customer`: an engineer's reply goes to the customer after all
    assign: str | None = None      # `#assign ADDRESS` / `#take` (the sender): the new assignee
    take: bool = False
    unassign: bool = False         # `#unassign`: nobody owns the ticket any more
    cc: tuple[str, ...] = ()       # `#cc`: addresses to add as participants (normalized)
    uncc: tuple[str, ...] = ()     # `#uncc`: addresses to remove
    answer: str | None = None      # `#answer NAME`: the canned answer to insert
    help: bool = False             # `#help`: mail the agent the commands and canned answers
    listing: bool = False          # `#list`: mail the agent their open, waiting and near-breach tickets
    category: str | None = None    # `#category NAME` ("" for `#category none`): the ticket's new category
    product: str | None = None     # `#product NAME`: its new product
    govcloud: bool = False         # `#govcloud`: move the ticket to GovCloud (its staff, relay, queue)
    errors: tuple[str, ...] = ()
    text: str = ""                 # what is left to relay, commands removed


def command_addresses(word: str, arg: str) -> tuple[tuple[str, ...], str | None]:
    """The addresses of a `#cc` / `#uncc` line (`a@x.example, Bob <b@y.example>`),
    normalized, or an error naming what is wrong."""
    # `Name <a@x>` lists as in a header; bare addresses also apart by blanks
    found_any = [a for _, a in getaddresses([arg])] if "<" in arg else re.split(r"[\s,;]+", arg)
    found = tuple(dict.fromkeys(normalize_address(a) for a in found_any if a.strip()))
    if not found:
        return (), f"#{word} needs an address; got {arg!r}"
    if len(found) > MAX_COMMAND_ADDRESSES:
        return (), f"#{word} takes at most {MAX_COMMAND_ADDRESSES} addresses; got {len(found)}"
    bad = [a for a in found if not answerable(a)]
    if bad:
        return (), f"#{word}: not an address mail can be sent to: {bad[0]!r}"
    return found, None


def staff_commands(text: str) -> StaffCommands:
    """Read `#note`, `#status S`, `#priority N`, `#escalate [engineering]`, `#customer`,
    `#assign A`, `#take`, `#unassign`, `#cc A`, `#uncc A`, `#answer NAME`, `#help`,
    `#list`, `#category NAME`, `#product NAME`, `#govcloud` from the lines at the top of a staff reply (blank lines between them allowed)."""
    lines = text.replace("\r\n", "\n").split("\n")
    found: dict[str, object] = {}
    errors: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
            continue
        if not line.startswith("#") or line.startswith("##"):
            break
        word, _, arg = line[1:].partition(" ")
        word, arg = word.lower(), arg.strip()
        if word == "note" and not arg:
            found["note"] = True
        elif word == "escalate" and arg.lower() in ("", "engineering"):
            found["escalate"] = True
            found["engineering"] = arg.lower() == "engineering"
        elif word == "escalate":
            errors.append(f"#escalate takes nothing or 'engineering'; got {arg!r}")
        elif word == "customer" and not arg:
            found["customer"] = True
        elif word in ("take", "unassign") and not arg:
            found[word] = True
        elif word == "assign":
            addresses, error = command_addresses(word, arg)
            if error or len(addresses) != 1:
                errors.append(error or f"#assign takes one staff address; got {arg!r}")
            else:
                found["assign"] = addresses[0]
        elif word == "status":
            try:
                found["status"] = Status(arg.lower())
            except ValueError:
                errors.append(f"#status needs one of open, pending, resolved, closed; got {arg!r}")
        elif word == "priority":
            if arg in ("1", "2", "3", "4"):
                found["priority"] = int(arg)
            else:
                errors.append(f"#priority needs 1, 2, 3 or 4; got {arg!r}")
        elif word in ("help", "list", "govcloud") and not arg:
            found[word] = True
        elif word == "answer":
            if not ANSWER_NAME.fullmatch(arg.lower()):
                errors.append(f"#answer needs the name of a canned answer; got {arg!r}")
            elif "answer" in found:
                errors.append("#answer: one canned answer per reply")
            found["answer"] = arg.lower()
        elif word in ("category", "product"):
            if not arg or len(arg) > MAX_CLASS_NAME:
                errors.append(f"#{word} needs a name (at most {MAX_CLASS_NAME} characters), or 'none'; got {arg!r}")
            else:
                found[word] = "" if arg.lower() in ("none", "-") else " ".join(arg.split())
        elif word in ("cc", "uncc"):
            addresses, error = command_addresses(word, arg)
            if error:
                errors.append(error)
            found[word] = (*found.get(word, ()), *addresses)  # type: ignore[misc]
        elif word in COMMANDS:
            errors.append(f"#{word} takes no argument; got {arg!r}")
        else:
            errors.append(f"unknown command #{word} (known: {', '.join('#' + c for c in COMMANDS)})")
        i += 1
    rest = "\n".join(lines[i:]).strip()
    if sum(bool(found.get(k)) for k in ("assign", "take", "unassign")) > 1:
        errors.append("one of #assign, #take and #unassign per reply")
    if found.get("help") and found.get("list"):
        errors.append("one of #help and #list per reply")
    if found.get("govcloud") and len(found) > 1:
        errors.append("#govcloud goes alone: once the ticket is GovCloud, only GovCloud staff act on it")
    return StaffCommands(note=bool(found.get("note")), status=found.get("status"),  # type: ignore[arg-type]
                         priority=found.get("priority"), escalate=bool(found.get("escalate")),  # type: ignore[arg-type]
                         engineering=bool(found.get("engineering")), customer=bool(found.get("customer")),
                         assign=found.get("assign"), take=bool(found.get("take")),  # type: ignore[arg-type]
                         unassign=bool(found.get("unassign")),
                         cc=tuple(found.get("cc", ())), uncc=tuple(found.get("uncc", ())),  # type: ignore[arg-type]
                         answer=found.get("answer"), help=bool(found.get("help")),  # type: ignore[arg-type]
                         listing=bool(found.get("list")), govcloud=bool(found.get("govcloud")),
                         category=found.get("category"), product=found.get("product"),  # type: ignore[arg-type]
                         errors=tuple(errors), text=rest)


def with_answer(cmds: StaffCommands, name: str, canned: StaffCommands) -> StaffCommands:
    """The agent's commands with a canned answer's: its text first (where the
    `#answer` line stood), then the agent's own; its commands where the agent
    gave none of that kind (the agent's own win). A canned answer can't insert
    another, ask for help or for a list."""
    errors = list(canned.errors)
    if canned.answer or canned.help or canned.listing:
        errors.append(f"#answer {name}: a canned answer can't use #answer, #help or #list")
    return replace(
        cmds, note=cmds.note or canned.note, status=cmds.status or canned.status,
        priority=cmds.priority if cmds.priority is not None else canned.priority,
        escalate=cmds.escalate or canned.escalate, engineering=cmds.engineering or canned.engineering,
        customer=cmds.customer or canned.customer, cc=(*cmds.cc, *canned.cc), uncc=(*cmds.uncc, *canned.uncc),
        category=cmds.category if cmds.category is not None else canned.category,
        product=cmds.product if cmds.product is not None else canned.product,
        errors=(*cmds.errors, *(f"#answer {name}: {e}" for e in errors)),
        text="\n\n".join(t for t in (canned.text, cmds.text) if t))


def new_participants(ticket: Ticket, add: Sequence[str], remove: Sequence[str], *,
                     refused: Callable[[str], str | None], max_participants: int
                     ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The ticket's Cc after `#cc add` / `#uncc remove` (and staff Cc'd on the
    answer), and the errors that forbid it.

    `refused(address)` says why an address may not be a participant (one of our
    own mailboxes or a queue: mail to it would come back to us), or None. The
    requester stays; an address is on the ticket once (case and `+tag` folded);
    [limits] max_participants bounds the whole."""
    errors: list[str] = []
    cc = list(ticket.cc)
    for address in remove:
        if mailbox_of(address) == mailbox_of(ticket.requester):
            errors.append(f"#uncc: {address} is the requester, who stays on the ticket")
        elif not any(mailbox_of(c) == mailbox_of(address) for c in cc):
            errors.append(f"#uncc: {address} is not on the ticket")
        cc = [c for c in cc if mailbox_of(c) != mailbox_of(address)]
    for address in add:
        why = refused(address)
        if why:
            errors.append(f"#cc: {address} {why}")
        elif mailbox_of(address) in {mailbox_of(p) for p in (ticket.requester, *cc)}:
            continue
        else:
            cc.append(address)
    if len(cc) + 1 > max_participants and len(cc) > len(ticket.cc):
        errors.append(f"#cc: a ticket has at most {max_participants} participants (limits.max_participants)")
    return tuple(cc), tuple(errors)
