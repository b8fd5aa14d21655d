"""A real `pusherd serve` subprocess on free loopback ports, for tests of the process as a whole."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(path: Path, database: Path, extra: str = "") -> tuple[int, int]:
    """A TOML config on two free ports; returns (api_port, ingest_port)."""
    api, ingest = free_port(), free_port()
    while ingest == api:
        ingest = free_port()
    path.write_text(
        f'[api]\nlisten = "127.0.0.1:{api}"\n'
        f'[ingest]\nlisten = "127.0.0.1:{ingest}"\n'
        f'[storage]\npath = "{database}"\n'
        "[delivery]\nallow_http = true\nallow_private_destinations = true\n"
        'shutdown_grace = "1s"\ntimeout = "2s"\n'
        '[log]\nlevel = "info"\nformat = "json"\n' + extra
    )
    return api, ingest


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for pusherd subprocesses (no inherited PUSHERD_CONFIG or NOTIFY_SOCKET)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PUSHERD_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env.update(extra)
    return env


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m pusherd ARGS` to completion (blocking: not for a test's own event loop)."""
    return subprocess.run(
        [sys.executable, "-m", "pusherd", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=cli_env(),
        check=False,
    )


async def run_cli_async(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `python -m pusherd ARGS` (ENV added to cli_env) without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pusherd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(**(env or {})),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One blocking HTTP request; (status, headers, body) whatever the status."""
    data = None if body is None else orjson.dumps(body)
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class Listeners:
    """The base URLs of a daemon's two listeners (api_port and ingest_port on loopback)."""

    api_port: int
    ingest_port: int

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def ingest(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"


@dataclass
class Service(Listeners):
    """A running `pusherd serve`."""

    config: Path
    api_port: int
    ingest_port: int
    log_path: Path
    proc: subprocess.Popen[bytes]
    _log: IO[bytes] = field(repr=False)

    def healthy(self) -> bool:
        """Both listeners answer /healthz with 200."""
        for base in (self.api, self.ingest):
            try:
                if http("GET", base + "/healthz")[0] != 200:
                    return False
            except OSError:
                return False
        return True

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Wait until both listeners answer, or fail with the log."""
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"pusherd exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"pusherd did not become healthy:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """Last resort at teardown."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def start_service(config: Path, api_port: int, ingest_port: int, **env: str) -> Service:
    """Start `pusherd serve --config CONFIG` (stdout and stderr to a log file beside it)."""
    log_path = config.with_suffix(".log")
    log = open(log_path, "wb")  # noqa: SIM115  (closed by Service.stop/kill)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pusherd", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=cli_env(**env),
    )
    return Service(config, api_port, ingest_port, log_path, proc, log)
