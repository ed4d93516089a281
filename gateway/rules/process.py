"""What a customer's mail asks of the support process (pure, table-driven).

Each table maps a language to phrases; a mail matches when its new text (the
reply part, quoted history removed) contains one, case-insensitively and
with runs of white space folded. The tables are the policies' wording:
asking for escalation (Kaseya: escalation on request), and more to come in
gateway.desk.lifecycle's process rules. Every match returns its evidence:
the table, the language and the phrase, for `gateway explain` and the
ticket's record.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

Wording = Mapping[str, tuple[str, ...]]

ESCALATION_REQUEST: Wording = {
    "en": ("please escalate", "escalate this", "escalate the ticket", "escalate my ticket",
           "escalate to engineering", "request escalation", "requesting escalation",
           "need an escalation", "want an escalation"),
    "de": ("eskalation", "eskalieren", "bitte eskalier"),
    "ja": ("エスカレーション", "エスカレート"),
}


# HKN's paid emergency ticket type: a type line, or the word, in the mail's own text
EMERGENCY: Wording = {
    "en": ("emergency",),
    "de": ("notfall",),
    "ja": ("緊急",),
}
# "this is not an emergency" is no emergency
EMERGENCY_NEGATED: Wording = {
    "en": ("not an emergency", "no emergency", "not urgent"),
    "de": ("kein notfall", "keinen notfall", "nicht dringend"),
    "ja": ("緊急ではありません", "緊急ではない", "急ぎではありません"),
}
_TYPE_LINE = re.compile(r"^\s*(?:type|ticket type|typ|ticket-typ|種類|タイプ)\s*[:：]\s*(\S.*?)\s*$",
                        re.IGNORECASE | re.MULTILINE)
_EMERGENCY_TYPES = {"emergency": "en", "notfall": "de", "緊急": "ja"}


@dataclass(frozen=True)
class Match:
    rule: str          # the table's name, e.g. "escalation_request"
    language: str
    phrase: str

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "language": self.language, "phrase": self.phrase}


_SPACE = re.compile(r"\s+")


def fold(text: str) -> str:
    return _SPACE.sub(" ", text).casefold()


def find(rule: str, table: Wording, text: str) -> Match | None:
    """The first phrase of `table` in `text`, or None."""
    folded = fold(text)
    for language, phrases in table.items():
        for phrase in phrases:
            if fold(phrase) in folded:
                return Match(rule, language, phrase)
    return None


def escalation_request(text: str) -> Match | None:
    """The customer asks for the ticket to be escalated."""
    return find("escalation_request", ESCALATION_REQUEST, text)


def emergency(text: str) -> Match | None:
    """An emergency: a type line (`Type: emergency`, `Typ: Notfall`), or emergency
    wording that is not negated ("kein Notfall")."""
    for value in _TYPE_LINE.findall(text):
        language = _EMERGENCY_TYPES.get(value.casefold())
        if language is not None:
            return Match("emergency", language, f"type line {value!r}")
    if find("emergency_negated", EMERGENCY_NEGATED, text) is not None:
        return None
    return find("emergency", EMERGENCY, text)


def explain(text: str) -> list[dict[str, str]]:
    """Every process rule the text matches, with its evidence (`gateway explain`)."""
    found = [escalation_request(text), emergency(text)]
    return [m.to_json() for m in found if m is not None]
