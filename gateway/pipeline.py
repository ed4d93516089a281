"""What happens to one received mail, inside the intake's transaction.

parse (done before) → automatic? → duplicate? → thread → rules (new ticket)
→ lifecycle → outbox. The decisions are the pure functions of
`conversation`, `rules`, `lifecycle` and `inbound.automatic`; this module
only fetches what they need and writes what they decide.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import structlog

from gateway import lifecycle
from gateway.config import Config, Mailbox
from gateway.conversation import Placement, place, tagged_ticket_id
from gateway.inbound.automatic import automatic_kind
from gateway.model import Kind, ParsedMail, Ticket, normalize_address
from gateway.outbound.compose import Composer, Outgoing
from gateway.rules import classify
from gateway.store import Tx
from gateway.tokens import TicketTokens

log = structlog.get_logger("gateway.pipeline")


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
    def __init__(self, config: Config, composer: Composer, tokens: TicketTokens):
        self.config = config
        self.composer = composer
        self.tokens = tokens
        self.own_addresses = frozenset(
            [mb.address for mb in config.mailboxes] + list(config.queues.values()))

    async def handle(self, tx: Tx, inbound_id: int, mail: ParsedMail, received: Received) -> Outcome:
        now = received.received_at
        if await tx.has_inbound_message(mail.message_id):
            return Outcome(inbound_id, "duplicate", None, mail.message_id, 0,
                           "a mail with this Message-ID is already on a ticket")
        sender = mail.sender or normalize_address(received.mail_from or "")
        if "@" not in sender:
            # Nobody to answer and nobody to thread by: kept for ops, never ticketed blind.
            return Outcome(inbound_id, "quarantined", None, mail.message_id, 0,
                           "no sender address in From: or the envelope")
        by_reference = await self._ticket_answered(tx, mail)
        tag_id = tagged_ticket_id(mail.subject, self.config.ticket_tag)
        by_tag = await tx.ticket(tag_id) if tag_id is not None and by_reference is None else None
        placement = place(sender=sender, sender_is_staff=self.config.is_staff(sender),
                          by_reference=by_reference, by_tag=by_tag)

        auto = automatic_kind(mail.headers, sender=sender, mail_from=received.mail_from,
                              own_addresses=self.own_addresses)
        if auto is not None:
            if placement.ticket_id is None:
                # Automatic mail about no ticket makes none (and is never answered);
                # the raw mail stays in the inbound store.
                return Outcome(inbound_id, "automatic", None, mail.message_id, 0,
                               f"{auto} mail that belongs to no ticket")
            await self._record(tx, placement.ticket_id, Kind(auto), mail, inbound_id, now)
            return Outcome(inbound_id, "joined", placement.ticket_id, mail.message_id, 0,
                           f"{auto} mail recorded, no answer, no status change")

        if placement.ticket_id is None:
            return await self._open_ticket(tx, inbound_id, mail, received, sender, placement)
        return await self._join(tx, inbound_id, mail, received, sender, placement)

    async def _ticket_answered(self, tx: Tx, mail: ParsedMail) -> Ticket | None:
        ids = mail.thread_ids
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
        row = await tx.add_message(
            ticket_id=ticket_id, direction="in", kind=kind.value, sender=mail.sender,
            recipients=mail.to, cc=mail.cc, subject=mail.subject, message_id=mail.message_id,
            body_text=mail.body_text, reply_text=mail.reply_text, now=now, inbound_id=inbound_id)
        if mail.attachments:
            await tx.add_attachments(row, [a for a, _ in mail.attachments])
        return row

    async def _open_ticket(self, tx: Tx, inbound_id: int, mail: ParsedMail, received: Received,
                           sender: str, placement: Placement) -> Outcome:
        now = received.received_at
        decision = classify(mail, received.mailbox, self.config)
        own = self.own_addresses | {sender}
        cc = tuple(a for a in mail.cc + mail.to if a not in own and not self.config.mailbox_for(a))
        ticket_id = await tx.create_ticket(
            subject=mail.subject or "(no subject)", requester=sender, cc=cc, region=decision.region,
            govcloud=decision.govcloud, priority=decision.priority, mailbox=received.mailbox.address,
            linked_ticket=placement.linked_ticket, now=now)
        ticket = await tx.ticket(ticket_id)
        assert ticket is not None
        await self._record(tx, ticket_id, Kind.CUSTOMER, mail, inbound_id, now)
        ack = self.composer.compose(
            Kind.ACK, ticket=ticket, mailbox=ticket.mailbox, to=[sender], answers=[mail.message_id],
            now=now, context={"name": mail.sender_name or sender})
        notify = self._notify(ticket, mail, sender, decision.queue, is_new=True, now=now)
        queued = 0
        for out in (ack, notify):
            queued += await self._enqueue(tx, ticket_id, out, now)
        log.info("ticket.created", ticket_id=ticket_id, message_id=mail.message_id,
                 mailbox=ticket.mailbox, region=ticket.region, govcloud=ticket.govcloud,
                 priority=ticket.priority, linked_ticket=ticket.linked_ticket, reason=placement.reason)
        return Outcome(inbound_id, "created", ticket_id, mail.message_id, queued, placement.reason)

    async def _join(self, tx: Tx, inbound_id: int, mail: ParsedMail, received: Received,
                    sender: str, placement: Placement) -> Outcome:
        now = received.received_at
        assert placement.ticket_id is not None
        ticket = await tx.ticket(placement.ticket_id)
        assert ticket is not None
        is_staff = self.config.is_staff(sender)
        await self._record(tx, ticket.id, Kind.STAFF if is_staff else Kind.CUSTOMER, mail,
                           inbound_id, now)
        queued = 0
        if not is_staff:
            status = lifecycle.after_customer_reply(ticket.status)
            if status is not ticket.status:
                await tx.update_ticket(ticket.id, now, status=status)
                log.info("ticket.status_changed", ticket_id=ticket.id, old=ticket.status.value,
                         new=status.value, cause="customer reply")
                ticket = await tx.ticket(ticket.id) or ticket
            queue = "GOVCLOUD" if ticket.govcloud else ticket.region
            queued += await self._enqueue(
                tx, ticket.id, self._notify(ticket, mail, sender, queue, is_new=False, now=now), now)
        log.info("ticket.replied", ticket_id=ticket.id, message_id=mail.message_id,
                 mailbox=ticket.mailbox, staff=is_staff, reason=placement.reason)
        return Outcome(inbound_id, "joined", ticket.id, mail.message_id, queued, placement.reason)

    def _notify(self, ticket: Ticket, mail: ParsedMail, sender: str, queue: str, *,
                is_new: bool, now: datetime) -> Outgoing:
        return self.composer.compose(
            Kind.STAFF_NOTIFY, ticket=ticket, mailbox=ticket.mailbox, to=[self.config.queues[queue]],
            answers=[mail.message_id], now=now, reply_to=ticket.mailbox,
            context={"is_new": is_new, "sender": sender, "reply_text": mail.reply_text,
                     "body_text": mail.body_text,
                     "attachments": [a for a, _ in mail.attachments]})

    async def _enqueue(self, tx: Tx, ticket_id: int, out: Outgoing, now: datetime) -> int:
        row = await tx.add_message(
            ticket_id=ticket_id, direction="out", kind=out.kind.value, sender=out.mail_from,
            recipients=out.rcpt_to, subject=out.subject, message_id=out.message_id,
            body_text=out.body_text, reply_text=out.body_text, now=now)
        await tx.enqueue(message_row=row, ticket_id=ticket_id, kind=out.kind.value, relay=out.relay,
                         mail_from=out.mail_from, rcpt_to=out.rcpt_to, content=out.content, now=now)
        return 1

