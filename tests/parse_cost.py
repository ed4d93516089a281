"""What a parse worker spends on one mail, measured the way a worker runs it.

The daemon parses in fresh worker processes (gateway/ops/sandbox.py: a fork
server's small interpreter). Measured inside the test process instead, the
figure also held whatever else that process was doing: `time.process_time`
counts every thread's CPU (servers and sinks earlier tests left running), and
each garbage collection walks the whole test process's heap. Late in a full
run both made twice the mail cost 3.5x the time of the first (project CI,
"many headers": 100 -> 347 ms) while the parser alone costs 2x. So the
scaling tests measure here, in one worker from a fork server, by the
measuring thread's own CPU time."""
from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

_worker: ProcessPoolExecutor | None = None


def _measure(small: bytes, large: bytes, rounds: int) -> tuple[float, float]:
    from gateway.mail.structure import examine
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, raw in enumerate((small, large)):
            started = time.thread_time()
            examine(raw, 100, 10)
            best[i] = min(best[i], time.thread_time() - started)
    return best[0], best[1]


def cpu_pair(small: bytes, large: bytes, rounds: int = 3) -> tuple[float, float]:
    """CPU seconds a parse worker spends on `small` and on `large`, each the best
    of `rounds`, measured in turns: noise only adds, and a load change on a
    shared machine then hits both sizes alike instead of the second one only."""
    global _worker
    if _worker is None:
        _worker = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
    return _worker.submit(_measure, small, large, rounds).result()
