"""The scheduler: time passing, turned into reminders, auto-closes and closes.

Due times live on the tickets (gateway.desk.lifecycle), so nothing is lost by a
restart. Each run reads the due tickets inside one write transaction,
decides with `lifecycle.due` on the ticket as it is in that transaction,
and clears the timer in the same commit that queues the notice: a job
happens exactly once however often, and however many processes, run it.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import date, datetime, timedelta
from functools import partial

import structlog

from gateway.clock import Clock, system_clock
from gateway.config import Policy
from gateway.desk import digest, lifecycle
from gateway.desk.writer import Desk
from gateway.model import Kind, Ticket
from gateway.ops.loops import Repeater
from gateway.store import Store, Tx

log = structlog.get_logger("gateway.scheduler")

BATCH = 200
SLA_WARNING = "first-response target near: SLA warning"
SLA_BREACH = "first-response target missed: SLA breach"
DIGEST = "daily digest"
# the loop caps' per-minute counters (gateway.store sender_load) are kept this long
# past their hour, and dropped this often
SENDER_LOAD_KEPT = timedelta(hours=2)
SENDER_LOAD_PRUNE_EVERY = timedelta(hours=1)


class Scheduler:
    def __init__(self, store: Store, desk: Desk, policy_for: Callable[[str, str], Policy], clock: Clock, *,
                 interval_s: float = 60.0, on_queued: Callable[[], None] = lambda: None):
        self.store = store
        self.desk = desk
        self.policy_for = policy_for         # (mailbox, plan) -> its lifecycle
        self.clock = clock
        self.interval_s = interval_s
        self.on_queued = on_queued
        self._loop = Repeater(self.run_due, interval_s, lambda: log.exception("scheduler.error"))
        self._pruned_at: datetime | None = None

    async def run_due(self, now: datetime | None = None) -> dict[str, int]:
        """Run every job due at `now`; return how many of each kind ran."""
        at = now or self.clock()
        done: Counter[str] = Counter()
        while True:
            # one batch, one transaction; run again whole if it lost a deadlock to
            # another instance (nothing of it is counted or logged before the commit)
            ids, jobs = await self.store.run(lambda tx: self._batch(tx, at))
            for ticket_id, cause, status, queued in jobs:
                done[cause] += 1
                if cause not in (SLA_WARNING, SLA_BREACH):
                    log.info("scheduler.job", ticket_id=ticket_id, job=cause, status=status,
                             queued=queued)
            if jobs:
                self.on_queued()
            if len(ids) < BATCH:
                break
        sent = await self._digests(at)
        if sent:
            done[DIGEST] += sent
            self.on_queued()
        if done:
            log.info("scheduler.ran", at=at.isoformat(), jobs=dict(done))
        await self._forget_old_sender_load()
        return dict(done)

    async def _forget_old_sender_load(self) -> None:
        """Hourly, on the real clock (a `run-due --now` in the future must not
        drop the counters the hour's mail is still judged by)."""
        wall = system_clock()
        if self._pruned_at is not None and wall - self._pruned_at < SENDER_LOAD_PRUNE_EVERY:
            return
        self._pruned_at = wall
        await self.store.run(lambda tx: tx.forget_sender_load(wall - SENDER_LOAD_KEPT))

    async def _batch(self, tx: Tx, at: datetime) -> tuple[list[int], list[tuple[int, str, str, int]]]:
        jobs: list[tuple[int, str, str, int]] = []
        ids = await tx.due_ticket_ids(at, BATCH)
        for ticket_id in ids:
            ticket = await tx.ticket(ticket_id)      # locked: one instance does each job
            if ticket is None:
                continue
            if lifecycle.sla_warning_due(ticket, at):
                jobs.append((ticket.id, SLA_WARNING, ticket.status.value, await self._sla_notice(tx, ticket, at)))
            elif lifecycle.sla_breach_due(ticket, at):
                jobs.append((ticket.id, SLA_BREACH, ticket.status.value,
                             await self._sla_notice(tx, ticket, at, breach=True)))
            owner = lifecycle.owner_reminder_due(ticket, at)
            if owner is not None:
                await self._owner_reminder(tx, ticket, at, *owner)
                jobs.append((ticket.id, f"escalated: owner reminded ({owner[0]})", ticket.status.value, 1))
            tr = lifecycle.due(ticket, at, self.policy_for(ticket.mailbox, ticket.plan))
            if tr is None:
                continue
            _, queued = await self.desk.apply(tx, ticket, tr, at)
            jobs.append((ticket.id, tr.cause, tr.status.value, queued))
        return ids, jobs

    async def _digests(self, at: datetime) -> int:
        """`[digest]`: each recipient's digest of the local day, once that day's
        `at` has passed, unless already decided for that day; how many were queued.
        Each in its own transaction, the day recorded in the commit that queues it
        (an agent without assigned tickets then gets none that day)."""
        config = self.desk.config
        if not config.digest.enabled:
            return 0
        day = digest.day_due(at, config.digest.at, config.digest.zone)
        if day is None:
            return 0
        queued = 0
        everyone = digest.recipients(config)
        decided = await self.store.digest_days([r.key for r in everyone])    # a cheap read, each minute
        for recipient in everyone:
            if decided.get(recipient.key, "") >= day.isoformat():
                continue
            mailbox = next((mb.address for mb in config.mailboxes if mb.govcloud == recipient.govcloud), None)
            if mailbox is None:
                continue              # no mailbox of that kind: no tickets of that kind either
            if await self.store.run(partial(self._digest, recipient=recipient, mailbox=mailbox, day=day, at=at)):
                queued += 1
        return queued

    async def _digest(self, tx: Tx, *, recipient: digest.Recipient, mailbox: str, day: date, at: datetime) -> bool:
        config = self.desk.config
        if not await tx.claim_digest(recipient.key, day.isoformat(), at):
            return False              # another run (or instance) decided this day's digest
        near = config.staff_list_near
        found = await tx.digest_lists(at + near, govcloud=recipient.govcloud, region=recipient.region,
                                      owner=recipient.address if recipient.who == "assignee" else None,
                                      limit=digest.LISTED + 1)
        counts = {name: n for name, (n, _) in found.items()}
        if not digest.worth_sending(recipient, counts):
            return False              # an agent without tickets at the time: none that day
        lists, more = digest.lists_of({name: ts for name, (_, ts) in found.items()}, at)
        agent = recipient.who == "assignee"
        part = "GovCloud" if recipient.govcloud else "commercial"
        scope = f"{recipient.address} ({part} tickets)" if agent else \
            f"the {recipient.region or 'GOVCLOUD'} queue ({recipient.address})"
        zone = config.digest.timezone
        out = self.desk.composer.compose_unticketed(
            Kind.DIGEST, mailbox=mailbox, to=recipient.address, subject=f"Daily digest {day.isoformat()}: {scope}",
            answers=[], now=at, govcloud=recipient.govcloud,
            context={"scope": scope, "day": day.isoformat(), "at": f"{config.digest.at:%H:%M} {zone}",
                     "mine": ", assigned to you" if agent else "", "near_hours": f"{near.total_seconds() / 3600:g}",
                     "near_mine": "; yours or unassigned" if agent else "", "limit": digest.LISTED,
                     "counts": counts, "lists": lists, "more": more})
        await tx.enqueue(message_row=None, ticket_id=None, kind=out.kind.value, relay=out.relay,
                         mail_from=out.mail_from, rcpt_to=out.rcpt_to, content=out.content, now=at)
        log.info("digest.queued", recipient=recipient.address, who=recipient.who, govcloud=recipient.govcloud,
                 day=day.isoformat(), **counts)
        return True

    async def _sla_notice(self, tx: Tx, ticket: Ticket, at: datetime, *, breach: bool = False) -> int:
        """The SLA warning before the first-response target, or the breach notice
        when it passed unanswered (then the ticket records the target as missed),
        to the ticket's staff (`[staff] notify`: its queue and assignee); how many
        mails were queued."""
        if breach:
            # a warning not yet sent is not sent any more: the breach notice says more
            await tx.update_ticket(ticket.id, at, sla_breached_at=at, sla_warned_at=ticket.sla_warned_at or at,
                                   sla_outcome="missed")
        else:
            await tx.update_ticket(ticket.id, at, sla_warned_at=at)
        due = self.desk.target_text(ticket, ticket.response_due_at) or str(ticket.response_due_at)
        left = max(0, round((ticket.response_due_at - at).total_seconds() / 60)) if ticket.response_due_at else 0
        queued = await self.desk.notify_staff(tx, ticket, at, answers=[], template="sla_warning",
                                              context={"due": due, "breach": breach, "minutes_left": left})
        due_iso = ticket.response_due_at.isoformat() if ticket.response_due_at else None
        if breach:
            log.warning("ticket.sla_missed", ticket_id=ticket.id, priority=ticket.priority,
                        plan=ticket.plan, due=due_iso)
        else:
            log.info("ticket.sla_warning", ticket_id=ticket.id, priority=ticket.priority,
                     plan=ticket.plan, due=due_iso, minutes_left=left)
        return queued

    async def _owner_reminder(self, tx: Tx, ticket: Ticket, at: datetime, timer: str, what: str) -> None:
        await tx.update_ticket(ticket.id, at, **{timer: None})
        await tx.add_event(ticket.id, at, "escalation_owner_reminder", {"timer": timer, "what": what})
        await self.desk.to_staff(tx, ticket, self.desk.owner_of(ticket), at, answers=[],
                                 template="process_staff",
                                 context={"headline": f"Escalated ticket #{ticket.id}: owner reminder",
                                          "why": what, "text": ""})

    async def run(self) -> None:
        """Run due jobs every `interval_s` until stopped."""
        await self._loop.run()

    def stop(self) -> None:
        self._loop.stop()
