"""Zero loss under crashes and faults, against a real `gateway serve` and real SMTP peers.

- kill -9 of the whole serve process group under concurrent load;
- the relay refusing (4xx) or failing permanently (5xx);
- the disk full (a real tmpfs filled to ENOSPC) and the data directory
  unwritable (file modes the serve process must obey);
- SIGTERM while several clients are sending.

The rule checked throughout is CONTRACT.md's: `250` only after the commit,
so every mail that got `250` is on exactly one ticket after any crash, and
every fault is answered `451` (or `ingest` exit 75), never `5xx`.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import smtplib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from conftest import GATEWAY, LOAD_LIMITS, QUEUES, SUPPORT, GatewayProc, agent_reply, mail, uniq, wait_for

FUTURE = "2099-01-01T00:00:00+00:00"


# -- helpers ---------------------------------------------------------------

@dataclass
class Sent:
    """One mail a load client tries to deliver, and what it was answered."""

    sender: str
    key: str
    msg: EmailMessage
    codes: list[int | str] = field(default_factory=list)   # an int per answer, "error" per failure

    @property
    def accepted(self) -> bool:
        return 250 in self.codes


class LoadClient:
    """One SMTP client on a kept-open connection, like an MTA's delivery agent."""

    def __init__(self, port: int):
        self.port = port
        self.conn: smtplib.SMTP | None = None

    def send(self, item: Sent) -> None:
        try:
            if self.conn is None:
                self.conn = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
            self.conn.sendmail(item.sender, [SUPPORT], item.msg.as_bytes())
            item.codes.append(250)
        except smtplib.SMTPResponseException as e:
            item.codes.append(e.smtp_code)
            self.close()
        except (smtplib.SMTPException, OSError):
            item.codes.append("error")
            self.close()

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None


def run_clients(port: int, batches: list[list[Sent]], *, stop_on_failure: bool = False) -> None:
    """Send each batch from its own client thread, concurrently; return when all are done.
    With `stop_on_failure` a client gives up at its first answer other than 250, as an
    MTA defers the rest of its queue for a host that said 421."""
    def work(batch: list[Sent]) -> None:
        client = LoadClient(port)
        for item in batch:
            client.send(item)
            if stop_on_failure and not item.accepted:
                break
        client.close()
    threads = [threading.Thread(target=work, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a load client hung"


def load(n_clients: int, per_client: int, word: str) -> list[list[Sent]]:
    """Mails from distinct customers (so that the per-sender cap never applies)."""
    run = uniq(word)
    return [[Sent(f"{run}-{c}-{i}@load.example", f"{run} {c}/{i}",
                  mail(f"{run}-{c}-{i}@load.example", SUPPORT, f"{run} {c}/{i}", "under load"))
             for i in range(per_client)] for c in range(n_clients)]


def tickets_by_requester(gw: GatewayProc) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for t in gw.tickets():
        out.setdefault(t["requester"], []).append(t)
    return out


def run_due(gw: GatewayProc, now: str) -> dict[str, Any]:
    r = gw.cli("run-due", "--now", now)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def events_in(text: str, name: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                e = json.loads(line)
                if e.get("event") == name:
                    out.append(e)
    return out


def without_dac_override() -> None:
    """preexec_fn: make a root child obey file modes, as any other user does.

    Root bypasses permission bits through CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH;
    dropping both from the bounding set before exec removes them from the
    new program (capabilities(7)), so a read-only data directory is read-only
    to it. A non-root child needs nothing.
    """
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):            # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:     # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def ingest(gw: GatewayProc, msg: EmailMessage, preexec_fn: Callable[[], None] | None = None
           ) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    return subprocess.run([*GATEWAY, "ingest", "--config", str(gw.config), "--recipient", SUPPORT],
                          input=msg.as_bytes(), capture_output=True, timeout=60, env=env,
                          preexec_fn=preexec_fn)


def with_attachment(frm: str, subject: str, size: int = 200_000) -> EmailMessage:
    m = mail(frm, SUPPORT, subject, "log attached")
    m.add_attachment(os.urandom(size), maintype="application", subtype="octet-stream",
                     filename="trace.bin")
    return m


# -- 1. crash safety ---------------------------------------------------------

def test_kill_9_under_concurrent_load_loses_no_accepted_mail(
        make_gateway: Callable[..., GatewayProc]) -> None:
    """8 clients send 320 mails; serve's process group is SIGKILLed mid-stream.

    After a restart, and after the clients retry what got no 250 (as MTAs do),
    every mail is on exactly one ticket, and every ticket's acknowledgement
    reached the relay (a repeat only with the same Message-ID: an ack sent
    before the kill and not yet marked sent goes again, as the same bytes).
    """
    gw = make_gateway(extra_toml=LOAD_LIMITS)
    gw.start()
    batches = load(8, 40, "kill9")
    items = [i for b in batches for i in b]
    loader = threading.Thread(target=run_clients, args=(gw.port, batches))
    loader.start()
    wait_for(lambda: sum(i.accepted for i in items) >= 100, 60, "100 accepted mails")
    gw.kill()                                   # SIGKILL to serve's whole process group
    loader.join(120)
    accepted_before = [i for i in items if i.accepted]
    unanswered = [i for i in items if not i.accepted]
    assert accepted_before and unanswered, "the kill must land while mail is being sent"

    gw.start()
    # every mail that got 250 before the kill is there, once
    by_requester = tickets_by_requester(gw)
    lost = [i.key for i in accepted_before if len(by_requester.get(i.sender, [])) != 1]
    assert lost == [], f"accepted before the kill but not on exactly one ticket: {lost[:5]}"

    # the senders retry what got no 250, as an MTA would
    retry = [unanswered[k::8] for k in range(8)]
    run_clients(gw.port, retry)
    assert all(i.accepted for i in items), [i.codes for i in items if not i.accepted][:5]

    # rows leased by the killed sender are due again once their lease ends
    run_due(gw, FUTURE)
    by_requester = tickets_by_requester(gw)
    assert sum(len(v) for v in by_requester.values()) == len(items)
    for i in items:
        (ticket,) = by_requester[i.sender]
        assert i.key in ticket["subject"]

    def acked() -> bool:
        return all(gw.sink.to(i.sender) for i in items)
    wait_for(acked, 60, "an acknowledgement to every sender")
    repeats = 0
    for i in items:
        acks = gw.sink.to(i.sender)
        assert len({str(a["Message-ID"]) for a in acks}) == 1, f"{i.sender} got different acks"
        assert str(acks[0]["In-Reply-To"]) == str(i.msg["Message-ID"])
        (ticket,) = by_requester[i.sender]
        assert f"[Support #{ticket['id']}]" in str(acks[0]["Subject"])
        repeats += len(acks) - 1
    counts = run_due(gw, FUTURE)["outbox"]
    assert counts.get("queued", 0) == 0 and counts.get("failed", 0) == 0, counts
    print(f"\nkill -9: {len(items)} mails from 8 clients; {len(accepted_before)} accepted before "
          f"the kill, {len(unanswered)} unanswered and retried; lost 0; "
          f"acks repeated with the same Message-ID: {repeats}")


# -- 2. relay faults ---------------------------------------------------------

def test_relay_refusing_4xx_backs_off_exponentially_and_delivers_when_back(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    gw.start()
    gw.sink.reply = "451 4.3.0 relay busy, try later"
    key = uniq("relay refusing")
    assert gw.send(mail("ray@customer.example", SUPPORT, key, "hello"))[0] == 250  # inbound unaffected
    ticket = gw.ticket_by_subject(key)
    wait_for(lambda: len(events_in(gw.log_text(), "outbox.retry")) >= 2, what="first failed tries")
    assert {e["retry_in_s"] for e in events_in(gw.log_text(), "outbox.retry")} == {60}

    # queued mail survives a restart while the relay keeps refusing
    assert gw.stop() == 0
    gw.start()
    waits = []
    t0 = time.time()
    at = t0 + 61
    for _ in range(3):
        r = gw.cli("run-due", "--now", _iso(at))
        assert r.returncode == 0, r.stderr
        tries = [e for e in events_in(r.stderr, "outbox.retry")
                 if e["ticket_id"] == ticket["id"] and e["kind"] in ("ack", "staff_notify")]
        assert len(tries) == 2                      # the ack and the staff notification
        waits.append(tries[0]["retry_in_s"])
        # just before the next try is due, nothing is tried
        early = gw.cli("run-due", "--now", _iso(at + tries[0]["retry_in_s"] - 5))
        assert [e for e in events_in(early.stderr, "outbox.retry")
                if e["kind"] in ("ack", "staff_notify")] == []
        at += tries[0]["retry_in_s"] + 1
    assert waits == [120, 240, 480]                 # retry_base_seconds = 60, doubling

    gw.sink.reply = "250 2.0.0 OK"
    out = run_due(gw, FUTURE)
    assert out["sent"] == 2 and out["outbox"].get("queued", 0) == 0
    ack = gw.sink.wait_to("ray@customer.example")[0]
    assert f"[Support #{ticket['id']}]" in str(ack["Subject"])
    gw.sink.wait_to(QUEUES["AMER"])
    assert run_due(gw, "2099-02-01T00:00:00+00:00")["sent"] == 0     # never twice
    assert len(gw.sink.to("ray@customer.example")) == 1


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(epoch))


def test_relay_permanent_failure_is_recorded_on_the_ticket_as_a_bounce(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    gw.start()
    gw.sink.refuse_to["hal@customer.example"] = "550 5.1.1 <hal@customer.example>: no such user"
    key = uniq("bad address")
    assert gw.send(mail("hal@customer.example", SUPPORT, key, "hello"))[0] == 250
    t = gw.ticket_by_subject(key)
    wait_for(lambda: events_in(gw.log_text(), "outbox.failed"), what="the permanent failure")
    # the queue hears of it (issue 15), in a short notice of its own
    notice = wait_for(lambda: [m for m in gw.sink.to(QUEUES["AMER"])
                               if "could not be delivered" in m.get_body(("plain",)).get_content()],
                      what="the queue's notice")[0]
    assert "hal@customer.example" in notice.get_body(("plain",)).get_content()
    assert gw.stop() == 0                       # and it is all still there after a restart
    gw.start()
    t = gw.ticket(t["id"])
    bounces = [m for m in t["messages"] if m["kind"] == "bounce"]
    assert len(bounces) == 1                    # the ack was refused
    assert all(b["direction"] == "in" and "550 5.1.1" in b["body_text"] for b in bounces)
    assert t["undeliverable"] == ["hal@customer.example"]   # the queue is no participant
    assert t["status"] == "open"
    assert events_in(gw.log_text(), "ticket.undeliverable")[0]["addresses"] == ["hal@customer.example"]

    # the relay takes mail again; nothing more goes to the failed address
    gw.sink.refuse_to.clear()
    # the agent answers the new-ticket notification (its reply address carries the
    # staff token that proves the agent)
    first = next(m for m in gw.sink.to(QUEUES["AMER"]) if f"#{t['id']}]" in str(m["Subject"])
                 and "could not be delivered" not in m.get_body(("plain",)).get_content())
    assert gw.send(agent_reply(first, "We fixed it."))[0] == 250
    out = run_due(gw, FUTURE)
    assert out["outbox"]["failed"] == 1
    assert gw.sink.to("hal@customer.example") == []
    assert events_in(gw.log_text(), "outbox.no_recipient")


# -- 3. storage faults -------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real, small filesystem (CI runs as root, as here: mount(8) works)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"this test needs mount(8) for a tmpfs (root): {r.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Fill the filesystem under `path` to ENOSPC; return the filler file."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * (1 << 16)
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == 28, e          # ENOSPC
        with contextlib.suppress(OSError):
            while True:                      # the last bytes of the last page
                f.write(b"\0")
    return filler


def test_disk_full_answers_451_ingest_75_and_recovers_by_itself(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    with tmpfs(gw.data_dir, "24m"):
        try:
            gw.start()
            assert gw.send(mail("warm@customer.example", SUPPORT, uniq("warm"), "x"))[0] == 250
            filler = fill(gw.data_dir)
            key_att, key_plain = uniq("full with attachment"), uniq("full plain")
            code, text = gw.send(with_attachment("dora@customer.example", key_att))
            assert code == 451 and text.startswith("4.3.0"), (code, text)
            # a small mail needs only new database pages: never 250 unless committed
            code_plain, _ = gw.send(mail("dora@customer.example", SUPPORT, key_plain, "short"))
            assert code_plain in (250, 451)
            r = ingest(gw, with_attachment("pipe@customer.example", uniq("piped while full")))
            assert r.returncode == 75, r.stderr
            assert gw.proc is not None and gw.proc.poll() is None       # serve lives on
            plain_committed = [t for t in gw.tickets() if key_plain in t["subject"]]
            assert len(plain_committed) == (1 if code_plain == 250 else 0)

            filler.unlink()                     # the fault clears; no restart, no operator
            assert gw.send(with_attachment("dora@customer.example", key_att))[0] == 250
            if code_plain != 250:       # (on PostgreSQL it never needed this disk)
                assert gw.send(mail("dora@customer.example", SUPPORT, key_plain, "short"))[0] == 250
            assert ingest(gw, with_attachment("pipe@customer.example", uniq("piped"))).returncode == 0
            assert len([t for t in gw.tickets() if key_att in t["subject"]]) == 1
            assert len([t for t in gw.tickets() if key_plain in t["subject"]]) == 1
            gw.sink.wait_to("dora@customer.example", count=2)
            assert gw.stop() == 0
        finally:
            gw.kill()


def test_unwritable_data_dir_answers_451_ingest_75_and_recovers_by_itself(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    gw.start(preexec_fn=without_dac_override)
    assert gw.send(mail("warm@customer.example", SUPPORT, uniq("warm"), "x"))[0] == 250
    modes = {p: p.stat().st_mode & 0o7777 for p in [gw.data_dir, *gw.data_dir.rglob("*")]}
    try:
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        key = uniq("read-only")
        code, text = gw.send(with_attachment("erin@customer.example", key))
        assert code == 451 and text.startswith("4.3.0"), (code, text)
        r = ingest(gw, with_attachment("pipe@customer.example", uniq("piped")), without_dac_override)
        assert r.returncode == 75, r.stderr
        assert gw.proc is not None and gw.proc.poll() is None
        assert [t for t in gw.tickets() if key in t["subject"]] == []
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    # the fault clears: the same mail goes through, once
    assert gw.send(with_attachment("erin@customer.example", key))[0] == 250
    assert ingest(gw, mail("pipe@customer.example", SUPPORT, uniq("piped"), "x"),
                  without_dac_override).returncode == 0
    assert len([t for t in gw.tickets() if key in t["subject"]]) == 1
    assert gw.stop() == 0


# -- 7. graceful stop ------------------------------------------------------

def test_sigterm_with_several_concurrent_senders_loses_nothing_and_exits_0(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    gw.start()
    batches = load(8, 60, "sigterm")
    items = [i for b in batches for i in b]
    loader = threading.Thread(target=run_clients, args=(gw.port, batches),
                              kwargs={"stop_on_failure": True})
    loader.start()
    wait_for(lambda: sum(i.accepted for i in items) >= 40, 60, "40 accepted mails")
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(30) == 0
    loader.join(120)
    answers = {c for i in items for c in i.codes}
    assert answers <= {250, 421, "error"}, answers          # finished, or told 421: never 4xx/5xx else
    assert 421 in answers or "error" in answers             # the stop did cut the senders off
    assert "gateway.stopped" in gw.log_text()

    gw.start()
    by_requester = tickets_by_requester(gw)
    accepted = [i for i in items if i.accepted]
    assert [i.key for i in accepted if len(by_requester.get(i.sender, [])) != 1] == []
    # what got no 250 is retried by its sender: each ends on exactly one ticket
    tried_not_accepted = [i for i in items if i.codes and not i.accepted]
    run_clients(gw.port, [tried_not_accepted])
    by_requester = tickets_by_requester(gw)
    assert all(len(by_requester.get(i.sender, [])) == 1 for i in items if i.codes)
    print(f"\nSIGTERM: {len(accepted)} accepted before the stop, "
          f"{len(tried_not_accepted)} cut off (421 or closed) and retried; lost 0")


@pytest.fixture(autouse=True)
def _no_leftover_mounts(workdir: Path) -> Iterator[None]:
    yield
    with open("/proc/mounts") as f:
        assert str(workdir) not in f.read(), "a test left a mount behind"
