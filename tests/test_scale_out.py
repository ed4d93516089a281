"""Several gateway instances on one PostgreSQL (a real throwaway cluster, tests/pg.py).

Each instance is a real `gateway serve` with its own data directory and
port, as on separate hosts; they share only the database and the relays.
These run on every test run, whatever GATEWAY_TEST_STORE says: they are
about PostgreSQL.
"""
from __future__ import annotations

import asyncio
import email
import json
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pg
import pytest
from conftest import (
    GATEWAY,
    LOAD_LIMITS,
    QUEUES,
    STAFF,
    SUPPORT,
    GatewayProc,
    agent_reply,
    free_port,
    mail,
    reply_to,
    uniq,
    wait_for,
)
from test_faults import load, run_clients

from gateway.store import MIGRATIONS, Store

LEASE_S = 2


@pytest.fixture
def db_url() -> str:
    return pg.CLUSTER.new_database()


@pytest.fixture
def instances(make_gateway: Callable[..., GatewayProc], db_url: str) -> Callable[[int], list[GatewayProc]]:
    def start(n: int) -> list[GatewayProc]:
        # the instances share one token secret: one key file (README "Running several instances")
        gws = [make_gateway(store_url=db_url, extra_toml=f"[store]\nlease_seconds = {LEASE_S}\n" + LOAD_LIMITS,
                            secret_file="shared")
               for _ in range(n)]
        for gw in gws:
            gw.start()
        return gws
    return start


def at(hours: float) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat(timespec="seconds")


# -- the store on PostgreSQL ---------------------------------------------------------

async def test_schema_is_migrated_once_by_instances_starting_together(db_url: str) -> None:
    stores = await asyncio.gather(*(Store.open(db_url) for _ in range(4)))
    for s in stores:
        await s.close()
    assert pg.CLUSTER.sql(db_url, "SELECT version FROM schema_version").split() == [str(len(MIGRATIONS))]
    tables = set(pg.CLUSTER.sql(db_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                 .split())
    assert {"inbound", "tickets", "messages", "attachments", "outbox", "inbound_message_ids",
            "leases", "settings"} <= tables
    # ticket IDs come from the database's sequence, never from an instance
    assert "tickets_id_seq" in pg.CLUSTER.sql(db_url, "SELECT sequencename FROM pg_sequences")
    pg.CLUSTER.sql(db_url, f"UPDATE schema_version SET version = {len(MIGRATIONS) + 1}")
    with pytest.raises(Exception, match="newer than this gateway"):
        await Store.open(db_url)


async def test_delivery_claims_skip_rows_another_instance_holds(db_url: str) -> None:
    """Two senders claim at once: each gets other rows, neither waits (SKIP LOCKED);
    a claimed row goes to nobody else until its lease ends."""
    import tempfile

    from gateway.app import open_gateway
    from gateway.config import parse
    from gateway.desk.pipeline import Received
    config = parse({"gateway": {"data_dir": tempfile.mkdtemp(prefix="gw-claims-")},
                    "outbound": {"transport": "maildir"}, "store": {"url": db_url}})
    gw = await open_gateway(config)
    now = datetime.now(UTC)
    for i in range(5):
        await gw.intake.receive(Received(
            mail(f"c{i}@customer.example", SUPPORT, f"claims {i}", "x").as_bytes(),
            f"c{i}@customer.example", (SUPPORT,), config.mailboxes[0], now))
    other = await Store.open(db_url)
    try:
        async with gw.store.transaction() as tx:
            held = [r[0] for r in await tx._all(
                "SELECT id FROM outbox ORDER BY id LIMIT 3 FOR UPDATE")]
            # another instance claims while those three are locked: it gets the rest, at once
            got = await asyncio.wait_for(other.claim_due(now, 60), 5)
        assert len(held) == 3 and len(got) == 7 and not {i.id for i in got} & set(held)
        # the held three are free now; the seven are leased
        again = await other.claim_due(now, 60)
        assert sorted(i.id for i in again) == sorted(held)
        assert await other.claim_due(now, 60) == []
        # a lease that ran out (its holder died) makes the rows due again
        assert len(await other.claim_due(now + timedelta(seconds=61), 60)) == 10
    finally:
        await other.close()
        await gw.close()


async def test_a_lease_has_one_holder_and_passes_on_when_it_runs_out(db_url: str) -> None:
    a, b = await Store.open(db_url), await Store.open(db_url)
    t0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    try:
        assert await a.take_lease("imap:x", "A", t0, 10)
        assert not await b.take_lease("imap:x", "B", t0 + timedelta(seconds=5), 10)
        assert await a.take_lease("imap:x", "A", t0 + timedelta(seconds=9), 10)      # renewed
        assert not await b.take_lease("imap:x", "B", t0 + timedelta(seconds=15), 10)
        assert await b.take_lease("imap:x", "B", t0 + timedelta(seconds=19, milliseconds=1), 10)
        assert not await a.take_lease("imap:x", "A", t0 + timedelta(seconds=20), 10)
        await b.release_lease("imap:x", "B")
        assert await a.take_lease("imap:x", "A", t0 + timedelta(seconds=20), 10)
    finally:
        await a.close()
        await b.close()


async def test_a_deadlock_between_instances_is_run_again_not_failed(db_url: str) -> None:
    """Two instances lock two tickets in opposite orders: PostgreSQL aborts one
    (deadlock); the store runs its work again, and both succeed."""
    a, b = await Store.open(db_url), await Store.open(db_url)
    now = datetime.now(UTC)
    try:
        async with a.transaction() as tx:
            ids = [(await tx.create_ticket(subject=f"t{i}", requester="x@customer.example", cc=(),
                                           region="AMER", govcloud=False, priority=3, mailbox=SUPPORT,
                                           linked_ticket=None, now=now)).id for i in range(2)]
        attempts = {"A": 0, "B": 0}
        both_hold_one = asyncio.Barrier(2)

        def work(name: str, first: int, second: int) -> Callable[[Any], Any]:
            async def body(tx: Any) -> str:
                attempts[name] += 1
                await tx.ticket(first)                  # FOR UPDATE
                if attempts[name] == 1:
                    await both_hold_one.wait()
                await tx.ticket(second)
                await tx.update_ticket(first, now, priority=1)
                return name
            return body
        done = await asyncio.wait_for(asyncio.gather(a.run(work("A", ids[0], ids[1])),
                                                     b.run(work("B", ids[1], ids[0]))), 30)
        assert done == ["A", "B"]
        assert sorted(attempts.values()) == [1, 2]      # the deadlock's loser ran again
    finally:
        await a.close()
        await b.close()


# -- instances -------------------------------------------------------------------------

def test_the_same_mail_at_two_instances_is_one_message_and_replies_thread_across(
        instances: Callable[[int], list[GatewayProc]]) -> None:
    a, b = instances(2)
    key = uniq("Delivered twice")
    m = mail("Ann <ann@customer.example>", SUPPORT, key, "Backup fails.")
    codes: list[int] = []
    go = threading.Barrier(2)

    def send(gw: GatewayProc) -> None:
        go.wait()
        codes.append(gw.send(m)[0])
    threads = [threading.Thread(target=send, args=(gw,)) for gw in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert codes == [250, 250]
    (ticket,) = [t for t in a.tickets() if key in t["subject"]]
    assert b.tickets() == a.tickets()
    states = sorted(s for (s,) in a.query("SELECT state FROM inbound"))
    assert states == ["duplicate", "processed"]         # both kept, processed once
    (ack,) = a.sink.wait_to("ann@customer.example")

    # the customer answers the acknowledgement instance A sent; instance B gets it
    assert b.send(reply_to(ack, "Ann <ann@customer.example>", "Version 5.2."))[0] == 250
    shown = b.ticket(ticket["id"])
    assert [m["direction"] for m in shown["messages"] if m["from"] == "ann@customer.example"] == ["in", "in"]
    assert len(b.tickets()) == 1
    # a staff answer sent to A, to B's notification, reaches the customer threaded
    notes = a.sink.wait_to(QUEUES["AMER"], 2)
    answer = agent_reply(notes[-1], "Please update.", frm=f"Agent Smith <{STAFF}>", client="thunderbird")
    assert a.send(answer)[0] == 250
    relayed = wait_for(lambda: [x for x in a.sink.to("ann@customer.example")
                                if "Please update." in x.get_body(("plain",)).get_content()],
                       15, "the staff answer")
    assert str(ack["Message-ID"]) in str(relayed[0]["References"])
    assert b.ticket(ticket["id"])["status"] == "pending"


def test_kill_9_of_one_of_three_instances_loses_nothing_and_its_claims_pass_on(
        instances: Callable[[int], list[GatewayProc]]) -> None:
    """8 clients spread over three instances; one instance is SIGKILLed mid-load.

    Its clients go on at the other instances (as an MTA tries the next MX).
    Every mail that got 250 is on exactly one ticket, every ticket's
    acknowledgement reaches the relay (the dead instance's claimed rows are
    sent by the others once the lease ends; a repeat only as the same
    message, same Message-ID), and reminders and closures, with all instances
    running `run-due` at once, go out exactly once per ticket.
    """
    gws = instances(3)
    victim, survivors = gws[0], gws[1:]
    batches = load(9, 30, "scale")
    items = [i for b in batches for i in b]
    loaders = [threading.Thread(target=run_clients, args=(gws[k % 3].port, batches[k::3]))
               for k in range(3)]
    for t in loaders:
        t.start()
    wait_for(lambda: sum(i.accepted for i in items) >= 90, 60, "90 accepted mails")
    victim.kill()
    for t in loaders:
        t.join(120)
    accepted_before = [i for i in items if i.accepted]
    cut_off = [i for i in items if not i.accepted]
    assert accepted_before and cut_off, "the kill must land while mail is being sent"
    # the senders whose instance died retry at another one
    run_clients(survivors[0].port, [cut_off[k::4] for k in range(4)])
    assert all(i.accepted for i in items)

    by_requester: dict[str, list[dict[str, Any]]] = {}
    for t in survivors[1].tickets():
        by_requester.setdefault(t["requester"], []).append(t)
    assert sum(len(v) for v in by_requester.values()) == len(items)
    assert [i.key for i in items if len(by_requester.get(i.sender, [])) != 1] == []

    sink = survivors[0].sink
    wait_for(lambda: all(sink.to(i.sender) for i in items), 10 * LEASE_S + 30,
             "an acknowledgement to every sender")
    repeats = 0
    for i in items:
        acks = sink.to(i.sender)
        assert len({str(a["Message-ID"]) for a in acks}) == 1, f"{i.sender} got different acks"
        repeats += len(acks) - 1
    # the relay's 250 reaches the sink before the sender records it: every row
    # ends up recorded as sent (none stays claimed or failed)
    wait_for(lambda: not victim.query("SELECT id FROM outbox WHERE state <> 'sent'"), 30,
             "every outbox row recorded as sent")

    # staff answer ten of them: pending; then every instance runs the scheduler at once
    waiting = [by_requester[i.sender][0] for i in items[:10]]
    notes = sink.wait_to(QUEUES["AMER"], len(items))
    for n, t in enumerate(waiting):
        note = next(x for x in notes if f"#{t['id']}]" in str(x["Subject"]))
        answer = agent_reply(note, "Which version?", frm=f"Agent Smith <{STAFF}>", client="thunderbird")
        assert survivors[n % 2].send(answer)[0] == 250

    def run_due_everywhere(hours: float) -> list[dict[str, Any]]:
        procs = [subprocess.Popen([*GATEWAY, "run-due", "--now", at(hours), "--config", str(gw.config)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                 for gw in gws for _ in range(2)]
        return [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    outs = run_due_everywhere(25)
    assert sum(o["jobs"].get("no customer reply: reminder", 0) for o in outs) == 10
    outs = run_due_everywhere(49)
    assert sum(o["jobs"].get("no customer reply: auto-close", 0) for o in outs) == 10
    for t in waiting:
        shown = survivors[0].ticket(t["id"])
        out = [m["kind"] for m in shown["messages"] if m["direction"] == "out"]
        assert out.count("reminder") == 1 and out.count("autoclose") == 1, out
        assert shown["status"] == "closed"
    print(f"\nkill -9 of 1 of 3 instances: {len(items)} mails; {len(accepted_before)} accepted "
          f"before the kill, {len(cut_off)} retried at another instance; lost 0; "
          f"acks repeated with the same Message-ID: {repeats}")


def test_postgresql_restarting_under_a_running_instance_costs_451s_then_nothing(
        instances: Callable[[int], list[GatewayProc]]) -> None:
    (gw,) = instances(1)
    assert gw.send(mail("ann@customer.example", SUPPORT, uniq("before"), "x"))[0] == 250
    pg.CLUSTER.pause()
    try:
        key = uniq("while PostgreSQL is down")
        code, text = gw.send(mail("bob@customer.example", SUPPORT, key, "later"))
        assert code == 451 and text.startswith("4.3.0"), (code, text)
        assert gw.proc is not None and gw.proc.poll() is None           # serve lives on
    finally:
        pg.CLUSTER.resume()
    # back without a restart of the gateway: the sender's retry goes through, once
    assert gw.send(mail("bob@customer.example", SUPPORT, key, "later"))[0] == 250
    (t,) = [t for t in gw.tickets() if key in t["subject"]]
    gw.sink.wait_to("bob@customer.example")
    # one acknowledgement ("... is down" is priority 1: its escalation notice is the other mail)
    assert [m["kind"] for m in gw.ticket(t["id"])["messages"] if m["direction"] == "out"].count("ack") == 1
    assert gw.stop() == 0


async def test_a_slow_relay_gets_each_mail_once_though_sending_outlasts_the_lease(db_url: str) -> None:
    """Instance A's round of deliveries takes several leases (a relay that
    answers after 0.6 s, 1 s lease); instance B keeps claiming meanwhile.
    A renews its claims while it sends: B never gets a row, nothing goes twice."""
    import tempfile

    from aiosmtpd.controller import Controller

    from gateway.app import open_gateway
    from gateway.config import parse
    from gateway.desk.pipeline import Received

    got: list[bytes] = []
    a_is_sending = asyncio.Event()

    class SlowRelay:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            a_is_sending.set()                  # A has claimed its round: only then B starts claiming
            await asyncio.sleep(0.6)            # the relay's own slowness, not a wait in the test
            got.append(envelope.original_content)
            return "250 OK"
    relay_port = free_port()
    relay = Controller(SlowRelay(), hostname="127.0.0.1", port=relay_port)
    relay.start()

    key = str(Path(tempfile.mkdtemp(prefix="gw-slow-key-")) / "secret.key")

    def config() -> Any:
        return parse({"gateway": {"data_dir": tempfile.mkdtemp(prefix="gw-slow-"), "token_secret_file": key},
                      "outbound": {"transport": "smtp", "host": "127.0.0.1", "port": relay_port,
                                   "govcloud": {"port": relay_port}},   # required with a GovCloud mailbox
                      "store": {"url": db_url, "lease_seconds": 1}})
    a, b = await open_gateway(config()), await open_gateway(config())
    try:
        now = datetime.now(UTC)
        for i in range(6):
            await a.intake.receive(Received(
                mail(f"s{i}@customer.example", SUPPORT, f"slow {i}", "x").as_bytes(),
                f"s{i}@customer.example", (SUPPORT,), a.config.mailboxes[0], now))
        sending = asyncio.create_task(a.sender.deliver_due())
        await asyncio.wait_for(a_is_sending.wait(), 30)
        taken_by_b = 0
        while not sending.done():
            taken_by_b += await b.sender.deliver_due()
            await asyncio.sleep(0.1)
        assert await sending == 12 and taken_by_b == 0
        ids = [email.message_from_bytes(raw)["Message-ID"] for raw in got]
        assert len(ids) == 12 and len(set(ids)) == 12, "a mail reached the relay twice"
    finally:
        await a.close()
        await b.close()
        relay.stop()


async def test_a_connection_lost_inside_a_transaction_fails_it_whole(db_url: str) -> None:
    """The server ends the gateway's connection in the middle of a batch: every
    later statement of that transaction fails (none is run on a new connection,
    where it would commit alone), the batch is answered 451, and the next
    transaction reconnects."""
    from gateway.store import StoreUnavailable
    s = await Store.open(db_url)
    now = datetime.now(UTC)
    try:
        with pytest.raises(StoreUnavailable):
            async with s.transaction() as tx:
                await tx.add_inbound(received_at=now, mail_from="a@customer.example", rcpt_to=[SUPPORT],
                                     mailbox=SUPPORT, sha256="0" * 64, size=1, raw=b"x", raw_path=None,
                                     message_id="<first@customer.example>")
                (pid,) = (await tx._all("SELECT pg_backend_pid()"))[0]
                pg.CLUSTER.sql(db_url, f"SELECT pg_terminate_backend({pid})")
                with pytest.raises(StoreUnavailable):
                    async with s.savepoint(tx):
                        await tx.claim_inbound_message("<second@customer.example>")
                await tx.claim_inbound_message("<third@customer.example>")
        assert pg.CLUSTER.sql(db_url, "SELECT count(*) FROM inbound").split() == ["0"]
        assert pg.CLUSTER.sql(db_url, "SELECT count(*) FROM inbound_message_ids").split() == ["0"]
        async with s.transaction() as tx:          # reconnected
            assert await tx.claim_inbound_message("<third@customer.example>")
    finally:
        await s.close()
