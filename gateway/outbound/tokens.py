"""Unguessable per-ticket tokens in the gateway's own Message-IDs.

Every mail the gateway sends has a Message-ID of the form
`<{random}.{ticket}.{token}@{mailbox domain}>`, where `token` is an HMAC of
the ticket ID under a secret kept in `data_dir`. A reply that quotes such an
ID (In-Reply-To/References) proves its sender saw our mail about that
ticket, so it is accepted from any address; a bare `[Support #1042]` in a
subject proves nothing, and is only trusted from the ticket's participants
(see `gateway.desk.conversation`).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

_OUR_ID = re.compile(r"^<[0-9a-f]{16}\.(\d{1,18})\.([0-9a-f]{20})@[^<>@\s]+>$")
_OUR_ID_IN_TEXT = re.compile(rb"<[0-9a-f]{16}\.\d{1,18}\.[0-9a-f]{20}@[^<>@\s]{1,255}>")


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

    def message_id(self, ticket_id: int, domain: str) -> str:
        return f"<{secrets.token_hex(8)}.{ticket_id}.{self.token(ticket_id)}@{domain}>"

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
