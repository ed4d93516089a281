"""Logs: JSON lines, and never a message body, not even in a traceback."""
from __future__ import annotations

import io
import json

import structlog

from gateway.ops import logs


def test_exceptions_are_structured_without_frame_locals() -> None:
    buf = io.StringIO()
    logs.configure(stream=buf)
    log = structlog.get_logger("t")

    def handle(raw: bytes) -> None:
        raise ValueError("cannot parse")
    try:
        handle(b"Subject: private\r\n\r\nPRIVATE BODY TEXT")
    except ValueError:
        log.exception("mail.quarantined", message_id="<x@y>")
    line = json.loads(buf.getvalue())
    assert line["event"] == "mail.quarantined" and line["level"] == "error"
    assert line["exception"][0]["exc_type"] == "ValueError"
    assert line["exception"][0]["frames"]                   # where it happened
    assert "PRIVATE" not in buf.getvalue()                  # but not what it was handling
