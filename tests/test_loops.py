"""Loops and floods, end to end through `gateway serve`.

- Automatic mail (RFC 3834 and the peers' list of signs) never gets an
  automatic answer: about no ticket it makes none, on a ticket it is
  recorded as `auto`/`bounce` and changes nothing.
- Our own mail coming back (a misrouted relay, a forwarding loop) is not
  answered.
- One sender gets at most `[limits] auto_answers_per_sender_per_hour`
  acknowledgements an hour; the tickets are still made.
- Staff mail is obeyed and relayed only when the receiving MTA authenticated
  it (`[staff] require_authenticated`, RFC 8601 Authentication-Results).
"""
from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import pg
import pytest
from conftest import QUEUES, STAFF, SUPPORT, GatewayProc, mail, reply_to, uniq, wait_for

from gateway.mail.authres import aligned, parse, verify


def processed(gw: GatewayProc, message_id: str) -> dict:
    """The `mail.processed` log event of one mail (waits for it)."""
    return wait_for(lambda: next((e for e in gw.log_events() if e["event"] == "mail.processed"
                                  and e["message_id"] == message_id), None),
                    what=f"mail.processed for {message_id}")


def settle(gw: GatewayProc) -> None:
    """Send a human mail and wait for its ack: the outbox has delivered what was queued before."""
    who = f"{uniq('sync')}@customer.example"
    assert gw.send(mail(who, SUPPORT, uniq("sync"), "sync"))[0] == 250
    gw.sink.wait_to(who)
    wait_for(lambda: json.loads(gw.cli("run-due").stdout)["outbox"].get("queued", 0) == 0,
             what="an empty outbox")


def answered(gw: GatewayProc, m: EmailMessage) -> list[EmailMessage]:
    """Every mail the gateway sent in answer to `m` (In-Reply-To names it)."""
    with gw.sink.lock:
        return [x["msg"] for x in gw.sink.messages
                if str(x["msg"]["In-Reply-To"]) == str(m["Message-ID"])]


AUTOMATIC = [
    ("auto-submitted auto-replied", {"Auto-Submitted": "auto-replied"}, None),
    ("auto-submitted auto-generated", {"Auto-Submitted": "auto-generated"}, None),
    ("auto-submitted auto-notified", {"Auto-Submitted": "auto-notified; owner-email=x@y.example"}, None),
    ("precedence bulk", {"Precedence": "bulk"}, None),
    ("precedence junk", {"Precedence": "junk"}, None),
    ("precedence list", {"Precedence": "list"}, None),
    ("list-id", {"List-Id": "Announcements <announce.lists.example.com>"}, None),
    ("x-autoreply", {"X-Autoreply": "yes"}, None),
    ("exchange out of office", {"X-Auto-Response-Suppress": "All"}, "Automatic reply: "),
    ("mailer-daemon sender", {}, "mailer-daemon"),
    ("postmaster sender", {}, "postmaster"),
    ("noreply sender", {}, "noreply"),
    ("no-reply sender", {}, "no-reply"),
]


@pytest.mark.parametrize("name,headers,special", AUTOMATIC, ids=[a[0] for a in AUTOMATIC])
def test_automatic_mail_about_no_ticket_is_never_answered_and_makes_no_ticket(
        gateway: GatewayProc, name: str, headers: dict[str, str], special: str | None) -> None:
    local = special if special and not special.endswith(": ") else uniq("robot")
    sender = f"{local}@robots.example"
    subject = (special if special and special.endswith(": ") else "") + uniq(name)
    m = mail(sender, SUPPORT, subject, "This is an automatic message.", headers=headers)
    assert gateway.send(m)[0] == 250
    assert processed(gateway, str(m["Message-ID"]))["action"] == "automatic"
    settle(gateway)
    assert gateway.sink.to(sender) == [] and answered(gateway, m) == []
    assert not [t for t in gateway.tickets() if t["requester"] == sender]


def test_null_envelope_sender_is_never_answered(gateway: GatewayProc) -> None:
    sender = f"{uniq('notifier')}@robots.example"
    m = mail(sender, SUPPORT, uniq("notification"), "Your job finished.")
    assert gateway.send(m, mail_from="")[0] == 250            # MAIL FROM:<> (RFC 5321 §4.5.5)
    assert processed(gateway, str(m["Message-ID"]))["action"] == "automatic"
    settle(gateway)
    assert gateway.sink.to(sender) == [] and answered(gateway, m) == []


def test_auto_submitted_no_is_a_person_and_is_answered(gateway: GatewayProc) -> None:
    sender = f"{uniq('person')}@customer.example"
    assert gateway.send(mail(sender, SUPPORT, uniq("human"), "hi",
                             headers={"Auto-Submitted": "no"}))[0] == 250
    gateway.sink.wait_to(sender)


@pytest.mark.parametrize("own", [SUPPORT, QUEUES["AMER"]])
def test_mail_from_our_own_addresses_is_never_answered(gateway: GatewayProc, own: str) -> None:
    m = mail(own, SUPPORT, uniq("from ourselves"), "loop?")
    assert gateway.send(m, mail_from=own)[0] == 250
    assert processed(gateway, str(m["Message-ID"]))["action"] == "automatic"
    settle(gateway)
    assert answered(gateway, m) == []
    assert not [t for t in gateway.tickets() if t["requester"] == own]


def test_our_own_ack_looped_back_is_recorded_not_answered(gateway: GatewayProc) -> None:
    """A relay that routes our acknowledgement back to the mailbox: no ping-pong."""
    key = uniq("loop")
    customer = f"{uniq('cust')}@customer.example"
    assert gateway.send(mail(customer, SUPPORT, key, "first"))[0] == 250
    t = gateway.ticket_by_subject(key)
    ack = gateway.sink.wait_to(customer)[0]
    notifies = len(gateway.sink.to(QUEUES["AMER"]))
    # exactly our bytes, back to the mailbox, with its own Message-ID (ours)
    raw = next(x["raw"] for x in gateway.sink.messages if x["msg"]["Message-ID"] == ack["Message-ID"])
    from conftest import smtp_send
    for _ in range(3):                              # a loop would have grown with each round
        assert smtp_send(gateway.port, raw, [SUPPORT], SUPPORT)[0] == 250
    settle(gateway)
    after = gateway.ticket(t["id"])
    assert after["status"] == "open"
    assert [m["kind"] for m in after["messages"] if m["direction"] == "in"] == ["customer", "auto"]
    assert len(gateway.sink.to(customer)) == 1 and len(gateway.sink.to(SUPPORT)) == 0
    assert len([x for x in gateway.sink.to(QUEUES["AMER"]) if key in str(x["Subject"])]) == notifies


def test_auto_reply_to_our_ack_is_recorded_on_the_ticket_and_changes_nothing(
        gateway: GatewayProc) -> None:
    key = uniq("vacation")
    customer = f"{uniq('away')}@customer.example"
    assert gateway.send(mail(customer, SUPPORT, key, "question"))[0] == 250
    t = gateway.ticket_by_subject(key)
    ack = gateway.sink.wait_to(customer)[0]
    ooo = reply_to(ack, customer, "I am out of the office until Monday.",
                   subject="Automatic reply: " + str(ack["Subject"]))
    ooo["Auto-Submitted"] = "auto-replied"
    assert gateway.send(ooo)[0] == 250
    settle(gateway)
    after = gateway.ticket(t["id"])
    assert [m["kind"] for m in after["messages"] if m["direction"] == "in"] == ["customer", "auto"]
    assert after["status"] == "open"
    assert len(gateway.sink.to(customer)) == 1


# -- per-sender cap on automatic answers ------------------------------------

def test_acks_per_sender_are_capped_per_hour_but_tickets_are_still_made(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml="[limits]\nauto_answers_per_sender_per_hour = 3\n")
    gw.start()
    flooder = f"{uniq('flood')}@customer.example"
    run = uniq("flood")
    for i in range(5):
        assert gw.send(mail(flooder, SUPPORT, f"{run} {i}", f"mail {i}"))[0] == 250
    other = f"{uniq('calm')}@customer.example"
    assert gw.send(mail(other, SUPPORT, uniq("calm"), "one mail"))[0] == 250
    mine = sorted((t for t in gw.tickets() if t["requester"] == flooder), key=lambda t: t["id"])
    assert len(mine) == 5                                        # every mail is a ticket
    acked = [any(m["kind"] == "ack" for m in gw.ticket(t["id"])["messages"]) for t in mine]
    assert acked == [True, True, True, False, False]
    gw.sink.wait_to(QUEUES["AMER"], count=6)                     # staff hear of all of them
    gw.sink.wait_to(other)
    settle(gw)
    assert len(gw.sink.to(flooder)) == 3
    suppressed = [e for e in gw.log_events() if e["event"] == "ticket.ack_suppressed"]
    assert [e["ticket_id"] for e in suppressed] == [t["id"] for t in mine[3:]]
    assert all(e["requester"] == flooder and e["limit"] == 3 for e in suppressed)


def test_ack_cap_window_slides_with_the_injected_clock() -> None:
    from gateway.app import open_gateway
    from gateway.config import parse as parse_config
    from gateway.desk.pipeline import Received

    async def scenario(data_dir: str) -> list[bool]:
        config = parse_config({"gateway": {"data_dir": data_dir},
                               "outbound": {"transport": "maildir"},
                               "limits": {"auto_answers_per_sender_per_hour": 2},
                               **pg.store_section()})
        t0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
        gw = await open_gateway(config, clock=lambda: t0)
        acked = []
        try:
            for i, minutes in enumerate((0, 10, 20, 59, 61, 75, 80)):
                m = mail("ann@customer.example", SUPPORT, f"clock {i}", "x")
                out = await gw.intake.receive(Received(
                    raw=m.as_bytes(), mail_from="ann@customer.example", rcpt_to=(SUPPORT,),
                    mailbox=config.mailboxes[0], received_at=t0 + timedelta(minutes=minutes)))
                assert out.action == "created"
                acked.append(any(x["kind"] == "ack" for x in await gw.store.messages(out.ticket_id)))
        finally:
            await gw.close()
        return acked

    with tempfile.TemporaryDirectory() as d:
        # acks at :00 and :10; :20 and :59 over the cap; :61 and :75 after the :00 and :10
        # acks left the hour; :80 over the cap again (:61 and :75 in the hour)
        assert asyncio.run(scenario(d)) == [True, True, False, False, True, True, False]


# -- staff authentication (RFC 8601) ----------------------------------------

TRUSTED = "mx.staff.example.com"


def test_authentication_results_are_read_per_rfc_8601() -> None:
    sid, results = parse('mx.staff.example.com 1; dkim=pass (good sig) header.d=staff.example.com'
                         ' header.s="sel;1"; spf=fail smtp.mailfrom=a@b.example; dmarc=pass'
                         ' (p=reject) header.from=staff.example.com')
    assert sid == "mx.staff.example.com"
    assert [(r.method, r.result) for r in results] == [("dkim", "pass"), ("spf", "fail"), ("dmarc", "pass")]
    assert results[0].props == {"header.d": "staff.example.com", "header.s": "sel;1"}
    assert parse("mx.example.com; none") == ("mx.example.com", [])
    assert aligned("mail.staff.example.com", "staff.example.com")
    assert aligned("example.com", "staff.example.com")
    assert not aligned("evil.example", "staff.example.com") and not aligned("com", "example.com")

    def ok(*headers: str, domain: str = "staff.example.com") -> bool:
        return verify(list(headers), from_domain=domain, trusted_ids=[TRUSTED]).authenticated
    assert ok(f"{TRUSTED}; dmarc=pass header.from=staff.example.com")
    assert ok(f"{TRUSTED}; dkim=pass header.d=staff.example.com")
    assert ok(f"{TRUSTED}; dkim=pass header.i=@staff.example.com")
    assert not ok(f"{TRUSTED}; spf=pass smtp.mailfrom=agent@staff.example.com")  # SPF is no proof
    assert not ok(f"{TRUSTED}; dmarc=pass")                     # a pass for which domain?
    assert not ok(f"{TRUSTED}; dmarc=pass header.from=example.com")  # another (parent) domain
    assert ok("MX.Staff.Example.COM; dkim=pass header.d=staff.example.com")   # ids are case-less
    assert not ok("mx.evil.example; dmarc=pass header.from=staff.example.com")  # untrusted server
    assert not ok(f"{TRUSTED}; dkim=pass header.d=evil.example")                # not aligned
    assert not ok(f"{TRUSTED}; spf=pass smtp.mailfrom=x@evil.example")
    assert not ok(f"{TRUSTED}; dmarc=pass header.from=other.example")
    assert not ok(f"{TRUSTED}; dkim=fail header.d=staff.example.com; spf=softfail")
    assert not ok(f"{TRUSTED}; dkim=pass header.d=staff.example.com",
                  f"{TRUSTED}; dmarc=fail header.from=staff.example.com")
    assert not ok()
    assert not ok(f"{TRUSTED}; dkim=pass (header.d=staff.example.com)")        # only a comment
    assert not ok(f"{TRUSTED} (dkim=pass header.d=staff.example.com)")
    verdict = verify(["mx.evil.example; dmarc=pass"], from_domain="staff.example.com",
                     trusted_ids=[TRUSTED])
    assert "no Authentication-Results from a trusted server" in verdict.reason


def _staff_answer(note: EmailMessage, body: str, auth: str | None) -> EmailMessage:
    m = reply_to(note, STAFF, body)
    if auth is not None:
        m["Authentication-Results"] = auth
    return m


def with_staff_keys(gw: GatewayProc, keys: str) -> GatewayProc:
    """Add keys to the [staff] table of the test config (TOML allows one [staff])."""
    text = gw.config.read_text()
    assert text.count("[staff]\n") == 1
    gw.config.write_text(text.replace("[staff]\n", "[staff]\n" + keys, 1))
    return gw


@pytest.fixture
def strict_gateway(make_gateway: Callable[..., GatewayProc]) -> GatewayProc:
    gw = with_staff_keys(make_gateway(), f'require_authenticated = true\n'
                                         f'trusted_authserv_ids = ["{TRUSTED}"]\n')
    gw.start()
    return gw


def test_unauthenticated_staff_mail_is_kept_as_a_note_not_relayed_and_the_agent_told(
        strict_gateway: GatewayProc) -> None:
    gw = strict_gateway
    key = uniq("strict")
    customer = f"{uniq('cust')}@customer.example"
    assert gw.send(mail(customer, SUPPORT, key, "question"))[0] == 250
    t = gw.ticket_by_subject(key)
    note = gw.sink.wait_to(QUEUES["AMER"])[0]
    forged = [None,                                                       # no header at all
              "mx.evil.example; dmarc=pass header.from=staff.example.com",  # untrusted server
              f"{TRUSTED}; dkim=pass header.d=evil.example; spf=fail"]       # not aligned
    for auth in forged:
        assert gw.send(_staff_answer(note, "#status resolved\nYour refund is approved.", auth))[0] == 250
    settle(gw)
    told = gw.sink.wait_to(STAFF)
    assert len(told) == 1                                 # once per ticket an hour, not per mail
    assert "did not prove" in told[0].get_body(("plain",)).get_content()
    assert f"[Support #{t['id']}]" in str(told[0]["Subject"]) and "refund" not in told[0].as_string()
    after = gw.ticket(t["id"])
    assert after["status"] == "open" and after["first_response_at"] is None
    assert [m["kind"] for m in after["messages"] if m["direction"] == "in"] == ["customer"] + ["note"] * 3
    assert len(gw.sink.to(customer)) == 1                 # the ack, nothing relayed
    assert "refund" not in gw.sink.to(customer)[0].as_string()
    assert len([e for e in gw.log_events() if e["event"] == "staff.unauthenticated"]) == 3


def test_authenticated_staff_mail_is_relayed(strict_gateway: GatewayProc) -> None:
    gw = strict_gateway
    key = uniq("strict ok")
    customer = f"{uniq('cust')}@customer.example"
    assert gw.send(mail(customer, SUPPORT, key, "question"))[0] == 250
    t = gw.ticket_by_subject(key)
    note = gw.sink.wait_to(QUEUES["AMER"])[0]
    auth = f"{TRUSTED}; dkim=pass header.d=staff.example.com; spf=fail smtp.mailfrom={STAFF}"
    assert gw.send(_staff_answer(note, "We restored your data.", auth))[0] == 250
    relayed = gw.sink.wait_to(customer, count=2)[1]
    assert "We restored your data." in relayed.get_body(("plain",)).get_content()
    after = gw.ticket(t["id"])
    assert after["status"] == "pending" and after["first_response_at"] is not None
    assert gw.sink.to(STAFF) == []


def test_require_authenticated_needs_a_trusted_authserv_id(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = with_staff_keys(make_gateway(), "require_authenticated = true\n")
    r = gw.cli("check-config")
    assert r.returncode == 78 and "staff.trusted_authserv_ids" in r.stderr
