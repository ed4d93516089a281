"""What happens to one received mail, inside the intake's transaction.

parse (done before) → duplicate? → thread → automatic? → rules (new ticket)
→ lifecycle → outbox. The decisions are the pure functions of
`conversation`, `rules`, `lifecycle` and `inbound.automatic`; this module
only fetches what they need and writes what they decide (through `Desk`).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import structlog

from gateway.config import Config, Mailbox, Policy
from gateway.desk import lifecycle
from gateway.desk.conversation import Placement, place, same_problem
from gateway.desk.digest import LISTED, lists_of
from gateway.desk.writer import Desk
from gateway.mail import authres
from gateway.mail.automatic import automatic_kind
from gateway.mail.bounce import read_bounce
from gateway.mail.subject import tagged_ticket_id
from gateway.model import Attachment, Kind, ParsedMail, Status, Ticket, domain_of, mailbox_of, normalize_address
from gateway.outbound.tokens import TicketTokens, without_staff_tokens
from gateway.rules import contacts, process
from gateway.rules.contacts import CERTIFIED, Standing
from gateway.rules.decision import Decision, decide, govcloud_in_reply, supplied, ticket_target_times
from gateway.rules.language import NAMES as LANGUAGE_NAMES
from gateway.rules.language import choose_language
from gateway.rules.settings import normalise_value
from gateway.store import SenderCounts, Tx

PARTICIPANTS_LISTED = 1000   # addresses named in the note about those left out
log = structlog.get_logger("gateway.pipeline")

# An address we could answer: a local part and a domain (RFC 5321 §4.1.2), no space,
# control character or bracket, no empty domain label. `@customer.example`, `ann@` or
# `ann@customer.` is no sender (found by
# tests/test_fuzz.py): answering it only makes the relay bounce our mail.
_ANSWERABLE = re.compile(r"[^\s@<>()\[\],;:\\\x00-\x1f\x7f]+"
                         r"@[^\s@<>()\[\],;:\\.\x00-\x1f\x7f]+(?:\.[^\s@<>()\[\],;:\\.\x00-\x1f\x7f]+)*")


def content_digest(mail: ParsedMail) -> str:
    """A digest of what survives re-delivery of one mail: From, Date, Subject, the
    text and the attachments' digests, as parsed; not trace headers, transfer
    encodings or line ends, which a relay or an IMAP server may change."""
    parts = [mail.sender, mail.date.isoformat() if mail.date else "", mail.subject, mail.body_text,
             *(a.sha256 for a, _ in mail.attachments)]
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:16]


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
        # addresses of ours that are never a participant of a ticket
        self.own_addresses = frozenset(
            [mb.address for mb in config.mailboxes] + list(config.queues.values()))
        # mail From these is our own mail come back (a queue address is staff: a team
        # answering from its shared mailbox is a person, judged by its headers)
        self.mailbox_addresses = frozenset(mb.address for mb in config.mailboxes)
        # every address our mail to staff goes to, whose tokens an answer may quote
        # (a queue's notification forwarded to a colleague, a forward to billing)
        self.staff_mail_to = (*config.queues.values(), *sorted(config.staff_addresses),
                              *sorted(config.govcloud_staff.addresses),
                              *config.redirects.values())

    async def handle(self, tx: Tx, inbound_id: int, mail: ParsedMail, received: Received) -> Outcome:
        now = received.received_at
        key = content_digest(mail)
        claim = await tx.claim_inbound_message(mail.message_id, key)
        if claim == "duplicate":
            return Outcome(inbound_id, "duplicate", None, mail.message_id, 0,
                           "this mail (its Message-ID and content) was already received")
        if claim == "reused":
            # a stranger sending first with a customer's Message-ID must not silence
            # the customer's mail: a different content is a different mail
            log.warning("mail.message_id_reused", message_id=mail.message_id, inbound_id=inbound_id)
        sender = mail.sender or normalize_address(received.mail_from or "")
        if mail.from_address is not None and mail.from_address != mail.sender \
                and self.config.is_staff(sender):
            # A rewritten or forwarded author (X-Original-From + Reply-To of a list,
            # Sender/Reply-To without From) never becomes staff: the mail is
            # whoever its From (or envelope) names, and is judged as theirs.
            log.warning("staff.rewritten_sender", message_id=mail.message_id, claimed=sender)
            sender = mail.from_address or normalize_address(received.mail_from or "")
        staff = self.config.is_staff(sender)
        auto = automatic_kind(mail.headers, sender=sender, mail_from=received.mail_from,
                              own_addresses=self.mailbox_addresses, content_types=mail.content_types)
        if auto is None and not _ANSWERABLE.fullmatch(sender):
            # Nobody to answer and nobody to thread by: kept for ops, never ticketed blind.
            # (Automatic mail goes on: a bounce from a bare MAILER-DAEMON, as IMAP
            # delivers it without an envelope, still belongs on its ticket.)
            # (the intake gives its key back, as for every quarantined outcome)
            return Outcome(inbound_id, "quarantined", None, mail.message_id, 0,
                           "no sender address in From: or the envelope")
        by_reference = await self._ticket_answered(tx, mail.thread_ids)
        if by_reference is None and auto == "bounce":
            # a DSN quotes our mail in its body, not in In-Reply-To
            by_reference = await self._ticket_answered(tx, self.tokens.ids_in(received.raw))
        stranger = None
        if auto is None and not staff:
            stranger = await self._stranger_answering_us(tx, mail, received, sender, by_reference)
            if stranger is not None:
                auto, by_reference = "auto", stranger
        tag_id = tagged_ticket_id(mail.subject, self.config.ticket_tag)
        by_tag = await tx.ticket(tag_id) if tag_id is not None and by_reference is None else None
        colleague = contacts.colleagues(self.config.rules.directory, sender, by_tag.requester, now.date()) \
            if by_tag is not None and not by_tag.is_participant(sender) else None
        placement = place(sender=sender, sender_is_staff=staff,
                          by_reference=by_reference, by_tag=by_tag, now=now, colleague_of=colleague)
        answered = by_reference or by_tag
        if auto is None and answered is None and sender in self.config.queues.values():
            # a queue address answers tickets; mail from it about none is our own
            # notification come back (a list, a forward): never a ticket of its own
            auto = "auto"

        if auto is not None:
            ticket = by_reference or by_tag
            if ticket is None or (by_reference is None and placement.ticket_id is None):
                # Automatic mail about no ticket makes none and is never answered;
                # its raw bytes stay in the inbound store.
                return Outcome(inbound_id, "automatic", None, mail.message_id, 0,
                               f"{auto} mail that belongs to no ticket")
            await self._record(tx, ticket.id, Kind(auto), mail, inbound_id, now)
            queued = await self._mark_undeliverable(tx, ticket, received.raw, now) if auto == "bounce" else 0
            why = " (answers our mail but is not on the ticket)" if stranger is not None else ""
            return Outcome(inbound_id, "joined", ticket.id, mail.message_id, queued,
                           f"{auto} mail recorded{why}: no answer, no status change")

        if answered is not None and not staff and self._answers_staff_mail(answered, mail, received):
            return await self._not_staff(tx, inbound_id, mail, answered, sender, now)

        joined = None
        if placement.ticket_id is None and not staff:
            placement, joined = await self._same_problem(tx, placement, mail, received, sender, now)
        if placement.ticket_id is None:
            # a subject tag from someone not on that ticket: `tagged` is the ticket quoted
            linked = answered if answered is not None and answered.id == placement.linked_ticket else None
            tagged = by_tag if by_tag is not None and linked is by_tag \
                and not by_tag.is_participant(sender) else None
            return await self._open_ticket(tx, inbound_id, mail, received, sender, placement, linked, tagged)
        ticket = joined or (by_reference if by_reference and by_reference.id == placement.ticket_id else by_tag)
        assert ticket is not None
        if staff and not self.config.may_answer(sender, ticket.govcloud):
            # staff, but not GovCloud staff, on a GovCloud ticket (issue 18): refused as not staff
            return await self._not_staff(tx, inbound_id, mail, ticket, sender, now)
        if staff:
            unproven = self._staff_unproven(mail, received, ticket, sender)
            if unproven is None:
                return await self._staff_reply(tx, inbound_id, mail, ticket, sender, now, placement)
            return await self._unproven_staff(tx, inbound_id, mail, ticket, sender, now, unproven)
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

    async def quarantine_notice(self, tx: Tx, inbound_id: int, thread_ids: tuple[str, ...],
                                received: Received, error: str) -> int:
        """A mail that answers a ticket's mail could not be processed and is
        quarantined (issue 20): the ticket's staff (`[staff] notify`) are told, at most
        once per ticket an hour, quoting nothing of the mail but its envelope sender
        and the error, with the commands that show and retry it; the ticket gets a
        `quarantined_mail` event either way. Only by the Message-IDs it answers (ours,
        or the ticket's messages): a guessed subject tag makes no notice."""
        ticket = await self._ticket_answered(tx, thread_ids)
        if ticket is None:
            return 0
        now = received.received_at
        queued = 0
        if await tx.staff_warning_due(ticket.id, QUARANTINE_NOTICE, now, now - timedelta(hours=1)):
            side = " --govcloud" if received.mailbox.govcloud else ""
            sender = received.mail_from or "(no envelope sender)"
            queued = await self.desk.notify_staff(
                tx, ticket, now, answers=[], template="process_staff",
                context={"headline": f"A mail for ticket #{ticket.id} could not be processed; it is kept "
                                     f"in quarantine (ID {inbound_id})",
                         "why": " ".join(error.split())[:300],
                         "text": f"Envelope sender: {sender}\n"
                                 f"See it:    gateway quarantine show {inbound_id}{side}\n"
                                 f"Retry it:  gateway quarantine retry {inbound_id}{side}\n"
                                 "(at most one such notice per ticket an hour; the ticket's events list them all)"})
        await tx.add_event(ticket.id, now, "quarantined_mail", {"inbound_id": inbound_id, "told": bool(queued)})
        log.warning("quarantine.ticket_told", ticket_id=ticket.id, inbound_id=inbound_id, told=bool(queued))
        return queued

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

    async def _stranger_answering_us(self, tx: Tx, mail: ParsedMail, received: Received, sender: str,
                                     by_reference: Ticket | None) -> Ticket | None:
        """The ticket whose mail of ours this mail quotes, when its sender is not on it.

        Our Message-IDs (`gateway.outbound.tokens`) went only to the ticket's
        participants. Someone else quoting one, in References/In-Reply-To or in
        the body, is answering mail that was not sent to them: the responder
        of a helpdesk or a forwarding rule that sets no RFC 3834 header (issue
        14: a foreign helpdesk answering from `help+N@`), or a person our mail
        was forwarded to. Either way it is treated as automatic: recorded on
        the ticket for staff, never answered, no status change. (Answers to a
        customer's own Message-ID, as a Cc'd colleague's reply-all, are not
        ours and thread as before.)
        """
        if by_reference is not None:
            ours = any(self.tokens.ticket_of(mid) == by_reference.id for mid in mail.thread_ids)
            quoted = by_reference if ours else None
        else:
            quoted = await self._ticket_answered(tx, self.tokens.ids_in(received.raw))
        if quoted is None or quoted.is_participant(sender):
            return None
        if self._answers_staff_mail(quoted, mail, received):
            return None      # an answer to our mail to staff: told it is not staff (`_not_staff`)
        log.warning("ticket.stranger_answer", ticket_id=quoted.id, message_id=mail.message_id,
                    sender=sender, by="references" if by_reference is not None else "body")
        return quoted

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

    async def _mark_undeliverable(self, tx: Tx, ticket: Ticket, raw: bytes, now: datetime) -> int:
        """A bounce flags the ticket's addresses it reports failed for good (never
        one only delayed: `gateway.mail.bounce`), and tells the queue. Returns the
        mails queued."""
        report = read_bounce(raw)
        failed = {normalize_address(a) for a in report.failed} & set(ticket.participants)
        new = sorted(failed - set(ticket.undeliverable))
        if not new:
            return 0
        await tx.update_ticket(ticket.id, now, undeliverable=tuple(sorted(set(ticket.undeliverable) | failed)))
        log.warning("ticket.undeliverable", ticket_id=ticket.id, addresses=new, delayed=list(report.delayed))
        return await self.desk.undeliverable_notice(
            tx, ticket, now, addresses=new, marked=new,
            what="A delivery report came back saying this address does not take mail (a permanent failure).")

    def decide(self, mail: ParsedMail, mailbox: Mailbox, now: datetime) -> Decision:
        """The rules stage for a new ticket (also what `gateway explain` shows)."""
        return decide(mail, mailbox_address=mailbox.address, mailbox_govcloud=mailbox.govcloud,
                      rules=self.config.rules, directory=self.config.rules.directory, now=now,
                      mailbox_emergency=mailbox.emergency)

    async def _open_ticket(self, tx: Tx, inbound_id: int, mail: ParsedMail, received: Received,
                           sender: str, placement: Placement, linked: Ticket | None = None,
                           tagged: Ticket | None = None) -> Outcome:
        now = received.received_at
        counts = await tx.sender_counts(mailbox_of(sender), domain_of(sender), now - timedelta(hours=1))
        over = self._over_ticket_cap(counts)
        if over is not None:
            log.warning("ticket.rate_limited", message_id=mail.message_id, sender=sender,
                        scope=over[0], tickets_last_hour=over[1], limit=over[2])
            return Outcome(inbound_id, "quarantined", None, mail.message_id, 0,
                           f"rate limit: {over[1]} new tickets from this {over[0]} in the last hour "
                           f"(limits.new_tickets_per_{over[0]}_per_hour = {over[2]}); retry it later "
                           f"with `gateway quarantine retry`")
        decision = self.decide(mail, received.mailbox, now)
        if decision.contact is not None and decision.contact.refused:
            return await self._refused_contact(tx, inbound_id, mail, received, sender, decision,
                                               decision.contact, counts, tagged)
        redirect_to = self.config.redirects.get(decision.redirect) if decision.redirect else None
        if decision.redirect and not redirect_to:
            log.warning("ticket.redirect_unconfigured", redirect=decision.redirect,
                        message_id=mail.message_id)
        elif redirect_to and decision.govcloud:
            # [redirects] are commercial addresses: GovCloud mail stays with GovCloud staff
            # (issue 18), who get it as any ticket; the decision keeps the redirect's evidence
            log.info("ticket.redirect_withheld", redirect=decision.redirect, message_id=mail.message_id,
                     reason="govcloud")
            redirect_to = None
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
            sla_warn_at=decision.warn_due if redirect_to is None else None, missing=decision.missing, redirect=decision.redirect if redirect_to else None,
            language=lang, decision={**decision.to_json(), "language": {"value": lang, "why": lang_why}},
            emergency=decision.emergency and redirect_to is None,
            contact=decision.contact.rank if decision.contact else "",
            category=decision.category, product=decision.product)
        await self._record(tx, ticket.id, Kind.CUSTOMER, mail, inbound_id, now)
        marks = []
        if decision.contact is not None:
            await tx.add_event(ticket.id, now, "contact", decision.contact.to_json())
            marks = contact_marks(decision.contact)
        answer_in = self.config.acknowledgement.answer_language(lang)
        if answer_in != lang:
            marks.append(f"LANGUAGE: the customer writes {LANGUAGE_NAMES[lang]}; answer in "
                         f"{LANGUAGE_NAMES[answer_in]} (support languages: "
                         f"{', '.join(LANGUAGE_NAMES[x] for x in self.config.acknowledgement.support_languages)})")
        if dropped:
            await self._participants_dropped(tx, ticket, mail, dropped, inbound_id, now)
        if redirect_to:
            queued = await self._redirect(tx, ticket, mail, received, redirect_to, now)
        else:
            queued = 0
            no_ack = self._ack_suppressed(ticket, sender, counts, tagged)
            if no_ack is None:
                queued = await self.desk.to_customer(
                    tx, ticket, Kind.ACK, now, include_cc=False, thread=[mail.message_id],
                    context={"name": mail.sender_name or sender,
                             "target": self.desk.target_text(ticket, decision.response_due),
                             "missing": list(decision.missing),
                             "target_waits": any(e.rule == "sla.waiting_for_information" for e in decision.evidence),
                             "follows_up": _follows_up(linked, sender),
                             "emergency": self._emergency_instructions(ticket),
                             "support_language": answer_in,
                             "guidance": self._ack_guidance(ticket)})
            queued += await self._notify(tx, ticket, mail, sender, is_new=True, now=now,
                                         dropped=len(dropped), linked_reason=placement.reason, no_ack=no_ack,
                                         marks=marks)
            queued += await self._emergency_alert(tx, ticket, mail, decision, now)
            # no ack (loop caps, a stranger quoting a tag): no escalation notice either,
            # else a foreign helpdesk answering it opens ticket after ticket
            ticket, more = await self._auto_escalate(tx, ticket, [mail.message_id], now,
                                                     tell_customer=no_ack is None)
            queued += more
            queued += await self._escalation_request(tx, ticket, mail, now)
        log.info("ticket.created", ticket_id=ticket.id, message_id=mail.message_id,
                 mailbox=ticket.mailbox, region=ticket.region, govcloud=ticket.govcloud,
                 priority=ticket.priority, plan=ticket.plan, queue=decision.queue,
                 redirect=ticket.redirect, missing=list(ticket.missing),
                 linked_ticket=ticket.linked_ticket, reason=placement.reason, language=lang,
                 rules=sorted({e.rule for e in decision.evidence if not e.rule.endswith(".none")}))
        return Outcome(inbound_id, "created", ticket.id, mail.message_id, queued, placement.reason)

    async def _refused_contact(self, tx: Tx, inbound_id: int, mail: ParsedMail, received: Received,
                               sender: str, decision: Decision, contact: Standing, counts: SenderCounts,
                               tagged: Ticket | None) -> Outcome:
        """Kaseya: only authorised contacts open tickets (`contacts_policy = "restrict"`).

        No ticket; the mail is kept (quarantined: `quarantine retry` once the
        organisation has added the sender). The sender gets a polite answer
        saying that the authorised contacts of the organisation open tickets and
        how to be added (the directory's `contacts_instructions`, else: ask one
        of them), naming none of their addresses: a stranger learns nobody's.
        It is mail about no ticket (`contact_refused`), through the outbox like
        every answer, and held back as every automatic answer is
        (`_refusal_withheld`). Automatic mail never gets here: it was settled
        before the rules (RFC 3834 §2).
        """
        now = received.received_at
        withheld = await self._refusal_withheld(tx, inbound_id, sender, counts, tagged, now)
        queued = 0
        if withheld is None:
            found = self.config.rules.directory.lookup(domain_of(sender))
            lang, _ = self.language(mail, received.mailbox, sender)
            queued = await self.desk.answer_unticketed(
                tx, Kind.CONTACT_REFUSED, inbound_id=inbound_id, to=sender, subject=mail.subject,
                mailbox=self._answering_mailbox(received.mailbox, decision.govcloud), govcloud=decision.govcloud,
                answers=[mail.message_id], now=now, language=lang,
                context={"name": mail.sender_name or sender, "organisation": contact.organisation,
                         "instructions": found[0].contacts_instructions if found else None})
            await tx.add_refusal_load(mailbox_of(sender), domain_of(sender), now)
        log.warning("contact.refused", message_id=mail.message_id, sender=sender, answered=bool(queued),
                    **contact.to_json())
        told = "answered with who may open tickets" if queued else f"not answered: {withheld}"
        return Outcome(inbound_id, "quarantined", None, mail.message_id, queued,
                       f"contact.refused: {contact.why}; no ticket (quarantine retry "
                       f"once {contact.organisation} has added the sender); {told}")

    async def _refusal_withheld(self, tx: Tx, inbound_id: int, sender: str, counts: SenderCounts,
                                tagged: Ticket | None, now: datetime) -> str | None:
        """Why a refused contact gets no answer, or None when they get one: this
        mail was answered before (a `quarantine retry` of a mail still refused),
        the caps of every automatic answer (`_answer_limited`), or
        `[limits] refusals_per_sender_per_hour` answers to this mailbox already
        (a stranger writing again hears it once, not mail for mail)."""
        fields: dict[str, int] = {}
        scope, why = "retry", "this mail was answered before (a quarantine retry)"
        if not await tx.answered_inbound(inbound_id, Kind.CONTACT_REFUSED.value):
            limited = self._answer_limited(sender, counts, tagged)
            if limited is not None:
                scope, why, fields = limited
            else:
                limit = self.config.limits.refusals_per_sender_per_hour
                sent = await tx.refusals_to(mailbox_of(sender), now - timedelta(hours=1))
                if sent < limit:
                    return None
                scope, fields = "refusals", {"sent_last_hour": sent, "limit": limit}
                why = (f"{sent} answers to a refused contact went to this sender in the last hour "
                       f"(limits.refusals_per_sender_per_hour = {limit})")
        log.warning("contact.answer_withheld", sender=sender, scope=scope, **fields)
        return why

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

    async def _missing_information(self, tx: Tx, ticket: Ticket, mail: ParsedMail, now: datetime,
                                   marks: list[str]) -> tuple[Ticket, int]:
        """A customer reply on a ticket that lacks required details (Kaseya: the
        ticket waits for them): what the reply gives is cleared and the staff
        notification says so; when some are still missing after a reply that gave
        part of them, the customer is asked once more for exactly the rest
        (`info_request`, once per ticket)."""
        given, evidence = supplied(mail, ticket.missing, self.config.rules)
        if given:
            still = tuple(m for m in ticket.missing if m not in given)
            await tx.update_ticket(ticket.id, now, missing=still)
            await tx.add_event(ticket.id, now, "information_supplied", {
                "supplied": list(given), "still_missing": list(still),
                "why": "; ".join(e.detail for e in evidence)})
            ticket = replace(ticket, missing=still)
            marks.append("INFORMATION SUPPLIED: " + ", ".join(given).replace("_", " ")
                         + (f"; still missing: {', '.join(still).replace('_', ' ')}" if still
                            else "; nothing required is missing any more"))
            if not still:
                ticket = await self._start_paused_target(tx, ticket, now, marks)
        # asked once more when the customer gave part of it (the ack asked for all of it
        # already; a reply about something else is not nagged)
        if not given or not ticket.missing or await tx.has_event(ticket.id, "information_requested"):
            return ticket, 0
        queued = await self.desk.to_customer(
            tx, ticket, Kind.INFO_REQUEST, now, thread=[mail.message_id],
            context={"name": mail.sender_name, "missing": list(ticket.missing)})
        await tx.add_event(ticket.id, now, "information_requested", {"missing": list(ticket.missing)})
        marks.append("STILL MISSING: " + ", ".join(ticket.missing).replace("_", " ")
                     + " (asked the customer once more)")
        return ticket, queued

    async def _start_paused_target(self, tx: Tx, ticket: Ticket, now: datetime, marks: list[str]) -> Ticket:
        """[rules.missing] pause_target: the first-response target of a ticket that
        waited for required details counts from the reply that gave the last of them."""
        rules = self.config.rules
        if not rules.pause_target or ticket.response_due_at is not None or ticket.first_response_at is not None \
                or ticket.redirect is not None:
            return ticket
        due, warn_at = ticket_target_times(rules, plan=ticket.plan, priority=ticket.priority, region=ticket.region,
                                           certified=ticket.contact == CERTIFIED, around_the_clock=ticket.emergency,
                                           start=now)
        if due is None:
            return ticket
        await tx.update_ticket(ticket.id, now, response_due_at=due, sla_warn_at=warn_at)
        await tx.add_event(ticket.id, now, "target_started", {"response_due": due.isoformat(),
                                                              "why": "the required details are complete"})
        marks.append(f"The first-response target starts now: {self.desk.target_text(ticket, due) or due.isoformat()}")
        return replace(ticket, response_due_at=due, sla_warn_at=warn_at)

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
        if placement.colleague_of and not ticket.is_participant(sender) \
                and len(ticket.cc) < self.config.limits.max_participants:
            # a colleague who answers gets the ticket's mail from now on
            await tx.update_ticket(ticket.id, now, cc=(*ticket.cc, sender))
            ticket = replace(ticket, cc=(*ticket.cc, sender))
            await tx.add_event(ticket.id, now, "colleague", {"sender": sender, "organisation": placement.colleague_of,
                                                             "why": placement.reason})
        if not ticket.govcloud and (gov := govcloud_in_reply(
                mail, mailbox_address=ticket.mailbox, rules=self.config.rules,
                directory=self.config.rules.directory)) is not None:
            # issue 18: staff decide (#govcloud); until then it stays commercial
            await tx.add_event(ticket.id, now, "govcloud_indicated", {**gov.to_json(), "message_id": mail.message_id})
            log.warning("govcloud.indicated", ticket_id=ticket.id, message_id=mail.message_id, rule=gov.rule)
            marks.append(f"GOVCLOUD? {gov.detail}. This ticket is commercial: its mail goes through the "
                         "commercial relay and commercial staff. If the customer is GovCloud's, reply #govcloud "
                         "(alone) to move it to GovCloud staff and the GovCloud relay")
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
        if ticket.missing and ticket.status is not Status.CLOSED:
            ticket, asked = await self._missing_information(tx, ticket, mail, now, marks)
            queued += asked
        queued += await self._notify(tx, ticket, mail, sender, is_new=False, now=now, marks=marks)
        queued += await self._escalation_request(tx, ticket, mail, now)
        log.info("ticket.replied", ticket_id=ticket.id, message_id=mail.message_id,
                 mailbox=ticket.mailbox, staff=False, reason=placement.reason)
        return Outcome(inbound_id, "joined", ticket.id, mail.message_id, queued, placement.reason)

    async def _staff_reply(self, tx: Tx, inbound_id: int, mail: ParsedMail, ticket: Ticket,
                           sender: str, now: datetime, placement: Placement) -> Outcome:
        """Staff answered from their mail client: commands, then relay to the customer."""
        cmds = lifecycle.staff_commands(mail.reply_text)
        if cmds.help and not cmds.errors:
            return await self._help(tx, inbound_id, mail, ticket, sender, now, placement)
        if cmds.listing and not cmds.errors:
            return await self._list(tx, inbound_id, mail, ticket, sender, now)
        if cmds.govcloud and not cmds.errors:
            return await self._to_govcloud(tx, inbound_id, mail, ticket, sender, now, placement)
        if cmds.answer and not cmds.errors:
            cmds = self._with_answer(cmds, cmds.answer, ticket, mail)
        relay = bool(cmds.text) and not cmds.note
        # an engineer's answer on an escalated ticket goes to its owner, who answers the customer
        internal = relay and ticket.escalated and ticket.owner not in (None, sender) and not cmds.customer
        relay = relay and not internal
        cc, cc_errors = lifecycle.new_participants(
            ticket, cmds.cc, cmds.uncc, refused=self._not_a_participant,
            max_participants=self.config.limits.max_participants)
        assignee, assign_error = self._assignee(ticket, cmds, sender)
        if assign_error:
            cc_errors = (*cc_errors, assign_error)
        classes, class_errors = self._classes(cmds)
        cc_errors = (*cc_errors, *class_errors)
        if cc_errors:
            cmds = replace(cmds, errors=(*cmds.errors, *cc_errors))
        elif relay:
            cc = self._with_staff_cc(replace(ticket, cc=cc), mail, sender)
        if cmds.errors:
            return await self._commands_rejected(tx, inbound_id, mail, ticket, sender, now, cmds.errors)
        await self._record(tx, ticket.id, Kind.STAFF if relay else Kind.NOTE, mail, inbound_id, now)
        changes: dict[str, object] = {}
        if cc != ticket.cc:
            changes["cc"] = cc
        if cmds.priority is not None and cmds.priority != ticket.priority:
            changes["priority"] = cmds.priority
        for part, value in classes.items():
            if value != getattr(ticket, part):
                changes[part] = value
                await tx.add_event(ticket.id, now, "classified", {"part": part, "old": getattr(ticket, part) or None,
                                                                  "new": value or None, "by": sender})
        if relay and ticket.first_response_at is None:
            changes["first_response_at"] = now
            if ticket.sla_outcome is None and (outcome := lifecycle.first_response_outcome(ticket, now)):
                changes["sla_outcome"] = outcome
        if ticket.owner is None and (relay or cmds.escalate):
            changes["owner"] = sender         # the technician who answers owns the ticket
        if assignee is not False and (assignee != ticket.owner or "owner" in changes):
            changes["owner"] = assignee       # #assign, #take, #unassign: said, so it wins
        previous_owner = ticket.owner
        if relay:
            changes.update(lifecycle.after_customer_contact(ticket, now, self.config.escalation,
                                                            by_staff=True))
        if changes:
            await tx.update_ticket(ticket.id, now, **changes)
            ticket = replace(ticket, **changes)  # type: ignore[arg-type]
            log.info("ticket.updated", ticket_id=ticket.id, by="staff",
                     fields=sorted(changes))
        queued = 0
        if assignee is not False and assignee != previous_owner:
            queued += await self._assigned(tx, ticket, previous_owner, sender, mail, now)
        if cmds.note and cmds.text:
            queued += await self._note(tx, ticket, mail, sender, cmds.text, now)
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
                tx, ticket, Kind.STAFF_REPLY, now, context={"text": without_staff_tokens(cmds.text),
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

    async def _commands_rejected(self, tx: Tx, inbound_id: int, mail: ParsedMail, ticket: Ticket, sender: str,
                                 now: datetime, errors: Sequence[str]) -> Outcome:
        """Nothing is applied or relayed; the agent is told why (the mail is a note)."""
        await self._record(tx, ticket.id, Kind.NOTE, mail, inbound_id, now)
        queued = await self.desk.to_staff(
            tx, ticket, sender, now, answers=[mail.message_id], template="command_error",
            context={"errors": tuple(errors), "text": mail.reply_text})
        log.warning("staff.command_rejected", ticket_id=ticket.id, message_id=mail.message_id,
                    errors=list(errors))
        return Outcome(inbound_id, "joined", ticket.id, mail.message_id, queued,
                       "staff commands rejected: " + "; ".join(errors))

    async def _to_govcloud(self, tx: Tx, inbound_id: int, mail: ParsedMail, ticket: Ticket, sender: str,
                           now: datetime, placement: Placement) -> Outcome:
        """`#govcloud` (issue 18): a commercial ticket turns out to be GovCloud's. From
        now on it is answered from the GovCloud mailbox through the GovCloud relay, its
        notifications go to GovCloud staff only, and only they may answer or command it;
        its commercial owner is dropped. The agent's mail is kept as a note, never
        relayed; the agent is told (before the move, quoting nothing of the ticket), the
        GovCloud staff get the ticket, and the move is an event on it."""
        gov_mailbox = next((m.address for m in self.config.mailboxes if m.govcloud), None)
        if ticket.govcloud:
            return await self._commands_rejected(tx, inbound_id, mail, ticket, sender, now,
                                                 ["#govcloud: the ticket is a GovCloud ticket already"])
        if gov_mailbox is None:
            return await self._commands_rejected(
                tx, inbound_id, mail, ticket, sender, now,
                ["#govcloud: no GovCloud mailbox is configured ([[mailboxes]] with govcloud = true)"])
        await self._record(tx, ticket.id, Kind.NOTE, mail, inbound_id, now)
        queued = await self.desk.to_staff(
            tx, ticket, sender, now, answers=[mail.message_id], template="process_staff", token=False,
            context={"headline": f"Ticket #{ticket.id} moved to GovCloud",
                     "why": "GovCloud staff answer it from now on, from the GovCloud mailbox; "
                            "you get no more mail of it", "text": ""})
        changes: dict[str, object] = {"govcloud": True, "mailbox": gov_mailbox, "owner": None}
        await tx.update_ticket(ticket.id, now, **changes)
        moved = replace(ticket, govcloud=True, mailbox=gov_mailbox, owner=None)
        await tx.add_event(ticket.id, now, "govcloud_moved", {"by": sender, "from_mailbox": ticket.mailbox,
                                                              "to_mailbox": gov_mailbox,
                                                              "previous_owner": ticket.owner})
        queued += await self.desk.notify_staff(
            tx, moved, now, answers=[mail.message_id], template="process_staff",
            context={"headline": f"Ticket #{ticket.id} moved to GovCloud by {sender}",
                     "why": "a commercial agent found it to be GovCloud's (#govcloud); reply to this mail to "
                            f"answer the customer; gateway tickets show {ticket.id} --govcloud shows it all",
                     "text": ""})
        log.warning("govcloud.moved", ticket_id=ticket.id, message_id=mail.message_id, by=sender,
                    from_mailbox=ticket.mailbox, to_mailbox=gov_mailbox)
        return Outcome(inbound_id, "joined", ticket.id, mail.message_id, queued,
                       f"moved to GovCloud by {sender} ({placement.reason})")

    def _canned(self, name: str, ticket: Ticket, agent: str) -> lifecycle.StaffCommands:
        """Canned answer `name` rendered for `ticket`, read as an agent's reply
        (its own commands, then its text), or its errors."""
        answers = self.desk.answers
        try:
            text = answers.render(name, ticket.language, self.desk.answer_context(ticket, agent))
        except LookupError:
            known = ", ".join(answers.names(ticket.language)) or "none configured"
            return lifecycle.StaffCommands(errors=(f"no such canned answer (known: {known})",))
        except Exception as e:  # noqa: BLE001 - a template's failure (sandbox, undefined name): the agent is told
            log.warning("staff.answer_failed", ticket_id=ticket.id, answer=name, error=f"{type(e).__name__}: {e}")
            return lifecycle.StaffCommands(errors=(f"could not be rendered: {type(e).__name__}: {e}",))
        return lifecycle.staff_commands(text)

    def _with_answer(self, cmds: lifecycle.StaffCommands, name: str, ticket: Ticket,
                     mail: ParsedMail) -> lifecycle.StaffCommands:
        return lifecycle.with_answer(cmds, name, self._canned(name, ticket, mail.sender_name or "Support"))

    async def _help(self, tx: Tx, inbound_id: int, mail: ParsedMail, ticket: Ticket, sender: str,
                    now: datetime, placement: Placement) -> Outcome:
        """`#help`: the agent gets the commands and the canned answers for this
        ticket's language; nothing is relayed or changed (the mail is a note)."""
        await self._record(tx, ticket.id, Kind.NOTE, mail, inbound_id, now)
        listed = []
        for name in self.desk.answers.names(ticket.language)[:HELP_ANSWERS]:
            canned = self._canned(name, ticket, mail.sender_name or "Support")
            first = (canned.text.strip().splitlines() or [""])[0]
            listed.append({"name": name, "preview": "(fails: " + canned.errors[0] + ")" if canned.errors
                           else first[:80] + ("..." if len(first) > 80 else "")})
        queued = await self.desk.to_staff(tx, ticket, sender, now, answers=[mail.message_id], template="help",
                                          context={"answers": listed})
        log.info("ticket.replied", ticket_id=ticket.id, message_id=mail.message_id,
                 mailbox=ticket.mailbox, staff=True, relayed=False, reason=placement.reason)
        return Outcome(inbound_id, "joined", ticket.id, mail.message_id, queued, "staff asked for #help")

    async def _list(self, tx: Tx, inbound_id: int, mail: ParsedMail, ticket: Ticket, sender: str,
                    now: datetime) -> Outcome:
        """`#list`: the agent gets their open and waiting tickets and those near or
        past the first-response target (theirs or unassigned), of the tickets they
        may answer (a commercial agent sees no GovCloud ticket); nothing is relayed
        or changed (the mail is a note)."""
        await self._record(tx, ticket.id, Kind.NOTE, mail, inbound_id, now)
        near = self.config.staff_list_near
        found = await tx.agent_tickets(sender, now + near, [g for g in (False, True)
                                                            if self.config.may_answer(sender, g)], LISTED + 1)
        lists, more = lists_of(found, now)
        queued = await self.desk.to_staff(tx, ticket, sender, now, answers=[mail.message_id], template="list",
                                          context={"agent": sender, "lists": lists, "more": more,
                                                   "near_hours": f"{near.total_seconds() / 3600:g}",
                                                   "at": now.strftime("%Y-%m-%d %H:%M UTC"), "limit": LISTED})
        log.info("staff.list", ticket_id=ticket.id, agent=sender,
                 **{name: len(rows) for name, rows in lists.items()})
        return Outcome(inbound_id, "joined", ticket.id, mail.message_id, queued, "staff asked for #list")

    async def _note(self, tx: Tx, ticket: Ticket, mail: ParsedMail, sender: str, text: str,
                    now: datetime) -> int:
        """A `#note`'s text goes to `[staff] notes_to` (the assignee and the agents
        who worked on the ticket, by default), never to the customer: staff mail
        only, each with its own token (answering it answers the ticket as any
        notification does). The event records who wrote it and who got it."""
        who = self.config.staff_notes_to
        agents = await tx.ticket_agents(ticket.id) if "agents" in who else []
        to = self.desk.staff_of(ticket, who, agents=agents, exclude=sender)
        await tx.add_event(ticket.id, now, "note", {"by": sender, "to": to})
        log.info("ticket.note", ticket_id=ticket.id, by=sender, to=to)
        queued = 0
        for address in to:
            queued += await self.desk.to_staff(
                tx, ticket, address, now, answers=[mail.message_id], template="process_staff",
                context={"headline": f"Internal note from {sender} (not sent to the customer)",
                         "why": "a #note reaches staff only ([staff] notes_to); reply with #note to answer "
                                "internally, without it to answer the customer",
                         "text": without_staff_tokens(text)})
        return queued

    def _assignee(self, ticket: Ticket, cmds: lifecycle.StaffCommands,
                  sender: str) -> tuple[str | None | bool, str | None]:
        """The owner `#assign` / `#take` / `#unassign` ask for (False: none of them),
        and why it can't be: only an agent who may answer the ticket (a GovCloud
        ticket only GovCloud staff), never a queue (queues get the notifications)."""
        if cmds.take:
            return sender, None
        if cmds.unassign:
            return None, None
        if cmds.assign is None:
            return False, None
        if self._is_queue(cmds.assign):
            return False, f"#assign {cmds.assign}: a staff queue; #assign names an agent"
        if not self.config.may_answer(cmds.assign, ticket.govcloud):
            return False, (f"#assign {cmds.assign}: not " + ("GovCloud " if ticket.govcloud else "")
                           + "staff ([staff] addresses or domains)")
        return cmds.assign, None

    async def _assigned(self, tx: Tx, ticket: Ticket, previous: str | None, by: str, mail: ParsedMail,
                        now: datetime) -> int:
        """Record an assignment; the new assignee (when not the one who assigned) is told,
        with a mail whose answer proves them as any staff notification's does."""
        await tx.add_event(ticket.id, now, "assigned", {"owner": ticket.owner, "previous": previous, "by": by})
        log.info("ticket.assigned", ticket_id=ticket.id, owner=ticket.owner, previous=previous, by=by)
        if ticket.owner is None or ticket.owner == by:
            return 0
        return await self.desk.to_staff(
            tx, ticket, ticket.owner, now, answers=[mail.message_id], template="process_staff",
            context={"headline": f"Ticket #{ticket.id} is assigned to you by {by}",
                     "why": "answer this mail to answer the customer; #unassign hands the ticket back",
                     "text": ticket.subject})

    def _not_a_participant(self, address: str) -> str | None:
        """Why `address` may not be on a ticket's Cc: the gateway's own mailboxes and
        the staff queues (mail to them comes back to the gateway: a loop, or the
        customer's thread in the queue), or None."""
        if self.config.mailbox_for(address) is not None:
            return "is one of the gateway's own mailboxes"
        if self._is_queue(address):
            return "is a staff queue, which gets the ticket's notifications already"
        return None

    def _is_queue(self, address: str) -> bool:
        """A staff queue's address (case and +tag folded)."""
        return mailbox_of(address) in {mailbox_of(q) for q in self.config.queues.values()}

    def _with_staff_cc(self, ticket: Ticket, mail: ParsedMail, sender: str) -> tuple[str, ...]:
        """The ticket's Cc with the staff the agent Cc'd on a relayed answer: they
        get the answer, and the ticket's later mail to its participants (never a
        staff token: what participants get is customer mail). Anyone else the agent
        Cc'd is not added (`#cc` adds them); nor past [limits] max_participants."""
        room = self.config.limits.max_participants - 1 - len(ticket.cc)
        added = [a for a in dict.fromkeys((*mail.to, *mail.cc))
                 if room > 0 and self.config.is_staff(a) and a != sender
                 and not self._not_a_participant(a) and not ticket.is_participant(a)]
        return (*ticket.cc, *added[:max(room, 0)])

    async def _auto_escalate(self, tx: Tx, ticket: Ticket, answers: list[str],
                             now: datetime, *, tell_customer: bool = True) -> tuple[Ticket, int]:
        """Kaseya: business-critical (priority 1) tickets escalate on their own, to tier 2."""
        limit = self.config.escalation.auto_priority
        if not limit or ticket.priority > limit:
            return ticket, 0
        esc = lifecycle.escalate(ticket, engineering=False, by=f"rules: priority {ticket.priority}",
                                 now=now, config=self.config.escalation, hours=self.config.rules.hours,
                                 owner=None)
        if esc is None:
            return ticket, 0
        if not tell_customer and esc.tell_customer:
            esc = replace(esc, tell_customer=False,
                          fields={k: v for k, v in esc.fields.items() if k != "customer_told_at"})
        return await self.desk.escalate(tx, ticket, esc, now, answers=answers)

    def _classes(self, cmds: lifecycle.StaffCommands) -> tuple[dict[str, str], list[str]]:
        """`#category` / `#product`: the configured name the agent meant (an alias or
        another case finds it), or an error naming the known ones; with no names
        configured (products, by default), the agent's words as given."""
        found: dict[str, str] = {}
        errors: list[str] = []
        for part, value in (("category", cmds.category), ("product", cmds.product)):
            if value is None:
                continue
            classes = self.config.rules.category if part == "category" else self.config.rules.product
            if value and classes.names:
                name = classes.aliases.get(normalise_value(value))
                if name is None:
                    errors.append(f"#{part}: unknown {part} {value!r} (known: {', '.join(classes.names)}, none)")
                    continue
                value = name
            found[part] = value
        return found, errors

    def _ack_guidance(self, ticket: Ticket) -> dict[str, Any]:
        """The policies' guidance in the acknowledgement (`[acknowledgement]`): the
        support domains to add to the safe-senders list (the GovCloud ones for a
        GovCloud ticket), the status page of the ticket's region, and where billing
        and sales questions go (not for GovCloud tickets: their mail stays there);
        the languages support answers in, when the customer's is not one of them."""
        ack = self.config.acknowledgement
        domains = sorted({m.address.rpartition("@")[2] for m in self.config.mailboxes
                          if m.govcloud == ticket.govcloud})
        return {"parts": list(ack.parts), "safe_senders": domains,
                "status_page": ack.status_pages.get("GOVCLOUD" if ticket.govcloud else ticket.region),
                "elsewhere": [] if ticket.govcloud else sorted(self.config.redirects.items()),
                "support_languages": [] if ack.answer_language(ticket.language) == ticket.language
                else list(ack.support_languages)}

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
                      is_new: bool, now: datetime, dropped: int = 0, linked_reason: str = "",
                      no_ack: str | None = None, marks: list[str] | None = None) -> int:
        attached = files_for_staff(mail.attachments, self.config.staff_attach_max)
        return await self.desk.notify_staff(
            tx, ticket, now, answers=[mail.message_id], attachments=attached,
            context={"is_new": is_new, "sender": sender, "reply_text": mail.reply_text, "no_ack": no_ack,
                     "marks": marks or [],
                     "body_text": mail.body_text, "attachments": [a for a, _ in mail.attachments],
                     "not_attached": [a for a, _ in mail.attachments if all(a is not b for b, _ in attached)],
                     "attach_max": self.config.staff_attach_max,
                     "participants_dropped": dropped, "linked_reason": linked_reason,
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
    def _ack_suppressed(self, ticket: Ticket, sender: str, counts: SenderCounts,
                        tagged: Ticket | None) -> str | None:
        """Why this new ticket gets no acknowledgement, or None when it gets one.

        At most `[limits] auto_answers_per_sender_per_hour` acknowledgements to
        one mailbox (case and `+tag` folded: a helpdesk answering from
        `help+N@` is one mailbox) and `auto_answers_per_domain_per_hour` to one
        domain (a responder answering from ever new addresses). A flood, or a
        responder that sets none of RFC 3834's headers so that
        `automatic_kind` can't tell, still makes its tickets and reaches staff,
        but is not answered mail for mail: RFC 3834 §2 asks automatic
        responders to limit how often they answer one sender. The window
        slides over the injected clock (`counts` are of the last hour).

        Nor is a new ticket acknowledged that quotes the subject tag of a
        ticket whose requester is at the sender's domain, from an address not
        on it (`tagged`): that is what a responder answering our mail from
        per-ticket addresses (`ticket-N@`) sends, and acknowledging it would
        start the loop again. A colleague writing so still gets a ticket and
        staff are told why no acknowledgement went out.
        """
        limited = self._answer_limited(sender, counts, tagged)
        if limited is None:
            return None
        scope, why, fields = limited
        log.warning("ticket.ack_suppressed", ticket_id=ticket.id, requester=sender, scope=scope, **fields)
        return why

    def _answer_limited(self, sender: str, counts: SenderCounts,
                        tagged: Ticket | None) -> tuple[str, str, dict[str, int]] | None:
        """(scope, why, fields for the log) when an automatic answer to `sender` is
        held back (`_ack_suppressed` says which and why), else None."""
        if tagged is not None and domain_of(tagged.requester) == domain_of(sender):
            why = (f"it quotes the subject of ticket #{tagged.id}, whose requester is at the same domain, "
                   f"from an address not on that ticket (a responder answering our mail would loop)")
            return "tag", why, {"quoted_ticket": tagged.id}
        lim = self.config.limits
        for scope, sent, limit in (("sender", counts.answers_to_mailbox, lim.auto_answers_per_sender_per_hour),
                                   ("domain", counts.answers_to_domain, lim.auto_answers_per_domain_per_hour)):
            if sent >= limit:
                why = (f"{sent} acknowledgements went to this {scope} in the last hour "
                       f"(limits.auto_answers_per_{scope}_per_hour = {limit})")
                return scope, why, {"sent_last_hour": sent, "limit": limit}
        return None

    def _over_ticket_cap(self, counts: SenderCounts) -> tuple[str, int, int] | None:
        """(scope, tickets in the last hour, limit) when one more new ticket is one too many.

        `[limits] new_tickets_per_sender_per_hour` / `_per_domain_per_hour`:
        past them mail that would open a ticket is quarantined with the reason
        (kept, retried by ops), so that a runaway robot cannot fill the desk;
        replies to existing tickets are never held back.
        """
        lim = self.config.limits
        for scope, made, limit in (("sender", counts.tickets_by_mailbox, lim.new_tickets_per_sender_per_hour),
                                   ("domain", counts.tickets_by_domain, lim.new_tickets_per_domain_per_hour)):
            if made >= limit:
                return scope, made, limit
        return None

    def _answers_staff_mail(self, ticket: Ticket, mail: ParsedMail, received: Received) -> bool:
        """Whether the mail answers genuine mail of ours to staff about `ticket`: a
        staff token for one of the addresses we send staff mail to, in what it
        answers or where it was sent. It proves nobody (the sender may have had a
        notification forwarded); a token a stranger made up is not taken."""
        return self.tokens.staff_proof(ticket.id, mail.thread_ids, (*mail.to, *mail.cc, *received.rcpt_to),
                                       self.staff_mail_to)

    def _staff_unproven(self, mail: ParsedMail, received: Received, ticket: Ticket,
                        sender: str) -> str | None:
        """Why a mail from a staff address does not prove its author, or None when it does.

        Proof is (a) a staff token of ours for this ticket, bound to this agent or
        to a staff queue, in what the mail answers (In-Reply-To/References) or
        where it was sent (To, Cc, envelope recipients): the agent replied to our
        notification (`gateway.outbound.tokens`); or (b) a trusted
        Authentication-Results header with DKIM or DMARC aligned to the agent's
        domain (`gateway.mail.authres`). `[staff] require_authenticated` takes
        only (b). The reason is for the log only: it is never mailed.
        """
        require, trusted = self.config.staff_proof(ticket.govcloud)   # GovCloud's own settings
        if not require and self.tokens.staff_proof(
                ticket.id, mail.thread_ids, (*mail.to, *mail.cc, *received.rcpt_to),
                (sender, *self.config.queues.values())):
            return None
        why = "no staff token of this ticket" if not require else "require_authenticated: tokens not taken"
        if not trusted:
            return why
        verdict = authres.verify(authres.header_values(received.raw),
                                 from_domain=sender.rpartition("@")[2], trusted_ids=trusted)
        return None if verdict.authenticated else f"{why}; {verdict.reason}"

    async def _unproven_staff(self, tx: Tx, inbound_id: int, mail: ParsedMail, ticket: Ticket,
                              sender: str, now: datetime, reason: str) -> Outcome:
        """Mail from a staff address that does not prove the agent wrote it.

        Kept on the ticket as a `note`: staff see it, the customer never does
        (notes are not relayed and are not on the customer's thread), no
        command is applied and the status does not change. The staff address
        is told, at most once per ticket an hour, quoting nothing of the mail:
        a real agent whose reply lost its token learns of it, an agent being
        impersonated learns that too, and a forger can't make us mail the
        agent their text.
        """
        await self._record(tx, ticket.id, Kind.NOTE, mail, inbound_id, now)
        queued = 0
        if await tx.staff_warning_due(ticket.id, sender, now, now - timedelta(hours=1)):
            why = ("Your mail server's Authentication-Results did not prove it either."
                   if self.config.staff_proof(ticket.govcloud)[1] else "")
            queued = await self.desk.to_staff(tx, ticket, sender, now, answers=[],
                                              template="staff_unproven", context={"why": why})
        log.warning("staff.unauthenticated", ticket_id=ticket.id, message_id=mail.message_id,
                    sender=sender, reason=reason, told=bool(queued))
        return Outcome(inbound_id, "joined", ticket.id, mail.message_id, queued,
                       f"staff mail not proven, kept as a note: {reason}")

    async def _not_staff(self, tx: Tx, inbound_id: int, mail: ParsedMail, ticket: Ticket,
                         sender: str, now: datetime) -> Outcome:
        """Someone who is not staff answered our mail to staff (a colleague the
        notification was forwarded to, a team member missing from `[staff]`).

        Kept on the ticket as an internal note, never relayed, nothing applied;
        the sender is told why (at most once per ticket an hour, quoting nothing
        and carrying no staff token), so the answer is never lost in silence.

        On a GovCloud ticket the same for anyone not GovCloud staff, commercial
        staff too (issue 18): the notice says so, and not even its subject
        quotes the ticket's (only its number)."""
        await self._record(tx, ticket.id, Kind.NOTE, mail, inbound_id, now)
        queued = 0
        if await tx.staff_warning_due(ticket.id, sender, now, now - timedelta(hours=1)):
            shown = replace(ticket, subject="GovCloud ticket") if ticket.govcloud else ticket
            queued = await self.desk.to_staff(tx, shown, sender, now, answers=[mail.message_id],
                                              template="govcloud_refused" if ticket.govcloud else "not_staff",
                                              context={"sender": sender}, token=False)
        log.warning("govcloud.staff_refused" if ticket.govcloud else "staff.not_staff",
                    ticket_id=ticket.id, message_id=mail.message_id, sender=sender,
                    staff=self.config.is_staff(sender), told=bool(queued))
        return Outcome(inbound_id, "joined", ticket.id, mail.message_id, queued,
                       "answered our mail to staff but is not staff: kept as a note")


QUARANTINE_NOTICE = "quarantine:"   # the staff_warnings key of a ticket's quarantine notice (no address)


def files_for_staff(files: Sequence[tuple[Attachment, bytes]], budget: int) -> list[tuple[Attachment, bytes]]:
    """The customer's files a staff notification carries: in the mail's order, each
    that still fits in `budget` bytes in all (`[staff] attach_max_bytes`); the
    others are listed with the command that fetches them."""
    out: list[tuple[Attachment, bytes]] = []
    for attachment, content in files:
        if len(content) <= budget:
            out.append((attachment, content))
            budget -= len(content)
    return out


def _follows_up(linked: Ticket | None, sender: str) -> dict[str, object] | None:
    """What the ack may say of the ticket a new one is linked to: its number and
    true status, to one of its participants only. A stranger who quoted a tag
    learns nothing, not even that the ticket exists."""
    if linked is None or not linked.is_participant(sender):
        return None
    return {"id": linked.id, "status": linked.status.value}


HELP_ANSWERS = 100     # canned answers a #help mail lists at most


def contact_marks(standing: Standing) -> list[str]:
    """What staff mail says about the requester's standing (Kaseya)."""
    if standing.flagged:
        return [f"NOT AN AUTHORISED CONTACT: {standing.why}"]
    if standing.rank == CERTIFIED:
        return [f"CERTIFIED ADMINISTRATOR (ranked first): {standing.why}"]
    return []
