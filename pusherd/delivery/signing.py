"""Request signatures: the Zettle Pusher header and Standard Webhooks (SPEC §6)."""

from __future__ import annotations

import base64
import hmac
from collections.abc import Sequence

__all__ = ["signature_headers", "standard_signature", "zettle_signature"]


def zettle_signature(signing_key: str, timestamp: str, payload: str) -> str:
    """Return the X-iZettle-Signature value: hex HMAC-SHA256 of ``timestamp.payload``."""
    message = f"{timestamp}.{payload}".encode()
    return hmac.digest(signing_key.encode(), message, "sha256").hex()


def standard_signature(key: str, msg_id: str, ts_s: int, body: bytes) -> str:
    """Return one Standard Webhooks signature, ``v1,<base64 HMAC-SHA256>``."""
    # The key is used as raw UTF-8 bytes, not as a "whsec_" base64 secret, so receivers
    # must build their verifier with Webhook(signing_key.encode()).
    message = f"{msg_id}.{ts_s}.".encode() + body
    digest = hmac.digest(key.encode(), message, "sha256")
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_headers(
    *,
    keys: Sequence[str],
    msg_id: str,
    ts_s: int,
    timestamp: str,
    payload: str,
    body: bytes,
) -> dict[str, str]:
    """Return the signature headers for one attempt; ``keys[0]`` is the current key."""
    if not keys:
        raise ValueError("at least one signing key is required")
    # During rotation receivers may still hold the previous key; Standard Webhooks allows
    # several space-separated signatures, the Zettle header carries only the current one.
    return {
        "X-iZettle-Signature": zettle_signature(keys[0], timestamp, payload),
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts_s),
        "webhook-signature": " ".join(standard_signature(k, msg_id, ts_s, body) for k in keys),
    }
