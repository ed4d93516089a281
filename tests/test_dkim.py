"""DKIM: the Composer signs per mailbox domain; dkimpy verifies; the config parser says what is wrong."""
from __future__ import annotations

import base64
import email
import email.policy
import functools
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from gateway.config import parse_dkim
from gateway.model import Kind, Status, Ticket
from gateway.outbound.compose import Composer
from gateway.outbound.dkim import DkimKey, DkimSigner, public_txt
from gateway.outbound.tokens import TicketTokens

NOW = datetime.now(UTC).replace(microsecond=0)   # t= must not lie in the verifier's future

# 512 bits: too short for any receiver (RFC 8301), here only to be refused
SHORT_KEY = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEA4AD/C72ehLP4jbic
MDVhkWvduRmNiB3oUK5ybJHxtn7cY5bRn4/YITmGGJS43+q7ovMgROggjH6Nylt3
eADCbQIDAQABAkEApieXBzprrrtgDp91Gz09VgTQvk/575FflRkQvv+yb05fADPQ
GPyfcMghIHEXfo5/fQoLBCOn/kp4c2FFrpAAAQIhAPYUIoPOSrIhbxIBaUfx88Th
NmLxj726I/NqjzQvgNJtAiEA6QkFH2LzPxR1Jvgr99SCCzEpaY+DYOUBGwHG3VoJ
sAECIAmMaHZy18UntPae5WXsRog6MPEP7ILxKRn15Y6h1T7VAiABfWhF+hj6B0R0
elO1oust7SOJpDw/y1cFeC5wTdoQAQIgV0szOFgJHLPEBZoJ4ISSaNRrOpR8NRbl
V01UftBeFlM=
-----END PRIVATE KEY-----
"""


@functools.cache
def new_key(fmt: str = "PKCS8", n: int = 0) -> bytes:
    """A fresh 2048-bit key per (format, n), made once per test session."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return bytes(key.private_bytes(serialization.Encoding.PEM, getattr(serialization.PrivateFormat, fmt),
                                   serialization.NoEncryption()))


@functools.cache
def new_ed25519_key(fmt: str = "PEM", n: int = 0) -> bytes:
    """A fresh Ed25519 key (RFC 8463): PEM as `openssl genpkey -algorithm ed25519` writes
    it, or "seed" as dkimpy's `dknewkey --ktype ed25519` does (the 32 bytes, base64)."""
    key = ed25519.Ed25519PrivateKey.generate()
    if fmt == "seed":
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        return base64.b64encode(raw) + b"\n"
    return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


@pytest.fixture(scope="module")
def keys() -> dict[str, DkimKey]:
    return {"example.com": DkimKey("example.com", "gw2026", new_key()),
            "examplegov.com": DkimKey("examplegov.com", "gov1", new_key("TraditionalOpenSSL", 1))}


def by_domain(keys: Mapping[str, DkimKey | tuple[DkimKey, ...]]) -> dict[str, tuple[DkimKey, ...]]:
    """Keys as the Composer takes them (`[gateway] dkim_keys`): each domain's tuple."""
    return {d: k if isinstance(k, tuple) else (k,) for d, k in keys.items()}


def dns_for(keys: Mapping[str, DkimKey | tuple[DkimKey, ...]]) -> Callable[..., bytes | None]:
    """A DNS TXT lookup that knows `<selector>._domainkey.<domain>.` for each key."""
    records = {f"{k.selector}._domainkey.{k.domain}.".encode(): public_txt(k.private_key_pem)
               for domain_keys in by_domain(keys).values() for k in domain_keys}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)
    return lookup


def ticket(govcloud: bool = False, mailbox: str = "support@example.com") -> Ticket:
    return Ticket(id=1042, subject="Sicherung schlägt fehl", status=Status.OPEN, requester="ann@c.example",
                  cc=("bob@c.example",), region="EMEA", govcloud=govcloud, priority=3, mailbox=mailbox,
                  linked_ticket=None, created_at=NOW)


def compose(composer: Composer, mailbox: str = "support@example.com", govcloud: bool = False,
            kind: Kind = Kind.ACK, language: str = "de") -> bytes:
    context: dict[str, Any] = {"name": "Ann", "target": None, "missing": []} if kind is Kind.ACK else \
        {"text": "Bitte erneut versuchen.", "agent": "Jörg Müller"}
    return composer.compose(kind, ticket=ticket(govcloud, mailbox), mailbox=mailbox, to=["ann@c.example"],
                            cc=["bob@c.example"], answers=["<a@c.example>"], now=NOW, context=context,
                            reply_to=mailbox, language=language).content


def signature(content: bytes) -> dict[bytes, bytes]:
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    tags: dict[bytes, bytes] = dkim.util.parse_tag_value(msg["DKIM-Signature"].encode())
    return tags


def test_composer_signs_with_the_mailbox_domains_key_and_dkimpy_verifies(keys: dict[str, DkimKey]) -> None:
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), dkim_keys=by_domain(keys))
    content = compose(c)
    assert content.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com;")
    assert dkim.verify(content, dnsfunc=dns_for(keys))
    tags = signature(content)
    assert tags[b"s"] == b"gw2026" and tags[b"t"] == str(int(NOW.timestamp())).encode()
    signed = [h.strip() for h in tags[b"h"].split(b":")]
    for name in (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"in-reply-to", b"references",
                 b"reply-to", b"mime-version", b"content-type", b"content-language", b"auto-submitted"):
        assert name in signed
    # oversigned: one more than present, so none can be added on the way
    assert signed.count(b"from") == 2 and signed.count(b"subject") == 2


def test_every_kind_and_language_verifies(keys: dict[str, DkimKey]) -> None:
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), dkim_keys=by_domain(keys))
    for kind in (Kind.ACK, Kind.STAFF_REPLY):
        for language in ("en", "de", "ja"):
            assert dkim.verify(compose(c, kind=kind, language=language), dnsfunc=dns_for(keys))


def test_tampered_body_fails_verification(keys: dict[str, DkimKey]) -> None:
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), dkim_keys=by_domain(keys))
    content = compose(c, language="en")
    head, _, body = content.partition(b"\r\n\r\n")
    assert b"Hello Ann" in body
    assert not dkim.verify(head + b"\r\n\r\n" + body.replace(b"Hello Ann", b"Hello Eve", 1),
                           dnsfunc=dns_for(keys))


def test_tampered_or_added_headers_fail_verification(keys: dict[str, DkimKey]) -> None:
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), dkim_keys=by_domain(keys))
    content = compose(c, language="en")
    dns = dns_for(keys)
    subject = b"\r\nSubject: =?utf-8?q?=5BSupport_=23104"
    for original, forged in ((b"\r\nTo: ann@c.example", b"\r\nTo: eve@c.example"),
                             (subject + b"2", subject + b"3")):
        assert original in content
        assert not dkim.verify(content.replace(original, forged), dnsfunc=dns)
    head, sep, body = content.partition(b"\r\n\r\n")
    assert not dkim.verify(head + b"\r\nReply-To: eve@evil.example" + sep + body, dnsfunc=dns)
    assert not dkim.verify(head + b"\r\nFrom: eve@evil.example" + sep + body, dnsfunc=dns)
    # headers nobody signs may be added on the way (Received, Return-Path)
    assert dkim.verify(b"Received: from relay.example.com\r\nReturn-Path: <support@example.com>\r\n" + content,
                       dnsfunc=dns)


def test_govcloud_mailbox_signs_with_its_own_key(keys: dict[str, DkimKey]) -> None:
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), dkim_keys=by_domain(keys))
    content = compose(c, mailbox="support@examplegov.com", govcloud=True)
    tags = signature(content)
    assert tags[b"d"] == b"examplegov.com" and tags[b"s"] == b"gov1"
    assert dkim.verify(content, dnsfunc=dns_for(keys))
    # verified against the commercial key alone it fails
    assert not dkim.verify(content, dnsfunc=dns_for({"x": DkimKey("examplegov.com", "gov1", keys["example.com"]
                                                                  .private_key_pem)}))


def test_subdomain_mailbox_uses_the_parent_domains_key_and_unknown_domains_are_unsigned(
        keys: dict[str, DkimKey]) -> None:
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), dkim_keys=by_domain(keys))
    content = compose(c, mailbox="support@help.example.com")
    assert signature(content)[b"d"] == b"example.com"
    assert dkim.verify(content, dnsfunc=dns_for(keys))
    assert not compose(c, mailbox="support@other.example").startswith(b"DKIM-Signature")
    assert not compose(Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32))).startswith(b"DKIM")


def test_maildir_line_ends_still_verify(keys: dict[str, DkimKey]) -> None:
    # the Maildir transport writes "\n" line ends; relaxed canonicalisation does not care
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), dkim_keys=by_domain(keys))
    assert dkim.verify(compose(c).replace(b"\r\n", b"\n"), dnsfunc=dns_for(keys))


def test_same_bytes_as_dkimpys_own_signer_with_either_rsa(keys: dict[str, DkimKey],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    unsigned = compose(Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32)))
    key = keys["example.com"]
    signer = DkimSigner(key)
    ours = signer.header(unsigned, timestamp=1_795_000_000)
    tags = dkim.util.parse_tag_value(ours[len(b"DKIM-Signature:"):])
    monkeypatch.setattr(dkim.time, "time", lambda: 1_795_000_000)
    theirs = dkim.DKIM(unsigned).sign(b"gw2026", b"example.com", key.private_key_pem,
                                      canonicalize=(b"relaxed", b"relaxed"),
                                      include_headers=[h.strip() for h in tags[b"h"].split(b":")])
    assert ours == theirs
    signer._fast = None                    # dkimpy's pure-Python RSA: the same signature
    assert signer.header(unsigned, timestamp=1_795_000_000) == theirs


def test_unusable_key_is_refused_when_the_composer_is_built() -> None:
    with pytest.raises(ValueError, match="bits"):
        Composer(ticket_tag="S", tokens=TicketTokens(b"s" * 32),
                 dkim_keys={"example.com": (DkimKey("example.com", "s", SHORT_KEY),)})
    with pytest.raises(ValueError, match="not an unencrypted RSA or Ed25519 private key"):
        DkimSigner(DkimKey("example.com", "s", b"-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----"))


def test_private_key_never_shows_in_repr(keys: dict[str, DkimKey]) -> None:
    assert "PRIVATE" not in repr(keys["example.com"])


# -- [[dkim]] configuration --------------------------------------------------------

def test_parse_dkim_reads_keys_relative_to_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "dkim").mkdir()
    (tmp_path / "dkim" / "example.pem").write_bytes(new_key().replace(b"\n", b"\r\n"))   # saved on Windows
    (tmp_path / "gov.pem").write_bytes(new_key("TraditionalOpenSSL", 2))
    keys, problems = parse_dkim([
        {"domain": "Example.COM", "selector": "gw2026", "key_file": "dkim/example.pem"},
        {"domain": "examplegov.com", "selector": "gov1", "key_file": str(tmp_path / "gov.pem")},
    ], tmp_path)
    assert problems == []
    assert sorted(keys) == ["example.com", "examplegov.com"]
    assert keys["example.com"][0].selector == "gw2026"
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), dkim_keys=by_domain(keys))
    assert dkim.verify(compose(c), dnsfunc=dns_for(keys))


def test_parse_dkim_names_every_problem(tmp_path: Path) -> None:
    good = tmp_path / "good.pem"
    good.write_bytes(new_key())
    (tmp_path / "short.pem").write_bytes(SHORT_KEY)
    (tmp_path / "junk.pem").write_text("not a key")
    encrypted = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"))
    (tmp_path / "enc.pem").write_bytes(encrypted)
    keys, problems = parse_dkim([
        {"domain": "example.com", "selector": "s1", "key_file": "good.pem"},
        {"domain": "example.com", "selector": "s2", "key_file": "good.pem"},
        {"domain": "localhost", "selector": "s1", "key_file": "good.pem"},
        {"domain": "a.example", "selector": "bad selector", "key_file": "good.pem"},
        {"domain": "b.example", "key_file": "missing.pem", "keyfile": "x"},
        {"domain": "c.example", "selector": "s1", "key_file": "short.pem"},
        {"domain": "d.example", "selector": "s1", "key_file": "junk.pem"},
        {"domain": "e.example", "selector": "s1", "key_file": "enc.pem"},
        {"domain": 7, "selector": "s1"},
        "example.com",  # type: ignore[list-item]
    ], tmp_path)
    assert list(keys) == ["example.com"]
    assert problems[0] == "dkim[1].domain: example.com already has an RSA key (dkim[0])"
    assert problems[1] == "dkim[2].domain: 'localhost' is not a domain name like example.com"
    assert problems[2] == "dkim[3].selector: 'bad selector' is not letters, digits, '-' and '.'"
    assert problems[3] == "dkim[4].keyfile: unknown key; did you mean 'key_file'?"
    assert problems[4] == "dkim[4].selector: missing"
    assert problems[5].startswith(f"dkim[4].key_file: cannot read {tmp_path / 'missing.pem'}: No such file")
    assert problems[6].startswith("dkim[5].key_file: ") and "512 bits" in problems[6]
    assert problems[7].startswith(f"dkim[6].key_file: {tmp_path / 'junk.pem'}: not an unencrypted RSA or Ed25519 private key")
    assert problems[8].startswith("dkim[7].key_file: ") and "is encrypted" in problems[8]
    assert problems[9] == "dkim[8].domain: must be a string, got int"
    assert problems[10] == "dkim[8].key_file: missing (the file with the domain's RSA or Ed25519 private key)"
    assert problems[-1] == "dkim[9]: must be a table with domain, selector and key_file"


def test_parse_dkim_single_table_and_wrong_type(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_bytes(new_key())
    keys, problems = parse_dkim({"domain": "example.com", "selector": "s1", "key_file": "k.pem"}, tmp_path)
    assert problems == [] and list(keys) == ["example.com"]
    assert parse_dkim({"domain": "example.com", "selector": "s1"}, tmp_path)[1] == \
        ["dkim.key_file: missing (the file with the domain's RSA or Ed25519 private key)"]
    assert parse_dkim("example.com", None) == (  # type: ignore[arg-type]
        {}, ["dkim: must be a list of tables ([[dkim]]) with domain, selector and key_file"])
    assert parse_dkim([], None) == ({}, [])


# -- Ed25519 (RFC 8463) --------------------------------------------------------------

def all_signatures_verify(content: bytes, dns: Callable[..., bytes | None]) -> list[bytes]:
    """The a= of each DKIM-Signature, checked one by one by dkimpy (with PyNaCl for Ed25519)."""
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    found = []
    for idx, header in enumerate(msg.get_all("DKIM-Signature") or []):
        assert dkim.DKIM(content).verify(idx=idx, dnsfunc=dns), (idx, header)
        found.append(dkim.util.parse_tag_value(header.encode())[b"a"])
    return found


@pytest.mark.parametrize("fmt", ["PEM", "seed"])
def test_ed25519_key_signs_and_dkimpy_verifies_it(fmt: str) -> None:
    keys = {"example.com": DkimKey("example.com", "ed1", new_ed25519_key(fmt))}
    content = compose(Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), dkim_keys=by_domain(keys)))
    assert content.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.com;")
    assert public_txt(keys["example.com"].private_key_pem).startswith(b"v=DKIM1; k=ed25519; p=")
    assert all_signatures_verify(content, dns_for(keys)) == [b"ed25519-sha256"]
    head, _, body = content.partition(b"\r\n\r\n")
    assert not dkim.verify(head + b"\r\n\r\n" + body.replace(b"Ann", b"Eve", 1), dnsfunc=dns_for(keys))
    # another Ed25519 key's record does not verify it
    other = {"example.com": DkimKey("example.com", "ed1", new_ed25519_key(fmt, 1))}
    assert not dkim.verify(content, dnsfunc=dns_for(other))


def test_ed25519_same_bytes_as_dkimpys_own_signer(monkeypatch: pytest.MonkeyPatch) -> None:
    unsigned = compose(Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32)))
    key = DkimKey("example.com", "ed1", new_ed25519_key("seed"))
    ours = DkimSigner(key).header(unsigned, timestamp=1_795_000_000)
    tags = dkim.util.parse_tag_value(ours[len(b"DKIM-Signature:"):])
    monkeypatch.setattr(dkim.time, "time", lambda: 1_795_000_000)
    theirs = dkim.DKIM(unsigned).sign(b"ed1", b"example.com", key.private_key_pem.strip(),
                                      canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=b"ed25519-sha256",
                                      include_headers=[h.strip() for h in tags[b"h"].split(b":")])
    assert ours == theirs


def test_a_domain_with_both_keys_is_signed_twice_rsa_on_top(tmp_path: Path) -> None:
    (tmp_path / "ed.pem").write_bytes(new_ed25519_key())
    (tmp_path / "rsa.pem").write_bytes(new_key())
    keys, problems = parse_dkim([
        {"domain": "example.com", "selector": "ed1", "key_file": "ed.pem"},
        {"domain": "example.com", "selector": "rsa1", "key_file": "rsa.pem"},
        {"domain": "example.com", "selector": "ed2", "key_file": "ed.pem"},
    ], tmp_path)
    assert problems == ["dkim[2].domain: example.com already has an Ed25519 key (dkim[0])"]
    assert [k.selector for k in keys["example.com"]] == ["ed1", "rsa1"]
    content = compose(Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), dkim_keys=keys))
    # a verifier that reads only the first signature (dkimpy's default) finds the RSA one
    assert all_signatures_verify(content, dns_for(keys)) == [b"rsa-sha256", b"ed25519-sha256"]
    assert dkim.verify(content, dnsfunc=dns_for(keys))
    # each signature stands alone: with only the Ed25519 record published, the second still verifies
    only_ed = {"example.com": keys["example.com"][0]}
    assert not dkim.DKIM(content).verify(idx=0, dnsfunc=dns_for(only_ed))
    assert dkim.DKIM(content).verify(idx=1, dnsfunc=dns_for(only_ed))
