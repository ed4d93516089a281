"""Rendering the gateway's own mail: templates in, finished bytes out.

A mail is rendered once, when its outbox row is written, so that every
retry sends the same bytes with the same Message-ID (a receiver can then
drop a duplicate delivery). Headers follow CONTRACT.md: the ticket tag in
the subject, our Message-ID with the ticket token, In-Reply-To/References
to the message answered, and `Auto-Submitted` on everything automatic
(RFC 3834 §5: `auto-replied` for a direct answer, `auto-generated` for the
rest), with `X-Auto-Response-Suppress` and `Precedence: bulk` so that
Exchange and vacation programs don't answer it.

Templates live in `gateway/templates/<language>/<kind>.txt` (and `.html`
for the HTML alternative): English, German and Japanese, English standing in
for a file a language lacks (staff mail is English only). Operators override
any file from a folder of their own with the same layout (`override_dir`),
and `check_templates` renders every one with sample data before they go
live. A mailbox domain with a DKIM key gets its mail signed right after
rendering (`gateway.outbound.dkim`), so the outbox holds the signed bytes.
"""
from __future__ import annotations

import email.policy
import secrets
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email import encoders
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr
from pathlib import Path
from types import MappingProxyType
from typing import Any

from jinja2 import (
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    PackageLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateSyntaxError,
    select_autoescape,
)

from gateway.mail.parse import one_line
from gateway.mail.reply import REPLY_MARKER
from gateway.mail.subject import clean_subject
from gateway.model import UNTICKETED_KINDS, Attachment, Kind, Status, Ticket
from gateway.outbound.dkim import RSA, DkimKey, DkimSigner, sign_all, signers_for
from gateway.outbound.tokens import TicketTokens
from gateway.rules.language import primary

# RFC 3834 §5: a direct answer to the mail received is `auto-replied` (the ack, and
# the answer to a refused contact); every other automatic mail `auto-generated`
AUTO_SUBMITTED = {Kind.ACK: "auto-replied", Kind.CONTACT_REFUSED: "auto-replied", Kind.STAFF_REPLY: None}
# The stdlib's compat32 MIME classes build a mail about four times faster than
# EmailMessage (measured: 0.37 ms against 1.5 ms for the acknowledgement), and
# this is the intake's hot path. compat32 does not refuse line breaks in header
# values, so every header goes through `Headers`, which makes them one line.
# Lines may run to RFC 5322's 998 characters: folding at 78 would RFC 2047-encode
# a long Message-ID in In-Reply-To/References, and no mail client threads on that.
POLICY = email.policy.compat32.clone(linesep="\r\n", max_line_length=998)
_UTF8 = Charset("utf-8")
_UTF8.body_encoding = QP
_UTF8.header_encoding = QP
# Text that is mostly not ASCII (Japanese) goes base64: quoted-printable would
# make it three times its size, unreadable either way, and takes three times
# as long to encode. English and German stay quoted-printable, readable raw.
_UTF8_BASE64 = Charset("utf-8")
_UTF8_BASE64.header_encoding = QP
REFERENCES_MAX = 900
DEFAULT_AUTO = "auto-generated"


@dataclass(frozen=True)
class Outgoing:
    """A rendered mail and its envelope, ready for the outbox."""

    kind: Kind
    relay: str                     # "default" or "govcloud"
    mail_from: str                 # envelope sender
    rcpt_to: tuple[str, ...]
    message_id: str
    subject: str
    body_text: str
    content: bytes


class Headers:
    """Sets header values on a compat32 message: one line each, RFC 2047 only when needed."""

    def __init__(self, msg: Message):
        self.msg = msg

    def __setitem__(self, name: str, value: str) -> None:
        value = one_line(value)
        self.msg[name] = value if value.isascii() else Header(value, _UTF8, header_name=name).encode()


def _address(name: str, address: str) -> str:
    """`Name <address>`, the name quoted or RFC 2047-encoded as it needs (RFC 5322 §3.4)."""
    return formataddr((name, address), charset=_UTF8) if name else address


def _text_part(text: str, subtype: str) -> Message:
    extra = len(text.encode("utf-8")) - len(text)      # 2 bytes more per kana or kanji
    # MIMEText takes a Charset object (and uses its body encoding); typeshed says str
    part = MIMEText(text, subtype, _UTF8_BASE64 if extra > len(text) // 2 else _UTF8)  # type: ignore[arg-type]
    del part["MIME-Version"]          # once, on the whole message
    return part


def _multipart(subtype: str, parts: Sequence[Message]) -> Message:
    container = MIMEMultipart(subtype, _subparts=list(parts))
    del container["MIME-Version"]
    return container


def _attachment(att: Attachment, content: bytes) -> Message:
    maintype, _, subtype = att.content_type.partition("/")
    part = MIMEBase(maintype or "application", subtype or "octet-stream")
    del part["MIME-Version"]
    part.set_payload(content)
    encoders.encode_base64(part)
    part.add_header("Content-Disposition", "attachment", filename=("utf-8", "", one_line(att.filename, 255)))
    return part


def references(thread: Sequence[str]) -> str:
    """The References value: the whole thread, or when it is too long the
    first ID and as many of the latest as fit (RFC 5322 §3.6.4 allows trimming)."""
    ids = [m for m in thread if len(m) < REFERENCES_MAX // 2]
    if not ids:
        return thread[-1]
    kept = [ids[-1]]
    for mid in reversed(ids[1:-1]):
        if len(" ".join([ids[0], mid, *kept])) > REFERENCES_MAX:
            break
        kept.insert(0, mid)
    return " ".join(dict.fromkeys([ids[0], *kept]))


FALLBACK_LANGUAGE = "en"
_NO_KEYS: Mapping[str, Sequence[DkimKey]] = MappingProxyType({})


def templates(override_dir: Path | None = None) -> Environment:
    """The template environment, built once per process (templates compile once).

    With `override_dir`, a file there (same layout: `de/ack.txt`) wins over
    the package's. Templates are read once: after editing one, run
    `gateway check-config` and restart, so that what runs is what was checked.
    """
    package = PackageLoader("gateway", "templates")
    loader = package if override_dir is None else \
        ChoiceLoader([FileSystemLoader(str(override_dir)), package])
    return Environment(
        loader=loader,
        autoescape=select_autoescape(enabled_extensions=("html",), default=False),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        auto_reload=False,
    )


def _override_loader(env: Environment) -> FileSystemLoader | None:
    loader = env.loader
    if isinstance(loader, ChoiceLoader) and loader.loaders and isinstance(loader.loaders[0], FileSystemLoader):
        return loader.loaders[0]
    return None


class Composer:
    def __init__(self, *, ticket_tag: str, tokens: TicketTokens, env: Environment | None = None,
                 override_dir: Path | None = None, dkim_keys: Mapping[str, Sequence[DkimKey]] = _NO_KEYS):
        """`override_dir`: the operators' template folder; `dkim_keys`: signing keys by
        domain (`gateway.config.parse_dkim`). A key that can't be used raises ValueError."""
        if env is not None and override_dir is not None:
            raise ValueError("give the template folder either as env or as override_dir")
        self.ticket_tag = ticket_tag
        self.tokens = tokens
        self.env = env or templates(override_dir)
        self._names = frozenset(self.env.list_templates())
        override = _override_loader(self.env)
        self._overridden = frozenset(override.list_templates()) if override else frozenset()
        self._chosen: dict[tuple[str, str], tuple[str, Template, Template | None]] = {}
        # RSA first: its header goes on top, where verifiers that know no Ed25519 look
        self._signers = {domain.lower().rstrip("."): tuple(sorted((DkimSigner(k) for k in domain_keys),
                                                                 key=lambda s: s.algorithm != RSA))
                         for domain, domain_keys in dkim_keys.items()}

    def tag_text(self, ticket_id: int) -> str:
        return f"[{self.ticket_tag} #{ticket_id}]"

    def subject(self, ticket: Ticket) -> str:
        return one_line(f"{self.tag_text(ticket.id)} {clean_subject(ticket.subject, self.ticket_tag)}")

    def templates_for(self, name: str, language: str) -> tuple[str, Template, Template | None]:
        """The language used, the text template and the HTML one (None: text only) for
        template `name` in `language`, English when that language has no such file.

        The text decides: an operator who overrides `de/ack.txt` without
        `de/ack.html` gets text-only mail, not the package's HTML with
        wording they replaced (most clients would show only that HTML).
        """
        key = (name, language)
        found = self._chosen.get(key)
        if found is None:
            lang = primary(language) or FALLBACK_LANGUAGE
            for candidate in dict.fromkeys((lang, FALLBACK_LANGUAGE)):
                text_name, html_name = f"{candidate}/{name}.txt", f"{candidate}/{name}.html"
                if text_name in self._names:
                    break
            else:
                raise LookupError(f"no template {name}.txt for {language!r} or {FALLBACK_LANGUAGE!r}")
            html = html_name in self._names and \
                (text_name not in self._overridden or html_name in self._overridden)
            found = (candidate, self.env.get_template(text_name),
                     self.env.get_template(html_name) if html else None)
            self._chosen[key] = found
        return found

    def context(self, ticket: Ticket, mailbox: str, language: str,
                context: Mapping[str, Any]) -> dict[str, Any]:
        """What every template gets, then the caller's `context`."""
        return {"ticket": ticket, "mailbox": mailbox, "tag_text": self.tag_text(ticket.id),
                "subject": clean_subject(ticket.subject, self.ticket_tag) or "(no subject)",
                "team": f"{self.ticket_tag} team", "ticket_tag": self.ticket_tag,
                "marker": REPLY_MARKER, "language": language, **context}

    def compose(self, kind: Kind, *, ticket: Ticket, mailbox: str, to: Sequence[str],
                answers: Sequence[str], now: datetime, context: Mapping[str, Any],
                reply_to: str | None = None, cc: Sequence[str] = (), template: str | None = None,
                from_name: str | None = None,
                attachments: Sequence[tuple[Attachment, bytes]] = (),
                language: str = FALLBACK_LANGUAGE, staff_to: str | None = None) -> Outgoing:
        """Render template `kind` (or `template`) for `ticket`, from `mailbox` to `to`.

        `answers` is the thread: the Message-IDs this mail answers, oldest
        first; the last is In-Reply-To, all of them References. `from_name`
        is the display name (an agent's name); the address is always the
        mailbox's, never the agent's own. `language` picks the templates
        (English where that language has none) and `Content-Language`.
        `staff_to`: the staff address this mail goes to; its Message-ID then
        carries that address's staff token (`gateway.outbound.tokens`).
        """
        used, text_template, html_template = self.templates_for(template or kind.value, language)
        ctx = self.context(ticket, mailbox, used, context)
        text = text_template.render(ctx)
        html = html_template.render(ctx) if html_template is not None else None
        message_id = self.tokens.message_id(ticket.id, mailbox.rpartition("@")[2], staff=staff_to)
        return self._finish(kind, text=text, html=html, language=used, mailbox=mailbox, to=to, cc=cc,
                            subject=self.subject(ticket), message_id=message_id, answers=answers, now=now,
                            reply_to=reply_to, from_name=from_name, attachments=attachments,
                            ticket_id=ticket.id, govcloud=ticket.govcloud)

    def unticketed_context(self, mailbox: str, language: str, subject: str,
                           context: Mapping[str, Any]) -> dict[str, Any]:
        """What a template of mail about no ticket (`UNTICKETED_KINDS`) gets: no
        `ticket`, no tag, no reply marker (there is nothing to reply to)."""
        return {"mailbox": mailbox, "subject": clean_subject(subject, self.ticket_tag) or "(no subject)",
                "team": f"{self.ticket_tag} team", "ticket_tag": self.ticket_tag, "language": language,
                **context}

    def compose_unticketed(self, kind: Kind, *, mailbox: str, to: str, subject: str,
                           answers: Sequence[str], now: datetime, context: Mapping[str, Any],
                           language: str = FALLBACK_LANGUAGE, govcloud: bool = False) -> Outgoing:
        """Render template `kind` as mail about no ticket (the answer to someone
        refused as no authorised contact): the subject is the mail's own under
        `[<ticket_tag>]` with no number, the Message-ID carries no ticket token
        (an answer to it threads to nothing), no `X-Support-Ticket`; otherwise the
        headers of every automatic answer (`Auto-Submitted: auto-replied`,
        `X-Auto-Response-Suppress`, `Precedence: bulk`, In-Reply-To/References)."""
        used, text_template, html_template = self.templates_for(kind.value, language)
        ctx = self.unticketed_context(mailbox, used, subject, context)
        text = text_template.render(ctx)
        html = html_template.render(ctx) if html_template is not None else None
        shown = one_line(f"[{self.ticket_tag}] {ctx['subject']}")
        return self._finish(kind, text=text, html=html, language=used, mailbox=mailbox, to=[to], cc=(),
                            subject=shown, message_id=f"<{secrets.token_hex(16)}@{mailbox.rpartition('@')[2]}>",
                            answers=answers, now=now, ticket_id=None, govcloud=govcloud)

    def _finish(self, kind: Kind, *, text: str, html: str | None, language: str, mailbox: str,
                to: Sequence[str], cc: Sequence[str], subject: str, message_id: str,
                answers: Sequence[str], now: datetime, ticket_id: int | None, govcloud: bool,
                reply_to: str | None = None, from_name: str | None = None,
                attachments: Sequence[tuple[Attachment, bytes]] = ()) -> Outgoing:
        """The rendered text (and HTML) as a finished, signed mail with its headers."""
        domain = mailbox.rpartition("@")[2]
        body: Message = _text_part(text, "plain") if html is None else \
            _multipart("alternative", [_text_part(text, "plain"), _text_part(html, "html")])
        msg = _multipart("mixed", [body, *(_attachment(a, c) for a, c in attachments)]) \
            if attachments else body
        msg["MIME-Version"] = "1.0"
        headers = Headers(msg)
        headers["From"] = _address(one_line(from_name or self.ticket_tag, 200), mailbox)
        headers["To"] = ", ".join(to)
        if cc:
            headers["Cc"] = ", ".join(cc)
        if reply_to:
            headers["Reply-To"] = reply_to
        headers["Subject"] = subject
        headers["Date"] = format_datetime(now)
        headers["Message-ID"] = message_id
        thread = [m for m in answers if m]
        if thread:
            headers["In-Reply-To"] = thread[-1]
            headers["References"] = references(thread)
        # RFC 3282: the language of the text, for screen readers and clients
        # that offer translation; an agent's relayed text may be in another
        headers["Content-Language"] = language
        auto = AUTO_SUBMITTED.get(kind, DEFAULT_AUTO)
        if auto:
            headers["Auto-Submitted"] = auto
            headers["X-Auto-Response-Suppress"] = "All"
            headers["Precedence"] = "bulk"
        if ticket_id is not None:
            headers["X-Support-Ticket"] = str(ticket_id)
        content = msg.as_bytes(policy=POLICY)
        signers = signers_for(self._signers, domain) if self._signers else ()
        if signers:
            content = sign_all(signers, content, timestamp=int(now.timestamp()))
        return Outgoing(kind=kind, relay="govcloud" if govcloud else "default",
                        mail_from=mailbox, rcpt_to=tuple(to) + tuple(cc), message_id=message_id,
                        subject=subject, body_text=text, content=content)


# -- checking templates before they go live -----------------------------------

_SAMPLE_TICKET = Ticket(
    id=1042, subject="Re: Backup fails with error 0x80040115 <script>", status=Status.RESOLVED,
    requester="ann@customer.example", cc=("bob@customer.example",), region="EMEA", govcloud=True,
    priority=2, mailbox="support@example.com", linked_ticket=1041,
    created_at=datetime(2026, 11, 23, 9, 0, tzinfo=UTC), plan="Professional",
    missing=("account_email", "organisation"), category="backup", product="Cloud Backup <M365>")
SAMPLE_TICKET = _SAMPLE_TICKET      # for other checks of templates (canned answers)
_LEAN_TICKET = replace(_SAMPLE_TICKET, status=Status.CLOSED, cc=(), govcloud=False, linked_ticket=None,
                       subject="", plan="", missing=())
_NOTICE = {"hours_left": 24, "hours": 48, "reopen_days": 7, "resolve": False}
_RESOLVE = {**_NOTICE, "hours_left": 48, "hours": 168, "resolve": True}   # [lifecycle] no_reply = "resolve"
_ATTACHMENT = Attachment("backup log.txt", "text/plain", 1200, "0" * 64)

# Per template, the contexts its callers pass (desk.py, pipeline.py,
# scheduler.py): a rich one and a lean one, so that both sides of an `if` run.
# A template that uses a variable its caller does not give fails here, as it
# would in production.
SAMPLE_CONTEXTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "ack": ({"name": "Ann Müller", "target": "within 3 business hours: by Mon 23 Nov 2026, 10:00 CET",
             "missing": ["account_email", "organisation"], "follows_up": {"id": 1041, "status": "closed"},
             "emergency": "Emergency support is charged at the emergency rate. Call +1 555 0100.",
             "guidance": {"parts": ["next_steps", "target", "missing", "safe_senders", "status_page",
                                    "one_ticket_per_problem", "elsewhere", "support_languages"],
                          "safe_senders": ["example.com"], "status_page": "https://status.example.com/emea",
                          "elsewhere": [("billing", "billing@example.com"), ("sales", "sales@example.com")],
                          "support_languages": ["en", "ja"]}},
            {"name": "ann@customer.example", "target": None, "missing": []}),
    "staff_notify": ({"is_new": True, "sender": "ann@customer.example", "reply_text": "It fails again.",
                      "body_text": "It fails again.\n\n> earlier text", "attachments": [_ATTACHMENT],
                      "not_attached": [_ATTACHMENT], "attach_max": 5_000_000,
                      "linked_reason": "answers a message of the ticket, but it is closed: new linked ticket",
                      "marks": ["CHASER: the customer asks for the status"]},
                     {"is_new": False, "sender": "ann@customer.example", "reply_text": "x",
                      "body_text": "x", "attachments": []}),
    "staff_reply": ({"text": "Please run the backup again.\n\nJörg", "agent": "Jörg Müller"},
                    {"text": "", "agent": "Support"}),
    "reminder": (_RESOLVE, _NOTICE),
    "autoclose": (_RESOLVE, _NOTICE),
    "closure": (_NOTICE, _NOTICE),
    "info_request": ({"name": "Ann", "missing": ["account_email", "organisation"]},
                     {"missing": ["organisation"]}),
    "redirect": ({"name": "Ann", "department": "billing", "address": "billing@example.com"},
                 {"name": "ann@customer.example", "department": "sales", "address": "sales@example.com"}),
    "sla_warning": ({"due": "within 1 hour 24/7: by Mon 23 Nov 2026, 10:00 UTC", "breach": False,
                     "minutes_left": 12}, {"due": "None", "breach": True, "minutes_left": 0}),
    "forward": ({"sender": "ann@customer.example", "department": "billing", "body_text": "Invoice 7 is wrong."},
                {"sender": "ann@customer.example", "department": "sales", "body_text": ""}),
    "escalation": ({"review_hours": 24}, {"review_hours": 48}),
    "status": ({"target": "within 3 business hours: by Mon 23 Nov 2026, 10:00 CET", "response": "met",
                "staff_at": "2026-11-23 09:40 UTC"},
               {"target": None, "response": "none", "staff_at": None}),
    "process_staff": ({"headline": "Escalated to tier 2 by agent@example.com", "why": "EMEA desk open now",
                          "text": "Please look at the VSS writer."},
                         {"headline": "Owner reminder", "why": "close it by hand", "text": ""}),
    "command_error": ({"errors": ["unknown command #stauts"], "text": "#stauts closed\nDone."},
                      {"errors": [], "text": ""}),
    "not_staff": ({"sender": "colleague@partner.example"}, {"sender": "x@y.example"}),
    "govcloud_refused": ({"sender": "agent@example.com"}, {"sender": "x@y.example"}),
    "help": ({"answers": [{"name": "need-logs", "preview": "Could you send us the <logs>?"}]}, {"answers": []}),
    "list": ({"agent": "agent@example.com", "at": "2026-11-23 09:40 UTC", "near_hours": 4, "limit": 50,
              "lists": {"open": [{"id": 1042, "priority": 2, "subject": "Backup <fails>", "requester":
                                  "ann@customer.example", "owner": "agent@example.com", "status": "open",
                                  "govcloud": False, "due": None, "past": False, "hours": None}],
                        "waiting": [],
                        "near": [{"id": 1043, "priority": 1, "subject": "Down", "requester": "bob@customer.example",
                                  "owner": None, "status": "open", "govcloud": True,
                                  "due": "2026-11-23 10:00 UTC", "past": True, "hours": 1.5}]},
              "more": {"open": True, "waiting": False, "near": False}},
             {"agent": "x@y.example", "at": "2026-11-23 09:40 UTC", "near_hours": 0, "limit": 50,
              "lists": {"open": [], "waiting": [], "near": []},
              "more": {"open": False, "waiting": False, "near": False}}),
    "digest": ({"scope": "the EMEA queue (emea@staff.example.com)", "day": "2025-12-05", "at": "08:00 Europe/Berlin",
                "mine": "", "near_mine": "", "near_hours": "4", "limit": 50,
                "counts": {"open": 51, "waiting": 0, "near": 1, "escalated": 0, "unassigned": 1},
                "lists": {"open": [{"id": 1042, "priority": 2, "subject": "Backup <fails>", "requester":
                                    "ann@customer.example", "owner": "agent@example.com", "status": "open",
                                    "govcloud": False, "due": None, "past": False, "hours": None, "age": "2d 03h"}],
                          "waiting": [], "escalated": [],
                          "near": [{"id": 1043, "priority": 1, "subject": "Down", "requester": "bob@customer.example",
                                    "owner": None, "status": "open", "govcloud": False, "age": "12m",
                                    "due": "2025-12-05 10:00 UTC", "past": True, "hours": 1.5}],
                          "unassigned": []},
                "more": {"open": True, "waiting": False, "near": False, "escalated": False, "unassigned": False}},
               {"scope": "x@y.example", "day": "2025-12-05", "at": "08:00 UTC", "mine": ", assigned to you",
                "near_mine": "; yours or unassigned", "near_hours": "0", "limit": 50,
                "counts": {"open": 0, "waiting": 0, "near": 0, "escalated": 0, "unassigned": 0},
                "lists": {"open": [], "waiting": [], "near": [], "escalated": [], "unassigned": []},
                "more": {"open": False, "waiting": False, "near": False, "escalated": False, "unassigned": False}}),
    "contact_refused": ({"name": "Zed Müller", "organisation": "Beispiel <Maschinenbau> GmbH",
                         "instructions": "Your IT department adds colleagues at https://portal.example.com/contacts."},
                        {"name": "zed@customer.example", "organisation": "Acme", "instructions": None}),
    "staff_unproven": ({"why": "It answered no notification of ours and carried no trusted"
                               " Authentication-Results."}, {"why": ""}),
    "undeliverable": ({"addresses": ["ann@customer.example"], "marked": ["ann@customer.example"],
                       "what": "The customer's mail server bounced our acknowledgement.",
                       "detail": "5.1.1 user unknown"},
                      {"addresses": ["ann@customer.example"], "marked": [], "what": "x", "detail": ""}),
}


def check_templates(target: Environment | Composer) -> list[str]:
    """Render every template once (twice: rich and lean sample data) and say what fails,
    as `file:line: message`. For `gateway check-config`; an empty list means all good.

    Also reported: an override folder that does not exist, and files in it the
    gateway would never use (a typo in a name, or a file outside a language folder).
    """
    composer = target if isinstance(target, Composer) else \
        Composer(ticket_tag="Support", tokens=TicketTokens(b"\0" * 32), env=target)
    env = composer.env
    problems: list[str] = []
    override = _override_loader(env)
    overridden: set[str] = set()
    if override is not None:
        for folder in override.searchpath:
            if not Path(folder).is_dir():
                problems.append(f"{folder}: no such template folder")
        overridden = set(override.list_templates())
    files: set[str] = set()
    compiled: dict[str, Template] = {}
    for name in sorted(env.list_templates()):
        try:
            compiled[name] = env.get_template(name)
            files.add(compiled[name].filename or name)
        except TemplateSyntaxError as e:
            problems.append(f"{e.filename or name}:{e.lineno}: {e.message}")
        except TemplateError as e:
            problems.append(f"{name}: {e}")
    for name, tmpl in compiled.items():
        language, _, file = name.rpartition("/")
        kind, _, ext = file.rpartition(".")
        if file.startswith("_"):
            continue                # a partial: compiled above, rendered by its users
        if kind not in SAMPLE_CONTEXTS or ext not in ("txt", "html") or "/" in language or not language:
            if name in overridden:
                problems.append(f"{tmpl.filename or name}: not used: the gateway reads <language>/<kind>.txt "
                                f"and .html, kinds {', '.join(SAMPLE_CONTEXTS)}")
            continue
        for ticket, sample in zip((_SAMPLE_TICKET, _LEAN_TICKET), SAMPLE_CONTEXTS[kind], strict=True):
            try:
                # mail about no ticket gets no `ticket`: a template using it fails here, as it would live
                tmpl.render(composer.unticketed_context("support@example.com", language, ticket.subject, sample)
                            if kind in UNTICKETED_KINDS else
                            composer.context(ticket, "support@example.com", language, sample))
            except TemplateSyntaxError as e:
                problems.append(f"{e.filename or name}:{e.lineno}: {e.message}")
                break
            except Exception as e:  # noqa: BLE001 - any failure is the template's, report it
                problems.append(f"{_where(e, files, tmpl.filename or name)}: {type(e).__name__}: {e}")
                break
    return list(dict.fromkeys(problems))


def _where(error: BaseException, files: set[str], default: str) -> str:
    """`file:line` of the innermost template frame of `error`'s traceback (jinja2
    rewrites tracebacks so that template frames carry the template's file and line)."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename in files:
            return f"{frame.filename}:{frame.lineno}"
    return default
