"""The support desk's writing hand: apply a transition, queue mail about a ticket.

Both the pipeline (mail coming in) and the scheduler (time passing) decide
with `gateway.desk.lifecycle`; this is where either one's decision becomes rows:
the ticket's new status, timers and stamps, and the notices to the customer,
rendered into the outbox in the same transaction.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import structlog

from gateway.config import Config
from gateway.desk.lifecycle import Escalated, Transition, timers_of
from gateway.model import Attachment, Kind, Ticket, mailbox_of
from gateway.outbound.canned import CannedAnswers
from gateway.outbound.compose import SAMPLE_TICKET, Composer, Outgoing
from gateway.rules import language
from gateway.store import Tx

log = structlog.get_logger("gateway.desk")

# What the customer sees of a ticket: their own mail and what we sent them.
CUSTOMER_THREAD = tuple(k.value for k in (
    Kind.CUSTOMER, Kind.ACK, Kind.STAFF_REPLY, Kind.REMINDER, Kind.AUTOCLOSE, Kind.CLOSURE,
    Kind.INFO_REQUEST, Kind.REDIRECT, Kind.ESCALATION, Kind.STATUS))


class Desk:
    def __init__(self, config: Config, composer: Composer):
        self.config = config
        self.composer = composer
        self.answers = CannedAnswers(config.answers_dir)

    def answer_context(self, ticket: Ticket, agent: str) -> dict[str, Any]:
        """What a canned answer is rendered with: the ticket's fields and the agent's name."""
        return self.composer.context(ticket, ticket.mailbox, ticket.language, {"agent": agent})

    def answers_problems(self) -> list[str]:
        """The canned answers that fail to render (check-config, SIGHUP)."""
        return self.answers.problems(self.answer_context(SAMPLE_TICKET, "Agent Smith"))

    async def apply(self, tx: Tx, ticket: Ticket, tr: Transition, now: datetime) -> tuple[Ticket, int]:
        """Write `tr` for `ticket`; queue its notices. Returns the ticket as it
        is now and how many mails were queued."""
        fields: dict[str, Any] = {}
        if tr.status is not ticket.status:
            fields["status"] = tr.status
        if tr.timers != timers_of(ticket):
            fields.update(reminder_due_at=tr.timers.reminder_due_at,
                          autoclose_due_at=tr.timers.autoclose_due_at,
                          close_due_at=tr.timers.close_due_at)
        fields.update(tr.stamps)
        if fields:
            await tx.update_ticket(ticket.id, now, **fields)
        stamps: dict[str, Any] = dict(tr.stamps)      # resolved_at, closed_at: Ticket fields
        after = replace(ticket, status=tr.status, reminder_due_at=tr.timers.reminder_due_at,
                        autoclose_due_at=tr.timers.autoclose_due_at,
                        close_due_at=tr.timers.close_due_at, **stamps)
        if tr.status is not ticket.status:
            log.info("ticket.status_changed", ticket_id=ticket.id, old=ticket.status.value,
                     new=tr.status.value, cause=tr.cause)
        queued = 0
        for kind in tr.notices:
            queued += await self.to_customer(tx, after, kind, now, context=self._notice_context(after, kind, now))
        return after, queued

    async def escalate(self, tx: Tx, ticket: Ticket, esc: Escalated, now: datetime, *,
                       answers: Sequence[str], text: str = "",
                       contacted: bool = False) -> tuple[Ticket, int]:
        """Write an escalation: the ticket's tier fields, its record, the tier queue
        notified with the ticket, and the customer told once. `contacted`: the
        same mail answered the customer, so no contact reminder is due."""
        fields = {**esc.fields, "contact_due_at": None} if contacted else esc.fields
        await tx.update_ticket(ticket.id, now, **fields)
        after = replace(ticket, **fields)  # type: ignore[arg-type]
        await tx.add_event(ticket.id, now, "escalation", esc.to_json())
        # the tier's queue, and the assignee ([staff] notify) unless they escalated it themselves
        assignee = self.staff_of(after, [w for w in self.config.staff_notify if w == "assignee"], exclude=esc.by)
        queued = 0
        for address in [esc.queue, *(a for a in assignee if mailbox_of(a) != mailbox_of(esc.queue))]:
            queued += await self.to_staff(tx, after, address, now, answers=answers, template="process_staff",
                                          context={"headline": f"Escalated to tier {esc.tier} "
                                                               f"({esc.to_json()['tier_name']}s) by {esc.by}",
                                                   "why": esc.why, "text": text})
        if esc.tell_customer:
            queued += await self.to_customer(tx, after, Kind.ESCALATION, now,
                                             context={"review_hours": self.config.escalation.review_hours})
        log.info("ticket.escalated", ticket_id=ticket.id, tier=esc.tier, queue=esc.queue,
                 region=esc.region, by=esc.by, why=esc.why, customer_told=esc.tell_customer)
        return after, queued

    def staff_of(self, ticket: Ticket, who: Sequence[str], *, agents: Sequence[str] = (),
                 exclude: str | None = None) -> list[str]:
        """The addresses that `who` (`[staff] notify` / `notes_to` names) stand for on
        `ticket`, each once (case and `+tag` folded), less `exclude` (the agent who
        acted): `queue` the region's queue (GovCloud's for a GovCloud ticket),
        `assignee` its owner, `agents` the given agents who worked on it, `staff` the
        `[staff] addresses` (`[staff.govcloud]`'s for a GovCloud ticket). Only
        addresses that may answer the ticket: an assignee since dropped from
        `[staff]`, or a commercial agent on a GovCloud ticket, gets nothing."""
        cfg = self.config
        found: list[str] = []
        for w in who:
            if w == "queue":
                found.append(self.queue_of(ticket))
            elif w == "assignee" and ticket.owner:
                found.append(ticket.owner)
            elif w == "agents":
                found.extend(agents)
            elif w == "staff":
                found.extend(sorted(cfg.govcloud_staff.addresses if ticket.govcloud else cfg.staff_addresses))
        seen = {mailbox_of(exclude)} if exclude else set()
        out: list[str] = []
        for address in found:
            if mailbox_of(address) not in seen and cfg.may_answer(address, ticket.govcloud):
                seen.add(mailbox_of(address))
                out.append(address)
        return out

    async def notified(self, tx: Tx, ticket: Ticket) -> list[str]:
        """Who gets the ticket's staff notifications (`[staff] notify`): the queue
        when none of those named is there (an unassigned ticket, with notify =
        ["assignee"]), so that no notification reaches nobody."""
        who = self.config.staff_notify
        agents = await tx.ticket_agents(ticket.id) if "agents" in who else []
        return self.staff_of(ticket, who, agents=agents) or [self.queue_of(ticket)]

    async def notify_staff(self, tx: Tx, ticket: Ticket, now: datetime, *, answers: Sequence[str],
                           context: Mapping[str, Any], template: str | None = None,
                           attachments: Sequence[tuple[Attachment, bytes]] = ()) -> int:
        """A staff notification of the ticket to each of `notified`, one mail each
        (each carries the token of its own address, so each can answer it)."""
        queued = 0
        for address in await self.notified(tx, ticket):
            queued += await self.to_staff(tx, ticket, address, now, answers=answers, context=context,
                                          template=template, attachments=attachments)
        return queued

    def owner_of(self, ticket: Ticket) -> str:
        """Who gets the owner's mail: the owning technician, else the region's queue."""
        return ticket.owner or self.queue_of(ticket)

    def _notice_context(self, ticket: Ticket, kind: Kind, now: datetime) -> dict[str, Any]:
        policy = self.config.policy_for(ticket.mailbox, ticket.plan)
        left = (ticket.autoclose_due_at - now).total_seconds() / 3600 if ticket.autoclose_due_at else 0
        return {"hours_left": max(1, round(left)),
                "hours": round(policy.autoclose_after.total_seconds() / 3600),
                "reopen_days": round(policy.reopen_within.total_seconds() / 86400),
                "resolve": policy.no_reply == "resolve"}

    async def to_customer(self, tx: Tx, ticket: Ticket, kind: Kind, now: datetime, *,
                          context: Mapping[str, Any], template: str | None = None,
                          from_name: str | None = None, include_cc: bool = True,
                          thread: Sequence[str] | None = None,
                          attachments: Sequence[tuple[Attachment, bytes]] = ()) -> int:
        """Queue a mail to the requester (and the ticket's Cc), on the customer's thread
        (`thread`, when the caller knows it, else read from the ticket)."""
        to = ticket.deliverable([ticket.requester])
        cc = ticket.deliverable(list(ticket.cc)) if include_cc else ()
        # [limits] max_participants bounds one outbound mail's recipients, however the ticket got its Cc
        cc = tuple(cc)[:max(0, self.config.limits.max_participants - len(to))] if to else \
            tuple(cc)[:self.config.limits.max_participants]
        if not to and not cc:
            log.warning("outbox.no_recipient", ticket_id=ticket.id, kind=kind.value,
                        undeliverable=list(ticket.undeliverable))
            return 0
        if thread is None:
            thread = await tx.customer_thread(ticket.id, CUSTOMER_THREAD)
        out = self.composer.compose(kind, ticket=ticket, mailbox=ticket.mailbox, to=to or cc,
                                    cc=cc if to else (), answers=thread, now=now, context=context,
                                    template=template, from_name=from_name, attachments=attachments,
                                    language=ticket.language)
        return await self.enqueue(tx, ticket.id, out, now)

    async def to_staff(self, tx: Tx, ticket: Ticket, address: str, now: datetime, *,
                       answers: Sequence[str], context: Mapping[str, Any],
                       template: str | None = None, reply_to: str | None = None,
                       attachments: Sequence[tuple[Attachment, bytes]] = (),
                       token: bool = True) -> int:
        """Queue a mail to a staff address. Its Message-ID and reply address carry the
        token that proves a staff answer to it (`gateway.outbound.tokens`); `token`
        False: none (a mail to someone who is not staff)."""
        tokens = self.composer.tokens
        if reply_to is None:
            reply_to = tokens.staff_reply_address(ticket.id, ticket.mailbox, address) if token \
                else ticket.mailbox
        out = self.composer.compose(
            Kind.STAFF_NOTIFY, ticket=ticket, mailbox=ticket.mailbox, to=[address], answers=answers,
            now=now, reply_to=reply_to, context=context, template=template, attachments=attachments,
            staff_to=address if token else None)
        return await self.enqueue(tx, ticket.id, out, now)

    async def undeliverable_notice(self, tx: Tx, ticket: Ticket, now: datetime, *,
                                   addresses: Sequence[str], marked: Sequence[str], what: str,
                                   detail: str = "") -> int:
        """Tell the ticket's staff (`[staff] notify`: its queue and assignee) that its
        mail did not reach `addresses` (a bounce came back, or the relay refused a
        mail for good); `marked` are those now undeliverable (project issue 15).
        Short, and quoting the report's status only, never the returned mail."""
        return await self.notify_staff(tx, ticket, now, answers=[], template="undeliverable",
                                       context={"addresses": list(addresses), "marked": list(marked),
                                                "what": what, "detail": detail[:500]})

    def target_text(self, ticket: Ticket, due: datetime | None) -> str | None:
        """The first-response promise, honestly: the plan's target and when it falls due."""
        plan = self.config.rules.plans.get(ticket.plan)
        target = plan.target(ticket.priority, certified=ticket.contact == "certified") if plan else None
        if target is None or due is None:
            return None
        calendar = None if target.around_the_clock or ticket.emergency \
            else self.config.rules.hours.get(ticket.region)
        return language.target_text(ticket.language, target, due, calendar)

    def queue_of(self, ticket: Ticket) -> str:
        return self.config.queues["GOVCLOUD" if ticket.govcloud else ticket.region]

    async def answer_unticketed(self, tx: Tx, kind: Kind, *, inbound_id: int, mailbox: str, to: str,
                                subject: str, answers: Sequence[str], now: datetime,
                                context: Mapping[str, Any], language: str, govcloud: bool = False) -> int:
        """Queue mail about no ticket (`UNTICKETED_KINDS`) answering received mail
        `inbound_id`: through the outbox like all our mail (sent once, surviving a
        crash), recorded on no ticket (the outbox row names the mail it answers)."""
        out = self.composer.compose_unticketed(kind, mailbox=mailbox, to=to, subject=subject, answers=answers,
                                               now=now, context=context, language=language, govcloud=govcloud)
        await tx.enqueue(message_row=None, ticket_id=None, kind=out.kind.value, relay=out.relay,
                         mail_from=out.mail_from, rcpt_to=out.rcpt_to, content=out.content, now=now,
                         inbound_id=inbound_id)
        return 1

    async def enqueue(self, tx: Tx, ticket_id: int, out: Outgoing, now: datetime) -> int:
        """Record an outbound mail on its ticket and put it in the outbox."""
        row = await tx.add_message(
            ticket_id=ticket_id, direction="out", kind=out.kind.value, sender=out.mail_from,
            recipients=out.rcpt_to, subject=out.subject, message_id=out.message_id,
            body_text=out.body_text, reply_text=out.body_text, now=now)
        await tx.enqueue(message_row=row, ticket_id=ticket_id, kind=out.kind.value, relay=out.relay,
                         mail_from=out.mail_from, rcpt_to=out.rcpt_to, content=out.content, now=now)
        return 1
