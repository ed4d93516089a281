"""Configuration: every contract key, defaults, and errors that name the key."""
from __future__ import annotations

import subprocess
import sys
import tomllib
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
