"""Test fixtures: a real `gateway serve` process, real SMTP sinks as relays.

Everything talks over loopback with real protocols: tests send mail with
smtplib, read tickets through the `gateway` command line, and catch outbound
mail in aiosmtpd servers standing in for the relays. Waiting is always for
a condition with a deadline, never a fixed sleep.
"""
from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path
from typing import Any

import pg
import pytest
from aiosmtpd.controller import Controller

GATEWAY = [sys.executable, "-m", "gateway"]
SUPPORT = "support@example.com"
GOV = "support@examplegov.com"
STAFF = "agent@staff.example.com"
QUEUES = {"AMER": "amer@staff.example.com", "EMEA": "emea@staff.example.com",
          "APAC": "apac@staff.example.com", "GOVCLOUD": "gov@staff.examplegov.com"}
SHARED = Path(__file__).resolve().parents[2] / "shared"   # beside the checkout, not in it


def needs_shared(part: str, what: str) -> Path:
    """`SHARED / part`, or, in a clone without it, a skip that says what is
    missing and where it was looked for: the contract check and the mail corpus
    are shared by every checkout and never copied into the project (issue 16).
    Everything else runs without them. CI never skips: `.ci/run` refuses to
    start without them and sets GATEWAY_TEST_REQUIRE_SHARED, which turns the
    skip into a failure."""
    path = SHARED / part
    if not path.exists():
        reason = (f"needs {what} at {path} (the shared material beside this checkout, "
                  f"../shared/{part}); not there in this clone (README: 'Tests that need ../shared')")
        if os.environ.get("GATEWAY_TEST_REQUIRE_SHARED"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


# Load tests send hundreds of first mails from distinct customers at one test domain in
# a minute: many people, not a loop. The per-domain caps (issue 14) would hold their
# acks and tickets back, so load tests lift them; tests/test_loops.py tests the caps.
LOAD_LIMITS = "[limits]\nauto_answers_per_domain_per_hour = 1000000\nnew_tickets_per_domain_per_hour = 1000000\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `pred` until it returns something truthy; fail after `timeout`."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_banner(port: int, greeting: bytes, *, died: Callable[[], str | None] = lambda: None,
                timeout: float = 15.0, what: str = "server") -> None:
    """Wait until a server on `port` greets with `greeting` (`220`, `* OK`).

    `died` says why the server is gone (its exit and log), or None while it runs.
    """
    def greets() -> bool:
        if (why := died()) is not None:
            raise AssertionError(f"{what} did not start: {why}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(64).startswith(greeting)
        return False
    wait_for(greets, timeout, f"{what} to greet")


class Sink:
    """A real SMTP server that keeps what it is handed (or refuses it)."""

    def __init__(self, port: int | None = None):
        self.messages: list[dict[str, Any]] = []
        self.reply = "250 2.0.0 OK"
        self.delay = 0.0            # seconds this relay takes per mail (a slow relay)
        self.refuse_to: dict[str, str] = {}    # recipient -> the answer to mail for them
        self.lock = threading.Lock()
        sink = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                if sink.delay:
                    await asyncio.sleep(sink.delay)     # the relay's own slowness, not a wait in a test
                if not sink.reply.startswith("250"):
                    return sink.reply
                for r in envelope.rcpt_tos:
                    if r.lower() in sink.refuse_to:
                        return sink.refuse_to[r.lower()]
                msg = email.message_from_bytes(envelope.original_content or envelope.content,
                                               policy=email.policy.default)
                with sink.lock:
                    sink.messages.append({"rcpt": [r.lower() for r in envelope.rcpt_tos],
                                          "mail_from": envelope.mail_from, "msg": msg,
                                          "raw": envelope.original_content})
                return "250 2.0.0 OK"

        self.port = port or free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()

    def to(self, addr: str) -> list[EmailMessage]:
        with self.lock:
            return [m["msg"] for m in self.messages if addr.lower() in m["rcpt"]]

    def wait_to(self, addr: str, count: int = 1, timeout: float = 15.0) -> list[EmailMessage]:
        return wait_for(lambda: (found := self.to(addr)) and len(found) >= count and found,
                        timeout, f"{count} mail(s) to {addr}")


def mail(frm: str, to: str, subject: str, body: str, *, cc: str | None = None,
         headers: dict[str, str] | None = None, msgid: str | None = None) -> EmailMessage:
    m = EmailMessage(policy=email.policy.SMTP)
    m["From"] = frm
    m["To"] = to
    if cc:
        m["Cc"] = cc
    m["Subject"] = subject
    m["Date"] = formatdate(localtime=False)
    m["Message-ID"] = msgid or make_msgid(domain=parseaddr(frm)[1].split("@")[-1] or "test.invalid")
    for k, v in (headers or {}).items():
        m[k] = v
    m.set_content(body)
    return m


def reply_to(original: EmailMessage, frm: str, body: str, subject: str | None = None,
             to: str = SUPPORT) -> EmailMessage:
    m = mail(frm, to, subject if subject is not None else "Re: " + str(original["Subject"]), body)
    m["In-Reply-To"] = str(original["Message-ID"])
    refs = (str(original["References"]) + " " if original["References"] else "") + str(original["Message-ID"])
    m["References"] = refs
    return m


def agent_reply(note: EmailMessage, body: str, *, frm: str = STAFF, client: str | None = None,
                subject: str | None = None) -> EmailMessage:
    """An agent answering a staff notification (`note`, as it reached their sink) the way
    a real one does: from their mail client (tests/mailclients.py's `client`, or a plain
    reply), to the notification's reply address, keeping its In-Reply-To/References.
    That reply address and Message-ID carry the staff token that proves the agent."""
    to = str(note["Reply-To"] or SUPPORT)
    if client is not None:
        from mailclients import CLIENTS
        return CLIENTS[client](note, frm, to, body)
    return reply_to(note, frm, body, subject, to=to)


def uniq(word: str = "case") -> str:
    return f"{word}-{uuid.uuid4().hex[:8]}"


def open_ticket_with_notices(gw: GatewayProc, who: str, name: str | None = None
                             ) -> tuple[dict[str, Any], EmailMessage, EmailMessage]:
    """A new ticket from `who`, its acknowledgement and the AMER queue's notification."""
    key = uniq("Backup fails")
    frm = f"{name} <{who}>" if name else who
    assert gw.send(mail(frm, SUPPORT, key, "Backup fails with 0x80040115."))[0] == 250
    t = gw.ticket_by_subject(key)
    ack = gw.sink.wait_to(who)[0]
    note = next(m for m in gw.sink.wait_to(QUEUES["AMER"]) if f"#{t['id']}]" in str(m["Subject"]))
    return t, ack, note


def bounce_of(ours: EmailMessage, failed: str) -> bytes:
    """A receiving MTA's delivery report (RFC 3464) that `failed` does not take mail,
    quoting our mail `ours` (its Message-ID and Subject)."""
    return (f"From: MAILER-DAEMON@mx.customer.example\r\nTo: {SUPPORT}\r\n"
            f"Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <dsn-{uniq()}@mx.example>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;"
            " boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nMailbox unknown.\r\n"
            "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.customer.example\r\n\r\n"
            f"Final-Recipient: rfc822; {failed}\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
            "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
            f"Message-ID: {ours['Message-ID']}\r\nSubject: {ours['Subject']}\r\n\r\n--B--\r\n").encode()


def settle(gw: GatewayProc) -> None:
    """Everything queued so far has reached the sink (a fresh customer's ack came after it)."""
    who = f"{uniq('sync')}@customer.example"
    assert gw.send(mail(who, SUPPORT, uniq("sync"), "sync"))[0] == 250
    gw.sink.wait_to(who)


def smtp_send(port: int, msg: EmailMessage | bytes, rcpt: list[str] | None = None,
              mail_from: str | None = None) -> tuple[int, str]:
    """One real SMTP transaction; the final answer's code and text."""
    if isinstance(msg, EmailMessage):
        rcpt = rcpt or [a for _, a in email.utils.getaddresses([str(msg["To"])])]
        mail_from = mail_from if mail_from is not None else parseaddr(str(msg["From"]))[1]
        raw = msg.as_bytes()
    else:
        raw = msg
    assert rcpt is not None and mail_from is not None
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        try:
            refused = s.sendmail(mail_from, rcpt, raw)
        except smtplib.SMTPRecipientsRefused as e:
            code, text = next(iter(e.recipients.values()))
            return code, text.decode(errors="replace")
        except smtplib.SMTPResponseException as e:
            return e.smtp_code, e.smtp_error.decode(errors="replace")
        if refused:
            code, text = next(iter(refused.values()))
            return code, text.decode(errors="replace")
        return 250, "OK"


class GatewayProc:
    """A configured gateway: its config file, its `serve` process, its CLI."""

    def __init__(self, root: Path, sink: Sink, gov_sink: Sink, *, extra_toml: str = "",
                 max_size: int = 2_000_000, transport: str = "smtp", lmtp: bool = False,
                 relay_port: int | None = None, store_url: str | None = None, secret_file: str | None = None,
                 outbound: dict[str, Any] | None = None):
        """`outbound`: keys of [outbound] to add or override (tls, username...)."""
        self.root = root
        self.port = free_port()
        self.sink, self.gov_sink = sink, gov_sink
        self.data_dir = root / "data"
        self.config = root / "gateway.toml"
        self.store_url = store_url or pg.store_url()
        # secret_file="shared": the key file every gateway of the test reads (several instances)
        secret = f'token_secret_file = "{root.parent / "shared-secret.key"}"' if secret_file == "shared" \
            else f'token_secret_file = "{secret_file}"' if secret_file else ""
        store = ""
        if self.store_url:
            if "[store]" in extra_toml:
                extra_toml = extra_toml.replace("[store]", f'[store]\nurl = "{self.store_url}"', 1)
            else:
                store = f'[store]\nurl = "{self.store_url}"\n'
        ob = {"transport": transport, "host": "127.0.0.1", "port": relay_port or sink.port,
              "retry_base_seconds": 60, "poll_seconds": 0.2, **(outbound or {})}
        # JSON's strings, numbers and booleans are TOML's too
        outbound_keys = "\n            ".join(f"{k} = {json.dumps(v)}" for k, v in ob.items())
        self.config.write_text(store + textwrap.dedent(f"""
            [gateway]
            data_dir = "{self.data_dir}"
            ticket_tag = "Support"
            {secret}

            [smtp]
            host = "127.0.0.1"
            port = {self.port}
            lmtp = {str(lmtp).lower()}
            max_message_size = {max_size}

            [[mailbox]]
            address = "{SUPPORT}"
            govcloud = false

            [[mailbox]]
            address = "{GOV}"
            govcloud = true

            [outbound]
            {outbound_keys}

            [outbound.govcloud]
            host = "127.0.0.1"
            port = {gov_sink.port}

            [staff]
            addresses = ["{STAFF}"]
            domains = []

            [staff.queues]
            AMER = "{QUEUES['AMER']}"
            EMEA = "{QUEUES['EMEA']}"
            APAC = "{QUEUES['APAC']}"
            GOVCLOUD = "{QUEUES['GOVCLOUD']}"
            """) + textwrap.dedent(extra_toml))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "serve.log"

    @property
    def db_url(self) -> str:
        """The store this gateway uses (the default SQLite file when not configured)."""
        return self.store_url or f"sqlite:///{self.data_dir / 'gateway.db'}"

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement on this gateway's store, from outside, as ops would run it."""
        return pg.query(self.db_url, sql, params)

    # -- process ---------------------------------------------------------
    def start(self, timeout: float = 20.0, preexec_fn: Callable[[], None] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
        with open(self.log, "ab") as out:      # the child has its own copy of the descriptor
            # preexec_fn: only a setrlimit call from the tests that need one
            self.proc = subprocess.Popen([*GATEWAY, "serve", "--config", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=env, preexec_fn=preexec_fn)  # noqa: PLW1509
        proc = self.proc
        wait_banner(self.port, b"220", timeout=timeout, what="gateway serve",
                    died=lambda: None if proc.poll() is None
                    else f"exited {proc.returncode}: {self.log_text()[-800:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError("serve did not stop in time") from None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_text().splitlines() if line.strip()]

    # -- talking to it ---------------------------------------------------
    def send(self, msg: EmailMessage | bytes, rcpt: list[str] | None = None,
             mail_from: str | None = None) -> tuple[int, str]:
        return smtp_send(self.port, msg, rcpt, mail_from)

    def cli(self, *args: str, stdin: bytes | None = None, timeout: float = 60.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([*GATEWAY, *args, "--config", str(self.config)], input=stdin,
                           capture_output=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(errors="replace"),
                                           p.stderr.decode(errors="replace"))

    def tickets(self, *extra: str) -> list[dict[str, Any]]:
        """`tickets list --json`: the commercial tickets, or GovCloud's with "--govcloud"."""
        r = self.cli("tickets", "list", "--json", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def all_tickets(self, *extra: str) -> list[dict[str, Any]]:
        """Both enclaves' tickets, newest first (two `tickets list` runs: they never mix)."""
        both = self.tickets(*extra) + self.tickets("--govcloud", *extra)
        return sorted(both, key=lambda t: t["id"], reverse=True)

    def ticket(self, tid: int) -> dict[str, Any]:
        """`tickets show ID --json` of either enclave (a GovCloud ticket needs --govcloud)."""
        r = self.cli("tickets", "show", str(tid), "--json")
        if r.returncode == 1 and "--govcloud" in r.stderr:
            r = self.cli("tickets", "show", str(tid), "--json", "--govcloud")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def ticket_by_subject(self, needle: str) -> dict[str, Any]:
        found = [t for t in self.all_tickets() if needle in t["subject"]]
        assert len(found) == 1, f"{len(found)} tickets with {needle!r}"
        return self.ticket(found[0]["id"])


OLD_TICKET = ("INSERT INTO tickets (subject, status, requester, region, govcloud, priority, mailbox,"
              " created_at, updated_at) VALUES (?, 'open', 'old@customer.example',"
              " 'AMER', 0, 3, ?, '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')")


def earlier_store(gw: GatewayProc, version: int, rows: list[tuple[str, tuple[Any, ...]]]) -> None:
    """`gw`'s store as an earlier version left it: the schema at `version`
    (migrations 1..version) and `rows` written (statement, parameters); on
    whichever store the tests run on. The next open migrates the rest."""
    from gateway.store import MIGRATIONS
    from gateway.store.drivers import connect

    async def build() -> None:
        db = await connect(gw.db_url, 5000)
        try:
            await db.migrate(MIGRATIONS[:version])
            await db.begin()
            for sql, params in rows:
                await db.execute(sql, params)
            await db.commit()
        finally:
            await db.close()
    gw.data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(build())


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="gw-test-"))
    yield d
    import shutil
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sinks() -> Iterator[tuple[Sink, Sink]]:
    relay, gov = Sink(), Sink()
    yield relay, gov
    relay.stop()
    gov.stop()


@pytest.fixture
def make_gateway(workdir: Path, sinks: tuple[Sink, Sink]) -> Iterator[Callable[..., GatewayProc]]:
    made: list[GatewayProc] = []

    def make(**kwargs: Any) -> GatewayProc:
        root = workdir / f"gw{len(made)}"
        root.mkdir()
        gw = GatewayProc(root, *sinks, **kwargs)
        made.append(gw)
        return gw
    yield make
    for gw in made:
        gw.kill()


@pytest.fixture
def gateway(make_gateway: Callable[..., GatewayProc]) -> GatewayProc:
    """A running `gateway serve` with both relays up."""
    gw = make_gateway()
    gw.start()
    return gw


# -- the store the suite runs on (tests/pg.py) ------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: about SQLite itself (its file, its locks,"
                            " its query plans): not run when GATEWAY_TEST_STORE=postgresql")


def pytest_report_header(config: pytest.Config) -> str:
    return f"store: {pg.STORE} (GATEWAY_TEST_STORE)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not pg.ON_POSTGRES:
        return
    about_sqlite = [i for i in items if i.get_closest_marker("sqlite_only")]
    if about_sqlite:
        config.hook.pytest_deselected(items=about_sqlite)
        items[:] = [i for i in items if not i.get_closest_marker("sqlite_only")]


def pytest_sessionfinish(session: pytest.Session) -> None:
    pg.CLUSTER.stop()
