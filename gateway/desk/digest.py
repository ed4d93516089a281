"""The daily digest by mail (issue 20), and the ticket rows `#list` shares (pure).

At `[digest] at` local time in `[digest] timezone` each recipient gets one
digest of that local day: every region queue (`to` names "queue") the
tickets of its region, and every agent of `[staff] addresses` (and of
`[staff.govcloud] addresses`) with assigned tickets (`to` names "assignee")
theirs. GovCloud tickets are a digest of their own, to GovCloud staff and the
GOVCLOUD queue only, through the GovCloud relay: never in a commercial one.
The scheduler runs it (`gateway run-due`); a gateway down at the time sends
it when it next runs on that local day (never the day after, never twice).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from gateway.config import Config
from gateway.model import Ticket

LISTED = 50            # tickets a #list mail or a digest shows at most in each of its lists
PARTS = ("open", "waiting", "near", "escalated", "unassigned")


@dataclass(frozen=True)
class Recipient:
    """Who gets one digest, of which tickets."""

    address: str
    who: str                    # "queue" or "assignee"
    govcloud: bool              # the GovCloud digest (GovCloud tickets only) or the commercial one
    region: str | None = None   # a queue's region (None: GOVCLOUD, or an agent's digest)

    @property
    def key(self) -> str:
        """The store's name for it (the day its last digest went out is kept by it)."""
        return f"{self.who}:{self.address}:{'govcloud' if self.govcloud else 'commercial'}"


def day_due(now: datetime, at: time, zone: ZoneInfo) -> date | None:
    """The local day whose digest is due at `now`: today once `at` has passed
    in `zone`, else none (yesterday's is not sent any more)."""
    local = now.astimezone(zone)
    return local.date() if local.time().replace(tzinfo=None) >= at else None


def recipients(config: Config) -> list[Recipient]:
    """Every digest the configuration asks for, queues first."""
    out: list[Recipient] = []
    if "queue" in config.digest.to:
        for region, address in config.queues.items():
            gov = region == "GOVCLOUD"
            out.append(Recipient(address, "queue", gov, None if gov else region))
    if "assignee" in config.digest.to:
        agents = sorted(config.staff_addresses | config.govcloud_staff.addresses)
        for agent in agents:
            if agent in config.queues.values():
                continue
            out.extend(Recipient(agent, "assignee", gov) for gov in (False, True)
                       if config.may_answer(agent, gov))
    return out


def worth_sending(recipient: Recipient, counts: dict[str, int]) -> bool:
    """A queue always gets its digest; an agent only with tickets assigned."""
    return recipient.who == "queue" or any(counts[p] for p in ("open", "waiting", "escalated"))


def age(seconds: float) -> str:
    """A ticket's age as a digest shows it: "3d 04h", "5h 10m", "12m"."""
    s = max(0, int(seconds))
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def ticket_row(t: Ticket, now: datetime) -> dict[str, Any]:
    """A ticket as a `#list` or digest line shows it."""
    due = t.response_due_at
    hours = (due - now).total_seconds() / 3600 if due else None
    return {"id": t.id, "priority": t.priority, "subject": t.subject, "requester": t.requester,
            "owner": t.owner, "status": t.status.value, "govcloud": t.govcloud,
            "due": due.strftime("%Y-%m-%d %H:%M UTC") if due else None,
            "past": hours is not None and hours < 0,
            "hours": None if hours is None else round(abs(hours), 1),
            "age": age((now - t.created_at).total_seconds())}


def lists_of(found: dict[str, list[Ticket]], now: datetime, limit: int = LISTED
             ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, bool]]:
    """The rows of each list (at most `limit`) and whether there were more."""
    return ({name: [ticket_row(t, now) for t in ts[:limit]] for name, ts in found.items()},
            {name: len(ts) > limit for name, ts in found.items()})
