"""The console in a real headless Chromium (Debian's /usr/bin/chromium through Playwright).

No browser is downloaded: Playwright drives the system's chromium. Without it the tests skip,
except under CI (CI=true), where a missing browser is a failure. A screenshot of every page goes
to the test's tmp_path; PUSHERD_DOCS_SCREENSHOT=1 also refreshes docs/console.png.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.conftest import ORG, OTHER_ORG, Harness, Receiver
from tests.console_seed import seed_history
from tests.service import run_cli_async

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_PNG = Path(__file__).resolve().parent.parent / "docs" / "console.png"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():  # noqa: ASYNC240  (one stat, before anything runs)
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium to run the browser tests")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        try:
            yield b
        finally:
            await b.close()


class Console:
    """A browser page on the harness's console, with screenshots into tmp_path."""

    def __init__(self, page: Page, base: str, shots: Path) -> None:
        self.page = page
        self.base = base
        self.shots = shots
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    async def goto(self, path: str) -> int:
        resp = await self.page.goto(self.base + path)
        assert resp is not None
        return resp.status

    async def shot(self, name: str) -> None:
        self.shots.mkdir(exist_ok=True)
        await self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    async def sign_in(self, token: str) -> None:
        """With the keyboard alone: the token field has focus, Enter submits."""
        await self.goto("/console/signin")
        await self.shot("signin")
        await self.page.keyboard.type(token)
        await self.page.keyboard.press("Enter")
        await self.page.wait_for_url(self.base + "/console/")


ConsoleFactory = Callable[..., Awaitable[Console]]


@pytest.fixture
def console(browser: Browser, harness: Harness, tmp_path: Path) -> ConsoleFactory:
    async def make(width: int = 1280, height: int = 900) -> Console:
        context = await browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(10_000)
        page = await context.new_page()
        base = str(harness.api.make_url("")).rstrip("/")
        return Console(page, base, tmp_path / "screenshots")

    return make


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def failed_delivery(harness: Harness, receiver: Receiver, token: str) -> tuple[str, int]:
    """A subscription whose ProductCreated delivery failed for good (4 answers of 500)."""
    sub = await harness.subscribe(token, receiver.url)
    await receiver.wait_for(1, "TestMessage")
    receiver.default = 500
    answer = await harness.emit(payload={"sku": "A-1"})
    await harness.idle()
    org = harness.runtime.store

    async def finished() -> bool:
        views = await org.list_deliveries(sub["uuid"], "failed", 10, None)
        return len(views) == 1

    await wait_until(finished)
    assert answer["deliveries"] == 1
    failed = (await org.list_deliveries(sub["uuid"], "failed", 10, None))[0]
    return sub["uuid"], failed.id


async def test_sign_in_find_a_failed_delivery_retry_it_and_see_it_delivered(
    harness: Harness, receiver: Receiver, console: ConsoleFactory
) -> None:
    token = harness.token()
    _, delivery = await failed_delivery(harness, receiver, token)
    c = await console()
    await c.sign_in(token)
    await c.shot("overview")
    await c.page.get_by_role("link", name="Subscriptions", exact=True).click()
    await c.shot("subscriptions")
    await c.page.get_by_role("link", name=receiver.url).click()
    await c.page.select_option("#filter-status", "failed")
    await c.page.click("#filter")
    await c.shot("subscription-log")
    links = c.page.locator("a.delivery-link")
    assert await links.count() == 1
    await links.first.click()
    assert c.page.url.endswith(f"/console/deliveries/{delivery}")
    await c.shot("delivery-failed")
    attempts = c.page.locator("tr.attempt")
    assert await attempts.count() == 4
    assert await attempts.locator("td.status-code").all_inner_texts() == ["500"] * 4
    assert await c.page.locator("pre.answer").first.inner_text() == "nope"
    headers = await c.page.locator("#headers").inner_text()
    assert "X-iZettle-Signature: " in headers and "webhook-signature: v1," in headers

    receiver.default = 200
    await c.page.click("#retry")
    await c.shot("retry-confirm")
    await c.page.click("#confirm")
    assert "queued for another attempt" in await c.page.locator(".flash").inner_text()

    async def delivered() -> bool:
        await c.page.reload()
        return await c.page.locator("h1 .badge").inner_text() == "delivered"

    await wait_until(delivered)
    await c.shot("delivery-delivered")
    assert await attempts.count() == 5
    assert (await attempts.locator("td.status-code").all_inner_texts())[-1] == "200"
    assert len(receiver.events("ProductCreated")) == 5
    assert c.errors == []


async def test_sign_in_with_a_console_link_once(
    harness: Harness, browser: Browser, console: ConsoleFactory
) -> None:
    cfg = Path(harness.config.storage.path).with_name("console.toml")
    cfg.write_text(f'[storage]\npath = "{harness.config.storage.path}"\n')
    code, out, err = await run_cli_async("console-link", "--org", ORG, "--config", str(cfg))
    assert code == 0, err
    path = out.strip()[out.index("/console/") :]
    c = await console()
    assert await c.goto(path) == 200
    await c.page.wait_for_url(c.base + "/console/")  # the page moves on by itself
    assert ORG in await c.page.locator("header").inner_text()
    other = await console()  # a second browser profile: no cookie of the first
    assert await other.goto(path) == 403
    assert "already been used" in await other.page.locator("#error").inner_text()
    await other.shot("link-refused")


async def test_a_hostile_payload_is_shown_as_text_and_runs_nothing(
    harness: Harness, receiver: Receiver, console: ConsoleFactory
) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, receiver.url)
    hostile = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    await harness.emit(payload={"note": hostile})
    await harness.idle()
    c = await console()
    await c.page.add_init_script("window.pwned = 0")
    requests: list[str] = []
    c.page.on("request", lambda r: requests.append(r.url))
    await c.sign_in(token)
    await c.goto(f"/console/subscriptions/{sub['uuid']}?event=ProductCreated")
    await c.page.locator("a.delivery-link").first.click()
    await c.shot("delivery-hostile")
    assert hostile.replace('"', '\\"') in await c.page.locator("#payload").inner_text()
    assert await c.page.evaluate("window.pwned") == 0
    assert await c.page.locator("main script, main img").count() == 0
    assert not [u for u in requests if u.endswith("/x")]
    assert c.errors == []


async def test_a_form_post_without_its_csrf_token_is_refused(
    harness: Harness, receiver: Receiver, console: ConsoleFactory
) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, receiver.url)
    key = await harness.runtime.store.get_subscription(ORG, sub["uuid"])
    c = await console()
    await c.sign_in(token)
    await c.goto(f"/console/subscriptions/{sub['uuid']}")
    # what a forged form would look like: the same post without the token
    await c.page.evaluate("document.querySelectorAll('input[name=csrf]').forEach(e => e.remove())")
    async with c.page.expect_response(lambda r: r.request.method == "POST") as info:
        await c.page.click("#rotate")
    assert (await info.value).status == 403
    await c.shot("csrf-refused")
    assert "CSRF" in await c.page.locator("#error").inner_text()
    after = await harness.runtime.store.get_subscription(ORG, sub["uuid"])
    assert key is not None and after is not None and after.signing_key == key.signing_key


async def test_another_organizations_delivery_is_not_reachable(
    harness: Harness, receiver: Receiver, console: ConsoleFactory
) -> None:
    theirs = harness.token(org=OTHER_ORG)
    sub = await harness.subscribe(theirs, receiver.url)
    await harness.idle()
    views = await harness.runtime.store.list_deliveries(sub["uuid"], None, 1, None)
    c = await console()
    await c.sign_in(harness.token())
    assert await c.goto(f"/console/deliveries/{views[0].id}") == 404
    assert await c.goto(f"/console/subscriptions/{sub['uuid']}") == 404
    await c.shot("other-org-404")


async def test_overview_chart_is_drawn_and_pages_fit_390px(
    harness: Harness, receiver_factory: Callable[..., Awaitable[Receiver]], console: ConsoleFactory
) -> None:
    token = harness.token()
    ok, failing, gone = [await receiver_factory(default=d) for d in (200, 500, 410)]
    subs = [await harness.subscribe(token, r.url) for r in (ok, failing, gone)]
    store = harness.runtime.store

    async def settled() -> bool:
        found = [await store.get_subscription(ORG, s["uuid"]) for s in subs]
        return [s.status if s else None for s in found] == ["ACTIVE", "FAILING", "DISABLED"]

    await wait_until(settled)
    await harness.idle()
    seeded = seed_history(
        harness.config.storage.path, [subs[0]["uuid"], subs[1]["uuid"]], ORG, deliveries=20_000
    )
    admin = harness.token(scopes=("ADMIN",))
    for width, name in ((1280, "overview-wide"), (390, "overview-390")):
        c = await console(width=width, height=900)
        await c.sign_in(admin)
        await c.shot(name)
        figure = c.page.locator("figure.chart").nth(1)  # the 24h chart
        assert int(await figure.get_attribute("data-delivered") or 0) >= seeded.delivered
        assert int(await figure.get_attribute("data-failed") or 0) >= seeded.failed
        path = await c.page.locator("figure.chart path.area.ok").nth(1).get_attribute("d")
        assert path is not None and path.count("L") > 144  # a point every 10 minutes
        assert await c.page.locator("#p99").inner_text() != "—"
        badges = await c.page.locator("table.subs .badge").all_inner_texts()
        assert badges == ["DISABLED", "FAILING", "ACTIVE"]  # the ones needing attention first
        if width == 1280 and os.environ.get("PUSHERD_DOCS_SCREENSHOT") == "1":
            DOCS_PNG.parent.mkdir(exist_ok=True)
            await c.page.screenshot(path=str(DOCS_PNG), full_page=True)
    # every page at phone width: nothing wider than the screen
    delivery = seeded.failed_id
    for path in (
        "/console/",
        "/console/subscriptions",
        f"/console/subscriptions/{subs[0]['uuid']}",
        f"/console/deliveries/{delivery}",
        f"/console/deliveries/{delivery}/retry",
    ):
        assert await c.goto(path) == 200
        overflow: Any = await c.page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        await c.shot("390" + path.replace("/", "_"))
        assert overflow <= 0, f"{path} is {overflow}px wider than a 390px screen"
    assert c.errors == []


async def test_keyboard_alone_reaches_the_pages(
    harness: Harness, receiver: Receiver, console: ConsoleFactory
) -> None:
    token = harness.token()
    await harness.subscribe(token, receiver.url)
    c = await console(width=390)
    await c.sign_in(token)  # typed, then Enter
    await c.page.keyboard.press("Tab")
    assert await c.page.evaluate("document.activeElement.textContent") == "Skip to content"
    for _ in range(20):  # tab on to the Subscriptions link and follow it with Enter
        await c.page.keyboard.press("Tab")
        if await c.page.evaluate("document.activeElement.textContent") == "Subscriptions":
            break
    await c.page.keyboard.press("Enter")
    await c.page.wait_for_url(c.base + "/console/subscriptions")
    await c.shot("keyboard-subscriptions")
