"""Configuration: every contract key, defaults, and errors that name the key."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.config import ConfigError, load, parse

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "gateway.example.toml"


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(data)
    return e.value.problems


def test_built_in_defaults_run_on_one_machine_with_no_other_service(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    c = load(None)
    assert (c.smtp_host, c.smtp_port, c.outbound_transport) == ("127.0.0.1", 2525, "maildir")
    assert c.data_dir == Path("var") and c.ticket_tag == "Support"
    assert c.max_message_size == 26_214_400 and not c.lmtp
    assert {q for q in c.queues} == {"AMER", "EMEA", "APAC", "GOVCLOUD"}


def test_example_config_is_valid_and_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    c = load(EXAMPLE)
    assert c.mailboxes[1].govcloud and c.govcloud_relay is not None
    data = tomllib.loads(text)
    for section in ("gateway", "smtp", "outbound", "staff", "store", "redirects"):
        assert section in data
    # every key line carries a comment
    for line in text.splitlines():
        stripped = line.strip()
        if "=" in stripped and not stripped.startswith("#"):
            assert "#" in stripped or stripped.startswith(("AMER", "EMEA", "APAC", "GOVCLOUD")), line


@pytest.mark.parametrize("data, key", [
    ({"smtp": {"port": "not-a-port"}}, "smtp.port"),
    ({"smtp": {"port": 70000}}, "smtp.port"),
    ({"smtp": {"lmtp": "yes"}}, "smtp.lmtp"),
    ({"smtp": {"max_message_size": 10}}, "smtp.max_message_size"),
    ({"gateway": {"ticket_tag": "Sup[port"}}, "gateway.ticket_tag"),
    ({"gateway": {"data_dir": 5}}, "gateway.data_dir"),
    ({"mailbox": [{"address": "not an address"}]}, "mailbox[0].address"),
    ({"mailbox": [{"address": "a@b.example", "govcloud": "no"}]}, "mailbox[0].govcloud"),
    ({"mailbox": []}, "mailbox"),
    ({"outbound": {"transport": "pigeon"}}, "outbound.transport"),
    ({"outbound": {"govcloud": {"port": -1}}}, "outbound.govcloud.port"),
    ({"staff": {"addresses": ["x"]}}, "staff.addresses"),
    ({"staff": {"queues": {"MARS": "m@x.example"}}}, "staff.queues.MARS"),
    ({"staff": {"govcloud": {"addresses": ["x"]}}}, "staff.govcloud.addresses"),
    ({"staff": {"govcloud": {"adresses": []}}}, "staff.govcloud.adresses"),
    ({"staff": {"govcloud": {"require_authenticated": True}}}, "staff.govcloud.trusted_authserv_ids"),
    ({"outbound": {"transport": "smtp"}}, "outbound.govcloud"),   # the GovCloud mailbox has no relay
    ({"staff": {"queues": {"EMEA": 3}}}, "staff.queues.EMEA"),
    ({"rules": {"default_region": "MOON"}}, "rules.default_region"),
    ({"redirects": {"billing": "nope"}}, "redirects.billing"),
    ({"store": {"url": "mysql://x"}}, "store.url"),
    ({"smtpp": {}}, "smtpp"),
])
def test_invalid_values_are_reported_with_their_key(data: dict, key: str) -> None:
    found = problems(data)
    assert any(p.startswith(key + ":") for p in found), found


def test_all_problems_are_reported_at_once() -> None:
    found = problems({"smtp": {"port": "x", "lmtp": 1}, "outbound": {"transport": "x"}})
    assert len(found) == 3


def test_check_config_exit_codes(tmp_path: Path) -> None:
    def run(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
                              capture_output=True, text=True, timeout=60)

    assert run(EXAMPLE).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[smtp]\nport = "not-a-port"\n')
    r = run(bad)
    assert r.returncode == 78 and "smtp.port" in r.stderr
    bad.write_text("[smtp\nport = 1")
    r = run(bad)
    assert r.returncode == 78 and "not valid TOML" in r.stderr
    r = run(tmp_path / "missing.toml")
    assert r.returncode == 78 and "no such file" in r.stderr


def test_mailbox_lookup_ignores_case_and_plus_tags() -> None:
    c = parse({})
    assert c.mailbox_for("Support@Example.COM").address == "support@example.com"  # type: ignore[union-attr]
    assert c.mailbox_for("<support+x1@example.com>") is not None
    assert c.mailbox_for("supportx@example.com") is None


def test_escalation_and_emergency_keys_are_checked() -> None:
    with pytest.raises(ConfigError) as e:
        parse({"escalation": {"tier2": {"MARS": "x@y.example"}, "auto_priority": 7, "engineer": "a@b.example"},
               "emergency": {"pager": "not-an-address", "instructions": {"fr": "Appelez"}}})
    text = str(e.value)
    for key in ("escalation.tier2.MARS", "escalation.auto_priority", "escalation.engineer",
                "emergency.pager", "emergency.instructions.fr"):
        assert key in text, text


def test_every_unknown_key_in_every_section_is_named_with_a_suggestion(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[outbound]\ntrasnport = "smtp"\n[staff]\nadresses = ["a@b.example"]\n'
                   '[smtp]\nprot = 25\n[gatway]\n[outbound.govcloud]\nhots = "x"\n'
                   '[[mailbox]]\naddress = "s@e.example"\ngovclud = true\n'
                   '[rules]\ndefault_regoin = "AMER"\n[limits]\nmax_recipient = 3\n'
                   '[metrics]\nenabeld = true\n[store]\nurll = "x"\n[lifecycle]\nreopen_day = 1\n'
                   '[scheduler]\ninterval = 1\n[staff.queues]\nEMAE = "q@e.example"\n')
    r = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(cfg)],
                       capture_output=True, text=True)
    assert r.returncode == 78, r.stderr
    for expected in ("gatway: unknown section; did you mean 'gateway'?",
                     "outbound.trasnport: unknown key; did you mean 'transport'?",
                     "staff.adresses: unknown key; did you mean 'addresses'?",
                     "smtp.prot: unknown key; did you mean 'port'?",
                     "outbound.govcloud.hots: unknown key; did you mean 'host'?",
                     "mailbox[0].govclud: unknown key; did you mean 'govcloud'?",
                     "rules.default_regoin: unknown key; did you mean 'default_region'?",
                     "limits.max_recipient: unknown key; did you mean 'max_recipients'?",
                     "metrics.enabeld: unknown key; did you mean 'enabled'?",
                     "store.urll: unknown key; did you mean 'url'?",
                     "lifecycle.reopen_day: unknown key; did you mean 'reopen_days'?",
                     "scheduler.interval: unknown key; did you mean 'interval_seconds'?",
                     "staff.queues.EMAE: unknown queue; did you mean 'EMEA'?"):
        assert expected in r.stderr, (expected, r.stderr)


def test_unknown_key_in_a_rules_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "rules.toml").write_text('[rules]\ndefualt_plan = "x"\n')
    (tmp_path / "gateway.toml").write_text('[gateway]\nrules_file = "rules.toml"\n')
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "gateway.toml")
    assert "rules.defualt_plan: unknown key; did you mean 'default_plan'?" in e.value.problems


def test_relative_paths_follow_the_config_file_and_the_database_follows_data_dir(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text('[gateway]\ndata_dir = "state"\n')
    c = load(tmp_path / "gateway.toml")
    assert c.data_dir == tmp_path / "state"
    assert c.store_url == f"sqlite:///{tmp_path / 'state' / 'gateway.db'}"
    (tmp_path / "other.toml").write_text('[store]\nurl = "sqlite:///db/x.db"\n')
    assert load(tmp_path / "other.toml").store_url == f"sqlite:///{tmp_path / 'db' / 'x.db'}"
    # the shipped example, copied elsewhere, keeps its database in its own data_dir
    copy = tmp_path / "copy" / "gateway.toml"
    copy.parent.mkdir()
    copy.write_text(EXAMPLE.read_text())
    c = load(copy)
    assert c.store_url == f"sqlite:///{c.data_dir / 'gateway.db'}" and c.data_dir.is_relative_to(copy.parent)


def test_check_config_checks_what_only_this_machine_can_tell(tmp_path: Path) -> None:
    """A file can be valid and still fail here: data_dir not writable, a relay host
    that does not resolve, GovCloud mail that would leave through the commercial relay."""
    def check(text: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "gateway.toml"
        path.write_text(text)
        return subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
                              capture_output=True, text=True, timeout=60)

    gov_box = '[[mailbox]]\naddress = "support@examplegov.com"\ngovcloud = true\n'
    relays = '[outbound]\ntransport = "smtp"\nhost = "127.0.0.1"\n[outbound.govcloud]\nhost = "localhost"\n'
    ok = check(f'[gateway]\ndata_dir = "data"\n{gov_box}{relays}')
    assert ok.returncode == 0, ok.stderr
    assert not (tmp_path / "data").exists()                   # checking creates nothing
    (tmp_path / "data").mkdir()
    assert check(f'[gateway]\ndata_dir = "data"\n{gov_box}{relays}').returncode == 0
    assert list((tmp_path / "data").iterdir()) == []          # the probe file is gone again

    (tmp_path / "a-file").write_text("")
    for data_dir, says in (("a-file", "is not a directory"), ("a-file/below", "is not a directory"),
                           ("/proc/gateway-data", "cannot be created"),
                           ("/proc/self", "is not writable")):
        r = check(f'[gateway]\ndata_dir = "{data_dir}"\n{relays}')
        assert r.returncode == 78 and "gateway.data_dir:" in r.stderr and says in r.stderr, (data_dir, r.stderr)

    r = check(f'{gov_box}[outbound]\ntransport = "smtp"\nhost = "relay.does-not-exist.invalid"\n'
              '[outbound.govcloud]\nhost = "gov-relay.does-not-exist.invalid"\n')
    assert r.returncode == 78, r.stderr
    assert "outbound.host: 'relay.does-not-exist.invalid' does not resolve" in r.stderr
    assert "outbound.govcloud.host: 'gov-relay.does-not-exist.invalid' does not resolve" in r.stderr

    r = check(f'{gov_box}[outbound]\ntransport = "smtp"\nhost = "127.0.0.1"\n')
    assert r.returncode == 78 and "support@examplegov.com is a GovCloud mailbox" in r.stderr, r.stderr
    assert "[outbound.govcloud]" in r.stderr
    # the Maildir transport sends nothing anywhere: neither check applies
    assert check(f'{gov_box}[outbound]\ntransport = "maildir"\nhost = "relay.does-not-exist.invalid"\n'
                 ).returncode == 0


def test_relay_tls_and_login_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: [outbound] TLS and SMTP AUTH; the GovCloud relay never inherits the login."""
    pw = tmp_path / "relay.pw"
    pw.write_text("s3cret\nsecond line is not the password\n")
    c = parse({"outbound": {"tls": "implicit", "username": "gw", "password_file": str(pw),
                            "govcloud": {"host": "gov.example.net"}}})
    assert (c.relay.port, c.relay.tls, c.relay.username, c.relay.secret()) == (465, "implicit", "gw", "s3cret")
    gov = c.govcloud_relay
    assert gov is not None and (gov.host, gov.port, gov.tls, gov.username, gov.secret()) == \
        ("gov.example.net", 465, "implicit", None, None)
    assert "s3cret" not in repr(parse({"outbound": {"username": "gw", "password": "s3cret"}}))
    c = parse({})
    assert (c.relay.tls, c.relay.port, c.relay.ca_file, c.relay.username) == ("opportunistic", 25, None, None)
    monkeypatch.setenv("GW_RELAY_PW", "from-env")
    assert parse({"outbound": {"username": "gw", "password_env": "GW_RELAY_PW"}}).relay.secret() == "from-env"


@pytest.mark.parametrize("outbound, key, words", [
    ({"tls": "starttls"}, "outbound.tls", "expected one of 'opportunistic', 'required', 'implicit', 'none'"),
    ({"ca_file": "/nonexistent/ca.pem"}, "outbound.ca_file", "cannot read"),
    ({"ca_file": "/etc/hostname"}, "outbound.ca_file", "holds no CA certificate in PEM form"),
    ({"password": "x"}, "outbound.password", "set username too"),
    ({"username": "gw"}, "outbound.password", "set exactly one of password, password_file and password_env"),
    ({"username": "gw", "password": "x", "password_env": "X"}, "outbound.password", "exactly one"),
    ({"username": "gw", "password_env": "GW_NOT_SET_ANYWHERE"}, "outbound.password_env", "is not set"),
    ({"username": "gw", "password_file": "/nonexistent/pw"}, "outbound.password_file", "cannot read"),
    ({"host": "smtp.example.net", "tls": "none", "username": "gw", "password": "x"}, "outbound.tls",
     "would send the password to smtp.example.net in clear text"),
    ({"govcloud": {"tls": "sometimes"}}, "outbound.govcloud.tls", "expected one of"),
])
def test_relay_tls_and_login_mistakes_are_named(outbound: dict, key: str, words: str) -> None:
    found = [p for p in problems({"outbound": outbound}) if p.startswith(key + ":")]
    assert found and words in found[0], problems({"outbound": outbound})


def test_govcloud_staff_are_their_own_and_inherit_the_proof_settings() -> None:
    c = parse({"staff": {"addresses": ["agent@example.com"], "require_authenticated": True,
                         "trusted_authserv_ids": ["mx.example.com"],
                         "govcloud": {"addresses": ["Gail@Staff.ExampleGov.com"], "domains": ["gov.example"]}}})
    assert c.is_staff("agent@example.com") and not c.is_govcloud_staff("agent@example.com")
    assert c.may_answer("agent@example.com", False) and not c.may_answer("agent@example.com", True)
    for gov in ("gail@staff.examplegov.com", "x@gov.example", "gov@staff.examplegov.com"):
        assert c.may_answer(gov, True) and c.may_answer(gov, False), gov
    assert not c.may_answer("amer@staff.example.com", True)        # a regional queue is not GovCloud's
    assert c.staff_proof(True) == (True, frozenset({"mx.example.com"}))
    own = parse({"staff": {"govcloud": {"require_authenticated": True, "trusted_authserv_ids": ["mx.gov.example"]}}})
    assert own.staff_proof(True) == (True, frozenset({"mx.gov.example"})) and own.staff_proof(False) == (False, frozenset())


def test_who_is_notified_defaults_and_mistakes() -> None:
    """`[staff] notify` / `notes_to` / `list_near_hours` (issue 20, README "Who is notified")."""
    c = parse({})
    assert (c.staff_notify, c.staff_notes_to, c.staff_list_near) == (
        ("queue", "assignee"), ("assignee", "agents"), timedelta(hours=4))
    c = parse({"staff": {"notify": ["assignee", "staff", "assignee"], "notes_to": [], "list_near_hours": 0.5}})
    assert (c.staff_notify, c.staff_notes_to, c.staff_list_near) == (("assignee", "staff"), (), timedelta(minutes=30))
    for data, expected in [
        ({"notify": ["queue", "assigne"]}, "staff.notify: unknown value 'assigne'; did you mean 'assignee'?"),
        ({"notes_to": ["everyone"]}, ("staff.notes_to: unknown value 'everyone'; expected one of agents, "
                                      "assignee, queue, staff")),
        ({"notify": []}, "staff.notify: name at least one of queue, assignee, agents, staff"),
        ({"notify": "queue"}, "staff.notify: expected a list, got 'queue'"),
        ({"notify": [1]}, "staff.notify: expected a string, got 1"),
        ({"list_near_hours": -1}, "staff.list_near_hours: expected 0 to 720 hours, got -1"),
        ({"notifiy": ["queue"]}, "staff.notifiy: unknown key; did you mean 'notify'?"),
    ]:
        assert any(p.startswith(expected) for p in problems({"staff": data})), (expected, problems({"staff": data}))
