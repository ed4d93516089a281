"""A throwaway PostgreSQL cluster for the tests (Debian's postgresql package).

Started on first use, once per pytest session (0.6 s), on loopback with a
free port, its socket and data in a temp directory; every test gets a fresh
database (`new_database()`, 0.04 s). Stopped at the end of the session.
fsync is off: the tests are about what the gateway does, not the disk.

`GATEWAY_TEST_STORE=postgresql` runs the whole suite on PostgreSQL (every
gateway the tests configure gets its own database); the default is SQLite.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

STORE = os.environ.get("GATEWAY_TEST_STORE", "sqlite")
if STORE not in ("sqlite", "postgresql"):
    raise SystemExit(f"GATEWAY_TEST_STORE must be sqlite or postgresql, not {STORE!r}")
ON_POSTGRES = STORE == "postgresql"

sqlite_only = pytest.mark.sqlite_only


def _bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run tests/system-packages.sh (as root)")
    return Path(found[-1]).parent


class Cluster:
    """`durable=True` (the benchmark) keeps PostgreSQL's defaults: a commit is
    flushed to disk before it returns, as SQLite's is with synchronous=FULL."""

    def __init__(self, durable: bool = False) -> None:
        self.dir: Path | None = None
        self.port = 0
        self.durable = durable

    def _as_postgres(self) -> list[str]:
        # initdb and postgres refuse to run as root
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def start(self) -> None:
        b = _bin()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-pg-"))
        os.chmod(self.dir, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        run = {"check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
        subprocess.run([*self._as_postgres(), str(b / "initdb"), "-D", str(self.dir / "data"),
                        "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8",
                        "--no-sync"], **run)  # type: ignore[call-overload]
        self.resume()

    def _ctl(self, *args: str) -> None:
        assert self.dir is not None
        subprocess.run([*self._as_postgres(), str(_bin() / "pg_ctl"), "-D", str(self.dir / "data"),
                        "-l", str(self.dir / "log"), "-w", *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def pause(self) -> None:
        """Shut the server down (fast: connections are closed), keeping its data."""
        self._ctl("-m", "fast", "stop")

    def resume(self) -> None:
        self._ctl("-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
                  " -c max_connections=300" + ("" if self.durable else
                  " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"), "start")

    def stop(self) -> None:
        if self.dir is None:
            return
        subprocess.run([*self._as_postgres(), str(_bin() / "pg_ctl"), "-D", str(self.dir / "data"),
                        "-m", "immediate", "-w", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def url(self, database: str = "postgres") -> str:
        if self.dir is None:
            self.start()
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new, empty database; its URL."""
        name = "gw_" + uuid.uuid4().hex[:12]
        admin = self.url()
        subprocess.run([str(_bin() / "psql"), admin, "-q", "-c", f"CREATE DATABASE {name}"],
                       check=True, stdout=subprocess.DEVNULL)
        return self.url(name)

    def sql(self, url: str, statement: str) -> str:
        """Run one statement with psql; its unaligned output."""
        return subprocess.run([str(_bin() / "psql"), url, "-qAt", "-c", statement], check=True,
                              capture_output=True, text=True).stdout


CLUSTER = Cluster()


def store_url() -> str | None:
    """The `[store] url` a test's gateway gets: a new database on PostgreSQL
    runs, None (the default SQLite file in data_dir) otherwise."""
    return CLUSTER.new_database() if ON_POSTGRES else None


def store_section() -> dict[str, dict[str, str]]:
    """`{"store": {"url": ...}}` for `config.parse`, or {} on SQLite runs."""
    url = store_url()
    return {"store": {"url": url}} if url else {}


def query(url: str, sql: str, params: tuple = ()) -> list[tuple]:  # type: ignore[type-arg]
    """Run one statement (`?` placeholders) on the store at `url`, as ops would
    from outside the gateway; the rows it returns."""
    if url.startswith("sqlite:///"):
        import sqlite3
        db = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None, timeout=10)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()
    import asyncio
    import re

    import asyncpg

    async def run() -> list[tuple]:  # type: ignore[type-arg]
        n = iter(range(1, 1000))
        con = await asyncpg.connect(url)
        try:
            rows = await con.fetch(re.sub(r"\?", lambda _: f"${next(n)}", sql), *params)
            return [tuple(r) for r in rows]
        finally:
            await con.close()
    return asyncio.run(run())


class WriteLock:
    """Holds the store's write lock from another process, as a busy or stuck
    writer would: SQLite's `BEGIN EXCLUSIVE`; on PostgreSQL a transaction
    holding `inbound` in EXCLUSIVE mode (reads go on, every intake write waits)."""

    def __init__(self, url: str, user: str | None = None, python: str = sys.executable):
        if url.startswith("sqlite:///"):
            script = ("import sqlite3, sys\n"
                      "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                      "c.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\nsys.stdin.read()\n")
            argv = [python, "-c", script, url[len("sqlite:///"):]]
            if user:
                # as the gateway's own user, so no file SQLite creates belongs to root
                argv = ["runuser", "-u", user, "--", *argv]
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        else:
            self.proc = subprocess.Popen([str(_bin() / "psql"), url, "-qAt"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"BEGIN; LOCK TABLE inbound IN EXCLUSIVE MODE; SELECT 'locked';\n")
            self.proc.stdin.flush()
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"locked"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)
