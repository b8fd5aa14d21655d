"""Lease owners: who holds a claimed delivery, and whether that process is gone."""

from __future__ import annotations

import os
import secrets
import socket


def new_owner() -> str:
    """A lease owner for this process: "host:pid:nonce" (the nonce tells restarts apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_is_dead(owner: str) -> bool:
    """Whether a lease owner ("host:pid:nonce") was a process of this host that is gone."""
    host, _, rest = owner.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's, or unknown: its lease runs out on its own
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # an earlier process with our pid (the nonce differs: not us)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
