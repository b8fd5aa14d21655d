"""`pusherd console-link --org UUID [--expires-in 1h]`: a one-time sign-in URL for a tenant."""

from __future__ import annotations

import argparse
import uuid as uuidlib

from pusherd.cli import CliError, with_store
from pusherd.clock import now_ms
from pusherd.config import Config, split_listen
from pusherd.units import parse_duration


def console_base(config: Config) -> str:
    """console.base_url, or http://<api.listen> (a wildcard address shown as loopback)."""
    if config.console.base_url:
        return config.console.base_url
    listen = config.api.listen
    if listen.startswith("unix:"):
        return "http://localhost"
    host, port = split_listen(listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def cmd_console_link(args: argparse.Namespace, config: Config) -> int:
    """Store a one-time link (used once, then refused; refused after expiry too) and print it."""
    try:
        org = str(uuidlib.UUID(args.org))
    except ValueError:
        raise CliError(f"--org: not a UUID: {args.org!r}") from None
    try:
        expires_s = parse_duration(args.expires_in)
    except ValueError as exc:
        raise CliError(f"--expires-in: {exc}") from None
    if expires_s <= 0:
        raise CliError("--expires-in: must be more than 0")
    expires_ms = now_ms() + int(expires_s * 1000)
    secret = with_store(config, lambda store: store.console.create_link(org, expires_ms))
    print(f"{console_base(config)}/console/link?t={secret}")
    return 0
