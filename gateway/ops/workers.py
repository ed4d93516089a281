"""Several `serve` processes on one port, so intake uses every core.

Python runs one thread of Python at a time, and a mail costs a few
milliseconds of it (SMTP, parsing, rules, SQL, rendering), so one process
tops out near one core. `[smtp] workers = N` starts N processes that each
bind the port with SO_REUSEPORT (the kernel spreads connections over them)
and each run the listener and the intake. They share nothing but the
database: SQLite transactions order their writes, which is the same design
that lets several gateway instances share one store.

The primary (worker 0) also runs the outbox sender and the scheduler. A
worker that commits mail writes a byte into a pipe the primary reads, so the
acknowledgement goes out at once rather than at the next poll. Workers die
with the primary (PR_SET_PDEATHSIG): a killed primary leaves no orphan
holding the port; they get SIGTERM and finish their transactions in flight.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable

import structlog

log = structlog.get_logger("gateway.workers")

WAKE_FD_ENV = "GATEWAY_WAKE_FD"
PARENT_ENV = "GATEWAY_PARENT_PID"
PR_SET_PDEATHSIG = 1
RESTART_DELAY_S = 1.0


def die_with_parent() -> None:
    """In a worker: get SIGTERM when the primary dies (Linux prctl(2))."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    parent = os.environ.get(PARENT_ENV)
    if parent and os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)   # the primary died before prctl took effect


WAKE, LISTENING = b"!", b"L"


def _to_primary(signal_byte: bytes) -> None:
    fd = int(os.environ.get(WAKE_FD_ENV, "-1"))
    if fd >= 0:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(fd, signal_byte)


def waker() -> Callable[[], None]:
    """In a worker: a function that wakes the primary's outbox sender."""
    return lambda: _to_primary(WAKE)


def report_listening() -> None:
    """In a worker: tell the primary this worker accepts connections."""
    _to_primary(LISTENING)


class Workers:
    """The primary's view of the other worker processes: start, watch, stop."""

    def __init__(self, config_path: str | None, count: int, on_wake: Callable[[], None]):
        self.config_path = config_path        # None: the built-in defaults
        self.count = count
        self.on_wake = on_wake
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False
        self._listening = 0
        self._all_listening = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    async def start(self, timeout_s: float = 30.0) -> None:
        """Start the workers and wait until they listen.

        The primary binds its own socket only after this: clients that
        connect early would otherwise all land on the primary and, with
        kept-open connections, stay there.
        """
        asyncio.get_running_loop().add_reader(self._read_fd, self._drain)
        for n in range(1, self.count):
            await self._spawn(n)
        self._watch = asyncio.create_task(self._supervise(), name="workers")
        try:
            await asyncio.wait_for(self._all_listening.wait(), timeout_s)
        except TimeoutError:
            log.error("worker.slow_start", listening=self._listening, expected=self.count - 1)

    def _drain(self) -> None:
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._read_fd, 4096):
                data += chunk
        self._listening += data.count(LISTENING)
        if self._listening >= self.count - 1:
            self._all_listening.set()
        if WAKE in data:
            self.on_wake()

    async def _spawn(self, n: int) -> None:
        args = [sys.executable, "-m", "gateway", "serve", "--worker", str(n)]
        if self.config_path is not None:
            args += ["--config", self.config_path]
        env = {**os.environ, WAKE_FD_ENV: str(self._write_fd), PARENT_ENV: str(os.getpid())}
        self.procs[n] = await asyncio.create_subprocess_exec(*args, pass_fds=(self._write_fd,), env=env)
        log.info("worker.started", worker=n, pid=self.procs[n].pid)

    async def _supervise(self) -> None:
        """A worker that dies on its own is started again."""
        while not self._stopping:
            waits = {asyncio.ensure_future(p.wait()): n for n, p in self.procs.items()}
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for fut in pending:
                fut.cancel()
            for fut in done:
                n = waits[fut]
                if self._stopping:
                    return
                log.error("worker.died", worker=n, returncode=fut.result())
                await asyncio.sleep(RESTART_DELAY_S)
                if not self._stopping:
                    await self._spawn(n)

    def signal(self, sig: int) -> None:
        """Pass `sig` on to every running worker (SIGHUP: each reloads its configuration)."""
        for p in self.procs.values():
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM every worker and wait: each finishes its transactions in flight."""
        self._stopping = True
        if self._watch:
            self._watch.cancel()
        for p in self.procs.values():
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for n, p in self.procs.items():
            try:
                await asyncio.wait_for(p.wait(), grace_s + 5)
            except TimeoutError:
                log.error("worker.killed", worker=n)
                p.kill()
                await p.wait()
        asyncio.get_running_loop().remove_reader(self._read_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)
