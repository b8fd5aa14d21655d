"""Configuration: TOML into frozen dataclasses, failing fast with the name of the bad key."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pusherd.units import parse_duration, parse_size

ENV_CONFIG = "PUSHERD_CONFIG"


class ConfigError(Exception):
    """A configuration problem; the message names the key."""


def _listen(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string 'host:port' or 'unix:/path'")
    if value.startswith("unix:"):
        if len(value) <= len("unix:"):
            raise ValueError("unix: needs a socket path")
        return value
    split_listen(value)
    return value


def split_listen(value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 hosts in brackets) into host and port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not host:port: {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@dataclass(frozen=True)
class ApiConfig:
    listen: str = "127.0.0.1:8080"


@dataclass(frozen=True)
class IngestConfig:
    listen: str = "127.0.0.1:8081"
    token: str = ""
    max_body: int = 1024 * 1024


@dataclass(frozen=True)
class StorageConfig:
    path: str = "pusherd.sqlite3"
    url: str = ""  # postgresql://...: PostgreSQL instead of path (SPEC §8)
    retention: float = 30 * 86400.0


DEFAULT_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0)


@dataclass(frozen=True)
class DeliveryConfig:
    timeout: float = 15.0
    max_in_flight: int = 256
    per_destination: int = 8
    retry_schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    jitter: float = 0.2
    disable_after: float = 72 * 3600.0
    lease: float = 30.0
    shutdown_grace: float = 10.0
    allow_http: bool = False
    allow_private_destinations: bool = False


@dataclass(frozen=True)
class RateLimitConfig:
    per_minute: int = 100
    per_hour: int = 1000


@dataclass(frozen=True)
class SmtpConfig:
    host: str = ""
    port: int = 25
    from_: str = "pusherd@localhost"
    username: str = ""
    password: str = ""
    starttls: bool = False
    timeout: float = 10.0
    repeat_after: float = 24 * 3600.0  # at most one FAILING mail per subscription this often


@dataclass(frozen=True)
class ConsoleConfig:
    enabled: bool = True
    base_url: str = ""  # public URL of the API listener for console-link; "": http://<api.listen>


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class EventType:
    name: str
    scope: str


@dataclass(frozen=True)
class Config:
    api: ApiConfig = field(default_factory=ApiConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    events: tuple[EventType, ...] = ()
    source: str = ""  # the file it was read from, "" for built-in defaults


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _db_path(value: object) -> str:
    text = _string(value)
    # SQLite would open "" or ":memory:" as a private temporary database per connection: the
    # reader would not see what the writer commits, and nothing would outlive the process.
    if not text.strip() or text.strip() == ":memory:":
        raise ValueError("expected the path of the SQLite database file")
    return text


def _storage_url(value: object) -> str:
    text = _string(value)
    if text and not text.startswith(("postgresql://", "postgres://")):
        raise ValueError('expected "" or a postgresql:// URL')
    return text


def mask_url_password(url: str) -> str:
    """url with its password (if any) masked, for output."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:********@{host}"


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a positive integer")
    return value


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError("expected a port number 1-65535")
    return value


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def _positive_size(value: object) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError("must be greater than zero")
    return size


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError("expected a number from 0 up to (not including) 1")
    return float(value)


def _schedule(value: object) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of durations")
    return tuple(parse_duration(v) for v in value)


def _level(value: object) -> str:
    text = _string(value).lower()
    if text not in {"debug", "info", "warning", "error", "critical"}:
        raise ValueError("expected one of debug, info, warning, error, critical")
    return text


def _format(value: object) -> str:
    text = _string(value).lower()
    if text not in {"auto", "json", "console"}:
        raise ValueError("expected one of auto, json, console")
    return text


def _base_url(value: object) -> str:
    text = _string(value).rstrip("/")
    if text and not re.match(r"^https?://[^/\s]+(/\S*)?$", text):
        raise ValueError('expected an absolute http:// or https:// URL, or ""')
    return text


# Per section: TOML key -> (dataclass field, parser).
_SECTIONS: dict[str, tuple[type[Any], dict[str, tuple[str, Any]]]] = {
    "api": (ApiConfig, {"listen": ("listen", _listen)}),
    "ingest": (
        IngestConfig,
        {
            "listen": ("listen", _listen),
            "token": ("token", _string),
            "max_body": ("max_body", _positive_size),
        },
    ),
    "storage": (
        StorageConfig,
        {
            "path": ("path", _db_path),
            "url": ("url", _storage_url),
            "retention": ("retention", _positive_duration),
        },
    ),
    "delivery": (
        DeliveryConfig,
        {
            "timeout": ("timeout", _positive_duration),
            "max_in_flight": ("max_in_flight", _positive_int),
            "per_destination": ("per_destination", _positive_int),
            "retry_schedule": ("retry_schedule", _schedule),
            "jitter": ("jitter", _fraction),
            "disable_after": ("disable_after", _positive_duration),
            "lease": ("lease", _positive_duration),
            "shutdown_grace": ("shutdown_grace", parse_duration),
            "allow_http": ("allow_http", _bool),
            "allow_private_destinations": ("allow_private_destinations", _bool),
        },
    ),
    "ratelimit": (
        RateLimitConfig,
        {"per_minute": ("per_minute", _positive_int), "per_hour": ("per_hour", _positive_int)},
    ),
    "smtp": (
        SmtpConfig,
        {
            "host": ("host", _string),
            "port": ("port", _port),
            "from": ("from_", _string),
            "username": ("username", _string),
            "password": ("password", _string),
            "starttls": ("starttls", _bool),
            "timeout": ("timeout", _positive_duration),
            "repeat_after": ("repeat_after", parse_duration),
        },
    ),
    "console": (
        ConsoleConfig,
        {"enabled": ("enabled", _bool), "base_url": ("base_url", _base_url)},
    ),
    "log": (LogConfig, {"level": ("level", _level), "format": ("format", _format)}),
}

SECRET_KEYS = frozenset({"ingest.token", "smtp.password"})
_EVENT_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


def _parse_events(value: object) -> tuple[EventType, ...]:
    # Imported here: the catalogue module builds on this one's EventType.
    from pusherd.catalogue import BUILTIN_EVENTS, TEST_MESSAGE

    if not isinstance(value, list):
        raise ConfigError("events: expected [[events]] tables with name and scope")
    out: list[EventType] = []
    for i, item in enumerate(value):
        where = f"events[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a table with name and scope")
        unknown = set(item) - {"name", "scope"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
        name, scope = item.get("name"), item.get("scope")
        if not isinstance(name, str) or not _EVENT_NAME_RE.match(name):
            raise ConfigError(f"{where}.name: expected an event name of [A-Za-z0-9._-]{{1,100}}")
        if not isinstance(scope, str) or not scope:
            raise ConfigError(f"{where}.scope: expected a scope such as READ:FINANCE")
        # A second declaration would silently win over the first (or re-scope a built-in event,
        # changing who may subscribe to it): the operator is told instead.
        if name == TEST_MESSAGE or BUILTIN_EVENTS.get(name, scope) != scope:
            raise ConfigError(f"{where}.name: {name} is a built-in event type")
        if any(e.name == name for e in out):
            raise ConfigError(f"{where}.name: {name} is declared twice")
        out.append(EventType(name=name, scope=scope))
    return tuple(out)


def config_from_dict(data: Mapping[str, object], source: str = "") -> Config:
    """Build a Config from parsed TOML, raising ConfigError naming the first bad key."""
    kwargs: dict[str, object] = {"source": source}
    for section, value in data.items():
        if section == "events":
            kwargs["events"] = _parse_events(value)
            continue
        if section not in _SECTIONS:
            raise ConfigError(f"{section}: unknown section")
        cls, keys = _SECTIONS[section]
        if not isinstance(value, dict):
            raise ConfigError(f"{section}: expected a table")
        fields: dict[str, object] = {}
        for key, raw in value.items():
            if key not in keys:
                raise ConfigError(f"{section}.{key}: unknown key")
            attr, parse = keys[key]
            try:
                fields[attr] = parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{section}.{key}: {exc}") from None
        kwargs[section] = cls(**fields)
    # A per_destination above max_in_flight is valid (SPEC §1): the dispatcher holds both limits,
    # so max_in_flight then applies, and a user who lowers one need not know about the other.
    return Config(**kwargs)  # type: ignore[arg-type]


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the config file (argument, else $PUSHERD_CONFIG, else built-in defaults)."""
    if path is None:
        path = os.environ.get(ENV_CONFIG) or None
    if path is None:
        return Config()
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return config_from_dict(data, source=str(p))


def effective_config(config: Config, *, mask_secrets: bool = True) -> dict[str, object]:
    """The config as TOML-shaped data with secrets masked, for `check-config`."""
    out: dict[str, object] = {}
    for section, (_, keys) in _SECTIONS.items():
        obj = getattr(config, section)
        table: dict[str, object] = {}
        for key, (attr, _) in keys.items():
            value = getattr(obj, attr)
            if isinstance(value, tuple):
                value = list(value)
            if mask_secrets and f"{section}.{key}" in SECRET_KEYS and value:
                value = "********"
            if mask_secrets and f"{section}.{key}" == "storage.url" and value:
                value = mask_url_password(str(value))
            table[key] = value
        out[section] = table
    out["events"] = [dataclasses.asdict(e) for e in config.events]
    return out


def documented_keys() -> set[str]:
    """Every "section.key" the loader accepts (the docs test checks config.example.toml)."""
    keys = {f"{s}.{k}" for s, (_, ks) in _SECTIONS.items() for k in ks}
    return keys | {"events.name", "events.scope"}
