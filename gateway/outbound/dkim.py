"""DKIM signatures on the gateway's own mail (RFC 6376), one key per mailbox domain.

The Composer signs a mail right after rendering it, before the outbox row is
written, so every retry sends the very bytes that were signed. Receivers that
check DMARC need the signature's domain (`d=`) to align with the From domain:
From is always the answering mailbox, so a key is looked up by the mailbox's
domain, and else by its parent domains (a `d=example.com` signature aligns
with `support@help.example.com` under DMARC's relaxed alignment, RFC 7489
§3.1.1). GovCloud mailboxes live on their own domain and so get their own key.

Signing follows dkimpy's (`dkim.DKIM.sign`) steps with dkimpy's own parts:
message split, relaxed/relaxed canonicalisation, header selection and
folding; tests check that the header is byte for byte the one dkimpy makes.
Only the RSA operation differs when `cryptography` is installed: dkimpy
does it in pure Python (about 6.7 ms for a 2048-bit key on the CI machine),
OpenSSL through `cryptography` in about 0.25 ms, and this is the intake's
hot path. RSA PKCS#1 v1.5 signatures are deterministic, so both give the
same bytes.

Ed25519 keys (RFC 8463, `a=ed25519-sha256`) are signed with `cryptography`:
PureEdDSA over the SHA-256 hash of the header data, as dkimpy does with
PyNaCl; Ed25519 is deterministic, so the bytes are dkimpy's too. A domain
may have one key of each kind; it is then signed twice, RSA on top (RFC 8463
§4: verifiers that don't know Ed25519 ignore that signature and check the
RSA one).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dkim as dkimpy
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import RSASSA_PKCS1_v1_5_sign, UnparsableKeyError, parse_pem_private_key

# What is signed (RFC 6376 §5.4.1 recommends at least these), each one time
# more than it occurs (§5.4.2 "oversigning"): nobody on the way can add a
# second From, Subject or To, or a Cc or Reply-To we did not write, without
# breaking the signature. Received, Return-Path and the like are added on the
# way and are never signed (§5.4.1).
SIGNED_HEADERS = ("from", "to", "cc", "subject", "date", "message-id", "in-reply-to", "references",
                  "reply-to", "mime-version", "content-type", "content-transfer-encoding",
                  "content-language", "auto-submitted")
MIN_BITS = 1024            # RFC 8301 §3.2: verifiers MUST NOT accept less
RECOMMENDED_BITS = 2048    # RFC 8301 §3.2: signers SHOULD use at least 2048
_CANON = b"relaxed/relaxed"


@dataclass(frozen=True)
class DkimKey:
    """A signing domain's private key and the DNS selector that publishes its public half."""

    domain: str
    selector: str
    private_key_pem: bytes = field(repr=False)   # never in a log line or a traceback


RSA, ED25519 = "rsa-sha256", "ed25519-sha256"     # the a= values (RFC 6376 §3.3, RFC 8463 §3)


def _ed25519_key(raw: bytes) -> ed25519.Ed25519PrivateKey | None:
    """An Ed25519 private key in PEM (`openssl genpkey -algorithm ed25519`) or as
    dkimpy's `dknewkey --ktype ed25519` writes it (the 32-byte seed, base64)."""
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(raw, password=None)
            return key if isinstance(key, ed25519.Ed25519PrivateKey) else None
        seed = base64.b64decode(b"".join(raw.split()), validate=True)
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed) if len(seed) == 32 else None
    except (ValueError, TypeError, binascii.Error):
        return None


class DkimSigner:
    """Signs mail for one key. The key is parsed once, here; `ValueError` when it can't be."""

    def __init__(self, key: DkimKey):
        self.domain = key.domain.lower().rstrip(".")
        self.selector = key.selector
        pem = _pem_bytes(key.private_key_pem)
        self._fast: Any = None
        self._ed = _ed25519_key(pem)
        if self._ed is not None:
            self.algorithm, self.bits = ED25519, 256
            return
        try:
            self._pk = parse_pem_private_key(pem)
        except (UnparsableKeyError, ValueError, IndexError) as e:
            raise ValueError(f"not an unencrypted RSA or Ed25519 private key in PEM form: {e}") from None
        self.algorithm, self.bits = RSA, self._pk["modulus"].bit_length()
        if self.bits < MIN_BITS:
            raise ValueError(f"the RSA key has {self.bits} bits; receivers refuse less than {MIN_BITS}"
                             f" (RFC 8301), use {RECOMMENDED_BITS}")
        try:
            fast = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):   # dkimpy read it: sign with dkimpy's RSA
            fast = None
        if isinstance(fast, rsa.RSAPrivateKey):
            self._fast = fast

    def sign(self, message: bytes, *, timestamp: int) -> bytes:
        """The message with its `DKIM-Signature` header in front (relaxed/relaxed).

        `timestamp` is `t=`, the signing time in seconds since the epoch.
        """
        return self.header(message, timestamp=timestamp) + message

    def header(self, message: bytes, *, timestamp: int) -> bytes:
        """The `DKIM-Signature: ...` header line for `message`, ending in CRLF.

        The steps of dkimpy's `DKIM.sign` and `DKIM.gen_header` (dkimpy 1.1),
        with the same tags in the same order and the same folding.
        """
        headers, body = dkimpy.rfc822_parse(message)
        policy = CanonicalizationPolicy.from_c_value(_CANON)
        body_hash = base64.b64encode(hashlib.sha256(policy.canonicalize_body(body)).digest())
        present: dict[bytes, int] = {}
        for name, _ in headers:
            present[name.lower()] = present.get(name.lower(), 0) + 1
        include = [h.encode() for h in SIGNED_HEADERS for _ in range(present.get(h.encode(), 0) + 1)]
        domain = self.domain.encode("ascii")
        fields = [(b"v", b"1"), (b"a", self.algorithm.encode("ascii")), (b"c", _CANON), (b"d", domain),
                  (b"i", b"@" + domain), (b"q", b"dns/txt"), (b"s", self.selector.encode("ascii")),
                  (b"t", str(int(timestamp)).encode("ascii")), (b"h", b" : ".join(include)),
                  (b"bh", body_hash),
                  # dkimpy folds with a dummy b= so that b= starts a line of its own
                  (b"b", b"0" * 60)]
        name = b"DKIM-Signature"
        value = dkimpy.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(name))
        value = dkimpy.RE_BTAG.sub(b"\\1", value)
        hasher = hashlib.sha256()
        dkimpy.hash_headers(hasher, policy, policy.canonicalize_headers(headers), include,
                            (name, b" " + value), dict(fields))
        fields[-1] = (b"b", base64.b64encode(self._sign(hasher)))
        value = dkimpy.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n", namelen=len(name))
        return name + b": " + bytes(value)

    def _sign(self, hasher: Any) -> bytes:
        if self._ed is not None:   # RFC 8463 §3: PureEdDSA over the SHA-256 hash
            return self._ed.sign(hasher.digest())
        if self._fast is not None:
            return bytes(self._fast.sign(hasher.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())))
        return bytes(RSASSA_PKCS1_v1_5_sign(hasher, self._pk))


def signers_for(signers: Mapping[str, Sequence[DkimSigner]], domain: str) -> Sequence[DkimSigner]:
    """The signers for a mailbox domain: its own keys, else its nearest parent domain's."""
    labels = domain.lower().rstrip(".").split(".")
    for i in range(len(labels) - 1):
        found = signers.get(".".join(labels[i:]))
        if found:
            return found
    return ()


def sign_all(signers: Sequence[DkimSigner], message: bytes, *, timestamp: int) -> bytes:
    """The message signed by each signer, the first one's header on top. Each
    signature covers the message as written (no DKIM-Signature is in `h=`)."""
    return b"".join(s.header(message, timestamp=timestamp) for s in signers) + message


def public_txt(private_key_pem: bytes | str) -> bytes:
    """The TXT record to publish at `<selector>._domainkey.<domain>` (RFC 6376 §3.6.1):
    for RSA the public key as DER SubjectPublicKeyInfo (RFC 5280 §4.1), base64;
    for Ed25519 the 32 bytes of the public key, base64 (RFC 8463 §4)."""
    ed = _ed25519_key(_pem_bytes(private_key_pem))
    if ed is not None:
        raw = ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)
    pk = parse_pem_private_key(_pem_bytes(private_key_pem))
    rsa_public = _der(0x30, _der_int(pk["modulus"]) + _der_int(pk["publicExponent"]))
    algorithm = _der(0x30, _der(0x06, _RSA_ENCRYPTION) + _der(0x05, b""))
    spki = _der(0x30, algorithm + _der(0x03, b"\x00" + rsa_public))
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki)


_RSA_ENCRYPTION = bytes.fromhex("2a864886f70d010101")   # OID 1.2.840.113549.1.1.1


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = bytes([n]) if n < 0x80 else \
        bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _pem_bytes(pem: bytes | str) -> bytes:
    # dkimpy's PEM reader wants "\n" line ends; a key saved on Windows has "\r\n"
    raw = pem.encode("ascii") if isinstance(pem, str) else pem
    return raw.replace(b"\r\n", b"\n").strip() + b"\n"
