"""How mail is read (project issue 15), against real `gateway serve` processes:
bounces per recipient (a real Postfix's DSN, a mixed report, no envelope
sender), staff told of bounces and of staff answers that did not go out,
duplicates by Message-ID plus content, inline text parts with a filename,
out-of-office by subject. The bounce reader's score on the sisimai corpus
is measured in-process (a pure function over the corpus's files)."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

import pytest
from conftest import GATEWAY, QUEUES, SUPPORT, GatewayProc, agent_reply, mail, needs_shared, smtp_send, uniq, wait_for
from test_faults import events_in
from test_postfix import Postfix, postfixes  # noqa: F401 - the fixture

from gateway.mail.bounce import read_bounce

CUSTOMER = "ann@customer.example"


def dsn(about: EmailMessage, *, failed: list[str], delayed: list[str] = (),  # type: ignore[assignment]
        frm: str = "MAILER-DAEMON@mx.customer.example") -> bytes:
    """An RFC 3464 report on `about` (our mail), one block per recipient."""
    blocks = "".join(
        f"\nFinal-Recipient: rfc822; {a}\nAction: failed\nStatus: 5.1.1\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{a}>: user unknown\n" for a in failed) + "".join(
        f"\nFinal-Recipient: rfc822; {a}\nAction: delayed\nStatus: 4.4.1\n"
        f"Diagnostic-Code: smtp; 421 4.4.1 connection timed out\n" for a in delayed)
    headers = "".join(f"{k}: {v}\n" for k, v in about.items())
    return textwrap.dedent(f"""\
        From: Mail Delivery System <{frm}>
        To: {SUPPORT}
        Subject: Delivery Status Notification
        Date: {formatdate()}
        Message-ID: {make_msgid(domain="mx.customer.example")}
        MIME-Version: 1.0
        Content-Type: multipart/report; report-type=delivery-status; boundary="B"

        --B
        Content-Type: text/plain

        Delivery to some recipients failed or is delayed.

        --B
        Content-Type: message/delivery-status

        Reporting-MTA: dns; mx.customer.example
        """).encode() + blocks.encode() + b"\n--B\nContent-Type: text/rfc822-headers\n\n" \
        + headers.encode() + b"\n--B--\n"


def ingest(gw: GatewayProc, raw: bytes) -> subprocess.CompletedProcess[bytes]:
    """`gateway ingest` with no envelope sender, as a pipe from a Maildir or fetchmail gives it."""
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    return subprocess.run([*GATEWAY, "ingest", "--config", str(gw.config), "--recipient", SUPPORT],
                          input=raw, capture_output=True, timeout=60, env=env, check=False)


def open_ticket(gw: GatewayProc, cc: str | None = None) -> tuple[dict[str, object], EmailMessage]:
    key = uniq("Backup fails")
    assert gw.send(mail(f"Ann <{CUSTOMER}>", SUPPORT, key, "Backup fails.", cc=cc))[0] == 250
    ack = gw.sink.wait_to(CUSTOMER)[0]
    return gw.ticket_by_subject(key), ack


def notices(gw: GatewayProc, tid: object) -> list[EmailMessage]:
    return [m for m in gw.sink.to(QUEUES["AMER"]) if f"#{tid}]" in str(m["Subject"])
            and "could not be delivered" in m.get_body(("plain",)).get_content()]


def test_a_mixed_report_without_envelope_sender_marks_only_the_failed_recipient(
        make_gateway: Callable[..., GatewayProc], workdir: Path) -> None:
    """A DSN for our ack with one recipient failed (5.1.1) and one only delayed
    (4.4.1), handed over by `ingest` with no envelope sender: recognised as a
    bounce, never answered; only the failed address is marked; the queue is told;
    `explain --json` shows the same reading."""
    gw = make_gateway()
    gw.start()
    t, ack = open_ticket(gw, cc="boss@customer.example")
    report = dsn(ack, failed=[CUSTOMER], delayed=["boss@customer.example"])
    r = ingest(gw, report)
    assert r.returncode == 0, r.stderr
    shown = gw.ticket(int(t["id"]))  # type: ignore[call-overload]
    assert shown["undeliverable"] == [CUSTOMER]
    assert [m["kind"] for m in shown["messages"]][-2:] == ["bounce", "staff_notify"]     # + the notice
    assert wait_for(lambda: notices(gw, t["id"]), 15, "the queue's notice")
    assert not gw.sink.to("mailer-daemon@mx.customer.example")
    (path := workdir / "dsn.eml").write_bytes(report)
    out = json.loads(gw.cli("explain", str(path), "--json").stdout)
    assert out["automatic"] == "bounce"
    assert out["bounce"] == {"failed": [CUSTOMER], "delayed": ["boss@customer.example"]}


def test_a_real_postfix_bounce_marks_the_customer_and_tells_the_queue(
        make_gateway: Callable[..., GatewayProc], postfixes: list[Postfix]) -> None:  # noqa: F811
    """The gateway behind and in front of a real Postfix: the customer's mail comes
    in over LMTP, our acknowledgement goes out through Postfix, which cannot
    deliver it (`error:5.7.0`) and sends its own DSN back to the mailbox. The
    customer's address is marked undeliverable and the queue (reached through
    Postfix too) gets a short notice."""
    gw = make_gateway(lmtp=True)
    pf = Postfix(f"lmtp:inet:127.0.0.1:{gw.port}")
    postfixes.append(pf)
    main_cf = pf.etc / "main.cf"
    cf = main_cf.read_text().replace(
        "transport_maps = inline:{ ", f"transport_maps = inline:{{ staff.example.com=smtp:[127.0.0.1]:{gw.sink.port}, ")
    main_cf.write_text(cf)
    past = os.path.getmtime(pf.etc / "master.cf")
    os.utime(main_cf, (past, past))
    gw.config.write_text(gw.config.read_text().replace(f"port = {gw.sink.port}\n", f"port = {pf.port}\n", 1))
    gw.start()
    pf.start()
    key = uniq("Backup fails via Postfix")
    assert smtp_send(pf.port, mail(f"Ann <{CUSTOMER}>", SUPPORT, key, "It fails."))[0] == 250
    t = wait_for(lambda: [x for x in gw.tickets() if x["subject"] == key], 30, "the ticket")[0]
    wait_for(lambda: gw.ticket(t["id"])["undeliverable"] == [CUSTOMER], 60, "the DSN read")
    note = wait_for(lambda: notices(gw, t["id"]), 60, "the queue's notice through Postfix")[0]
    text = note.get_body(("plain",)).get_content()
    assert CUSTOMER in text and "No more mail" in text
    bounce = [m for m in gw.ticket(t["id"])["messages"] if m["kind"] == "bounce"]
    assert bounce and "5.7.0" in bounce[0]["body_text"]


def test_a_staff_answer_the_relay_refuses_is_told_to_the_queue(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    gw.start()
    t, _ = open_ticket(gw)
    note = [m for m in gw.sink.wait_to(QUEUES["AMER"]) if f"#{t['id']}]" in str(m["Subject"])][-1]
    gw.sink.refuse_to[CUSTOMER] = "554 5.7.1 message refused"
    assert gw.send(agent_reply(note, "Please run the backup again."))[0] == 250
    wait_for(lambda: events_in(gw.log_text(), "outbox.failed"), 15, "the refusal")
    told = wait_for(lambda: notices(gw, t["id"]), 15, "the queue's notice")[0]
    assert "staff answer" in told.get_body(("plain",)).get_content()


def test_the_same_message_id_with_other_content_is_another_mail(
        make_gateway: Callable[..., GatewayProc]) -> None:
    """A stranger sends first with the customer's Message-ID: the customer's mail
    still makes its ticket and gets its ack (the clash logged). The customer's
    MTA retrying, or the same mail again with another trace header, is one mail."""
    gw = make_gateway()
    gw.start()
    msgid = make_msgid(domain="customer.example")
    stranger = mail("mal@evil.example", SUPPORT, uniq("first"), "I was here first.", msgid=msgid)
    assert gw.send(stranger)[0] == 250
    key = uniq("real")
    real = mail(f"Ann <{CUSTOMER}>", SUPPORT, key, "My real question.", msgid=msgid)
    assert gw.send(real)[0] == 250
    assert gw.ticket_by_subject(key)
    assert gw.sink.wait_to(CUSTOMER)
    assert events_in(gw.log_text(), "mail.message_id_reused")[0]["message_id"] == msgid
    again = real.as_bytes()
    assert gw.send(again, [SUPPORT], CUSTOMER)[0] == 250
    assert gw.send(b"Received: from relay2.example by mx\r\n" + again, [SUPPORT], CUSTOMER)[0] == 250
    assert len([x for x in gw.tickets() if key in x["subject"]]) == 1
    done = [e for e in events_in(gw.log_text(), "mail.processed") if e["message_id"] == msgid]
    assert [e["action"] for e in done] == ["created", "created", "duplicate", "duplicate"]


def test_an_inline_text_part_with_a_filename_is_the_body(gateway: GatewayProc) -> None:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = CUSTOMER, SUPPORT, uniq("phone")
    m["Date"], m["Message-ID"] = formatdate(), make_msgid(domain="customer.example")
    m.set_content("The backup fails with 0x80040115.\n", disposition="inline", filename="note.txt")
    assert gateway.send(m)[0] == 250
    t = gateway.ticket_by_subject(str(m["Subject"]))
    assert "0x80040115" in t["messages"][0]["body_text"]


@pytest.mark.parametrize("subject", ["Out of Office", "Abwesenheitsnotiz: Ihre Anfrage",
                                     "Réponse automatique : absent", "Respuesta automática: Re: x",
                                     "Risposta automatica: Re: x", "Automatisch antwoord: Re: x",
                                     "自動返信：お問い合わせ"])
def test_out_of_office_by_subject_alone_gets_no_ticket_and_no_ack(gateway: GatewayProc, subject: str) -> None:
    who = f"{uniq('away')}@customer.example"
    assert gateway.send(mail(who, SUPPORT, subject, "I am away until Monday."))[0] == 250
    assert events_in(gateway.log_text(), "mail.processed")[-1]["action"] == "automatic"
    # a person's mail right after is answered: the ack below proves the one above got none
    assert gateway.send(mail(who, SUPPORT, "Out of office next week: backup question", "Hi"))[0] == 250
    assert len(gateway.sink.wait_to(who)) == 1


def test_bounce_reader_on_the_sisimai_corpus() -> None:
    """≥ 90 % exact failed-recipient counts on sisimai's permanent bounces, and no
    delayed-only report marks anyone beyond the one the corpus disputes. (sisimai's
    expectations give per recipient its status, not its address: the count of
    permanent failures per mail is compared, see the note in issue 15.)"""
    corpus = needs_shared("corpus/sisimai", "the shared mail corpus (sisimai's bounces)")
    expected = json.loads((corpus / "expected.json").read_text())
    exact = total = delayed_marked = 0
    for name, exp in expected.items():
        if name.startswith("_"):
            continue
        rows = [r for r in exp["recipients"] if r["reason"] not in ("vacation", "feedback", "delivered")]
        failed = sum(1 for r in rows if r["deliverystatus"].startswith("5")
                     or (not r["deliverystatus"] and r["replycode"].startswith("5")))
        delayed = sum(1 for r in rows if r["deliverystatus"].startswith("4"))
        report = read_bounce((corpus / name).read_bytes())
        if failed:
            total += 1
            exact += len(report.failed) == failed
        elif delayed and report.failed:
            delayed_marked += 1
    print(f"\nsisimai: {exact}/{total} exact ({exact / total:.1%}); delayed-only marked: {delayed_marked}")
    assert exact / total >= 0.90
    assert delayed_marked <= 1     # lhost-sendmail-56: "554 5.0.0" and "permanent fatal errors" in its text

