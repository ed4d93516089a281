"""The new part of a reply: quoted history and signature taken off.

Mail clients mark where the quoted history starts in a handful of ways, and
the text is cut at the first one found:

- the gateway's own "-- Reply above this line --" marker;
- separator lines: Outlook's `-----Original Message-----` (and its
  translations), `---- On ... wrote ----` (Zoho), `________` (Outlook on
  the web and mobile);
- Outlook header blocks: `From:` followed by `Sent:`/`Date:`/`To:`/`Subject:`
  (and `Von:`/`Gesendet:`/`An:`/`Betreff:`, `De :`/`Envoyé :`/`À :`/`Objet :`,
  Dutch, Italian, Spanish, Portuguese, Nordic, Polish, Russian), also written
  `*From:*` or on one line, as HTML-to-text leaves them;
- attribution lines, possibly wrapped over up to three lines: `On ... wrote:`
  (Gmail, Apple Mail, Thunderbird), `Am ... schrieb ...:`, `Le ... a écrit :`
  and the other languages' verbs, or a date and `<address>:` (Gmail and
  Yandex in many languages). When the lines after one are quoted with `>`,
  the attribution and the quoted lines are dropped and unquoted text below
  them is kept: that is an inline or bottom-posted answer (Thunderbird);
- a mobile client's tagline (`Sent from my iPhone`, `Get Outlook for iOS`,
  `Von meinem iPhone gesendet`), after which Outlook mobile puts the quote
  without any header;
- the signature delimiter `-- ` (RFC 3676 §4.3; clients that strip trailing
  blanks send `--`).

Lines quoted with `>` are dropped. A closing and a name ("Thanks,\\nAnn")
are part of what the person wrote and stay. When nothing would be left, the
whole text is kept: losing a customer's words is worse than showing a quote.

For HTML-only mail, `reply_text(text, html=...)` first removes the quote
containers that clients mark in the markup (Gmail's `gmail_quote`,
Outlook's `divRplyFwdMsg` / `appendonsend` / `OLK_SRC_BODY_SECTION` and the
border-top header div, Thunderbird's `moz-cite-prefix`, Apple Mail's
`blockquote type=cite`, Yahoo's `yahoo_quoted`), then applies the text rules.
"""
from __future__ import annotations

import re

import lxml.html
from inscriptis import get_text
from lxml import etree

REPLY_MARKER = "-- Reply above this line --"

_MARKER = re.compile(r"^\s*-+\s*Reply above this line\s*-+\s*$", re.IGNORECASE)

# "-----Original Message-----", "-------- Message d'origine --------",
# "---------- Forwarded message ---------", "---- On ... wrote ----" (Zoho)
_DASHED = re.compile(r"^\s*-{2,}\s*[^\s-][^\n]{1,200}?\s*-{2,}\s*$")
# Outlook on the web / mobile draw the boundary with underscores, and mailing
# lists their footer (a line of only underscores)
_UNDERSCORES = re.compile(r"^\s*_{2,}\s*$")
_ORIGINAL = re.compile(
    r"^\s*-*\s*(?:original message|ursprüngliche nachricht|message d'origine|oprindelig besked"
    r"|opprinnelig melding|ursprungligt meddelande|mensaje original|mensagem original"
    r"|messaggio originale|oorspronkelijk bericht|wiadomość oryginalna|исходное сообщение)\s*-*\s*$",
    re.IGNORECASE)

# Header labels of a quoted header block, per language (Outlook writes them in
# the user's language; French puts a blank before the colon).
_FROM_LABELS = ("from", "von", "de", "van", "da", "fra", "från", "od", "от", "lähettäjä",
                "feladó", "kimden", "mittente", "remetente", "message du")
_OTHER_LABELS = ("sent", "date", "to", "subject", "cc", "gesendet", "datum", "an", "betreff",
                 "envoyé", "envoyé le", "à", "a", "objet", "copie à", "verzonden", "aan",
                 "onderwerp", "inviato", "oggetto", "enviado", "enviada", "para", "asunto",
                 "assunto", "fecha", "data", "dato", "til", "emne", "sendt", "skickat", "till",
                 "ämne", "wysłane", "do", "temat", "отправлено", "кому", "тема", "дата",
                 "lähetetty", "vastaanottaja", "aihe", "reply-to", "antwort an", "organization")
_LABEL = r"\s*\*?\s*({})\s?\*?\s?:"
_FROM_LINE = re.compile("^" + _LABEL.format("|".join(map(re.escape, _FROM_LABELS))), re.IGNORECASE)
_OTHER_LINE = re.compile("^" + _LABEL.format("|".join(map(re.escape, _OTHER_LABELS))), re.IGNORECASE)
# "From: Ann Sent: Monday To: Bob Subject: x" on one line (HTML turned into text)
_ONE_LINE_BLOCK = re.compile(
    r"^\s*\*?(?:from|von|de|van|da)\s?\*?\s?:.{1,200}?\b(?:sent|date|gesendet|datum|envoyé|verzonden"
    r"|inviato|enviado)\s?\*?\s?:", re.IGNORECASE)

# Verbs of attribution lines ("On <date>, <name> wrote:") in the languages of
# the reply corpora and the gateway's customers.
_VERBS = (r"wrote|writes|schrieb|schreef|(?:a\s)?écrit|escribió|escreveu|ha\sscritto|scrisse"
          r"|napisał(?:\(a\))?|napisala|написал(?:\(а\))?|написала|пишет|skrev|kirjoitti|írta"
          r"|yazdı|napsal(?:\(a\))?|napísal|έγραψε|hat\sgeschrieben|heeft\sgeschreven")
_ATTRIBUTION = re.compile(rf"(?:^|[\s,>\"])(?:{_VERBS})(?=[\s:]|$)", re.IGNORECASE)
_ATTRIBUTION_END = re.compile(r"(?::|\bwrote|\bschrieb|\bécrit)\s*-*\s*$", re.IGNORECASE)
# "26.06.2014, 14:41, "Alexander L" <abc@example.com>:" (Yandex, Gmail in many languages)
_ADDRESS_COLON = re.compile(r"<[^<>\s]+@[^<>\s]+>\s*:\s*$")
_DATE_OR_TIME = re.compile(r"\b(?:19|20)\d\d\b|\b\d{1,2}[:.]\d\d\b")

_TAGLINE = re.compile(
    r"^\s*(?:sent\s(?:from|with|using)|get\soutlook\sfor|envoyé\s(?:de|depuis|à\spartir\sde)"
    r"|gesendet\s(?:von|mit)|von\smeinem\s.{1,40}\sgesendet|enviado\s(?:desde|do)|inviato\sda"
    r"|verzonden\s(?:met|vanaf)|skickat\sfrån|sendt\sfra|wysłane\sz|отправлено\sс)"
    r"\b[^,.;!?\n]{0,60}?(?:<[^>\s]+>|\(https?://[^)\s]+\))?\s*$", re.IGNORECASE)
_SIGNATURE = re.compile(r"^-- ?$")
_LONGEST_MARKER = 1000      # no marker or attribution line is longer
# a line quoted with ">" (RFC 3676 §4.5), but not the ">:" that ends a wrapped
# "... <address\n>:" attribution
_QUOTED = re.compile(r"^\s*>(?!\s*:\s*$)")
# how an attribution's first line starts: an opener word, a date, or a short
# weekday name and a number ("tir. 18. apr.", "ср, 30 апр.", "Mon, 23 Nov")
_OPENER = re.compile(r"^\s*(?:(?:on|am|le|el|il|em|op|den|dnia|w\sdniu|in\sdata|il\sgiorno|dne|på)\b"
                     r"|\d|\w{2,4}\.?,?\s+\d)", re.IGNORECASE)
_SEPARATOR_ONLY = re.compile(r"^[\s\-_=*~—–]+$")


def reply_text(body: str, *, html: str | None = None) -> str:
    """The new text of `body`; `html`, for HTML-only mail, lets quote markup help."""
    text = _normalize(body)
    if html:
        cut = _html_without_quote(html)
        if cut is not None and cut.strip():
            text = _normalize(cut)
    new = _cut(text)
    return new or body.strip()


def _normalize(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # non-breaking and zero-width characters hide markers from the patterns
    return text.replace("\u00a0", " ").replace("\u200b", "").replace("\u200e", "").replace("\ufeff", "")


def _cut(text: str) -> str:
    lines = text.split("\n")
    end = len(lines)
    dropped: set[int] = set()
    i = 0
    while i < end:
        line = lines[i]
        if _QUOTED.match(line) or not line.strip():
            i += 1
            continue
        if _hard_boundary(lines, i):
            end = i
            break
        size = _attribution(lines, i)
        if size:
            after = next((ln for ln in lines[i + size:] if ln.strip()), "")
            if not _QUOTED.match(after):
                end = i            # the quote that follows is not marked: it runs to the end
                break
            dropped.update(range(i, i + size))   # inline or bottom-posted answer below
            i += size
            continue
        i += 1
    body = lines[:end]
    quoted = [bool(_QUOTED.match(ln)) or n in dropped for n, ln in enumerate(body)]
    _absorb_wrapped_quote_lines(body, quoted)
    kept: list[str] = []
    removed = False
    for ln, q in zip(body, quoted, strict=True):
        if q:
            removed = True
        elif not ln.strip() and removed and kept and not kept[-1].strip():
            continue            # the blank lines around a removed quote collapse into one
        else:
            kept.append(ln)
            removed = removed and not ln.strip()
    while kept and (not kept[-1].strip() or _SEPARATOR_ONLY.match(kept[-1])):
        kept.pop()
    while kept and not kept[0].strip():
        kept.pop(0)
    return "\n".join(kept).strip()


def _absorb_wrapped_quote_lines(lines: list[str], quoted: list[bool]) -> None:
    """Unquoted lines wedged between quoted lines, with no blank line around them,
    are a quote that the client re-wrapped without its ">" (they are not an
    inline answer, which clients set apart with blank lines)."""
    n = 0
    while n < len(lines):
        if quoted[n] or not lines[n].strip() or n == 0 or not quoted[n - 1] or not lines[n - 1].strip():
            n += 1
            continue
        run_end = n
        while run_end < len(lines) and not quoted[run_end] and lines[run_end].strip():
            run_end += 1
        if run_end < len(lines) and quoted[run_end] and _QUOTED.match(lines[run_end]):
            for k in range(n, run_end):
                quoted[k] = True
        n = run_end


def _hard_boundary(lines: list[str], i: int) -> bool:
    """Whether quoted history or a signature starts at line `i` and runs to the end."""
    if len(lines[i]) > _LONGEST_MARKER:
        return False
    # stripped first: patterns that begin with \s* backtrack quadratically on the
    # long runs of blanks that HTML-to-text indentation leaves
    line = lines[i].strip()
    if _SIGNATURE.match(lines[i].rstrip()) or _MARKER.match(line) or _UNDERSCORES.match(line):
        return True
    if _ORIGINAL.match(line) or (_DASHED.match(line) and not _SEPARATOR_ONLY.match(line)):
        return True
    if _TAGLINE.match(line) and (i == 0 or not lines[i - 1].strip()):
        return True
    if _ONE_LINE_BLOCK.match(line):
        return True
    if _FROM_LINE.match(line):
        # a header block: another header label within the next few lines
        # (a long From: wraps, email_outlook_split_line_from)
        for nxt in lines[i + 1:i + 4]:
            if len(nxt) < _LONGEST_MARKER and _OTHER_LINE.match(nxt.strip()):
                return True
    return False


def _attribution(lines: list[str], i: int) -> int:
    """How many lines (1-3) the attribution starting at line `i` spans; 0 if none.

    Clients wrap long attributions ("On Mon, ... Ann <\nann@example.com> wrote:"),
    so windows of up to three lines are tried. A window of more than one line
    must start like an attribution, so that a text line right above a one-line
    attribution is not taken for part of it.
    """
    window: list[str] = []
    for ln in lines[i:i + 3]:
        if not ln.strip() or _QUOTED.match(ln) or len(ln) > _LONGEST_MARKER:
            return 0
        window.append(ln.strip())
        if len(window) > 1 and not _OPENER.match(window[0]):
            return 0
        # "... <\nann@example.com> wrote:" / "<ann@example.com\n>:" joined back
        joined = re.sub(r"<\s+", "<", re.sub(r"\s+>", ">", " ".join(window)))
        if len(joined) > 400:
            return 0
        if not _ATTRIBUTION_END.search(joined):
            continue
        if _ATTRIBUTION.search(joined) and re.search(r"\d|@", joined):
            return len(window)
        if _ADDRESS_COLON.search(joined) and _DATE_OR_TIME.search(joined):
            return len(window)
    return 0


# -- HTML ------------------------------------------------------------------

# Containers that clients put the quoted mail in: everything from the first
# of them to the end of the document is history.
_QUOTE_PATHS = (
    "//*[contains(concat(' ', normalize-space(@class), ' '), ' gmail_quote ')]",
    "//*[contains(concat(' ', normalize-space(@class), ' '), ' gmail_attr ')]",
    ("//*[@id='divRplyFwdMsg' or @id='appendonsend' or @id='OLK_SRC_BODY_SECTION'"
     " or @id='mail-editor-reference-message-container' or @id='stopSpelling']"),
    "//*[contains(concat(' ', normalize-space(@class), ' '), ' moz-cite-prefix ')]",
    "//*[contains(concat(' ', normalize-space(@class), ' '), ' yahoo_quoted ')]",
    "//blockquote[@type='cite']",
    "//*[contains(translate(@style, 'ABCDEF ', 'abcdef'), 'border-top:solid#b5c4df')]",
    "//*[contains(translate(@style, 'ABCDEF ', 'abcdef'), 'border-top:solid#e1e1e1')]",
    "//*[contains(translate(@style, ' ', ''), 'border-top:solidrgb(225,225,225)')]",
)
_QUOTE_XPATH = " | ".join(_QUOTE_PATHS)


_PARSER = lxml.html.HTMLParser(encoding="utf-8")


def _html_without_quote(html: str) -> str | None:
    """The text of `html` without the quote containers clients mark; None if unparsable."""
    try:
        # bytes, so that an "<?xml ... encoding=...?>" declaration is no error
        root = lxml.html.document_fromstring(html.encode("utf-8", "surrogatepass"), parser=_PARSER)
    except (etree.ParserError, ValueError):
        return None
    for el in root.iter("script", "style"):
        el.drop_tree()
    found = root.xpath(_QUOTE_XPATH)
    # <hr> followed by a From: header block (Outlook 2003, Windows Mail, AOL)
    for hr in root.iter("hr"):
        after = (hr.tail or "") + " ".join(sib.text_content() for sib in hr.itersiblings())[:200]
        if _FROM_LINE.match(after.strip()) or _ONE_LINE_BLOCK.match(after.strip()):
            found.append(hr)
    if found:
        order = {el: n for n, el in enumerate(root.iter())}
        _drop_from(min(found, key=lambda el: order.get(el, 0)))
    return get_text(lxml.html.tostring(root, encoding="unicode"))


def _drop_from(el: etree._Element) -> None:
    """Remove `el` and everything after it in document order."""
    node = el
    while node is not None and node.getparent() is not None:
        parent = node.getparent()
        for sibling in list(node.itersiblings()):
            parent.remove(sibling)
        node = parent
    el_parent = el.getparent()
    if el_parent is not None:
        el.tail = None
        el_parent.remove(el)
