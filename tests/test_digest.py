"""The daily digest by mail (issue 20): per region queue and per assignee, at
`[digest] at` local time, once a day, GovCloud apart; through a real `serve`
(the tickets), `gateway run-due --now` (the injected clock) and the relay sinks.

The `serve` runs its own scheduler on the wall clock, which may queue today's
digests; the digests looked at here are of tomorrow's local day (`DAY`), which
only `run-due --now` reaches."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import GATEWAY, GOV, QUEUES, STAFF, SUPPORT, GatewayProc, agent_reply, mail, uniq

from gateway import config as gwconfig
from gateway.desk import digest

BERLIN = ZoneInfo("Europe/Berlin")
DAY = datetime.now(BERLIN).date() + timedelta(days=1)     # a day the serve's wall clock has not reached
DIGEST = """
[digest]
enabled = true
at = "08:00"
timezone = "Europe/Berlin"
to = ["queue", "assignee"]
"""
CUSTOMER = "ann@customer.example"
GOV_CUSTOMER = "gina@agency.example"
IDLE = "idle@staff.example.com"          # staff with no ticket assigned: no digest


def berlin(day: date, hh: int, mm: int = 0) -> str:
    return datetime.combine(day, time(hh, mm), BERLIN).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_due(gw: GatewayProc, now: str) -> dict[str, Any]:
    r = gw.cli("run-due", "--now", now)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def text_of(m: EmailMessage) -> str:
    body = m.get_body(("plain",))
    assert body is not None
    return body.get_content().replace("\r\n", "\n")


def digests(gw: GatewayProc, day: date) -> dict[str, list[EmailMessage]]:
    """The digests of `day` each relay took, by recipient: "default" / "govcloud"."""
    out: dict[str, list[EmailMessage]] = {}
    for relay, sink in (("default", gw.sink), ("govcloud", gw.gov_sink)):
        with sink.lock:
            for m in sink.messages:
                if f"Daily digest {day.isoformat()}" in str(m["msg"]["Subject"]):
                    out.setdefault(f"{relay} {m['rcpt'][0]}", []).append(m["msg"])
    return out


def part(text: str, title: str) -> str:
    """One list of a digest's text: from its title line to the next blank line."""
    start = text.index(title)
    end = text.find("\n\n", start)
    return text[start:end if end >= 0 else None]


@pytest.fixture
def desk(make_gateway: Callable[..., GatewayProc]) -> tuple[GatewayProc, dict[str, str]]:
    """A gateway with digests on, and three tickets: one the agent answered (theirs,
    waiting on the customer), one unassigned, one GovCloud."""
    # the Advanced plan gives every ticket a first-response target; all within 720 h count as near
    gw = make_gateway(extra_toml=DIGEST + '[rules]\ndefault_region = "AMER"\ndefault_plan = "advanced"\n')
    text = gw.config.read_text().replace("[staff]\n", "[staff]\nlist_near_hours = 720\n", 1)
    gw.config.write_text(text.replace(f'addresses = ["{STAFF}"]', f'addresses = ["{STAFF}", "{IDLE}"]', 1))
    gw.start()
    subjects = {name: uniq(name) for name in ("answered", "unassigned", "govcloud", "escalated")}
    assert gw.send(mail(f"Ann <{CUSTOMER}>", SUPPORT, subjects["answered"], "Backup fails."))[0] == 250
    assert gw.send(mail(f"Ann <{CUSTOMER}>", SUPPORT, subjects["unassigned"], "Restore fails."))[0] == 250
    assert gw.send(mail(GOV_CUSTOMER, GOV, subjects["govcloud"], "The export fails."))[0] == 250
    answered = gw.ticket_by_subject(subjects["answered"])
    note = next(m for m in gw.sink.wait_to(QUEUES["AMER"], count=2) if f"#{answered['id']}]" in str(m["Subject"]))
    assert gw.send(agent_reply(note, "Which version do you run?", frm=f"Agent Smith <{STAFF}>"))[0] == 250
    shown = gw.ticket(answered["id"])
    assert shown["status"] == "pending" and shown["owner"] == STAFF
    assert gw.send(mail(f"Ann <{CUSTOMER}>", SUPPORT, subjects["escalated"], "Backup is gone."))[0] == 250
    escalated = gw.ticket_by_subject(subjects["escalated"])
    note = next(m for m in gw.sink.wait_to(QUEUES["AMER"], count=4) if f"#{escalated['id']}]" in str(m["Subject"]))
    assert gw.send(agent_reply(note, "#escalate\nWe looked, it needs engineering.", frm=STAFF))[0] == 250
    shown = gw.ticket(escalated["id"])
    assert shown["escalated"] and shown["owner"] == STAFF, shown
    gw.gov_sink.wait_to(QUEUES["GOVCLOUD"])
    return gw, subjects


def test_the_digest_goes_out_once_at_the_local_time_to_each_queue_and_assignee_govcloud_apart(
        desk: tuple[GatewayProc, dict[str, str]]) -> None:
    gw, subjects = desk
    early = run_due(gw, berlin(DAY, 7, 59))
    assert "daily digest" not in early["jobs"] and digests(gw, DAY) == {}

    due = run_due(gw, berlin(DAY, 8, 0))         # 07:00 UTC in December: 08:00 in Berlin
    assert due["jobs"]["daily digest"] == 5
    got = digests(gw, DAY)
    assert sorted(got) == sorted([f"default {QUEUES['AMER']}", f"default {QUEUES['EMEA']}",
                                  f"default {QUEUES['APAC']}", f"govcloud {QUEUES['GOVCLOUD']}", f"default {STAFF}"])
    assert all(len(ms) == 1 for ms in got.values()) and not gw.sink.to(IDLE)

    amer = text_of(got[f"default {QUEUES['AMER']}"][0])
    assert subjects["unassigned"] in part(amer, "Open (1):")
    waiting = part(amer, "Waiting on the customer (2):")
    assert subjects["answered"] in waiting and subjects["escalated"] in waiting
    near = part(amer, "Near or past the first-response target (within 720 h) (1):")
    assert subjects["unassigned"] in near and "first response " in near and near.endswith("unassigned")
    assert subjects["escalated"] in part(amer, "Escalated (1):")
    unassigned = part(amer, "Unassigned (1):")
    assert subjects["unassigned"] in unassigned and subjects["answered"] not in unassigned
    assert " old)" in part(amer, "Open (1):")
    emea = text_of(got[f"default {QUEUES['EMEA']}"][0])
    assert "Open (0):" in emea and "Unassigned (0):" in emea
    assert not any(subject in emea for subject in subjects.values())

    mine = text_of(got[f"default {STAFF}"][0])
    assert "Open, assigned to you (0):" in mine
    assert subjects["answered"] in part(mine, "Waiting on the customer, assigned to you (2):")
    assert subjects["unassigned"] in part(mine, "(within 720 h; yours or unassigned) (1):")
    assert subjects["escalated"] in part(mine, "Escalated, assigned to you (1):")
    assert subjects["govcloud"] not in mine

    # GovCloud: its own digest through the GovCloud relay only, and in no commercial mail at all
    gov = got[f"govcloud {QUEUES['GOVCLOUD']}"][0]
    assert subjects["govcloud"] in part(text_of(gov), "Open (1):") and GOV in str(gov["From"])
    with gw.sink.lock:
        assert not any(subjects["govcloud"] in m["msg"].as_string() for m in gw.sink.messages)
    assert all(subjects["answered"] not in text_of(m) for m in gw.gov_sink.to(QUEUES["GOVCLOUD"])
               if "Daily digest" in str(m["Subject"]))
    assert str(gov["Auto-Submitted"]) == "auto-generated" and "X-Support-Ticket" not in gov

    # never twice for one local day, however often the scheduler runs
    assert "daily digest" not in run_due(gw, berlin(DAY, 8, 0))["jobs"]
    assert "daily digest" not in run_due(gw, berlin(DAY, 23, 59))["jobs"]
    assert {k: len(v) for k, v in digests(gw, DAY).items()} == {k: 1 for k in got}
    # down at 08:00 the next day: the digest goes out when the gateway next runs that day
    later = DAY + timedelta(days=1)
    assert run_due(gw, berlin(later, 11, 30))["jobs"]["daily digest"] == 5
    assert sorted(digests(gw, later)) == sorted(got)


def test_no_digest_when_not_enabled(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    gw.start()
    assert gw.send(mail(f"Ann <{CUSTOMER}>", SUPPORT, uniq("quiet"), "Backup fails."))[0] == 250
    gw.sink.wait_to(QUEUES["AMER"])
    assert "daily digest" not in run_due(gw, berlin(DAY, 12, 0))["jobs"]
    assert digests(gw, DAY) == {}


@pytest.mark.parametrize(("toml", "says"), [
    ('at = "8:00"', "digest.at"),
    ('at = "24:00"', "digest.at"),
    ('timezone = "Europe/Berlinn"', "digest.timezone"),
    ('timezone = "../../etc/passwd"', "digest.timezone"),
    ('to = ["queue", "asignee"]', "digest.to"),
    ("enabled = true\nto = []", "digest.to"),
    ('sent = "daily"', "digest.sent"),
])
def test_a_bad_digest_setting_is_a_configuration_error(tmp_path: Path, toml: str, says: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(f"[digest]\n{toml}\n")
    r = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 78 and says in r.stderr, r.stderr


def test_the_local_day_is_due_once_its_time_has_passed_in_the_zone() -> None:
    at = time(8, 0)
    assert digest.day_due(datetime(2025, 12, 5, 6, 59, tzinfo=UTC), at, BERLIN) is None
    assert digest.day_due(datetime(2025, 12, 5, 7, 0, tzinfo=UTC), at, BERLIN) == date(2025, 12, 5)
    assert digest.day_due(datetime(2025, 12, 5, 22, 59, tzinfo=UTC), at, BERLIN) == date(2025, 12, 5)
    assert digest.day_due(datetime(2025, 12, 5, 23, 0, tzinfo=UTC), at, BERLIN) is None    # 00:00 on the 6th
    assert digest.day_due(datetime(2025, 7, 5, 6, 0, tzinfo=UTC), at, BERLIN) == date(2025, 7, 5)  # summer time
    assert digest.day_due(datetime(2025, 12, 5, 7, 59, tzinfo=UTC), at, ZoneInfo("UTC")) is None


def test_recipients_keep_govcloud_apart_and_follow_to() -> None:
    cfg = gwconfig.parse({"digest": {"enabled": True, "to": ["assignee"]},
                          "staff": {"addresses": ["a@staff.example.com"],
                                    "govcloud": {"addresses": ["g@staff.examplegov.com"]}}})
    keys = [r.key for r in digest.recipients(cfg)]
    assert keys == ["assignee:a@staff.example.com:commercial", "assignee:g@staff.examplegov.com:commercial",
                    "assignee:g@staff.examplegov.com:govcloud"]
    both = gwconfig.parse({"digest": {"enabled": True}})
    queues = [(r.address, r.govcloud, r.region) for r in digest.recipients(both) if r.who == "queue"]
    assert (both.queues["GOVCLOUD"], True, None) in queues and all(g == (a == both.queues["GOVCLOUD"])
                                                                   for a, g, _ in queues)
    assert digest.worth_sending(digest.recipients(both)[0], dict.fromkeys(digest.PARTS, 0))
    agent = digest.Recipient("a@staff.example.com", "assignee", False)
    assert not digest.worth_sending(agent, {**dict.fromkeys(digest.PARTS, 0), "unassigned": 3})
    assert digest.worth_sending(agent, {**dict.fromkeys(digest.PARTS, 0), "waiting": 1})


def test_a_list_shows_at_most_50_rows_and_says_there_are_more() -> None:
    from gateway.model import Status, Ticket
    t0 = datetime(2025, 12, 1, 9, 0, tzinfo=UTC)
    ts = [Ticket(id=n, subject=f"s{n}", status=Status.OPEN, requester="a@c.example", cc=(), region="EMEA",
                 govcloud=False, priority=3, mailbox=SUPPORT, linked_ticket=None, created_at=t0) for n in range(51)]
    lists, more = digest.lists_of({"open": ts, "waiting": ts[:50]}, t0 + timedelta(days=3, hours=4))
    assert len(lists["open"]) == 50 and more == {"open": True, "waiting": False}
    assert lists["open"][0]["age"] == "3d 04h" and digest.age(-5) == "0m" and digest.age(3700) == "1h 01m"


def test_two_schedulers_at_once_send_each_digest_once(desk: tuple[GatewayProc, dict[str, str]]) -> None:
    gw, _ = desk
    runs = [subprocess.Popen([*GATEWAY, "run-due", "--now", berlin(DAY, 9, 0), "--config", str(gw.config)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [e.decode()[-500:] for _, e in outs]
    counted = [json.loads(o)["jobs"].get("daily digest", 0) for o, _ in outs]
    assert sum(counted) == 5
    got = digests(gw, DAY)
    assert len(got) == 5 and all(len(ms) == 1 for ms in got.values())
