"""Logging: one JSON object per line, configured once at the edge.

Events are named `area.what` (`mail.processed`, `ticket.created`,
`outbox.sent`); context such as `ticket_id`, `message_id` and `mailbox` is
passed or bound per event. Message bodies and secrets are never logged.
`serve` logs to stdout (journald takes it from there); the other commands
log to stderr, so that their stdout stays the JSON or table they print.

Each field has one type in every event (log pipelines map a field once):
`exception` is always the traceback as a string. On a terminal the lines are
rendered for people (structlog's console renderer); anywhere else as JSON.
When the stream is journald's (`$JOURNAL_STREAM` names it), each line starts
with its syslog priority (`<3>` error, `<4>` warning, ...: sd-daemon(3)), so
that `journalctl -p warning` finds it. A broken stream (`gateway serve |
head -1`) drops the lines instead of failing the code that logs them.
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
# syslog priorities (RFC 5424 §6.2.1) of structlog's method names
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2}


class _Tolerant:
    """The log stream, as structlog's WriteLogger uses it (write, flush): once it
    is broken (the reader went away, EPIPE) lines are dropped, never raised."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> None:
        if not self.broken:
            try:
                self.stream.write(text)
            except (OSError, ValueError):      # EPIPE, or closed
                self.broken = True

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.broken = True


def is_journal(stream: TextIO) -> bool:
    """True when `stream` is the journald stream systemd connected (`$JOURNAL_STREAM` = dev:inode)."""
    wanted = os.environ.get("JOURNAL_STREAM")
    if not wanted:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return wanted == f"{st.st_dev}:{st.st_ino}"


_TRACEBACK = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)


def _exception_text(logger: Any, method: str, event: EventDict) -> EventDict:
    """`exc_info` as one string in `exception`: where (file, line, function) and
    what, for each chained exception; never frame locals nor source lines,
    which hold message bytes and addresses that must never reach the logs."""
    exc_info = event.pop("exc_info", None)
    if not exc_info:
        return event
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if exc_info[0] is None:
        return event
    parts = []
    for stack in reversed(_TRACEBACK(exc_info)):
        frames = "".join(f'  File "{f["filename"]}", line {f["lineno"]}, in {f["name"]}\n'
                         for f in stack["frames"])
        parts.append(f"Traceback (most recent call last):\n{frames}{stack['exc_type']}: {stack['exc_value']}")
    event["exception"] = "\n\nDuring handling, or as the cause, of the above:\n\n".join(parts)
    return event


def _journal_priority(logger: Any, method: str, line: Any) -> str:
    # the last processor: gets the rendered JSON line, not an event dict
    return f"<{PRIORITIES.get(method, 6)}>{line}"


_warned: set[str] = set()


def configure(stream: TextIO | None = None, level: str | None = None,
              count: Processor | None = None) -> None:
    """JSON lines to `stream`; `count` (gateway.ops.metrics) sees every event,
    whatever the level, before the level filter drops any."""
    out = stream or sys.stdout
    name = (level or os.environ.get("LOG_LEVEL") or "info").lower()
    known = name in LEVELS and name != "exception"
    threshold = LEVELS[name] if known else logging.INFO

    def by_level(logger: Any, method: str, event: EventDict) -> EventDict:
        if LEVELS.get("warning" if method == "warn" else method, logging.ERROR) < threshold:
            raise structlog.DropEvent
        return event

    tty = hasattr(out, "isatty") and out.isatty()
    renderer: list[Processor] = (
        [structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)]
        if tty else
        [_exception_text, structlog.processors.JSONRenderer(sort_keys=False)])
    if not tty and is_journal(out):
        renderer.append(_journal_priority)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *([count, by_level] if count else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if count else threshold),
        logger_factory=structlog.WriteLoggerFactory(file=_Tolerant(out)),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    if not known and name not in _warned:
        _warned.add(name)
        structlog.get_logger("gateway").warning(
            "log.unknown_level", value=name, using="info",
            expected="debug, info, warning, error, critical")
