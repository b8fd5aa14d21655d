"""The tests' network guard: nothing the tests run may talk to anything but loopback.

The project's rule is that tests and load only ever talk to 127.0.0.1 / localhost, yet several
tests need public destinations (`https://93.184.216.34/hook`) so that destination validation
accepts them, and a daemon that delivers would really try to reach them. `install()` wraps the
places where a Python process starts talking to another host:

- `socket.socket.connect` / `connect_ex`: every Python-level connection starts there, whichever
  path leads to it: asyncio's and uvloop's `sock_connect` (the delivery client's Happy Eyeballs
  race, `pusherd.delivery.http`), `socket.create_connection` (smtplib, urllib), asyncpg on an
  asyncio loop. An address outside loopback fails as a refused connection does (ECONNREFUSED),
  before the real connect is called. Unix sockets pass.
- `socket.getaddrinfo`: a DNS query is traffic to the resolver, so a name other than localhost is
  answered as an unknown name (EAI_NONAME) without a query. Numeric hosts pass.
- uvloop (which `pusherd serve` runs on) looks names up and connects to a host and port in C,
  past those two: its `Loop.getaddrinfo` and `Loop.create_connection` get the same checks.

Each refusal is recorded (`attempts()`), and appended to the file named by $PUSHERD_TEST_OUTBOUND
when set, so that subprocesses report theirs to the test session: `tests/conftest.py` installs the
guard for the session and puts `tests/loopback_site` on PYTHONPATH, so every Python subprocess the
tests start (`pusherd serve`, the CLI) installs it too.

Not covered: other connections made below Python (libpq, programs that are not Python: the
PostgreSQL server, Chromium), and datagrams sent with `sendto` without a connect.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
from typing import Any, NamedTuple

ENV_LOG = "PUSHERD_TEST_OUTBOUND"  # file the guard appends refusals to (subprocesses)


class Attempt(NamedTuple):
    """One refused attempt to leave loopback."""

    kind: str  # "connect" or "getaddrinfo"
    host: str
    port: int | None


_attempts: list[Attempt] = []
_lock = threading.Lock()
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo
_real_uv: dict[str, Any] = {}  # uvloop.Loop's own getaddrinfo and create_connection
_installed = False


def attempts() -> list[Attempt]:
    """The refusals of this process so far, oldest first."""
    with _lock:
        return list(_attempts)


def read_log(path: str) -> list[Attempt]:
    """The refusals a guarded subprocess appended to `path` (see ENV_LOG)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        kind, host, port = line.split("\t")
        out.append(Attempt(kind, host, int(port) if port else None))
    return out


def is_loopback_host(host: str) -> bool:
    """Whether `host` (an address or a name) can only mean this machine's loopback."""
    name = host.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        name = name.rstrip(".").lower()
        return name == "localhost" or name.endswith(".localhost")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _record(kind: str, host: str, port: int | None) -> None:
    attempt = Attempt(kind, host, port)
    with _lock:
        _attempts.append(attempt)
    path = os.environ.get(ENV_LOG)
    if path:
        # One short write per line in append mode: lines of several processes do not interleave.
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{kind}\t{host}\t{'' if port is None else port}\n")


def _outside(sock: socket.socket, address: Any) -> tuple[str, int | None] | None:
    """(host, port) of a connect that would leave loopback, or None."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None  # unix sockets (systemd's notify socket, PostgreSQL's) stay on the machine
    host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
    if is_loopback_host(host):
        return None
    return host, int(address[1])


def _refused(host: str, port: int | None) -> ConnectionRefusedError:
    return ConnectionRefusedError(
        errno.ECONNREFUSED,
        f"Connect call failed ({host!r}, {port}): refused by the tests' loopback guard",
    )


def _connect(self: socket.socket, address: Any) -> None:
    outside = _outside(self, address)
    if outside is not None:
        _record("connect", *outside)
        raise _refused(*outside)
    _real_connect(self, address)


def _connect_ex(self: socket.socket, address: Any) -> int:
    outside = _outside(self, address)
    if outside is not None:
        _record("connect", *outside)
        return errno.ECONNREFUSED
    return _real_connect_ex(self, address)


def _getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
    _check_name(host, port)
    return _real_getaddrinfo(host, port, *args, **kwargs)


def _check_name(host: Any, port: Any) -> None:
    """Refuse (and record) a lookup of a name other than localhost."""
    if host is None:
        return
    name = host.decode() if isinstance(host, bytes) else str(host)
    if not is_loopback_host(name) and not _numeric(name):
        _record("getaddrinfo", name, port if isinstance(port, int) else None)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


async def _uv_getaddrinfo(self: Any, host: Any, port: Any, **kwargs: Any) -> Any:
    _check_name(host, port)
    return await _real_uv["getaddrinfo"](self, host, port, **kwargs)


async def _uv_create_connection(
    self: Any, protocol_factory: Any, host: Any = None, port: Any = None, **kwargs: Any
) -> Any:
    if host is not None:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if _numeric(name) and not is_loopback_host(name):
            _record("connect", name, port)
            raise _refused(name, port)
        _check_name(name, port)
    return await _real_uv["create_connection"](self, protocol_factory, host, port, **kwargs)


def _numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


def install() -> None:
    """Guard this process (idempotent). The wrappers live on the `socket` module's class and
    function, so sockets made by any thread or event loop, before or after, are guarded."""
    global _installed
    if _installed:
        return
    _installed = True
    socket.socket.connect = _connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign,assignment]
    socket.getaddrinfo = _getaddrinfo
    try:
        import uvloop
    except ImportError:
        return
    # uvloop.Loop is a Python subclass of the compiled loop: its methods can be wrapped.
    for name, wrapper in (
        ("getaddrinfo", _uv_getaddrinfo),
        ("create_connection", _uv_create_connection),
    ):
        _real_uv.setdefault(name, getattr(uvloop.Loop, name))
        setattr(uvloop.Loop, name, wrapper)


def uninstall() -> None:
    """Put the real functions back."""
    global _installed
    _installed = False
    socket.socket.connect = _real_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = _real_getaddrinfo
    if _real_uv:
        import uvloop

        for name, real in _real_uv.items():
            setattr(uvloop.Loop, name, real)
