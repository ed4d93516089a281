"""The outbox sender: delivers what the pipeline queued, retrying with backoff.

It claims due rows (a lease of `[store] lease_seconds`, renewed every third
of it while the rows are being sent, so two processes or instances never
send the same row at once, however slow the relay, and a dead one's rows
pass to the others when its lease runs out), hands each to its relay's transport, and marks it sent, due again
later (temporary failure: exponential backoff from `retry_base_seconds` up
to `retry_max_seconds`), or failed (permanent `5xx`, recorded and logged,
not retried forever). It runs in its own task: intake never waits on it.
"""
from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta

import structlog

from gateway.clock import Clock
from gateway.ops.loops import Repeater, backoff
from gateway.outbound.transport import DeliveryError, Transport
from gateway.store import OutboxItem, Store, StoreUnavailable
from gateway.store.leases import holder_id

log = structlog.get_logger("gateway.outbox")

PARALLEL = 8


class OutboxSender:
    def __init__(self, store: Store, transports: dict[str, Transport], clock: Clock, *,
                 retry_base_s: float, retry_max_s: float, poll_s: float, lease_s: float = 60.0):
        self.store = store
        self.transports = transports
        self.clock = clock
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.poll_s = poll_s
        self.lease_s = lease_s
        self.holder = holder_id()
        self._loop = Repeater(self.deliver_due, poll_s, lambda: log.exception("outbox.loop_error"))

    def wake(self) -> None:
        self._loop.wake()

    async def deliver_due(self, now: datetime | None = None) -> int:
        """Deliver everything due at `now` (default: the clock); return how many were sent.

        Rounds of claims go on while they deliver something; a round that
        delivers nothing ends the pass, so a dead relay costs one try per
        row per pass, not a loop. Each round's results are one commit.
        """
        sent_total = 0
        batch = PARALLEL * 8
        while True:
            items = await self.store.claim_due(now or self.clock(), self.lease_s, limit=batch,
                                               holder=self.holder)
            if not items:
                return sent_total
            # the round's claims are renewed until its results are recorded: a row
            # sent but not yet marked sent must not pass to another instance
            keeper = asyncio.create_task(self._keep_claimed([item.id for item in items]))
            try:
                sem = asyncio.Semaphore(PARALLEL)
                results = await asyncio.gather(*(self._deliver_within(sem, i) for i in items))
                at = self.clock()
                sent = [item.id for item, error in results if error is None]
                retry = [(item.id, at + timedelta(seconds=backoff(item.attempts + 1, self.retry_base_s,
                                                                  self.retry_max_s)), str(error))
                         for item, error in results if error is not None and not error.permanent]
                failed = [(item.id, str(error)) for item, error in results
                          if error is not None and error.permanent]
                await self.store.record_deliveries(at, sent=sent, retry=retry, holder=self.holder)
                if failed:
                    # A permanent refusal is recorded on the ticket like a bounce, and the
                    # address marked undeliverable, in the same commit as the row's `failed`.
                    for ticket_id, addresses in await self.store.record_failures(at, failed):
                        log.warning("ticket.undeliverable", ticket_id=ticket_id, addresses=addresses)
            finally:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
            for item, error in results:
                self._log(item, error)
            sent_total += len(sent)
            if not sent or len(items) < batch:
                return sent_total

    async def _deliver_within(self, sem: asyncio.Semaphore,
                              item: OutboxItem) -> tuple[OutboxItem, DeliveryError | None]:
        async with sem:
            return item, await self._deliver(item)

    async def _keep_claimed(self, ids: list[int]) -> None:
        """Renew this round's claims every third of the lease until cancelled."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.store.extend_claims(ids, self.holder, self.clock(), self.lease_s)
            except StoreUnavailable as e:
                log.warning("outbox.claims_not_renewed", rows=len(ids), error=str(e))

    async def _deliver(self, item: OutboxItem) -> DeliveryError | None:
        transport = self.transports.get(item.relay) or self.transports["default"]
        try:
            refused = await transport.send(item.mail_from, item.rcpt_to, item.content)
        except DeliveryError as e:
            return e
        if refused:
            log.warning("outbox.partly_refused", outbox_id=item.id, ticket_id=item.ticket_id,
                        refused=refused)
        return None

    def _log(self, item: OutboxItem, error: DeliveryError | None) -> None:
        fields = {"outbox_id": item.id, "ticket_id": item.ticket_id, "kind": item.kind,
                  "relay": item.relay, "attempt": item.attempts + 1}
        if error is None:
            log.info("outbox.sent", recipients=len(item.rcpt_to), **fields)
        elif error.permanent:
            log.error("outbox.failed", error=str(error), **fields)
        else:
            log.warning("outbox.retry", error=str(error),
                        retry_in_s=backoff(item.attempts + 1, self.retry_base_s, self.retry_max_s),
                        **fields)

    async def run(self) -> None:
        """Deliver until stopped: at once when woken, else every `poll_s`."""
        await self._loop.run()

    def stop(self) -> None:
        self._loop.stop()

    async def close(self) -> None:
        for transport in {id(t): t for t in self.transports.values()}.values():
            await transport.close()
