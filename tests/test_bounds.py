"""Project issue 14's attacks on what one mail or one peer may cost, each against
a real `gateway serve` over SMTP on loopback (and `gateway ingest`), asserting
the safe outcome: no mail stalls the daemon, every cost has a bound, the
limits hold on every MIME shape, data at rest is private.
"""
from __future__ import annotations

import json
import os
import resource
import smtplib
import socket
import stat
import threading
import time
from collections.abc import Callable

import pytest
from conftest import SUPPORT, GatewayProc, mail, smtp_send, uniq, wait_for

UU_BOMB_LINES = 40_000          # 480 KB of "begin 644 f" lines without end: 100 s of parsing before


def uu_bomb(key: str = "") -> bytes:
    return (f"From: uu@attacker.example\r\nTo: {SUPPORT}\r\nSubject: uu {key or uniq()}\r\n\r\n").encode() \
        + b"begin 644 f\r\n" * UU_BOMB_LINES


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# -- no mail can stall the daemon ----------------------------------------------------

def _slowest_of_five(gateway: GatewayProc) -> float:
    slowest = 0.0
    for i in range(5):
        started = time.monotonic()
        code, _ = gateway.send(mail(f"ok{i}@customer.example", SUPPORT, uniq("legit"), "hello"))
        slowest = max(slowest, time.monotonic() - started)
        assert code == 250
    return slowest


def test_a_legitimate_mail_gets_its_250_within_1_s_while_the_worst_mail_is_sent_in_a_loop(
        gateway: GatewayProc) -> None:
    # what the machine gives a legitimate mail without the attack (a loaded
    # machine is slower for everyone, and the attack's parsing takes its share of
    # the two cores): within 1 s plus three times that (the unbounded parse it
    # guards against stalled every mail for 100 s)
    baseline = _slowest_of_five(gateway)
    stop = threading.Event()
    answers: list[int] = []

    def attack() -> None:
        while not stop.is_set():
            answers.append(smtp_send(gateway.port, uu_bomb(), [SUPPORT], "uu@attacker.example")[0])

    attackers = [threading.Thread(target=attack) for _ in range(2)]
    for t in attackers:
        t.start()
    try:
        wait_for(lambda: len(answers) >= 2, 60, "the attack under way")
        slowest = _slowest_of_five(gateway)
    finally:
        stop.set()
        for t in attackers:
            t.join(120)
    assert slowest < 1.0 + 3 * baseline, f"a legitimate mail waited {slowest:.2f} s (without the attack {baseline:.2f} s)"
    assert set(answers) == {250}, answers        # the bombs are taken too, not refused or lost
    # and through ingest: seconds, not minutes
    started = time.monotonic()
    r = gateway.cli("ingest", "--recipient", SUPPORT, stdin=uu_bomb())
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 15


def test_a_parse_over_parse_seconds_is_quarantined_with_the_reason_and_serve_goes_on(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml="[limits]\nparse_seconds = 0.1\n")
    gw.start()
    # a Cc of 400 000 "@": about 2 s of address parsing, linear but over 0.1 s
    slow = (f"From: slow@customer.example\r\nTo: {SUPPORT}\r\nCc: {'@' * 400_000}\r\n"
            f"Subject: {uniq('slow')}\r\n\r\nhi\r\n").encode()
    assert gw.send(slow, [SUPPORT], "slow@customer.example")[0] == 250
    (entry,) = json.loads(gw.cli("quarantine", "list", "--json").stdout)
    assert "limits.parse_seconds" in entry["error"], entry
    assert gw.send(mail("after@customer.example", SUPPORT, uniq("after"), "hello"))[0] == 250
    assert len(gw.tickets()) == 1
    assert any(e["event"] == "mail.parse_overrun" for e in gw.log_events())


# -- limits on every MIME shape and path -------------------------------------------

def _many_parts(n: int, *, boundary: str = "b", param: str | None = None, eol: str = "\r\n") -> bytes:
    head = (f"From: parts@customer.example{eol}To: {SUPPORT}{eol}Subject: {uniq('parts')}{eol}"
            f"MIME-Version: 1.0{eol}Content-Type: multipart/mixed; "
            + (param if param is not None else f'boundary="{boundary}"') + f"{eol}{eol}")
    part = f"--{boundary}{eol}Content-Type: application/octet-stream{eol}{eol}x{eol}"
    return (head + part * n + f"--{boundary}--{eol}").encode()


SHAPES = {
    "boundary of 250 characters": lambda n: _many_parts(n, boundary="q" * 250),
    "RFC 2231 boundary*0= continuation": lambda n: _many_parts(n, boundary="abcdef",
                                                               param="boundary*0=abc; boundary*1=def"),
    "bare CR line ends": lambda n: _many_parts(n, eol="\r"),
    "LF line ends": lambda n: _many_parts(n, eol="\n"),
    "CRLF line ends": lambda n: _many_parts(n),
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_attachment_limit_holds_on_every_mime_shape(gateway: GatewayProc, shape: str) -> None:
    code, text = gateway.send(SHAPES[shape](150), [SUPPORT], "parts@customer.example")
    assert code == 554 and text.startswith("5.6.0") and "100 attachments" in text, (code, text)
    r = gateway.cli("ingest", "--recipient", SUPPORT, stdin=SHAPES[shape](150))
    assert r.returncode == 65 and "100 attachments" in r.stderr, r.stderr
    assert gateway.send(SHAPES[shape](3), [SUPPORT], "parts@customer.example")[0] == 250
    assert not gateway.query("SELECT 1 FROM attachments GROUP BY message_row HAVING COUNT(*) > 100")


def test_ingest_refuses_mail_over_max_message_size_without_reading_it_all(gateway: GatewayProc) -> None:
    big = mail("big@customer.example", SUPPORT, uniq("big"), "x" * 2_100_000).as_bytes()   # max_size 2 MB
    r = gateway.cli("ingest", "--recipient", SUPPORT, stdin=big)
    assert r.returncode == 65 and "max_message_size" in r.stderr, r.stderr
    assert gateway.tickets() == []


# -- bounds on what one mail costs ---------------------------------------------------

def test_cc_and_to_are_capped_the_ticket_is_made_and_staff_are_told(gateway: GatewayProc) -> None:
    key = uniq("many cc")
    cc = ", ".join(f"cc{i}@customer.example" for i in range(300))
    raw = (f"From: ann@customer.example\r\nTo: {SUPPORT}, <a b@x.example>, nodomain@, \"x\" <ctl\x01@x.example>\r\n"
           f"Cc: {cc}\r\nSubject: {key}\r\nMessage-ID: <{key}@customer.example>\r\n\r\nhello\r\n").encode()
    assert gateway.send(raw, [SUPPORT], "ann@customer.example")[0] == 250
    ticket = gateway.ticket_by_subject(key)
    assert len(ticket["cc"]) == 50
    assert all("@" in a and " " not in a and "\x01" not in a and not a.endswith("@") for a in ticket["cc"])
    assert all(len(m["to"]) <= 50 for m in ticket["messages"])
    note = next(m for m in ticket["messages"] if m["kind"] == "note")
    assert "cc299@customer.example" in note["body_text"] and "250" in note["subject"]
    notify = gateway.sink.wait_to("amer@staff.example.com")[0]
    assert "250 more To/Cc addresses" in notify.get_body(("plain",)).get_content()
    assert all(len(m["rcpt"]) <= 50 for m in gateway.sink.messages)


# -- bounds on what one peer costs ---------------------------------------------------

def test_sessions_over_max_sessions_get_421_and_the_rest_are_served(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml="[limits]\nmax_sessions = 5\n")
    gw.start()
    held = [smtplib.SMTP("127.0.0.1", gw.port, timeout=10) for _ in range(5)]
    try:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            assert s.recv(200).startswith(b"421 4.7.0")
            assert s.recv(200) == b""          # closed
    finally:
        for c in held:
            c.close()
    wait_for(lambda: gw.send(mail("x@customer.example", SUPPORT, uniq("after"), "hi"))[0] == 250,
             what="a session once the others left")
    assert any(e["event"] == "smtp.sessions_refused" for e in gw.log_events())


def test_too_many_refused_rcpts_end_the_session_and_are_not_logged_without_bound(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml="[limits]\nmax_rcpt_errors = 5\n")
    gw.start()
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as s:
        s.ehlo()
        s.mail("guess@attacker.example")
        codes = [s.rcpt(f"guess{i}@example.com")[0] for i in range(6)]
        assert codes == [550] * 5 + [421]
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.rcpt("more@example.com")
    refused = [e for e in gw.log_events() if e["event"] == "smtp.rcpt_refused"]
    assert len(refused) == 5
    assert any(e["event"] == "smtp.session_ended" for e in gw.log_events())


HOSTILE_SESSIONS = int(os.environ.get("GATEWAY_HOSTILE_SESSIONS", "150"))   # README: 500 in the long run


def test_many_sessions_holding_megabytes_of_data_stay_under_300_mb(gateway: GatewayProc) -> None:
    assert gateway.proc is not None
    chunk = b"X" * 998 + b"\r\n"
    socks: list[socket.socket] = []
    try:
        for _ in range(HOSTILE_SESSIONS):
            s = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
            socks.append(s)
            s.recv(200)
            s.sendall(b"EHLO x\r\nMAIL FROM:<h@attacker.example>\r\nRCPT TO:<support@example.com>\r\nDATA\r\n")
        for s in socks:
            s.setblocking(False)
        for _ in range(1900):             # ~1.9 MB of DATA on each, never ended
            for s in socks:
                try:
                    s.send(chunk)
                except (BlockingIOError, OSError):
                    pass
        rss_mb = _rss_kb(gateway.proc.pid) / 1024
        assert rss_mb < 300, f"serve at {rss_mb:.0f} MB with {HOSTILE_SESSIONS} hostile sessions"
        try:
            code = gateway.send(mail("ok@customer.example", SUPPORT, uniq("beside"), "hi"))[0]
        except smtplib.SMTPConnectError as e:
            code = e.smtp_code
        assert code in (250, 421)            # over max_sessions: told to come back, not hung
    finally:
        for s in socks:
            s.close()
    def accepted() -> bool:
        try:
            return gateway.send(mail("ok@customer.example", SUPPORT, uniq("after"), "hi"))[0] == 250
        except smtplib.SMTPConnectError:
            return False
    wait_for(accepted, 60, "250 once they left")
    assert _rss_kb(gateway.proc.pid) / 1024 < 300


def test_out_of_file_descriptors_is_logged_as_json_with_a_back_off(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    gw.start(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    socks = []
    try:
        for _ in range(120):
            try:
                socks.append(socket.create_connection(("127.0.0.1", gw.port), timeout=5))
            except OSError:
                break
        wait_for(lambda: any(e.get("event") == "smtp.accept_failed" for e in gw.log_events()), 20,
                 "the accept failure logged")
        # keep knocking for 3 s: accept() fails again and again; what is measured is how often
        # that is logged
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                socks.append(socket.create_connection(("127.0.0.1", gw.port), timeout=0.2))
            except OSError:
                pass
    finally:
        for s in socks:
            s.close()
    lines = gw.log_text().splitlines()
    for line in lines:
        json.loads(line)                    # every line JSON: no traceback
    failed = [json.loads(x) for x in lines if "smtp.accept_failed" in x]
    assert 1 <= len(failed) <= 3, failed
    wait_for(lambda: gw.send(mail("fd@customer.example", SUPPORT, uniq("fd"), "hi"))[0] == 250, 60,
             "mail accepted again")


# -- data at rest ----------------------------------------------------------------------

def test_data_at_rest_is_private_whatever_the_umask(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(transport="maildir", max_size=4_000_000)
    gw.start(preexec_fn=lambda: os.umask(0o022))
    m = mail("ann@customer.example", SUPPORT, uniq("private"), "secret " * 200_000)   # a raw file (> 1 MiB)
    m.add_attachment(b"\x00" * 100, maintype="application", subtype="octet-stream", filename="a.bin")
    assert gw.send(m)[0] == 250
    wait_for(lambda: (gw.data_dir / "outbound" / "new").exists()
             and any((gw.data_dir / "outbound" / "new").iterdir()), what="outbound files")
    assert stat.S_IMODE(gw.data_dir.stat().st_mode) == 0o700
    files = [p for p in gw.data_dir.rglob("*") if p.is_file()]
    assert any(p.name.endswith("-wal") for p in files) or gw.store_url
    assert any("attachments" in p.parts for p in files) and any("outbound" in p.parts for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, f"{p} is {oct(p.stat().st_mode)}"


def test_cli_output_escapes_control_characters(gateway: GatewayProc) -> None:
    key = uniq("esc")
    raw = (f"From: ann@customer.example\r\nTo: {SUPPORT}\r\nSubject: {key}\r\n\r\n"
           "look \x1b]0;pwned\x07 and \x1b[2J and \u009b31m\r\n").encode()
    assert gateway.send(raw, [SUPPORT], "ann@customer.example")[0] == 250
    ticket = gateway.ticket_by_subject(key)
    out = gateway.cli("tickets", "show", str(ticket["id"])).stdout
    assert "\x1b" not in out and "\x07" not in out and "\u009b" not in out
    assert "\\x1b]0;pwned\\x07" in out
    assert "\x1b" not in gateway.cli("tickets", "list").stdout


def test_an_unusable_charset_name_is_read_as_unknown_not_quarantined(gateway: GatewayProc) -> None:
    key = uniq("charset")
    raw = (f"From: ann@customer.example\r\nTo: {SUPPORT}\r\nSubject: {key}\r\n"
           "Content-Type: text/plain; charset=\"utf\x008\"\r\n\r\ncaf\xc3\xa9\r\n").encode("latin-1")
    assert gateway.send(raw, [SUPPORT], "ann@customer.example")[0] == 250
    ticket = gateway.ticket_by_subject(key)
    assert "café" in ticket["messages"][0]["body_text"]
    assert json.loads(gateway.cli("quarantine", "list", "--json").stdout) == []
