"""CPU-bound work off the event loop, in processes that can be stopped: `Sandbox`.

A thread does not help against a parse that takes seconds: `re` and the
email package hold the GIL, so the event loop (every other SMTP session)
waits as long (project issue 14: 150 KB of uuencode begin lines froze the
daemon for 8.9 s). A process can be killed. `Sandbox.run` hands a pure,
module-level function and its input to one of a few worker processes and
waits for the answer off the loop (a thread blocks on the pipe, holding no
GIL); past the time budget the worker is killed and replaced, and the
caller gets `Overrun`. A worker that dies (killed by the OOM killer, a crash
in C) is replaced too (`Crashed`); one whose memory grew past `max_rss` after
a large input ends itself after answering, so a 25 MB parse does not leave a
large idle process behind.

Workers start from a fork server (`multiprocessing` "forkserver": a fresh
interpreter that imported `preload` once, never a fork of the daemon with its
threads and sockets), or, for one-shot commands without a daemon's threads
to worry about, by plain fork (no start-up cost).
"""
from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any


class Overrun(Exception):
    """The work took longer than its budget; its process was killed."""


class Crashed(Exception):
    """The worker process died before it answered (or the work raised: its message)."""


class _Worker:
    def __init__(self, ctx: Any, max_rss: int):
        self.conn, child = multiprocessing.Pipe()
        forked = ctx.get_start_method() == "fork"
        self.proc = ctx.Process(target=_serve, args=(child, max_rss, forked), daemon=True, name="gateway-sandbox")
        self.proc.start()
        child.close()

    def call(self, fn: Callable[..., Any], data: bytes, args: Sequence[Any], timeout: float) -> Any:
        """In a thread: send the work, wait at most `timeout` for the answer."""
        try:
            self.conn.send((fn, tuple(args)))
            self.conn.send_bytes(data)
            if not self.conn.poll(timeout):
                raise Overrun(f"no answer after {timeout:g} s")
            ok, value = self.conn.recv()
        except (EOFError, OSError) as e:
            raise Crashed(f"worker process died (exit {self.proc.exitcode}): {type(e).__name__}") from None
        if not ok:
            raise Crashed(value)
        return value

    @property
    def alive(self) -> bool:
        return self.proc.is_alive() and not self.conn.closed

    def kill(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def _serve(conn: multiprocessing.connection.Connection, max_rss: int, forked: bool = False) -> None:
    """A worker's loop: one piece of work at a time, until the pipe closes.

    A forked worker first closes every file descriptor it inherited but its
    pipe and stdio: it must not keep the parent's database, sockets or pipes
    open (a pipe's reader would never see its end)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # ^C reaches the whole group: the daemon decides
    if forked:
        keep = conn.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    while True:
        try:
            fn, args = conn.recv()
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            answer: tuple[bool, Any] = (True, fn(data, *args))
        except BaseException as e:  # noqa: BLE001 - reported to the caller, the worker lives on
            answer = (False, f"{type(e).__name__}: {e}"[:2000])
        del data
        try:
            conn.send(answer)
        except (OSError, ValueError):
            return
        del answer
        if _rss() > max_rss:
            return              # the parent starts a fresh one when it needs it


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Sandbox:
    """`processes` workers, started when first needed."""

    def __init__(self, processes: int, *, preload: Sequence[str] = (), fork_server: bool = True,
                 max_rss: int = 256 << 20):
        self.processes = processes
        self.max_rss = max_rss
        self._ctx: multiprocessing.context.BaseContext
        if fork_server:
            server = multiprocessing.get_context("forkserver")
            server.set_forkserver_preload(list(preload))
            self._ctx = server
        else:
            self._ctx = multiprocessing.get_context("fork")
        self._idle: list[_Worker] = []
        self._free: asyncio.Semaphore | None = None
        self._lock = threading.Lock()
        self.restarts = 0          # workers replaced after an overrun or a crash (tests read it)

    async def run(self, fn: Callable[..., Any], data: bytes, args: Sequence[Any], timeout: float) -> Any:
        """`fn(data, *args)` in a worker process; `Overrun` past `timeout` seconds.

        Cancelling the caller does not abandon the worker: the work finishes
        (or overruns) in the background and the worker goes back to the pool."""
        if self._free is None:
            self._free = asyncio.Semaphore(self.processes)
        await self._free.acquire()
        task = asyncio.ensure_future(asyncio.to_thread(self._call, fn, data, args, timeout))
        task.add_done_callback(lambda _: self._free.release() if self._free else None)
        return await asyncio.shield(task)

    def _call(self, fn: Callable[..., Any], data: bytes, args: Sequence[Any], timeout: float) -> Any:
        with self._lock:
            worker = None
            while self._idle and worker is None:
                candidate = self._idle.pop()
                if candidate.alive:
                    worker = candidate
                else:
                    candidate.kill()
        if worker is None:
            worker = _Worker(self._ctx, self.max_rss)
        try:
            value = worker.call(fn, data, args, timeout)
        except Overrun:
            worker.kill()
            self.restarts += 1
            raise
        except Crashed:
            if worker.alive:        # the work raised; the worker is fine
                with self._lock:
                    self._idle.append(worker)
            else:
                worker.kill()
                self.restarts += 1
            raise
        with self._lock:
            self._idle.append(worker)
        return value

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.conn.close()             # its loop ends at EOF
            worker.proc.join(2)
            if worker.proc.is_alive():
                worker.kill()
