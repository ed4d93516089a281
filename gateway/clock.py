"""The clock is one injectable function; nothing else reads the time of day."""
from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


def fixed_clock(at: datetime) -> Clock:
    when = at.astimezone(UTC)
    return lambda: when
