"""SSRF guard for destinations (SPEC §6 "Network safety").

Destinations are vetted twice: at subscribe time by :func:`vet_destination`, and at connect
time by :class:`GuardedResolver`, which drops blocked addresses from DNS answers. The delivery
client (``pusherd.delivery.http``) connects to exactly the addresses the resolver returned, so the
vetted address is the one used and a DNS rebind between lookups cannot slip through.

IP-literal hosts are not resolved at all, so the resolver alone cannot stop
``https://127.0.0.1/``: the client calls :func:`check_connect_host` on them before connecting.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = [
    "DestinationError",
    "GuardedResolver",
    "check_connect_host",
    "check_url",
    "is_blocked_ip",
    "looks_like_ip_literal",
    "vet_destination",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Listed explicitly because ipaddress' flags differ between Python patch releases
# (3.11.x changed is_private for several of these) and 100.64/10 is not is_private at all.
_BLOCKED_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "255.255.255.255/32",
    )
)

_BLOCKED_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/128",
        "::1/128",
        "::/96",  # deprecated IPv4-compatible addresses
        "100::/64",  # discard-only
        "2001:db8::/32",
        "3fff::/20",  # documentation (RFC 9637)
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",  # deprecated site-local
        "ff00::/8",
    )
)

# NAT64 prefixes translate the low 32 bits to an IPv4 destination.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


class DestinationError(ValueError):
    """A destination URL that pusherd refuses to deliver to; the message is user-facing."""


def _blocked_v4(ip: ipaddress.IPv4Address) -> bool:
    if any(ip in net for net in _BLOCKED_V4):
        return True
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if any(ip in net for net in _NAT64):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_blocked_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is loopback, private, link-local, CGNAT, multicast, reserved or unset."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _blocked_v4(ip)
    # A scope id ("fe80::1%eth0") does not change which network the address is in.
    if ip.scope_id is not None:
        ip = ipaddress.IPv6Address(int(ip))
    embedded = _embedded_v4(ip)
    if any(_blocked_v4(v4) for v4 in embedded):
        return True
    if any(ip in net for net in _BLOCKED_V6):
        return True
    if ip.ipv4_mapped is not None:
        # Mapped addresses are is_private as a block; their IPv4 part was judged above.
        return False
    return (
        ip.is_loopback
        or ip.is_link_local
        or ip.is_site_local
        or ip.is_multicast
        or ip.is_unspecified
        or (ip.is_private and not embedded)
        or (ip.is_reserved and not embedded)
    )


def _parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


# LDH labels of 1-63 characters (IDNs arrive punycoded from yarl), at most 253 in all, an
# optional trailing dot; an underscore is tolerated inside a label as real DNS names carry them.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}\.?$)(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$"
)


def check_url(url: str, *, allow_http: bool) -> yarl.URL:
    """Parse and check the form of a destination URL; raise DestinationError if unusable."""
    schemes = ("https", "http") if allow_http else ("https",)
    wanted = "an absolute http:// or https:// URL" if allow_http else "an absolute https:// URL"
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError) as exc:
        raise DestinationError(f"destination must be {wanted}") from exc
    if not parsed.absolute or parsed.scheme not in schemes or not parsed.raw_host:
        raise DestinationError(f"destination must be {wanted}")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise DestinationError("credentials in destination URL are not allowed")
    if looks_like_ip_literal(parsed.raw_host):
        if _parse_ip(parsed.raw_host) is None:
            # aiohttp refuses legacy numeric forms ("2130706433", "127.1") at connect time.
            raise DestinationError("destination host is not a valid IP address")
    elif not _HOSTNAME.match(parsed.raw_host):
        raise DestinationError("destination host is not a valid host name")
    try:
        port = parsed.port
    except ValueError as exc:
        raise DestinationError("destination has an invalid port") from exc
    if port is None or not 0 < port < 65536:
        raise DestinationError("destination has an invalid port")
    return parsed


def _blocked_message(host: str) -> str:
    return (
        f"destination {host} resolves to a blocked address "
        "(loopback, private, link-local, CGNAT, multicast, reserved or unspecified)"
    )


async def vet_destination(url: str, *, allow_http: bool, allow_private: bool) -> None:
    """Refuse a destination whose form is wrong or whose host resolves to a blocked address."""
    parsed = check_url(url, allow_http=allow_http)
    if allow_private:
        return
    host = parsed.raw_host
    assert host is not None  # check_url guarantees a host
    literal = _parse_ip(host)
    if literal is not None:
        if is_blocked_ip(literal):
            raise DestinationError(_blocked_message(host))
        return
    if _is_localhost_name(host):
        # RFC 6761 reserves these for loopback even where the local resolver lacks them
        # (e.g. "localhost." with a trailing dot is not in /etc/hosts).
        raise DestinationError(_blocked_message(host))
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, parsed.port, type=socket.SOCK_STREAM
        )
    except (socket.gaierror, UnicodeError):
        # SPEC §6: a name that does not resolve yet is accepted; the resolver checks it again
        # when connecting.
        return
    for info in infos:
        ip = _parse_ip(str(info[4][0]))
        if ip is None or is_blocked_ip(ip):
            raise DestinationError(_blocked_message(host))


def _is_localhost_name(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


def looks_like_ip_literal(host: str) -> bool:
    # Mirrors aiohttp.helpers.is_ip_address: these hosts bypass the resolver entirely.
    return ":" in host or host.replace(".", "").isdigit()


def check_connect_host(host: str, allow_private: bool) -> None:
    """Refuse an IP-literal host that is blocked; call before every POST (resolver is skipped)."""
    if allow_private or not looks_like_ip_literal(host):
        return
    ip = _parse_ip(host)
    # Legacy numeric forms ("2130706433", "127.1") would reach the socket layer unvetted.
    if ip is None or is_blocked_ip(ip):
        raise DestinationError(_blocked_message(host))


class GuardedResolver(AbstractResolver):
    """System resolver that drops blocked addresses, pinning connections to vetted ones."""

    def __init__(self, allow_private: bool, inner: AbstractResolver | None = None) -> None:
        """Create the resolver; ``allow_private`` disables filtering; ``inner`` replaces the
        system resolver (its answers are filtered all the same)."""
        self._allow_private = allow_private
        # ThreadedResolver grabs the running loop in __init__, so build it on first use.
        self._inner: AbstractResolver | None = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` and keep only addresses that are not blocked."""
        if self._inner is None:
            self._inner = aiohttp.ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        if self._allow_private:
            return results
        allowed = [r for r in results if not _result_blocked(r)]
        if not allowed:
            # aiohttp wraps resolver OSErrors in ClientConnectorDNSError (a ClientError) and
            # shows only strerror, so give one.
            raise OSError(errno.EHOSTUNREACH, f"{host} resolves only to blocked addresses")
        return allowed

    async def close(self) -> None:
        """Release the wrapped resolver."""
        if self._inner is not None:
            await self._inner.close()
            self._inner = None


def _result_blocked(result: ResolveResult) -> bool:
    ip = _parse_ip(result["host"])
    return ip is None or is_blocked_ip(ip)
