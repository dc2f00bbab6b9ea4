"""The consent API on the receiver's public port: a pre-send check ("may I text this
number now?") answered from the consent ledger only, never by a CRM call.

``GET /v1/consent?phone=P&channel=C`` (or ``?email=E&channel=email``) and
``POST /v1/consent`` with ``{"checks": [...]}`` (at most :data:`MAX_CHECKS`), behind
``Authorization: Bearer <api.token>`` (constant-time compare). Bad input is a 400
that names the field; ``allowed`` is false exactly when the state is ``opted_out``.
"""
from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Callable, Mapping

from flask import Flask, Response, request

from syncd.journal.base import Ledger
from syncd.journal.ledger import CHANNELS, PHONE_CHANNELS, Entry, normalize_email
from syncd.phones import MAX_PHONE_LEN, to_e164
from syncd.masking import mask_text
from syncd.lookup_group import LookupGroup

log = logging.getLogger("syncd.consent_api")

MAX_CHECKS = 1000
MAX_EMAIL_LEN = 254


class BadCheck(ValueError):
    """One check cannot be answered: ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _text(value: Any, field: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadCheck(field, "must be a non-empty string")
    if len(value) > limit:
        raise BadCheck(field, f"longer than {limit} characters")
    return value


def _email(value: Any, field: str) -> str:
    email = normalize_email(_text(value, field, MAX_EMAIL_LEN))
    local, at, domain = email.partition("@")
    if not at or not local or "." not in domain or "@" in domain or any(c.isspace() for c in email) \
            or domain.startswith(".") or domain.endswith("."):
        raise BadCheck(field, "is not an email address")
    return email


def parse_check(check: Mapping[str, Any], region: str, prefix: str = "") -> tuple[str, str]:
    """The ledger key (identity, channel) one check asks about, or :class:`BadCheck`."""
    channel = check.get("channel")
    if channel not in CHANNELS:
        raise BadCheck(prefix + "channel", f"must be one of {', '.join(CHANNELS)}")
    phone, email = check.get("phone"), check.get("email")
    if phone is not None and email is not None:
        raise BadCheck(prefix + "phone", "give a phone or an email, not both")
    if email is not None:
        if channel != "email":
            raise BadCheck(prefix + "channel", "an email is checked on channel email")
        return _email(email, prefix + "email"), channel
    if phone is None:
        raise BadCheck(prefix + "phone", "a phone or an email is required")
    e164 = to_e164(_text(phone, prefix + "phone", MAX_PHONE_LEN), region)
    if e164 is None:
        raise BadCheck(prefix + "phone", "is not a phone number")
    if channel not in PHONE_CHANNELS:
        raise BadCheck(prefix + "channel", f"a phone is checked on {', '.join(PHONE_CHANNELS)}")
    return e164, channel


def answer(channel: str, entry: Entry | None) -> dict[str, Any]:
    if entry is None:
        return {"allowed": True, "state": "unknown", "channel": channel, "since": None, "source": None,
                "event_id": None}
    return {"allowed": entry.state != "opted_out", "state": entry.state, "channel": channel,
            "since": entry.since, "source": entry.source, "event_id": entry.event_id}


def _json(doc: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n", status,
                    mimetype="application/json")


def _bad(exc: BadCheck) -> Response:
    return _json({"error": str(exc), "field": exc.field, "status": 400}, 400)


def _unavailable(exc: Exception) -> Response:
    """The ledger cannot be read now: a 503 the caller may retry (its platform's
    fail-closed setting then holds the send), never an answer made up."""
    log.error("consent ledger unavailable", extra={"error": mask_text(repr(exc))})
    return _json({"error": "consent ledger unavailable, please retry", "status": 503}, 503)


def add_consent_api(app: Flask, ledger: Ledger, token: str | None, region: str) -> None:
    """Register the consent routes; without a token the API is off (a JSON 404)."""
    if not token:
        return
    expected = f"Bearer {token}".encode()
    lookups: LookupGroup[tuple[str, str], Entry | None] = LookupGroup(ledger.states_at_once)

    def authorized() -> bool:
        given = request.headers.get("Authorization", "").encode("utf-8", "replace")
        return hmac.compare_digest(given, expected)

    def guarded(view: Callable[[], Response]) -> Callable[[], Response]:
        def wrapper() -> Response:
            if not authorized():
                response = _json({"error": "missing or wrong bearer token", "status": 401}, 401)
                response.headers["WWW-Authenticate"] = 'Bearer realm="syncd consent"'
                return response
            return view()
        wrapper.__name__ = view.__name__
        return wrapper

    @app.get("/v1/consent")
    @guarded
    def consent_get() -> Response:
        try:
            key = parse_check(request.args, region)
        except BadCheck as exc:
            return _bad(exc)
        try:
            entry = lookups.get(key)   # concurrent checks share one read
        except Exception as exc:   # journal locked beyond its timeout, database down
            return _unavailable(exc)
        return _json(answer(key[1], entry))

    @app.post("/v1/consent")
    @guarded
    def consent_post() -> Response:
        try:
            doc = json.loads(request.get_data(cache=False) or b"null")
        except (ValueError, UnicodeDecodeError):
            return _bad(BadCheck("body", "is not JSON"))
        checks = doc.get("checks") if isinstance(doc, dict) else None
        if not isinstance(checks, list):
            return _bad(BadCheck("checks", "must be a list"))
        if len(checks) > MAX_CHECKS:
            return _bad(BadCheck("checks", f"at most {MAX_CHECKS} per request ({len(checks)} given)"))
        keys = []
        try:
            for i, check in enumerate(checks):
                if not isinstance(check, dict):
                    raise BadCheck(f"checks[{i}]", "must be an object")
                keys.append(parse_check(check, region, f"checks[{i}]."))
        except BadCheck as exc:
            return _bad(exc)
        try:
            entries = ledger.states(keys)
        except Exception as exc:
            return _unavailable(exc)
        return _json({"results": [answer(ch, e) for (_, ch), e in zip(keys, entries)]})
