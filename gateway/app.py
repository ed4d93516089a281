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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import structlog
import structlog.contextvars

from gateway.clock import Clock, system_clock
from gateway.config import Config, ConfigError, load
from gateway.desk.pipeline import Pipeline
from gateway.desk.scheduler import Scheduler
from gateway.desk.writer import Desk
from gateway.inbound.intake import Intake
from gateway.inbound.smtp import Listener, SupportHandler
from gateway.model import Kind
from gateway.ops import logs, metrics, systemd, workers
from gateway.ops.sandbox import Sandbox
from gateway.outbound.compose import Composer, check_templates
from gateway.outbound.sender import OutboxSender
from gateway.outbound.tokens import TicketTokens, open_store, shared_secret
from gateway.outbound.transport import MaildirDrop, NoRelay, SmtpRelay, Transport
from gateway.store import Failure, Store, StoreUnavailable, Tx
from gateway.store.blobs import Blobs

log = structlog.get_logger("gateway")

STOP_GRACE_S = 10.0

# What SIGHUP changes in a running `serve` (README "Reloading the configuration"):
# the settings read afresh for each mail and each scheduler round. Every other
# setting is bound to a socket, a process, the store, the sender or a running
# poller; a change to one of those refuses the reload and needs a restart (a
# setting added later is restart-only until it is named here).
RELOADABLE = frozenset({
    "ticket_tag", "mailboxes", "staff_addresses", "staff_domains", "queues", "default_region",
    "redirects", "policy", "rules", "staff_require_authenticated", "staff_trusted_authserv_ids",
    "templates_dir", "dkim_keys", "govcloud_staff", "answers_dir",
})


@dataclass
class Gateway:
    config: Config
    clock: Clock
    store: Store
    intake: Intake
    sender: OutboxSender
    scheduler: Scheduler

    def reconfigure(self, new: Config) -> list[str]:
        """Put `new` in place for the next mail and the next scheduler round and
        return the settings that changed; templates (and template files) are read
        again. Raises ConfigError, leaving the running configuration as it was,
        when a restart-only setting changed or a template or DKIM key is unusable."""
        old = self.config
        changed = [f.name for f in fields(Config) if f.name != "source"
                   and getattr(old, f.name) != getattr(new, f.name)]
        fixed = [name for name in changed if name not in RELOADABLE]
        if fixed:
            raise ConfigError([f"{name}: changed, takes effect only on a restart" for name in fixed])
        pipeline = self.intake.pipeline
        try:
            composer = Composer(ticket_tag=new.ticket_tag, tokens=pipeline.tokens,
                                override_dir=new.templates_dir, dkim_keys=new.dkim_keys)
        except ValueError as e:
            raise ConfigError([f"dkim: {e}"]) from None
        desk = Desk(new, composer)
        if problems := check_templates(composer) + desk.answers_problems():
            raise ConfigError([f"template error: {problem}" for problem in problems])
        self.intake.pipeline = Pipeline(new, desk, pipeline.tokens)
        self.scheduler.desk, self.scheduler.policy_for = desk, new.policy_for
        self.config = new
        return changed

    async def close(self) -> None:
        await self.intake.stop()
        self.intake.close()
        await self.sender.close()
        await self.store.close()


def transports(config: Config) -> dict[str, Transport]:
    if config.outbound_transport == "maildir":
        drop = MaildirDrop(config.data_dir / "outbound")
        return {"default": drop, "govcloud": drop}
    # GovCloud mail goes only through its own relay, never the commercial one: without
    # [outbound.govcloud] it stays queued (a GovCloud mailbox then fails config.parse)
    return {"default": SmtpRelay(config.relay),
            "govcloud": SmtpRelay(config.govcloud_relay) if config.govcloud_relay else NoRelay(
                "no [outbound.govcloud] relay is configured: GovCloud mail never goes through "
                "the commercial relay, it stays queued")}


async def open_gateway(config: Config, clock: Clock = system_clock, *, resident: bool = False) -> Gateway:
    """`resident`: for `serve` (parse workers from a fork server, see gateway.ops.sandbox)."""
    try:
        private_data_dir(config.data_dir)
    except OSError as e:
        raise StoreUnavailable(f"data_dir {config.data_dir}: {e}") from e
    store = await open_store(config.store_url, config.busy_timeout_ms, config.token_secret_path)
    try:
        tokens = TicketTokens(await shared_secret(store, config.token_secret_path))
    except BaseException:
        await store.close()
        raise
    desk = Desk(config, Composer(ticket_tag=config.ticket_tag, tokens=tokens,
                                 override_dir=config.templates_dir, dkim_keys=config.dkim_keys))
    pipeline = Pipeline(config, desk, tokens)
    sender = OutboxSender(store, transports(config), clock, retry_base_s=config.outbound_retry_base_s,
                          retry_max_s=config.outbound_retry_max_s, poll_s=config.outbound_poll_s,
                          lease_s=config.lease_s, data_dir=str(config.data_dir),
                          on_failed=lambda failures: notice_failures(store, desk, clock, failures))
    preload = ["gateway.mail.structure"]
    intake = Intake(store, pipeline, Blobs(config.data_dir), clock, on_commit=sender.wake,
                    limits=config.limits, max_message_size=config.max_message_size,
                    sandbox=Sandbox(config.limits.parse_processes, preload=preload, fork_server=resident),
                    small_sandbox=Sandbox(1, preload=preload, fork_server=resident))
    scheduler = Scheduler(store, desk, config.policy_for, clock, interval_s=config.scheduler_interval_s,
                          on_queued=sender.wake)
    return Gateway(config, clock, store, intake, sender, scheduler)


async def notice_failures(store: Store, desk: Desk, clock: Clock, failures: list[Failure]) -> int:
    """The ticket's staff (`[staff] notify`: its queue and assignee) hear of mail the
    relay refused for good: a staff answer that did not go out, or a customer's
    address now undeliverable (project issue 15). Never about staff mail itself
    (a notice about a notice could go on forever)."""
    now = clock()

    async def work(tx: Tx) -> int:
        queued = 0
        for f in failures:
            if f.kind == Kind.STAFF_NOTIFY.value or not (f.marked or f.kind == Kind.STAFF_REPLY.value):
                continue
            ticket = await tx.ticket(f.ticket_id)
            if ticket is not None:
                what = ("The relay refused the staff answer for good: the customer did not get it."
                        if f.kind == Kind.STAFF_REPLY.value else
                        f"The relay refused our {f.kind.replace('_', ' ')} mail for good.")
                queued += await desk.undeliverable_notice(tx, ticket, now, addresses=f.rcpt_to,
                                                          marked=f.marked, what=what, detail=f.error)
        return queued
    return await store.run(work)


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
    # SIGHUP's default action ends the process: caught from the start, acted on once serving
    hup = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hup.set)
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
    handler = SupportHandler(config, gw.intake, clock)
    listener = Listener(config, handler, reuse_port=count > 1)
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
            holder = holder_id(str(config.data_dir))
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
    status = f"STATUS=listening on {host}:{port}, {count} worker(s)"
    helpers.append(asyncio.create_task(_reloads(hup, gw, handler, pollers, others, status if primary else None),
                                       name="reload"))
    if primary:
        systemd.notify(f"READY=1\n{status}")
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


async def _reloads(hup: asyncio.Event, gw: Gateway, handler: SupportHandler, pollers: list[Any],
                   others: workers.Workers | None, status: str | None) -> None:
    """On each SIGHUP: read the config file again and apply it (`Gateway.reconfigure`),
    or keep the running one and log why. Sessions stay open; a mail in flight
    finishes under the configuration it started with. The primary passes the
    signal on to the other workers, which reload their own copy; `status` (the
    primary's) tells systemd the reload began and ended."""
    while True:
        await hup.wait()
        hup.clear()
        if status is not None:
            systemd.notify("RELOADING=1\nSTATUS=reloading the configuration")
        if others is not None:
            others.signal(signal.SIGHUP)
        source = gw.config.source
        try:
            new = await asyncio.to_thread(load, gw.config.path)
            changed = gw.reconfigure(new)
        except ConfigError as e:
            log.error("config.reload_refused", config=source, problems=e.problems,
                      kept="the running configuration")
        else:
            handler.config = new
            for poller in pollers:
                poller.mailbox = new.mailbox_for(poller.mailbox.address) or poller.mailbox
            log.info("config.reloaded", config=source, changed=changed)
        if status is not None:
            systemd.notify(f"READY=1\n{status}")


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
