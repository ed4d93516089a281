"""Leases in the store: one holder at a time among processes and instances.

A lease names a job only one instance may do at a time (polling an IMAP
folder). The holder renews it every third of its length; an instance that
dies stops renewing, and another takes it once it has run out: after at most
`[store] lease_seconds`.
"""
from __future__ import annotations

import os
import secrets
import socket

from gateway.clock import Clock
from gateway.store import Store


def holder_id() -> str:
    """This process, as lease holders are told apart: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


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
