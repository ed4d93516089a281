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
# words that hold the emergency wording and say none: the urgency label of a
# Japanese form ("緊急度：低", urgency: low), emergency contacts
_NOT_EMERGENCY = re.compile(r"緊急度|緊急連絡先|emergency contacts?|notfallkontakt\w*|notfallnummer\w*",
                            re.IGNORECASE)


# HKN: no answer after 4 hours, ask for the status with the ticket ID
STATUS_REQUEST: Wording = {
    "en": ("any update", "any news", "what is the status", "what's the status", "status update",
           "status of my ticket", "status of this ticket", "is there an update", "any progress"),
    "de": ("wie ist der stand", "gibt es neuigkeiten", "wie ist der status", "gibt es etwas neues",
           "gibt es schon etwas neues", "stand der dinge", "wie sieht es aus"),
    "ja": ("進捗はいかが", "進捗状況", "状況はいかが", "どうなっていますか", "その後いかが"),
}
# A status request is a short mail that asks only that; longer mail is a real reply.
STATUS_ONLY_MAX_CHARS = 300

# NinjaOne: the ticket is closed when the end user confirms the resolution
SOLVED: Wording = {
    "en": ("solved", "resolved", "you can close", "please close the ticket", "close this ticket",
           "works now", "working now", "fixed now", "issue is fixed"),
    "de": ("gelöst", "geloest", "erledigt", "ticket schließen", "ticket schliessen",
           "können das ticket schließen", "funktioniert wieder", "funktioniert jetzt"),
    "ja": ("解決しました", "解決いたしました", "クローズしてください", "クローズして結構です", "直りました"),
}
SOLVED_NEGATED: Wording = {
    "en": ("not solved", "not resolved", "isn't solved", "isn't resolved", "not yet solved",
           "not fixed", "don't close", "do not close", "still not", "unsolved", "unresolved",
           "not working"),
    "de": ("nicht gelöst", "nicht geloest", "nicht erledigt", "nicht schließen", "nicht schliessen",
           "ungelöst", "funktioniert nicht", "funktioniert immer noch nicht"),
    "ja": ("解決していません", "解決しておりません", "解決しない", "クローズしないで", "直っていません"),
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


def emergency(text: str) -> Match | None:
    """An emergency: a type line (`Type: emergency`, `Typ: Notfall`), or emergency
    wording that is not negated ("kein Notfall")."""
    for value in _TYPE_LINE.findall(text):
        language = _EMERGENCY_TYPES.get(value.casefold())
        if language is not None:
            return Match("emergency", language, f"type line {value!r}")
    if find("emergency_negated", EMERGENCY_NEGATED, text) is not None:
        return None
    return find("emergency", EMERGENCY, _NOT_EMERGENCY.sub(" ", text))


def status_request(reply: str) -> Match | None:
    """The mail only asks for the status ("any update?"): a short text with the wording."""
    if len(reply.strip()) > STATUS_ONLY_MAX_CHARS:
        return None
    return find("status_request", STATUS_REQUEST, reply)


def solved(reply: str) -> Match | None:
    """The customer confirms the problem is solved; negations ("not solved",
    "noch nicht gelöst") and questions about it do not count."""
    if find("solved_negated", SOLVED_NEGATED, reply) is not None:
        return None
    found = find("solved", SOLVED, reply)
    if found is None:
        return None
    # "Is it solved?" asks, it doesn't confirm: the sentence with the phrase ends in "?"
    folded = fold(reply)
    at = folded.find(fold(found.phrase))
    tail = re.split(r"[.!。！\n]", folded[at:], maxsplit=1)[0]
    if "?" in tail or "？" in tail:
        return None
    return found


def explain(text: str, reply: str = "") -> list[dict[str, str]]:
    """Every process rule the text matches, with its evidence (`gateway explain`)."""
    reply = reply or text
    found = [escalation_request(text), emergency(text), status_request(reply), solved(reply)]
    return [m.to_json() for m in found if m is not None]
