"""What a mail's MIME structure costs, checked before and after parsing: `examine`.

`structure_problem` is the guard against hostile MIME (`[limits]`
max_attachments, max_nesting): a linear scan that never recurses, run before
the parser sees the mail, because the parser recurses once per nesting level
(about 1 000 levels of message/rfc822 raise RecursionError in the stdlib).

It must see what the parser sees, or a mail passes the check and the parser
then finds a structure the check never counted (project issue 14: a
boundary over 200 characters, an RFC 2231 `boundary*0=`, or bare-CR line
ends took 10 000 attachments past a limit of 100). So it splits lines where
the stdlib's feed parser does (CRLF, LF and a lone CR), reads each header
block with the stdlib's own header parser (`get_content_type`,
`get_boundary`: RFC 2231 continuations and any length), ends a header
block where the parser does (a blank line, or a line that is no header),
and matches boundaries as the parser does (the innermost enclosing one that
fits, RFC 2046 §5.1.1). `examine` counts again after parsing, on what the
parser found: a mail over a limit is never stored however its structure
fooled the scan.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32

from gateway.mail.parse import parse_mail
from gateway.model import ParsedMail

_EOL = re.compile(rb"\r\n|\r|\n")                 # email.feedparser's NLCRE_crack
_DASH_LINE = re.compile(rb"[\r\n]--")             # a line that may be a boundary
_HEADER = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")   # email.feedparser's headerRE
_HEADERS = BytesHeaderParser(policy=compat32)


@dataclass(frozen=True)
class Examined:
    """What `examine` found: a limit the mail is over, or the parsed mail, or why parsing failed."""

    problem: str | None = None
    parsed: ParsedMail | None = None
    error: str | None = None


def examine(raw: bytes, max_attachments: int, max_nesting: int) -> Examined:
    """Structure check, parse, and the limits again on what the parser found.

    Pure and CPU-bound: the intake runs it in a worker process under a time
    budget (gateway.ops.sandbox)."""
    problem = structure_problem(raw, max_attachments, max_nesting)
    if problem is not None:
        return Examined(problem=problem)
    try:
        parsed = parse_mail(raw)
    except Exception as e:  # noqa: BLE001 - any parser failure quarantines, never drops
        return Examined(error=f"parse failed: {type(e).__name__}: {e}"[:2000])
    if len(parsed.attachments) > max_attachments:
        return Examined(problem=f"more than {max_attachments} attachments")
    return Examined(parsed=parsed)


def structure_problem(raw: bytes, max_attachments: int, max_nesting: int) -> str | None:
    """Why this mail's MIME structure is over the limits, or None.

    Counts, in one pass over the lines and without recursion (RFC 2046 §5.1
    boundaries, §5.2.1 message/rfc822):
    - nesting: how many multipart or message containers enclose the deepest
      part (an ordinary mail with text, HTML and an attachment: 2);
    - attachments: leaf parts other than the message's text (the first
      text/plain and first text/html that are not `Content-Disposition:
      attachment`).
    Malformed structure is read the way the lenient parser reads it and never
    raises; the scan stops at the first limit exceeded.
    """
    stack: list[tuple[bytes | None, int]] = []   # open multiparts: (b"--" + boundary, depth of their parts)
    depth = 0                             # containers around the entity being read
    attachments = 0
    body_seen: set[str] = set()
    pos, end = 0, len(raw)
    in_headers = True
    header_start = 0                      # where the current header block began

    def line_at(start: int) -> tuple[bytes, int]:
        """The line starting at `start` (without its end) and where the next one starts."""
        m = _EOL.search(raw, start)
        return (raw[start:], end) if m is None else (raw[start:m.start()], m.end())

    def boundary_of(line: bytes) -> tuple[int, bool] | None:
        """Index in `stack` of the multipart this line delimits, and whether it closes it."""
        if not stack or not line.startswith(b"--"):
            return None
        text = line.rstrip(b" \t")
        for i in range(len(stack) - 1, -1, -1):
            delimiter = stack[i][0]
            if delimiter is None:
                continue
            if text == delimiter:
                return i, False
            if text == delimiter + b"--":
                return i, True
        return None

    def at_boundary(hit: tuple[int, bool], after: int) -> None:
        nonlocal depth, in_headers, header_start
        i, closing = hit
        if closing:
            del stack[i:]                 # the multipart and anything left open inside it
            in_headers = False            # its epilogue: body text of the parent
        else:
            del stack[i + 1:]
            depth = stack[i][1]
            in_headers, header_start = True, after

    while pos < end:
        if in_headers:
            line, after = line_at(pos)
            hit = boundary_of(line)
            if hit is not None:           # a part with no blank line after its headers
                attachments += 1
                if attachments > max_attachments:
                    return f"more than {max_attachments} attachments"
                at_boundary(hit, after)
                pos = after
                continue
            if line and _HEADER.match(line):
                pos = after               # a header line, or its continuation
                continue
            # end of this entity's header block (a blank line, or a line that is no header
            # and so begins the body): what is it?
            part = _HEADERS.parsebytes(raw[header_start:pos])
            if line:
                after = pos               # that line is body: read it again as such
            maintype, subtype = part.get_content_maintype(), part.get_content_subtype()
            boundary = part.get_boundary() if maintype == "multipart" else None
            if boundary is not None:
                if depth + 1 > max_nesting:
                    return f"MIME nesting deeper than {max_nesting} levels"
                stack.append((_delimiter(boundary), depth + 1))
                in_headers = False        # its preamble, up to the first boundary
            elif maintype == "message" and subtype != "delivery-status":
                if depth + 1 > max_nesting:
                    return f"MIME nesting deeper than {max_nesting} levels"
                depth += 1                # the enclosed message's own header block follows
                header_start = after
            else:
                disposition = part.get_content_disposition()
                if maintype == "text" and subtype in ("plain", "html") and subtype not in body_seen \
                        and disposition != "attachment":
                    body_seen.add(subtype)
                else:
                    attachments += 1
                    if attachments > max_attachments:
                        return f"more than {max_attachments} attachments"
                in_headers = False
            pos = after
        else:
            if not stack:
                return None               # a leaf body or an epilogue, to the end: nothing more
            # the next line that starts with "--" (a boundary candidate)
            if pos == 0 and raw.startswith(b"--"):
                start = 0
            else:
                m = _DASH_LINE.search(raw, pos - 1 if pos else 0)
                if m is None:
                    return None
                start = m.start() + 1
            line, pos = line_at(start)
            hit = boundary_of(line)
            if hit is not None:
                at_boundary(hit, pos)
    return None


def _delimiter(boundary: str) -> bytes | None:
    """The delimiter line of a boundary as bytes, as the parser compares it (the
    header's 8-bit bytes kept as surrogates); None if no line can match it."""
    try:
        return b"--" + boundary.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return None

