"""Outbound mail: headers per the contract, escaping, no header injection."""
from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

from gateway.model import Kind, Status, Ticket
from gateway.outbound.compose import Composer, clean_subject
from gateway.outbound.tokens import TicketTokens

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def ticket(subject: str = "Backup fails", govcloud: bool = False) -> Ticket:
    return Ticket(id=1042, subject=subject, status=Status.OPEN, requester="ann@c.example", cc=(),
                  region="EMEA", govcloud=govcloud, priority=3, mailbox="support@example.com",
                  linked_ticket=None, created_at=NOW)


def compose(kind: Kind = Kind.ACK, **kw: object):  # type: ignore[no-untyped-def]
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32))
    t = kw.pop("ticket", ticket())
    ctx = kw.pop("context", {"name": "Ann"})
    out = c.compose(kind, ticket=t, mailbox="support@example.com", to=["ann@c.example"],
                    answers=["<a@c.example>", "<b@c.example>"], now=NOW, context=ctx, **kw)  # type: ignore[arg-type]
    return out, email.message_from_bytes(out.content, policy=email.policy.default)


def test_ack_headers() -> None:
    out, msg = compose()
    assert msg["Subject"] == "[Support #1042] Backup fails"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Auto-Response-Suppress"] == "All" and msg["Precedence"] == "bulk"
    assert msg["In-Reply-To"] == "<b@c.example>"
    assert msg["References"] == "<a@c.example> <b@c.example>"
    assert msg["Message-ID"] == out.message_id and out.message_id.endswith("@example.com>")
    assert msg["From"].addresses[0].addr_spec == "support@example.com"
    assert out.rcpt_to == ("ann@c.example",) and out.relay == "default"
    assert b"\r\n" in out.content


def test_notify_is_auto_generated_and_govcloud_uses_its_relay() -> None:
    out, msg = compose(Kind.STAFF_NOTIFY, ticket=ticket(govcloud=True), reply_to="support@example.com",
                       context={"is_new": True, "sender": "ann@c.example", "reply_text": "hi",
                                "body_text": "hi", "attachments": []})
    assert msg["Auto-Submitted"] == "auto-generated" and msg["Reply-To"] == "support@example.com"
    assert out.relay == "govcloud"


def test_hostile_subject_and_name_cannot_add_headers_and_html_is_escaped() -> None:
    evil = "x\r\nBcc: victim@example.com <script>alert(1)</script>"
    out, msg = compose(ticket=ticket(subject=evil), context={"name": "<img src=x onerror=alert(1)>"})
    assert msg["Bcc"] is None and list(msg.keys()).count("To") == 1
    assert out.rcpt_to == ("ann@c.example",)
    html = msg.get_body(("html",)).get_content()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x" in html


def test_subject_cleanup_keeps_one_tag() -> None:
    assert clean_subject("Re: AW: [Support #1042] Backup fails", "Support") == "Backup fails"
    _, msg = compose(ticket=ticket(subject="RE: [Support #1042] Backup fails"))
    assert msg["Subject"] == "[Support #1042] Backup fails"


def test_long_message_ids_are_never_encoded_or_folded_inside() -> None:
    long_id = "<" + "x" * 120 + "@outlook.example>"
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32))
    thread = [f"<{i}-{'y' * 60}@c.example>" for i in range(40)] + [long_id]
    out = c.compose(Kind.ACK, ticket=ticket(), mailbox="support@example.com", to=["ann@c.example"],
                    answers=thread, now=NOW, context={"name": "Ann"})
    msg = email.message_from_bytes(out.content, policy=email.policy.default)
    assert msg["In-Reply-To"] == long_id
    refs = str(msg["References"]).split()
    assert refs[0] == thread[0] and refs[-1] == long_id and len(" ".join(refs)) <= 900
    assert b"=?utf-8?" not in out.content.split(b"\r\n\r\n")[0]


def test_non_ascii_subject_and_agent_name_are_encoded_and_decode_back() -> None:
    from gateway.model import Attachment
    out, msg = compose(Kind.STAFF_REPLY, ticket=ticket(subject="Sicherung schlägt fehl – Störung"),
                       context={"text": "Grüße, das ist behoben.", "agent": "Jörg"},
                       from_name="Jörg Müller",
                       attachments=[(Attachment("anleitung ä.pdf", "application/pdf", 3, "0" * 64), b"%PD")])
    assert out.content.isascii()
    assert msg["Subject"] == "[Support #1042] Sicherung schlägt fehl – Störung"
    assert msg["From"].addresses[0].display_name == "Jörg Müller"
    assert msg["Auto-Submitted"] is None and msg.get_content_type() == "multipart/mixed"
    assert "das ist behoben" in msg.get_body(("plain",)).get_content()
    (att,) = list(msg.iter_attachments())
    assert att.get_filename() == "anleitung ä.pdf" and att.get_content() == b"%PD"


def test_language_picks_templates_and_sets_content_language() -> None:
    _, msg = compose(language="de")
    assert msg["Content-Language"] == "de"
    assert "Guten Tag Ann" in msg.get_body(("plain",)).get_content()
    _, msg = compose()
    assert msg["Content-Language"] == "en" and "Hello Ann" in msg.get_body(("plain",)).get_content()


def test_staff_mail_stays_english_whatever_the_ticket_language() -> None:
    _, msg = compose(Kind.STAFF_NOTIFY, language="ja",
                     context={"is_new": False, "sender": "ann@c.example", "reply_text": "hi",
                              "body_text": "hi", "attachments": []})
    assert msg["Content-Language"] == "en"
    assert "Customer reply on ticket #1042" in msg.get_body(("plain",)).get_content()
