"""Replies shaped like real mail clients' (headers and quote styles).

Staff answer from Thunderbird, Outlook and Gmail; each quotes the mail it
answers in its own way, and the gateway must relay only the new text.
"""
from __future__ import annotations

import email.policy
from email.message import EmailMessage
from email.utils import formatdate, make_msgid


def _quoted(original: EmailMessage) -> str:
    body = original.get_body(("plain",))
    return body.get_content() if body else ""


def _base(original: EmailMessage, frm: str, to: str, subject_prefix: str) -> EmailMessage:
    m = EmailMessage(policy=email.policy.SMTP)
    m["From"] = frm
    m["To"] = to
    m["Subject"] = f"{subject_prefix} {original['Subject']}"
    m["Date"] = formatdate(localtime=False)
    m["Message-ID"] = make_msgid(domain=frm.rpartition("@")[2].strip(">"))
    m["In-Reply-To"] = str(original["Message-ID"])
    refs = (str(original["References"]) + " " if original["References"] else "") + str(original["Message-ID"])
    m["References"] = refs
    return m


def thunderbird(original: EmailMessage, frm: str, to: str, text: str) -> EmailMessage:
    m = _base(original, frm, to, "Re:")
    m["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.5.0"
    m["Content-Language"] = "en-US"
    quote = "\n".join("> " + line for line in _quoted(original).splitlines())
    m.set_content(f"{text}\n\nOn 23.11.26 10:00, Support wrote:\n{quote}\n")
    return m


def outlook(original: EmailMessage, frm: str, to: str, text: str) -> EmailMessage:
    m = _base(original, frm, to, "RE:")
    m["Thread-Topic"] = str(original["Subject"])
    m["Thread-Index"] = "AQHbPdS1c2lnbmF0dXJlX3NhbXBsZQ=="
    m["X-MS-Has-Attach"] = ""
    m["X-Mailer"] = "Microsoft Outlook 16.0"
    plain = (f"{text}\n\nBest regards\nAgent Smith\n\n"
             f"From: Support <support@example.com>\nSent: Monday, November 23, 2026 10:00 AM\n"
             f"To: {to}\nSubject: {original['Subject']}\n\n{_quoted(original)}\n")
    m.set_content(plain)
    m.add_alternative(f"<html><body><div>{text}</div><div id=\"divRplyFwdMsg\"><b>From:</b> Support"
                      f"<br><b>Sent:</b> Monday</div><div>{_quoted(original)}</div></body></html>",
                      subtype="html")
    return m


def gmail(original: EmailMessage, frm: str, to: str, text: str) -> EmailMessage:
    m = _base(original, frm, to, "Re:")
    quote = "\n".join("> " + line for line in _quoted(original).splitlines())
    m.set_content(f"{text}\n\nOn Mon, Nov 23, 2026 at 10:00 AM Support <support@example.com> wrote:\n\n{quote}\n")
    m.add_alternative(f"<div dir=\"ltr\">{text}</div><br><div class=\"gmail_quote\">On Mon, Nov 23, 2026 "
                      f"Support wrote:<br><blockquote class=\"gmail_quote\">{_quoted(original)}</blockquote></div>",
                      subtype="html")
    return m


CLIENTS = {"thunderbird": thunderbird, "outlook": outlook, "gmail": gmail}
