"""The SMTP / LMTP listener: protocol from aiosmtpd, policy in one handler.

The handler answers RCPT (`550` for an address that is no mailbox) and DATA
(`250` only once `Intake.receive` has committed the mail, `451` when the
store can't take it). Mail over `max_message_size` gets `552`, from aiosmtpd
for `MAIL FROM ... SIZE=` and from its DATA loop, which `_SpooledDATA` keeps
as it is but for where the lines go: a DATA over LARGE_MAIL goes to a spool
file, and the handler reads it when `Intake.large_mail_slot` gives it a turn
(20 concurrent 20 MB mails: 1.7 GB before, under 300 MB). Any
other exception is answered `451 4.3.0`, never aiosmtpd's default `500`,
which would make the sending MTA bounce a good mail.

`[limits]` are enforced here, at the edge, with answers a sending MTA acts
on correctly:
- more than `max_recipients` RCPT TO: `452 4.5.3` (RFC 5321 §4.5.3.1.10:
  the client sends the rest in another transaction; RFC 3463 X.5.3 "too
  many recipients");
- more than `max_attachments` parts or deeper than `max_nesting`: `554 5.6.0`
  after DATA. Permanent, because the same bytes will never fit; X.6.0 (RFC
  3463 "other or undefined media error": the content's structure, not its
  size) rather than `552 5.3.4`, which says "too big" and which many MTAs,
  ours included, retry as if temporary. `gateway ingest` exits 65
  (EX_DATAERR) for the same mail, which Postfix's pipe reports as 5.6.0 too.

Stopping (SIGTERM): new transactions get `421 4.3.2` and their connection
is closed (RFC 5321 §3.8), transactions in flight finish.
"""
from __future__ import annotations

import asyncio
import asyncio.constants
import enum
import errno
import io
import os
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import structlog
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from gateway.clock import Clock
from gateway.config import Config
from gateway.desk.pipeline import Received
from gateway.inbound import answers
from gateway.inbound.intake import LARGE_MAIL, Intake, OverLimit
from gateway.store import StoreUnavailable

log = structlog.get_logger("gateway.smtp")

# Header lines longer than RFC 5322's 998 exist in real mail (long References,
# encoded subjects); refusing them with 500 would bounce a customer's mail.
LINE_LENGTH_LIMIT = 1 << 20


SPOOL_CHUNK = 256 * 1024     # a spooled DATA goes to its file in pieces of this size


class Spool:
    """The content of one DATA: in memory up to `memory` bytes (at most
    LARGE_MAIL; `[limits] session_memory`), beyond that in an unnamed
    temporary file in `directory`, appended to in SPOOL_CHUNK pieces."""

    def __init__(self, directory: Path | None, memory: int = LARGE_MAIL):
        self.directory = directory
        self.buf = bytearray()
        self.file: io.FileIO | None = None
        self.written = 0                  # bytes in the file
        self.flush_at = min(memory, LARGE_MAIL)   # flush when buf is longer than this
        self._io: asyncio.Future[Any] | None = None

    @property
    def size(self) -> int:
        return self.written + len(self.buf)

    async def flush(self) -> None:
        if self.file is None:
            self.file = tempfile.TemporaryFile(dir=self.directory, buffering=0)  # noqa: SIM115 - closed by close()
            self.flush_at = min(SPOOL_CHUNK, self.flush_at)
        chunk, self.buf = self.buf, bytearray()
        await self._in_thread(_write_all, self.file, chunk)
        self.written += len(chunk)

    async def read(self) -> bytes:
        """The whole content as one bytes object (one allocation of its size)."""
        if self.file is None:
            return bytes(self.buf)
        if self.buf:
            await self.flush()
        data: bytes = await self._in_thread(os.pread, self.file.fileno(), self.written, 0)
        if len(data) != self.written:
            raise OSError(f"read {len(data)} of {self.written} bytes")
        return data

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        # shielded: cancelled (the connection lost), `close` still waits for the thread
        self._io = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        return await asyncio.shield(self._io)

    def close(self) -> None:
        self.buf = bytearray()
        file, self.file = self.file, None
        if file is None:
            return
        if self._io is not None and not self._io.done():
            # a thread still reads or writes it: closing now could hand its fd number
            # to another file first
            def close_after(io: asyncio.Future[Any]) -> None:
                if not io.cancelled():
                    io.exception()        # retrieved: the DATA has its answer already
                file.close()
            self._io.add_done_callback(close_after)
        else:
            file.close()


def _write_all(f: io.FileIO, data: bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view) or 0:]


class _State(enum.Enum):
    NOMINAL = enum.auto()
    TOO_LONG = enum.auto()
    TOO_MUCH = enum.auto()
    NOT_SPOOLED = enum.auto()


# aiosmtpd 1.4's answer in smtp_MAIL (tests/test_internals.py fails if it changes)
AIOSMTPD_SIZE_REFUSAL = "552 Error: message size exceeds fixed maximum message size"


class _SpooledDATA(SMTP):
    """aiosmtpd's SMTP.smtp_DATA, with the DATA going to a `Spool`.

    aiosmtpd keeps each line of a DATA as its own bytearray and joins them at
    the final dot: a 20 MB mail takes about 60 MB while it arrives, and 20 of
    them at once 1.2 GB before any parsing (project issue 7). This is the same
    loop with the same answers, only writing each line to a Spool: the
    dot-unstuffing (RFC 5321 §4.5.2), `552` past data_size_limit and `500` for a
    line over line_length_limit, both sent only after the final dot (§4.2.5),
    then the DATA hook and its answer (one line per recipient for LMTP, from
    the handler). Mail of at most LARGE_MAIL reaches the handler as
    `envelope.original_content`, as before; larger mail as `envelope.spool`,
    for the handler to read when `Intake.large_mail_slot` lets it. One answer
    is new: `451` when the spool can't be written (disk full), after the dot.
    Only for decode_data=False (the Listener's); otherwise aiosmtpd's own.
    """

    spool_dir: Path | None = None
    spool_memory: int = LARGE_MAIL
    sessions: SessionCount | None = None     # set by the Listener: the cap on concurrent sessions

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        _loop_errors.accepted()
        self.rcpt_errors = 0
        self.admitted = self.sessions.enter() if self.sessions is not None else True

    def connection_lost(self, error: Exception | None) -> None:
        if self.sessions is not None and self.admitted:
            self.sessions.leave()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if not self.admitted:
            # over [limits] max_sessions: 421 instead of the greeting (RFC 5321 §3.1), then close
            assert self.sessions is not None
            self.sessions.refused()
            await self.push(answers.TOO_MANY_SESSIONS)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    async def push(self, status: Any) -> None:
        # aiosmtpd refuses `MAIL FROM ... SIZE=` over the limit itself, in its own
        # words: logged, and answered as the README documents (552 5.3.4).
        if isinstance(status, str) and status.startswith(AIOSMTPD_SIZE_REFUSAL):
            log.warning("smtp.too_big", stage="MAIL", limit=self.data_size_limit, mailbox=None)
            status = answers.TOO_BIG.format(limit=self.data_size_limit)
        await super().push(status)

    async def smtp_DATA(self, arg: str) -> None:
        if self._decode_data:
            return await super().smtp_DATA(arg)
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        spool = Spool(self.spool_dir, self.spool_memory)
        try:
            state = await self._read_data(spool)
            if state is not _State.NOMINAL:
                if state is _State.TOO_MUCH:
                    log.warning("smtp.too_big", stage="DATA", limit=self.data_size_limit,
                                mailbox=str(self.envelope.rcpt_tos[0])[:200])
                await self.push({_State.TOO_LONG: "500 Line too long (see RFC5321 4.5.3.1.6)",
                                 _State.TOO_MUCH: answers.TOO_BIG.format(limit=self.data_size_limit),
                                 _State.NOT_SPOOLED: answers.TRY_LATER}[state])
                self._set_post_data_state()
                return
            if spool.file is None:
                self.envelope.content = self.envelope.original_content = bytes(spool.buf)
                spool.close()
            else:
                self.envelope.spool = spool  # type: ignore[attr-defined]
            status = await self._call_handler_hook("DATA")
        finally:
            spool.close()
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self, spool: Spool) -> _State:
        state = _State.NOMINAL
        size = 0
        limit = self.data_size_limit
        partial = False          # the last read ended inside an over-long line
        while self.transport is not None:
            try:
                line: bytes = await self._reader.readuntil(b"\r\n")
            except asyncio.CancelledError:      # the connection got reset
                self._writer.close()
                raise
            except asyncio.LimitOverrunError as e:
                if state is _State.NOMINAL:
                    state = _State.TOO_LONG
                    spool.close()
                line = await self._reader.read(e.consumed)
            if not partial and line == b".\r\n":
                break
            size += len(line)
            partial = not line.endswith(b"\r\n")
            if state is not _State.NOMINAL:
                continue
            if limit and size > limit:
                state = _State.TOO_MUCH
            elif len(line) > self.line_length_limit:
                state = _State.TOO_LONG
            else:
                spool.buf += line[1:] if line.startswith(b".") else line
                if len(spool.buf) > spool.flush_at:
                    try:
                        await spool.flush()
                    except OSError as e:
                        log.error("smtp.error", error=f"DATA spool: {type(e).__name__}: {e}")
                        state = _State.NOT_SPOOLED
            if state is not _State.NOMINAL:
                spool.close()
        return state


# aiosmtpd sizes its StreamReader from the *class* attribute in __init__, so the
# limit must be set on a subclass: set on the instance afterwards, every line over
# 1001 bytes still got "500 Line too long" (found by tests/test_fuzz.py).
class _SMTP(_SpooledDATA, SMTP):
    line_length_limit = LINE_LENGTH_LIMIT


class _LMTP(_SpooledDATA, LMTP):
    line_length_limit = LINE_LENGTH_LIMIT


class SessionCount:
    """Concurrent sessions of one listener, against `[limits] max_sessions`.

    Each session may hold up to `session_memory` bytes of DATA in memory and
    a line of up to LINE_LENGTH_LIMIT in its reader: the cap is what bounds
    the memory many open sessions can take (project issue 14: 500 sessions of
    2 MB of DATA each took 1.09 GB). Sessions over it are answered 421 and
    closed; refusals are logged once per LOG_EVERY_S with their count."""

    LOG_EVERY_S = 10.0

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self._refused = 0
        self._logged_at = -1e9

    def enter(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1

    def refused(self) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= self.LOG_EVERY_S:
            log.warning("smtp.sessions_refused", limit=self.limit, refused=self._refused)
            self._logged_at, self._refused = now, 0


class SupportHandler:
    def __init__(self, config: Config, intake: Intake, clock: Clock):
        self.config = config
        self.intake = intake
        self.clock = clock
        self.stopping = False

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.stopping:
            # no new transaction once stopping: 421 and close (RFC 5321 §3.8)
            if server.transport is not None:
                asyncio.get_running_loop().call_soon(server.transport.close)
            return answers.SHUTTING_DOWN
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if self.config.mailbox_for(address) is None:
            return self._rcpt_refused(server, address, "no such mailbox",
                                      answers.NO_SUCH_MAILBOX.format(address=address.strip("<>")[:200]))
        limit = self.config.limits.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            return self._rcpt_refused(server, address, "too many recipients",
                                      answers.TOO_MANY_RECIPIENTS.format(limit=limit))
        envelope.rcpt_tos.append(address)
        return answers.RCPT_OK

    def _rcpt_refused(self, server: SMTP, address: str, reason: str, answer: str) -> str:
        """A refused RCPT; past `[limits] max_rcpt_errors` of them the session is
        ended with 421 (Postfix's smtpd_hard_error_limit): a client guessing
        addresses gets a bounded number of answers, and of log lines."""
        errors = getattr(server, "rcpt_errors", 0) + 1
        server.rcpt_errors = errors  # type: ignore[attr-defined]
        limit = self.config.limits.max_rcpt_errors
        if errors > limit:
            log.warning("smtp.session_ended", reason="too many refused recipients", refused=errors - 1,
                        peer=str(server.session.peer if server.session else "")[:100])
            if server.transport is not None:
                asyncio.get_running_loop().call_soon(server.transport.close)
            return answers.TOO_MANY_ERRORS
        log.info("smtp.rcpt_refused", recipient=address[:200], reason=reason)
        return answer

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        mailbox = next(m for m in map(self.config.mailbox_for, envelope.rcpt_tos) if m)
        spool: Spool | None = getattr(envelope, "spool", None)    # a large DATA, on disk
        size = spool.size if spool is not None else len(envelope.original_content or b"")
        # a large mail is read into memory only in its turn, and holds the turn to its commit
        async with self.intake.large_mail_slot(size):
            raw = await spool.read() if spool is not None else envelope.original_content or b""
            received = Received(raw=bytes(raw), mail_from=envelope.mail_from or "",
                                rcpt_to=tuple(envelope.rcpt_tos), mailbox=mailbox,
                                received_at=self.clock())
            del raw
            try:
                outcome = await self.intake.receive(received, holding_slot=True, refuse_over_limits=True)
                status = answers.accepted(outcome.ticket_id, outcome.action)
            except OverLimit as e:
                log.warning("smtp.refused", mailbox=mailbox.address, reason=str(e),
                            mail_from=(received.mail_from or "")[:200])
                status = answers.CONTENT_REFUSED.format(reason=e)
            except StoreUnavailable as e:
                log.warning("mail.deferred", mailbox=mailbox.address, error=str(e))
                status = answers.TRY_LATER
        if isinstance(server, LMTP):
            # LMTP answers once per recipient after DATA (RFC 2033 §4.2)
            return "\r\n".join([status] * len(envelope.rcpt_tos))
        return status

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp.error", error=f"{type(error).__name__}: {error}")
        return answers.TRY_LATER


class Listener:
    """Serves the handler on the configured address in the running loop."""

    def __init__(self, config: Config, handler: SupportHandler, reuse_port: bool = False):
        self.config = config
        self.handler = handler
        self.reuse_port = reuse_port
        self.server: asyncio.Server | None = None
        self.sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self.count = SessionCount(config.limits.max_sessions)

    def _factory(self) -> Callable[[], SMTP]:
        cls = _LMTP if self.config.lmtp else _SMTP
        kwargs: dict[str, Any] = {"data_size_limit": self.config.max_message_size,
                                  "enable_SMTPUTF8": True, "decode_data": False,
                                  "ident": "support-gateway", "timeout": 300}

        def make() -> SMTP:
            proto = cls(self.handler, **kwargs)
            proto.spool_dir = self.config.data_dir
            proto.spool_memory = self.config.limits.session_memory
            proto.sessions = self.count
            self.sessions.add(proto)
            return proto
        return make

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        install_loop_errors(loop)
        self.server = await loop.create_server(
            self._factory(), host=self.config.smtp_host, port=self.config.smtp_port,
            reuse_address=True, reuse_port=self.reuse_port or None)

    @property
    def bound(self) -> tuple[str, int]:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[:2]

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting; let transactions in flight finish; close the rest."""
        if self.server is None:
            return
        self.server.close()
        self.handler.stopping = True
        deadline = asyncio.get_running_loop().time() + grace_s
        while True:
            # Idle sessions are told 421 at once, not left to start another mail;
            # those inside a transaction finish it (and get 421 after).
            busy = False
            for s in list(self.sessions):
                if _in_data(s):
                    busy = True
                elif s.transport is not None and not s.transport.is_closing():
                    cast(asyncio.Transport, s.transport).write((answers.SHUTTING_DOWN + "\r\n").encode())
                    s.transport.close()
            if not busy or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        for s in list(self.sessions):
            if s.transport is not None and not s.transport.is_closing():
                cast(asyncio.Transport, s.transport).write((answers.SHUTTING_DOWN + "\r\n").encode())
                s.transport.close()
        await self.server.wait_closed()


class _LoopErrors:
    """The event loop's error reports as JSON log lines, each kind at most once
    per LOG_EVERY_S (with how many were left out), never a traceback on stderr;
    and accept() failing for want of resources (EMFILE: no file descriptor
    left) retried after a back-off that doubles up to ACCEPT_BACKOFF_MAX_S,
    not every second (project issue 14: 377 MB of tracebacks in 2 minutes)."""

    LOG_EVERY_S = 10.0
    ACCEPT_BACKOFF_MAX_S = 30.0
    RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}    # kind -> (logged at, left out since)
        self.accept_failures = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        message = str(context.get("message", "event loop error"))
        out_of_resources = isinstance(error, OSError) and error.errno in self.RESOURCES \
            and "accept" in message
        if out_of_resources:
            self.accept_failures += 1
            # asyncio reads its retry delay from this constant each time (selector_events)
            asyncio.constants.ACCEPT_RETRY_DELAY = min(2.0 ** (self.accept_failures - 1),  # type: ignore[misc,assignment]
                                                       self.ACCEPT_BACKOFF_MAX_S)
        kind = f"{message[:80]}:{type(error).__name__}"
        now = time.monotonic()
        logged_at, left_out = self._last.get(kind, (-1e9, 0))
        if now - logged_at < self.LOG_EVERY_S:
            self._last[kind] = (logged_at, left_out + 1)
            return
        self._last[kind] = (now, 0)
        fields: dict[str, Any] = {"message": message[:500], "left_out": left_out,
                                  "error": f"{type(error).__name__}: {error}"[:500] if error else None}
        if out_of_resources:
            fields["retry_in_s"] = asyncio.constants.ACCEPT_RETRY_DELAY
            log.error("smtp.accept_failed", **fields)
        else:
            log.error("loop.error", **fields)

    def accepted(self) -> None:
        if self.accept_failures:
            self.accept_failures = 0
            asyncio.constants.ACCEPT_RETRY_DELAY = 1.0  # type: ignore[misc,assignment]


_loop_errors = _LoopErrors()


def install_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    loop.set_exception_handler(_loop_errors)


def _in_data(session: SMTP) -> bool:
    """Whether a DATA transfer or its handler is running on this session."""
    env = getattr(session, "envelope", None)
    return bool(session.transport is not None and env is not None and env.rcpt_tos)
