"""The composition root: config → logging → store → servers and workers.

Nothing else builds the gateway's parts or reaches for globals; the CLI asks
this module for a `Gateway` and runs one command on it.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass

import structlog

from gateway import systemd
from gateway.blobs import Blobs
from gateway.clock import Clock, system_clock
from gateway.config import Config
from gateway.desk import Desk
from gateway.inbound.intake import Intake
from gateway.inbound.smtp import Listener, SupportHandler
from gateway.outbound.compose import Composer
from gateway.outbound.sender import OutboxSender
from gateway.outbound.transport import MaildirDrop, SmtpRelay, Transport
from gateway.pipeline import Pipeline
from gateway.scheduler import Scheduler
from gateway.store import Store, StoreUnavailable
from gateway.tokens import TicketTokens, load_secret

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


async def open_gateway(config: Config, clock: Clock = system_clock) -> Gateway:
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        secret = load_secret(config.data_dir)
    except OSError as e:
        raise StoreUnavailable(f"data_dir {config.data_dir}: {e}") from e
    store = await Store.open(config.db_path, config.busy_timeout_ms)
    tokens = TicketTokens(secret)
    desk = Desk(config, Composer(ticket_tag=config.ticket_tag, tokens=tokens))
    pipeline = Pipeline(config, desk, tokens)
    sender = OutboxSender(store, transports(config), clock, retry_base_s=config.outbound_retry_base_s,
                          retry_max_s=config.outbound_retry_max_s, poll_s=config.outbound_poll_s)
    intake = Intake(store, pipeline, Blobs(config.data_dir), clock, on_commit=sender.wake)
    scheduler = Scheduler(store, desk, config.policy, clock, interval_s=config.scheduler_interval_s,
                          on_queued=sender.wake)
    return Gateway(config, clock, store, intake, sender, scheduler)


async def serve(config: Config, clock: Clock = system_clock) -> int:
    gw = await open_gateway(config, clock)
    listener = Listener(config, SupportHandler(config, gw.intake, clock))
    try:
        await listener.start()
    except OSError as e:
        await gw.close()
        log.error("gateway.listen_failed", host=config.smtp_host, port=config.smtp_port, error=str(e))
        return 75
    gw.intake.start()
    sender_task = asyncio.create_task(gw.sender.run(), name="outbox-sender")
    scheduler_task = asyncio.create_task(gw.scheduler.run(), name="scheduler")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = listener.bound
    log.info("gateway.started", host=host, port=port, protocol="lmtp" if config.lmtp else "smtp",
             data_dir=str(config.data_dir), config=config.source,
             mailboxes=[m.address for m in config.mailboxes], transport=config.outbound_transport)
    systemd.notify(f"READY=1\nSTATUS=listening on {host}:{port}")
    await stop.wait()

    systemd.notify("STOPPING=1")
    log.info("gateway.stopping")
    await listener.stop(STOP_GRACE_S)
    await gw.intake.stop()
    gw.scheduler.stop()
    gw.sender.stop()
    for task in (scheduler_task, sender_task):
        try:
            await asyncio.wait_for(task, STOP_GRACE_S)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    counts = await gw.store.outbox_counts()
    await gw.close()
    log.info("gateway.stopped", outbox_queued=counts.get("queued", 0))
    return 0
