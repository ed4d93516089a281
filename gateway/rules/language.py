"""Which language to answer a customer in (pure).

Evidence, strongest first:

1. the customer directory's `language` for the customer (set by the team);
2. what the customer's mail client says: `Accept-Language` (the languages the
   reader wants, RFC 9110 §12.5.4, with q-values; Outlook and Exchange send
   it) and then `Content-Language` (the language of the text, RFC 3282); a
   tag's primary subtag counts, so `de-AT` and `de_CH` are German;
3. the text itself: Japanese by its script (kana and kanji, with kana present:
   Chinese has no kana), German against English by the share of common words
   of each, with words written with ä/ö/ü/ß as German;
4. the mailbox's default.

A mail client's headers describe its setup rather than the writer: an
English Outlook in a German office labels German text `en-US`. So when the
text is *conclusively* in another supported language (long enough and
nearly all of one language), the text overrides the headers; the directory
always wins, because people set it.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

SUPPORTED = ("en", "de", "ja")
FALLBACK = "en"
NAMES = {"en": "English", "de": "German", "ja": "Japanese"}

# ISO 639-2/3 codes that directories and some clients use instead of 639-1
_THREE_LETTER = {"eng": "en", "deu": "de", "ger": "de", "gsw": "de", "jpn": "ja"}

# Only the first part of a long mail is read: the language is settled within
# a few hundred words, and this runs on the intake's hot path.
MAX_CHARS = 5000

# Common words that occur in one language only. Words both languages use
# ("in", "an", "so", "was", "will", "also", "am", "man", "problem") are in
# neither list, and neither are words of error messages, which both German
# and English mails quote in English.
_GERMAN = frozenset("""
der die das des dem den ein eine einen einem einer eines und oder aber nicht kein keine keinen
ist sind war waren bin bist sein wird werden wurde wurden hat habe haben hatte hätte kann können
könnte könnten muss müssen soll sollte möchte möchten würde würden ich du er wir ihr sie ihnen
ihre ihrer ihren uns unser unsere unserer unseren unserem mich mir dich dir sich es mit auf für
von vom zum zur bei beim nach seit über unter ohne durch gegen zu aus als wie wenn dass ob weil
noch nur schon auch doch mal hier dort jetzt heute gestern morgen immer wieder mehr sehr bitte
danke vielen viele dank grüße gruß freundlichen hallo guten geehrte geehrter damen herren leider
diese dieser dieses diesen diesem gibt geht funktioniert fehl seit um dann denn etwas nichts alle
alles
""".split())
_ENGLISH = frozenset("""
the and or but not no is are was were be been being has have had having do does did done can
could would should shall must may might i you he she we they me him her us them my your his its
our their this that these those there here with on at by from for of to into about after before
since when what which who why how where if than then just still again now today yesterday
tomorrow please thanks thank hello hi dear regards best sincerely any all some it's i'm we're
don't doesn't didn't can't won't isn't aren't wasn't we've i've you're help issue get got
""".split())
_WORD = re.compile(r"[a-zäöüß]+(?:'[a-z]+)?")
_LATIN_WORD = re.compile(r"[A-Za-zÀ-ÿ]{2,}")
_HIRAGANA = re.compile(r"[\u3040-\u309f]")
_KATAKANA = re.compile(r"[\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f]")    # with half-width forms
_KANJI = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff]")
_QUOTED_LINE = re.compile(r"^[ \t]*>.*$", re.MULTILINE)
# bounded: "\S+@" would try every start of a long run without blanks (quadratic)
_URL_OR_ADDRESS = re.compile(r"[^\s@]{1,64}@\S{1,255}|\bhttps?://\S+|\bwww\.\S+", re.IGNORECASE)


@dataclass(frozen=True)
class Detected:
    """What the text says: a language (or None: too little or too mixed to tell),
    how sure (the winning share, 0-1) and whether that is conclusive."""

    language: str | None
    share: float
    conclusive: bool
    reason: str


def choose_language(*, directory_language: str | None, content_language: str | None,
                    accept_language: str | None, text: str, default: str) -> tuple[str, str]:
    """The language to answer in, among `SUPPORTED`, and why (for the ticket's evidence)."""
    listed = primary(directory_language) if directory_language else None
    if listed in SUPPORTED:
        return listed, f"customer directory: {directory_language}"
    skipped = f"; customer directory's {directory_language!r} is not supported" \
        if directory_language and directory_language.strip() else ""

    header: tuple[str, str] | None = None
    if accept_language:
        found = best_accepted(accept_language)
        if found:
            header = found[0], f"Accept-Language {found[1]!r}"
    if header is None and content_language:
        found = first_content_language(content_language)
        if found:
            header = found[0], f"Content-Language {found[1]!r}"

    detected = detect_language(text)
    if header is not None:
        if detected.conclusive and detected.language not in (None, header[0]):
            return detected.language or FALLBACK, \
                f"text: {detected.reason}, over the mail client's {header[1]}{skipped}"
        return header[0], f"{header[1]}{skipped}"
    if detected.language is not None:
        return detected.language, f"text: {detected.reason}{skipped}"
    fallback = primary(default)
    if fallback in SUPPORTED:
        return fallback, f"mailbox default: {default} ({detected.reason}){skipped}"
    return FALLBACK, f"mailbox default {default!r} is not supported: {FALLBACK} ({detected.reason}){skipped}"


def primary(tag: str | None) -> str | None:
    """The primary language subtag of a language tag (RFC 5646 §2.2.1), lower case:
    `de-AT` → `de`, `de_CH` → `de`, `JA-jp` → `ja`, `deu` → `de`; None for `*`,
    `i-default`, `x-private` and what is no language tag at all."""
    if not tag:
        return None
    first = tag.strip().replace("_", "-").split("-", 1)[0].lower()
    if not first.isascii() or not first.isalpha() or len(first) not in (2, 3):
        return None
    return _THREE_LETTER.get(first, first)


def accept_language_ranges(value: str) -> list[tuple[str, float]]:
    """The language ranges of an Accept-Language value with their q-values,
    best first, equal weights in the order given (RFC 9110 §12.4.2, §12.5.4).
    A malformed q-value drops its range; `q=0` ("not acceptable") is kept, as 0."""
    ranges: list[tuple[str, float, int]] = []
    for n, item in enumerate(_without_comments(value).split(",")):
        tag, *params = (p.strip() for p in item.split(";"))
        if not tag:
            continue
        q = 1.0
        for p in params:
            name, _, raw = p.partition("=")
            if name.strip().lower() != "q":
                continue
            try:
                q = float(raw.strip())
            except ValueError:
                q = -1.0
            if not 0.0 <= q <= 1.0 or len(raw.strip()) > 5:
                q = -1.0
        if q >= 0:
            ranges.append((tag, q, n))
    ranges.sort(key=lambda r: (-r[1], r[2]))
    return [(tag, q) for tag, q, _ in ranges]


def best_accepted(value: str) -> tuple[str, str] | None:
    """The supported language the reader accepts most, and the range that says so."""
    refused = {primary(tag) for tag, q in accept_language_ranges(value) if q == 0}
    for tag, q in accept_language_ranges(value):
        lang = primary(tag)
        if q > 0 and lang in SUPPORTED and lang not in refused:
            return lang, tag if q == 1.0 else f"{tag};q={q:g}"
    return None


def first_content_language(value: str) -> tuple[str, str] | None:
    """The first supported language of a Content-Language list (RFC 3282 §2)."""
    for tag in _without_comments(value).split(","):
        lang = primary(tag)
        if lang in SUPPORTED:
            return lang, tag.strip()
    return None


def detect_language(text: str) -> Detected:
    """The language of `text` among `SUPPORTED`, from its script and its common words.

    Quoted lines (`>`), addresses and links are left out: they are somebody
    else's words or no words at all.
    """
    sample = _URL_OR_ADDRESS.sub(" ", _QUOTED_LINE.sub("", text[:MAX_CHARS]))
    hiragana = katakana = kanji = 0
    if not sample.isascii():
        hiragana = len(_HIRAGANA.findall(sample))
        katakana = len(_KATAKANA.findall(sample))
        kanji = len(_KANJI.findall(sample))
    latin_words = len(_LATIN_WORD.findall(sample))
    kana = hiragana + katakana
    if kana >= 3:
        # A Japanese word is two to three characters: half a character per
        # Latin word keeps a pasted English log from outvoting the writer.
        units = (kana + kanji) / 2
        share = units / (units + latin_words)
        if share >= 0.3:
            return Detected("ja", share, share >= 0.5 and hiragana >= 10,
                            f"Japanese script (kana/kanji) {share:.0%} of the words")

    german = english = 0
    for word, n in Counter(_WORD.findall(sample.lower())).items():
        if word in _GERMAN or not word.isascii():     # ä, ö, ü, ß: German spelling
            german += n
        elif word in _ENGLISH:
            english += n
    total = german + english
    if total < 3:
        return Detected(None, 0.0, False, "too little text to tell")
    share_de = german / total
    if share_de >= 0.6:
        return Detected("de", share_de, share_de >= 0.8 and german >= 8,
                        f"{german} of {total} common words German")
    if share_de <= 0.4:
        return Detected("en", 1 - share_de, share_de <= 0.2 and english >= 8,
                        f"{english} of {total} common words English")
    return Detected(None, max(share_de, 1 - share_de), False,
                    f"German and English mixed ({german} German, {english} English common words)")


def _without_comments(value: str) -> str:
    # RFC 5322 comments are allowed in Content-Language (RFC 3282 §2)
    return re.sub(r"\([^()]*\)", "", value)


# -- the first-response promise, in the customer's language -------------------

_WEEKDAYS = {
    "en": ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"),
    "de": ("Mo", "Di", "Mi", "Do", "Fr", "Sa", "So"),
    "ja": ("月", "火", "水", "木", "金", "土", "日"),
}
_MONTHS_DE = ("Jan.", "Feb.", "März", "Apr.", "Mai", "Juni", "Juli", "Aug.", "Sept.", "Okt.",
              "Nov.", "Dez.")


def target_text(language: str, target: Any, due: datetime, calendar: Any | None) -> str:
    """The acknowledgement's promise: the plan's target and when it falls due, in
    the calendar's time zone. `target` is a `rules_config.Target`, `calendar` a
    `sla.BusinessCalendar` or None (24/7). In English it is exactly what
    `Desk.target_text` says; the templates put it after "Our first answer is
    due", "Unsere erste Antwort erhalten Sie" and "初回回答の期限："."""
    from zoneinfo import ZoneInfo

    when = due.astimezone(ZoneInfo(calendar.timezone) if calendar is not None else UTC)
    hours = f"{target.hours:g}"
    zone = when.tzname() or "UTC"
    if language == "de":
        if target.around_the_clock:
            span = f"{hours} {'Stunde' if target.hours == 1 else 'Stunden'} rund um die Uhr"
        else:
            span = f"{hours} {'Geschäftsstunde' if target.hours == 1 else 'Geschäftsstunden'}"
        where = ""
        if calendar is not None:
            days = ", ".join(_WEEKDAYS["de"][d] for d in sorted(calendar.weekdays))
            where = (f" ({days} {calendar.start:%H:%M}–{calendar.end:%H:%M} Uhr {calendar.timezone}, "
                     f"Feiertage {_holidays(calendar, 'keine')})")
        at = (f"{_WEEKDAYS['de'][when.weekday()]}., {when.day}. {_MONTHS_DE[when.month - 1]} "
              f"{when.year}, {when:%H:%M} Uhr {zone}")
        return f"innerhalb von {span}{where}, spätestens bis {at}"
    if language == "ja":
        span = f"{hours}時間以内・24時間対応" if target.around_the_clock else f"{hours}営業時間以内"
        where = ""
        if calendar is not None:
            days = "・".join(_WEEKDAYS["ja"][d] for d in sorted(calendar.weekdays))
            where = (f"、営業時間：{days} {calendar.start:%H:%M}〜{calendar.end:%H:%M} "
                     f"{calendar.timezone}、祝日：{_holidays(calendar, 'なし')}")
        at = (f"{when.year}年{when.month}月{when.day}日（{_WEEKDAYS['ja'][when.weekday()]}）"
              f"{when:%H:%M} {zone}")
        return f"{at}（{span}{where}）"
    unit = "hour" if target.hours == 1 else "hours"
    span = f"{hours} {unit} 24/7" if target.around_the_clock else f"{hours} business {unit}"
    where = f" ({calendar.describe()})" if calendar is not None else ""
    return f"within {span}{where}: by {when.strftime('%a %d %b %Y, %H:%M %Z')}"


def _holidays(calendar: Any, none: str) -> str:
    if not calendar.holiday_country:
        return none
    sub = f"-{calendar.holiday_subdivision}" if calendar.holiday_subdivision else ""
    return f"{calendar.holiday_country}{sub}"
