"""Unguessable per-ticket tokens in the gateway's own Message-IDs.

Every mail the gateway sends has a Message-ID of the form
`<{random}.{ticket}.{token}@{mailbox domain}>`, where `token` is an HMAC of
the ticket ID under a secret kept in `data_dir`. A reply that quotes such an
ID (In-Reply-To/References) proves its sender saw our mail about that
ticket, so it is accepted from any address; a bare `[Support #1042]` in a
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

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from gateway.model import normalize_address

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


def load_secret(data_dir: Path) -> bytes:
    """The installation's secret, made (0600) on first start."""
    path = data_dir / "secret.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex())
            f.flush()
            os.fsync(f.fileno())
        return key
    except FileExistsError:  # pragma: no cover - another process made it meanwhile
        return load_secret(data_dir)


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

    def answers_staff_mail(self, ticket_id: int, ids: Iterable[str], addresses: Iterable[str]) -> bool:
        """Whether a mail answers our mail to staff about `ticket_id` (whoever it was
        sent to): a staff Message-ID of ours with a genuine ticket token in `ids`,
        or a staff reply address of the ticket among `addresses`. Not a proof of
        anyone (`staff_proof` is): it says the mail meant to reach the desk."""
        for mid in ids:
            m = _OUR_ID.match(mid)
            if m and m.group(3) and self.ticket_of(mid) == ticket_id:
                return True
        for address in addresses:
            m = _STAFF_TAG.match(normalize_address(address))
            if m and int(m.group(1)) == ticket_id:
                return True
        return False

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
