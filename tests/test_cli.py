"""The command line (SPEC §1), run as a real subprocess against the database a running app uses."""

from __future__ import annotations

import asyncio
import re
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import Harness, make_config
from tests.service import run_cli_async

HarnessFactory = Callable[..., Awaitable[Harness]]
BASE = "/organizations/self/subscriptions"
HEADER = "id\torganization\tscopes\tname\texpires\tstatus"
ORG = "5a0b9c1e-1d2f-4a3b-8c4d-333333333333"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A config naming the same database file that make_config(tmp_path) uses."""
    path = tmp_path / "pusherd.toml"
    path.write_text(f'[storage]\npath = "{tmp_path / "pusherd.sqlite3"}"\n')
    return path


async def create(config_file: Path, *extra: str, org: str = ORG) -> str:
    code, out, err = await run_cli_async(
        "token", "create", "--config", str(config_file), "--org", org, *extra
    )
    assert code == 0, err
    return out


def rows(out: str) -> list[list[str]]:
    lines = out.rstrip("\n").split("\n")
    assert lines[0] == HEADER
    parsed = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == 6 for r in parsed), parsed
    return parsed


async def test_token_create_prints_only_the_token(tmp_path: Path, config_file: Path) -> None:
    out = await create(config_file, "--scope", "READ:PRODUCT")
    assert out.endswith("\n")
    assert len(out.splitlines()) == 1
    assert re.fullmatch(r"[A-Za-z0-9_-]{20,}", out.strip())
    assert (tmp_path / "pusherd.sqlite3").exists()  # works before the first serve


async def test_token_create_org_new_prints_the_uuid_on_stderr(config_file: Path) -> None:
    code, out, err = await run_cli_async(
        "token", "create", "--config", str(config_file), "--org", "new", "--scope", "READ:PRODUCT"
    )
    assert code == 0, err
    assert len(out.splitlines()) == 1
    uuids = [line for line in err.splitlines() if re.fullmatch(r"[0-9a-f-]{36}", line)]
    assert len(uuids) == 1, err
    org = uuids[0]
    assert str(uuid.UUID(org)) == org
    assert org not in out
    _, listed, _ = await run_cli_async("token", "list", "--config", str(config_file))
    assert [r[1] for r in rows(listed)] == [org]


async def test_created_token_works_against_a_running_app(
    tmp_path: Path, config_file: Path, harness_factory: HarnessFactory
) -> None:
    h = await harness_factory(make_config(tmp_path))
    await h.runtime.dispatcher.stop(0)
    token = (
        await create(config_file, "--scope", "READ:PRODUCT", "--scope", "READ:FINANCE")
    ).strip()
    resp = await h.api.get(BASE, headers=h.auth(token))
    assert resp.status == 200, await resp.text()
    resp = await h.api.post(
        BASE,
        json={
            "uuid": str(uuid.uuid1()),
            "transportName": "WEBHOOK",
            "eventNames": ["ProductCreated", "InvoiceCreated"],
            "destination": "https://93.184.216.34/hook",
            "contactEmail": "ops@example.com",
        },
        headers=h.auth(token),
    )
    assert resp.status == 200, await resp.text()
    # the scopes given on the command line are the token's scopes
    resp = await h.api.put(
        f"{BASE}/{(await resp.json())['uuid']}",
        json={"eventNames": ["PurchaseCreated"]},
        headers=h.auth(token),
    )
    assert resp.status == 403
    resp = await h.api.get(f"/organizations/{ORG}/subscriptions", headers=h.auth(token))
    assert resp.status == 200


async def test_token_list_and_revoke_against_a_running_app(
    tmp_path: Path, config_file: Path, harness_factory: HarnessFactory
) -> None:
    h = await harness_factory(make_config(tmp_path))
    await h.runtime.dispatcher.stop(0)
    first = (await create(config_file, "--scope", "READ:PRODUCT", "--name", "shop app")).strip()
    second = (
        await create(config_file, "--scope", "READ:FINANCE,READ:PURCHASE", "--expires-in", "30d")
    ).strip()

    code, out, err = await run_cli_async("token", "list", "--config", str(config_file))
    assert code == 0, err
    assert first not in out and second not in out
    listed = rows(out)
    assert len(listed) == 2
    by_name = {r[3]: r for r in listed}
    shop = by_name["shop app"]
    assert shop[1] == ORG
    assert shop[2] == "READ:PRODUCT"
    assert shop[4] == "never"
    assert shop[5] == "active"
    other = by_name[""]
    assert set(other[2].split(",")) == {"READ:FINANCE", "READ:PURCHASE"}
    expires = datetime.fromisoformat(other[4].replace("Z", "+00:00"))
    in_30d = datetime.now(UTC).timestamp() + 30 * 86400
    assert abs(expires.timestamp() - in_30d) < 120
    assert other[5] == "active"
    assert shop[0] != other[0]

    assert (await h.api.get(BASE, headers=h.auth(first))).status == 200
    code, out, err = await run_cli_async("token", "revoke", "--config", str(config_file), shop[0])
    assert code == 0, err
    assert first not in out + err
    resp = await h.api.get(BASE, headers=h.auth(first))
    assert resp.status == 401
    assert (await resp.json())["status"] == "error"
    assert (await h.api.get(BASE, headers=h.auth(second))).status == 200

    _, out, _ = await run_cli_async("token", "list", "--config", str(config_file))
    status = {r[0]: r[5] for r in rows(out)}
    assert status == {shop[0]: "revoked", other[0]: "active"}

    code, _, err = await run_cli_async("token", "revoke", "--config", str(config_file), shop[0])
    assert code != 0
    assert err.strip()
    code, _, err = await run_cli_async("token", "revoke", "--config", str(config_file), "tok_nope")
    assert code != 0
    assert "tok_nope" in err


async def test_token_list_of_an_empty_database_prints_the_header(config_file: Path) -> None:
    code, out, err = await run_cli_async("token", "list", "--config", str(config_file))
    assert code == 0, err
    assert out == HEADER + "\n"


async def test_expired_token_shows_expired(config_file: Path) -> None:
    # wait for the expiry to pass rather than guessing how long the subprocesses take
    await create(config_file, "--scope", "READ:PRODUCT", "--expires-in", "500ms")
    deadline = time.monotonic() + 10
    while True:
        _, out, _ = await run_cli_async("token", "list", "--config", str(config_file))
        if rows(out)[0][5] == "expired":
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (("--org", "not-a-uuid", "--scope", "READ:PRODUCT"), "--org"),
        (("--org", ORG, "--scope", ""), "--scope"),
        (("--org", ORG, "--scope", "READ:PRODUCT", "--expires-in", "soon"), "--expires-in"),
    ],
)
async def test_token_create_refuses_bad_arguments(
    config_file: Path, args: tuple[str, ...], word: str
) -> None:
    code, out, err = await run_cli_async("token", "create", "--config", str(config_file), *args)
    assert code != 0
    assert out == ""
    assert word in err
    _, listed, _ = await run_cli_async("token", "list", "--config", str(config_file))
    assert rows(listed) == []


HELP_COMMANDS: list[tuple[str, ...]] = [
    (),
    ("serve",),
    ("token",),
    ("token", "create"),
    ("token", "list"),
    ("token", "revoke"),
    ("emit",),
    ("replay",),
    ("backup",),
    ("check-config",),
]


async def test_every_command_has_help() -> None:
    results = await asyncio.gather(
        *(run_cli_async(*command, "--help") for command in HELP_COMMANDS)
    )
    for command, (code, out, err) in zip(HELP_COMMANDS, results, strict=True):
        assert code == 0, (command, err)
        assert out.startswith("usage: pusherd"), command
        if command:
            assert f"pusherd {' '.join(command)}" in out


async def test_check_config_masks_secrets(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[ingest]\ntoken = "ingest-secret-value"\n'
        '[smtp]\nhost = "127.0.0.1"\npassword = "smtp-secret-value"\nusername = "mailer"\n'
        '[delivery]\ntimeout = "500ms"\n'
        '[[events]]\nname = "transaction.created"\nscope = "READ:FINANCE"\n'
    )
    code, out, err = await run_cli_async("check-config", "--config", str(path))
    assert code == 0, err
    assert "ingest-secret-value" not in out + err
    assert "smtp-secret-value" not in out + err
    printed = tomllib.loads(out)
    assert printed["ingest"]["token"] == "********"
    assert printed["smtp"]["password"] == "********"
    assert printed["smtp"]["username"] == "mailer"
    assert printed["delivery"]["timeout"] == 0.5
    assert printed["api"]["listen"] == "127.0.0.1:8080"
    assert printed["events"] == [{"name": "transaction.created", "scope": "READ:FINANCE"}]


async def test_check_config_defaults_and_empty_secrets(tmp_path: Path) -> None:
    code, out, err = await run_cli_async("check-config")
    assert code == 0, err
    printed = tomllib.loads(out)
    assert printed["ingest"]["token"] == ""
    assert printed["storage"]["path"] == "pusherd.sqlite3"
    assert printed["ingest"]["max_body"] == 1024 * 1024


async def test_check_config_bad_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[log]\nlevel = 'chatty'\n")
    code, out, err = await run_cli_async("check-config", "--config", str(path))
    assert code == 2
    assert out == ""
    assert "log.level" in err
    assert len(err.strip().splitlines()) == 1


async def test_token_names_cannot_break_the_list_format(config_file: Path) -> None:
    await create(config_file, "--scope", "READ:PRODUCT", "--name", "two\twords\nand a line")
    _, out, _ = await run_cli_async("token", "list", "--config", str(config_file))
    (row,) = rows(out)
    assert row[3] == "two words and a line"


def test_serve_freezes_what_start_up_made_out_of_the_collectors_walks() -> None:
    import gc

    from pusherd.daemon import freeze_startup_heap

    made_at_start_up = [["long-lived"]]
    try:
        assert freeze_startup_heap() > 1000
        # A full collection no longer walks it (nor the modules, the app, the store).
        assert not any(o is made_at_start_up for o in gc.get_objects())
    finally:
        gc.unfreeze()
