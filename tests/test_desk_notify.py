"""Who is notified (issue 20): once a ticket has an assignee, its staff
notifications (customer replies, reopening, SLA warnings, escalations,
bounces) reach the assignee too (`[staff] notify`); a `#note`'s text reaches
the assignee and the agents who worked on the ticket (`[staff] notes_to`),
never the customer; `#list` mails the agent their tickets. Against a real
`gateway serve` over SMTP, with Thunderbird-, Outlook- and Gmail-shaped
replies (tests/mailclients.py)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

import pytest
from conftest import (
    GOV,
    QUEUES,
    STAFF,
    SUPPORT,
    GatewayProc,
    agent_reply,
    bounce_of,
    mail,
    reply_to,
    settle,
    uniq,
    wait_for,
)
from test_desk_commands import CLIENTS, COLLEAGUE, CUSTOMER, open_ticket, text_of

THIRD = "third@staff.example.com"
# every ticket on the Advanced plan: P1 has a first-response target of 1 hour 24/7,
# P3 one of 6 business hours
ADVANCED = '[rules]\ndefault_region = "AMER"\ndefault_plan = "advanced"\n'


def staffed(make_gateway: Any, *, staff_keys: str = "", extra_toml: str = "") -> GatewayProc:
    """A gateway whose [staff] has three agents (and `staff_keys` more keys of [staff])."""
    gw = make_gateway(extra_toml=extra_toml)
    gw.config.write_text(gw.config.read_text().replace(
        f'addresses = ["{STAFF}"]', f'addresses = ["{STAFF}", "{COLLEAGUE}", "{THIRD}"]\n{staff_keys}', 1))
    gw.start()
    return gw


def saying(gw: GatewayProc, address: str, text: str) -> list[EmailMessage]:
    return [m for m in gw.sink.to(address) if text in text_of(m)]


def wait_saying(gw: GatewayProc, address: str, text: str) -> EmailMessage:
    return wait_for(lambda: saying(gw, address, text), what=f"a mail to {address} saying {text!r}")[0]


def assign(gw: GatewayProc, note: EmailMessage, tid: int, who: str = COLLEAGUE) -> None:
    assert gw.send(agent_reply(note, f"#assign {who}"))[0] == 250
    wait_for(lambda: gw.ticket(tid)["owner"] == who, what="the assignment")


def run_due(gw: GatewayProc, at: datetime) -> dict[str, int]:
    r = gw.cli("run-due", "--now", at.isoformat())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["jobs"]


# -- 1. the assignee gets every later notification ------------------------------

@pytest.mark.parametrize("client", CLIENTS)
def test_the_assignee_gets_the_customers_replies_and_answers_from_them(make_gateway: Any, client: str) -> None:
    gw = staffed(make_gateway)
    _, ack, note = open_ticket(gw)
    assert gw.send(agent_reply(note, f"#assign Colleague <{COLLEAGUE}>", client=client))[0] == 250
    wait_saying(gw, COLLEAGUE, "assigned to you")
    assert gw.send(reply_to(ack, CUSTOMER, "It failed again tonight."))[0] == 250
    told = wait_saying(gw, COLLEAGUE, "It failed again tonight.")
    wait_saying(gw, QUEUES["AMER"], "It failed again tonight.")            # the queue still gets it
    settle(gw)
    assert saying(gw, STAFF, "It failed again tonight.") == []              # who assigned it is not told
    assert saying(gw, THIRD, "It failed again tonight.") == []
    # the assignee's copy carries their own token: answering it answers the customer
    assert COLLEAGUE not in str(told["Reply-To"]) and "+s" in str(told["Reply-To"])
    assert gw.send(agent_reply(told, "Fixed the backup schedule.", frm=COLLEAGUE, client=client))[0] == 250
    relayed = wait_saying(gw, CUSTOMER, "Fixed the backup schedule.")
    assert COLLEAGUE not in relayed.as_string()


def test_sla_warning_escalation_reopening_and_a_bounce_reach_the_assignee(make_gateway: Any) -> None:
    gw = staffed(make_gateway, extra_toml=ADVANCED)
    t, _, note = open_ticket(gw)
    assign(gw, note, t["id"])
    # the first-response target nears, then passes unanswered: the queue and the assignee
    # get the warning and the breach notice
    due = datetime.fromisoformat(gw.ticket(t["id"])["response_due_at"])
    warn_at = datetime.fromisoformat(gw.ticket(t["id"])["sla"]["warn_at"])
    assert run_due(gw, warn_at) == {"first-response target near: SLA warning": 1}
    assert run_due(gw, due + timedelta(minutes=1)) == {"first-response target missed: SLA breach": 1}
    for who in (QUEUES["AMER"], COLLEAGUE):
        wait_saying(gw, who, "SLA warning")
        wait_saying(gw, who, "SLA breach")
    # another agent escalates it: the tier-2 queue and the assignee hear of it, not who escalated it
    assert gw.send(agent_reply(note, "#escalate"))[0] == 250
    queue = wait_for(lambda: gw.ticket(t["id"])["escalation"], what="the escalation")["queue"]
    wait_saying(gw, queue, "Escalated to tier 2")
    wait_saying(gw, COLLEAGUE, "Escalated to tier 2")
    # the assignee resolves it; the customer's answer reopens it, and the assignee is told
    assert gw.send(agent_reply(note, "#status resolved\nThe VSS writer is replaced.", frm=COLLEAGUE))[0] == 250
    answer = wait_saying(gw, CUSTOMER, "The VSS writer is replaced.")
    wait_for(lambda: gw.ticket(t["id"])["status"] == "resolved")
    assert gw.send(reply_to(answer, CUSTOMER, "Sorry, it fails once more."))[0] == 250
    wait_saying(gw, COLLEAGUE, "Sorry, it fails once more.")
    assert gw.ticket(t["id"])["status"] == "open"
    # the customer's address bounces: the queue and the assignee learn it
    assert gw.send(bounce_of(answer, CUSTOMER), [SUPPORT], "")[0] == 250
    wait_saying(gw, QUEUES["AMER"], "could not be delivered")
    wait_saying(gw, COLLEAGUE, "could not be delivered")
    settle(gw)
    for text in ("SLA warning", "Escalated to tier 2", "Sorry, it fails once more.", "could not be delivered"):
        assert saying(gw, STAFF, text) == [] and saying(gw, THIRD, text) == []
        assert len(saying(gw, COLLEAGUE, text)) == 1


@pytest.mark.parametrize(("notify", "new_ticket", "reply"), [
    ('["queue"]', [QUEUES["AMER"]], [QUEUES["AMER"]]),
    # an unassigned ticket's notification still reaches the queue: none reaches nobody
    ('["assignee"]', [QUEUES["AMER"]], [COLLEAGUE]),
    ('["queue", "staff"]', [QUEUES["AMER"], STAFF, COLLEAGUE, THIRD], [QUEUES["AMER"], STAFF, COLLEAGUE, THIRD]),
    ('["assignee", "agents"]', [QUEUES["AMER"]], [COLLEAGUE, STAFF]),
])
def test_who_is_notified_is_configured(make_gateway: Any, notify: str, new_ticket: list[str],
                                       reply: list[str]) -> None:
    gw = staffed(make_gateway, staff_keys=f"notify = {notify}")
    t, ack, _ = open_ticket(gw)
    settle(gw)
    everyone = [QUEUES["AMER"], STAFF, COLLEAGUE, THIRD]
    tag = f"#{t['id']}]"
    assert [a for a in everyone if any(tag in str(m["Subject"]) for m in gw.sink.to(a))] == new_ticket
    note = next(m for m in gw.sink.to(QUEUES["AMER"]) if tag in str(m["Subject"]))
    # STAFF answers the customer (an agent who worked on it), then assigns it to the colleague
    assert gw.send(agent_reply(note, "Which backup job?"))[0] == 250
    wait_saying(gw, CUSTOMER, "Which backup job?")
    assign(gw, note, t["id"])
    assert gw.send(reply_to(ack, CUSTOMER, "The nightly one."))[0] == 250
    wait_saying(gw, reply[0], "The nightly one.")
    settle(gw)
    assert [a for a in everyone if saying(gw, a, "The nightly one.")] == sorted(reply, key=everyone.index)


def test_an_assignee_no_longer_staff_is_not_mailed(make_gateway: Any) -> None:
    gw = staffed(make_gateway)
    t, ack, note = open_ticket(gw)
    assign(gw, note, t["id"])
    assert gw.stop() == 0
    gw.config.write_text(gw.config.read_text().replace(f', "{COLLEAGUE}"', "", 1))
    gw.start()
    assert gw.send(reply_to(ack, CUSTOMER, "Any news?"))[0] == 250
    wait_saying(gw, QUEUES["AMER"], "Any news?")
    settle(gw)
    assert saying(gw, COLLEAGUE, "Any news?") == []


# -- 2. #note reaches the assignee and the agents who worked on the ticket --------

@pytest.mark.parametrize("client", CLIENTS)
def test_a_note_reaches_the_assignee_and_the_agents_never_the_customer(make_gateway: Any, client: str) -> None:
    gw = staffed(make_gateway)
    t, _, note = open_ticket(gw)
    assert gw.send(agent_reply(note, "Could you send the backup log?"))[0] == 250   # STAFF worked on it
    wait_saying(gw, CUSTOMER, "Could you send the backup log?")
    assign(gw, note, t["id"])
    # a third agent answers the queue's notification with a note
    assert gw.send(agent_reply(note, "#note\nThe VSS writer is the culprit, see KB 4471.",
                               frm=THIRD, client=client))[0] == 250
    to_assignee = wait_saying(gw, COLLEAGUE, "The VSS writer is the culprit")
    wait_saying(gw, STAFF, "The VSS writer is the culprit")
    assert f"Internal note from {THIRD}" in text_of(to_assignee)
    settle(gw)
    assert saying(gw, THIRD, "VSS writer") == [] and saying(gw, QUEUES["AMER"], "VSS writer") == []
    assert all("VSS writer" not in m.as_string() for m in gw.sink.to(CUSTOMER))
    shown = gw.ticket(t["id"])
    assert [(e["by"], e["to"]) for e in shown["events"] if e["rule"] == "note"] == [(THIRD, [COLLEAGUE, STAFF])]
    assert shown["messages"][-1]["kind"] == "staff_notify" and shown["status"] == "pending"
    # the note's mail proves its recipient: the assignee answers the customer from it
    assert gw.send(agent_reply(to_assignee, "We replaced the VSS writer.", frm=COLLEAGUE, client=client))[0] == 250
    relayed = wait_saying(gw, CUSTOMER, "We replaced the VSS writer.")
    assert "culprit" not in relayed.as_string()


@pytest.mark.parametrize(("notes_to", "told"), [
    ("[]", []),
    ('["queue"]', [QUEUES["AMER"]]),
    ('["assignee"]', [COLLEAGUE]),
])
def test_who_gets_a_note_is_configured(make_gateway: Any, notes_to: str, told: list[str]) -> None:
    gw = staffed(make_gateway, staff_keys=f"notes_to = {notes_to}")
    t, _, note = open_ticket(gw)
    assert gw.send(agent_reply(note, "Which version do you run?"))[0] == 250
    wait_saying(gw, CUSTOMER, "Which version do you run?")
    assign(gw, note, t["id"])
    assert gw.send(agent_reply(note, "#note\nLegacy plan, ask billing.", frm=THIRD))[0] == 250
    wait_for(lambda: [e for e in gw.ticket(t["id"])["events"] if e["rule"] == "note"])
    settle(gw)
    assert [a for a in (QUEUES["AMER"], STAFF, COLLEAGUE, THIRD) if saying(gw, a, "Legacy plan")] == told


def test_a_forged_note_and_a_customers_note_reach_nobody(make_gateway: Any) -> None:
    gw = staffed(make_gateway)
    t, ack, note = open_ticket(gw)
    assign(gw, note, t["id"])
    forged = mail(STAFF, SUPPORT, f"Re: [Support #{t['id']}] {t['subject']}", "#note\nCall me at +1 555 0199.")
    assert gw.send(forged)[0] == 250
    assert gw.send(reply_to(ack, CUSTOMER, "#note\nCall me at +1 555 0100."))[0] == 250
    wait_saying(gw, COLLEAGUE, "#note")                 # the customer's mail, as a customer reply
    settle(gw)
    assert saying(gw, COLLEAGUE, "0199") == [] and saying(gw, STAFF, "0199") == []
    assert [e for e in gw.ticket(t["id"])["events"] if e["rule"] == "note"] == []
    assert not any("Internal note" in text_of(m) for a in (STAFF, COLLEAGUE, THIRD) for m in gw.sink.to(a))


# -- 3. #list --------------------------------------------------------------------

def open_one(gw: GatewayProc) -> tuple[dict[str, Any], EmailMessage]:
    """One more ticket of the customer's, and the queue's notification of it."""
    key = uniq("Backup fails")
    assert gw.send(mail(CUSTOMER, SUPPORT, key, "Backup fails with 0x80040115."))[0] == 250
    t = gw.ticket_by_subject(key)
    return t, wait_for(lambda: [m for m in gw.sink.to(QUEUES["AMER"]) if f"#{t['id']}]" in str(m["Subject"])])[0]


def section(text: str, heading: str) -> str:
    """The part of a #list mail under `heading`, up to the next blank line."""
    text = text.replace("\r\n", "\n")
    start = text.index(heading)
    return text[start:text.index("\n\n", start)]


@pytest.mark.parametrize("client", CLIENTS)
def test_list_mails_the_agent_their_open_waiting_and_near_breach_tickets(make_gateway: Any, client: str) -> None:
    gw = staffed(make_gateway, staff_keys="list_near_hours = 2", extra_toml=ADVANCED)
    mine, mine_note = open_one(gw)                                               # P3: 6 business hours
    assert gw.send(agent_reply(mine_note, "#take"))[0] == 250
    waiting, waiting_note = open_one(gw)
    assert gw.send(agent_reply(waiting_note, "Please send the log."))[0] == 250   # answered: STAFF's, pending
    theirs, theirs_note = open_one(gw)
    assign(gw, theirs_note, theirs["id"])
    urgent_key, gov_key = uniq("Everything down"), uniq("GovCloud down")
    assert gw.send(mail("noc@atc.example.com", SUPPORT, urgent_key, "Total outage, production stopped."))[0] == 250
    assert gw.send(mail("noc@agency.example.gov", GOV, gov_key, "Total outage, production stopped."))[0] == 250
    urgent, gov = gw.ticket_by_subject(urgent_key), gw.ticket_by_subject(gov_key)
    assert (urgent["priority"], gov["priority"], gov["govcloud"]) == (1, 1, True)
    wait_for(lambda: gw.ticket(mine["id"])["owner"] == STAFF and gw.ticket(waiting["id"])["status"] == "pending")

    assert gw.send(agent_reply(mine_note, "#list", client=client))[0] == 250
    listing = wait_saying(gw, STAFF, f"Tickets of {STAFF}")
    text = text_of(listing)
    opened = section(text, "Open, assigned to you")
    assert f"#{mine['id']} " in opened and f"#{waiting['id']} " not in opened
    assert f"#{waiting['id']} " in section(text, "Waiting on the customer, assigned to you")
    near = section(text, "Near or past the first-response target (within 2 h")
    assert f"#{urgent['id']} " in near and "first response due in" in near and "unassigned" in near
    assert f"#{mine['id']} " not in near                                   # its target is hours away
    for other in (theirs, gov):                           # a colleague's, and a GovCloud ticket
        assert f"#{other['id']} " not in text and other["subject"] not in listing.as_string()
    # the agent alone gets it, with a token of the ticket it answered; nothing else happens
    rcpts = [m["rcpt"] for m in gw.sink.messages if m["msg"]["Message-ID"] == listing["Message-ID"]]
    assert rcpts == [[STAFF]] and f"#{mine['id']}]" in str(listing["Subject"])
    settle(gw)
    assert not any("Tickets of" in m.as_string() for m in gw.sink.to(CUSTOMER))
    shown = gw.ticket(mine["id"])
    assert shown["status"] == "open" and shown["messages"][-2]["kind"] == "note"
    assert shown["messages"][-1]["kind"] == "staff_notify" and shown["first_response_at"] is None


def test_list_and_help_name_each_other_and_go_together_never(gateway: GatewayProc) -> None:
    _, _, note = open_ticket(gateway)
    assert gateway.send(agent_reply(note, "#help"))[0] == 250
    assert "#list" in text_of(wait_saying(gateway, STAFF, "Commands for ticket"))
    assert gateway.send(agent_reply(note, "#help\n#list"))[0] == 250
    assert "one of #help and #list per reply" in text_of(wait_saying(gateway, STAFF, "one of #help"))
    assert gateway.send(agent_reply(note, "#list now"))[0] == 250
    assert "#list takes no argument" in text_of(wait_saying(gateway, STAFF, "#list takes"))


# -- 4. the customer's files reach staff -----------------------------------------

def test_customer_files_are_attached_to_the_staff_notification_up_to_the_limit(
        make_gateway: Any, tmp_path: Any) -> None:
    """Issue 20: the notification carries the customer's files while they fit in
    `[staff] attach_max_bytes` in all; the others are listed with the command that
    fetches them, which gives exactly the stored bytes, and only for that ticket."""
    gw = staffed(make_gateway, staff_keys="attach_max_bytes = 3000")
    log_txt, dump, shot = b"backup failed at 02:00\n" * 40, bytes(range(256)) * 20, b"\x89PNG" + b"\x07" * 1500
    m = mail(CUSTOMER, SUPPORT, uniq("Backup fails"), "The log and a dump are attached.")
    m.add_attachment(log_txt, maintype="text", subtype="plain", filename="backup.log")
    m.add_attachment(dump, maintype="application", subtype="octet-stream", filename="dump.bin")
    m.add_attachment(shot, maintype="image", subtype="png", filename="screen.png")
    assert gw.send(m)[0] == 250
    note = wait_saying(gw, QUEUES["AMER"], "The log and a dump are attached.")
    files = {p.get_filename(): p.get_content() for p in note.iter_attachments()}
    assert files == {"backup.log": log_txt.decode(), "screen.png": shot}       # 920 + 1504 bytes fit in 3000
    text = text_of(note)
    tid = gw.ticket_by_subject(str(m["Subject"]))["id"]
    sha = next(a["sha256"] for msg in gw.ticket(tid)["messages"] for a in msg["attachments"]
               if a["filename"] == "dump.bin")
    command = f"gateway tickets attachment {tid} {sha[:16]} --out FILE"
    assert "Not attached (over 3000 bytes in all)" in text and command in text

    out = tmp_path / "dump.bin"
    r = gw.cli("tickets", "attachment", str(tid), sha[:16], "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == dump and out.stat().st_mode & 0o777 == 0o600
    assert gw.cli("tickets", "attachment", str(tid), sha[:16], "--out", str(out)).returncode == 73  # never over a file
    # another ticket's digest, a digest no file has, or no digest at all gives nothing
    other, _, _ = open_ticket(gw)
    assert gw.cli("tickets", "attachment", str(other["id"]), sha).returncode == 1
    assert gw.cli("tickets", "attachment", str(tid), "0" * 64).returncode == 1
    assert gw.cli("tickets", "attachment", str(tid), "../x").returncode == 64


def test_no_file_is_attached_with_attach_max_bytes_0(make_gateway: Any) -> None:
    gw = staffed(make_gateway, staff_keys="attach_max_bytes = 0")
    m = mail(CUSTOMER, SUPPORT, uniq("Screenshot"), "See the screenshot.")
    m.add_attachment(b"\x89PNG" + b"\x01" * 100, maintype="image", subtype="png", filename="s.png")
    assert gw.send(m)[0] == 250
    note = wait_saying(gw, QUEUES["AMER"], "See the screenshot.")
    assert list(note.iter_attachments()) == []
    assert "Not attached (over 0 bytes in all)" in text_of(note) and "(s.png)" in text_of(note)


# -- staff learn of a quarantined mail of their ticket -------------------------

def test_a_quarantined_mail_that_answers_a_ticket_is_told_to_its_staff_once_an_hour(make_gateway: Any) -> None:
    from test_quarantine import poison_maker
    _, make = poison_maker()

    def poison(tag: str, answering: EmailMessage | None) -> bytes:
        head = f"In-Reply-To: {answering['Message-ID']}\r\n".encode() if answering is not None else b""
        return head + make(tag)

    def quarantined_events() -> list[dict[str, Any]]:
        return [e for e in gw.ticket(t["id"])["events"] if e["rule"] == "quarantined_mail"]

    gw = staffed(make_gateway)
    t, ack, note = open_ticket(gw)
    assign(gw, note, t["id"])
    tag = uniq("poison")
    assert gw.send(poison(tag, ack), rcpt=[SUPPORT], mail_from=CUSTOMER)[0] == 250
    told = wait_saying(gw, QUEUES["AMER"], "could not be processed")
    assert wait_saying(gw, COLLEAGUE, "could not be processed")          # the assignee too ([staff] notify)
    rows = json.loads(gw.cli("quarantine", "list", "--json").stdout)
    assert len(rows) == 1
    text = " ".join(text_of(told).split())
    assert f"#{t['id']}" in str(told["Subject"]) and f"(ID {rows[0]['id']})" in text
    assert f"gateway quarantine retry {rows[0]['id']}" in text and CUSTOMER in text
    assert tag not in told.as_string()                                  # nothing of the mail itself
    assert saying(gw, CUSTOMER, "could not be processed") == []

    # a second one within the hour: on the ticket's events, no second notice
    assert gw.send(poison(uniq("poison"), ack), rcpt=[SUPPORT], mail_from=CUSTOMER)[0] == 250
    events = wait_for(lambda: e if len(e := quarantined_events()) == 2 else None, what="the second event")
    assert [e["told"] for e in events] == [True, False]
    # one that answers nothing of ours: quarantined, no notice, no event
    assert gw.send(poison(uniq("poison"), None), rcpt=[SUPPORT], mail_from=CUSTOMER)[0] == 250
    wait_for(lambda: len(json.loads(gw.cli("quarantine", "list", "--json").stdout)) == 3, what="3 quarantined")
    settle(gw)
    assert len(saying(gw, QUEUES["AMER"], "could not be processed")) == 1
    assert len(quarantined_events()) == 2
