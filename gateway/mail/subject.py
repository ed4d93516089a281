"""The ticket tag in a subject line: `[Support #1042]`."""
from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=16)
def tag_pattern(ticket_tag: str) -> re.Pattern[str]:
    return re.compile(r"\[\s*" + re.escape(ticket_tag) + r"\s*#\s*(\d{1,18})\s*\]", re.IGNORECASE)


def tagged_ticket_id(subject: str, ticket_tag: str) -> int | None:
    m = tag_pattern(ticket_tag).search(subject)
    return int(m.group(1)) if m else None


def strip_tag(subject: str, ticket_tag: str) -> str:
    return " ".join(tag_pattern(ticket_tag).sub(" ", subject).split())


# reply and forward prefixes of the mail clients in use (en, de, nordic, nl)
SUBJECT_PREFIXES = ("re:", "aw:", "fw:", "fwd:", "wg:", "antw:", "sv:", "vs:")


def clean_subject(subject: str, ticket_tag: str) -> str:
    """The subject without our tag and without reply/forward prefixes."""
    s = strip_tag(subject, ticket_tag)
    while s.lower().startswith(SUBJECT_PREFIXES):
        s = s.split(":", 1)[1].strip()
    return s


def problem_key(subject: str, ticket_tag: str) -> str:
    """What "the same subject" means for one ticket per problem: the subject
    without tag and Re:/Fwd: prefixes, case and spacing ignored. Empty for a
    subject that is nothing but those (no subject is no problem's name)."""
    return " ".join(clean_subject(subject, ticket_tag).casefold().split())
