"""Unguessable per-ticket tokens in the gateway's own Message-IDs.

Every mail the gateway sends has a Message-ID of the form
`<{random}.{ticket}.{token}@{mailbox domain}>`, where `token` is an HMAC of
the ticket ID under a secret kept in its key file or `$GATEWAY_TOKEN_SECRET`
(never in the database: see `load_secret`). A reply that quotes such an
ID (In-Reply-To/References) proves its sender saw our mail about that
ticket (from someone not on the ticket it is taken as automatic: see
`gateway.desk.pipeline`); a bare `[Support #1042]` in a
subject proves nothing, and is only trusted from the ticket's participants
(see `gateway.desk.conversation`).

Mail to staff carries a second token, bound to the ticket AND the address it
was sent to (an agent, or a staff queue): in its Message-ID
(`<{random}.{ticket}.{token}.s{staff token}@{domain}>`) and in its reply
address (`support+s{ticket}.{staff token}@example.com`). A staff answer
proves its author only by quoting one of them (`staff_proof`): a forged
`From:` costs nothing, a token can only be had from our mail to staff.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

import structlog

from gateway.model import normalize_address
from gateway.store import SECRET_CHECK, Store, StoreUnavailable

log = structlog.get_logger("gateway.tokens")

_OUR_ID = re.compile(r"^<[0-9a-f]{16}\.(\d{1,18})\.([0-9a-f]{20})(?:\.s([0-9a-f]{20}))?@[^<>@\s]+>$")
_OUR_ID_IN_TEXT = re.compile(rb"<[0-9a-f]{16}\.\d{1,18}\.[0-9a-f]{20}(?:\.s[0-9a-f]{20})?@[^<>@\s]{1,255}>")
# the `+tag` of a staff reply address: support+s1042.0123456789abcdef0123@example.com
_STAFF_TAG = re.compile(r"^[^@+]+\+s(\d{1,18})\.([0-9a-f]{20})@[^<>@\s]+$")
# a staff token as it appears in text: a reply address's +tag or a Message-ID's .s part
_STAFF_TOKEN_IN_TEXT = re.compile(r"\+s\d{1,18}\.[0-9a-f]{20}(?=@)|\.s[0-9a-f]{20}(?=@)", re.IGNORECASE)


def without_staff_tokens(text: str) -> str:
    """`text` with every staff token taken out (`support+s1.<token>@x` reads
    `support@x`): what an agent's mail quotes of a notification (an Outlook
    header block, an attribution line) must not hand the token to a customer."""
    return _STAFF_TOKEN_IN_TEXT.sub("", text)


SECRET_ENV = "GATEWAY_TOKEN_SECRET"
SECRET_FILE = "secret.key"
_HEX_SECRET = re.compile(r"[0-9a-fA-F]{64,256}")


class SecretError(Exception):
    """The token secret cannot be used (unreadable, malformed, or not the one in use)."""


def load_secret(path: Path, env_value: str | None = None) -> bytes:
    """The installation's secret: `$GATEWAY_TOKEN_SECRET` when set, else the
    key file at `path` (`[gateway] token_secret_file`, default
    `data_dir/secret.key`), made 0600 on first start.

    It is never stored in the database (project issue 14: a copy of the
    database must not let anyone forge a reply to a ticket). Several
    instances share it by reading the same file or the same variable.
    """
    if env_value is not None and env_value.strip():
        return _parse_secret(env_value, SECRET_ENV)
    try:
        return _parse_secret(path.read_text(), str(path))
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        try:
            _write_new(path, key.hex())
        except FileExistsError:  # pragma: no cover - another process made it meanwhile
            return load_secret(path)
        return key


def save_secret(path: Path, value: str) -> None:
    """Make the key file hold `value` (0600), replacing it atomically and durably."""
    _parse_secret(value, "the database's copy")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    _write_new(tmp, value.strip())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def open_store(url: str, busy_timeout_ms: int, secret_path: Path) -> Store:
    """The store, migrated; a token secret an earlier version kept in it is
    moved to the key file first (every command opens the store so)."""
    return await Store.open(url, busy_timeout_ms,
                            legacy_secret=lambda value, check: _keep_legacy(secret_path, value, check))


async def shared_secret(store: Store, path: Path) -> bytes:
    """This instance's token secret, checked against the one the others on the
    same database use: the first instance stores its fingerprint (nothing an
    attacker with a copy of the database can forge a token from), and an
    instance whose secret differs refuses to start rather than sign mail that
    the others would not recognise."""
    try:
        secret = load_secret(path, os.environ.get(SECRET_ENV))
    except OSError as e:
        raise StoreUnavailable(f"token secret {path}: {e}") from e
    except SecretError as e:
        raise StoreUnavailable(str(e)) from e
    check = await store.shared_setting(SECRET_CHECK, fingerprint(secret))
    if check != fingerprint(secret):
        raise StoreUnavailable(
            f"this instance's ticket-token secret ({_source(path)}) is not the one the other instances "
            f"on this database use: give every instance the same key file ([gateway] token_secret_file) "
            f"or the same {SECRET_ENV}")
    return secret


def _keep_legacy(path: Path, value: str, check: str | None) -> None:
    """Before the copy earlier versions kept in the database is removed: make
    sure the key file holds it, so that the tokens already sent stay valid."""
    try:
        legacy = bytes.fromhex(value.strip())
    except ValueError:
        log.warning("secret.legacy_unreadable")      # nothing could have been signed with it
        return
    env = os.environ.get(SECRET_ENV, "").strip()
    current = None
    with contextlib.suppress(OSError, SecretError):
        current = load_secret(path, env) if env or path.exists() else None
    if current == legacy:
        log.info("secret.moved", to=_source(path), action="copy removed from the database")
        return
    if check is not None and current is not None and fingerprint(current) == check:
        # a stray copy an older instance wrote after the move: not the secret in use
        log.warning("secret.stray_copy_removed", kept=_source(path))
        return
    try:
        save_secret(path, value)
    except (OSError, SecretError) as e:
        raise StoreUnavailable(f"cannot move the ticket-token secret from the database to {path}: {e}") from e
    if env:
        raise StoreUnavailable(
            f"{SECRET_ENV} is not the ticket-token secret stored in the database, which signed the mail "
            f"already sent; that secret is now in {path}: set {SECRET_ENV} to its content (or unset it) "
            f"and start again")
    log.warning("secret.moved", to=str(path), action="key file written from the database's copy")


def _source(path: Path) -> str:
    return SECRET_ENV if os.environ.get(SECRET_ENV, "").strip() else str(path)


def fingerprint(secret: bytes) -> str:
    """A value that tells whether two instances hold the same secret, and
    nothing about it (an HMAC under the secret of a fixed label)."""
    return hmac.new(secret, b"gateway token secret check", hashlib.sha256).hexdigest()[:32]


def _parse_secret(text: str, where: str) -> bytes:
    value = text.strip()
    if not _HEX_SECRET.fullmatch(value) or len(value) % 2:
        raise SecretError(f"{where}: the token secret must be 64 to 256 hex digits")
    return bytes.fromhex(value)


def _write_new(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class TicketTokens:
    def __init__(self, secret: bytes):
        self._secret = secret

    def token(self, ticket_id: int) -> str:
        return hmac.new(self._secret, f"ticket:{ticket_id}".encode(), hashlib.sha256).hexdigest()[:20]

    def staff_token(self, ticket_id: int, address: str) -> str:
        """The token of our mail about `ticket_id` to the staff address `address`."""
        return hmac.new(self._secret, f"staff:{ticket_id}:{normalize_address(address)}".encode(),
                        hashlib.sha256).hexdigest()[:20]

    def message_id(self, ticket_id: int, domain: str, staff: str | None = None) -> str:
        """A fresh Message-ID of ours; `staff`: the staff address the mail goes to."""
        extra = f".s{self.staff_token(ticket_id, staff)}" if staff else ""
        return f"<{secrets.token_hex(8)}.{ticket_id}.{self.token(ticket_id)}{extra}@{domain}>"

    def staff_reply_address(self, ticket_id: int, mailbox: str, staff: str) -> str:
        """The address staff answer to: the mailbox with the staff token as its `+tag`."""
        local, _, domain = mailbox.partition("@")
        return f"{local.partition('+')[0]}+s{ticket_id}.{self.staff_token(ticket_id, staff)}@{domain}"

    def staff_proof(self, ticket_id: int, ids: Iterable[str], addresses: Iterable[str],
                    staff: Iterable[str]) -> bool:
        """Whether Message-IDs `ids` (In-Reply-To/References) or reply addresses
        `addresses` (To, Cc, envelope recipients) carry a staff token of ours for
        `ticket_id` bound to one of the `staff` addresses."""
        quoted: set[str] = set()
        for mid in ids:
            m = _OUR_ID.match(mid)
            if m and m.group(3) and int(m.group(1)) == ticket_id:
                quoted.add(m.group(3))
        for address in addresses:
            m = _STAFF_TAG.match(normalize_address(address))
            if m and int(m.group(1)) == ticket_id:
                quoted.add(m.group(2))
        if not quoted:
            return False
        expected = [self.staff_token(ticket_id, a) for a in staff]
        return any(hmac.compare_digest(q, e) for q in quoted for e in expected)

    def ids_in(self, raw: bytes) -> tuple[str, ...]:
        """Our Message-IDs quoted anywhere in a mail (a bounce quotes them in its body)."""
        found = dict.fromkeys(m.decode("ascii") for m in _OUR_ID_IN_TEXT.findall(raw[:2_000_000]))
        return tuple(found)

    def ticket_of(self, message_id: str) -> int | None:
        """The ticket a Message-ID of ours names, if its token is genuine."""
        m = _OUR_ID.match(message_id)
        if not m:
            return None
        ticket_id = int(m.group(1))
        return ticket_id if hmac.compare_digest(m.group(2), self.token(ticket_id)) else None
