"""Kaseya's authorised contacts (pure): who may open tickets for a customer.

Per organisation in the directory (`[[rules.customer]]`): its authorised
`contacts`, its `certified` administrators (each until an expiry date) and a
`contacts_policy`:

- `open` (the default, today's behaviour): anyone at its domains opens tickets;
- `flag`: a ticket from anyone else is marked "not an authorised contact";
- `restrict`: anyone else gets a polite answer instead of a ticket, and the
  mail is kept (quarantined: `gateway quarantine retry` once they are added).

A certified administrator whose certificate is valid on the day is ranked
first; an expired certificate does not count (the address stays an
authorised contact: the organisation listed it).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from gateway.model import normalize_address
from gateway.rules.settings import Customer, CustomerDirectory

CERTIFIED, AUTHORISED, UNLISTED = "certified", "authorised", "unlisted"


@dataclass(frozen=True)
class Standing:
    """What the directory says about one sender of one organisation."""

    organisation: str
    policy: str                # open | flag | restrict
    rank: str                  # certified | authorised | unlisted
    why: str

    @property
    def refused(self) -> bool:
        return self.policy == "restrict" and self.rank == UNLISTED

    @property
    def flagged(self) -> bool:
        return self.policy == "flag" and self.rank == UNLISTED

    def to_json(self) -> dict[str, str]:
        return {"organisation": self.organisation, "policy": self.policy, "rank": self.rank, "why": self.why}


def standing(customer: Customer, sender: str, today: date) -> Standing | None:
    """The sender's standing with its organisation; None when the organisation
    lists no contacts and leaves tickets open (nothing to say)."""
    address = normalize_address(sender)
    if not customer.contacts and not customer.certified and customer.contacts_policy == "open":
        return None
    org = customer.organisation
    expired = None
    for c in customer.certified:
        if c.address == address:
            if today <= c.expires:
                return Standing(org, customer.contacts_policy, CERTIFIED,
                                f"{address} is a certified administrator of {org} until {c.expires.isoformat()}")
            expired = c.expires
    if address in customer.contacts or expired is not None:
        note = f" (certificate expired {expired.isoformat()})" if expired else ""
        return Standing(org, customer.contacts_policy, AUTHORISED,
                        f"{address} is an authorised contact of {org}{note}")
    return Standing(org, customer.contacts_policy, UNLISTED,
                    f"{address} is not an authorised contact of {org} (contacts_policy {customer.contacts_policy})")


def of_sender(directory: CustomerDirectory, sender: str, today: date) -> tuple[Customer, Standing] | None:
    found = directory.lookup(normalize_address(sender).rpartition("@")[2])
    if found is None:
        return None
    s = standing(found[0], sender, today)
    return (found[0], s) if s is not None else None


def colleagues(directory: CustomerDirectory, sender: str, requester: str, today: date) -> str | None:
    """Authorised contacts of one organisation may answer on each other's tickets:
    the organisation's name when both are, else None."""
    mine, theirs = of_sender(directory, sender, today), of_sender(directory, requester, today)
    if mine is None or theirs is None or mine[0] is not theirs[0]:
        return None
    if UNLISTED in (mine[1].rank, theirs[1].rank):
        return None
    return mine[0].organisation
