"""Message ids: version-1 messageUuids and version-7 generated messageIds, made cheaply.

The standard library's uuid1() takes its slow pure-Python path where libuuid is missing, and
builds a UUID object only to format it; ingest makes one of each per event.

Generated messageIds are version 7 (RFC 9562: unix milliseconds, then a counter, then random
bits) rather than random version 4: they are a key of the unique index that makes ingest
idempotent, and time-ordered keys land on the index's last page instead of dirtying a random
page of it per event, which cut the pages each group commit writes and fsyncs several-fold.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid

_GREGORIAN_OFFSET = 0x01B21DD213814000  # 100 ns intervals from 1582-10-15 to 1970-01-01
_VARIANT = {f"{i:x}": "89ab"[i & 3] for i in range(16)}


class IdSource:
    """Version-1 UUIDs (time, a random clock sequence, this host's node), strictly increasing."""

    def __init__(self) -> None:
        self._node = f"{uuid.getnode():012x}"
        clock_seq = secrets.randbits(14)
        self._clock = f"{(clock_seq >> 8) | 0x80:02x}{clock_seq & 0xFF:02x}"
        self._last = 0
        self._ms7 = 0
        self._seq7 = 0
        self._prefix7 = ""
        self._random7 = ""
        self._pos7 = 0

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

    def uuid7(self) -> str:
        """A new version-7 UUID string (a generated messageId), increasing within this process."""
        ms = time.time_ns() // 1_000_000
        if ms > self._ms7:
            self._ms7, self._seq7 = ms, secrets.randbits(10)  # leaves room to count up
            self._prefix7 = f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7"
        else:
            self._seq7 += 1
            if self._seq7 > 0xFFF:  # 4096 ids in one millisecond: borrow the next one
                self._ms7, self._seq7 = self._ms7 + 1, 0
                self._prefix7 = f"{self._ms7 >> 16:08x}-{self._ms7 & 0xFFFF:04x}-7"
        if self._pos7 >= len(self._random7):  # one getrandom() call per 512 ids
            self._random7, self._pos7 = os.urandom(8 * 512).hex(), 0
        r = self._random7[self._pos7 : self._pos7 + 16]
        self._pos7 += 16
        # 62 random bits after the variant bits "10": the first digit becomes 8, 9, a or b.
        return f"{self._prefix7}{self._seq7:03x}-{_VARIANT[r[0]]}{r[1:4]}-{r[4:]}"
