"""A real PostgreSQL server for the tests: one per session, a fresh database per test.

The server is started from the installed binaries (Debian's `postgresql` package: `pg_config
--bindir`, else the newest `/usr/lib/postgresql/*/bin`) in a temporary directory, listening on
127.0.0.1 at a free port and on a unix socket in that directory, with fsync on, as a real
installation would run. `initdb` refuses to run as root, and CI runs as root: then the cluster
belongs to the `postgres` system user and both programs run as that user.

Every test that asks for `pg_url` gets a database of its own, created from a template (a file
copy inside the server, much cheaper than running `initdb` or migrations again) and dropped
afterwards. Administrative statements go through `psql`, so this module needs no driver.

`PUSHERD_PG_BINDIR` names another installation's bin directory. Without PostgreSQL the tests
that need it are skipped with how to install it; under `CI=true` they fail instead, so that CI
can never pass by skipping them.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

SUPERUSER = "postgres"
TEMPLATE = "pusherd_tpl"
START_TIMEOUT_S = 60.0
INSTALL_HINT = (
    "PostgreSQL server binaries not found: install them with `apt-get install postgresql` "
    "(Debian/Ubuntu) to run the PostgreSQL tests"
)


def find_bindir() -> Path | None:
    """The directory holding initdb and postgres, or None when the server is not installed."""
    override = os.environ.get("PUSHERD_PG_BINDIR")  # another install (Homebrew, Nix, a build)
    candidates: list[Path] = [Path(override)] if override else []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))
    # pg_config may come from libpq-dev alone (no server): look at the server packages too,
    # newest major version first.
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates.extend(Path(p) for p in reversed(versions))
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
        if override:
            return None  # asked for that one: do not quietly test another
    return None


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it under CI=true (CI must really run the PostgreSQL tests)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the PostgreSQL tests must run, not skip)")
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PgServer:
    """One running postmaster in a temporary directory."""

    bindir: Path
    root: Path
    port: int
    run_as: str | None  # the system user owning the cluster when we are root
    process: subprocess.Popen[bytes] | None = None
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL for dbname over TCP on loopback (what `storage.url` would hold)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        if self.run_as is not None:
            # Popen's user/group (setuid in the child, after fork) rather than a runuser or su
            # wrapper: the pid we hold is then the postmaster itself, stopped by one signal.
            entry = pwd.getpwnam(self.run_as)
            kwargs.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        return subprocess.Popen(args, **kwargs)

    def start(self) -> None:
        """initdb, start the postmaster, wait until it accepts connections, make the template."""
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        # --no-sync: initdb's own fsyncs only guard a cluster we throw away; the server itself
        # runs with fsync on.
        initdb = self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        out, _ = initdb.communicate(timeout=START_TIMEOUT_S)
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed: {out.decode(errors='replace')}")
        self.run()
        self.psql("postgres", f"CREATE DATABASE {TEMPLATE}")

    def run(self) -> None:
        """Start the postmaster on the existing cluster; return once it accepts connections."""
        log = open(self.log_file, "ab")  # noqa: SIM115 - the server writes it until stopped
        try:
            self.process = self._run(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self.socket_dir}",
                    "-c",
                    "fsync=on",
                    "-c",
                    "synchronous_commit=on",
                    "-c",
                    "full_page_writes=on",
                    "-c",
                    "max_connections=200",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                # Its own process group: a ^C in the terminal reaches pytest, which then stops
                # the server in order, instead of killing it under a running test.
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited at start:\n{self.log_tail()}")
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                check=False,
            )
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not accept connections:\n{self.log_tail()}")
            time.sleep(0.05)  # polling the server's readiness, not synchronising a test

    def restart(self, mode: str = "fast") -> None:
        """Stop (see stop) and start again on the same port; blocking, so from async tests
        call it through asyncio.to_thread."""
        self.stop(mode)
        self.run()

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server log (for failure messages)."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def psql(self, dbname: str, sql: str) -> str:
        """Run sql in dbname through psql; its unaligned output. Raises on any error."""
        done = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {sql!r}: {done.stderr.strip()}")
        return done.stdout

    def create_database(self, template: str = TEMPLATE) -> str:
        """A new empty database copied from template; its name."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.psql("postgres", f"CREATE DATABASE {name} TEMPLATE {template}")
        return name

    def drop_database(self, name: str) -> None:
        """Drop name, closing whatever connections a test left open to it."""
        self.psql("postgres", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self, mode: str = "fast") -> None:
        """Shut down: "fast" (SIGINT: end sessions, checkpoint) or "immediate" (SIGQUIT: no
        checkpoint, crash recovery at the next start, as after a power loss); kill if it hangs."""
        proc = self.process
        if proc is None:
            return
        self.process = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT if mode == "immediate" else signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class PgUnavailable(Exception):
    """PostgreSQL cannot be run here (not installed, or no user to run it as)."""


def launch() -> PgServer:
    """Start a throwaway server (PgUnavailable when the binaries or the user are missing)."""
    bindir = find_bindir()
    if bindir is None:
        raise PgUnavailable(INSTALL_HINT)
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PgUnavailable(
                "running as root needs the `postgres` system user to own the test cluster "
                "(initdb refuses root); `apt-get install postgresql` creates it"
            ) from None
        run_as = "postgres"
    root = Path(tempfile.mkdtemp(prefix="pusherd-pg-"))
    server = PgServer(bindir=bindir, root=root, port=free_port(), run_as=run_as)
    atexit.register(server.cleanup)  # even if the session is torn down abnormally
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server


def launch_or_skip() -> PgServer:
    """launch(), turning PgUnavailable into a skip (a failure under CI=true)."""
    try:
        return launch()
    except PgUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server (started on first use, stopped at session end)."""
    # A skip or failure here is cached by pytest for the session: one start attempt in all.
    server = launch_or_skip()
    yield server
    server.cleanup()


@pytest.fixture
def pg_database(pg_server: PgServer) -> Iterator[str]:
    """The name of a fresh, empty database for this test (dropped afterwards)."""
    name = pg_server.create_database()
    yield name
    pg_server.drop_database(name)


@pytest.fixture
def pg_url(pg_server: PgServer, pg_database: str) -> str:
    """A postgresql:// URL of a fresh, empty database for this test."""
    return pg_server.url(pg_database)
