"""Is this mail automatic? (pure)

Automatic mail never gets an automatic answer: that is how two responders
end up mailing each other forever. The signs, per RFC 3834 and what the
peers learnt the hard way:
- `Auto-Submitted` with any value but `no` (RFC 3834 §5; `no` is a human,
  which FreeScout got wrong);
- `Precedence: bulk | junk | list | auto_reply`; `X-Autoreply`,
  `X-Autorespond`; `List-Id` / `List-Unsubscribe`;
- an empty envelope sender (`MAIL FROM:<>`, RFC 5321 §4.5.5: bounces and
  other notifications), mailer-daemon, postmaster and no-reply senders;
- a DSN (`multipart/report; report-type=delivery-status`).
"""
from __future__ import annotations

import re
from collections.abc import Collection, Mapping

_NOREPLY = re.compile(r"^(mailer-daemon|postmaster|no[-_.]?reply|do[-_.]?not[-_.]?reply|bounces?)([+@-]|$)",
                      re.IGNORECASE)


def automatic_kind(headers: Mapping[str, str], *, sender: str, mail_from: str | None,
                   own_addresses: Collection[str] = ()) -> str | None:
    """`"bounce"`, `"auto"`, or None for mail written by a person.

    `headers` has lower-case names; `mail_from` is the envelope sender
    (None when unknown, "" for the null sender `<>`).
    """
    ctype = headers.get("content-type", "").lower()
    local = sender.partition("@")[0]
    if "multipart/report" in ctype and "delivery-status" in ctype:
        return "bounce"
    if re.match(r"(mailer-daemon|postmaster)\b", local, re.IGNORECASE) or \
            (mail_from == "" and "report" in ctype):
        return "bounce"
    auto = headers.get("auto-submitted", "").split(";", 1)[0].strip().lower()
    if auto and auto != "no":
        return "auto"
    if headers.get("precedence", "").strip().lower() in ("bulk", "junk", "list", "auto_reply"):
        return "auto"
    if any(h in headers for h in ("x-autoreply", "x-autorespond", "list-id", "list-unsubscribe")):
        return "auto"
    if mail_from == "" or _NOREPLY.match(local):
        return "auto"
    if sender and sender in own_addresses:
        return "auto"   # our own mail come back: answering it would loop
    return None
