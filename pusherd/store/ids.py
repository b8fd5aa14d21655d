"""Message ids: RFC 4122 version-1 messageUuids and version-4 messageIds, made cheaply.

The standard library's uuid1() takes its slow pure-Python path where libuuid is missing, and
both build a UUID object only to format it; ingest makes one of each per event.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid

_GREGORIAN_OFFSET = 0x01B21DD213814000  # 100 ns intervals from 1582-10-15 to 1970-01-01


class IdSource:
    """Version-1 UUIDs (time, a random clock sequence, this host's node), strictly increasing."""

    def __init__(self) -> None:
        self._node = f"{uuid.getnode():012x}"
        clock_seq = secrets.randbits(14)
        self._clock = f"{(clock_seq >> 8) | 0x80:02x}{clock_seq & 0xFF:02x}"
        self._last = 0

    def uuid1(self) -> str:
        """A new version-1 UUID string (the messageUuid)."""
        ts = time.time_ns() // 100 + _GREGORIAN_OFFSET
        if ts <= self._last:
            ts = self._last + 1  # never twice the same time, even within 100 ns
        self._last = ts
        return (
            f"{ts & 0xFFFFFFFF:08x}-{(ts >> 32) & 0xFFFF:04x}-{(ts >> 48) & 0x0FFF | 0x1000:04x}"
            f"-{self._clock}-{self._node}"
        )

    @staticmethod
    def uuid4() -> str:
        """A new random version-4 UUID string (a generated messageId)."""
        h = os.urandom(16).hex()
        variant = "89ab"[int(h[16], 16) & 3]
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"
