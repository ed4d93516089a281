"""Ticket status transitions (pure).

open → pending (staff answered) → open (customer answered). A customer's
answer to a resolved ticket reopens it; closed tickets are never reopened
(`gateway.conversation` opens a new linked ticket instead).
"""
from __future__ import annotations

from gateway.model import Status


def after_customer_reply(status: Status) -> Status:
    if status in (Status.PENDING, Status.RESOLVED):
        return Status.OPEN
    return status
