"""First-response due times on a business-hours calendar (pure).

A target of "3 business hours" counts only the time inside the region's
opening hours: on its working weekdays, outside public holidays (the
`holidays` library, country and optional subdivision per region) and
outside extra closing days the support team configures. A ticket that
arrives at night, on a weekend or on a holiday starts counting when the
desk next opens. `calendar=None` means around the clock (24/7 targets).

Everything is computed on real elapsed time: opening and closing moments are
built in the calendar's time zone and compared in UTC, so a DST change
between two business days shifts nothing by an hour.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import holidays

WEEKDAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

# A calendar whose every day is closed (all holidays, no weekdays) would
# otherwise loop forever; ten years without one open day is a config error.
MAX_SEARCH_DAYS = 3660


@dataclass(frozen=True)
class BusinessCalendar:
    """When a region's support desk is open."""

    timezone: str                              # IANA name, e.g. "Europe/Berlin"
    start: time = time(9, 0)                   # local opening time
    end: time = time(17, 0)                    # local closing time, after start
    weekdays: frozenset[int] = frozenset(range(5))   # 0 = Monday
    holiday_country: str | None = None         # ISO code for `holidays`, None = no holidays
    holiday_subdivision: str | None = None     # e.g. "BY"; None = nationwide holidays only
    closed: frozenset[date] = frozenset()      # extra closing days (company holidays)

    def describe(self) -> str:
        days = ",".join(WEEKDAY_NAMES[d].capitalize() for d in sorted(self.weekdays))
        where = self.holiday_country or "none"
        if self.holiday_country and self.holiday_subdivision:
            where += f"-{self.holiday_subdivision}"
        return (f"{days} {self.start:%H:%M}-{self.end:%H:%M} {self.timezone}, "
                f"public holidays {where}")


def response_due(start: datetime, hours: float, calendar: BusinessCalendar | None) -> datetime:
    """The moment (UTC) when `hours` of the calendar's open time after `start` have passed.

    A due time that falls exactly on closing time stays there rather than
    moving to the next opening: the desk had the full time.
    """
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware")
    if hours <= 0:
        raise ValueError(f"hours must be positive, got {hours}")
    begin = start.astimezone(UTC)
    remaining = timedelta(hours=hours)
    if calendar is None:
        return begin + remaining
    for opens, closes in _open_spans(begin, calendar):
        counting_from = max(opens, begin)
        if counting_from < closes:
            available = closes - counting_from
            if remaining <= available:
                return counting_from + remaining
            remaining -= available
    raise ValueError(f"no open business day within {MAX_SEARCH_DAYS} days: {calendar.describe()}")


def _open_spans(begin: datetime, calendar: BusinessCalendar) -> Iterator[tuple[datetime, datetime]]:
    """Opening and closing moments (UTC) of the business days from `begin`'s day on."""
    tz = ZoneInfo(calendar.timezone)
    closed_days = _holidays(calendar)
    day = begin.astimezone(tz).date()
    for _ in range(MAX_SEARCH_DAYS):
        if is_business_day(day, calendar, closed_days):
            yield (datetime.combine(day, calendar.start, tz).astimezone(UTC),
                   datetime.combine(day, calendar.end, tz).astimezone(UTC))
        day += timedelta(days=1)


def is_business_day(day: date, calendar: BusinessCalendar,
                    closed_days: holidays.HolidayBase | None = None) -> bool:
    """Whether the desk opens on `day` (a weekday it works, no holiday, not closed)."""
    if day.weekday() not in calendar.weekdays or day in calendar.closed:
        return False
    public = closed_days if closed_days is not None else _holidays(calendar)
    return public is None or day not in public


HOLIDAY_LANGUAGES = ("en_US", "en_GB")     # the first one a country's calendar has


def holiday_name(day: date, calendar: BusinessCalendar) -> str | None:
    """The public holiday on `day`, for explanations ("2026-12-25 Christmas Day")."""
    public = _holidays(calendar)
    return None if public is None else public.get(day)


def _holidays(calendar: BusinessCalendar) -> holidays.HolidayBase | None:
    # Built per call, not cached at module level: the library expands the
    # years it covers lazily on lookup, and the calendar is small.
    if not calendar.holiday_country:
        return None
    # Names in English whatever LANG/LANGUAGE say: the library otherwise picks its
    # translation through gettext from the environment (issue 16: "Tag der Deutschen
    # Einheit" under LANG=C, "German Unity Day" under C.UTF-8).
    supported = getattr(getattr(holidays, calendar.holiday_country, None), "supported_languages", ())
    language = next((lang for lang in HOLIDAY_LANGUAGES if lang in supported), None)
    return holidays.country_holidays(calendar.holiday_country, subdiv=calendar.holiday_subdivision,
                                     language=language)


def next_open(at: datetime, calendar: BusinessCalendar) -> datetime:
    """When the desk is next open at or after `at` (`at` itself when it is open now)."""
    begin = at.astimezone(UTC)
    for opens, closes in _open_spans(begin, calendar):
        if begin < closes:
            return max(opens, begin)
    raise ValueError(f"no open business day within {MAX_SEARCH_DAYS} days: {calendar.describe()}")
