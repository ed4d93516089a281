"""sd_notify(3) over $NOTIFY_SOCKET: READY=1, STATUS=..., STOPPING=1.

The protocol is one datagram per notification to a unix socket (an abstract
one when the name starts with '@'); outside systemd it does nothing.
"""
from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError:
        return False
    return True
