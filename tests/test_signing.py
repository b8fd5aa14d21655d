"""Tests for pusherd.delivery.signing against independent verifiers."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest
import standardwebhooks

from pusherd.delivery.signing import signature_headers, standard_signature, zettle_signature

KEY = "Ab3dEfGh1jKlMn0pQrStUvWxYz0123456789abcdefghijklmnopqrstuvwxyzAB"
OLD_KEY = "Zz9yXwVuTsRqPoNmLkJiHgFeDcBa9876543210zyxwvutsrqponmlkjihgfedcba"
MSG_ID = "8d4e1a2c-8f6b-11ef-9a8b-0242ac120002"
TIMESTAMP = "2026-11-22T14:30:00.123Z"
PAYLOAD = json.dumps({"productUuid": "p-1", "name": "Kaffe ☕"})


def _body() -> bytes:
    return json.dumps(
        {
            "organizationUuid": "org-1",
            "messageUuid": MSG_ID,
            "eventName": "ProductCreated",
            "messageId": "m-1",
            "payload": PAYLOAD,
            "timestamp": TIMESTAMP,
        }
    ).encode()


def _zettle_reference(key: str, timestamp: str, payload: str) -> str:
    # Recipe from the Zettle Pusher docs, written out independently of the implementation.
    mac = hmac.new(key.encode("utf-8"), (timestamp + "." + payload).encode("utf-8"), "sha256")
    return mac.hexdigest()


def test_zettle_signature_matches_reference_recipe() -> None:
    sig = zettle_signature(KEY, TIMESTAMP, PAYLOAD)
    assert sig == _zettle_reference(KEY, TIMESTAMP, PAYLOAD)
    assert sig == sig.lower()
    assert len(sig) == 64


def test_zettle_signature_known_vector() -> None:
    expected = hmac.new(b"key", b"ts.payload", hashlib.sha256).hexdigest()
    assert zettle_signature("key", "ts", "payload") == expected


def test_standard_signature_verifies_with_standardwebhooks() -> None:
    ts = int(time.time())
    body = _body()
    headers = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(ts),
        "webhook-signature": standard_signature(KEY, MSG_ID, ts, body),
    }
    assert headers["webhook-signature"].startswith("v1,")
    verified = standardwebhooks.Webhook(KEY.encode()).verify(body, headers)
    assert verified["messageUuid"] == MSG_ID


def test_standard_signature_rejects_tampered_body() -> None:
    ts = int(time.time())
    body = _body()
    headers = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(ts),
        "webhook-signature": standard_signature(KEY, MSG_ID, ts, body),
    }
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(KEY.encode()).verify(body + b" ", headers)


def test_signature_headers_single_key() -> None:
    ts = int(time.time())
    body = _body()
    headers = signature_headers(
        keys=[KEY], msg_id=MSG_ID, ts_s=ts, timestamp=TIMESTAMP, payload=PAYLOAD, body=body
    )
    assert set(headers) == {
        "X-iZettle-Signature",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
    assert headers["X-iZettle-Signature"] == _zettle_reference(KEY, TIMESTAMP, PAYLOAD)
    assert headers["webhook-id"] == MSG_ID
    assert headers["webhook-timestamp"] == str(ts)
    assert " " not in headers["webhook-signature"]
    standardwebhooks.Webhook(KEY.encode()).verify(body, headers)


@pytest.mark.parametrize("verify_key", [KEY, OLD_KEY], ids=["current", "previous"])
def test_signature_headers_rotation(verify_key: str) -> None:
    ts = int(time.time())
    body = _body()
    headers = signature_headers(
        keys=[KEY, OLD_KEY], msg_id=MSG_ID, ts_s=ts, timestamp=TIMESTAMP, payload=PAYLOAD, body=body
    )
    # The Zettle header always uses the new key.
    assert headers["X-iZettle-Signature"] == _zettle_reference(KEY, TIMESTAMP, PAYLOAD)
    sigs = headers["webhook-signature"].split(" ")
    assert sigs == [
        standard_signature(KEY, MSG_ID, ts, body),
        standard_signature(OLD_KEY, MSG_ID, ts, body),
    ]
    standardwebhooks.Webhook(verify_key.encode()).verify(body, headers)


def test_signature_headers_unknown_key_fails() -> None:
    ts = int(time.time())
    body = _body()
    headers = signature_headers(
        keys=[KEY, OLD_KEY], msg_id=MSG_ID, ts_s=ts, timestamp=TIMESTAMP, payload=PAYLOAD, body=body
    )
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(b"some-other-key").verify(body, headers)


def test_signature_headers_requires_a_key() -> None:
    with pytest.raises(ValueError, match="signing key"):
        signature_headers(keys=[], msg_id=MSG_ID, ts_s=0, timestamp="", payload="", body=b"")
