"""One function turns raw bytes into a `ParsedMail`: `parse_mail`.

mail-parser does the MIME work (RFC 2047 subjects, charsets, address
headers, dates, attachments); this module only picks what the gateway needs
and makes it safe: header values without line breaks, a Message-ID always
present (derived from the content when the sender gave none, so that a
retried delivery of the same bytes is recognised), HTML-only mail turned
into readable text, attachment content decoded to the exact bytes sent.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from datetime import UTC, datetime

import mailparser
from inscriptis import get_text

from gateway.inbound.reply import reply_text
from gateway.model import Attachment, ParsedMail, normalize_address

_MSGID = re.compile(r"<[^<>\s]+>")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def one_line(value: str, limit: int = 998) -> str:
    """A header value that cannot carry a line break or control character.

    Decoded RFC 2047 words may contain CR/LF; written back into an outbound
    header they would add headers or recipients (header injection).
    """
    return _CONTROL.sub(" ", value).strip()[:limit]


def message_ids(value: str | None) -> tuple[str, ...]:
    """Every `<id>` in a Message-ID / In-Reply-To / References value, in order."""
    return tuple(_MSGID.findall(value or ""))


def parse_mail(raw: bytes) -> ParsedMail:
    p = mailparser.parse_from_bytes(raw)
    headers = {k.lower(): one_line(str(v)) for k, v in p.headers.items()}
    name, sender = _first_address(p.from_)
    own_ids = message_ids(headers.get("message-id"))
    message_id = own_ids[0] if own_ids else f"<{hashlib.sha256(raw).hexdigest()}@no-message-id.invalid>"
    body = "\n".join(p.text_plain).strip("\n")
    if not body.strip() and p.text_html:
        body = get_text("\n".join(p.text_html)).strip("\n")
    return ParsedMail(
        sender=sender,
        sender_name=one_line(name),
        to=_addresses(p.to),
        cc=_addresses(p.cc),
        subject=one_line(p.subject or ""),
        date=_aware(p.date),
        date_offset_minutes=_offset_minutes(p.date, p.timezone),
        message_id=message_id,
        in_reply_to=message_ids(headers.get("in-reply-to")),
        references=message_ids(headers.get("references")),
        body_text=body,
        reply_text=reply_text(body),
        attachments=tuple(_attachment(a) for a in p.attachments),
        headers=headers,
        defects=tuple(str(d) for d in p.defects_categories),
    )


def _first_address(pairs: list[tuple[str, str]] | None) -> tuple[str, str]:
    for name, addr in pairs or ():
        if "@" in addr:
            return name or "", normalize_address(addr)
    return "", ""


def _addresses(pairs: list[tuple[str, str]] | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(normalize_address(a) for _, a in pairs or () if "@" in a))


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    # mail-parser gives the Date in UTC, naive
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _offset_minutes(date: datetime | None, timezone: object) -> int | None:
    if date is None:
        return None
    try:
        return round(float(str(timezone)) * 60)     # mail-parser: hours, as "+5.5"
    except ValueError:
        return None


def _attachment(a: dict[str, object]) -> tuple[Attachment, bytes]:
    payload = a.get("payload") or ""
    if a.get("binary"):
        try:
            content = base64.b64decode(str(payload))
        except (binascii.Error, ValueError):
            content = str(payload).encode("utf-8", "surrogateescape")
    else:
        content = str(payload).encode(str(a.get("charset") or "utf-8"), "replace") \
            if _known_charset(a.get("charset")) else str(payload).encode("utf-8", "surrogateescape")
    ctype = one_line(str(a.get("mail_content_type") or "application/octet-stream"), 200)
    return Attachment(
        # The sender's name is kept for display only; content is stored by hash.
        filename=one_line(str(a.get("filename") or ""), 255) or "attachment",
        content_type=ctype,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        content_id=one_line(str(a.get("content-id") or ""), 255),
    ), content


def _known_charset(charset: object) -> bool:
    if not charset:
        return False
    try:
        "".encode(str(charset))
    except LookupError:
        return False
    return True
