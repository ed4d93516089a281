"""Parsing: what the gateway takes from a raw message."""
from __future__ import annotations

import hashlib
from email.message import EmailMessage

from gateway.inbound.parse import one_line, parse_mail
from gateway.inbound.reply import reply_text


def raw(headers: str, body: str = "hello\r\n") -> bytes:
    return (headers.strip().replace("\n", "\r\n") + "\r\n\r\n" + body).encode()


def test_headers_addresses_and_thread_ids() -> None:
    p = parse_mail(raw("""
From: "Müller, Jörg" <Joerg.Mueller@Kunde.example>
To: support@example.com, other@kunde.example
Cc: boss@kunde.example
Subject: =?utf-8?q?Sicherung_schl=C3=A4gt_fehl?=
Date: Mon, 23 Nov 2026 10:00:00 +0100
Message-ID: <abc@kunde.example>
In-Reply-To: <x1@example.com>
References: <x0@example.com> <x1@example.com>
"""))
    assert p.sender == "joerg.mueller@kunde.example" and p.sender_name == "Müller, Jörg"
    assert p.to == ("support@example.com", "other@kunde.example") and p.cc == ("boss@kunde.example",)
    assert p.subject == "Sicherung schlägt fehl"
    assert p.date is not None and p.date.isoformat() == "2026-11-23T09:00:00+00:00"
    assert p.date_offset_minutes == 60
    assert p.message_id == "<abc@kunde.example>"
    assert p.in_reply_to == ("<x1@example.com>",)
    assert p.references == ("<x0@example.com>", "<x1@example.com>")
    assert p.thread_ids == ("<x1@example.com>", "<x0@example.com>")


def test_missing_message_id_is_derived_from_the_content() -> None:
    data = raw("From: a@b.example\nSubject: x")
    p = parse_mail(data)
    assert p.message_id == f"<{hashlib.sha256(data).hexdigest()}@no-message-id.invalid>"
    assert parse_mail(data).message_id == p.message_id


def test_encoded_subject_cannot_inject_header_lines() -> None:
    # "x\r\nBcc: victim@example.com" encoded in RFC 2047
    p = parse_mail(raw("From: a@b.example\nSubject: =?utf-8?b?eA0KQmNjOiB2aWN0aW1AZXhhbXBsZS5jb20=?="))
    assert "\n" not in p.subject and "\r" not in p.subject
    assert one_line("a\r\nb\x00c") == "a b c"


def test_html_only_mail_becomes_readable_text_without_script_or_style() -> None:
    m = EmailMessage()
    m["From"] = "a@b.example"
    m["Subject"] = "html"
    m.set_content("<html><head><style>p{color:red}</style><script>alert(1)</script></head>"
                  "<body><p>Backup <b>failed</b></p><ul><li>job one</li></ul></body></html>",
                  subtype="html")
    p = parse_mail(m.as_bytes())
    assert "Backup failed" in p.body_text and "job one" in p.body_text
    assert "alert" not in p.body_text and "color" not in p.body_text


def test_attachments_have_exact_bytes_size_and_hash() -> None:
    m = EmailMessage()
    m["From"] = "a@b.example"
    m["Subject"] = "att"
    m.set_content("see attached")
    binary = bytes(range(256)) * 10
    m.add_attachment(binary, maintype="application", subtype="octet-stream", filename="dump.bin")
    m.add_attachment("Grüße\n", subtype="plain", charset="iso-8859-1", filename="gruss.txt")
    p = parse_mail(m.as_bytes())
    (a1, c1), (a2, c2) = p.attachments
    assert c1 == binary and a1.size == 2560 and a1.sha256 == hashlib.sha256(binary).hexdigest()
    assert a1.filename == "dump.bin" and a1.content_type == "application/octet-stream"
    assert a2.filename == "gruss.txt" and c2 == "Grüße\n".encode("iso-8859-1")


def test_reply_text_cuts_quoted_history_and_signature() -> None:
    body = ("Thanks, that fixed it.\n\n-- \nAnn\n\nOn Mon, 23 Nov 2026 at 10:00, Support "
            "<support@example.com> wrote:\n> old text\n")
    assert reply_text(body) == "Thanks, that fixed it."
    assert reply_text("Danke!\n\nAm 23.11.2026 um 10:00 schrieb Support <s@example.com>:\n> alt") == "Danke!"
    outlook = "Yes.\n\n-----Original Message-----\nFrom: Support\nSent: Monday\n\nold"
    assert reply_text(outlook) == "Yes."
    assert reply_text("> only a quote") == "> only a quote"   # never lose the whole text
