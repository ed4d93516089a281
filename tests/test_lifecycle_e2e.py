"""A ticket from first mail to closure, run from staff mail clients, with
the scheduler driven by `gateway run-due --now`."""
from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import pytest
from conftest import GATEWAY, QUEUES, STAFF, SUPPORT, GatewayProc, agent_reply, bounce_of, mail, reply_to, uniq
from mailclients import CLIENTS

CUSTOMER = "ann@customer.example"


def at(hours: float) -> str:
    """An ISO time `hours` from now, for `run-due --now`."""
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat(timespec="seconds")


def run_due(gw: GatewayProc, hours: float) -> dict[str, Any]:
    r = gw.cli("run-due", "--now", at(hours))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def kinds(gw: GatewayProc, tid: int, direction: str | None = None) -> list[str]:
    return [m["kind"] for m in gw.ticket(tid)["messages"] if direction in (None, m["direction"])]


def open_ticket(gw: GatewayProc, body: str = "Backup fails with 0x80040115.",
                cc: str | None = None) -> tuple[dict[str, Any], EmailMessage]:
    key = uniq("Backup fails")
    first = mail(f"Ann <{CUSTOMER}>", SUPPORT, key, body, cc=cc)
    assert gw.send(first)[0] == 250
    t = gw.ticket_by_subject(key)
    return t, first


def staff_answer(gw: GatewayProc, tid: int, text: str, client: str = "thunderbird") -> None:
    """An agent answers the staff notification of ticket `tid` from a mail client."""
    notes = [m for m in gw.sink.wait_to(QUEUES["AMER"]) if f"#{tid}]" in str(m["Subject"])]
    assert notes, "no staff notification for the ticket"
    answer = agent_reply(notes[-1], text, frm=f"Agent Smith <{STAFF}>", client=client)
    assert gw.send(answer)[0] == 250


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_staff_reply_from_a_mail_client_is_relayed_cleanly(gateway: GatewayProc, client: str) -> None:
    t, first = open_ticket(gateway, cc="boss@customer.example")
    staff_answer(gateway, t["id"], "Please send us the backup log from C:\\Logs.", client)

    relayed = gateway.sink.wait_to(CUSTOMER, count=2)[-1]        # after the ack
    assert str(relayed["Subject"]).startswith(f"[Support #{t['id']}]")
    assert relayed["From"].addresses[0].addr_spec == SUPPORT
    assert relayed["From"].addresses[0].display_name == "Agent Smith"
    assert STAFF not in relayed.as_string()                      # the agent's address never shows
    assert relayed["Auto-Submitted"] is None
    assert str(first["Message-ID"]) in str(relayed["References"])
    assert [a.addr_spec for a in relayed["Cc"].addresses] == ["boss@customer.example"]
    text = relayed.get_body(("plain",)).get_content()
    assert "Please send us the backup log" in text
    # nothing of the internal notification is relayed
    assert "Region:" not in text and "Requester:" not in text and "0x80040115" not in text

    shown = gateway.ticket(t["id"])
    assert shown["status"] == "pending" and shown["first_response_at"] is not None
    assert "staff_reply" in kinds(gateway, t["id"], "out")
    # the customer answers the relayed mail: open again
    gateway.send(reply_to(relayed, CUSTOMER, "Log attached."))
    assert gateway.ticket(t["id"])["status"] == "open"


def test_reminder_at_24h_exactly_once_and_autoclose_at_48h(gateway: GatewayProc) -> None:
    t, _ = open_ticket(gateway)
    staff_answer(gateway, t["id"], "Which version do you run?")
    assert gateway.ticket(t["id"])["status"] == "pending"

    assert run_due(gateway, 23)["jobs"] == {}
    assert "reminder" not in kinds(gateway, t["id"])
    assert run_due(gateway, 25)["jobs"] == {"no customer reply: reminder": 1}
    assert run_due(gateway, 25)["jobs"] == {}
    assert run_due(gateway, 26)["jobs"] == {}
    assert kinds(gateway, t["id"]).count("reminder") == 1
    reminder = gateway.sink.wait_to(CUSTOMER, count=3)[-1]
    assert str(reminder["Auto-Submitted"]) == "auto-generated"
    assert "waiting for your answer" in reminder.get_body(("plain",)).get_content()

    assert run_due(gateway, 47)["jobs"] == {}
    assert run_due(gateway, 49)["jobs"] == {"no customer reply: auto-close": 1}
    shown = gateway.ticket(t["id"])
    assert shown["status"] == "closed" and shown["closed_at"] is not None
    notice = gateway.sink.wait_to(CUSTOMER, count=4)[-1]
    assert "closed" in notice.get_body(("plain",)).get_content()
    assert run_due(gateway, 72)["jobs"] == {}
    assert kinds(gateway, t["id"]).count("autoclose") == 1


def test_after_downtime_no_stale_reminder_is_sent(gateway: GatewayProc) -> None:
    t, _ = open_ticket(gateway)
    staff_answer(gateway, t["id"], "Which version?")
    assert run_due(gateway, 50)["jobs"] == {"no customer reply: auto-close": 1}
    assert "reminder" not in kinds(gateway, t["id"]) and "autoclose" in kinds(gateway, t["id"])


def test_customer_reply_cancels_the_pending_timers(gateway: GatewayProc) -> None:
    t, _ = open_ticket(gateway)
    staff_answer(gateway, t["id"], "Which version?")
    gateway.send(mail(CUSTOMER, SUPPORT, f"Re: [Support #{t['id']}]", "Version 5.2"))
    assert gateway.ticket(t["id"])["status"] == "open"
    assert run_due(gateway, 25)["jobs"] == {} and run_due(gateway, 49)["jobs"] == {}
    assert gateway.ticket(t["id"])["status"] == "open"


def test_concurrent_run_due_processes_send_each_reminder_once(gateway: GatewayProc) -> None:
    tickets = [open_ticket(gateway)[0] for _ in range(3)]
    for t in tickets:
        staff_answer(gateway, t["id"], "Which version?")
    cmd = [*GATEWAY, "run-due", "--now", at(25), "--config", str(gateway.config)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for _ in range(4)]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(o["jobs"].get("no customer reply: reminder", 0) for o in outs) == 3
    for t in tickets:
        assert kinds(gateway, t["id"]).count("reminder") == 1


def test_resolved_reopens_within_7_days_and_links_a_new_ticket_after(gateway: GatewayProc) -> None:
    t, _ = open_ticket(gateway)
    staff_answer(gateway, t["id"], "#status resolved\nFixed in 5.2.1, please update.")
    shown = gateway.ticket(t["id"])
    assert shown["status"] == "resolved" and shown["resolved_at"] is not None
    closure = gateway.sink.wait_to(CUSTOMER, count=3)[-1]           # ack, staff reply, closure
    assert "7 days" in closure.get_body(("plain",)).get_content()

    assert run_due(gateway, 24 * 6)["jobs"] == {}
    gateway.send(reply_to(closure, CUSTOMER, "Still broken after the update."))
    assert gateway.ticket(t["id"])["status"] == "open"              # day 6: reopened

    staff_answer(gateway, t["id"], "#status resolved\nNow it is fixed for real.", "outlook")
    assert run_due(gateway, 24 * 8)["jobs"] == {"reopen window over": 1}
    assert gateway.ticket(t["id"])["status"] == "closed"
    gateway.send(mail(CUSTOMER, SUPPORT, f"Re: [Support #{t['id']}] Backup fails", "It is back!"))
    new = [x for x in gateway.tickets() if x["linked_ticket"] == t["id"]]
    assert len(new) == 1 and new[0]["status"] == "open"
    ack = [m for m in gateway.sink.wait_to(CUSTOMER, count=5) if f"#{new[0]['id']}]" in str(m["Subject"])]
    assert f"#{t['id']}" in ack[0].get_body(("plain",)).get_content()
    assert gateway.ticket(t["id"])["status"] == "closed"            # never reopened


@pytest.mark.parametrize("command, check", [
    ("#priority 1", lambda t: t["priority"] == 1),
    ("#priority 4", lambda t: t["priority"] == 4),
    ("#status open", lambda t: t["status"] == "open"),
    ("#status closed", lambda t: t["status"] == "closed" and t["closed_at"]),
    ("#escalate", lambda t: t["escalated"] is True and t["status"] == "pending"),
])
def test_commands_change_the_ticket_and_are_not_relayed(gateway: GatewayProc, command: str,
                                                        check: Any) -> None:
    t, _ = open_ticket(gateway)
    staff_answer(gateway, t["id"], f"{command}\n\nWe are looking into it.", "gmail")
    shown = gateway.ticket(t["id"])
    assert check(shown), shown
    relayed = gateway.sink.wait_to(CUSTOMER, count=2)[1]
    text = relayed.get_body(("plain",)).get_content()
    assert "We are looking into it." in text and "#" + command.split()[0][1:] not in text


def test_note_is_internal_and_nothing_reaches_the_customer(gateway: GatewayProc) -> None:
    t, _ = open_ticket(gateway)
    staff_answer(gateway, t["id"], "#note\nCustomer is on the legacy plan, check with billing.")
    msgs = gateway.ticket(t["id"])["messages"]
    assert msgs[-1]["kind"] == "note" and "legacy plan" in msgs[-1]["body_text"]
    assert gateway.ticket(t["id"])["status"] == "open"
    # let the sender pass once more, then check the customer got only the ack
    run_due(gateway, 0)
    assert len(gateway.sink.to(CUSTOMER)) == 1


def test_unknown_command_is_answered_to_the_agent_and_nothing_is_relayed(gateway: GatewayProc) -> None:
    t, _ = open_ticket(gateway)
    staff_answer(gateway, t["id"], "#priority 9\n#frobnicate\nHello customer")
    error = gateway.sink.wait_to(STAFF)[0]
    body = error.get_body(("plain",)).get_content()
    assert "NOT sent" in body and "#frobnicate" in body and "#priority needs" in body
    shown = gateway.ticket(t["id"])
    assert shown["priority"] == 3 and shown["status"] == "open" and shown["first_response_at"] is None
    run_due(gateway, 0)
    assert len(gateway.sink.to(CUSTOMER)) == 1


def test_auto_reply_on_a_ticket_is_recorded_and_changes_nothing(gateway: GatewayProc) -> None:
    t, _ = open_ticket(gateway)
    staff_answer(gateway, t["id"], "Which version?")
    relayed = gateway.sink.wait_to(CUSTOMER, count=2)[-1]
    ooo = reply_to(relayed, CUSTOMER, "I am out of the office until Monday.", subject="Automatic reply")
    ooo["Auto-Submitted"] = "auto-replied"
    ooo["X-Auto-Response-Suppress"] = "All"
    assert gateway.send(ooo)[0] == 250
    shown = gateway.ticket(t["id"])
    assert shown["status"] == "pending" and shown["messages"][-1]["kind"] == "auto"
    run_due(gateway, 0)
    assert len(gateway.sink.to(CUSTOMER)) == 2               # no answer to the auto-reply


def test_bounce_of_our_mail_is_recorded_and_stops_mail_to_that_address(gateway: GatewayProc) -> None:
    t, _ = open_ticket(gateway)
    staff_answer(gateway, t["id"], "Which version?")
    relayed = gateway.sink.wait_to(CUSTOMER, count=2)[-1]
    assert gateway.send(bounce_of(relayed, CUSTOMER), [SUPPORT], "")[0] == 250
    shown = gateway.ticket(t["id"])
    # the bounce, then the notices of it (issue 15) to the queue and to the agent who answered,
    # the ticket's assignee (issue 20, [staff] notify)
    assert [m["kind"] for m in shown["messages"]][-3:] == ["bounce", "staff_notify", "staff_notify"]
    assert [m["to"] for m in shown["messages"]][-2:] == [[QUEUES["AMER"]], [STAFF]]
    assert shown["status"] == "pending"
    assert shown["undeliverable"] == [CUSTOMER]
    assert len([x for x in gateway.tickets() if "Undelivered" in x["subject"]]) == 0
    run_due(gateway, 25)                                     # the reminder is not mailed to a dead address
    assert len(gateway.sink.to(CUSTOMER)) == 2


def test_stats_first_response_and_resolution_with_escalations_excluded(gateway: GatewayProc) -> None:
    a, _ = open_ticket(gateway)
    b, _ = open_ticket(gateway)
    open_ticket(gateway)                     # stays open: counted, not yet answered
    staff_answer(gateway, a["id"], "#status resolved\nDone.")
    staff_answer(gateway, b["id"], "#escalate\n#status resolved\nDone too.")
    r = gateway.cli("stats", "--json")
    s = json.loads(r.stdout)
    assert s["tickets"] == 3 and s["escalated_excluded"] == 1
    assert s["first_response_count"] == 2 and s["resolution_count"] == 1
    assert s["first_response_avg_s"] is not None and s["resolution_avg_s"] is not None
    assert s["open"] == 1 and s["resolved"] == 2
    assert s["by_priority"]["3"]["tickets"] == 3
    table = gateway.cli("stats").stdout
    assert "1st resp avg" in table and "escalated" in table
    future = gateway.cli("stats", "--json", "--since", "2099-01-01")
    assert json.loads(future.stdout)["tickets"] == 0
    # the month the tickets were created in, with its monthly line; open now counts whatever the period
    month = a["created_at"][:7]
    m = json.loads(gateway.cli("stats", "--json", "--month", month).stdout)
    assert m["opened"] == 3 and m["resolved_count"] == 2 and m["month"] == month and m["open_now"] == 1
    assert m["summary"].endswith("escalated tickets excluded") and "first response" in m["summary"]
    assert json.loads(gateway.cli("stats", "--json", "--month", "2099-01").stdout)["open_now"] == 1
    bad = gateway.cli("stats", "--month", "2026-13")
    assert bad.returncode == 64 and "--month" in bad.stderr
    # per agent: the agent answered both, owns both (an answer assigns), one left out as escalated
    agent = s["by_agent"][STAFF]
    assert (agent["assigned"], agent["answered"], agent["first_responses"]) == (2, 2, 2)
    assert agent["first_response_avg_s"] == s["first_response_avg_s"]
    assert agent["resolution_count"] == 1 and agent["escalated_excluded"] == 1 and agent["open_now"] == 0
    assert agent["resolution_avg_s"] == s["resolution_avg_s"]
    assert STAFF in table and "open now" in table
    assert json.loads(future.stdout)["by_agent"] == {}
