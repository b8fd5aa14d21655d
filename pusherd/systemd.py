"""sd_notify: READY=1 / STOPPING=1 / WATCHDOG=1 datagrams to $NOTIFY_SOCKET (Type=notify)."""

from __future__ import annotations

import asyncio
import os
import socket

import structlog

log = structlog.get_logger("pusherd.systemd")


class SystemdNotifier:
    """Talks to systemd when started by it; does nothing otherwise."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace socket
        self.address = address or None
        self.watchdog_s = watchdog_usec / 1_000_000 if watchdog_usec else None

    @classmethod
    def from_env(cls) -> SystemdNotifier:
        """Read NOTIFY_SOCKET and WATCHDOG_USEC (honouring WATCHDOG_PID)."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if pid and pid.isdigit() and int(pid) != os.getpid():
            usec = None
        return cls(os.environ.get("NOTIFY_SOCKET"), int(usec) if usec and usec.isdigit() else None)

    def send(self, message: str) -> bool:
        """Send one datagram; False when not under systemd or when it failed."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message.encode())
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))
            return False
        return True

    def ready(self) -> bool:
        """Both listeners are up and the store is migrated."""
        return self.send("READY=1\nSTATUS=serving")

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.send("STOPPING=1")

    def start_watchdog(self) -> asyncio.Task[None] | None:
        """Ping WATCHDOG=1 at half the interval systemd asked for."""
        if not self.address or not self.watchdog_s:
            return None
        interval = self.watchdog_s / 2

        async def ping() -> None:
            while True:
                self.send("WATCHDOG=1")
                await asyncio.sleep(interval)

        return asyncio.get_running_loop().create_task(ping())
