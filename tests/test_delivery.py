"""Each outbound mail delivered once (project issue 15, issue 14 item 4), measured
at a real relay (conftest Sink, recording every Message-ID) against real
`gateway serve` processes: kill -9 under load, PostgreSQL restarting, SQLite
locked, `run-due --now` beside a live instance, one unsendable address."""
from __future__ import annotations

import collections
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pg
import pytest
from conftest import LOAD_LIMITS, QUEUES, SUPPORT, GatewayProc, agent_reply, mail, uniq, wait_for
from test_faults import events_in, load, run_clients

from gateway.outbound.sender import PARALLEL

FUTURE = "2099-01-01T00:00:00+00:00"
# what a sender logs when the store refuses its results: now, and before issue 15
RECORD_REFUSED = ("outbox.results_kept", "outbox.store_unavailable", "outbox.loop_error")


def repeats(gw: GatewayProc) -> dict[str, int]:
    """Message-IDs the relay got more than once, and how often."""
    with gw.sink.lock:
        ids = collections.Counter(str(m["msg"]["Message-ID"]) for m in gw.sink.messages)
    return {k: n for k, n in ids.items() if n > 1}


def relayed(gw: GatewayProc) -> int:
    with gw.sink.lock:
        return len(gw.sink.messages)


def outbox(gw: GatewayProc) -> dict[str, int]:
    return {str(state): int(n) for state, n in gw.query("SELECT state, count(*) FROM outbox GROUP BY state")}


def all_sent(gw: GatewayProc) -> bool:
    counts = outbox(gw)
    return bool(counts) and set(counts) == {"sent"}


@pytest.mark.parametrize("delay", [0.0, 0.3], ids=["fast-relay", "slow-relay"])
def test_kill_9_under_load_repeats_at_most_the_mails_in_flight_and_resumes_at_once(
        make_gateway: Callable[..., GatewayProc], delay: float) -> None:
    """SIGKILL of serve's process group while acknowledgements stream to the relay;
    a restart on the same data_dir takes back the dead process's claims at once
    (default lease_seconds, 60 s) and sends the rest: at most the `PARALLEL`
    mails in flight at the kill go out twice."""
    gw = make_gateway(extra_toml=LOAD_LIMITS)
    gw.sink.delay = delay
    gw.start()
    batches = load(4, 30 if delay else 60, "once")
    loader = threading.Thread(target=run_clients, args=(gw.port, batches))
    loader.start()
    wait_for(lambda: relayed(gw) >= 30, 60, "30 mails at the relay")
    gw.kill()
    loader.join(120)
    at_kill = relayed(gw)
    queued = gw.query("SELECT count(*) FROM outbox WHERE state = 'queued'")[0][0]
    assert queued > 0, "the kill must land while mail is being sent"

    restarted = time.monotonic()
    gw.start()
    wait_for(lambda: relayed(gw) > at_kill, 10, "the first delivery after the restart")
    resumed_s = time.monotonic() - restarted
    wait_for(lambda: all_sent(gw), 40, "every queued mail sent (well before the 60 s lease)")
    twice = repeats(gw)
    print(f"\nkill -9 ({'slow' if delay else 'fast'} relay): {relayed(gw)} mails relayed, "
          f"{queued} queued at the kill, resumed {resumed_s:.2f} s after the restart, "
          f"repeated {sum(n - 1 for n in twice.values())}")
    assert sum(n - 1 for n in twice.values()) <= PARALLEL, twice
    assert resumed_s < 10
    assert events_in(gw.log_text(), "outbox.claims_taken_back")


def outage_load(gw: GatewayProc, n: int) -> None:
    run_clients(gw.port, load(4, n // 4, "outage"))
    wait_for(lambda: in_flight(gw)[1], 30, "deliveries in flight")


def in_flight(gw: GatewayProc) -> tuple[int, int]:
    """(rows recorded as sent, rows claimed and not yet recorded), in one reading."""
    (sent, claimed), = gw.query(
        "SELECT coalesce(sum(CASE WHEN state = 'sent' THEN 1 ELSE 0 END), 0),"
        " coalesce(sum(CASE WHEN state = 'queued' AND claimed_until IS NOT NULL THEN 1 ELSE 0 END), 0)"
        " FROM outbox")
    return int(sent), int(claimed)


def claimed_all_relayed(gw: GatewayProc, reading: tuple[int, int]) -> Callable[[], bool]:
    """While the store is away: every row claimed at `reading` has reached the relay
    (so the round's results were made while the store could not take them)."""
    return lambda: relayed(gw) >= sum(reading)


def test_results_made_while_postgresql_restarts_are_recorded_when_it_is_back(
        make_gateway: Callable[..., GatewayProc]) -> None:
    """Deliveries go on while PostgreSQL is down; their results are kept and
    recorded once it is back, so no row is claimed and sent again when the
    lease (5 s here) runs out; every delivery gets its `outbox.sent` line."""
    gw = make_gateway(store_url=pg.CLUSTER.new_database(), extra_toml="[store]\nlease_seconds = 5\n" + LOAD_LIMITS)
    gw.sink.delay = 0.3
    gw.start()
    outage_load(gw, 60)
    reading = in_flight(gw)
    pg.CLUSTER.pause()
    try:
        wait_for(claimed_all_relayed(gw, reading), 60, "deliveries while PostgreSQL is down")
    finally:
        pg.CLUSTER.resume()
    wait_for(lambda: all_sent(gw), 60, "every mail recorded as sent")
    check_once(gw)


@pytest.mark.sqlite_only
def test_results_made_while_sqlite_is_locked_are_recorded_when_it_is_free(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml="[store]\nlease_seconds = 5\nbusy_timeout_ms = 200\n" + LOAD_LIMITS)
    gw.sink.delay = 0.3
    gw.start()
    outage_load(gw, 60)
    lock = sqlite3.connect(gw.data_dir / "gateway.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        reading = in_flight(gw)         # the lock holder's own reading of the claims
        wait_for(claimed_all_relayed(gw, reading), 60, "deliveries while the database is locked")
        # held until the sender has tried to record and been refused (whatever it then does)
        wait_for(lambda: any(events_in(gw.log_text(), e) for e in RECORD_REFUSED), 30,
                 "the sender refused by the locked database")
        # the database stays locked for 3 s more (the scenario: an outage of some
        # polls, 0.2 s apart), so several of the sender's passes find it away
        time.sleep(3)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    wait_for(lambda: all_sent(gw), 60, "every mail recorded as sent")
    check_once(gw)
    # ops got one line for the outage, not one per pass, and one when it ended
    text = gw.log_text()
    assert len(events_in(text, "outbox.store_unavailable")) == 1, events_in(text, "outbox.store_unavailable")
    assert not events_in(text, "outbox.loop_error")
    back = events_in(text, "outbox.store_back")
    assert len(back) == 1 and back[0]["passes"] >= 2, back


def check_once(gw: GatewayProc) -> None:
    rows = gw.query("SELECT count(*) FROM outbox")[0][0]
    assert relayed(gw) == rows and repeats(gw) == {}, repeats(gw)
    assert len(events_in(gw.log_text(), "outbox.sent")) == rows
    assert gw.query("SELECT max(attempts) FROM outbox")[0][0] == 1


def test_run_due_with_a_future_now_never_takes_a_live_instances_claims(
        make_gateway: Callable[..., GatewayProc]) -> None:
    """`run-due --now 2099` while serve is sending through a slow relay: no row
    serve holds is sent again by run-due, and what run-due queues (staff
    escalations of tickets 73 years overdue) is due now, not in 2099."""
    gw = make_gateway()
    gw.sink.delay = 0.2
    gw.start()
    run_clients(gw.port, load(4, 6, "rundue"))
    wait_for(lambda: relayed(gw) >= 2, 30, "serve sending")
    r = gw.cli("run-due", "--now", FUTURE)
    assert r.returncode == 0, r.stderr
    now = datetime.now(UTC).isoformat()
    queued_later = gw.query("SELECT count(*) FROM outbox WHERE next_attempt_at > ?", (now,))[0][0]
    assert queued_later == 0
    wait_for(lambda: all_sent(gw), 60, "every mail sent")
    assert repeats(gw) == {}, repeats(gw)


def test_one_unsendable_address_fails_no_round_and_the_rest_goes_once(
        make_gateway: Callable[..., GatewayProc]) -> None:
    """Issue 14, item 4: a ticket whose Cc holds `a b@x.example` (stored by an
    older version, before such addresses were refused at intake). The staff
    reply reaches the customer, the bad address is refused on its own, and
    every other mail claimed with it in the same round goes out once."""
    gw = make_gateway()
    gw.start()
    customer = f"{uniq('cust')}@customer.example"
    key = uniq("Backup fails")
    assert gw.send(mail(customer, SUPPORT, key, "Backup fails.", cc="boss@customer.example"))[0] == 250
    t = gw.ticket_by_subject(key)
    gw.query("UPDATE tickets SET cc = ? WHERE id = ?",
             (json.dumps(["boss@customer.example", "a b@x.example"]), t["id"]))
    note = [m for m in gw.sink.wait_to(QUEUES["AMER"]) if f"#{t['id']}]" in str(m["Subject"])][-1]
    # the staff reply is queued in the same moment as a burst of new tickets' mail
    loader = threading.Thread(target=run_clients, args=(gw.port, load(4, 5, "beside")))
    loader.start()
    assert gw.send(agent_reply(note, "Please run the backup again."))[0] == 250
    loader.join(60)
    wait_for(lambda: all_sent(gw), 30, "every mail sent")
    answers = gw.sink.wait_to(customer, count=2)
    assert "Please run the backup again." in answers[-1].get_body(("plain",)).get_content()
    assert [a.addr_spec for a in answers[-1]["Cc"].addresses][:1] == ["boss@customer.example"]
    assert gw.sink.to("boss@customer.example")
    refused = events_in(gw.log_text(), "outbox.partly_refused")
    assert refused and "a b@x.example" in refused[0]["refused"]
    assert gw.query("SELECT max(attempts) FROM outbox")[0][0] == 1
    r = gw.cli("run-due", "--now", FUTURE)
    assert r.returncode == 0, r.stderr
    assert repeats(gw) == {}, repeats(gw)

