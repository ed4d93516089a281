"""`serve` with several worker processes on one port (SO_REUSEPORT)."""
from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from conftest import SUPPORT, GatewayProc, mail, reply_to, smtp_send, uniq, wait_for


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_workers_share_the_port_and_the_tickets(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml="")
    gw.config.write_text(gw.config.read_text().replace("lmtp = false", "lmtp = false\nworkers = 3"))
    gw.start()
    assert gw.proc is not None
    workers = wait_for(lambda: len(children(gw.proc.pid)) == 2 and children(gw.proc.pid), what="2 workers")
    started = wait_for(lambda: [e for e in gw.log_events() if e["event"] == "gateway.started"]
                       if len([e for e in gw.log_events() if e["event"] == "gateway.started"]) == 3 else None,
                       what="3 started workers")
    assert sorted(e["worker"] for e in started) == [0, 1, 2]
    # many connections: the kernel spreads them; every mail gets its ticket and ack
    keys = [uniq("spread") for _ in range(24)]

    def send(k: str) -> None:
        assert smtp_send(gw.port, mail(f"{k}@customer.example", SUPPORT, k, "hello"))[0] == 250
    threads = [threading.Thread(target=send, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {t["subject"] for t in gw.tickets()} == set(keys)
    for k in keys:
        gw.sink.wait_to(f"{k}@customer.example")
    # a reply taken by any worker threads onto the ticket made by any other
    ack = gw.sink.to(f"{keys[0]}@customer.example")[0]
    for _ in range(4):
        assert gw.send(reply_to(ack, f"{keys[0]}@customer.example", "more"))[0] == 250
    tid = next(t["id"] for t in gw.tickets() if t["subject"] == keys[0])
    assert len([m for m in gw.ticket(tid)["messages"] if m["kind"] == "customer"]) == 5
    by_worker = {e["worker"] for e in gw.log_events() if e["event"] == "mail.processed"}
    assert len(by_worker) >= 2, by_worker
    assert gw.stop() == 0
    assert not any(alive(p) for p in workers)


def test_workers_die_with_a_killed_primary(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    gw.config.write_text(gw.config.read_text().replace("lmtp = false", "lmtp = false\nworkers = 2"))
    gw.start()
    assert gw.proc is not None
    (worker,) = wait_for(lambda: children(gw.proc.pid), what="a worker")
    os.kill(gw.proc.pid, signal.SIGKILL)          # the primary only, not the group
    gw.proc.wait()
    wait_for(lambda: not alive(worker), what="the worker to follow the primary")
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", gw.port)) != 0
    gw.start()                                      # the port is free again
    assert gw.send(mail("x@customer.example", SUPPORT, uniq("again"), "hi"))[0] == 250


def test_workers_setting_is_validated(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    gw.config.write_text(gw.config.read_text().replace("lmtp = false", "lmtp = false\nworkers = -1"))
    r = gw.cli("check-config")
    assert r.returncode == 78 and "smtp.workers" in r.stderr
