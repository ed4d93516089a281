"""The two databases the store runs on, behind one small interface.

`gateway.store` writes its statements once, with `?` placeholders and the
SQL that SQLite and PostgreSQL share (`INSERT ... RETURNING`, `ON CONFLICT`,
partial indexes). A driver runs them on its database and turns its errors
into the store's: `StoreUnavailable` when the database can't take the work
now (the mail gets `451`), `StoreConflict` when a concurrent transaction
won (the work is simply run again). Any other database error (bad data)
is the caller's, as it always was.

- `SQLiteDriver`: aiosqlite, WAL, `synchronous=FULL`; one writer at a time
  (`BEGIN IMMEDIATE`), waited for in the event loop.
- `PostgresDriver`: asyncpg, one connection per process (as with SQLite: the
  store's lock orders this process's transactions); rows another instance
  may touch at the same time are locked (`FOR UPDATE`, `SKIP LOCKED` for
  queues); `lock_timeout` is the busy timeout.
"""
from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class StoreUnavailable(Exception):
    """The store cannot take a write right now (locked, disk full, read-only, gone)."""


class StoreConflict(StoreUnavailable):
    """A concurrent transaction won (deadlock, serialization): run it again."""


Row = tuple[Any, ...]


class SQLiteDriver:
    dialect = "sqlite"
    for_update = ""            # one writer at a time: a read in a write transaction is already exclusive
    skip_locked = ""

    def __init__(self, connection: Any, path: Path, busy_timeout_s: float):
        self.connection = connection
        self.path = path
        self.busy_timeout_s = busy_timeout_s

    @classmethod
    async def open(cls, path: Path, busy_timeout_ms: int) -> SQLiteDriver:
        import aiosqlite
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(str(path), isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise StoreUnavailable(f"cannot open {path}: {e}") from e
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            await db.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as e:
            await db.close()
            raise StoreUnavailable(f"cannot prepare {path}: {e}") from e
        return cls(db, path, busy_timeout_ms / 1000)

    # Each await is a hop to aiosqlite's thread: one per statement, never a
    # separate fetch or close (the intake runs a dozen statements per mail).
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        try:
            await self.connection.execute(sql, params)
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(str(e)) from e

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            return list(await self.connection.execute_fetchall(sql, params))
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(str(e)) from e

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self.connection.executemany(sql, rows)
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(str(e)) from e

    async def begin(self) -> None:
        """BEGIN IMMEDIATE, waiting up to the busy timeout for another writer.

        SQLite's own busy handler sleeps in growing steps (1, 2, 5, 10 ... 100
        ms) in the database thread, so a lock released after 1 ms was often
        taken 10-25 ms later when several processes write (the workers of
        one gateway, or several gateways). Retrying here with short sleeps
        hands the lock over within about a millisecond.
        """
        deadline = time.monotonic() + self.busy_timeout_s
        delay = 0.0005
        while True:
            try:
                await self.connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise StoreUnavailable(str(e)) from e
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(f"{e} (waited {self.busy_timeout_s:g} s)") from e
            except sqlite3.Error as e:
                raise StoreUnavailable(str(e)) from e
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.005)

    async def commit(self) -> None:
        await self.execute("COMMIT")

    async def rollback(self) -> None:
        try:
            await self.connection.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    async def close(self) -> None:
        await self.connection.close()

    async def migrate(self, migrations: Sequence[str]) -> None:
        """Bring the schema to `len(migrations)`, tracked in `PRAGMA user_version`."""
        try:
            await self.connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            await self.connection.execute("BEGIN IMMEDIATE")
            try:
                rows = await self.connection.execute_fetchall("PRAGMA user_version")
                version = int(next(iter(rows))[0])
                _check_version(version, migrations)
                for number, script in enumerate(migrations[version:], start=version + 1):
                    for statement in statements(script):
                        await self.connection.execute(statement)
                    await self.connection.execute(f"PRAGMA user_version = {number}")
                await self.connection.execute("COMMIT")
            except BaseException:
                await self.connection.execute("ROLLBACK")
                raise
            # From here on a busy database is waited for in `begin`, in the event
            # loop, not by SQLite's busy handler (see there).
            await self.connection.execute("PRAGMA busy_timeout = 0")
        except sqlite3.Error as e:
            raise StoreUnavailable(f"cannot prepare {self.path}: {e}") from e


class PostgresDriver:
    dialect = "postgresql"
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, busy_timeout_ms: int):
        self.url = url
        self.busy_timeout_ms = busy_timeout_ms
        self.connection: Any = None
        self._sql: dict[str, str] = {}
        self._in_transaction = False

    @classmethod
    async def open(cls, url: str, busy_timeout_ms: int) -> PostgresDriver:
        driver = cls(url, busy_timeout_ms)
        await driver._connect()
        return driver

    def describe(self) -> str:
        u = urlsplit(self.url)
        return f"postgresql://{u.hostname or ''}{':' + str(u.port) if u.port else ''}{u.path}"

    async def _connect(self) -> None:
        import asyncpg
        try:
            self.connection = await asyncpg.connect(
                self.url, timeout=max(self.busy_timeout_ms / 1000, 1.0),
                # lock_timeout 0 would mean "wait forever", and one under deadlock_timeout
                # (1 s) would answer a deadlock with 451 instead of running it again
                server_settings={"lock_timeout": str(max(int(self.busy_timeout_ms), 1500)),
                                 "application_name": "support-gateway"})
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise StoreUnavailable(f"cannot connect to {self.describe()}: {e}") from e

    def _translate(self, sql: str) -> str:
        """`?` placeholders to `$1, $2 ...` (no statement has a `?` in a literal)."""
        out = self._sql.get(sql)
        if out is None:
            n = iter(range(1, 10_000))
            out = self._sql[sql] = re.sub(r"\?", lambda _: f"${next(n)}", sql)
        return out

    async def _run(self, method: str, sql: str, *args: Any) -> Any:
        if self.connection is None or self.connection.is_closed():
            if self._in_transaction:
                # never carry on a transaction's statements on a new connection:
                # they would commit one by one, without what went before
                raise StoreUnavailable(f"lost the connection to {self.describe()} in a transaction")
            await self._connect()
        try:
            return await getattr(self.connection, method)(self._translate(sql), *args)
        except Exception as e:
            raise _postgres_error(e) from e

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self._run("execute", sql, *map(_text, params))

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [tuple(r) for r in await self._run("fetch", sql, *map(_text, params))]

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._run("executemany", sql, [tuple(map(_text, r)) for r in rows])

    async def begin(self) -> None:
        await self.execute("BEGIN")
        self._in_transaction = True

    async def commit(self) -> None:
        if self.connection is None or not self.connection.is_in_transaction():
            # COMMIT without a transaction is only a warning: this one is gone
            raise StoreUnavailable(f"the transaction on {self.describe()} was lost")
        await self.execute("COMMIT")
        self._in_transaction = False

    async def rollback(self) -> None:
        self._in_transaction = False
        if self.connection is None or self.connection.is_closed():
            return
        try:
            await self.connection.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - a lost connection has nothing left to roll back
            self.connection.terminate()

    async def close(self) -> None:
        if self.connection is not None and not self.connection.is_closed():
            await self.connection.close()

    async def migrate(self, migrations: Sequence[str]) -> None:
        """Bring the schema to `len(migrations)`, tracked in table `schema_version`.

        Instances starting together take turns on an advisory lock: the first
        migrates, the others find the schema current.
        """
        await self.begin()
        try:
            await self.execute("SELECT pg_advisory_xact_lock(7411)")
            await self.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            rows = await self.fetch("SELECT version FROM schema_version")
            if not rows:
                await self.execute("INSERT INTO schema_version VALUES (0)")
            version = int(rows[0][0]) if rows else 0
            _check_version(version, migrations)
            for number, script in enumerate(migrations[version:], start=version + 1):
                for statement in statements(script, self.dialect):
                    await self.execute(postgres_ddl(statement))
                await self.execute("UPDATE schema_version SET version = ?", (number,))
            await self.commit()
        except BaseException as e:
            await self.rollback()
            if isinstance(e, StoreUnavailable) or not isinstance(e, Exception):
                raise
            raise StoreUnavailable(f"cannot prepare {self.describe()}: {e}") from e


def _text(value: Any) -> Any:
    # PostgreSQL text cannot hold NUL, which SQLite keeps; mail can carry it.
    if type(value) is str and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _postgres_error(e: Exception) -> Exception:
    import asyncpg
    from asyncpg import exceptions as x
    if isinstance(e, x.DeadlockDetectedError | x.SerializationError):
        return StoreConflict(f"{type(e).__name__}: {e}")
    if isinstance(e, OSError | asyncio.TimeoutError | asyncpg.InterfaceError
                  | x.PostgresConnectionError | x.InsufficientResourcesError
                  | x.OperatorInterventionError | x.LockNotAvailableError
                  | x.ReadOnlySQLTransactionError | x.InternalServerError):
        return StoreUnavailable(f"{type(e).__name__}: {e}")
    return e


_DDL = (
    (re.compile(r"\bINTEGER PRIMARY KEY( AUTOINCREMENT)?"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)


def postgres_ddl(statement: str) -> str:
    """A migration statement as PostgreSQL takes it: 64-bit integers, identity
    columns for SQLite's rowid keys (ticket IDs come from their sequence), BYTEA."""
    for pattern, replacement in _DDL:
        statement = pattern.sub(replacement, statement)
    return statement


def _check_version(version: int, migrations: Sequence[str]) -> None:
    if version > len(migrations):
        raise StoreUnavailable(
            f"the database is at schema {version}, newer than this gateway ({len(migrations)})")


_ONLY = re.compile(r"/\*(sqlite|postgresql)\*/\s*")


def statements(script: str, dialect: str = "sqlite") -> list[str]:
    """Split a migration script into statements (`executescript` would commit).
    A statement marked `/*sqlite*/` or `/*postgresql*/` runs only on that store
    (full-text search is FTS5 on one, tsvector on the other)."""
    out, buf = [], ""
    for line in script.splitlines():
        buf += line.split("--", 1)[0] + "\n"
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    kept = []
    for s in out:
        only = _ONLY.match(s)
        if only and only.group(1) != dialect:
            continue
        kept.append(s[only.end():] if only else s)
    return [s for s in kept if s]


async def connect(url: str, busy_timeout_ms: int) -> SQLiteDriver | PostgresDriver:
    """The driver for a `[store] url`: `sqlite:///PATH` or `postgresql://...`."""
    if url.startswith(("postgresql://", "postgres://")):
        return await PostgresDriver.open(url, busy_timeout_ms)
    if url.startswith("sqlite:///"):
        return await SQLiteDriver.open(Path(url[len("sqlite:///"):]), busy_timeout_ms)
    raise StoreUnavailable(f"unsupported store url {url!r}")
