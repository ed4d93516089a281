"""`gateway`: the command line of CONTRACT.md.

Each sub-command loads the configuration (`--config`, else
$GATEWAY_CONFIG, else built-in defaults), asks `gateway.app` for the parts
it needs, does one thing, and exits with a sysexits.h status.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from pathlib import Path
from typing import Any

from gateway.clock import fixed_clock, system_clock
from gateway.config import Config, ConfigError, environment_problems, load
from gateway.desk import stats
from gateway.inbound import answers
from gateway.model import Status, Ticket, normalize_address, search_terms
from gateway.ops import logs
from gateway.outbound.tokens import open_store
from gateway.store import Store, StoreUnavailable, iso
from gateway.store.blobs import write_atomic

INGEST_SEND_TIMEOUT_S = 20.0


def ticket_json(t: Ticket) -> dict[str, Any]:
    return {"id": t.id, "subject": t.subject, "status": t.status.value, "requester": t.requester,
            "cc": list(t.cc), "region": t.region, "govcloud": t.govcloud, "priority": t.priority,
            "linked_ticket": t.linked_ticket, "mailbox": t.mailbox,
            "created_at": iso(t.created_at), "first_response_at": iso(t.first_response_at),
            "resolved_at": iso(t.resolved_at), "closed_at": iso(t.closed_at),
            "escalated": t.escalated, "undeliverable": list(t.undeliverable),
            "plan": t.plan, "response_due_at": iso(t.response_due_at), "missing": list(t.missing),
            "redirect": t.redirect, "emergency": t.emergency, "tier": t.tier, "owner": t.owner,
            "contact": t.contact or None, "category": t.category or None, "product": t.product or None,
            "waiting_for_information": bool(t.missing) and t.status.value in ("open", "pending"),
            "sla": {"warn_at": iso(t.sla_warn_at), "warned_at": iso(t.sla_warned_at),
                    "breached_at": iso(t.sla_breached_at), "outcome": t.sla_outcome},
            "escalation": None if not t.escalated else {
                "tier": t.tier, "by": t.escalated_by, "at": iso(t.escalated_at),
                "queue": t.escalation_queue, "customer_told_at": iso(t.customer_told_at)}}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("support-gateway")
    except PackageNotFoundError:   # run from a checkout that was never installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help="TOML configuration (default: $GATEWAY_CONFIG, else built-in defaults)")
    enclave = argparse.ArgumentParser(add_help=False)
    enclave.add_argument("--govcloud", action="store_true",
                         help="GovCloud tickets only (without it: commercial tickets only, never both)")
    p = argparse.ArgumentParser(prog="gateway", parents=[common],
                                description="Email-driven support ticket gateway")
    p.add_argument("--version", action="version", version=f"gateway {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sv = sub.add_parser("serve", parents=[common], help="run the daemon (SMTP/LMTP listener, sender)")
    sv.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)   # set by the primary
    ing = sub.add_parser("ingest", parents=[common], help="take one message from FILE or stdin")
    ing.add_argument("file", nargs="?", help="RFC 5322 message (default: stdin)")
    ing.add_argument("--recipient", help="envelope recipient, as the MTA passes it")
    ing.add_argument("--sender", help="envelope sender, as the MTA passes it")

    tickets = sub.add_parser("tickets", parents=[common], help="list or show tickets")
    tsub = tickets.add_subparsers(dest="tickets_command", required=True, metavar="list|search|show|attachment")
    tl = tsub.add_parser("list", parents=[common, enclave], help="one row per ticket, newest first")
    tl.add_argument("--status", choices=[s.value for s in Status])
    tl.add_argument("--json", action="store_true")
    tl.add_argument("--assignee", metavar="ADDRESS", help="only the tickets assigned to (owned by) ADDRESS")
    tl.add_argument("--certified-first", action="store_true",
                    help="tickets of certified administrators first (Kaseya), each part newest first")
    tq = tsub.add_parser("search", parents=[common, enclave],
                         help="tickets whose mail or requester holds every word of TEXT, newest first")
    tq.add_argument("text", nargs="+")
    tq.add_argument("--limit", type=int, default=50, help="at most this many tickets (1-500, default 50)")
    tq.add_argument("--json", action="store_true")
    ts = tsub.add_parser("show", parents=[common, enclave], help="one ticket with all its messages")
    ts.add_argument("id", type=int)
    ts.add_argument("--json", action="store_true")
    ta = tsub.add_parser("attachment", parents=[common, enclave],
                         help="a file a ticket's mail carried, by its sha256 (or its first 8+ hex digits)")
    ta.add_argument("id", type=int)
    ta.add_argument("sha256")
    ta.add_argument("--out", metavar="FILE", help="write it to FILE (private, never over an existing file); "
                                                   "default: stdout")

    qu = sub.add_parser("quarantine", parents=[common], help="mail set aside: list, show, retry")
    qsub = qu.add_subparsers(dest="quarantine_command", required=True, metavar="list|show|retry")
    ql = qsub.add_parser("list", parents=[common, enclave], help="one row per quarantined mail, oldest first")
    ql.add_argument("--json", action="store_true")
    qs = qsub.add_parser("show", parents=[common, enclave], help="the raw mail on stdout (--json: error, metadata)")
    qs.add_argument("id", type=int)
    qs.add_argument("--json", action="store_true")
    qr = qsub.add_parser("retry", parents=[common, enclave], help="process the stored mail again")
    qr.add_argument("id", type=int)

    rd = sub.add_parser("run-due", parents=[common], help="run due jobs, deliver the outbox once")
    rd.add_argument("--now", help="ISO-8601 time standing in for the clock")
    ex = sub.add_parser("explain", parents=[common],
                        help="dry run: what the rules decide for a message, and why")
    ex.add_argument("file", help="RFC 5322 message")
    ex.add_argument("--recipient", help="the mailbox it was sent to (default: from its headers)")
    ex.add_argument("--json", action="store_true")
    st = sub.add_parser("stats", parents=[common, enclave], help="first-response and resolution figures")
    st.add_argument("--since", help="ISO-8601 date or time (tickets created from then)")
    st.add_argument("--until", help="ISO-8601 date or time (tickets created before then)")
    st.add_argument("--month", help="YYYY-MM: the tickets created in that month (UTC), with its monthly line")
    st.add_argument("--json", action="store_true")
    rp = sub.add_parser("report", parents=[common, enclave],
                        help="the stats figures per week as charts, in one self-contained HTML file")
    rp.add_argument("--html", required=True, metavar="FILE", help="where to write the page (0600, replaced atomically)")
    rp.add_argument("--since", help="ISO-8601 date or time (tickets created from then)")
    rp.add_argument("--until", help="ISO-8601 date or time (tickets created before then)")
    rp.add_argument("--month", help="YYYY-MM: the tickets created in that month (UTC)")
    sub.add_parser("check-config", parents=[common], help="validate the configuration")
    dr = sub.add_parser("dkim-record", parents=[common],
                        help="the DNS TXT record to publish for each [[dkim]] signing key")
    dr.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # whatever the umask we were started with, what we write (database, its WAL and
    # journal, mail, attachments, outbound files) is for our own user (gateway.app);
    # put back afterwards, for a caller that runs main() in its own process
    umask = os.umask(0o077)
    try:
        return _main(argv)
    finally:
        os.umask(umask)


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    command = args.command
    logs.configure(stream=sys.stdout if command == "serve" else sys.stderr)
    try:
        config = load(getattr(args, "config", None))
    except ConfigError as e:
        for problem in e.problems:
            print(f"gateway: invalid configuration: {problem}", file=sys.stderr)
        return answers.EX_CONFIG
    if command == "check-config":
        from gateway.desk.writer import Desk
        from gateway.outbound.compose import Composer, check_templates, templates
        from gateway.outbound.tokens import TicketTokens
        env = templates(config.templates_dir)
        desk = Desk(config, Composer(ticket_tag=config.ticket_tag, tokens=TicketTokens(b"\0" * 32), env=env))
        problems = [f"template error: {p}" for p in check_templates(env) + desk.answers_problems()]
        problems += [f"invalid configuration: {p}" for p in environment_problems(config)]
        if problems:
            for problem in problems:
                print(f"gateway: {problem}", file=sys.stderr)
            return answers.EX_CONFIG
        print(f"configuration OK ({config.source}): {len(config.mailboxes)} mailbox(es), "
              f"data in {config.data_dir}, {'LMTP' if config.lmtp else 'SMTP'} on "
              f"{config.smtp_host}:{config.smtp_port}, outbound via {config.outbound_transport}")
        return answers.EX_OK
    if command == "dkim-record":
        return _dkim_record(config, args)
    try:
        if command == "serve":
            from gateway import app  # the daemon's parts, imported only where used
            return asyncio.run(app.serve(config, worker=args.worker))
        if command == "ingest":
            return asyncio.run(_ingest(config, args))
        if command == "tickets":
            return asyncio.run(_tickets(config, args))
        if command == "quarantine":
            return asyncio.run(_quarantine(config, args))
        if command == "run-due":
            return asyncio.run(_run_due(config, args))
        if command == "stats":
            return asyncio.run(_stats(config, args))
        if command == "report":
            return asyncio.run(_report(config, args))
        if command == "explain":
            return _explain(config, args)
    except NoDatabase as e:
        print(f"gateway: {e}", file=sys.stderr)
        return EX_NOINPUT
    except StoreUnavailable as e:
        print(f"gateway: store unavailable: {e}", file=sys.stderr)
        return answers.EX_TEMPFAIL
    except BrokenPipeError:
        # `gateway tickets list | head -1`: the reader has gone; end quietly,
        # with the status a shell gives a command killed by SIGPIPE.
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except UsageError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return answers.EX_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if command == "ingest":
            # An MTA bounces mail on any other status: a bug here must not send
            # the customer's mail back to them (sysexits EX_TEMPFAIL defers it).
            print(f"gateway: ingest failed, try again later: {type(e).__name__}: {e}", file=sys.stderr)
            return answers.EX_TEMPFAIL
        raise
    raise AssertionError(command)  # pragma: no cover - argparse restricts commands


def _dkim_record(config: Config, args: argparse.Namespace) -> int:
    """Each signing key's TXT record, as a zone-file line (or JSON): the name
    `<selector>._domainkey.<domain>.` and the value in strings of at most 255
    bytes (RFC 1035 §3.3.14), as DNS servers and provider forms take them."""
    from gateway.outbound.dkim import DkimSigner, public_txt
    records: list[dict[str, Any]] = []
    for keys in config.dkim_keys.values():
        for key in keys:
            signer = DkimSigner(key)
            value = public_txt(key.private_key_pem).decode("ascii")
            records.append({"domain": key.domain, "selector": key.selector, "algorithm": signer.algorithm,
                            "bits": signer.bits, "name": f"{key.selector}._domainkey.{key.domain}.",
                            "value": value, "strings": [value[i:i + 255] for i in range(0, len(value), 255)]})
    if not records:
        print(f"gateway: no [[dkim]] keys in {config.source}: mail goes out unsigned", file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=2))
        return answers.EX_OK
    for r in records:
        print(f"; {r['domain']}: {r['algorithm']}, {r['bits']} bits")
        strings: list[str] = r["strings"]
        print(f"{r['name']} IN TXT ( " + " ".join(f'"{part}"' for part in strings) + " )")
    return answers.EX_OK


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush
    does not raise again on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


class NoDatabase(Exception):
    """A read-only command found no database: it never creates one."""


EX_NOINPUT = 66   # sysexits.h: cannot open input


async def _open_existing(config: Config) -> Store:
    """The store, for a command that only reads it (or reads before it writes):
    a missing SQLite file means a wrong --config, not an empty desk."""
    if config.store_url.startswith("sqlite:///"):
        path = Path(config.store_url[len("sqlite:///"):])
        if not path.exists():
            raise NoDatabase(f"no database at {path}: is --config right?")
    return await open_store(config.store_url, config.busy_timeout_ms, config.token_secret_path)


# -- ingest ---------------------------------------------------------------

def ingest_recipient(config: Config, raw: bytes, recipient: str | None) -> str | None:
    """The mailbox a piped mail is for: --recipient, else the first
    configured mailbox among Delivered-To, To, Cc."""
    if recipient is not None:
        mb = config.mailbox_for(recipient)
        return mb.address if mb else None
    headers = BytesHeaderParser().parsebytes(raw)
    for name in ("Delivered-To", "To", "Cc"):
        for _, addr in getaddresses([str(v) for v in headers.get_all(name, [])]):
            mb = config.mailbox_for(addr)
            if mb:
                return mb.address
    return None


def _read_message(path: str | None, limit: int) -> bytes:
    """At most `limit` bytes of the message (FILE or stdin): never more than
    max_message_size + 1 in memory, enough to tell it is too big."""
    with open(path, "rb") if path else contextlib.nullcontext(sys.stdin.buffer) as f:
        return f.read(limit)


async def _ingest(config: Config, args: argparse.Namespace) -> int:
    try:
        raw = _read_message(args.file, config.max_message_size + 1)
    except OSError as e:
        print(f"gateway: cannot read message: {e}", file=sys.stderr)
        return answers.EX_TEMPFAIL if args.file is None else answers.EX_DATAERR
    if len(raw) > config.max_message_size:
        # what serve answers with 552; sysexits has no "too big": EX_DATAERR, a bounce
        print(f"gateway: message refused: over max_message_size ({config.max_message_size} bytes)",
              file=sys.stderr)
        return answers.EX_DATAERR
    address = ingest_recipient(config, raw, args.recipient)
    if address is None:
        print(f"gateway: no such mailbox: {args.recipient or '(none in Delivered-To/To/Cc)'}",
              file=sys.stderr)
        return answers.EX_NOUSER
    mailbox = config.mailbox_for(address)
    assert mailbox is not None
    from gateway import app
    from gateway.desk.pipeline import Received
    from gateway.inbound.intake import OverLimit
    gw = await app.open_gateway(config)
    try:
        try:
            outcome = await gw.intake.receive(Received(
                raw=raw, mail_from=args.sender, rcpt_to=(args.recipient or address,), mailbox=mailbox,
                received_at=gw.clock()), refuse_over_limits=True)
        except OverLimit as e:
            # [limits]: what serve refuses with 554 5.6.0 (gateway.inbound.smtp)
            print(f"gateway: message refused: {e}", file=sys.stderr)
            return answers.EX_DATAERR
        if outcome.queued:
            # What serve would do next: send the answers now; what fails stays queued.
            try:
                await asyncio.wait_for(gw.sender.deliver_due(), INGEST_SEND_TIMEOUT_S)
            except TimeoutError:
                pass
    finally:
        await gw.close()
    print(json.dumps({"action": outcome.action, "ticket_id": outcome.ticket_id}))
    return answers.EX_OK


# -- explain --------------------------------------------------------------

def _explain(config: Config, args: argparse.Namespace) -> int:
    """The rules stage on one message, with its evidence. Opens no store:
    it cannot write anything or send anything."""
    from gateway.mail.automatic import automatic_kind
    from gateway.mail.bounce import read_bounce
    from gateway.mail.parse import parse_mail
    from gateway.mail.subject import problem_key, tagged_ticket_id
    from gateway.rules import process
    from gateway.rules.decision import decide
    try:
        raw = Path(args.file).read_bytes()
    except OSError as e:
        print(f"gateway: cannot read message: {e}", file=sys.stderr)
        return answers.EX_DATAERR
    address = ingest_recipient(config, raw, args.recipient) or config.mailboxes[0].address
    mailbox = config.mailbox_for(address)
    assert mailbox is not None
    mail = parse_mail(raw)
    now = datetime.now(UTC)
    decision = decide(mail, mailbox_address=mailbox.address, mailbox_govcloud=mailbox.govcloud,
                      rules=config.rules, directory=config.rules.directory, now=now,
                      mailbox_emergency=mailbox.emergency)
    out: dict[str, Any] = {"message_id": mail.message_id, "from": mail.sender, "subject": mail.subject,
           "mailbox": mailbox.address, "at": iso(now),
           "automatic": automatic_kind(mail.headers, sender=mail.sender, mail_from=None,
                                       content_types=mail.content_types),
           "ticket_tag": tagged_ticket_id(mail.subject, config.ticket_tag),
           "answers": list(mail.thread_ids),
           "redirect_to": config.redirects.get(decision.redirect) if decision.redirect else None,
           "decision": decision.to_json(),
           "process": process.explain(f"{mail.subject}\n{mail.reply_text}", mail.reply_text),
           "lifecycle": config.policy_for(mailbox.address, decision.plan).to_json(),
           # one ticket per problem: a new mail with this key joins the sender's open ticket of the same key
           "same_problem": {"key": problem_key(mail.subject, config.ticket_tag),
                            "within_hours": config.same_problem_within.total_seconds() / 3600}}
    # how a bounce is read (gateway.mail.bounce): which addresses it stops, which it only delays
    bounce = read_bounce(raw).to_json() if out["automatic"] == "bounce" else None
    out["bounce"] = bounce
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
        return answers.EX_OK
    d = decision
    _say(f"Message {mail.message_id} from {mail.sender or '(none)'} to {mailbox.address}")
    _say(f"  subject: {mail.subject}")
    if out["automatic"]:
        _say(f"  automatic mail ({out['automatic']}): never answered; makes no ticket unless it belongs to one")
    if bounce is not None:
        _say(f"  bounce: failed for good {', '.join(bounce['failed']) or '-'};"
             f" only delayed {', '.join(bounce['delayed']) or '-'}")
    if out["ticket_tag"] is not None or mail.thread_ids:
        _say(f"  threading: tag #{out['ticket_tag']}, answers {len(mail.thread_ids)} message(s)"
              " (a reply joins its ticket when it answers one of its messages, or carries the"
              " tag from a participant)")
    _say(f"  region    {d.region:<10} queue {d.queue}")
    _say(f"  govcloud  {str(d.govcloud).lower():<10}")
    _say(f"  priority  P{d.priority}")
    _say(f"  plan      {d.plan:<10} first response due {iso(d.response_due) or 'no target'}")
    _say(f"  redirect  {d.redirect or '-':<10} {('to ' + str(out['redirect_to'])) if out['redirect_to'] else ''}")
    _say(f"  missing   {', '.join(d.missing) or '-'}")
    _say("evidence (the first line of each part decided it):")
    for ev in d.evidence:
        _say(f"  {ev.part:<9} {ev.rule:<28} {ev.detail}")
    for p in out["process"]:
        _say(f"  process   {p['rule']:<28} {p['language']} wording {p['phrase']!r}")
    _say(f"  lifecycle {_lifecycle_text(out['lifecycle'])}")
    sp = out["same_problem"]
    _say(f"  problem   {sp['key']!r}: a new mail joins the sender's open ticket of this subject within "
         f"{sp['within_hours']:g} h" if sp["key"] and sp["within_hours"] else
         "  problem   - (no subject, or [threading] same_problem_hours = 0): a new mail opens a new ticket")
    return answers.EX_OK


def _lifecycle_text(lc: dict[str, Any]) -> str:
    reminders = ", ".join(f"{h:g} h" for h in lc["reminder_after_hours"]) or "none"
    return (f"pending: reminders at {reminders}, {lc['no_reply']} at {lc['autoclose_after_hours']:g} h; "
            f"reopen within {lc['reopen_days']:g} days ({lc['from']})")


# -- quarantine -----------------------------------------------------------

async def _quarantine(config: Config, args: argparse.Namespace) -> int:
    """`quarantine list|show|retry` (gateway.inbound.quarantine). Exit 1: no such quarantined
    mail; retry exits 65 (EX_DATAERR) when the mail fails again and stays quarantined."""
    from gateway import app
    from gateway.inbound import quarantine
    from gateway.store.blobs import Blobs
    if args.quarantine_command == "retry":
        gw = await app.open_gateway(config)
        try:
            _in_enclave(config, args, await quarantine.entry(gw.store, args.id))
            result = await quarantine.retry(gw, args.id)
        except quarantine.NotQuarantined as e:
            print(f"gateway: no quarantined mail {e}", file=sys.stderr)
            return 1
        finally:
            await gw.close()
        print(json.dumps(result.to_json(), ensure_ascii=False))
        if result.outcome.action == "not_quarantined":
            # another retry won the race inside its transaction: the same answer as
            # finding it no longer quarantined before starting
            print(f"gateway: no quarantined mail {args.id}: already processed", file=sys.stderr)
            return 1
        return answers.EX_OK if result.processed else answers.EX_DATAERR
    store = await _open_existing(config)
    try:
        if args.quarantine_command == "list":
            rows = [r for r in await quarantine.entries(store) if _quarantine_enclave(config, r) == args.govcloud]
            print(json.dumps(rows, ensure_ascii=False) if args.json else safe(quarantine.table(rows)))
            return answers.EX_OK
        try:
            entry = _in_enclave(config, args, await quarantine.entry(store, args.id))
            raw = None if args.json else await quarantine.raw_bytes(store, Blobs(config.data_dir), args.id)
        except (quarantine.NotQuarantined, OSError) as e:
            print(f"gateway: no quarantined mail {args.id}: {e}", file=sys.stderr)
            return 1
    finally:
        await store.close()
    if raw is None:
        print(json.dumps(entry, ensure_ascii=False))
    else:
        sys.stdout.buffer.write(raw)
        sys.stdout.buffer.flush()
    return answers.EX_OK


def _quarantine_enclave(config: Config, row: dict[str, Any]) -> bool:
    """A quarantined mail is GovCloud's when it was sent to a GovCloud mailbox."""
    mailbox = config.mailbox_for(row["mailbox"])
    return mailbox is not None and mailbox.govcloud


def _in_enclave(config: Config, args: argparse.Namespace, row: dict[str, Any]) -> dict[str, Any]:
    """The quarantined mail, when it is of the enclave the command names (--govcloud or not)."""
    from gateway.inbound import quarantine
    if _quarantine_enclave(config, row) != args.govcloud:
        raise quarantine.NotQuarantined(f"{row['id']} ({_enclave_name(args.govcloud)} quarantine)")
    return row


def _enclave_name(govcloud: bool) -> str:
    return "GovCloud" if govcloud else "commercial"


# -- tickets --------------------------------------------------------------

async def _tickets(config: Config, args: argparse.Namespace) -> int:
    store = await _open_existing(config)
    try:
        if args.tickets_command == "list":
            rows = await store.tickets(args.status, certified_first=args.certified_first,
                                       assignee=normalize_address(args.assignee) if args.assignee else None,
                                       govcloud=args.govcloud)
            if args.json:
                print(json.dumps([ticket_json(t) for t in rows], ensure_ascii=False))
            else:
                _print_table(rows)
            return answers.EX_OK
        if args.tickets_command == "search":
            terms = search_terms(" ".join(args.text))
            if not terms or not 1 <= args.limit <= 500:
                print("gateway: tickets search needs a word to look for and --limit 1-500", file=sys.stderr)
                return answers.EX_USAGE
            rows = await store.search(terms, args.limit, govcloud=args.govcloud)
            if args.json:
                print(json.dumps([ticket_json(t) for t in rows], ensure_ascii=False))
            else:
                _print_table(rows)
            return answers.EX_OK
        ticket = await store.ticket(args.id)
        if ticket is None or ticket.govcloud != args.govcloud:
            # the enclaves never mix: a GovCloud ticket is shown with --govcloud only
            print(f"gateway: no ticket #{args.id} among the {_enclave_name(args.govcloud)} tickets"
                  f"{'' if args.govcloud else ' (GovCloud tickets: --govcloud)'}", file=sys.stderr)
            return 1
        messages = await store.messages(ticket.id)
        if args.tickets_command == "attachment":
            return _attachment(config, ticket.id, messages, args.sha256, args.out)
        decision = await store.decision(ticket.id)
        events = await store.events(ticket.id)
    finally:
        await store.close()
    lc = config.policy_for(ticket.mailbox, ticket.plan).to_json()
    if args.json:
        print(json.dumps({**ticket_json(ticket), "lifecycle": lc, "decision": decision, "events": events,
                          "messages": messages}, ensure_ascii=False))
    else:
        _print_ticket(ticket, messages, events, lc, decision)
    return answers.EX_OK


def _attachment(config: Config, ticket_id: int, messages: list[dict[str, Any]], digest: str,
                out: str | None) -> int:
    """`tickets attachment ID SHA256`: the bytes of one of the ticket's files, found
    by its digest among the ticket's own attachments only (a digest of another
    ticket's file gives nothing), read from the content-addressed store."""
    from gateway.store.blobs import Blobs
    wanted = digest.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", wanted):
        print("gateway: tickets attachment needs the file's sha256 (at least its first 8 hex digits)",
              file=sys.stderr)
        return answers.EX_USAGE
    found = {a["sha256"]: a for m in messages for a in m["attachments"] if a["sha256"].startswith(wanted)}
    if len(found) != 1:
        print(f"gateway: ticket #{ticket_id} has {'no' if not found else 'more than one'} attachment "
              f"with sha256 {wanted}...", file=sys.stderr)
        return 1
    (sha, meta), = found.items()
    try:
        content = Blobs(config.data_dir).read("attachments", sha)
    except OSError as e:
        print(f"gateway: the stored file of {safe(meta['filename'])} is missing: {e}", file=sys.stderr)
        return answers.EX_IOERR
    if out is None:
        sys.stdout.buffer.write(content)
        sys.stdout.buffer.flush()
        return answers.EX_OK
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        print(f"gateway: cannot write {out}: {e.strerror}", file=sys.stderr)
        return answers.EX_CANTCREAT
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    print(f"{safe(meta['filename'])}: {len(content)} bytes written to {out}", file=sys.stderr)
    return answers.EX_OK


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def safe(text: object) -> str:
    """Text for a terminal: control characters (ESC, BEL, C1 controls such as CSI,
    bidi overrides) shown as escapes, never sent: a mail's body must not be able
    to move the cursor, retitle the window or rewrite what was printed before."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), str(text))


def _say(text: str) -> None:
    print(safe(text))


def _print_table(rows: list[Ticket]) -> None:
    _say(f"{'ID':>6}  {'STATUS':<8}  {'P':<2} {'REGION':<9} {'CREATED':<20}  {'REQUESTER':<30}  SUBJECT")
    for t in rows:
        region = t.region + ("/GOV" if t.govcloud else "")
        created = iso(t.created_at)[:19].replace("T", " ")  # type: ignore[index]
        _say(f"{t.id:>6}  {t.status.value:<8}  {t.priority:<2} {region:<9} {created:<20}  "
              f"{t.requester[:30]:<30}  {t.subject[:60]}")
    _say(f"({len(rows)} ticket{'s' if len(rows) != 1 else ''})")


def _print_ticket(t: Ticket, messages: list[dict[str, Any]], events: list[dict[str, Any]],
                  lifecycle: dict[str, Any], decision: dict[str, Any] | None = None) -> None:
    _say(f"Ticket #{t.id}: {t.subject}")
    _say(f"  status {t.status.value}, priority {t.priority}, region {t.region}"
          f"{', GovCloud' if t.govcloud else ''}, mailbox {t.mailbox}")
    _say(f"  requester {t.requester}" + (f", cc {', '.join(t.cc)}" if t.cc else ""))
    if t.linked_ticket:
        _say(f"  follows up ticket #{t.linked_ticket}")
    _say(f"  created {iso(t.created_at)}")
    _say(f"  lifecycle {_lifecycle_text(lifecycle)}")
    if t.contact:
        _say(f"  contact {t.contact}" + (" (ranked first)" if t.contact == "certified" else ""))
    if t.escalated:
        _say(f"  escalated to tier {t.tier} by {t.escalated_by} at {iso(t.escalated_at)}, "
             f"queue {t.escalation_queue}; owner {t.owner or '(none yet)'}")
    for e in events:
        detail = ", ".join(f"{k} {v}" for k, v in e.items() if k not in ("at", "rule"))
        _say(f"  [{e['at']}] {e['rule']}: {detail}")
    if decision:
        _say("  rules decision (the first line of each part decided it):")
        for ev in decision.get("evidence", []):
            _say(f"    {ev['part']:<9} {ev['rule']:<28} {ev['detail']}")
        if "language" in decision:
            _say(f"    {'language':<9} {decision['language']['value']:<28} {decision['language']['why']}")
    for m in messages:
        arrow = "<-" if m["direction"] == "in" else "->"
        _say(f"\n{arrow} {m['created_at']}  {m['kind']}  from {m['from']} to {', '.join(m['to'])}")
        _say(f"   {m['subject']}")
        for a in m["attachments"]:
            _say(f"   [attachment] {a['filename']} ({a['size']} bytes, sha256 {a['sha256'][:12]}...)")
        if m["direction"] == "in":
            _say("   " + m["reply_text"].replace("\n", "\n   "))


# -- run-due and stats ----------------------------------------------------

class UsageError(Exception):
    pass


def when(option: str, value: str) -> datetime:
    """An ISO-8601 date or time from the command line; UTC when it has no offset."""
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{option}: not an ISO-8601 date or time: {value!r}") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _period(args: argparse.Namespace) -> tuple[datetime | None, datetime | None]:
    """--since/--until or --month, as `stats` and `report` take them."""
    since = when("--since", args.since) if args.since else None
    until = when("--until", args.until) if args.until else None
    if args.month:
        if since or until:
            raise UsageError("--month: give either --month or --since/--until")
        since, until = month_span(args.month)
    return since, until


async def _figures(config: Config, since: datetime | None, until: datetime | None,
                   month: str | None, govcloud: bool) -> tuple[dict[str, Any], list[Ticket]]:
    """What `gateway stats --json` prints for the period, and the period's tickets, of
    one enclave (commercial, or GovCloud with --govcloud)."""
    store = await _open_existing(config)
    try:
        tickets = await store.tickets_created(since, until, govcloud)
        open_now = await store.count_unresolved(govcloud)
        first_by, answered, owning = await store.agent_activity(since, until, govcloud)
    finally:
        await store.close()
    rep = stats.report(tickets)
    rep = {"since": iso(since), "until": iso(until), "month": month, "govcloud": govcloud,
           "open_now": open_now, **rep,
           "by_agent": stats.by_agent(tickets, first_by, answered, owning),
           "summary": stats.month_line(month, rep) if month else None}
    return rep, tickets


async def _stats(config: Config, args: argparse.Namespace) -> int:
    rep, _ = await _figures(config, *_period(args), args.month, args.govcloud)
    print(json.dumps(rep) if args.json else stats.table(rep))
    return answers.EX_OK


async def _report(config: Config, args: argparse.Namespace) -> int:
    from gateway.desk import report  # plotly, imported only where used
    since, until = _period(args)
    target = Path(args.html)
    if not target.parent.is_dir():
        print(f"gateway: --html: no such directory: {target.parent}", file=sys.stderr)
        return answers.EX_CANTCREAT
    rep, tickets = await _figures(config, since, until, args.month, args.govcloud)
    weeks = stats.weekly(tickets, since, until)
    try:
        write_atomic(target, report.page(rep, weeks).encode())   # 0600, replaced atomically
    except OSError as e:
        print(f"gateway: --html: cannot write {target}: {e.strerror or e}", file=sys.stderr)
        return answers.EX_CANTCREAT
    print(json.dumps({"html": str(target), "tickets": rep["tickets"], "weeks": len(weeks),
                      "since": rep["since"], "until": rep["until"], "month": rep["month"]}))
    return answers.EX_OK


def month_span(value: str) -> tuple[datetime, datetime]:
    """`--month 2025-12`: from its first day to the next month's, in UTC."""
    m = re.fullmatch(r"(\d{4})-(\d{2})", value)
    if m is None or not 1 <= int(m[2]) <= 12:
        raise UsageError(f"--month: expected YYYY-MM, got {value!r}")
    year, month = int(m[1]), int(m[2])
    start = datetime(year, month, 1, tzinfo=UTC)
    return start, datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


async def _run_due(config: Config, args: argparse.Namespace) -> int:
    clock = fixed_clock(when("--now", args.now)) if args.now else system_clock
    from gateway import app
    gw = await app.open_gateway(config, clock)
    try:
        jobs = await gw.scheduler.run_due()
        sent = await gw.sender.deliver_due()
        counts = await gw.store.outbox_counts()
    finally:
        await gw.close()
    print(json.dumps({"now": iso(clock()), "jobs": jobs, "sent": sent, "outbox": counts}))
    return answers.EX_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
