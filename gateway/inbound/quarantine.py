"""Quarantined mail: set aside for a human, never lost, never blocking the rest.

A mail that could not be parsed or processed (or has no sender address at
all) is committed by the intake with its raw bytes, state `quarantined` and
the error, and the gateway goes on with the mails behind it (Mailman's
`shunt` queue is the model). Ops look at it and try it again:

    gateway quarantine list [--json]       what is there, oldest first
    gateway quarantine show ID [--json]    the raw bytes (or error and metadata)
    gateway quarantine retry ID            parse and process the stored bytes again

A retry goes through the same intake as a new mail (same writer, same
transaction rules), on the same inbound row: on success the mail becomes a
normal processed mail (a ticket, its acknowledgement and notification, as
if it had just arrived; the ticket's time is the time of the retry); on
failure it stays quarantined with the new error. Two retries of one mail at
once process it once.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.desk.pipeline import Outcome, Received
from gateway.inbound.intake import envelope_mail_from
from gateway.store import Store
from gateway.store.blobs import Blobs

log = structlog.get_logger("gateway.quarantine")

DELIVER_TIMEOUT_S = 20.0


class NotQuarantined(Exception):
    """No quarantined mail with this ID (unknown, or already processed)."""


@dataclass(frozen=True)
class RetryResult:
    inbound_id: int
    outcome: Outcome

    @property
    def processed(self) -> bool:
        return self.outcome.action not in ("quarantined", "not_quarantined")

    def to_json(self) -> dict[str, Any]:
        o = self.outcome
        return {"id": self.inbound_id, "action": o.action, "ticket_id": o.ticket_id,
                "message_id": o.message_id, "processed": self.processed,
                "error": None if self.processed else o.reason}


async def entries(store: Store) -> list[dict[str, Any]]:
    """Every quarantined mail's metadata, oldest first."""
    return [_public(row) for row in await store.quarantined()]


async def entry(store: Store, inbound_id: int) -> dict[str, Any]:
    """One quarantined mail's metadata and error."""
    row = await store.inbound(inbound_id)
    if row is None or row["state"] != "quarantined":
        raise NotQuarantined(inbound_id)
    return _public(row)


async def raw_bytes(store: Store, blobs: Blobs, inbound_id: int) -> bytes:
    """The bytes as received (from the row, or the file of a large mail)."""
    raw, raw_path = await store.inbound_raw(inbound_id)
    if raw is not None:
        return bytes(raw)
    if raw_path is None:
        raise NotQuarantined(inbound_id)
    # raw_path is ours (raw/<ab>/<sha256>.eml), relative to data_dir: never the sender's name
    return await asyncio.to_thread((blobs.root / raw_path).read_bytes)


async def retry(gw: Any, inbound_id: int) -> RetryResult:
    """Process a quarantined mail again (`gw` is an open `gateway.app.Gateway`)."""
    row = await entry(gw.store, inbound_id)
    mailbox = gw.config.mailbox_for(row["mailbox"])
    if mailbox is None:
        raise NotQuarantined(f"{inbound_id}: mailbox {row['mailbox']} is no longer configured")
    raw = await raw_bytes(gw.store, Blobs(gw.config.data_dir), inbound_id)
    received = Received(raw=raw, mail_from=envelope_mail_from(row["mail_from"]),
                        rcpt_to=tuple(row["rcpt_to"]), mailbox=mailbox, received_at=gw.clock())
    outcome = await gw.intake.reprocess(inbound_id, received)
    result = RetryResult(inbound_id, outcome)
    log.info("quarantine.retried", inbound_id=inbound_id, action=outcome.action,
             ticket_id=outcome.ticket_id, message_id=outcome.message_id,
             processed=result.processed)
    if outcome.queued:
        # As `ingest` does: send the answers now; what fails stays queued for serve.
        try:
            await asyncio.wait_for(gw.sender.deliver_due(), DELIVER_TIMEOUT_S)
        except TimeoutError:
            pass
    return result


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "received_at": row["received_at"],
            "mail_from": envelope_mail_from(row["mail_from"]), "rcpt_to": row["rcpt_to"],
            "mailbox": row["mailbox"], "message_id": row["message_id"], "size": row["size"],
            "sha256": row["sha256"], "error": row["error"]}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'ID':>6}  {'RECEIVED':<20}  {'SIZE':>9}  {'FROM':<30}  ERROR"]
    for r in rows:
        received = str(r["received_at"])[:19].replace("T", " ")
        sender = "<>" if r["mail_from"] == "" else (r["mail_from"] or "?")
        error = " ".join(str(r["error"] or "").split())
        lines.append(f"{r['id']:>6}  {received:<20}  {r['size']:>9}  {sender[:30]:<30}  {error[:80]}")
    lines.append(f"({len(rows)} quarantined mail{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)
