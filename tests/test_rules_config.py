"""`parse_rules`: the example file, defaults, overrides and every problem named by key."""
from __future__ import annotations

import tomllib
from datetime import date, time
from pathlib import Path
from typing import Any

import pytest

from gateway import config as gateway_config
from gateway.rules.settings import OffsetBand, Target, default_rules, parse_rules

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "rules.example.toml"


def example() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))


def test_example_file_parses_without_problems() -> None:
    rules, problems = parse_rules(example())
    assert problems == []
    assert rules.govcloud.domains == ("agency.example.gov",)
    assert rules.govcloud.accounts == ("GOV-104233",)
    assert [c.organisation for c in rules.directory.customers] == [
        "Beispiel Maschinenbau GmbH", "Example Federal Agency"]
    federal = rules.directory.customers[1]
    assert (federal.region, federal.plan, federal.govcloud) == ("AMER", "advanced", True)


@pytest.mark.parametrize("part", ["default_region", "default_plan", "fields", "region", "priority",
                                  "technical", "redirects", "required", "plans", "hours", "warn_before",
                                  "pause_target", "category", "product"])
def test_example_file_documents_the_built_in_defaults(part: str) -> None:
    # The example is the documentation of the defaults: it must not drift from them.
    rules, _ = parse_rules(example())
    assert getattr(rules, part) == getattr(default_rules(), part)


def test_example_file_is_also_a_valid_gateway_config() -> None:
    # [rules] is shared with gateway.config, which reads rules.default_region.
    assert gateway_config.parse(example()).default_region == "AMER"


def test_no_rules_section_gives_the_defaults() -> None:
    rules, problems = parse_rules({})
    assert problems == []
    assert rules == default_rules()


def test_built_in_plans_and_hours() -> None:
    rules = default_rules()
    assert rules.plans["basic"].targets == {}
    assert rules.plans["professional"].targets == {1: Target(3), 2: Target(6), 3: Target(9)}
    assert rules.plans["advanced"].target(1) == Target(1, around_the_clock=True)
    assert rules.plans["advanced"].target(3) == Target(6)
    assert {r: (c.timezone, c.holiday_country) for r, c in rules.hours.items()} == {
        "AMER": ("America/New_York", "US"), "EMEA": ("Europe/Berlin", "DE"),
        "APAC": ("Asia/Singapore", "SG")}
    assert all((c.start, c.end) == (time(9), time(17)) for c in rules.hours.values())


def test_overrides_replace_only_the_keys_given() -> None:
    rules, problems = parse_rules({"rules": {
        "default_region": "EMEA",
        "priority": {"wording": {"de": {"p1": ["Notstand"]}, "fr": {"p1": ["panne"]}}},
        "hours": {"EMEA": {"start": time(8, 30), "end": "18:00", "subdivision": "BY",
                           "closed": [date(2026, 12, 24), "2026-12-31"]}},
        "plans": {"enterprise": {"p1": {"hours": 0.5, "clock": "24/7"}, "p4": {"hours": 40}}},
        "region": {"offsets": {"EMEA": ["-01:00", "+04:00"], "APAC": []}},
    }})
    assert problems == []
    d = default_rules()
    assert rules.default_region == "EMEA"
    assert rules.priority.wording[1]["de"] == ("Notstand",)
    assert rules.priority.wording[1]["fr"] == ("panne",)
    assert rules.priority.wording[1]["en"] == d.priority.wording[1]["en"]
    assert rules.priority.wording[2] == d.priority.wording[2]
    emea = rules.hours["EMEA"]
    assert (emea.start, emea.end, emea.timezone) == (time(8, 30), time(18), "Europe/Berlin")
    assert (emea.holiday_country, emea.holiday_subdivision) == ("DE", "BY")
    assert emea.closed == {date(2026, 12, 24), date(2026, 12, 31)}
    assert rules.plans["enterprise"].target(1) == Target(0.5, around_the_clock=True)
    assert set(rules.plans) == {"basic", "professional", "advanced", "enterprise"}
    assert rules.region.offsets == (OffsetBand("AMER", -600, -150), OffsetBand("EMEA", -60, 240))


def test_customer_directory_lookup_by_domain_and_parent_domain() -> None:
    rules, problems = parse_rules({"rules": {"customer": [
        {"organisation": "Kunde AG", "domains": ["Kunde-AG.de", "kunde.ch"], "region": "EMEA"}]}})
    assert problems == []
    found = rules.directory.lookup("mail.kunde-ag.de")
    assert found is not None and found[0].organisation == "Kunde AG" and found[1] == "kunde-ag.de"
    assert rules.directory.lookup("kunde.ch") is not None
    assert rules.directory.lookup("ag.de") is None
    assert rules.directory.lookup("") is None


@pytest.mark.parametrize(("rules_table", "key"), [
    ("not a table", "rules"),
    ({"unknown_key": 1}, "rules.unknown_key"),
    ({"default_region": "MARS"}, "rules.default_region"),
    ({"default_plan": "platinum"}, "rules.default_plan"),
    ({"fields": {"region": "Region"}}, "rules.fields.region"),
    ({"fields": {"colour": ["x"]}}, "rules.fields.colour"),
    ({"region": {"sources": ["field", "horoscope"]}}, "rules.region.sources"),
    ({"region": {"sources": ["field", "field"]}}, "rules.region.sources"),
    ({"region": {"values": {"Mars": "MARS"}}}, "rules.region.values.Mars"),
    ({"region": {"mailboxes": {"support-de@example.com": "DE"}}},
     "rules.region.mailboxes.support-de@example.com"),
    ({"region": {"offsets": {"EMEA": ["+1", "+4:00"]}}}, "rules.region.offsets.EMEA"),
    ({"region": {"offsets": {"EMEA": ["+04:00", "+01:00"]}}}, "rules.region.offsets.EMEA"),
    ({"region": {"offsets": {"EMEA": ["-05:00", "+04:00"]}}}, "rules.region.offsets"),
    ({"region": {"offsets": {"LUNA": ["+01:00", "+02:00"]}}}, "rules.region.offsets.LUNA"),
    ({"region": {"ignore_utc": "yes"}}, "rules.region.ignore_utc"),
    ({"govcloud": {"domains": "agency.gov"}}, "rules.govcloud.domains"),
    ({"govcloud": {"mentions": ["gov*cloud"]}}, "rules.govcloud.mentions"),
    ({"priority": {"default": 5}}, "rules.priority.default"),
    ({"priority": {"default": True}}, "rules.priority.default"),
    ({"priority": {"values": {"blocker": 0}}}, "rules.priority.values.blocker"),
    ({"priority": {"wording": {"en": {"p3": ["meh"]}}}}, "rules.priority.wording.en.p3"),
    ({"priority": {"wording": {"en": {"p1": [""]}}}}, "rules.priority.wording.en.p1"),
    ({"priority": {"wording": {"en": {"p1": ["***"]}}}}, "rules.priority.wording.en.p1"),
    ({"priority": {"sources": "field"}}, "rules.priority.sources"),
    ({"technical": {"en": "error"}}, "rules.technical.en"),
    ({"redirect": {"Legal Dept": {"en": ["lawsuit"]}}}, "rules.redirect.Legal Dept"),
    ({"redirect": {"billing": {"de": [3]}}}, "rules.redirect.billing.de"),
    ({"missing": {"required": ["shoe_size"]}}, "rules.missing.required"),
    ({"sla": {"warn_before": "soon"}}, "rules.sla.warn_before"),
    ({"missing": {"pause_target": "yes"}}, "rules.missing.pause_target"),
    ({"category": {"backup": {"fr": "sauvegarde"}}}, "rules.category.backup.fr"),
    ({"category": {"backup": {"klingon": ["x"]}}}, "rules.category.backup.klingon"),
    ({"product": {"": {}}}, "rules.product."),
    ({"product": {"Cloud Backup": 3}}, "rules.product.Cloud Backup"),
    ({"sla": {"warn_before": "100%"}}, "rules.sla.warn_before"),
    ({"sla": {"warn_before": 30}}, "rules.sla.warn_before"),
    ({"sla": {"warn_ahead": "30m"}}, "rules.sla.warn_ahead"),
    ({"plans": {"gold": {"p1": {"hours": -1}}}}, "rules.plans.gold.p1.hours"),
    ({"plans": {"gold": {"p1": {"hours": "3"}}}}, "rules.plans.gold.p1.hours"),
    ({"plans": {"gold": {"p2": {"hours": 3, "clock": "always"}}}}, "rules.plans.gold.p2.clock"),
    ({"plans": {"gold": {"p5": {"hours": 3}}}}, "rules.plans.gold.p5"),
    ({"plans": {"gold": 3}}, "rules.plans.gold"),
    ({"hours": {"MARS": {}}}, "rules.hours.MARS"),
    ({"hours": {"EMEA": {"timezone": "Europe/Atlantis"}}}, "rules.hours.EMEA.timezone"),
    ({"hours": {"EMEA": {"days": ["monday"]}}}, "rules.hours.EMEA.days"),
    ({"hours": {"EMEA": {"days": []}}}, "rules.hours.EMEA.days"),
    ({"hours": {"EMEA": {"start": "25:00"}}}, "rules.hours.EMEA.start"),
    ({"hours": {"EMEA": {"start": "18:00", "end": "09:00"}}}, "rules.hours.EMEA.end"),
    ({"hours": {"EMEA": {"holidays": "XX"}}}, "rules.hours.EMEA.holidays"),
    ({"hours": {"EMEA": {"subdivision": "ZZ"}}}, "rules.hours.EMEA.subdivision"),
    ({"hours": {"EMEA": {"closed": ["24.12.2026"]}}}, "rules.hours.EMEA.closed"),
    ({"hours": {"EMEA": {"opening": "09:00"}}}, "rules.hours.EMEA.opening"),
    ({"customer": {"organisation": "X"}}, "rules.customer"),
    ({"customer": [{"organisation": "X"}]}, "rules.customer[0].domains"),
    ({"customer": [{"domains": ["x.de"]}]}, "rules.customer[0].organisation"),
    ({"customer": [{"organisation": "X", "domains": []}]}, "rules.customer[0].domains"),
    ({"customer": [{"organisation": "X", "domains": ["x.de"], "plan": "gold"}]},
     "rules.customer[0].plan"),
    ({"customer": [{"organisation": "X", "domains": ["x.de"], "region": "DACH"}]},
     "rules.customer[0].region"),
    ({"customer": [{"organisation": "X", "domains": ["x.de"], "govcloud": "no"}]},
     "rules.customer[0].govcloud"),
    ({"customer": [{"organisation": "X", "domains": ["x.de"]},
                   {"organisation": "Y", "domains": ["X.de"]}]}, "rules.customer[1].domains"),
])
def test_bad_values_are_reported_by_key(rules_table: Any, key: str) -> None:
    rules, problems = parse_rules({"rules": rules_table})
    assert problems, "expected a problem"
    assert any(p.startswith(f"{key}: ") for p in problems), problems
    assert rules is not None      # still usable: defaults stand in for the bad values


def test_all_problems_are_reported_at_once() -> None:
    _, problems = parse_rules({"rules": {
        "default_region": "MARS", "priority": {"default": 9},
        "hours": {"APAC": {"timezone": "Nowhere/Town"}}}})
    assert [p.split(":")[0] for p in problems] == [
        "rules.default_region", "rules.priority.default", "rules.hours.APAC.timezone"]


def test_a_bad_value_leaves_the_default_in_place() -> None:
    rules, problems = parse_rules({"rules": {"default_region": "MARS",
                                             "hours": {"EMEA": {"start": "late"}}}})
    assert len(problems) == 2
    assert rules.default_region == "AMER"
    assert rules.hours["EMEA"] == default_rules().hours["EMEA"]


@pytest.mark.parametrize("junk", [None, 1, 2.5, True, "x", [], [1, "a"], {"a": None}, date(2026, 1, 1)])
def test_parse_never_raises_on_junk_anywhere(junk: Any) -> None:
    for section in ("fields", "region", "govcloud", "priority", "technical", "redirect", "missing",
                    "plans", "hours", "customer", "default_plan", "default_region"):
        parse_rules({"rules": {section: junk}})
    for nested in ({"region": {"values": junk, "offsets": junk, "mailboxes": junk}},
                   {"priority": {"values": junk, "wording": junk, "negations": junk}},
                   {"priority": {"wording": {"en": junk}}},
                   {"redirect": {"billing": junk}},
                   {"plans": {"gold": {"p1": junk, "description": junk}}},
                   {"hours": {"EMEA": {"start": junk, "end": junk, "days": junk, "holidays": junk,
                                       "closed": junk, "timezone": junk}}},
                   {"customer": [junk]},
                   {"customer": [{"organisation": junk, "domains": junk, "plan": junk}]}):
        parse_rules({"rules": nested})
