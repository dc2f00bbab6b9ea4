"""The normalized consent event every source parser produces."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

Kind = Literal["opt_out", "opt_in", "do_not_contact"]
Channel = Literal["sms", "email", "call", "whatsapp", "all"]


@dataclass
class ConsentEvent:
    source: str
    source_event_id: str
    kind: Kind
    channel: Channel | None           # None: a channel syncd does not model (kept, never routed)
    occurred_at: datetime
    received_at: datetime
    raw: bytes
    external_lead_id: str | None = None
    phone: str | None = None          # E.164 when it parsed
    phone_raw: str | None = None      # as the source sent it
    email: str | None = None
    reason: str | None = None
    message: str | None = None
    # Source-specific audit extras. ``unmodelled``: {field: raw value} the source sent
    # that syncd does not model (counted by the receiver); ``ignored``: why this
    # event writes no CRM field (a channel syncd does not model).
    details: dict[str, Any] = field(default_factory=dict)
    event_type: str = "consent"       # "consent" or "reflection_result"
    quarantine_reason: str | None = None


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def canonical_hash(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace): a dedupe key for sources
    that send no event id, stable across key order and formatting. A lone surrogate
    (from a JSON escape such as backslash-u-d800) is hashed as its code point, not refused; valid text
    hashes exactly as before."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)
