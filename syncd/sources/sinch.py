"""Sinch Conversation API opt-out / opt-in notifications.

Signature: base64 HMAC-SHA256 over ``body.nonce.timestamp`` (headers
``x-sinch-webhook-signature[-nonce|-timestamp|-algorithm]``); a timestamp more
than ``max_skew_seconds`` (5 min) away from now is a replay and refused.
Accepts the flat notification of the published docs and the callback envelope
``{"opt_out_notification": {...}}`` / ``{"opt_in_notification": {...}}``.

A SUCCEEDED notification is a consent change for that phone on that channel
(routed by phone like LOX24); it is also how the reflector learns that its own
``optouts:register`` request landed. FAILED / UNSPECIFIED results change no
consent: they are kept as reflection results only.

Channels: the Conversation API names many (the official SDK's
``ConversationChannelType``: WHATSAPP, RCS, SMS, MESSENGER, VIBERBM, MMS, INSTAGRAM,
TELEGRAM, KAKAOTALK, KAKAOTALKCHAT, LINE, WECHAT, APPLEBC, and it stays open to new
ones). syncd models WhatsApp and SMS (MMS is the same number's carrier messaging).
A notification for any other channel is kept (answered 200, stored, shown as
``ignored`` by ``status`` and ``export``) but writes no CRM field: an opt-out of
Viber or Messenger is not a WhatsApp or SMS opt-out.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field

from connectors.sinch_signing import (ALGORITHM, HEADER_ALGORITHM, HEADER_NONCE, HEADER_SIGNATURE,
                                      HEADER_TIMESTAMP, timestamp_fresh, verify)
from syncd.events import Channel, ConsentEvent, Kind, canonical_hash
from syncd.phones import to_e164
from syncd.sources.base import BadPayload, HeaderLookup, Ignored, Unauthorized, load_json, source_time, validated

CHANNELS: dict[str, Channel] = {"WHATSAPP": "whatsapp", "SMS": "sms", "MMS": "sms"}
IDENTIFIERS = ("contact_id", "identity", "request_id")


class _Notification(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    contact_id: str | None = Field(default=None, max_length=200)
    channel: str = Field(min_length=1, max_length=40)
    identity: str | None = Field(default=None, max_length=64)
    status: str = Field(min_length=1, max_length=60)
    request_id: str | None = Field(default=None, max_length=200)
    error_details: Any = None


class SinchSource:
    name = "sinch"

    def __init__(self, secret: str, default_region: str = "US", max_skew_seconds: float = 300):
        self._secret = secret
        self.default_region = default_region
        self.max_skew_seconds = max_skew_seconds

    def authenticate(self, body: bytes, headers: HeaderLookup, query: Mapping[str, str]) -> None:
        algorithm = headers.get(HEADER_ALGORITHM)
        if algorithm and algorithm != ALGORITHM:
            raise Unauthorized(f"unsupported {HEADER_ALGORITHM} (expected {ALGORITHM})")
        nonce, stamp = headers.get(HEADER_NONCE), headers.get(HEADER_TIMESTAMP)
        if not verify(self._secret, body, nonce, stamp, headers.get(HEADER_SIGNATURE)):
            raise Unauthorized(f"missing or invalid {HEADER_SIGNATURE}")
        if not timestamp_fresh(stamp, self.max_skew_seconds):
            raise Unauthorized(f"{HEADER_TIMESTAMP} is more than {self.max_skew_seconds:g} s from now")

    def parse(self, body: bytes, received_at: datetime) -> ConsentEvent | Ignored:
        loaded = load_json(body)
        doc = loaded.doc
        kind, inner, path = self._locate(doc)
        if inner is None:
            return Ignored("sinch callback carries no opt-in or opt-out notification")
        if not isinstance(inner, dict):
            raise BadPayload(f"{path or 'body'}: must be an object")
        note = validated(_Notification, inner, (path,) if path else ())
        loaded.require_text("correlation_id", *(f"{path}.{name}" if path else name for name in IDENTIFIERS))
        if kind is None:
            kind = "opt_in" if note.status.startswith("OPT_IN") else "opt_out"
        succeeded = note.status in ("OPT_OUT_SUCCEEDED", "OPT_IN_SUCCEEDED")
        identity = (note.identity or "").strip()
        phone_raw = None
        if identity:
            phone_raw = identity if identity.startswith("+") else "+" + identity
        details: dict[str, Any] = {"status": note.status, "sinch_channel": note.channel,
                                   "contact_id": note.contact_id, "request_id": note.request_id,
                                   "error_details": note.error_details,
                                   "correlation_id": doc.get("correlation_id") if isinstance(
                                       doc.get("correlation_id"), str) else None}
        channel = CHANNELS.get(note.channel.strip().upper())
        if channel is None:
            details["unmodelled"] = {"channel": note.channel}
            if succeeded:  # a failed result changes no consent anyway: it is only reconciled
                details["ignored"] = (f"sinch channel {note.channel!r} is not modelled by syncd: "
                                      "no CRM field is written")
        field = "event_time" if doc.get("event_time") is not None else "accepted_time"
        occurred = source_time(doc.get(field), received_at, details, field)
        return ConsentEvent(
            source=self.name,
            source_event_id=canonical_hash(loaded.original),
            kind=kind,
            channel=channel,
            occurred_at=occurred,
            received_at=received_at,
            raw=body,
            phone=to_e164(phone_raw, self.default_region) if phone_raw else None,
            phone_raw=phone_raw,
            reason=note.status,
            details=details,
            event_type="consent" if succeeded else "reflection_result",
        )

    @staticmethod
    def _locate(doc: dict[str, Any]) -> tuple[Kind | None, Any, str]:
        located: tuple[tuple[str, Kind], ...] = (("opt_out_notification", "opt_out"),
                                                 ("opt_in_notification", "opt_in"))
        for key, kind in located:
            if key in doc:
                return kind, doc[key], key
        if "status" in doc or "channel" in doc:
            return None, doc, ""
        return None, None, ""
