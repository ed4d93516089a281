"""The ticket-token secret lives only in its key file or $GATEWAY_TOKEN_SECRET
(project issue 14, "Data at rest"), end to end through `gateway serve`.

- A fresh install keeps no copy in the database: a token forged from anything
  the database holds does not join a ticket.
- An install whose database holds the secret (migration 6 kept it there) is
  upgraded: the key file gets that secret first, then the copy is removed; the
  tokens already sent stay valid.
- Instances on one database share the secret through one file or the variable;
  one with another secret refuses to start, saying why.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import pg
import pytest
from conftest import SUPPORT, GatewayProc, mail, uniq, wait_for

from gateway.store import MIGRATIONS
from gateway.store.drivers import connect

SECRET_ENV = "GATEWAY_TOKEN_SECRET"    # the documented name (README "What is stored")

HEX64 = re.compile(r"^[0-9a-f]{64,}$")


def forged_reference(secret_hex: str, ticket_id: int) -> str:
    """One of our Message-IDs for `ticket_id`, made with `secret_hex` (gateway.outbound.tokens)."""
    token = hmac.new(bytes.fromhex(secret_hex), f"ticket:{ticket_id}".encode(), hashlib.sha256).hexdigest()[:20]
    return f"<{secrets.token_hex(8)}.{ticket_id}.{token}@example.com>"


def answer_with(gw: GatewayProc, reference: str, sender: str) -> dict:
    """A mail from `sender` answering `reference`: its `mail.processed` event."""
    m = mail(sender, SUPPORT, uniq("about my ticket"), "I saw your mail.")
    m["In-Reply-To"] = reference
    m["References"] = reference
    assert gw.send(m)[0] == 250
    return wait_for(lambda: next((e for e in gw.log_events() if e["event"] == "mail.processed"
                                  and e["message_id"] == str(m["Message-ID"])), None), what="processed")


def open_ticket(gw: GatewayProc) -> dict:
    key = uniq("secret")
    customer = f"{uniq('cust')}@customer.example"
    assert gw.send(mail(customer, SUPPORT, key, "question"))[0] == 250
    gw.sink.wait_to(customer)
    return gw.ticket_by_subject(key)


def test_a_token_forged_from_a_copy_of_the_database_does_not_join_a_ticket(gateway: GatewayProc) -> None:
    t = open_ticket(gateway)
    key_file = gateway.data_dir / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    real = key_file.read_text().strip()
    # what a thief of the database has: every value of every setting
    values = [str(v) for (v,) in gateway.query("SELECT value FROM settings")]
    assert real not in values and not [v for v in values if real in v]
    candidates = [v for v in values if HEX64.match(v)]
    for v in candidates + ["00" * 32]:
        out = answer_with(gateway, forged_reference(v, t["id"]), f"{uniq('thief')}@evil.example")
        assert out["action"] == "created" and out["ticket_id"] != t["id"], out
    # the key file's secret does make a genuine token (the test can tell the difference)
    out = answer_with(gateway, forged_reference(real, t["id"]), t["requester"])
    assert out["action"] == "joined" and out["ticket_id"] == t["id"]


# the migration that removes the copy (11); later ones follow it
SECRET_REMOVAL = next(i for i, m in enumerate(MIGRATIONS) if "DELETE FROM settings" in m)


def _database_before_the_move(gw: GatewayProc, secret_hex: str) -> None:
    """The database as an earlier version left it: the schema before the removal, the secret in `settings`."""
    async def build() -> None:
        db = await connect(gw.db_url, 5000)
        try:
            await db.migrate(MIGRATIONS[:SECRET_REMOVAL])
            await db.begin()
            await db.execute("DELETE FROM settings")
            await db.execute("INSERT INTO settings (name, value) VALUES ('ticket_token_secret', ?)", (secret_hex,))
            await db.commit()
        finally:
            await db.close()
    gw.data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(build())


def _key_file(gw: GatewayProc, secret_hex: str) -> Path:
    """The data folder's key file, holding `secret_hex`, private as the gateway makes it."""
    path = gw.data_dir / "secret.key"
    gw.data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret_hex + "\n")
    return path


def test_upgrade_from_a_database_holding_the_secret_keeps_the_tokens_valid(
        make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    # The database holds the secret that signed the mail sent; this data_dir's key
    # file holds another one (a second instance's, which the database's overruled).
    in_use = secrets.token_hex(32)
    _database_before_the_move(gw, in_use)
    key_file = _key_file(gw, secrets.token_hex(32))
    gw.start()       # every migration from the removal on runs
    assert key_file.read_text().strip() == in_use
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert gw.query("SELECT count(*) FROM settings WHERE name = 'ticket_token_secret'")[0][0] == 0
    assert [e["event"] for e in gw.log_events() if e["event"].startswith("secret.")] == ["secret.moved"]
    # the tokens signed with that secret (the mail sent before the upgrade) still join their ticket
    t = open_ticket(gw)
    out = answer_with(gw, forged_reference(in_use, t["id"]), t["requester"])
    assert out["action"] == "joined" and out["ticket_id"] == t["id"]
    gw.stop()
    if gw.db_url.startswith("sqlite:"):
        # not in the file either (SQLite frees the row's cell zeroed: secure_delete)
        for f in gw.data_dir.glob("gateway.db*"):
            assert in_use.encode() not in f.read_bytes(), f
    # started again: nothing more to move, same secret
    gw.start()
    assert key_file.read_text().strip() == in_use
    assert [e["event"] for e in gw.log_events() if e["event"].startswith("secret.")] == ["secret.moved"]


def test_upgrade_with_the_key_file_already_holding_the_secret(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    in_use = secrets.token_hex(32)
    _database_before_the_move(gw, in_use)
    key_file = _key_file(gw, in_use)
    gw.start()
    assert key_file.read_text().strip() == in_use
    assert gw.query("SELECT count(*) FROM settings WHERE name = 'ticket_token_secret'")[0][0] == 0
    t = open_ticket(gw)
    out = answer_with(gw, forged_reference(in_use, t["id"]), t["requester"])
    assert out["action"] == "joined" and out["ticket_id"] == t["id"]


def test_instances_share_the_secret_through_the_environment_and_a_different_one_refuses_to_start(
        make_gateway: Callable[..., GatewayProc], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = pg.store_url() or f"sqlite:///{tmp_path / 'shared.db'}"
    shared = secrets.token_hex(32)
    monkeypatch.setenv(SECRET_ENV, shared)
    a, b = make_gateway(store_url=url), make_gateway(store_url=url)
    a.start()
    b.start()
    t = open_ticket(a)
    # b signs and checks with the same secret: a token made with it joins through b
    out = answer_with(b, forged_reference(shared, t["id"]), t["requester"])
    assert out["action"] == "joined" and out["ticket_id"] == t["id"]
    assert not (a.data_dir / "secret.key").exists()          # the variable wins; no file made
    # a third instance with its own key file: it would sign mail the others reject
    monkeypatch.delenv(SECRET_ENV)
    c = make_gateway(store_url=url)
    r = c.cli("run-due")
    assert r.returncode == 75 and "token_secret_file" in r.stderr and SECRET_ENV in r.stderr, r.stderr
    # a malformed variable is a clear error, not a weak key
    r = c.cli("run-due", env={SECRET_ENV: "not-hex"})
    assert r.returncode == 75 and "hex digits" in r.stderr
    # the same file for all works too
    r = c.cli("run-due", env={SECRET_ENV: shared})
    assert r.returncode == 0, r.stderr
