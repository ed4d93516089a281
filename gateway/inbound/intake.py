"""Intake: received bytes → durably stored and processed, in group commits.

Every way mail comes in (SMTP, LMTP, `gateway ingest`) calls
`Intake.receive`. It parses the mail, writes large raw mail and attachment
files (fsynced), then hands the mail to a single writer task that commits
whole batches: the raw bytes, the ticket work of `Pipeline` and the outbox
rows of every mail in the batch go in one transaction. `receive` returns only
after that commit, so the caller may answer `250` (or exit 0); if the commit
fails it raises `StoreUnavailable` and the caller answers `451` (exit 75).

A mail that can't be parsed or processed is not lost: its raw bytes are
committed with state `quarantined` and the error, logged as
`mail.quarantined` with its Message-ID, and the other mails of the batch go
on (each mail's work runs in its own savepoint). `reprocess` gives such a
mail another try on its stored bytes (`gateway quarantine retry`).

Every path applies the same `[limits]` here: a mail over max_message_size,
or whose MIME structure is over max_attachments / max_nesting
(gateway.mail.structure), is refused when the caller can still say no
(`OverLimit`: SMTP/LMTP answer 554, `ingest` exits 65), else (IMAP, a
quarantine retry) committed to quarantine with the reason: never ticketed,
never lost. Parsing runs in a worker process under `[limits]
parse_seconds` (gateway.ops.sandbox): past it the mail is quarantined with
the reason, and the event loop never waited for it. Files are written and
fsynced in a thread, never on the loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import hashlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from gateway.clock import Clock
from gateway.config import Limits
from gateway.desk.pipeline import Outcome, Pipeline, Received, content_digest
from gateway.mail import structure
from gateway.mail.parse import message_ids
from gateway.mail.structure import Examined, examine
from gateway.model import ParsedMail
from gateway.ops.sandbox import Crashed, Overrun, Sandbox
from gateway.store import Store, StoreUnavailable, Tx
from gateway.store.blobs import Blobs

log = structlog.get_logger("gateway.intake")

RAW_INLINE_MAX = 1 << 20   # raw mail up to 1 MiB is kept in the database row
BATCH_MAX = 128
SMALL_MAIL = 64 * 1024     # parsed in a lane of its own (Intake.small_sandbox)
# Mail over LARGE_MAIL is "large": the SMTP listener keeps its DATA in a
# temporary file, and each process holds at most LARGE_AT_ONCE large mails in
# memory (read, parsed, waiting for its commit): parsing takes about three
# times a mail's size, and 20 concurrent 20 MB mails took 1.7 GB when each was
# held and parsed as it arrived (project issue 7). The others wait their turn,
# their senders just wait longer for the answer; nothing is refused. One at a
# time costs little: parsing is Python under the GIL, two would not overlap.
LARGE_MAIL = 1 << 20
LARGE_AT_ONCE = 1


def _map_large_buffers() -> None:
    """Have glibc's malloc give every block of LARGE_MAIL or more its own
    mapping, returned to the system when freed (mallopt(3) M_MMAP_THRESHOLD).

    By default the threshold rises to the largest block freed so far (up to
    32 MiB): after the first large mail, the next ones' 20 MB buffers come
    from the heaps of whichever threads read and parsed them, and each heap
    keeps what it had at its largest. Measured with 20 concurrent 20 MB mails
    on two workers (bench/bench.py --memory): 290-300 MB at the peak with
    this, 420-470 MB without.
    """
    try:
        ctypes.CDLL(None).mallopt(-3, LARGE_MAIL)     # M_MMAP_THRESHOLD
    except (OSError, AttributeError):   # not glibc: its own policy
        pass


class OverLimit(Exception):
    """The mail is over a `[limits]` value (its text says which); it was not stored."""


@dataclass
class _Job:
    received: Received
    sha256: str
    parsed: ParsedMail | None
    error: str | None
    raw_path: str | None
    started: float
    inbound_id: int | None = None   # set when a stored (quarantined) mail is tried again
    done: asyncio.Future[Outcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Intake:
    def __init__(self, store: Store, pipeline: Pipeline, blobs: Blobs, clock: Clock,
                 on_commit: Callable[[], None] = lambda: None, *, limits: Limits | None = None,
                 max_message_size: int = 0, sandbox: Sandbox | None = None,
                 small_sandbox: Sandbox | None = None):
        self.store = store
        self.limits = limits or Limits()
        self.max_message_size = max_message_size
        self.sandbox = sandbox or Sandbox(self.limits.parse_processes, preload=["gateway.mail.structure"])
        # a lane of its own for small mail: however many large mails wait for
        # `sandbox`, a small one waits at most for another small one's parse,
        # which linear parsing bounds (SMALL_MAIL bytes: well under a second)
        self.small_sandbox = small_sandbox or Sandbox(1, preload=["gateway.mail.structure"])
        self.pipeline = pipeline
        self.blobs = blobs
        self.clock = clock
        self.on_commit = on_commit
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._large = asyncio.Semaphore(LARGE_AT_ONCE)
        _map_large_buffers()
        self.large_in_memory = 0        # large mails holding a slot now (tests read it)
        self.large_in_memory_peak = 0

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

    def close(self) -> None:
        self.sandbox.close()
        self.small_sandbox.close()

    async def receive(self, received: Received, *, holding_slot: bool = False,
                      refuse_over_limits: bool = False) -> Outcome:
        """`holding_slot`: the caller already holds `large_mail_slot` for this
        mail (the SMTP listener takes it before it reads a spooled DATA).
        `refuse_over_limits`: a mail over `[limits]` raises `OverLimit` and is
        not stored (the caller refuses it); else it is quarantined with the reason."""
        return await self._submit(received, None, holding_slot, refuse_over_limits)

    async def examine(self, raw: bytes) -> Examined:
        """Limits and parse, in a worker process under `[limits] parse_seconds`."""
        limits = self.limits
        if self.max_message_size and len(raw) > self.max_message_size:
            return Examined(problem=f"{len(raw)} bytes, over max_message_size ({self.max_message_size})")
        try:
            lane = self.small_sandbox if len(raw) <= SMALL_MAIL else self.sandbox
            result: Examined = await lane.run(
                examine, raw, (limits.max_attachments, limits.max_nesting), limits.parse_seconds)
        except Overrun:
            log.warning("mail.parse_overrun", size=len(raw), limit_s=limits.parse_seconds)
            return Examined(error=f"parsing took longer than limits.parse_seconds ({limits.parse_seconds:g} s)")
        except Crashed as e:
            return Examined(error=f"parse failed: {e}"[:2000])
        return result

    @contextlib.asynccontextmanager
    async def large_mail_slot(self, size: int) -> AsyncIterator[None]:
        """Wait for a turn to hold a mail of `size` bytes in memory (no wait
        for one of at most LARGE_MAIL)."""
        if size <= LARGE_MAIL:
            yield
            return
        async with self._large:
            self.large_in_memory += 1
            self.large_in_memory_peak = max(self.large_in_memory_peak, self.large_in_memory)
            try:
                yield
            finally:
                self.large_in_memory -= 1

    async def reprocess(self, inbound_id: int, received: Received) -> Outcome:
        """Run a stored, quarantined mail through parse and pipeline again.

        It keeps its inbound row (no second copy); on success the row becomes
        `processed` (or `duplicate`, `automatic`) like any mail; on failure it
        stays `quarantined` with the new error. A mail no longer quarantined
        (another retry won) is left alone: action `not_quarantined`.
        """
        return await self._submit(received, inbound_id)

    async def _submit(self, received: Received, inbound_id: int | None,
                      holding_slot: bool = False, refuse_over_limits: bool = False) -> Outcome:
        if holding_slot:
            return await self._parse_and_commit(received, inbound_id, refuse_over_limits)
        # a large mail keeps its slot until committed: parsed mail waiting for
        # the writer holds its raw bytes and attachments
        async with self.large_mail_slot(len(received.raw)):
            return await self._parse_and_commit(received, inbound_id, refuse_over_limits)

    async def _parse_and_commit(self, received: Received, inbound_id: int | None,
                                refuse_over_limits: bool = False) -> Outcome:
        started = time.perf_counter()
        raw = received.raw
        examined = await self.examine(raw)
        if examined.problem is not None and refuse_over_limits:
            raise OverLimit(examined.problem)
        parsed = examined.parsed
        error = examined.error if examined.problem is None else f"over [limits]: {examined.problem}"
        sha = hashlib.sha256(raw).hexdigest()
        raw_path = None
        # on PostgreSQL every instance must reach the bytes (a quarantine retry
        # may run anywhere): they stay in the row whatever their size
        raw_file = len(raw) > RAW_INLINE_MAX and self.store.dialect == "sqlite"
        try:
            if raw_file or (parsed is not None and parsed.attachments):
                # one thread hop for all the files of a mail: each fsync is milliseconds
                path = await asyncio.to_thread(self._write_files, raw if raw_file else None, sha, parsed)
                if path is not None:
                    raw_path = str(path.relative_to(self.blobs.root))
        except OSError as e:
            raise StoreUnavailable(f"cannot write mail files: {e}") from e
        job = _Job(received, sha, parsed, error, raw_path, started, inbound_id)
        self.start()
        await self._queue.put(job)
        try:
            return await asyncio.shield(job.done)
        finally:
            if job.done.done():
                # the writer keeps its last batch until the next mail comes: not this
                # mail's bytes (a large mail would stay in memory beside the next one)
                job.received = dataclasses.replace(received, raw=b"")
                job.parsed = None

    def _write_files(self, raw: bytes | None, sha: str, parsed: ParsedMail | None) -> Path | None:
        """In a thread: the attachments' files, and the raw mail's when it is large."""
        for att, content in parsed.attachments if parsed is not None else ():
            self.blobs.put("attachments", content, "", att.sha256)
        return self.blobs.put("raw", raw, ".eml", sha) if raw is not None else None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                # a batch that lost a deadlock to another instance is simply run again
                outcomes = await self.store.run(lambda tx: self._commit(tx, batch))  # noqa: B023 - run() ends first
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

    async def _commit(self, tx: Tx, batch: list[_Job]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for job in batch:
            r = job.received
            if job.inbound_id is not None:
                inbound_id = job.inbound_id
                if not await tx.is_quarantined(inbound_id):
                    outcomes.append(Outcome(inbound_id, "not_quarantined", None,
                                            job.parsed.message_id if job.parsed else "", 0,
                                            "the mail is no longer quarantined"))
                    continue
            else:
                # the null sender is kept as "<>", an unknown envelope (ingest without
                # --sender) as "": a retry from quarantine must see the same envelope
                inbound_id = await tx.add_inbound(
                    received_at=r.received_at, mail_from=stored_mail_from(r.mail_from),
                    rcpt_to=r.rcpt_to,
                    mailbox=r.mailbox.address, sha256=job.sha256, size=len(r.raw),
                    raw=None if job.raw_path else r.raw, raw_path=job.raw_path,
                    message_id=job.parsed.message_id if job.parsed else header_message_id(r.raw) or None)
            outcome = None
            error = job.error
            if job.parsed is not None:
                try:
                    async with self.store.savepoint(tx):
                        outcome = await self.pipeline.handle(tx, inbound_id, job.parsed, r)
                except StoreUnavailable:
                    raise          # the store itself failed: the whole batch gets 451 (or a rerun)
                except Exception as e:
                    error = f"processing failed: {type(e).__name__}: {e}"[:2000]
                    log.exception("mail.quarantined", inbound_id=inbound_id,
                                  message_id=job.parsed.message_id, error=error)
            if outcome is not None and outcome.action == "quarantined" and job.parsed is not None:
                # a quarantined mail (rate limit, refused contact, no sender) is not on a
                # ticket: its key is free again, so `quarantine retry` processes it
                # (after a failure the savepoint took the claim back already)
                await tx.release_inbound_message(outcome.message_id, content_digest(job.parsed))
            if outcome is None:
                await tx.set_inbound_state(inbound_id, "quarantined", error)
                message_id = job.parsed.message_id if job.parsed else header_message_id(r.raw)
                if job.parsed is None:
                    log.error("mail.quarantined", inbound_id=inbound_id, message_id=message_id,
                              error=error)
                told = await self._tell_staff(tx, inbound_id, job, error or "")
                outcome = Outcome(inbound_id, "quarantined", None, message_id, told, error or "")
            else:
                if outcome.action == "quarantined":
                    log.warning("mail.quarantined", inbound_id=inbound_id,
                                message_id=outcome.message_id, error=outcome.reason)
                state = {"duplicate": "duplicate", "automatic": "automatic",
                         "quarantined": "quarantined"}.get(outcome.action, "processed")
                await tx.set_inbound_state(inbound_id, state,
                                           outcome.reason if state == "quarantined" else None)
            outcomes.append(outcome)
        return outcomes


    async def _tell_staff(self, tx: Tx, inbound_id: int, job: _Job, error: str) -> int:
        """Staff of the ticket a quarantined mail answers learn of it (issue 20); a
        failure here never costs the quarantine itself."""
        ids = job.parsed.thread_ids if job.parsed is not None else header_thread_ids(job.received.raw)
        if not ids:
            return 0
        try:
            async with self.store.savepoint(tx):
                return await self.pipeline.quarantine_notice(tx, inbound_id, ids, job.received, error)
        except StoreUnavailable:
            raise
        except Exception:  # the mail is quarantined either way
            log.exception("quarantine.notice_failed", inbound_id=inbound_id)
            return 0


_MESSAGE_ID_HEADER = re.compile(rb"^message-id:[ \t]*(<[^<>\s]{1,900}>)", re.IGNORECASE | re.MULTILINE)


def header_message_id(raw: bytes) -> str:
    """The Message-ID of a mail no parser could read, for the log (or "")."""
    head = raw[:raw.find(b"\r\n\r\n") if b"\r\n\r\n" in raw[:1 << 20] else 1 << 20]
    m = _MESSAGE_ID_HEADER.search(head)
    return m.group(1).decode("ascii", "replace") if m else ""


_THREAD_HEADERS = re.compile(rb"^(in-reply-to|references):([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
                             re.IGNORECASE | re.MULTILINE)
MAX_THREAD_IDS = 100


def header_thread_ids(raw: bytes) -> tuple[str, ...]:
    """The Message-IDs a mail no parser could read answers, as ParsedMail.thread_ids
    orders them (In-Reply-To, then References nearest first), at most
    MAX_THREAD_IDS, read from its header (its first MiB) only."""
    end = raw.find(b"\r\n\r\n", 0, 1 << 20)
    head = raw[:end if end >= 0 else 1 << 20]
    replies: list[str] = []
    references: list[str] = []
    for m in _THREAD_HEADERS.finditer(head):
        ids = message_ids(m.group(2).decode("ascii", "replace"))
        (replies if m.group(1).lower() == b"in-reply-to" else references).extend(ids)
    return tuple(dict.fromkeys((*replies, *reversed(references))))[:MAX_THREAD_IDS]


# -- limits ---------------------------------------------------------------------

def structure_problem(raw: bytes, limits: Limits) -> str | None:
    """Why this mail's MIME structure is over `[limits]`, or None (gateway.mail.structure)."""
    return structure.structure_problem(raw, limits.max_attachments, limits.max_nesting)


def stored_mail_from(mail_from: str | None) -> str:
    """The envelope sender as the inbound row keeps it: "<>" for the null
    sender (RFC 5321 §4.5.5), "" when unknown, else the address."""
    if mail_from is None:
        return ""
    return "<>" if mail_from.strip() in ("", "<>") else mail_from


def envelope_mail_from(stored: str) -> str | None:
    """`stored_mail_from` read back: "" for the null sender, None when unknown."""
    if stored == "<>":
        return ""
    return stored or None
