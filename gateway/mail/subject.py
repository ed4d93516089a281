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
