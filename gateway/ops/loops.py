"""The background loops' one shape: do the job, then wait for a wake-up or the interval."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


def backoff(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds to wait after the `attempts`-th failed try (1, 2, ...)."""
    return min(max_s, base_s * 2 ** max(0, attempts - 1))


class Repeater:
    """Runs `job` until stopped: again at once when woken, else every `every_s`.

    A failing round is reported through `on_error` and the loop goes on: a
    bad moment (a locked store, a dead relay) must not end the sender or the
    scheduler for the rest of the process's life.
    """

    def __init__(self, job: Callable[[], Awaitable[object]], every_s: float,
                 on_error: Callable[[], None]):
        self.job = job
        self.every_s = every_s
        self.on_error = on_error
        self._wake = asyncio.Event()
        self._stopped = False

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    async def run(self) -> None:
        while not self._stopped:
            self._wake.clear()
            try:
                await self.job()
            except Exception:  # noqa: BLE001 - reported, and the next round tries again
                self.on_error()
            if self._stopped:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.every_s)
            except TimeoutError:
                pass
