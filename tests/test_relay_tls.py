"""Outbound TLS and SMTP AUTH against a real Postfix (issue 16).

The Postfix started here has a certificate from a test CA (tests/tlscerts.py) and
checks logins through a real Dovecot's SASL service (Postfix's `smtpd_sasl_type =
dovecot`), as a provider's submission service does. It offers:

- `port`: STARTTLS offered, no login (relays for 127.0.0.0/8, like a local MTA);
- `submission`: STARTTLS required, then AUTH required (port 587's rules);
- `smtps`: TLS from the first byte, then AUTH required (port 465).

It relays what it accepts to a Sink, with a `Received:` line that says whether
the gateway's connection was encrypted and who logged in. A refused login or a
certificate the gateway cannot verify leaves the mail in the outbox, retried and
logged, and it goes out once the configuration is put right.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import QUEUES, SUPPORT, GatewayProc, Sink, free_port, mail, uniq, wait_for
from test_imap import PASSWORD, Dovecot
from test_postfix import Postfix
from tlscerts import make_pki


class SecurePostfix:
    def __init__(self, sink: Sink):
        self.auth_port = free_port()
        self.dovecot = Dovecot(auth_port=self.auth_port)
        self.user = self.dovecot.add_user()
        self.pki_dir = Path(tempfile.mkdtemp(prefix="gw-pki-"))
        os.chmod(self.pki_dir, 0o755)
        pki = self.pki = make_pki(self.pki_dir)
        self.submission, self.smtps = free_port(), free_port()
        login_only = ("  -o smtpd_sasl_auth_enable=yes\n"
                      "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n")
        self.postfix = Postfix("error:5.7.0 not here", master_extra=(
            f"127.0.0.1:{self.submission} inet n - n - - smtpd\n"
            "  -o smtpd_tls_security_level=encrypt\n" + login_only +
            f"127.0.0.1:{self.smtps} inet n - n - - smtpd\n"
            "  -o smtpd_tls_wrappermode=yes\n" + login_only +
            "tlsmgr    unix  - - n 1000? 1 tlsmgr\n"),
            main_extra=textwrap.dedent(f"""\
                smtpd_tls_cert_file = {pki.server.cert}
                smtpd_tls_key_file = {pki.server.key}
                smtpd_tls_security_level = may
                smtpd_tls_auth_only = yes
                smtpd_tls_received_header = yes
                smtpd_sasl_authenticated_header = yes
                smtpd_sasl_type = dovecot
                smtpd_sasl_path = inet:127.0.0.1:{self.auth_port}
                relay_domains = customer.example, staff.example.com
                transport_maps =
                relay_transport = smtp:[127.0.0.1]:{sink.port}
                """))

    def start(self) -> None:
        self.dovecot.start()
        self.postfix.start()

    def stop(self) -> None:
        self.postfix.stop()
        self.dovecot.stop()
        for d in (self.postfix.dir, self.dovecot.dir, self.pki_dir):
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def delivered() -> Iterator[Sink]:
    """Where Postfix relays the gateway's mail."""
    sink = Sink()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def mta(delivered: Sink) -> Iterator[SecurePostfix]:
    m = SecurePostfix(delivered)
    m.start()
    yield m
    m.stop()


def through(mta: SecurePostfix, make_gateway: Callable[..., GatewayProc], port: int,
            **outbound: Any) -> GatewayProc:
    """A running gateway whose relay is `port` of the test Postfix."""
    gw = make_gateway(relay_port=port, outbound={"retry_base_seconds": 0.2, "retry_max_seconds": 1,
                                                 **outbound})
    gw.start()
    return gw


def ask(gw: GatewayProc) -> str:
    subject = uniq("relay")
    code, text = gw.send(mail("Ann <ann@customer.example>", SUPPORT, subject, "Our backup fails."))
    assert code == 250, text
    return subject


def notification(delivered: Sink, subject: str, to: str = QUEUES["AMER"]) -> Any:
    """The staff notification of `subject` (or what went `to` someone else), as Postfix handed it on."""
    found = wait_for(lambda: [m for m in delivered.to(to) if subject in str(m["Subject"])],
                     what=f"the mail to {to} about {subject!r} through Postfix")
    return found[0]


def received_by_postfix(msg: Any) -> str:
    """Postfix's `Received:` line for the gateway's connection (the newest is first)."""
    return " ".join(str(msg.get_all("Received")[0]).split())


def retries(gw: GatewayProc, count: int = 2) -> list[dict[str, Any]]:
    return wait_for(lambda: (found := [e for e in gw.log_events() if e.get("event") == "outbox.retry"])
                    and len(found) >= count and found, what=f"{count} outbox.retry")


# -- delivered when right ------------------------------------------------------------

def test_submission_with_starttls_and_auth_password_file(mta: SecurePostfix, delivered: Sink,
                                                          make_gateway: Callable[..., GatewayProc]) -> None:
    pw = mta.postfix.dir / "relay.pw"
    pw.write_text(PASSWORD + "\n")
    gw = through(mta, make_gateway, mta.submission, tls="required", ca_file=str(mta.pki.ca),
                 username=mta.user, password_file=str(pw))
    subject = ask(gw)
    line = received_by_postfix(notification(delivered, subject))
    assert "(using TLS" in line and f"(Authenticated sender: {mta.user})" in line, line
    ack = notification(delivered, subject, to="ann@customer.example")      # the acknowledgement too
    assert f"(Authenticated sender: {mta.user})" in received_by_postfix(ack)
    assert PASSWORD not in gw.log_text()


def test_implicit_tls_on_port_465_with_the_password_from_the_environment(
        mta: SecurePostfix, delivered: Sink, make_gateway: Callable[..., GatewayProc],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_RELAY_PASSWORD", PASSWORD)     # serve inherits it
    gw = through(mta, make_gateway, mta.smtps, tls="implicit", ca_file=str(mta.pki.ca),
                 username=mta.user, password_env="GW_TEST_RELAY_PASSWORD")
    line = received_by_postfix(notification(delivered, ask(gw)))
    assert "(using TLS" in line and f"(Authenticated sender: {mta.user})" in line, line


def test_by_default_starttls_is_used_when_the_relay_offers_it(mta: SecurePostfix, delivered: Sink,
                                                               make_gateway: Callable[..., GatewayProc]) -> None:
    gw = through(mta, make_gateway, mta.postfix.port, ca_file=str(mta.pki.ca))     # tls not set
    line = received_by_postfix(notification(delivered, ask(gw)))
    assert "(using TLS" in line and "Authenticated sender" not in line, line


# -- refused with a clear error, the mail kept ----------------------------------------

def test_a_refused_login_keeps_the_mail_queued_until_the_password_is_right(
        mta: SecurePostfix, delivered: Sink, make_gateway: Callable[..., GatewayProc]) -> None:
    wrong = "not-the-password-" + uniq("pw")
    gw = through(mta, make_gateway, mta.submission, tls="required", ca_file=str(mta.pki.ca),
                 username=mta.user, password=wrong)
    subject = ask(gw)
    for e in retries(gw):
        assert e["error"].startswith(f"relay 127.0.0.1:{mta.submission} refused the login of "
                                     f"'{mta.user}': 535 5.7.8"), e
        assert e["level"] == "warning"
    assert not [e for e in gw.log_events() if e.get("event") == "outbox.failed"]
    assert wrong not in gw.log_text()
    assert not [m for m in delivered.messages if subject in str(m["msg"]["Subject"])]
    assert gw.stop() == 0
    gw.config.write_text(gw.config.read_text().replace(wrong, PASSWORD))
    gw.start()
    notification(delivered, subject)                    # the same mail, not lost


def test_an_unverifiable_certificate_keeps_the_mail_queued_and_sends_no_password(
        mta: SecurePostfix, delivered: Sink, make_gateway: Callable[..., GatewayProc]) -> None:
    """No ca_file: the system's CAs don't know the test CA, as with a man in the middle."""
    for port, tls in ((mta.submission, "required"), (mta.smtps, "implicit")):
        user = mta.dovecot.add_user()                # a login of its own, to look for in Postfix's log
        gw = through(mta, make_gateway, port, tls=tls, username=user, password=PASSWORD)
        subject = ask(gw)
        for e in retries(gw):
            assert e["error"].startswith(
                f"relay 127.0.0.1:{port}: TLS certificate not trusted (unable to get local issuer "
                "certificate; checked against the system's CAs): set ca_file"), e
        assert not [e for e in gw.log_events() if e.get("event") == "outbox.failed"]
        assert not [m for m in delivered.messages if subject in str(m["msg"]["Subject"])]
        assert f"sasl_username={user}" not in mta.postfix.log()       # the password never left
        assert gw.stop() == 0
        gw.config.write_text(gw.config.read_text().replace(
            "[outbound]", f'[outbound]\nca_file = "{mta.pki.ca}"', 1))
        gw.start()
        assert f"(Authenticated sender: {user})" in received_by_postfix(notification(delivered, subject))
        gw.stop()


def test_required_tls_against_a_relay_without_starttls_keeps_the_mail(
        make_gateway: Callable[..., GatewayProc], sinks: tuple[Sink, Sink]) -> None:
    """The conftest Sink offers no STARTTLS: with tls = "required" nothing goes in clear text."""
    gw = make_gateway(outbound={"tls": "required", "retry_base_seconds": 0.2, "retry_max_seconds": 1})
    gw.start()
    ask(gw)
    for e in retries(gw):
        assert "STARTTLS" in e["error"] and "tls = 'required' needs it" in e["error"], e
    assert sinks[0].messages == []
