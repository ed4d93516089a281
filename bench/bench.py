"""Ingest benchmark: a real `gateway serve` against a bare aiosmtpd server.

    python bench/bench.py [--mails 5000] [--clients 8] [--store-tickets 0]
    python bench/bench.py --memory        # 20 concurrent 20 MB mails
    python bench/bench.py --store postgresql --instances 3

Starts `gateway serve` on a temp data dir with a real SMTP sink as its relay,
sends N mails from K concurrent SMTP connections (about 60 % new tickets,
20 % replies by subject tag, 20 % replies by In-Reply-To to our
acknowledgements, 1 in 25 with a 40 KB attachment), and prints one JSON line:
accepted mails/s, SMTP transaction latency percentiles, seconds until every
acknowledgement reached the sink, the gateway's peak RSS, and the same load
against a bare aiosmtpd server (accept and discard) started in the same run,
with the ratio. `--store-tickets N` first fills the store with N tickets.

`--store` picks the database: `sqlite` (the default, a file in the temp data
dir), `postgresql` (a throwaway cluster from Debian's postgresql package,
started and removed by the bench, as the tests do: tests/pg.py), or a
`postgresql://` URL of a database of yours (its tables are left behind).
`--instances N` starts N `gateway serve` processes on the one store, each
with its own port and data dir, as on N hosts; the clients are spread over
them (client k talks to instance k mod N).

    python bench/bench.py --smtp-source [--mails 3000] [--sessions 8] [--chunks 6]

drives the gateway with Postfix's C load generator `smtp-source` (8
sessions, a new connection per mail, 2 KB mails from one sender, each a new
ticket) with Postfix's `smtp-sink` as its relay, then the same load against a
bare aiosmtpd server and against `smtp-sink` itself, in the same run, and
prints one JSON line: mails/s of each, the ratio to bare aiosmtpd, the
gateway's CPU ms per mail overall and per chunk of the run (`--chunks`: a
cost that grows with the sender's history shows as a rising column), its
peak RSS, and the ack latency: probe mails sent by a Python client during
the load, from the 250 to the ack's arrival at the relay (p50/p99). `--caps
default` keeps the loop caps (one sender gets 10 acks and 30 tickets an
hour; the rest is quarantined), the default `raised` lifts them so that every
mail is ticketed and answered.
"""
from __future__ import annotations

import argparse
import base64
import email
import email.policy
import json
import os
import platform
import random
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from aiosmtpd.controller import Controller

SUPPORT = "support@example.com"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    """The relay: counts acknowledgements and keeps their Message-IDs per customer."""

    def __init__(self) -> None:
        self.acks: dict[str, str] = {}        # customer -> Message-ID of the ack
        self.tags: dict[str, int] = {}        # customer -> ticket id
        self.count = 0
        self.lock = threading.Lock()
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
                msg = email.message_from_bytes(envelope.original_content, policy=email.policy.compat32)
                with sink.lock:
                    sink.count += 1
                    if msg.get("Auto-Submitted", "").startswith("auto-replied"):
                        rcpt = envelope.rcpt_tos[0].lower()
                        sink.acks[rcpt] = msg["Message-ID"]
                        sink.tags[rcpt] = int(msg["X-Support-Ticket"])
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()


class Discard:
    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        return "250 OK"


def build_mails(n: int, seed: int = 7) -> list[tuple[str, str]]:
    """(kind, customer) per mail: the reply kinds refer to earlier customers."""
    rnd = random.Random(seed)
    plan: list[tuple[str, str]] = []
    customers: list[str] = []
    for i in range(n):
        r = rnd.random()
        if customers and r < 0.2:
            plan.append(("tag", rnd.choice(customers)))
        elif customers and r < 0.4:
            plan.append(("in-reply-to", rnd.choice(customers)))
        else:
            c = f"customer{i}@client{i % 97}.example"
            customers.append(c)
            plan.append(("new", c))
    return plan


BODY = ("Hello support,\r\n\r\n" + "our nightly backup of the mailbox fails since Monday.\r\n" * 12
        + "\r\nRegards\r\n")
ATTACHMENT = base64.encodebytes(os.urandom(30_000)).replace(b"\n", b"\r\n")


def render(kind: str, customer: str, i: int, sink: Sink | None) -> bytes:
    """One mail as bytes, built by string formatting: the client must spend as
    little CPU as it can, since it shares the machine with the server."""
    subject = f"Backup job {i} fails with error 0x8004{i % 10000:04d}"
    thread = ""
    if sink is not None and kind != "new":
        with sink.lock:
            tid, ack = sink.tags.get(customer), sink.acks.get(customer)
        if kind == "tag" and tid:
            subject = f"Re: [Support #{tid}] {subject}"
        elif kind == "in-reply-to" and ack:
            thread = f"In-Reply-To: {ack}\r\nReferences: {ack}\r\n"
            subject = "Re: " + subject
    head = (f"From: Customer {i} <{customer}>\r\nTo: {SUPPORT}\r\nDate: {formatdate()}\r\n"
            f"Message-ID: <{i}.{random.getrandbits(64):x}@bench.example>\r\n{thread}"
            f"Subject: {subject}\r\nMIME-Version: 1.0\r\n")
    if i % 25:
        return (head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + BODY + customer + "\r\n").encode()
    return (head + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            "Content-Type: text/plain; charset=utf-8\r\n\r\n" + BODY + "\r\n--b\r\n"
            f'Content-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="log-{i}.bin"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n").encode() + ATTACHMENT + b"\r\n--b--\r\n"


def load(ports: int | list[int], plan: list[tuple[str, str]], clients: int,
         sink: Sink | None) -> dict[str, float]:
    """Send the plan from `clients` threads, one SMTP connection each (client k
    to port k mod len(ports))."""
    ports = [ports] if isinstance(ports, int) else ports
    latencies: list[float] = []
    errors: list[str] = []
    next_i = iter(range(len(plan)))
    lock = threading.Lock()

    ready = {i: render(k, c, i, None) for i, (k, c) in enumerate(plan) if k == "new" or sink is None}

    def worker(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            while True:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                kind, customer = plan[i]
                raw = ready.pop(i, None) or render(kind, customer, i, sink)
                t = time.perf_counter()
                try:
                    s.sendmail(customer, [SUPPORT], raw)
                except smtplib.SMTPException as e:
                    errors.append(repr(e))
                    continue
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker, args=(ports[k % len(ports)],)) for k in range(clients)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000, 2)
    return {"accepted": len(latencies), "errors": len(errors), "seconds": round(elapsed, 2),
            "mails_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": pct(0.5), "p95_ms": pct(0.95), "p99_ms": pct(0.99)}


def bare_aiosmtpd(plan: list[tuple[str, str]], clients: int, size: int) -> dict[str, float]:
    port = free_port()
    c = Controller(Discard(), hostname="127.0.0.1", port=port, data_size_limit=size)
    c.start()
    try:
        return load(port, plan, clients, None)
    finally:
        c.stop()


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    pids += process_tree(int(child))
    except FileNotFoundError:
        pass
    return pids


def _proc(pid: int, name: str) -> str:
    """/proc/PID/NAME, or "" once the process is gone."""
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except FileNotFoundError:
        return ""


def rss_kb(pid: int) -> int:
    """Peak resident memory (VmHWM) of a process and all its descendants."""
    return sum(next((int(line.split()[1]) for line in _proc(p, "status").splitlines()
                     if line.startswith("VmHWM:")), 0) for p in process_tree(pid))


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its descendants."""
    ticks = 0
    for p in process_tree(pid):
        stat = _proc(p, "stat")
        if stat:
            fields = stat.rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])       # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def write_config(tmp: Path, port: int, relay_port: int, size: int, store: str, workers: int = 0) -> Path:
    cfg = tmp / "gateway.toml"
    cfg.write_text(textwrap.dedent(f"""
        [gateway]
        data_dir = "{tmp / 'data'}"
        [smtp]
        host = "127.0.0.1"
        port = {port}
        max_message_size = {size}
        workers = {workers}
        [[mailbox]]
        address = "{SUPPORT}"
        [outbound]
        transport = "smtp"
        host = "127.0.0.1"
        port = {relay_port}
        poll_seconds = 0.5
        [staff]
        addresses = ["agent@staff.example.com"]
        [store]
        url = "{store}"
        """))
    return cfg


def listening(port: int, seconds: float) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port` within `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def start_gateway(cfg: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:        # the child has its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "LOG_LEVEL": "warning"})
    if not listening(port, 30):
        raise RuntimeError("gateway serve did not start: " + log.read_text()[-2000:])
    return proc


def prefill(cfg: Path, n: int) -> None:
    """Fill the store with `n` tickets (each with a message) through the store itself."""
    code = textwrap.dedent(f"""
        import asyncio
        from datetime import UTC, datetime
        from gateway.config import load
        from gateway.store import Store
        async def main():
            c = load({str(cfg)!r})
            s = await Store.open(c.store_url)
            from datetime import timedelta
            start_at = datetime.now(UTC) - timedelta(days=365)
            for start in range(0, {n}, 5000):
                async with s.transaction() as tx:
                    for i in range(start, min({n}, start + 5000)):
                        now = start_at + timedelta(minutes=5 * i)     # a year of tickets
                        t = (await tx.create_ticket(subject=f"old {{i}}", requester=f"old{{i}}@x.example",
                            cc=(), region="EMEA", govcloud=False, priority=3, mailbox="{SUPPORT}",
                            linked_ticket=None, now=now)).id
                        await tx.add_message(ticket_id=t, direction="in", kind="customer",
                            sender=f"old{{i}}@x.example", recipients=["{SUPPORT}"], subject="old",
                            message_id=f"<old{{i}}@x.example>", body_text="old", reply_text="old", now=now)
            await s.close()
        asyncio.run(main())
        """)
    subprocess.run([sys.executable, "-c", code], check=True)


def store_url(args: argparse.Namespace, tmp: Path) -> tuple[str, object]:
    """The `[store] url` to bench, and the throwaway cluster to stop after (or None)."""
    if args.store == "sqlite":
        return f"sqlite:///{tmp / 'data' / 'gateway.db'}", None
    if args.store == "postgresql":
        sys.path.insert(0, str(ROOT / "tests"))
        import pg  # tests/pg.py: a throwaway cluster, as the tests start it
        cluster = pg.Cluster(durable=True)
        cluster.start()
        return cluster.new_database(), cluster
    return args.store, None


def run(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    size = 26_214_400
    sink = Sink()
    url, cluster = store_url(args, tmp)
    ports = [free_port() for _ in range(args.instances)]
    cfgs = []
    for n, port in enumerate(ports):
        (tmp / f"i{n}").mkdir()
        cfgs.append(write_config(tmp / f"i{n}", port, sink.port, size, url, args.workers))
    if args.store_tickets:
        prefill(cfgs[0], args.store_tickets)
    procs = []
    for n, (cfg, port) in enumerate(zip(cfgs, ports, strict=True)):
        procs.append(start_gateway(cfg, port, tmp / f"serve{n}.log"))
        if n == 0:
            time.sleep(0.5)     # the first one migrates the schema; the others find it done
    plan = build_mails(args.mails)
    new_customers = {c for k, c in plan if k == "new"}
    try:
        cpu0 = sum(cpu_s(proc.pid) for proc in procs)
        t0 = time.perf_counter()
        gw = load(ports, plan, args.clients, sink)
        sent_done = time.perf_counter()
        deadline = sent_done + 120
        while time.perf_counter() < deadline:
            with sink.lock:
                if new_customers <= set(sink.acks):
                    break
            time.sleep(0.05)
        acks_after = round(time.perf_counter() - sent_done, 2)
        with sink.lock:
            acked = len(new_customers & set(sink.acks))
        peak = max(rss_kb(proc.pid) for proc in procs)
        cpu = sum(cpu_s(proc.pid) for proc in procs) - cpu0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        sink.controller.stop()
        if cluster is not None:
            cluster.stop()      # type: ignore[attr-defined]
        shutil.rmtree(tmp, ignore_errors=True)
    bare = bare_aiosmtpd(plan, args.clients, size)
    return {
        "bench": "ingest", "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}",
        "mails": args.mails, "clients": args.clients, "store_tickets": args.store_tickets,
        "workers": args.workers, "store": url.split(":", 1)[0], "instances": args.instances,
        "gateway": gw, "acks_expected": len(new_customers), "acks_delivered": acked,
        "acks_delivered_s_after_last_mail": acks_after, "total_s": round(time.perf_counter() - t0, 2),
        "gateway_peak_rss_mb": round(peak / 1024, 1),
        # what one mail costs the gateway in CPU (intake, answers, deliveries): one
        # process can take at most about 1000 / this many mails per second
        "gateway_cpu_ms_per_mail": round(cpu * 1000 / max(gw["accepted"], 1), 2),
        "bare_aiosmtpd": bare,
        "ratio_to_bare": round(gw["mails_per_s"] / bare["mails_per_s"], 3),
    }


RAISED_CAPS = """
[limits]
auto_answers_per_sender_per_hour = 100000000
auto_answers_per_domain_per_hour = 100000000
new_tickets_per_sender_per_hour = 100000000
new_tickets_per_domain_per_hour = 100000000
"""


def smtp_sink(port: int, dump: Path | None) -> subprocess.Popen[bytes]:
    """Postfix's `smtp-sink` on `port`: accepts and discards, or with `dump`
    writes each mail to a file of its own there (its mtime: when it arrived)."""
    cmd = ["smtp-sink"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]              # required when started as root
    if dump is not None:
        dump.mkdir(mode=0o777)
        dump.chmod(0o777)                    # smtp-sink writes as nobody
        cmd += ["-d", f"{dump}/%H%M%S."]
    proc = subprocess.Popen([*cmd, f"127.0.0.1:{port}", "1024"], stdout=subprocess.DEVNULL)
    if not listening(port, 10):
        raise RuntimeError("smtp-sink did not start")
    return proc


def smtp_source(port: int, mails: int, sessions: int, size: int, sender: str) -> dict[str, float]:
    """`smtp-source`'s load on `port`: a new connection per mail, `sessions` at once."""
    t = time.perf_counter()
    p = subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(mails), "-l", str(size),
                        "-f", sender, "-t", SUPPORT, "-S", "backup fails", f"127.0.0.1:{port}"],
                       check=False, capture_output=True, timeout=3600)
    elapsed = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({p.returncode}): {p.stderr.decode()[-500:]}")
    return {"mails": mails, "seconds": round(elapsed, 2), "mails_per_s": round(mails / elapsed, 1)}


class Probe:
    """Mails from distinct probe customers, one every `every` seconds, sent by
    a Python client during a load: the wall-clock time of each 250."""

    def __init__(self, port: int, every: float = 0.2):
        self.port, self.every = port, every
        self.accepted: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.wait(self.every):
            msg = (f"From: probe{i}@probe.example\r\nTo: {SUPPORT}\r\nSubject: probe {i}\r\n"
                   f"Message-ID: <probe{i}.{time.time_ns()}@probe.example>\r\n\r\nIs it there?\r\n").encode()
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as s:
                    s.sendmail(f"probe{i}@probe.example", [SUPPORT], msg)
                self.accepted[i] = time.time()
            except (OSError, smtplib.SMTPException):
                pass
            i += 1

    def latencies(self, dump: Path) -> list[float]:
        """Seconds from each probe's 250 to its ack's arrival in the relay's dump."""
        out = []
        for f in dump.iterdir():
            head = f.read_bytes()[:400]
            m = re.search(rb"X-Rcpt-Args: <probe(\d+)@probe\.example>", head)
            if m and int(m.group(1)) in self.accepted:
                out.append(f.stat().st_mtime - self.accepted[int(m.group(1))])
        return sorted(out)


def smtp_source_run(args: argparse.Namespace) -> dict[str, object]:
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} not found: install Debian's postfix package "
                             "(tests/system-packages.sh does)")
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-src-"))
    tmp.chmod(0o755)
    size = 26_214_400
    relay_port, port = free_port(), free_port()
    dump = tmp / "relay"
    relay = smtp_sink(relay_port, dump)
    cfg = write_config(tmp, port, relay_port, size, f"sqlite:///{tmp / 'data' / 'gateway.db'}", args.workers)
    # smtp-source sends one subject from one sender: each mail is still a new
    # problem here, not "one ticket per problem" joining the first (issue 17)
    cfg.write_text(cfg.read_text() + "[threading]\nsame_problem_hours = 0\n"
                   + (RAISED_CAPS if args.caps == "raised" else ""))
    if args.store_tickets:
        prefill(cfg, args.store_tickets)
    proc = start_gateway(cfg, port, tmp / "serve.log")
    sender = "load@customer.example"
    chunks = []
    probe = Probe(port)
    try:
        cpu0 = cpu_s(proc.pid)
        t0 = time.perf_counter()
        probe.thread.start()
        per_chunk = max(1, args.mails // args.chunks)
        sent = 0
        while sent < args.mails:
            n = min(per_chunk, args.mails - sent)
            c0 = cpu_s(proc.pid)
            run_ = smtp_source(port, n, args.sessions, args.size, sender)
            sent += n
            chunks.append({"up_to": sent, "mails_per_s": run_["mails_per_s"],
                           "cpu_ms_per_mail": round((cpu_s(proc.pid) - c0) * 1000 / n, 2)})
        load_s = time.perf_counter() - t0
        probe.stop.set()
        probe.thread.join(60)
        # each ticket gets an ack and a staff notification (with the caps raised)
        expected = 2 * (sent + len(probe.accepted)) if args.caps == "raised" else None
        deadline = time.perf_counter() + 300
        while expected is not None and time.perf_counter() < deadline:
            if sum(1 for _ in dump.iterdir()) >= expected:
                break
            time.sleep(0.1)
        drained_s = time.perf_counter() - t0
        delivered = sum(1 for _ in dump.iterdir())
        cpu = cpu_s(proc.pid) - cpu0
        peak = rss_kb(proc.pid)
        lat = probe.latencies(dump)
    finally:
        probe.stop.set()
        proc.terminate()
        proc.wait(30)
        relay.terminate()
        relay.wait(10)
    total = sent + len(probe.accepted)
    bare_port = free_port()
    c = Controller(Discard(), hostname="127.0.0.1", port=bare_port, data_size_limit=size)
    c.start()
    try:
        bare = smtp_source(bare_port, args.mails, args.sessions, args.size, sender)
    finally:
        c.stop()
    sink_port = free_port()
    plain_sink = smtp_sink(sink_port, None)
    try:
        sink_only = smtp_source(sink_port, args.mails, args.sessions, args.size, sender)
    finally:
        plain_sink.terminate()
        plain_sink.wait(10)
    shutil.rmtree(tmp, ignore_errors=True)
    gw_rate = round(sent / load_s, 1)

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(len(lat) * p))], 3) if lat else None
    return {
        "bench": "smtp-source", "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}",
        "mails": sent, "sessions": args.sessions, "size": args.size, "caps": args.caps,
        "store_tickets": args.store_tickets, "workers": args.workers,
        "gateway_mails_per_s": gw_rate, "bare_aiosmtpd_mails_per_s": bare["mails_per_s"],
        "smtp_sink_mails_per_s": sink_only["mails_per_s"],
        "ratio_to_bare": round(gw_rate / bare["mails_per_s"], 3),
        "gateway_cpu_ms_per_mail": round(cpu * 1000 / max(total, 1), 2), "chunks": chunks,
        "relay_received": delivered, "relay_expected": expected, "drained_s": round(drained_s, 2),
        "probes": len(probe.accepted), "ack_latency_p50_s": pct(0.5), "ack_latency_p99_s": pct(0.99),
        "gateway_peak_rss_mb": round(peak / 1024, 1),
    }


def memory_run(args: argparse.Namespace) -> dict[str, object]:
    """20 concurrent 20 MB mails: peak RSS of the gateway."""
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-mem-"))
    sink = Sink()
    port = free_port()
    cfg = write_config(tmp, port, sink.port, 26_214_400, f"sqlite:///{tmp / 'data' / 'gateway.db'}")
    proc = start_gateway(cfg, port, tmp / "serve.log")
    blob = os.urandom(20 * 1024 * 1024 * 3 // 4)          # 15 MB of bytes: 20 MB base64 on the wire
    results: list[float] = []

    def one(i: int) -> None:
        m = EmailMessage(policy=email.policy.SMTP)
        m["From"], m["To"], m["Subject"] = f"big{i}@c.example", SUPPORT, f"big {i}"
        m["Message-ID"] = make_msgid(domain="bench.example")
        m.set_content("see attachment")
        m.add_attachment(blob, maintype="application", subtype="octet-stream", filename="dump.bin")
        raw = m.as_bytes()
        t = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", port, timeout=300) as s:
            s.sendmail(f"big{i}@c.example", [SUPPORT], raw)
        results.append(time.perf_counter() - t)

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.memory_mails)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        peak = rss_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
        sink.controller.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"bench": "memory", "date": time.strftime("%Y-%m-%d"), "mails": args.memory_mails,
            "mail_mb": round(len(blob) * 4 / 3 / 1024 / 1024, 1), "accepted": len(results),
            "seconds": round(time.perf_counter() - t0, 2),
            "gateway_peak_rss_mb": round(peak / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mails", type=int, default=5000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--store-tickets", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="[smtp] workers (the gateway's default: 1)")
    p.add_argument("--memory", action="store_true", help="the 20 x 20 MB memory run")
    p.add_argument("--memory-mails", type=int, default=20)
    p.add_argument("--store", default="sqlite",
                   help="sqlite (default) | postgresql (a throwaway cluster) | postgresql://URL")
    p.add_argument("--instances", type=int, default=1, help="gateway serve processes on the one store")
    p.add_argument("--smtp-source", action="store_true",
                   help="drive the gateway with Postfix's smtp-source, smtp-sink as the relay")
    p.add_argument("--sessions", type=int, default=8, help="--smtp-source: parallel sessions")
    p.add_argument("--size", type=int, default=2048, help="--smtp-source: payload bytes per mail")
    p.add_argument("--chunks", type=int, default=6, help="--smtp-source: consecutive runs, CPU per mail each")
    p.add_argument("--caps", choices=("raised", "default"), default="raised",
                   help="--smtp-source: lift the loop caps (every mail answered) or keep the defaults")
    args = p.parse_args()
    result = memory_run(args) if args.memory else smtp_source_run(args) if args.smtp_source else run(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
