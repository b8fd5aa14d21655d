"""pusherd benchmark: intake, delivery, latency, backlog and isolation against same-run baselines.

Usage: python bench/run.py [--quick] [--json] [--runs N] [--storage sqlite|postgres]

`--storage postgres` takes the PostgreSQL figures instead (bench/pg.py's docstring says how).

Everything runs on loopback, each part in its own process: `pusherd serve` (a real subprocess with a
temporary SQLite file, log level "warning" so that logging stays out of the figures), the receiver
(bench/receiver.py: aiohttp + uvloop, answers 200, records the arrival time of each messageId), the
bare baseline server (bench/baseline_ingest.py) and the load generators (`wrk` when installed, else
bench/loadgen.py; always bench/loadgen.py for fills, e2e and the deliver baseline). Nothing
generates load inside the daemon's process. Every figure is the median of `--runs` (>= 3) runs;
ratios are ratios of medians. Times are CLOCK_MONOTONIC (system-wide on Linux, so comparable
across processes).

How each figure is taken (SPEC §7):
- ingest_rps: 64 connections, single-event requests (~1 KiB), for a fixed time; every event matches
  one subscription whose destination refuses connections. Only 202s count; any other answer fails
  the run. ingest_baseline_rps: the same load against a bare aiohttp + uvloop + orjson handler that
  parses the event and answers 202 without storing it.
- batch_eps: 100-event batches, 8 connections, same setup. batch_baseline_eps: plain sqlite3 (WAL,
  synchronous=FULL, pusherd's schema) inserting the same rows — an events row and a deliveries row
  per event, with messageUuids and generated messageIds made by pusherd's own IdSource — in
  100-row transactions, one connection.
- deliver_rps: 20,000 deliveries are put in the outbox through ingest while the receiver process is
  stopped (SIGSTOP): the daemon's connections are accepted by the kernel and its first attempts wait
  for an answer, so no attempt fails and no retry delay or circuit breaker is involved. The clock
  starts at SIGCONT and stops when the receiver has the 20,000th distinct event.
  deliver_baseline_rps: a bare aiohttp ClientSession POSTing the same-size envelope 20,000 times to
  the same receiver at the same concurrency (delivery.per_destination = 8).
- e2e_p50_ms / e2e_p99_ms: single-event requests at a fixed offered 1,000 events/s with the receiver
  up; latency = receiver arrival time - the time the 202 came back to the producer (the table also
  shows request start -> receiver).
- backlog_rss_mb / backlog_drain_ratio: a second daemon, with its own receiver process, has its
  outbox filled (receiver stopped) to 200,000 pending deliveries (1,000,000 without --quick) plus
  the windows below; then, right after each deliver_rps run, its receiver is resumed until it has
  20,000 more events and stopped again. The median rate of those windows, with at least the
  backlog still pending, over the median deliver_rps (the same 20,000-event window with an
  otherwise empty queue, taken just before each) is backlog_drain_ratio. backlog_rss_mb is that
  daemon's peak VmRSS while the windows drain.
- isolation_ratio: one organization's events go to a healthy receiver port only (solo); another's
  go to a healthy port and to a port that accepts and never answers (a fresh one per run, so its
  attempts hang until delivery.timeout = 10s rather than meeting an already open circuit). The
  healthy port's drain rate with the hanging sibling, over its solo rate, measured as deliver_rps.
- isolation_50_ratio: a daemon with delivery.timeout = 5s and the default max_in_flight (256) and
  per_destination (8). One organization's events go to a healthy receiver port; its drain rate
  (as deliver_rps, ISOLATION_50_N events) is taken alone, then again right after another
  organization has subscribed 50 origins that accept connections and never answer (50 fresh ports
  of a second receiver process, so no circuit is open yet) and queued a backlog of 100 events for
  each of them. Without isolation those 50 origins take 400 attempt slots. Runs alternate solo /
  with-50; the 50 subscriptions are deleted after each run. Ratio of the medians.
- e2e_start_p99_ms: the e2e runs, from the moment the producer starts its request to the
  receiver's arrival.
- subs_cpu_ratio / idle_cpu_pct: bench/growth.py (daemon CPU per delivered event with 10,000
  subscriptions over 50 origins vs one; CPU with 100,000 subscriptions and nothing due).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import EVENT_NAME, SCOPE, event, free_port  # noqa: E402
from growth import phase_growth  # noqa: E402

PY = sys.executable
KEYS = (
    "ingest_rps",
    "ingest_baseline_rps",
    "ingest_ratio",
    "batch_eps",
    "batch_baseline_eps",
    "batch_ratio",
    "deliver_rps",
    "deliver_baseline_rps",
    "deliver_ratio",
    "e2e_p50_ms",
    "e2e_p99_ms",
    "backlog_rss_mb",
    "backlog_drain_ratio",
    "isolation_ratio",
    "isolation_50_ratio",
    "e2e_start_p99_ms",
    "subs_cpu_ratio",
    "idle_cpu_pct",
)
# key -> (comparison, target)
TARGETS: dict[str, tuple[str, float]] = {
    "ingest_ratio": (">=", 0.5),
    "batch_ratio": (">=", 0.5),
    "deliver_ratio": (">=", 0.5),
    "e2e_p50_ms": ("<=", 5.0),
    "e2e_p99_ms": ("<=", 50.0),
    "backlog_rss_mb": ("<=", 150.0),
    "backlog_drain_ratio": (">=", 0.8),
    "isolation_ratio": (">=", 0.9),
    "isolation_50_ratio": (">=", 0.9),
    "e2e_start_p99_ms": ("<=", 10.0),
    "subs_cpu_ratio": ("<=", 1.25),
    "idle_cpu_pct": ("<=", 1.0),
}
DEAD_ORIGINS = 50
DEAD_BACKLOG = 100  # events queued to each never-answering origin before a with-50 run


def say(msg: str) -> None:
    """Progress on stderr (stdout is kept for the result)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Settings:
    """Sizes of one benchmark run."""

    runs: int
    load_s: float  # each wrk / HTTP load run
    deliver_n: int  # deliveries drained per deliver run
    e2e_s: float  # seconds at the fixed e2e rate per run
    e2e_rate: float
    backlog: int  # pending deliveries behind the measured windows
    window: int  # deliveries per backlog / isolation window
    isolation_n: int
    batch_baseline_n: int
    growth_events: int  # events per CPU-per-event window (bench/growth.py)
    growth_via_api: bool  # create the growth phase's subscriptions through the API


QUICK = Settings(3, 2.0, 20_000, 2.0, 1000.0, 200_000, 20_000, 12_000, 20_000, 4_000, False)
FULL = Settings(5, 10.0, 20_000, 10.0, 1000.0, 1_000_000, 20_000, 20_000, 50_000, 20_000, True)


# -- processes -----------------------------------------------------------------------------


@dataclass
class Procs:
    """Every child process, ended by pid when the bench ends."""

    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, args: list[str], ready_line: bool = False) -> subprocess.Popen[bytes]:
        """Start a child; with ready_line, wait until it prints "ready"."""
        p = subprocess.Popen(
            args,
            stdout=subprocess.PIPE if ready_line else subprocess.DEVNULL,
            stderr=None,
            cwd=ROOT,
        )
        self.children.append(p)
        if ready_line:
            assert p.stdout is not None
            line = p.stdout.readline()
            if b"ready" not in line:
                raise RuntimeError(f"{args[1]} did not start: {line!r}")
        return p

    def stop(self, p: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """End one child (continuing it first in case it is stopped)."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
                os.kill(p.pid, sig)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.children:
            self.children.remove(p)

    def stop_all(self) -> None:
        """End every child still running."""
        for p in list(self.children):
            self.stop(p)


def http(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    """A small synchronous HTTP call from the orchestrator (control traffic only)."""
    data = None if body is None else orjson.dumps(body)
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, (orjson.loads(raw) if raw else None)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str, step: float = 0.02) -> None:
    """Poll cond until true or raise after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step)
    raise TimeoutError(f"timed out waiting for {what}")


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (each held until all are chosen: no port twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


class Receiver:
    """A receiver process (bench/receiver.py) with its control port."""

    def __init__(self, procs: Procs, ports: int = 1, hang_ports: int = 0) -> None:
        chosen = free_ports(ports + hang_ports + 1)
        self.ports, self.hang_ports = chosen[:ports], chosen[ports:-1]
        self.control = chosen[-1]
        args = [PY, str(HERE / "receiver.py"), "--control-port", str(self.control)]
        args += [a for p in self.ports for a in ("--port", str(p))]
        args += [a for p in self.hang_ports for a in ("--hang-port", str(p))]
        self.proc = procs.start(args, ready_line=True)

    def url(self, port: int) -> str:
        """The hook URL on one port."""
        return f"http://127.0.0.1:{port}/hook"

    def stats(self, port: int, at: int = 0) -> dict[str, Any]:
        """count / first / last / at-th arrival time on a port."""
        _, out = http("GET", f"http://127.0.0.1:{self.control}/stats?port={port}&at={at}")
        return dict(out)

    def arrivals(self, port: int) -> dict[str, float]:
        """messageId -> arrival time on a port."""
        _, out = http("GET", f"http://127.0.0.1:{self.control}/arrivals?port={port}")
        return dict(out)

    def reset(self, port: int) -> None:
        """Forget a port's arrivals."""
        http("POST", f"http://127.0.0.1:{self.control}/reset?port={port}")

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing is answered."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> float:
        """SIGCONT; returns the monotonic time just before it."""
        t0 = time.monotonic()
        os.kill(self.proc.pid, signal.SIGCONT)
        return t0

    def wait_count(self, port: int, n: int, timeout_s: float) -> float:
        """Wait until the port has n distinct events; return the n-th arrival time."""
        wait_until(lambda: self.stats(port)["count"] >= n, timeout_s, f"{n} events on {port}", 0.05)
        return float(self.stats(port, at=n)["at"])


class Daemon:
    """A `pusherd serve` subprocess on a temporary database."""

    def __init__(
        self,
        procs: Procs,
        workdir: Path,
        name: str,
        delivery: dict[str, Any],
        storage_url: str = "",
    ) -> None:
        self.procs = procs
        self.storage_url = storage_url
        self.dir = workdir / name
        self.dir.mkdir()
        self.api_port, self.ingest_port = free_port(), free_port()
        self.config = self.dir / "pusherd.toml"
        d = {
            "retry_schedule": ["1s", "5s", "30s", "5m"],
            "jitter": 0.2,
            "allow_http": True,
            "allow_private_destinations": True,
            "shutdown_grace": "1s",
            **delivery,
        }
        lines = [
            "[api]",
            f'listen = "127.0.0.1:{self.api_port}"',
            "[ingest]",
            f'listen = "127.0.0.1:{self.ingest_port}"',
            "[storage]",
            f'url = "{storage_url}"' if storage_url else f'path = "{self.dir / "pusherd.sqlite3"}"',
            "[delivery]",
            *(f"{k} = {json.dumps(v)}" for k, v in d.items()),
            "[ratelimit]",
            "per_minute = 1000000",
            "per_hour = 100000000",
            "[log]",
            'level = "warning"',
            'format = "json"',
        ]
        self.config.write_text("\n".join(lines) + "\n")
        # BENCH_SERVE_SCRIPT: run a script instead of `-m pusherd` (to measure a patched build).
        main = os.environ.get("BENCH_SERVE_SCRIPT")
        cmd = [PY, main] if main else [PY, "-m", "pusherd"]
        self.proc = procs.start([*cmd, "serve", "--config", str(self.config)])
        wait_until(self._healthy, 30, "pusherd to answer /healthz", 0.05)

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"pusherd exited with {self.proc.returncode}")
        try:
            return http("GET", f"http://127.0.0.1:{self.ingest_port}/healthz")[0] == 200
        except OSError:
            return False

    @property
    def events_url(self) -> str:
        """POST /events on the ingest listener."""
        return f"http://127.0.0.1:{self.ingest_port}/events"

    def token(self, org: str) -> str:
        """A token for org: through the store interface from this process on SQLite (as the
        CLI does, without a Python start-up per token), else via `pusherd token create`."""
        if not self.storage_url:
            from growth import make_tokens

            return make_tokens(self.dir / "pusherd.sqlite3", [org])[0][1]
        out = subprocess.run(
            [
                PY,
                "-m",
                "pusherd",
                "token",
                "create",
                "--config",
                str(self.config),
                "--org",
                org,
                "--scope",
                SCOPE,
                "--name",
                "bench",
            ],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        return out.stdout.decode().strip()

    def subscribe(self, token: str, destination: str) -> str:
        """Create a Zettle subscription to EVENT_NAME; return its uuid."""
        sub = str(uuid.uuid1())
        status, body = http(
            "POST",
            f"http://127.0.0.1:{self.api_port}/organizations/self/subscriptions",
            {
                "uuid": sub,
                "transportName": "WEBHOOK",
                "eventNames": [EVENT_NAME],
                "destination": destination,
                "contactEmail": "bench@example.com",
            },
            token,
        )
        if status != 200:
            raise RuntimeError(f"subscription create: {status} {body!r}")
        return sub

    def unsubscribe(self, token: str, sub: str) -> None:
        """Delete a subscription (its pending deliveries are cancelled)."""
        url = f"http://127.0.0.1:{self.api_port}/organizations/self/subscriptions/{sub}"
        status, body = http("DELETE", url, token=token)
        if status != 204:
            raise RuntimeError(f"subscription delete: {status} {body!r}")

    def rss_mb(self) -> float:
        """VmRSS of the daemon in MiB."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        return int(m.group(1)) / 1024 if m else 0.0

    def stop(self) -> None:
        """SIGTERM and wait."""
        self.procs.stop(self.proc)


def loadgen(*args: str) -> dict[str, Any]:
    """Run bench/loadgen.py as its own process and parse its JSON line."""
    return loadgen_script(str(HERE / "loadgen.py"), *args)


def loadgen_script(script: str, *args: str) -> dict[str, Any]:
    """Run a load-generating script as its own process and parse its JSON line."""
    out = subprocess.run([PY, script, *args], check=True, capture_output=True, cwd=ROOT)
    return dict(orjson.loads(out.stdout))


def fill(url: str, org: str, n: int, prefix: str, batch: int = 1000, conc: int = 4) -> float:
    """Ingest n events in batches through the daemon; return the events/s it took."""
    out = loadgen(
        "fill", "--url", url, "--org", org, "--n", str(n), "--prefix", prefix,
        "--batch", str(batch), "--concurrency", str(conc),
    )  # fmt: skip
    return n / float(out["elapsed"])


# -- HTTP load (wrk, or the asyncio fallback) ----------------------------------------------


def http_load(url: str, body_file: Path, conns: int, seconds: float, workdir: Path) -> float:
    """Requests/s answered 2xx under `conns` connections for `seconds` (any non-2xx fails)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return _asyncio_load(url, body_file, conns, seconds)
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'local f = io.open("{body_file}", "rb")\n'
        'wrk.body = f:read("*a")\nf:close()\n'
    )
    out = subprocess.run(
        [wrk, "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    secs = _wrk_seconds(re.search(r"requests in ([\d.]+\w+),", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if bad or errors:
        raise RuntimeError(f"load against {url} got failures:\n{out}")
    return total / secs


def _wrk_seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert m is not None, text
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(2)]


def _asyncio_load(url: str, body_file: Path, conns: int, seconds: float) -> float:
    code = (
        "import asyncio,sys,time,aiohttp,uvloop\n"
        "async def main(url,path,conns,secs):\n"
        "    body=open(path,'rb').read(); n=0; end=time.monotonic()+secs\n"
        "    h={'Content-Type':'application/json'}\n"
        "    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as s:\n"
        "        async def w():\n"
        "            nonlocal n\n"
        "            while time.monotonic()<end:\n"
        "                async with s.post(url,data=body,headers=h) as r:\n"
        "                    await r.read()\n"
        "                    if r.status//100!=2: sys.exit(f'status {r.status}')\n"
        "                    n+=1\n"
        "        t=time.monotonic(); await asyncio.gather(*(w() for _ in range(conns)))\n"
        "        print(n/(time.monotonic()-t))\n"
        "uvloop.run(main(sys.argv[1],sys.argv[2],int(sys.argv[3]),float(sys.argv[4])))\n"
    )
    out = subprocess.run(
        [PY, "-c", code, url, str(body_file), str(conns), str(seconds)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip())


# -- phases --------------------------------------------------------------------------------


@dataclass
class Results:
    """Per-run samples and the figures derived from them."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        """Record one run's value."""
        self.samples.setdefault(key, []).append(value)

    def med(self, key: str) -> float:
        """Median of a key's runs."""
        return float(statistics.median(self.samples[key]))


def batch_baseline(workdir: Path, n: int, org: str) -> float:
    """Plain sqlite3, pusherd's schema, an events + a deliveries row per event, 100 per commit."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sys.path.insert(0, str(ROOT))
    from pusherd.store.ids import IdSource
    from pusherd.store.sqlite.schema import connect_sync

    path = workdir / f"baseline-{uuid.uuid4().hex[:8]}.sqlite3"
    conn = connect_sync(path)  # WAL, synchronous=FULL, the real schema
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    sub = str(uuid.uuid1())
    payload = orjson.dumps(event(org)["payload"]).decode()
    ids = IdSource()  # the same messageUuids and generated messageIds as pusherd's
    rows = [(ids.uuid1(), org, EVENT_NAME, ids.uuid7(), payload) for _ in range(n)]
    start = time.monotonic()
    for i in range(0, n, 100):
        now = int(time.time() * 1000)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        conn.execute("BEGIN IMMEDIATE")
        for u, o, name, mid, p in rows[i : i + 100]:
            seq = conn.execute(
                "INSERT INTO events (uuid, organization, event_name, message_id, payload,"
                " timestamp, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (organization, message_id) DO NOTHING RETURNING seq",
                (u, o, name, mid, p, ts, now),
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO deliveries (event_seq, subscription, status, due_ms, created_ms)"
                " VALUES (?, ?, 'pending', ?, ?)",
                (seq, sub, now, now),
            )
        conn.execute("COMMIT")
    elapsed = time.monotonic() - start
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return n / elapsed


def phase_intake(s: Settings, procs: Procs, workdir: Path, res: Results) -> None:
    """ingest_rps / batch_eps with the subscription's receiver down, and their baselines."""
    say("intake: starting pusherd and the bare baseline server")
    daemon = Daemon(procs, workdir, "intake", {})
    base_port = free_port()
    baseline = procs.start(
        [PY, str(HERE / "baseline_ingest.py"), "--port", str(base_port)], ready_line=True
    )
    try:
        org = str(uuid.uuid4())
        token = daemon.token(org)
        daemon.subscribe(token, f"http://127.0.0.1:{free_port()}/down")  # connection refused
        single = workdir / "single.json"
        single.write_bytes(orjson.dumps(event(org)))
        batch = workdir / "batch.json"
        batch.write_bytes(orjson.dumps([event(org) for _ in range(100)]))
        base_url = f"http://127.0.0.1:{base_port}/events"
        say("intake: warm-up")
        http_load(daemon.events_url, single, 64, 1.0, workdir)
        http_load(base_url, single, 64, 1.0, workdir)
        for i in range(s.runs):
            res.add("ingest_rps", http_load(daemon.events_url, single, 64, s.load_s, workdir))
            res.add("ingest_baseline_rps", http_load(base_url, single, 64, s.load_s, workdir))
            say(
                f"intake run {i + 1}: ingest {res.samples['ingest_rps'][-1]:.0f}/s,"
                f" baseline {res.samples['ingest_baseline_rps'][-1]:.0f}/s"
            )
        for i in range(s.runs):
            res.add("batch_eps", 100 * http_load(daemon.events_url, batch, 8, s.load_s, workdir))
            res.add("batch_baseline_eps", batch_baseline(workdir, s.batch_baseline_n, org))
            say(
                f"batch run {i + 1}: pusherd {res.samples['batch_eps'][-1]:.0f} ev/s,"
                f" sqlite3 {res.samples['batch_baseline_eps'][-1]:.0f} ev/s"
            )
        res.notes["intake_rss_mb"] = f"{daemon.rss_mb():.0f}"
    finally:
        daemon.stop()
        procs.stop(baseline)


def drain_run(
    daemon: Daemon, recv: Receiver, port: int, org: str, n: int, prefix: str, timeout_s: float
) -> float:
    """Fill n events while the receiver is stopped, resume it, return deliveries/s to the n-th."""
    recv.reset(port)
    recv.pause()
    try:
        fill(daemon.events_url, org, n, prefix)
    finally:
        t0 = recv.resume()
    t_n = recv.wait_count(port, n, timeout_s)
    return n / (t_n - t0)


def e2e_run(
    daemon: Daemon,
    recv: Receiver,
    port: int,
    org: str,
    n: int,
    prefix: str,
    rate: float,
    res: Results,
    key_prefix: str,
) -> None:
    """n single-event requests at a fixed offered rate; record the latency percentiles."""
    recv.reset(port)
    out = loadgen("e2e", "--url", daemon.events_url, "--org", org, "--n", str(n),
                  "--prefix", prefix, "--rate", str(rate))  # fmt: skip
    if out["errors"]:
        raise RuntimeError(f"e2e: {out['errors']} requests were not answered 202")
    recv.wait_count(port, n, 60)
    arrivals = recv.arrivals(port)
    # A straggler of an earlier run may count towards n: wait for every id of this one.
    deadline = time.monotonic() + 60
    while not out["times"].keys() <= arrivals.keys():
        if time.monotonic() > deadline:
            raise TimeoutError(f"e2e {prefix}: not every event reached the receiver")
        time.sleep(0.05)
        arrivals = recv.arrivals(port)
    from_ack = sorted((arrivals[m] - t[1]) * 1000 for m, t in out["times"].items())
    from_start = sorted((arrivals[m] - t[0]) * 1000 for m, t in out["times"].items())
    res.add(f"{key_prefix}e2e_p50_ms", pct(from_ack, 50))
    res.add(f"{key_prefix}e2e_p99_ms", pct(from_ack, 99))
    res.add(f"{key_prefix}e2e_start_p50_ms", pct(from_start, 50))
    res.add(f"{key_prefix}e2e_start_p99_ms", pct(from_start, 99))
    res.add(f"{key_prefix}e2e_achieved_rate", float(out["achieved_rate"]))
    say(
        f"{key_prefix}e2e {prefix}: 202->receiver p50 {pct(from_ack, 50):.2f} ms,"
        f" p99 {pct(from_ack, 99):.2f} ms, start->receiver p99 {pct(from_start, 99):.2f} ms"
        f" (offered {out['achieved_rate']:.0f}/s)"
    )


def phase_delivery(s: Settings, procs: Procs, workdir: Path, res: Results) -> None:
    """e2e latency, deliver_rps against its baseline, then the big backlog."""
    recv = Receiver(procs, ports=1)
    port = recv.ports[0]
    say("delivery: starting pusherd")
    daemon = Daemon(procs, workdir, "delivery", {"timeout": "300s", "lease": "600s"})
    backlog: Backlog | None = None
    try:
        org = str(uuid.uuid4())
        token = daemon.token(org)
        daemon.subscribe(token, recv.url(port))
        # e2e at a fixed offered rate, receiver up
        n_e2e = int(s.e2e_rate * s.e2e_s)
        loadgen("e2e", "--url", daemon.events_url, "--org", org, "--n", "300",
                "--prefix", "warm", "--rate", str(s.e2e_rate))  # fmt: skip
        for i in range(s.runs):
            e2e_run(daemon, recv, port, org, n_e2e, f"e2e{i}", s.e2e_rate, res, "")
        # The backlog lives in a second daemon with its own receiver process, so that each
        # backlog window is taken right after an empty-queue deliver run: both see the same
        # moment of this shared machine.
        backlog = Backlog(s, procs, workdir)
        backlog.fill(res)
        # deliver_rps: drain 20k pre-ingested deliveries; baseline and backlog window interleaved
        for i in range(s.runs):
            rate = drain_run(daemon, recv, port, org, s.deliver_n, f"dl{i}", 300)
            res.add("deliver_rps", rate)
            recv.reset(port)
            out = loadgen("deliver", "--url", recv.url(port), "--org", org,
                          "--n", str(s.deliver_n), "--prefix", f"base{i}",
                          "--concurrency", "8")  # fmt: skip
            if out["ok"] != s.deliver_n:
                raise RuntimeError(f"deliver baseline: {out['ok']} of {s.deliver_n} answered 2xx")
            res.add("deliver_baseline_rps", s.deliver_n / float(out["elapsed"]))
            say(
                f"deliver run {i + 1}: pusherd {rate:.0f}/s,"
                f" baseline {res.samples['deliver_baseline_rps'][-1]:.0f}/s"
            )
            backlog.window(i, res)
    finally:
        daemon.stop()
        procs.stop(recv.proc)
        if backlog is not None:
            backlog.stop()


class Backlog:
    """A daemon whose outbox holds s.backlog pending deliveries, drained a window at a time."""

    def __init__(self, s: Settings, procs: Procs, workdir: Path) -> None:
        self.s, self.procs = s, procs
        self.recv = Receiver(procs, ports=1)
        self.port = self.recv.ports[0]
        say("backlog: starting a second pusherd")
        self.daemon = Daemon(procs, workdir, "backlog", {"timeout": "300s", "lease": "600s"})
        self.org = str(uuid.uuid4())
        self.daemon.subscribe(self.daemon.token(self.org), self.recv.url(self.port))
        self.base = 0

    def fill(self, res: Results) -> None:
        """Fill the outbox with its receiver stopped; it stays stopped between windows."""
        s, recv = self.s, self.recv
        total = s.backlog + s.runs * s.window  # the last window starts at s.backlog
        say(f"backlog: filling {total:,} deliveries (receiver stopped)")
        recv.reset(self.port)
        recv.pause()
        peak_fill = 0.0
        start = time.monotonic()
        chunk = 100_000
        for i in range(0, total, chunk):
            fill(self.daemon.events_url, self.org, min(chunk, total - i), f"bl{i}")
            peak_fill = max(peak_fill, self.daemon.rss_mb())
        fill_rate = total / (time.monotonic() - start)
        res.notes["backlog_fill_eps"] = f"{fill_rate:.0f}"
        res.notes["backlog_rss_after_fill_mb"] = f"{peak_fill:.0f}"
        say(f"backlog: filled at {fill_rate:.0f} ev/s, RSS {peak_fill:.0f} MiB")

    def window(self, i: int, res: Results) -> None:
        """Resume the receiver for s.window deliveries, stop it again; record rate and RSS."""
        s, recv, daemon = self.s, self.recv, self.daemon
        peak = daemon.rss_mb()
        t0 = recv.resume()
        target = self.base + s.window
        deadline = time.monotonic() + 300
        while recv.stats(self.port)["count"] < target:
            peak = max(peak, daemon.rss_mb())
            if time.monotonic() > deadline:
                raise TimeoutError("backlog window did not drain")
            time.sleep(0.1)
        peak = max(peak, daemon.rss_mb())
        t_n = float(recv.stats(self.port, at=target)["at"])
        self.base = recv.stats(self.port)["count"]
        recv.pause()  # (its control port does not answer while it is stopped)
        rate = s.window / (t_n - t0)
        res.add("backlog_window_rps", rate)
        res.add("backlog_rss_mb", peak)
        say(f"backlog window {i + 1}: {rate:.0f}/s, peak RSS {peak:.0f} MiB")

    def stop(self) -> None:
        self.recv.resume()
        self.daemon.stop()
        self.procs.stop(self.recv.proc)


def phase_isolation(s: Settings, procs: Procs, workdir: Path, res: Results) -> None:
    """A healthy origin's drain rate alone and next to an origin that hangs until the timeout."""
    recv = Receiver(procs, ports=2)
    solo_port, shared_port = recv.ports
    hang = Receiver(procs, ports=0, hang_ports=s.runs)
    say("isolation: starting pusherd")
    daemon = Daemon(procs, workdir, "isolation", {"timeout": "10s", "lease": "600s"})
    try:
        solo_org, iso_org = str(uuid.uuid4()), str(uuid.uuid4())
        solo_token, iso_token = daemon.token(solo_org), daemon.token(iso_org)
        daemon.subscribe(solo_token, recv.url(solo_port))
        daemon.subscribe(iso_token, recv.url(shared_port))
        n = s.isolation_n
        for i in range(s.runs):
            solo = drain_run(daemon, recv, solo_port, solo_org, n, f"solo{i}", 120)
            bad = daemon.subscribe(iso_token, f"http://127.0.0.1:{hang.hang_ports[i]}/hang")
            with_hang = drain_run(daemon, recv, shared_port, iso_org, n, f"iso{i}", 120)
            daemon.unsubscribe(iso_token, bad)
            res.add("isolation_solo_rps", solo)
            res.add("isolation_hang_rps", with_hang)
            say(
                f"isolation run {i + 1}: solo {solo:.0f}/s,"
                f" next to a hanging origin {with_hang:.0f}/s"
            )
    finally:
        daemon.stop()
        procs.stop(recv.proc)
        procs.stop(hang.proc)


def phase_isolation_50(s: Settings, procs: Procs, workdir: Path, res: Results) -> None:
    """A healthy origin's drain rate alone and next to 50 origins that never answer."""
    recv = Receiver(procs, ports=1)
    port = recv.ports[0]
    dead = Receiver(procs, ports=0, hang_ports=DEAD_ORIGINS * s.runs)
    say("isolation_50: starting pusherd")
    daemon = Daemon(procs, workdir, "isolation50", {"timeout": "5s", "lease": "600s"})
    try:
        org, dead_org = str(uuid.uuid4()), str(uuid.uuid4())
        token, dead_token = daemon.token(org), daemon.token(dead_org)
        daemon.subscribe(token, recv.url(port))
        n = s.isolation_n
        for i in range(s.runs):
            solo = drain_run(daemon, recv, port, org, n, f"solo50-{i}", 120)
            ports = dead.hang_ports[i * DEAD_ORIGINS : (i + 1) * DEAD_ORIGINS]
            subs = [daemon.subscribe(dead_token, f"http://127.0.0.1:{p}/hang") for p in ports]
            fill(daemon.events_url, dead_org, DEAD_BACKLOG, f"dead{i}", batch=DEAD_BACKLOG, conc=1)
            with_dead = drain_run(daemon, recv, port, org, n, f"iso50-{i}", 120)
            for sub in subs:
                daemon.unsubscribe(dead_token, sub)
            res.add("isolation_50_solo_rps", solo)
            res.add("isolation_50_rps", with_dead)
            say(
                f"isolation_50 run {i + 1}: solo {solo:.0f}/s,"
                f" next to {DEAD_ORIGINS} silent origins {with_dead:.0f}/s"
            )
    finally:
        daemon.stop()
        procs.stop(recv.proc)
        procs.stop(dead.proc)


def pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


# -- report --------------------------------------------------------------------------------


def figures(res: Results) -> dict[str, float]:
    """The figures of KEYS: medians of runs, ratios of medians."""
    m = res.med
    out = {
        "ingest_rps": m("ingest_rps"),
        "ingest_baseline_rps": m("ingest_baseline_rps"),
        "batch_eps": m("batch_eps"),
        "batch_baseline_eps": m("batch_baseline_eps"),
        "deliver_rps": m("deliver_rps"),
        "deliver_baseline_rps": m("deliver_baseline_rps"),
        "e2e_p50_ms": m("e2e_p50_ms"),
        "e2e_p99_ms": m("e2e_p99_ms"),
        "backlog_rss_mb": m("backlog_rss_mb"),
    }
    out["ingest_ratio"] = out["ingest_rps"] / out["ingest_baseline_rps"]
    out["batch_ratio"] = out["batch_eps"] / out["batch_baseline_eps"]
    out["deliver_ratio"] = out["deliver_rps"] / out["deliver_baseline_rps"]
    out["backlog_drain_ratio"] = m("backlog_window_rps") / out["deliver_rps"]
    out["isolation_ratio"] = m("isolation_hang_rps") / m("isolation_solo_rps")
    out["isolation_50_ratio"] = m("isolation_50_rps") / m("isolation_50_solo_rps")
    out["e2e_start_p99_ms"] = m("e2e_start_p99_ms")
    out["subs_cpu_ratio"] = m("subs_cpu_many_us") / m("subs_cpu_one_us")
    out["idle_cpu_pct"] = m("idle_cpu_pct")
    return {k: round(out[k], 3) for k in KEYS}


def verdict(key: str, value: float, targets: dict[str, tuple[str, float]] | None = None) -> str:
    """PASS / FAIL against the issue's target, "" for figures without one."""
    targets = TARGETS if targets is None else targets
    if key not in targets:
        return ""
    op, target = targets[key]
    ok = value >= target if op == ">=" else value <= target
    return "PASS" if ok else "FAIL"


def rows(
    fig: dict[str, float],
    res: Results,
    keys: tuple[str, ...],
    targets: dict[str, tuple[str, float]],
) -> list[str]:
    """One table line per figure: value, target, verdict, the runs behind it."""
    lines = []
    for key in keys:
        target = targets.get(key)
        t = f"{target[0]} {target[1]:g}" if target else ""
        shown = " ".join(f"{v:.4g}" for v in res.samples.get(key, []))
        v = verdict(key, fig[key], targets)
        lines.append(f"{key:<22}{fig[key]:>12.3f}  {t:<10}{v:<6}{shown}")
    return lines


def table(fig: dict[str, float], res: Results, s: Settings, elapsed: float) -> str:
    """The human-readable report."""
    lines = [
        f"pusherd benchmark ({'quick' if s is QUICK else 'full'}, median of {s.runs} runs,"
        f" {os.cpu_count()} CPUs, daemon log level 'warning', {elapsed:.0f}s)",
        f"{'figure':<22}{'value':>12}  {'target':<10}{'':<6}runs",
    ]
    lines += rows(fig, res, KEYS, TARGETS)
    extra = {
        "e2e request start -> receiver p50/p99 ms": (
            f"{res.med('e2e_start_p50_ms'):.2f} / {res.med('e2e_start_p99_ms'):.2f}"
        ),
        "e2e offered rate (achieved)": f"{res.med('e2e_achieved_rate'):.0f}/s",
        "backlog window drain rate": f"{res.med('backlog_window_rps'):.0f}/s"
        f" (with >= {s.backlog:,} pending)",
        "isolation solo / with hanging origin": (
            f"{res.med('isolation_solo_rps'):.0f}/s / {res.med('isolation_hang_rps'):.0f}/s"
        ),
        f"isolation solo / next to {DEAD_ORIGINS} silent origins": (
            f"{res.med('isolation_50_solo_rps'):.0f}/s / {res.med('isolation_50_rps'):.0f}/s"
        ),
        "daemon CPU per delivered event, 1 / 10,000 subscriptions": (
            f"{res.med('subs_cpu_one_us'):.0f} us / {res.med('subs_cpu_many_us'):.0f} us"
        ),
        **{k.replace("_", " "): v for k, v in res.notes.items()},
    }
    lines.append("")
    lines += [f"  {k}: {v}" for k, v in extra.items()]
    lines.append(
        "  e2e_* = receiver arrival - time the 202 came back; deliver = SIGCONT of the stopped"
        " receiver -> N-th event received; see bench/run.py's docstring for every method."
    )
    return "\n".join(lines)


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    """A temporary directory for databases and configs."""
    with tempfile.TemporaryDirectory(prefix="pusherd-bench-") as d:
        yield Path(d)


def main() -> int:
    """Run every phase and print the table (stderr with --json) and the figures."""
    p = argparse.ArgumentParser(description="pusherd benchmark (see the module docstring)")
    p.add_argument("--quick", action="store_true", help="smaller backlog and shorter runs (~3 min)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the figures")
    p.add_argument("--runs", type=int, help="runs per figure (at least 3)")
    p.add_argument(
        "--storage",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="postgres: the PostgreSQL figures (bench/pg.py) on a server the bench starts",
    )
    p.add_argument(
        "--only",
        choices=["intake", "delivery", "isolation", "isolation50", "growth"],
        action="append",
        help=argparse.SUPPRESS,
    )
    # With --quick --only growth: the full run's growth windows (20,000 events) without the
    # rest of the full run (to measure subs_cpu_ratio's shape quickly).
    p.add_argument("--growth-events", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    s = QUICK if a.quick else FULL
    if a.runs is not None:
        s = Settings(**{**s.__dict__, "runs": max(3, a.runs)})
    if a.growth_events is not None:
        s = Settings(**{**s.__dict__, "growth_events": a.growth_events})
    procs = Procs()
    res = Results()
    started = time.monotonic()
    if a.storage == "postgres":
        return main_pg(s, procs, res, started, a.json)
    phases = {
        "intake": phase_intake,
        "delivery": phase_delivery,
        "isolation": phase_isolation,
        "isolation50": phase_isolation_50,
        "growth": lambda s, procs, workdir, res: phase_growth(
            s, procs, workdir, res, sys.modules[__name__]
        ),
    }
    try:
        with workspace() as workdir:
            for name, phase in phases.items():
                if a.only and name not in a.only:
                    continue
                t0 = time.monotonic()
                phase(s, procs, workdir, res)
                say(f"phase {name}: {time.monotonic() - t0:.1f} s")
    finally:
        procs.stop_all()
    elapsed = time.monotonic() - started
    if a.only:
        print(json.dumps(res.samples, indent=1), file=sys.stderr)
        return 0
    fig = figures(res)
    report = table(fig, res, s, elapsed)
    if a.json:
        print(report, file=sys.stderr)
        print(json.dumps(fig))
    else:
        print(report)
    return 0


def main_pg(s: Settings, procs: Procs, res: Results, started: float, as_json: bool) -> int:
    """`--storage postgres`: only the PostgreSQL phases (bench/pg.py), their table and figures."""
    import pg

    try:
        with workspace() as workdir:
            pg.phase_pg(s, procs, workdir, res, sys.modules[__name__])
    finally:
        procs.stop_all()
    fig = pg.pg_figures(res)
    report = pg.pg_table(fig, res, s, sys.modules[__name__], time.monotonic() - started)
    if as_json:
        print(report, file=sys.stderr)
        print(json.dumps(fig))
    else:
        print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
