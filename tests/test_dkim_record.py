"""`gateway dkim-record` (issue 16): the TXT records it prints are the ones that
verify the mail a real `gateway serve` signs, RSA and Ed25519 (RFC 8463) alike."""
from __future__ import annotations

import email
import email.policy
import json
import re
from collections.abc import Callable

import dkim
from conftest import SUPPORT, GatewayProc, mail, uniq
from test_dkim import new_ed25519_key, new_key

from gateway.outbound.dkim import public_txt

ZONE_LINE = re.compile(r'^(\S+) IN TXT \( ((?:"[^"]*" ?)+)\)$')


def zone_records(text: str) -> dict[bytes, bytes]:
    """The printed zone-file lines, as a DNS server would serve them (strings joined)."""
    records = {}
    for line in text.splitlines():
        if line.startswith(";") or not line.strip():
            continue
        m = ZONE_LINE.match(line)
        assert m, line
        parts = re.findall(r'"([^"]*)"', m.group(2))
        assert all(len(p) <= 255 for p in parts), parts
        records[m.group(1).encode()] = "".join(parts).encode()
    return records


def signed_gateway(make_gateway: Callable[..., GatewayProc]) -> GatewayProc:
    gw = make_gateway(extra_toml="""
        [[dkim]]
        domain = "example.com"
        selector = "rsa2026"
        key_file = "keys/rsa.pem"
        [[dkim]]
        domain = "example.com"
        selector = "ed2026"
        key_file = "keys/ed25519.key"
        """)
    (gw.root / "keys").mkdir()
    (gw.root / "keys" / "rsa.pem").write_bytes(new_key("PKCS8", 7))
    (gw.root / "keys" / "ed25519.key").write_bytes(new_ed25519_key("seed", 7))
    return gw


def test_printed_records_verify_both_signatures_of_a_served_ack(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = signed_gateway(make_gateway)
    out = gw.cli("dkim-record")
    assert out.returncode == 0, out.stderr
    records = zone_records(out.stdout)
    assert sorted(records) == [b"ed2026._domainkey.example.com.", b"rsa2026._domainkey.example.com."]
    assert records[b"ed2026._domainkey.example.com."].startswith(b"v=DKIM1; k=ed25519; p=")
    assert b"rsa-sha256, 2048 bits" in out.stdout.encode() and b"ed25519-sha256, 256 bits" in out.stdout.encode()
    as_json = json.loads(gw.cli("dkim-record", "--json").stdout)
    assert {r["name"].encode(): r["value"].encode() for r in as_json} == records

    gw.start()
    customer = f"{uniq('ann')}@customer.example"
    assert gw.send(mail(customer, SUPPORT, uniq("backup fails"), "It stopped last night."))[0] == 250
    ack = gw.sink.wait_to(customer)[0]
    content = ack.as_bytes(policy=email.policy.SMTP)

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)
    headers = email.message_from_bytes(content, policy=email.policy.compat32).get_all("DKIM-Signature")
    assert [dkim.util.parse_tag_value(h.encode())[b"a"] for h in headers] == [b"rsa-sha256", b"ed25519-sha256"]
    assert all(dkim.DKIM(content).verify(idx=i, dnsfunc=dns) for i in range(2))
    # a record of another key (a typo'd paste, an old key) does not verify it
    wrong = dict(records)
    wrong[b"ed2026._domainkey.example.com."] = public_txt(new_ed25519_key("seed", 8))
    assert not dkim.DKIM(content).verify(idx=1, dnsfunc=lambda name, timeout=5: wrong.get(name))


def test_without_keys_it_says_so_and_prints_nothing(gateway: GatewayProc) -> None:
    out = gateway.cli("dkim-record")
    assert out.returncode == 0 and out.stdout == ""
    assert "no [[dkim]] keys" in out.stderr and "unsigned" in out.stderr
    assert json.loads(gateway.cli("dkim-record", "--json").stdout) == []
