"""`serve` under systemd: READY=1 once it listens, STOPPING=1 when it stops."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from conftest import GATEWAY, GatewayProc


def test_serve_notifies_systemd(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    sock_dir = Path(tempfile.mkdtemp())
    path = sock_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(20)
        env = {**os.environ, "NOTIFY_SOCKET": str(path)}
        proc = subprocess.Popen([*GATEWAY, "serve", "--config", str(gw.config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ready = server.recv(4096).decode()
            assert "READY=1" in ready and "STATUS=listening" in ready
            # READY comes only once the listener accepts
            with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as c:
                assert c.recv(3) == b"220"
            proc.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in server.recv(4096).decode()
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_watchdog_pings_when_systemd_asks_for_them(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    path = Path(tempfile.mkdtemp()) / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(20)
        env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
        proc = subprocess.Popen([*GATEWAY, "serve", "--config", str(gw.config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            got = [server.recv(4096).decode() for _ in range(4)]
            assert "READY=1" in got[0] and sum("WATCHDOG=1" in m for m in got) >= 2
        finally:
            proc.terminate()
            assert proc.wait(20) == 0


def test_unit_file_is_type_notify_with_a_watchdog() -> None:
    unit = (Path(__file__).resolve().parents[1] / "config" / "gateway.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "gateway serve" in unit


def test_a_broken_stdout_never_blocks_shutdown(make_gateway: Callable[..., GatewayProc]) -> None:
    """`gateway serve | head -1`, then mail (logged into the closed pipe), then SIGTERM."""
    from conftest import SUPPORT, mail, smtp_send, uniq, wait_banner
    gw = make_gateway()
    proc = subprocess.Popen([*GATEWAY, "serve", "--config", str(gw.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"{")    # `head -1` reads one line ...
        proc.stdout.close()                                # ... and exits
        wait_banner(gw.port, b"220", timeout=20, what="gateway serve")
        for n in range(3):                                 # every line now meets EPIPE
            assert smtp_send(gw.port, mail("pipe@customer.example", SUPPORT, uniq(f"pipe {n}"), "hi"))[0] == 250
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


UNIT = Path(__file__).resolve().parents[1] / "config" / "gateway.service"


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_shipped_unit_is_hardened_and_never_stops_on_reload() -> None:
    s = unit_settings()
    assert s["UMask"] == ["0077"]                    # answers, mail and the database: 0600
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateUsers",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "ProtectClock", "ProtectHostname", "RestrictNamespaces", "RestrictRealtime",
                "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute", "RemoveIPC", "PrivateMounts"):
        assert s.get(key) == ["yes"], key
    assert s["ProtectSystem"] == ["strict"] and s["CapabilityBoundingSet"] == [""]
    assert s["SystemCallFilter"][0] == "@system-service" and s["SystemCallArchitectures"] == ["native"]
    # ExecReload sent TERM: serve stopped with 0 and Restart=on-failure left it down;
    # now it sends HUP, which serve answers by reloading (tests/test_reload.py)
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing (Debian's systemd package)"
    r = subprocess.run([analyze, "security", "--offline=yes", str(UNIT)], capture_output=True,
                       text=True, timeout=60)
    m = re.search(r"Overall exposure level for gateway\.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout
