"""The pusherd command line: every subcommand of SPEC §1 (serve, token, emit, replay, ...)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
import structlog

from pusherd import __version__
from pusherd.clock import iso_ms, now_ms
from pusherd.config import (
    Config,
    ConfigError,
    effective_config,
    load_config,
    split_listen,
)
from pusherd.log import configure_logging
from pusherd.store import SchemaTooNewError, Store, StoreError, open_store
from pusherd.units import parse_duration

EXIT_USAGE = 2
T = TypeVar("T")
log = structlog.get_logger("pusherd")


class CliError(Exception):
    """A one-line error for the user; exit code 1."""


# -- tokens --------------------------------------------------------------------------------


def with_store(config: Config, use: Callable[[Store], Awaitable[T]]) -> T:
    """Open the store for one command, run `use` on it, close it (errors as CliError)."""

    async def run() -> T:
        try:
            store = await open_store(config.storage, background=False)
        except SchemaTooNewError as exc:
            raise CliError(str(exc)) from None
        except StoreError as exc:
            raise CliError(str(exc)) from None
        try:
            return await use(store)
        except StoreError as exc:
            raise CliError(f"{exc}") from None
        finally:
            await store.close()

    return asyncio.run(run())


def cmd_token_create(args: argparse.Namespace, config: Config) -> int:
    """Create a token and print it (the only time it is shown)."""
    if args.org == "new":
        org = str(uuidlib.uuid4())
        print(org, file=sys.stderr)
    else:
        try:
            org = str(uuidlib.UUID(args.org))
        except ValueError:
            raise CliError(f"--org: not a UUID: {args.org!r} (or use --org new)") from None
    scopes = tuple(dict.fromkeys(s for item in args.scope for s in item.split(",") if s))
    if not scopes:
        raise CliError("--scope: at least one scope is needed")
    expires_ms = None
    if args.expires_in is not None:
        try:
            expires_ms = now_ms() + int(parse_duration(args.expires_in) * 1000)
        except ValueError as exc:
            raise CliError(f"--expires-in: {exc}") from None
    _, secret = with_store(
        config, lambda store: store.create_token(org, scopes, args.name or "", expires_ms)
    )
    print(secret)
    return 0


def cmd_token_list(args: argparse.Namespace, config: Config) -> int:
    """Print every token (never the secret)."""
    tokens = with_store(config, lambda store: store.list_tokens())
    now = now_ms()
    print("id\torganization\tscopes\tname\texpires\tstatus")
    for t in tokens:
        expires = iso_ms(t.expires_ms) if t.expires_ms is not None else "never"
        # A tab or newline in a name would break the one-row-per-token format.
        name = " ".join(t.name.split())
        print(f"{t.id}\t{t.organization}\t{','.join(t.scopes)}\t{name}\t{expires}\t{t.status(now)}")
    return 0


def cmd_token_revoke(args: argparse.Namespace, config: Config) -> int:
    """Revoke a token by id; it stops working at once."""
    done = with_store(config, lambda store: store.revoke_token(args.token_id))
    if not done:
        raise CliError(f"no active token with id {args.token_id}")
    print(f"revoked {args.token_id}", file=sys.stderr)
    return 0


# -- emit ----------------------------------------------------------------------------------


async def _post_event(config: Config, body: bytes) -> tuple[int, bytes]:
    import aiohttp

    listen = config.ingest.listen
    headers = {"Content-Type": "application/json"}
    if config.ingest.token:
        headers["Authorization"] = f"Bearer {config.ingest.token}"
    if listen.startswith("unix:"):
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=listen[len("unix:") :])
        url = "http://localhost/events"
    else:
        host, port = split_listen(listen)
        connector = aiohttp.TCPConnector()
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/events"
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.post(url, data=body, headers=headers) as resp,
    ):
        return resp.status, await resp.read()


def cmd_emit(args: argparse.Namespace, config: Config) -> int:
    """Post one event to the running daemon's ingest listener."""
    data: Any = {}
    if args.data is not None:
        text = args.data
        if text.startswith("@"):
            try:
                with open(text[1:], "rb") as fh:
                    text = fh.read().decode("utf-8")
            except OSError as exc:
                raise CliError(f"--data: cannot read {text[1:]}: {exc.strerror}") from None
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise CliError(f"--data: not valid JSON: {exc}") from None
    event: dict[str, Any] = {
        "eventName": args.event_name,
        "organizationUuid": args.org,
        "payload": data,
    }
    if args.message_id:
        event["messageId"] = args.message_id
    try:
        status, body = asyncio.run(_post_event(config, orjson.dumps(event)))
    except OSError as exc:
        raise CliError(f"cannot reach ingest listener {config.ingest.listen}: {exc}") from None
    print(body.decode("utf-8", errors="replace"))
    return 0 if status < 400 else 1


# -- check-config --------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace, config: Config) -> int:
    """Validate the config and print the effective values, secrets masked."""
    import tomllib  # noqa: F401  (the printed form is TOML-compatible)

    data = effective_config(config)
    print(f"# config: {config.source or 'built-in defaults'} (valid)")
    for section, table in data.items():
        if section == "events":
            for event in table:  # type: ignore[attr-defined]
                print(
                    f"\n[[events]]\nname = {_toml(event['name'])}\nscope = {_toml(event['scope'])}"
                )
            continue
        print(f"\n[{section}]")
        for key, value in table.items():  # type: ignore[attr-defined]
            print(f"{key} = {_toml(value)}")
    return 0


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return orjson.dumps(str(value)).decode()


# -- argument parsing ----------------------------------------------------------------------


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE", help="TOML config file (default: $PUSHERD_CONFIG or built-in)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every command."""
    parser = argparse.ArgumentParser(
        prog="pusherd", description="Self-hosted webhook relay daemon."
    )
    parser.add_argument("--version", action="version", version=f"pusherd {__version__}")
    # Also before the command (`pusherd --config F serve`), as most daemons take it; the one
    # after the command name wins when both are given.
    parser.add_argument(
        "--config", dest="global_config", metavar="FILE", help="TOML config file (any command)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon (API and ingest listeners)")
    _add_config(p)
    p.set_defaults(func=None)

    tok = sub.add_parser("token", help="manage API tokens")
    tsub = tok.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = tsub.add_parser("create", help="create a token and print it (shown once)")
    _add_config(p)
    p.add_argument("--org", required=True, help="organization UUID, or 'new' for a fresh one")
    p.add_argument("--scope", action="append", required=True, help="scope, e.g. READ:PRODUCT")
    p.add_argument("--expires-in", metavar="DURATION", help="e.g. 30d (default: never)")
    p.add_argument("--name", default="", help="a label shown by `token list`")
    p.set_defaults(func=cmd_token_create)
    p = tsub.add_parser("list", help="list tokens (never their secrets)")
    _add_config(p)
    p.set_defaults(func=cmd_token_list)
    p = tsub.add_parser("revoke", help="revoke a token by its id")
    _add_config(p)
    p.add_argument("token_id", metavar="TOKEN_ID")
    p.set_defaults(func=cmd_token_revoke)

    p = sub.add_parser("emit", help="post one event to the running daemon's ingest listener")
    _add_config(p)
    p.add_argument("event_name", metavar="EVENT_NAME")
    p.add_argument("--org", required=True, help="organization UUID")
    p.add_argument("--data", help="payload JSON, or @file.json")
    p.add_argument("--message-id", help="idempotency key (default: a new UUID)")
    p.set_defaults(func=cmd_emit)

    p = sub.add_parser("replay", help="re-queue a subscription's finished deliveries")
    _add_config(p)
    p.add_argument("--subscription", required=True, metavar="UUID")
    p.add_argument("--since", metavar="DURATION", help="only deliveries created this recently")
    p.add_argument("--status", choices=["delivered", "failed"], help="only this status")
    p.set_defaults(func=_lazy("pusherd.ops", "cmd_replay"))

    p = sub.add_parser("backup", help="consistent online backup of the database")
    _add_config(p)
    p.add_argument("dest", metavar="DEST_FILE")
    p.set_defaults(func=_lazy("pusherd.ops", "cmd_backup"))

    p = sub.add_parser("console-link", help="print a one-time sign-in URL of the web console")
    _add_config(p)
    p.add_argument("--org", required=True, help="the organization UUID it signs in to")
    p.add_argument("--expires-in", default="1h", metavar="DURATION", help="default: 1h")
    p.set_defaults(func=_lazy("pusherd.console.link", "cmd_console_link"))
    p = sub.add_parser("copy-storage", help="copy the SQLite database into empty PostgreSQL")
    _add_config(p)
    p.add_argument("--to", required=True, metavar="URL", help="postgresql://user@host/dbname")
    p.set_defaults(func=_lazy("pusherd.ops", "cmd_copy_storage"))

    p = sub.add_parser("check-config", help="validate and print the effective config")
    _add_config(p)
    p.set_defaults(func=cmd_check_config)
    return parser


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace, Config], int]:
    def run(args: argparse.Namespace, config: Config) -> int:
        import importlib

        fn: Callable[[argparse.Namespace, Config], int] = getattr(
            importlib.import_module(module), name
        )
        return fn(args, config)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pusherd` console script."""
    args = build_parser().parse_args(argv)
    config_path = getattr(args, "config", None) or args.global_config
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"pusherd: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Only `serve` logs to stdout (and at info): other commands print their results on stdout
    # and, for `token create --org new`, the organization alone on stderr.
    if args.command == "serve":
        configure_logging(config.log.level, config.log.format)
    else:
        level = config.log.level if config.log.level in ("error", "critical") else "warning"
        configure_logging(level, config.log.format, sys.stderr)
    try:
        if args.command == "serve":
            import uvloop

            with contextlib.suppress(KeyboardInterrupt):
                from pusherd.daemon import serve

                return uvloop.run(serve(config, config_path))
            return 0
        result: int = args.func(args, config)
        return result
    except BrokenPipeError:
        # stdout closed early (`pusherd token list | head -1`): not an error worth a traceback.
        # Point stdout at /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except CliError as exc:
        print(f"pusherd: {exc}", file=sys.stderr)
        return 1
    except SchemaTooNewError as exc:
        print(f"pusherd: {exc}", file=sys.stderr)
        return 1
