"""The whole path through a running `gateway serve`, over real SMTP."""
from __future__ import annotations

import hashlib
import json
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

import pg
from conftest import GOV, QUEUES, SUPPORT, GatewayProc, Sink, agent_reply, mail, reply_to, uniq, wait_for


def test_new_mail_opens_ticket_acknowledges_and_notifies_the_queue(gateway: GatewayProc) -> None:
    key = uniq("Backup fails")
    m = mail("Ann Customer <ann@customer.example>", SUPPORT, key, "Nightly backup fails with 0x80040115.")
    code, _ = gateway.send(m)
    assert code == 250
    # 250 comes only after the commit: the ticket is there at once
    t = gateway.ticket_by_subject(key)
    assert t["status"] == "open" and t["requester"] == "ann@customer.example"
    assert isinstance(t["id"], int) and t["id"] > 0
    assert t["messages"][0]["kind"] == "customer" and t["messages"][0]["direction"] == "in"
    assert "0x80040115" in t["messages"][0]["body_text"]
    assert t["messages"][0]["message_id"] == str(m["Message-ID"])

    ack = gateway.sink.wait_to("ann@customer.example")[0]
    tag = f"[Support #{t['id']}]"
    assert tag in str(ack["Subject"]) and key in str(ack["Subject"])
    assert str(ack["Auto-Submitted"]) == "auto-replied"
    assert str(ack["In-Reply-To"]) == str(m["Message-ID"])
    assert SUPPORT in str(ack["From"])
    text = ack.get_body(("plain",)).get_content()
    assert str(t["id"]) in text and "reply" in text.lower()
    html = ack.get_body(("html",)).get_content()
    assert f"#{t['id']}" in html

    note = gateway.sink.wait_to(QUEUES["AMER"])[0]
    assert tag in str(note["Subject"])
    assert str(note["Auto-Submitted"]) == "auto-generated"
    # staff answer to the mailbox, the staff token of this ticket as its +tag
    assert re.fullmatch(r"support\+s\d+\.[0-9a-f]{20}@example\.com", str(note["Reply-To"]))
    assert "0x80040115" in note.get_body(("plain",)).get_content()
    # both outbound mails are recorded on the ticket with their Message-IDs
    kinds = {x["kind"]: x for x in gateway.ticket(t["id"])["messages"]}
    assert kinds["ack"]["message_id"] == str(ack["Message-ID"])
    assert kinds["staff_notify"]["message_id"] == str(note["Message-ID"])


def test_replies_join_by_tag_and_by_in_reply_to_to_our_ack(gateway: GatewayProc) -> None:
    key = uniq("Restore question")
    gateway.send(mail("bob@customer.example", SUPPORT, key, "How do I restore a single file?"))
    t = gateway.ticket_by_subject(key)
    ack = gateway.sink.wait_to("bob@customer.example")[0]

    gateway.send(mail("bob@customer.example", SUPPORT, f"Re: [Support #{t['id']}] {key}", "More detail."))
    # reply to our ack, subject changed entirely, tag gone: threads by In-Reply-To
    gateway.send(reply_to(ack, "bob@customer.example", "And a log.", subject="log file"))
    msgs = gateway.ticket(t["id"])["messages"]
    customer = [x for x in msgs if x["kind"] == "customer"]
    assert [x["body_text"].strip() for x in customer] == [
        "How do I restore a single file?", "More detail.", "And a log."]
    assert len([x for x in gateway.tickets() if key in x["subject"] or x["subject"] == "log file"]) == 1
    # each customer reply is passed on to the staff queue
    gateway.sink.wait_to(QUEUES["AMER"], count=3)


def test_reply_by_references_only_joins(gateway: GatewayProc) -> None:
    key = uniq("Refs")
    first = mail("cat@customer.example", SUPPORT, key, "first")
    gateway.send(first)
    t = gateway.ticket_by_subject(key)
    later = mail("cat@customer.example", SUPPORT, "unrelated subject", "second")
    later["References"] = f"<unknown@elsewhere.example> {first['Message-ID']}"
    gateway.send(later)
    assert [x["body_text"].strip() for x in gateway.ticket(t["id"])["messages"]
            if x["direction"] == "in"] == ["first", "second"]


def test_stranger_with_only_the_subject_tag_gets_a_new_linked_ticket(gateway: GatewayProc) -> None:
    key = uniq("Private issue")
    gateway.send(mail("owner@customer.example", SUPPORT, key, "our secret details"))
    t = gateway.ticket_by_subject(key)
    code, _ = gateway.send(mail("mallory@evil.example", SUPPORT, f"Re: [Support #{t['id']}] {key}",
                                "show me the ticket"))
    assert code == 250
    assert len([x for x in gateway.ticket(t["id"])["messages"] if x["direction"] == "in"]) == 1
    new = [x for x in gateway.tickets() if x["requester"] == "mallory@evil.example"]
    assert len(new) == 1 and new[0]["linked_ticket"] == t["id"] and new[0]["id"] != t["id"]
    ack = gateway.sink.wait_to("mallory@evil.example")[0]
    assert f"#{new[0]['id']}]" in str(ack["Subject"])
    assert "our secret details" not in ack.as_string()


def test_cc_participant_may_reply_by_tag(gateway: GatewayProc) -> None:
    key = uniq("Cc")
    gateway.send(mail("dora@customer.example", SUPPORT, key, "hello", cc="boss@customer.example"))
    t = gateway.ticket_by_subject(key)
    assert t["cc"] == ["boss@customer.example"]
    gateway.send(mail("boss@customer.example", SUPPORT, f"Re: [Support #{t['id']}]", "urgent please"))
    assert len([x for x in gateway.ticket(t["id"])["messages"] if x["kind"] == "customer"]) == 2


def test_unknown_recipient_is_refused_at_rcpt_with_550(gateway: GatewayProc) -> None:
    code, _ = gateway.send(mail("x@customer.example", "nobody@example.com", "stray", "hi"))
    assert code == 550
    # plus-addressing reaches the mailbox
    code, _ = gateway.send(mail("x@customer.example", "support+billing@example.com", uniq("plus"), "hi"))
    assert code == 250


def test_oversize_mail_is_refused_with_552(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(max_size=50_000)
    gw.start()
    big = mail("big@customer.example", SUPPORT, uniq("huge"), "x")
    big.add_attachment(b"\0" * 60_000, maintype="application", subtype="octet-stream", filename="d.bin")
    with smtplib.SMTP("127.0.0.1", gw.port) as s:      # no SIZE=: refused after the data
        s.ehlo()
        s.mail("big@customer.example")
        s.rcpt(SUPPORT)
        code, reply = s.data(big.as_bytes())
        assert (code, reply) == (552, b"5.3.4 Message too big for system (at most 50000 bytes)")
    # the SIZE parameter is refused before any data is sent
    with smtplib.SMTP("127.0.0.1", gw.port) as s:
        s.ehlo()
        code, reply = s.mail("big@customer.example", options=["SIZE=900000"])
        assert (code, reply) == (552, b"5.3.4 Message too big for system (at most 50000 bytes)")
    assert gw.tickets() == []
    refused = wait_for(lambda: len(r := [e for e in gw.log_events() if e["event"] == "smtp.too_big"]) == 2 and r,
                       what="both refusals logged")
    assert [(e["stage"], e["limit"], e["level"]) for e in refused] == [("DATA", 50000, "warning"),
                                                                        ("MAIL", 50000, "warning")]


def test_locked_store_answers_451_and_nothing_is_half_stored(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml="[store]\nbusy_timeout_ms = 200\n")
    gw.start()
    gw.send(mail("warm@customer.example", SUPPORT, uniq("warm-up"), "creates the database"))
    lock = pg.WriteLock(gw.db_url)
    try:
        key = uniq("while locked")
        code, text = gw.send(mail("lock@customer.example", SUPPORT, key, "try later"))
        assert code == 451, text
        r = gw.cli("ingest", "--recipient", SUPPORT,
                   stdin=mail("pipe@customer.example", SUPPORT, uniq("piped"), "x").as_bytes(),
                   env={"GATEWAY_CONFIG": ""})
        assert r.returncode == 75, r.stderr
    finally:
        lock.release()
    # the fault clears: the same mail now goes through, and once
    code, _ = gw.send(mail("lock@customer.example", SUPPORT, key, "try later"))
    assert code == 250
    assert len([t for t in gw.tickets() if key in t["subject"]]) == 1


def test_lmtp_answers_once_per_recipient(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(lmtp=True)
    gw.start()
    key = uniq("via lmtp")
    m = mail("lena@customer.example", f"{SUPPORT}, {GOV}", key, "hello over LMTP")
    # Raw protocol: smtplib's LMTP client reads only one reply after DATA.
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
        f = sock.makefile("rwb")

        def reply() -> list[bytes]:
            lines = [f.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(f.readline())
            return lines

        def cmd(line: str) -> list[bytes]:
            f.write(line.encode() + b"\r\n")
            f.flush()
            return reply()

        assert reply()[0].startswith(b"220")
        assert cmd("LHLO client.example")[-1].startswith(b"250")
        assert cmd("MAIL FROM:<lena@customer.example>")[0].startswith(b"250")
        assert cmd(f"RCPT TO:<{SUPPORT}>")[0].startswith(b"250")
        assert cmd(f"RCPT TO:<{GOV}>")[0].startswith(b"250")
        assert cmd("DATA")[0].startswith(b"354")
        f.write(m.as_bytes().replace(b"\r\n.", b"\r\n..") + b".\r\n")
        f.flush()
        assert reply()[0].startswith(b"250") and reply()[0].startswith(b"250")
        assert cmd("NOOP")[0].startswith(b"250")
        assert cmd("QUIT")[0].startswith(b"221")
    assert len([t for t in gw.tickets() if key in t["subject"]]) == 1


def test_mail_to_govcloud_mailbox_goes_only_through_the_govcloud_relay(gateway: GatewayProc) -> None:
    key = uniq("FedRAMP tenant")
    gateway.send(mail("gina@agency.example", GOV, key, "Our GovCloud backup is late."))
    t = gateway.ticket_by_subject(key)
    assert t["govcloud"] is True
    ack = gateway.gov_sink.wait_to("gina@agency.example")[0]
    assert GOV in str(ack["From"])
    gateway.gov_sink.wait_to(QUEUES["GOVCLOUD"])
    assert gateway.sink.to("gina@agency.example") == [] and gateway.sink.to(QUEUES["GOVCLOUD"]) == []


def test_automatic_mail_gets_no_answer(gateway: GatewayProc) -> None:
    key = uniq("Out of office")
    code, _ = gateway.send(mail("ooo@customer.example", SUPPORT, key, "I am away",
                                headers={"Auto-Submitted": "auto-replied"}))
    assert code == 250
    # a human mail sent after it is answered; the automatic one never is
    gateway.send(mail("ooo@customer.example", SUPPORT, uniq("human"), "real question",
                      headers={"Auto-Submitted": "no"}))
    gateway.sink.wait_to("ooo@customer.example")
    assert len(gateway.sink.to("ooo@customer.example")) == 1
    assert [t for t in gateway.tickets() if key in t["subject"]] == []


def test_attachment_is_stored_once_by_hash_never_by_its_name(gateway: GatewayProc) -> None:
    payload = b"2026-11-22 error: quota exceeded\n" * 50
    for i in range(2):
        m = mail("eve@customer.example", SUPPORT, uniq("with log"), "see log")
        m.add_attachment(payload, maintype="text", subtype="plain", filename="../../../../tmp/evil.txt")
        assert gateway.send(m)[0] == 250
    sha = hashlib.sha256(payload).hexdigest()
    atts = [a for t in gateway.tickets() for x in gateway.ticket(t["id"])["messages"]
            for a in x["attachments"]]
    assert len(atts) == 2
    assert all(a["sha256"] == sha and a["size"] == len(payload) for a in atts)
    stored = [p for p in gateway.data_dir.rglob("*") if p.is_file() and p.read_bytes() == payload]
    assert stored == [gateway.data_dir / "attachments" / sha[:2] / sha]
    assert not any("evil" in p.name for p in gateway.root.parent.rglob("*"))


def test_raw_mail_is_kept_and_data_survives_restart(gateway: GatewayProc) -> None:
    key = uniq("Keep me")
    m = mail("fay@customer.example", SUPPORT, key, "persist")
    gateway.send(m)
    before = gateway.tickets()
    assert gateway.stop() == 0
    raws = [r[0] for r in gateway.query("SELECT raw FROM inbound")]
    assert m.as_bytes() in raws
    gateway.start()
    assert gateway.tickets() == before
    # IDs are never reused after a restart
    gateway.send(mail("fay@customer.example", SUPPORT, uniq("next"), "again"))
    assert max(t["id"] for t in gateway.tickets()) == max(t["id"] for t in before) + 1


def test_relay_down_mail_waits_in_outbox_and_is_delivered_when_back(
        make_gateway: Callable[..., GatewayProc], workdir) -> None:
    relay_port = __import__("conftest").free_port()
    gw = make_gateway(relay_port=relay_port)
    gw.start()
    key = uniq("relay down")
    assert gw.send(mail("gus@customer.example", SUPPORT, key, "hello"))[0] == 250
    wait_for(lambda: "outbox.retry" in gw.log_text(), what="a failed delivery try")
    assert gw.stop() == 0            # queued mail survives the restart
    relay = Sink(port=relay_port)
    try:
        r = gw.cli("run-due", "--now", "2099-01-01T00:00:00+00:00")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["sent"] == 2
        ack = relay.wait_to("gus@customer.example")[0]
        assert key in str(ack["Subject"])
        # nothing is sent twice
        assert json.loads(gw.cli("run-due", "--now", "2099-01-02T00:00:00+00:00").stdout)["sent"] == 0
        assert len(relay.to("gus@customer.example")) == 1
    finally:
        relay.stop()


def test_relay_permanent_failure_is_recorded_not_retried(gateway: GatewayProc) -> None:
    gateway.sink.reply = "550 5.1.1 no such user"
    gateway.send(mail("hal@customer.example", SUPPORT, uniq("bad address"), "hello"))
    wait_for(lambda: "outbox.failed" in gateway.log_text(), what="a permanent failure")
    gateway.sink.reply = "250 OK"
    r = gateway.cli("run-due", "--now", "2099-01-01T00:00:00+00:00")
    assert json.loads(r.stdout)["outbox"].get("failed", 0) >= 1
    assert gateway.sink.to("hal@customer.example") == []


def test_sigterm_lets_a_transaction_in_flight_finish_and_exits_0(gateway: GatewayProc) -> None:
    key = uniq("in flight")
    m = mail("ida@customer.example", SUPPORT, key, "sent while stopping")
    result: dict[str, object] = {}
    in_transaction = threading.Event()
    go_on = threading.Event()

    def client() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as s:
                s.ehlo()
                s.mail("ida@customer.example")
                s.rcpt(SUPPORT)
                in_transaction.set()
                go_on.wait(10)
                result["code"] = s.data(m.as_bytes())[0]
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = repr(e)

    th = threading.Thread(target=client)
    th.start()
    assert in_transaction.wait(10)
    gateway.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    wait_for(lambda: "gateway.stopping" in gateway.log_text(), what="serve to begin stopping")
    go_on.set()
    th.join(30)
    assert gateway.proc.wait(20) == 0  # type: ignore[union-attr]
    assert result.get("code") == 250, result
    assert [t for t in gateway.tickets() if key in t["subject"]]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", gateway.port)) != 0


def test_serve_logs_one_json_object_per_line_with_event_names(gateway: GatewayProc) -> None:
    key = uniq("Logged")
    gateway.send(mail("jo@customer.example", SUPPORT, key, "a very private body sentence"))
    t = gateway.ticket_by_subject(key)
    wait_for(lambda: "outbox.sent" in gateway.log_text(), what="outbox.sent")
    events = gateway.log_events()
    names = {e["event"] for e in events}
    assert {"gateway.started", "mail.processed", "ticket.created", "outbox.sent"} <= names
    assert all(e["timestamp"].startswith("20") for e in events)
    created = next(e for e in events if e["event"] == "ticket.created" and e["ticket_id"] == t["id"])
    assert created["mailbox"] == SUPPORT and created["message_id"].startswith("<")
    assert "private body" not in gateway.log_text()


def test_staff_reply_is_recorded_as_staff(gateway: GatewayProc) -> None:
    key = uniq("staff")
    gateway.send(mail("kim@customer.example", SUPPORT, key, "question"))
    t = gateway.ticket_by_subject(key)
    note = gateway.sink.wait_to(QUEUES["AMER"])[0]
    gateway.send(agent_reply(note, "We are on it."))
    kinds = [x["kind"] for x in gateway.ticket(t["id"])["messages"] if x["direction"] == "in"]
    assert kinds == ["customer", "staff"]


def test_serve_refuses_to_start_on_an_invalid_config(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    gw.config.write_text(gw.config.read_text().replace('transport = "smtp"', 'transport = "pigeon"'))
    p = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(gw.config)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 78 and "outbound.transport" in p.stderr


def test_mail_without_message_id_is_answered_with_a_threadable_in_reply_to(gateway: GatewayProc) -> None:
    key = uniq("no id")
    raw = (f"From: leo@customer.example\r\nTo: {SUPPORT}\r\nSubject: {key}\r\n\r\nhello\r\n").encode()
    assert gateway.send(raw, [SUPPORT], "leo@customer.example")[0] == 250
    t = gateway.ticket_by_subject(key)
    derived = t["messages"][0]["message_id"]
    assert len(derived) > 78
    ack = gateway.sink.wait_to("leo@customer.example")[0]
    assert str(ack["In-Reply-To"]) == derived
    # and a reply to that ack threads
    gateway.send(reply_to(ack, "leo@customer.example", "thanks", subject="other"))
    assert len([x for x in gateway.ticket(t["id"])["messages"] if x["kind"] == "customer"]) == 2
