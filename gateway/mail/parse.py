"""One function turns raw bytes into a `ParsedMail`: `parse_mail`.

Built on the standard library's `email` package with the lenient `compat32`
policy, which never refuses a message: broken MIME becomes defects, not
exceptions. Everything a real mailbox throws at a parser is handled here,
because the gateway must never lose a customer's mail:

- header values are decoded (RFC 2047, including encoded words a client put
  inside quotes) and made safe: no line breaks, no control characters;
  raw 8-bit header bytes (RFC 6532, or just a sloppy client) are read as
  UTF-8, else in the message's own charset, else detected;
- a Message-ID is always present (derived from the content when the sender
  gave none, so that a retried delivery of the same bytes is recognised);
- the text body is every inline `text/plain` part outside attached messages
  (one with a filename is an attachment, and the body when there is no other
  text: project issue 15); HTML-only mail becomes readable text (inscriptis; no script or style
  content), and its quote markup helps `reply_text`;
- charsets: every charset Python knows, plus the usual mislabels (Shift_JIS
  or EUC-JP bytes labelled ISO-2022-JP, GB18030 labelled GB2312, cp1252
  labelled ISO-8859-1 or US-ASCII, 8-bit bytes with no charset at all),
  decoded without losing the message;
- attachments keep their exact bytes: inline images with their Content-ID,
  attached messages as `.eml` files, `winmail.dat` (TNEF, RFC-less Outlook
  format) unpacked with tnefparse, uuencoded files inside text bodies
  (Lotus Notes) taken out of the text.
"""
from __future__ import annotations

import binascii
import codecs
import contextlib
import email.errors
import email.generator
import email.header
import email.utils
import hashlib
import io
import itertools
import mimetypes
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.feedparser import BytesFeedParser
from email.message import Message
from email.policy import compat32

from inscriptis import get_text

from gateway.mail.reply import reply_text
from gateway.model import Attachment, ParsedMail, normalize_address

_MSGID = re.compile(r"<[^<>\s]+>")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_HEADER_LINE = re.compile(rb"^[!-9;-~]+[ \t]*:")
_EMPTY_HEADER = re.compile(rb"^([!-9;-~]+): \n", re.MULTILINE)
_MASKED = re.compile(r"ewzq(\d+)qzwe")
_COMMENT = re.compile(r"\s*\([^()]*\)\s*")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]{2,40})""",
                           re.IGNORECASE)
# uuencoded files: a begin line, and the first end line after it (found apart, so that
# the search is linear: one regex with `(.*?)^end` rescanned the rest of the text
# from every begin line, 8.9 s for 150 KB of begin lines without end, project issue 14)
_UU_BEGIN = re.compile(r"^begin [0-7]{3,4} ([^\n]+)\n", re.MULTILINE)
_UU_END = re.compile(r"^end[ \t]*$\n?", re.MULTILINE)
# an addr-spec a relay can deliver to (RFC 5321 §4.1.2, §4.5.3.1: 64-octet local part,
# 255-octet domain; RFC 6531 allows UTF-8 in both): no blank, control character,
# bracket or quote, a domain of dot-separated labels
_ANSWERABLE = re.compile(r"[^\s\x00-\x1f\x7f<>()\[\]\\,;:\"@]{1,64}"
                         r"@(?=[^@]{1,253}$)(?:[a-z0-9\u0080-\uffff](?:[a-z0-9\u0080-\uffff-]{0,61}"
                         r"[a-z0-9\u0080-\uffff])?\.)*[a-z0-9\u0080-\uffff](?:[a-z0-9\u0080-\uffff-]{0,61}"
                         r"[a-z0-9\u0080-\uffff])?")
# Header values are stored and answered cut to one line of 998 characters: decoding
# more of a value than could make those is wasted, and the stdlib's decode_header
# is quadratic in the number of encoded words (list.pop(0)).
DECODE_MAX = 32768
MAX_PARTS = 2000            # a MIME bomb stops being walked here; its raw bytes stay stored

# Labels that are wrong or unknown to Python, mapped to what the bytes really
# are (WHATWG Encoding Standard §4.2 and what mail clients actually send).
_CHARSET_ALIASES = {
    "iso-8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252", "us-ascii": "cp1252",
    "ascii": "cp1252", "iso-8859-9": "cp1254", "iso-8859-11": "cp874", "tis-620": "cp874",
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "gb_2312-80": "gb18030",
    "euc-cn": "gb18030", "big5": "big5hkscs", "x-x-big5": "big5hkscs",
    "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932", "x-sjis": "cp932",
    "windows-31j": "cp932", "ms_kanji": "cp932", "euc-kr": "cp949", "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949", "iso-8859-8-i": "iso-8859-8", "iso-8859-6-i": "iso-8859-6",
    "unicode-1-1-utf-7": "utf-7", "x-unicode20utf8": "utf-8", "unicode-1-1-utf-8": "utf-8",
    "utf8": "utf-8", "x-mac-roman": "mac-roman", "macintosh": "mac-roman",
    "x-mac-cyrillic": "mac-cyrillic", "cp-850": "cp850", "ansi_x3.4-1968": "cp1252",
    "chinesebig5": "big5hkscs", "x-euc-jp": "euc_jp",
}
# A label whose strict decoding fails: the encodings the bytes usually are
# instead (keyed by Python's codec name). ISO-2022-JP mail uses the NEC and
# JIS X 0213 extensions (circled digits, ①), or is Shift_JIS / EUC-JP outright.
_MISLABEL_FALLBACKS = {
    "iso2022_jp": ("iso2022_jp_ext", "iso2022_jp_2004", "iso2022_jp_3", "iso2022_jp_2", "cp932",
                   "euc_jis_2004"),
    "cp932": ("shift_jis_2004", "euc_jis_2004"),
    "euc_jp": ("euc_jis_2004", "cp932"),
    "gb18030": ("big5hkscs",),
    "big5hkscs": ("cp950", "gb18030"),
    "cp949": (),
}


def one_line(value: str, limit: int = 998) -> str:
    """A header value that cannot carry a line break or control character.

    Decoded RFC 2047 words may contain CR/LF; written back into an outbound
    header they would add headers or recipients (header injection).
    """
    return _CONTROL.sub(" ", value).strip()[:limit]


MAX_MESSAGE_ID = 998       # RFC 5322's line limit; PostgreSQL's index rows stop near 2 700 bytes


def message_ids(value: str | None) -> tuple[str, ...]:
    """Every `<id>` in a Message-ID / In-Reply-To / References value, in order.

    An ID longer than a header line may be stands for itself by its hash
    (`<sha256@long-message-id.invalid>`), the same wherever it appears, so a
    mail and the replies that quote its ID still thread, and no store's index
    refuses it.
    """
    return tuple(_storable_id(i) for i in _MSGID.findall(value or ""))


def _storable_id(msgid: str) -> str:
    # bytes that were no UTF-8 (kept as lone surrogates by the parser, which no
    # store can encode) become U+FFFD, the same in the mail and in its replies
    text = msgid.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if len(text) <= MAX_MESSAGE_ID:
        return text
    return f"<{hashlib.sha256(text.encode()).hexdigest()}@long-message-id.invalid>"


@dataclass
class _Parts:
    """What walking the MIME tree found."""

    raw: bytes = b""
    plain: list[str] = field(default_factory=list)
    html: list[tuple[Message, str, bytes]] = field(default_factory=list)
    named_text: list[str] = field(default_factory=list)    # inline text/plain parts with a filename
    raw_bodies: dict[int, bytes] = field(default_factory=dict)     # id(part) -> its raw body
    attachments: list[tuple[Attachment, bytes]] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    count: int = 0


def parse_mail(raw: bytes) -> ParsedMail:
    msg = _message(raw)
    fallback = _header_charsets(msg, raw)
    headers: dict[str, str] = {}
    for name, value in msg.raw_items():
        headers.setdefault(name.lower(), one_line(decode_header(value, fallback)))

    name, sender = _first_address(_raw_all(msg, "From"), fallback)
    from_address = sender
    if not sender:
        # no usable From: whoever else the mail names as its author (RFC 5322 §3.6.2)
        name, sender = _first_address(_raw_all(msg, "Sender") + _raw_all(msg, "Reply-To"), fallback)
    sender = _list_rewritten_sender(msg, sender, fallback)
    own_ids = message_ids(_raw_header(msg, "Message-ID"))
    message_id = own_ids[0] if own_ids else f"<{hashlib.sha256(raw).hexdigest()}@no-message-id.invalid>"

    parts = _Parts(raw=raw)
    _walk(msg, parts)
    # defects of every part, also inside attached messages and header blocks
    parts.defects = [type(d).__name__ for part in itertools.islice(msg.walk(), MAX_PARTS)
                     for d in part.defects] + parts.defects
    html = "\n".join(text for _, text, _ in parts.html)
    if any(p.strip() for p in parts.plain):
        body = _newlines("\n".join(parts.plain)).strip("\n")
        reply = reply_text(body)
        for part, _, data in parts.html:
            # HTML beside the text (not its alternative): a document of its own
            _add_attachment(parts, part, data, _described_name(part, "text/html"))
    elif html.strip():
        body = _newlines(html_to_text(html)).strip("\n")
        reply = reply_text(body, html=html)
    elif any(p.strip() for p in parts.named_text):
        body = _newlines("\n".join(parts.named_text)).strip("\n")
        reply = reply_text(body)
    else:
        body, reply = "", ""
    date = _date(_raw_header(msg, "Date"))
    return ParsedMail(
        sender=sender,
        from_address=from_address,
        sender_name=one_line(name),
        to=_addresses(_raw_all(msg, "To"), fallback),
        cc=_addresses(_raw_all(msg, "Cc"), fallback),
        subject=one_line(headers.get("subject", "")),
        date=date.astimezone(UTC) if date else None,
        date_offset_minutes=_offset_minutes(date),
        message_id=message_id,
        in_reply_to=message_ids(_raw_header(msg, "In-Reply-To")),
        references=message_ids(_raw_header(msg, "References")),
        body_text=body,
        reply_text=reply,
        attachments=tuple(parts.attachments),
        headers=headers,
        defects=tuple(dict.fromkeys(parts.defects)),
        content_types=tuple(parts.types),
    )


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _message(raw: bytes) -> Message:
    msg = _parse_bytes(raw)
    if not msg.keys() or any(isinstance(d, email.errors.MissingHeaderBodySeparatorDefect)
                             for d in msg.defects):
        repaired = _repair_header_block(raw)
        if repaired is not None:
            fixed = _parse_bytes(repaired)
            if len(fixed.keys()) > len(msg.keys()):
                return fixed
    return msg


def _parse_bytes(raw: bytes, chunk: int = 65536) -> Message:
    """`BytesParser(policy=compat32).parsebytes(raw)`, fed in pieces.

    parsebytes decodes the whole mail into one str and reads it through a
    StringIO, which holds 4 bytes per character: a 20 MB mail took 160 MB
    to parse, 56 MB this way (project issue 7). The feed parser takes any
    split of its input, and ASCII with surrogateescape decodes byte by byte,
    so the result is the same.
    """
    parser = BytesFeedParser(policy=compat32)
    for start in range(0, len(raw), chunk):
        parser.feed(raw[start:start + chunk])
    return parser.close()


def _repair_header_block(raw: bytes) -> bytes | None:
    """Headers as they were meant, when a gateway on the way broke them.

    Seen in real mail (Zammad's corpus): blank lines or a "---- Original
    email message ----" line before the headers, and folded header lines
    whose leading blank was lost (so the parser ends the headers early and
    the rest lands in the body). A line that is no header but is followed by
    more header lines is taken as a lost continuation line.
    """
    lines = raw.splitlines(keepends=True)
    start = 0
    while start < len(lines) and not lines[start].strip():
        start += 1
    if start < len(lines) and not _HEADER_LINE.match(lines[start]) \
            and not lines[start].startswith(b"From "):
        for k in range(start + 1, min(start + 4, len(lines) - 1)):
            if _HEADER_LINE.match(lines[k]) and _HEADER_LINE.match(lines[k + 1]):
                start = k
                break
        else:
            return None
    end = start
    while end < len(lines) and lines[end].strip():
        end += 1
    block = lines[start:end]
    last_header = max((n for n, ln in enumerate(block) if _HEADER_LINE.match(ln)), default=-1)
    fixed: list[bytes] = []
    for n, ln in enumerate(block):
        if n == 0 or _HEADER_LINE.match(ln) or ln[:1] in (b" ", b"\t") or n > last_header:
            if n == last_header + 1 and n > 0 and not _HEADER_LINE.match(ln) and ln[:1] not in (b" ", b"\t"):
                fixed.append(b"\n")      # the body started without its blank line
            fixed.append(ln)
        else:
            fixed.append(b" " + ln)
    return b"".join(fixed + lines[end:])


def html_to_text(html: str) -> str:
    """Readable text of an HTML body; script and style content never shows."""
    return get_text(html)


# -- headers ----------------------------------------------------------------

def decode_header(value: object, fallback: tuple[str, ...] = ()) -> str:
    """A header value as text: RFC 2047 words decoded, raw 8-bit bytes read sensibly.

    Only the first DECODE_MAX characters are read: every caller keeps at most
    a line of 998 characters."""
    if isinstance(value, email.header.Header):
        value = str(value)
    # unfold (RFC 5322 §2.2.3): a line break before blank space is removed
    text = _unescape_8bit(_FOLD.sub("", str(value)[:DECODE_MAX]), fallback)
    if "=?" not in text:
        return text
    # Clients put encoded words in quoted strings, which RFC 2047 §5 forbids;
    # the quotes are dropped so that the words decode.
    text = re.sub(r'"(\s*=\?[^"]*\?=\s*)"', r"\1", text)
    try:
        chunks = email.header.decode_header(text)
    except (ValueError, AssertionError, LookupError, binascii.Error):
        return text
    out: list[str] = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            out.append(chunk)
        else:
            out.append(decode_bytes(chunk, charset))
    # decode_header keeps the blank between an encoded word and plain text as
    # part of the plain text; joining with "" keeps the words' spacing.
    return "".join(out) if len(chunks) > 1 else out[0]


def _unescape_8bit(text: str, charsets: tuple[str, ...]) -> str:
    """compat32 keeps raw 8-bit header bytes as surrogates; decode them.

    RFC 6532 allows UTF-8 there; anything else is a client's own charset,
    most likely one the message declares for its body (`charsets`).
    """
    if not any("\udc80" <= c <= "\udcff" for c in text):
        return text
    data = text.encode("ascii", "surrogateescape")
    for charset in ("utf-8", *charsets):
        codec = _python_codec(charset)
        for candidate in (codec, *_MISLABEL_FALLBACKS.get(codec or "", ())) if codec else ():
            try:
                return data.decode(candidate)
            except (UnicodeDecodeError, LookupError):
                continue
    if _UTF8_SEQUENCE.search(data):
        return data.decode("utf-8", "cp1252-fallback")
    return data.decode("cp1252", "replace")


def _raw_all(msg: Message, name: str) -> list[str]:
    """Every value of header `name` as stored: 8-bit bytes still as surrogates
    (compat32's get() would turn them into U+FFFD)."""
    lname = name.lower()
    return [str(v) for k, v in msg.raw_items() if k.lower() == lname]


def _raw_header(msg: Message, name: str) -> str:
    values = _raw_all(msg, name)
    return values[0] if values else ""


def _getaddresses(values: list[str]) -> list[tuple[str, str]]:
    try:
        return email.utils.getaddresses(values)
    except (TypeError, ValueError, IndexError):
        return []


def _address_pairs(values: Sequence[object], fallback: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(display name, address) of address headers.

    Encoded words are masked before the addresses are parsed: RFC 2047 §5
    allows them only as text in a phrase, so "=?utf-8?q?john@evil?=
    <ann@example>" is Ann, and an encoded word is never taken for an address
    (nor can its decoded commas or line breaks split the header).
    """
    words: list[str] = []

    def mask(m: re.Match[str]) -> str:
        words.append(m.group(0))
        return f"ewzq{len(words) - 1}qzwe"

    masked = [_ENCODED_WORD.sub(mask, _unescape_8bit(str(v), fallback)) for v in values]
    quoted = any('"' in v for v in masked)
    for name, addr in _getaddresses(masked):
        if _MASKED.search(addr):
            continue                # an encoded word where the address should be
        name = decode_header(_MASKED.sub(lambda m: words[int(m.group(1))], name), fallback)
        if not quoted and "(" in name:
            # "MAILER-DAEMON (Mail Delivery System) <...>": the comment is no
            # part of the display name (RFC 5322 §3.4, CFWS)
            name = _COMMENT.sub(" ", name).strip() or name
        yield name, addr


def answerable(address: str) -> bool:
    """Whether mail can be sent to this (normalized) address: `<a b@x.example>`,
    `a@`, `@x`, control characters and the like can't, and are never taken
    as a sender or participant (a relay refuses them, or worse, reads them
    as something else)."""
    return _ANSWERABLE.fullmatch(address) is not None


def _first_address(values: Sequence[object], fallback: tuple[str, ...]) -> tuple[str, str]:
    for name, addr in _address_pairs(values, fallback):
        if "@" in addr and answerable(normalize_address(addr)):
            return name or "", normalize_address(addr)
    return "", ""


def _addresses(values: Sequence[object], fallback: tuple[str, ...]) -> tuple[str, ...]:
    found = (normalize_address(a) for _, a in _address_pairs(values, fallback) if "@" in a)
    return tuple(dict.fromkeys(a for a in found if answerable(a)))


def _list_rewritten_sender(msg: Message, sender: str, fallback: tuple[str, ...]) -> str:
    """The author when a mailing list rewrote From (DMARC "From munging").

    Lists that rewrite From to their own address keep the author in
    X-Original-From and Reply-To; only when both agree is the author taken,
    so a plain Reply-To never changes who the requester is.
    """
    original = _first_address(_raw_all(msg, "X-Original-From"), fallback)[1]
    if original and original != sender:
        reply_to = _addresses(_raw_all(msg, "Reply-To"), fallback)
        if original in reply_to:
            return original
    return sender


def _date(value: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # RFC 5322 §3.3: "-0000" means the offset is unknown; the time is UTC
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _offset_minutes(date: datetime | None) -> int | None:
    offset = date.utcoffset() if date else None
    return None if offset is None else round(offset.total_seconds() / 60)


# -- charsets ---------------------------------------------------------------

def _python_codec(charset: str | None) -> str | None:
    """The codec Python should use for a declared charset, or None if unknown."""
    if not charset:
        return None
    label = charset.strip().strip("\"'").lower()
    label = _CHARSET_ALIASES.get(label, label)
    try:
        return codecs.lookup(label).name
    except (LookupError, ValueError):
        return None


def decode_bytes(data: bytes, charset: str | None, fallback: str | None = None) -> str:
    """Text of `data` in its declared charset, or what it really is; never fails."""
    codec = _python_codec(charset)
    if not any(b >= 0x80 for b in data) and codec in (None, "cp1252", "utf-8"):
        return data.decode("ascii")
    candidates: list[str] = []
    if codec:
        candidates.append(codec)
        candidates += _MISLABEL_FALLBACKS.get(codec, ())
    else:
        # no charset, or one Python does not know: UTF-8 first (RFC 6532)
        candidates.append("utf-8")
        fb = _python_codec(fallback)
        if fb:
            candidates.append(fb)
    seven_bit = not any(b >= 0x80 for b in data)
    for candidate in dict.fromkeys(candidates):
        if candidate == "cp932" and codec == "iso2022_jp":
            if seven_bit:
                break         # escapes and 7-bit bytes: no Shift_JIS mislabel
            with contextlib.suppress(UnicodeDecodeError):
                return _iso2022_jp_as_euc(data).decode("euc_jis_2004")
        try:
            return data.decode(candidate)
        except (UnicodeDecodeError, LookupError):
            continue
    if codec == "iso2022_jp":
        with contextlib.suppress(UnicodeDecodeError):
            return _iso2022_jp_as_euc(data).decode("euc_jis_2004")
    if codec not in (None, "utf-8"):
        # the declared charset with a few bad bytes beats a guess
        text = data.decode(codec, "replace")
        if text.count("\ufffd") <= max(2, len(data) // 200):
            return text
    if _UTF8_SEQUENCE.search(data):
        # mostly UTF-8 with stray 8-bit bytes (text pasted from two sources):
        # every valid sequence as UTF-8, the strays as Windows-1252
        return data.decode("utf-8", "cp1252-fallback")
    guess = _detect(data) if sum(b >= 0x80 for b in data[:4096]) >= 16 else None
    return data.decode(guess or "cp1252", "replace")


def _iso2022_jp_as_euc(data: bytes) -> bytes:
    """ISO-2022-JP (RFC 1468) re-coded as EUC-JP, byte for byte.

    Japanese mail uses NEC's row 13 (①, ㈱) inside `ESC $ B`, which no
    ISO-2022-JP codec of Python accepts; EUC-JIS-2004 has those characters
    at the same code points.
    """
    out = bytearray()
    mode = "ascii"
    i = 0
    while i < len(data):
        if data[i] == 0x1B:
            if data[i:i + 3] in (b"\x1b$B", b"\x1b$@"):
                mode, i = "jis", i + 3
                continue
            if data[i:i + 4] in (b"\x1b$(Q", b"\x1b$(O", b"\x1b$(D"):
                mode, i = "jis", i + 4
                continue
            if data[i:i + 3] in (b"\x1b(B", b"\x1b(J"):
                mode, i = "ascii", i + 3
                continue
            if data[i:i + 3] == b"\x1b(I":
                mode, i = "kana", i + 3
                continue
        b = data[i]
        if mode == "jis" and 0x21 <= b <= 0x7E and i + 1 < len(data):
            out += bytes((b | 0x80, data[i + 1] | 0x80))
            i += 2
        elif mode == "kana" and 0x21 <= b <= 0x5F:
            out += bytes((0x8E, b | 0x80))
            i += 1
        else:
            out.append(b)
            i += 1
    return bytes(out)


def _cp1252_fallback(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    chunk = error.object[error.start:error.end]
    return bytes(chunk).decode("cp1252", "replace"), error.end


codecs.register_error("cp1252-fallback", _cp1252_fallback)
_UTF8_SEQUENCE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")


def _detect(data: bytes) -> str | None:
    try:
        from charset_normalizer import from_bytes
    except ImportError:      # pragma: no cover - optional: replacement characters then
        return None
    best = from_bytes(data[:65536]).best()
    return best.encoding if best is not None else None


def _header_charsets(msg: Message, raw: bytes) -> tuple[str, ...]:
    """Charsets to read raw 8-bit header bytes with: those the message
    declares (multi-byte ones first: a Latin-1 reading never fails, so it
    goes last), else one detected from all the 8-bit lines of the message."""
    declared: list[str] = []
    for n, part in enumerate(msg.walk()):
        if n > 50:
            break
        charset = _charset(part)
        if charset is not None and _python_codec(charset) is not None \
                and charset.strip().strip("\"'").lower() not in ("us-ascii", "ascii"):
            declared.append(charset)
    latin = ("cp1252", "latin_1", "iso8859_15")
    ordered = [c for c in declared if _python_codec(c) not in latin] + \
              [c for c in declared if _python_codec(c) in latin]
    if not ordered:
        eight_bit = b"\n".join(ln for ln in raw[:65536].splitlines() if re.search(rb"[\x80-\xff]", ln))
        # a guess needs material: dozens of 8-bit bytes, not one umlaut
        if sum(b >= 0x80 for b in eight_bit) >= 32:
            guess = _detect(eight_bit)
            if guess:
                ordered.append(guess)
    return tuple(dict.fromkeys(ordered))


# -- body and attachments ---------------------------------------------------

def _walk(part: Message, out: _Parts, *, mode: str = "body") -> None:
    """Collect body text and attachments below `part`.

    `mode`: "body" (text parts are the body), "attach" (everything is an
    attachment: a signature part, say) or "alternative" (an alternative we
    did not choose: the same text in another form, only its files count).
    """
    out.count += 1
    if out.count > MAX_PARTS:
        out.defects.append("TooManyPartsDefect")
        return
    ctype = part.get_content_type()
    out.types.append(ctype)
    _usable_charset(part)
    payload = part.get_payload()
    # compat32 parses message/* bodies into lists of Messages: test them
    # before is_multipart(), which is true for them too
    if ctype in ("message/rfc822", "message/global"):
        _add_attached_message(part, out)
        return
    if part.get_content_maintype() == "message" and isinstance(payload, list):
        # message/delivery-status and friends (RFC 3464 §2.1): header blocks
        data = b"".join(_as_bytes(block) for block in payload if isinstance(block, Message))
        data = data.replace(b"\r\n", b"\n")
        data = data[:-1] if data.endswith(b"\n\n") else data    # the last block ends the part
        _add_attachment(out, part, data, _filename(part) or _described_name(part, ctype))
        return
    if part.is_multipart():
        children = [c for c in payload if isinstance(c, Message)]
        if any(c.get_content_type() in ("message/rfc822", "message/global") for c in children):
            bodies = _raw_child_bodies(out.raw, part.get_boundary())
            if bodies is not None and len(bodies) == len(children):
                out.raw_bodies.update((id(c), b) for c, b in zip(children, bodies, strict=True))
        if ctype == "multipart/alternative" and mode == "body":
            chosen = _choose_alternative(children)
            for child in children:
                _walk(child, out, mode="body" if child is chosen else "alternative")
            return
        if ctype == "multipart/signed" and children:
            # RFC 1847 §2.1: the first part is the content, the second the signature
            _walk(children[0], out, mode=mode)
            for child in children[1:]:
                _walk(child, out, mode="attach")
            return
        for child in children:
            _walk(child, out, mode=mode)
        return
    if part.get_content_maintype() == "multipart":
        # a multipart whose boundary never came (broken MIME): its text, if any, is kept
        data = _payload(part)
        if data.strip():
            _add_attachment(out, part, data, "attachment.txt", "text/plain")
        return
    filename = _filename(part)
    disposition = (part.get_content_disposition() or "").lower()
    is_text = ctype in ("text/plain", "text/html") and not filename and disposition != "attachment"
    if is_text and mode == "alternative":
        return
    data = _payload(part)
    if is_text and mode == "body" and ctype == "text/plain":
        text = decode_bytes(data, _charset(part), None)
        out.plain.append(_take_uuencoded(text, out))
        return
    if is_text and mode == "body":
        out.html.append((part, decode_bytes(data, _charset(part) or _meta_charset(data)),
                         data))
        return
    if ctype == "text/plain" and filename and disposition != "attachment" and mode == "body":
        # an inline text part that has a filename (Apple Mail, some phones): kept as the
        # attachment it names, and the body when the mail has no other text (issue 15)
        out.named_text.append(decode_bytes(data, _charset(part), None))
    is_tnef = ctype == "application/ms-tnef" or filename.lower() == "winmail.dat"
    if is_tnef and _unpack_tnef(data, out, body_allowed=mode == "body"):
        return
    _add_attachment(out, part, data, filename or _described_name(part, ctype))


def _raw_child_bodies(raw: bytes, boundary: str | None) -> list[bytes] | None:
    """The raw bodies of a multipart's parts, cut at its boundary (RFC 2046 §5.1.1),
    so that an attached message is kept exactly as it was sent."""
    if not boundary:
        return None
    delimiter = re.compile(rb"(?:^|\r?\n)--" + re.escape(boundary.encode("ascii", "surrogateescape"))
                           + rb"(--)?[ \t]*(?:\r?\n|$)")
    marks = list(delimiter.finditer(raw))
    bodies: list[bytes] = []
    for here, nxt in itertools.pairwise(marks):
        if here.group(1):           # the close-delimiter: what follows is the epilogue
            break
        segment = raw[here.end():nxt.start()]
        m = re.search(rb"\r?\n\r?\n", segment)
        if m is None and not re.match(rb"\r?\n", segment):
            return None
        bodies.append(segment[m.end():] if m is not None else segment.lstrip(b"\r\n"))
    return bodies


def _described_name(part: Message, ctype: str) -> str:
    """A name for a part without one: its Content-Description (RFC 2045 §8,
    "Delivery report.txt"), else the file name in its Content-ID (Outlook's
    "<image001.jpg@01D4...>"), else one after its type."""
    described = one_line(decode_header(part.get("Content-Description", "") or ""), 200)
    default = _default_name(ctype)
    ext = default.rpartition(".")[2] if "." in default else ""
    if described and len(described) < 100 and "/" not in described:
        return f"{described}.{ext}" if ext and not described.lower().endswith("." + ext) else described
    cid = _MSGID.search(str(part.get("Content-ID") or ""))
    local = cid.group(0)[1:-1].partition("@")[0] if cid else ""
    if re.fullmatch(r"[\w.-]{1,80}\.[A-Za-z0-9]{2,5}", local):
        return local
    return default


def _as_bytes(msg: Message) -> bytes:
    """A parsed message or header block written back as it came (no refolding)."""
    buf = io.BytesIO()
    try:
        email.generator.BytesGenerator(buf, mangle_from_=False, maxheaderlen=0,
                                       policy=compat32).flatten(msg)
        # the generator writes "Name: " for an empty value; the sender wrote "Name:"
        head, sep, body = buf.getvalue().partition(b"\n\n")
        return _EMPTY_HEADER.sub(rb"\1:\n", head + b"\n") [:-1] + sep + body

    except (LookupError, ValueError, UnicodeError, TypeError, IndexError, AttributeError):
        return str(msg).encode("utf-8", "surrogateescape")


def _choose_alternative(children: list[Message]) -> Message | None:
    """RFC 2046 §5.1.4 orders alternatives plainest first; we want text/plain,
    else the richest alternative that has any text (an empty text/plain
    beside the HTML, mail034 of Zammad's corpus, is no body)."""
    for child in children:
        if child.get_content_type() == "text/plain" and not _filename(child) and _has_text(child):
            return child
    for child in reversed(children):
        if any(p.get_content_type() in ("text/html", "text/plain") and _has_text(p)
               for p in child.walk()):
            return child
    return children[-1] if children else None


def _has_text(part: Message) -> bool:
    if part.is_multipart():
        return False
    return bool(decode_bytes(_payload(part), _charset(part)).strip())


def _usable_charset(part: Message) -> None:
    """A charset parameter no codec could be named by (`utf\\x008`: a NUL in it)
    makes compat32's get_payload raise ValueError; it is replaced by one that
    means "unknown", so the bytes are read as any undeclared text (project
    issue 14: such a mail was quarantined whole)."""
    value = _charset(part)
    if value is None or _python_codec(value) is not None:
        return
    try:
        "".encode("ascii").decode(value)
    except LookupError:
        return              # unknown but harmless: get_payload handles LookupError
    except ValueError:
        part.set_param("charset", "x-unknown")


def _charset(part: Message) -> str | None:
    value = part.get_param("charset")
    if isinstance(value, tuple):            # RFC 2231 encoded parameter
        value = email.utils.collapse_rfc2231_value(value)
    return value if isinstance(value, str) else None


def _payload(part: Message) -> bytes:
    """The transfer-decoded bytes of a leaf part (base64, quoted-printable, uuencode).

    Line breaks of parts sent as lines (7bit, 8bit, and quoted-printable
    text) are stored as "\n": on the wire they are CRLF (RFC 2045 §2.10), in
    a file or a pipe often LF, and the same attachment must hash the same
    however the mail arrived. Base64 content is kept byte for byte.
    """
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    try:
        clean = _clean_base64(part)
        data = part.get_payload(decode=True) if clean is None else clean
    except (ValueError, binascii.Error, AssertionError, LookupError):
        data = None
    if not isinstance(data, bytes):
        raw = part.get_payload()
        data = raw.encode("ascii", "surrogateescape") if isinstance(raw, str) else b""
    if cte == "base64" and any(isinstance(d, email.errors.InvalidBase64LengthDefect) for d in part.defects):
        data = _lenient_base64(part)
    if cte in ("x-uuencode", "uuencode", "x-uue", "uue") and not data.lstrip().startswith(b"begin"):
        # compat32 needs the "begin" line; senders leave it out (Zammad mail078)
        data = _uudecode_lines(data) if data.strip() and not _looks_decoded(part, data) else data
    textual = part.get_content_maintype() in ("text", "message")
    if cte not in ("base64", "binary") and (textual or cte != "quoted-printable"):
        # (quoted-printable binary keeps CRLF: a hard line break there is a
        # CRLF of the content, RFC 2045 §6.7 rule 4)
        data = data.replace(b"\r\n", b"\n")
    return data


_CLEAN_BASE64 = re.compile(r"[A-Za-z0-9+/\r\n]*(?:=[\r\n]*){0,2}")


def _clean_base64(part: Message) -> bytes | None:
    """`part.get_payload(decode=True)` of well-formed base64 (only the
    alphabet and line breaks, complete groups), without the stdlib's copies
    of the payload (encoded, split into lines, joined): a 15 MB attachment
    took 90 MB to decode (project issue 7). The same bytes and no defects,
    as the stdlib gives for such a payload; None for anything else, which
    goes the stdlib's way with its defects."""
    if part.is_multipart() or str(part.get("content-transfer-encoding", "")).lower() != "base64":
        return None
    payload = part.get_payload()
    if not isinstance(payload, str) or not _CLEAN_BASE64.fullmatch(payload) \
            or (len(payload) - payload.count("\r") - payload.count("\n")) % 4:
        return None
    return binascii.a2b_base64(payload)


def _lenient_base64(part: Message) -> bytes:
    """Base64 with a dangling last character, as some clients cut it: the
    complete groups decode (what other mail readers show), the rest is dropped."""
    raw = part.get_payload()
    text = raw if isinstance(raw, str) else ""
    clean = re.sub(r"[^A-Za-z0-9+/]", "", text)
    clean = clean[: len(clean) - len(clean) % 4]
    try:
        return binascii.a2b_base64(clean)
    except binascii.Error:
        return text.encode("ascii", "surrogateescape")


def _looks_decoded(part: Message, data: bytes) -> bool:
    raw = part.get_payload()
    return isinstance(raw, str) and raw.encode("ascii", "surrogateescape") != data


def _uudecode_lines(data: bytes) -> bytes:
    out = bytearray()
    for line in data.splitlines():
        if not line.strip() or line.strip() in (b"`", b"end"):
            continue
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            return data
    return bytes(out)


def _meta_charset(data: bytes) -> str | None:
    m = _META_CHARSET.search(data[:4096])
    return m.group(1).decode("ascii") if m else None


def _filename(part: Message) -> str:
    raw = _raw_all(part, "Content-Disposition") + _raw_all(part, "Content-Type")
    if any(_unescape_8bit(v, ()) != v for v in raw):
        # an unencoded 8-bit file name: read the parameters from decoded values
        decoded = Message()
        for header in ("Content-Disposition", "Content-Type"):
            value = _raw_header(part, header)
            if value:
                decoded[header] = _unescape_8bit(value, ())
        part = decoded
    try:
        name: object = part.get_filename()
    except (LookupError, ValueError, TypeError):
        name = None
    if isinstance(name, tuple):      # pragma: no cover - RFC 2231 with an unknown charset
        name = email.utils.collapse_rfc2231_value(name)
    return one_line(decode_header(name), 255) if isinstance(name, str) and name else ""


def _default_name(ctype: str) -> str:
    known = {"message/delivery-status": "delivery-status.txt",
             "message/disposition-notification": "disposition-notification.txt",
             "message/feedback-report": "feedback-report.txt",
             "text/rfc822-headers": "returned-headers.txt",
             "text/html": "message.html", "text/plain": "message.txt"}
    if ctype in known:
        return known[ctype]
    ext = mimetypes.guess_extension(ctype, strict=False)
    return "attachment" + (ext or "")


def _add_attachment(out: _Parts, part: Message | None, data: bytes, filename: str,
                    ctype: str | None = None) -> None:
    if part is not None:
        ctype = ctype or part.get_content_type()
        cid = one_line(str(part.get("Content-ID") or ""), 255)
    else:
        cid = ""
    out.attachments.append((Attachment(
        # The sender's name is kept for display only; content is stored by hash.
        filename=one_line(filename, 255) or "attachment",
        content_type=one_line(ctype or "application/octet-stream", 200),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content_id=cid,
    ), data))


def _add_attached_message(part: Message, out: _Parts) -> None:
    """An attached or forwarded message is kept whole, as an .eml file."""
    payload = part.get_payload()
    inner = payload[0] if isinstance(payload, list) and payload else None
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    raw_body = out.raw_bodies.get(id(part))
    if isinstance(inner, Message):
        # the bytes as sent where the boundary finds them (RFC 2046 §5.2.1
        # allows only 7bit, 8bit or binary here), else written back
        data = raw_body if raw_body is not None and cte in ("", "7bit", "8bit", "binary") \
            else _as_bytes(inner)
        data = data.replace(b"\r\n", b"\n")      # stored with "\n" line breaks, as text parts
        subject = decode_header(_raw_header(inner, "Subject"), _header_charsets(inner, data))
    else:
        data = _payload(part)
        subject = ""
    name = _filename(part) or one_line(decode_header(part.get("Content-Description", "") or ""), 200) \
        or one_line(subject, 200) or "message"
    name = name.replace("/", "_")
    if not name.lower().endswith(".eml"):
        name += ".eml"
    _add_attachment(out, part, data, name, "message/rfc822")


def _take_uuencoded(text: str, out: _Parts) -> str:
    """Files uuencoded inside a text body (Lotus Notes, old Outlook) become attachments."""
    if "begin " not in text:
        return text

    ends = [(m.start(), m.end()) for m in _UU_END.finditer(text)]
    if not ends:
        return text
    kept: list[str] = []
    pos = 0                 # text before pos is decided
    k = 0                   # ends[k:] may still close a block
    for begin in _UU_BEGIN.finditer(text):
        if begin.start() < pos:
            continue        # inside a block taken already, or one left as text
        while k < len(ends) and ends[k][0] < begin.end():
            k += 1
        if k == len(ends):
            break           # no end line after this begin: neither after any later one
        end_start, end_end = ends[k]
        data = bytearray()
        try:
            for line in text[begin.end():end_start].splitlines():
                if line.strip() and line.strip() != "`":
                    data += binascii.a2b_uu(line)
        except binascii.Error:
            # not uuencoded after all: leave the text alone, up to and with its end line
            kept.append(text[pos:end_end])
        else:
            kept.append(text[pos:begin.start()])
            _add_attachment(out, None, bytes(data), begin.group(1).strip(), "application/octet-stream")
        pos = end_end
    kept.append(text[pos:])
    return "".join(kept)


def _unpack_tnef(data: bytes, out: _Parts, *, body_allowed: bool) -> bool:
    """Unpack winmail.dat; False when it is no TNEF we can read (kept as a file then)."""
    try:
        from tnefparse import TNEF
        tnef = TNEF(data)
    except Exception:  # noqa: BLE001 - any failure: keep winmail.dat as it is
        return False
    files = []
    for a in tnef.attachments:
        if isinstance(a.data, bytes):
            name: str | None
            try:
                name = a.long_filename() or a.name
            except (UnicodeDecodeError, AttributeError):
                name = ""
            files.append((str(name or "attachment"), a.data))
    body, html = tnef.body or "", tnef.htmlbody or ""
    # older TNEF carries the body as bytes in the sender's code page
    codepage = tnef.codepage or "cp1252"
    body = body if isinstance(body, str) else decode_bytes(bytes(body), codepage).rstrip("\x00")
    html = html if isinstance(html, str) else decode_bytes(bytes(html), codepage).rstrip("\x00")
    if not files and not body and not html:
        return False
    for name, content in files:
        _add_attachment(out, None, content, name, "application/octet-stream")
    if body_allowed and not out.plain and not out.html:
        if body:
            out.plain.append(body)
        elif html:
            out.html.append((Message(), html, html.encode("utf-8")))
    return True
