"""GovCloud as an enclave (issue 18): its relay, its staff, its store.

Through real `gateway serve` processes with two relay sinks (the commercial
relay and the GovCloud one), on SQLite or PostgreSQL (GATEWAY_TEST_STORE).
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

from conftest import (
    GOV,
    QUEUES,
    STAFF,
    SUPPORT,
    GatewayProc,
    Sink,
    agent_reply,
    free_port,
    mail,
    open_ticket_with_notices,
    reply_to,
    uniq,
    wait_for,
)

GOV_RELAY = '[outbound.govcloud]\nhost = "127.0.0.1"\nport = {port}'


def _gov_relay_port(gw: GatewayProc, port: int | None) -> None:
    """Point the gateway's `[outbound.govcloud]` at `port`, or drop the section (None)."""
    text = gw.config.read_text()
    old = GOV_RELAY.format(port=gw.gov_sink.port)
    assert old in text
    gw.config.write_text(text.replace(old, "" if port is None else GOV_RELAY.format(port=port)))


def _without_gov_mailbox(gw: GatewayProc) -> None:
    text = gw.config.read_text()
    old = f'[[mailbox]]\naddress = "{GOV}"\ngovcloud = true\n'
    assert old in text
    gw.config.write_text(text.replace(old, ""))


def test_a_govcloud_mailbox_without_a_govcloud_relay_is_a_configuration_error(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    _gov_relay_port(gw, None)
    check = gw.cli("check-config")
    assert check.returncode == 78, check.stderr
    assert "outbound.govcloud" in check.stderr and f"{GOV} is a GovCloud mailbox" in check.stderr
    assert "never goes through the commercial [outbound] relay" in check.stderr
    serve = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(gw.config)],
                           capture_output=True, text=True, timeout=60)
    assert serve.returncode == 78 and f"{GOV} is a GovCloud mailbox" in serve.stderr, serve.stderr
    assert not (gw.data_dir / "gateway.db").exists()          # it started nothing

    # the same file with the Maildir transport sends nothing anywhere: valid
    text = gw.config.read_text()
    gw.config.write_text(text.replace('transport = "smtp"', 'transport = "maildir"'))
    assert gw.cli("check-config").returncode == 0
    # and with a GovCloud relay, or without a GovCloud mailbox, smtp is valid too
    gw.config.write_text(text)
    _without_gov_mailbox(gw)
    assert gw.cli("check-config").returncode == 0


def _outbox(gw: GatewayProc, relay: str) -> list[tuple[object, ...]]:
    return gw.query("SELECT kind, state, attempts, last_error FROM outbox WHERE relay = ? ORDER BY id",
                    (relay,))


def test_a_govcloud_relay_that_is_down_keeps_govcloud_mail_queued_never_the_commercial_relay(
        make_gateway: Callable[..., GatewayProc]) -> None:
    down = free_port()                     # nothing listens there: connections are refused
    gw = make_gateway()
    _gov_relay_port(gw, down)
    gw.start()
    key = uniq("FedRAMP tenant")
    assert gw.send(mail("gina@agency.example", GOV, key, "Our GovCloud backup is late."))[0] == 250
    commercial = uniq("Backup fails")
    assert gw.send(mail("ann@customer.example", SUPPORT, commercial, "Backup fails."))[0] == 250
    gw.sink.wait_to("ann@customer.example")                 # the commercial relay works
    t = gw.ticket_by_subject(key)
    assert t["govcloud"] is True
    tried = wait_for(lambda: (rows := _outbox(gw, "govcloud")) and all(r[2] >= 1 for r in rows) and rows,
                     what="every GovCloud mail tried once")
    assert {r[0] for r in tried} == {"ack", "staff_notify"}
    assert all(r[1] == "queued" and f"127.0.0.1:{down} unreachable" in str(r[3]) for r in tried), tried
    retries = [e for e in gw.log_events() if e.get("event") == "outbox.retry" and e.get("relay") == "govcloud"]
    assert retries and all(e["ticket_id"] == t["id"] for e in retries)
    # nothing of it went through the commercial relay (nor the fixture's GovCloud sink)
    assert gw.sink.to("gina@agency.example") == [] and gw.sink.to(QUEUES["GOVCLOUD"]) == []
    assert all("gina@agency.example" not in m["rcpt"] for m in gw.sink.messages)
    assert gw.gov_sink.messages == []
    assert gw.stop() == 0

    # the relay back: the queued mail goes out through it, and only through it
    back = Sink(down)
    try:
        r = gw.cli("run-due", "--now", "2099-01-01T00:00:00+00:00")
        assert r.returncode == 0, r.stderr
        assert GOV in str(back.wait_to("gina@agency.example")[0]["From"])
        back.wait_to(QUEUES["GOVCLOUD"])
    finally:
        back.stop()
    assert {r[1] for r in _outbox(gw, "govcloud")} == {"sent"}
    assert gw.sink.to("gina@agency.example") == []


def test_govcloud_mail_without_any_govcloud_relay_stays_queued(make_gateway: Callable[..., GatewayProc],
                                                               ) -> None:
    """No GovCloud mailbox and no GovCloud relay (valid), yet the rules find a mail
    to the commercial mailbox to be GovCloud: its answers wait, never leave commercially."""
    gw = make_gateway()
    _without_gov_mailbox(gw)
    _gov_relay_port(gw, None)
    gw.start()
    key = uniq("FedRAMP")
    assert gw.send(mail("gina@agency.example", SUPPORT, key, "We are on FedRAMP, the backup is late."))[0] == 250
    assert gw.ticket_by_subject(key)["govcloud"] is True
    tried = wait_for(lambda: (rows := _outbox(gw, "govcloud")) and all(r[2] >= 1 for r in rows) and rows,
                     what="every GovCloud mail tried once")
    assert all(r[1] == "queued" and "no [outbound.govcloud] relay" in str(r[3]) for r in tried), tried
    commercial = uniq("Backup fails")
    assert gw.send(mail("ann@customer.example", SUPPORT, commercial, "Backup fails."))[0] == 250
    gw.sink.wait_to("ann@customer.example")
    assert gw.sink.to("gina@agency.example") == [] and gw.sink.to(QUEUES["GOVCLOUD"]) == []
    assert gw.gov_sink.messages == []


# -- GovCloud staff -----------------------------------------------------------

GOV_AGENT = "gail@staff.examplegov.com"
GOV_CUSTOMER = "gina@agency.example"
SECRET = "tenant gv-4711 at the Cheyenne site"
GOV_STAFF = f'[staff.govcloud]\naddresses = ["{GOV_AGENT}"]\n'
TRUSTED = "mx.staff.examplegov.com"


def gov_ticket(gw: GatewayProc) -> tuple[dict[str, Any], EmailMessage]:
    """A GovCloud ticket whose text is secret, and the GOVCLOUD queue's notification."""
    key = uniq("FedRAMP export")
    assert gw.send(mail(GOV_CUSTOMER, GOV, f"{key} {SECRET}", f"The export of {SECRET} fails."))[0] == 250
    t = gw.ticket_by_subject(key)
    note = next(m for m in gw.gov_sink.wait_to(QUEUES["GOVCLOUD"]) if f"#{t['id']}]" in str(m["Subject"]))
    gw.gov_sink.wait_to(GOV_CUSTOMER)
    return t, note


def refusals(gw: GatewayProc, to: str, count: int = 1) -> list[EmailMessage]:
    return gw.gov_sink.wait_to(to, count)


def assert_refused_quoting_nothing(gw: GatewayProc, t: dict[str, Any], notice: EmailMessage,
                                   sender: str) -> None:
    text = notice.as_string()
    assert SECRET not in text and t["subject"] not in text, text
    assert f"[Support #{t['id']}] GovCloud ticket" == str(notice["Subject"])
    assert "is not GovCloud staff" in " ".join(notice.get_body(("plain",)).get_content().split())
    assert GOV in str(notice["From"]) and sender not in str(notice["Reply-To"] or "")
    after = gw.ticket(t["id"])
    assert after["status"] == "open" and after["priority"] == 3 and after["first_response_at"] is None
    assert "staff_reply" not in [m["kind"] for m in after["messages"]]
    to_customer = [m for m in gw.gov_sink.to(GOV_CUSTOMER) if f"#{t['id']}]" in str(m["Subject"])]
    assert [m["Auto-Submitted"] for m in to_customer] == ["auto-replied"]     # the ack: nothing relayed
    assert gw.sink.to(GOV_CUSTOMER) == [] and gw.sink.to(sender) == []
    refused = [e for e in gw.log_events() if e.get("event") == "govcloud.staff_refused"
               and e.get("ticket_id") == t["id"]]
    assert refused and refused[0]["sender"] == sender and refused[0]["staff"] is True


def commercial_answer(gw: GatewayProc, agent: str) -> None:
    """`agent` answers the AMER queue's notification of a new commercial ticket: relayed."""
    key = uniq("Backup fails")
    assert gw.send(mail("ann@customer.example", SUPPORT, key, "Backup fails."))[0] == 250
    c = gw.ticket_by_subject(key)
    note = next(m for m in gw.sink.wait_to(QUEUES["AMER"]) if f"#{c['id']}]" in str(m["Subject"]))
    assert gw.send(agent_reply(note, "Try again.", frm=agent))[0] == 250
    wait_for(lambda: gw.ticket(c["id"])["status"] == "pending", what=f"{agent}'s commercial answer")


def test_commercial_staff_with_a_valid_staff_proof_may_not_answer_a_govcloud_ticket(
        make_gateway: Callable[..., GatewayProc]) -> None:
    """The GOVCLOUD queue's notification forwarded to a commercial agent, who answers it:
    the token proves a staff answer to this ticket, but the agent is not GovCloud staff."""
    gw = make_gateway(extra_toml=GOV_STAFF)
    gw.start()
    t, note = gov_ticket(gw)
    assert gw.send(agent_reply(note, "#status resolved\n#priority 1\nHere is the fix.", frm=STAFF))[0] == 250
    notice = refusals(gw, STAFF)[0]
    assert_refused_quoting_nothing(gw, t, notice, STAFF)
    kinds = [(m["kind"], m["from"]) for m in gw.ticket(t["id"])["messages"] if m["direction"] == "in"]
    assert kinds == [("customer", GOV_CUSTOMER), ("note", STAFF)]    # kept for GovCloud staff

    # by the subject tag alone, with a command error: refused, the text never quoted back
    # (the hourly notice already went out: the log says so)
    t2, _ = gov_ticket(gw)
    tagged = mail(STAFF, GOV, f"Re: [Support #{t2['id']}] {t2['subject']}", "#stauts closed\nDone.")
    assert gw.send(tagged)[0] == 250
    notice2 = next(m for m in refusals(gw, STAFF, 2) if f"#{t2['id']}]" in str(m["Subject"]))
    assert_refused_quoting_nothing(gw, t2, notice2, STAFF)
    assert "#stauts" not in notice2.as_string()

    # someone not staff at all answering the forwarded GovCloud notification: the same notice
    colleague = "cole@partner.example"
    assert gw.send(agent_reply(note, "I think it is fixed.", frm=colleague))[0] == 250
    notice3 = gw.gov_sink.wait_to(colleague)[0]
    text = notice3.as_string()
    assert SECRET not in text and str(notice3["Subject"]) == f"[Support #{t['id']}] GovCloud ticket"
    assert any(e.get("event") == "govcloud.staff_refused" and e.get("sender") == colleague
               and e.get("staff") is False for e in gw.log_events())
    assert gw.sink.to(colleague) == []


def test_govcloud_staff_answer_govcloud_tickets(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml=GOV_STAFF)
    gw.start()
    t, note = gov_ticket(gw)
    # the queue's notification forwarded to a GovCloud agent, who answers it
    assert gw.send(agent_reply(note, "#priority 2\nWe restored the export.", frm=GOV_AGENT))[0] == 250
    relayed = gw.gov_sink.wait_to(GOV_CUSTOMER, 2)[1]
    assert "We restored the export." in relayed.get_body(("plain",)).get_content()
    after = wait_for(lambda: (a := gw.ticket(t["id"]))["status"] == "pending" and a, what="pending")
    assert after["priority"] == 2
    # and the queue address itself
    t2, note2 = gov_ticket(gw)
    assert gw.send(agent_reply(note2, "Done from the queue.", frm=QUEUES["GOVCLOUD"]))[0] == 250
    wait_for(lambda: gw.ticket(t2["id"])["status"] == "pending", what="the queue's answer")
    assert gw.sink.messages == []                 # nothing of it through the commercial relay
    # a GovCloud agent is no less staff on a commercial ticket (answering its notification)
    commercial_answer(gw, GOV_AGENT)


def test_govcloud_staff_have_their_own_proof_settings(make_gateway: Callable[..., GatewayProc]) -> None:
    """`[staff.govcloud] require_authenticated`: a token is no proof for GovCloud
    tickets, while commercial staff still prove themselves with one."""
    gw = make_gateway(extra_toml=GOV_STAFF + f'require_authenticated = true\ntrusted_authserv_ids = ["{TRUSTED}"]\n')
    gw.start()
    t, note = gov_ticket(gw)
    assert gw.send(agent_reply(note, "#status closed\nDone.", frm=GOV_AGENT))[0] == 250
    unproven = gw.gov_sink.wait_to(GOV_AGENT)[0]
    assert "did not prove" in unproven.get_body(("plain",)).get_content()
    assert gw.ticket(t["id"])["status"] == "open"
    ok = mail(GOV_AGENT, GOV, f"Re: [Support #{t['id']}] x", "Restored.",
              headers={"Authentication-Results": f"{TRUSTED}; dkim=pass header.d=staff.examplegov.com"})
    assert gw.send(ok)[0] == 250
    wait_for(lambda: gw.ticket(t["id"])["status"] == "pending", what="the authenticated answer")
    commercial_answer(gw, STAFF)                  # [staff]'s own settings: a token proves


def test_govcloud_mail_for_billing_stays_with_govcloud_staff(make_gateway: Callable[..., GatewayProc]) -> None:
    """`[redirects]` are commercial addresses: a GovCloud customer's invoice question is
    not forwarded there (its raw mail attached), it is a GovCloud ticket like any other."""
    gw = make_gateway(extra_toml='[redirects]\nbilling = "billing@example.com"\n')
    gw.start()
    key = uniq("Invoice question")
    body = "Hello, please send me a corrected invoice for November and refund the double payment."
    assert gw.send(mail(GOV_CUSTOMER, GOV, key, body))[0] == 250
    t = gw.ticket_by_subject(key)
    gw.gov_sink.wait_to(QUEUES["GOVCLOUD"])
    ack = gw.gov_sink.wait_to(GOV_CUSTOMER)[0]
    assert ack["Auto-Submitted"] == "auto-replied"
    assert t["govcloud"] is True and t["status"] == "open" and t["redirect"] is None
    assert gw.sink.to("billing@example.com") == [] and gw.gov_sink.to("billing@example.com") == []
    assert any(e.get("event") == "ticket.redirect_withheld" for e in gw.log_events())
    # the same mail at the commercial mailbox is still forwarded
    assert gw.send(mail("carla@shop.example", SUPPORT, uniq("Invoice question"), body))[0] == 250
    gw.sink.wait_to("billing@example.com")


# -- the enclave in listings, and moving a ticket into it -----------------------

def _json(gw: GatewayProc, *args: str) -> Any:
    r = gw.cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_listings_show_search_stats_and_quarantine_never_mix_the_enclaves(
        make_gateway: Callable[..., GatewayProc]) -> None:
    from test_quarantine import poison_maker
    gw = make_gateway(extra_toml=GOV_STAFF)
    gw.start()
    t, _ = gov_ticket(gw)
    key = uniq("Backup fails")
    assert gw.send(mail("ann@customer.example", SUPPORT, key, "Backup fails near Cheyenne."))[0] == 250
    c = gw.ticket_by_subject(key)

    assert [x["id"] for x in gw.tickets()] == [c["id"]]                  # commercial by default
    assert [x["id"] for x in gw.tickets("--govcloud")] == [t["id"]]
    table = gw.cli("tickets", "list")
    assert table.returncode == 0 and key in table.stdout and SECRET not in table.stdout
    shown = gw.cli("tickets", "show", str(t["id"]))
    assert shown.returncode == 1 and "--govcloud" in shown.stderr
    assert SECRET not in shown.stdout + shown.stderr
    assert gw.cli("tickets", "show", str(c["id"]), "--govcloud").returncode == 1
    assert _json(gw, "tickets", "show", str(t["id"]), "--govcloud")["govcloud"] is True
    assert gw.cli("tickets", "attachment", str(t["id"]), "0" * 64).returncode == 1
    assert [x["id"] for x in _json(gw, "tickets", "search", "Cheyenne")] == [c["id"]]
    assert [x["id"] for x in _json(gw, "tickets", "search", "Cheyenne", "--govcloud")] == [t["id"]]

    commercial, gov = _json(gw, "stats"), _json(gw, "stats", "--govcloud")
    assert (commercial["tickets"], commercial["open_now"], commercial["govcloud"]) == (1, 1, False)
    assert (gov["tickets"], gov["open_now"], gov["govcloud"]) == (1, 1, True)
    assert "/GOV" not in json.dumps(commercial["by_region"]) and "GovCloud tickets only" in \
        gw.cli("stats", "--govcloud").stdout

    _, make = poison_maker()
    assert gw.send(make(uniq("gov")), rcpt=[GOV], mail_from="pat@customer.example")[0] == 250
    assert gw.send(make(uniq("shop")), rcpt=[SUPPORT], mail_from="pat@customer.example")[0] == 250
    gov_q = wait_for(lambda: _json(gw, "quarantine", "list", "--govcloud") or None, what="GovCloud quarantine")
    com_q = wait_for(lambda: _json(gw, "quarantine", "list") or None, what="commercial quarantine")
    assert [q["mailbox"] for q in gov_q] == [GOV] and [q["mailbox"] for q in com_q] == [SUPPORT]
    assert gw.cli("quarantine", "show", str(gov_q[0]["id"])).returncode == 1
    assert gw.cli("quarantine", "show", str(gov_q[0]["id"]), "--govcloud").returncode == 0
    assert gw.cli("quarantine", "retry", str(gov_q[0]["id"])).returncode == 1       # not from the wrong side


def test_a_govcloud_mention_in_a_reply_is_flagged_and_govcloud_moves_the_ticket(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml=GOV_STAFF)
    gw.start()
    ann = "ann@customer.example"
    t, ack, first = open_ticket_with_notices(gw, ann)
    assert t["govcloud"] is False
    assert gw.send(reply_to(ack, ann, "Also: this tenant runs in our FedRAMP environment."))[0] == 250
    flagged = wait_for(lambda: next((m for m in gw.sink.to(QUEUES["AMER"]) if f"#{t['id']}]" in str(m["Subject"])
                                     and m is not first and "GOVCLOUD?" in m.as_string()), None),
                       what="the flagged notification")
    text = " ".join(flagged.get_body(("plain",)).get_content().split())
    assert "'FedRAMP'" in text and "reply #govcloud" in text
    still = gw.ticket(t["id"])
    assert still["govcloud"] is False                        # staff decide, not one word
    assert [e for e in still["events"] if e["rule"] == "govcloud_indicated"]

    # not with other commands: once GovCloud, a commercial agent's #status would not be theirs
    assert gw.send(agent_reply(flagged, "#govcloud\n#status pending\nMoving.", frm=STAFF))[0] == 250
    error = wait_for(lambda: next((m for m in gw.sink.to(STAFF) if "#govcloud goes alone" in m.as_string()), None),
                     what="the command error")
    assert error is not None and gw.ticket(t["id"])["govcloud"] is False

    assert gw.send(agent_reply(flagged, "#govcloud\nThe customer is a GovCloud tenant.", frm=STAFF))[0] == 250
    moved = wait_for(lambda: (x := _json(gw, "tickets", "show", str(t["id"]), "--govcloud")) and x,
                     what="the ticket in GovCloud")
    assert moved["govcloud"] is True and moved["mailbox"] == GOV and moved["owner"] is None
    event = next(e for e in moved["events"] if e["rule"] == "govcloud_moved")
    assert event["by"] == STAFF and event["from_mailbox"] == SUPPORT and event["to_mailbox"] == GOV
    assert [x["id"] for x in gw.tickets()] == [] and gw.cli("tickets", "show", str(t["id"])).returncode == 1
    received = [m for m in moved["messages"] if m["direction"] == "in"]
    assert received[-1]["kind"] == "note" and received[-1]["from"] == STAFF   # the agent's words: never relayed
    told = wait_for(lambda: next((m for m in gw.sink.to(STAFF) if "moved to GovCloud" in str(m.as_string())),
                                 None), what="the agent told")
    assert "The customer is a GovCloud tenant" not in told.as_string()

    # the GovCloud queue has it, through the GovCloud relay, and answers from the GovCloud mailbox
    gov_note = next(m for m in gw.gov_sink.wait_to(QUEUES["GOVCLOUD"]) if f"#{t['id']}]" in str(m["Subject"]))
    assert "moved to GovCloud by" in gov_note.as_string()
    assert gw.send(agent_reply(gov_note, "We handle it in GovCloud now.", frm=GOV_AGENT))[0] == 250
    relayed = gw.gov_sink.wait_to(ann)[0]
    assert GOV in str(relayed["From"]) and "We handle it in GovCloud now." in relayed.get_body(("plain",)).get_content()
    assert [m["Auto-Submitted"] for m in gw.sink.to(ann)] == ["auto-replied"]   # only the ack went commercial

    # the commercial agent is no GovCloud staff any more for it: refused, quoting nothing
    assert gw.send(agent_reply(flagged, "One more thing from me.", frm=STAFF))[0] == 250
    refusal = gw.gov_sink.wait_to(STAFF)[0]
    assert str(refusal["Subject"]) == f"[Support #{t['id']}] GovCloud ticket"
    assert "One more thing" not in refusal.as_string()
    # and #govcloud on a GovCloud ticket is an error
    assert gw.send(agent_reply(gov_note, "#govcloud", frm=GOV_AGENT))[0] == 250
    wait_for(lambda: any("GovCloud ticket already" in m.as_string() for m in gw.gov_sink.to(GOV_AGENT)),
             what="the error for a GovCloud ticket")
