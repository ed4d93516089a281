"""Staff commands of a support team working from its mail client (issue 20):
`#cc` / `#uncc`, and staff Cc'd on an answer. Against a real `gateway serve`
over SMTP, with Thunderbird-, Outlook- and Gmail-shaped replies
(tests/mailclients.py)."""
from __future__ import annotations

from email.message import EmailMessage
from typing import Any

import pytest
from conftest import (
    QUEUES,
    STAFF,
    SUPPORT,
    GatewayProc,
    agent_reply,
    open_ticket_with_notices,
    reply_to,
    settle,
)

CUSTOMER = "ann@customer.example"
DAN = "dan@customer.example"
COLLEAGUE = "colleague@staff.example.com"
CLIENTS = ["thunderbird", "outlook", "gmail"]


def open_ticket(gw: GatewayProc) -> tuple[dict[str, Any], EmailMessage, EmailMessage]:
    return open_ticket_with_notices(gw, CUSTOMER)


def text_of(m: EmailMessage) -> str:
    return m.get_body(("plain",)).get_content()


def with_colleague(make_gateway: Any) -> GatewayProc:
    """A gateway whose [staff] has a second agent."""
    gw = make_gateway()
    gw.config.write_text(gw.config.read_text().replace(f'addresses = ["{STAFF}"]',
                                                       f'addresses = ["{STAFF}", "{COLLEAGUE}"]'))
    gw.start()
    return gw


def no_staff_token(m: EmailMessage) -> None:
    """Customer mail: no reply address or Message-ID that would prove an agent."""
    assert "+s" not in str(m["Reply-To"] or "") and "+s" not in str(m["From"])
    assert ".s" not in str(m["Message-ID"]).split("@")[0][-24:]


@pytest.mark.parametrize("client", CLIENTS)
def test_cc_adds_a_participant_and_uncc_removes_them(gateway: GatewayProc, client: str) -> None:
    t, _, note = open_ticket(gateway)
    answer = agent_reply(note, "#cc Dan Lee <Dan@Customer.example>\nWe restored the job.", client=client)
    assert gateway.send(answer)[0] == 250
    relayed = gateway.sink.wait_to(CUSTOMER, count=2)[1]
    assert "We restored the job." in text_of(relayed) and "#cc" not in text_of(relayed)
    assert DAN in str(relayed["Cc"]).lower()
    assert len(gateway.sink.wait_to(DAN)) == 1
    no_staff_token(relayed)
    assert gateway.ticket(t["id"])["cc"] == [DAN]
    # the new participant's reply joins the ticket as the customer's
    assert gateway.send(reply_to(relayed, DAN, "Thanks, works for me too."))[0] == 250
    notes = gateway.sink.wait_to(QUEUES["AMER"], count=2)
    assert "works for me too" in text_of(notes[1])
    assert [m["kind"] for m in gateway.ticket(t["id"])["messages"] if m["direction"] == "in"] == \
        ["customer", "staff", "customer"]
    answer = agent_reply(notes[1], "#uncc dan@customer.example\nClosing the loop with Ann only.", client=client)
    assert gateway.send(answer)[0] == 250
    second = gateway.sink.wait_to(CUSTOMER, count=3)[2]
    assert "Closing the loop" in text_of(second) and second["Cc"] is None
    settle(gateway)
    assert len(gateway.sink.to(DAN)) == 1
    assert gateway.ticket(t["id"])["cc"] == []


def test_cc_alone_adds_without_relaying(gateway: GatewayProc) -> None:
    t, _, note = open_ticket(gateway)
    assert gateway.send(agent_reply(note, "#cc dan@customer.example, eve@customer.example"))[0] == 250
    settle(gateway)
    wait = gateway.ticket(t["id"])
    assert wait["cc"] == [DAN, "eve@customer.example"] and wait["status"] == "open"
    assert len(gateway.sink.to(CUSTOMER)) == 1 and not gateway.sink.to(DAN)


@pytest.mark.parametrize("command, error", [
    (f"#cc {SUPPORT}", "the gateway's own mailboxes"),
    ("#cc support+x@example.com", "the gateway's own mailboxes"),
    (f"#cc {QUEUES['EMEA']}", "staff queue"),
    ("#cc not-an-address", "not an address"),
    ("#cc", "needs an address"),
    (f"#uncc {CUSTOMER}", "is the requester"),
    ("#uncc nobody@customer.example", "is not on the ticket"),
])
def test_a_bad_cc_changes_nothing_and_tells_the_agent(gateway: GatewayProc, command: str, error: str) -> None:
    t, _, note = open_ticket(gateway)
    assert gateway.send(agent_reply(note, f"{command}\n#status resolved\nAll done."))[0] == 250
    told = gateway.sink.wait_to(STAFF)[0]
    assert error in text_of(told) and "#uncc ADDRESS" in text_of(told)
    settle(gateway)
    after = gateway.ticket(t["id"])
    assert after["cc"] == [] and after["status"] == "open"
    assert len(gateway.sink.to(CUSTOMER)) == 1


def test_cc_past_max_participants_is_refused(make_gateway: Any) -> None:
    gw = make_gateway(extra_toml="[limits]\nmax_participants = 3\n")
    gw.start()
    t, _, note = open_ticket(gw)
    assert gw.send(agent_reply(note, "#cc a@customer.example b@customer.example c@customer.example\nHi."))[0] == 250
    assert "at most 3 participants" in text_of(gw.sink.wait_to(STAFF)[0])
    assert gw.ticket(t["id"])["cc"] == []


def test_only_proven_staff_can_cc(gateway: GatewayProc) -> None:
    """A forged staff mail and a customer's own `#cc` line add nobody."""
    t, ack, _ = open_ticket(gateway)
    forged = reply_to(ack, STAFF, "#cc mallory@evil.example\nPlease see.")
    assert gateway.send(forged)[0] == 250
    assert gateway.send(reply_to(ack, CUSTOMER, "#cc mallory@evil.example\nAdd my friend."))[0] == 250
    settle(gateway)
    assert gateway.ticket(t["id"])["cc"] == []
    assert not gateway.sink.to("mallory@evil.example")


@pytest.mark.parametrize("client", CLIENTS)
def test_a_staff_cc_on_an_answer_is_kept_and_joins_the_ticket(make_gateway: Any, client: str) -> None:
    gw = with_colleague(make_gateway)
    t, _, note = open_ticket(gw)
    answer = agent_reply(note, "Looping in my colleague, who knows the backup agent.", client=client)
    answer["Cc"] = f"Colleague <{COLLEAGUE}>, outsider@partner.example, {QUEUES['EMEA']}"
    assert gw.send(answer, rcpt=[str(note["Reply-To"])])[0] == 250
    relayed = gw.sink.wait_to(CUSTOMER, count=2)[1]
    assert COLLEAGUE in str(relayed["Cc"]) and "outsider" not in str(relayed["Cc"])
    assert QUEUES["EMEA"] not in str(relayed["Cc"])
    copy = gw.sink.wait_to(COLLEAGUE)[0]
    no_staff_token(copy)
    assert gw.ticket(t["id"])["cc"] == [COLLEAGUE]
    # later customer mail of the ticket reaches the colleague too: the answer and the closure notice
    assert gw.send(agent_reply(note, "#status resolved\nFixed for good."))[0] == 250
    later = gw.sink.wait_to(COLLEAGUE, count=3)[1:]
    assert any("Fixed for good" in text_of(m) for m in later)
    for m in later:
        no_staff_token(m)


def test_a_staff_cc_on_a_note_does_not_join(make_gateway: Any) -> None:
    gw = with_colleague(make_gateway)
    t, _, note = open_ticket(gw)
    answer = agent_reply(note, "#note\nColleague, have a look?")
    answer["Cc"] = COLLEAGUE
    assert gw.send(answer, rcpt=[str(note["Reply-To"])])[0] == 250
    settle(gw)
    assert gw.ticket(t["id"])["cc"] == []
    assert len(gw.sink.to(CUSTOMER)) == 1
