"""Leases in the store: one holder at a time among processes and instances.

A lease names a job only one instance may do at a time (polling an IMAP
folder). The holder renews it every third of its length; an instance that
dies stops renewing, and another takes it once it has run out: after at most
`[store] lease_seconds`. A restarted instance does not wait that long for its
own dead predecessor: holder names carry host, pid and a digest of the
data_dir, and `dead_predecessors` picks out those of this host and data_dir
whose process is gone, so their claims can be taken back at once.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import socket
from collections.abc import Iterable

from gateway.clock import Clock
from gateway.store import Store


def _scope(data_dir: str) -> str:
    return hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:8] if data_dir else "-"


def holder_id(data_dir: str = "") -> str:
    """This process, as lease holders are told apart: host, pid, a random part
    and the data_dir it runs on (digested)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}:{_scope(data_dir)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_predecessors(holders: Iterable[str], me: str) -> list[str]:
    """The holders among `holders` that ran on this host and data_dir and whose
    process is gone (never this process's own)."""
    host, pid, _, scope = (me.split(":") + ["", "", "", ""])[:4]
    dead = []
    for holder in holders:
        parts = holder.split(":")
        if holder == me or len(parts) != 4 or parts[0] != host or parts[3] != scope:
            continue
        if not parts[1].isdigit() or int(parts[1]) == int(pid) or _alive(int(parts[1])):
            continue
        dead.append(holder)
    return dead


class StoreLease:
    def __init__(self, store: Store, name: str, holder: str, lease_s: float, clock: Clock):
        self.store = store
        self.name = name
        self.holder = holder
        self.lease_s = lease_s
        self.renew_s = lease_s / 3
        self.clock = clock

    async def take(self) -> bool:
        """Take or renew it; whether this holder has it now."""
        return await self.store.take_lease(self.name, self.holder, self.clock(), self.lease_s)

    async def release(self) -> None:
        await self.store.release_lease(self.name, self.holder)
