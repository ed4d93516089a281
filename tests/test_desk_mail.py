"""A support team works from its mail client (issue 20): who may answer, and
what the linked-ticket mails say. Against a real `gateway serve` over SMTP,
with Thunderbird-, Outlook- and Gmail-shaped replies (tests/mailclients.py).
"""
from __future__ import annotations

from email.message import EmailMessage
from typing import Any

import pytest
from conftest import (
    QUEUES,
    SUPPORT,
    GatewayProc,
    agent_reply,
    mail,
    open_ticket_with_notices,
    reply_to,
    settle,
    uniq,
    wait_for,
)

CUSTOMER = "ann@customer.example"
COLLEAGUE = "bob@partner.example"


def open_ticket(gw: GatewayProc) -> tuple[dict[str, Any], EmailMessage, EmailMessage]:
    return open_ticket_with_notices(gw, CUSTOMER)


def inbound_kinds(gw: GatewayProc, tid: int) -> list[str]:
    return [m["kind"] for m in gw.ticket(tid)["messages"] if m["direction"] == "in"]


@pytest.mark.parametrize("client", ["thunderbird", "outlook", "gmail"])
def test_a_reply_from_the_shared_queue_mailbox_is_relayed(gateway: GatewayProc, client: str) -> None:
    """The queue address is a team's shared mailbox: its members answer from it."""
    t, _, note = open_ticket(gateway)
    answer = agent_reply(note, "#priority 2\nWe restored the job.", frm=f"AMER team <{QUEUES['AMER']}>",
                         client=client)
    assert gateway.send(answer, mail_from=QUEUES["AMER"])[0] == 250
    relayed = gateway.sink.wait_to(CUSTOMER, count=2)[1]
    assert "We restored the job." in relayed.get_body(("plain",)).get_content()
    after = gateway.ticket(t["id"])
    assert after["priority"] == 2 and after["status"] == "pending"
    assert inbound_kinds(gateway, t["id"]) == ["customer", "staff"]


def test_a_forged_mail_from_the_queue_address_proves_nothing(gateway: GatewayProc) -> None:
    t, _, _ = open_ticket(gateway)
    forged = mail(QUEUES["AMER"], SUPPORT, f"Re: [Support #{t['id']}] x", "#status closed\nDone.")
    assert gateway.send(forged, mail_from=QUEUES["AMER"])[0] == 250
    settle(gateway)
    assert gateway.ticket(t["id"])["status"] == "open"
    assert inbound_kinds(gateway, t["id"]) == ["customer", "note"]
    assert len(gateway.sink.to(CUSTOMER)) == 1


@pytest.mark.parametrize("client", ["thunderbird", "outlook", "gmail"])
def test_a_colleague_who_is_not_staff_gets_a_clear_answer_never_silence(gateway: GatewayProc,
                                                                       client: str) -> None:
    """The notification was forwarded to a colleague missing from [staff]; their
    answer is kept as a note, not relayed, and they are told why, once an hour."""
    t, _, note = open_ticket(gateway)
    secret_text = "Internal: the customer's vault key is frobnicate-42"
    for _ in range(3):
        answer = agent_reply(note, f"#status closed\n{secret_text}", frm=f"Bob <{COLLEAGUE}>", client=client)
        assert gateway.send(answer, mail_from=COLLEAGUE)[0] == 250
    told = gateway.sink.wait_to(COLLEAGUE)
    settle(gateway)
    assert len(gateway.sink.to(COLLEAGUE)) == 1
    body = told[0].get_body(("plain",)).get_content()
    assert "not a staff address" in body and f"#{t['id']}" in body
    assert "frobnicate" not in told[0].as_string()
    # the notice carries no staff token: answering it proves nothing either
    assert "+s" not in str(told[0]["Reply-To"]) and ".s" not in str(told[0]["Message-ID"]).split("@")[0][-24:]
    after = gateway.ticket(t["id"])
    assert after["status"] == "open"
    assert inbound_kinds(gateway, t["id"]) == ["customer", "note", "note", "note"]
    assert len(gateway.sink.to(CUSTOMER)) == 1
    events = [e for e in gateway.log_events() if e["event"] == "staff.not_staff"]
    assert [e["told"] for e in events] == [True, False, False] and events[0]["sender"] == COLLEAGUE


def test_a_customer_reply_is_still_a_customer_reply(gateway: GatewayProc) -> None:
    """Only an answer to our mail TO STAFF is judged as a would-be staff answer."""
    t, ack, _ = open_ticket(gateway)
    assert gateway.send(reply_to(ack, CUSTOMER, "More details: it fails at 02:00."))[0] == 250
    wait_for(lambda: inbound_kinds(gateway, t["id"]) == ["customer", "customer"], what="the customer's reply")
    assert gateway.sink.to(CUSTOMER)[1:] == []


def test_a_stranger_quoting_a_tag_learns_nothing_of_the_old_ticket(gateway: GatewayProc) -> None:
    t, _, _ = open_ticket(gateway)
    stranger = f"{uniq('mal')}@evil.example"
    assert gateway.send(mail(stranger, SUPPORT, f"Re: [Support #{t['id']}] hello", "is this yours?"))[0] == 250
    ack = gateway.sink.wait_to(stranger)[0]
    text = ack.get_body(("plain",)).get_content()
    linked = next(x for x in gateway.tickets() if x["requester"] == stranger)
    assert linked["linked_ticket"] == t["id"]
    assert f"ticket #{linked['id']}" in text
    assert f"#{t['id']}" not in text.replace(f"#{linked['id']}", "") and "closed" not in text
    # staff see the link and why
    note = next(m for m in gateway.sink.wait_to(QUEUES["AMER"], count=2)
                if f"#{linked['id']}]" in str(m["Subject"]))
    staff_text = note.get_body(("plain",)).get_content()
    assert f"follows up ticket #{t['id']} (subject tag from a non-participant" in staff_text


def test_the_requester_of_a_closed_ticket_is_told_truthfully(gateway: GatewayProc) -> None:
    t, ack, note = open_ticket(gateway)
    assert gateway.send(agent_reply(note, "#status closed\nFixed, closing."))[0] == 250
    wait_for(lambda: gateway.ticket(t["id"])["status"] == "closed", what="closed")
    assert gateway.send(reply_to(ack, CUSTOMER, "It is back again."))[0] == 250
    new = wait_for(lambda: next((x for x in gateway.tickets() if x["linked_ticket"] == t["id"]), None),
                   what="the linked ticket")
    new_ack = next(m for m in gateway.sink.wait_to(CUSTOMER, count=4) if f"#{new['id']}]" in str(m["Subject"]))
    assert f"It follows up your ticket #{t['id']}, which is closed" in new_ack.get_body(("plain",)).get_content()


def test_a_made_up_staff_reply_address_gets_a_stranger_nothing_of_the_ticket(gateway: GatewayProc) -> None:
    """A stranger who guessed a ticket number and wrote to a well-formed staff reply
    address with a token of their own: not an answer to our mail to staff, so no
    not_staff notice (it would carry the ticket's subject); a linked ticket of theirs."""
    t, _, _ = open_ticket(gateway)
    stranger = f"{uniq('mal')}@evil.example"
    made_up = f"support+s{t['id']}.{'0' * 20}@example.com"
    m = mail(stranger, made_up, f"Re: [Support #{t['id']}] hi", "what is this ticket about?")
    assert gateway.send(m, rcpt=[made_up], mail_from=stranger)[0] == 250
    settle(gateway)
    got = gateway.sink.to(stranger)
    assert len(got) == 1 and t["subject"] not in got[0].as_string()
    assert not [e for e in gateway.log_events() if e["event"] == "staff.not_staff"]
    assert inbound_kinds(gateway, t["id"]) == ["customer"]
