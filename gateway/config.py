"""Configuration: TOML in, one validated, immutable `Config` out.

Every key of CONTRACT.md, with its default, lives here; `config/gateway.example.toml`
documents each one. Validation collects every problem and names the key
(`smtp.port: expected an integer from 1 to 65535, got 'not-a-port'`), so that
`gateway check-config` can answer with all of them at once (exit 78).
"""
from __future__ import annotations

import os
import re
import socket
import ssl
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.model import REGIONS, mailbox_of, normalize_address
from gateway.outbound.dkim import RSA as DKIM_RSA
from gateway.outbound.dkim import DkimKey, DkimSigner
from gateway.outbound.transport import TLS_MODES, Relay, client_tls_context, read_secret
from gateway.rules.settings import SUPPORTED_LANGUAGES, RulesConfig, default_rules, parse_rules, unknown_key

ENV_VAR = "GATEWAY_CONFIG"
DEFAULTS_SOURCE = "built-in defaults"
AUTO_WORKERS_MAX = 4
QUEUE_NAMES = (*REGIONS, "GOVCLOUD")
# who `[staff] notify` / `notes_to` may name (README "Who is notified")
NOTIFY_WHO = ("queue", "assignee", "agents", "staff")


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists `key: what is wrong`."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Policy:
    """`[lifecycle]`: how long a ticket waits in each state (gateway.desk.lifecycle),
    for one mailbox and plan (`Config.policy_for`): NinjaOne's 24 h reminder and
    close at 48 h, or Kaseya's repeated contact attempts and "resolved after 7 days"."""

    reminders: tuple[timedelta, ...] = (timedelta(hours=24),)   # after entering pending, ascending
    autoclose_after: timedelta = timedelta(hours=48)            # pending this long: no_reply happens
    no_reply: str = "close"                                     # "close" or "resolve" (reopen window)
    reopen_within: timedelta = timedelta(days=7)
    source: str = "[lifecycle]"                                 # the tables it came from (evidence)

    @property
    def reminder_after(self) -> timedelta | None:
        return self.reminders[0] if self.reminders else None

    def to_json(self) -> dict[str, Any]:
        return {"reminder_after_hours": [r.total_seconds() / 3600 for r in self.reminders],
                "autoclose_after_hours": self.autoclose_after.total_seconds() / 3600,
                "no_reply": self.no_reply, "reopen_days": self.reopen_within.total_seconds() / 86400,
                "from": self.source}


LIFECYCLE_KEYS = ("reminder_after_hours", "autoclose_after_hours", "no_reply", "reopen_days")
NO_REPLY = ("close", "resolve")


@dataclass(frozen=True)
class Escalation:
    """`[escalation]`: the tiers above the owning technician (gateway.desk.lifecycle.escalate)."""

    tier2: Mapping[str, str] = field(default_factory=lambda: {
        "AMER": "tier2-amer@staff.example.com", "EMEA": "tier2-emea@staff.example.com",
        "APAC": "tier2-apac@staff.example.com"})
    engineering: str = "engineering@staff.example.com"     # tier 3, the escalation engineers
    contact_after: timedelta = timedelta(hours=24)   # owner reminded: nobody wrote to the customer
    close_reminder_after: timedelta = timedelta(hours=48)  # after the last customer contact
    review_hours: int = 24                           # what the customer is told review takes
    auto_priority: int = 1                           # tickets of this priority or higher escalate; 0 never


@dataclass(frozen=True)
class Emergency:
    """`[emergency]`: HKN's emergency ticket type (priority 1, 24/7)."""

    queue: str = "emergency@staff.example.com"   # alerted at once with every emergency ticket
    pager: str | None = None                     # optional: a pager/SMS gateway address, alerted too
    instructions: Mapping[str, str] = field(default_factory=lambda: dict(EMERGENCY_INSTRUCTIONS))


EMERGENCY_INSTRUCTIONS: dict[str, str] = {
    "en": "Emergency support is charged separately at the emergency rate. For immediate help "
          "call +1 555 0100 (24/7) and quote your ticket number.",
    "de": "Notfall-Support wird gesondert zum Notfalltarif berechnet. Für sofortige Hilfe rufen Sie "
          "+49 30 1234 5678 an (rund um die Uhr) und nennen Sie Ihre Ticketnummer.",
    "ja": "緊急サポートは緊急料金にて別途請求されます。至急のご対応が必要な場合は、"
          "+81 3 1234 5678（24時間受付）までお電話のうえ、チケット番号をお伝えください。",
}


@dataclass(frozen=True)
class StatusRequests:
    """`[status_requests]`: the automatic answer to "any update?" (HKN)."""

    enabled: bool = True
    interval: timedelta = timedelta(hours=4)     # at most one automatic status answer per ticket per this


DIGEST_TO = ("queue", "assignee")


@dataclass(frozen=True)
class Digest:
    """`[digest]`: the daily digest by mail (issue 20) per region queue and per
    assignee, at local time `at` in `timezone` (gateway.desk.digest)."""

    enabled: bool = False
    at: time = time(8, 0)
    timezone: str = "UTC"                   # an IANA zone name
    to: tuple[str, ...] = DIGEST_TO

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


ACK_PARTS = ("next_steps", "target", "missing", "safe_senders", "status_page", "one_ticket_per_problem",
             "elsewhere", "support_languages")


@dataclass(frozen=True)
class Acknowledgement:
    """`[acknowledgement]`: the policies' guidance the acknowledgement carries (issue 19)."""

    parts: tuple[str, ...] = ACK_PARTS
    status_pages: Mapping[str, str] = field(default_factory=dict)   # AMER/EMEA/APAC/GOVCLOUD -> URL
    # the languages staff answer in, preferred first (Dropbox: English and Japanese);
    # a customer in another language is told so, and answered in the first
    support_languages: tuple[str, ...] = SUPPORTED_LANGUAGES

    def answer_language(self, customer_language: str) -> str:
        """The language staff answer a customer in: the customer's when the team
        supports it, else the team's first support language."""
        return customer_language if customer_language in self.support_languages else self.support_languages[0]


@dataclass(frozen=True)
class Mailbox:
    address: str
    govcloud: bool = False
    language: str = "en"          # answers when nothing tells the customer's language
    emergency: bool = False       # every mail to it is an emergency ticket (`[emergency]`)
    # its `lifecycle` table and `lifecycle.plans.<plan>` tables (raw, validated; Config.policy_for)
    lifecycle: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    """`[limits]`: what one sender or one mail may cost the gateway (hostile input, floods)."""

    max_recipients: int = 50              # RCPT TO per transaction; more get 452 4.5.3
    max_attachments: int = 100            # MIME leaf parts besides the text; more get 554 5.6.0
    max_nesting: int = 10                 # multipart / message/rfc822 depth; deeper gets 554 5.6.0
    auto_answers_per_sender_per_hour: int = 10   # acknowledgements to one mailbox (case, +tag folded) per hour
    auto_answers_per_domain_per_hour: int = 200  # acknowledgements to one sender domain per hour
    refusals_per_sender_per_hour: int = 1        # answers to one mailbox refused as no authorised contact
    new_tickets_per_sender_per_hour: int = 30    # new tickets from one mailbox per hour; more are quarantined
    new_tickets_per_domain_per_hour: int = 1000  # new tickets from one sender domain per hour; more are quarantined
    max_participants: int = 50            # To/Cc addresses kept on a ticket, recipients of one outbound mail
    parse_seconds: float = 5.0            # CPU time one mail's parse may take; then it is quarantined
    parse_processes: int = 2              # worker processes that parse (killed and replaced past parse_seconds)
    max_sessions: int = 100               # concurrent SMTP/LMTP sessions per process; more get 421 4.7.0
    session_memory: int = 262144          # bytes of one DATA kept in memory; the rest is spooled to disk
    max_rcpt_errors: int = 20             # refused RCPTs in one session; then 421 4.7.0 and the session ends


@dataclass(frozen=True)
class GovCloudStaff:
    """`[staff.govcloud]`: who may answer and command GovCloud tickets (besides the
    GOVCLOUD queue address), and how their mail proves its author. `[staff]`
    addresses and domains are not GovCloud staff (issue 18)."""

    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    require_authenticated: bool = False
    trusted_authserv_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Config:
    data_dir: Path
    ticket_tag: str
    smtp_host: str
    smtp_port: int
    lmtp: bool
    max_message_size: int
    mailboxes: tuple[Mailbox, ...]
    outbound_transport: str
    relay: Relay
    govcloud_relay: Relay | None
    outbound_retry_base_s: float
    outbound_retry_max_s: float
    outbound_poll_s: float
    staff_addresses: frozenset[str]
    staff_domains: frozenset[str]
    queues: dict[str, str]
    default_region: str
    redirects: dict[str, str] = field(default_factory=dict)
    store_url: str = ""
    busy_timeout_ms: int = 5000
    # how long an instance's claim (a delivery being sent, the IMAP poller) lasts
    # unless renewed: a dead instance's claims pass to the others after it
    lease_s: float = 60.0
    policy: Policy = field(default_factory=Policy)
    rules: RulesConfig = field(default_factory=default_rules)
    scheduler_interval_s: float = 60.0
    workers: int = 1
    metrics_enabled: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9325
    metrics_probe_s: float = 5.0
    source: str = DEFAULTS_SOURCE
    limits: Limits = field(default_factory=Limits)
    # staff mail is trusted only when the MTA authenticated it (gateway.mail.authres)
    staff_require_authenticated: bool = False
    staff_trusted_authserv_ids: frozenset[str] = frozenset()
    templates_dir: Path | None = None         # operators' overrides of gateway/templates
    dkim_keys: Mapping[str, tuple[DkimKey, ...]] = field(default_factory=dict)
    imap: tuple[ImapAccount, ...] = ()
    escalation: Escalation = field(default_factory=Escalation)
    emergency: Emergency = field(default_factory=Emergency)
    status_requests: StatusRequests = field(default_factory=StatusRequests)
    acknowledgement: Acknowledgement = field(default_factory=Acknowledgement)
    # one ticket per problem: a new mail with an open ticket's requester and subject joins it
    same_problem_within: timedelta = timedelta(hours=72)
    # (mailbox address or "", plan or "") -> the lifecycle merged for it (`policy_for`)
    policies: Mapping[tuple[str, str], Policy] = field(default_factory=dict)
    token_secret_file: Path | None = None     # None: data_dir/secret.key
    govcloud_staff: GovCloudStaff = field(default_factory=GovCloudStaff)
    answers_dir: Path | None = None           # [answers] folder: canned answers (#answer NAME)
    # [staff] notify: who gets a ticket's staff notifications; notes_to: who gets a #note's text;
    # list_near_hours: #list's "near the first-response target" (gateway.desk.writer.Desk.staff_of)
    staff_notify: tuple[str, ...] = ("queue", "assignee")
    staff_notes_to: tuple[str, ...] = ("assignee", "agents")
    staff_list_near: timedelta = timedelta(hours=4)
    # attach_max_bytes: the customer's files attached to a staff notification, at most
    # this many bytes in all (the rest listed with `gateway tickets attachment`)
    staff_attach_max: int = 5_000_000
    digest: Digest = field(default_factory=Digest)

    # -- lookups used across the gateway ---------------------------------
    @property
    def path(self) -> str | None:
        """The file this configuration was read from; None for the built-in defaults."""
        return None if self.source == DEFAULTS_SOURCE else self.source

    @property
    def token_secret_path(self) -> Path:
        """The key file of the ticket-token secret (unless $GATEWAY_TOKEN_SECRET is set)."""
        return self.token_secret_file or self.data_dir / "secret.key"

    def mailbox_for(self, address: str) -> Mailbox | None:
        """The mailbox an address reaches, ignoring case and `+tag` suffixes."""
        addr = normalize_address(address)
        base = mailbox_of(addr)
        for mb in self.mailboxes:
            if mb.address in (addr, base):
                return mb
        return None

    def policy_for(self, mailbox: str, plan: str) -> Policy:
        """The lifecycle of a ticket of `plan` in `mailbox`: `[lifecycle]`, then
        `[lifecycle.plans.<plan>]`, then the mailbox's `lifecycle`, then its
        `lifecycle.plans.<plan>`, each key taken from the last table that sets it."""
        for key in ((mailbox, plan), (mailbox, ""), ("", plan), ("", "")):
            if key in self.policies:
                return self.policies[key]
        return self.policy

    def is_staff(self, address: str) -> bool:
        """A `[staff]` address, an address at a `[staff] domains` domain, or a queue
        address (a shared team mailbox whose members answer from it); or GovCloud
        staff (`[staff.govcloud]`). Who may answer a given ticket: `may_answer`."""
        addr = normalize_address(address)
        return addr in self.staff_addresses or addr.rpartition("@")[2] in self.staff_domains \
            or addr in self.queues.values() \
            or self.is_govcloud_staff(addr)           # normalized when the config is read

    def is_govcloud_staff(self, address: str) -> bool:
        """A `[staff.govcloud]` address or domain, or the GOVCLOUD queue address."""
        addr = normalize_address(address)
        gov = self.govcloud_staff
        return addr in gov.addresses or addr.rpartition("@")[2] in gov.domains \
            or addr == self.queues.get("GOVCLOUD")

    def may_answer(self, address: str, govcloud: bool) -> bool:
        """Whether staff mail from `address` may answer or command a ticket: a
        GovCloud ticket only GovCloud staff's, a commercial one any staff's."""
        return self.is_govcloud_staff(address) if govcloud else self.is_staff(address)

    def staff_proof(self, govcloud: bool) -> tuple[bool, frozenset[str]]:
        """`require_authenticated` and `trusted_authserv_ids` for staff mail about a
        GovCloud ticket (`[staff.govcloud]`) or a commercial one (`[staff]`)."""
        if govcloud:
            return self.govcloud_staff.require_authenticated, self.govcloud_staff.trusted_authserv_ids
        return self.staff_require_authenticated, self.staff_trusted_authserv_ids


# -- [[imap]] -------------------------------------------------------------------

@dataclass(frozen=True)
class ImapAccount:
    """One `[[imap]]` table."""

    host: str
    port: int
    tls: bool                       # implicit TLS (IMAPS); see also starttls
    user: str
    mailbox: str                    # the support address this mail counts as delivered to
    password: str | None = None
    password_file: Path | None = None
    folder: str = "INBOX"
    processed_folder: str = "Processed"
    poll_seconds: float = 60.0
    starttls: bool = False          # plain connection upgraded with STARTTLS (RFC 3501 §6.2.1)
    ca_file: Path | None = None     # trust this CA instead of the system's
    password_env: str | None = None  # the environment variable that holds the password

    @property
    def name(self) -> str:
        """How logs and the state file name the account (no secrets)."""
        return f"{self.user}@{self.host}:{self.port}"

    def secret(self) -> str:
        found = read_secret(self.password, self.password_file, self.password_env)
        assert found is not None
        return found


_KEYS = {"host", "port", "tls", "starttls", "ca_file", "user", "password", "password_file", "password_env",
         "folder", "processed_folder", "mailbox", "poll_seconds"}


def parse_imap(data: list[dict[str, Any]] | Any, mailbox_addresses: set[str],
               base_dir: Path | None = None) -> tuple[tuple[ImapAccount, ...], list[str]]:
    """Validate `[[imap]]` tables: the accounts, and every problem as
    "imap[0].host: what is wrong" (nothing raised, so check-config can list
    all problems at once)."""
    problems: list[str] = []
    if data is None:
        return (), []
    if not isinstance(data, list):
        return (), ["imap: expected [[imap]] tables"]
    known = {normalize_address(a) for a in mailbox_addresses}
    accounts: list[ImapAccount] = []
    for i, table in enumerate(data):
        key = f"imap[{i}]"
        if not isinstance(table, dict):
            problems.append(f"{key}: expected a table")
            continue
        before = len(problems)

        def fail(name: str, what: str, key: str = key) -> None:
            problems.append(f"{key}.{name}: {what}")

        for unknown in sorted(set(table) - _KEYS):
            fail(unknown, unknown_key(unknown, _KEYS))
        host = table.get("host")
        if not isinstance(host, str) or not host.strip():
            fail("host", f"expected a host name, got {host!r}")
        starttls = table.get("starttls", False)
        if not isinstance(starttls, bool):
            fail("starttls", f"expected true or false, got {starttls!r}")
            starttls = False
        tls = table.get("tls", not starttls)      # `starttls = true` alone means port 143 + STARTTLS
        if not isinstance(tls, bool):
            fail("tls", f"expected true or false, got {tls!r}")
            tls = True
        if tls and starttls:
            fail("starttls", "tls = true already encrypts the connection; set one of them")
        port = table.get("port", 993 if tls else 143)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            fail("port", f"expected an integer from 1 to 65535, got {port!r}")
        user = table.get("user")
        if not isinstance(user, str) or not user:
            fail("user", f"expected the login name, got {user!r}")
        def readable(key: str, table: Mapping[str, Any] = table) -> Path | None:
            """An optional file name: None when absent, else a readable path."""
            value = table.get(key)
            if value is None:
                return None
            if not isinstance(value, str) or not value:
                fail(key, f"expected a file name, got {value!r}")
                return None
            path = _resolve(value, base_dir)
            if not os.access(path, os.R_OK):
                fail(key, f"cannot read {str(path)!r}")
            return path

        password, password_file = table.get("password"), table.get("password_file")
        password_env = table.get("password_env")
        pw_path: Path | None = None
        if [password, password_file, password_env].count(None) != 2:
            fail("password", "set exactly one of password, password_file and password_env")
        elif password is not None and not isinstance(password, str):
            fail("password", "expected a string")
        elif password_env is not None and (not isinstance(password_env, str) or not os.environ.get(password_env)):
            fail("password_env", f"the environment variable {password_env} is not set")
        else:
            pw_path = readable("password_file")
        ca_path = readable("ca_file")
        folder = table.get("folder", "INBOX")
        processed = table.get("processed_folder", "Processed")
        for name, value in (("folder", folder), ("processed_folder", processed)):
            if not isinstance(value, str) or not value.strip():
                fail(name, f"expected a folder name, got {value!r}")
        if isinstance(folder, str) and folder == processed:
            fail("processed_folder", "must differ from folder, or mail would be fetched again")
        mailbox = table.get("mailbox")
        if not isinstance(mailbox, str) or normalize_address(mailbox) not in known:
            fail("mailbox", f"expected one of the [[mailbox]] addresses "
                            f"({', '.join(sorted(known))}), got {mailbox!r}")
        poll = table.get("poll_seconds", 60)
        if isinstance(poll, bool) or not isinstance(poll, int | float) or poll <= 0:
            fail("poll_seconds", f"expected a number of seconds > 0, got {poll!r}")
        if len(problems) == before:
            accounts.append(ImapAccount(
                host=str(host).strip(), port=int(port), tls=tls, starttls=starttls, user=str(user),
                password=password, password_file=pw_path, password_env=password_env, ca_file=ca_path,
                folder=str(folder),
                processed_folder=str(processed), mailbox=normalize_address(str(mailbox)),
                poll_seconds=float(poll)))
    names = [(a.name, a.folder) for a in accounts]
    if len(set(names)) != len(names):
        problems.append("imap: the same account and folder are configured twice")
    return tuple(accounts), problems


def _resolve(name: str, base_dir: Path | None) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


# -- [[dkim]] -------------------------------------------------------------------

_DKIM_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_DKIM_KEYS = frozenset({"domain", "selector", "key_file"})


def parse_dkim(data: list[dict[str, Any]] | dict[str, Any],
               base_dir: Path | None) -> tuple[dict[str, tuple[DkimKey, ...]], list[str]]:
    """The `[[dkim]]` tables of the configuration: keys by domain, and what is wrong.

    A domain has at most one key per algorithm: an RSA key, an Ed25519 key
    (RFC 8463), or one of each (its mail is then signed twice).

    ```toml
    [[dkim]]
    domain = "example.com"
    selector = "gw2026"
    key_file = "dkim/example.com.pem"     # relative to the config file's folder
    ```

    A single `[dkim]` table is taken as a list of one. Problems read
    `dkim[0].key_file: what is wrong`; an entry with a problem is left out.
    """
    entries: list[Any]
    if isinstance(data, dict):
        entries, prefix = [data], "dkim"
    elif isinstance(data, list):
        entries, prefix = data, None
    else:
        return {}, ["dkim: must be a list of tables ([[dkim]]) with domain, selector and key_file"]
    keys: dict[str, tuple[DkimKey, ...]] = {}
    where: dict[tuple[str, str], str] = {}
    problems: list[str] = []
    for n, entry in enumerate(entries):
        at = prefix or f"dkim[{n}]"
        if not isinstance(entry, dict):
            problems.append(f"{at}: must be a table with domain, selector and key_file")
            continue
        bad = len(problems)
        problems.extend(f"{at}.{k}: {unknown_key(k, _DKIM_KEYS)}" for k in sorted(set(entry) - _DKIM_KEYS))
        domain = _dkim_name(entry, "domain", at, problems, min_labels=2)
        selector = _dkim_name(entry, "selector", at, problems, min_labels=1)
        found = _dkim_key_file(entry, at, base_dir, problems)
        if found is not None and domain is not None and (domain, found[1]) in where:
            kind = "an RSA" if found[1] == DKIM_RSA else "an Ed25519"
            problems.append(f"{at}.domain: {domain} already has {kind} key ({where[domain, found[1]]})")
        if len(problems) == bad and domain and selector and found is not None:
            keys[domain] = (*keys.get(domain, ()), DkimKey(domain=domain, selector=selector,
                                                           private_key_pem=found[0]))
            where[domain, found[1]] = at
    return keys, problems


def _dkim_name(entry: Mapping[str, Any], key: str, at: str, problems: list[str], *,
          min_labels: int) -> str | None:
    """A domain name or a selector (RFC 6376 §3.1: dot-separated labels)."""
    value = entry.get(key)
    if value is None:
        problems.append(f"{at}.{key}: missing")
        return None
    if not isinstance(value, str):
        problems.append(f"{at}.{key}: must be a string, got {type(value).__name__}")
        return None
    name = value.strip().lower().rstrip(".")
    labels = name.split(".")
    if len(labels) < min_labels or not all(_DKIM_LABEL.match(lb) for lb in labels):
        what = "a domain name like example.com" if min_labels > 1 else "letters, digits, '-' and '.'"
        problems.append(f"{at}.{key}: {value!r} is not {what}")
        return None
    return name


def _dkim_key_file(entry: Mapping[str, Any], at: str, base_dir: Path | None,
              problems: list[str]) -> tuple[bytes, str] | None:
    """The key file's bytes and the key's algorithm (`rsa-sha256`, `ed25519-sha256`)."""
    value = entry.get("key_file")
    if value is None:
        problems.append(f"{at}.key_file: missing (the file with the domain's RSA or Ed25519 private key)")
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{at}.key_file: must be a file name")
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        pem = path.read_bytes()
    except OSError as e:
        problems.append(f"{at}.key_file: cannot read {path}: {e.strerror or e}")
        return None
    if b"ENCRYPTED" in pem:
        problems.append(f"{at}.key_file: {path} is encrypted; the gateway needs an unencrypted key "
                        f"(keep the file readable by the gateway only)")
        return None
    try:
        signer = DkimSigner(DkimKey("check.invalid", "check", pem))
    except ValueError as e:
        problems.append(f"{at}.key_file: {path}: {e}")
        return None
    return pem, signer.algorithm


def _defaults() -> dict[str, Any]:
    return {
        "gateway": {"data_dir": "var", "ticket_tag": "Support"},
        "smtp": {"host": "127.0.0.1", "port": 2525, "lmtp": False,
                 "max_message_size": 26_214_400},
        "mailbox": [{"address": "support@example.com", "govcloud": False},
                    {"address": "support@examplegov.com", "govcloud": True}],
        "outbound": {"transport": "maildir", "host": "127.0.0.1", "port": 25,
                     "retry_base_seconds": 30.0, "retry_max_seconds": 3600.0,
                     "poll_seconds": 1.0},
        "staff": {"addresses": ["agent@example.com"], "domains": [],
                  "queues": {"AMER": "amer@staff.example.com", "EMEA": "emea@staff.example.com",
                             "APAC": "apac@staff.example.com",
                             "GOVCLOUD": "gov@staff.examplegov.com"}},
        "rules": {"default_region": "AMER"},
        "redirects": {},
        "store": {},
        "lifecycle": {"reminder_after_hours": 24, "autoclose_after_hours": 48, "no_reply": "close",
                      "reopen_days": 7},
        "scheduler": {"interval_seconds": 60},
    }


class _Table(dict[str, Any]):
    """A TOML table that remembers the keys asked for: the known keys are the
    ones the parser reads, so a key added to the parser is known everywhere."""

    def __init__(self, value: dict[str, Any]):
        super().__init__(value)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return super().__contains__(key)


class _Reader:
    """Reads typed values out of the TOML tree, recording every problem by key."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.problems: list[str] = []
        self.tables: dict[str, _Table] = {}

    def section(self, name: str, parent: dict[str, Any] | None = None) -> dict[str, Any]:
        """The table `name` (dotted for a sub-table of `parent`), recording which keys
        the parser asks for: whatever else it holds is an unknown key (`unknown_keys`)."""
        if name in self.tables:
            return self.tables[name]
        value = (self.data if parent is None else parent).get(name.rpartition(".")[2], {})
        if not isinstance(value, dict):
            self.problems.append(f"{name}: expected a table [{name}], got {type(value).__name__}")
            value = {}
        table = self.tables[name] = _Table(value)
        return table

    def unknown_keys(self) -> None:
        """Every key of a section that no parser asked for, with a "did you mean"."""
        for name, table in self.tables.items():
            for key in table:
                if key not in table.asked:
                    self.fail(f"{name}.{key}", unknown_key(key, table.asked))

    def get(self, sect: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = sect.get(key, default)
        if isinstance(value, bool) and kind is not bool and bool not in _tuple(kind):
            self.problems.append(f"{key}: expected {_kind_name(kind)}, got {value!r}")
            return default
        if not isinstance(value, kind):
            self.problems.append(f"{key}: expected {_kind_name(kind)}, got {value!r}")
            return default
        return value

    def fail(self, key: str, what: str) -> None:
        self.problems.append(f"{key}: {what}")


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", float: "a number",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in _tuple(kind))


def _check_address(r: _Reader, key: str, value: str) -> str:
    addr = normalize_address(value)
    local, at, domain = addr.partition("@")
    if not (at and local and "." in domain) or any(c in addr for c in " \t\r\n<>,;\"()"):
        r.fail(key, f"not an email address: {value!r}")
    return addr


def parse(data: dict[str, Any], *, source: str = "<dict>", config_dir: Path | None = None) -> Config:
    """Validate a TOML tree (already merged over nothing: missing keys take defaults)."""
    d = _defaults()
    r = _Reader(data)
    known = set(d) | {"imap", "metrics", "limits", "dkim", "escalation", "emergency", "status_requests",
                      "threading", "answers", "acknowledgement", "digest"}
    for key in data:
        if key not in known:
            r.fail(key, unknown_key(key, known).replace("key", "section", 1))

    g = r.section("gateway")
    # Relative paths are relative to the config file's folder (the built-in
    # defaults, read from no file: to the working directory).
    data_dir = _resolve(_prefixed(r, "gateway", g, "data_dir", str, d["gateway"]["data_dir"]), config_dir)
    tag = _prefixed(r, "gateway", g, "ticket_tag", str, d["gateway"]["ticket_tag"])
    _prefixed(r, "gateway", g, "rules_file", str, "")          # read by load()
    secret_value = _prefixed(r, "gateway", g, "token_secret_file", str, "")
    templates_value = _prefixed(r, "gateway", g, "templates_dir", str, "")
    templates_dir = None
    if templates_value:
        templates_dir = Path(templates_value)
        if not templates_dir.is_absolute() and config_dir is not None:
            templates_dir = config_dir / templates_dir
        if not templates_dir.is_dir():
            r.fail("gateway.templates_dir", f"no such directory: {str(templates_dir)!r}")
    answers_value = _prefixed(r, "answers", r.section("answers"), "folder", str, "")
    answers_dir = None
    if answers_value:
        answers_dir = _resolve(answers_value, config_dir)
        if not answers_dir.is_dir():
            r.fail("answers.folder", f"no such directory: {str(answers_dir)!r}")
    if not tag or any(c in tag for c in "[]#\r\n") or len(tag) > 40:
        r.fail("gateway.ticket_tag", "must be 1-40 characters without '[', ']', '#' or line breaks")

    s = r.section("smtp")
    smtp_host = _prefixed(r, "smtp", s, "host", str, d["smtp"]["host"])
    smtp_port = _port_of(r, "smtp", s, d["smtp"]["port"])
    lmtp = _prefixed(r, "smtp", s, "lmtp", bool, False)
    max_size = _prefixed(r, "smtp", s, "max_message_size", int, d["smtp"]["max_message_size"])
    # Default 1: measured, two workers contend for SQLite's write lock (each
    # holds it through a batch, rendering included) and lose more than they
    # gain (README, "Measured"); 0 means one per CPU, at most AUTO_WORKERS_MAX.
    workers = _prefixed(r, "smtp", s, "workers", int, 1)
    if not 0 <= workers <= 64:
        r.fail("smtp.workers", f"expected 0 (one per CPU, at most {AUTO_WORKERS_MAX}) to 64, got {workers}")
        workers = 1
    if workers == 0:
        workers = max(1, min(os.cpu_count() or 1, AUTO_WORKERS_MAX))
    if max_size < 1024:
        r.fail("smtp.max_message_size", f"must be at least 1024 bytes, got {max_size}")

    raw_boxes = data.get("mailbox", d["mailbox"])
    boxes: list[Mailbox] = []
    if not isinstance(raw_boxes, list) or not raw_boxes:
        r.fail("mailbox", "expected one or more [[mailbox]] tables")
        raw_boxes = d["mailbox"]
    for i, raw_mb in enumerate(raw_boxes):
        if not isinstance(raw_mb, dict) or not isinstance(raw_mb.get("address"), str):
            r.fail(f"mailbox[{i}].address", "every [[mailbox]] needs an address string")
            continue
        mb = r.section(f"mailbox[{i}]", {f"mailbox[{i}]": raw_mb})
        gov = mb.get("govcloud", False)
        if not isinstance(gov, bool):
            r.fail(f"mailbox[{i}].govcloud", f"expected true or false, got {gov!r}")
            gov = False
        language = mb.get("language", "en")
        if language not in SUPPORTED_LANGUAGES:
            r.fail(f"mailbox[{i}].language", f"expected one of {', '.join(SUPPORTED_LANGUAGES)}, got {language!r}")
            language = "en"
        urgent = mb.get("emergency", False)
        if not isinstance(urgent, bool):
            r.fail(f"mailbox[{i}].emergency", f"expected true or false, got {urgent!r}")
            urgent = False
        own = mb.get("lifecycle", {})
        if not isinstance(own, dict):
            r.fail(f"mailbox[{i}].lifecycle", f"expected a table, got {own!r}")
            own = {}
        boxes.append(Mailbox(_check_address(r, f"mailbox[{i}].address", mb["address"]), gov, language,
                             urgent, own))
    if len({b.address for b in boxes}) != len(boxes):
        r.fail("mailbox", "the same address is configured twice")

    o = r.section("outbound")
    transport = _prefixed(r, "outbound", o, "transport", str, d["outbound"]["transport"])
    if transport not in ("smtp", "maildir"):
        r.fail("outbound.transport", f"expected \"smtp\" or \"maildir\", got {transport!r}")
    relay = _relay(r, "outbound", o, None, config_dir)
    gov_relay = None
    if "govcloud" in o:
        go = r.section("outbound.govcloud", o)
        gov_relay = _relay(r, "outbound.govcloud", go, relay, config_dir)
    if transport == "smtp" and gov_relay is None:
        # GovCloud mail never leaves through the commercial relay (issue 18): without
        # its own relay a GovCloud mailbox has no way out, so the file is wrong
        for i, m in enumerate(boxes):
            if m.govcloud:
                r.fail("outbound.govcloud", f"mailbox[{i}] {m.address} is a GovCloud mailbox, but there is "
                       "no [outbound.govcloud] relay (host, port): GovCloud mail never goes through the "
                       "commercial [outbound] relay")
    retry_base = float(_prefixed(r, "outbound", o, "retry_base_seconds", (int, float),
                                 d["outbound"]["retry_base_seconds"]))
    retry_max = float(_prefixed(r, "outbound", o, "retry_max_seconds", (int, float),
                                d["outbound"]["retry_max_seconds"]))
    poll = float(_prefixed(r, "outbound", o, "poll_seconds", (int, float), d["outbound"]["poll_seconds"]))
    if retry_base <= 0 or retry_max < retry_base:
        r.fail("outbound.retry_base_seconds", "must be > 0 and not above outbound.retry_max_seconds")
    if poll <= 0:
        r.fail("outbound.poll_seconds", "must be > 0")

    st = r.section("staff")
    staff_addresses, staff_domains = _staff_who(r, "staff", st, d["staff"]["addresses"], d["staff"]["domains"])
    q = st.get("queues", d["staff"]["queues"])
    if not isinstance(q, dict):
        r.fail("staff.queues", "expected a table [staff.queues]")
        q = d["staff"]["queues"]
    queues: dict[str, str] = {}
    for name in QUEUE_NAMES:
        value = q.get(name, d["staff"]["queues"][name])
        if _is_str(r, f"staff.queues.{name}", value):
            queues[name] = _check_address(r, f"staff.queues.{name}", value)
    for name in q:
        if name not in QUEUE_NAMES:
            r.fail(f"staff.queues.{name}", unknown_key(name, QUEUE_NAMES).replace("key", "queue", 1))

    notify, notes_to, list_near, attach_max = _staff_mail(r, st)

    ru = r.section("rules")
    default_region = _prefixed(r, "rules", ru, "default_region", str, d["rules"]["default_region"])
    if default_region not in REGIONS:
        r.fail("rules.default_region", f"expected one of {', '.join(REGIONS)}, got {default_region!r}")

    red = r.section("redirects")
    redirects = {k: _check_address(r, f"redirects.{k}", v) for k, v in red.items()
                 if _is_str(r, f"redirects.{k}", v)}

    store = r.section("store")
    store_url = _prefixed(r, "store", store, "url", str, "")
    if store_url and not store_url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        r.fail("store.url", f"expected sqlite:///PATH or postgresql://..., got {store_url!r}")
    elif store_url.startswith("sqlite:///"):
        store_url = f"sqlite:///{_resolve(store_url[len('sqlite:///'):], config_dir)}"
    lease_s = _prefixed(r, "store", store, "lease_seconds", (int, float), 60)
    if isinstance(lease_s, bool) or not 1 <= lease_s <= 86_400:
        r.fail("store.lease_seconds", f"expected 1 to 86400 seconds, got {lease_s!r}")
    busy_timeout_ms = _prefixed(r, "store", store, "busy_timeout_ms", int, 5000)
    if not 0 <= busy_timeout_ms <= 600_000:
        r.fail("store.busy_timeout_ms", f"expected 0 to 600000 milliseconds, got {busy_timeout_ms}")

    sch = r.section("scheduler")
    interval = float(_prefixed(r, "scheduler", sch, "interval_seconds", (int, float),
                               d["scheduler"]["interval_seconds"]))
    if interval <= 0:
        r.fail("scheduler.interval_seconds", "must be > 0")

    limits, require_auth, authserv_ids = _limits_and_staff_auth(r, data)
    gov_staff = _govcloud_staff(r, require_auth, authserv_ids)
    escalation = _escalation(r)
    emergency = _emergency(r)
    sr = r.section("status_requests")
    _only_known(r, "status_requests", sr, ("enabled", "interval_hours"))
    status_interval = float(_prefixed(r, "status_requests", sr, "interval_hours", (int, float), 4))
    if status_interval <= 0:
        r.fail("status_requests.interval_hours", f"must be > 0, got {status_interval:g}")
    status_requests = StatusRequests(_prefixed(r, "status_requests", sr, "enabled", bool, True),
                                     timedelta(hours=status_interval))

    acknowledgement = _acknowledgement(r)
    digest = _digest(r)

    th = r.section("threading")
    _only_known(r, "threading", th, ("same_problem_hours",))
    same_problem_h = _prefixed(r, "threading", th, "same_problem_hours", (int, float), 72)
    if not 0 <= same_problem_h <= 24 * 365:
        r.fail("threading.same_problem_hours", f"expected 0 (off) to 8760 hours, got {same_problem_h:g}")
        same_problem_h = 0

    me = r.section("metrics")
    metrics_enabled = _prefixed(r, "metrics", me, "enabled", bool, False)
    metrics_host = _prefixed(r, "metrics", me, "host", str, "127.0.0.1")
    metrics_port = _port_of(r, "metrics", me, 9325)
    metrics_probe_s = float(_prefixed(r, "metrics", me, "probe_seconds", (int, float), 5.0))
    if metrics_probe_s <= 0:
        r.fail("metrics.probe_seconds", "must be > 0")

    dkim_keys, dkim_problems = parse_dkim(data.get("dkim", []), config_dir)
    r.problems.extend(dkim_problems)
    imap_accounts: tuple[ImapAccount, ...] = ()
    if "imap" in data:
        imap_accounts, imap_problems = parse_imap(data["imap"], {b.address for b in boxes},
                                                  base_dir=config_dir)
        r.problems.extend(imap_problems)

    rules, rule_problems = parse_rules(data)
    r.problems.extend(rule_problems)
    policies = _lifecycles(r, boxes, tuple(rules.plans))
    r.tables.pop("rules", None)        # parse_rules names the unknown keys of [rules]
    r.tables.pop("redirects", None)    # any name is a redirect
    r.unknown_keys()

    if r.problems:
        raise ConfigError(r.problems)
    return Config(
        data_dir=data_dir, ticket_tag=tag, smtp_host=smtp_host, smtp_port=smtp_port, lmtp=lmtp,
        max_message_size=max_size, mailboxes=tuple(boxes), outbound_transport=transport,
        relay=relay, govcloud_relay=gov_relay, outbound_retry_base_s=retry_base,
        outbound_retry_max_s=retry_max, outbound_poll_s=poll,
        staff_addresses=staff_addresses, staff_domains=staff_domains, queues=queues,
        default_region=default_region, redirects=redirects,
        store_url=store_url or f"sqlite:///{data_dir / 'gateway.db'}", source=source,
        busy_timeout_ms=busy_timeout_ms, lease_s=float(lease_s),
        policy=policies[("", "")], policies=policies,
        scheduler_interval_s=interval, rules=rules, workers=workers,
        metrics_enabled=metrics_enabled, metrics_host=metrics_host, metrics_port=metrics_port,
        metrics_probe_s=metrics_probe_s,
        limits=limits, staff_require_authenticated=require_auth,
        staff_trusted_authserv_ids=authserv_ids, templates_dir=templates_dir, dkim_keys=dkim_keys,
        imap=imap_accounts, escalation=escalation, emergency=emergency, status_requests=status_requests,
        same_problem_within=timedelta(hours=same_problem_h),
        token_secret_file=Path(secret_value) if secret_value else None, answers_dir=answers_dir,
        govcloud_staff=gov_staff, staff_notify=notify, staff_notes_to=notes_to, staff_list_near=list_near,
        staff_attach_max=attach_max,
        acknowledgement=acknowledgement, digest=digest,
    )


def _digest(r: _Reader) -> Digest:
    """`[digest]`: enabled, at ("HH:MM", local), timezone (IANA), to (queue/assignee)."""
    dg = r.section("digest")
    _only_known(r, "digest", dg, ("enabled", "at", "timezone", "to"))
    enabled = _prefixed(r, "digest", dg, "enabled", bool, False)
    at_text = _prefixed(r, "digest", dg, "at", str, "08:00")
    m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", at_text)
    if m is None:
        r.fail("digest.at", f"expected a local time HH:MM (00:00 to 23:59), got {at_text!r}")
    zone = _prefixed(r, "digest", dg, "timezone", str, "UTC")
    try:
        if not zone or zone.startswith(("/", ".")) or ".." in zone:
            raise ZoneInfoNotFoundError(zone)
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        r.fail("digest.timezone", f"not an IANA time zone (like Europe/Berlin or UTC): {zone!r}")
        zone = "UTC"
    words = _prefixed(r, "digest", dg, "to", list, list(DIGEST_TO))
    to = tuple(dict.fromkeys(w for w in words if _is_str(r, "digest.to", w)))
    for w in to:
        if w not in DIGEST_TO:
            r.fail("digest.to", unknown_key(w, DIGEST_TO).replace("key", f"value {w!r}", 1))
    if enabled and not words:
        r.fail("digest.to", f"name at least one of {', '.join(DIGEST_TO)} when digest.enabled = true")
    return Digest(enabled=enabled, at=time(int(m[1]), int(m[2])) if m else time(8, 0), timezone=zone,
                  to=tuple(w for w in to if w in DIGEST_TO))


def _acknowledgement(r: _Reader) -> Acknowledgement:
    ack = r.section("acknowledgement")
    _only_known(r, "acknowledgement", ack, ("parts", "status_pages", "support_languages"))
    parts = _prefixed(r, "acknowledgement", ack, "parts", list, list(ACK_PARTS))
    unknown = [p for p in parts if p not in ACK_PARTS]
    if unknown or not all(isinstance(p, str) for p in parts):
        r.fail("acknowledgement.parts", f"unknown part {unknown[0] if unknown else parts!r}; parts: "
                                        f"{', '.join(ACK_PARTS)}")
        parts = list(ACK_PARTS)
    pages = _prefixed(r, "acknowledgement", ack, "status_pages", dict, {})
    status_pages: dict[str, str] = {}
    for queue, url in pages.items():
        key = f"acknowledgement.status_pages.{queue}"
        if queue not in ("AMER", "EMEA", "APAC", "GOVCLOUD"):
            r.fail(key, "expected AMER, EMEA, APAC or GOVCLOUD")
        elif not isinstance(url, str) or not re.fullmatch(r"https?://[^\s<>\"']+", url):
            r.fail(key, f"expected an http(s) URL, got {url!r}")
        else:
            status_pages[queue] = url
    languages = _prefixed(r, "acknowledgement", ack, "support_languages", list, list(SUPPORTED_LANGUAGES))
    odd = [lang for lang in languages if lang not in SUPPORTED_LANGUAGES]
    if odd or not languages:
        r.fail("acknowledgement.support_languages",
               f"expected a non-empty list of {', '.join(SUPPORTED_LANGUAGES)}, got {languages!r}")
        languages = list(SUPPORTED_LANGUAGES)
    return Acknowledgement(tuple(dict.fromkeys(parts)), MappingProxyType(status_pages),
                           tuple(dict.fromkeys(languages)))


EMERGENCY_KEYS = ("queue", "pager", "instructions")


def _lifecycles(r: _Reader, boxes: list[Mailbox], plans: tuple[str, ...]) -> dict[tuple[str, str], Policy]:
    """`[lifecycle]`, `[lifecycle.plans.<plan>]` and each mailbox's `lifecycle` (with
    its own `plans`): one merged Policy per (mailbox, plan) that any table touches."""
    layers: list[tuple[str, str, str, dict[str, Any]]] = []      # (mailbox, plan, where, table)

    def read(mailbox: str, where: str, table: dict[str, Any]) -> None:
        _only_known(r, where, table, (*LIFECYCLE_KEYS, "plans"))
        layers.append((mailbox, "", where, {k: v for k, v in table.items() if k != "plans"}))
        per_plan = table.get("plans", {})
        if not isinstance(per_plan, dict):
            r.fail(f"{where}.plans", f"expected a table of plans, got {per_plan!r}")
            return
        for plan, sub in per_plan.items():
            key = f"{where}.plans.{plan}"
            if plan not in plans:
                r.fail(key, f"no such plan {plan!r}; plans: {', '.join(plans)}")
            elif not isinstance(sub, dict):
                r.fail(key, f"expected a table, got {sub!r}")
            else:
                _only_known(r, key, sub, LIFECYCLE_KEYS)
                layers.append((mailbox, plan, key, sub))

    read("", "lifecycle", r.section("lifecycle"))
    for i, mb in enumerate(boxes):
        read(mb.address, f"mailbox[{i}].lifecycle", dict(mb.lifecycle))
    used = [(m, p) for m, p, w, t in layers if t or w == "lifecycle"]
    out: dict[tuple[str, str], Policy] = {}
    for mailbox in {m for m, _ in used}:
        for plan in {p for _, p in used}:
            merged: dict[str, Any] = dict(_defaults()["lifecycle"])
            where: list[str] = []
            for m, p, w, table in layers:
                if m in ("", mailbox) and p in ("", plan) and (table or w == "lifecycle"):
                    merged.update(table)
                    where.append(w)
            out[(mailbox, plan)] = _policy(r, where, merged)
    r.problems[:] = list(dict.fromkeys(r.problems))     # a bad [lifecycle] value: said once
    return out


def _policy(r: _Reader, tables: list[str], t: dict[str, Any]) -> Policy:
    """One merged lifecycle table: every value checked, the reminders before the end."""
    before = len(r.problems)
    where = tables[-1]
    reminders = t["reminder_after_hours"]
    if isinstance(reminders, (int, float)) and not isinstance(reminders, bool):
        reminders = [reminders]
    if not isinstance(reminders, list) or any(isinstance(h, bool) or not isinstance(h, (int, float))
                                              for h in reminders):
        r.fail(f"{where}.reminder_after_hours", f"expected hours or a list of hours, got {reminders!r}")
        reminders = []
    after = t["autoclose_after_hours"]
    if isinstance(after, bool) or not isinstance(after, (int, float)) or after <= 0:
        r.fail(f"{where}.autoclose_after_hours", f"expected hours > 0, got {after!r}")
        after = 48
    if any(not 0 < h < after for h in reminders) or sorted(set(reminders)) != list(reminders):
        r.fail(f"{where}.reminder_after_hours",
               f"expected ascending hours > 0 and below autoclose_after_hours ({after:g}), got {reminders!r}")
    if t["no_reply"] not in NO_REPLY:
        r.fail(f"{where}.no_reply", f"expected one of {', '.join(NO_REPLY)}, got {t['no_reply']!r}")
    reopen = t["reopen_days"]
    if isinstance(reopen, bool) or not isinstance(reopen, (int, float)) or reopen <= 0:
        r.fail(f"{where}.reopen_days", f"expected days > 0, got {reopen!r}")
        reopen = 7
    if len(r.problems) > before:
        return Policy()
    return Policy(tuple(timedelta(hours=h) for h in reminders), timedelta(hours=after), t["no_reply"],
                  timedelta(days=reopen), " + ".join(f"[{w}]" for w in tables))


def _only_known(r: _Reader, prefix: str, sect: dict[str, Any], keys: tuple[str, ...]) -> None:
    """A table read as a whole: its unknown keys named here, with a "did you mean"
    (and so not a second time by `_Reader.unknown_keys`)."""
    for key in sect:
        if key not in keys:
            r.fail(f"{prefix}.{key}", unknown_key(key, keys))
    if isinstance(sect, _Table):
        sect.asked.update(sect)


def _subtable(r: _Reader, prefix: str, sect: dict[str, Any], name: str) -> dict[str, Any]:
    value = sect.get(name, {})
    if not isinstance(value, dict):
        r.fail(f"{prefix}.{name}", f"expected a table [{prefix}.{name}]")
        return {}
    return value


def _emergency(r: _Reader) -> Emergency:
    """`[emergency]` and `[emergency.instructions]` (one text per language)."""
    em = r.section("emergency")
    d = Emergency()
    _only_known(r, "emergency", em, EMERGENCY_KEYS)
    queue = _check_address(r, "emergency.queue", _prefixed(r, "emergency", em, "queue", str, d.queue))
    pager_value = _prefixed(r, "emergency", em, "pager", str, "")
    pager = _check_address(r, "emergency.pager", pager_value) if pager_value else None
    raw = _subtable(r, "emergency", em, "instructions")
    instructions = dict(d.instructions)
    for language, text in raw.items():
        if language not in SUPPORTED_LANGUAGES:
            r.fail(f"emergency.instructions.{language}",
                   f"unknown language; expected one of {', '.join(SUPPORTED_LANGUAGES)}")
        elif _is_str(r, f"emergency.instructions.{language}", text):
            instructions[language] = text.strip()
    return Emergency(queue=queue, pager=pager, instructions=instructions)


ESCALATION_KEYS = ("engineering", "contact_after_hours", "close_reminder_after_hours", "review_hours",
                   "auto_priority", "tier2")


def _escalation(r: _Reader) -> Escalation:
    """`[escalation]` and `[escalation.tier2]` (one queue address per region)."""
    es = r.section("escalation")
    d = Escalation()
    _only_known(r, "escalation", es, ESCALATION_KEYS)
    engineering = _prefixed(r, "escalation", es, "engineering", str, d.engineering)
    engineering = _check_address(r, "escalation.engineering", engineering)
    hours: dict[str, float] = {}
    for key, default in (("contact_after_hours", 24), ("close_reminder_after_hours", 48)):
        hours[key] = float(_prefixed(r, "escalation", es, key, (int, float), default))
        if hours[key] <= 0:
            r.fail(f"escalation.{key}", f"must be > 0, got {hours[key]:g}")
    review = _prefixed(r, "escalation", es, "review_hours", int, d.review_hours)
    if review < 1:
        r.fail("escalation.review_hours", f"must be at least 1, got {review}")
    auto = _prefixed(r, "escalation", es, "auto_priority", int, d.auto_priority)
    if not 0 <= auto <= 4:
        r.fail("escalation.auto_priority", f"expected 0 (never) to 4, got {auto}")
    t2 = _subtable(r, "escalation", es, "tier2")
    tier2: dict[str, str] = {}
    for region in REGIONS:
        value = t2.get(region, d.tier2[region])
        if _is_str(r, f"escalation.tier2.{region}", value):
            tier2[region] = _check_address(r, f"escalation.tier2.{region}", value)
    for name in t2:
        if name not in REGIONS:
            r.fail(f"escalation.tier2.{name}", f"unknown region; expected one of {', '.join(REGIONS)}")
    return Escalation(tier2=tier2, engineering=engineering,
                      contact_after=timedelta(hours=hours["contact_after_hours"]),
                      close_reminder_after=timedelta(hours=hours["close_reminder_after_hours"]),
                      review_hours=review, auto_priority=auto)

def _relay(r: _Reader, prefix: str, t: dict[str, Any], parent: Relay | None, config_dir: Path | None) -> Relay:
    """`[outbound]`, or `[outbound.govcloud]` (`parent` set): host, port, TLS and SMTP AUTH.

    The GovCloud relay takes host, port, tls and ca_file from `[outbound]` unless it
    sets them; the login never: credentials of one relay are not sent to another.
    """
    dflt = parent or Relay(_defaults()["outbound"]["host"], _defaults()["outbound"]["port"])
    host = _prefixed(r, prefix, t, "host", str, dflt.host)
    tls = _prefixed(r, prefix, t, "tls", str, dflt.tls)
    if tls not in TLS_MODES:
        r.fail(f"{prefix}.tls", f"expected one of {', '.join(map(repr, TLS_MODES))}, got {tls!r}")
        tls = dflt.tls
    # 465 is the port of implicit TLS (RFC 8314 §7.3); STARTTLS on 587 is set explicitly
    port = _port_of(r, prefix, t, dflt.port if parent and parent.tls == tls
                    else 465 if tls == "implicit" else dflt.port)

    def path(key: str, fallback: Path | None) -> Path | None:
        value = _prefixed(r, prefix, t, key, str, "")
        if not value:
            return fallback
        p = _resolve(value, config_dir)
        if not os.access(p, os.R_OK):
            r.fail(f"{prefix}.{key}", f"cannot read {str(p)!r}")
        return p

    ca_file = path("ca_file", dflt.ca_file)
    if ca_file is not None and ca_file != dflt.ca_file and os.access(ca_file, os.R_OK):
        try:
            client_tls_context(ca_file)
        except (ssl.SSLError, OSError, ValueError) as e:
            r.fail(f"{prefix}.ca_file", f"{str(ca_file)!r} holds no CA certificate in PEM form: {e}")
    username = _prefixed(r, prefix, t, "username", str, "") or None
    password = _prefixed(r, prefix, t, "password", str, "") or None
    password_file = path("password_file", None)
    password_env = _prefixed(r, prefix, t, "password_env", str, "") or None
    given = [k for k, v in (("password", password), ("password_file", password_file),
                            ("password_env", password_env)) if v is not None]
    if username is None and given:
        r.fail(f"{prefix}.{given[0]}", "set username too (the login for SMTP AUTH), or remove it")
    elif username is not None and len(given) != 1:
        r.fail(f"{prefix}.password", "set exactly one of password, password_file and password_env")
    elif password_env is not None and not os.environ.get(password_env):
        r.fail(f"{prefix}.password_env", f"the environment variable {password_env} is not set")
    if username is not None and tls == "none" and host not in ("127.0.0.1", "::1", "localhost"):
        r.fail(f"{prefix}.tls", f"tls = \"none\" would send the password to {host} in clear text; "
                                "use \"required\" or \"implicit\"")
    return Relay(host=host, port=port, tls=tls, ca_file=ca_file, username=username, password=password,
                 password_file=password_file, password_env=password_env)


def _limits_and_staff_auth(r: _Reader, data: dict[str, Any]) -> tuple[Limits, bool, frozenset[str]]:
    """`[limits]`, and `[staff] require_authenticated` / `trusted_authserv_ids`."""
    lim = r.section("limits")
    dflt = Limits()
    values: dict[str, Any] = {}
    for key, low in (("max_recipients", 1), ("max_attachments", 0), ("max_nesting", 1),
                     ("auto_answers_per_sender_per_hour", 0), ("auto_answers_per_domain_per_hour", 0),
                     ("refusals_per_sender_per_hour", 0),
                     ("new_tickets_per_sender_per_hour", 1), ("new_tickets_per_domain_per_hour", 1),
                     ("max_participants", 1),
                     ("parse_seconds", 0.1), ("parse_processes", 1), ("max_sessions", 1),
                     ("session_memory", 4096), ("max_rcpt_errors", 1)):
        kind: type | tuple[type, ...] = (int, float) if key == "parse_seconds" else int
        value = _prefixed(r, "limits", lim, key, kind, getattr(dflt, key))
        if value < low:
            r.fail(f"limits.{key}", f"must be at least {low}, got {value}")
        values[key] = float(value) if key == "parse_seconds" else value
    require, trusted = _staff_proof(r, "staff", r.section("staff"), False, frozenset())
    return Limits(**values), require, trusted


def _staff_who(r: _Reader, prefix: str, st: dict[str, Any], addresses: list[str],
               domains: list[str]) -> tuple[frozenset[str], frozenset[str]]:
    """`addresses` and `domains` of `[staff]` or `[staff.govcloud]`."""
    addrs = _prefixed(r, prefix, st, "addresses", list, addresses)
    doms = _prefixed(r, prefix, st, "domains", list, domains)
    return (frozenset(_check_address(r, f"{prefix}.addresses", a) for a in addrs
                      if _is_str(r, f"{prefix}.addresses", a)),
            frozenset(x.strip().lower() for x in doms if _is_str(r, f"{prefix}.domains", x)))


def _staff_proof(r: _Reader, prefix: str, st: dict[str, Any], require_default: bool,
                 trusted_default: frozenset[str]) -> tuple[bool, frozenset[str]]:
    """`require_authenticated` and `trusted_authserv_ids` of `[staff]` or `[staff.govcloud]`."""
    require = _prefixed(r, prefix, st, "require_authenticated", bool, require_default)
    ids = _prefixed(r, prefix, st, "trusted_authserv_ids", list, sorted(trusted_default))
    trusted = frozenset(x.strip().lower() for x in ids
                        if _is_str(r, f"{prefix}.trusted_authserv_ids", x) and x.strip())
    if require and not trusted:
        r.fail(f"{prefix}.trusted_authserv_ids",
               f"name at least one authserv-id when {prefix}.require_authenticated = true")
    return require, trusted


def _staff_mail(r: _Reader, st: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...], timedelta, int]:
    """`[staff] notify`, `notes_to` (lists of NOTIFY_WHO), `list_near_hours` and `attach_max_bytes`."""
    found: list[tuple[str, ...]] = []
    for key, default in (("notify", ["queue", "assignee"]), ("notes_to", ["assignee", "agents"])):
        values = _prefixed(r, "staff", st, key, list, default)
        who = tuple(dict.fromkeys(v for v in values if _is_str(r, f"staff.{key}", v)))
        for v in who:
            if v not in NOTIFY_WHO:
                r.fail(f"staff.{key}", unknown_key(v, NOTIFY_WHO).replace("key", f"value {v!r}", 1))
        if key == "notify" and not values:
            r.fail("staff.notify", f"name at least one of {', '.join(NOTIFY_WHO)}: else staff hear of nothing")
        found.append(tuple(v for v in who if v in NOTIFY_WHO))
    near = _prefixed(r, "staff", st, "list_near_hours", (int, float), 4)
    if not 0 <= near <= 24 * 30:
        r.fail("staff.list_near_hours", f"expected 0 to 720 hours, got {near:g}")
        near = 4
    attach = _prefixed(r, "staff", st, "attach_max_bytes", int, 5_000_000)
    if not 0 <= attach <= 100_000_000:
        r.fail("staff.attach_max_bytes", f"expected 0 to 100000000 bytes, got {attach}")
        attach = 5_000_000
    return found[0], found[1], timedelta(hours=near), attach


def _govcloud_staff(r: _Reader, require: bool, trusted: frozenset[str]) -> GovCloudStaff:
    """`[staff.govcloud]`: GovCloud's own staff; its proof settings default to `[staff]`'s."""
    gs = r.section("staff.govcloud", r.section("staff"))
    addresses, domains = _staff_who(r, "staff.govcloud", gs, [], [])
    gov_require, gov_trusted = _staff_proof(r, "staff.govcloud", gs, require, trusted)
    return GovCloudStaff(addresses, domains, gov_require, gov_trusted)


def _prefixed(r: _Reader, prefix: str, sect: dict[str, Any], key: str,
              kind: type | tuple[type, ...], default: Any) -> Any:
    before = len(r.problems)
    value = r.get(sect, key, kind, default)
    if len(r.problems) > before:
        r.problems[-1] = f"{prefix}.{r.problems[-1]}"
    return value


def _port_of(r: _Reader, prefix: str, sect: dict[str, Any], default: int) -> int:
    value = sect.get("port", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        r.fail(f"{prefix}.port", f"expected an integer from 1 to 65535, got {value!r}")
        return default
    return value


def _is_str(r: _Reader, key: str, value: Any) -> bool:
    if not isinstance(value, str):
        r.fail(key, f"expected a string, got {value!r}")
        return False
    return True


def environment_problems(config: Config) -> list[str]:
    """What a valid file still gets wrong on this machine, for `gateway check-config`
    (serve would fail or misroute only later): `data_dir` that this user cannot
    write, relay hosts that do not resolve. (A GovCloud mailbox without
    `[outbound.govcloud]` is an error of the file itself: `parse`.)"""
    problems = [f"gateway.data_dir: {p}" for p in _unwritable(config.data_dir)]
    if config.outbound_transport == "smtp":
        relays = [("outbound", config.relay)]
        if config.govcloud_relay is not None:
            relays.append(("outbound.govcloud", config.govcloud_relay))
        for key, relay in relays:
            try:
                socket.getaddrinfo(relay.host, relay.port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as e:
                problems.append(f"{key}.host: {relay.host!r} does not resolve ({e})")
    return problems


def _unwritable(data_dir: Path) -> list[str]:
    """Why serve could not store mail in `data_dir` (it creates the folder if
    need be), tried by creating a file there, or in the nearest existing folder
    above it: a read-only mount shows too, even for root."""
    folder = data_dir if data_dir.exists() else next(p for p in data_dir.parents if p.exists())
    what = "is" if folder == data_dir else f"cannot be created: {str(folder)!r} is"
    if not folder.is_dir():
        return [f"{str(data_dir)!r} {what} not a directory"]
    probe = folder / f".gateway-check-config-{uuid.uuid4().hex}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as e:
        return [f"{str(data_dir)!r} {what} not writable: {e.strerror or e}"]
    return []


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load `path`, else $GATEWAY_CONFIG, else the built-in defaults."""
    chosen = path or os.environ.get(ENV_VAR)
    if not chosen:
        return parse({}, source=DEFAULTS_SOURCE)
    p = Path(chosen)
    data = _read_toml(p, "config")
    rules_file = data.get("gateway", {}).get("rules_file") if isinstance(data.get("gateway"), dict) else None
    if isinstance(rules_file, str) and rules_file:
        # The routing rules may live in a file of their own (support leads edit
        # it; ops own the rest); its [rules] replaces the main file's.
        rp = Path(rules_file) if Path(rules_file).is_absolute() else p.parent / rules_file
        data = {**data, "rules": _read_toml(rp, "gateway.rules_file").get("rules", {})}
    return parse(data, source=str(p), config_dir=p.parent)


def _read_toml(p: Path, key: str) -> dict[str, Any]:
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{key}: no such file {str(p)!r}"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{key}: cannot read {str(p)!r}: {e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{key}: {p} is not valid TOML: {e}"]) from None
