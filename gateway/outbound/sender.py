"""The outbox sender: delivers what the pipeline queued, retrying with backoff.

It claims due rows (a lease of `[store] lease_seconds`, renewed every third
of it while the rows are being sent, so two processes or instances never
send the same row at once, however slow the relay, and a dead one's rows
pass to the others when its lease runs out), hands each to its relay's
transport, and marks it sent, due again later (temporary failure: exponential
backoff from `retry_base_seconds` up to `retry_max_seconds`), or failed
(permanent `5xx`, recorded and logged, not retried forever). It runs in its
own task: intake never waits on it.

Exactly once, as far as a relay allows (project issue 15):
- each result is committed as soon as the relay answered, in small groups
  (whatever finished while the previous commit ran), and a delivery's slot is
  free for the next row only once its result is committed: after a kill -9 at
  most the `PARALLEL` mails in flight go out again;
- results the store cannot take (PostgreSQL restarting, SQLite locked) are
  kept and recorded first thing when it is back, while the claims still hold;
- claims are judged on the real clock (`wall`), never on an injected one, and
  a restarted instance takes back its dead predecessor's claims at once
  (`gateway.store.leases.dead_predecessors`);
- any error of one row (a transport raising `ValueError` on an address with a
  space) is that row's result, temporary or permanent (`classify`), never the
  round's.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from gateway.clock import Clock, system_clock
from gateway.ops.loops import Repeater, backoff
from gateway.outbound.transport import DeliveryError, Transport, classify
from gateway.store import Failure, OutboxItem, Store, StoreUnavailable
from gateway.store.leases import dead_predecessors, holder_id

log = structlog.get_logger("gateway.outbox")

PARALLEL = 8
OUTAGE_LOG_EVERY = timedelta(minutes=1)


@dataclass
class _Result:
    item: OutboxItem
    error: DeliveryError | None
    at: datetime
    recorded: bool = False          # its commit is done


class OutboxSender:
    def __init__(self, store: Store, transports: dict[str, Transport], clock: Clock, *,
                 retry_base_s: float, retry_max_s: float, poll_s: float, lease_s: float = 60.0,
                 data_dir: str = "", wall: Clock = system_clock,
                 on_failed: Callable[[list[Failure]], Awaitable[object]] | None = None):
        self.store = store
        self.transports = transports
        self.clock = clock
        self.wall = wall
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.poll_s = poll_s
        self.lease_s = lease_s
        self.holder = holder_id(data_dir)
        self.on_failed = on_failed           # told of permanent failures once recorded (staff notices)
        self._loop = Repeater(self.deliver_due, poll_s, lambda: log.exception("outbox.loop_error"))
        self._unrecorded: list[_Result] = []      # delivered, not yet committed
        self._flushing: asyncio.Future[None] | None = None
        self._took_back = False
        # while the store is away: since, last line logged, passes not logged since, passes
        self._away: tuple[datetime, datetime, int, int] | None = None

    def _store_away(self, e: StoreUnavailable) -> None:
        """One warning when the store goes away, then one a minute while it stays
        away (with the passes in between), not one per poll."""
        now = self.wall()
        since, logged, quiet, passes = self._away or (now, now - OUTAGE_LOG_EVERY, 0, 0)
        if now - logged >= OUTAGE_LOG_EVERY:
            log.warning("outbox.store_unavailable", unrecorded=len(self._unrecorded), error=str(e),
                        since=since.isoformat(timespec="seconds"), passes_not_logged=quiet)
            logged, quiet = now, -1
        self._away = (since, logged, quiet + 1, passes + 1)

    def _store_back(self) -> None:
        if self._away is not None:
            since, _, _, passes = self._away
            log.info("outbox.store_back", away_s=round((self.wall() - since).total_seconds(), 1),
                     passes=passes)
            self._away = None

    def wake(self) -> None:
        self._loop.wake()

    async def take_back(self) -> int:
        """Free the claims of this host and data_dir's dead predecessors (a kill -9,
        a crash): their rows are due at once, not after `lease_seconds`."""
        dead = dead_predecessors(await self.store.claim_holders(), self.holder)
        rows = await self.store.take_back_claims(dead)
        if dead:
            log.info("outbox.claims_taken_back", holders=dead, rows=rows)
        return rows

    async def deliver_due(self, now: datetime | None = None) -> int:
        """Deliver everything due at `now` (default: the clock); return how many were sent.

        Rounds of claims go on while they deliver something; a round that
        delivers nothing ends the pass, so a dead relay costs one try per
        row per pass, not a loop. Results are committed as they come.
        """
        try:
            if not self._took_back:
                await self.take_back()
                self._took_back = True
            await self._record()                # what an outage left unrecorded, first
        except StoreUnavailable as e:
            self._store_away(e)
            return 0
        sent_total = 0
        batch = PARALLEL * 8
        while True:
            try:
                items = await self.store.claim_due(now or self.clock(), self.lease_s, limit=batch,
                                                   holder=self.holder, wall=self.wall())
            except StoreUnavailable as e:
                self._store_away(e)
                return sent_total
            self._store_back()
            if not items:
                return sent_total
            # claims are renewed until every result is recorded: a row sent but
            # not yet marked sent must not pass to another instance
            open_ids = {item.id for item in items}
            keeper = asyncio.create_task(self._keep_claimed(open_ids))
            try:
                sem = asyncio.Semaphore(PARALLEL)
                results = await asyncio.gather(*(self._deliver_within(sem, i, open_ids) for i in items))
            finally:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
            sent = sum(error is None for error in results)
            sent_total += sent
            if self._unrecorded:
                return sent_total               # the store is away: recorded on the next pass
            if not sent or len(items) < batch:
                return sent_total

    async def _deliver_within(self, sem: asyncio.Semaphore, item: OutboxItem,
                              open_ids: set[int]) -> DeliveryError | None:
        async with sem:
            error = await self._deliver(item)
            result = _Result(item, error, self.clock())
            self._unrecorded.append(result)
            try:
                # the slot is held until this result is committed, so that no more
                # than PARALLEL mails are ever delivered and not yet recorded
                await self._record(result)
            except StoreUnavailable as e:
                log.warning("outbox.results_kept", unrecorded=len(self._unrecorded), error=str(e))
            else:
                open_ids.discard(item.id)
            return error

    async def _record(self, mine: _Result | None = None) -> None:
        """Commit the results not yet recorded, in one transaction with whatever
        else finished meanwhile (a group commit); raise `StoreUnavailable`
        and keep them when the store cannot take them. With `mine`, return only
        once that result's commit is done (another caller's group may hold it)."""
        while not mine.recorded if mine is not None else self._unrecorded:
            if self._flushing is not None:
                # one commit at a time; ours may already be in it
                await asyncio.shield(self._flushing)
                continue
            if not self._unrecorded:      # pragma: no cover - a failed flush puts its group back
                break
            group, self._unrecorded = self._unrecorded, []
            self._flushing = asyncio.get_running_loop().create_future()
            try:
                await self._commit(group)
            except BaseException as e:
                self._unrecorded[:0] = group
                self._flushing.set_exception(e if isinstance(e, StoreUnavailable) else
                                             StoreUnavailable(f"results not recorded: {e}"))
                self._flushing.exception()      # retrieved: the waiters see it through `shield`
                raise
            else:
                for r in group:
                    r.recorded = True
                self._flushing.set_result(None)
            finally:
                self._flushing = None
            for r in group:
                self._log(r.item, r.error)

    async def _commit(self, group: list[_Result]) -> None:
        sent = [(r.item.id, r.at) for r in group if r.error is None]
        retry = [(r.item.id, r.at + timedelta(seconds=backoff(r.item.attempts + 1, self.retry_base_s,
                                                              self.retry_max_s)), str(r.error))
                 for r in group if r.error is not None and not r.error.permanent]
        failed = [(r.item.id, str(r.error)) for r in group if r.error is not None and r.error.permanent]
        # A permanent refusal is recorded on the ticket like a bounce, and the address
        # marked undeliverable, in the same commit as the row's `failed`.
        failures = await self.store.record_results(group[-1].at, sent=sent, retry=retry, failed=failed,
                                                   holder=self.holder)
        for f in failures:
            if f.marked:
                log.warning("ticket.undeliverable", ticket_id=f.ticket_id, addresses=list(f.marked))
        if failures and self.on_failed is not None:
            try:
                await self.on_failed(failures)
                self.wake()
            except Exception:   # the results are recorded; a notice is not worth a repeat
                log.exception("outbox.failure_notice_error", tickets=[f.ticket_id for f in failures])

    async def _keep_claimed(self, ids: set[int]) -> None:
        """Renew the claims of this round's rows not yet recorded, every third of
        the lease, until cancelled."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.store.extend_claims(sorted(ids), self.holder, self.wall(), self.lease_s)
            except StoreUnavailable as e:
                log.warning("outbox.claims_not_renewed", rows=len(ids), error=str(e))

    async def _deliver(self, item: OutboxItem) -> DeliveryError | None:
        transport = self.transports.get(item.relay)
        if transport is None:      # never another relay's: GovCloud mail stays GovCloud's
            return DeliveryError(f"no transport for relay {item.relay!r}", permanent=False)
        try:
            refused = await transport.send(item.mail_from, item.rcpt_to, item.content)
        except Exception as e:  # noqa: BLE001 - any error of one row is that row's result
            return classify(e)
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
