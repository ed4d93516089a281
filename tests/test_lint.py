"""ruff and mypy, as pyproject.toml configures them, over the whole repository.

The README's test command runs them through this file, so a finding fails the
suite like any test. Both can fail: a copy of the tree with one planted finding
each is checked too.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool(name: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    exe = BIN / name
    assert exe.exists(), f"{exe} missing: pip install -e '.[test]' (it is in the test extra)"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing_in_the_repository() -> None:
    p = tool("ruff", "check", "--no-cache", "gateway", "tests", "bench")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def test_mypy_finds_nothing_in_the_package() -> None:
    p = tool("mypy", "--no-incremental", "--cache-dir=/dev/null")
    assert p.returncode == 0 and "Success: no issues found" in p.stdout, p.stdout[-4000:] + p.stderr[-2000:]


def test_both_would_catch_a_planted_finding(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "gateway", tmp_path / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "gateway" / "clock.py").open("a") as f:
        f.write("\nimport os\n\n\ndef planted() -> int:\n    return 'not an int'\n")
    ruff = tool("ruff", "check", "--no-cache", "gateway", cwd=tmp_path)
    assert ruff.returncode != 0 and "F401" in ruff.stdout, ruff.stdout[-2000:]
    mypy = tool("mypy", "--no-incremental", "--cache-dir=/dev/null", cwd=tmp_path)
    assert mypy.returncode != 0 and "clock.py" in mypy.stdout and "return-value" in mypy.stdout, mypy.stdout[-2000:]
