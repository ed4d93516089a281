"""Logs: JSON lines, and never a message body, not even in a traceback."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
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
    assert isinstance(line["exception"], str)               # one type per field, in every event
    assert "ValueError: cannot parse" in line["exception"]
    assert 'in handle' in line["exception"]                 # where it happened
    assert "PRIVATE" not in buf.getvalue()                  # but not what it was handling


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_readable_lines_and_anything_else_json() -> None:
    tty = _Terminal()
    logs.configure(stream=tty)
    structlog.get_logger("t").warning("outbox.failed", outbox_id=7)
    text = tty.getvalue()
    assert not text.startswith("{") and "outbox.failed" in text and "outbox_id=7" in text
    assert "warn" in text


def test_unknown_log_level_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setenv("LOG_LEVEL", "verbose")
    logs.configure(stream=buf)
    line = json.loads(buf.getvalue().splitlines()[0])
    assert (line["event"], line["level"], line["using"]) == ("log.unknown_level", "warning", "info")
    assert line["value"] == "verbose"


def test_journal_stream_lines_carry_syslog_priorities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "journal", "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logs.configure(stream=f)
        log = structlog.get_logger("t")
        log.error("outbox.failed")
        log.warning("outbox.retry")
        log.info("outbox.sent")
    lines = (tmp_path / "journal").read_text().splitlines()
    assert [x[:3] for x in lines] == ["<3>", "<4>", "<6>"]
    assert json.loads(lines[0][3:])["event"] == "outbox.failed"
    # another stream than journald's: plain JSON
    buf = io.StringIO()
    logs.configure(stream=buf)
    structlog.get_logger("t").error("outbox.failed")
    assert buf.getvalue().startswith("{")


def test_a_broken_stream_drops_lines_instead_of_raising() -> None:
    r, w = os.pipe()
    os.close(r)
    stream = os.fdopen(w, "w", buffering=1)
    logs.configure(stream=stream)
    structlog.get_logger("t").info("gateway.stopping")      # EPIPE: dropped, nothing raised
    structlog.get_logger("t").info("gateway.stopped")
