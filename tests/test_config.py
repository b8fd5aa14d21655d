"""The config loader: durations, sizes, errors naming the key, PUSHERD_CONFIG, [[events]]."""

from __future__ import annotations

import asyncio
import dataclasses
import tomllib
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pusherd.config import (
    ENV_CONFIG,
    Config,
    ConfigError,
    EventType,
    config_from_dict,
    load_config,
)
from pusherd.units import parse_duration, parse_size
from tests.conftest import Harness, Receiver, make_config
from tests.service import run_cli_async

HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("3d", 259200.0),
        ("1.5s", 1.5),
        (" 7s ", 7.0),
        ("15", 15.0),
        (15, 15.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "5x", "s", "-5s", "5 sec", "1w", -1, True, None, [5]])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("512KiB", 512 * 1024),
        ("1MiB", 1024 * 1024),
        ("1MB", 1_000_000),
        ("1KB", 1000),
        ("2GiB", 2 * 1024**3),
        ("100", 100),
        ("100B", 100),
        (4096, 4096),
        (0, 0),
    ],
)
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "1.5MiB", "1TB", "MiB", "-1", -1, 1.5, True, None])
def test_bad_sizes(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


def test_durations_and_sizes_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[delivery]\ntimeout = "500ms"\nretry_schedule = ["5s", 30, "10m"]\n'
        'disable_after = "3d"\nlease = 12\n'
        '[ingest]\nmax_body = "512KiB"\n[storage]\nretention = "2h"\n'
    )
    config = load_config(path)
    assert config.delivery.timeout == 0.5
    assert config.delivery.retry_schedule == (5.0, 30.0, 600.0)
    assert config.delivery.disable_after == 3 * 86400
    assert config.delivery.lease == 12.0
    assert config.ingest.max_body == 512 * 1024
    assert config.storage.retention == 7200.0
    # untouched keys keep their defaults
    assert config.delivery.max_in_flight == Config().delivery.max_in_flight
    assert config.api == Config().api


def test_no_file_gives_the_spec_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    config = load_config()
    assert config == Config()
    assert config.storage.path == "pusherd.sqlite3"
    assert config.api.listen == "127.0.0.1:8080"
    assert config.ingest.listen == "127.0.0.1:8081"
    assert config.ingest.max_body == 1024 * 1024
    assert config.delivery.retry_schedule == (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    assert config.delivery.timeout == 15.0
    assert config.delivery.jitter == 0.2
    assert config.delivery.disable_after == 72 * 3600
    assert config.delivery.shutdown_grace == 10.0
    assert (config.ratelimit.per_minute, config.ratelimit.per_hour) == (100, 1000)
    assert (config.smtp.host, config.smtp.port, config.smtp.from_) == ("", 25, "pusherd@localhost")
    assert (config.log.level, config.log.format) == ("info", "auto")


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[nope]\nx = 1\n", "nope"),
        ("[api]\nport = 8080\n", "api.port"),
        ("[delivery]\ntimeout_s = 5\n", "delivery.timeout_s"),
        ("[smtp]\nfrom_ = 'a@b.c'\n", "smtp.from_"),
        ("top = 1\n", "top"),
        ("[[events]]\nname = 'a.b'\nscope = 'S'\ncolour = 'red'\n", "events[0].colour"),
    ],
)
def test_unknown_keys_are_refused(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert key in str(info.value)
    assert "unknown" in str(info.value)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("api = 5\n", "api"),
        ("[api]\nlisten = 'localhost'\n", "api.listen"),
        ("[api]\nlisten = 8080\n", "api.listen"),
        ("[api]\nlisten = '127.0.0.1:99999'\n", "api.listen"),
        ("[ingest]\nlisten = 'unix:'\n", "ingest.listen"),
        ("[ingest]\ntoken = 5\n", "ingest.token"),
        ("[ingest]\nmax_body = 'big'\n", "ingest.max_body"),
        ("[ingest]\nmax_body = 0\n", "ingest.max_body"),
        ("[storage]\npath = 1\n", "storage.path"),
        ("[storage]\nretention = '0s'\n", "storage.retention"),
        ("[delivery]\ntimeout = 'fast'\n", "delivery.timeout"),
        ("[delivery]\ntimeout = 0\n", "delivery.timeout"),
        ("[delivery]\nmax_in_flight = 0\n", "delivery.max_in_flight"),
        ("[delivery]\nmax_in_flight = '5'\n", "delivery.max_in_flight"),
        ("[delivery]\nmax_in_flight = true\n", "delivery.max_in_flight"),
        ("[delivery]\nper_destination = -1\n", "delivery.per_destination"),
        ("[delivery]\nretry_schedule = '5s'\n", "delivery.retry_schedule"),
        ("[delivery]\nretry_schedule = ['5s', 'soon']\n", "delivery.retry_schedule"),
        ("[delivery]\njitter = 1.5\n", "delivery.jitter"),
        ("[delivery]\njitter = -0.1\n", "delivery.jitter"),
        ("[delivery]\ndisable_after = 'never'\n", "delivery.disable_after"),
        ("[delivery]\nlease = '-1s'\n", "delivery.lease"),
        ("[delivery]\nshutdown_grace = 'x'\n", "delivery.shutdown_grace"),
        ("[delivery]\nallow_http = 'yes'\n", "delivery.allow_http"),
        ("[delivery]\nallow_private_destinations = 1\n", "delivery.allow_private_destinations"),
        ("[ratelimit]\nper_minute = 0\n", "ratelimit.per_minute"),
        ("[ratelimit]\nper_hour = 1.5\n", "ratelimit.per_hour"),
        ("[smtp]\nhost = 1\n", "smtp.host"),
        ("[smtp]\nport = 70000\n", "smtp.port"),
        ("[smtp]\nfrom = false\n", "smtp.from"),
        ("[smtp]\nusername = 1\n", "smtp.username"),
        ("[smtp]\npassword = 1\n", "smtp.password"),
        ("[smtp]\nstarttls = 'no'\n", "smtp.starttls"),
        ("[smtp]\ntimeout = 'slow'\n", "smtp.timeout"),
        ("[log]\nlevel = 'loud'\n", "log.level"),
        ("[log]\nformat = 'xml'\n", "log.format"),
        ("[storage]\npath = ''\n", "storage.path"),
        ("[storage]\npath = ':memory:'\n", "storage.path"),
        ("events = 5\n", "events"),
        ("[[events]]\nscope = 'READ:FINANCE'\n", "events[0].name"),
        ("[[events]]\nname = 'has space'\nscope = 'READ:FINANCE'\n", "events[0].name"),
        ("[[events]]\nname = 'a.b'\n", "events[0].scope"),
        ("[[events]]\nname = 'a.b'\nscope = ''\n", "events[0].scope"),
        # a second declaration would silently win, or re-scope a built-in event
        (
            "[[events]]\nname = 'a.b'\nscope = 'X'\n[[events]]\nname = 'a.b'\nscope = 'Y'\n",
            "events[1].name",
        ),
        (
            "[[events]]\nname = 'a.b'\nscope = 'X'\n[[events]]\nname = 'a.b'\nscope = 'X'\n",
            "events[1].name",
        ),
        ("[[events]]\nname = 'ProductCreated'\nscope = 'READ:FINANCE'\n", "events[0].name"),
        ("[[events]]\nname = 'TestMessage'\nscope = 'READ:FINANCE'\n", "events[0].name"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(key + ":") or f" {key}:" in message, message
    assert "\n" not in message


def test_unreadable_or_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[api\nlisten = ")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_config(broken)


def test_pusherd_config_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.toml"
    path.write_text('[api]\nlisten = "127.0.0.1:9999"\n')
    monkeypatch.setenv(ENV_CONFIG, str(path))
    config = load_config()
    assert config.api.listen == "127.0.0.1:9999"
    assert config.source == str(path)
    # an explicit path wins over the environment
    other = tmp_path / "other.toml"
    other.write_text('[api]\nlisten = "127.0.0.1:7777"\n')
    assert load_config(other).api.listen == "127.0.0.1:7777"


async def test_serve_with_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[delivery]\ntimeout = "soon"\n')
    code, out, err = await run_cli_async("serve", "--config", str(bad))
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "delivery.timeout" in lines[0]


async def test_serve_with_an_unknown_key_from_the_env_var_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[ratelimit]\nper_second = 5\n")
    code, _, err = await run_cli_async("serve", env={ENV_CONFIG: str(bad)})
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "ratelimit.per_second" in err


def test_events_extend_the_catalogue(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[[events]]\nname = "transaction.created"\nscope = "READ:FINANCE"\n'
        '[[events]]\nname = "stock.counted"\nscope = "READ:PRODUCT"\n'
    )
    config = load_config(path)
    assert config.events == (
        EventType("transaction.created", "READ:FINANCE"),
        EventType("stock.counted", "READ:PRODUCT"),
    )


async def test_config_added_event_can_be_subscribed_with_its_scope(
    tmp_path: Path, harness_factory: HarnessFactory
) -> None:
    config = dataclasses.replace(
        make_config(tmp_path), events=(EventType("transaction.created", "READ:FINANCE"),)
    )
    h = await harness_factory(config)
    await h.runtime.dispatcher.stop(0)  # nothing is delivered: the destination is public
    body = {
        "transportName": "WEBHOOK",
        "eventNames": ["transaction.created"],
        "destination": "https://93.184.216.34/hook",
        "contactEmail": "ops@example.com",
    }
    finance = h.token(scopes=("READ:FINANCE",))
    resp = await h.api.post(
        "/organizations/self/subscriptions",
        json={**body, "uuid": str(uuid.uuid1())},
        headers=h.auth(finance),
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["eventNames"] == ["transaction.created"]

    product = h.token(scopes=("READ:PRODUCT",))
    resp = await h.api.post(
        "/organizations/self/subscriptions",
        json={**body, "uuid": str(uuid.uuid1())},
        headers=h.auth(product),
    )
    assert resp.status == 403, await resp.text()
    data: dict[str, Any] = await resp.json()
    assert data["status"] == "error"
    assert "READ:FINANCE" in data["message"]


async def test_event_unknown_without_config_is_400(
    tmp_path: Path, harness_factory: HarnessFactory
) -> None:
    h = await harness_factory()
    await h.runtime.dispatcher.stop(0)
    resp = await h.api.post(
        "/organizations/self/subscriptions",
        json={
            "uuid": str(uuid.uuid1()),
            "transportName": "WEBHOOK",
            "eventNames": ["transaction.created"],
            "destination": "https://93.184.216.34/hook",
            "contactEmail": "ops@example.com",
        },
        headers=h.auth(h.token()),
    )
    assert resp.status == 400


def test_config_from_dict_matches_the_file_loader(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[log]\nlevel = "DEBUG"\n')
    assert load_config(path).log == config_from_dict({"log": {"level": "debug"}}).log


async def test_max_in_flight_below_the_default_per_destination_is_valid(tmp_path: Path) -> None:
    # SPEC §1: a per_destination above max_in_flight is valid; max_in_flight then applies.
    config = config_from_dict({"delivery": {"max_in_flight": 2}})
    assert (config.delivery.max_in_flight, config.delivery.per_destination) == (2, 8)
    path = tmp_path / "c.toml"
    path.write_text("[delivery]\nmax_in_flight = 2\n")
    assert load_config(path).delivery.per_destination == 8
    code, out, err = await run_cli_async("check-config", "--config", str(path))
    assert code == 0, err
    printed = tomllib.loads(out)["delivery"]
    assert (printed["max_in_flight"], printed["per_destination"]) == (2, 8)


async def test_a_daemon_with_max_in_flight_2_starts_and_sends_at_most_2_at_once(
    harness_factory: HarnessFactory, receiver_factory: Callable[..., Awaitable[Receiver]]
) -> None:
    release = asyncio.Event()
    in_flight: list[int] = []
    most = 0

    async def hold(request: web.Request) -> web.StreamResponse:
        nonlocal most
        in_flight.append(1)
        most = max(most, len(in_flight))
        await release.wait()
        in_flight.pop()
        return web.Response(status=200)

    # a long timeout: a held attempt must not time out and come back as a retry while held
    h = await harness_factory(delivery={"max_in_flight": 2, "timeout": "60s"})
    # Four answers at once first: each success lifts the new origin's slow start by one, so
    # its own limit (5) is above max_in_flight, which is then the limit that binds.
    rec = await receiver_factory(statuses=[200] * 4 + [hold] * 5)
    await h.subscribe(h.token(), rec.url, ["ProductCreated"])
    for _ in range(3):
        assert (await h.emit("ProductCreated"))["deliveries"] == 1
    await rec.wait_for(4)
    for _ in range(5):
        assert (await h.emit("ProductCreated"))["deliveries"] == 1
    await rec.wait_for(6)
    # a seventh attempt would arrive at once if only per_destination (8) applied
    with pytest.raises(AssertionError):
        await rec.wait_for(7, timeout=0.5)
    assert most == 2
    release.set()
    await rec.wait_for(9)
    await h.idle()
    assert most == 2
