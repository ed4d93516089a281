"""Intake: received bytes → durably stored and processed, in group commits.

Every way mail comes in (SMTP, LMTP, `gateway ingest`) calls
`Intake.receive`. It parses the mail, writes large raw mail and attachment
files (fsynced), then hands the mail to a single writer task that commits
whole batches: the raw bytes, the ticket work of `Pipeline` and the outbox
rows of every mail in the batch go in one transaction. `receive` returns only
after that commit, so the caller may answer `250` (or exit 0); if the commit
fails it raises `StoreUnavailable` and the caller answers `451` (exit 75).

A mail that can't be parsed or processed is not lost: its raw bytes are
committed with state `quarantined` and the error, and the other mails of
the batch go on (each mail's work runs in its own savepoint).
"""
from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from gateway.blobs import Blobs
from gateway.clock import Clock
from gateway.inbound.parse import parse_mail
from gateway.model import ParsedMail
from gateway.pipeline import Outcome, Pipeline, Received
from gateway.store import Store, StoreUnavailable

log = structlog.get_logger("gateway.intake")

RAW_INLINE_MAX = 1 << 20   # raw mail up to 1 MiB is kept in the database row
BATCH_MAX = 128


@dataclass
class _Job:
    received: Received
    sha256: str
    parsed: ParsedMail | None
    error: str | None
    raw_path: str | None
    started: float
    done: asyncio.Future[Outcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Intake:
    def __init__(self, store: Store, pipeline: Pipeline, blobs: Blobs, clock: Clock,
                 on_commit: Callable[[], None] = lambda: None):
        self.store = store
        self.pipeline = pipeline
        self.blobs = blobs
        self.clock = clock
        self.on_commit = on_commit
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="intake-writer")

    async def stop(self) -> None:
        """Finish every mail already handed in, then stop the writer."""
        if self._worker is None:
            return
        await self._queue.join()
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        self._worker = None

    async def receive(self, received: Received) -> Outcome:
        started = time.perf_counter()
        raw = received.raw
        sha = hashlib.sha256(raw).hexdigest()
        parsed, error = None, None
        try:
            parsed = parse_mail(raw)
        except Exception as e:  # noqa: BLE001 - any parser failure quarantines, never drops
            error = f"parse failed: {type(e).__name__}: {e}"[:2000]
        raw_path = None
        try:
            if len(raw) > RAW_INLINE_MAX:
                path = await asyncio.to_thread(self.blobs.put, "raw", raw, ".eml", sha)
                raw_path = str(path.relative_to(self.blobs.root))
            if parsed is not None:
                for att, content in parsed.attachments:
                    if len(content) > 65536:
                        await asyncio.to_thread(self.blobs.put, "attachments", content, "", att.sha256)
                    else:
                        self.blobs.put("attachments", content, "", att.sha256)
        except OSError as e:
            raise StoreUnavailable(f"cannot write mail files: {e}") from e
        job = _Job(received, sha, parsed, error, raw_path, started)
        self.start()
        await self._queue.put(job)
        return await asyncio.shield(job.done)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                outcomes = await self._commit(batch)
            except Exception as e:  # noqa: BLE001 - every caller gets the failure, the writer lives on
                error = e if isinstance(e, StoreUnavailable) else StoreUnavailable(f"{type(e).__name__}: {e}")
                log.error("intake.commit_failed", error=str(e), mails=len(batch))
                for job in batch:
                    if not job.done.done():
                        job.done.set_exception(error)
            else:
                self.on_commit()
                for job, outcome in zip(batch, outcomes, strict=True):
                    log.info("mail.processed", inbound_id=outcome.inbound_id, action=outcome.action,
                             ticket_id=outcome.ticket_id, message_id=outcome.message_id,
                             mailbox=job.received.mailbox.address, reason=outcome.reason,
                             queued=outcome.queued,
                             duration_ms=round((time.perf_counter() - job.started) * 1000, 2))
                    if not job.done.done():
                        job.done.set_result(outcome)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[_Job]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        async with self.store.transaction() as tx:
            for job in batch:
                r = job.received
                inbound_id = await tx.add_inbound(
                    received_at=r.received_at, mail_from=r.mail_from or "", rcpt_to=r.rcpt_to,
                    mailbox=r.mailbox.address, sha256=job.sha256, size=len(r.raw),
                    raw=None if job.raw_path else r.raw, raw_path=job.raw_path,
                    message_id=job.parsed.message_id if job.parsed else None)
                outcome = None
                error = job.error
                if job.parsed is not None:
                    try:
                        async with self.store.savepoint(tx):
                            outcome = await self.pipeline.handle(tx, inbound_id, job.parsed, r)
                    except sqlite3.OperationalError:
                        raise          # the store itself failed: the whole batch gets 451
                    except Exception as e:  # noqa: BLE001 - poison mail is quarantined
                        error = f"processing failed: {type(e).__name__}: {e}"[:2000]
                        log.exception("mail.quarantined", inbound_id=inbound_id,
                                      message_id=job.parsed.message_id)
                if outcome is None:
                    await tx.set_inbound_state(inbound_id, "quarantined", error)
                    outcome = Outcome(inbound_id, "quarantined", None,
                                      job.parsed.message_id if job.parsed else "", 0, error or "")
                else:
                    state = {"duplicate": "duplicate", "automatic": "automatic",
                             "quarantined": "quarantined"}.get(outcome.action, "processed")
                    await tx.set_inbound_state(inbound_id, state,
                                               outcome.reason if state == "quarantined" else None)
                outcomes.append(outcome)
        return outcomes
