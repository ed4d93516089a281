"""The private parts of aiosmtpd and dkimpy the gateway builds on are still there.

pyproject.toml bounds both below their next minor version; this test names
what broke, so that raising a bound is a deliberate act: read the new
release's code where it is used (gateway/inbound/smtp.py's DATA loop,
gateway/outbound/dkim.py's signing steps), then widen the bound.
"""
from __future__ import annotations

import inspect
import re

import aiosmtpd.smtp
import dkim
import dkim.canonicalization
import dkim.crypto

from gateway.inbound import smtp as listener

AIOSMTPD_METHODS = ("_call_handler_hook", "_set_post_data_state", "check_helo_needed", "check_auth_needed",
                    "push", "smtp_DATA", "smtp_MAIL")
AIOSMTPD_ATTRIBUTES = ("_reader", "_writer", "_decode_data", "data_size_limit", "line_length_limit",
                       "envelope", "transport")
DKIMPY_NAMES = {dkim: ("rfc822_parse", "fold", "RE_BTAG", "hash_headers"),
                dkim.canonicalization: ("CanonicalizationPolicy",),
                dkim.crypto: ("RSASSA_PKCS1_v1_5_sign", "UnparsableKeyError", "parse_pem_private_key")}


def test_aiosmtpd_internals_used_by_the_data_loop_are_there() -> None:
    missing = [m for m in AIOSMTPD_METHODS if not callable(getattr(aiosmtpd.smtp.SMTP, m, None))]
    assert not missing, f"aiosmtpd {aiosmtpd.__version__} lacks SMTP.{missing}: see gateway/inbound/smtp.py"
    init = inspect.getsource(aiosmtpd.smtp.SMTP)
    gone = [a for a in AIOSMTPD_ATTRIBUTES if f"self.{a}" not in init]
    assert not gone, f"aiosmtpd {aiosmtpd.__version__} no longer sets {gone}: see gateway/inbound/smtp.py"
    mail = re.sub(r"'\s*'", "", inspect.getsource(aiosmtpd.smtp.SMTP.smtp_MAIL))   # join the literal
    assert listener.AIOSMTPD_SIZE_REFUSAL in mail, \
        f"aiosmtpd {aiosmtpd.__version__} words its SIZE= refusal differently: update AIOSMTPD_SIZE_REFUSAL"


def test_dkimpy_names_used_for_signing_are_there() -> None:
    for module, names in DKIMPY_NAMES.items():
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, f"dkimpy lacks {module.__name__}.{missing}: see gateway/outbound/dkim.py"
    assert callable(dkim.canonicalization.CanonicalizationPolicy.from_c_value)
