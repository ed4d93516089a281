"""Files under data_dir, named by content hash only.

Attachments live at `attachments/<2 hex>/<sha256>` and large raw mails at
`raw/<2 hex>/<sha256>.eml`: the name never comes from the sender, so no file
name (`../../etc/passwd`, `C:\\x`, NUL bytes) can choose where bytes land,
and the same content is stored once. Each file is written to a temporary
name, fsynced and renamed before the database row that names it commits.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def write_atomic(target: Path, content: bytes) -> None:
    """`target` holds `content`, durably, for our user only (0600: mkstemp's mode),
    replaced atomically: a reader sees the old file or the new one, never a part.
    Written to a temporary name beside it, fsynced, renamed, the folder fsynced."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Blobs:
    def __init__(self, data_dir: Path):
        self.root = data_dir

    def path(self, kind: str, sha256: str, suffix: str = "") -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / kind / sha256[:2] / f"{sha256}{suffix}"

    def put(self, kind: str, content: bytes, suffix: str = "", sha256: str | None = None) -> Path:
        digest = sha256 or hashlib.sha256(content).hexdigest()
        target = self.path(kind, digest, suffix)
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, content)
        return target

    def read(self, kind: str, sha256: str, suffix: str = "") -> bytes:
        return self.path(kind, sha256, suffix).read_bytes()
