"""GovCloud as an enclave (issue 18): its relay, its staff, its store.

Through real `gateway serve` processes with two relay sinks (the commercial
relay and the GovCloud one), on SQLite or PostgreSQL (GATEWAY_TEST_STORE).
"""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from conftest import GOV, QUEUES, SUPPORT, GatewayProc, Sink, free_port, mail, uniq, wait_for

GOV_RELAY = '[outbound.govcloud]\nhost = "127.0.0.1"\nport = {port}'


def _gov_relay_port(gw: GatewayProc, port: int | None) -> None:
    """Point the gateway's `[outbound.govcloud]` at `port`, or drop the section (None)."""
    text = gw.config.read_text()
    old = GOV_RELAY.format(port=gw.gov_sink.port)
    assert old in text
    gw.config.write_text(text.replace(old, "" if port is None else GOV_RELAY.format(port=port)))


def _without_gov_mailbox(gw: GatewayProc) -> None:
    text = gw.config.read_text()
    old = f'[[mailbox]]\naddress = "{GOV}"\ngovcloud = true\n'
    assert old in text
    gw.config.write_text(text.replace(old, ""))


def test_a_govcloud_mailbox_without_a_govcloud_relay_is_a_configuration_error(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    _gov_relay_port(gw, None)
    check = gw.cli("check-config")
    assert check.returncode == 78, check.stderr
    assert "outbound.govcloud" in check.stderr and f"{GOV} is a GovCloud mailbox" in check.stderr
    assert "never goes through the commercial [outbound] relay" in check.stderr
    serve = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(gw.config)],
                           capture_output=True, text=True, timeout=60)
    assert serve.returncode == 78 and f"{GOV} is a GovCloud mailbox" in serve.stderr, serve.stderr
    assert not (gw.data_dir / "gateway.db").exists()          # it started nothing

    # the same file with the Maildir transport sends nothing anywhere: valid
    text = gw.config.read_text()
    gw.config.write_text(text.replace('transport = "smtp"', 'transport = "maildir"'))
    assert gw.cli("check-config").returncode == 0
    # and with a GovCloud relay, or without a GovCloud mailbox, smtp is valid too
    gw.config.write_text(text)
    _without_gov_mailbox(gw)
    assert gw.cli("check-config").returncode == 0


def _outbox(gw: GatewayProc, relay: str) -> list[tuple[object, ...]]:
    return gw.query("SELECT kind, state, attempts, last_error FROM outbox WHERE relay = ? ORDER BY id",
                    (relay,))


def test_a_govcloud_relay_that_is_down_keeps_govcloud_mail_queued_never_the_commercial_relay(
        make_gateway: Callable[..., GatewayProc]) -> None:
    down = free_port()                     # nothing listens there: connections are refused
    gw = make_gateway()
    _gov_relay_port(gw, down)
    gw.start()
    key = uniq("FedRAMP tenant")
    assert gw.send(mail("gina@agency.example", GOV, key, "Our GovCloud backup is late."))[0] == 250
    commercial = uniq("Backup fails")
    assert gw.send(mail("ann@customer.example", SUPPORT, commercial, "Backup fails."))[0] == 250
    gw.sink.wait_to("ann@customer.example")                 # the commercial relay works
    t = gw.ticket_by_subject(key)
    assert t["govcloud"] is True
    tried = wait_for(lambda: (rows := _outbox(gw, "govcloud")) and all(r[2] >= 1 for r in rows) and rows,
                     what="every GovCloud mail tried once")
    assert {r[0] for r in tried} == {"ack", "staff_notify"}
    assert all(r[1] == "queued" and f"127.0.0.1:{down} unreachable" in str(r[3]) for r in tried), tried
    retries = [e for e in gw.log_events() if e.get("event") == "outbox.retry" and e.get("relay") == "govcloud"]
    assert retries and all(e["ticket_id"] == t["id"] for e in retries)
    # nothing of it went through the commercial relay (nor the fixture's GovCloud sink)
    assert gw.sink.to("gina@agency.example") == [] and gw.sink.to(QUEUES["GOVCLOUD"]) == []
    assert all("gina@agency.example" not in m["rcpt"] for m in gw.sink.messages)
    assert gw.gov_sink.messages == []
    assert gw.stop() == 0

    # the relay back: the queued mail goes out through it, and only through it
    back = Sink(down)
    try:
        r = gw.cli("run-due", "--now", "2099-01-01T00:00:00+00:00")
        assert r.returncode == 0, r.stderr
        assert GOV in str(back.wait_to("gina@agency.example")[0]["From"])
        back.wait_to(QUEUES["GOVCLOUD"])
    finally:
        back.stop()
    assert {r[1] for r in _outbox(gw, "govcloud")} == {"sent"}
    assert gw.sink.to("gina@agency.example") == []


def test_govcloud_mail_without_any_govcloud_relay_stays_queued(make_gateway: Callable[..., GatewayProc],
                                                               ) -> None:
    """No GovCloud mailbox and no GovCloud relay (valid), yet the rules find a mail
    to the commercial mailbox to be GovCloud: its answers wait, never leave commercially."""
    gw = make_gateway()
    _without_gov_mailbox(gw)
    _gov_relay_port(gw, None)
    gw.start()
    key = uniq("FedRAMP")
    assert gw.send(mail("gina@agency.example", SUPPORT, key, "We are on FedRAMP, the backup is late."))[0] == 250
    assert gw.ticket_by_subject(key)["govcloud"] is True
    tried = wait_for(lambda: (rows := _outbox(gw, "govcloud")) and all(r[2] >= 1 for r in rows) and rows,
                     what="every GovCloud mail tried once")
    assert all(r[1] == "queued" and "no [outbound.govcloud] relay" in str(r[3]) for r in tried), tried
    commercial = uniq("Backup fails")
    assert gw.send(mail("ann@customer.example", SUPPORT, commercial, "Backup fails."))[0] == 250
    gw.sink.wait_to("ann@customer.example")
    assert gw.sink.to("gina@agency.example") == [] and gw.sink.to(QUEUES["GOVCLOUD"]) == []
    assert gw.gov_sink.messages == []
