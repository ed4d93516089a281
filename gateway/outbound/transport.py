"""Where outbound mail goes: an SMTP relay, or Maildir files in data_dir.

Both take an envelope and the finished bytes, and raise `DeliveryError`
saying whether trying again later could help.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib


@dataclass(frozen=True)
class Relay:
    """An SMTP relay the gateway hands its mail to (`[outbound]`, `[outbound.govcloud]`)."""

    host: str
    port: int


class DeliveryError(Exception):
    def __init__(self, message: str, *, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


def classify(error: BaseException) -> DeliveryError:
    """Any error of one delivery, as that delivery's result: a `DeliveryError`
    as raised; an envelope or content the relay library refuses to send (an
    address with a space, a bad character: `ValueError`, `UnicodeError`) is
    permanent, as trying again sends the same bytes; anything else temporary."""
    if isinstance(error, DeliveryError):
        return error
    permanent = isinstance(error, ValueError | UnicodeError)
    return DeliveryError(f"cannot send: {type(error).__name__}: {error}", permanent=permanent)


class Transport(Protocol):
    async def send(self, mail_from: str, rcpt_to: Sequence[str], content: bytes) -> dict[str, str]:
        """Deliver; return the recipients refused while others took it."""

    async def close(self) -> None:
        """Let go of kept connections."""


def is_permanent(code: int) -> bool:
    """RFC 5321 §4.2.1: 5yz is permanent; 552 is treated as temporary, as
    RFC 5321 §4.5.3.1.10 allows for "too much mail data" on a full mailbox."""
    return code >= 500 and code != 552


class SmtpRelay:
    """Delivers over a few kept-open connections to one relay.

    Opening a connection per mail cost more than the mail itself (connect,
    EHLO, QUIT: measured as the largest part of the sender's time), so up to
    `pool` connections stay open between mails. A connection that fails in
    any way is dropped, never reused.
    """

    def __init__(self, relay: Relay, timeout: float = 30.0, pool: int = 4):
        self.relay = relay
        self.timeout = timeout
        self._slots = asyncio.Semaphore(pool)
        self._idle: list[aiosmtplib.SMTP] = []

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(hostname=self.relay.host, port=self.relay.port,
                                 timeout=self.timeout, start_tls=False, use_tls=False)
        await client.connect()
        return client

    async def send(self, mail_from: str, rcpt_to: Sequence[str], content: bytes) -> dict[str, str]:
        # An address that cannot go on an SMTP command line (`a b@x.example`, a
        # control character) is refused here as a relay would refuse it at RCPT,
        # and the mail goes to the others: one such Cc must not keep the whole
        # mail, or its round, from being sent (project issue 14).
        unsendable = {r: f"553 5.1.3 cannot be sent over SMTP: {e}"
                      for r in rcpt_to if (e := _unsendable(r)) is not None}
        if unsendable:
            rcpt_to = [r for r in rcpt_to if r not in unsendable]
            if not rcpt_to:
                raise DeliveryError(f"no recipient can be sent to: {'; '.join(unsendable.values())}",
                                    permanent=True)
        if (e := _unsendable(mail_from)) is not None and mail_from:
            raise DeliveryError(f"envelope sender cannot be sent over SMTP: {e}", permanent=True)
        return {**unsendable, **await self._send(mail_from, rcpt_to, content)}

    async def _send(self, mail_from: str, rcpt_to: Sequence[str], content: bytes) -> dict[str, str]:
        async with self._slots:
            client = self._idle.pop() if self._idle else None
            try:
                if client is None or not client.is_connected:
                    client = await self._connect()
                try:
                    refused, _ = await client.sendmail(mail_from, list(rcpt_to), content)
                except aiosmtplib.SMTPServerDisconnected:
                    # a kept connection the relay closed meanwhile: once more on a new one
                    client = await self._connect()
                    refused, _ = await client.sendmail(mail_from, list(rcpt_to), content)
            except aiosmtplib.SMTPRecipientsRefused as e:
                await _drop(client)
                codes = [r.code for r in e.recipients]
                raise DeliveryError(f"all recipients refused: {'; '.join(map(str, e.recipients))}",
                                    permanent=all(is_permanent(c) for c in codes)) from e
            except aiosmtplib.SMTPResponseException as e:
                await _drop(client)
                raise DeliveryError(f"relay said {e.code} {e.message}",
                                    permanent=is_permanent(e.code)) from e
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as e:
                await _drop(client)
                raise DeliveryError(f"relay {self.relay.host}:{self.relay.port} unreachable: "
                                    f"{type(e).__name__}: {e}", permanent=False) from e
            self._idle.append(client)
        # Some recipients took it: that counts as sent; the refused ones are reported.
        return {r: f"{c} {m}" for r, (c, m) in refused.items()}

    async def close(self) -> None:
        while self._idle:
            client = self._idle.pop()
            try:
                await client.quit()
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                client.close()


def _unsendable(address: str) -> str | None:
    """Why aiosmtplib would refuse `address` on MAIL or RCPT, or None."""
    try:
        aiosmtplib.email.quote_address(address)
    except ValueError as e:
        return str(e)
    return None


async def _drop(client: aiosmtplib.SMTP | None) -> None:
    if client is not None:
        client.close()


class MaildirDrop:
    """Writes each mail into a Maildir (`new/`), for a gateway with no relay.

    The envelope is kept in `X-Envelope-From:` / `X-Envelope-To:` lines
    put in front of the message, so a reader sees who would have got it.
    """

    def __init__(self, path: Path):
        self.path = path

    async def send(self, mail_from: str, rcpt_to: Sequence[str], content: bytes) -> dict[str, str]:
        envelope = f"X-Envelope-From: <{mail_from}>\r\nX-Envelope-To: {', '.join(rcpt_to)}\r\n".encode()
        try:
            await asyncio.to_thread(self._write, envelope + content)
        except OSError as e:
            raise DeliveryError(f"cannot write to {self.path}: {e}", permanent=False) from e
        return {}

    async def close(self) -> None:
        return None

    def _write(self, content: bytes) -> None:
        # The Maildir protocol (write in tmp/, rename into new/), with the fsyncs
        # that the stdlib `mailbox` module leaves out: the outbox marks a mail
        # sent right after this returns.
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}.{os.getpid()}_{secrets.token_hex(6)}.{socket.gethostname()}"
        tmp = self.path / "tmp" / name
        with open(tmp, "wb") as f:
            f.write(content.replace(b"\r\n", b"\n"))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path / "new" / name)
        fd = os.open(self.path / "new", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
