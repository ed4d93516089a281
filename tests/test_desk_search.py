"""`gateway tickets search` and the rules decision in `tickets show` (issue 20),
against a real `gateway serve`, on SQLite (FTS5) and PostgreSQL (full-text
search) alike (`GATEWAY_TEST_STORE=postgresql`)."""
from __future__ import annotations

import json
from typing import Any

from conftest import (
    OLD_TICKET,
    SUPPORT,
    GatewayProc,
    agent_reply,
    earlier_store,
    mail,
    open_ticket_with_notices,
    uniq,
)

from gateway.store import MIGRATIONS

SEARCH_MIGRATION = next(i for i, m in enumerate(MIGRATIONS) if "message_search" in m)


def search(gw: GatewayProc, *words: str, extra: tuple[str, ...] = ()) -> list[int]:
    r = gw.cli("tickets", "search", *words, "--json", *extra)
    assert r.returncode == 0, r.stderr
    return [t["id"] for t in json.loads(r.stdout)]


def new_ticket(gw: GatewayProc, frm: str, subject: str, body: str) -> dict[str, Any]:
    assert gw.send(mail(frm, SUPPORT, subject, body))[0] == 250
    return gw.ticket_by_subject(subject)


def test_search_finds_tickets_by_subject_text_and_requester(gateway: GatewayProc) -> None:
    a = new_ticket(gateway, "Ann Lee <ann.lee@customer.example>", uniq("Backup"), "The zyxwvut job fails nightly.")
    b = new_ticket(gateway, "carl@other.example", "Quarkwidget crashes on start", "Since the update.")
    # a customer's later reply is searched too
    ack = gateway.sink.wait_to("carl@other.example")[0]
    assert gateway.send(mail("carl@other.example", SUPPORT, "Re: " + str(ack["Subject"]),
                             "Log says flibbertigibbet overflow."))[0] == 250
    assert search(gateway, "zyxwvut") == [a["id"]]                 # body text
    assert search(gateway, "quarkwidget") == [b["id"]]             # subject, any case
    assert search(gateway, "flibbertigibbet") == [b["id"]]         # a reply on the ticket
    assert search(gateway, "ann.lee@customer.example") == [a["id"]]   # requester address
    assert search(gateway, "ann") == [a["id"]]                     # and its parts
    assert search(gateway, "other.example") == [b["id"]]
    assert search(gateway, "zyxwvut", "quarkwidget") == []         # every word must occur
    assert search(gateway, "nosuchwordanywhere") == []
    # newest first, and --limit bounds it
    assert search(gateway, "example") == [b["id"], a["id"]]
    assert search(gateway, "example", extra=("--limit", "1")) == [b["id"]]
    text = gateway.cli("tickets", "search", "quarkwidget")
    assert text.returncode == 0 and "Quarkwidget crashes" in text.stdout and "(1 ticket)" in text.stdout


def test_search_text_is_never_query_syntax(gateway: GatewayProc) -> None:
    """FTS5 and tsquery operators in the user's text are words, not syntax: no error."""
    t = new_ticket(gateway, "dee@customer.example", uniq("Login"), "Error E42 at login.")
    for text in ('"unbalanced', "NEAR(a b)", "e42 OR x", "log*", "a:b", "a -x !b &c |d", "(", "AND", "'", "\\"):
        r = gateway.cli("tickets", "search", text, "--json")
        assert r.returncode == 0, (text, r.stderr)
        json.loads(r.stdout)
    assert search(gateway, "E42") == [t["id"]]
    assert search(gateway, '"E42"') == [t["id"]]


def test_search_needs_a_word_and_a_sane_limit(gateway: GatewayProc) -> None:
    for args in (("   ",), ('""',), ("x", "--limit", "0"), ("x", "--limit", "501")):
        r = gateway.cli("tickets", "search", *args)
        assert r.returncode == 64 and "needs a word" in r.stderr, args


def test_search_finds_staff_replies_and_notes_but_not_what_we_sent(gateway: GatewayProc) -> None:
    t, _, note = open_ticket_with_notices(gateway, "erin@customer.example")
    assert gateway.send(agent_reply(note, "Try the plumbusreset tool."))[0] == 250
    gateway.sink.wait_to("erin@customer.example", count=2)
    assert search(gateway, "plumbusreset") == [t["id"]]
    # our acknowledgement's wording is in every ticket: it is not what is searched
    assert search(gateway, "acknowledgement") == []


def test_tickets_show_includes_the_stored_rules_decision(gateway: GatewayProc) -> None:
    t = new_ticket(gateway, "fay@customer.example.de", uniq("Ausfall"), "Region: EMEA\nProduktion steht.")
    d = t["decision"]
    assert d["region"] == "EMEA" and d["priority"] == t["priority"]
    rules = {e["part"]: e["rule"] for e in reversed(d["evidence"])}
    assert rules["region"].startswith("region.") and "priority" in rules
    assert d["language"]["value"] == t.get("language", d["language"]["value"])
    text = gateway.cli("tickets", "show", str(t["id"]))
    assert text.returncode == 0
    assert "rules decision" in text.stdout and rules["region"] in text.stdout and "Region: EMEA" in text.stdout


def test_tickets_made_before_the_upgrade_are_searchable(make_gateway: Any) -> None:
    """The search migration indexes what is there already (ticket #1 here)."""
    gw = make_gateway()
    old_mail = ("INSERT INTO messages (ticket_id, direction, kind, sender, recipients, subject, message_id,"
                " body_text, reply_text, created_at) VALUES (1, 'in', 'customer', 'old@customer.example',"
                " '[]', 'Old gizmotron issue', '<old@x>', 'the snorkelwhip broke', '', '2026-01-01')")
    earlier_store(gw, SEARCH_MIGRATION, [(OLD_TICKET, ("Old gizmotron issue", SUPPORT)), (old_mail, ())])
    gw.start()
    assert search(gw, "snorkelwhip") == [1]
    assert search(gw, "gizmotron") == [1]
    assert search(gw, "old@customer.example") == [1]
    t = new_ticket(gw, "new@customer.example", "New gizmotron issue", "again")
    assert search(gw, "gizmotron") == [t["id"], 1]
