"""Sinch Conversation API callback signatures.

Sinch signs each callback with HMAC-SHA256 over ``raw_body + "." + nonce + "." +
timestamp`` keyed by the webhook secret and sends the base64 digest in
``x-sinch-webhook-signature``. The daemon's receiver verifies with these functions
and the sandbox signs with them, so both sides share one definition of the bytes
that are signed. Freshness of the timestamp is the receiver's policy, not part of
the signature, and lives in :func:`timestamp_fresh`.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import time

HEADER_SIGNATURE = "x-sinch-webhook-signature"
HEADER_NONCE = "x-sinch-webhook-signature-nonce"
HEADER_TIMESTAMP = "x-sinch-webhook-signature-timestamp"
HEADER_ALGORITHM = "x-sinch-webhook-signature-algorithm"
ALGORITHM = "HmacSHA256"


def signed_data(body: bytes, nonce: str, timestamp: str) -> bytes:
    """The exact bytes Sinch signs: the raw body, never a re-serialised one."""
    return b".".join((body, nonce.encode("utf-8"), timestamp.encode("utf-8")))


def sign(secret: str, body: bytes, nonce: str, timestamp: str) -> str:
    """Base64 HMAC-SHA256 of :func:`signed_data`, as sent in ``x-sinch-webhook-signature``."""
    digest = hmac.new(secret.encode("utf-8"), signed_data(body, nonce, timestamp),
                      hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def verify(secret: str, body: bytes, nonce: str | None, timestamp: str | None,
           signature: str | None) -> bool:
    """True when ``signature`` matches; never raises on missing or malformed headers.

    Compared in constant time so a caller cannot learn the digest byte by byte.
    """
    if not secret or not nonce or not timestamp or not signature:
        return False
    expected = sign(secret, body, nonce, timestamp).encode("ascii")
    given = signature.strip().encode("utf-8", "replace")
    return hmac.compare_digest(expected, given)


def signature_headers(secret: str, body: bytes, nonce: str, timestamp: str) -> dict[str, str]:
    """All four headers Sinch sends with a signed callback."""
    return {
        HEADER_SIGNATURE: sign(secret, body, nonce, timestamp),
        HEADER_NONCE: nonce,
        HEADER_TIMESTAMP: timestamp,
        HEADER_ALGORITHM: ALGORITHM,
    }


def timestamp_fresh(timestamp: str | None, max_skew_seconds: float,
                    now: float | None = None) -> bool:
    """True when the epoch-seconds ``timestamp`` is within ``max_skew_seconds`` of now.

    A valid signature on an old body is a replay; receivers refuse it with this.
    """
    if not timestamp:
        return False
    try:
        ts = float(timestamp.strip())
    except ValueError:
        return False
    current = time.time() if now is None else now
    return abs(current - ts) <= max_skew_seconds
