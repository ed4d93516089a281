"""IMAP ingestion against a real Dovecot (Debian's dovecot-imapd), started here.

The poller runs in-process with a real gateway (real SQLite store, real
intake); mail is APPENDed with a second IMAP client, as an MTA's delivery
agent would put it there. Waiting is for conditions, never for time.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import smtplib
import subprocess
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pg
import pytest
from conftest import SUPPORT, free_port, mail, uniq, wait_banner
from imapclient import IMAPClient
from structlog.testing import capture_logs
from tlscerts import make_pki

from gateway.app import Gateway, open_gateway
from gateway.clock import system_clock
from gateway.config import ImapAccount, parse_imap
from gateway.config import parse as parse_config
from gateway.inbound.imap import ImapPoller, ImapState
from gateway.inbound.smtp import Listener, SupportHandler

PASSWORD = "secret"


class Dovecot:
    """A private Dovecot on 127.0.0.1 (RECIPES.md §1): its own dir, port and users."""

    def __init__(self, capability: str | None = None, *, tls: bool = False, auth_port: int | None = None):
        """`tls`: a certificate from a test CA (`self.pki`), STARTTLS on `port` and
        IMAPS on `imaps_port`; `auth_port`: Dovecot's SASL for Postfix on that port."""
        self.dir = Path(tempfile.mkdtemp(prefix="gw-dovecot-"))
        os.chmod(self.dir, 0o755)        # dovecot's auth runs as user dovecot: needs +x
        (self.dir / "mail").mkdir()
        shutil.chown(self.dir / "mail", "nobody", "nogroup")
        # accounts are made up front: Dovecot re-reads passwd-file when its mtime
        # changes, and two changes within one second would look like one
        self.users = self.dir / "users"
        self.free_users = [uniq("support") for _ in range(20)]
        self.users.write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}\n" for u in self.free_users))
        self.port = free_port()
        self.imaps_port = free_port() if tls else 0
        extra = f"imap_capability = {capability}\n" if capability else ""
        ssl_conf = "ssl = no"
        if tls:
            self.pki = make_pki(self.dir)
            ssl_conf = "ssl = yes"
            extra += f"ssl_cert = <{self.pki.server.cert}\nssl_key = <{self.pki.server.key}\n"
        if auth_port:
            extra += textwrap.dedent(f"""\
                auth_mechanisms = plain login
                # no growing delay (2 s, 4 s... 15 s) after each wrong password from 127.0.0.1
                service anvil {{
                  unix_listener anvil-auth-penalty {{
                    mode = 0
                  }}
                }}
                service auth {{
                  inet_listener {{
                    address = 127.0.0.1
                    port = {auth_port}
                  }}
                }}
                """)
        self.conf = self.dir / "dovecot.conf"
        self.conf.write_text(textwrap.dedent(f"""\
            instance_name = gw-test-dovecot-{self.port}
            base_dir = {self.dir}/run
            state_dir = {self.dir}/state
            log_path = {self.dir}/dovecot.log
            protocols = imap
            listen = 127.0.0.1
            {ssl_conf}
            disable_plaintext_auth = no
            auth_failure_delay = 0
            mail_location = maildir:~/Maildir
            service imap-login {{
              inet_listener imap {{
                port = {self.port}
              }}
              inet_listener imaps {{
                port = {self.imaps_port}
              }}
            }}
            passdb {{
              driver = passwd-file
              args = scheme=PLAIN username_format=%u {self.users}
            }}
            userdb {{
              driver = static
              args = uid=nobody gid=nogroup home={self.dir}/mail/%u
            }}
            namespace inbox {{
              inbox = yes
              separator = /
            }}
            """) + extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        proc = self.proc = subprocess.Popen(["dovecot", "-F", "-c", str(self.conf)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_banner(self.port, b"* OK", what="dovecot",
                    died=lambda: None if proc.poll() is None else self.log()[-1000:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            # End the IMAP sessions first, as an init system's restart does: a
            # foreground master leaves its imap processes running when it exits
            subprocess.run(["doveadm", "-c", str(self.conf), "kick", "*"], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)

    def log(self) -> str:
        path = self.dir / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def add_user(self) -> str:
        """A fresh account: an empty mailbox of its own."""
        return self.free_users.pop()

    @contextlib.contextmanager
    def client(self, user: str) -> Iterator[IMAPClient]:
        c = IMAPClient("127.0.0.1", port=self.port, ssl=False, timeout=10)
        c.login(user, PASSWORD)
        try:
            yield c
        finally:
            with contextlib.suppress(Exception):
                c.logout()

    def append(self, user: str, *raws: bytes, folder: str = "INBOX") -> None:
        with self.client(user) as c:
            if not c.folder_exists(folder):
                c.create_folder(folder)
            for raw in raws:
                c.append(folder, raw)

    def folder(self, user: str, folder: str) -> dict[int, tuple[bytes, ...]]:
        """UID -> flags of every message in `folder` ({} if it does not exist)."""
        with self.client(user) as c:
            if not c.folder_exists(folder):
                return {}
            c.select_folder(folder, readonly=True)
            uids = c.search("ALL")
            return {uid: tuple(d[b"FLAGS"]) for uid, d in c.fetch(uids, ["FLAGS"]).items()} if uids else {}


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    d = Dovecot()
    d.start()
    yield d
    d.stop()
    shutil.rmtree(d.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def dovecot_basic() -> Iterator[Dovecot]:
    """A server that offers neither IDLE nor MOVE nor UIDPLUS: polling, COPY + EXPUNGE."""
    d = Dovecot(capability="IMAP4rev1 LITERAL+ SASL-IR LOGIN-REFERRALS ID ENABLE NAMESPACE")
    d.start()
    yield d
    d.stop()
    shutil.rmtree(d.dir, ignore_errors=True)


# -- an in-process gateway and its pollers ---------------------------------------

class Rig:
    def __init__(self, gw: Gateway, root: Path):
        self.gw = gw
        self.root = root
        self.state = ImapState(gw.config.data_dir / "imap-state.json")
        self.tasks: list[tuple[ImapPoller, asyncio.Task[None]]] = []

    def account(self, server: Dovecot, user: str, **kw: Any) -> ImapAccount:
        return ImapAccount(host="127.0.0.1", port=server.port, tls=False, user=user, password=PASSWORD,
                           mailbox=SUPPORT, poll_seconds=kw.pop("poll_seconds", 30.0), **kw)

    def start(self, account: ImapAccount) -> ImapPoller:
        poller = ImapPoller(account, self.gw.intake, self.gw.config.mailboxes[0], self.state,
                            system_clock, backoff_base_s=0.05, backoff_max_s=0.3)
        self.tasks.append((poller, asyncio.create_task(poller.run())))
        return poller

    async def stop(self, poller: ImapPoller) -> None:
        task = next(t for p, t in self.tasks if p is poller)
        poller.stop()
        await asyncio.wait_for(task, 5)

    async def tickets(self) -> int:
        return len(await self.gw.store.tickets())

    async def inbound(self) -> dict[str, int]:
        return await self.gw.store.inbound_counts()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="gw-imap-"))
    config = parse_config({"gateway": {"data_dir": str(root / "data")},
                           "outbound": {"transport": "maildir"},
                           "mailbox": [{"address": SUPPORT}],
                           "store": {"busy_timeout_ms": 100, **pg.store_section().get("store", {})}})
    gw = await open_gateway(config)
    r = Rig(gw, root)
    yield r
    for poller, task in r.tasks:
        poller.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
    await gw.close()
    shutil.rmtree(root, ignore_errors=True)


async def until(pred: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `pred` (plain or async) until it returns something truthy; fail after `timeout`."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def customer_mail(n: int | str = "") -> bytes:
    return mail(f"Ann{n} <ann{n}@customer.example>", SUPPORT, uniq(f"IMAP case {n}"),
                "Our backup fails.").as_bytes()


def folder(server: Dovecot, user: str, name: str) -> Callable[[], Awaitable[dict[int, tuple[bytes, ...]]]]:
    return lambda: asyncio.to_thread(server.folder, user, name)


# -- the tests -------------------------------------------------------------------

async def test_imap_mail_becomes_tickets_and_moves_only_after_the_commit(dovecot: Dovecot, rig: Rig) -> None:
    user = dovecot.add_user()
    await asyncio.to_thread(dovecot.append, user, *(customer_mail(i) for i in range(3)))
    # the store cannot commit: hold its write lock (busy_timeout is 100 ms)
    lock = pg.WriteLock(rig.gw.config.store_url)
    with capture_logs() as logs:
        poller = rig.start(rig.account(dovecot, user))
        await until(lambda: any(e["event"] == "imap.retry" and "StoreUnavailable" in e["error"]
                                for e in logs), what="a refused commit")
        inbox = await asyncio.to_thread(dovecot.folder, user, "INBOX")
        # nothing committed: everything still there, nothing marked read or deleted
        assert len(inbox) == 3 and all(not flags for flags in inbox.values()), inbox
        assert await asyncio.to_thread(dovecot.folder, user, "Processed") == {}
        lock.release()
        processed = await until(lambda: _when(folder(dovecot, user, "Processed"), lambda f: len(f) == 3),
                                what="3 mails in Processed")
    assert await asyncio.to_thread(dovecot.folder, user, "INBOX") == {}
    assert all(b"\\Seen" not in flags for flags in processed.values())      # fetched with BODY.PEEK
    assert await rig.tickets() == 3
    assert await rig.inbound() == {"processed": 3}
    state = json.loads((rig.gw.config.data_dir / "imap-state.json").read_text())
    assert state[f"{user}@127.0.0.1:{dovecot.port}/INBOX"]["last_uid"] == 3
    # stop() breaks off the IDLE at once, although the next poll would be 30 s away
    started = time.monotonic()
    await rig.stop(poller)
    assert time.monotonic() - started < 2


async def _when(get: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool]) -> Any:
    """`get()`'s value once `ok` accepts it (True for an accepted empty value), else None."""
    value = await get()
    return (value or True) if ok(value) else None


async def test_imap_poller_reconnects_after_a_dovecot_restart_without_loss_or_duplicates(
        dovecot: Dovecot, rig: Rig) -> None:
    user = dovecot.add_user()
    rig.start(rig.account(dovecot, user))
    await asyncio.to_thread(dovecot.append, user, customer_mail(1), customer_mail(2))
    await until(lambda: _when(rig.tickets, lambda n: n == 2), what="2 tickets")
    with capture_logs() as logs:
        await asyncio.to_thread(dovecot.stop)
        await asyncio.to_thread(dovecot.start)        # same dir: mail and UIDVALIDITY kept
        await asyncio.to_thread(dovecot.append, user, customer_mail(3), customer_mail(4), customer_mail(5))
        await until(lambda: _when(folder(dovecot, user, "Processed"), lambda f: len(f) == 5),
                    what="5 mails in Processed")
    assert any(e["event"] == "imap.retry" for e in logs)        # the connection really broke
    assert await asyncio.to_thread(dovecot.folder, user, "INBOX") == {}
    assert await rig.tickets() == 5
    assert await rig.inbound() == {"processed": 5}


async def test_changed_uidvalidity_rescans_without_duplicates(dovecot: Dovecot, rig: Rig) -> None:
    user = dovecot.add_user()
    first = customer_mail("A")
    await asyncio.to_thread(dovecot.append, user, first, folder="Support")
    poller = rig.start(rig.account(dovecot, user, folder="Support"))
    await until(lambda: _when(rig.tickets, lambda n: n == 1), what="the first ticket")
    await rig.stop(poller)
    key = f"{user}@127.0.0.1:{dovecot.port}/Support"
    old_validity, last_uid = rig.state.get(key)
    assert last_uid == 1

    def recreate() -> int:
        with dovecot.client(user) as c:
            c.delete_folder("Support")
            c.create_folder("Support")
            # a new mail first: it gets UID 1 again, which the old state calls "done"
            c.append("Support", customer_mail("C"))
            c.append("Support", first)              # and the first one, delivered again
            return int(c.select_folder("Support", readonly=True)[b"UIDVALIDITY"])
    new_validity = await asyncio.to_thread(recreate)
    assert new_validity != old_validity

    rig.start(rig.account(dovecot, user, folder="Support"))
    await until(lambda: _when(folder(dovecot, user, "Support"), lambda f: f == {}), what="Support emptied")
    assert await rig.tickets() == 2                  # C is a ticket, A is not twice
    assert await rig.inbound() == {"processed": 2, "duplicate": 1}
    assert rig.state.get(key) == (new_validity, 2)


async def test_a_poison_message_is_quarantined_and_does_not_block_the_rest(dovecot: Dovecot, rig: Rig) -> None:
    user = dovecot.add_user()
    no_sender = b"Subject: who sent this?\r\n\r\nnobody knows\r\n"
    junk = bytes(range(1, 256)) * 4 + b"\r\n"
    await asyncio.to_thread(dovecot.append, user, no_sender, junk, customer_mail(1), customer_mail(2))
    rig.start(rig.account(dovecot, user))
    await until(lambda: _when(folder(dovecot, user, "Processed"), lambda f: len(f) == 4),
                what="all 4 moved")
    assert await asyncio.to_thread(dovecot.folder, user, "INBOX") == {}
    assert await rig.tickets() == 2
    assert await rig.inbound() == {"processed": 2, "quarantined": 2}      # kept for ops, committed


async def test_without_idle_and_move_it_polls_and_copies_then_expunges(dovecot_basic: Dovecot, rig: Rig) -> None:
    user = dovecot_basic.add_user()
    with dovecot_basic.client(user) as c:
        caps = set(c.capabilities())
    assert not caps & {b"IDLE", b"MOVE", b"UIDPLUS"}
    rig.start(rig.account(dovecot_basic, user, poll_seconds=0.1, processed_folder="Done"))
    await asyncio.to_thread(dovecot_basic.append, user, customer_mail(1), customer_mail(2))
    await until(lambda: _when(folder(dovecot_basic, user, "Done"), lambda f: len(f) == 2),
                what="2 mails in Done")
    assert await asyncio.to_thread(dovecot_basic.folder, user, "INBOX") == {}   # copied, then expunged
    assert await rig.tickets() == 2


async def test_the_same_mail_by_smtp_and_by_imap_makes_one_ticket(dovecot: Dovecot, rig: Rig) -> None:
    user = dovecot.add_user()
    port = free_port()
    config = parse_config({"gateway": {"data_dir": str(rig.gw.config.data_dir)},
                           "smtp": {"port": port}, "outbound": {"transport": "maildir"},
                           "mailbox": [{"address": SUPPORT}]})
    listener = Listener(config, SupportHandler(config, rig.gw.intake, system_clock))
    await listener.start()
    try:
        raw = customer_mail("twice")

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail("ann@customer.example", [SUPPORT], raw)
        await asyncio.to_thread(send)
        assert await rig.tickets() == 1
        await asyncio.to_thread(dovecot.append, user, raw)        # the same mail, also by IMAP
        rig.start(rig.account(dovecot, user))
        await until(lambda: _when(folder(dovecot, user, "Processed"), lambda f: len(f) == 1),
                    what="the IMAP copy processed")
    finally:
        await listener.stop(1)
    assert await rig.tickets() == 1
    assert await rig.inbound() == {"processed": 1, "duplicate": 1}


# -- configuration (pure) ----------------------------------------------------------

def test_parse_imap_reads_accounts_with_defaults(tmp_path: Path) -> None:
    secret = tmp_path / "imap.pw"
    secret.write_text("s3cret\n")
    accounts, problems = parse_imap(
        [{"host": "imap.example.com", "user": "support", "password_file": str(secret),
          "mailbox": "Support@Example.com"},
         {"host": "127.0.0.1", "port": 1143, "tls": False, "user": "gov", "password": "x",
          "mailbox": "support@examplegov.com", "folder": "Support", "processed_folder": "Support/Done",
          "poll_seconds": 5}],
        {"support@example.com", "support@examplegov.com"})
    assert problems == []
    a, b = accounts
    assert (a.port, a.tls, a.folder, a.processed_folder, a.poll_seconds) == (993, True, "INBOX", "Processed", 60)
    assert a.mailbox == "support@example.com" and a.secret() == "s3cret"
    assert (b.port, b.tls, b.folder, b.processed_folder, b.poll_seconds) == (1143, False, "Support",
                                                                             "Support/Done", 5)


def test_parse_imap_names_every_wrong_key() -> None:
    _, problems = parse_imap(
        [{"host": "", "port": 70000, "tls": "yes", "user": "u", "password": "p", "password_file": "/x",
          "mailbox": "other@example.com", "poll_seconds": 0, "folder": "INBOX",
          "processed_folder": "INBOX", "colour": "blue"},
         {"host": "h", "user": "u", "password_file": "/nonexistent/pw", "mailbox": "support@example.com"},
         "not a table"],
        {"support@example.com"})
    keys = [p.split(":")[0] for p in problems]
    assert keys == ["imap[0].colour", "imap[0].host", "imap[0].tls", "imap[0].port", "imap[0].password",
                    "imap[0].processed_folder", "imap[0].mailbox", "imap[0].poll_seconds",
                    "imap[1].password_file", "imap[2]"], problems
    assert parse_imap(None, set()) == ((), [])
    assert parse_imap({"host": "x"}, set())[1] == ["imap: expected [[imap]] tables"]


async def test_one_instance_at_a_time_polls_a_mailbox_and_another_takes_over_when_it_dies(
        dovecot: Dovecot, rig: Rig) -> None:
    """Two instances configured with the same account (each its own state file,
    as on two hosts): the lease holder polls, the other stands by; when the
    holder dies (no release, no logout) the other takes over once the lease
    has run out, and no mail is fetched twice."""
    from gateway.store.leases import StoreLease
    user = dovecot.add_user()
    account = rig.account(dovecot, user, poll_seconds=0.3)
    lease_s = 1.5

    def instance(holder: str, state: ImapState) -> tuple[ImapPoller, asyncio.Task[None]]:
        lease = StoreLease(rig.gw.store, f"imap:{account.name}", holder, lease_s, system_clock)
        poller = ImapPoller(account, rig.gw.intake, rig.gw.config.mailboxes[0], state, system_clock,
                            backoff_base_s=0.05, backoff_max_s=0.3, lease=lease)
        task = asyncio.create_task(poller.run())
        rig.tasks.append((poller, task))
        return poller, task

    with capture_logs() as logs:
        def takers() -> list[str]:
            return [e["holder"] for e in logs if e["event"] == "imap.lease_taken"]
        _, a_task = instance("A", rig.state)
        await until(lambda: takers() == ["A"], what="A to take the lease")
        instance("B", ImapState(rig.root / "b" / "imap-state.json"))
        await asyncio.to_thread(dovecot.append, user, *(customer_mail(i) for i in range(3)))
        await until(lambda: _when(folder(dovecot, user, "Processed"), lambda f: len(f) == 3),
                    what="3 mails in Processed")
        assert await rig.inbound() == {"processed": 3}      # fetched once: B stood by
        assert takers() == ["A"]

        a_task.cancel()                                     # A dies holding the lease
        died = time.monotonic()
        with contextlib.suppress(asyncio.CancelledError):
            await a_task
        rig.tasks = [(p, t) for p, t in rig.tasks if t is not a_task]
        await asyncio.to_thread(dovecot.append, user, *(customer_mail(i) for i in range(3, 5)))
        await until(lambda: _when(folder(dovecot, user, "Processed"), lambda f: len(f) == 5),
                    what="B to take over")
        took = time.monotonic() - died
    assert takers() == ["A", "B"]
    assert await rig.inbound() == {"processed": 5} and await rig.tickets() == 5
    assert took < lease_s * 4, f"took over after {took:.1f} s with a {lease_s} s lease"


async def test_imap_mail_over_a_limit_is_quarantined_with_its_reason_never_ticketed(
        dovecot: Dovecot, rig: Rig) -> None:
    """Project issue 14: IMAP intake applied no size and no structure limit."""
    from test_bounds import SHAPES
    rig.gw.intake.max_message_size = 200_000          # what [smtp] max_message_size = 200000 sets
    user = dovecot.add_user()
    big = mail("big@customer.example", SUPPORT, uniq("big"), "x" * 300_000).as_bytes()
    await asyncio.to_thread(dovecot.append, user, SHAPES["boundary of 250 characters"](150),
                            SHAPES["bare CR line ends"](150), big, customer_mail(1))
    rig.start(rig.account(dovecot, user))
    await until(lambda: _when(folder(dovecot, user, "Processed"), lambda f: len(f) == 4), what="all 4 moved")
    assert await rig.tickets() == 1
    assert await rig.inbound() == {"processed": 1, "quarantined": 3}
    errors = sorted(e["error"] for e in await rig.gw.store.quarantined())
    assert errors[0].startswith("over [limits]: 3") and "max_message_size" in errors[0], errors
    assert all("more than 100 attachments" in e for e in errors[1:]), errors


# -- TLS (issue 16): IMAPS and STARTTLS, the certificate verified ---------------------

@pytest.fixture(scope="module")
def dovecot_tls() -> Iterator[Dovecot]:
    """Dovecot with a certificate from a test CA: STARTTLS on `port`, IMAPS on `imaps_port`."""
    d = Dovecot(tls=True)
    d.start()
    yield d
    d.stop()
    shutil.rmtree(d.dir, ignore_errors=True)


@pytest.mark.parametrize("mode", ["imaps", "starttls"])
async def test_imap_over_tls_verified_against_the_configured_ca(dovecot_tls: Dovecot, rig: Rig, mode: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    user = dovecot_tls.add_user()
    await asyncio.to_thread(dovecot_tls.append, user, customer_mail(1), customer_mail(2))
    # IMAPS with the password in the config, STARTTLS with it in the environment
    monkeypatch.setenv("GW_TEST_IMAP_PASSWORD", PASSWORD)
    tls = {"tls": True, "port": dovecot_tls.imaps_port, "password": PASSWORD} if mode == "imaps" else \
        {"starttls": True, "port": dovecot_tls.port, "password_env": "GW_TEST_IMAP_PASSWORD"}
    account, problems = parse_imap([{"host": "127.0.0.1", "user": user, "mailbox": SUPPORT,
                                     "ca_file": str(dovecot_tls.pki.ca), **tls}], {SUPPORT})
    assert problems == []
    rig.start(account[0])
    await until(lambda: _when(folder(dovecot_tls, user, "Processed"), lambda f: len(f) == 2),
                what="2 mails in Processed")
    assert await rig.tickets() == 2
    # the poller's login went through TLS (the test's own helper logs in without)
    logins = [line for line in dovecot_tls.log().splitlines() if f"Login: user=<{user}>" in line]
    assert any(", TLS," in line for line in logins), logins


@pytest.mark.parametrize("mode", ["imaps", "starttls"])
async def test_imap_refuses_a_certificate_it_cannot_verify_and_leaves_the_mail(dovecot_tls: Dovecot, rig: Rig,
                                                                               mode: str) -> None:
    """No ca_file: the system's CAs do not know the test CA, as with a man in the middle."""
    user = dovecot_tls.add_user()
    await asyncio.to_thread(dovecot_tls.append, user, customer_mail(1))
    tls = {"tls": True, "port": dovecot_tls.imaps_port} if mode == "imaps" else \
        {"starttls": True, "port": dovecot_tls.port}
    account, problems = parse_imap([{"host": "127.0.0.1", "user": user, "password": PASSWORD,
                                     "mailbox": SUPPORT, **tls}], {SUPPORT})
    assert problems == []
    with capture_logs() as logs:
        poller = rig.start(account[0])
        retries = await until(lambda: [e for e in logs if e["event"] == "imap.retry"][:2],
                              what="two refused connections")
        await rig.stop(poller)
    for e in retries:
        assert e["error"].startswith("TLS certificate not trusted (unable to get local issuer certificate; "
                                     "checked against the system's CAs): set ca_file"), e
    # no login over TLS (the test's helper logs in without): the password never left
    assert not [line for line in dovecot_tls.log().splitlines() if f"Login: user=<{user}>" in line
                and ", TLS," in line]
    assert len(await asyncio.to_thread(dovecot_tls.folder, user, "INBOX")) == 1
    assert await rig.tickets() == 0
