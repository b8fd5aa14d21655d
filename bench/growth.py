"""Growth figures (SPEC §7): the daemon's cost follows the work that is due, not the subscriptions.

Imported by bench/run.py (phase_growth); also run as its own process for the client side
(`python bench/growth.py create|events ...`), so no load is generated inside the orchestrator or
the daemon.

- subs_cpu_ratio: the daemon's CPU (utime + stime) per delivered event with 10,000 subscriptions
  spread over 50 origins (one receiver process, 50 ports; 10,000 organizations with one
  subscription each, so each event has one delivery) divided by the same with one subscription.
  Events are posted in 100-event batches cycling over the organizations while the receiver is
  stopped (SIGSTOP), so the deliveries are claimed from the outbox, then it is resumed; the
  window runs from the first request to the last delivery (pusherd_deliveries_finished_total).
- idle_cpu_pct: the same daemon, grown to 100,000 subscriptions through the API (32 concurrent
  creations; the rate of the first and of the last 10% is reported), its TestMessages all
  delivered and its idle keep-alive connections closed, then its CPU over 10 s with nothing
  due, in percent of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import re
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import EVENT_NAME, SCOPE, payload  # noqa: E402

ORIGINS = 50
MANY_SUBS = 10_000
IDLE_SUBS = 100_000
IDLE_WINDOW_S = 10.0
# An idle daemon holds 5 sockets (its two listeners, the wake socket, the event loop's pair); fewer
# than 10 means the pooled connections (80-90 after the growth phase) are closed.
SETTLED_SOCKETS = 10
FINISHED = re.compile(r'^pusherd_deliveries_finished_total\{status="delivered"\} (\S+)$', re.M)
DEPTH = re.compile(r"^pusherd_queue_depth (\S+)$", re.M)


def daemon_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- client side (its own process) -------------------------------------------------------------


async def create(api: str, tokens: list[tuple[str, str]], dests: list[str], n: int, conc: int,
                 start: int) -> dict[str, Any]:  # fmt: skip
    """POST n Zettle subscriptions (round-robin over tokens and destinations)."""
    import aiohttp

    done: list[float] = []
    nxt = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal nxt
        while nxt < n:
            i = start + nxt
            nxt += 1
            _, secret = tokens[i % len(tokens)]
            body = {
                "uuid": str(uuid.uuid1()),
                "transportName": "WEBHOOK",
                "eventNames": [EVENT_NAME],
                "destination": dests[i % len(dests)],
                "contactEmail": "bench@example.com",
            }
            async with session.post(
                f"{api}/organizations/self/subscriptions",
                data=orjson.dumps(body),
                headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
            ) as resp:
                if resp.status != 200:
                    raise SystemExit(f"create: {resp.status} {await resp.text()}")
                await resp.read()
            done.append(time.monotonic())

    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as session:
        await asyncio.gather(*(worker(session) for _ in range(conc)))
    tenth = max(1, n // 10)
    marks = [t0, *done[tenth - 1 :: tenth]]
    rates = [tenth / (b - a) for a, b in itertools.pairwise(marks) if b > a]
    return {
        "elapsed": done[-1] - t0,
        "first_rate": rates[0],
        "last_rate": rates[-1],
        "decile_rates": [round(r) for r in rates],
    }


async def events(url: str, orgs: list[str], n: int, batch: int, conc: int, prefix: str) -> None:
    """POST n events in batches, event j to organization j % len(orgs)."""
    import aiohttp

    body_payload = payload()
    bodies = [
        orjson.dumps(
            [
                {
                    "eventName": EVENT_NAME,
                    "organizationUuid": orgs[j % len(orgs)],
                    "payload": body_payload,
                    "messageId": f"{prefix}-{j}",
                }
                for j in range(s, min(n, s + batch))
            ]
        )
        for s in range(0, n, batch)
    ]
    queue = list(reversed(bodies))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                async with session.post(
                    url, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    if resp.status != 202:
                        raise SystemExit(f"events: {resp.status} {await resp.text()}")
                    await resp.read()

        await asyncio.gather(*(worker() for _ in range(conc)))


def client_main(argv: list[str]) -> None:
    """`create` / `events` as a load-generating process; prints one JSON line."""
    import uvloop

    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["create", "events"])
    p.add_argument("--file", required=True)  # JSON: tokens [[org, secret]] or orgs [org]
    p.add_argument("--url", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--dests", default="")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prefix", default="g")
    a = p.parse_args(argv)
    data = orjson.loads(Path(a.file).read_bytes())
    if a.mode == "create":
        dests = a.dests.split(",")
        out = uvloop.run(create(a.url, data, dests, a.n, a.concurrency, a.start))
    else:
        uvloop.run(events(a.url, data, a.n, 100, a.concurrency, a.prefix))
        out = {}
    print(orjson.dumps(out).decode())


# -- orchestrator side -------------------------------------------------------------------------


def make_tokens(db_path: Path, orgs: list[str]) -> list[tuple[str, str]]:
    """One token per organization, created through the store interface (as the CLI does)."""
    sys.path.insert(0, str(HERE.parent))
    from pusherd.store import open_store

    async def run() -> list[tuple[str, str]]:
        store = await open_store(str(db_path), background=False)
        try:
            made = await asyncio.gather(*(store.create_token(o, (SCOPE,), "", None) for o in orgs))
            return [(t.organization, secret) for t, secret in made]
        finally:
            await store.close()

    return asyncio.run(run())


def make_subscriptions(
    db_path: Path, tokens: list[tuple[str, str]], dests: list[str], n: int, start: int
) -> float:
    """n subscriptions written through the store interface from this process (another process
    next to the daemon, as the CLI is); returns the creations per second."""
    from pusherd.store import open_store
    from pusherd.store.types import NewSubscription

    async def run() -> float:
        store = await open_store(str(db_path), background=False)
        t0 = time.monotonic()
        try:
            for chunk in range(start, start + n, 2000):
                await asyncio.gather(
                    *(
                        store.create_subscription(
                            NewSubscription(
                                str(uuid.uuid1()),
                                tokens[i % len(tokens)][0],
                                "WEBHOOK",
                                (EVENT_NAME,),
                                (SCOPE,),
                                dests[i % len(dests)],
                                None,
                                uuid.uuid4().hex * 2,
                            ),
                            None,
                        )
                        for i in range(chunk, min(start + n, chunk + 2000))
                    )
                )
            return n / (time.monotonic() - t0)
        finally:
            await store.close()

    return asyncio.run(run())


def create_subscriptions(
    R: Any, s: Any, daemon: Any, workdir: Path, tokens: list[tuple[str, str]], dests: list[str],
    n: int, start: int, res: Any,
) -> None:  # fmt: skip
    """n more subscriptions: through the API (32 concurrent) in the full run, through the store
    interface in --quick (the figures do not depend on how they were made)."""
    if s.growth_via_api:
        made = client(R, workdir, "create", tokens, "--url", f"http://127.0.0.1:{daemon.api_port}",
                      "--n", str(n), "--start", str(start), "--dests", ",".join(dests))  # fmt: skip
        res.notes[f"subscription_create_rate_{start}_to_{start + n}"] = (
            f"{made['first_rate']:.0f}/s first 10%, {made['last_rate']:.0f}/s last 10%"
            f" (deciles {made['decile_rates']}, through the API)"
        )
        R.say(f"growth: created {n:,} through the API in {made['elapsed']:.0f}s")
    else:
        rate = make_subscriptions(daemon.dir / "pusherd.sqlite3", tokens, dests, n, start)
        R.say(f"growth: created {n:,} through the store interface at {rate:.0f}/s")
    R.wait_until(lambda: queue_empty(R, daemon), 300, "the TestMessages to be delivered", 0.2)


def settle(pid: int) -> None:
    """Let the creation's after-effects pass before the idle window, without touching the
    daemon's database: its last attempt records and their checkpoint (half a second after the
    last commit), and its pool of idle keep-alive connections to the 50 receivers, which it
    closes a few seconds after their last request. (An outside checkpoint here would reset the
    daemon's page cache, and its next poll would read the file again: no user does that.)"""
    deadline = time.monotonic() + 20
    while open_sockets(pid) > SETTLED_SOCKETS:
        if time.monotonic() > deadline:
            print(f"growth: {open_sockets(pid)} sockets still open after 20 s", file=sys.stderr)
            break
        time.sleep(0.2)
    time.sleep(1.0)


def open_sockets(pid: int) -> int:
    """How many sockets the process holds (listeners, the wake socket, connections)."""
    fds = Path(f"/proc/{pid}/fd")
    n = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            n += os.readlink(fd).startswith("socket:")
    return n


def client(R: Any, workdir: Path, mode: str, data: Any, *args: str) -> dict[str, Any]:
    """Run this file as a client process; its JSON answer."""
    path = workdir / f"{mode}-{uuid.uuid4().hex[:6]}.json"
    path.write_bytes(orjson.dumps(data))
    return R.loadgen_script(str(HERE / "growth.py"), mode, "--file", str(path), *args)


def metrics(R: Any, daemon: Any) -> str:
    """The daemon's /metrics text."""
    url = f"http://127.0.0.1:{daemon.ingest_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as resp:
        return str(resp.read().decode())


def queue_empty(R: Any, daemon: Any) -> bool:
    """Whether the daemon has no pending delivery."""
    m = DEPTH.search(metrics(R, daemon))
    return m is not None and float(m.group(1)) == 0


def delivered(R: Any, daemon: Any) -> float:
    m = FINISHED.search(metrics(R, daemon))
    return float(m.group(1)) if m else 0.0


def cpu_per_event(
    R: Any, daemon: Any, recv: Any, workdir: Path, orgs: list[str], n: int, tag: str
) -> float:
    """Daemon CPU seconds per delivered event: n events over orgs are ingested while the
    receivers are stopped (so the deliveries are claimed from the outbox, not handed over
    at ingest), then drained."""
    R.wait_until(lambda: queue_empty(R, daemon), 120, "an empty queue", 0.05)
    base = delivered(R, daemon)
    c0 = daemon_cpu_s(daemon.proc.pid)
    recv.pause()
    try:
        client(R, workdir, "events", orgs, "--url", daemon.events_url, "--n", str(n),
               "--concurrency", "4", "--prefix", tag)  # fmt: skip
    finally:
        recv.resume()
    R.wait_until(lambda: delivered(R, daemon) >= base + n, 300, f"{n} deliveries", 0.05)
    return (daemon_cpu_s(daemon.proc.pid) - c0) / n


def phase_growth(s: Any, procs: Any, workdir: Path, res: Any, R: Any) -> None:
    """subs_cpu_ratio and idle_cpu_pct (see the module docstring); R is bench/run.py."""
    for attempt in range(5):  # 50 free ports picked at once may collide: pick again
        try:
            recv = R.Receiver(procs, ports=ORIGINS)
            if len(set(recv.ports)) == ORIGINS:
                break
            procs.stop(recv.proc)
        except RuntimeError:
            if attempt == 4:
                raise
    dests = [recv.url(p) for p in recv.ports]
    n = s.growth_events
    daemons = []
    try:
        R.say(f"growth: one subscription, and {MANY_SUBS:,} over {ORIGINS} origins")
        one = R.Daemon(procs, workdir, "growth1", {})
        daemons.append(one)
        org = str(uuid.uuid4())
        one.subscribe(one.token(org), dests[0])
        many = R.Daemon(procs, workdir, "growthN", {})
        daemons.append(many)
        orgs = [str(uuid.uuid4()) for _ in range(MANY_SUBS)]
        tokens = make_tokens(many.dir / "pusherd.sqlite3", orgs)
        create_subscriptions(R, s, many, workdir, tokens, dests, MANY_SUBS, 0, res)
        cpu_per_event(R, one, recv, workdir, [org], n // 4, "warm")
        cpu_per_event(R, many, recv, workdir, orgs, n // 4, "warm")
        for i in range(s.runs):  # interleaved: both see the same moment of the machine
            res.add(
                "subs_cpu_one_us", 1e6 * cpu_per_event(R, one, recv, workdir, [org], n, f"o{i}")
            )
            res.add(
                "subs_cpu_many_us", 1e6 * cpu_per_event(R, many, recv, workdir, orgs, n, f"m{i}")
            )
            R.say(
                f"growth run {i + 1}: CPU/event 1 sub {res.samples['subs_cpu_one_us'][-1]:.0f} us,"
                f" {MANY_SUBS:,} subs {res.samples['subs_cpu_many_us'][-1]:.0f} us"
            )
        procs.stop(one.proc)
        more = IDLE_SUBS - MANY_SUBS
        create_subscriptions(R, s, many, workdir, tokens, dests, more, MANY_SUBS, res)
        settle(many.proc.pid)
        c0, t0 = daemon_cpu_s(many.proc.pid), time.monotonic()
        time.sleep(IDLE_WINDOW_S)
        idle = 100 * (daemon_cpu_s(many.proc.pid) - c0) / (time.monotonic() - t0)
        res.add("idle_cpu_pct", idle)
        R.say(f"growth: idle with {IDLE_SUBS:,} subscriptions: {idle:.2f}% of a core")
    finally:
        for d in daemons:
            procs.stop(d.proc)
        procs.stop(recv.proc)


if __name__ == "__main__":
    client_main(sys.argv[1:])
