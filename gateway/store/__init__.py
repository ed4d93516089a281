"""The one module that owns the SQL.

Its statements run on SQLite (the default: one file, `[store] url =
"sqlite:///PATH"`) or on PostgreSQL (`postgresql://...`, several gateway
instances on one database) through the drivers in `gateway.store.drivers`;
they are written once, in the SQL both share. On SQLite a commit is on disk
when it returns (WAL, `synchronous=FULL`), which is what lets the SMTP
listener answer `250` right after it; on PostgreSQL, when the server says
so. The schema is created and migrated by version number when the store opens.

All writes go through `Store.transaction()`, which holds an asyncio lock
around `BEGIN ... COMMIT` on the process's one connection: one writer per
process, many statements per commit (the intake commits a whole batch of
mails at once). Between processes and instances the database orders them:
SQLite's write lock, PostgreSQL's row locks. Every read in a write
transaction of a row another instance may change at the same time locks it
(`FOR UPDATE`), and queues are claimed with `SKIP LOCKED` and a lease, so
that two instances never both act on one ticket, delivery or timer.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from gateway.clock import system_clock
from gateway.model import AUTO_ANSWER_KINDS, Attachment, Status, Ticket, domain_of, mailbox_of
from gateway.store.drivers import PostgresDriver, SQLiteDriver, StoreConflict, StoreUnavailable, connect

BUSY_TIMEOUT_MS = 5000
SEARCH_SCAN = 1000        # matching messages `Store.search` reads at most, newest first

MIGRATIONS: tuple[str, ...] = (
    # 1: the walking skeleton
    """
    CREATE TABLE inbound (                -- every mail received, as received
        id          INTEGER PRIMARY KEY,
        received_at TEXT NOT NULL,
        mail_from   TEXT NOT NULL,
        rcpt_to     TEXT NOT NULL,        -- JSON list: the envelope recipients
        mailbox     TEXT NOT NULL,
        sha256      TEXT NOT NULL,
        size        INTEGER NOT NULL,
        raw         BLOB,                 -- the bytes, or NULL when in raw_path
        raw_path    TEXT,                 -- relative to data_dir, for large mail
        message_id  TEXT,
        state       TEXT NOT NULL,        -- received | processed | duplicate | quarantined
        error       TEXT
    );
    CREATE INDEX inbound_state ON inbound(state) WHERE state IN ('received', 'quarantined');

    CREATE TABLE tickets (
        id                INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused
        subject           TEXT NOT NULL,
        status            TEXT NOT NULL,
        requester         TEXT NOT NULL,
        cc                TEXT NOT NULL DEFAULT '[]',
        region            TEXT NOT NULL,
        govcloud          INTEGER NOT NULL,
        priority          INTEGER NOT NULL,
        mailbox           TEXT NOT NULL,
        linked_ticket     INTEGER REFERENCES tickets(id),
        created_at        TEXT NOT NULL,
        updated_at        TEXT NOT NULL,
        first_response_at TEXT,
        resolved_at       TEXT,
        closed_at         TEXT
    );
    CREATE INDEX tickets_status ON tickets(status, id);

    CREATE TABLE messages (
        id          INTEGER PRIMARY KEY,
        ticket_id   INTEGER NOT NULL REFERENCES tickets(id),
        direction   TEXT NOT NULL,        -- in | out
        kind        TEXT NOT NULL,
        sender      TEXT NOT NULL,
        recipients  TEXT NOT NULL,        -- JSON list
        cc          TEXT NOT NULL DEFAULT '[]',
        subject     TEXT NOT NULL,
        message_id  TEXT NOT NULL,
        body_text   TEXT NOT NULL,
        reply_text  TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        inbound_id  INTEGER REFERENCES inbound(id)
    );
    CREATE INDEX messages_ticket ON messages(ticket_id, id);
    CREATE INDEX messages_message_id ON messages(message_id);

    CREATE TABLE attachments (
        message_row  INTEGER NOT NULL REFERENCES messages(id),
        position     INTEGER NOT NULL,
        filename     TEXT NOT NULL,       -- the sender's name, for display only
        content_type TEXT NOT NULL,
        size         INTEGER NOT NULL,
        sha256       TEXT NOT NULL,       -- content lives at data_dir/attachments/<sha256>
        content_id   TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (message_row, position)
    );

    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY,
        message_row     INTEGER NOT NULL REFERENCES messages(id),
        ticket_id       INTEGER NOT NULL REFERENCES tickets(id),
        kind            TEXT NOT NULL,
        relay           TEXT NOT NULL,    -- default | govcloud
        mail_from       TEXT NOT NULL,
        rcpt_to         TEXT NOT NULL,    -- JSON list
        content         BLOB NOT NULL,    -- rendered once: a retry sends the same bytes
        state           TEXT NOT NULL,    -- queued | sent | failed
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        claimed_until   TEXT,
        last_error      TEXT,
        created_at      TEXT NOT NULL,
        sent_at         TEXT
    );
    CREATE INDEX outbox_due ON outbox(next_attempt_at) WHERE state = 'queued';
    """,
    # 2: the ticket lifecycle: scheduler timers, escalation, undeliverable addresses
    """
    ALTER TABLE tickets ADD COLUMN escalated INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tickets ADD COLUMN reminder_due_at TEXT;
    ALTER TABLE tickets ADD COLUMN autoclose_due_at TEXT;
    ALTER TABLE tickets ADD COLUMN close_due_at TEXT;
    ALTER TABLE tickets ADD COLUMN undeliverable TEXT NOT NULL DEFAULT '[]';
    CREATE INDEX tickets_reminder_due ON tickets(reminder_due_at) WHERE reminder_due_at IS NOT NULL;
    CREATE INDEX tickets_autoclose_due ON tickets(autoclose_due_at) WHERE autoclose_due_at IS NOT NULL;
    CREATE INDEX tickets_close_due ON tickets(close_due_at) WHERE close_due_at IS NOT NULL;
    CREATE INDEX tickets_created ON tickets(created_at);
    """,
    # 3: the rules stage's decision, and the first-response (SLA) timer
    """
    ALTER TABLE tickets ADD COLUMN plan TEXT NOT NULL DEFAULT '';
    ALTER TABLE tickets ADD COLUMN response_due_at TEXT;
    ALTER TABLE tickets ADD COLUMN sla_warned_at TEXT;
    ALTER TABLE tickets ADD COLUMN missing TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE tickets ADD COLUMN redirect TEXT;
    ALTER TABLE tickets ADD COLUMN decision TEXT;      -- JSON: the decision with its evidence
    CREATE INDEX tickets_response_due ON tickets(response_due_at)
        WHERE sla_warned_at IS NULL AND first_response_at IS NULL AND response_due_at IS NOT NULL;
    """,
    # 4: the language the customer is answered in
    """
    ALTER TABLE tickets ADD COLUMN language TEXT NOT NULL DEFAULT 'en';
    """,
    # 5: the per-sender cap on automatic answers looks tickets up by requester:
    # by created_at alone its cost grew with every ticket of the last hour
    """
    CREATE INDEX tickets_requester ON tickets(requester, created_at);
    """,
    # 6: several instances on one database: inbound dedupe by a unique key (the
    # same mail delivered to two instances is one message), leases (the IMAP
    # poller), and settings every instance must share (the ticket-token secret)
    """
    CREATE TABLE inbound_message_ids (message_id TEXT PRIMARY KEY);
    INSERT INTO inbound_message_ids (message_id)
        SELECT DISTINCT message_id FROM messages WHERE direction = 'in';
    CREATE TABLE leases (
        name   TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until  TEXT NOT NULL
    );
    CREATE TABLE settings (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 7: who holds an outbox claim, so that only the holder renews or records it
    """
    ALTER TABLE outbox ADD COLUMN claimed_by TEXT;
    """,
    # 8: when a staff address was last told that its mail on a ticket proved nothing
    # (at most once an hour per ticket: a forger can't make us mail the agent in a loop)
    """
    CREATE TABLE staff_warnings (
        ticket_id INTEGER NOT NULL,
        address   TEXT NOT NULL,
        sent_at   TEXT NOT NULL,
        PRIMARY KEY (ticket_id, address)
    );
    """,
    # 9: loop and flood caps count per requester mailbox (case and +tag folded) and
    # per sender domain (tickets made before have neither: they leave the hour soon)
    """
    ALTER TABLE tickets ADD COLUMN requester_mailbox TEXT;
    ALTER TABLE tickets ADD COLUMN requester_domain TEXT;
    CREATE INDEX tickets_requester_mailbox ON tickets(requester_mailbox, created_at);
    CREATE INDEX tickets_requester_domain ON tickets(requester_domain, created_at);
    """,
    # 10: a restarted instance finds its dead predecessor's claims (issue 15)
    """
    CREATE INDEX outbox_claimed_by ON outbox(claimed_by) WHERE state = 'queued';
    """,
    # 11: the ticket-token secret lives only in its key file or $GATEWAY_TOKEN_SECRET
    # (issue 14). Store.open handed the copy that migration 6 kept here to the key
    # file before this runs; overwritten first, so that the freed page holds no copy
    """
    UPDATE settings SET value = '0' WHERE name = 'ticket_token_secret';
    DELETE FROM settings WHERE name = 'ticket_token_secret';
    """,
    # 12: what each requester mailbox and domain cost, per minute (issue 21): the loop
    # caps read at most the hour's 61 rows of two keys, not every ticket of the hour
    # (counts start from zero at the upgrade: at most one hour more than the caps allow)
    """
    CREATE TABLE sender_load (
        scope   TEXT NOT NULL,             -- 'mailbox:<address>' | 'domain:<domain>'
        minute  TEXT NOT NULL,             -- UTC, 'YYYY-MM-DDTHH:MM'
        tickets INTEGER NOT NULL DEFAULT 0,
        answers INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, minute)
    );
    CREATE INDEX sender_load_minute ON sender_load(minute);
    """,
    # 13: escalation tiers (issue 17): who owns an escalated ticket, where it went,
    # the owner's reminders, and the ticket's record of process rules applied
    """
    ALTER TABLE tickets ADD COLUMN tier INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE tickets ADD COLUMN owner TEXT;
    ALTER TABLE tickets ADD COLUMN escalated_at TEXT;
    ALTER TABLE tickets ADD COLUMN escalated_by TEXT;
    ALTER TABLE tickets ADD COLUMN escalation_queue TEXT;
    ALTER TABLE tickets ADD COLUMN customer_told_at TEXT;
    ALTER TABLE tickets ADD COLUMN contact_due_at TEXT;
    ALTER TABLE tickets ADD COLUMN manual_close_due_at TEXT;
    CREATE INDEX tickets_contact_due ON tickets(contact_due_at) WHERE contact_due_at IS NOT NULL;
    CREATE INDEX tickets_manual_close_due ON tickets(manual_close_due_at)
        WHERE manual_close_due_at IS NOT NULL;
    CREATE TABLE ticket_events (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        ticket_id INTEGER NOT NULL REFERENCES tickets(id),
        at        TEXT NOT NULL,
        rule      TEXT NOT NULL,
        detail    TEXT NOT NULL
    );
    CREATE INDEX ticket_events_ticket ON ticket_events(ticket_id, id);
    """,
    # 14: emergency tickets (issue 17): priority 1 on a 24/7 clock
    """
    ALTER TABLE tickets ADD COLUMN emergency INTEGER NOT NULL DEFAULT 0;
    """,
    # 15: authorised contacts (issue 17): the requester's standing with its organisation
    """
    ALTER TABLE tickets ADD COLUMN contact TEXT NOT NULL DEFAULT '';
    """,
    # 16: `gateway tickets search` (issue 20): the mail received on a ticket (subject,
    # text) and each ticket's subject and requester, full-text indexed. SQLite keeps
    # FTS5 tables without a copy of the text (content=''), fed by triggers; PostgreSQL
    # GIN indexes over the same text. Each message counts with its first 64 KiB: a
    # 20 MB mail costs no more to index than that, and PostgreSQL's tsvector limit
    # (1 MB) is never reached. The /*sqlite*/ and /*postgresql*/ marks say which
    # store runs a statement (gateway.store.drivers.statements).
    """
    /*sqlite*/ CREATE VIRTUAL TABLE message_search USING fts5(text, content='');
    /*sqlite*/ CREATE VIRTUAL TABLE ticket_search USING fts5(text, content='');
    /*sqlite*/ INSERT INTO message_search (rowid, text)
        SELECT id, substr(subject || ' ' || body_text, 1, 65536) FROM messages WHERE direction = 'in';
    /*sqlite*/ INSERT INTO ticket_search (rowid, text) SELECT id, subject || ' ' || requester FROM tickets;
    /*sqlite*/ CREATE TRIGGER messages_search AFTER INSERT ON messages WHEN new.direction = 'in' BEGIN
        INSERT INTO message_search (rowid, text) VALUES (new.id, substr(new.subject || ' ' || new.body_text, 1, 65536));
    END;
    /*sqlite*/ CREATE TRIGGER tickets_search AFTER INSERT ON tickets BEGIN
        INSERT INTO ticket_search (rowid, text) VALUES (new.id, new.subject || ' ' || new.requester);
    END;
    /*postgresql*/ CREATE INDEX messages_search ON messages USING GIN (
        (to_tsvector('simple', left(subject || ' ' || body_text, 65536)))) WHERE direction = 'in';
    /*postgresql*/ CREATE INDEX tickets_search ON tickets USING GIN (
        (to_tsvector('simple', subject || ' ' || requester || ' ' || translate(requester, '@.+', '   '))));
    """,
    # 17: the SLA warning before the target and the breach notice at it (issue 19),
    # and whether the first-response target was met, recorded when it is known. The
    # breach notice takes over migration 3's warning (sent when the target passed).
    """
    ALTER TABLE tickets ADD COLUMN sla_warn_at TEXT;
    ALTER TABLE tickets ADD COLUMN sla_breached_at TEXT;
    ALTER TABLE tickets ADD COLUMN sla_outcome TEXT;
    UPDATE tickets SET sla_breached_at = sla_warned_at WHERE sla_warned_at IS NOT NULL;
    UPDATE tickets SET sla_outcome = CASE WHEN first_response_at <= response_due_at THEN 'met' ELSE 'missed' END
        WHERE response_due_at IS NOT NULL AND first_response_at IS NOT NULL;
    UPDATE tickets SET sla_outcome = 'missed' WHERE sla_outcome IS NULL AND sla_breached_at IS NOT NULL;
    DROP INDEX tickets_response_due;
    CREATE INDEX tickets_response_due ON tickets(response_due_at)
        WHERE sla_breached_at IS NULL AND first_response_at IS NULL AND response_due_at IS NOT NULL;
    CREATE INDEX tickets_sla_warn ON tickets(sla_warn_at)
        WHERE sla_warned_at IS NULL AND first_response_at IS NULL AND sla_warn_at IS NOT NULL;
    """,
    # 18: each ticket's category and product (issue 19), from the rules stage or `#category`/`#product`
    """
    ALTER TABLE tickets ADD COLUMN category TEXT NOT NULL DEFAULT '';
    ALTER TABLE tickets ADD COLUMN product TEXT NOT NULL DEFAULT '';
    """,
    # 19: mail about no ticket (issue 17: the polite answer to someone who is not an
    # authorised contact under `restrict`): an outbox row without a ticket and without
    # a message row, naming the received mail it answers instead (`inbound_id`).
    # SQLite cannot drop NOT NULL: the table is rebuilt (nothing references it);
    # PostgreSQL alters the columns in place.
    """
    /*sqlite*/ CREATE TABLE outbox_new (
        id              INTEGER PRIMARY KEY,
        message_row     INTEGER REFERENCES messages(id),    -- NULL: mail about no ticket
        ticket_id       INTEGER REFERENCES tickets(id),     -- NULL: mail about no ticket
        kind            TEXT NOT NULL,
        relay           TEXT NOT NULL,
        mail_from       TEXT NOT NULL,
        rcpt_to         TEXT NOT NULL,
        content         BLOB NOT NULL,
        state           TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        claimed_until   TEXT,
        last_error      TEXT,
        created_at      TEXT NOT NULL,
        sent_at         TEXT,
        claimed_by      TEXT,
        inbound_id      INTEGER REFERENCES inbound(id)      -- the mail a ticket-less answer answers
    );
    /*sqlite*/ INSERT INTO outbox_new (id, message_row, ticket_id, kind, relay, mail_from, rcpt_to, content,
        state, attempts, next_attempt_at, claimed_until, last_error, created_at, sent_at, claimed_by)
        SELECT id, message_row, ticket_id, kind, relay, mail_from, rcpt_to, content, state, attempts,
        next_attempt_at, claimed_until, last_error, created_at, sent_at, claimed_by FROM outbox;
    /*sqlite*/ DROP TABLE outbox;
    /*sqlite*/ ALTER TABLE outbox_new RENAME TO outbox;
    /*sqlite*/ CREATE INDEX outbox_due ON outbox(next_attempt_at) WHERE state = 'queued';
    /*sqlite*/ CREATE INDEX outbox_claimed_by ON outbox(claimed_by) WHERE state = 'queued';
    /*postgresql*/ ALTER TABLE outbox ALTER COLUMN message_row DROP NOT NULL;
    /*postgresql*/ ALTER TABLE outbox ALTER COLUMN ticket_id DROP NOT NULL;
    /*postgresql*/ ALTER TABLE outbox ADD COLUMN inbound_id INTEGER REFERENCES inbound(id);
    CREATE INDEX outbox_inbound ON outbox(inbound_id, kind) WHERE inbound_id IS NOT NULL;
    """,
    # 20: the daily digest (issue 20): the local day each recipient's digest was last
    # queued for, so that it goes out once a day however often `run-due` runs
    """
    CREATE TABLE digests (
        recipient TEXT PRIMARY KEY,      -- "queue:<address>:<commercial|govcloud>", "assignee:..."
        day       TEXT NOT NULL,         -- YYYY-MM-DD in [digest] timezone
        sent_at   TEXT NOT NULL
    );
    """,
)

LEGACY_SECRET = "ticket_token_secret"     # the setting migration 6 kept the secret in
SECRET_CHECK = "ticket_token_check"       # its fingerprint (gateway.outbound.tokens.fingerprint)


@dataclass(frozen=True)
class SenderCounts:
    """What one requester mailbox and its domain cost in a window (Tx.sender_counts)."""

    tickets_by_mailbox: int
    tickets_by_domain: int
    answers_to_mailbox: int
    answers_to_domain: int


def iso(dt: datetime | None) -> str | None:
    """Times are stored and shown as ISO-8601 in UTC with an explicit offset."""
    return None if dt is None else dt.astimezone(UTC).isoformat(timespec="seconds")


def iso_ms(dt: datetime) -> str:
    """Lease ends, to the millisecond: a lease of a few seconds must not lose
    most of a second to rounding (compared only with each other)."""
    return dt.astimezone(UTC).isoformat(timespec="milliseconds")


def _minute(dt: datetime) -> str:
    """The UTC minute of `dt`, as `sender_load` keys it: 'YYYY-MM-DDTHH:MM'."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M")


def from_iso(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True)
class Failure:
    """An outbound mail the relay refused for good, as recorded."""

    ticket_id: int
    kind: str
    rcpt_to: tuple[str, ...]
    marked: tuple[str, ...]          # participants newly marked undeliverable
    error: str


@dataclass(frozen=True)
class OutboxItem:
    id: int
    ticket_id: int | None          # None: mail about no ticket (migration 19)
    kind: str
    relay: str
    mail_from: str
    rcpt_to: list[str]
    content: bytes
    attempts: int


def _enclave(govcloud: bool | None) -> tuple[str, tuple[int, ...]]:
    """The condition that keeps one enclave's tickets (GovCloud or commercial), or none."""
    return ("", ()) if govcloud is None else (" AND govcloud = ?", (int(govcloud),))


_TICKET_COLS = ("id, subject, status, requester, cc, region, govcloud, priority, mailbox, "
                "linked_ticket, created_at, first_response_at, resolved_at, closed_at, escalated, "
                "reminder_due_at, autoclose_due_at, close_due_at, undeliverable, plan, "
                "response_due_at, sla_warned_at, missing, redirect, language, tier, owner, "
                "escalated_at, escalated_by, escalation_queue, customer_told_at, contact_due_at, "
                "manual_close_due_at, emergency, contact, sla_warn_at, sla_breached_at, sla_outcome, category, product")


def _ticket(row: Sequence[Any]) -> Ticket:
    return Ticket(
        id=row[0], subject=row[1], status=Status(row[2]), requester=row[3],
        cc=tuple(json.loads(row[4])), region=row[5], govcloud=bool(row[6]), priority=row[7],
        mailbox=row[8], linked_ticket=row[9], created_at=from_iso(row[10]),  # type: ignore[arg-type]
        first_response_at=from_iso(row[11]), resolved_at=from_iso(row[12]),
        closed_at=from_iso(row[13]), escalated=bool(row[14]), reminder_due_at=from_iso(row[15]),
        autoclose_due_at=from_iso(row[16]), close_due_at=from_iso(row[17]),
        undeliverable=tuple(json.loads(row[18])), plan=row[19], response_due_at=from_iso(row[20]),
        sla_warned_at=from_iso(row[21]), missing=tuple(json.loads(row[22])), redirect=row[23],
        language=row[24], tier=row[25], owner=row[26], escalated_at=from_iso(row[27]),
        escalated_by=row[28], escalation_queue=row[29], customer_told_at=from_iso(row[30]),
        contact_due_at=from_iso(row[31]), manual_close_due_at=from_iso(row[32]),
        emergency=bool(row[33]), contact=row[34], sla_warn_at=from_iso(row[35]),
        sla_breached_at=from_iso(row[36]), sla_outcome=row[37], category=row[38], product=row[39],
    )


Driver = SQLiteDriver | PostgresDriver
T = TypeVar("T")


class Tx:
    """The statements of one write transaction."""

    def __init__(self, db: Driver):
        self.db = db
        self._requesters: dict[int, tuple[str, str]] = {}   # tickets made here: requester mailbox, domain

    async def _insert(self, sql: str, params: Sequence[Any]) -> int:
        rows = await self.db.fetch(sql + " RETURNING id", params)
        return int(rows[0][0])

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await self.db.fetch(sql, params)

    # -- inbound ---------------------------------------------------------
    async def add_inbound(self, *, received_at: datetime, mail_from: str, rcpt_to: Sequence[str],
                          mailbox: str, sha256: str, size: int, raw: bytes | None,
                          raw_path: str | None, message_id: str | None) -> int:
        return await self._insert(
            "INSERT INTO inbound (received_at, mail_from, rcpt_to, mailbox, sha256, size, raw,"
            " raw_path, message_id, state) VALUES (?,?,?,?,?,?,?,?,?,'received')",
            (iso(received_at), mail_from, json.dumps(list(rcpt_to)), mailbox, sha256, size, raw,
             raw_path, message_id))

    async def set_inbound_state(self, inbound_id: int, state: str, error: str | None = None) -> None:
        await self.db.execute("UPDATE inbound SET state = ?, error = ? WHERE id = ?",
                              (state, error, inbound_id))

    async def claim_inbound_message(self, message_id: str, digest: str = "") -> str:
        """Take this mail's key for the mail being processed: its Message-ID plus
        `digest`, a digest of what survives re-delivery (project issue 15). Unique
        in the database, so two instances handed the same mail at once process it
        once: the second waits for the first's commit and finds it taken.

        "new"; "duplicate" (the key was taken: an MTA retry, the SMTP and IMAP copy
        of one mail; or the bare Message-ID, as versions before the digest kept
        it); "reused" (the Message-ID was taken with other content: a different
        mail, processed as new, the clash for the log)."""
        key = f"{message_id} {digest}" if digest else message_id
        if digest and await self._all("SELECT 1 FROM inbound_message_ids WHERE message_id = ?", (message_id,)):
            return "duplicate"
        if not await self._all(
                "INSERT INTO inbound_message_ids (message_id) VALUES (?)"
                " ON CONFLICT (message_id) DO NOTHING RETURNING message_id", (key,)):
            return "duplicate"
        # "<id> *" marks the Message-ID as seen: there already, it came with other content
        seen = await self._all(
            "INSERT INTO inbound_message_ids (message_id) VALUES (?)"
            " ON CONFLICT (message_id) DO NOTHING RETURNING message_id", (message_id + " *",))
        return "new" if seen else "reused"

    async def release_inbound_message(self, message_id: str, digest: str = "") -> None:
        """A mail that ended in quarantine gives its key back (`claim_inbound_message`:
        the Message-ID plus `digest`, and the Message-ID's seen mark): a retry, or
        the sender's next attempt, is not a duplicate."""
        keys = (message_id, f"{message_id} {digest}", f"{message_id} *") if digest else (message_id,)
        await self.db.execute(f"DELETE FROM inbound_message_ids WHERE message_id IN ({','.join('?' * len(keys))})",
                              keys)

    # -- threading -------------------------------------------------------
    async def tickets_of_messages(self, message_ids: Sequence[str]) -> dict[str, int]:
        """Message-ID -> ticket for every given ID that is a message of a ticket."""
        if not message_ids:
            return {}
        ids = list(dict.fromkeys(message_ids))[:100]
        marks = ",".join("?" * len(ids))
        rows = await self._all(f"SELECT message_id, ticket_id FROM messages WHERE message_id IN ({marks})"
                               " ORDER BY id", ids)
        return {mid: tid for mid, tid in rows}

    async def ticket(self, ticket_id: int) -> Ticket | None:
        """The ticket, locked until this transaction ends (another instance's
        transaction on it waits, then sees what this one wrote)."""
        return await _fetch_ticket(self.db, ticket_id, lock=True)

    async def open_tickets_of(self, requester: str, since: datetime, limit: int = 20) -> list[Ticket]:
        """The requester's open and pending tickets created since `since`, newest
        first (one ticket per problem; the tickets_requester index)."""
        rows = await self._all(
            f"SELECT {_TICKET_COLS} FROM tickets WHERE requester = ? AND created_at >= ?"
            " AND status IN ('open', 'pending') ORDER BY id DESC LIMIT ?", (requester, iso(since), limit))
        return [_ticket(r) for r in rows]

    async def ticket_agents(self, ticket_id: int, limit: int = 500) -> list[str]:
        """Who worked on the ticket as staff, each once: the senders of its relayed
        staff answers, then the agents its events name (`#note` authors, assignees
        and who assigned, escalating agents; an escalation by the rules names none).
        Only proven agents' mail makes these (a forged or unproven staff mail is
        an unsent note, and no event)."""
        rows = await self._all("SELECT sender FROM messages WHERE ticket_id = ? AND direction = 'in'"
                               " AND kind = 'staff' ORDER BY id LIMIT ?", (ticket_id, limit))
        found = [r[0] for r in rows]
        events = await self._all("SELECT detail FROM ticket_events WHERE ticket_id = ?"
                                 " AND rule IN ('note', 'assigned', 'escalation') ORDER BY id LIMIT ?",
                                 (ticket_id, limit))
        for (detail,) in events:
            d = json.loads(detail)
            found.extend(v for v in (d.get("by"), d.get("owner")) if isinstance(v, str) and "@" in v)
        return list(dict.fromkeys(found))

    async def agent_tickets(self, agent: str, near: datetime, govcloud: Sequence[bool],
                            limit: int) -> dict[str, list[Ticket]]:
        """`#list`: the agent's open and waiting (pending) tickets, newest first, and
        the open tickets without a first response whose target falls before `near`
        (or has passed), theirs or unassigned, soonest first; at most `limit` of
        each, of tickets whose GovCloud flag is in `govcloud` (what the agent may
        answer)."""
        gov = ",".join(str(int(g)) for g in govcloud) or "-1"
        found: dict[str, list[Ticket]] = {}
        for name, status in (("open", "open"), ("waiting", "pending")):
            rows = await self._all(f"SELECT {_TICKET_COLS} FROM tickets WHERE owner = ? AND status = ?"
                                   f" AND govcloud IN ({gov}) ORDER BY id DESC LIMIT ?", (agent, status, limit))
            found[name] = [_ticket(r) for r in rows]
        rows = await self._all(
            f"SELECT {_TICKET_COLS} FROM tickets WHERE status = 'open' AND first_response_at IS NULL"
            f" AND response_due_at IS NOT NULL AND response_due_at <= ? AND (owner = ? OR owner IS NULL)"
            f" AND govcloud IN ({gov}) ORDER BY response_due_at, id LIMIT ?", (iso(near), agent, limit))
        found["near"] = [_ticket(r) for r in rows]
        return found

    async def digest_lists(self, near: datetime, *, govcloud: bool, region: str | None = None,
                           owner: str | None = None, limit: int) -> dict[str, tuple[int, list[Ticket]]]:
        """The daily digest's lists, each as (how many, at most `limit` of them):
        open, waiting (pending), near (open, no first response, target before
        `near` or passed), escalated (open or pending) and unassigned (open or
        pending, no owner). Of the tickets whose GovCloud flag is `govcloud`, of
        `region` when given (a queue's digest); with `owner` (an agent's digest)
        the lists hold the agent's tickets, near also the unassigned ones."""
        scope = "govcloud = ?"
        params: list[Any] = [int(govcloud)]
        if region is not None:
            scope, params = scope + " AND region = ?", [*params, region]
        mine, mine_p = ("owner = ?", [owner]) if owner else ("1 = 1", [])
        near_owner, near_p = ("(owner = ? OR owner IS NULL)", [owner]) if owner else ("1 = 1", [])
        parts: dict[str, tuple[str, list[Any], str]] = {
            "open": (f"status = 'open' AND {mine}", mine_p, "id DESC"),
            "waiting": (f"status = 'pending' AND {mine}", mine_p, "id DESC"),
            "near": ((f"status = 'open' AND first_response_at IS NULL AND response_due_at IS NOT NULL"
                     f" AND response_due_at <= ? AND {near_owner}"), [iso(near), *near_p], "response_due_at, id"),
            "escalated": (f"status IN ('open', 'pending') AND escalated = 1 AND {mine}", mine_p, "id DESC"),
            "unassigned": ("status IN ('open', 'pending') AND owner IS NULL", [], "id DESC"),
        }
        found: dict[str, tuple[int, list[Ticket]]] = {}
        for name, (where, p, order) in parts.items():
            cond = f"{scope} AND {where}"
            count = await self._all(f"SELECT count(*) FROM tickets WHERE {cond}", (*params, *p))
            rows = await self._all(f"SELECT {_TICKET_COLS} FROM tickets WHERE {cond} ORDER BY {order} LIMIT ?",
                                   (*params, *p, limit))
            found[name] = (int(count[0][0]), [_ticket(r) for r in rows])
        return found

    async def claim_digest(self, recipient: str, day: str, now: datetime) -> bool:
        """Record that `recipient`'s digest of local day `day` is decided (queued, or
        not needed: an agent without tickets); False when it was already (this day
        or a later one): a digest goes out once a day."""
        return bool(await self._all(
            "INSERT INTO digests (recipient, day, sent_at) VALUES (?, ?, ?)"
            " ON CONFLICT (recipient) DO UPDATE SET day = excluded.day, sent_at = excluded.sent_at"
            " WHERE digests.day < excluded.day RETURNING recipient", (recipient, day, iso(now))))

    async def customer_thread(self, ticket_id: int, customer_kinds: Sequence[str]) -> list[str]:
        """Message-IDs of what the customer saw and wrote, oldest first."""
        marks = ",".join("?" * len(customer_kinds))
        rows = await self._all(f"SELECT message_id FROM messages WHERE ticket_id = ? AND kind IN ({marks})"
                               " ORDER BY id", (ticket_id, *customer_kinds))
        return [r[0] for r in rows]

    async def due_ticket_ids(self, now: datetime, limit: int = 500) -> list[int]:
        t = iso(now)
        # The IS NOT NULL terms match the partial indexes: without them SQLite scans tickets.
        rows = await self._all("SELECT id FROM tickets WHERE reminder_due_at <= ?"
                               " AND reminder_due_at IS NOT NULL UNION"
                               " SELECT id FROM tickets WHERE autoclose_due_at <= ?"
                               " AND autoclose_due_at IS NOT NULL UNION"
                               " SELECT id FROM tickets WHERE close_due_at <= ?"
                               " AND close_due_at IS NOT NULL UNION"
                               " SELECT id FROM tickets WHERE response_due_at <= ? AND sla_breached_at IS NULL"
                               " AND first_response_at IS NULL AND response_due_at IS NOT NULL UNION"
                               " SELECT id FROM tickets WHERE sla_warn_at <= ? AND sla_warned_at IS NULL"
                               " AND first_response_at IS NULL AND sla_warn_at IS NOT NULL UNION"
                               " SELECT id FROM tickets WHERE contact_due_at <= ?"
                               " AND contact_due_at IS NOT NULL UNION"
                               " SELECT id FROM tickets WHERE manual_close_due_at <= ?"
                               " AND manual_close_due_at IS NOT NULL"
                               " ORDER BY 1 LIMIT ?", (t, t, t, t, t, t, t, limit))
        return [r[0] for r in rows]

    # -- tickets and messages -------------------------------------------
    async def create_ticket(self, *, subject: str, requester: str, cc: Sequence[str], region: str,
                            govcloud: bool, priority: int, mailbox: str,
                            linked_ticket: int | None, now: datetime, plan: str = "",
                            response_due_at: datetime | None = None, sla_warn_at: datetime | None = None,
                            missing: Sequence[str] = (),
                            redirect: str | None = None, language: str = "en",
                            decision: dict[str, Any] | None = None, emergency: bool = False,
                            contact: str = "", category: str = "", product: str = "") -> Ticket:
        ticket_id = await self._insert(
            "INSERT INTO tickets (subject, status, requester, cc, region, govcloud, priority,"
            " mailbox, linked_ticket, created_at, updated_at, plan, response_due_at, missing,"
            " redirect, decision, language, requester_mailbox, requester_domain, emergency, contact,"
            " sla_warn_at, category, product) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (subject, Status.OPEN.value, requester, json.dumps(list(cc)), region, int(govcloud),
             priority, mailbox, linked_ticket, iso(now), iso(now), plan, iso(response_due_at),
             json.dumps(list(missing)), redirect, json.dumps(decision) if decision else None,
             language, mailbox_of(requester), domain_of(requester), int(emergency), contact,
             iso(sla_warn_at), category, product))
        self._requesters[ticket_id] = (mailbox_of(requester), domain_of(requester))
        await self._add_load(self._requesters[ticket_id], now, tickets=1)
        # the row as written (times at the stored one-second precision), without reading it back
        return Ticket(id=ticket_id, subject=subject, status=Status.OPEN, requester=requester,
                      cc=tuple(cc), region=region, govcloud=govcloud, priority=priority,
                      mailbox=mailbox, linked_ticket=linked_ticket,
                      created_at=from_iso(iso(now)), plan=plan,  # type: ignore[arg-type]
                      response_due_at=from_iso(iso(response_due_at)), missing=tuple(missing),
                      sla_warn_at=from_iso(iso(sla_warn_at)), category=category, product=product,
                      redirect=redirect, language=language, emergency=emergency, contact=contact)

    async def update_ticket(self, ticket_id: int, now: datetime, **fields: Any) -> None:
        allowed = {"status", "cc", "priority", "first_response_at", "resolved_at", "closed_at",
                   "escalated", "reminder_due_at", "autoclose_due_at", "close_due_at", "undeliverable",
                   "sla_warned_at", "tier", "owner", "escalated_at", "escalated_by",
                   "escalation_queue", "customer_told_at", "contact_due_at", "manual_close_due_at",
                   "sla_breached_at", "sla_outcome", "missing", "response_due_at", "sla_warn_at",
                   "category", "product", "govcloud", "mailbox"}
        assert set(fields) <= allowed, set(fields) - allowed
        values = [json.dumps(list(v)) if k in ("cc", "undeliverable", "missing")
                  else int(v) if k == "govcloud"
                  else iso(v) if isinstance(v, datetime)
                  else v.value if isinstance(v, Status) else v for k, v in fields.items()]
        sets = ", ".join(f"{k} = ?" for k in fields)
        await self.db.execute(f"UPDATE tickets SET {sets}, updated_at = ? WHERE id = ?",
                              (*values, iso(now), ticket_id))

    async def add_message(self, *, ticket_id: int, direction: str, kind: str, sender: str,
                          recipients: Sequence[str], cc: Sequence[str] = (), subject: str,
                          message_id: str, body_text: str, reply_text: str, now: datetime,
                          inbound_id: int | None = None) -> int:
        if direction == "out" and kind in AUTO_ANSWER_KINDS:
            await self._add_load(await self._requester(ticket_id), now, answers=1)
        return await self._insert(
            "INSERT INTO messages (ticket_id, direction, kind, sender, recipients, cc, subject,"
            " message_id, body_text, reply_text, created_at, inbound_id)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (ticket_id, direction, kind, sender, json.dumps(list(recipients)), json.dumps(list(cc)),
             subject, message_id, body_text, reply_text, iso(now), inbound_id))

    async def add_attachments(self, message_row: int, attachments: Iterable[Attachment]) -> None:
        await self.db.executemany(
            "INSERT INTO attachments (message_row, position, filename, content_type, size, sha256,"
            " content_id) VALUES (?,?,?,?,?,?,?)",
            [(message_row, i, a.filename, a.content_type, a.size, a.sha256, a.content_id)
             for i, a in enumerate(attachments)])

    async def last_message_at(self, ticket_id: int, kinds: Sequence[str]) -> datetime | None:
        """When the ticket's latest message of one of `kinds` was recorded."""
        marks = ",".join("?" * len(kinds))
        rows = await self._all(f"SELECT max(created_at) FROM messages WHERE ticket_id = ? AND kind IN ({marks})",
                               (ticket_id, *kinds))
        return from_iso(rows[0][0]) if rows else None

    async def add_event(self, ticket_id: int, now: datetime, rule: str, detail: dict[str, Any]) -> None:
        """Record a process rule applied to the ticket, with its evidence (`tickets show`)."""
        await self.db.execute("INSERT INTO ticket_events (ticket_id, at, rule, detail) VALUES (?,?,?,?)",
                              (ticket_id, iso(now), rule, json.dumps(detail, ensure_ascii=False)))

    async def has_event(self, ticket_id: int, rule: str) -> bool:
        """Whether the rule was applied to the ticket before (once-per-ticket steps)."""
        return bool(await self._all("SELECT 1 FROM ticket_events WHERE ticket_id = ? AND rule = ? LIMIT 1",
                                    (ticket_id, rule)))

    # -- outbox ----------------------------------------------------------
    async def enqueue(self, *, message_row: int | None, ticket_id: int | None, kind: str, relay: str,
                      mail_from: str, rcpt_to: Sequence[str], content: bytes, now: datetime,
                      inbound_id: int | None = None) -> int:
        """Queue one outbound mail, due at once: at `now`, or at the real time when
        `now` is an injected time ahead of it (`run-due --now T`), so that what a
        run-due queues is due now for every instance, not at T (project issue 15).

        Mail about no ticket (a refused contact's answer) has neither `ticket_id`
        nor `message_row`, and names the received mail it answers (`inbound_id`)."""
        due = min(now, system_clock())
        return await self._insert(
            "INSERT INTO outbox (message_row, ticket_id, kind, relay, mail_from, rcpt_to, content,"
            " state, next_attempt_at, created_at, inbound_id) VALUES (?,?,?,?,?,?,?,'queued',?,?,?)",
            (message_row, ticket_id, kind, relay, mail_from, json.dumps(list(rcpt_to)), content,
             iso(due), iso(now), inbound_id))

    async def answered_inbound(self, inbound_id: int, kind: str) -> bool:
        """Whether a ticket-less answer of `kind` was queued for this received mail
        before (a `quarantine retry` of a mail still refused is not answered twice)."""
        return bool(await self._all("SELECT 1 FROM outbox WHERE inbound_id = ? AND kind = ? LIMIT 1",
                                    (inbound_id, kind)))

    # -- limits ----------------------------------------------------------
    async def staff_warning_due(self, ticket_id: int, address: str, now: datetime,
                                since: datetime) -> bool:
        """Whether `address` may be told about unproven mail on `ticket_id` now (not
        told since `since`); when it may, the telling is recorded in the same step."""
        rows = await self._all(
            "INSERT INTO staff_warnings (ticket_id, address, sent_at) VALUES (?, ?, ?)"
            " ON CONFLICT (ticket_id, address) DO UPDATE SET sent_at = excluded.sent_at"
            " WHERE staff_warnings.sent_at < ? RETURNING ticket_id",
            (ticket_id, address, iso(now), iso(since)))
        return bool(rows)

    async def _requester(self, ticket_id: int) -> tuple[str, str]:
        found = self._requesters.get(ticket_id)
        if found is None:
            rows = await self._all("SELECT requester_mailbox, requester_domain FROM tickets WHERE id = ?",
                                   (ticket_id,))
            found = (str(rows[0][0] or ""), str(rows[0][1] or "")) if rows else ("", "")
        return found

    async def _add_load(self, requester: tuple[str, str], now: datetime, *, tickets: int = 0,
                        answers: int = 0) -> None:
        minute = _minute(now)
        await self.db.executemany(
            "INSERT INTO sender_load (scope, minute, tickets, answers) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (scope, minute) DO UPDATE SET tickets = sender_load.tickets + excluded.tickets,"
            " answers = sender_load.answers + excluded.answers",
            [(f"mailbox:{requester[0]}", minute, tickets, answers),
             (f"domain:{requester[1]}", minute, tickets, answers)])

    async def sender_counts(self, mailbox: str, domain: str, since: datetime) -> SenderCounts:
        """Tickets opened since `since` by one requester mailbox and by one
        domain, and the automatic answers (`AUTO_ANSWER_KINDS`) queued on them.

        Read from the per-minute `sender_load` counters written with each ticket
        and answer: at most the window's minutes of two keys, whatever the
        sender's history (a count over the hour's tickets grew with every mail
        of a busy sender, issue 21). `since` counts from the start of its minute.
        """
        rows = await self._all(
            "SELECT scope, sum(tickets), sum(answers) FROM sender_load WHERE scope IN (?, ?) AND minute >= ?"
            " GROUP BY scope", (f"mailbox:{mailbox}", f"domain:{domain}", _minute(since)))
        found = {str(scope): (int(t or 0), int(a or 0)) for scope, t, a in rows}
        by_mailbox, by_domain = found.get(f"mailbox:{mailbox}", (0, 0)), found.get(f"domain:{domain}", (0, 0))
        return SenderCounts(tickets_by_mailbox=by_mailbox[0], tickets_by_domain=by_domain[0],
                            answers_to_mailbox=by_mailbox[1], answers_to_domain=by_domain[1])

    async def refusals_to(self, mailbox: str, since: datetime) -> int:
        """Answers to a refused contact (`add_refusal_load`) queued to one mailbox since `since`."""
        rows = await self._all("SELECT sum(answers) FROM sender_load WHERE scope = ? AND minute >= ?",
                               (f"refused:{mailbox}", _minute(since)))
        return int(rows[0][0] or 0) if rows else 0

    async def add_refusal_load(self, mailbox: str, domain: str, now: datetime) -> None:
        """Count an answer to a refused contact: as an automatic answer to the mailbox
        and the domain (the caps of every automatic answer), and as a refusal to the
        mailbox (`[limits] refusals_per_sender_per_hour`)."""
        await self._add_load((mailbox, domain), now, answers=1)
        await self.db.execute(
            "INSERT INTO sender_load (scope, minute, tickets, answers) VALUES (?, ?, 0, 1)"
            " ON CONFLICT (scope, minute) DO UPDATE SET answers = sender_load.answers + 1",
            (f"refused:{mailbox}", _minute(now)))

    async def forget_sender_load(self, before: datetime) -> int:
        """Drop the counters of minutes before `before` (the scheduler, hourly)."""
        return len(await self._all("DELETE FROM sender_load WHERE minute < ? RETURNING minute", (_minute(before),)))

    # -- quarantine ------------------------------------------------------
    async def is_quarantined(self, inbound_id: int) -> bool:
        """Inside a retry's transaction: whether the mail is (still) quarantined,
        so that two retries of one mail never process it twice."""
        rows = await self._all("SELECT state FROM inbound WHERE id = ?" + self.db.for_update,
                               (inbound_id,))
        return bool(rows) and rows[0][0] == "quarantined"


async def _settings_before_migration(db: Driver) -> dict[str, str]:
    """The secret-related settings of a database of any schema version (none when new)."""
    exists = ("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'settings'"
              if db.dialect == "sqlite" else "SELECT count(*) FROM pg_tables WHERE tablename = 'settings'"
              " AND schemaname = current_schema()")
    if not (await db.fetch(exists))[0][0]:
        return {}
    rows = await db.fetch("SELECT name, value FROM settings WHERE name IN (?, ?)", (LEGACY_SECRET, SECRET_CHECK))
    return {str(name): str(value) for name, value in rows}


async def _fetch_ticket(db: Driver, ticket_id: int, lock: bool = False) -> Ticket | None:
    rows = await db.fetch(f"SELECT {_TICKET_COLS} FROM tickets WHERE id = ?"
                          + (db.for_update if lock else ""), (ticket_id,))
    return _ticket(rows[0]) if rows else None


class Store:
    def __init__(self, db: Driver):
        self.db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, target: str | Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS, *,
                   legacy_secret: Callable[[str, str | None], None] | None = None) -> Store:
        """Open (and migrate) the store at a `[store] url`, or a SQLite file path.

        `legacy_secret(value, check)` is called, before any migration, when
        the database holds the ticket-token secret that earlier versions kept
        in it (with the stored fingerprint `check`, or None): it must save the
        value where the secret lives now, or raise (then nothing is migrated
        and the copy stays). The copy is removed after it returned.
        """
        url = f"sqlite:///{target}" if isinstance(target, Path) else target
        db = await connect(url, busy_timeout_ms)
        try:
            found = await _settings_before_migration(db)
            if LEGACY_SECRET in found:
                if legacy_secret is None:
                    # never migrate it away unsaved: the mail already sent would lose its tokens
                    raise StoreUnavailable("the database holds the ticket-token secret of an earlier version: "
                                           "open it with a configuration (any `gateway` command) to move it "
                                           "to the key file first")
                legacy_secret(found[LEGACY_SECRET], found.get(SECRET_CHECK))
                if db.dialect == "sqlite":
                    # the freed cell is zeroed, not left in the file (SQLite's secure_delete)
                    await db.execute("PRAGMA secure_delete = ON")
            await db.migrate(MIGRATIONS)
            if LEGACY_SECRET in found:
                # the removal (migration 11) ran before, and an instance of an older version wrote it again
                await db.begin()
                try:
                    await db.execute("UPDATE settings SET value = '0' WHERE name = ?", (LEGACY_SECRET,))
                    await db.execute("DELETE FROM settings WHERE name = ?", (LEGACY_SECRET,))
                    await db.commit()
                except BaseException:
                    await db.rollback()
                    raise
                if db.dialect == "sqlite":
                    await db.execute("PRAGMA secure_delete = OFF")
        except BaseException:
            await db.close()
            raise
        return cls(db)

    @property
    def dialect(self) -> str:
        return self.db.dialect

    async def close(self) -> None:
        await self.db.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """One write transaction; `StoreUnavailable` when the database can't take it."""
        async with self._lock:
            await self.db.begin()
            try:
                yield Tx(self.db)
                await self.db.commit()
            except BaseException:
                await self.db.rollback()
                raise

    async def run(self, work: Callable[[Tx], Awaitable[T]], attempts: int = 5) -> T:
        """`work` in one transaction, run again when a concurrent one won
        (`StoreConflict`: a deadlock between instances); `work` must be
        repeatable, with no effect outside the transaction."""
        for attempt in range(1, attempts + 1):
            try:
                async with self.transaction() as tx:
                    return await work(tx)
            except StoreConflict:
                if attempt == attempts:
                    raise
                await asyncio.sleep(0.001 * attempt)
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def savepoint(self, tx: Tx, name: str = "mail") -> AsyncIterator[Tx]:
        """A nested unit inside a transaction: on error only its own work is undone."""
        await tx.db.execute(f"SAVEPOINT {name}")
        try:
            yield tx
        except BaseException as e:
            try:
                await tx.db.execute(f"ROLLBACK TO {name}")
                await tx.db.execute(f"RELEASE {name}")
            except Exception as undo:  # noqa: BLE001 - whatever the undo raised, the unit is lost
                # the transaction itself is gone (connection lost): the whole of it fails
                raise StoreUnavailable(f"cannot undo a failed unit: {undo}") from e
            raise
        await tx.db.execute(f"RELEASE {name}")

    # -- reads -----------------------------------------------------------
    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._lock:
            return await self.db.fetch(sql, params)

    async def ticket(self, ticket_id: int) -> Ticket | None:
        async with self._lock:
            return await _fetch_ticket(self.db, ticket_id)

    async def count_unresolved(self, govcloud: bool | None = None) -> int:
        """Tickets open or pending now, whenever created (`stats`: open now), of one
        enclave (`govcloud` True/False) or of both (None)."""
        where, params = _enclave(govcloud)
        rows = await self._rows(f"SELECT count(*) FROM tickets WHERE status IN ('open', 'pending'){where}", params)
        return int(rows[0][0])

    async def tickets_created(self, since: datetime | None, until: datetime | None,
                              govcloud: bool | None = None) -> list[Ticket]:
        """Tickets created in [since, until), oldest first (for stats), of one enclave or both."""
        where, params = _enclave(govcloud)
        rows = await self._rows(
            f"SELECT {_TICKET_COLS} FROM tickets WHERE created_at >= ? AND created_at < ?{where} ORDER BY id",
            (iso(since) if since else "", iso(until) if until else "9999", *params))
        return [_ticket(r) for r in rows]

    async def agent_activity(self, since: datetime | None, until: datetime | None, govcloud: bool | None = None
                             ) -> tuple[dict[int, str], dict[str, int], dict[str, int]]:
        """`stats` per agent: who sent the first relayed staff answer of each ticket
        created in [since, until) (ticket id -> agent), how many staff answers each
        agent sent in the period, and how many open or pending tickets each
        assignee has now (whenever created); of one enclave's tickets (`govcloud`
        True/False) or both (None)."""
        lo, hi = iso(since) if since else "", iso(until) if until else "9999"
        where, gov = _enclave(govcloud)
        t_where = where.replace("govcloud", "t.govcloud")
        first = await self._rows(
            "SELECT m.ticket_id, m.sender FROM messages m JOIN tickets t ON t.id = m.ticket_id"
            f" WHERE t.created_at >= ? AND t.created_at < ?{t_where} AND m.id = (SELECT min(f.id) FROM messages f"
            " WHERE f.ticket_id = m.ticket_id AND f.direction = 'in' AND f.kind = 'staff')", (lo, hi, *gov))
        answered = await self._rows(
            "SELECT m.sender, count(*) FROM messages m JOIN tickets t ON t.id = m.ticket_id"
            " WHERE m.direction = 'in' AND m.kind = 'staff'"
            f" AND m.created_at >= ? AND m.created_at < ?{t_where} GROUP BY m.sender", (lo, hi, *gov))
        owning = await self._rows("SELECT owner, count(*) FROM tickets WHERE owner IS NOT NULL"
                                  f" AND status IN ('open', 'pending'){where} GROUP BY owner", gov)
        return ({int(r[0]): r[1] for r in first}, {r[0]: int(r[1]) for r in answered},
                {r[0]: int(r[1]) for r in owning})

    async def digest_days(self, recipients: Sequence[str]) -> dict[str, str]:
        """The local day each of `recipients` last had its digest decided (`Tx.claim_digest`)."""
        if not recipients:
            return {}
        marks = ",".join("?" * len(recipients))
        rows = await self._rows(f"SELECT recipient, day FROM digests WHERE recipient IN ({marks})", recipients)
        return {r[0]: r[1] for r in rows}

    async def tickets(self, status: str | None = None, *, certified_first: bool = False,
                      assignee: str | None = None, govcloud: bool | None = None) -> list[Ticket]:
        gov = None if govcloud is None else int(govcloud)
        conditions = [c for c, v in (("status = ?", status), ("owner = ?", assignee), ("govcloud = ?", gov))
                      if v is not None]
        params = tuple(v for v in (status, assignee, gov) if v is not None)
        where = ("WHERE " + " AND ".join(conditions)) if conditions else ""
        order = "CASE WHEN contact = 'certified' THEN 0 ELSE 1 END, id DESC" if certified_first else "id DESC"
        rows = await self._rows(f"SELECT {_TICKET_COLS} FROM tickets {where} ORDER BY {order}", params)
        return [_ticket(r) for r in rows]

    async def search(self, terms: Sequence[str], limit: int, govcloud: bool | None = None) -> list[Ticket]:
        """Tickets whose received mail (subject, text) or whose subject and requester
        hold every one of `terms`, newest first, at most `limit`, of one enclave
        (`govcloud` True/False) or both (None).

        Bounded: each index is read newest first and stops after `SEARCH_SCAN`
        messages and `limit` tickets (a word in every mail costs no more than a rare
        one); the tickets are then read by primary key."""
        if not terms:
            return []
        if self.dialect == "sqlite":
            # every term a quoted FTS5 string: the user's text is never query syntax
            match = " ".join('"' + t.replace('"', '""') + '"' for t in terms)
            found = await self._rows(
                "SELECT m.ticket_id FROM messages m WHERE m.id IN (SELECT rowid FROM message_search"
                " WHERE message_search MATCH ? ORDER BY rowid DESC LIMIT ?)"
                " UNION SELECT id FROM (SELECT rowid AS id FROM ticket_search WHERE ticket_search MATCH ?"
                " ORDER BY rowid DESC LIMIT ?)", (match, SEARCH_SCAN, match, limit))
        else:
            # PostgreSQL's parser keeps an address or host name as one word, FTS5 splits
            # it: either form matches, so that "example.com" finds what it finds there
            query = " ".join(terms)
            tsquery = ("(plainto_tsquery('simple', ?) || plainto_tsquery('simple', translate(?, '@.+', '   ')))")
            found = await self._rows(
                "SELECT m.ticket_id FROM messages m WHERE m.id IN (SELECT id FROM messages"
                " WHERE direction = 'in' AND to_tsvector('simple', left(subject || ' ' || body_text, 65536))"
                f" @@ {tsquery} ORDER BY id DESC LIMIT ?)"
                " UNION SELECT id FROM (SELECT id FROM tickets WHERE to_tsvector('simple', subject || ' '"
                f" || requester || ' ' || translate(requester, '@.+', '   ')) @@ {tsquery}"
                " ORDER BY id DESC LIMIT ?) t", (query, query, SEARCH_SCAN, query, query, limit))
        ids = sorted({int(r[0]) for r in found}, reverse=True)[:limit]
        if not ids:
            return []
        where, params = _enclave(govcloud)
        rows = await self._rows(f"SELECT {_TICKET_COLS} FROM tickets WHERE id IN ({','.join('?' * len(ids))})"
                                f"{where} ORDER BY id DESC", (*ids, *params))
        return [_ticket(r) for r in rows]

    async def decision(self, ticket_id: int) -> dict[str, Any] | None:
        """The rules stage's decision with its evidence, as stored when the ticket was made."""
        rows = await self._rows("SELECT decision FROM tickets WHERE id = ?", (ticket_id,))
        return json.loads(rows[0][0]) if rows and rows[0][0] else None

    async def messages(self, ticket_id: int) -> list[dict[str, Any]]:
        rows = await self._rows(
            "SELECT id, direction, kind, sender, recipients, cc, subject, message_id, body_text,"
            " reply_text, created_at FROM messages WHERE ticket_id = ? ORDER BY id", (ticket_id,))
        atts = await self._rows(
            "SELECT a.message_row, a.filename, a.size, a.sha256, a.content_type FROM attachments a"
            " JOIN messages m ON m.id = a.message_row WHERE m.ticket_id = ?"
            " ORDER BY a.message_row, a.position", (ticket_id,))
        by_row: dict[int, list[dict[str, Any]]] = {}
        for row, filename, size, sha, ctype in atts:
            by_row.setdefault(row, []).append(
                {"filename": filename, "size": size, "sha256": sha, "content_type": ctype})
        return [{"direction": r[1], "kind": r[2], "from": r[3], "to": json.loads(r[4]),
                 "cc": json.loads(r[5]), "subject": r[6], "message_id": r[7], "body_text": r[8],
                 "reply_text": r[9], "created_at": r[10], "attachments": by_row.get(r[0], [])}
                for r in rows]

    async def events(self, ticket_id: int) -> list[dict[str, Any]]:
        rows = await self._rows("SELECT at, rule, detail FROM ticket_events WHERE ticket_id = ?"
                                " ORDER BY id", (ticket_id,))
        return [{**json.loads(r[2]), "at": r[0], "rule": r[1]} for r in rows]

    async def inbound_raw(self, inbound_id: int) -> tuple[bytes | None, str | None]:
        rows = await self._rows("SELECT raw, raw_path FROM inbound WHERE id = ?", (inbound_id,))
        return (rows[0][0], rows[0][1]) if rows else (None, None)

    async def inbound_counts(self) -> dict[str, int]:
        rows = await self._rows("SELECT state, count(*) FROM inbound GROUP BY state")
        return {state: n for state, n in rows}

    # -- outbox ----------------------------------------------------------
    async def claim_due(self, now: datetime, lease_s: float, limit: int = 50,
                        holder: str = "", wall: datetime | None = None) -> list[OutboxItem]:
        """Take up to `limit` deliveries due at `now` for `lease_s` seconds.

        A claim is a lease, not a lock: if this process dies, the rows become
        due again when the lease runs out, and another sender takes them.
        Claims are judged on `wall`, the real time (default `now`): an
        injected `now` in the future never takes a claim a live sender holds.
        """
        wall = wall or now
        until = iso_ms(wall + timedelta(seconds=lease_s))

        async def claim(tx: Tx) -> list[Any]:
            rows = await tx._all(
                "SELECT id, ticket_id, kind, relay, mail_from, rcpt_to, content, attempts"
                " FROM outbox WHERE state = 'queued' AND next_attempt_at <= ?"
                " AND (claimed_until IS NULL OR claimed_until <= ?) ORDER BY next_attempt_at, id"
                " LIMIT ?" + self.db.skip_locked, (iso(now), iso_ms(wall), limit))
            if rows:
                await tx.db.executemany("UPDATE outbox SET claimed_until = ?, claimed_by = ? WHERE id = ?",
                                        [(until, holder, r[0]) for r in rows])
            return rows
        rows = await self.run(claim)
        return [OutboxItem(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7]) for r in rows]

    async def claim_holders(self) -> list[str]:
        """Who holds claims on queued rows or leases now (for taking back a dead one's)."""
        # once per process start, over the queued rows' index (migration 10), not per mail
        rows = await self._rows("SELECT DISTINCT claimed_by FROM outbox WHERE state = 'queued'"
                                " AND claimed_by IS NOT NULL")
        rows += await self._rows("SELECT DISTINCT holder FROM leases")
        return sorted({str(r[0]) for r in rows})

    async def take_back_claims(self, holders: Sequence[str]) -> int:
        """End the claims and leases of `holders` (dead processes): their rows are due at once."""
        if not holders:
            return 0

        async def free(tx: Tx) -> int:
            n = 0
            for holder in holders:
                n += len(await tx._all("UPDATE outbox SET claimed_until = NULL WHERE claimed_by = ?"
                                       " AND state = 'queued' RETURNING id", (holder,)))
                await tx.db.execute("DELETE FROM leases WHERE holder = ?", (holder,))
            return n
        return await self.run(free)

    async def extend_claims(self, ids: Sequence[int], holder: str, now: datetime,
                            lease_s: float) -> None:
        """Renew `holder`'s claims on rows still being sent, for another `lease_s`."""
        until = iso_ms(now + timedelta(seconds=lease_s))

        async def extend(tx: Tx) -> None:
            await tx.db.executemany(
                "UPDATE outbox SET claimed_until = ? WHERE id = ? AND claimed_by = ? AND state = 'queued'",
                [(until, i, holder) for i in ids])
        await self.run(extend)

    async def record_results(self, now: datetime, *, sent: Sequence[tuple[int, datetime]] = (),
                             retry: Sequence[tuple[int, datetime, str]] = (),
                             failed: Sequence[tuple[int, str]] = (),
                             holder: str = "") -> list[Failure]:
        """The results of a group of deliveries, in one commit; only rows
        `holder` still has claimed (another instance's claim is its own).
        `sent` carries when the relay took each row; `failed` are permanent
        refusals, recorded as `record_failures` says. Returns what that returns."""
        async def record(tx: Tx) -> list[Failure]:
            await self._record_deliveries(tx, sent, retry, holder)
            return await self._record_failures(tx, now, failed, holder)
        return await self.run(record)

    @staticmethod
    async def _record_deliveries(tx: Tx, sent: Sequence[tuple[int, datetime]],
                                 retry: Sequence[tuple[int, datetime, str]], holder: str) -> None:
        mine = " AND claimed_by = ?"
        if sent:
            await tx.db.executemany(
                "UPDATE outbox SET state = 'sent', sent_at = ?, attempts = attempts + 1,"
                " claimed_until = NULL, last_error = NULL WHERE id = ? AND state = 'queued'" + mine,
                [(iso(at), i, holder) for i, at in sent])
        if retry:
            await tx.db.executemany(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?,"
                " claimed_until = NULL, last_error = ? WHERE id = ? AND state = 'queued'" + mine,
                [(iso(at), error, i, holder) for i, at, error in retry])

    async def outbox_counts(self) -> dict[str, int]:
        rows = await self._rows("SELECT state, count(*) FROM outbox GROUP BY state")
        return {state: n for state, n in rows}

    # -- several instances ----------------------------------------------
    async def take_lease(self, name: str, holder: str, now: datetime, lease_s: float) -> bool:
        """Take or renew the lease `name` for `holder` until `now + lease_s`.

        True when `holder` has it: it was free, expired, or already `holder`'s.
        An instance that dies stops renewing; another takes it once it expires.
        """
        async def take(tx: Tx) -> bool:
            return bool(await tx._all(
                "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until"
                " WHERE leases.holder = excluded.holder OR leases.until <= ? RETURNING holder",
                (name, holder, iso_ms(now + timedelta(seconds=lease_s)), iso_ms(now))))
        return await self.run(take)

    async def release_lease(self, name: str, holder: str) -> None:
        async with self.transaction() as tx:
            await tx.db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    async def shared_setting(self, name: str, offered: str) -> str:
        """The value of setting `name` every instance uses: the first one offered."""
        async def put(tx: Tx) -> str:
            await tx.db.execute("INSERT INTO settings (name, value) VALUES (?, ?)"
                                " ON CONFLICT (name) DO NOTHING", (name, offered))
            return str((await tx._all("SELECT value FROM settings WHERE name = ?", (name,)))[0][0])
        return await self.run(put)

    # -- delivery failures -----------------------------------------------
    @staticmethod
    async def _record_failures(tx: Tx, now: datetime, failed: Sequence[tuple[int, str]],
                               holder: str) -> list[Failure]:
        """Permanent delivery failures (relay `5xx`), each in the same commit as its effects.

        The outbox row becomes `failed`; the ticket gets a `bounce` message that
        says what the relay answered, as a DSN would (RFC 3464); the refused
        participants are marked `undeliverable`, so nothing more is sent to them.
        Only rows still queued and claimed by `holder` are taken: recording twice
        changes nothing. Returns what failed, with the newly undeliverable addresses.
        """
        marked: list[Failure] = []
        for outbox_id, error in failed:
            # LEFT JOIN: mail about no ticket (migration 19) has no message row
            rows = await tx._all(
                "SELECT o.ticket_id, o.kind, o.mail_from, o.rcpt_to, m.message_id, m.subject"
                " FROM outbox o LEFT JOIN messages m ON m.id = o.message_row"
                " WHERE o.id = ? AND o.state = 'queued' AND o.claimed_by = ?" + tx.db.for_update.replace(
                    "UPDATE", "UPDATE OF o"), (outbox_id, holder))
            if not rows:
                continue
            ticket_id, kind, mail_from, rcpt_json, message_id, subject = rows[0]
            rcpt = list(json.loads(rcpt_json))
            await tx.db.execute(
                "UPDATE outbox SET state = 'failed', attempts = attempts + 1, claimed_until = NULL,"
                " last_error = ? WHERE id = ?", (error, outbox_id))
            if ticket_id is None:
                continue        # no ticket to record it on: the row and `outbox.failed` say it
            domain = str(mail_from).rpartition("@")[2] or "localhost"
            text = (f"The relay refused our {kind} mail {message_id} to {', '.join(rcpt)} "
                    f"permanently; it will not be retried.\n\nThe relay answered: {error}\n")
            await tx.add_message(
                ticket_id=ticket_id, direction="in", kind="bounce",
                sender=f"mailer-daemon@{domain}", recipients=[mail_from],
                subject=f"Undelivered: {subject}"[:998],
                message_id=f"<outbox-{outbox_id}.failed@{domain}>",
                body_text=text, reply_text=text, now=now)
            ticket = await tx.ticket(ticket_id)
            if ticket is None:
                continue
            new = sorted((set(rcpt) & ticket.participants) - set(ticket.undeliverable))
            if new:
                await tx.update_ticket(ticket_id, now,
                                       undeliverable=sorted({*ticket.undeliverable, *new}))
            marked.append(Failure(ticket_id, str(kind), tuple(rcpt), tuple(new), error))
        return marked

    # -- quarantine ------------------------------------------------------
    _INBOUND_COLS = ("id, received_at, mail_from, rcpt_to, mailbox, sha256, size, message_id,"
                     " state, error, raw_path")

    @staticmethod
    def _inbound_row(r: Sequence[Any]) -> dict[str, Any]:
        return {"id": r[0], "received_at": r[1], "mail_from": r[2], "rcpt_to": json.loads(r[3]),
                "mailbox": r[4], "sha256": r[5], "size": r[6], "message_id": r[7],
                "state": r[8], "error": r[9], "raw_path": r[10]}

    async def quarantined(self, limit: int = 10_000) -> list[dict[str, Any]]:
        """Quarantined mails, oldest first (the inbound_state index covers this)."""
        rows = await self._rows(f"SELECT {self._INBOUND_COLS} FROM inbound"
                                " WHERE state = 'quarantined' ORDER BY id LIMIT ?", (limit,))
        return [self._inbound_row(r) for r in rows]

    async def inbound(self, inbound_id: int) -> dict[str, Any] | None:
        """One received mail's metadata (without its bytes: see `inbound_raw`)."""
        rows = await self._rows(f"SELECT {self._INBOUND_COLS} FROM inbound WHERE id = ?",
                                (inbound_id,))
        return self._inbound_row(rows[0]) if rows else None
