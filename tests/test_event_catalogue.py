"""The README's event catalogue is true: every event a full scenario emits is
listed there, with every field it carries."""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import QUEUES, SUPPORT, GatewayProc, agent_reply, free_port, mail, uniq, wait_for

README = Path(__file__).resolve().parents[1] / "README.md"
# on every line, added by the logging setup itself
COMMON = {"event", "timestamp", "level", "worker", "exception"}


def catalogue() -> dict[str, set[str]]:
    """Event name -> documented fields, from the README's tables of events."""
    events: dict[str, set[str]] = {}
    for line in README.read_text().splitlines():
        m = re.match(r"^\|\s*(`[a-z_]+\.[a-z_]+`(?:\s*(?:,|\([a-z]+\))\s*`?[a-z_.]*`?)*)\s*\|\s*(.*?)\s*\|\s*$", line)
        if not m:
            continue
        names = re.findall(r"`([a-z_]+\.[a-z_]+)`", m.group(1))
        fields = {f.strip().split(" ")[0] for f in re.split(r",", m.group(2)) if f.strip()}
        for name in names:
            events.setdefault(name, set()).update(fields)
    return events


def emitted(lines: str) -> list[dict[str, object]]:
    return [json.loads(x) for x in lines.splitlines() if x.startswith("{")]


def test_every_event_of_a_full_scenario_is_in_the_catalogue(
        make_gateway: Callable[..., GatewayProc]) -> None:
    port = free_port()
    gw = make_gateway(extra_toml=f"""
        [metrics]
        enabled = true
        port = {port}
        [redirects]
        billing = "billing@example.com"
        """)
    gw.start()
    cli_logs = ""
    # a ticket, a reply, a staff answer with commands, a bad command, a redirect,
    # automatic mail, an unknown recipient, a stranger, a mail with no sender
    t_key = uniq("Backup fails")
    gw.send(mail("ann@customer.example", SUPPORT, t_key, "Backup fails"))
    t = gw.ticket_by_subject(t_key)
    note = gw.sink.wait_to(QUEUES["AMER"])[0]
    gw.send(agent_reply(note, "#priority 2\nWhich version?"))
    gw.send(agent_reply(note, "#frobnicate\nx"))
    gw.send(mail("ann@customer.example", SUPPORT, f"Re: [Support #{t['id']}]", "5.2"))
    gw.send(mail("ann@customer.example", SUPPORT, uniq("refund"),
                 "Please refund the double payment on my last invoice."))
    gw.send(mail("ooo@customer.example", SUPPORT, "Out of office", "away",
                 headers={"Auto-Submitted": "auto-replied"}))
    gw.send(mail("x@customer.example", "nobody@example.com", "x", "x"))
    gw.send(b"Subject: no sender\r\n\r\nhi\r\n", [SUPPORT], "")
    gw.send(agent_reply(note, "#status resolved\nFixed."))
    # time passes: reminders, closes, SLA
    for hours in (25, 49, 24 * 8):
        r = gw.cli("run-due", "--now", (datetime.now(UTC) + timedelta(hours=hours)).isoformat())
        cli_logs += r.stderr
    r = gw.cli("ingest", "--recipient", SUPPORT,
               stdin=mail("p@customer.example", SUPPORT, uniq("piped"), "x").as_bytes())
    cli_logs += r.stderr
    wait_for(lambda: "outbox.sent" in gw.log_text(), what="deliveries")
    assert gw.stop() == 0

    known = catalogue()
    assert len(known) >= 20, known
    seen = emitted(gw.log_text()) + emitted(cli_logs)
    names = {str(e["event"]) for e in seen}
    assert {"gateway.started", "mail.processed", "ticket.created", "outbox.sent",
            "staff.command_rejected", "ticket.redirected", "scheduler.job"} <= names
    for e in seen:
        name = str(e["event"])
        assert name in known, f"event {name!r} is not in the README's catalogue"
        extra = set(e) - COMMON - known[name]
        assert not extra, f"{name}: fields {sorted(extra)} are not in the README's catalogue"
