"""What happens to one received mail, inside the intake's transaction.

parse (done before) → duplicate? → thread → automatic? → rules (new ticket)
→ lifecycle → outbox. The decisions are the pure functions of
`conversation`, `rules`, `lifecycle` and `inbound.automatic`; this module
only fetches what they need and writes what they decide (through `Desk`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import structlog

from gateway.config import Config, Mailbox, Policy
from gateway.desk import lifecycle
from gateway.desk.conversation import Placement, place, same_problem
from gateway.desk.writer import Desk
from gateway.mail import authres
from gateway.mail.automatic import automatic_kind
from gateway.mail.subject import tagged_ticket_id
from gateway.model import Attachment, Kind, ParsedMail, Status, Ticket, normalize_address
from gateway.outbound.tokens import TicketTokens
from gateway.rules import contacts, process
from gateway.rules.contacts import CERTIFIED, Standing
from gateway.rules.decision import Decision, decide
from gateway.rules.language import choose_language
from gateway.store import Tx

PARTICIPANTS_LISTED = 1000   # addresses named in the note about those left out
log = structlog.get_logger("gateway.pipeline")

# RFC 3464 §2.3.2: the recipient a delivery status notification is about
_FINAL_RECIPIENT = re.compile(rb"^Final-Recipient:\s*rfc822;\s*<?([^\s<>]+@[^\s<>]+)>?\s*$",
                              re.IGNORECASE | re.MULTILINE)
_PERMANENT = re.compile(rb"^Status:\s*5\.\d{1,3}\.\d{1,3}", re.IGNORECASE | re.MULTILINE)
# An address we could answer: a local part and a domain (RFC 5321 §4.1.2), no space,
# control character or bracket, no empty domain label. `@customer.example`, `ann@` or
# `ann@customer.` is no sender (found by
# tests/test_fuzz.py): answering it only makes the relay bounce our mail.
_ANSWERABLE = re.compile(r"[^\s@<>()\[\],;:\\\x00-\x1f\x7f]+"
                         r"@[^\s@<>()\[\],;:\\.\x00-\x1f\x7f]+(?:\.[^\s@<>()\[\],;:\\.\x00-\x1f\x7f]+)*")


@dataclass(frozen=True)
class Received:
    """A mail as it arrived, before anything is decided."""

    raw: bytes
    mail_from: str | None          # envelope sender; "" for <>, None when unknown
    rcpt_to: tuple[str, ...]
    mailbox: Mailbox
    received_at: datetime


@dataclass(frozen=True)
class Outcome:
    inbound_id: int
    action: str                    # created | joined | duplicate | automatic | quarantined
    ticket_id: int | None
    message_id: str
    queued: int                    # outbound mails put in the outbox
    reason: str


class Pipeline:
    def __init__(self, config: Config, desk: Desk, tokens: TicketTokens):
        self.config = config
        self.desk = desk
        self.tokens = tokens
        self.own_addresses = frozenset(
            [mb.address for mb in config.mailboxes] + list(config.queues.values()))

    async def handle(self, tx: Tx, inbound_id: int, mail: ParsedMail, received: Received) -> Outcome:
        now = received.received_at
        if not await tx.claim_inbound_message(mail.message_id):
            return Outcome(inbound_id, "duplicate", None, mail.message_id, 0,
                           "a mail with this Message-ID was already received")
        sender = mail.sender or normalize_address(received.mail_from or "")
        auto = automatic_kind(mail.headers, sender=sender, mail_from=received.mail_from,
                              own_addresses=self.own_addresses, content_types=mail.content_types)
        if auto is None and not _ANSWERABLE.fullmatch(sender):
            # Nobody to answer and nobody to thread by: kept for ops, never ticketed blind.
            # (Automatic mail goes on: a bounce from a bare MAILER-DAEMON, as IMAP
            # delivers it without an envelope, still belongs on its ticket.)
            return Outcome(inbound_id, "quarantined", None, mail.message_id, 0,
                           "no sender address in From: or the envelope")
        by_reference = await self._ticket_answered(tx, mail.thread_ids)
        if by_reference is None and auto == "bounce":
            # a DSN quotes our mail in its body, not in In-Reply-To
            by_reference = await self._ticket_answered(tx, self.tokens.ids_in(received.raw))
        tag_id = tagged_ticket_id(mail.subject, self.config.ticket_tag)
        by_tag = await tx.ticket(tag_id) if tag_id is not None and by_reference is None else None
        colleague = contacts.colleagues(self.config.rules.directory, sender, by_tag.requester, now.date()) \
            if by_tag is not None and sender not in by_tag.participants else None
        placement = place(sender=sender, sender_is_staff=self.config.is_staff(sender),
                          by_reference=by_reference, by_tag=by_tag, now=now, colleague_of=colleague)

        if auto is not None:
            ticket = by_reference or by_tag
            if ticket is None or (by_reference is None and placement.ticket_id is None):
                # Automatic mail about no ticket makes none and is never answered;
                # its raw bytes stay in the inbound store.
                return Outcome(inbound_id, "automatic", None, mail.message_id, 0,
                               f"{auto} mail that belongs to no ticket")
            await self._record(tx, ticket.id, Kind(auto), mail, inbound_id, now)
            if auto == "bounce":
                await self._mark_undeliverable(tx, ticket, received.raw, now)
            return Outcome(inbound_id, "joined", ticket.id, mail.message_id, 0,
                           f"{auto} mail recorded: no answer, no status change")

        joined = None
        if placement.ticket_id is None and not self.config.is_staff(sender):
            placement, joined = await self._same_problem(tx, placement, mail, received, sender, now)
        if placement.ticket_id is None:
            return await self._open_ticket(tx, inbound_id, mail, received, sender, placement)
        ticket = joined or (by_reference if by_reference and by_reference.id == placement.ticket_id else by_tag)
        assert ticket is not None
        if self.config.is_staff(sender):
            unverified = self._staff_unverified(received, sender)
            if unverified is None:
                return await self._staff_reply(tx, inbound_id, mail, ticket, sender, now, placement)
            return await self._unverified_staff(tx, inbound_id, mail, ticket, sender, now, unverified)
        return await self._customer_reply(tx, inbound_id, mail, ticket, sender, now, placement)

    async def _same_problem(self, tx: Tx, placement: Placement, mail: ParsedMail, received: Received,
                            sender: str, now: datetime) -> tuple[Placement, Ticket | None]:
        """One ticket per problem: the sender's open ticket answered from this
        mailbox with the same subject, if any (conversation.same_problem)."""
        within = self.config.same_problem_within
        if not within or placement.linked_ticket is not None:
            return placement, None
        candidates = [t for t in await tx.open_tickets_of(sender, now - within)
                      if t.mailbox == self._answering_mailbox(received.mailbox, t.govcloud)]
        found = same_problem(placement, sender=sender, subject=mail.subject, ticket_tag=self.config.ticket_tag,
                             candidates=candidates, now=now, within=within)
        if found.ticket_id is None:
            return placement, None
        return found, await tx.ticket(found.ticket_id)      # locked, as read now

    async def _ticket_answered(self, tx: Tx, ids: tuple[str, ...]) -> Ticket | None:
        if not ids:
            return None
        known = await tx.tickets_of_messages(ids)
        for mid in ids:                      # nearest answered message first
            ticket_id = known.get(mid) or self.tokens.ticket_of(mid)
            if ticket_id is not None:
                ticket = await tx.ticket(ticket_id)
                if ticket is not None:
                    return ticket
        return None

    async def _record(self, tx: Tx, ticket_id: int, kind: Kind, mail: ParsedMail,
                      inbound_id: int, now: datetime) -> int:
        cap = self.config.limits.max_participants
        row = await tx.add_message(
            ticket_id=ticket_id, direction="in", kind=kind.value, sender=mail.sender,
            recipients=mail.to[:cap], cc=mail.cc[:cap], subject=mail.subject, message_id=mail.message_id,
            body_text=mail.body_text, reply_text=mail.reply_text, now=now, inbound_id=inbound_id)
        if mail.attachments:
            await tx.add_attachments(row, [a for a, _ in mail.attachments])
        return row

    async def _mark_undeliverable(self, tx: Tx, ticket: Ticket, raw: bytes, now: datetime) -> None:
        """A permanent bounce flags the failed addresses of the ticket: no more mail to them."""
        if not _PERMANENT.search(raw):
            return
        failed = {normalize_address(m.decode("ascii", "replace")) for m in _FINAL_RECIPIENT.findall(raw)}
        failed &= set(ticket.participants)
        if failed - set(ticket.undeliverable):
            addresses = tuple(sorted(set(ticket.undeliverable) | failed))
            await tx.update_ticket(ticket.id, now, undeliverable=addresses)
            log.warning("ticket.undeliverable", ticket_id=ticket.id, addresses=sorted(failed))

    def decide(self, mail: ParsedMail, mailbox: Mailbox, now: datetime) -> Decision:
        """The rules stage for a new ticket (also what `gateway explain` shows)."""
        return decide(mail, mailbox_address=mailbox.address, mailbox_govcloud=mailbox.govcloud,
                      rules=self.config.rules, directory=self.config.rules.directory, now=now,
                      mailbox_emergency=mailbox.emergency)

    async def _open_ticket(self, tx: Tx, inbound_id: int, mail: ParsedMail, received: Received,
                           sender: str, placement: Placement) -> Outcome:
        now = received.received_at
        decision = self.decide(mail, received.mailbox, now)
        if decision.contact is not None and decision.contact.refused:
            # Kaseya: only authorised contacts open tickets. Kept (quarantined:
            # `quarantine retry` once the organisation has added them), no ticket.
            log.warning("contact.refused", message_id=mail.message_id, sender=sender,
                        **decision.contact.to_json())
            return Outcome(inbound_id, "quarantined", None, mail.message_id, 0,
                           f"contact.refused: {decision.contact.why}; no ticket (quarantine retry "
                           f"once {decision.contact.organisation} has added the sender)")
        redirect_to = self.config.redirects.get(decision.redirect) if decision.redirect else None
        if decision.redirect and not redirect_to:
            log.warning("ticket.redirect_unconfigured", redirect=decision.redirect,
                        message_id=mail.message_id)
        mailbox = self._answering_mailbox(received.mailbox, decision.govcloud)
        own = self.own_addresses | {sender}
        cc = tuple(dict.fromkeys(a for a in mail.cc + mail.to if a not in own and not self.config.mailbox_for(a)))
        # [limits] max_participants: a mail naming 100 000 addresses makes a ticket
        # answering 50 (project issue 14: a closure notice went to 100 001 recipients)
        cc, dropped = cc[:self.config.limits.max_participants], cc[self.config.limits.max_participants:]
        lang, lang_why = self.language(mail, received.mailbox, sender)
        ticket = await tx.create_ticket(
            subject=mail.subject or "(no subject)", requester=sender, cc=cc, region=decision.region,
            govcloud=decision.govcloud, priority=decision.priority, mailbox=mailbox,
            linked_ticket=placement.linked_ticket, now=now, plan=decision.plan,
            response_due_at=decision.response_due if redirect_to is None else None,
            missing=decision.missing, redirect=decision.redirect if redirect_to else None,
            language=lang, decision={**decision.to_json(), "language": {"value": lang, "why": lang_why}},
            emergency=decision.emergency and redirect_to is None,
            contact=decision.contact.rank if decision.contact else "")
        await self._record(tx, ticket.id, Kind.CUSTOMER, mail, inbound_id, now)
        marks = []
        if decision.contact is not None:
            await tx.add_event(ticket.id, now, "contact", decision.contact.to_json())
            marks = contact_marks(decision.contact)
        if dropped:
            await self._participants_dropped(tx, ticket, mail, dropped, inbound_id, now)
        if redirect_to:
            queued = await self._redirect(tx, ticket, mail, received, redirect_to, now)
        else:
            queued = 0
            if await self._auto_answer_allowed(tx, ticket, sender, now):
                queued = await self.desk.to_customer(
                    tx, ticket, Kind.ACK, now, include_cc=False, thread=[mail.message_id],
                    context={"name": mail.sender_name or sender,
                             "target": self.desk.target_text(ticket, decision.response_due),
                             "missing": list(decision.missing),
                             "emergency": self._emergency_instructions(ticket)})
            queued += await self._notify(tx, ticket, mail, sender, is_new=True, now=now,
                                         dropped=len(dropped), marks=marks)
            queued += await self._emergency_alert(tx, ticket, mail, decision, now)
            ticket, more = await self._auto_escalate(tx, ticket, [mail.message_id], now)
            queued += more
            queued += await self._escalation_request(tx, ticket, mail, now)
        log.info("ticket.created", ticket_id=ticket.id, message_id=mail.message_id,
                 mailbox=ticket.mailbox, region=ticket.region, govcloud=ticket.govcloud,
                 priority=ticket.priority, plan=ticket.plan, queue=decision.queue,
                 redirect=ticket.redirect, missing=list(ticket.missing),
                 linked_ticket=ticket.linked_ticket, reason=placement.reason, language=lang,
                 rules=sorted({e.rule for e in decision.evidence if not e.rule.endswith(".none")}))
        return Outcome(inbound_id, "created", ticket.id, mail.message_id, queued, placement.reason)

    def language(self, mail: ParsedMail, mailbox: Mailbox, sender: str) -> tuple[str, str]:
        """The language the customer is answered in, and why (gateway.rules.language)."""
        found = self.config.rules.directory.lookup(sender.rpartition("@")[2])
        return choose_language(
            directory_language=found[0].language if found else None,
            content_language=mail.headers.get("content-language"),
            accept_language=mail.headers.get("accept-language"),
            text=f"{mail.subject}\n{mail.reply_text}", default=mailbox.language)

    def _policy(self, ticket: Ticket) -> Policy:
        return self.config.policy_for(ticket.mailbox, ticket.plan)

    def _answering_mailbox(self, reached: Mailbox, govcloud: bool) -> str:
        """GovCloud tickets are answered from a GovCloud mailbox, even when the
        mail reached the commercial one (the rules found it belongs to GovCloud)."""
        if govcloud and not reached.govcloud:
            gov = next((m for m in self.config.mailboxes if m.govcloud), None)
            if gov is not None:
                return gov.address
        return reached.address

    async def _redirect(self, tx: Tx, ticket: Ticket, mail: ParsedMail, received: Received,
                        address: str, now: datetime) -> int:
        """Not for support: forward the mail there, tell the customer where it went, resolve."""
        original = (Attachment("original-message.eml", "application/octet-stream",
                               len(received.raw), ""), received.raw)
        queued = await self.desk.to_staff(
            tx, ticket, address, now, answers=[mail.message_id], template="forward",
            reply_to=ticket.requester, attachments=[original],
            context={"sender": ticket.requester, "department": ticket.redirect,
                     "body_text": mail.body_text})
        queued += await self.desk.to_customer(
            tx, ticket, Kind.REDIRECT, now, include_cc=False, thread=[mail.message_id],
            context={"name": mail.sender_name or ticket.requester, "department": ticket.redirect,
                     "address": address})
        _, more = await self.desk.apply(
            tx, ticket, lifecycle.enter(Status.RESOLVED, now, self._policy(ticket),
                                        cause=f"redirected to {ticket.redirect}"), now)
        log.info("ticket.redirected", ticket_id=ticket.id, redirect=ticket.redirect, to=address)
        return queued + more

    async def _customer_reply(self, tx: Tx, inbound_id: int, mail: ParsedMail, ticket: Ticket,
                              sender: str, now: datetime, placement: Placement) -> Outcome:
        await self._record(tx, ticket.id, Kind.CUSTOMER, mail, inbound_id, now)
        marks: list[str] = []
        if placement.colleague_of and sender not in ticket.participants \
                and len(ticket.cc) < self.config.limits.max_participants:
            # a colleague who answers gets the ticket's mail from now on
            await tx.update_ticket(ticket.id, now, cc=(*ticket.cc, sender))
            ticket = replace(ticket, cc=(*ticket.cc, sender))
            await tx.add_event(ticket.id, now, "colleague", {"sender": sender, "organisation": placement.colleague_of,
                                                             "why": placement.reason})
        if placement.same_problem:
            await tx.add_event(ticket.id, now, "same_problem", {"message_id": mail.message_id,
                                                                "subject": mail.subject, "why": placement.reason})
            marks.append(f"ONE TICKET PER PROBLEM: a new mail (not a reply) joined this ticket: {placement.reason}")
        solved = process.solved(mail.reply_text) if ticket.status in (Status.OPEN, Status.PENDING) else None
        tr = lifecycle.after_customer_reply(ticket, now, self._policy(ticket), solved=solved is not None)
        ticket, queued = await self.desk.apply(tx, ticket, lifecycle.held(ticket, tr), now)
        if solved is not None:
            closed = ticket.status is Status.RESOLVED
            await tx.add_event(ticket.id, now, "customer_closed" if closed else "customer_says_solved",
                               {**solved.to_json(), "resolved": closed})
            marks.append("The customer confirms the problem is solved: ticket resolved "
                         "(reply #status open to reopen it)" if closed else
                         "The customer says the problem is solved: escalated, so close it by hand")
        chaser = process.status_request(mail.reply_text) if solved is None else None
        if chaser is not None:
            answered = await self._status_answer(tx, ticket, now)
            queued += answered
            await tx.add_event(ticket.id, now, "status_request", {**chaser.to_json(), "answered": bool(answered)})
            marks.append("CHASER: the customer asks for the status"
                         + (" (sent the automatic status answer)" if answered else ""))
        contact = lifecycle.after_customer_contact(ticket, now, self.config.escalation, by_staff=False)
        if contact:
            await tx.update_ticket(ticket.id, now, **contact)
            ticket = replace(ticket, **contact)  # type: ignore[arg-type]
        queued += await self._notify(tx, ticket, mail, sender, is_new=False, now=now, marks=marks)
        queued += await self._escalation_request(tx, ticket, mail, now)
        log.info("ticket.replied", ticket_id=ticket.id, message_id=mail.message_id,
                 mailbox=ticket.mailbox, staff=False, reason=placement.reason)
        return Outcome(inbound_id, "joined", ticket.id, mail.message_id, queued, placement.reason)

    async def _staff_reply(self, tx: Tx, inbound_id: int, mail: ParsedMail, ticket: Ticket,
                           sender: str, now: datetime, placement: Placement) -> Outcome:
        """Staff answered from their mail client: commands, then relay to the customer."""
        cmds = lifecycle.staff_commands(mail.reply_text)
        if cmds.errors:
            # nothing is applied or relayed; the agent is told why
            await self._record(tx, ticket.id, Kind.NOTE, mail, inbound_id, now)
            queued = await self.desk.to_staff(
                tx, ticket, sender, now, answers=[mail.message_id], template="command_error",
                context={"errors": cmds.errors, "text": mail.reply_text})
            log.warning("staff.command_rejected", ticket_id=ticket.id, message_id=mail.message_id,
                        errors=list(cmds.errors))
            return Outcome(inbound_id, "joined", ticket.id, mail.message_id, queued,
                           "staff commands rejected: " + "; ".join(cmds.errors))
        relay = bool(cmds.text) and not cmds.note
        # an engineer's answer on an escalated ticket goes to its owner, who answers the customer
        internal = relay and ticket.escalated and ticket.owner not in (None, sender) and not cmds.customer
        relay = relay and not internal
        await self._record(tx, ticket.id, Kind.STAFF if relay else Kind.NOTE, mail, inbound_id, now)
        changes: dict[str, object] = {}
        if cmds.priority is not None and cmds.priority != ticket.priority:
            changes["priority"] = cmds.priority
        if relay and ticket.first_response_at is None:
            changes["first_response_at"] = now
        if ticket.owner is None and (relay or cmds.escalate):
            changes["owner"] = sender         # the technician who answers owns the ticket
        if relay:
            changes.update(lifecycle.after_customer_contact(ticket, now, self.config.escalation,
                                                            by_staff=True))
        if changes:
            await tx.update_ticket(ticket.id, now, **changes)
            ticket = replace(ticket, **changes)  # type: ignore[arg-type]
            log.info("ticket.updated", ticket_id=ticket.id, by="staff",
                     fields=sorted(changes))
        queued = 0
        if internal:
            assert ticket.owner is not None
            queued += await self.desk.to_staff(
                tx, ticket, ticket.owner, now, answers=[mail.message_id], template="process_staff",
                context={"headline": f"Internal answer from {sender} (not sent to the customer)",
                         "why": "engineers answer the owning technician, who answers the customer;"
                                " start a reply with #customer to send it to the customer directly",
                         "text": cmds.text})
        if relay:
            queued += await self.desk.to_customer(
                tx, ticket, Kind.STAFF_REPLY, now, context={"text": cmds.text,
                                                            "agent": mail.sender_name or "Support"},
                from_name=mail.sender_name or None, attachments=mail.attachments)
        if cmds.escalate:
            esc = lifecycle.escalate(ticket, engineering=cmds.engineering, by=sender, now=now,
                                     config=self.config.escalation, hours=self.config.rules.hours,
                                     owner=sender)
            if esc is not None:
                ticket, more = await self.desk.escalate(tx, ticket, esc, now, answers=[mail.message_id],
                                                        text=cmds.text, contacted=relay)
                queued += more
        else:
            ticket, more = await self._auto_escalate(tx, ticket, [mail.message_id], now)
            queued += more
        ticket, more = await self.desk.apply(
            tx, ticket, lifecycle.after_staff_reply(ticket, cmds.status, relay, now, self._policy(ticket)),
            now)
        queued += more
        log.info("ticket.replied", ticket_id=ticket.id, message_id=mail.message_id,
                 mailbox=ticket.mailbox, staff=True, relayed=relay, reason=placement.reason)
        return Outcome(inbound_id, "joined", ticket.id, mail.message_id, queued, placement.reason)

    async def _auto_escalate(self, tx: Tx, ticket: Ticket, answers: list[str],
                             now: datetime) -> tuple[Ticket, int]:
        """Kaseya: business-critical (priority 1) tickets escalate on their own, to tier 2."""
        limit = self.config.escalation.auto_priority
        if not limit or ticket.priority > limit:
            return ticket, 0
        esc = lifecycle.escalate(ticket, engineering=False, by=f"rules: priority {ticket.priority}",
                                 now=now, config=self.config.escalation, hours=self.config.rules.hours,
                                 owner=None)
        if esc is None:
            return ticket, 0
        return await self.desk.escalate(tx, ticket, esc, now, answers=answers)

    def _emergency_instructions(self, ticket: Ticket) -> str | None:
        """The configured emergency instructions, in the customer's language."""
        if not ticket.emergency:
            return None
        texts = self.config.emergency.instructions
        return texts.get(ticket.language) or texts.get("en")

    async def _emergency_alert(self, tx: Tx, ticket: Ticket, mail: ParsedMail, decision: Decision,
                               now: datetime) -> int:
        """An emergency alerts the emergency queue, and the pager when there is one, at once."""
        if not ticket.emergency:
            return 0
        why = next((e.detail for e in decision.evidence if e.rule == "priority.emergency"), "")
        await tx.add_event(ticket.id, now, "emergency", {"why": why, "queue": self.config.emergency.queue,
                                                         "pager": self.config.emergency.pager})
        log.warning("ticket.emergency", ticket_id=ticket.id, why=why, queue=self.config.emergency.queue,
                    pager=self.config.emergency.pager)
        queued = 0
        for address in filter(None, (self.config.emergency.queue, self.config.emergency.pager)):
            queued += await self.desk.to_staff(
                tx, ticket, address, now, answers=[mail.message_id], template="process_staff",
                context={"headline": f"EMERGENCY: ticket #{ticket.id}, priority 1, 24/7", "why": why,
                         "text": mail.reply_text})
        return queued

    async def _escalation_request(self, tx: Tx, ticket: Ticket, mail: ParsedMail, now: datetime) -> int:
        """The customer asks for escalation: the owner is alerted, and it is recorded."""
        found = process.escalation_request(f"{mail.subject}\n{mail.reply_text}")
        if found is None:
            return 0
        await tx.add_event(ticket.id, now, "escalation_request", found.to_json())
        log.info("ticket.escalation_requested", ticket_id=ticket.id, **found.to_json())
        return await self.desk.to_staff(
            tx, ticket, self.desk.owner_of(ticket), now, answers=[mail.message_id],
            template="process_staff",
            context={"headline": f"The customer asks for escalation (ticket at tier {ticket.tier})",
                     "why": f"{found.language} wording {found.phrase!r}; reply with #escalate or "
                            "#escalate engineering to hand it on",
                     "text": mail.reply_text})

    async def _status_answer(self, tx: Tx, ticket: Ticket, now: datetime) -> int:
        """HKN's status request: the automatic answer, at most one per ticket per interval."""
        cfg = self.config.status_requests
        last = await tx.last_message_at(ticket.id, (Kind.STATUS.value,))
        if not cfg.enabled or not lifecycle.status_answer_due(ticket, last, now, cfg.interval):
            return 0
        staff_at = await tx.last_message_at(ticket.id, (Kind.STAFF_REPLY.value,))
        return await self.desk.to_customer(
            tx, ticket, Kind.STATUS, now,
            context={"target": self.desk.target_text(ticket, ticket.response_due_at),
                     "response": lifecycle.response_state(ticket, now),
                     "staff_at": staff_at.strftime("%Y-%m-%d %H:%M UTC") if staff_at else None})

    async def _notify(self, tx: Tx, ticket: Ticket, mail: ParsedMail, sender: str, *,
                      is_new: bool, now: datetime, dropped: int = 0,
                      marks: list[str] | None = None) -> int:
        return await self.desk.to_staff(
            tx, ticket, self.desk.queue_of(ticket), now, answers=[mail.message_id],
            context={"is_new": is_new, "sender": sender, "reply_text": mail.reply_text, "marks": marks or [],
                     "body_text": mail.body_text, "attachments": [a for a, _ in mail.attachments],
                     "participants_dropped": dropped,
                     "max_participants": self.config.limits.max_participants})

    async def _participants_dropped(self, tx: Tx, ticket: Ticket, mail: ParsedMail, dropped: tuple[str, ...],
                                    inbound_id: int, now: datetime) -> None:
        """The To/Cc addresses past max_participants: recorded on the ticket as an
        internal note (the mail's raw bytes keep them all), never answered."""
        listed = dropped[:PARTICIPANTS_LISTED]
        more = f"\n(and {len(dropped) - len(listed)} more; the stored mail has them all)" \
            if len(dropped) > len(listed) else ""
        await tx.add_message(
            ticket_id=ticket.id, direction="in", kind=Kind.NOTE.value, sender=ticket.mailbox, recipients=(),
            subject=f"{len(dropped)} To/Cc addresses not added", message_id=f"<participants-{inbound_id}@gateway.invalid>",
            body_text=f"The mail named more than {self.config.limits.max_participants} To/Cc addresses "
                      f"(limits.max_participants); these were not added to the ticket and get no mail from it:\n"
                      + "\n".join(listed) + more,
            reply_text="", now=now, inbound_id=inbound_id)
        log.warning("ticket.participants_capped", ticket_id=ticket.id, message_id=mail.message_id,
                    kept=self.config.limits.max_participants, dropped=len(dropped))

    # -- loops, floods and forged staff mail -----------------------------
    async def _auto_answer_allowed(self, tx: Tx, ticket: Ticket, sender: str, now: datetime) -> bool:
        """At most `[limits] auto_answers_per_sender_per_hour` automatic answers to one address.

        A flood from one sender (or a responder that sets none of RFC 3834's
        headers, so that `automatic_kind` can't tell) still makes its tickets
        and reaches staff, but is not answered mail for mail: RFC 3834 §2
        asks automatic responders to limit how often they answer one sender.
        The window slides over the injected clock (`now`).
        """
        limit = self.config.limits.auto_answers_per_sender_per_hour
        sent = await tx.auto_answers_to(sender, now - timedelta(hours=1), AUTO_ANSWER_KINDS)
        if sent < limit:
            return True
        log.warning("ticket.ack_suppressed", ticket_id=ticket.id, requester=sender,
                    sent_last_hour=sent, limit=limit)
        return False

    def _staff_unverified(self, received: Received, sender: str) -> str | None:
        """Why a staff address's mail can't be taken as staff, or None when it can.

        With `[staff] require_authenticated`, only mail that the receiving MTA
        authenticated for the From domain (RFC 8601 Authentication-Results from
        a trusted authserv-id: `gateway.mail.authres`) is relayed or obeyed.
        """
        if not self.config.staff_require_authenticated:
            return None
        verdict = authres.verify(authres.header_values(received.raw),
                                 from_domain=sender.rpartition("@")[2],
                                 trusted_ids=self.config.staff_trusted_authserv_ids)
        return None if verdict.authenticated else verdict.reason

    async def _unverified_staff(self, tx: Tx, inbound_id: int, mail: ParsedMail, ticket: Ticket,
                                sender: str, now: datetime, reason: str) -> Outcome:
        """Mail from a staff address that the MTA did not authenticate.

        Kept on the ticket as a `note`: staff see it, the customer never does
        (notes are not relayed and are not on the customer's thread), no
        command is applied and the status does not change. The staff address
        is told why, so a real agent whose mail setup broke learns of it, and
        an agent being impersonated learns that too.
        """
        await self._record(tx, ticket.id, Kind.NOTE, mail, inbound_id, now)
        queued = await self.desk.to_staff(
            tx, ticket, sender, now, answers=[mail.message_id], template="command_error",
            context={"errors": [f"our mail server did not authenticate your mail as coming from "
                                f"{sender.rpartition('@')[2]} ({reason}); it was kept as an internal "
                                f"note only"],
                     "text": mail.reply_text})
        log.warning("staff.unauthenticated", ticket_id=ticket.id, message_id=mail.message_id,
                    sender=sender, reason=reason)
        return Outcome(inbound_id, "joined", ticket.id, mail.message_id, queued,
                       f"staff mail not authenticated, kept as a note: {reason}")


# Our automatic answers to a customer, counted by the per-sender hourly cap
AUTO_ANSWER_KINDS = (Kind.ACK.value, Kind.REDIRECT.value)


def contact_marks(standing: Standing) -> list[str]:
    """What staff mail says about the requester's standing (Kaseya)."""
    if standing.flagged:
        return [f"NOT AN AUTHORISED CONTACT: {standing.why}"]
    if standing.rank == CERTIFIED:
        return [f"CERTIFIED ADMINISTRATOR (ranked first): {standing.why}"]
    return []
