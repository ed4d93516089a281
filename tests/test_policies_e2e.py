"""Issue 17, the rest of the policies, end to end against a real `serve`, the
clock moved by `run-due --now`: the lifecycle per mailbox and plan, one ticket
per problem, authorised contacts."""
from __future__ import annotations

import json
from email.message import EmailMessage
from typing import Any

from conftest import OLD_TICKET, QUEUES, SUPPORT, GatewayProc, agent_reply, earlier_store, mail, settle, uniq, wait_for
from test_lifecycle_e2e import at, kinds, run_due

from gateway.store import MIGRATIONS

KASEYA = "kaseya@example.com"

LIFECYCLES = f'''
    [lifecycle.plans.advanced]
    reminder_after_hours = 12

    [rules]
    default_plan = "professional"

    [[rules.customer]]
    organisation = "Fast Co"
    domains = ["fast.example"]
    plan = "advanced"

    [[mailbox]]
    address = "{KASEYA}"

    [mailbox.lifecycle]
    reminder_after_hours = [48, 96, 144]
    autoclose_after_hours = 168
    no_reply = "resolve"
    reopen_days = 7
    '''


def staff_answers(gw: GatewayProc, tid: int, text: str) -> None:
    """The agent answers the staff notification of ticket `tid` (its Reply-To)."""
    notes = [m for q in QUEUES.values() for m in gw.sink.to(q) if f"#{tid}]" in str(m["Subject"])]
    assert notes, "no staff notification for the ticket"
    assert gw.send(agent_reply(notes[-1], text))[0] == 250


def pending_ticket(gw: GatewayProc, frm: str, to: str) -> dict[str, Any]:
    key = uniq("Backup fails")
    assert gw.send(mail(frm, to, key, "The backup fails with 0x80040115."))[0] == 250
    t = gw.ticket_by_subject(key)
    gw.sink.wait_to(QUEUES[t["region"]])
    staff_answers(gw, t["id"], "Which version do you run?")
    return wait_for(lambda: (x := gw.ticket(t["id"]))["status"] == "pending" and x)


def test_ninjaone_and_kaseya_lifecycles_run_side_by_side_and_a_plan_has_its_own(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(extra_toml=LIFECYCLES)
    gw.start()
    ninja = pending_ticket(gw, "ann@customer.example", SUPPORT)
    kaseya = pending_ticket(gw, "bob@customer.example", KASEYA)
    fast = pending_ticket(gw, "cy@fast.example", SUPPORT)
    assert ninja["lifecycle"]["from"] == "[lifecycle]" and ninja["lifecycle"]["no_reply"] == "close"
    assert kaseya["lifecycle"] == {"reminder_after_hours": [48.0, 96.0, 144.0], "autoclose_after_hours": 168.0,
                                   "no_reply": "resolve", "reopen_days": 7.0,
                                   "from": "[lifecycle] + [mailbox[2].lifecycle]"}
    assert fast["plan"] == "advanced" and fast["lifecycle"]["reminder_after_hours"] == [12.0]
    assert fast["lifecycle"]["from"] == "[lifecycle] + [lifecycle.plans.advanced]"

    def reminders(t: dict[str, Any]) -> int:
        return kinds(gw, t["id"], "out").count("reminder")

    assert run_due(gw, 13)["jobs"] == {"no customer reply: reminder": 1}     # the advanced plan's 12 h
    assert (reminders(ninja), reminders(kaseya), reminders(fast)) == (0, 0, 1)
    run_due(gw, 25)
    assert (reminders(ninja), reminders(kaseya)) == (1, 0)
    run_due(gw, 49)                                     # NinjaOne: closed at 48 h; Kaseya: first contact
    assert gw.ticket(ninja["id"])["status"] == "closed" and reminders(kaseya) == 1
    assert gw.ticket(kaseya["id"])["status"] == "pending"
    assert run_due(gw, 95)["jobs"] == {}
    run_due(gw, 97)
    run_due(gw, 145)
    assert reminders(kaseya) == 3
    last = [m for m in gw.sink.wait_to("bob@customer.example", count=5)][-1]
    assert "mark the ticket as resolved" in " ".join(last.get_body(("plain",)).get_content().split())

    assert run_due(gw, 169)["jobs"] == {"no customer reply: auto-resolve": 1}
    after = gw.ticket(kaseya["id"])
    assert after["status"] == "resolved" and after["closed_at"] is None
    notice = gw.sink.wait_to("bob@customer.example", count=6)[-1].get_body(("plain",)).get_content()
    assert "as resolved" in notice and "within 7 days" in " ".join(notice.split())
    assert kinds(gw, kaseya["id"], "out").count("autoclose") == 1
    assert run_due(gw, 169 + 24 * 7 - 1)["jobs"] == {}
    assert run_due(gw, 169 + 24 * 7 + 1)["jobs"] == {"reopen window over": 1}
    assert gw.ticket(kaseya["id"])["status"] == "closed"


def test_explain_and_ticket_show_the_lifecycle_and_where_it_came_from(make_gateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(extra_toml=LIFECYCLES)
    f = tmp_path / "m.eml"
    f.write_bytes(bytes(mail("cy@fast.example", KASEYA, "Stuck", "The backup fails.")))
    r = gw.cli("explain", str(f), "--json", "--recipient", KASEYA)
    assert r.returncode == 0, r.stderr
    lc = json.loads(r.stdout)["lifecycle"]
    # the mailbox's table is more specific than the plan's: its reminders win
    assert lc["from"] == "[lifecycle] + [lifecycle.plans.advanced] + [mailbox[2].lifecycle]"
    assert lc["reminder_after_hours"] == [48.0, 96.0, 144.0] and lc["no_reply"] == "resolve"
    assert json.loads(r.stdout)["same_problem"] == {"key": "stuck", "within_hours": 72.0}
    text = gw.cli("explain", str(f), "--recipient", KASEYA).stdout
    assert "lifecycle pending: reminders at 48 h, 96 h, 144 h, resolve at 168 h" in text
    assert "problem   'stuck': a new mail joins the sender's open ticket of this subject within 72 h" in text


def test_a_bad_lifecycle_table_is_refused_with_its_key(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(extra_toml='''
        [lifecycle.plans.advanced]
        reminder_after_hours = [30, 20]
        no_reply = "delete"
        [lifecycle.plans.gold]
        reopen_days = 3
        ''')
    r = gw.cli("check-config")
    assert r.returncode != 0
    assert "lifecycle.plans.advanced.reminder_after_hours: expected ascending hours" in r.stderr
    assert "lifecycle.plans.advanced.no_reply: expected one of close, resolve, got 'delete'" in r.stderr
    assert "lifecycle.plans.gold: no such plan 'gold'" in r.stderr


# -- one ticket per problem (Kaseya, NinjaOne) -------------------------------

ANN = "ann@customer.example"


def tickets_of(gw: GatewayProc, requester: str) -> list[dict[str, Any]]:
    r = gw.cli("tickets", "list", "--json")
    assert r.returncode == 0, r.stderr
    return [t for t in json.loads(r.stdout) if t["requester"] == requester]


def test_a_second_new_mail_about_the_same_problem_joins_the_open_ticket(gateway: GatewayProc) -> None:
    key = uniq("Backup fails")
    assert gateway.send(mail(f"Ann <{ANN}>", SUPPORT, key, "The backup fails with 0x80040115."))[0] == 250
    t = gateway.ticket_by_subject(key)
    # a new mail, not a reply: no In-Reply-To, no tag; forwarded, other case and spacing
    assert gateway.send(mail(ANN, SUPPORT, f"Fwd:  {key.upper()}", "Still failing, here is the log."))[0] == 250
    wait_for(lambda: kinds(gateway, t["id"], "in").count("customer") == 2)
    shown = gateway.ticket(t["id"])
    event = next(e for e in shown["events"] if e["rule"] == "same_problem")
    assert f"open ticket #{t['id']}" in event["why"] and "one ticket per problem" in event["why"]
    assert [x["id"] for x in tickets_of(gateway, ANN)] == [t["id"]]
    assert kinds(gateway, t["id"], "out").count("ack") == 1          # no second acknowledgement
    notes = wait_for(lambda: (n := [m for m in gateway.sink.to(QUEUES[t["region"]])
                                    if f"#{t['id']}]" in str(m["Subject"])]) and len(n) == 2 and n)
    assert "ONE TICKET PER PROBLEM" in notes[-1].get_body(("plain",)).get_content()

    # another sender with that subject, and Ann with another subject: new tickets
    assert gateway.send(mail("bob@customer.example", SUPPORT, key, "Ours fails too."))[0] == 250
    other = uniq("Restore slow")
    assert gateway.send(mail(ANN, SUPPORT, other, "Restores take hours."))[0] == 250
    assert gateway.ticket_by_subject(other)["id"] != t["id"]
    assert len(tickets_of(gateway, "bob@customer.example")) == 1

    # once the ticket is closed, the same subject opens a new ticket
    staff_answers(gateway, t["id"], "#status closed\n#note\nfixed by the update")
    wait_for(lambda: gateway.ticket(t["id"])["status"] == "closed")
    assert gateway.send(mail(ANN, SUPPORT, key, "It fails again after a month."))[0] == 250
    wait_for(lambda: len(tickets_of(gateway, ANN)) == 3)
    assert "same_problem" not in [e["rule"] for e in gateway.ticket(t["id"])["events"][1:]]


def test_one_ticket_per_problem_can_be_switched_off(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(extra_toml="[threading]\nsame_problem_hours = 0\n")
    gw.start()
    key = uniq("Backup fails")
    for body in ("first", "second"):
        assert gw.send(mail(ANN, SUPPORT, key, body))[0] == 250
    wait_for(lambda: len(tickets_of(gw, ANN)) == 2)


# -- authorised contacts (Kaseya) --------------------------------------------

CONTACTS = '''
    [rules.plans.professional]
    p1 = {hours = 3}
    p2 = {hours = 6}
    p3 = {hours = 9}
    [rules.plans.professional.certified]
    p3 = {hours = 1}

    [[rules.customer]]
    organisation = "Acme"
    domains = ["acme.example"]
    plan = "professional"
    contacts = ["ann@acme.example", "bob@acme.example"]
    contacts_policy = "flag"
    certified = [{address = "cert@acme.example", expires = 2099-12-31},
                 {address = "old@acme.example", expires = 2020-01-01}]

    [[rules.customer]]
    organisation = "Locked Ltd"
    domains = ["locked.example"]
    contacts = ["ann@locked.example"]
    contacts_policy = "restrict"

    [[rules.customer]]
    organisation = "Gesperrt GmbH"
    domains = ["gesperrt.example"]
    language = "de"
    contacts = ["chef@gesperrt.example"]
    contacts_policy = "restrict"
    contacts_instructions = "Ihre IT-Abteilung nimmt Sie im Kundenportal auf."
    '''


def new_ticket(gw: GatewayProc, frm: str, body: str = "The backup fails with 0x80040115.") -> dict[str, Any]:
    key = uniq("Backup fails")
    assert gw.send(mail(frm, SUPPORT, key, body))[0] == 250
    return gw.ticket_by_subject(key)


def staff_note(gw: GatewayProc, t: dict[str, Any]) -> str:
    notes = wait_for(lambda: [m for m in gw.sink.to(QUEUES[t["region"]]) if f"#{t['id']}]" in str(m["Subject"])])
    return " ".join(notes[0].get_body(("plain",)).get_content().split())


def test_flag_marks_a_ticket_from_anyone_else_and_certified_administrators_rank_first(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(extra_toml=CONTACTS)
    gw.start()
    cert = new_ticket(gw, "Cy <cert@acme.example>")
    ann = new_ticket(gw, "Ann <ann@acme.example>")
    zed = new_ticket(gw, "Zed <zed@acme.example>")
    old = new_ticket(gw, "old@acme.example")
    assert (cert["contact"], ann["contact"], zed["contact"], old["contact"]) == (
        "certified", "authorised", "unlisted", "authorised")        # an expired certificate does not count
    assert "NOT AN AUTHORISED CONTACT: zed@acme.example is not an authorised contact of Acme" in staff_note(gw, zed)
    assert "CERTIFIED ADMINISTRATOR (ranked first)" in staff_note(gw, cert)
    assert "AUTHORISED CONTACT" not in staff_note(gw, ann) and "CERTIFIED" not in staff_note(gw, ann)
    assert "certificate expired 2020-01-01" in next(e for e in old["events"] if e["rule"] == "contact")["why"]
    assert [e["rule"] for e in zed["events"]] == ["contact"]

    # the certified administrator's shorter target (1 business hour against 9), and the ack says so
    assert cert["response_due_at"] < ann["response_due_at"]
    ack = " ".join(gw.sink.wait_to("cert@acme.example")[0].get_body(("plain",)).get_content().split())
    assert "within 1 business hour" in ack
    assert cert["response_due_at"] < old["response_due_at"]
    # newest first, as always; --certified-first puts the certified administrator's ticket first
    assert [t["id"] for t in gw.tickets()][:4] == [old["id"], zed["id"], ann["id"], cert["id"]]
    assert [t["id"] for t in gw.tickets("--certified-first")][:4] == [cert["id"], old["id"], zed["id"], ann["id"]]


def test_authorised_contacts_answer_on_each_others_tickets(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(extra_toml=CONTACTS)
    gw.start()
    ann = new_ticket(gw, "Ann <ann@acme.example>")
    tagged = f"Re: [Support #{ann['id']}] {ann['subject']}"
    assert gw.send(mail("Bob <bob@acme.example>", SUPPORT, tagged, "Here is the log Ann promised."))[0] == 250
    shown = wait_for(lambda: (x := gw.ticket(ann["id"]))["cc"] and x)
    assert shown["cc"] == ["bob@acme.example"]
    event = next(e for e in shown["events"] if e["rule"] == "colleague")
    assert event["organisation"] == "Acme" and "authorised contact of Acme" in event["why"]
    staff_answers(gw, ann["id"], "Thanks, looking at it.")
    gw.sink.wait_to("bob@acme.example")                       # the colleague gets the answer too

    # someone at Acme who is no authorised contact: a new linked ticket, as before
    assert gw.send(mail("zed@acme.example", SUPPORT, tagged, "Me too."))[0] == 250
    linked = wait_for(lambda: [t for t in gw.tickets() if t["linked_ticket"] == ann["id"]])
    assert linked[0]["requester"] == "zed@acme.example"


def test_restrict_keeps_the_mail_without_a_ticket_until_the_contact_is_added(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(extra_toml=CONTACTS)
    gw.start()
    key = uniq("Locked out")
    assert gw.send(mail("Zed <zed@locked.example>", SUPPORT, key, "Please reset my password."))[0] == 250
    (entry,) = wait_for(lambda: json.loads(gw.cli("quarantine", "list", "--json").stdout))
    assert entry["error"].startswith("contact.refused: zed@locked.example is not an authorised contact of "
                                     "Locked Ltd (contacts_policy restrict)")
    assert not [t for t in gw.tickets() if key in t["subject"]]
    assert any(e["event"] == "contact.refused" for e in gw.log_events())
    assert new_ticket(gw, "ann@locked.example")["contact"] == "authorised"

    # the organisation adds Zed: the kept mail becomes a ticket on retry
    gw.config.write_text(gw.config.read_text().replace('contacts = ["ann@locked.example"]',
                                                       'contacts = ["ann@locked.example", "zed@locked.example"]'))
    r = gw.cli("quarantine", "retry", str(entry["id"]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert gw.ticket_by_subject(key)["contact"] == "authorised"
    ack = [m for m in gw.sink.wait_to("zed@locked.example", count=2) if "#" in str(m["Subject"])]
    assert len(ack) == 1 and ack[0]["Auto-Submitted"] == "auto-replied"      # now a ticket's acknowledgement


def quarantined(gw: GatewayProc) -> list[dict[str, Any]]:
    r = gw.cli("quarantine", "list", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def refusal_rows(gw: GatewayProc) -> list[tuple[Any, ...]]:
    return gw.query("SELECT ticket_id, message_row, inbound_id, state, rcpt_to FROM outbox"
                    " WHERE kind = 'contact_refused' ORDER BY id")


def plain(m: EmailMessage) -> str:
    return " ".join(m.get_body(("plain",)).get_content().split())


def test_restrict_answers_a_stranger_once_saying_who_may_open_tickets(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(extra_toml=CONTACTS)
    gw.start()
    key = uniq("Locked out")
    first = mail("Zed <zed@locked.example>", SUPPORT, key, "Please reset my password.")
    assert gw.send(first)[0] == 250
    (answer,) = gw.sink.wait_to("zed@locked.example")
    (entry,) = wait_for(lambda: quarantined(gw))
    assert entry["error"].startswith("contact.refused: zed@locked.example is not an authorised contact of Locked Ltd")
    assert entry["error"].endswith("; answered with who may open tickets")
    assert not [t for t in gw.tickets() if key in t["subject"]]

    # an automatic answer to the refused mail, about no ticket (CONTRACT.md's outbound headers)
    assert answer["Auto-Submitted"] == "auto-replied"
    assert answer["X-Auto-Response-Suppress"] == "All" and answer["Precedence"] == "bulk"
    assert answer["In-Reply-To"] == first["Message-ID"] and answer["References"] == first["Message-ID"]
    assert answer["From"].addresses[0].addr_spec == SUPPORT and answer["Content-Language"] == "en"
    assert str(answer["Subject"]) == f"[Support] {key}" and answer["X-Support-Ticket"] is None
    assert answer["Message-ID"] and answer["Message-ID"] != first["Message-ID"]
    text = plain(answer)
    assert "Hello Zed," in text and "authorised contacts of Locked Ltd only" in text
    assert "ask one of the authorised contacts of Locked Ltd" in text and "we have kept it" in text
    raw = next(m["raw"] for m in gw.sink.messages if m["rcpt"] == ["zed@locked.example"])
    assert b"ann@locked.example" not in raw.lower()         # nobody's address is told to a stranger
    rows = wait_for(lambda: (r := refusal_rows(gw)) and r[0][3] == "sent" and r)
    assert rows == [(None, None, entry["id"], "sent", '["zed@locked.example"]')]
    refused = [e for e in gw.log_events() if e["event"] == "contact.refused"]
    assert [e["answered"] for e in refused] == [True]

    # the same stranger again, from a +tag of the same mailbox: kept, not answered again
    again = uniq("Still locked")
    assert gw.send(mail("Zed+urgent@Locked.example", SUPPORT, again, "Hello?"))[0] == 250
    entries = wait_for(lambda: (q := quarantined(gw)) and len(q) == 2 and q)
    assert entries[1]["error"].endswith("not answered: 1 answers to a refused contact went to this sender in the "
                                        "last hour (limits.refusals_per_sender_per_hour = 1)")
    # someone else at the organisation is answered; by then Zed's second answer would have come
    assert gw.send(mail("yan@locked.example", SUPPORT, uniq("Help"), "Hi."))[0] == 250
    gw.sink.wait_to("yan@locked.example")
    settle(gw)
    assert len(gw.sink.to("zed@locked.example")) == 1 and not gw.sink.to("zed+urgent@locked.example")
    assert len(refusal_rows(gw)) == 2
    withheld = [e for e in gw.log_events() if e["event"] == "contact.answer_withheld"]
    assert [(e["scope"], e["sent_last_hour"], e["limit"]) for e in withheld] == [("refusals", 1, 1)]

    # a retry while Zed is still not listed: kept again, the mail is not answered twice
    r = gw.cli("quarantine", "retry", str(entry["id"]))
    assert r.returncode == 65, r.stdout + r.stderr
    assert "not answered: this mail was answered before" in quarantined(gw)[0]["error"]
    assert len(refusal_rows(gw)) == 2
    told = [json.loads(x) for x in (r.stdout + r.stderr).splitlines() if x.startswith("{")]
    assert [e["scope"] for e in told if e.get("event") == "contact.answer_withheld"] == ["retry"], r.stdout + r.stderr


def test_restrict_answers_in_the_organisations_language_with_its_instructions(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(extra_toml=CONTACTS)
    gw.start()
    key = uniq("Kein Zugang")
    assert gw.send(mail("Neu <neu@gesperrt.example>", SUPPORT, key, "Ich komme nicht mehr rein."))[0] == 250
    (answer,) = gw.sink.wait_to("neu@gesperrt.example")
    assert answer["Content-Language"] == "de" and answer["Auto-Submitted"] == "auto-replied"
    text = plain(answer)
    assert "autorisierten Ansprechpartner von Gesperrt GmbH" in text
    assert "So werden Sie hinzugefügt: Ihre IT-Abteilung nimmt Sie im Kundenportal auf." in text
    assert "chef@gesperrt.example" not in answer.as_string().lower()
    assert answer.get_body(("html",)) is not None


def test_restrict_never_answers_automatic_mail_from_a_stranger(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(extra_toml=CONTACTS)
    gw.start()
    robots = [
        (mail("ooo@locked.example", SUPPORT, "Out of office", "I am away.",
              headers={"Auto-Submitted": "auto-replied"}), None),
        (mail("news@locked.example", SUPPORT, uniq("Newsletter"), "News.",
              headers={"Precedence": "list", "List-Id": "<news.locked.example>"}), None),
        (mail("MAILER-DAEMON@locked.example", SUPPORT, "Undelivered Mail Returned to Sender",
              "Mailbox unknown."), ""),
    ]
    for robot, envelope in robots:
        assert gw.send(robot, mail_from=envelope)[0] == 250
    # a person after them is answered: the robots' answers, had there been any, were queued before
    assert gw.send(mail("yan@locked.example", SUPPORT, uniq("Help"), "Hi."))[0] == 250
    gw.sink.wait_to("yan@locked.example")
    settle(gw)
    for who in ("ooo@locked.example", "news@locked.example", "mailer-daemon@locked.example"):
        assert not gw.sink.to(who), who
    assert [r[4] for r in refusal_rows(gw)] == ['["yan@locked.example"]']
    assert len(quarantined(gw)) == 1                # the robots' mail is `automatic`, kept, no ticket
    assert not [t for t in gw.tickets() if t["requester"].endswith("@locked.example")]


def test_the_answer_to_a_refused_contact_survives_kill_9_and_is_sent_once(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(extra_toml=CONTACTS)
    gw.start()
    gw.sink.reply = "451 4.3.0 try again later"
    assert gw.send(mail("zed@locked.example", SUPPORT, uniq("Locked out"), "Reset please."))[0] == 250
    wait_for(lambda: gw.query("SELECT attempts, state FROM outbox WHERE kind = 'contact_refused'") == [(1, "queued")])
    gw.kill()                                       # SIGKILL with the answer still queued
    gw.sink.reply = "250 2.0.0 OK"
    gw.start()
    r = gw.cli("run-due", "--now", at(1))           # its retry is due then
    assert r.returncode == 0, r.stderr
    gw.sink.wait_to("zed@locked.example")
    wait_for(lambda: [x[3] for x in refusal_rows(gw)] == ["sent"])
    settle(gw)
    assert len(gw.sink.to("zed@locked.example")) == 1


OLD_ACK = (b"From: support@example.com\r\nTo: old@customer.example\r\nSubject: [Support #1] Old one\r\n"
           b"Message-ID: <old-ack@example.com>\r\n\r\nack\r\n")


def test_mail_queued_before_the_ticketless_outbox_migration_is_still_sent(make_gateway) -> None:  # type: ignore[no-untyped-def]
    """Migration 19 (ticket-less outbox rows) keeps every row: a SQLite table
    rebuild, PostgreSQL's ALTER COLUMN ... DROP NOT NULL."""
    gw = make_gateway(extra_toml=CONTACTS)
    before = next(i for i, sql in enumerate(MIGRATIONS) if "outbox_new" in sql)   # the store just before it
    ack = ("INSERT INTO messages (ticket_id, direction, kind, sender, recipients, subject, message_id,"
           " body_text, reply_text, created_at) VALUES (1, 'out', 'ack', ?, '[\"old@customer.example\"]',"
           " '[Support #1] Old one', '<old-ack@example.com>', 'ack', 'ack', '2026-01-01T00:00:00+00:00')")
    queued = ("INSERT INTO outbox (message_row, ticket_id, kind, relay, mail_from, rcpt_to, content, state,"
              " next_attempt_at, created_at) VALUES (1, 1, 'ack', 'default', ?, '[\"old@customer.example\"]', ?,"
              " 'queued', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')")
    earlier_store(gw, before, [(OLD_TICKET, ("Old one", SUPPORT)), (ack, (SUPPORT,)), (queued, (SUPPORT, OLD_ACK))])
    gw.start()
    (old,) = gw.sink.wait_to("old@customer.example")
    assert old["Message-ID"] == "<old-ack@example.com>"
    wait_for(lambda: gw.query("SELECT id, ticket_id, message_row, state FROM outbox") == [(1, 1, 1, "sent")])
    # and the new rows may have neither ticket nor message
    assert gw.send(mail("zed@locked.example", SUPPORT, uniq("Locked out"), "Reset please."))[0] == 250
    gw.sink.wait_to("zed@locked.example")
    assert wait_for(lambda: (r := refusal_rows(gw)) and r[0][3] == "sent" and r)[0][:2] == (None, None)


def test_a_refused_contacts_answer_the_relay_refuses_for_good_fails_alone(make_gateway) -> None:  # type: ignore[no-untyped-def]
    """A 5xx for mail about no ticket: the row is `failed` with the relay's answer
    (no ticket to record a bounce on, no staff notice), and the sender goes on."""
    gw = make_gateway(extra_toml=CONTACTS)
    gw.start()
    gw.sink.refuse_to["zed@locked.example"] = "550 5.1.1 no such user"
    assert gw.send(mail("zed@locked.example", SUPPORT, uniq("Locked out"), "Reset please."))[0] == 250
    wait_for(lambda: [r[3] for r in refusal_rows(gw)] == ["failed"])
    assert gw.query("SELECT last_error FROM outbox WHERE kind = 'contact_refused'")[0][0] == "relay said 550 5.1.1 no such user"
    failed = [e for e in gw.log_events() if e["event"] == "outbox.failed"]
    assert [(e["kind"], e["ticket_id"]) for e in failed] == [("contact_refused", None)]
    settle(gw)                                      # the next mail's answers go out as ever
    assert not [m for q in QUEUES.values() for m in gw.sink.to(q) if "did not" in plain(m)]
