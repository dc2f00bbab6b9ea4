"""Apten ``optOut`` and ``doNotContact`` webhooks.

Signature: header ``X-Signature-SHA256`` = hex HMAC-SHA256 of the raw body.
Apten sends no event id, so the dedupe key is the hash of the canonical body:
a retried delivery of the same event hashes the same.

Apten documents no retry, so an authentic, well-formed opt-out is never refused for
a value syncd does not model: ``channel`` ``manual`` (documented on
https://docs.apten.ai/webhooks/overview) or one never seen is kept with its raw value
and treated as ``all``, the conservative reading of an opt-out; an ``optOutReason``
outside the documented four is kept as sent. Both are listed in
``details["unmodelled"]`` (counted in a metric, shown by ``export``).
"""
from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict

from syncd.events import Channel, ConsentEvent, Kind, canonical_hash
from syncd.phones import to_e164
from syncd.sources.base import HeaderLookup, Ignored, Unauthorized, clip, load_json, source_time, validated

SIGNATURE_HEADER = "X-Signature-SHA256"
CONSENT_EVENTS = ("optOut", "doNotContact")
# https://docs.apten.ai/webhooks/opt-out: sms, email, call. ``whatsapp`` is not in
# Apten's docs; syncd has accepted it since its first release and keeps doing so.
# ``manual`` (webhooks overview) names no channel syncd can write: it reads as ``all``.
CHANNELS: dict[str, Channel] = {"sms": "sms", "email": "email", "call": "call", "whatsapp": "whatsapp"}
REASONS = ("MANUAL", "COMPLAINT", "BOUNCE", "UNSUBSCRIBE_LINK")  # the opt-out page's list
IDENTIFIERS = ("data.leadId", "data.externalLeadId", "data.phone", "data.email")
MAX_LABEL, MAX_MESSAGE = 500, 10_000


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    event: str
    timestamp: Any = None     # ISO 8601 documented; anything else orders by receipt time (source_time)
    data: dict


class _OptOutData(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    leadId: str | None = None
    externalLeadId: str | None = None
    phone: str | None = None
    email: str | None = None
    # Apten's first payloads were SMS-only and carried no channel; null is unknown.
    channel: str | None = "sms"
    optOutReason: str | None = None
    isTwilioOptOut: bool | None = None
    optOutMessage: str | None = None
    isDoNotContact: bool | None = None


class _DoNotContactData(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    leadId: str | None = None
    externalLeadId: str | None = None
    phone: str | None = None
    email: str | None = None
    optOutMessage: str | None = None


def sign(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class AptenSource:
    name = "apten"

    def __init__(self, secret: str, default_region: str = "US"):
        # The keyed HMAC state, built once and copied per webhook (no key set-up per request).
        self._keyed = hmac.new(secret.encode("utf-8"), digestmod=hashlib.sha256)
        self.default_region = default_region

    def authenticate(self, body: bytes, headers: HeaderLookup, query: Mapping[str, str]) -> None:
        given = headers.get(SIGNATURE_HEADER) or ""
        mac = self._keyed.copy()
        mac.update(body)
        expected = mac.hexdigest()
        if not hmac.compare_digest(given.strip().lower().encode("ascii", "replace"), expected.encode("ascii")):
            raise Unauthorized(f"missing or invalid {SIGNATURE_HEADER}")

    def parse(self, body: bytes, received_at: datetime) -> ConsentEvent | Ignored:
        loaded = load_json(body)
        doc = loaded.doc
        env = validated(_Envelope, doc)
        if env.event not in CONSENT_EVENTS:
            return Ignored(f"apten event {env.event[:40]!r} carries no consent change")
        data: _OptOutData | _DoNotContactData
        if env.event == "optOut":
            data = validated(_OptOutData, env.data, ("data",))
        else:
            data = validated(_DoNotContactData, env.data, ("data",))
        loaded.require_text(*IDENTIFIERS)
        details: dict[str, Any] = {"apten_event": env.event, "lead_id": data.leadId}
        occurred = source_time(env.timestamp, received_at, details, "timestamp")
        kind: Kind
        channel: Channel
        if isinstance(data, _OptOutData):
            kind = "opt_out"
            channel = self._channel(data.channel, details)
            reason = self._reason(data.optOutReason, details)
            details.update(is_twilio_opt_out=data.isTwilioOptOut, is_do_not_contact=data.isDoNotContact)
        else:
            kind, channel, reason = "do_not_contact", "all", "DO_NOT_CONTACT"
        phone_raw = data.phone or None
        return ConsentEvent(
            source=self.name,
            source_event_id=canonical_hash(loaded.original),
            kind=kind,
            channel=channel,
            occurred_at=occurred,
            received_at=received_at,
            raw=body,
            external_lead_id=(data.externalLeadId or "").strip() or None,
            phone=to_e164(phone_raw, self.default_region),
            phone_raw=phone_raw,
            email=(data.email or "").strip() or None,  # doNotContact carries it: the email channel's address
            reason=reason,
            message=clip(data.optOutMessage, MAX_MESSAGE, "optOutMessage", details),
            details=details,
        )

    @staticmethod
    def _channel(raw: str | None, details: dict[str, Any]) -> Channel:
        """The channel syncd writes: a documented one, else ``all`` with the raw value kept."""
        shown = "null" if raw is None else raw[:100]
        details["raw_channel"] = shown
        channel = CHANNELS.get((raw or "").strip().lower())
        if channel is None:
            details.setdefault("unmodelled", {})["channel"] = shown
            return "all"
        return channel

    @staticmethod
    def _reason(raw: str | None, details: dict[str, Any]) -> str | None:
        reason = clip(raw, MAX_LABEL, "optOutReason", details)
        if reason is not None and reason not in REASONS:
            details.setdefault("unmodelled", {})["optOutReason"] = reason[:100]
        return reason
