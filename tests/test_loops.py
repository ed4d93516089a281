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
from conftest import settle as settle_sink

from gateway.mail.authres import aligned, parse, verify


def processed(gw: GatewayProc, message_id: str) -> dict:
    """The `mail.processed` log event of one mail (waits for it)."""
    return wait_for(lambda: next((e for e in gw.log_events() if e["event"] == "mail.processed"
                                  and e["message_id"] == message_id), None),
                    what=f"mail.processed for {message_id}")


def settle(gw: GatewayProc) -> None:
    """conftest.settle, and the outbox is empty: nothing queued is still to go."""
    settle_sink(gw)
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


def test_the_caps_read_per_minute_counters_not_the_senders_history() -> None:
    """Issue 21: the cost of judging a mail against the caps must not grow with
    what the sender already sent. 40 new tickets in two minutes leave two
    counter rows per minute (mailbox and domain), whatever their number; the
    caps are judged right from them; the scheduler drops counters past two hours."""
    from gateway.app import open_gateway
    from gateway.config import parse as parse_config
    from gateway.desk.pipeline import Received

    async def scenario(data_dir: str) -> tuple[list[tuple[str, str, int, int]], int, list[str], int]:
        config = parse_config({"gateway": {"data_dir": data_dir},
                               "outbound": {"transport": "maildir"},
                               "limits": {"auto_answers_per_sender_per_hour": 5,
                                          "new_tickets_per_sender_per_hour": 1000},
                               **pg.store_section()})
        t0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=3)
        gw = await open_gateway(config, clock=lambda: t0)
        try:
            acks = 0
            for i in range(40):
                m = mail("bob@busy.example", SUPPORT, f"history {i}", "x")
                out = await gw.intake.receive(Received(
                    raw=m.as_bytes(), mail_from="bob@busy.example", rcpt_to=(SUPPORT,),
                    mailbox=config.mailboxes[0], received_at=t0 + timedelta(seconds=3 * i)))
                acks += any(x["kind"] == "ack" for x in await gw.store.messages(out.ticket_id))
            rows = await gw.store.db.fetch("SELECT scope, minute, tickets, answers FROM sender_load"
                                           " ORDER BY scope, minute")
            await gw.scheduler.run_due(datetime.now(UTC))
            left = await gw.store.db.fetch("SELECT minute FROM sender_load")
            # counted again from mail of now: nothing of three hours ago is in the hour
            m = mail("bob@busy.example", SUPPORT, "history now", "x")
            out = await gw.intake.receive(Received(
                raw=m.as_bytes(), mail_from="bob@busy.example", rcpt_to=(SUPPORT,),
                mailbox=config.mailboxes[0], received_at=datetime.now(UTC)))
            acked_now = sum(x["kind"] == "ack" for x in await gw.store.messages(out.ticket_id))
        finally:
            await gw.close()
        return [tuple(r) for r in rows], acks, [str(r[0]) for r in left], acked_now

    with tempfile.TemporaryDirectory() as d:
        rows, acks, left, acked_now = asyncio.run(scenario(d))
    assert acks == 5
    assert [(scope, tickets, answers) for scope, _, tickets, answers in rows] == [
        ("domain:busy.example", 20, 5), ("domain:busy.example", 20, 0),
        ("mailbox:bob@busy.example", 20, 5), ("mailbox:bob@busy.example", 20, 0)]
    assert left == [] and acked_now == 1


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


# -- loops with other automata (issue 14) -------------------------------------

FOREIGN = "foreign.example"


class ForeignHelpdesk:
    """A naive helpdesk at `foreign.example` (project issue 14, attack 5).

    It reads the relay sink the gateway delivers to and answers every mail
    that reaches one of its addresses: a new ticket N per mail, answered from
    `help+N@foreign.example`, quoting the subject, with no RFC 3834 header
    (and, with `references=True`, In-Reply-To/References to our mail, as many
    do; `address` chooses how its reply address is spelt). It runs in a thread
    until stopped, or until `max_rounds` answers (a runaway loop fails the test
    instead of running forever).
    """

    def __init__(self, gw: GatewayProc, *, references: bool = False,
                 address: Callable[[int], str] = lambda n: f"help+{n}@{FOREIGN}", max_rounds: int = 40):
        self.gw, self.references, self.address, self.max_rounds = gw, references, address, max_rounds
        self.received: list[EmailMessage] = []      # mails of the gateway that reached the helpdesk
        self.sent: list[EmailMessage] = []          # its answers (and its first mail)
        self.seen = 0
        self.stop = False
        self.errors: list[BaseException] = []
        import threading
        self.thread = threading.Thread(target=self._run, daemon=True)

    def first(self, subject: str) -> None:
        """The helpdesk writes first (a notification it sends to a customer list that has us on it)."""
        self._send(mail(self.address(1), SUPPORT, subject, "Your request #1 was received."))
        self.thread.start()

    def _send(self, m: EmailMessage) -> None:
        assert self.gw.send(m)[0] == 250
        self.sent.append(m)

    def _run(self) -> None:
        try:
            self._answer_all()
        except BaseException as e:  # noqa: BLE001 - the test fails on it, not the thread silently
            self.errors.append(e)

    def _answer_all(self) -> None:
        import time
        while not self.stop:
            with self.gw.sink.lock:
                new = self.gw.sink.messages[self.seen:]
                self.seen += len(new)
            for x in new:
                if not any(r.endswith("@" + FOREIGN) for r in x["rcpt"]) or any(
                        r.startswith("person") for r in x["rcpt"]):
                    continue
                self.received.append(x["msg"])
                if len(self.sent) >= self.max_rounds:
                    continue
                n = len(self.sent) + 1
                ours = x["msg"]
                subject = " ".join(str(ours["Subject"]).split())
                answer = mail(self.address(n), SUPPORT, f"[Foreign #{n}] Re: {subject}",
                              f"Thank you, your request #{n} was received.\n\n> "
                              + ours.get_body(("plain",)).get_content()[:200].replace("\n", "\n> "))
                if self.references:
                    answer["In-Reply-To"] = str(ours["Message-ID"])
                    answer["References"] = str(ours["Message-ID"])
                self._send(answer)
            time.sleep(0.01)            # a poller's pace; the test waits on conditions, not on this

    def quiet(self) -> bool:
        """Nothing in flight: every answer processed, the outbox empty, every delivery answered."""
        events = [e for e in self.gw.log_events() if e["event"] == "mail.processed"]
        done = {e["message_id"] for e in events}
        queued = self.gw.query("SELECT count(*) FROM outbox WHERE state = 'queued'")[0][0]
        with self.gw.sink.lock:
            delivered = len(self.gw.sink.messages)
        answered = len(self.sent) == 1 + len(self.received) or len(self.sent) >= self.max_rounds
        return bool(self.errors) or (all(str(m["Message-ID"]) in done for m in self.sent) and queued == 0
                                     and self.seen == delivered and answered)

    def run_until_quiet(self) -> int:
        """Wait until the exchange ended by itself; the number of mails exchanged."""
        wait_for(lambda: self.quiet() and self.quiet(), timeout=120, what="the loop to end by itself")
        self.stop = True
        self.thread.join(10)
        assert not self.errors, self.errors
        return len(self.sent) + len(self.received)


HELPDESKS = [
    ("help+N, subject only", {}),
    ("help+N with References", {"references": True}),
    ("ticket-N, subject only", {"address": lambda n: f"ticket-{n}@{FOREIGN}"}),
    ("ticket-N with References", {"references": True, "address": lambda n: f"ticket-{n}@{FOREIGN}"}),
]


@pytest.mark.parametrize("name,kwargs", HELPDESKS, ids=[h[0] for h in HELPDESKS])
def test_naive_foreign_helpdesk_loop_ends_by_itself_and_a_person_there_is_still_answered(
        gateway: GatewayProc, name: str, kwargs: dict) -> None:
    desk = ForeignHelpdesk(gateway, **kwargs)
    key = uniq("outage notice")
    desk.first(key)
    # meanwhile a person at that domain writes to support, twice
    person = f"person-{uniq('carol')}@{FOREIGN}"
    assert gateway.send(mail(person, SUPPORT, uniq("question"), "Hello, my backup fails."))[0] == 250
    exchanged = desk.run_until_quiet()
    assert exchanged <= 20, f"{exchanged} mails exchanged with the foreign helpdesk"
    assert len(desk.sent) < desk.max_rounds
    assert len(gateway.sink.to(person)) == 1 and gateway.sink.to(person)[0]["Subject"]   # the ack
    loop_tickets = [t for t in gateway.tickets() if t["requester"].endswith("@" + FOREIGN)
                    and not t["requester"].startswith("person")]
    assert 1 <= len(loop_tickets) <= 2
    assert all(t["status"] == "open" for t in loop_tickets)
    staff = [m for m in gateway.sink.to(QUEUES["AMER"]) if key in str(m["Subject"])]
    assert len(staff) <= 3


def test_fifteen_subaddresses_get_at_most_the_cap_of_acks_and_staff_are_told(gateway: GatewayProc) -> None:
    run = uniq("victim")
    for i in range(1, 16):
        assert gateway.send(mail(f"Victim+{i}@victims.example", SUPPORT, f"{run} {i}", f"mail {i}"))[0] == 250
    mine = sorted((t for t in gateway.tickets() if run in t["subject"]), key=lambda t: t["id"])
    assert len(mine) == 15                                           # every mail is a ticket
    notes = gateway.sink.wait_to(QUEUES["AMER"], count=15)
    settle(gateway)
    acks = [x for x in gateway.sink.messages if any(r.startswith("victim+") for r in x["rcpt"])]
    assert len(acks) == 10                                           # [limits] default: 10 an hour
    told = [m for m in notes if run in str(m["Subject"])
            and "no acknowledgement" in m.get_body(("plain",)).get_content()]
    assert len(told) == 5
    suppressed = [e for e in gateway.log_events() if e["event"] == "ticket.ack_suppressed"
                  and e["requester"].startswith("victim+")]
    assert len(suppressed) == 5 and all(e["scope"] == "sender" and e["limit"] == 10 for e in suppressed)


def test_domain_cap_and_new_ticket_cap(make_gateway: Callable[..., GatewayProc]) -> None:
    from conftest import free_port
    from test_metrics import get, series
    port = free_port()
    gw = make_gateway(extra_toml="[limits]\nauto_answers_per_domain_per_hour = 3\n"
                                 "new_tickets_per_sender_per_hour = 2\n"
                                 f"[metrics]\nenabled = true\nport = {port}\n")
    gw.start()
    run = uniq("busy")
    for i in range(5):                        # five people of one domain: three acks
        assert gw.send(mail(f"p{i}@busy.example", SUPPORT, f"{run} {i}", "x"))[0] == 250
    other = f"{uniq('calm')}@calm.example"    # another domain is not affected
    assert gw.send(mail(other, SUPPORT, uniq("calm"), "one mail"))[0] == 250
    gw.sink.wait_to(other)
    settle(gw)
    assert sum(len(gw.sink.to(f"p{i}@busy.example")) for i in range(5)) == 3
    assert len([t for t in gw.tickets() if run in t["subject"]]) == 5
    assert [e["scope"] for e in gw.log_events() if e["event"] == "ticket.ack_suppressed"] == ["domain"] * 2
    # the third new ticket of one mailbox in the hour is held in quarantine, with the reason
    robot = f"robot@{uniq('robots')}.example"
    first = mail(robot, SUPPORT, uniq("r1"), "x")
    for m in (first, mail(robot.replace("robot@", "Robot+2@"), SUPPORT, uniq("r2"), "x"),
              mail(robot, SUPPORT, uniq("r3"), "x")):
        assert gw.send(m)[0] == 250
    assert processed(gw, str(m["Message-ID"]))["action"] == "quarantined"
    held = json.loads(gw.cli("quarantine", "list", "--json").stdout)
    assert [h["message_id"] for h in held] == [str(m["Message-ID"])]
    assert "new_tickets_per_sender_per_hour" in held[0]["error"]
    limited = [e for e in gw.log_events() if e["event"] == "ticket.rate_limited"]
    assert len(limited) == 1 and limited[0]["scope"] == "sender"
    counted = series(get(port, "/metrics")[1], "gateway_loop_guard_total")
    assert counted == {'gateway_loop_guard_total{action="ack_suppressed",scope="domain"}': 2.0,
                       'gateway_loop_guard_total{action="ticket_held",scope="sender"}': 1.0}, counted
    # a reply to one of its tickets still joins
    ack = gw.sink.wait_to(robot)[0]
    assert gw.send(reply_to(ack, robot, "more detail"))[0] == 250
    t = gw.ticket_by_subject(str(first["Subject"]))
    wait_for(lambda: len(gw.ticket(t["id"])["messages"]) >= 4, what="the reply on the ticket")
    assert [m["kind"] for m in gw.ticket(t["id"])["messages"] if m["direction"] == "in"] == ["customer"] * 2


def test_a_stranger_quoting_our_mail_is_automatic_and_changes_no_status(gateway: GatewayProc) -> None:
    from conftest import agent_reply
    key = uniq("quoted")
    customer = f"{uniq('cust')}@customer.example"
    assert gateway.send(mail(customer, SUPPORT, key, "question"))[0] == 250
    t = gateway.ticket_by_subject(key)
    ack = gateway.sink.wait_to(customer)[0]
    note = next(m for m in gateway.sink.wait_to(QUEUES["AMER"]) if key in str(m["Subject"]))
    assert gateway.send(agent_reply(note, "Please send the log."))[0] == 250
    wait_for(lambda: gateway.ticket(t["id"])["status"] == "pending", what="the ticket pending")
    answer = gateway.sink.wait_to(customer, count=2)[1]
    # an autoresponder we never wrote to, answering our mail (References)
    by_ref = reply_to(answer, "tickets@stranger.example", "Your request was received.")
    # another quoting our Message-ID in its body only (it attached our headers)
    in_body = mail("noticeboard@stranger2.example", SUPPORT, "Fwd: " + str(ack["Subject"]),
                   f"Original message:\nMessage-ID: {ack['Message-ID']}\nSubject: {ack['Subject']}\n")
    for m in (by_ref, in_body):
        assert gateway.send(m)[0] == 250
        out = processed(gateway, str(m["Message-ID"]))
        assert out["action"] == "joined" and out["ticket_id"] == t["id"], out
        assert "not on the ticket" in out["reason"]
    settle(gateway)
    after = gateway.ticket(t["id"])
    assert after["status"] == "pending"
    assert [m["kind"] for m in after["messages"] if m["direction"] == "in"][-2:] == ["auto", "auto"]
    assert gateway.sink.to("tickets@stranger.example") == [] and gateway.sink.to("noticeboard@stranger2.example") == []
    assert len([e for e in gateway.log_events() if e["event"] == "ticket.stranger_answer"]) == 2
    # the customer's own answer still counts, and sets it open
    assert gateway.send(reply_to(answer, customer, "Here is the log."))[0] == 250
    wait_for(lambda: gateway.ticket(t["id"])["status"] == "open", what="the customer's reply to open it")
