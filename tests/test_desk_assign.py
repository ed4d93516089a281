"""`#assign`, `#take`, `#unassign` (issue 20): the assignee is the ticket's owner
(issue 17), told by a mail whose answer proves them, listed by `tickets list
--assignee`. Against a real `gateway serve`, Thunderbird-, Outlook- and
Gmail-shaped replies."""
from __future__ import annotations

import pytest
from conftest import QUEUES, STAFF, GatewayProc, agent_reply, wait_for
from test_desk_commands import CLIENTS, COLLEAGUE, CUSTOMER, open_ticket, text_of, with_colleague


def assigned_events(gw: GatewayProc, tid: int) -> list[dict]:
    return [e for e in gw.ticket(tid)["events"] if e["rule"] == "assigned"]


@pytest.mark.parametrize("client", CLIENTS)
def test_assign_hands_the_ticket_to_a_colleague_who_is_told_and_can_answer(make_gateway, client: str) -> None:  # type: ignore[no-untyped-def]
    gw = with_colleague(make_gateway)
    t, _, note = open_ticket(gw)
    assert gw.send(agent_reply(note, f"#assign Colleague <{COLLEAGUE}>", client=client))[0] == 250
    told = gw.sink.wait_to(COLLEAGUE)[0]
    assert f"#{t['id']}]" in str(told["Subject"]) and f"assigned to you by {STAFF}" in text_of(told)
    assert wait_for(lambda: gw.ticket(t["id"])["owner"] == COLLEAGUE)
    assert [e["owner"] for e in assigned_events(gw, t["id"])] == [COLLEAGUE]
    assert [x["id"] for x in gw.tickets("--assignee", COLLEAGUE.upper())] == [t["id"]]
    assert gw.tickets("--assignee", STAFF) == []
    # the command never reaches the customer (Outlook's signature line alone is relayed as an answer)
    assert all("#assign" not in text_of(m) and COLLEAGUE not in text_of(m) for m in gw.sink.to(CUSTOMER))
    # the assignee answers the mail that told them: proven, relayed to the customer
    assert gw.send(agent_reply(told, "Your backup runs again.", frm=COLLEAGUE, client=client))[0] == 250
    assert wait_for(lambda: [m for m in gw.sink.to(CUSTOMER) if "Your backup runs again." in text_of(m)])


def test_take_and_unassign(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = with_colleague(make_gateway)
    t, _, note = open_ticket(gw)
    assert gw.send(agent_reply(note, "#take"))[0] == 250
    assert wait_for(lambda: gw.ticket(t["id"])["owner"] == STAFF)
    assert gw.send(agent_reply(note, "#unassign"))[0] == 250
    assert wait_for(lambda: gw.ticket(t["id"])["owner"] is None)
    assert [(e["owner"], e["previous"]) for e in assigned_events(gw, t["id"])] == [(STAFF, None), (None, STAFF)]
    # taking it yourself sends you nothing
    assert not [m for m in gw.sink.to(STAFF) if "assigned to you" in text_of(m)]


@pytest.mark.parametrize(("command", "why"), [
    ("#assign stranger@elsewhere.example", "not staff"),
    (f"#assign {QUEUES['EMEA']}", "a staff queue"),
    (f"#take\n#assign {COLLEAGUE}", "one of #assign, #take and #unassign"),
    ("#assign", "needs an address"),
])
def test_a_wrong_assignment_is_refused_and_nothing_happens(make_gateway, command: str, why: str) -> None:  # type: ignore[no-untyped-def]
    gw = with_colleague(make_gateway)
    t, _, note = open_ticket(gw)
    assert gw.send(agent_reply(note, f"{command}\nWe look into it."))[0] == 250
    error = next(m for m in gw.sink.wait_to(STAFF) if "command" in str(m["Subject"]).lower()
                 or why in text_of(m))
    assert why in text_of(error)
    assert gw.ticket(t["id"])["owner"] is None and assigned_events(gw, t["id"]) == []
    assert not [m for m in gw.sink.to(CUSTOMER) if "We look into it." in text_of(m)]   # not relayed either
