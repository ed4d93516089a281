"""The SMTP / LMTP listener: protocol from aiosmtpd, policy in one handler.

The handler answers RCPT (`550` for an address that is no mailbox) and DATA
(`250` only once `Intake.receive` has committed the mail, `451` when the
store can't take it). aiosmtpd itself answers `552` for mail over
`max_message_size`, both for `MAIL FROM ... SIZE=` and during DATA. Any
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
import weakref
from collections.abc import Callable
from typing import Any

import structlog
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway import replies
from gateway.clock import Clock
from gateway.config import Config
from gateway.inbound.intake import PARSE_IN_THREAD, Intake, structure_problem
from gateway.pipeline import Received
from gateway.store import StoreUnavailable

log = structlog.get_logger("gateway.smtp")

# Header lines longer than RFC 5322's 998 exist in real mail (long References,
# encoded subjects); refusing them with 500 would bounce a customer's mail.
LINE_LENGTH_LIMIT = 1 << 20


# aiosmtpd sizes its StreamReader from the *class* attribute in __init__, so the
# limit must be set on a subclass: set on the instance afterwards, every line over
# 1001 bytes still got "500 Line too long" (found by tests/test_fuzz.py).
class _SMTP(SMTP):
    line_length_limit = LINE_LENGTH_LIMIT


class _LMTP(LMTP):
    line_length_limit = LINE_LENGTH_LIMIT


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
            return replies.SHUTTING_DOWN
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if self.config.mailbox_for(address) is None:
            log.info("smtp.rcpt_refused", recipient=address)
            return replies.NO_SUCH_MAILBOX.format(address=address.strip("<>")[:200])
        limit = self.config.limits.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            log.info("smtp.rcpt_refused", recipient=address, reason="too many recipients")
            return replies.TOO_MANY_RECIPIENTS.format(limit=limit)
        envelope.rcpt_tos.append(address)
        return replies.RCPT_OK

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        mailbox = next(m for m in map(self.config.mailbox_for, envelope.rcpt_tos) if m)
        received = Received(raw=bytes(raw), mail_from=envelope.mail_from or "",
                            rcpt_to=tuple(envelope.rcpt_tos), mailbox=mailbox,
                            received_at=self.clock())
        if len(raw) > PARSE_IN_THREAD:
            problem = await asyncio.to_thread(structure_problem, received.raw, self.config.limits)
        else:
            problem = structure_problem(received.raw, self.config.limits)
        try:
            if problem is not None:
                log.warning("smtp.refused", mailbox=mailbox.address, reason=problem,
                            mail_from=received.mail_from[:200])
                status = replies.CONTENT_REFUSED.format(reason=problem)
            else:
                outcome = await self.intake.receive(received)
                status = replies.accepted(outcome.ticket_id, outcome.action)
        except StoreUnavailable as e:
            log.warning("mail.deferred", mailbox=mailbox.address, error=str(e))
            status = replies.TRY_LATER
        if isinstance(server, LMTP):
            # LMTP answers once per recipient after DATA (RFC 2033 §4.2)
            return "\r\n".join([status] * len(envelope.rcpt_tos))
        return status

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp.error", error=f"{type(error).__name__}: {error}")
        return replies.TRY_LATER


class Listener:
    """Serves the handler on the configured address in the running loop."""

    def __init__(self, config: Config, handler: SupportHandler, reuse_port: bool = False):
        self.config = config
        self.handler = handler
        self.reuse_port = reuse_port
        self.server: asyncio.Server | None = None
        self.sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def _factory(self) -> Callable[[], SMTP]:
        cls = _LMTP if self.config.lmtp else _SMTP
        kwargs: dict[str, Any] = dict(data_size_limit=self.config.max_message_size,
                                      enable_SMTPUTF8=True, decode_data=False,
                                      ident="support-gateway", timeout=300)

        def make() -> SMTP:
            proto = cls(self.handler, **kwargs)
            self.sessions.add(proto)
            return proto
        return make

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
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
                    s.transport.write((replies.SHUTTING_DOWN + "\r\n").encode())
                    s.transport.close()
            if not busy or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        for s in list(self.sessions):
            if s.transport is not None and not s.transport.is_closing():
                s.transport.write((replies.SHUTTING_DOWN + "\r\n").encode())
                s.transport.close()
        await self.server.wait_closed()


def _in_data(session: SMTP) -> bool:
    """Whether a DATA transfer or its handler is running on this session."""
    env = getattr(session, "envelope", None)
    return bool(session.transport is not None and env is not None and env.rcpt_tos)
