"""Parsing: what the gateway takes from a raw message."""
from __future__ import annotations

import hashlib
import struct
from email.message import EmailMessage

import pytest

from gateway.mail.parse import one_line, parse_mail
from gateway.mail.reply import reply_text


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


# -- real-world content: charsets, HTML, inline images, TNEF, attached mail ------

def mime(headers: str, body: bytes) -> bytes:
    return headers.strip().replace("\n", "\r\n").encode() + b"\r\n\r\n" + body


def test_shift_jis_labelled_iso_2022_jp_is_decoded() -> None:
    text = "お問い合わせありがとうございます。"
    p = parse_mail(mime("From: a@b.example\nSubject: x\nContent-Type: text/plain; charset=ISO-2022-JP",
                        text.encode("shift_jis")))
    assert p.body_text == text


def test_iso_2022_jp_with_nec_circled_digits_is_decoded() -> None:
    # "①１都" in ISO-2022-JP with NEC row 13, which Python's codecs refuse
    body = b"\x1b$B-!#1ET\x1b(B"
    p = parse_mail(mime("From: a@b.example\nSubject: x\nContent-Type: text/plain; charset=ISO-2022-JP", body))
    assert p.body_text == "①１都"


def test_8bit_bytes_without_charset_are_utf8_or_windows_1252() -> None:
    utf8 = parse_mail(mime("From: a@b.example\nSubject: Grüße", "Grüße aus Köln".encode()))
    assert utf8.body_text == "Grüße aus Köln" and utf8.subject == "Grüße"
    latin = parse_mail(mime("From: a@b.example\nSubject: x", "Grüße aus Köln".encode("cp1252")))
    assert latin.body_text == "Grüße aus Köln"
    # UTF-8 with a stray Latin-1 byte: nothing is lost, each read as what it is
    mixed = parse_mail(mime("From: a@b.example\nSubject: x", "Grüße ".encode() + "Köln".encode("latin-1")))
    assert mixed.body_text == "Grüße Köln"


def test_unknown_and_mislabelled_charsets_keep_the_text() -> None:
    for label in ("x-unknown", "utf8", "unicode-1-1-utf-7", "ks_c_5601-1987", "iso-8859-8-i"):
        text = {"unicode-1-1-utf-7": "Übermittlung", "ks_c_5601-1987": "안녕하세요",
                "iso-8859-8-i": "שלום"}.get(label, "Grüße")
        codec = {"x-unknown": "utf-8", "utf8": "utf-8", "unicode-1-1-utf-7": "utf-7",
                 "ks_c_5601-1987": "cp949", "iso-8859-8-i": "iso-8859-8"}[label]
        p = parse_mail(mime(f"From: a@b.example\nSubject: x\nContent-Type: text/plain; charset={label}",
                            text.encode(codec)))
        assert p.body_text == text, label


def test_inline_images_are_attachments_with_their_content_id() -> None:
    m = EmailMessage()
    m["From"] = "a@b.example"
    m["Subject"] = "screenshot"
    m.set_content("see the screenshot")
    m.add_alternative('<p>see <img src="cid:shot1@b.example"></p>', subtype="html")
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
    html_part = m.get_body(("html",))
    assert isinstance(html_part, EmailMessage)
    html_part.add_related(png, maintype="image", subtype="png", cid="<shot1@b.example>")
    p = parse_mail(m.as_bytes())
    assert p.body_text == "see the screenshot"
    ((att, content),) = p.attachments
    assert content == png and att.content_id == "<shot1@b.example>" and att.content_type == "image/png"


def test_attached_message_is_kept_as_eml() -> None:
    inner = EmailMessage()
    inner["From"] = "c@d.example"
    inner["Subject"] = "Original problem"
    inner.set_content("the original text")
    outer = EmailMessage()
    outer["From"] = "a@b.example"
    outer["Subject"] = "Fwd: Original problem"
    outer.set_content("see attached")
    outer.add_attachment(inner)
    p = parse_mail(outer.as_bytes())
    ((att, content),) = p.attachments
    assert att.filename == "Original problem.eml" and att.content_type == "message/rfc822"
    assert parse_mail(content).body_text == "the original text"
    assert p.body_text == "see attached"


def _tnef(*objects: tuple[int, int, int, bytes]) -> bytes:
    """A TNEF stream (MS-OXTNEF §2.1.3): signature, key, then attributes,
    each level, id, type, length, data and a 16-bit sum of the data."""
    out = struct.pack("<IH", 0x223E9F78, 0x0001)
    for level, name, kind, data in objects:
        out += struct.pack("<BHHI", level, name, kind, len(data)) + data + struct.pack("<H", sum(data) & 0xFFFF)
    return out


def test_winmail_dat_is_unpacked() -> None:
    tnef = _tnef((1, 0x9006, 0x0008, b"\x00\x00\x01\x00"),          # attTnefVersion
                 (1, 0x800C, 0x0002, b"Please see the log.\x00"),    # attBody
                 (2, 0x9002, 0x0006, b"\x01\x00\xff\xff\xff\xff"),  # attAttachRendData: one attachment
                 (2, 0x8010, 0x0001, b"backup.log\x00"),            # attAttachTitle
                 (2, 0x800F, 0x0006, b"error 0x80040115\n"))         # attAttachData
    m = EmailMessage()
    m["From"] = "a@b.example"
    m["Subject"] = "from Outlook"
    m.add_attachment(tnef, maintype="application", subtype="ms-tnef", filename="winmail.dat")
    p = parse_mail(m.as_bytes())
    assert [(a.filename, c) for a, c in p.attachments] == [("backup.log", b"error 0x80040115\n")]
    assert p.body_text == "Please see the log."


def test_broken_winmail_dat_is_kept_as_it_is() -> None:
    m = EmailMessage()
    m["From"] = "a@b.example"
    m["Subject"] = "x"
    m.set_content("text")
    m.add_attachment(b"not tnef at all", maintype="application", subtype="ms-tnef", filename="winmail.dat")
    p = parse_mail(m.as_bytes())
    assert [(a.filename, c) for a, c in p.attachments] == [("winmail.dat", b"not tnef at all")]


def test_html_only_reply_uses_the_quote_markup() -> None:
    html = ('<div dir="ltr">Thanks, it works now.</div><br><div class="gmail_quote">'
            '<div class="gmail_attr">On Mon, Nov 23, 2026 Support wrote:</div>'
            '<blockquote class="gmail_quote">Please restart the agent.</blockquote></div>')
    m = EmailMessage()
    m["From"] = "a@b.example"
    m["Subject"] = "Re: x"
    m.set_content(html, subtype="html")
    p = parse_mail(m.as_bytes())
    assert "Please restart the agent." in p.body_text
    assert p.reply_text == "Thanks, it works now."


def test_headers_whose_folding_was_lost_are_repaired() -> None:
    raw = (b"Received: from a by b with SMTP id 1\r\nthis line lost its leading blank\r\n"
           b"From: a@b.example\r\nSubject: still found\r\n\r\nbody\r\n")
    p = parse_mail(raw)
    assert p.sender == "a@b.example" and p.subject == "still found" and p.body_text == "body"


@pytest.mark.parametrize("client,body,expected", [
    ("Outlook (en)", ("Sure.\n\nFrom: Support <s@example.com>\nSent: Monday, November 23, 2026 10:00\n"
                      "To: Ann\nSubject: x\n\nold"), "Sure."),
    ("Outlook (de)", ("Gerne.\n\nVon: Support <s@example.com>\nGesendet: Montag, 23. November 2026 10:00\n"
                      "An: Ann\nBetreff: x\n\nalt"), "Gerne."),
    ("Outlook web", "Done.\n\n________________________________\nFrom: Support\nSent: Monday\n\nold", "Done."),
    ("Outlook, bold", "Ok.\n\n*From:* Support [mailto:s@example.com]\n*Sent:* Monday\n\nold", "Ok."),
    ("Gmail, wrapped", "Yes.\n\nOn Mon, Nov 23, 2026 at 10:00 AM Support <\nsupport@example.com> wrote:\n\n> old",
     "Yes."),
    ("Apple Mail", "Fixed.\n\n> On 23 Nov 2026, at 10:00, Support <s@example.com> wrote:\n> \n> old", "Fixed."),
    ("Thunderbird below the quote", "On 23.11.26 10:00, Support wrote:\n> Which version?\n\n5.2.1\n",
     "5.2.1"),
    ("inline answers", "On 23.11.26 10:00, Support wrote:\n> Which version?\n\n5.2\n\n> Which OS?\n\nLinux",
     "5.2\n\nLinux"),
    ("mobile", "Rebooted.\n\nSent from my iPhone\n\nOn 23 Nov 2026 Support wrote:\n> old", "Rebooted."),
])
def test_reply_text_recognises_the_common_clients(client: str, body: str, expected: str) -> None:
    assert reply_text(body) == expected, client


def test_reply_text_keeps_what_only_looks_like_a_quote_header() -> None:
    text = ("On the surface it works.\n\nThe data comes From: our database.\n\n- step one\n- step two\n\n"
            "And here is a fix -- not a signature.\n\nThanks,\nAnn")
    assert reply_text(text) == text


def test_an_encoded_word_is_never_the_address() -> None:
    # RFC 2047 §5: encoded words are text in a display name; the address is
    # the one in angle brackets, whatever the decoded name says
    for header in ("=?utf-8?q?Smith=2C_John_john@victim.example?= <ann@customer.example>",
                   '"=?utf-8?q?support@victim.example?=" <ann@customer.example>',
                   "=?utf-8?q?Ann=0D=0ABcc:_v@victim.example?= <ann@customer.example>"):
        p = parse_mail(raw(f"From: {header}\nTo: support@example.com\nSubject: x"))
        assert p.sender == "ann@customer.example", header
        assert "\n" not in p.sender_name and "\r" not in p.sender_name
    only_word = parse_mail(raw("From: =?utf-8?q?mallory@victim.example?=\nSubject: x"))
    assert only_word.sender == ""


def test_message_ids_are_storable_whatever_the_bytes_and_length() -> None:
    """An 8-bit byte in a Message-ID (a lone surrogate after parsing: no store
    can encode it) and an ID longer than a header line (PostgreSQL's index
    refuses ~2.7 KB) get a stable stand-in, the same in the mail and in a
    reply that quotes it."""
    long_id = "<" + "x" * 3000 + "@customer.example>"
    raw = (b"From: a@customer.example\r\nTo: support@example.com\r\nSubject: s\r\n"
           b"Message-ID: <m\xff1@customer.example>\r\nReferences: " + long_id.encode() +
           b"\r\n\r\nbody\r\n")
    mail = parse_mail(raw)
    assert mail.message_id == "<m\ufffd1@customer.example>"
    mail.message_id.encode("utf-8")                      # storable
    (ref,) = mail.references
    assert ref.endswith("@long-message-id.invalid>") and len(ref) < 100
    again = parse_mail(b"Message-ID: " + long_id.encode() + b"\r\nFrom: a@customer.example\r\n\r\nx\r\n")
    assert again.message_id == ref
