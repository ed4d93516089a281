"""First-response due times: business hours, weekends, holidays, 24/7, no target."""
from __future__ import annotations

from datetime import UTC, date, datetime, time
from zoneinfo import ZoneInfo

import pytest

from gateway.model import ParsedMail
from gateway.rules.decision import decide
from gateway.rules.settings import RulesConfig, default_rules, parse_rules
from gateway.rules.sla import BusinessCalendar, holiday_name, is_business_day, response_due

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
SINGAPORE = ZoneInfo("Asia/Singapore")
EMEA = BusinessCalendar("Europe/Berlin", holiday_country="DE")
AMER = BusinessCalendar("America/New_York", holiday_country="US")
APAC = BusinessCalendar("Asia/Singapore", holiday_country="SG")


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


@pytest.mark.parametrize(("start", "hours", "due"), [
    # Tue 10:00 + 3h, all inside the day
    (berlin(2026, 3, 3, 10), 3, berlin(2026, 3, 3, 13)),
    # Tue 15:00 + 3h: 2h today, 1h from Wednesday's opening
    (berlin(2026, 3, 3, 15), 3, berlin(2026, 3, 4, 10)),
    # ends exactly at closing time: stays at 17:00, not next morning
    (berlin(2026, 3, 3, 14), 3, berlin(2026, 3, 3, 17)),
    # fractional hours
    (berlin(2026, 3, 3, 9), 1.5, berlin(2026, 3, 3, 10, 30)),
    # a whole business day is 8h: 9h from Tue 09:00 is Wed 10:00
    (berlin(2026, 3, 3, 9), 9, berlin(2026, 3, 4, 10)),
], ids=["inside-day", "over-evening", "ends-at-closing", "fractional", "full-day"])
def test_business_hours_within_the_week(start: datetime, hours: float, due: datetime) -> None:
    assert response_due(start, hours, EMEA) == due


def test_friday_afternoon_runs_over_the_weekend_to_monday() -> None:
    # Fri 2026-03-06 16:00 + 3h: 1h Friday, Saturday and Sunday closed, 2h Monday
    assert response_due(berlin(2026, 3, 6, 16), 3, EMEA) == berlin(2026, 3, 9, 11)


def test_start_on_saturday_counts_from_monday_opening() -> None:
    assert response_due(berlin(2026, 3, 7, 11, 12), 6, EMEA) == berlin(2026, 3, 9, 15)


def test_start_before_opening_counts_from_opening() -> None:
    assert response_due(berlin(2026, 3, 3, 6, 30), 2, EMEA) == berlin(2026, 3, 3, 11)


def test_start_after_closing_counts_from_next_opening() -> None:
    assert response_due(berlin(2026, 3, 3, 20, 45), 2, EMEA) == berlin(2026, 3, 4, 11)


def test_start_given_in_utc_is_read_in_the_calendar_zone() -> None:
    # 07:30 UTC is 08:30 in Berlin (CET): counting starts at 09:00 Berlin
    start = datetime(2026, 3, 3, 7, 30, tzinfo=UTC)
    due = response_due(start, 1, EMEA)
    assert due == berlin(2026, 3, 3, 10)
    assert due.tzinfo == UTC


def test_christmas_2026_friday_holiday_and_weekend_are_skipped() -> None:
    # Thu 24 Dec 16:00 + 3h: 1h Thursday; Fri 25 (1. Weihnachtstag) and Sat 26
    # (2. Weihnachtstag) are holidays, Sunday is closed; 2h on Monday 28 Dec.
    assert response_due(berlin(2026, 12, 24, 16), 3, EMEA) == berlin(2026, 12, 28, 11)


def test_christmas_is_not_skipped_without_holidays() -> None:
    no_holidays = BusinessCalendar("Europe/Berlin")
    assert response_due(berlin(2026, 12, 24, 16), 3, no_holidays) == berlin(2026, 12, 25, 11)


def test_day_of_german_unity_on_a_friday_is_skipped() -> None:
    # 2025-10-03 (Tag der Deutschen Einheit) is a Friday: Thu 14:00 + 6h → Mon 12:00
    assert response_due(berlin(2025, 10, 2, 14), 6, EMEA) == berlin(2025, 10, 6, 12)


def test_day_of_german_unity_2026_falls_on_a_saturday() -> None:
    assert not is_business_day(date(2026, 10, 3), EMEA)
    # Fri 2026-10-02 16:00 + 9h: 1h Friday, 8h Monday → Monday 17:00 exactly
    assert response_due(berlin(2026, 10, 2, 16), 9, EMEA) == berlin(2026, 10, 5, 17)


def test_easter_good_friday_and_easter_monday_are_skipped() -> None:
    # Thu 2026-04-02 15:00 + 6h: 2h Thursday, Good Friday, weekend, Easter Monday,
    # 4h on Tuesday 7 April
    assert response_due(berlin(2026, 4, 2, 15), 6, EMEA) == berlin(2026, 4, 7, 13)


def test_start_on_a_holiday_counts_from_the_next_business_day() -> None:
    # 2026-12-25 10:00 is a holiday; the desk opens Monday 28 December
    assert response_due(berlin(2026, 12, 25, 10), 1, EMEA) == berlin(2026, 12, 28, 10)


def test_regional_holiday_needs_the_subdivision() -> None:
    # 2026-01-06 (Heilige Drei Könige, Tuesday) is a holiday in Bavaria only
    bavaria = BusinessCalendar("Europe/Berlin", holiday_country="DE", holiday_subdivision="BY")
    assert response_due(berlin(2026, 1, 6, 9), 1, EMEA) == berlin(2026, 1, 6, 10)
    assert response_due(berlin(2026, 1, 6, 9), 1, bavaria) == berlin(2026, 1, 7, 10)


def test_extra_closing_days_are_skipped() -> None:
    closed = BusinessCalendar("Europe/Berlin", holiday_country="DE",
                              closed=frozenset({date(2026, 12, 24), date(2026, 12, 31)}))
    assert response_due(berlin(2026, 12, 23, 16), 2, closed) == berlin(2026, 12, 28, 10)


def test_dst_change_over_the_weekend_keeps_local_opening_hours() -> None:
    # Berlin moves to CEST on Sunday 2026-03-29: Fri 16:00 CET + 3h → Mon 11:00 CEST
    due = response_due(berlin(2026, 3, 27, 16), 3, EMEA)
    assert due == berlin(2026, 3, 30, 11)
    assert due == datetime(2026, 3, 30, 9, tzinfo=UTC)


def test_us_thanksgiving_on_the_amer_calendar() -> None:
    # Wed 2026-11-25 16:00 New York + 2h: 1h Wednesday, Thanksgiving Thursday, 1h Friday
    start = datetime(2026, 11, 25, 16, tzinfo=NEW_YORK)
    assert response_due(start, 2, AMER) == datetime(2026, 11, 27, 10, tzinfo=NEW_YORK)


def test_singapore_national_day_on_the_apac_calendar() -> None:
    # National Day 2026-08-09 is a Sunday, observed on Monday 10 August
    start = datetime(2026, 8, 7, 16, tzinfo=SINGAPORE)
    assert response_due(start, 3, APAC) == datetime(2026, 8, 11, 11, tzinfo=SINGAPORE)


def test_custom_hours_and_weekdays() -> None:
    # a desk open Sunday to Thursday, 08:00-16:00
    gulf = BusinessCalendar("Asia/Dubai", start=time(8), end=time(16),
                            weekdays=frozenset({6, 0, 1, 2, 3}))
    start = datetime(2026, 3, 5, 15, tzinfo=ZoneInfo("Asia/Dubai"))     # Thursday
    assert response_due(start, 2, gulf) == datetime(2026, 3, 8, 9, tzinfo=ZoneInfo("Asia/Dubai"))


def test_around_the_clock_ignores_nights_weekends_and_holidays() -> None:
    start = datetime(2026, 12, 25, 22, 30, tzinfo=UTC)      # Christmas night
    assert response_due(start, 1, None) == datetime(2026, 12, 25, 23, 30, tzinfo=UTC)


def test_naive_start_and_non_positive_hours_are_programming_errors() -> None:
    with pytest.raises(ValueError):
        response_due(datetime(2026, 3, 3, 10), 1, EMEA)
    with pytest.raises(ValueError):
        response_due(berlin(2026, 3, 3, 10), 0, EMEA)


def test_calendar_with_no_open_day_fails_instead_of_looping() -> None:
    never = BusinessCalendar("Europe/Berlin", weekdays=frozenset())
    with pytest.raises(ValueError):
        response_due(berlin(2026, 3, 3, 10), 1, never)


# -- through the decision ---------------------------------------------------------

def _mail(sender: str, subject: str, body: str) -> ParsedMail:
    return ParsedMail(sender=sender, sender_name="", to=("support@example.com",), cc=(),
                      subject=subject, date=None, date_offset_minutes=None, message_id="<m@x>",
                      in_reply_to=(), references=(), body_text=body, reply_text=body)


def _rules_with_customers() -> RulesConfig:
    rules, problems = parse_rules({"rules": {"customer": [
        {"organisation": "Kunde AG", "domains": ["kunde-ag.de"], "region": "EMEA",
         "plan": "professional"},
        {"organisation": "Acme Corp", "domains": ["acme.com"], "region": "AMER", "plan": "advanced"},
    ]}})
    assert problems == []
    return rules


def test_plan_without_target_gives_no_due_time() -> None:
    rules = default_rules()
    assert rules.plans["basic"].target(1) is None
    assert rules.plans["professional"].target(4) is None
    d = decide(_mail("jo@gmail.com", "Totalausfall", "Alles steht."),
               mailbox_address="support@example.com", mailbox_govcloud=False, rules=rules,
               directory=rules.directory, now=berlin(2026, 3, 3, 10))
    assert d.plan == "basic" and d.priority == 1
    assert d.response_due is None
    assert d.why("sla")[-1].rule == "sla.no_target"


def test_professional_p1_on_christmas_eve_is_due_after_the_holidays() -> None:
    rules = _rules_with_customers()
    d = decide(_mail("it@kunde-ag.de", "Produktion steht", "Seit 15:30 geht nichts mehr."),
               mailbox_address="support@example.com", mailbox_govcloud=False, rules=rules,
               directory=rules.directory, now=berlin(2026, 12, 24, 16))
    assert (d.plan, d.priority, d.region) == ("professional", 1, "EMEA")
    assert d.response_due == berlin(2026, 12, 28, 11)
    assert d.why("sla")[-1].rule == "sla.business_hours"


def test_advanced_p1_is_around_the_clock_even_on_christmas() -> None:
    rules = _rules_with_customers()
    now = datetime(2026, 12, 25, 3, 0, tzinfo=UTC)
    d = decide(_mail("ops@acme.com", "Outage", "Our API is down since 02:40 UTC."),
               mailbox_address="support@example.com", mailbox_govcloud=False, rules=rules,
               directory=rules.directory, now=now)
    assert d.response_due == datetime(2026, 12, 25, 4, 0, tzinfo=UTC)
    assert d.why("sla")[-1].rule == "sla.around_the_clock"


def test_advanced_p2_uses_business_hours_of_the_region() -> None:
    rules = _rules_with_customers()
    now = datetime(2026, 11, 25, 16, tzinfo=NEW_YORK)       # day before Thanksgiving
    d = decide(_mail("ops@acme.com", "Dashboard slow", "Since this morning the dashboard is slow."),
               mailbox_address="support@example.com", mailbox_govcloud=False, rules=rules,
               directory=rules.directory, now=now)
    assert (d.priority, d.region) == (2, "AMER")
    assert d.response_due == datetime(2026, 11, 27, 11, tzinfo=NEW_YORK)


def test_holiday_name_explains_a_closed_day() -> None:
    assert holiday_name(date(2026, 10, 3), EMEA) == "German Unity Day"
    assert holiday_name(date(2026, 10, 5), EMEA) is None
    assert holiday_name(date(2026, 10, 3), BusinessCalendar("Europe/Berlin")) is None
    assert "Europe/Berlin" in EMEA.describe() and "DE" in EMEA.describe()


@pytest.mark.parametrize("env", [{"LANG": "C"}, {"LANG": "de_DE.UTF-8"}, {"LANGUAGE": "de", "LANG": "C.UTF-8"},
                                 {"LC_ALL": "ja_JP.UTF-8"}])
def test_holiday_names_do_not_follow_the_locale(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # the library translates through gettext, which reads these variables on each lookup
    for name in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert holiday_name(date(2026, 10, 3), EMEA) == "German Unity Day"
    assert holiday_name(date(2026, 12, 25), AMER) == "Christmas Day"
    assert holiday_name(date(2026, 8, 9), APAC) == "National Day"
    assert holiday_name(date(2026, 1, 1), BusinessCalendar("Asia/Tokyo", holiday_country="JP")) == "New Year's Day"
