"""The scheduler: time passing, turned into reminders, auto-closes and closes.

Due times live on the tickets (gateway.lifecycle), so nothing is lost by a
restart. Each run reads the due tickets inside one write transaction,
decides with `lifecycle.due` on the ticket as it is in that transaction,
and clears the timer in the same commit that queues the notice: a job
happens exactly once however often, and however many processes, run it.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import datetime

import structlog

from gateway import lifecycle
from gateway.clock import Clock
from gateway.desk import Desk
from gateway.loops import Repeater
from gateway.model import Ticket
from gateway.store import Store, Tx

log = structlog.get_logger("gateway.scheduler")

BATCH = 200


class Scheduler:
    def __init__(self, store: Store, desk: Desk, policy: lifecycle.Policy, clock: Clock, *,
                 interval_s: float = 60.0, on_queued: Callable[[], None] = lambda: None):
        self.store = store
        self.desk = desk
        self.policy = policy
        self.clock = clock
        self.interval_s = interval_s
        self.on_queued = on_queued
        self._loop = Repeater(self.run_due, interval_s, lambda: log.exception("scheduler.error"))

    async def run_due(self, now: datetime | None = None) -> dict[str, int]:
        """Run every job due at `now`; return how many of each kind ran."""
        at = now or self.clock()
        done: Counter[str] = Counter()
        while True:
            ran = 0
            async with self.store.transaction() as tx:
                ids = await tx.due_ticket_ids(at, BATCH)
                for ticket_id in ids:
                    ticket = await tx.ticket(ticket_id)
                    if ticket is None:
                        continue
                    if lifecycle.sla_warning_due(ticket, at):
                        await self._sla_warning(tx, ticket, at)
                        ran += 1
                        done["first-response target missed: SLA warning"] += 1
                    tr = lifecycle.due(ticket, at, self.policy)
                    if tr is None:
                        continue
                    _, queued = await self.desk.apply(tx, ticket, tr, at)
                    ran += 1
                    done[tr.cause] += 1
                    log.info("scheduler.job", ticket_id=ticket.id, job=tr.cause,
                             status=tr.status.value, queued=queued)
            if ran:
                self.on_queued()
            if len(ids) < BATCH:
                break
        if done:
            log.info("scheduler.ran", at=at.isoformat(), jobs=dict(done))
        return dict(done)

    async def _sla_warning(self, tx: Tx, ticket: Ticket, at: datetime) -> None:
        await tx.update_ticket(ticket.id, at, sla_warned_at=at)
        due = self.desk.target_text(ticket, ticket.response_due_at) or str(ticket.response_due_at)
        await self.desk.to_staff(tx, ticket, self.desk.queue_of(ticket), at, answers=[],
                                 template="sla_warning", context={"due": due})
        log.warning("ticket.sla_missed", ticket_id=ticket.id, priority=ticket.priority,
                    plan=ticket.plan, due=ticket.response_due_at.isoformat()
                    if ticket.response_due_at else None)

    async def run(self) -> None:
        """Run due jobs every `interval_s` until stopped."""
        await self._loop.run()

    def stop(self) -> None:
        self._loop.stop()
