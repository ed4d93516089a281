"""Prometheus metrics, counted from the log events, and a health check.

Every counter here is a log event counted: the event catalogue (README,
"Operating") is the one list of what happens, and a structlog processor turns
each event into its series. No module of the gateway reaches for a metrics
object; nothing can be logged but not counted, or counted but not logged.
Gauges (outbox depth, quarantine size) are read from the store.

`serve` may run several worker processes; they count into files under
`data_dir/metrics` (prometheus-client's multiprocess mode) and the primary
serves the sum. Names follow Prometheus conventions: `gateway_` prefix,
base units (seconds), `_total` on counters; labels never carry a ticket or
an address, only small fixed sets (mailbox, region, priority, kind ...).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
HEALTH_MAX_AGE_S = 30.0


def prepare(data_dir: Path, primary: bool) -> Path:
    """Point prometheus-client at a shared directory, before it is imported.

    The primary empties it at start: counts from an earlier run must not be
    summed into this one (prometheus-client's multiprocess rules).
    """
    d = data_dir / "metrics"
    if primary:
        shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(d)
    return d


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        r = self.registry = CollectorRegistry()
        self.received = Counter("gateway_mails_received", "Mails received, by mailbox and SMTP answer",
                                ["mailbox", "answer"], registry=r)
        self.processed = Counter("gateway_mails_processed", "Received mails by what became of them",
                                 ["action"], registry=r)
        self.processing = Histogram("gateway_mail_processing_seconds",
                                    "From the end of DATA to the committed answer", registry=r,
                                    buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        # opened, closed and reopened apart: a sum over one metric's series must mean something
        self.opened = Counter("gateway_tickets_opened", "Tickets opened, by region and priority",
                              ["region", "priority"], registry=r)
        self.closed = Counter("gateway_tickets_closed", "Tickets that became closed", registry=r)
        self.reopened = Counter("gateway_tickets_reopened", "Resolved or pending tickets a reply opened again",
                                registry=r)
        self.status = Counter("gateway_ticket_status_changes", "Status changes",
                              ["old", "new"], registry=r)
        self.deliveries = Counter("gateway_outbox_deliveries", "Delivery tries by result and kind",
                                  ["result", "kind"], registry=r)
        self.jobs = Counter("gateway_scheduler_jobs", "Scheduled jobs run", ["job"], registry=r)
        self.sla = Counter("gateway_sla_warnings", "First-response targets missed", ["priority"],
                           registry=r)
        self.sla_near = Counter("gateway_sla_near", "SLA warnings sent before a first-response target",
                                ["priority"], registry=r)
        self.quarantined = Counter("gateway_mails_quarantined", "Mails set aside as unprocessable",
                                   registry=r)
        self.guarded = Counter("gateway_loop_guard", "Answers and tickets held back against loops and floods",
                               ["action", "scope"], registry=r)
        self._rules: dict[str, Callable[[MutableMapping[str, Any]], None]] = {
            "mail.processed": self._processed,
            "mail.deferred": lambda e: self.received.labels(_s(e.get("mailbox")), "451").inc(),
            "smtp.rcpt_refused": lambda e: self.received.labels("-", "550").inc(),
            "smtp.too_big": lambda e: self.received.labels(_s(e.get("mailbox")), "552").inc(),
            "ticket.created": lambda e: self.opened.labels(_s(e.get("region")), _s(e.get("priority"))).inc(),
            "ticket.status_changed": self._status,
            "outbox.sent": lambda e: self.deliveries.labels("sent", _s(e.get("kind"))).inc(),
            "outbox.retry": lambda e: self.deliveries.labels("retry", _s(e.get("kind"))).inc(),
            "outbox.failed": lambda e: self.deliveries.labels("failed", _s(e.get("kind"))).inc(),
            "scheduler.job": lambda e: self.jobs.labels(_s(e.get("job"))).inc(),
            "ticket.sla_missed": lambda e: self.sla.labels(_s(e.get("priority"))).inc(),
            "ticket.sla_warning": lambda e: self.sla_near.labels(_s(e.get("priority"))).inc(),
            "mail.quarantined": lambda e: self.quarantined.inc(),
            "ticket.ack_suppressed": lambda e: self.guarded.labels("ack_suppressed", _s(e.get("scope"))).inc(),
            "ticket.rate_limited": lambda e: self.guarded.labels("ticket_held", _s(e.get("scope"))).inc(),
            "ticket.stranger_answer": lambda e: self.guarded.labels("stranger_answer", _s(e.get("by"))).inc(),
            "contact.answer_withheld": lambda e: self.guarded.labels("refusal_withheld", _s(e.get("scope"))).inc(),
        }

    def _processed(self, e: MutableMapping[str, Any]) -> None:
        self.received.labels(_s(e.get("mailbox")), "250").inc()
        action = _s(e.get("action"))
        self.processed.labels(action).inc()     # a quarantined mail is counted by its own event
        if isinstance(e.get("duration_ms"), (int, float)):
            self.processing.observe(e["duration_ms"] / 1000)

    def _status(self, e: MutableMapping[str, Any]) -> None:
        old, new = _s(e.get("old")), _s(e.get("new"))
        self.status.labels(old, new).inc()
        if new == "closed":
            self.closed.inc()
        elif new == "open" and old in ("resolved", "pending"):
            self.reopened.inc()

    def count(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """structlog processor: count the event, pass it on unchanged."""
        rule = self._rules.get(str(event.get("event")))
        if rule is not None:
            with contextlib.suppress(Exception):     # counting must never cost a log line
                rule(event)
        return event

    def events(self) -> Iterable[str]:
        return self._rules.keys()


def _s(value: Any) -> str:
    return "-" if value is None else str(value)[:40]


@dataclass
class Health:
    """What /healthz answers: the listener is up and the store took a write lately."""

    listening: bool = False
    store_ok_at: float = 0.0
    gauges: dict[str, float] = field(default_factory=dict)
    problem: str = ""

    def ok(self, now: float | None = None) -> bool:
        return (self.listening and not self.problem
                and (now or time.monotonic()) - self.store_ok_at < HEALTH_MAX_AGE_S)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per connection: an idle or slow client never holds up /healthz."""

    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:   # scrapes are not events
        pass


class MetricsServer:
    """GET /metrics (Prometheus text) and GET /healthz, in a thread of the primary."""

    def __init__(self, host: str, port: int, health: Health, multiproc_dir: Path | None):
        self.health = health
        self.multiproc_dir = multiproc_dir
        self.httpd: WSGIServer = make_server(host, port, self._app, server_class=_ThreadingServer,
                                            handler_class=_Quiet)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            ok = self.health.ok()
            body = (b"ok\n" if ok else f"unhealthy: {self.health.problem or 'not ready'}\n".encode())
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [body]
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
            from prometheus_client.core import GaugeMetricFamily
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            if self.multiproc_dir is not None:
                MultiProcessCollector(registry, path=str(self.multiproc_dir))
            gauges = dict(self.health.gauges)

            class _Gauges:
                def collect(self) -> Iterable[GaugeMetricFamily]:
                    for name, (doc, value) in _gauge_families(gauges).items():
                        yield GaugeMetricFamily(name, doc, value=value)
            registry.register(_Gauges())
            registry.register(_BuildInfo())
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [generate_latest(registry)]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]


class _BuildInfo:
    """`gateway_build_info{version, python} 1`: which build answers (Prometheus's info convention)."""

    def collect(self) -> Iterable[Any]:
        import platform
        from importlib.metadata import PackageNotFoundError, version

        from prometheus_client.core import GaugeMetricFamily
        try:
            ours = version("support-gateway")
        except PackageNotFoundError:
            ours = "unknown"
        g = GaugeMetricFamily("gateway_build_info", "The gateway's version and Python, always 1",
                              labels=["version", "python"])
        g.add_metric([ours, platform.python_version()], 1.0)
        yield g


def _gauge_families(g: dict[str, float]) -> dict[str, tuple[str, float]]:
    return {
        "gateway_outbox_depth": ("Outbound mails waiting to be sent", g.get("outbox_queued", 0)),
        "gateway_outbox_failed": ("Outbound mails that failed for good", g.get("outbox_failed", 0)),
        "gateway_quarantine_size": ("Mails kept as unprocessable", g.get("quarantined", 0)),
        "gateway_up": ("1 while the listener is up and the store writable", 1.0 if g.get("up") else 0.0),
    }
