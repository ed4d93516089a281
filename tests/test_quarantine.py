"""Poison mail: quarantined with its bytes, logged, visible to ops, retryable;
it never stops `gateway serve` nor holds up the mails behind it.

The poison is real input, not an injected fault: the first mail of `POISON`
that today's parser or pipeline cannot handle (checked in-process, through
the same intake as `serve`). The parser is being hardened, so the list runs
from what may be fixed soon to what needs an iterative MIME parser to stop
being poison (message/rfc822 nested thousands deep: the stdlib feedparser
recurses once per level). The gateway under test raises `[limits]
max_nesting` so that the deep mail reaches the parser instead of being
refused with 554 at the SMTP edge (tests/test_fuzz.py covers that refusal).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache

import pg
from conftest import GATEWAY, SUPPORT, GatewayProc, mail, smtp_send, uniq, wait_for

LIMITS = "[limits]\nmax_nesting = 100000\n"


def _broken_base64_subject(tag: str) -> bytes:
    return (f"From: Pat <{tag}@customer.example>\r\nTo: {SUPPORT}\r\n"
            f"Message-ID: <{tag}@customer.example>\r\n"
            f"Subject: =?utf-8?b?w6sO8?= {tag}\r\n\r\nbody\r\n").encode()


def _nul_in_charset(tag: str) -> bytes:
    return (f"From: Pat <{tag}@customer.example>\r\nTo: {SUPPORT}\r\n"
            f"Message-ID: <{tag}@customer.example>\r\n").encode() + \
        b"Subject: =?ut\x00f-8?q?hello?=\r\n\r\nbody\r\n"


def _nested_rfc822(tag: str, depth: int = 3000) -> bytes:
    inner = b"From: x@y.example\r\nContent-Type: text/plain\r\n\r\nleaf\r\n"
    for _ in range(depth):
        inner = b"Content-Type: message/rfc822\r\n\r\n" + inner
    return (f"From: Pat <{tag}@customer.example>\r\nTo: {SUPPORT}\r\n"
            f"Message-ID: <{tag}@customer.example>\r\nSubject: {tag}\r\n").encode() + inner


POISON: list[tuple[str, Callable[[str], bytes]]] = [
    ("an RFC 2047 subject with broken base64", _broken_base64_subject),
    ("a NUL byte in an encoded word's charset", _nul_in_charset),
    ("message/rfc822 nested 3000 deep", _nested_rfc822),
]


@cache
def poison_maker() -> tuple[str, Callable[[str], bytes]]:
    """The first real input that today's gateway quarantines (in-process, same intake)."""
    import tempfile

    from gateway.app import open_gateway
    from gateway.config import parse
    from gateway.desk.pipeline import Received

    async def quarantined(raw: bytes) -> bool:
        with tempfile.TemporaryDirectory() as d:
            config = parse({"gateway": {"data_dir": d}, "outbound": {"transport": "maildir"},
                            "limits": {"max_nesting": 100000}, **pg.store_section()})
            gw = await open_gateway(config)
            try:
                outcome = await gw.intake.receive(Received(
                    raw=raw, mail_from="pat@customer.example", rcpt_to=(SUPPORT,),
                    mailbox=config.mailboxes[0], received_at=datetime.now(UTC)))
            finally:
                await gw.close()
            return outcome.action == "quarantined"

    for name, make in POISON:
        if asyncio.run(quarantined(make("probe"))):
            return name, make
    raise AssertionError("no input in POISON breaks the gateway any more (good!): add a "
                         "newly found one (tests/test_fuzz.py finds them) to keep this test real")


def quarantine(gw: GatewayProc, *args: str) -> subprocess.CompletedProcess[str]:
    return gw.cli("quarantine", *args)


def q_list(gw: GatewayProc) -> list[dict]:
    r = quarantine(gw, "list", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def show_raw(gw: GatewayProc, inbound_id: int) -> bytes:
    p = subprocess.run([*GATEWAY, "quarantine", "show", str(inbound_id), "--config", str(gw.config)],
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_poison_mail_is_quarantined_and_never_holds_up_the_mails_behind_it(
        make_gateway: Callable[..., GatewayProc]) -> None:
    name, make = poison_maker()
    gw = make_gateway(extra_toml=LIMITS)
    gw.start()
    run = uniq("q")
    results: dict[str, int] = {}

    def client(c: int) -> None:
        # each client: poison, a good mail right behind it, poison, good mail
        for i in range(2):
            tag = f"{run}-p{c}-{i}"
            results[tag] = smtp_send(gw.port, make(tag), [SUPPORT], f"{tag}@customer.example")[0]
            good = mail(f"{run}-g{c}-{i}@customer.example", SUPPORT, f"{run} good {c}/{i}", "fine")
            results[f"{run}-g{c}-{i}"] = gw.send(good)[0]
    threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # and a mail with no sender address at all: nobody to answer, kept for ops
    nobody = f"To: {SUPPORT}\r\nSubject: {run} anonymous\r\nMessage-ID: <{run}-anon@x.example>\r\n\r\nhi\r\n"
    # (an envelope sender without a domain: the null sender <> would make it a notification,
    # RFC 5321 §4.5.5, recorded as automatic rather than quarantined)
    results["anon"] = smtp_send(gw.port, nobody.encode(), [SUPPORT], "anonymous")[0]

    assert set(results.values()) == {250}, results           # poison is taken, not refused
    assert gw.proc is not None and gw.proc.poll() is None   # and serve lives on
    tickets = {t["requester"]: t for t in gw.tickets()}
    for c in range(6):
        for i in range(2):
            assert f"{run}-g{c}-{i}@customer.example" in tickets
            assert not any(f"{run}-p{c}-{i}" in t["subject"] for t in tickets.values())
    wait_for(lambda: all(gw.sink.to(f"{run}-g{c}-{i}@customer.example")
                         for c in range(6) for i in range(2)), what="acks to the good mails")

    listed = q_list(gw)
    poison_ids = {f"<{run}-p{c}-{i}@customer.example>" for c in range(6) for i in range(2)}
    assert {q["message_id"] for q in listed} == poison_ids | {f"<{run}-anon@x.example>"}
    for q in listed:
        assert q["error"], q
        assert q["rcpt_to"] == [SUPPORT] and q["mailbox"] == SUPPORT
    anon = next(q for q in listed if q["message_id"] == f"<{run}-anon@x.example>")
    assert anon["mail_from"] == "anonymous" and "no sender" in anon["error"]
    logged = {e["message_id"] for e in gw.log_events() if e["event"] == "mail.quarantined"}
    assert logged == poison_ids | {f"<{run}-anon@x.example>"}, f"poison: {name}"
    text = quarantine(gw, "list")
    assert text.returncode == 0 and "(13 quarantined mails)" in text.stdout


def test_quarantine_show_gives_the_exact_bytes_or_the_error_and_metadata(
        make_gateway: Callable[..., GatewayProc]) -> None:
    _, make = poison_maker()
    gw = make_gateway(extra_toml=LIMITS)
    gw.start()
    small = make(uniq("small"))
    # over 1 MiB: the raw bytes live in a file under data_dir, not in the row
    big = make(uniq("big")) + b"padding line in the body\r\n" * 50_000
    assert len(big) > 1 << 20
    for raw in (small, big):
        assert smtp_send(gw.port, raw, [SUPPORT], "pat@customer.example")[0] == 250
    listed = q_list(gw)
    assert len(listed) == 2
    for q, raw in zip(listed, (small, big), strict=True):
        assert show_raw(gw, q["id"]) == raw
        r = quarantine(gw, "show", str(q["id"]), "--json")
        meta = json.loads(r.stdout)
        assert meta["error"] and meta["size"] == len(raw)
        assert meta["sha256"] == hashlib.sha256(raw).hexdigest()
        assert meta["mail_from"] == "pat@customer.example" and meta["received_at"].startswith("20")
    assert quarantine(gw, "show", "999999").returncode == 1


def test_retry_of_mail_that_still_fails_keeps_it_quarantined(
        make_gateway: Callable[..., GatewayProc]) -> None:
    _, make = poison_maker()
    gw = make_gateway(extra_toml=LIMITS)
    gw.start()
    tag = uniq("still")
    assert smtp_send(gw.port, make(tag), [SUPPORT], f"{tag}@customer.example")[0] == 250
    (q,) = q_list(gw)
    r = quarantine(gw, "retry", str(q["id"]))
    assert r.returncode == 65, (r.stdout, r.stderr)
    out = json.loads(r.stdout)
    assert out["processed"] is False and out["action"] == "quarantined" and out["error"]
    assert [x["id"] for x in q_list(gw)] == [q["id"]]
    assert gw.tickets() == []
    # serve is not bothered by the retry next to it
    assert gw.send(mail("next@customer.example", SUPPORT, uniq("next"), "hi"))[0] == 250


def _quarantine_as_an_old_defect_did(gw: GatewayProc, raw: bytes, mail_from: str) -> int:
    """A good mail left quarantined by a defect since fixed (say, a parser bug an
    upgrade removed): the row as the intake writes it, state `quarantined`."""
    rows = gw.query(
        "INSERT INTO inbound (received_at, mail_from, rcpt_to, mailbox, sha256, size, raw,"
        " raw_path, message_id, state, error) VALUES (?,?,?,?,?,?,?,NULL,?,'quarantined',?)"
        " RETURNING id",
        (datetime.now(UTC).isoformat(timespec="seconds"), mail_from, json.dumps([SUPPORT]),
         SUPPORT, hashlib.sha256(raw).hexdigest(), len(raw), raw, None,
         "processing failed: KeyError: 'x-old-defect'"))
    return int(rows[0][0])


def test_retry_after_the_fault_is_gone_makes_it_a_normal_processed_mail(
        gateway: GatewayProc) -> None:
    key = uniq("quarantined by an old defect")
    m = mail("Quinn <quinn@customer.example>", SUPPORT, key, "please help")
    inbound_id = _quarantine_as_an_old_defect_did(gateway, m.as_bytes(), "quinn@customer.example")
    assert [q["id"] for q in q_list(gateway)] == [inbound_id]

    # two operators retry at once: the mail is processed once
    procs = [subprocess.Popen([*GATEWAY, "quarantine", "retry", str(inbound_id), "--config",
                               str(gateway.config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = [(p.wait(60), p.stdout.read() if p.stdout else b"") for p in procs]
    codes = sorted(code for code, _ in outs)
    assert codes == [0, 1], outs
    done = json.loads(next(out for code, out in outs if code == 0))
    assert done["processed"] is True and done["action"] == "created" and done["id"] == inbound_id

    t = gateway.ticket_by_subject(key)
    assert t["id"] == done["ticket_id"] and t["requester"] == "quinn@customer.example"
    assert t["messages"][0]["message_id"] == str(m["Message-ID"])
    ack = gateway.sink.wait_to("quinn@customer.example")[0]      # a normal acknowledgement
    assert f"[Support #{t['id']}]" in str(ack["Subject"])
    assert q_list(gateway) == []
    assert quarantine(gateway, "retry", str(inbound_id)).returncode == 1
    # the same mail arriving again is a duplicate, not a second ticket
    assert gateway.send(m)[0] == 250
    assert len([x for x in gateway.tickets() if key in x["subject"]]) == 1


def test_quarantine_list_is_empty_on_a_fresh_gateway(gateway: GatewayProc) -> None:
    assert q_list(gateway) == []
    assert "(0 quarantined mails)" in quarantine(gateway, "list").stdout

