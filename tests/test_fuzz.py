"""Hostile input, fuzzed: the whole inbound path, in-process and over real SMTP.

Random and mutated MIME (broken and colliding boundaries, bad base64 and
quoted-printable, unknown and NUL-ridden charsets, NUL bytes, 20 000-byte
header lines, thousands of headers, message/rfc822 nested deep, hostile
attachment names, RFC 2047 words that decode to CR/LF) must never crash,
hang or balloon: every mail ends `created`, `joined`, `duplicate`,
`automatic` or `quarantined`; nothing is written outside data_dir; no
outbound mail gets a header or recipient the gateway did not put there.

Bounded for CI (the file runs in well under 60 s, derandomized so that CI
is repeatable). The longer run, randomized, is:

    GATEWAY_FUZZ_EXAMPLES=3000 GATEWAY_FUZZ_SMTP_EXAMPLES=1000 \\
        .venv/bin/python -m pytest tests/test_fuzz.py -q

(measured in README "Guarantees"). A failure prints the example's bytes;
add them to tests/test_quarantine.py POISON if they are poison, or fix the
parser.
"""
from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import faulthandler
import io
import os
import re
import resource
import smtplib
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import pg
import pytest
from conftest import QUEUES, SUPPORT, GatewayProc, mail, smtp_send, uniq, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parse_cost import cpu_pair

EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "150"))
SMTP_EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_SMTP_EXAMPLES", "40"))
LONG_RUN = "GATEWAY_FUZZ_EXAMPLES" in os.environ
ACTIONS = {"created", "joined", "duplicate", "automatic", "quarantined"}
VICTIM = "injected.example"        # only ever appears inside hostile header text

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG_RUN,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.filter_too_much])

# Outbound header names that depend on the ticket, beyond those of a benign baseline mail
# (the baseline is measured, not listed: the composer may add headers such as Content-Language).
OPTIONAL_HEADERS = {"cc", "reply-to", "in-reply-to", "references"}


# -- strategies: hostile MIME ---------------------------------------------------

CHARSETS = ["utf-8", "UTF-8", "iso-8859-1", "windows-1252", "shift_jis", "iso-2022-jp", "gb2312",
            "koi8-r", "utf-7", "utf-16", "x-unknown", "", "bogus charset", "utf-8\x00", "ut\x00f-8",
            '"', "us-ascii", "x-user-defined", "unicode-1-1-utf-7"]
CTES = ["7bit", "8bit", "binary", "base64", "quoted-printable", "x-uuencode", "bogus", ""]
TYPES = ["text/plain", "text/html", "application/octet-stream", "image/png", "application/pdf",
         "text/calendar", "application/ms-tnef", "message/delivery-status", "text/rfc822-headers",
         "bogus", "/", "text/", "application/x-" + "y" * 300]
NAMES = ["../../../../etc/passwd", "..\\..\\..\\windows\\win.ini", "/etc/shadow", "a\x00b.txt",
         "CON", "x" * 300, "=?utf-8?q?=2E=2E=2F=2E=2E=2Fevil=2Esh?=", "evil\r\nBcc: v@injected.example",
         ".", "..", "", "~/.ssh/authorized_keys", "%2e%2e%2fpasswd", "ünïcødé.txt"]
HEADER_NAMES = ["Subject", "From", "To", "Cc", "Reply-To", "Message-ID", "In-Reply-To", "References",
                "Date", "Content-Type", "Content-Disposition", "Content-Transfer-Encoding",
                "MIME-Version", "Auto-Submitted", "Precedence", "List-Id", "Return-Path",
                "Authentication-Results", "Received", "X-Mailer", "Delivered-To", "Sender"]
INJECTIONS = [
    "=?utf-8?q?Hi=0D=0ABcc:_v1@injected.example=0D=0AX-Injected:_1?=",
    "=?utf-8?b?" + base64.b64encode(b"x\r\nTo: v2@injected.example\r\n\r\nbody").decode() + "?=",
    "=?iso-8859-1?q?a=0Abcc=3A_v3=40injected.example?=",
    "\"=?utf-8?q?Ann=0D=0ACc:_v4@injected.example?=\" <ann-inj@customer.example>",
    "=?utf-8?q?=0D=0A=0D=0A?= v5@injected.example",
]

text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=120)
ascii_junk = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=80)


@st.composite
def encoded_word(draw: st.DrawFn) -> str:
    charset = draw(st.sampled_from(CHARSETS))
    if draw(st.booleans()):
        payload = base64.b64encode(draw(st.binary(max_size=40))).decode()
        if draw(st.booleans()):          # broken base64: cut, padded wrong, junk inside
            payload = payload[: draw(st.integers(0, len(payload)))] + draw(st.sampled_from(["", "=", "!", "==x"]))
        return f"=?{charset}?B?{payload}?="
    raw = draw(st.binary(max_size=30))
    qp = "".join(draw(st.sampled_from([f"={b:02X}", chr(b) if 33 <= b < 127 and chr(b) not in "?=_" else "_",
                                       "=", "=Z"])) for b in raw)
    return f"=?{charset}?Q?{qp}?="


header_value = st.one_of(
    text, ascii_junk, encoded_word(), st.sampled_from(INJECTIONS),
    st.lists(st.one_of(encoded_word(), text), max_size=4).map(" ".join),
    st.integers(1000, 20_000).map(lambda n: "x" * n),                       # very long lines
    st.builds(lambda a, b: f"{a} <{b}@customer.example>", text, st.from_regex(r"[a-z]{1,8}", fullmatch=True)),
)


@st.composite
def headers(draw: st.DrawFn, top: bool) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if top:
        who = draw(st.from_regex(r"[a-z]{1,10}", fullmatch=True))
        out += [("From", draw(st.sampled_from([f"{who}@customer.example", f"Name <{who}@customer.example>",
                                                INJECTIONS[3], f"{draw(encoded_word())} <{who}@customer.example>",
                                                "", "<>", "undisclosed-recipients:;"]))),
                ("To", SUPPORT)]
    for _ in range(draw(st.integers(0, 8))):
        out.append((draw(st.one_of(st.sampled_from(HEADER_NAMES), st.from_regex(r"[!-9;-~]{1,40}", fullmatch=True))),
                    draw(header_value)))
    if top and draw(st.integers(0, 9)) == 0:                                   # thousands of headers
        out += [(f"X-Header-{i}", "v") for i in range(draw(st.integers(1000, 5000)))]
    return out


def render(hs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode("utf-8", "surrogateescape") for k, v in hs)


@st.composite
def leaf(draw: st.DrawFn) -> bytes:
    ctype = draw(st.sampled_from(TYPES))
    params = ""
    if draw(st.booleans()):
        params += f"; charset={draw(st.sampled_from(CHARSETS))}"
    name = draw(st.one_of(st.sampled_from(NAMES), text))
    if draw(st.booleans()):
        params += f'; name="{name}"'
    cte = draw(st.sampled_from(CTES))
    hs = [("Content-Type", ctype + params)]
    if cte:
        hs.append(("Content-Transfer-Encoding", cte))
    if draw(st.booleans()):
        hs.append(("Content-Disposition",
                   draw(st.sampled_from([f'attachment; filename="{name}"',
                                         f"attachment; filename*=utf-8''{name.encode('utf-8', 'surrogateescape').hex()}",
                                         f"inline; filename*0={name[:3]}; filename*1={name[3:]}",
                                         "attachment", "bogus;;;=="]))))
    data = draw(st.binary(max_size=300))
    if cte == "base64":
        body = base64.encodebytes(data)
        if draw(st.booleans()):
            body = body[: draw(st.integers(0, len(body)))] + draw(st.sampled_from([b"", b"!!", b"=", b"\x00"]))
    elif cte == "quoted-printable":
        body = draw(st.sampled_from([b"caf=C3=A9 =\r\nsoft break", b"=ZZ=4", b"=\r\n=\r\n", b"a" * 2000])) + data
    else:
        body = data
    return render(hs) + b"\r\n" + body


@st.composite
def multipart(draw: st.DrawFn, children: st.SearchStrategy[bytes]) -> bytes:
    boundary = draw(st.sampled_from(["b1", "=_Part_0", "", "a b", "x" * 80, "--", "b1--"]) | ascii_junk)
    parts = draw(st.lists(children, max_size=5))
    sub = draw(st.sampled_from(["mixed", "alternative", "related", "report; report-type=delivery-status",
                                "digest", "signed"]))
    out = f'Content-Type: multipart/{sub}; boundary="{boundary}"\r\n\r\npreamble\r\n'.encode(
        "utf-8", "surrogateescape")
    delim = draw(st.sampled_from([boundary, boundary, boundary, "wrong"])).encode("utf-8", "surrogateescape")
    for p in parts:
        out += b"--" + delim + b"\r\n" + p + b"\r\n"
    if draw(st.booleans()):                       # sometimes never closed
        out += b"--" + delim + b"--\r\nepilogue\r\n"
    return out


def rfc822(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return children.map(lambda inner: b"Content-Type: message/rfc822\r\n\r\nFrom: in@x.example\r\n" + inner)


def deep(depth: int) -> bytes:
    inner = b"Content-Type: text/plain\r\n\r\nleaf\r\n"
    for _ in range(depth):
        inner = b"Content-Type: message/rfc822\r\n\r\n" + inner
    return inner


entity = st.recursive(leaf(), lambda ch: st.one_of(multipart(ch), rfc822(ch)), max_leaves=10)


@st.composite
def mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.integers(0, 4))
        i = draw(st.integers(0, len(b)))
        if op == 0 and b:
            del b[i:i + draw(st.integers(1, 40))]
        elif op == 1:
            b[i:i] = draw(st.sampled_from([b"\x00", b"\r", b"\n", b"\r\n\r\n", b"--", b"=?", b"?=",
                                           b"\xff\xfe", b":", b";", b'"', b"\\", b"boundary="]))
        elif op == 2 and b:
            b[min(i, len(b) - 1)] = draw(st.integers(0, 255))
        elif op == 3:
            j = draw(st.integers(0, len(b)))
            b[i:i] = b[j:j + draw(st.integers(1, 200))]
        else:
            b[i:i] = draw(st.binary(max_size=20)) * draw(st.integers(1, 50))
    return bytes(b)


@st.composite
def hostile_mail(draw: st.DrawFn) -> bytes:
    top = render(draw(headers(top=True)))
    shape = draw(st.integers(0, 9))
    if shape == 0:
        body = deep(draw(st.sampled_from([5, 50, 1200])))      # the parser recurses per level
    else:
        body = draw(entity)
    raw = top + body
    return draw(mutated(raw)) if draw(st.booleans()) else raw


# -- in-process: parse_mail + the pipeline, through Intake.receive --------------

EXAMPLE_HANG_S = 120


@pytest.fixture
def hang_guard() -> Iterator[Callable[[], None]]:
    """Call it at the start of each example: an example that hangs fails the run
    (with every thread's stack) instead of blocking CI."""
    def arm() -> None:
        faulthandler.dump_traceback_later(EXAMPLE_HANG_S, exit=True)   # re-arming resets it
    yield arm
    faulthandler.cancel_dump_traceback_later()


def header_names(raw: bytes) -> list[str]:
    """The names of the top-level header lines, as a receiver would split them."""
    head = raw.split(b"\n\n", 1)[0]
    return [line.split(b":", 1)[0].decode("ascii", "replace").lower()
            for line in head.split(b"\n") if line[:1] not in (b" ", b"\t")]


def check_outbound(path: Path, allowed_rcpt: set[str], allowed_headers: set[str]) -> None:
    raw = path.read_bytes()
    for name in header_names(raw):
        assert name in allowed_headers, f"unexpected outbound header {name!r} in {path.name}"
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    for name in ("From", "To", "Subject", "Message-ID"):
        assert len(msg.get_all(name, [])) == 1, (name, msg.get_all(name))
    assert msg["Bcc"] is None
    # the Maildir envelope line, read as written (not through a header parser)
    line = next(x for x in raw.split(b"\n", 2)[:2] if x.startswith(b"X-Envelope-To:"))
    envelope = {a.strip() for a in line.split(b":", 1)[1].decode("utf-8", "replace").split(",") if a.strip()}
    assert envelope, "no recipient"
    assert envelope <= allowed_rcpt, (envelope, allowed_rcpt)
    for a in envelope:       # something a relay can deliver to (RFC 5321 §4.1.2)
        assert re.fullmatch(r"[^\s@<>]+@[^\s@<>.]+(\.[^\s@<>.]+)*", a), f"unusable recipient {a!r}"
    assert not any(VICTIM in a for a in envelope)
    # No address in To/Cc beyond the envelope. Compared decoded: the composer RFC 2047-encodes
    # a non-ASCII address whole (a separate defect, reported), which adds no recipient.
    values = [str(make_header(decode_header(str(v)))) for h in ("To", "Cc") for v in msg.get_all(h, [])]
    header_rcpt = {a.lower() for _, a in getaddresses(values) if a}
    assert header_rcpt <= {a.lower() for a in envelope}, (header_rcpt, envelope)


def test_fuzzed_mime_through_parse_and_pipeline_never_crashes_hangs_or_leaks(
        hang_guard: Callable[[], None], tmp_path: Path) -> None:
    import shutil

    from gateway.app import open_gateway
    from gateway.config import parse
    from gateway.desk.pipeline import Received
    from gateway.mail.parse import parse_mail
    from gateway.ops import logs

    logs.configure(stream=io.StringIO())    # the fuzz would log a lot of quarantines
    runner = asyncio.Runner()
    counter = [0]

    def fresh() -> tuple[Any, Any, Path]:
        """A gateway of its own per example: a failure replays (and shrinks) the same way."""
        counter[0] += 1
        data_dir = tmp_path / f"data{counter[0]}"
        config = parse({"gateway": {"data_dir": str(data_dir)}, "outbound": {"transport": "maildir"},
                        **pg.store_section()})
        return config, runner.run(open_gateway(config)), data_dir

    def receive(gw: Any, config: Any, raw: bytes, mail_from: str) -> Any:
        return runner.run(asyncio.wait_for(gw.intake.receive(Received(
            raw=raw, mail_from=mail_from, rcpt_to=(SUPPORT,), mailbox=config.mailboxes[0],
            received_at=datetime.now(UTC))), 60))

    # the headers of the answers to a benign mail: what the composer writes today
    config, gw, data_dir = fresh()
    receive(gw, config, mail("benign@customer.example", SUPPORT, "baseline", "hello").as_bytes(),
            "benign@customer.example")
    runner.run(gw.sender.deliver_due())
    runner.run(gw.close())
    outbound = data_dir / "outbound" / "new"
    allowed_headers = OPTIONAL_HEADERS.union(*(header_names(p.read_bytes()) for p in outbound.iterdir()))
    assert {"from", "to", "subject", "message-id", "auto-submitted"} <= allowed_headers
    staff = set(QUEUES.values()) | set(config.queues.values()) | set(config.staff_addresses)
    seen_actions: dict[str, int] = {}
    slowest = [0.0]

    @FUZZ
    @given(raw=hostile_mail())
    def one(raw: bytes) -> None:
        hang_guard()
        # memory is traced over the parse, where MIME bombs explode (tracing the whole
        # pipeline costs 6x the time); the process's peak RSS bounds the rest, below
        tracemalloc.start()
        try:
            parsed = parse_mail(raw)
            allowed = staff | {parsed.sender} | set(parsed.to) | set(parsed.cc)
        except Exception:  # noqa: BLE001 - a parse failure is fine: the intake quarantines it
            allowed = set(staff)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < 32 * 2**20 + 40 * len(raw), f"parse peak {peak / 2**20:.0f} MiB for {len(raw)} bytes"
        allowed.add("fuzz@customer.example")
        config, gw, data_dir = fresh()
        try:
            started = time.perf_counter()
            outcome = receive(gw, config, raw, "fuzz@customer.example")
            elapsed = time.perf_counter() - started
            slowest[0] = max(slowest[0], elapsed)
            assert outcome.action in ACTIONS, outcome
            seen_actions[outcome.action] = seen_actions.get(outcome.action, 0) + 1
            assert elapsed < 20, f"{elapsed:.1f} s for {len(raw)} bytes"
            runner.run(gw.sender.deliver_due())
        finally:
            runner.run(gw.close())
        outbound = data_dir / "outbound" / "new"
        for path in outbound.iterdir() if outbound.exists() else ():
            check_outbound(path, allowed, allowed_headers)
        # attachments only under their hash, never under a name from the mail
        for p in (data_dir / "attachments").rglob("*") if (data_dir / "attachments").exists() else ():
            rel = p.relative_to(data_dir / "attachments").parts
            assert re.fullmatch(r"[0-9a-f]{2}", rel[0]) and \
                (len(rel) == 1 or re.fullmatch(r"[0-9a-f]{64}", rel[1])), p
        shutil.rmtree(data_dir)

    try:
        one()
    finally:
        runner.close()
    # nothing was written outside the data directories
    assert {p for p in tmp_path.rglob("*") if p.is_file()
            and not p.relative_to(tmp_path).parts[0].startswith("data")} == set()
    assert seen_actions.get("created", 0) > 0 and seen_actions.get("quarantined", 0) > 0, seen_actions
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peak_mb < 1024, f"the test process peaked at {peak_mb:.0f} MB"
    print(f"\nfuzz in-process: {EXAMPLES} examples, actions {seen_actions}, slowest {slowest[0]:.2f} s, "
          f"peak RSS {peak_mb:.0f} MB")


# -- over real SMTP ---------------------------------------------------------------

def _rss_peak_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_fuzzed_mime_over_smtp_gets_an_answer_and_serve_lives_on(
        hang_guard: Callable[[], None], make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(max_size=4_000_000)
    gw.start()
    answers: dict[int, int] = {}

    @settings(FUZZ, max_examples=SMTP_EXAMPLES)
    @given(raw=hostile_mail())
    def one(raw: bytes) -> None:
        hang_guard()
        started = time.perf_counter()
        code, text = smtp_send(gw.port, raw, [SUPPORT], "fuzz@customer.example")
        # 250 (stored: processed or quarantined), 554 5.6.0 over [limits], 552 too big;
        # never 451 (nothing is wrong with the store) nor 500 (a crash in a hook)
        assert code in (250, 552, 554), (code, text)
        assert time.perf_counter() - started < 30
        answers[code] = answers.get(code, 0) + 1

    one()
    assert gw.proc is not None and gw.proc.poll() is None
    peak_mb = _rss_peak_kb(gw.proc.pid) / 1024
    assert peak_mb < 400, f"serve peaked at {peak_mb:.0f} MB"
    # and it still works normally afterwards
    who = f"{uniq('after')}@customer.example"
    assert gw.send(mail(who, SUPPORT, uniq("after the fuzz"), "hello"))[0] == 250
    gw.sink.wait_to(who)
    assert not any(VICTIM in r for m in gw.sink.messages for r in m["rcpt"])
    assert gw.cli("quarantine", "list", "--json").returncode == 0
    print(f"\nfuzz over SMTP: {SMTP_EXAMPLES} examples, answers {answers}, serve peak RSS {peak_mb:.0f} MB")


# -- the monsters, one by one, over SMTP ------------------------------------------

def _with_attachments(n: int) -> bytes:
    m = mail("att@customer.example", SUPPORT, uniq(f"{n} attachments"), "see attached")
    for i in range(n):
        m.add_attachment(b"x", maintype="application", subtype="octet-stream", filename=f"f{i}.bin")
    return m.as_bytes()


def _nested(depth: int) -> bytes:
    return (f"From: deep@customer.example\r\nTo: {SUPPORT}\r\nSubject: {uniq('deep')}\r\n").encode() + deep(depth)


MONSTERS: list[tuple[str, Callable[[], bytes], int]] = [
    ("20 000-byte header line", lambda: (f"From: a@customer.example\r\nTo: {SUPPORT}\r\n"
                                          f"Subject: {uniq('long')}\r\nX-Long: {'y' * 20_000}\r\n"
                                          "\r\nhi\r\n").encode(), 250),
    ("20 000-byte body line", lambda: (f"From: a@customer.example\r\nTo: {SUPPORT}\r\n"
                                        f"Subject: {uniq('long body')}\r\n\r\n{'z' * 20_000}\r\n").encode(), 250),
    ("5 000 headers", lambda: (f"From: b@customer.example\r\nTo: {SUPPORT}\r\nSubject: {uniq('many')}\r\n"
                              + "".join(f"X-H{i}: v\r\n" for i in range(5000)) + "\r\nhi\r\n").encode(), 250),
    ("NUL bytes", lambda: (f"From: c@customer.example\r\nTo: {SUPPORT}\r\nSubject: a\0b {uniq('nul')}\r\n"
                          "\r\nbo\0dy\r\n").encode(), 250),
    ("bad base64 and an unknown charset", lambda: (
        f"From: d@customer.example\r\nTo: {SUPPORT}\r\nSubject: =?x-klingon?q?qapla?= {uniq('b64')}\r\n"
        "Content-Type: text/plain; charset=x-klingon\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        "!!!not base64===\r\n").encode(), 250),
    ("nesting 10 (the limit)", lambda: _nested(10), 250),
    ("nesting 11", lambda: _nested(11), 554),
    ("nesting 3000", lambda: _nested(3000), 554),
    ("100 attachments (the limit)", lambda: _with_attachments(100), 250),
    ("101 attachments", lambda: _with_attachments(101), 554),
]


@pytest.mark.parametrize("name,raw,code", MONSTERS, ids=[m[0] for m in MONSTERS])
def test_monsters_get_a_clear_answer(gateway: GatewayProc, name: str, raw: Callable[[], bytes],
                                     code: int) -> None:
    got, text = smtp_send(gateway.port, raw(), [SUPPORT], "monster@customer.example")
    assert got == code, (got, text)
    if code == 554:
        assert text.startswith("5.6.0"), text
        assert gateway.tickets() == []
    assert gateway.proc is not None and gateway.proc.poll() is None


def test_too_many_recipients_get_452_and_the_mail_is_taken_once(gateway: GatewayProc) -> None:
    key = uniq("many rcpt")
    m = mail("rcpt@customer.example", SUPPORT, key, "to many aliases")
    rcpts = [f"support+{i}@example.com" for i in range(51)]
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as s:
        refused = s.sendmail("rcpt@customer.example", rcpts, m.as_bytes())
    assert list(refused) == [rcpts[50]]
    code, text = refused[rcpts[50]]
    assert code == 452 and text.startswith(b"4.5.3"), (code, text)   # RFC 5321 §4.5.3.1.10
    assert len([t for t in gateway.tickets() if key in t["subject"]]) == 1


def test_ingest_refuses_over_limit_structure_with_exit_65(gateway: GatewayProc) -> None:
    r = gateway.cli("ingest", "--recipient", SUPPORT, stdin=_with_attachments(101))
    assert r.returncode == 65 and "more than 100 attachments" in r.stderr
    r = gateway.cli("ingest", "--recipient", SUPPORT, stdin=_nested(50))
    assert r.returncode == 65 and "nesting" in r.stderr
    assert gateway.cli("ingest", "--recipient", SUPPORT, stdin=_with_attachments(3)).returncode == 0


def test_limits_are_configurable(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml="[limits]\nmax_recipients = 2\nmax_attachments = 1\nmax_nesting = 2\n")
    gw.start()
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as s:
        s.ehlo()
        s.mail("x@customer.example")
        assert s.rcpt("support+1@example.com")[0] == 250
        assert s.rcpt("support+2@example.com")[0] == 250
        assert s.rcpt("support+3@example.com")[0] == 452
    assert smtp_send(gw.port, _with_attachments(2), [SUPPORT], "x@customer.example")[0] == 554
    assert smtp_send(gw.port, _with_attachments(1), [SUPPORT], "x@customer.example")[0] == 250
    assert smtp_send(gw.port, _nested(3), [SUPPORT], "x@customer.example")[0] == 554
    assert smtp_send(gw.port, _nested(2), [SUPPORT], "x@customer.example")[0] == 250
    bad = make_gateway(extra_toml="[limits]\nmax_recipients = 0\nmax_nesting = \"deep\"\n")
    r = bad.cli("check-config")
    assert r.returncode == 78 and "limits.max_recipients" in r.stderr and "limits.max_nesting" in r.stderr


# -- header injection, end to end -------------------------------------------------

def test_encoded_subject_and_name_cannot_add_recipients_or_headers_to_outbound_mail(
        gateway: GatewayProc) -> None:
    key = uniq("inject")
    raw = (f"From: =?utf-8?q?Ann=0D=0ATo:_v1@{VICTIM}=0D=0ABcc:_v2@{VICTIM}?= <ann-inj@customer.example>\r\n"
           f"To: {SUPPORT}\r\nMessage-ID: <{key}@customer.example>\r\n"
           f"Subject: =?utf-8?q?{key}=0D=0ABcc:_v3@{VICTIM}=0D=0AX-Injected:_yes=0D=0A=0D=0Abody?=\r\n"
           f"\r\nhello\r\n").encode()
    assert smtp_send(gateway.port, raw, [SUPPORT], "ann-inj@customer.example")[0] == 250
    (ticket,) = wait_for(lambda: [t for t in gateway.tickets() if key in t["subject"]], what="the ticket")
    tag = f"[Support #{ticket['id']}]"
    out = wait_for(lambda: (found := [m for m in list(gateway.sink.messages) if tag in str(m["msg"]["Subject"])])
                   and len(found) >= 2 and found, what="the ack and the notification")
    for m in out:
        msg = m["msg"]
        assert len(m["rcpt"]) == 1                                  # one envelope recipient each
        assert msg["Bcc"] is None and msg["X-Injected"] is None
        assert len(msg.get_all("To")) == 1 and len(msg["To"].addresses) == 1
        assert msg["Cc"] is None
        assert "\n" not in str(msg["Subject"]) and "\r" not in str(msg["Subject"])
        assert str(msg["Subject"]).count(tag) == 1
    assert not any(r.endswith("@" + VICTIM) for m in gateway.sink.messages for r in m["rcpt"])


@pytest.mark.parametrize("from_header", [
    f"=?utf-8?q?Ann=0D=0ATo:_v1@{VICTIM}=0D=0ABcc:_v2@{VICTIM}?= <ann-name@customer.example>",
    f"=?utf-8?q?Smith=2C_John_john@{VICTIM}?= <ann-name@customer.example>",
    f"\"=?utf-8?q?support@{VICTIM}?=\" <ann-name@customer.example>",
], ids=["crlf-and-address-in-word", "address-in-word", "quoted-word"])
def test_encoded_display_name_cannot_choose_the_address_answered(gateway: GatewayProc,
                                                                 from_header: str) -> None:
    """RFC 2047 §5: an encoded word in a display name is text, never address syntax;
    the address is what is in the angle brackets."""
    key = uniq("name")
    raw = (f"From: {from_header}\r\nTo: {SUPPORT}\r\nSubject: {key}\r\n"
           f"Message-ID: <{key}@customer.example>\r\n\r\nhello\r\n").encode()
    assert smtp_send(gateway.port, raw, [SUPPORT], "envelope@customer.example")[0] == 250
    (ticket,) = wait_for(lambda: [t for t in gateway.tickets() if key in t["subject"]], what="the ticket")
    assert ticket["requester"] == "ann-name@customer.example"
    gateway.sink.wait_to("ann-name@customer.example")


# -- scaling: no parsing step grows faster than the mail (project issue 14) -------

_H = f"From: a@customer.example\r\nTo: {SUPPORT}\r\nSubject: x\r\n".encode()
_MP = _H + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
GROWING: dict[str, Callable[[int], bytes]] = {
    "uuencode begin lines without end": lambda n: _H + b"\r\n" + b"begin 644 f\r\n" * (n // 13),
    "uuencode blocks": lambda n: _H + b"\r\n" + b"begin 644 f\r\n#86)C\r\n`\r\nend\r\n" * (n // 28),
    "one long header line": lambda n: _H + b"X-Long: " + b"y" * n + b"\r\n\r\nhi\r\n",
    "folded header": lambda n: _H + b"X-F: a\r\n" + b" b\r\n" * (n // 4) + b"\r\nhi\r\n",
    "many headers": lambda n: _H + b"".join(b"X-H%d: v\r\n" % i for i in range(n // 12)) + b"\r\nhi\r\n",
    "encoded words": lambda n: _H.replace(b"Subject: x", b"Subject: " + b"=?utf-8?q?a?= " * (n // 14))
    + b"\r\nhi\r\n",
    "many addresses": lambda n: _H.replace(b"Subject: x", b"Cc: " + b", ".join(
        b"u%d@c.example" % i for i in range(n // 16)) + b"\r\nSubject: x") + b"\r\nhi\r\n",
    "many parts": lambda n: _MP + b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" * (n // 40) + b"--b--\r\n",
    "long boundary": lambda n: _MP.replace(b"boundary=b", b"boundary=" + b"q" * 250)
    + (b"--" + b"q" * 250 + b"\r\n\r\nx\r\n") * (n // 260),
    "dash lines in a multipart": lambda n: _MP + b"--b\r\n\r\n" + b"--\r\n" * (n // 4),
    "bare CR lines": lambda n: _H + b"\r\n" + b"line\r" * (n // 5),
    "quoted lines": lambda n: _H + b"\r\n" + b">\r\n" * (n // 3),
    "html": lambda n: _H + b"Content-Type: text/html\r\n\r\n" + b"<div>" * (n // 5),
    "angle brackets": lambda n: b"From: " + b"<" * n + _H[_H.index(b"\r\n"):] + b"\r\nhi\r\n",
    "at signs": lambda n: _H.replace(b"Subject: x", b"Cc: " + b"@" * n + b"\r\nSubject: x") + b"\r\nhi\r\n",
    "one long word": lambda n: _H + b"\r\n" + b"a" * n,
}
SCALE_BYTES = 100_000
PER_MAIL_S = 5.0          # the default [limits] parse_seconds


def _assert_linear(name: str, make: Callable[[int], bytes]) -> None:
    small, large = cpu_pair(make(SCALE_BYTES), make(2 * SCALE_BYTES))
    assert large < PER_MAIL_S, f"{name}: {large:.2f} s for {2 * SCALE_BYTES} bytes"
    # 2x the size may cost at most ~2.5x the time (and a little noise on tiny times)
    assert large <= 2.5 * small + 0.02, f"{name}: {small * 1000:.0f} ms -> {large * 1000:.0f} ms for 2x the size"


@pytest.mark.parametrize("name", list(GROWING), ids=list(GROWING))
def test_parsing_grows_no_faster_than_the_mail(name: str) -> None:
    _assert_linear(name, GROWING[name])


@settings(FUZZ, max_examples=int(os.environ.get("GATEWAY_FUZZ_SCALE_EXAMPLES", "15")))
@given(raw=hostile_mail(), cut=st.integers(0, 1000), width=st.integers(1, 200))
def test_fuzzed_mail_repeated_costs_time_in_proportion(raw: bytes, cut: int, width: int) -> None:
    """Any fragment of a hostile mail, repeated: twice the repeats, at most ~2.5x the time."""
    start = cut % max(1, len(raw))
    piece = raw[start:start + width] or b"x"

    def grow(n: int) -> bytes:
        return raw[:start] + piece * (n // len(piece)) + raw[start:]
    _assert_linear(f"{piece!r} repeated in a fuzzed mail", grow)
