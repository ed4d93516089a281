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


def explain(text: str) -> list[dict[str, str]]:
    """Every process rule the text matches, with its evidence (`gateway explain`)."""
    found = [escalation_request(text)]
    return [m.to_json() for m in found if m is not None]
