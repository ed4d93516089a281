"""The rules stage's configuration: built-in defaults and the `[rules]` TOML tables.

Support teams change routing here, not in code. `config/rules.example.toml`
documents every key in the order the rules apply. Merging is per key: a key
left out keeps its built-in default, a key given replaces it wholly (a list
is not appended to). `parse_rules` never raises for bad input: it returns the
defaults in place of every bad value, plus one "rules.key.path: what is
wrong" string per problem, the style of `gateway.config`.

Word lists are phrases, not regular expressions, so that nobody has to
escape a dot: matching ignores case, a space or hyphen matches any run of
spaces and hyphens ("how to" finds "How-to"), and a leading or trailing `*`
lets the word continue ("invoice*" finds "invoices", "*ausfall" finds
"Totalausfall").
"""
from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays

from gateway.model import REGIONS, normalize_address
from gateway.rules.sla import WEEKDAY_NAMES, BusinessCalendar

Wording = Mapping[str, tuple[str, ...]]      # language ("en", "de") → phrases

SUPPORTED_LANGUAGES = ("en", "de", "ja")     # gateway.rules.language.SUPPORTED
REGION_SOURCES = ("field", "mailbox", "directory", "country", "date_offset")
PRIORITY_SOURCES = ("field", "subject_tag", "wording")
WORDING_LEVELS = (1, 2, 4)                   # 3 is the default, never "worded"
# Kaseya's required details: the server URL, the module or product, its version,
# the steps that reproduce the problem and a sample machine it happens on
KASEYA_FIELDS = ("server_url", "product", "version", "steps", "sample_machine")
FIELD_NAMES = ("region", "priority", "account_email", "organisation", *KASEYA_FIELDS, "category")
REQUIRABLE = ("account_email", "organisation", "region", *KASEYA_FIELDS)
REQUIRED_BY_DEFAULT = ("account_email", "organisation")
CLOCKS = ("business", "24/7")


# -- the configuration as data ---------------------------------------------

@dataclass(frozen=True)
class FieldLabels:
    """Labels of the `Label: value` lines that the public ticket forms write."""

    region: tuple[str, ...]
    priority: tuple[str, ...]
    account_email: tuple[str, ...]
    organisation: tuple[str, ...]
    server_url: tuple[str, ...] = ("Server URL", "Server address", "Instance URL", "Server-URL",
                                   "Server-Adresse", "サーバーURL", "サーバーのURL")
    product: tuple[str, ...] = ("Product", "Module", "Product/Module", "Modul", "Produkt",
                                "Produkt/Modul", "製品", "モジュール")
    version: tuple[str, ...] = ("Version", "Product version", "Produktversion", "バージョン")
    steps: tuple[str, ...] = ("Steps to reproduce", "Steps", "Reproduction steps",
                              "Schritte zur Reproduktion", "Schritte", "再現手順", "手順")
    sample_machine: tuple[str, ...] = ("Sample machine", "Affected machine", "Machine name",
                                       "Beispielrechner", "Betroffener Rechner", "Rechnername",
                                       "対象マシン", "マシン名")

    category: tuple[str, ...] = ("Category", "Problem type", "Issue type", "Kategorie", "Problemart",
                                 "Problemtyp", "カテゴリ", "カテゴリー", "問題の種類")

    def labels(self, name: str) -> tuple[str, ...]:
        labels: tuple[str, ...] = getattr(self, name)
        return labels


@dataclass(frozen=True)
class OffsetBand:
    """UTC offsets (minutes, inclusive) of a `Date` header that suggest a region."""

    region: str
    low: int
    high: int


@dataclass(frozen=True)
class RegionRules:
    sources: tuple[str, ...]                 # evidence sources, strongest first
    values: Mapping[str, str]                # normalised form value → region
    mailboxes: Mapping[str, str]             # mailbox address → region
    mailbox_tokens: Mapping[str, str]        # word in a mailbox's local part → region
    offsets: tuple[OffsetBand, ...]
    ignore_utc: bool                         # +0000 is what servers write: no evidence


@dataclass(frozen=True)
class GovCloudRules:
    domains: tuple[str, ...]                 # sender domains (and their subdomains)
    accounts: tuple[str, ...]                # account ids that, quoted in a mail, mean GovCloud
    mentions: tuple[str, ...]                # phrases


@dataclass(frozen=True)
class PriorityRules:
    sources: tuple[str, ...]
    values: Mapping[str, int]                # normalised form value → priority
    wording: Mapping[int, Wording]           # 1, 2, 4 → language → phrases
    negations: tuple[str, ...]               # words that cancel a phrase right after them
    default: int


@dataclass(frozen=True)
class Target:
    hours: float
    around_the_clock: bool = False           # True: 24/7, else the region's business hours

    def describe(self) -> str:
        unit = "hour" if self.hours == 1 else "hours"
        return f"{self.hours:g} {unit} 24/7" if self.around_the_clock \
            else f"{self.hours:g} business {unit}"


@dataclass(frozen=True)
class WarnLead:
    """How long before a first-response target the SLA warning goes out:
    a share of the target (`fraction`, "20%") or fixed hours ("30m", "2h"),
    counted on the target's own clock (business hours or 24/7). Neither: no
    warning before the target, only the breach notice when it passes."""

    fraction: float | None = None
    hours: float | None = None

    def before(self, target_hours: float) -> float | None:
        """Hours before the target to warn; None when no warning fits inside it."""
        lead = target_hours * self.fraction if self.fraction is not None else self.hours
        return lead if lead is not None and 0 < lead < target_hours else None

    def describe(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}% of the target"
        if self.hours is not None:
            return f"{self.hours * 60:g} minutes" if self.hours < 1 else f"{self.hours:g} hours"
        return "off"


@dataclass(frozen=True)
class Plan:
    name: str
    targets: Mapping[int, Target]            # priority → first-response target; absent = none
    description: str = ""
    # Kaseya: certified administrators ranked first, with a shorter target where set
    certified: Mapping[int, Target] = field(default_factory=dict)

    def target(self, priority: int, *, certified: bool = False) -> Target | None:
        if certified and priority in self.certified:
            return self.certified[priority]
        return self.targets.get(priority)


@dataclass(frozen=True)
class Customer:
    organisation: str
    domains: tuple[str, ...]
    region: str | None = None
    plan: str | None = None
    govcloud: bool = False
    language: str | None = None              # en, de, ja: the language support answers in
    # Kaseya's authorised contacts: who may open tickets for the organisation
    contacts: tuple[str, ...] = ()           # addresses, lower case
    contacts_policy: str = "open"            # open | flag | restrict (CONTACT_POLICIES)
    certified: tuple[Certified, ...] = ()    # certified administrators: authorised, ranked first
    # restrict: how someone refused is added, in the answer they get (else: ask an authorised contact)
    contacts_instructions: str | None = None


CONTACT_POLICIES = ("open", "flag", "restrict")


@dataclass(frozen=True)
class Certified:
    """A certified administrator of a customer, until the certificate expires."""

    address: str
    expires: date                            # the last day the certificate counts


@dataclass(frozen=True)
class CustomerDirectory:
    customers: tuple[Customer, ...] = ()

    def lookup(self, domain: str) -> tuple[Customer, str] | None:
        """The customer owning `domain` or its nearest parent domain, and the domain matched."""
        labels = domain.strip().strip(".").lower().split(".")
        for i in range(len(labels) - 1):
            candidate = ".".join(labels[i:])
            for customer in self.customers:
                if candidate in customer.domains:
                    return customer, candidate
        return None


@dataclass(frozen=True)
class Classes:
    """Categories or products (issue 19; Dropbox's problem types, Kaseya's module or
    product): each name with the form values that mean it (`aliases`), the
    mailboxes that imply it, and its wording per language. With no names, a form
    line's value is taken as given (a product list the team has not configured)."""

    names: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)        # normalised value → name
    mailboxes: Mapping[str, str] = field(default_factory=dict)      # mailbox address → name
    wording: Mapping[str, Wording] = field(default_factory=dict)    # name → language → phrases


@dataclass(frozen=True)
class RulesConfig:
    default_region: str
    default_plan: str
    fields: FieldLabels
    region: RegionRules
    govcloud: GovCloudRules
    priority: PriorityRules
    technical: Wording                       # technical-problem wording: keeps a mail in support
    redirects: Mapping[str, Wording]         # destination ("billing", "sales") → wording
    required: tuple[str, ...]                # fields whose absence is reported as missing
    plans: Mapping[str, Plan]
    hours: Mapping[str, BusinessCalendar]    # region → desk calendar
    directory: CustomerDirectory = field(default_factory=CustomerDirectory)
    warn_before: WarnLead = WarnLead(fraction=0.2)   # [rules.sla] warn_before
    pause_target: bool = False               # [rules.missing]: the target waits for missing details
    category: Classes = Classes()            # [rules.category.NAME]
    product: Classes = Classes()             # [rules.product.NAME]


# -- built-in defaults -------------------------------------------------------

def default_rules() -> RulesConfig:
    """The rules a gateway without a `[rules]` section runs with."""
    return RulesConfig(
        default_region="AMER",
        default_plan="basic",
        fields=FieldLabels(
            region=("Region", "Anmeldung Region", "Signup region", "Sign-up region",
                    "Registration region", "Data region", "Datenregion", "Registrierungsregion"),
            priority=("Priority", "Priorität", "Prioritaet", "Prio", "Severity", "Dringlichkeit",
                      "優先度", "重要度", "緊急度"),
            account_email=("Account email", "Account e-mail address", "Account email address",
                           "Konto-E-Mail", "Konto-E-Mail-Adresse", "E-Mail", "E-Mail-Adresse",
                           "Email address", "Login email", "Login"),
            organisation=("Organisation", "Organization", "Organisation name", "Organization name",
                          "Company", "Company name", "Firma", "Firmenname", "Unternehmen"),
        ),
        region=RegionRules(
            sources=REGION_SOURCES,
            values=_frozen({normalise_value(k): v for k, v in _region_values().items()}),
            mailboxes=_frozen({}),
            mailbox_tokens=_frozen({"amer": "AMER", "americas": "AMER", "emea": "EMEA",
                                    "eu": "EMEA", "europe": "EMEA", "apac": "APAC",
                                    "asia": "APAC"}),
            # Bands by where customers actually are: Hawaii to Brazil (-10..-3, and
            # Newfoundland's -2:30 in summer) is AMER; the Atlantic islands, Europe,
            # Africa, the Middle East and the Gulf (-2..+4:30) EMEA; Pakistan and
            # India eastwards (+5..+14) APAC. -12..-10:30 (Samoa, Niue) is left out:
            # too few senders to be worth a guess.
            offsets=(OffsetBand("AMER", -600, -150), OffsetBand("EMEA", -120, 270),
                     OffsetBand("APAC", 300, 840)),
            ignore_utc=True,
        ),
        govcloud=GovCloudRules(domains=(), accounts=(),
                               mentions=("govcloud", "gov cloud", "fedramp", "fed ramp")),
        priority=PriorityRules(
            sources=PRIORITY_SOURCES,
            values=_frozen({normalise_value(k): v for k, v in _priority_values().items()}),
            wording=_frozen({1: _frozen(_P1), 2: _frozen(_P2), 4: _frozen(_P4)}),
            negations=("not", "no", "never", "without", "nicht", "kein", "keine", "keinen",
                       "keinem", "keiner", "keines", "nie", "niemals", "ohne"),
            default=3,
        ),
        technical=_frozen(_TECHNICAL),
        redirects=_frozen({"billing": _frozen(_BILLING), "sales": _frozen(_SALES)}),
        required=REQUIRED_BY_DEFAULT,
        category=_classes_of(_CATEGORIES),
        plans=_frozen({
            "basic": Plan("basic", _frozen({}), "community support, no response target"),
            "professional": Plan("professional", _frozen({
                1: Target(3), 2: Target(6), 3: Target(9)}), "business hours"),
            "advanced": Plan("advanced", _frozen({
                1: Target(1, around_the_clock=True), 2: Target(3), 3: Target(6)}),
                "P1 around the clock, otherwise business hours"),
        }),
        hours=_frozen({
            "AMER": BusinessCalendar("America/New_York", holiday_country="US"),
            "EMEA": BusinessCalendar("Europe/Berlin", holiday_country="DE"),
            "APAC": BusinessCalendar("Asia/Singapore", holiday_country="SG"),
        }),
    )


# Built-in categories: what customers' problems are about. "Anmeldung" is not
# login wording: NinjaOne's form writes "Anmeldung Region" (sign-up region).
_CATEGORIES: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "backup": {"aliases": ("backup", "backups", "sicherung", "datensicherung", "バックアップ"),
               "en": ("backup*", "backing up"), "de": ("Sicherung*", "Datensicherung*", "Backup*"),
               "ja": ("バックアップ",)},
    "restore": {"aliases": ("restore", "recovery", "wiederherstellung", "rücksicherung", "復元", "リストア"),
                "en": ("restore*", "restoring", "recover*"), "de": ("Wiederherstellung*", "wiederherstellen",
                                                                 "Rücksicherung*"),
                "ja": ("復元", "リストア")},
    "login": {"aliases": ("login", "log in", "sign in", "access", "anmeldung", "zugang", "ログイン"),
              "en": ("log in", "login", "sign in", "password*", "2FA", "SSO", "locked out"),
              "de": ("einloggen", "anmelden", "Passwort*", "Kennwort*", "Zugang"),
              "ja": ("ログイン", "パスワード", "サインイン")},
    "performance": {"aliases": ("performance", "leistung", "パフォーマンス"),
                    "en": ("slow", "slowly", "performance", "latency"), "de": ("langsam", "Leistung", "Performance"),
                    "ja": ("遅い", "遅く", "パフォーマンス")},
}


def _classes_of(table: Mapping[str, Mapping[str, tuple[str, ...]]], mailboxes: Mapping[str, str] | None = None
                ) -> Classes:
    aliases = {normalise_value(name): name for name in table}
    for name, entry in table.items():
        aliases.update({normalise_value(a): name for a in entry.get("aliases", ())})
    wording = {name: _frozen({lang: tuple(v) for lang, v in entry.items() if lang not in ("aliases", "mailboxes")})
               for name, entry in table.items()}
    return Classes(tuple(table), _frozen(aliases), _frozen(dict(mailboxes or {})), _frozen(wording))


def _region_values() -> dict[str, str]:
    amer = ("AMER", "Americas", "America", "North America", "South America", "Latin America",
            "LATAM", "US", "USA", "United States", "Canada", "Amerika", "Nordamerika",
            "Südamerika", "Lateinamerika")
    emea = ("EMEA", "EU", "Europe", "Europa", "European Union", "UK", "Middle East", "Africa",
            "Afrika", "Naher Osten")
    apac = ("APAC", "AP", "Asia", "Asien", "Asia Pacific", "Asien-Pazifik", "Pacific",
            "Australia", "Australien", "Japan", "Singapore", "Singapur", "India", "Indien")
    return {**dict.fromkeys(amer, "AMER"), **dict.fromkeys(emea, "EMEA"),
            **dict.fromkeys(apac, "APAC")}


def _priority_values() -> dict[str, int]:
    # "1".."4" and "P1".."P4" are understood without being listed.
    return {"critical": 1, "business critical": 1, "urgent": 1, "emergency": 1,
            "kritisch": 1, "dringend": 1, "Notfall": 1, "geschäftskritisch": 1,
            "high": 2, "major": 2, "hoch": 2,
            "normal": 3, "medium": 3, "mittel": 3, "general": 3,
            "low": 4, "minor": 4, "niedrig": 4, "gering": 4,
            "至急": 1, "緊急": 1, "最高": 1, "高": 2, "中": 3, "低": 4}


# Wording. "down" alone is not a P1 phrase: "slow down", "drop-down" and "shut
# down the VM" are not outages; the listed forms are.
_P1: Mapping[str, tuple[str, ...]] = {
    "en": ("outage", "outages", "is down", "are down", "went down", "down since",
           "completely down", "production down", "production stopped", "production has stopped",
           "production is stopped", "not working at all", "nothing works", "nothing is working",
           "total failure", "data loss", "business critical", "urgent", "urgently", "critical"),
    "de": ("*ausfall", "ausgefallen", "Produktion steht", "Produktionsstillstand",
           "geht nicht mehr", "geht gar nichts mehr", "geht nichts mehr",
           "funktioniert überhaupt nicht", "funktioniert gar nicht", "nichts funktioniert",
           "Datenverlust", "geschäftskritisch", "dringend", "kritisch"),
    # Japanese has no spaces: a phrase matches inside a run of text. "停止" and
    # "ダウン" alone are not listed: "停止する方法" (how to stop) and "ダウンロード"
    # (download) are no outages; the listed forms are.
    "ja": ("至急", "障害", "停止しています", "停止しました", "停止中", "ダウンしています",
           "ダウンしました", "サーバーダウン", "システムダウン", "全く動きません", "まったく動きません",
           "データが消失", "データ消失", "業務が止まって", "業務停止"),
}
_P2: Mapping[str, tuple[str, ...]] = {
    "en": ("slow", "slowly", "slowness", "degraded", "degradation", "intermittent*",
           "sporadic*", "partial outage", "partially down", "partly working", "sometimes fails"),
    "de": ("langsam", "verlangsamt", "eingeschränkt", "Einschränkung*", "sporadisch",
           "zeitweise", "zeitweilig", "teilweise ausgefallen", "teilweiser Ausfall",
           "Teilausfall"),
    "ja": ("遅い", "遅く", "遅延", "低下", "断続的", "時々", "ときどき", "不安定"),
}
_P4: Mapping[str, tuple[str, ...]] = {
    "en": ("how to", "how do I", "how do we", "how can I", "how can we", "is it possible",
           "question*", "documentation", "how-to guide"),
    "de": ("wie kann ich", "wie können wir", "wie kann man", "wie richte ich", "ist es möglich",
           "Frage*", "Anleitung*", "Dokumentation"),
    "ja": ("方法", "教えてください", "可能ですか", "できますか", "質問", "使い方", "ドキュメント",
           "マニュアル"),
}
_TECHNICAL: Mapping[str, tuple[str, ...]] = {
    "en": ("error*", "fail*", "crash*", "bug", "bugs", "broken", "exception*", "stack trace",
           "timeout*", "timed out", "not working", "doesn't work", "does not work",
           "stopped working", "can't log in", "cannot log in"),
    "de": ("*fehler*", "Absturz", "abgestürzt", "stürzt", "defekt", "kaputt",
           "funktioniert nicht", "geht nicht", "Störung*", "Zeitüberschreitung"),
}
_BILLING: Mapping[str, tuple[str, ...]] = {
    "en": ("invoice*", "billing", "billed", "refund*", "payment*", "credit card", "receipt*",
           "VAT", "purchase order", "charged", "overcharged", "direct debit"),
    "de": ("Rechnung*", "Abrechnung*", "Jahresrechnung", "Erstattung*", "Rückerstattung*",
           "Zahlung*", "Gutschrift*", "Mahnung*", "Lastschrift*", "Kreditkarte",
           "Umsatzsteuer"),
}
_SALES: Mapping[str, tuple[str, ...]] = {
    "en": ("pricing", "price*", "quote", "quotes", "quotation*", "demo", "demos", "onboarding",
           "licence*", "license*", "cost", "costs", "purchase", "sales"),
    "de": ("Preis*", "Angebot*", "Lizenz*", "Demo", "Vorführung", "Onboarding", "Kosten",
           "kaufen", "Vertrieb"),
}


def _frozen(d: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(d))


def normalise_value(value: str) -> str:
    """The comparable form of a form value: lower case, words joined by one space.

    "Asia-Pacific", "asia pacific" and " ASIA / Pacific " are one key.
    """
    return " ".join(re.findall(r"\w+", value.lower()))


# -- validation ----------------------------------------------------------------

class _Problems:
    """Collects "key: what is wrong" strings; every check returns None when bad."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def fail(self, key: str, what: str) -> None:
        self.items.append(f"{key}: {what}")

    def table(self, key: str, value: Any) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.fail(key, f"expected a table, got {value!r}")
            return None
        return value

    def unknown(self, key: str, table: Mapping[str, Any], known: tuple[str, ...]) -> None:
        for name in table:
            if name not in known:
                self.fail(f"{key}.{name}", unknown_key(name, known))

    def string(self, key: str, value: Any) -> str | None:
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {value!r}")
            return None
        return value

    def boolean(self, key: str, value: Any) -> bool | None:
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {value!r}")
            return None
        return value

    def strings(self, key: str, value: Any) -> tuple[str, ...] | None:
        if not isinstance(value, list) or not all(isinstance(x, str) and x.strip() for x in value):
            self.fail(key, f"expected a list of non-empty strings, got {value!r}")
            return None
        return tuple(x.strip() for x in value)

    def phrases(self, key: str, value: Any) -> tuple[str, ...] | None:
        items = self.strings(key, value)
        if items is None:
            return None
        bad = [p for p in items if "*" in p.strip("*") or not re.search(r"\w", p)]
        if bad:
            self.fail(key, f"'*' may only start or end a phrase, and a phrase needs a letter: {bad!r}")
            return None
        return items

    def region(self, key: str, value: Any) -> str | None:
        if value not in REGIONS:
            self.fail(key, f"expected one of {', '.join(REGIONS)}, got {value!r}")
            return None
        return str(value)

    def priority(self, key: str, value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4:
            self.fail(key, f"expected a priority from 1 to 4, got {value!r}")
            return None
        return value

    def sources(self, key: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
        items = self.strings(key, value)
        if items is None:
            return None
        bad = [s for s in items if s not in allowed]
        if bad or len(set(items)) != len(items):
            self.fail(key, f"expected distinct names from {', '.join(allowed)}, got {value!r}")
            return None
        return items


def unknown_key(name: str, known: Iterable[str]) -> str:
    """"unknown key; did you mean 'x'?" (difflib), else the keys that exist."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; expected one of {', '.join(known)}" if known else "unknown key"


def parse_rules(data: Mapping[str, Any]) -> tuple[RulesConfig, list[str]]:
    """The rules from a whole TOML tree (only its `rules` table is read).

    Returns the rules and the problems; with problems the rules hold the
    defaults in place of each bad value, and the caller should refuse to start.
    """
    p = _Problems()
    d = default_rules()
    raw = data.get("rules", {})
    ru = p.table("rules", raw) or {}
    p.unknown("rules", ru, ("default_region", "default_plan", "fields", "region", "govcloud",
                            "priority", "technical", "redirect", "missing", "plans", "hours",
                            "customer", "sla", "category", "product"))
    default_region = d.default_region
    if "default_region" in ru:
        default_region = p.region("rules.default_region", ru["default_region"]) or default_region
    plans = _plans(p, ru.get("plans", {}), d.plans)
    default_plan = d.default_plan
    if "default_plan" in ru:
        default_plan = p.string("rules.default_plan", ru["default_plan"]) or default_plan
    if default_plan not in plans:
        p.fail("rules.default_plan", f"no such plan {default_plan!r}; plans: {', '.join(plans)}")
        default_plan = d.default_plan if d.default_plan in plans else next(iter(plans))
    rules = replace(
        d,
        default_region=default_region,
        default_plan=default_plan,
        fields=_fields(p, ru.get("fields", {}), d.fields),
        region=_region_rules(p, ru.get("region", {}), d.region),
        govcloud=_govcloud(p, ru.get("govcloud", {}), d.govcloud),
        priority=_priority(p, ru.get("priority", {}), d.priority),
        technical=_wording(p, "rules.technical", ru.get("technical", {}), d.technical),
        redirects=_redirects(p, ru.get("redirect", {}), d.redirects),
        required=_required(p, ru.get("missing", {}), d.required),
        plans=plans,
        hours=_hours(p, ru.get("hours", {}), d.hours),
        directory=_directory(p, ru.get("customer", []), plans),
        warn_before=_warn_before(p, ru.get("sla", {}), d.warn_before),
        pause_target=_pause_target(p, ru.get("missing", {}), d.pause_target),
        category=_classes(p, "rules.category", ru["category"]) if "category" in ru else d.category,
        product=_classes(p, "rules.product", ru["product"]) if "product" in ru else d.product,
    )
    return rules, p.items


_LEAD = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(%|m|min|h)\s*")


def _warn_before(p: _Problems, raw: Any, d: WarnLead) -> WarnLead:
    """`[rules.sla] warn_before`: "20%" of the target, "30m", "2h", or "off"."""
    t = p.table("rules.sla", raw) or {}
    p.unknown("rules.sla", t, ("warn_before",))
    if "warn_before" not in t:
        return d
    value = t["warn_before"]
    m = _LEAD.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, str) and value.strip().lower() in ("off", "0", ""):
        return WarnLead()
    if m is None or float(m[1]) <= 0 or (m[2] == "%" and float(m[1]) >= 100):
        p.fail("rules.sla.warn_before", 'expected a share of the target such as "20%" (above 0, '
               f'below 100), minutes such as "30m", hours such as "2h", or "off"; got {value!r}')
        return d
    amount = float(m[1])
    if m[2] == "%":
        return WarnLead(fraction=amount / 100)
    return WarnLead(hours=amount if m[2] == "h" else amount / 60)


def _fields(p: _Problems, raw: Any, d: FieldLabels) -> FieldLabels:
    t = p.table("rules.fields", raw) or {}
    p.unknown("rules.fields", t, FIELD_NAMES)
    changed = {name: labels for name in FIELD_NAMES if name in t
               if (labels := p.strings(f"rules.fields.{name}", t[name])) is not None}
    return replace(d, **changed)


def _region_rules(p: _Problems, raw: Any, d: RegionRules) -> RegionRules:
    key = "rules.region"
    t = p.table(key, raw) or {}
    p.unknown(key, t, ("sources", "values", "mailboxes", "mailbox_tokens", "offsets", "ignore_utc"))
    out = d
    if "sources" in t and (s := p.sources(f"{key}.sources", t["sources"], REGION_SOURCES)) is not None:
        out = replace(out, sources=s)
    if "values" in t:
        out = replace(out, values=_region_map(p, f"{key}.values", t["values"], normalise_value))
    if "mailboxes" in t:
        out = replace(out, mailboxes=_region_map(p, f"{key}.mailboxes", t["mailboxes"],
                                                 normalize_address))
    if "mailbox_tokens" in t:
        out = replace(out, mailbox_tokens=_region_map(p, f"{key}.mailbox_tokens",
                                                      t["mailbox_tokens"], str.lower))
    if "offsets" in t:
        out = replace(out, offsets=_offsets(p, f"{key}.offsets", t["offsets"], d.offsets))
    if "ignore_utc" in t and (b := p.boolean(f"{key}.ignore_utc", t["ignore_utc"])) is not None:
        out = replace(out, ignore_utc=b)
    return out


def _region_map(p: _Problems, key: str, raw: Any, norm: Callable[[str], str]) -> Mapping[str, str]:
    t = p.table(key, raw) or {}
    return _frozen({norm(name): region for name, value in t.items()
                    if (region := p.region(f"{key}.{name}", value)) is not None})


_OFFSET = re.compile(r"^([+-])(\d{1,2}):(\d{2})$")


def _offset_minutes(p: _Problems, key: str, value: Any) -> int | None:
    m = _OFFSET.match(value) if isinstance(value, str) else None
    if not m or int(m[2]) > 14 or int(m[3]) >= 60:
        p.fail(key, f"expected a UTC offset like \"-05:00\" or \"+09:30\", got {value!r}")
        return None
    minutes = int(m[2]) * 60 + int(m[3])
    return -minutes if m[1] == "-" else minutes


def _offsets(p: _Problems, key: str, raw: Any, d: tuple[OffsetBand, ...]) -> tuple[OffsetBand, ...]:
    t = p.table(key, raw) or {}
    bands = {b.region: b for b in d}
    for name, value in t.items():
        k = f"{key}.{name}"
        if p.region(k, name) is None:
            continue
        if value == []:          # an empty list switches the band off
            bands.pop(name, None)
            continue
        if not isinstance(value, list) or len(value) != 2:
            p.fail(k, f"expected [\"from\", \"to\"] offsets, got {value!r}")
            continue
        low, high = (_offset_minutes(p, k, v) for v in value)
        if low is None or high is None:
            continue
        if low > high:
            p.fail(k, f"the first offset must not be after the second, got {value!r}")
            continue
        bands[name] = OffsetBand(name, low, high)
    ordered = sorted(bands.values(), key=lambda b: b.low)
    for a, b in itertools.pairwise(ordered):
        if b.low <= a.high:
            p.fail(key, f"the {a.region} and {b.region} bands overlap")
    return tuple(ordered)


def _govcloud(p: _Problems, raw: Any, d: GovCloudRules) -> GovCloudRules:
    key = "rules.govcloud"
    t = p.table(key, raw) or {}
    p.unknown(key, t, ("domains", "accounts", "mentions"))
    out = d
    if "domains" in t and (s := p.strings(f"{key}.domains", t["domains"])) is not None:
        out = replace(out, domains=tuple(x.lower().strip(".") for x in s))
    if "accounts" in t and (s := p.strings(f"{key}.accounts", t["accounts"])) is not None:
        out = replace(out, accounts=s)
    if "mentions" in t and (s := p.phrases(f"{key}.mentions", t["mentions"])) is not None:
        out = replace(out, mentions=s)
    return out


def _priority(p: _Problems, raw: Any, d: PriorityRules) -> PriorityRules:
    key = "rules.priority"
    t = p.table(key, raw) or {}
    p.unknown(key, t, ("sources", "default", "values", "negations", "wording"))
    out = d
    if "sources" in t and (s := p.sources(f"{key}.sources", t["sources"], PRIORITY_SOURCES)) is not None:
        out = replace(out, sources=s)
    if "default" in t and (n := p.priority(f"{key}.default", t["default"])) is not None:
        out = replace(out, default=n)
    if "values" in t:
        vt = p.table(f"{key}.values", t["values"]) or {}
        out = replace(out, values=_frozen({
            normalise_value(name): n for name, value in vt.items()
            if (n := p.priority(f"{key}.values.{name}", value)) is not None}))
    if "negations" in t and (s := p.strings(f"{key}.negations", t["negations"])) is not None:
        out = replace(out, negations=tuple(x.lower() for x in s))
    if "wording" in t:
        out = replace(out, wording=_priority_wording(p, f"{key}.wording", t["wording"], d.wording))
    return out


def _priority_wording(p: _Problems, key: str, raw: Any,
                      d: Mapping[int, Wording]) -> Mapping[int, Wording]:
    # TOML: [rules.priority.wording.LANG] p1 = [...], p2 = [...], p4 = [...]
    levels = {n: dict(d.get(n, {})) for n in WORDING_LEVELS}
    t = p.table(key, raw) or {}
    for lang, per_lang in t.items():
        lt = p.table(f"{key}.{lang}", per_lang) or {}
        p.unknown(f"{key}.{lang}", lt, tuple(f"p{n}" for n in WORDING_LEVELS))
        for n in WORDING_LEVELS:
            if f"p{n}" in lt and (s := p.phrases(f"{key}.{lang}.p{n}", lt[f"p{n}"])) is not None:
                levels[n][lang] = s
    return _frozen({n: _frozen(w) for n, w in levels.items()})


def _wording(p: _Problems, key: str, raw: Any, d: Wording) -> Wording:
    # TOML: [rules.technical] en = [...], de = [...]
    t = p.table(key, raw) or {}
    out = dict(d)
    for lang, value in t.items():
        if (s := p.phrases(f"{key}.{lang}", value)) is not None:
            out[lang] = s
    return _frozen(out)


def _redirects(p: _Problems, raw: Any, d: Mapping[str, Wording]) -> Mapping[str, Wording]:
    t = p.table("rules.redirect", raw) or {}
    out = dict(d)
    for name, value in t.items():
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
            p.fail(f"rules.redirect.{name}", "a destination name is lower-case letters, digits, - or _")
            continue
        out[name] = _wording(p, f"rules.redirect.{name}", value, d.get(name, {}))
    return _frozen(out)


def _classes(p: _Problems, key: str, raw: Any) -> Classes:
    """`[rules.category.NAME]` / `[rules.product.NAME]`: aliases = [...], mailboxes =
    [...], and phrases per language (en = [...]). Given, the tables replace the
    built-in set wholly; `[rules.product]` with no table: the form value as given."""
    t = p.table(key, raw) or {}
    table: dict[str, dict[str, tuple[str, ...]]] = {}
    mailboxes: dict[str, str] = {}
    for name, entry in t.items():
        at = f"{key}.{name}"
        if not re.fullmatch(r"[\w][\w .&/+-]{0,39}", name):
            p.fail(at, "a name is 1-40 letters, digits, spaces or . & / + -")
            continue
        e = p.table(at, entry)
        if e is None:
            continue
        parsed: dict[str, tuple[str, ...]] = {}
        for k, v in e.items():
            if k != "mailboxes" and k != "aliases" and not re.fullmatch(r"[a-z]{2}", k):
                p.fail(f"{at}.{k}", "expected aliases, mailboxes or a language code (en, de, ja) with phrases")
                continue
            values = p.strings(f"{at}.{k}", v)
            if values is None:
                continue
            if k == "mailboxes":
                for address in values:
                    mailboxes[address.strip().lower()] = name
            else:
                parsed[k] = values
        table[name] = parsed
    return _classes_of(table, mailboxes)


def _pause_target(p: _Problems, raw: Any, d: bool) -> bool:
    t = raw if isinstance(raw, dict) else {}      # a bad table is reported by _required
    if "pause_target" not in t:
        return d
    value = p.boolean("rules.missing.pause_target", t["pause_target"])
    return d if value is None else value


def _required(p: _Problems, raw: Any, d: tuple[str, ...]) -> tuple[str, ...]:
    t = p.table("rules.missing", raw) or {}
    p.unknown("rules.missing", t, ("required", "pause_target"))
    if "required" not in t:
        return d
    value = t["required"]
    if not isinstance(value, list) or any(x not in REQUIRABLE for x in value):
        p.fail("rules.missing.required", f"expected names from {', '.join(REQUIRABLE)}, got {value!r}")
        return d
    return tuple(dict.fromkeys(value))


def _plans(p: _Problems, raw: Any, d: Mapping[str, Plan]) -> Mapping[str, Plan]:
    t = p.table("rules.plans", raw) or {}
    out = dict(d)
    for name, value in t.items():
        key = f"rules.plans.{name}"
        pt = p.table(key, value)
        if pt is None:
            continue
        p.unknown(key, pt, ("description", "p1", "p2", "p3", "p4", "certified"))
        targets = _targets(p, key, pt)
        certified = p.table(f"{key}.certified", pt.get("certified", {})) or {}
        p.unknown(f"{key}.certified", certified, ("p1", "p2", "p3", "p4"))
        description = pt.get("description", "")
        if not isinstance(description, str):
            p.fail(f"{key}.description", f"expected a string, got {description!r}")
            description = ""
        out[name] = Plan(name, _frozen(targets), description, _frozen(_targets(p, f"{key}.certified", certified)))
    return _frozen(out)


def _targets(p: _Problems, key: str, t: Mapping[str, Any]) -> dict[int, Target]:
    targets = {}
    for n in range(1, 5):
        if f"p{n}" in t and (target := _target(p, f"{key}.p{n}", t[f"p{n}"])) is not None:
            targets[n] = target
    return targets


def _target(p: _Problems, key: str, raw: Any) -> Target | None:
    t = p.table(key, raw)
    if t is None:
        return None
    p.unknown(key, t, ("hours", "clock"))
    hours = t.get("hours")
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not 0 < hours <= 24 * 90:
        p.fail(f"{key}.hours", f"expected a number of hours above 0, got {hours!r}")
        return None
    clock = t.get("clock", "business")
    if clock not in CLOCKS:
        p.fail(f"{key}.clock", f"expected \"business\" or \"24/7\", got {clock!r}")
        return None
    return Target(float(hours), around_the_clock=clock == "24/7")


def _hours(p: _Problems, raw: Any, d: Mapping[str, BusinessCalendar]) -> Mapping[str, BusinessCalendar]:
    t = p.table("rules.hours", raw) or {}
    out = dict(d)
    for region, value in t.items():
        key = f"rules.hours.{region}"
        if p.region(key, region) is None:
            continue
        ht = p.table(key, value)
        if ht is not None:
            out[region] = _calendar(p, key, ht, d[region])
    return _frozen(out)


def _calendar(p: _Problems, key: str, t: Mapping[str, Any], d: BusinessCalendar) -> BusinessCalendar:
    p.unknown(key, t, ("timezone", "days", "start", "end", "holidays", "subdivision", "closed"))
    cal = d
    if "timezone" in t and (tz := p.string(f"{key}.timezone", t["timezone"])) is not None:
        if _known_timezone(tz):
            cal = replace(cal, timezone=tz)
        else:
            p.fail(f"{key}.timezone", f"unknown IANA time zone {tz!r}")
    if "days" in t:
        days = t["days"]
        if not isinstance(days, list) or not days or any(x not in WEEKDAY_NAMES for x in days):
            p.fail(f"{key}.days",
                   f"expected a non-empty list of {', '.join(WEEKDAY_NAMES)}, got {days!r}")
        else:
            cal = replace(cal, weekdays=frozenset(WEEKDAY_NAMES.index(x) for x in days))
    start = _clock_time(p, f"{key}.start", t["start"]) if "start" in t else cal.start
    end = _clock_time(p, f"{key}.end", t["end"]) if "end" in t else cal.end
    if start is not None and end is not None:
        if start < end:
            cal = replace(cal, start=start, end=end)
        else:
            p.fail(f"{key}.end", f"must be after start ({start:%H:%M}); "
                                 "hours across midnight are not supported")
    if "holidays" in t or "subdivision" in t:
        cal = _holiday_settings(p, key, t, cal)
    if "closed" in t:
        closed = _dates(p, f"{key}.closed", t["closed"])
        if closed is not None:
            cal = replace(cal, closed=closed)
    return cal


def _known_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _clock_time(p: _Problems, key: str, value: Any) -> time | None:
    if isinstance(value, time):         # TOML local time: start = 09:00:00
        return value
    if isinstance(value, str) and re.fullmatch(r"\d{1,2}:\d{2}", value):
        h, m = (int(x) for x in value.split(":"))
        if h < 24 and m < 60:
            return time(h, m)
    p.fail(key, f"expected a time like \"09:00\", got {value!r}")
    return None


def _holiday_settings(p: _Problems, key: str, t: Mapping[str, Any],
                      cal: BusinessCalendar) -> BusinessCalendar:
    country = t.get("holidays", cal.holiday_country or "")
    subdiv = t.get("subdivision", cal.holiday_subdivision or "")
    if not isinstance(country, str) or not isinstance(subdiv, str):
        p.fail(f"{key}.holidays",
               f"expected country and subdivision strings, got {country!r}, {subdiv!r}")
        return cal
    country, subdiv = country.strip().upper(), subdiv.strip().upper()
    if not country:
        return replace(cal, holiday_country=None, holiday_subdivision=None)
    supported = holidays.list_supported_countries()
    if country not in supported:
        p.fail(f"{key}.holidays", f"the holidays library has no country {country!r}")
        return cal
    if subdiv and subdiv not in supported[country]:
        p.fail(f"{key}.subdivision", f"{country} has no subdivision {subdiv!r}; "
                                     f"known: {', '.join(supported[country])}")
        return cal
    return replace(cal, holiday_country=country, holiday_subdivision=subdiv or None)


def _dates(p: _Problems, key: str, value: Any) -> frozenset[date] | None:
    if not isinstance(value, list):
        p.fail(key, f"expected a list of dates, got {value!r}")
        return None
    out = set()
    for item in value:
        if isinstance(item, date):
            out.add(item)
            continue
        try:
            out.add(date.fromisoformat(item))
        except (TypeError, ValueError):
            p.fail(key, f"expected dates like 2026-12-24, got {item!r}")
            return None
    return frozenset(out)


def _directory(p: _Problems, raw: Any, plans: Mapping[str, Plan]) -> CustomerDirectory:
    if not isinstance(raw, list):
        p.fail("rules.customer", "expected [[rules.customer]] tables")
        return CustomerDirectory()
    customers: list[Customer] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw):
        key = f"rules.customer[{i}]"
        customer = _customer(p, key, entry, plans)
        if customer is None:
            continue
        for domain in customer.domains:
            if domain in seen:
                p.fail(f"{key}.domains",
                       f"{domain!r} is already listed by rules.customer[{seen[domain]}]")
            seen.setdefault(domain, i)
        customers.append(customer)
    return CustomerDirectory(tuple(customers))


def _customer(p: _Problems, key: str, raw: Any, plans: Mapping[str, Plan]) -> Customer | None:
    t = p.table(key, raw)
    if t is None:
        return None
    p.unknown(key, t, ("organisation", "domains", "region", "plan", "govcloud", "language",
                       "contacts", "contacts_policy", "certified", "contacts_instructions"))
    before = len(p.items)
    organisation = p.string(f"{key}.organisation", t.get("organisation"))
    domains = p.strings(f"{key}.domains", t.get("domains"))
    if domains == ():
        p.fail(f"{key}.domains", "list at least one domain")
    region = p.region(f"{key}.region", t["region"]) if "region" in t else None
    plan = p.string(f"{key}.plan", t["plan"]) if "plan" in t else None
    if plan is not None and plan not in plans:
        p.fail(f"{key}.plan", f"no such plan {plan!r}; plans: {', '.join(plans)}")
    govcloud = p.boolean(f"{key}.govcloud", t.get("govcloud", False))
    language = p.string(f"{key}.language", t["language"]) if "language" in t else None
    if language is not None and language not in SUPPORTED_LANGUAGES:
        p.fail(f"{key}.language", f"expected one of {', '.join(SUPPORTED_LANGUAGES)}, got {language!r}")
    contacts = p.strings(f"{key}.contacts", t.get("contacts", [])) or ()
    policy = t.get("contacts_policy", "open")
    if policy not in CONTACT_POLICIES:
        p.fail(f"{key}.contacts_policy", f"expected one of {', '.join(CONTACT_POLICIES)}, got {policy!r}")
    certified = _certified(p, f"{key}.certified", t.get("certified", []))
    instructions = p.string(f"{key}.contacts_instructions", t["contacts_instructions"]) \
        if "contacts_instructions" in t else None
    if len(p.items) > before or organisation is None or not domains:
        return None
    return Customer(organisation=organisation.strip(),
                    domains=tuple(x.lower().strip(".") for x in domains),
                    region=region, plan=plan, govcloud=bool(govcloud), language=language,
                    contacts=tuple(normalize_address(a) for a in contacts), contacts_policy=policy,
                    certified=certified, contacts_instructions=(instructions or "").strip() or None)


def _certified(p: _Problems, key: str, raw: Any) -> tuple[Certified, ...]:
    """`certified = [{address = "...", expires = 2027-06-30}, ...]` (a TOML date or "YYYY-MM-DD")."""
    if not isinstance(raw, list):
        p.fail(key, f"expected a list of {{address, expires}} tables, got {raw!r}")
        return ()
    out = []
    for i, entry in enumerate(raw):
        t = p.table(f"{key}[{i}]", entry)
        if t is None:
            continue
        p.unknown(f"{key}[{i}]", t, ("address", "expires"))
        address = p.string(f"{key}[{i}].address", t.get("address"))
        expires = t.get("expires")
        if isinstance(expires, str):
            try:
                expires = date.fromisoformat(expires)
            except ValueError:
                pass
        if isinstance(expires, datetime) or not isinstance(expires, date):
            p.fail(f"{key}[{i}].expires", f"expected a date like 2027-06-30, got {expires!r}")
            continue
        if address is not None:
            out.append(Certified(normalize_address(address), expires))
    return tuple(out)
