"""End to end: subscribe, emit, the receiver gets a signed envelope."""

from __future__ import annotations

from typing import Any

from tests.conftest import Harness, Receiver


async def test_event_reaches_receiver(harness: Harness, receiver: Receiver) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, receiver.url, ["ProductCreated"])
    await receiver.wait_for(1, "TestMessage")
    answer = await harness.emit("ProductCreated", payload={"productUuid": "p1"})
    assert answer["deliveries"] == 1
    await receiver.wait_for(1, "ProductCreated")
    envelope: dict[str, Any] = receiver.events("ProductCreated")[0]
    assert envelope["payload"] == '{"productUuid":"p1"}'
    assert envelope["messageUuid"] == answer["messageUuid"]
    assert sub["status"] == "ACTIVE"
