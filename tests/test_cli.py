"""The command line as users and MTAs run it."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import GATEWAY, QUEUES, SUPPORT, GatewayProc, mail, smtp_send, uniq, wait_for


def test_ingest_takes_a_file_and_finds_the_mailbox_in_the_headers(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()                    # no serve running: ingest works alone
    key = uniq("piped")
    f = gw.root / "in.eml"
    m = mail("pia@customer.example", "Support <support@example.com>", key, "via pipe")
    f.write_bytes(m.as_bytes())
    r = gw.cli("ingest", str(f))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["action"] == "created"
    t = gw.ticket(out["ticket_id"])
    assert t["subject"] == key
    # ingest sends the acknowledgement itself when the relay is up
    gw.sink.wait_to("pia@customer.example")
    gw.sink.wait_to(QUEUES["AMER"])


def test_ingest_exit_codes(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    stray = mail("x@customer.example", "nobody@else.example", "x", "x").as_bytes()
    assert gw.cli("ingest", stdin=stray).returncode == 67
    assert gw.cli("ingest", "--recipient", "nobody@else.example", stdin=stray).returncode == 67
    # the envelope recipient wins over the headers
    assert gw.cli("ingest", "--recipient", SUPPORT, stdin=stray).returncode == 0
    # the same mail again (an MTA retry) is stored once
    r = gw.cli("ingest", "--recipient", SUPPORT, stdin=stray)
    assert r.returncode == 0 and json.loads(r.stdout)["action"] == "duplicate"
    assert len(gw.tickets()) == 1


def test_ingest_keeps_unparseable_mail_in_quarantine_and_exits_0(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    junk = b"\xff\xfe\x00garbage that is no mail at all\r\n" * 3
    r = gw.cli("ingest", "--recipient", SUPPORT, stdin=junk)
    assert r.returncode == 0, r.stderr
    rows = gw.query("SELECT raw, state, error FROM inbound")
    assert rows == [(junk, "quarantined", "no sender address in From: or the envelope")]
    assert gw.tickets() == []
    # nobody was answered
    assert gw.sink.messages == []


def test_tickets_list_and_show_human_and_json(gateway: GatewayProc) -> None:
    keys = [uniq("first"), uniq("second")]
    for k in keys:
        gateway.send(mail("quinn@customer.example", SUPPORT, k, "body " + k))
    listed = gateway.tickets()
    assert [t["subject"] for t in listed] == list(reversed(keys))     # newest first
    assert all("messages" not in t for t in listed)
    for field in ("id", "subject", "status", "requester", "cc", "region", "govcloud", "priority",
                  "linked_ticket", "created_at", "first_response_at", "resolved_at", "closed_at"):
        assert field in listed[0]
    assert listed[0]["created_at"].endswith("+00:00")
    assert gateway.tickets("--status", "open") == listed
    assert gateway.tickets("--status", "closed") == []
    table = gateway.cli("tickets", "list").stdout
    assert keys[0] in table and "(2 tickets)" in table
    shown = gateway.cli("tickets", "show", str(listed[0]["id"])).stdout
    assert keys[1] in shown and "body " + keys[1] in shown
    r = gateway.cli("tickets", "show", "999999", "--json")
    assert r.returncode == 1 and "no ticket" in r.stderr


def test_run_due_with_now_delivers_the_outbox_once(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    gw.sink.reply = "451 4.3.0 try later"
    r = gw.cli("ingest", "--recipient", SUPPORT,
               stdin=mail("rita@customer.example", SUPPORT, uniq("due"), "x").as_bytes())
    assert r.returncode == 0
    gw.sink.reply = "250 OK"
    # not due yet: the retry waits for its backoff
    r = gw.cli("run-due", "--now", "2000-01-01T00:00:00+00:00")
    assert json.loads(r.stdout)["sent"] == 0
    r = gw.cli("run-due", "--now", "2099-01-01T00:00:00Z")
    assert r.returncode == 0 and json.loads(r.stdout)["sent"] == 2
    assert gw.cli("run-due", "--now", "yesterday").returncode == 64


def test_serve_on_built_in_defaults_writes_answers_as_files(workdir: Path) -> None:
    """The README's first command: no config, SMTP on 127.0.0.1:2525, mail in ./var."""
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", 2525)) != 0, "port 2525 is taken by another program"
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    proc = subprocess.Popen([*GATEWAY, "serve"], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", 2525), timeout=1):
                    return True
            except OSError:
                return False
        wait_for(up, 20, "serve on 2525")
        key = uniq("first ticket")
        assert smtp_send(2525, mail("you@customer.example", SUPPORT, key, "hello"))[0] == 250
        new = workdir / "var" / "outbound" / "new"
        files = wait_for(lambda: len(list(new.glob("*"))) >= 2 and list(new.glob("*")), 15, "files")
        texts = [p.read_text() for p in files]
        assert any("X-Envelope-To: you@customer.example" in t and key in t for t in texts)
        r = subprocess.run([*GATEWAY, "tickets", "list"], cwd=workdir, env=env, capture_output=True,
                           text=True, timeout=60)
        assert key in r.stdout
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "--help"], capture_output=True, text=True).stdout
    for cmd in ("serve", "ingest", "tickets", "run-due", "stats", "report", "check-config"):
        assert cmd in out


def test_read_only_commands_never_create_a_database(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\ndata_dir = "state"\n')
    for args in (["tickets", "list"], ["tickets", "show", "1"], ["stats"], ["quarantine", "list"],
                 ["report", "--html", "r.html"]):
        r = subprocess.run([*GATEWAY, *args, "--config", str(cfg)], capture_output=True, text=True,
                           cwd=tmp_path, timeout=60)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (args, r.stderr)
        assert f"no database at {tmp_path / 'state' / 'gateway.db'}: is --config right?" in r.stderr
    assert not (tmp_path / "state" / "gateway.db").exists() and not (tmp_path / "r.html").exists()


def test_a_closed_pipe_ends_a_command_quietly(gateway: GatewayProc) -> None:
    for n in range(3):
        gateway.send(mail("pipe@customer.example", SUPPORT, uniq(f"pipe {n}"), "body"))
    wait_for(lambda: len(gateway.tickets()) >= 3)
    r, w = os.pipe()
    os.close(r)            # the reader (`| head -1`) has gone before the first line
    try:
        p = subprocess.run([*GATEWAY, "tickets", "list", "--config", str(gateway.config)],
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert p.returncode == 141


def test_version() -> None:
    r = subprocess.run([*GATEWAY, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("gateway 0.")
