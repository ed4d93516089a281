"""The store: schema by version, WAL, durable settings, and the blob files."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.blobs import Blobs
from gateway.store import MIGRATIONS, Store


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


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    con.close()
    with pytest.raises(Exception, match="newer than this gateway"):
        await Store.open(db)


async def test_threading_lookup_uses_an_index(tmp_path: Path) -> None:
    s = await Store.open(tmp_path / "g.db")
    rows = await s._rows("EXPLAIN QUERY PLAN SELECT message_id, ticket_id FROM messages"
                         " WHERE message_id IN (?, ?)", ("<a>", "<b>"))
    await s.close()
    plan = " ".join(str(r[-1]) for r in rows)
    assert "messages_message_id" in plan and "SCAN messages" not in plan


def test_blobs_are_named_by_hash_only(tmp_path: Path) -> None:
    b = Blobs(tmp_path)
    p = b.put("attachments", b"data")
    assert p.parent.parent == tmp_path / "attachments" and p.read_bytes() == b"data"
    assert b.put("attachments", b"data") == p
    with pytest.raises(ValueError):
        b.path("attachments", "../../etc/passwd")
    assert [x for x in p.parent.iterdir()] == [p]        # no temp files left
