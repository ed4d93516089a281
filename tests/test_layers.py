"""The layering of README "How mail flows", as import-linter checks it.

`[tool.importlinter]` in pyproject.toml writes the stages down as contracts:
listeners over the desk over config over outbound over rules and mail, store
and ops beneath, the model and the clock at the bottom; decisions that do no
I/O; no import circle. A change that imports the wrong way fails here.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_imports_follow_the_stages_and_form_no_circle() -> None:
    p = lint_imports()
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout and "3 kept" in p.stdout, p.stdout[-2000:]


def test_a_wrong_way_import_would_be_caught(tmp_path: Path) -> None:
    # The contracts must be able to fail: the same check over a copy of the
    # package where the domain model imports the desk breaks the layers.
    import shutil
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "gateway", copy / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "gateway" / "model.py").open("a") as f:
        f.write("\nimport gateway.desk.pipeline  # noqa\n")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    cmd = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"]
    p = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert p.returncode != 0, p.stdout[-2000:]
    assert "gateway.model -> gateway.desk.pipeline" in p.stdout, p.stdout[-2000:]
