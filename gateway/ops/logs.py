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
from typing import Any, TextIO

import structlog
import structlog.tracebacks
from structlog.typing import EventDict, Processor

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "exception": logging.ERROR, "critical": logging.CRITICAL}


def configure(stream: TextIO | None = None, level: str | None = None,
              count: Processor | None = None) -> None:
    """JSON lines to `stream`; `count` (gateway.ops.metrics) sees every event,
    whatever the level, before the level filter drops any."""
    name = (level or os.environ.get("LOG_LEVEL") or "info").lower()
    threshold = LEVELS.get(name, logging.INFO)

    def by_level(logger: Any, method: str, event: EventDict) -> EventDict:
        if LEVELS.get("warning" if method == "warn" else method, logging.ERROR) < threshold:
            raise structlog.DropEvent
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *([count, by_level] if count else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Tracebacks as data, without frame locals: locals hold message
            # bytes and addresses, which must never reach the logs.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if count else threshold),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
