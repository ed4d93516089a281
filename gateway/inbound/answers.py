"""Every SMTP reply and process exit status the gateway gives, in one place.

CONTRACT.md fixes the codes; the enhanced status codes are RFC 3463's.
"""
from __future__ import annotations

# SMTP (RFC 5321 §4.2, RFC 3463)
RCPT_OK = "250 2.1.5 Recipient ok"
NO_SUCH_MAILBOX = "550 5.1.1 <{address}>: no such mailbox here"
# RFC 5321 §4.5.3.1.10: more recipients than we take in one transaction
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients (at most {limit} per message)"
# RFC 3463 §3.4.4: 5.3.4 message too big for system (over max_message_size, at DATA or
# for MAIL FROM ... SIZE=); the listener puts it in place of aiosmtpd's wording.
TOO_BIG = "552 5.3.4 Message too big for system (at most {limit} bytes)"
# RFC 3463 §3.7: 5.6.0 other media error (too many parts, nested too deep); 554, not
# 552, which many MTAs retry as temporary.
CONTENT_REFUSED = "554 5.6.0 Message refused: {reason}"
TRY_LATER = "451 4.3.0 Cannot store the message right now; please try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down; please try again later"
# [limits] max_sessions, max_rcpt_errors (RFC 5321 §3.8, §4.2.2; RFC 3463 X.7.0)
TOO_MANY_SESSIONS = "421 4.7.0 Too many connections; please try again later"
TOO_MANY_ERRORS = "421 4.7.0 Too many refused recipients; closing connection"


def accepted(ticket_id: int | None, action: str) -> str:
    where = f"ticket {ticket_id}" if ticket_id is not None else action
    return f"250 2.0.0 Message accepted ({where})"


# Process exit statuses (sysexits.h)
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_CANTCREAT = 73   # cannot create an output file (report --html, tickets attachment --out)
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78
