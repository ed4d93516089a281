"""IMAP ingestion: mailboxes the gateway fetches instead of being sent to.

One `ImapPoller` per `[[imap]]` account. It waits for mail with IDLE where
the server offers it (RFC 2177), else polls every `poll_seconds`, and for
each message in `folder`, oldest UID first:

1. fetches its bytes with `BODY.PEEK[]`, which does not set `\\Seen`
   (RFC 3501 §6.4.5): nothing is marked read before it is safe;
2. hands them to `Intake.receive`, which returns only after the commit
   (a mail that cannot be parsed or processed is committed to quarantine);
3. records the UID as committed (a small JSON state file, written
   atomically), and only then
4. moves the message to `processed_folder` (MOVE, RFC 6851; else COPY,
   `\\Deleted` and UID EXPUNGE, RFC 4315 §2.1, or EXPUNGE without UIDPLUS).

When the store cannot take the mail (`StoreUnavailable`) the message stays
where it is and is tried again after a backoff. A message the server cannot
deliver to us (FETCH fails) is skipped for this round and does not block the
others. Connection failures reconnect with exponential backoff.

Positions are UIDs under the folder's UIDVALIDITY (RFC 3501 §2.3.1.1): a
message at or below the last committed UID still in the folder was committed
but not moved (the move or the process failed in between) and is only moved.
When UIDVALIDITY changes, UIDs mean nothing any more: the folder is read
again from the start; mail already stored comes back as a duplicate by its
Message-ID (the intake's dedup), so nothing is ticketed twice.

imapclient is synchronous: each of its calls runs in a worker thread
(`asyncio.to_thread`), one at a time per account.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from gateway.clock import Clock
from gateway.config import ImapAccount, Mailbox
from gateway.desk.pipeline import Received
from gateway.ops.loops import backoff
from gateway.outbound.transport import client_tls_context, tls_problem
from gateway.store import StoreUnavailable

log = structlog.get_logger("gateway.imap")

T = TypeVar("T")

STATE_FILE = "imap-state.json"
# RFC 2177 §3: clients should re-issue IDLE at least every 29 minutes
IDLE_MAX_S = 29 * 60
CONNECT_TIMEOUT_S = 30.0


class Receiver(Protocol):
    """What the poller needs of `gateway.inbound.intake.Intake`."""

    async def receive(self, received: Received) -> Any: ...


# -- state ------------------------------------------------------------------

class ImapState:
    """Per account and folder: UIDVALIDITY and the last committed UID.

    One JSON file for all accounts of a data_dir, replaced atomically
    (write a temporary file, fsync, rename, fsync the directory), so a crash
    leaves either the old or the new state, never half a file.
    """

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[int | None, int]:
        with self._lock:
            entry = self._load().get(key) or {}
        validity = entry.get("uidvalidity")
        return (int(validity) if isinstance(validity, int) else None,
                int(entry.get("last_uid", 0)) if isinstance(entry.get("last_uid", 0), int) else 0)

    def set(self, key: str, uidvalidity: int, last_uid: int) -> None:
        with self._lock:
            data = self._load()
            data[key] = {"uidvalidity": uidvalidity, "last_uid": last_uid}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".imap-state.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # unreadable state only costs a re-scan (the intake dedupes): go on
            log.warning("imap.state_unreadable", path=str(self.path), error=str(e))
            return {}
        return data if isinstance(data, dict) else {}


# -- the poller ---------------------------------------------------------------

class Lease(Protocol):
    """A claim that one holder at a time has (gateway.store.leases.StoreLease)."""
    holder: str
    renew_s: float

    async def take(self) -> bool: ...

    async def release(self) -> None: ...


class LeaseLost(Exception):
    """Another instance holds the mailbox now: this poller stands by."""


class ImapPoller:
    """Polls one account's folder into the intake.

    With a `lease`, only the instance holding it polls: the others stand by
    and try to take it every `lease.renew_s`; the holder renews it at that
    interval (IDLE is broken off to do so) and, should it lose it, hangs up
    before touching the folder again. An instance that dies stops renewing;
    another takes over when the lease runs out.
    """

    def __init__(self, account: ImapAccount, intake: Receiver, mailbox: Mailbox, state: ImapState,
                 clock: Clock, *, backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 connect: Callable[[ImapAccount], IMAPClient] | None = None,
                 lease: Lease | None = None):
        self.account = account
        self.lease = lease
        self._renewed_at = -1e9
        self._holding = False
        self.intake = intake
        self.mailbox = mailbox
        self.state = state
        self.clock = clock
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._connect = connect or _connect
        self._stop = asyncio.Event()
        self._client: IMAPClient | None = None
        self._idle = self._move = self._uidplus = False
        self._uidvalidity = 0
        self.key = f"{account.name}/{account.folder}"

    def stop(self) -> None:
        """Ask `run` to return; an IDLE in progress is broken off at once."""
        self._stop.set()
        client = self._client
        if client is not None:
            # the worker thread blocks in IDLE on this socket: shutting it
            # down makes that call return (closing is left to the thread)
            with contextlib.suppress(OSError, AttributeError):
                client.socket().shutdown(socket.SHUT_RDWR)

    async def run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if not await self._hold():
                    await self._sleep(self.lease.renew_s if self.lease else 1.0)
                    continue
                await self._session()
                failures = 0
            except LeaseLost:
                log.warning("imap.lease_lost", account=self.account.name, folder=self.account.folder)
                await self._close()
                continue
            except Exception as e:
                if self._stop.is_set():
                    break
                if not isinstance(e, IMAPClientError | OSError | StoreUnavailable | EOFError):
                    log.exception("imap.error", account=self.account.name, folder=self.account.folder)
                failures += 1
                delay = backoff(failures, self.backoff_base_s, self.backoff_max_s)
                error = tls_problem(e, self.account.ca_file) or f"{type(e).__name__}: {e}"
                log.warning("imap.retry", account=self.account.name, folder=self.account.folder,
                            error=error[:500], retry_in_s=delay)
                await self._close()
                await self._sleep(delay)
            finally:
                if self._stop.is_set():
                    await self._close()
        if self.lease is not None and self._holding:
            with contextlib.suppress(Exception):
                await self.lease.release()      # the next instance need not wait for it to run out
        log.info("imap.stopped", account=self.account.name, folder=self.account.folder)

    async def _hold(self) -> bool:
        """Whether this poller holds the lease (renewed when due); always, without one."""
        if self.lease is None:
            return True
        if self._holding and time.monotonic() - self._renewed_at < self.lease.renew_s:
            return True
        try:
            held = await self.lease.take()
        except StoreUnavailable:
            held = False        # unknown: another instance may take it when it runs out
        if held:
            self._renewed_at = time.monotonic()
            if not self._holding:
                log.info("imap.lease_taken", account=self.account.name, folder=self.account.folder,
                         holder=self.lease.holder)
        self._holding = held
        return held

    async def _still_held(self) -> None:
        if not await self._hold():
            raise LeaseLost()

    async def _session(self) -> None:
        """One connection: log in, then process and wait until stopped."""
        if self._client is None:
            client = await self._call(self._connect, self.account)
            self._client = client
            caps = {c.upper() for c in await self._call(client.capabilities)}
            self._idle, self._move, self._uidplus = b"IDLE" in caps, b"MOVE" in caps, b"UIDPLUS" in caps
            if not await self._call(client.folder_exists, self.account.processed_folder):
                with contextlib.suppress(IMAPClientError):     # another poller may have made it
                    await self._call(client.create_folder, self.account.processed_folder)
            info = await self._call(client.select_folder, self.account.folder)
            self._uidvalidity = int(info[b"UIDVALIDITY"])
            stored, _ = self.state.get(self.key)
            if stored is not None and stored != self._uidvalidity:
                # RFC 3501 §2.3.1.1: the old UIDs are void; start over (the
                # intake recognises mail it already has by its Message-ID)
                log.warning("imap.uidvalidity_changed", account=self.account.name,
                            folder=self.account.folder, old=stored, new=self._uidvalidity)
                await asyncio.to_thread(self.state.set, self.key, self._uidvalidity, 0)
            elif stored is None:
                await asyncio.to_thread(self.state.set, self.key, self._uidvalidity, 0)
            log.info("imap.connected", account=self.account.name, folder=self.account.folder,
                     idle=self._idle, move=self._move, uidvalidity=self._uidvalidity)
        while not self._stop.is_set():
            await self._still_held()
            if await self._process_folder():
                # Mail that came in meanwhile was announced (EXISTS) in the
                # responses to those commands, not to the IDLE that would come
                # next: look again before waiting.
                continue
            await self._wait_for_mail()

    async def _process_folder(self) -> int:
        """Handle what is in the folder; how many messages left it."""
        client = self._client
        assert client is not None
        uids = sorted(await self._call(client.search, "ALL"))
        _, last_uid = self.state.get(self.key)
        contiguous = True            # every UID below this one was committed
        moved = 0
        for uid in uids:
            if self._stop.is_set():
                break
            await self._still_held()
            if uid <= last_uid:
                # committed earlier, but the move did not happen (crash or lost connection)
                await self._move_to_processed(uid)
                moved += 1
                continue
            raw = await self._fetch(uid)
            if raw is None:
                contiguous = False
                continue
            outcome = await self.intake.receive(Received(
                raw=raw, mail_from=None, rcpt_to=(self.account.mailbox,), mailbox=self.mailbox,
                received_at=self.clock()))
            # committed: from here on the message may leave the folder
            if contiguous:
                last_uid = uid
                await asyncio.to_thread(self.state.set, self.key, self._uidvalidity, uid)
            await self._move_to_processed(uid)
            moved += 1
            log.info("imap.processed", account=self.account.name, folder=self.account.folder, uid=uid,
                     action=getattr(outcome, "action", None), ticket_id=getattr(outcome, "ticket_id", None))
        return moved

    async def _fetch(self, uid: int) -> bytes | None:
        client = self._client
        assert client is not None
        try:
            # BODY.PEEK[]: the whole message without setting \Seen (RFC 3501 §6.4.5)
            data = await self._call(client.fetch, [uid], [b"BODY.PEEK[]"])
        except IMAPClient.Error as e:
            log.error("imap.fetch_failed", account=self.account.name, folder=self.account.folder,
                      uid=uid, error=str(e)[:500])
            return None
        item: Mapping[bytes, Any] = data.get(uid) or {}
        raw = item.get(b"BODY[]")
        if not isinstance(raw, bytes):
            # the message went away meanwhile (another client moved it)
            return None
        return raw

    async def _move_to_processed(self, uid: int) -> None:
        client = self._client
        assert client is not None
        target = self.account.processed_folder
        if self._move:
            await self._call(client.move, [uid], target)
            return
        await self._call(client.copy, [uid], target)
        await self._call(client.delete_messages, [uid])
        if self._uidplus:
            await self._call(client.uid_expunge, [uid])   # only this message (RFC 4315 §2.1)
        else:
            await self._call(client.expunge)

    async def _wait_for_mail(self) -> None:
        client = self._client
        assert client is not None
        renew = self.lease.renew_s if self.lease else IDLE_MAX_S
        timeout = min(self.account.poll_seconds, IDLE_MAX_S, renew)
        if not self._idle:
            waited = 0.0
            while waited < self.account.poll_seconds and not self._stop.is_set():
                step = min(renew, self.account.poll_seconds - waited)
                await self._sleep(step)
                waited += step
                await self._still_held()
            return
        # imaplib keeps every untagged response it was not asked for (EXISTS,
        # EXPUNGE...): over weeks of one connection that only grows
        untagged = getattr(getattr(client, "_imap", None), "untagged_responses", None)
        if isinstance(untagged, dict):
            untagged.clear()
        await self._call(client.idle)
        try:
            await self._call(client.idle_check, timeout)
        except asyncio.CancelledError:
            # the idle_check thread still reads the socket: leave it alone. (Ending
            # the IDLE here once raised from the race and swallowed the cancel.)
            raise
        except BaseException:
            if not self._stop.is_set():
                await self._call(client.idle_done)
            raise
        if not self._stop.is_set():
            await self._call(client.idle_done)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if self._stop.is_set():
            # the socket may be shut down already: just close it
            with contextlib.suppress(Exception):
                await asyncio.to_thread(client.shutdown)
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.to_thread(client.logout), 5)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)


def _connect(account: ImapAccount) -> IMAPClient:
    context = client_tls_context(account.ca_file)
    client = IMAPClient(account.host, port=account.port, ssl=account.tls, ssl_context=context,
                        timeout=CONNECT_TIMEOUT_S)
    try:
        if account.starttls:
            client.starttls(context)
        client.login(account.user, account.secret())
    except BaseException:
        with contextlib.suppress(Exception):
            client.shutdown()
        raise
    return client
