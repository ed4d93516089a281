"""The rules stage: what kind of ticket a new mail makes, and why (pure).

`decide` takes the parsed mail, the mailbox it reached, the rules
(`gateway.rules.settings`), the customer directory and the time, and returns a
`Decision`: region, GovCloud, priority, staff queue, plan, redirect, missing
form fields and the first-response due time, each with the `Evidence` that
decided it (which rule, quoting the header or line). Like Mailman's chain
rules, every rule records its hit, so `gateway explain` needs no second
implementation.

Which text each rule reads, and why:
- Form fields (`Region:`, `Priority:`, `Organisation:` ...) are looked up in
  the new text (`reply_text`) first, then in the whole body, so that a
  forwarded form still counts.
- Priority wording and redirect wording read the subject and the new text
  only: a quoted old mail ("... was down last week") must not set today's
  priority, and a phrase right after a negation ("no outage", "kein
  Ausfall", "isn't slow") does not count.
- GovCloud mentions read the whole body: routing GovCloud data to the
  commercial desk is a compliance incident, so a quoted mention is enough.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from gateway.model import ParsedMail, normalize_address
from gateway.rules import contacts, process
from gateway.rules.contacts import Standing
from gateway.rules.countries import region_of_domain
from gateway.rules.settings import Customer, CustomerDirectory, RulesConfig, Target, Wording, normalise_value
from gateway.rules.sla import BusinessCalendar, response_due

GOVCLOUD_QUEUE = "GOVCLOUD"

# How far back from a phrase a negation word may stand ("there is no real
# outage"): three words, never across a clause boundary.
NEGATION_WINDOW = 3
_LOOKBACK = 120          # characters: comfortably more than three words
# German puts "nicht" after the verb: "die Produktion steht nicht".
_TRAILING_NEGATIONS = frozenset({"nicht"})
# Japanese negates after the word: "障害ではありません" (it is not an outage)
_TRAILING_NEGATION_JA = re.compile(r"\s*(?:では|じゃ)(?:ありません|ない|なく|ございません)")
# Hiragana, Katakana (with the long-vowel mark) and the CJK ideographs
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_CLAUSE_END = re.compile(r"[.!?;,:\n]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_ADDRESS = re.compile(r"[^\s@<>:;,]+@[^\s@<>:;,]+\.\w+")
_MAX_SCAN = 100_000
_MAX_VALUE = 300         # characters of a form value worth reading
_NO_VALUE = frozenset({"", "-", "--", "n a", "na", "none", "keine", "nicht vorhanden", "unknown"})


@dataclass(frozen=True)
class Evidence:
    part: str          # "region", "govcloud", "priority", "redirect", "missing", "sla"
    rule: str          # the rule that decided, e.g. "region.field", "priority.wording"
    detail: str        # the header or line it read, quoted

    def to_json(self) -> dict[str, str]:
        return {"part": self.part, "rule": self.rule, "detail": self.detail}


@dataclass(frozen=True)
class Decision:
    region: str
    govcloud: bool
    priority: int
    queue: str
    plan: str
    redirect: str | None             # "billing", "sales", ...; None = support handles it
    missing: tuple[str, ...]         # required form fields not found
    response_due: datetime | None    # UTC; None = no first-response target
    evidence: tuple[Evidence, ...]
    warn_due: datetime | None = None  # UTC: the SLA warning before the target ([rules.sla])
    category: str = ""               # [rules.category]; "" = none found
    product: str = ""                # [rules.product]; "" = none found
    emergency: bool = False          # priority 1 on a 24/7 clock, emergency queue alerted
    contact: Standing | None = None  # Kaseya's authorised contacts (gateway.rules.contacts)

    @property
    def handled_by_support(self) -> bool:
        return self.redirect is None

    def why(self, part: str) -> tuple[Evidence, ...]:
        """The evidence for one part; the first entry is the rule that decided it."""
        return tuple(e for e in self.evidence if e.part == part)

    def to_json(self) -> dict[str, Any]:
        return {
            "region": self.region, "govcloud": self.govcloud, "priority": self.priority,
            "queue": self.queue, "plan": self.plan, "redirect": self.redirect,
            "handled_by_support": self.handled_by_support, "missing": list(self.missing),
            "response_due": self.response_due.isoformat() if self.response_due else None,
            "warn_due": self.warn_due.isoformat() if self.warn_due else None,
            "category": self.category or None, "product": self.product or None,
            "evidence": [e.to_json() for e in self.evidence], "emergency": self.emergency,
            "contact": self.contact.to_json() if self.contact else None,
        }


# -- the pipeline's entry point -------------------------------------------------

def decide(mail: ParsedMail, *, mailbox_address: str, mailbox_govcloud: bool,
           rules: RulesConfig, directory: CustomerDirectory, now: datetime,
           mailbox_emergency: bool = False) -> Decision:
    """Every rules-stage decision for a new ticket, with its evidence."""
    domain = normalize_address(mail.sender).rpartition("@")[2]
    found = directory.lookup(domain) if domain else None
    region, region_ev = _region(mail, mailbox_address, found, rules)
    govcloud, gov_ev = _govcloud(_all_text(mail), mailbox_address, mailbox_govcloud, domain, found, rules)
    priority, prio_ev = _priority(mail, rules)
    urgent = _emergency(mail, mailbox_address, mailbox_emergency)
    if urgent is not None:
        priority, prio_ev = 1, [urgent, *prio_ev]
    redirect, red_ev = _redirect(mail, rules)
    missing, missing_ev = _missing(mail, found, rules)
    contact = contacts.standing(found[0], mail.sender, now.date()) if found and mail.sender else None
    contact_ev = [Evidence("contact", f"contact.{contact.rank}", contact.why)] if contact else []
    plan, due, warn_due, sla_ev = _sla(found, priority, region, redirect, rules, now,
                             around_the_clock=urgent is not None,
                             certified=contact is not None and contact.rank == contacts.CERTIFIED)
    if due is not None and missing and rules.pause_target and urgent is None:
        # Kaseya: the ticket waits for the required details; the target counts from them
        due = warn_due = None
        sla_ev.append(Evidence("sla", "sla.waiting_for_information",
                               f"waiting for {', '.join(missing)}: the target starts when the customer gives them "
                               "([rules.missing] pause_target)"))
    category, cat_ev = classify("category", mail, mailbox_address, rules)
    product, prod_ev = classify("product", mail, mailbox_address, rules)
    return Decision(
        category=category, product=product,
        region=region, govcloud=govcloud, priority=priority,
        queue=GOVCLOUD_QUEUE if govcloud else region, plan=plan, redirect=redirect,
        missing=missing, response_due=due, warn_due=warn_due,
        evidence=(*region_ev, *gov_ev, *prio_ev, *red_ev, *missing_ev, *contact_ev, *sla_ev, *cat_ev, *prod_ev),
        emergency=urgent is not None, contact=contact,
    )


def _emergency(mail: ParsedMail, mailbox_address: str, mailbox_emergency: bool) -> Evidence | None:
    """HKN's emergency ticket type: the emergency address, a type line or the wording."""
    if mailbox_emergency:
        return Evidence("priority", "priority.emergency", f"mail to the emergency address {mailbox_address}")
    found = process.emergency(f"{mail.subject}\n{mail.reply_text}")
    if found is None:
        return None
    return Evidence("priority", "priority.emergency", f"{found.language} {found.phrase!r}: emergency, P1 24/7")


# -- text helpers -------------------------------------------------------------

@dataclass(frozen=True)
class _Hit:
    phrase: str
    language: str
    where: str         # "subject", "body" or "quoted body"
    text: str          # the whole text searched, to quote from
    start: int
    end: int

    @property
    def matched(self) -> str:
        return self.text[self.start:self.end]

    def quote(self) -> str:
        return f"{self.where}: {_quote_line(self.text, self.start, self.end)!r}"

    def covers(self, other: _Hit) -> bool:
        """Whether this hit is the more specific reading of the same words.

        A longer span wins ("partial outage" over "outage"); on the same
        span, the longer literal phrase ("Teilausfall" over "*ausfall").
        """
        if self.where != other.where or not (self.start <= other.start and other.end <= self.end):
            return False
        if (self.start, self.end) != (other.start, other.end):
            return True
        return len(self.phrase.strip("*")) > len(other.phrase.strip("*"))


def _clean(text: str) -> str:
    # Typographic apostrophes ("doesn’t") would hide "n't" negations and phrases.
    # Only the first _MAX_SCAN characters are read: what a mail is about is on
    # its first pages, and a pasted multi-megabyte log would cost seconds.
    return text[:_MAX_SCAN].replace("\u2019", "'").replace("\r\n", "\n")


def _new_text(mail: ParsedMail) -> list[tuple[str, str]]:
    return [("subject", _clean(mail.subject)), ("body", _clean(mail.reply_text))]


def _all_text(mail: ParsedMail) -> list[tuple[str, str]]:
    return [("subject", _clean(mail.subject)), ("body", _clean(mail.body_text or mail.reply_text))]


def _quote_line(text: str, start: int, end: int, width: int = 100) -> str:
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line = text[line_start: line_end if line_end >= 0 else len(text)]
    if len(line) <= width:
        return line.strip()
    # keep the match in view on long lines
    offset = max(0, start - line_start - width // 3)
    return ("…" if offset else "") + line[offset: offset + width].strip() + "…"


def _phrase_regex(phrase: str) -> str:
    body = phrase.strip("*").strip()
    words = [re.escape(w) for w in re.split(r"[\s\-]+", body) if w]
    core = r"[\s\-]+".join(words)
    # A leading `*` still starts at a word start: an unanchored `\w*` would be
    # retried at every letter of a long word (quadratic on a mail of junk).
    left = r"(?<!\w)\w*" if phrase.startswith("*") else r"(?<!\w)"
    right = r"\w*" if phrase.endswith("*") else r"(?!\w)"
    # Japanese and Chinese put no spaces between words: there a phrase matches
    # inside a run of text ("システム障害が" holds "障害")
    if _UNSPACED.match(body):
        left = ""
    if _UNSPACED.match(body[-1:]):
        right = ""
    return left + core + right


@lru_cache(maxsize=8192)
def _phrase_matcher(phrase: str) -> tuple[re.Pattern[str], str]:
    """The phrase's compiled regex, and its longest word as a cheap pre-check.

    Each word of a phrase stands literally in any text the phrase matches, so
    a text whose case-folded form lacks the longest word cannot match: most of
    the ~200 phrases are ruled out by one substring test instead of a regex
    search (this stage runs on every new mail; measured 2.5 ms -> see README).
    """
    words = [w for w in re.split(r"[\s\-]+", phrase.strip("*").strip()) if w]
    return re.compile(_phrase_regex(phrase), re.IGNORECASE), max(words, key=len).casefold() if words else ""


def _find(wording: Wording, texts: Iterable[tuple[str, str]],
          negations: tuple[str, ...] = ()) -> list[_Hit]:
    """Every non-negated occurrence of the wording's phrases, in text order."""
    hits = []
    for where, text in texts:
        folded = text.casefold()
        for language, phrases in wording.items():
            for phrase in phrases:
                regex, needle = _phrase_matcher(phrase)
                if needle not in folded:
                    continue
                for m in regex.finditer(text):
                    if not (negations and _negated(text, m.start(), m.end(), negations)):
                        hits.append(_Hit(phrase, language, where, text, m.start(), m.end()))
    hits.sort(key=lambda h: (h.where != "subject", h.start))
    return hits


def _negated(text: str, start: int, end: int, negations: tuple[str, ...]) -> bool:
    # Only a short stretch before the phrase matters; slicing the whole text
    # would make a long mail with many hits quadratic.
    clause = _CLAUSE_END.split(text[max(0, start - _LOOKBACK):start])[-1]
    before = [w.lower() for w in re.findall(r"[\w']+", clause)][-NEGATION_WINDOW:]
    if any(w in negations or w.endswith("n't") for w in before):
        return True
    following = text[end:end + _LOOKBACK]
    if _TRAILING_NEGATION_JA.match(following):
        return True
    after = re.match(r"\s*([\w']+)", following)
    return bool(after and after[1].lower() in _TRAILING_NEGATIONS)


def _outermost(tagged: list[tuple[int, _Hit]]) -> list[tuple[int, _Hit]]:
    """The (level, hit)s not covered by a more specific hit (see `_Hit.covers`).

    One sweep per text in (start, longest first) order: a hit is covered when
    an earlier one reaches at least as far. Same-span hits are settled first.
    """
    by_span: dict[tuple[str, int, int], tuple[int, _Hit]] = {}
    for level, hit in tagged:
        key = (hit.where, hit.start, hit.end)
        if key not in by_span or hit.covers(by_span[key][1]):
            by_span[key] = (level, hit)
    kept: list[tuple[int, _Hit]] = []
    reach: dict[str, int] = {}
    for (where, _start, end), item in sorted(by_span.items(),
                                             key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        if reach.get(where, -1) < end:
            kept.append(item)
        reach[where] = max(reach.get(where, -1), end)
    return kept


def _label_names(labels: tuple[str, ...]) -> str:
    alternatives = sorted(labels, key=len, reverse=True)
    return "|".join(r"[ \t\-]*".join(re.escape(w) for w in re.split(r"[\s\-]+", label) if w)
                    for label in alternatives)


@lru_cache(maxsize=64)
def _label_regex(labels: tuple[str, ...]) -> re.Pattern[str]:
    # "Label: value", "**Label:** value", "Label<TAB>value", "Label   value" (HTML
    # tables), and the full-width colon of Japanese forms ("優先度：1")
    return re.compile(rf"^[ \t>*•\-]*(?:{_label_names(labels)})[ \t*]*(?:[:：]|\t| {{2,}})[ \t*]*"
                      r"(?P<value>[^\n]*)$", re.IGNORECASE | re.MULTILINE)


@lru_cache(maxsize=64)
def _bare_level_regex(labels: tuple[str, ...]) -> re.Pattern[str]:
    # "Priority 1", "Dringlichkeit 1", "Priority - 2", "優先度 1": a label with no
    # colon counts only before a level number, alone on its line's start
    return re.compile(rf"^[ \t>*•\-]*(?:{_label_names(labels)})[ \t]*(?:[-–=][ \t]*)?"
                      r"(?P<value>(?:p|prio|sev)?[ \t]?[1-4])(?![\w.,])", re.IGNORECASE | re.MULTILINE)


def _form_fields(mail: ParsedMail, labels: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """Every (value, quoted line, where) of a `Label: value` line.

    The new text is searched first; the whole body (a forwarded form, a form
    below a note) only when the new text has no such line.
    """
    if not labels:
        return []
    pattern = _label_regex(labels)
    for where, text in (("body", _clean(mail.reply_text)), ("quoted body", _clean(mail.body_text))):
        out = []
        for m in pattern.finditer(text):
            value = m["value"][:_MAX_VALUE].strip(" \t*")
            line = _quote_line(text, m.start(), m.end())
            if not value:          # the value on the next line, as some forms write it
                nxt = re.match(r"\n[ \t]*([^\n:]+)", text[m.end():m.end() + _MAX_VALUE])
                value = nxt[1][:_MAX_VALUE].strip(" \t*") if nxt else ""
                line = f"{line} {value}".strip()
            out.append((value, f"{where}: {line!r}", where))
        if out:
            return out
    return []


def _lookup_value(value: str, table: Mapping[str, Any]) -> Any:
    """The table entry for the longest leading words of `value` ("EU (Frankfurt)" → "eu")."""
    words = normalise_value(value).split()
    for n in range(len(words), 0, -1):
        hit = table.get(" ".join(words[:n]))
        if hit is not None:
            return hit
    return None


# -- region ------------------------------------------------------------------

def _region(mail: ParsedMail, mailbox_address: str, found: tuple[Customer, str] | None,
            rules: RulesConfig) -> tuple[str, list[Evidence]]:
    notes: list[Evidence] = []
    for source in rules.region.sources:
        result = _REGION_SOURCES[source](mail, mailbox_address, found, rules, notes)
        if result is not None:
            return result[0], [Evidence("region", f"region.{source}", result[1]), *notes]
    return rules.default_region, [Evidence("region", "region.default",
                                           f"no evidence; default region {rules.default_region}"),
                                  *notes]


_RegionResult = tuple[str, str] | None


def _region_field(mail: ParsedMail, _mb: str, _f: tuple[Customer, str] | None,
                  rules: RulesConfig, notes: list[Evidence]) -> _RegionResult:
    for value, line, _where in _form_fields(mail, rules.fields.region):
        region = _lookup_value(value, rules.region.values)
        if region is not None:
            return region, line
        notes.append(Evidence("region", "region.field.unrecognised", line))
    return None


def _region_mailbox(_m: ParsedMail, mailbox_address: str, _f: tuple[Customer, str] | None,
                    rules: RulesConfig, _n: list[Evidence]) -> _RegionResult:
    address = normalize_address(mailbox_address)
    if address in rules.region.mailboxes:
        return rules.region.mailboxes[address], f"mailbox {address}"
    local = address.partition("@")[0]
    for word in re.split(r"[-_.+]", local):
        if word in rules.region.mailbox_tokens:
            return rules.region.mailbox_tokens[word], f"mailbox {address} (word {word!r})"
    return None


def _region_directory(_m: ParsedMail, _mb: str, found: tuple[Customer, str] | None,
                      _r: RulesConfig, _n: list[Evidence]) -> _RegionResult:
    if found is None or found[0].region is None:
        return None
    customer, domain = found
    return str(customer.region), f"customer directory: {domain} ({customer.organisation})"


def _region_country(mail: ParsedMail, _mb: str, _f: tuple[Customer, str] | None,
                    _r: RulesConfig, _n: list[Evidence]) -> _RegionResult:
    domain = normalize_address(mail.sender).rpartition("@")[2]
    hit = region_of_domain(domain)
    if hit is None:
        return None
    return hit[0], f"sender domain {domain}: country TLD {hit[1]}"


def _region_date_offset(mail: ParsedMail, _mb: str, _f: tuple[Customer, str] | None,
                        rules: RulesConfig, notes: list[Evidence]) -> _RegionResult:
    offset = mail.date_offset_minutes
    if offset is None:
        return None
    header = mail.headers.get("date") or f"(offset {_hhmm(offset)})"
    if offset == 0 and rules.region.ignore_utc:
        notes.append(Evidence("region", "region.date_offset.utc_ignored", f"Date: {header}"))
        return None
    for band in rules.region.offsets:
        if band.low <= offset <= band.high:
            return band.region, (f"Date: {header} (UTC{_hhmm(offset)}, {band.region} band "
                                 f"{_hhmm(band.low)}..{_hhmm(band.high)})")
    return None


def _hhmm(minutes: int) -> str:
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


_RegionSource = Callable[[ParsedMail, str, tuple[Customer, str] | None, RulesConfig, list[Evidence]],
                         _RegionResult]
# The names are the `[rules.region] sources` of the configuration.
_REGION_SOURCES: Mapping[str, _RegionSource] = MappingProxyType({
    "field": _region_field,
    "mailbox": _region_mailbox,
    "directory": _region_directory,
    "country": _region_country,
    "date_offset": _region_date_offset,
})


# -- GovCloud ----------------------------------------------------------------

def govcloud_in_reply(mail: ParsedMail, *, mailbox_address: str, rules: RulesConfig,
                      directory: CustomerDirectory) -> Evidence | None:
    """A GovCloud indicator in a reply on a commercial ticket (issue 18): the sender's
    domain or directory entry, a GovCloud account or a mention in the reply's own new
    text (not what it quotes), with the evidence staff are shown; None when there is none."""
    domain = normalize_address(mail.sender).rpartition("@")[2]
    found = directory.lookup(domain) if domain else None
    gov, evidence = _govcloud(_new_text(mail), mailbox_address, False, domain, found, rules)
    return evidence[0] if gov else None


def _govcloud(texts: list[tuple[str, str]], mailbox_address: str, mailbox_govcloud: bool, domain: str,
              found: tuple[Customer, str] | None, rules: RulesConfig) -> tuple[bool, list[Evidence]]:
    def yes(rule: str, detail: str) -> tuple[bool, list[Evidence]]:
        return True, [Evidence("govcloud", f"govcloud.{rule}", detail)]

    if mailbox_govcloud:
        return yes("mailbox", f"sent to GovCloud mailbox {normalize_address(mailbox_address)}")
    if found is not None and found[0].govcloud:
        return yes("directory", f"customer directory: {found[1]} ({found[0].organisation}) is GovCloud")
    for gov in rules.govcloud.domains:
        if domain == gov or domain.endswith("." + gov):
            return yes("domain", f"sender domain {domain} matches GovCloud domain {gov}")
    for account in rules.govcloud.accounts:
        for where, text in texts:
            m = re.search(rf"(?<![\w-]){re.escape(account)}(?![\w-])", text, re.IGNORECASE)
            if m:
                return yes("account", f"GovCloud account {account} in "
                                      f"{where}: {_quote_line(text, m.start(), m.end())!r}")
    hits = _find({"": rules.govcloud.mentions}, texts, rules.priority.negations)
    if hits:
        return yes("mention", f"{hits[0].matched!r} in {hits[0].quote()}")
    return False, [Evidence("govcloud", "govcloud.none",
                            f"commercial mailbox {normalize_address(mailbox_address)}; no GovCloud "
                            "customer, domain, account or mention")]


# -- priority ----------------------------------------------------------------

_SUBJECT_TAG = re.compile(r"\[\s*(?:P|Prio)\s*([1-4])\s*\]", re.IGNORECASE)
_NUMERIC_PRIORITY = re.compile(r"^(?:p|prio|priority|priorität|sev|severity)?\s?([1-4])\b")


def _priority(mail: ParsedMail, rules: RulesConfig) -> tuple[int, list[Evidence]]:
    notes: list[Evidence] = []
    for source in rules.priority.sources:
        result = _PRIORITY_SOURCES[source](mail, rules, notes)
        if result is not None:
            return result[0], [Evidence("priority", f"priority.{source}", result[1]), *notes]
    default = rules.priority.default
    return default, [Evidence("priority", "priority.default",
                              f"no priority given or worded; default P{default}"), *notes]


_PriorityResult = tuple[int, str] | None


def _priority_field(mail: ParsedMail, rules: RulesConfig, notes: list[Evidence]) -> _PriorityResult:
    for value, line, _where in _form_fields(mail, rules.fields.priority):
        level = _priority_value(value, rules)
        if level is not None:
            return level, line
        notes.append(Evidence("priority", "priority.field.unrecognised", line))
    if rules.fields.priority:
        text = _clean(mail.reply_text)
        m = _bare_level_regex(rules.fields.priority).search(text)
        if m is not None:
            return int(m["value"][-1]), f"body: {_quote_line(text, m.start(), m.end())!r}"
    return None


def _priority_value(value: str, rules: RulesConfig) -> int | None:
    m = _NUMERIC_PRIORITY.match(normalise_value(value))
    if m:
        return int(m[1])
    level = _lookup_value(value, rules.priority.values)
    return int(level) if level is not None else None


def _priority_subject_tag(mail: ParsedMail, _r: RulesConfig, _n: list[Evidence]) -> _PriorityResult:
    m = _SUBJECT_TAG.search(mail.subject)
    return (int(m[1]), f"subject: {mail.subject!r}") if m else None


def _priority_wording(mail: ParsedMail, rules: RulesConfig, _n: list[Evidence]) -> _PriorityResult:
    hits = _wording_hits(mail, rules)
    if not hits:
        return None
    level, hit = min(hits, key=lambda lh: lh[0])      # stable: the first of the strongest
    return level, f"P{level} wording {hit.matched!r} ({hit.language} {hit.phrase!r}) in {hit.quote()}"


def _wording_hits(mail: ParsedMail, rules: RulesConfig) -> list[tuple[int, _Hit]]:
    """(level, hit) for every priority phrase in the new text, longest phrases only."""
    texts = _new_text(mail)
    tagged = [(level, hit) for level, wording in sorted(rules.priority.wording.items())
              for hit in _find(wording, texts, rules.priority.negations)]
    out = _outermost(tagged)
    out.sort(key=lambda lh: (lh[1].where != "subject", lh[1].start))
    return out


_PrioritySource = Callable[[ParsedMail, RulesConfig, list[Evidence]], _PriorityResult]
# The names are the `[rules.priority] sources` of the configuration.
_PRIORITY_SOURCES: Mapping[str, _PrioritySource] = MappingProxyType({
    "field": _priority_field,
    "subject_tag": _priority_subject_tag,
    "wording": _priority_wording,
})


# -- redirects ---------------------------------------------------------------

def _redirect(mail: ParsedMail, rules: RulesConfig) -> tuple[str | None, list[Evidence]]:
    """Billing or sales, only when the mail is mainly that (issue 4, point 6).

    Kept in support when any technical-problem wording (or P1/P2 wording) is
    present, or when a support request ("how do I ...") stands in a sentence
    of its own next to the billing or sales lines.
    """
    texts = _new_text(mail)
    by_name = {name: _find(w, texts) for name, w in rules.redirects.items()}
    by_name = {name: hits for name, hits in by_name.items() if hits}
    if not by_name:
        return None, [Evidence("redirect", "redirect.none", "no billing or sales wording")]
    name = max(by_name, key=lambda n: sum(2 if h.where == "subject" else 1 for h in by_name[n]))
    first = by_name[name][0]
    wording = f"{name} wording {first.matched!r} in {first.quote()}"
    technical = _find(rules.technical, texts, rules.priority.negations)
    priority_hits = _wording_hits(mail, rules)
    technical += [h for level, h in priority_hits if level <= 2]
    if technical:
        t = technical[0]
        return None, [Evidence("redirect", "redirect.kept_technical",
                               f"{wording}, but technical wording {t.matched!r} in {t.quote()}")]
    starts = {where: _sentence_starts(text) for where, text in texts}
    redirect_sentences = {_sentence(h, starts) for hits in by_name.values() for h in hits}
    requests = [h for level, h in priority_hits
                if level == 4 and _sentence(h, starts) not in redirect_sentences]
    if requests:
        r = requests[0]
        return None, [Evidence("redirect", "redirect.kept_support_request",
                               f"{wording}, but a support request {r.matched!r} in {r.quote()}")]
    return name, [Evidence("redirect", f"redirect.{name}", wording)]


def _sentence_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in _SENTENCE_END.finditer(text)]


def _sentence(hit: _Hit, starts: Mapping[str, list[int]]) -> tuple[str, int]:
    """Which sentence a hit stands in: (where, offset where the sentence starts)."""
    offsets = starts[hit.where]
    return hit.where, offsets[bisect_right(offsets, hit.start) - 1]


# -- missing information -----------------------------------------------------

def _missing(mail: ParsedMail, found: tuple[Customer, str] | None,
             rules: RulesConfig) -> tuple[tuple[str, ...], list[Evidence]]:
    missing: list[str] = []
    evidence: list[Evidence] = []
    for name in rules.required:
        rule, detail = _find_required(name, mail, found, rules)
        evidence.append(Evidence("missing", f"missing.{name}.{rule}", detail))
        if rule == "absent":
            missing.append(name)
    return tuple(missing), evidence


def _find_required(name: str, mail: ParsedMail, found: tuple[Customer, str] | None,
                   rules: RulesConfig) -> tuple[str, str]:
    for value, line, _where in _form_fields(mail, rules.fields.labels(name)):
        if _is_value(name, value, rules):
            return "field", line
    if found is not None and (name in _FROM_DIRECTORY or (name == "region" and found[0].region)):
        customer, domain = found
        return "directory", f"customer directory: {domain} ({customer.organisation})"
    labels = rules.fields.labels(name)
    example = f" such as '{labels[0]}: ...'" if labels else ""
    return "absent", (f"no {name.replace('_', ' ')} line{example} with a value"
                      + (", and the sender's domain is not in the customer directory"
                         if name in _FROM_DIRECTORY else ""))


_FROM_DIRECTORY = frozenset({"account_email", "organisation"})
_HOST = re.compile(r"(?:https?://)?[\w-]+(?:\.[\w-]+)+|https?://\S+|\b\d{1,3}(?:\.\d{1,3}){3}\b")


def _is_value(name: str, value: str, rules: RulesConfig) -> bool:
    """Whether a form line's value gives the required field `name`."""
    if name == "account_email":
        return bool(_ADDRESS.search(value))
    if name == "region":
        return _lookup_value(value, rules.region.values) is not None
    if name == "server_url":
        return bool(_HOST.search(value))
    return normalise_value(value) not in _NO_VALUE


def supplied(mail: ParsedMail, missing: Sequence[str], rules: RulesConfig) -> tuple[tuple[str, ...], list[Evidence]]:
    """Which of a ticket's `missing` fields the new text of a customer's reply gives,
    with the lines that gave them (the quoted history is not read: it holds the
    original mail and our acknowledgement)."""
    new_text = replace(mail, body_text=mail.reply_text)
    given: list[str] = []
    evidence: list[Evidence] = []
    for name in missing:
        rule, detail = _find_required(name, new_text, None, rules)
        if rule == "field":
            given.append(name)
            evidence.append(Evidence("missing", f"missing.{name}.supplied", detail))
    return tuple(given), evidence


# -- category and product ------------------------------------------------------

_MAX_CLASS_VALUE = 80


def classify(part: str, mail: ParsedMail, mailbox_address: str, rules: RulesConfig) -> tuple[str, list[Evidence]]:
    """The ticket's category or product (`part`), strongest evidence first: a form
    line ("Category: Backup", "Produkt: Cloud Backup"), the mailbox it reached, the
    wording of the subject and new text (the name with the most phrases found,
    the subject counting twice). "" when nothing says."""
    classes = rules.category if part == "category" else rules.product
    notes: list[Evidence] = []
    for value, line, _where in _form_fields(mail, rules.fields.labels(part)):
        if normalise_value(value) in _NO_VALUE:
            continue
        if not classes.names:
            return " ".join(value.split())[:_MAX_CLASS_VALUE], [Evidence(part, f"{part}.field", line)]
        name = _lookup_value(value, classes.aliases)
        if name is not None:
            return name, [Evidence(part, f"{part}.field", line)]
        notes.append(Evidence(part, f"{part}.field.unrecognised", line))
    name = classes.mailboxes.get(normalize_address(mailbox_address))
    if name is not None:
        return name, [Evidence(part, f"{part}.mailbox", f"mailbox {mailbox_address}"), *notes]
    texts = _new_text(mail)
    score: dict[str, int] = {}
    first: dict[str, _Hit] = {}
    for name, wording in classes.wording.items():
        for hit in _find(wording, texts):
            score[name] = score.get(name, 0) + (2 if hit.where == "subject" else 1)
            first.setdefault(name, hit)
    if score:
        name = max(classes.names, key=lambda n: score.get(n, 0))    # ties: the first configured
        hit = first[name]
        return name, [Evidence(part, f"{part}.wording",
                               f"{part} {name}: wording {hit.matched!r} ({hit.language} {hit.phrase!r}) "
                               f"in {hit.quote()}"), *notes]
    return "", [Evidence(part, f"{part}.none", f"no {part} line, mailbox or wording"), *notes]


# -- first-response target -----------------------------------------------------

def target_times(rules: RulesConfig, target: Target, calendar: BusinessCalendar | None,
                 start: datetime) -> tuple[datetime, datetime | None]:
    """When a first-response target counted from `start` falls due, and when its SLA
    warning goes out ([rules.sla] warn_before; None: no warning fits inside it)."""
    due = response_due(start, target.hours, calendar)
    lead = rules.warn_before.before(target.hours)
    return due, (response_due(start, target.hours - lead, calendar) if lead is not None else None)


def ticket_target_times(rules: RulesConfig, *, plan: str, priority: int, region: str, certified: bool,
                        around_the_clock: bool, start: datetime) -> tuple[datetime | None, datetime | None]:
    """`target_times` for a ticket's plan and priority (None, None: the plan has no target)."""
    target = rules.plans[plan].target(priority, certified=certified) if plan in rules.plans else None
    if target is None:
        return None, None
    calendar = None if target.around_the_clock or around_the_clock else rules.hours.get(region)
    return target_times(rules, target, calendar, start)


def _sla(found: tuple[Customer, str] | None, priority: int, region: str, redirect: str | None,
         rules: RulesConfig, now: datetime,
         around_the_clock: bool = False, certified: bool = False,
         ) -> tuple[str, datetime | None, datetime | None, list[Evidence]]:
    """The plan, the first-response due time, when to warn before it, and why."""
    if found is not None and found[0].plan in rules.plans:
        customer, domain = found
        plan = str(customer.plan)
        plan_ev = Evidence("sla", "sla.plan.directory",
                           f"customer directory: {domain} ({customer.organisation}) has plan {plan}")
    else:
        plan = rules.default_plan
        plan_ev = Evidence("sla", "sla.plan.default", f"default plan {plan}")
    if redirect is not None:
        return plan, None, None, [plan_ev, Evidence("sla", "sla.redirected",
                                              f"redirected to {redirect}: no support target")]
    target = rules.plans[plan].target(priority, certified=certified)
    if certified and priority in rules.plans[plan].certified:
        plan_ev = Evidence(plan_ev.part, plan_ev.rule, plan_ev.detail + "; certified administrator's target")
    if target is None:
        return plan, None, None, [plan_ev, Evidence(
            "sla", "sla.no_target", f"plan {plan} has no first-response target for P{priority}")]
    calendar = None if target.around_the_clock or around_the_clock else rules.hours[region]
    due, warn_due = target_times(rules, target, calendar, now)
    rule, clock = (("sla.around_the_clock", "") if calendar is None else
                   ("sla.business_hours", f" on the {region} calendar ({calendar.describe()})"))
    warning = (f"; SLA warning {rules.warn_before.describe()} before, at {warn_due.isoformat()}"
               if warn_due is not None else "; no SLA warning before the target")
    return plan, due, warn_due, [plan_ev, Evidence(
        "sla", rule, f"plan {plan} P{priority}: {target.describe()}{clock} "
                     f"from {now.isoformat()} → {due.isoformat()}{warning}")]
