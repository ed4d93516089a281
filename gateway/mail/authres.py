"""Did the receiving MTA authenticate this mail's From domain? (pure)

Staff commands and relayed answers are taken only from staff whose mail
the gateway's own MTA authenticated (`[staff] require_authenticated`): a
`From: agent@example.com` costs a forger nothing, an aligned DKIM signature
or SPF pass does. The MTA (OpenDKIM/OpenDMARC, Postfix with milters, Exim,
an appliance) writes its verdict into `Authentication-Results` (RFC 8601);
this module reads it back.

Trust rules (RFC 8601 §5, §7.1): only headers whose `authserv-id` is one
of `[staff] trusted_authserv_ids` count, because anyone can write an
`Authentication-Results` header into a mail; the border MTA must remove
headers carrying its own authserv-id from incoming mail (OpenDMARC,
OpenDKIM and Exim do) so that those we trust are the ones it wrote.

A mail is authenticated when a trusted header says
- `dmarc=pass` with a `header.from` property aligned with the From domain
  (RFC 7489 §3: DMARC pass means SPF or DKIM aligned with that domain; a
  pass that does not name its domain proves nothing about ours), or
- `dkim=pass` with `header.d` (or `header.i`) aligned with the From domain,
and no trusted header says `dmarc=fail` for it. An SPF pass is not taken:
it vouches for the sending host of the envelope domain, which a shared
host or a forwarder offers to others too. Alignment is RFC 7489
§3.1's relaxed alignment approximated without a Public Suffix List: the two
domains are equal, or one is a subdomain of the other (never a bare TLD).
"""
from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32

HEADER = "Authentication-Results"


@dataclass(frozen=True)
class Result:
    """One `method=result` of an Authentication-Results header, with its properties."""

    method: str                      # dkim, spf, dmarc, arc, ... (lower case, no version)
    result: str                      # pass, fail, none, neutral, ... (lower case)
    props: dict[str, str] = field(default_factory=dict)   # "header.d" -> "example.com"


@dataclass(frozen=True)
class Verdict:
    authenticated: bool
    reason: str                      # for the log and the mail to the agent


def _strip_comments(value: str) -> str:
    """Remove RFC 5322 comments `( ... )` (nested, with quoted-pairs), keep quoted strings."""
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
            continue
        if ch == "\\":
            escaped = True
            if depth == 0:
                out.append(ch)
            continue
        if quoted:
            out.append(ch)
            if ch == '"':
                quoted = False
            continue
        if ch == "(":
            depth += 1
            continue
        if ch == ")" and depth:
            depth -= 1
            continue
        if depth:
            continue
        if ch == '"':
            quoted = True
        out.append(ch)
    return "".join(out)


def _split(value: str, sep: str) -> list[str]:
    """Split on `sep` outside quoted strings."""
    parts: list[str] = []
    buf: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return parts


_PAIR = re.compile(r'([A-Za-z0-9_.\-/]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s"]+)')


def parse(value: str) -> tuple[str, list[Result]]:
    """The authserv-id and the results of one header value (RFC 8601 §2.2).

    Malformed pieces are skipped, never guessed at: what can't be read can't
    authenticate anybody.
    """
    pieces = _split(_strip_comments(value.replace("\r", " ").replace("\n", " ")), ";")
    head = pieces[0].split()
    authserv_id = head[0].strip().lower() if head else ""
    results: list[Result] = []
    for piece in pieces[1:]:
        pairs = [(k.lower(), v.strip('"')) for k, v in _PAIR.findall(piece)]
        if not pairs:
            continue                       # "none", or garbage
        method, result = pairs[0]
        if "." in method:
            continue                       # a property without its method
        results.append(Result(method.split("/", 1)[0], result.lower(),
                              {k: v.lower() for k, v in pairs[1:] if "." in k}))
    return authserv_id, results


def aligned(auth_domain: str, from_domain: str) -> bool:
    """Relaxed alignment (RFC 7489 §3.1), approximated: same domain or one under the other."""
    a = auth_domain.strip().strip(".").lower().rpartition("@")[2]
    f = from_domain.strip().strip(".").lower()
    if not a or not f or "." not in a or "." not in f:
        return False                       # a bare TLD aligns with nothing
    return a == f or a.endswith("." + f) or f.endswith("." + a)


def verify(header_values: Sequence[str], *, from_domain: str,
           trusted_ids: Collection[str]) -> Verdict:
    """Whether trusted `Authentication-Results` headers authenticate `from_domain`."""
    trusted = {t.strip().lower() for t in trusted_ids}
    results: list[Result] = []
    seen_ids: list[str] = []
    for value in header_values:
        authserv_id, found = parse(value)
        seen_ids.append(authserv_id)
        if authserv_id in trusted:
            results.extend(found)
    if not results:
        others = ", ".join(sorted({i for i in seen_ids if i})) or "none"
        return Verdict(False, f"no Authentication-Results from a trusted server "
                              f"(trusted: {', '.join(sorted(trusted)) or 'none'}; found: {others})")
    for r in results:
        if r.method == "dmarc" and r.result == "fail":
            return Verdict(False, f"DMARC failed for {from_domain}")
    for r in results:
        if r.result != "pass":
            continue
        if r.method == "dmarc":
            # without header.from a pass says nothing about WHICH domain passed
            hfrom = r.props.get("header.from")
            if hfrom is not None and hfrom == from_domain.strip().strip(".").lower():
                return Verdict(True, f"dmarc=pass (header.from={hfrom})")
        elif r.method == "dkim":
            d = r.props.get("header.d") or r.props.get("header.i", "")
            if aligned(d, from_domain):
                return Verdict(True, f"dkim=pass aligned (d={d})")
    summary = ", ".join(f"{r.method}={r.result}" for r in results)
    return Verdict(False, f"no aligned pass for {from_domain} ({summary})")


def header_values(raw: bytes) -> list[str]:
    """Every Authentication-Results value in a raw mail's header, top first."""
    head = BytesHeaderParser(policy=compat32).parsebytes(raw[:256 * 1024])
    return [str(v) for v in head.get_all(HEADER, [])][:50]
