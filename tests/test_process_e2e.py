"""The support process of the policies (issue 17), end to end against a real
`serve`, the clock moved by `run-due --now`: escalation tiers."""
from __future__ import annotations

from datetime import datetime, timedelta

from conftest import STAFF, SUPPORT, GatewayProc, mail, uniq, wait_for
from test_lifecycle_e2e import CUSTOMER, kinds, open_ticket, run_due, staff_answer

from gateway.config import Escalation

ENGINEERING = Escalation().engineering
TIER2 = set(Escalation().tier2.values())


def test_escalated_pending_ticket_is_never_reminded_nor_auto_closed(gateway: GatewayProc) -> None:
    t, _ = open_ticket(gateway)
    tid = t["id"]
    staff_answer(gateway, tid, "Please send the backup log.")
    wait_for(lambda: gateway.ticket(tid)["status"] == "pending")
    staff_answer(gateway, tid, "#escalate\n#note\nVSS writer fails, please look.")
    shown = wait_for(lambda: (x := gateway.ticket(tid))["tier"] == 2 and x)
    assert shown["escalation"]["by"] == STAFF and shown["escalation"]["queue"] in TIER2
    assert shown["owner"] == STAFF and shown["status"] == "pending"
    # the #note's text is an event of its own (issue 20: mailed to [staff] notes_to, here nobody but its author)
    assert [(e["rule"], e.get("to")) for e in shown["events"]] == [("note", []), ("escalation", None)]
    queue = gateway.sink.wait_to(shown["escalation"]["queue"])[-1]
    assert f"#{tid}]" in str(queue["Subject"]) and "tier 2" in queue.get_body(("plain",)).get_content()
    # tier 2 is support's own matter: the customer is not told
    assert "escalation" not in kinds(gateway, tid, "out")

    # tier 3: the engineering queue; the customer is told once that review takes a day or more
    staff_answer(gateway, tid, "#escalate engineering\n#note\nReproduced, needs a fix.")
    wait_for(lambda: gateway.ticket(tid)["tier"] == 3)
    assert f"#{tid}]" in str(gateway.sink.wait_to(ENGINEERING)[-1]["Subject"])
    told = gateway.sink.wait_to(CUSTOMER, count=3)      # ack, staff reply, escalation notice
    assert "at least 24 hours" in told[-1].get_body(("plain",)).get_content()
    assert kinds(gateway, tid, "out").count("escalation") == 1

    # 25 h: no reminder to the customer; the owner is told to write to them
    run_due(gateway, 25)
    reminders = gateway.sink.wait_to(STAFF)
    assert any("nobody has written to the customer" in m.get_body(("plain",)).get_content()
               for m in reminders)
    # 49 h and a week later: never auto-closed; the owner is reminded to close by hand
    run_due(gateway, 49)
    run_due(gateway, 24 * 8)
    after = gateway.ticket(tid)
    assert after["status"] == "pending"
    assert "reminder" not in kinds(gateway, tid, "out") and "autoclose" not in kinds(gateway, tid, "out")
    assert any("close the ticket by hand" in m.get_body(("plain",)).get_content()
               for m in gateway.sink.wait_to(STAFF, count=2))
    rules = [e["rule"] for e in after["events"]]
    assert rules.count("escalation") == 2 and rules.count("escalation_owner_reminder") == 2


def test_priority_1_escalates_itself_and_a_customer_asking_for_escalation_alerts_staff(
        gateway: GatewayProc) -> None:
    key = uniq("Server down")
    assert gateway.send(mail(f"Ann <{CUSTOMER}>", SUPPORT, key,
                             "Priority: 1\nAll backups fail. Bitte eskalieren Sie das Ticket."))[0] == 250
    t = gateway.ticket_by_subject(key)
    assert t["priority"] == 1 and t["escalation"]["by"] == "rules: priority 1"
    rules = [e["rule"] for e in gateway.ticket(t["id"])["events"]]
    assert rules == ["escalation", "escalation_request"]
    request = gateway.ticket(t["id"])["events"][1]
    assert request["language"] == "de"


def test_explain_shows_an_escalation_request(gateway: GatewayProc, tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "m.eml"
    f.write_bytes(bytes(mail(CUSTOMER, SUPPORT, "Stuck", "Please escalate this to engineering.")))
    r = gateway.cli("explain", str(f), "--json")
    import json
    assert json.loads(r.stdout)["process"] == [
        {"rule": "escalation_request", "language": "en", "phrase": "please escalate"}]


EMERGENCY_QUEUE = "emergency@staff.example.com"
PAGER = "pager@staff.example.com"


def test_emergency_is_p1_around_the_clock_alerts_at_once_and_answers_with_instructions(
        make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(extra_toml=f'''
        [emergency]
        queue = "{EMERGENCY_QUEUE}"
        pager = "{PAGER}"
        [emergency.instructions]
        de = "Notfalleinsätze kosten 250 EUR pro Stunde. Rufen Sie +49 30 999 an."
        [rules]
        default_plan = "professional"
        ''')
    gw.start()
    key = uniq("Server steht")
    assert gw.send(mail("Jörg <joerg@kunde.example>", SUPPORT, key,
                        "Typ: Notfall\nGuten Tag, unser Backup-Server ist komplett ausgefallen.",
                        headers={"Content-Language": "de"}))[0] == 250
    t = gw.ticket_by_subject(key)
    assert t["priority"] == 1 and t["emergency"] is True
    assert [e["rule"] for e in t["events"]][:1] == ["emergency"]
    for address in (EMERGENCY_QUEUE, PAGER):
        alert = gw.sink.wait_to(address)[-1]
        assert "EMERGENCY" in alert.get_body(("plain",)).get_content()
    ack = gw.sink.wait_to("joerg@kunde.example")[0].get_body(("plain",)).get_content()
    assert "250 EUR pro Stunde" in ack and "NOTFALL" in ack
    # 24/7: professional's P1 target of 3 business hours counts around the clock
    due = datetime.fromisoformat(t["response_due_at"]) - datetime.fromisoformat(t["created_at"])
    assert due == timedelta(hours=3)
    decision = next(e for e in gw.ticket(t["id"])["events"] if e["rule"] == "emergency")
    assert "Notfall" in decision["why"]

    ordinary = uniq("Frage")
    assert gw.send(mail("jan@kunde.example", SUPPORT, ordinary,
                        "Kein Notfall: wie stelle ich eine Datei wieder her?"))[0] == 250
    assert gw.ticket_by_subject(ordinary)["priority"] != 1      # "kein Notfall": how-to, P4


def test_status_request_gets_one_automatic_answer_and_marks_the_chaser(gateway: GatewayProc) -> None:
    from conftest import QUEUES
    t, _ = open_ticket(gateway)
    tid = t["id"]
    ask = mail(CUSTOMER, SUPPORT, f"Re: [Support #{tid}] Backup fails", "Any update? What is the status?")
    assert gateway.send(ask)[0] == 250
    answer = wait_for(lambda: [m for m in gateway.sink.to(CUSTOMER) if "P3" in m.get_body(("plain",)).get_content()])
    text = answer[0].get_body(("plain",)).get_content()
    assert f"#{tid}" in text and "open, with our support team" in text and "not escalated" in text
    note = [m for m in gateway.sink.wait_to(QUEUES["AMER"], count=2) if f"#{tid}]" in str(m["Subject"])][-1]
    assert "CHASER" in note.get_body(("plain",)).get_content()
    # a second chaser inside the interval: staff see it, no second automatic answer
    again = mail(CUSTOMER, SUPPORT, f"Re: [Support #{tid}] Backup fails", "Wie ist der Stand?")
    assert gateway.send(again)[0] == 250
    events = [e for e in gateway.ticket(tid)["events"] if e["rule"] == "status_request"]
    assert [e["answered"] for e in events] == [True, False] and events[1]["language"] == "de"
    assert kinds(gateway, tid, "out").count("status") == 1


def test_customer_confirming_the_solution_resolves_and_negation_does_not(gateway: GatewayProc) -> None:
    t, _ = open_ticket(gateway)
    tid = t["id"]
    staff_answer(gateway, tid, "Please install update 7.2 and try again.")
    assert gateway.ticket(tid)["status"] == "pending"
    no = mail(CUSTOMER, SUPPORT, f"Re: [Support #{tid}] Backup fails", "Sorry, it is not solved yet.")
    assert gateway.send(no)[0] == 250
    assert gateway.ticket(tid)["status"] == "open"
    staff_answer(gateway, tid, "Then please send the log.")
    yes = mail(CUSTOMER, SUPPORT, f"Re: [Support #{tid}] Backup fails", "Solved, thanks! You can close the ticket.")
    assert gateway.send(yes)[0] == 250
    shown = gateway.ticket(tid)
    assert shown["status"] == "resolved" and shown["resolved_at"]
    assert "closure" in kinds(gateway, tid, "out")
    assert [e["rule"] for e in shown["events"]] == ["customer_closed"]
    assert run_due(gateway, 24 * 8)["jobs"] == {"reopen window over": 1}
    assert gateway.ticket(tid)["status"] == "closed"


def test_staff_status_stays_authoritative_after_the_customer_closed(gateway: GatewayProc) -> None:
    t, _ = open_ticket(gateway)
    tid = t["id"]
    yes = mail(CUSTOMER, SUPPORT, f"Re: [Support #{tid}] Backup fails", "Problem gelöst, danke!")
    assert gateway.send(yes)[0] == 250
    assert gateway.ticket(tid)["status"] == "resolved"
    staff_answer(gateway, tid, "#status open\n#note\nNot really: the nightly job still fails.")
    assert gateway.ticket(tid)["status"] == "open"
