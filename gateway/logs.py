"""Logging: one JSON object per line, configured once at the edge.

Events are named `area.what` (`mail.processed`, `ticket.created`,
`outbox.sent`); context such as `ticket_id`, `message_id` and `mailbox` is
passed or bound per event. Message bodies and secrets are never logged.
`serve` logs to stdout (journald takes it from there); the other commands
log to stderr, so that their stdout stays the JSON or table they print.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def configure(stream: TextIO | None = None, level: str | None = None) -> None:
    name = (level or os.environ.get("LOG_LEVEL") or "info").lower()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.EventRenamer("event"),
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(name, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
