"""The `gateway` console script: `gateway.cli.main` behind a guard for `ingest`.

An MTA's pipe transport bounces the mail back to the customer on any exit
status but 75 (EX_TEMPFAIL, "try again later") and 0. So for `gateway ingest`
every fault of this machine -- a usage error (argparse exits 2), a bad
configuration (78), a broken install (an import that fails), a store that
cannot be reached, a bug -- exits 75 and the MTA keeps the mail queued.
Only a fault of the mail itself (65 EX_DATAERR, 67 EX_NOUSER) may bounce.

This module imports nothing of the gateway at load time, so an install
whose code cannot be imported still defers instead of bouncing.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

EX_TEMPFAIL = 75
# what `ingest` may answer: accepted, and the mail's own permanent faults
INGEST_KEEPS = frozenset({0, 65, 67, EX_TEMPFAIL})


def is_ingest(argv: Sequence[str]) -> bool:
    """True when the sub-command is `ingest` (options before it skipped)."""
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--config":
            rest = rest[1:]
        elif not arg.startswith("-"):
            return arg == "ingest"
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not is_ingest(args):
        from gateway.cli import main as cli_main
        return cli_main(args)
    try:
        from gateway.cli import main as cli_main
        status = cli_main(args)
    except SystemExit as e:       # argparse: 2 on a usage error, 0 on --help
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if status != 0 and status not in INGEST_KEEPS:
            print("gateway: ingest: usage error (exit 75 so the MTA retries)", file=sys.stderr)
    except BaseException as e:  # noqa: BLE001 - an import error or a bug: defer, never bounce
        print(f"gateway: ingest failed, try again later: {type(e).__name__}: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    if status not in INGEST_KEEPS:
        print(f"gateway: ingest: local fault (status {status}) answered as 75 so the MTA retries",
              file=sys.stderr)
        return EX_TEMPFAIL
    return status
