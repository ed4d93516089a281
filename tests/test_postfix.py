"""Behind a real Postfix (Debian's postfix 3.7), started here per RECIPES.md §2.

Mail is submitted by SMTP to Postfix, which delivers it to the gateway
(a) over LMTP to `gateway serve` with `lmtp = true`, or
(b) through pipe(8) running `gateway ingest --recipient ${recipient}`,
exactly as the README's "Behind Postfix" section configures it. When the
gateway cannot store the mail (its database is locked: `451 4.3.0`, exit 75)
Postfix keeps it deferred, and `postqueue -f` delivers it once the gateway
can take it again.

pipe(8) runs the command as `nobody`, who cannot run the pyenv Python under
/root: the tests build a venv with Debian's /usr/bin/python3 under /var/tmp,
once per machine and dependency set, and copy the current `gateway` package
into it at the start of every session.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pg
import pytest
from conftest import SUPPORT, GatewayProc, free_port, mail, smtp_send, uniq, wait_banner, wait_for

REPO = Path(__file__).resolve().parents[1]
VENV_CACHE = Path("/var/tmp/gw-test-pipe-venv")


# -- a private Postfix ----------------------------------------------------------

class Postfix:
    def __init__(self, transport: str, master_extra: str = "", main_extra: str = ""):
        """`main_extra` lines come after the defaults in main.cf (the later one wins)."""
        self.dir = Path(tempfile.mkdtemp(prefix="gw-postfix-"))
        os.chmod(self.dir, 0o755)
        self.etc = self.dir / "etc"
        for sub in ("etc", "spool", "data"):
            (self.dir / sub).mkdir()
        shutil.chown(self.dir / "data", "postfix")
        self.port = free_port()
        (self.etc / "main.cf").write_text(textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {self.dir}/spool
            data_directory = {self.dir}/data
            mail_owner = postfix
            setgid_group = postdrop
            maillog_file = {self.dir}/postfix.log
            maillog_file_prefixes = {self.dir}
            myhostname = mx.test.invalid
            mydestination =
            local_recipient_maps =
            alias_maps =
            alias_database =
            inet_interfaces = 127.0.0.1
            inet_protocols = ipv4
            mynetworks = 127.0.0.0/8
            smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
            relay_domains = example.com, examplegov.com
            transport_maps = inline:{{ support@example.com={transport}, support@examplegov.com={transport} }}
            default_transport = error:5.7.0 no outbound mail from the test MTA
            gateway_destination_recipient_limit = 1
            """) + main_extra)
        (self.etc / "master.cf").write_text(textwrap.dedent(f"""\
            127.0.0.1:{self.port} inet n - n - - smtpd
            pickup    unix  n - n 60 1 pickup
            cleanup   unix  n - n -  0 cleanup
            qmgr      unix  n - n 300 1 qmgr
            rewrite   unix  - - n -  - trivial-rewrite
            bounce    unix  - - n -  0 bounce
            defer     unix  - - n -  0 bounce
            trace     unix  - - n -  0 bounce
            verify    unix  - - n -  1 verify
            flush     unix  n - n 1000? 0 flush
            proxymap  unix  - - n -  - proxymap
            showq     unix  n - n -  - showq
            error     unix  - - n -  - error
            retry     unix  - - n -  - error
            discard   unix  - - n -  - discard
            smtp      unix  - - n -  - smtp
            lmtp      unix  - - n -  - lmtp
            anvil     unix  - - n -  1 anvil
            scache    unix  - - n -  1 scache
            postlog   unix-dgram n - n - 1 postlogd
            """) + master_extra)
        # Postfix re-reads a main.cf younger than ~2 s in 300 ms naps (RECIPES.md)
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.etc / name, (past, past))

    def start(self) -> None:
        subprocess.run(["postfix", "-c", str(self.etc), "start"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # `postfix start` daemonizes: there is no process of ours to watch, only the log
        try:
            wait_banner(self.port, b"220", what="postfix")
        except AssertionError as e:
            raise AssertionError(f"postfix did not start: {self.log()[-1500:]}") from e

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], check=False, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def log(self) -> str:
        path = self.dir / "postfix.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def queue(self) -> list[dict[str, Any]]:
        """`postqueue -j`: one JSON object per queued message."""
        out = subprocess.run(["postqueue", "-c", str(self.etc), "-j"], capture_output=True, text=True,
                             check=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.etc), "-f"], check=True)

    def deferred(self) -> list[str]:
        """The delay reasons of the deferred messages."""
        return [r.get("delay_reason", "") for m in self.queue() if m.get("queue_name") == "deferred"
                for r in m.get("recipients", [])]


@pytest.fixture
def postfixes() -> Iterator[list[Postfix]]:
    made: list[Postfix] = []
    yield made
    for p in made:
        p.stop()
        shutil.rmtree(p.dir, ignore_errors=True)


# -- (a) LMTP to `gateway serve` --------------------------------------------------

def test_postfix_delivers_over_lmtp_and_retries_after_a_451(
        make_gateway: Callable[..., GatewayProc], postfixes: list[Postfix]) -> None:
    gw = make_gateway(lmtp=True, extra_toml="[store]\nbusy_timeout_ms = 200\n")
    gw.start()                      # LMTP greets with 220 too (RFC 2033 §4)
    pf = Postfix(f"lmtp:inet:127.0.0.1:{gw.port}")
    postfixes.append(pf)
    pf.start()

    first = uniq("Backup fails via Postfix")
    assert smtp_send(pf.port, mail("Ann <ann@customer.example>", SUPPORT, first, "It fails."))[0] == 250
    ticket = wait_for(lambda: [t for t in gw.tickets() if t["subject"] == first], 15, "the LMTP ticket")[0]
    shown = gw.ticket(ticket["id"])
    assert shown["messages"][0]["from"] == "ann@customer.example"
    wait_for(lambda: not pf.queue(), 15, "Postfix to finish the delivery")

    # the gateway cannot store the mail: 451 4.3.0 over LMTP, Postfix defers it
    lock = pg.WriteLock(gw.db_url)
    second = uniq("Deferred by the gateway")
    try:
        assert smtp_send(pf.port, mail("Bob <bob@customer.example>", SUPPORT, second, "Later."))[0] == 250
        reasons = wait_for(lambda: pf.deferred(), 15, "a deferred message")
        assert any("451 4.3.0" in r for r in reasons), reasons
    finally:
        lock.release()
    pf.flush()
    wait_for(lambda: not pf.queue(), 15, "the queue to empty after postqueue -f")
    assert [t for t in gw.tickets() if t["subject"] == second]


# -- (b) pipe(8) running `gateway ingest` ------------------------------------------

@pytest.fixture(scope="session")
def pipe_venv() -> Path:
    """A venv of Debian's Python that `nobody` can run, holding this checkout's gateway
    and the same packages, at the same versions, as the venv running the tests."""
    deps = installed_packages()
    key = hashlib.sha256(json.dumps(sorted(deps)).encode()).hexdigest()[:12]
    venv = VENV_CACHE / key
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    os.chmod(VENV_CACHE, 0o755)
    with open(VENV_CACHE / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # two sessions at once build it once
        if not (venv / "ready").exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check",
                            *deps], check=True)
            (venv / "ready").touch()
        # this checkout's code, fresh for every session (no build needed for that)
        site = next((venv / "lib").glob("python3*/site-packages"))
        shutil.rmtree(site / "gateway", ignore_errors=True)
        shutil.copytree(REPO / "gateway", site / "gateway",
                        ignore=shutil.ignore_patterns("__pycache__"))
        script = venv / "bin/gateway"
        script.write_text(f"#!{venv}/bin/python\nimport sys\nfrom gateway.entry import main\n"
                          "sys.exit(main())\n")
        script.chmod(0o755)
    return venv


def installed_packages() -> list[str]:
    """`pip freeze` of the test venv, without the project itself (copied in, not installed)."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable",
                          "--disable-pip-version-check"], capture_output=True, text=True, check=True).stdout
    return sorted(line for line in out.splitlines()
                  if line and not line.startswith(("-e", "#")) and " @ " not in line
                  and not line.lower().startswith("support-gateway"))


def pipe_config(root: Path, store_url: str | None, *, nobody_owns_data: bool = True,
                store_extra: str = "", extra: str = "") -> tuple[Path, str]:
    """The config of a `gateway ingest` that Postfix's pipe runs as nobody, and its
    store's url: a data_dir under `root` (nobody's when `nobody_owns_data`),
    Maildir answers, the store at `store_url` (else the data_dir's SQLite file)."""
    os.chmod(root, 0o755)
    data = root / "data"
    data.mkdir()
    if nobody_owns_data:
        shutil.chown(data, "nobody", "nogroup")
    url = store_url or f"sqlite:///{data / 'gateway.db'}"
    config = root / "gateway.toml"
    config.write_text(textwrap.dedent(f"""\
        [gateway]
        data_dir = "{data}"
        [[mailbox]]
        address = "{SUPPORT}"
        [outbound]
        transport = "maildir"
        [store]
        url = "{url}"
        """) + store_extra + extra)
    return config, url


def piped_postfix(postfixes: list[Postfix], command: str) -> Postfix:
    """A started Postfix that pipes mail for the support address to `command`, as nobody."""
    pf = Postfix("gateway:", textwrap.dedent(f"""\
        gateway   unix  - n n -  - pipe
          flags=DRq user=nobody null_sender= argv={command} --recipient ${{recipient}} --sender=${{sender}}
        """))
    postfixes.append(pf)
    pf.start()
    return pf


def test_postfix_pipes_to_gateway_ingest_and_retries_after_exit_75(
        pipe_venv: Path, postfixes: list[Postfix]) -> None:
    root = Path(tempfile.mkdtemp(prefix="gw-pipe-"))
    config, store_url = pipe_config(root, pg.store_url(), store_extra="busy_timeout_ms = 200\n")
    pf = piped_postfix(postfixes, f"{pipe_venv}/bin/gateway ingest --config {config}")

    def tickets() -> list[dict[str, Any]]:
        p = subprocess.run(["runuser", "-u", "nobody", "--", f"{pipe_venv}/bin/gateway", "tickets",
                            "list", "--json", "--config", str(config)], capture_output=True, text=True)
        if p.returncode == 66 and "no database at" in p.stderr:
            return []           # the first ingest has not created it yet (read-only commands never do)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    try:
        first = uniq("Piped to ingest")
        assert smtp_send(pf.port, mail("Ann <ann@customer.example>", SUPPORT, first, "Via pipe."))[0] == 250
        try:
            wait_for(lambda: [t for t in tickets() if t["subject"] == first], 20, "the piped ticket")
        except AssertionError:
            raise AssertionError(f"not delivered; postfix log:\n{pf.log()[-2000:]}") from None
        wait_for(lambda: not pf.queue(), 20, "Postfix to finish the delivery")   # ingest exits after it

        lock = pg.WriteLock(store_url, user="nobody", python=f"{pipe_venv}/bin/python")
        second = uniq("Deferred by ingest")
        try:
            assert smtp_send(pf.port, mail("Bob <bob@customer.example>", SUPPORT, second, "Later."))[0] == 250
            reasons = wait_for(lambda: pf.deferred(), 20, "a deferred message")
            assert any("temporary failure" in r for r in reasons), reasons     # exit 75
        finally:
            lock.release()
        pf.flush()
        wait_for(lambda: not pf.queue(), 20, "the queue to empty after postqueue -f")
        assert [t for t in tickets() if t["subject"] == second]
        # the null sender (a bounce) reaches ingest as --sender= and makes no ticket
        bounce = mail("MAILER-DAEMON <mailer-daemon@mx.other.example>", SUPPORT,
                      "Undelivered Mail Returned to Sender", "gone")
        assert smtp_send(pf.port, bounce, mail_from="")[0] == 250
        wait_for(lambda: pf.log().count("status=sent") == 3, 20, "the bounce to be delivered")
        assert len(tickets()) == 2
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- ingest: a local fault defers the mail, never bounces it ---------------------------

BROKEN_INSTALL = "raise ImportError('structlog: broken install (test)')\n"


@pytest.mark.parametrize("fault", ["usage", "config", "import", "store"])
def test_a_local_fault_of_ingest_defers_the_mail_in_postfix(
        fault: str, pipe_venv: Path, postfixes: list[Postfix]) -> None:
    """usage error (argparse: 2), bad config (78), an import that fails, a store that
    cannot be opened: each exits 75, and Postfix keeps the mail deferred."""
    root = Path(tempfile.mkdtemp(prefix="gw-pipe-fault-"))
    # store: data_dir stays root's, so nobody cannot write the database
    config, _ = pipe_config(root, None, nobody_owns_data=fault != "store",
                         extra='[smtp]\nport = "not a port"\n' if fault == "config" else "")
    prefix, extra = "", ""
    if fault == "usage":
        extra = " --no-such-option"
    if fault == "import":
        broken = root / "broken"
        broken.mkdir()
        (broken / "structlog.py").write_text(BROKEN_INSTALL)
        prefix = f"/usr/bin/env PYTHONPATH={broken} "
    pf = piped_postfix(postfixes, f"{prefix}{pipe_venv}/bin/gateway ingest --config {config}{extra}")
    try:
        subject = uniq(f"Deferred on a {fault} fault")
        assert smtp_send(pf.port, mail("Ann <ann@customer.example>", SUPPORT, subject, "Keep me."))[0] == 250
        try:
            reasons = wait_for(lambda: pf.deferred(), 20, "a deferred message")
        except AssertionError:
            raise AssertionError(f"not deferred; postfix log:\n{pf.log()[-2000:]}") from None
        assert any("temporary failure" in r for r in reasons), reasons     # exit 75
        assert "status=bounced" not in pf.log()
        assert [m["queue_name"] for m in pf.queue()] == ["deferred"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
