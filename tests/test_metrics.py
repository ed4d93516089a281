"""Metrics and health of a running `serve`, scraped over HTTP."""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable

from conftest import SUPPORT, GatewayProc, free_port, mail, uniq, wait_for


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def series(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_scrape_counts_mail_tickets_and_deliveries_across_workers(
        make_gateway: Callable[..., GatewayProc]) -> None:
    port = free_port()
    gw = make_gateway(extra_toml=f"[metrics]\nenabled = true\nport = {port}\nprobe_seconds = 0.2\n")
    gw.config.write_text(gw.config.read_text().replace("lmtp = false", "lmtp = false\nworkers = 2"))
    gw.start()
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="healthy")
    idle = socket.create_connection(("127.0.0.1", port))    # connects, never sends a request
    try:
        assert get(port, "/healthz")[0] == 200               # answered beside it (5 s timeout)
    finally:
        idle.close()
    for _ in range(6):                              # new connections: both workers take some
        assert gw.send(mail("m@customer.example", SUPPORT, uniq("count"), "hi"))[0] == 250
    assert gw.send(mail("m@customer.example", "nobody@example.com", "x", "x"))[0] == 550
    gw.sink.wait_to("m@customer.example", count=6)

    def scraped() -> str | None:
        code, text = get(port, "/metrics")
        sent = sum(series(text, "gateway_outbox_deliveries_total").values())
        return text if code == 200 and sent >= 12 else None
    text = wait_for(scraped, what="12 deliveries counted")
    received = series(text, "gateway_mails_received_total")
    assert received['gateway_mails_received_total{answer="250",mailbox="support@example.com"}'] == 6
    assert received['gateway_mails_received_total{answer="550",mailbox="-"}'] == 1
    opened = series(text, "gateway_tickets_opened_total")
    assert opened['gateway_tickets_opened_total{priority="3",region="AMER"}'] == 6
    assert "gateway_tickets_total" not in text       # opened and closed are apart
    info = series(text, "gateway_build_info")
    assert len(info) == 1 and list(info.values()) == [1.0] and 'version="' in next(iter(info))
    assert series(text, "gateway_mail_processing_seconds_count")
    assert "gateway_outbox_depth" in text and "gateway_quarantine_size" in text
    # names per the conventions; no label carries a ticket or a customer address
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert line.startswith("gateway_"), line
            assert "customer.example" not in line and "ticket_id" not in line


def test_healthz_fails_when_the_store_cannot_be_written_and_recovers(
        make_gateway: Callable[..., GatewayProc]) -> None:
    port = free_port()
    gw = make_gateway(extra_toml=f"[metrics]\nenabled = true\nport = {port}\nprobe_seconds = 0.1\n")
    gw.start()
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="healthy")
    if os.geteuid() == 0:
        # root ignores permissions: make the data dir unwritable another way
        probe = gw.data_dir / ".health-probe"
        probe.mkdir()                          # opening it for writing now fails
        try:
            _, body = wait_for(lambda: (r := get(port, "/healthz"))[0] == 503 and r,
                                  what="unhealthy")
            assert "store" in body
        finally:
            probe.rmdir()
    else:  # pragma: no cover - CI runs as root
        gw.data_dir.chmod(0o500)
        try:
            wait_for(lambda: get(port, "/healthz")[0] == 503, what="unhealthy")
        finally:
            gw.data_dir.chmod(0o755)
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="healthy again")
    assert get(port, "/nothing")[0] == 404


def test_metrics_off_by_default(gateway: GatewayProc) -> None:
    assert not (gateway.data_dir / "metrics").exists()


def test_each_event_is_counted_once() -> None:
    from prometheus_client import generate_latest

    from gateway.ops.metrics import Metrics
    m = Metrics()
    # what intake logs for one quarantined mail (gateway/inbound/intake.py)
    m.count(None, "error", {"event": "mail.quarantined", "inbound_id": 1})
    m.count(None, "info", {"event": "mail.processed", "action": "quarantined", "mailbox": SUPPORT})
    m.count(None, "info", {"event": "ticket.status_changed", "old": "resolved", "new": "closed"})
    text = generate_latest(m.registry).decode()
    assert series(text, "gateway_mails_quarantined_total") == {"gateway_mails_quarantined_total": 1.0}
    assert series(text, "gateway_tickets_closed_total") == {"gateway_tickets_closed_total": 1.0}
    assert series(text, "gateway_tickets_reopened_total") == {"gateway_tickets_reopened_total": 0.0}


def test_shipped_alert_rules_pass_promtool_and_name_only_real_metrics() -> None:
    import re
    import shutil
    import subprocess
    from pathlib import Path

    rules = Path(__file__).resolve().parents[1] / "config" / "alerts.yml"
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run tests/system-packages.sh (Debian's prometheus package)"
    r = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in set(re.findall(r"\bgateway_[a-z_]+", rules.read_text())):
        assert f"`{name}`" in readme, f"{name} in config/alerts.yml is no metric of the README"
