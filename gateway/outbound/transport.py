"""Where outbound mail goes: an SMTP relay, or Maildir files in data_dir.

Both take an envelope and the finished bytes, and raise `DeliveryError`
saying whether trying again later could help.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiosmtplib

# `[outbound] tls`: how the connection to the relay is encrypted.
#   opportunistic  STARTTLS when the relay offers it (RFC 3207), else clear text;
#                  required as soon as a username is set (a password never goes in clear)
#   required       STARTTLS or no delivery (submission, port 587)
#   implicit       TLS from the first byte (RFC 8314 §3.3, port 465)
#   none           clear text (a relay on loopback)
# Whenever TLS is used the certificate is verified (chain and host name), against
# `ca_file` when set, else the system's CAs.
TLS_MODES = ("opportunistic", "required", "implicit", "none")


@dataclass(frozen=True)
class Relay:
    """An SMTP relay the gateway hands its mail to (`[outbound]`, `[outbound.govcloud]`)."""

    host: str
    port: int
    tls: str = "opportunistic"
    ca_file: Path | None = None
    username: str | None = None                            # SMTP AUTH (RFC 4954) when set
    password: str | None = field(default=None, repr=False)  # never in a log line or a traceback
    password_file: Path | None = None
    password_env: str | None = None

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def secret(self) -> str | None:
        """The AUTH password, read when a connection is opened (a rotated file is picked up)."""
        return read_secret(self.password, self.password_file, self.password_env)


def read_secret(password: str | None, password_file: Path | None, password_env: str | None) -> str | None:
    """A password given in the config, in a file (first line, line end dropped) or in an
    environment variable; None when none is set. OSError/KeyError when it is gone."""
    if password is not None:
        return password
    if password_file is not None:
        return (password_file.read_text(encoding="utf-8").splitlines() or [""])[0]
    if password_env is not None:
        return os.environ[password_env]
    return None


def client_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context that verifies the peer's chain and host name: against `ca_file`
    when given (a private CA), else the system's trust store."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def tls_problem(e: BaseException, ca_file: Path | None) -> str | None:
    """What went wrong in the TLS handshake behind `e` (also when a library wrapped
    it), in words that name the fix; None when `e` is no TLS failure."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        trust = f"the CAs in {ca_file}" if ca_file else "the system's CAs"
        return (f"TLS certificate not trusted ({cause.verify_message}; checked against {trust}): "
                f"set ca_file to the CA that signed the server's certificate")
    if isinstance(cause, ssl.SSLError):
        return f"TLS failed: {cause.reason or cause}"
    return None


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


# 5yz answers about the gateway's own setup, not about the mail: "530 5.7.0 Must
# issue a STARTTLS command first" (RFC 3207 §4), "530 5.7.0 Authentication
# required", "534 5.7.9 mechanism too weak", "535 5.7.8 credentials invalid",
# "538 5.7.11 encryption required" (RFC 4954 §6). Each mail waits until it is fixed.
RELAY_SETUP_CODES = frozenset({530, 534, 535, 538})


def is_permanent(code: int) -> bool:
    """RFC 5321 §4.2.1: 5yz is permanent; 552 is treated as temporary, as
    RFC 5321 §4.5.3.1.10 allows for "too much mail data" on a full mailbox,
    and so are the answers of RELAY_SETUP_CODES."""
    return code >= 500 and code != 552 and code not in RELAY_SETUP_CODES


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
        self._tls: dict[str, Any] = {"use_tls": False, "start_tls": False}
        if relay.tls != "none":
            start_tls: bool | None = None                  # aiosmtplib: STARTTLS if offered
            if relay.tls == "implicit":
                start_tls = False
            elif relay.tls == "required" or relay.username is not None:
                start_tls = True
            self._tls = {"tls_context": client_tls_context(relay.ca_file),
                         "use_tls": relay.tls == "implicit", "start_tls": start_tls}

    async def _connect(self) -> aiosmtplib.SMTP:
        try:
            password = self.relay.secret()
        except (OSError, KeyError, UnicodeDecodeError) as e:
            raise DeliveryError(f"relay {self.relay.name}: cannot read the AUTH password "
                                f"({type(e).__name__}: {e})", permanent=False) from None
        client = aiosmtplib.SMTP(hostname=self.relay.host, port=self.relay.port, timeout=self.timeout,
                                 username=self.relay.username, password=password, **self._tls)
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
            except DeliveryError:
                await _drop(client)
                raise
            except aiosmtplib.SMTPAuthenticationError as e:
                # 535 is a 5xx, but it says nothing about the mail: the login is
                # wrong, so every mail waits in the outbox until it is put right
                await _drop(client)
                raise DeliveryError(f"relay {self.relay.name} refused the login of "
                                    f"{self.relay.username!r}: {e.code} {e.message}",
                                    permanent=False) from e
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
                raise DeliveryError(self._unreachable(e), permanent=False) from e
            self._idle.append(client)
        # Some recipients took it: that counts as sent; the refused ones are reported.
        return {r: f"{c} {m}" for r, (c, m) in refused.items()}

    def _unreachable(self, e: BaseException) -> str:
        where = f"relay {self.relay.name}"
        if (tls := tls_problem(e, self.relay.ca_file)) is not None:
            return f"{where}: {tls}"
        if isinstance(e, aiosmtplib.SMTPException) and "STARTTLS" in str(e):
            return f"{where}: {e} (tls = {self.relay.tls!r} needs it)"
        return f"{where} unreachable: {type(e).__name__}: {e}"

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
