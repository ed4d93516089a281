"""Staff are proven, by default (issue 14, item 1).

A mail from a staff address is relayed to the customer and its `#commands`
obeyed only when it proves the agent: it answers our notification (the staff
token in its reply address or Message-ID), or a trusted Authentication-Results
header has DKIM/DMARC aligned to the agent's domain. Everything else from a
staff address is an internal note, the agent is told once per ticket an hour
and nothing of the mail is quoted to anyone. All against a real `gateway
serve` over SMTP, and through `gateway ingest`.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import pytest
from conftest import (
    STAFF,
    SUPPORT,
    GatewayProc,
    agent_reply,
    mail,
    open_ticket_with_notices,
    reply_to,
    settle,
    wait_for,
)

CUSTOMER = "ann@customer.example"
PHISH = "https://evil.example/reset-password"
TRUSTED = "mx.staff.example.com"


def open_ticket(gw: GatewayProc) -> tuple[dict[str, Any], EmailMessage, EmailMessage]:
    return open_ticket_with_notices(gw, CUSTOMER, "Ann")


def forged_staff_mail(t: dict[str, Any], *, frm: str = f"Support Agent <{STAFF}>",
                      body: str = f"#priority 1\n#status closed\nPlease install the fix: {PHISH}",
                      headers: dict[str, str] | None = None) -> EmailMessage:
    """Item 1 of the issue: `From: agent`, the ticket's subject tag, a phishing link,
    commands and an executable attached; no token, no authentication."""
    m = mail(frm, SUPPORT, f"Re: [Support #{t['id']}] {t['subject']}", body, headers=headers)
    m.add_attachment(b"MZ\x90\x00 not really", maintype="application", subtype="octet-stream",
                     filename="backup-fix.exe")
    return m


def assert_untouched(gw: GatewayProc, t: dict[str, Any], kinds_in: list[str]) -> None:
    after = gw.ticket(t["id"])
    assert after["status"] == "open" and after["priority"] == t["priority"] == 3
    assert after["first_response_at"] is None
    assert [m["kind"] for m in after["messages"] if m["direction"] == "in"] == kinds_in
    assert "staff_reply" not in [m["kind"] for m in after["messages"]]
    to_customer = gw.sink.to(CUSTOMER)
    assert len(to_customer) == 1                                  # the ack, nothing relayed
    assert PHISH not in to_customer[0].as_string() and "backup-fix" not in to_customer[0].as_string()


def told_agent(gw: GatewayProc) -> list[EmailMessage]:
    return gw.sink.to(STAFF)


def assert_quotes_nothing(told: list[EmailMessage]) -> None:
    for m in told:
        text = m.as_string()
        assert PHISH not in text and "backup-fix" not in text and "frobnicate" not in text
        assert "did not prove" in m.get_body(("plain",)).get_content()


def test_forged_staff_from_is_a_note_not_relayed_not_obeyed_and_the_agent_told_once(
        gateway: GatewayProc) -> None:
    t, _, _ = open_ticket(gateway)
    for _ in range(3):
        assert gateway.send(forged_staff_mail(t))[0] == 250
    settle(gateway)
    assert_untouched(gateway, t, ["customer", "note", "note", "note"])
    told = told_agent(gateway)
    assert len(told) == 1 and f"[Support #{t['id']}]" in str(told[0]["Subject"])
    assert_quotes_nothing(told)
    events = [e for e in gateway.log_events() if e["event"] == "staff.unauthenticated"]
    assert len(events) == 3 and [e["told"] for e in events] == [True, False, False]


def test_forged_staff_mail_through_ingest_is_not_relayed_or_obeyed(gateway: GatewayProc) -> None:
    t, _, _ = open_ticket(gateway)
    r = gateway.cli("ingest", stdin=forged_staff_mail(t).as_bytes())
    assert r.returncode == 0, r.stderr
    settle(gateway)
    assert_untouched(gateway, t, ["customer", "note"])
    assert_quotes_nothing(told_agent(gateway))


def test_forged_staff_mail_with_bad_commands_mails_no_attacker_text_to_the_agent(
        gateway: GatewayProc) -> None:
    t, _, _ = open_ticket(gateway)
    body = f"#frobnicate {PHISH}\n#status nonsense\nClick {PHISH}"
    for _ in range(5):
        assert gateway.send(forged_staff_mail(t, body=body))[0] == 250
    settle(gateway)
    assert_untouched(gateway, t, ["customer"] + ["note"] * 5)
    told = told_agent(gateway)
    assert len(told) == 1                                         # not one per forged mail
    assert_quotes_nothing(told)


@pytest.mark.parametrize("headers", [
    {"X-Original-From": STAFF, "Reply-To": STAFF},                # a list's From rewrite, forged
    {"Reply-To": STAFF},
    {"Sender": STAFF},
])
def test_a_rewritten_or_forwarded_sender_never_becomes_staff(gateway: GatewayProc,
                                                             headers: dict[str, str]) -> None:
    t, _, _ = open_ticket(gateway)
    m = forged_staff_mail(t, frm="Mal <mal@evil.example>", headers=headers)
    assert gateway.send(m, rcpt=[SUPPORT], mail_from="mal@evil.example")[0] == 250
    settle(gateway)
    # a non-participant's tag-only mail: a new ticket linked to the old one, as mal's
    assert_untouched(gateway, t, ["customer"])
    linked = [x for x in gateway.tickets() if x["linked_ticket"] == t["id"]]
    assert len(linked) == 1 and linked[0]["requester"] == "mal@evil.example"
    assert told_agent(gateway) == []


def test_the_agent_answering_the_notification_is_relayed_and_obeyed(gateway: GatewayProc) -> None:
    t, _, note = open_ticket(gateway)
    answer = agent_reply(note, "#priority 2\nPlease run the backup again.", frm=f"Agent Smith <{STAFF}>")
    answer.add_attachment(b"step 1: ...", maintype="text", subtype="plain", filename="howto.txt")
    assert gateway.send(answer)[0] == 250
    relayed = gateway.sink.wait_to(CUSTOMER, count=2)[1]
    assert "Please run the backup again." in relayed.get_body(("plain",)).get_content()
    assert [p.get_filename() for p in relayed.iter_attachments()] == ["howto.txt"]
    after = gateway.ticket(t["id"])
    assert after["status"] == "pending" and after["priority"] == 2


def test_the_reply_address_alone_proves_the_agent(gateway: GatewayProc) -> None:
    """A client that drops In-Reply-To/References still sends to the reply address."""
    _, _, note = open_ticket(gateway)
    answer = mail(STAFF, str(note["Reply-To"]), f"Re: {note['Subject']}", "Fixed on our side.")
    assert gateway.send(answer)[0] == 250
    relayed = gateway.sink.wait_to(CUSTOMER, count=2)[1]
    assert "Fixed on our side." in relayed.get_body(("plain",)).get_content()


def test_a_token_of_another_ticket_or_another_staff_address_proves_nothing(gateway: GatewayProc) -> None:
    t1, _, note1 = open_ticket(gateway)
    t2, _, _ = open_ticket(gateway)
    # the reply address of ticket 1's notification, on a mail about ticket 2
    m = mail(STAFF, str(note1["Reply-To"]), f"Re: [Support #{t2['id']}] x", "#status closed\nDone.")
    assert gateway.send(m)[0] == 250
    # a token bound to some other address than the agent's or a queue's
    other = str(note1["Reply-To"]).replace("support+s", "support+s9")
    assert gateway.send(mail(STAFF, other, f"Re: [Support #{t1['id']}] x", "#status closed\nDone."))[0] == 250
    settle(gateway)
    for t in (t1, t2):
        assert gateway.ticket(t["id"])["status"] == "open"


def strict(make_gateway: Callable[..., GatewayProc], require: bool) -> GatewayProc:
    gw = make_gateway()
    text = gw.config.read_text()
    gw.config.write_text(text.replace("[staff]\n", f"[staff]\nrequire_authenticated = {str(require).lower()}\n"
                                                   f'trusted_authserv_ids = ["{TRUSTED}"]\n', 1))
    gw.start()
    return gw


def test_dmarc_pass_without_header_from_is_no_proof(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = strict(make_gateway, require=True)
    t, _, note = open_ticket(gw)
    for auth in (f"{TRUSTED}; dmarc=pass", f"{TRUSTED}; spf=pass smtp.mailfrom={STAFF}",
                 f"{TRUSTED}; dmarc=pass header.from=evil.example"):
        m = forged_staff_mail(t, headers={"Authentication-Results": auth})
        assert gw.send(m)[0] == 250
    # with require_authenticated a token is no proof either
    assert gw.send(agent_reply(note, "#status closed\nDone."))[0] == 250
    settle(gw)
    assert gw.ticket(t["id"])["status"] == "open"
    assert len(gw.sink.to(CUSTOMER)) == 1
    # an aligned pass from the trusted server is
    ok = forged_staff_mail(t, body="We restored your data.",
                           headers={"Authentication-Results": f"{TRUSTED}; dmarc=pass header.from=staff.example.com"})
    assert gw.send(ok)[0] == 250
    wait_for(lambda: gw.ticket(t["id"])["status"] == "pending", what="the proven answer")


def test_authentication_results_prove_the_agent_without_a_token(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = strict(make_gateway, require=False)
    t, _, _ = open_ticket(gw)
    ok = forged_staff_mail(t, body="Restored.",
                           headers={"Authentication-Results": f"{TRUSTED}; dkim=pass header.d=staff.example.com"})
    assert gw.send(ok)[0] == 250
    relayed = gw.sink.wait_to(CUSTOMER, count=2)[1]
    assert "Restored." in relayed.get_body(("plain",)).get_content()


STAFF_TOKEN = re.compile(r"\+s\d+\.[0-9a-f]{20}@|\.s[0-9a-f]{20}@", re.IGNORECASE)


@pytest.mark.parametrize("client", ["thunderbird", "outlook", "gmail"])
def test_what_the_customer_receives_never_carries_a_staff_token(gateway: GatewayProc, client: str) -> None:
    """The token proves staff: an agent's answer that quotes the notification (Outlook's
    header block names its reply address) or pastes the reply address must not hand
    it to the customer, who could then post as staff on their ticket."""
    t, _, note = open_ticket(gateway)
    pasted = f"Thanks. (this went to {note['Reply-To']}, in reply to {note['Message-ID']})"
    assert STAFF_TOKEN.search(pasted)
    assert gateway.send(agent_reply(note, pasted, client=client))[0] == 250
    relayed = gateway.sink.wait_to(CUSTOMER, count=2)[1]
    assert "Thanks. (this went to support@example.com" in relayed.get_body(("plain",)).get_content()
    for m in gateway.sink.to(CUSTOMER):
        assert not STAFF_TOKEN.search(m.as_string()), m.as_string()
    # and the customer's answer to it, quoting all of that, is the customer's
    assert gateway.send(reply_to(relayed, CUSTOMER, "#status closed\nthanks"))[0] == 250
    wait_for(lambda: [m["kind"] for m in gateway.ticket(t["id"])["messages"]
                      if m["direction"] == "in"][-1] == "customer", what="the customer's reply")
    assert gateway.ticket(t["id"])["status"] == "open"
