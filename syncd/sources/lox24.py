"""LOX24 ``phone.unsubscribe`` webhooks.

Auth: the shared token in header ``X-LOX24-Token``, compared in constant time.
The query form ``?token=`` is accepted only with ``sources.lox24.allow_query_token``
(weaker: URLs end up in proxy logs and histories). ``id`` is the dedupe key, so LOX24's up to four
delivery attempts change nothing. LOX24 sends no CRM id: the phone routes it.
"""
from __future__ import annotations

import hmac
from datetime import datetime
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field

from syncd.events import ConsentEvent
from syncd.phones import to_e164
from syncd.sources.base import HeaderLookup, Ignored, Unauthorized, clip, load_json, source_time, validated

TOKEN_HEADER = "X-LOX24-Token"
# Identifiers must be text (400 otherwise); every other string is free text, kept
# with non-text code points replaced and cut to a stored length, never refused.
IDENTIFIERS = ("id", "data.phone")
MAX_LABEL, MAX_TEXT, MAX_CODE = 500, 10_000, 200
REASON_IDS = range(1, 7)  # the schema's reason.id: 1 never subscribed ... 6 other


class _Reason(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    id: int | None = None   # documented 1-6; any other is kept and listed as unmodelled
    label: str | None = None


class _AdditionalData(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    reason: _Reason | None = None
    additional_text: str | None = None


class _Data(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    phone: str = Field(min_length=1, max_length=64)
    user_id: int | None = Field(default=None, ge=0, le=2**53)
    created_at: Any = None   # Unix seconds; anything else orders by receipt time (source_time)
    campaign_code: str | None = None
    additional_data: _AdditionalData | None = None
    additional_text: str | None = None
    short_link_code: str | None = None
    unsubscribe_request_id: int | None = Field(default=None, ge=0, le=2**53)
    group_id: int | None = Field(default=None, ge=0, le=2**53)


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    name: str = Field(max_length=100)
    api_version: str | None = None
    created_at: Any = None
    attempt_number: int | None = Field(default=None, ge=0, le=1000)
    attempts_total: int | None = Field(default=None, ge=0, le=1000)  # the example's spelling
    attempt_total: int | None = Field(default=None, ge=0, le=1000)   # the schema's spelling
    data: dict


class Lox24Source:
    name = "lox24"

    def __init__(self, token: str, default_region: str = "US", allow_query_token: bool = False):
        self._token = token.encode("utf-8")
        self.default_region = default_region
        self.allow_query_token = allow_query_token

    def authenticate(self, body: bytes, headers: HeaderLookup, query: Mapping[str, str]) -> None:
        given = headers.get(TOKEN_HEADER) or ""
        if not given and self.allow_query_token:
            given = query.get("token") or ""
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self._token):
            if not given and "token" in query:
                raise Unauthorized(f"missing or invalid {TOKEN_HEADER}; ?token= is off "
                                   "(sources.lox24.allow_query_token)")
            raise Unauthorized(f"missing or invalid {TOKEN_HEADER}")

    def parse(self, body: bytes, received_at: datetime) -> ConsentEvent | Ignored:
        loaded = load_json(body)
        loaded.require_text("id")
        env = validated(_Envelope, loaded.doc)
        if env.name != "phone.unsubscribe":
            return Ignored(f"lox24 event {env.name[:40]!r} carries no consent change")
        data = validated(_Data, env.data, ("data",))
        loaded.require_text(*IDENTIFIERS)
        extra = data.additional_data or _AdditionalData()
        reason = extra.reason or _Reason()
        details: dict[str, Any] = {}
        label = clip(reason.label, MAX_LABEL, "reason_label", details)
        details.update({
            "reason_id": reason.id, "reason_label": label,
            "campaign_code": clip(data.campaign_code, MAX_CODE, "campaign_code", details),
            "short_link_code": clip(data.short_link_code, MAX_CODE, "short_link_code", details),
            "unsubscribe_request_id": data.unsubscribe_request_id,
            "user_id": data.user_id, "group_id": data.group_id,
            "api_version": clip(env.api_version, MAX_CODE, "api_version", details),
            "attempt_number": env.attempt_number,
            "attempts_total": env.attempts_total if env.attempts_total is not None else env.attempt_total,
        })
        if reason.id is not None and reason.id not in REASON_IDS:
            details["unmodelled"] = {"reason.id": str(reason.id)[:40]}
        stamp, field = ((data.created_at, "data.created_at") if data.created_at is not None
                        else (env.created_at, "created_at"))
        occurred = source_time(stamp, received_at, details, field, unix_seconds=True)
        return ConsentEvent(
            source=self.name,
            source_event_id=env.id,
            kind="opt_out",
            channel="sms",
            occurred_at=occurred,
            received_at=received_at,
            raw=body,
            phone=to_e164(data.phone, self.default_region),
            phone_raw=data.phone,
            reason=label,
            message=clip(extra.additional_text or data.additional_text, MAX_TEXT, "additional_text", details),
            details=details,
        )
