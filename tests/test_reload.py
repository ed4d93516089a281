"""SIGHUP reloads the configuration of a running `serve`: templates, tags, rules and
the other per-mail settings change without dropping a session; a bad new config,
a broken template or a restart-only change is refused, logged, and the running
configuration kept (project issue 16)."""
from __future__ import annotations

import os
import signal
import smtplib
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SUPPORT, GatewayProc, mail, uniq, wait_for

CUSTOMER = "dana@customer-reload.example"
RELOAD_EVENTS = ("config.reloaded", "config.reload_refused")


def reloads(gw: GatewayProc, worker: int = 0) -> list[dict[str, Any]]:
    return [e for e in gw.log_events() if e.get("event") in RELOAD_EVENTS and e.get("worker", 0) == worker]


def hup(gw: GatewayProc) -> dict[str, Any]:
    """SIGHUP to serve; the reload event it logged."""
    assert gw.proc is not None
    before = len(reloads(gw))
    os.kill(gw.proc.pid, signal.SIGHUP)
    return wait_for(lambda: (got := reloads(gw)) and len(got) > before and got[-1], what="a reload event")


def edit(gw: GatewayProc, old: str, new: str) -> None:
    text = gw.config.read_text()
    assert old in text, old
    gw.config.write_text(text.replace(old, new, 1))


def ack_for(gw: GatewayProc, conn: smtplib.SMTP, subject: str) -> Any:
    conn.send_message(mail(CUSTOMER, SUPPORT, subject, "The export fails since this morning."))
    return wait_for(lambda: next((m for m in gw.sink.to(CUSTOMER) if subject in str(m["Subject"])), None),
                    what=f"the acknowledgement of {subject!r}")


def text_of(msg: Any) -> str:
    return str(msg.get_body(("plain",)).get_content())


def test_sighup_reloads_templates_and_settings_without_dropping_a_session(
        make_gateway: Callable[..., GatewayProc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = tmp_path / "templates"
    (overrides / "en").mkdir(parents=True)
    gw = make_gateway()
    edit(gw, 'ticket_tag = "Support"\n', f'ticket_tag = "Support"\ntemplates_dir = "{overrides}"\n')
    notify = Path(tempfile.mkdtemp()) / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(notify))
        systemd.settimeout(20)
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
        gw.start()
        assert "READY=1" in systemd.recv(4096).decode()
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=20) as conn:   # one session through all reloads
            conn.ehlo("client.example")
            first = ack_for(gw, conn, uniq("before"))
            assert "[Support #" in str(first["Subject"])

            # new tag and a new acknowledgement template, applied on SIGHUP
            edit(gw, 'ticket_tag = "Support"', 'ticket_tag = "Helpdesk"')
            (overrides / "en" / "ack.txt").write_text(
                "{{ marker }}\n\nReloaded wording: ticket #{{ ticket.id }} is open.\n")
            event = hup(gw)
            assert event["event"] == "config.reloaded" and event["changed"] == ["ticket_tag"], event
            assert "RELOADING=1" in systemd.recv(4096).decode()
            assert "READY=1" in systemd.recv(4096).decode()
            second = ack_for(gw, conn, uniq("after"))
            assert "[Helpdesk #" in str(second["Subject"]) and "Reloaded wording" in text_of(second)

            # a typo: refused, named, the running configuration kept
            edit(gw, "[staff]\naddresses", "[staff]\nadresses")
            event = hup(gw)
            assert event["event"] == "config.reload_refused" and event["level"] == "error", event
            assert any("adresses" in p and "did you mean 'addresses'" in p for p in event["problems"]), event
            third = ack_for(gw, conn, uniq("typo"))
            assert "[Helpdesk #" in str(third["Subject"]) and "Reloaded wording" in text_of(third)
            edit(gw, "[staff]\nadresses", "[staff]\naddresses")

            # a template that does not compile: refused before any customer sees it
            (overrides / "en" / "ack.txt").write_text("{{ marker }}\n{% if %}broken\n")
            event = hup(gw)
            assert event["event"] == "config.reload_refused", event
            assert any("template error" in p and "ack.txt" in p for p in event["problems"]), event
            assert "Reloaded wording" in text_of(ack_for(gw, conn, uniq("template")))
            (overrides / "en" / "ack.txt").unlink()

            # the listening port is bound once: a change to it needs a restart
            edit(gw, f"port = {gw.port}", f"port = {gw.port + 1}")
            event = hup(gw)
            assert event["event"] == "config.reload_refused", event
            assert event["problems"] == ["smtp_port: changed, takes effect only on a restart"], event
            edit(gw, f"port = {gw.port + 1}", f"port = {gw.port}")

            event = hup(gw)      # the file is back in order: the default template again
            assert event["event"] == "config.reloaded", event
            last = ack_for(gw, conn, uniq("restored"))
            assert "Reloaded wording" not in text_of(last) and "[Helpdesk #" in str(last["Subject"])
            assert conn.noop()[0] == 250           # the same session all along
    assert gw.stop() == 0


def test_sighup_reaches_every_worker(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    edit(gw, "lmtp = false\n", "lmtp = false\nworkers = 2\n")
    gw.start()
    wait_for(lambda: any(e.get("event") == "gateway.started" and e.get("worker") == 1 for e in gw.log_events()),
             what="worker 1 listening")
    edit(gw, 'ticket_tag = "Support"', 'ticket_tag = "Helpdesk"')
    assert hup(gw)["event"] == "config.reloaded"
    wait_for(lambda: [e["event"] for e in reloads(gw, worker=1)] == ["config.reloaded"], what="worker 1 reloaded")
    for n in range(6):          # SO_REUSEPORT spreads new sessions over both processes
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=20) as conn:
            assert "[Helpdesk #" in str(ack_for(gw, conn, uniq(f"worker{n}"))["Subject"])
    assert gw.stop() == 0
