"""Divergences from SPEC §1-§6 found by the black-box audit (branch spec-audit), one test each.

The audit itself drove a real `pusherd serve` with clients, the CLI and loopback receivers; these
tests pin down what it found wrong, so that each fails without its fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Harness
from tests.service import cli_env, run_cli_async

BASE = "/organizations/self/subscriptions"
# Valid (the harness allows loopback http destinations) and never answered: port 9 refuses, so
# the TestMessage these subscriptions get never leaves the machine.
VALID = "http://127.0.0.1:9/hook"

# Spaces and control characters are not allowed in a URL (RFC 3986). The URL parser does not
# refuse them: it drops CR, LF and tab and percent-encodes the rest, so such a destination was
# stored as given but delivered to another path.
BAD_DESTINATIONS = [
    VALID + "\r\nX-Injected: 1",
    VALID + "/a\tb",
    VALID + "/\x00",
    VALID + "/a b",
    " " + VALID,
    VALID + "\x7f",
]


def _create_body(destination: str) -> dict[str, Any]:
    return {
        "uuid": "f02f80f8-8f35-11eb-8dcd-0242ac130003",
        "transportName": "WEBHOOK",
        "eventNames": ["ProductCreated"],
        "destination": destination,
        "contactEmail": "ops@example.com",
    }


async def _error(resp: Any, status: int) -> str:
    data = await resp.json()
    assert resp.status == status, data
    assert data["status"] == "error" and data["message"]
    return str(data["message"])


@pytest.mark.parametrize("destination", BAD_DESTINATIONS)
async def test_zettle_destination_with_spaces_or_control_characters_is_422(
    harness: Harness, destination: str
) -> None:
    token = harness.token()
    auth = harness.auth(token)
    resp = await harness.api.post(BASE, json=_create_body(destination), headers=auth)
    assert "control characters" in await _error(resp, 422)
    sub = await harness.subscribe(token, VALID)
    resp = await harness.api.put(
        f"{BASE}/{sub['uuid']}", json={"destination": destination}, headers=auth
    )
    await _error(resp, 422)
    resp = await harness.api.get(f"{BASE}/{sub['uuid']}", headers=auth)
    assert (await resp.json())["destination"] == VALID


@pytest.mark.parametrize("destination", BAD_DESTINATIONS)
async def test_paystell_url_with_spaces_or_control_characters_is_400(
    harness: Harness, destination: str
) -> None:
    auth = harness.auth(harness.token())
    resp = await harness.api.post(
        "/api/webhooks/register", json={"url": destination, "eventTypes": []}, headers=auth
    )
    await _error(resp, 400)
    resp = await harness.api.post(
        "/api/webhooks/register", json={"url": VALID, "eventTypes": []}, headers=auth
    )
    assert resp.status == 201
    resp = await harness.api.put("/api/webhooks/register", json={"url": destination}, headers=auth)
    await _error(resp, 400)


async def test_config_may_also_come_before_the_command(tmp_path: Path) -> None:
    """`pusherd --config F COMMAND` works as `pusherd COMMAND --config F` does."""
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "db.sqlite3"}"\n')
    code, out, err = await run_cli_async(
        "--config", str(config), "token", "create", "--org", "new", "--scope", "READ:PRODUCT"
    )
    assert code == 0, err
    code, listed, err = await run_cli_async("token", "list", "--config", str(config))
    assert code == 0, err
    assert err.strip() in listed  # the organization `--org new` made, in the configured database
    code, out, err = await run_cli_async("--config", str(config), "check-config")
    assert code == 0, err
    assert str(config) in out.splitlines()[0]


def test_output_into_a_closed_pipe_is_not_a_traceback(tmp_path: Path) -> None:
    """`pusherd check-config | head -1`: the reader goes away; pusherd exits without a traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: the first write fails with EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pusherd", "check-config"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            env=cli_env(),
            cwd=tmp_path,
            check=False,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1


@pytest.mark.parametrize(
    "query",
    [
        "eventNames[]=ProductCreated&eventNames[]=ProductUpdated",  # PHP http_build_query
        "eventNames%5B0%5D=ProductCreated&eventNames%5B1%5D=ProductUpdated",  # qs, encoded
        "eventNames[0]=ProductCreated&eventNames[1]=ProductUpdated",
    ],
)
async def test_zettle_query_arrays_written_with_brackets(harness: Harness, query: str) -> None:
    """SPEC §3 takes the seed's query parameters; PHP and JavaScript clients write arrays with
    brackets, which name the same field as the repeated parameter does."""
    token = harness.token()
    sub_uuid = "0e5d3f2a-8f35-11eb-8dcd-0242ac130003"
    url = (
        f"{BASE}?uuid={sub_uuid}&transportName=WEBHOOK&{query}"
        f"&destination={VALID}&contactEmail=ops@example.com"
    )
    resp = await harness.api.post(url, headers=harness.auth(token))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["eventNames"] == ["ProductCreated", "ProductUpdated"]
    resp = await harness.api.put(
        f"{BASE}/{sub_uuid}?eventNames[]=PurchaseCreated", headers=harness.auth(token)
    )
    assert resp.status == 200, await resp.text()
    resp = await harness.api.get(f"{BASE}/{sub_uuid}", headers=harness.auth(token))
    assert (await resp.json())["eventNames"] == ["PurchaseCreated"]
