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

`structure_problem` is the edges' guard against hostile MIME (`[limits]`
max_attachments, max_nesting): a linear scan that never recurses, run before
any parser sees the mail, because the parsers recurse once per nesting level
(about 1 000 levels of message/rfc822 raise RecursionError in both the
stdlib and mail-parser).
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

import structlog

from gateway.clock import Clock
from gateway.config import Limits
from gateway.desk.pipeline import Outcome, Pipeline, Received
from gateway.mail.parse import parse_mail
from gateway.model import ParsedMail
from gateway.store import Store, StoreUnavailable, Tx
from gateway.store.blobs import Blobs

log = structlog.get_logger("gateway.intake")

RAW_INLINE_MAX = 1 << 20   # raw mail up to 1 MiB is kept in the database row
BATCH_MAX = 128
# Larger mail is parsed (and scanned) in a thread: a 25 MB parse must not stall
# every other SMTP session on the event loop.
PARSE_IN_THREAD = 256 * 1024
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
                 on_commit: Callable[[], None] = lambda: None):
        self.store = store
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

    async def receive(self, received: Received, *, holding_slot: bool = False) -> Outcome:
        """`holding_slot`: the caller already holds `large_mail_slot` for this
        mail (the SMTP listener takes it before it reads a spooled DATA)."""
        return await self._submit(received, None, holding_slot)

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
                      holding_slot: bool = False) -> Outcome:
        if holding_slot:
            return await self._parse_and_commit(received, inbound_id)
        # a large mail keeps its slot until committed: parsed mail waiting for
        # the writer holds its raw bytes and attachments
        async with self.large_mail_slot(len(received.raw)):
            return await self._parse_and_commit(received, inbound_id)

    async def _parse_and_commit(self, received: Received, inbound_id: int | None) -> Outcome:
        started = time.perf_counter()
        raw = received.raw
        sha = hashlib.sha256(raw).hexdigest()
        parsed, error = None, None
        try:
            if len(raw) > PARSE_IN_THREAD:
                parsed = await asyncio.to_thread(parse_mail, raw)
            else:
                parsed = parse_mail(raw)
        except Exception as e:  # noqa: BLE001 - any parser failure quarantines, never drops
            error = f"parse failed: {type(e).__name__}: {e}"[:2000]
        raw_path = None
        try:
            # on PostgreSQL every instance must reach the bytes (a quarantine retry
            # may run anywhere): they stay in the row whatever their size
            if len(raw) > RAW_INLINE_MAX and self.store.dialect == "sqlite":
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

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                # a batch that lost a deadlock to another instance is simply run again
                outcomes = await self.store.run(lambda tx: self._commit(tx, batch))
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
                except Exception as e:  # noqa: BLE001 - poison mail is quarantined
                    error = f"processing failed: {type(e).__name__}: {e}"[:2000]
                    log.exception("mail.quarantined", inbound_id=inbound_id,
                                  message_id=job.parsed.message_id, exception=error)
            if outcome is not None and outcome.action == "quarantined":
                # a quarantined mail is not on a ticket: its Message-ID is free again
                # (after a failure the savepoint took the claim back already)
                await tx.release_inbound_message(outcome.message_id)
            if outcome is None:
                await tx.set_inbound_state(inbound_id, "quarantined", error)
                message_id = job.parsed.message_id if job.parsed else header_message_id(r.raw)
                if job.parsed is None:
                    log.error("mail.quarantined", inbound_id=inbound_id, message_id=message_id,
                              exception=error)
                outcome = Outcome(inbound_id, "quarantined", None, message_id, 0, error or "")
            else:
                if outcome.action == "quarantined":
                    log.warning("mail.quarantined", inbound_id=inbound_id,
                                message_id=outcome.message_id, exception=outcome.reason)
                state = {"duplicate": "duplicate", "automatic": "automatic",
                         "quarantined": "quarantined"}.get(outcome.action, "processed")
                await tx.set_inbound_state(inbound_id, state,
                                           outcome.reason if state == "quarantined" else None)
            outcomes.append(outcome)
        return outcomes


_MESSAGE_ID_HEADER = re.compile(rb"^message-id:[ \t]*(<[^<>\s]{1,900}>)", re.IGNORECASE | re.MULTILINE)


def header_message_id(raw: bytes) -> str:
    """The Message-ID of a mail no parser could read, for the log (or "")."""
    head = raw[:raw.find(b"\r\n\r\n") if b"\r\n\r\n" in raw[:1 << 20] else 1 << 20]
    m = _MESSAGE_ID_HEADER.search(head)
    return m.group(1).decode("ascii", "replace") if m else ""


# -- MIME structure limits ---------------------------------------------------

_CTYPE = re.compile(rb"^content-type[ \t]*:[ \t]*([!-~]+?)[ \t]*/[ \t]*([!-~]+?)[ \t]*(?:;|\r?$)",
                    re.IGNORECASE | re.MULTILINE)
_BOUNDARY = re.compile(rb"""boundary[ \t]*=[ \t]*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))""",
                       re.IGNORECASE)
_CTE = re.compile(rb"^content-transfer-encoding[ \t]*:[ \t]*([!-~]+)", re.IGNORECASE | re.MULTILINE)
_ATTACHMENT = re.compile(rb"^content-disposition[ \t]*:[ \t]*attachment", re.IGNORECASE | re.MULTILINE)
_IDENTITY = (b"", b"7bit", b"8bit", b"binary")


def structure_problem(raw: bytes, limits: Limits) -> str | None:
    """Why this mail's MIME structure is over `[limits]`, or None.

    Counts, in one pass over the lines and without recursion (RFC 2046 §5.1
    boundaries, §5.2.1 message/rfc822):
    - nesting: how many multipart or message/rfc822 containers enclose the
      deepest part (an ordinary mail with text, HTML and an attachment: 2);
    - attachments: leaf parts other than the message's text (the first
      text/plain and first text/html that are not `Content-Disposition:
      attachment`).
    Malformed structure is read the way a lenient parser would and never
    raises; the scan stops at the first limit exceeded.
    """
    stack: list[tuple[bytes, int]] = []   # open multiparts: (b"--" + boundary, depth of their parts)
    depth = 0                             # containers around the entity being read
    attachments = 0
    body_seen: set[bytes] = set()
    pos, end = 0, len(raw)
    in_headers = True
    header: list[bytes] = []

    def boundary_of(line: bytes) -> tuple[int, bool] | None:
        """Index in `stack` of the multipart this line delimits, and whether it closes it."""
        if not stack or not line.startswith(b"--"):
            return None
        text = line.rstrip(b" \t\r")
        for i in range(len(stack) - 1, -1, -1):
            delimiter = stack[i][0]
            if text == delimiter:
                return i, False
            if text == delimiter + b"--":
                return i, True
        return None

    def at_boundary(hit: tuple[int, bool]) -> None:
        nonlocal depth, in_headers, header
        i, closing = hit
        if closing:
            del stack[i:]                 # the multipart and anything left open inside it
            in_headers = False            # its epilogue: body text of the parent
        else:
            del stack[i + 1:]
            depth = stack[i][1]
            in_headers, header = True, []

    while pos < end:
        if in_headers:
            nl = raw.find(b"\n", pos)
            nl = end if nl < 0 else nl
            line = raw[pos:nl]
            pos = nl + 1
            hit = boundary_of(line)
            if hit is not None:           # a part with no blank line after its headers
                attachments += 1
                at_boundary(hit)
                continue
            if line.rstrip(b"\r"):
                header.append(line)
                continue
            # end of this entity's header block: what is it?
            block = b"\n".join(header)
            m = _CTYPE.search(block)
            main, sub = (m.group(1).lower(), m.group(2).lower()) if m else (b"text", b"plain")
            cte = _CTE.search(block)
            encoding = cte.group(1).lower() if cte else b""
            b = _BOUNDARY.search(block) if main == b"multipart" else None
            if b is not None:
                if depth + 1 > limits.max_nesting:
                    return f"MIME nesting deeper than {limits.max_nesting} levels"
                stack.append((b"--" + (b.group(1) or b.group(2)), depth + 1))
                in_headers = False        # its preamble, up to the first boundary
            elif main == b"message" and sub in (b"rfc822", b"global") and encoding in _IDENTITY:
                if depth + 1 > limits.max_nesting:
                    return f"MIME nesting deeper than {limits.max_nesting} levels"
                depth += 1                # the enclosed message's own header block follows
                header = []
            else:
                if main == b"text" and sub in (b"plain", b"html") and sub not in body_seen \
                        and not _ATTACHMENT.search(block):
                    body_seen.add(sub)
                else:
                    attachments += 1
                    if attachments > limits.max_attachments:
                        return f"more than {limits.max_attachments} attachments"
                in_headers = False
        else:
            if not stack:
                return None               # a leaf body or an epilogue, to the end: nothing more
            # the next line that starts with "--" (a boundary candidate)
            at = 0 if pos == 0 and raw.startswith(b"--") else raw.find(b"\n--", pos - 1 if pos else 0)
            if at < 0:
                return None
            start = at if raw[at:at + 1] != b"\n" else at + 1
            nl = raw.find(b"\n", start)
            nl = end if nl < 0 else nl
            pos = nl + 1
            hit = boundary_of(raw[start:nl])
            if hit is not None:
                at_boundary(hit)
    return None


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
