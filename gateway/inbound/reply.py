"""The new part of a reply: quoted history and signature taken off.

A first, conservative cut: the text ends at the first line that starts
quoted history in the common clients (the gateway's own "reply above this
line" marker, `On ... wrote:` / `Am ... schrieb ...:`, Outlook's
`-----Original Message-----` and `From:`/`Von:` header blocks), lines quoted
with `>` are dropped, and a `-- ` signature is cut. When nothing would be
left, the whole text is kept: losing a customer's words is worse than
showing a quote.
"""
from __future__ import annotations

import re

REPLY_MARKER = "-- Reply above this line --"

_HISTORY_START = re.compile(
    r"""^(?:
        -+\s*Reply\ above\ this\ line\s*-+
      | -{2,}\s*(?:Original\ Message|Ursprüngliche\ Nachricht|Urspr.ngliche\ Nachricht)\s*-{2,}
      | On\ .{4,200}\ wrote:\s*$
      | Am\ .{4,200}\ schrieb.{0,200}:\s*$
      | (?:From|Von):\s.+\n(?:.*\n){0,3}?(?:Sent|Gesendet|Date|Datum):\s
      | _{20,}\s*$
    )""",
    re.IGNORECASE | re.MULTILINE | re.VERBOSE,
)
_SIGNATURE = re.compile(r"^-- ?$", re.MULTILINE)


def reply_text(body: str) -> str:
    text = body.replace("\r\n", "\n")
    m = _HISTORY_START.search(text)
    if m:
        text = text[: m.start()]
    sig = _SIGNATURE.search(text)
    if sig:
        text = text[: sig.start()]
    lines = [ln for ln in text.split("\n") if not ln.lstrip().startswith(">")]
    new = "\n".join(lines).strip()
    return new or body.strip()
