"""The shared outside contract check, run against this checkout's `gateway`.

`../shared/contract/check.py` drives the gateway only through CONTRACT.md,
as the acceptance checks do; it must pass in full.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import needs_shared


def test_shared_contract_check_passes() -> None:
    check = needs_shared("contract/check.py", "the shared contract check")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "GATEWAY_BIN": str(Path(bin_dir) / "gateway")}
    env.pop("GATEWAY_CONFIG", None)
    p = subprocess.run([sys.executable, str(check)], capture_output=True, text=True, timeout=300, env=env)
    failing = [line for line in p.stdout.splitlines() if line.startswith("FAIL")]
    assert p.returncode == 0 and not failing, p.stdout[-3000:] + p.stderr[-2000:]
    assert "checks pass" in p.stdout
