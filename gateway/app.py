"""The composition root: config → logging → store → servers and workers.

Nothing else builds the gateway's parts or reaches for globals; the CLI asks
this module for a `Gateway` and runs one command on it.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import structlog.contextvars

from gateway.clock import Clock, system_clock
from gateway.config import Config
from gateway.desk.pipeline import Pipeline
from gateway.desk.scheduler import Scheduler
from gateway.desk.writer import Desk
from gateway.inbound.intake import Intake
from gateway.inbound.smtp import Listener, SupportHandler
from gateway.ops import logs, metrics, systemd, workers
from gateway.ops.sandbox import Sandbox
from gateway.outbound.compose import Composer
from gateway.outbound.sender import OutboxSender
from gateway.outbound.tokens import TicketTokens, load_secret
from gateway.outbound.transport import MaildirDrop, SmtpRelay, Transport
from gateway.store import Store, StoreUnavailable
from gateway.store.blobs import Blobs

log = structlog.get_logger("gateway")

STOP_GRACE_S = 10.0


@dataclass
class Gateway:
    config: Config
    clock: Clock
    store: Store
    intake: Intake
    sender: OutboxSender
    scheduler: Scheduler

    async def close(self) -> None:
        await self.intake.stop()
        self.intake.close()
        await self.sender.close()
        await self.store.close()


def transports(config: Config) -> dict[str, Transport]:
    if config.outbound_transport == "maildir":
        drop = MaildirDrop(config.data_dir / "outbound")
        return {"default": drop, "govcloud": drop}
    default = SmtpRelay(config.relay)
    # GovCloud mail goes only through its own relay when one is configured
    return {"default": default,
            "govcloud": SmtpRelay(config.govcloud_relay) if config.govcloud_relay else default}


async def open_gateway(config: Config, clock: Clock = system_clock, *, resident: bool = False) -> Gateway:
    """`resident`: for `serve` (parse workers from a fork server, see gateway.ops.sandbox)."""
    try:
        private_data_dir(config.data_dir)
        secret = load_secret(config.data_dir)
    except OSError as e:
        raise StoreUnavailable(f"data_dir {config.data_dir}: {e}") from e
    store = await Store.open(config.store_url, config.busy_timeout_ms)
    # Every instance on one database signs and checks ticket tokens with the
    # same key: the first one stored (this data_dir's, on a single instance).
    try:
        secret = bytes.fromhex(await store.shared_setting("ticket_token_secret", secret.hex()))
    except BaseException:
        await store.close()
        raise
    tokens = TicketTokens(secret)
    desk = Desk(config, Composer(ticket_tag=config.ticket_tag, tokens=tokens,
                                 override_dir=config.templates_dir, dkim_keys=config.dkim_keys))
    pipeline = Pipeline(config, desk, tokens)
    sender = OutboxSender(store, transports(config), clock, retry_base_s=config.outbound_retry_base_s,
                          retry_max_s=config.outbound_retry_max_s, poll_s=config.outbound_poll_s,
                          lease_s=config.lease_s)
    preload = ["gateway.mail.structure"]
    intake = Intake(store, pipeline, Blobs(config.data_dir), clock, on_commit=sender.wake,
                    limits=config.limits, max_message_size=config.max_message_size,
                    sandbox=Sandbox(config.limits.parse_processes, preload=preload, fork_server=resident),
                    small_sandbox=Sandbox(1, preload=preload, fork_server=resident))
    scheduler = Scheduler(store, desk, config.policy_for, clock, interval_s=config.scheduler_interval_s,
                          on_queued=sender.wake)
    return Gateway(config, clock, store, intake, sender, scheduler)


STORE_FILES = ("gateway.db", "gateway.db-wal", "gateway.db-shm", "gateway.db-journal")


def private_data_dir(data_dir: Path) -> None:
    """data_dir and everything the gateway writes in it readable by its own user only,
    whatever the umask it was started with: mail, attachments and the database hold
    customers' data and the token key (project issue 14: 0644 files in 0755 folders).

    Every command sets the process umask to 077 (`gateway.cli.main`, as Postfix's
    daemons set theirs), so every file created, by us or by SQLite (its -wal, -shm
    and journal files), is 0600; what an older version left readable is tightened
    here."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for path in (data_dir, *(data_dir / name for name in STORE_FILES)):
        with contextlib.suppress(FileNotFoundError):
            mode = path.stat().st_mode & 0o7777
            if mode & 0o077:
                path.chmod(mode & ~0o077)      # only taken away: never more than the owner had


async def serve(config: Config, clock: Clock = system_clock, *, worker: int = 0) -> int:
    """Run until SIGTERM/SIGINT. Worker 0 (the primary) starts the other
    workers and runs the sender and scheduler; see gateway.ops.workers."""
    count = config.workers
    primary = worker == 0
    structlog.contextvars.bind_contextvars(worker=worker)    # on every line this process logs
    if not primary:
        workers.die_with_parent()
    metrics_dir = None
    if config.metrics_enabled:
        # before any worker starts: they count into the same directory
        metrics_dir = metrics.prepare(config.data_dir, primary)
        logs.configure(stream=sys.stdout, count=metrics.Metrics().count)
    gw = await open_gateway(config, clock, resident=True)
    if not primary:
        gw.intake.on_commit = workers.waker()
    others: workers.Workers | None = None
    if primary and count > 1:
        others = workers.Workers(config.path, count, gw.sender.wake)
        await others.start()
    listener = Listener(config, SupportHandler(config, gw.intake, clock), reuse_port=count > 1)
    try:
        await listener.start()
    except OSError as e:
        if others is not None:
            await others.stop(STOP_GRACE_S)
        await gw.close()
        log.error("gateway.listen_failed", host=config.smtp_host, port=config.smtp_port, error=str(e))
        return 75
    if not primary:
        workers.report_listening()
    gw.intake.start()
    tasks: list[asyncio.Task[None]] = []      # stopped gracefully: they finish their round
    helpers: list[asyncio.Task[None]] = []    # cancelled: nothing of theirs to finish
    health = metrics.Health(listening=True)
    endpoint: metrics.MetricsServer | None = None
    pollers: list[Any] = []
    if primary:
        tasks = [asyncio.create_task(gw.sender.run(), name="outbox-sender"),
                 asyncio.create_task(gw.scheduler.run(), name="scheduler")]
        if config.imap:
            # IMAP mailboxes are polled by the primary only, one poller per account,
            # and by one instance at a time among those sharing the store (a lease)
            from gateway.inbound.imap import STATE_FILE, ImapPoller, ImapState
            from gateway.store.leases import StoreLease, holder_id
            state = ImapState(config.data_dir / STATE_FILE)
            holder = holder_id()
            for account in config.imap:
                mailbox = config.mailbox_for(account.mailbox)
                assert mailbox is not None      # parse_imap checked it
                lease = StoreLease(gw.store, f"imap:{account.name}/{account.folder}", holder,
                                   config.lease_s, clock)
                poller = ImapPoller(account, gw.intake, mailbox, state, clock, lease=lease)
                pollers.append(poller)
                tasks.append(asyncio.create_task(poller.run(), name=f"imap-{account.user}"))
        if config.metrics_enabled:
            try:
                endpoint = metrics.MetricsServer(config.metrics_host, config.metrics_port, health,
                                                 metrics_dir)
            except OSError as e:
                log.error("metrics.listen_failed", host=config.metrics_host, port=config.metrics_port,
                          error=str(e))
            else:
                endpoint.start()
                helpers.append(asyncio.create_task(_probe(gw, health, config.metrics_probe_s),
                                                   name="health-probe"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = listener.bound
    log.info("gateway.started", host=host, port=port, protocol="lmtp" if config.lmtp else "smtp",
             data_dir=str(config.data_dir), config=config.source, worker=worker, workers=count,
             mailboxes=[m.address for m in config.mailboxes], transport=config.outbound_transport)
    if primary:
        systemd.notify(f"READY=1\nSTATUS=listening on {host}:{port}, {count} worker(s)")
        if (every := systemd.watchdog_interval()) is not None:
            helpers.append(asyncio.create_task(_watchdog(every, health), name="watchdog"))
    await stop.wait()

    if primary:
        systemd.notify("STOPPING=1")
    log.info("gateway.stopping", worker=worker)
    health.listening = False
    for helper in helpers:
        helper.cancel()
    for poller in pollers:
        poller.stop()
    await listener.stop(STOP_GRACE_S)
    if others is not None:
        await others.stop(STOP_GRACE_S)
    await gw.intake.stop()
    gw.scheduler.stop()
    gw.sender.stop()
    for task in tasks:
        try:
            await asyncio.wait_for(task, STOP_GRACE_S)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if endpoint is not None:
        endpoint.stop()
    counts = await gw.store.outbox_counts()
    await gw.close()
    log.info("gateway.stopped", worker=worker, outbox_queued=counts.get("queued", 0))
    return 0


async def _watchdog(every_s: float, health: metrics.Health) -> None:
    """WATCHDOG=1 while the event loop runs and the listener is up: a hung
    loop stops the pings, and systemd restarts the service."""
    while True:
        if health.listening:
            systemd.notify("WATCHDOG=1")
        await asyncio.sleep(every_s)


async def _probe(gw: Gateway, health: metrics.Health, every_s: float) -> None:
    """Keep /healthz and the gauges current: can we write to data_dir and take
    the store's write lock, and how full are the outbox and the quarantine?"""
    while True:
        try:
            await asyncio.to_thread(_touch, gw.config.data_dir)
            async with gw.store.transaction():
                pass
            outbox, inbound = await gw.store.outbox_counts(), await gw.store.inbound_counts()
        except (OSError, StoreUnavailable) as e:
            if not health.problem:
                log.error("health.store_unwritable", error=str(e))
            health.problem = f"store: {e}"
        else:
            if health.problem:
                log.info("health.store_writable")
            health.problem = ""
            health.store_ok_at = time.monotonic()
            health.gauges = {"outbox_queued": outbox.get("queued", 0),
                             "outbox_failed": outbox.get("failed", 0),
                             "quarantined": inbound.get("quarantined", 0), "up": 1}
        await asyncio.sleep(every_s)


def _touch(data_dir: Path) -> None:
    probe = data_dir / ".health-probe"
    with open(probe, "wb") as f:
        f.write(b"ok")
        f.flush()
        os.fsync(f.fileno())
    probe.unlink()
