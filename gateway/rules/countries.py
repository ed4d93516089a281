"""Which support region a sender's domain points to, by its country-code TLD (pure).

The table covers every ISO 3166-1 alpha-2 code (249, each one a ccTLD, even
the unused `.bv`, `.sj`, `.um`), plus `.uk` (the UK's ccTLD is not its ISO
code GB), `.ac` (Ascension, an exceptionally reserved code with a live TLD)
and `.eu`. The assignment follows the usual support split:

- AMER: North, Central and South America and the Caribbean, Greenland.
- EMEA: Europe, Russia and the CIS down to Central Asia (the -stans are
  served from EMEA by most support organisations), the Middle East, Africa.
- APAC: South Asia (with Afghanistan and Pakistan), East and South-East Asia,
  Oceania and the Pacific islands, the Indian Ocean and southern territories
  administered from there, Antarctica (its stations are reached via AU/NZ).

Some ccTLDs are sold worldwide as vanity names (`.io` for tech start-ups,
`.co` for companies, `.ai`, `.me`, `.tv` ...): a bare `acme.io` says nothing
about where Acme is, so they count like `.com`. Under a national second
level (`acme.com.co`, `firma.co.me`) they are used by residents and do count.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

# Grouped by region rather than sorted by code, so that a reviewer can see
# the split at a glance; tests check that every ISO code appears exactly once.
_AMER: Final = (
    "ag ai ar aw bb bl bm bo bq br bs bz ca cl co cr cu cw dm do ec fk gd gf gl gp gs gt gy "
    "hn ht jm kn ky lc mf mq ms mx ni pa pe pm pr py sr sv sx tc tt us uy vc ve vg vi"
)
_EMEA: Final = (
    "ac ad ae al am ao at ax az ba be bf bg bh bi bj bv bw by cd cf cg ch ci cm cv cy cz de "
    "dj dk dz ee eg eh er es et eu fi fo fr ga gb ge gg gh gi gm gn gq gr gw hr hu ie il im iq "
    "ir is it je jo ke kg km kw kz lb li lr ls lt lu lv ly ma mc md me mg mk ml mr mt mu mw mz "
    "na ne ng nl no om pl ps pt qa re ro rs ru rw sa sc sd se sh si sj sk sl sm sn so ss st sy "
    "sz td tg tj tm tn tr tz ua ug uk uz va ye yt za zm zw"
)
_APAC: Final = (
    "af aq as au bd bn bt cc ck cn cx fj fm gu hk hm id in io jp kh ki kp kr la lk mh mm mn mo "
    "mp mv my nc nf np nr nu nz pf pg ph pk pn pw sb sg tf th tk tl to tv tw um vn vu wf ws"
)

# ccTLDs marketed worldwide: no evidence on their own (see the module doc).
VANITY_TLDS: Final = frozenset("ai cc co fm gg io la ly me nu sh to tv ws".split())

# Second-level labels that registries use for resident registrations
# (`.com.au`, `.co.jp`, `.com.br`, `.co.uk`, `.ac.uk`, `.gob.mx`, `.or.jp` ...).
SECOND_LEVEL: Final = frozenset(
    "ac co com edu gob gov gouv govt ltd mil ne net nom or org plc sch".split())


def _table() -> Mapping[str, str]:
    table: dict[str, str] = {}
    for region, codes in (("AMER", _AMER), ("EMEA", _EMEA), ("APAC", _APAC)):
        for code in codes.split():
            table[code] = region
    return MappingProxyType(table)


CCTLD_REGION: Final[Mapping[str, str]] = _table()


def region_of_domain(domain: str) -> tuple[str, str] | None:
    """(region, the suffix that decided, e.g. ".com.au") or None for no evidence.

    Generic TLDs (.com, .org, .net, new gTLDs) and bare vanity ccTLDs give
    None; so does anything that is not a domain.
    """
    labels = [x for x in domain.strip().strip(".").lower().split(".") if x]
    if len(labels) < 2:
        return None
    tld = labels[-1]
    region = CCTLD_REGION.get(tld)
    if region is None:
        return None
    second = labels[-2] if len(labels) >= 3 else ""
    if second in SECOND_LEVEL:
        return region, f".{second}.{tld}"
    if tld in VANITY_TLDS:
        return None
    return region, f".{tld}"
