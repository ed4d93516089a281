"""The store: schema by version, WAL, durable settings, and the blob files."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pg
import pytest

from gateway.store import MIGRATIONS, Store
from gateway.store.blobs import Blobs


@pg.sqlite_only
async def test_schema_is_created_and_versioned_and_reopening_keeps_it(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    s = await Store.open(db)
    await s.close()
    s = await Store.open(db)        # second open migrates nothing
    await s.close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"inbound", "tickets", "messages", "attachments", "outbox"} <= tables


@pg.sqlite_only
async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    con.close()
    with pytest.raises(Exception, match="newer than this gateway"):
        await Store.open(db)


# Statements that may read a whole table, and why.
WHOLE_TABLE_OK = (
    "GROUP BY state",          # outbox/inbound counts: run-due output, health gauges, not per mail
    "sqlite_master",
    "DISTINCT claimed_by",     # the claims' holders, once per process start (the queued rows' index)
)


@pg.sqlite_only
async def test_every_statement_of_a_real_run_uses_an_index(tmp_path: Path) -> None:
    """Ingest with 100 000 tickets must cost what it costs with none: every
    statement the gateway runs for mail, replies, deliveries, timers and stats
    is an index search or an insert, never a table scan (EXPLAIN QUERY PLAN)."""
    from datetime import UTC, datetime, timedelta
    from email.message import EmailMessage

    from gateway.app import open_gateway
    from gateway.config import parse
    from gateway.desk.pipeline import Received

    config = parse({"gateway": {"data_dir": str(tmp_path / "data")},
                    "outbound": {"transport": "maildir"}})
    gw = await open_gateway(config)
    statements: list[str] = []
    await gw.store.db.connection.set_trace_callback(statements.append)
    mailbox = config.mailboxes[0]
    now = datetime.now(UTC)

    def raw(subject: str, extra: str = "") -> bytes:
        m = EmailMessage()
        m["From"], m["To"], m["Subject"] = "ann@customer.example", mailbox.address, subject
        m["Message-ID"] = f"<{subject.replace(' ', '.')}@customer.example>"
        if extra:
            m["In-Reply-To"] = extra
        m.set_content("Backup fails")
        return m.as_bytes()
    first = await gw.intake.receive(Received(raw("new one"), "ann@customer.example",
                                             (mailbox.address,), mailbox, now))
    await gw.intake.receive(Received(raw(f"Re: [Support #{first.ticket_id}] x"), "ann@customer.example",
                                     (mailbox.address,), mailbox, now))
    await gw.intake.receive(Received(raw("reply", "<new.one@customer.example>"), "ann@customer.example",
                                     (mailbox.address,), mailbox, now))
    await gw.sender.deliver_due()
    await gw.scheduler.run_due(now + timedelta(days=9))
    await gw.store.tickets_created(now - timedelta(days=1), now + timedelta(days=1))
    await gw.store.db.connection.set_trace_callback(None)
    plans: dict[str, str] = {}
    for sql in dict.fromkeys(statements):
        head = sql.lstrip().split(None, 1)[0].upper()
        if head not in ("SELECT", "UPDATE", "DELETE", "WITH") or any(ok in sql for ok in WHOLE_TABLE_OK):
            continue
        rows = await gw.store._rows("EXPLAIN QUERY PLAN " + sql)
        plans[sql] = " | ".join(str(r[-1]) for r in rows)
    await gw.close()
    assert len(plans) >= 8, list(plans)
    for sql, plan in plans.items():
        for table in ("messages", "tickets", "outbox", "inbound", "attachments"):
            assert f"SCAN {table}" not in plan, f"{sql}\n  -> {plan}"


def test_blobs_are_named_by_hash_only(tmp_path: Path) -> None:
    b = Blobs(tmp_path)
    p = b.put("attachments", b"data")
    assert p.parent.parent == tmp_path / "attachments" and p.read_bytes() == b"data"
    assert b.put("attachments", b"data") == p
    with pytest.raises(ValueError):
        b.path("attachments", "../../etc/passwd")
    assert [x for x in p.parent.iterdir()] == [p]        # no temp files left
