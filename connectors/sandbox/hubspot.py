"""HubSpot simulator: CRM v3 contacts (batch update, batch read, read, patch,
search), contact property metadata, the v4 communication-preferences API, the
rolling ten-second rate limit and the per-account search limit, close enough
that the real ``hubspot-api-client`` talks to it unchanged with ``host`` set to
:attr:`HubSpotSandbox.url`. The legacy v3 communication-preferences paths are
not served (syncd no longer calls them). Every route names the HubSpot page it
follows; connectors/sandbox/SOURCES.md lists them with what is assumed.

Shapes follow HubSpot's documented answers: batch updates answer 200 when every
input landed and 207 with grouped ``errors`` (``context.ids``) otherwise; search
is filter groups (OR) of filters (AND), one sort, offset cursors in
``paging.next.after`` and a hard cap on how deep a query may page (10,000).
State is in memory; helpers at the bottom let tests arrange and inspect it.
"""
from __future__ import annotations

import fnmatch
import hmac
import json
import re
import time
import uuid
from urllib.parse import unquote
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import phonenumbers
from flask import Flask, Response, request

from connectors.sandbox.base import Sandbox

BATCH_LIMIT = 100
SEARCH_PAGE_LIMIT = 200
SEARCH_CAP = 10_000
# Filter limits: 5 groups, 10 filters a group, 25 in all (HubSpot developer changelog,
# "Breaking Change: Expanded Filtering Capabilities and Error Messaging in HubSpot's
# Search API", from 2024-08-26); the 400 text below is assumed.
MAX_FILTER_GROUPS = 5
MAX_FILTERS_PER_GROUP = 10
MAX_FILTERS = 25
SEARCH_LIMIT_PER_SECOND = 5   # "about 5 requests per second per account" for CRM search
STATUS_STATES = ("SUBSCRIBED", "UNSUBSCRIBED", "NOT_SPECIFIED")
SEARCH_PATH = "/crm/v3/objects/contacts/search"
LEGAL_BASES = ("LEGITIMATE_INTEREST_PQL", "LEGITIMATE_INTEREST_CLIENT", "PERFORMANCE_OF_CONTRACT",
               "CONSENT_WITH_NOTICE", "NON_GDPR", "PROCESS_AND_STORE", "LEGITIMATE_INTEREST_OTHER")
DEFAULT_SEARCH_PROPERTIES = ("createdate", "email", "firstname", "hs_object_id", "lastmodifieddate",
                             "lastname")
ALWAYS_RETURNED = ("createdate", "hs_object_id", "lastmodifieddate")
# Properties HubSpot derives from phone/mobilephone: the number's digits without the
# country code, so a search matches however the number was typed.
CALCULATED = {"hs_searchable_calculated_phone_number": "phone",
              "hs_searchable_calculated_mobile_number": "mobilephone"}


def iso_ms(ms: int) -> str:
    """HubSpot's datetime property format: ISO 8601, millisecond precision, Z."""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{ms % 1000:03d}Z"


def to_ms(value: str) -> int | None:
    """A datetime property or filter value (epoch ms or ISO 8601) as epoch ms."""
    value = (value or "").strip()
    if not value:
        return None
    if re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(round(when.timestamp() * 1000))


def searchable_digits(raw: str | None) -> str | None:
    """The national significant number of a stored phone, as HubSpot indexes it."""
    if not raw:
        return None
    if raw.strip().startswith("+"):
        try:
            return str(phonenumbers.parse(raw, None).national_number)
        except phonenumbers.NumberParseException:
            pass
    digits = re.sub(r"\D", "", raw).lstrip("0")
    return digits or None


@dataclass
class PropertyDef:
    name: str
    type: str = "string"               # string | number | bool | enumeration | datetime | date
    label: str = ""
    field_type: str = "text"
    read_only: bool = False
    hubspot_defined: bool = True
    calculated: bool = False
    group: str = "contactinformation"
    options: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, stamp: str) -> dict[str, Any]:
        return {
            "name": self.name, "label": self.label or self.name, "type": self.type,
            "fieldType": self.field_type, "description": "", "groupName": self.group,
            "options": self.options, "displayOrder": -1, "calculated": self.calculated,
            "externalOptions": False, "hasUniqueValue": self.name == "email",
            "hidden": False, "hubspotDefined": self.hubspot_defined, "formField": not self.read_only,
            "createdAt": stamp, "updatedAt": stamp, "archived": False,
            "modificationMetadata": {"archivable": not self.hubspot_defined,
                                     "readOnlyDefinition": self.hubspot_defined,
                                     "readOnlyValue": self.read_only},
        }


def _bool_options() -> list[dict[str, Any]]:
    return [{"label": "Yes", "value": "true", "displayOrder": 0, "hidden": False},
            {"label": "No", "value": "false", "displayOrder": 1, "hidden": False}]


def _default_properties() -> dict[str, PropertyDef]:
    defs = [
        PropertyDef("email", label="Email"),
        PropertyDef("hs_additional_emails", label="Additional email addresses", read_only=True),
        PropertyDef("firstname", label="First Name"),
        PropertyDef("lastname", label="Last Name"),
        PropertyDef("phone", label="Phone Number", field_type="phonenumber"),
        PropertyDef("mobilephone", label="Mobile Phone Number", field_type="phonenumber"),
        PropertyDef("lifecyclestage", type="enumeration", label="Lifecycle Stage", field_type="radio",
                    options=[{"label": v.title(), "value": v, "displayOrder": i, "hidden": False}
                             for i, v in enumerate(("subscriber", "lead", "customer"))]),
        PropertyDef("hs_object_id", type="number", label="Record ID", field_type="number",
                    read_only=True),
        PropertyDef("createdate", type="datetime", label="Create Date", field_type="date",
                    read_only=True),
        PropertyDef("lastmodifieddate", type="datetime", label="Last Modified Date",
                    field_type="date", read_only=True),
        PropertyDef("hs_lastmodifieddate", type="datetime", label="Object last modified date/time",
                    field_type="date", read_only=True),
        PropertyDef("hs_email_optout", type="bool", label="Unsubscribed from all email",
                    field_type="booleancheckbox", read_only=True, options=_bool_options()),
        PropertyDef("hs_searchable_calculated_phone_number", label="Calculated Phone Number",
                    read_only=True, calculated=True),
        PropertyDef("hs_searchable_calculated_mobile_number", label="Calculated Mobile Number",
                    read_only=True, calculated=True),
    ]
    for name, label in (("sms_opt_out", "SMS opt-out"), ("call_opt_out", "Call opt-out"),
                        ("whatsapp_opt_out", "WhatsApp opt-out")):
        defs.append(PropertyDef(name, type="bool", label=label, field_type="booleancheckbox",
                                hubspot_defined=False, group="syncd", options=_bool_options()))
    return {d.name: d for d in defs}


@dataclass
class Subscription:
    id: str
    name: str
    description: str = ""
    is_default: bool = False


class HubSpotError(Exception):
    """Raised inside a handler to answer with HubSpot's error body."""

    def __init__(self, status: int, category: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.category, self.message, self.extra = status, category, message, extra


def _invalid(errors: list[dict[str, str]]) -> str:
    """HubSpot's wording for property validation failures (a JSON list in the message)."""
    return "Property values were not valid: " + json.dumps(
        [{"isValid": False, "message": e["message"], "error": e["error"], "name": e["name"],
          "localizedErrorMessage": e["message"]} for e in errors], separators=(",", ":"))


class HubSpotSandbox(Sandbox):
    """HubSpot CRM v3 + communication preferences over plain HTTP on 127.0.0.1."""

    name = "hubspot"
    https = False

    def __init__(self, token: str = "pat-sandbox-0000", *, rate_limit_max: int = 10_000,
                 rate_limit_interval_ms: int = 10_000, search_cap: int = SEARCH_CAP,
                 search_limit_per_second: int = SEARCH_LIMIT_PER_SECOND) -> None:
        self.token = token
        self.search_limit_per_second = search_limit_per_second
        self.rate_limit_max = rate_limit_max
        self.rate_limit_interval_ms = rate_limit_interval_ms
        self.search_cap = search_cap
        self.clock: Callable[[], float] = time.time
        self.unique_stamps = True  # every write gets a distinct ms stamp unless a test wants ties
        super().__init__()
        self._reset_state()

    def _reset_state(self) -> None:
        self.contacts: dict[str, dict[str, str]] = {}
        self.created: dict[str, int] = {}
        self.properties = _default_properties()
        self.subscriptions: dict[str, Subscription] = {}
        self.statuses: dict[tuple[str, str], dict[str, Any]] = {}
        self.unsubscribed_all: dict[str, str] = {}  # address -> when it opted out of all email
        self.unsubscribes: list[dict[str, Any]] = []  # subscriptionId None: unsubscribe-all
        self.rate_limited: list[float] = []  # when each 429 was answered
        self.search_rate_limited: list[float] = []  # when each search 429 was answered
        self.subscribes: list[dict[str, Any]] = []
        self._window: deque[float] = deque()
        self._search_window: deque[float] = deque()
        self._last_ms = 0
        self._next_id = 1000
        self.add_subscription("1001", "Marketing Information", "Marketing offers and updates.",
                              default=True)
        self.add_subscription("1002", "One to One", "One to one emails.")

    # --- helpers for tests ------------------------------------------------------------
    def reset(self) -> None:
        """Forget all state, requests and faults; restore the default limits."""
        with self.lock:
            self._reset_state()
            self.rate_limit_max, self.rate_limit_interval_ms = 10_000, 10_000
            self.search_cap = SEARCH_CAP
            self.search_limit_per_second = SEARCH_LIMIT_PER_SECOND
            self.clock, self.unique_stamps = time.time, True
            self.faults.clear()
            self.requests.clear()

    def set_rate_limit(self, max_requests: int, interval_ms: int = 10_000) -> None:
        """A rolling window of ``max_requests`` per ``interval_ms`` (starts empty)."""
        with self.lock:
            self.rate_limit_max, self.rate_limit_interval_ms = max_requests, interval_ms
            self._window.clear()

    def add_contact(self, id: str | int | None = None, **props: Any) -> str:
        """Create a contact (values are stored as HubSpot strings); returns its id."""
        with self.lock:
            if id is None:
                self._next_id += 1
                id = self._next_id
            cid = str(id)
            ms = self._stamp()
            self.created[cid] = ms
            self.contacts[cid] = {"hs_object_id": cid, "createdate": iso_ms(ms)}
            self._write(cid, {k: self._str(v) for k, v in props.items()}, ms)
            return cid

    def get_contact(self, id: str | int) -> dict[str, str] | None:
        """A copy of the contact's stored properties (None when it does not exist)."""
        with self.lock:
            props = self.contacts.get(str(id))
            return dict(props) if props is not None else None

    def set_property(self, id: str | int, name: str, value: Any) -> None:
        """An admin edit in the HubSpot UI: bypasses validation, bumps the stamps."""
        with self.lock:
            self._write(str(id), {name: self._str(value)}, self._stamp())

    def add_property(self, name: str, type: str = "string", *, label: str = "",
                     read_only: bool = False, field_type: str | None = None) -> None:
        with self.lock:
            self.properties[name] = PropertyDef(
                name, type=type, label=label, read_only=read_only, hubspot_defined=False,
                field_type=field_type or ("booleancheckbox" if type == "bool" else "text"),
                options=_bool_options() if type == "bool" else [])

    def add_subscription(self, id: str, name: str, description: str = "",
                         default: bool = False) -> None:
        with self.lock:
            self.subscriptions[str(id)] = Subscription(str(id), name, description, default)
            self.properties[f"hs_email_optout_{id}"] = PropertyDef(
                f"hs_email_optout_{id}", type="enumeration", label=f"Opted out of email: {name}",
                field_type="select", read_only=True)

    def email_status(self, email: str, subscription_id: str) -> str | None:
        """SUBSCRIBED / UNSUBSCRIBED when the address has an explicit status, else None."""
        with self.lock:
            entry = self.statuses.get((email.strip().lower(), str(subscription_id)))
            return entry["status"] if entry else None

    def set_email_status(self, email: str, subscription_id: str, status: str) -> None:
        with self.lock:
            self.statuses[(email.strip().lower(), str(subscription_id))] = {
                "status": status, "legalBasis": None, "legalBasisExplanation": None,
                "timestamp": iso_ms(int(self.clock() * 1000))}

    def is_unsubscribed_from_all(self, email: str) -> bool:
        with self.lock:
            return email.strip().lower() in self.unsubscribed_all

    def set_unsubscribed_from_all(self, email: str) -> None:
        with self.lock:
            self.unsubscribed_all[email.strip().lower()] = iso_ms(int(self.clock() * 1000))

    # --- state internals ----------------------------------------------------------------
    @staticmethod
    def _str(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    def _stamp(self) -> int:
        ms = int(self.clock() * 1000)
        if self.unique_stamps:
            ms = max(ms, self._last_ms + 1)
        self._last_ms = max(self._last_ms, ms)
        return ms

    def _write(self, cid: str, props: dict[str, str], ms: int) -> None:
        contact = self.contacts[cid]
        contact.update(props)
        contact["lastmodifieddate"] = contact["hs_lastmodifieddate"] = iso_ms(ms)

    def _value(self, contact: dict[str, str], name: str) -> str | None:
        if name in CALCULATED:
            return searchable_digits(contact.get(CALCULATED[name]))
        value = contact.get(name)
        return value if value not in (None, "") else None

    def _object(self, cid: str, names: list[str] | tuple[str, ...]) -> dict[str, Any]:
        contact = self.contacts[cid]
        return {"id": cid, "properties": {n: self._value(contact, n) for n in names},
                "createdAt": iso_ms(self.created[cid]), "updatedAt": contact["lastmodifieddate"],
                "archived": False}

    def _check_properties(self, props: Any) -> list[dict[str, str]]:
        """Validation errors for one input's properties (empty when it may be written)."""
        if not isinstance(props, dict):
            raise HubSpotError(400, "VALIDATION_ERROR", "Invalid input JSON: properties must be an object")
        errors = []
        for name, value in props.items():
            prop = self.properties.get(name)
            if prop is None:
                errors.append({"name": name, "error": "PROPERTY_DOESNT_EXIST",
                               "message": f'Property "{name}" does not exist'})
            elif prop.read_only:
                errors.append({"name": name, "error": "READ_ONLY_VALUE",
                               "message": f'"{name}" is a read only property; its value cannot be set.'})
            elif prop.type == "bool" and self._str(value) not in ("true", "false", ""):
                errors.append({"name": name, "error": "INVALID_OPTION",
                               "message": f'"{value}" was not one of the allowed options: [true, false]'})
        return errors

    # --- rate limit ---------------------------------------------------------------------
    def _admit(self) -> bool:
        """Count this request in the rolling window; False when the window is full."""
        return self._take(self._window, self.rate_limit_max, self.rate_limit_interval_ms / 1000)

    def _admit_search(self) -> bool:
        """The separate per-account search limit: a rolling second."""
        return self._take(self._search_window, self.search_limit_per_second, 1.0)

    @staticmethod
    def _take(window: deque[float], limit: int, seconds: float) -> bool:
        now = time.monotonic()
        while window and window[0] <= now - seconds:
            window.popleft()
        if len(window) >= limit:
            return False
        window.append(now)
        return True

    # --- app ----------------------------------------------------------------------------
    def routes(self, app: Flask) -> None:
        app.wsgi_app = _KeepEncodedSubscriber(app.wsgi_app)  # type: ignore[method-assign]
        def error(status: int, category: str, message: str, **extra: Any) -> Response:
            body = {"status": "error", "message": message, "correlationId": str(uuid.uuid4()),
                    "category": category, **extra}
            return Response(json.dumps(body), status=status, content_type="application/json")

        def ok(body: Any, status: int = 200) -> Response:
            return Response(json.dumps(body), status=status, content_type="application/json")

        def body_json() -> dict[str, Any]:
            data = request.get_json(silent=True)
            if not isinstance(data, dict):
                raise HubSpotError(400, "VALIDATION_ERROR",
                                   "Invalid input JSON: the request body must be a JSON object")
            return data

        @app.errorhandler(HubSpotError)
        def _hubspot_error(exc: HubSpotError):
            return error(exc.status, exc.category, exc.message, **exc.extra)

        @app.errorhandler(404)
        def _not_found(_exc):
            return error(404, "OBJECT_NOT_FOUND", "resource not found")

        @app.errorhandler(405)
        def _not_allowed(_exc):
            return error(405, "VALIDATION_ERROR", "HTTP method not allowed for this resource")

        def rate_limit(message: str, policy: str) -> Response:
            # HubSpot's 429 body (developers.hubspot.com/docs/api/usage-details: status, message,
            # errorType RATE_LIMIT, correlationId, policyName, requestId).
            return Response(json.dumps({
                "status": "error", "message": message, "errorType": "RATE_LIMIT",
                "correlationId": str(uuid.uuid4()), "policyName": policy,
                "requestId": str(uuid.uuid4())}), status=429, content_type="application/json")

        @app.before_request
        def _auth_and_limit():
            header = request.headers.get("Authorization", "")
            if not hmac.compare_digest(header.encode(), f"Bearer {self.token}".encode()):
                # The 401 text HubSpot sends for a missing/invalid token (observed wording,
                # not on a reference page; the category is documented).
                return error(401, "INVALID_AUTHENTICATION",
                             "Authentication credentials not found. This API supports OAuth 2.0 "
                             "authentication and you can find more details at "
                             "https://developers.hubspot.com/docs/methods/auth/oauth-overview")
            with self.lock:
                admitted = self._admit()
                search_ok = request.path != SEARCH_PATH or not admitted or self._admit_search()
            if not admitted:
                self.rate_limited.append(time.time())
                return rate_limit("You have reached your ten_secondly_rolling limit.",
                                  "TEN_SECONDLY_ROLLING")
            if not search_ok:
                self.search_rate_limited.append(time.time())
                return rate_limit("You have reached your secondly limit.", "SECONDLY")
            return None

        @app.after_request
        def _rate_headers(resp: Response) -> Response:
            if request.path == SEARCH_PATH:
                return resp  # the search endpoints send no X-HubSpot-RateLimit-* headers
            with self.lock:
                remaining = max(0, self.rate_limit_max - len(self._window))
                limits = {"X-HubSpot-RateLimit-Max": str(self.rate_limit_max),
                          "X-HubSpot-RateLimit-Remaining": str(remaining),
                          "X-HubSpot-RateLimit-Interval-Milliseconds": str(self.rate_limit_interval_ms),
                          "X-HubSpot-RateLimit-Daily": "1000000",
                          "X-HubSpot-RateLimit-Daily-Remaining": "999999"}
            for name, value in limits.items():
                resp.headers.setdefault(name, value)  # an injected fault's own headers win
            return resp

        # --- contacts -----------------------------------------------------------------
        # developers.hubspot.com/docs/api-reference/legacy/crm/objects/contacts/batch/update-contacts
        # (SDK: hubspot/crm/contacts/api/batch_api.py BatchApi.update; 200, or 207 with errors)
        @app.post("/crm/v3/objects/contacts/batch/update")
        def batch_update() -> Response:
            inputs = body_json().get("inputs")
            if not isinstance(inputs, list):
                raise HubSpotError(400, "VALIDATION_ERROR",
                                   "Invalid input JSON: some of required attributes are not set [inputs]")
            if len(inputs) > BATCH_LIMIT:
                raise HubSpotError(400, "VALIDATION_ERROR",
                                   f"Batch input size {len(inputs)} exceeds the limit of {BATCH_LIMIT}")
            ids = [str(i.get("id", "")) if isinstance(i, dict) else "" for i in inputs]
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            if dupes:
                raise HubSpotError(400, "VALIDATION_ERROR",
                                   f"Duplicate IDs found in batch input: {dupes}. IDs must be unique")
            if any(isinstance(i, dict) and i.get("idProperty") not in (None, "hs_object_id")
                   for i in inputs):
                raise HubSpotError(400, "VALIDATION_ERROR", "the sandbox updates by record id only")
            started = iso_ms(int(self.clock() * 1000))
            results, missing = [], []
            invalid: dict[str, list[str]] = {}
            with self.lock:
                for item, cid in zip(inputs, ids):
                    props = item.get("properties") or {}
                    if cid not in self.contacts:
                        missing.append(cid)
                        continue
                    problems = self._check_properties(props)
                    if problems:
                        invalid.setdefault(_invalid(problems), []).append(cid)
                        continue
                    self._write(cid, {k: self._str(v) for k, v in props.items()}, self._stamp())
                    results.append(self._object(cid, sorted(set(props) | set(ALWAYS_RETURNED))))
            body: dict[str, Any] = {"status": "COMPLETE", "results": results, "startedAt": started,
                                    "completedAt": iso_ms(int(self.clock() * 1000))}
            errors = []
            if missing:
                errors.append({"status": "error", "category": "OBJECT_NOT_FOUND",
                               "message": "Could not get some CONTACT objects, they may be deleted "
                                          "or not exist. Check that ids are valid.",
                               "context": {"ids": missing}, "errors": [], "links": {}})
            for message, bad in invalid.items():
                errors.append({"status": "error", "category": "VALIDATION_ERROR", "message": message,
                               "context": {"ids": bad}, "errors": [], "links": {}})
            if errors:
                body.update(numErrors=len(errors), errors=errors)
                return ok(body, 207)
            return ok(body)

        # developers.hubspot.com/docs/api/crm/contacts (batch read, <= 100 inputs)
        # (SDK: hubspot/crm/contacts/api/batch_api.py BatchApi.read; 200, or 207 with errors)
        @app.post("/crm/v3/objects/contacts/batch/read")
        def batch_read() -> Response:
            body = body_json()
            inputs = body.get("inputs")
            if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
                raise HubSpotError(400, "VALIDATION_ERROR",
                                   "Invalid input JSON: some of required attributes are not set [inputs]")
            if len(inputs) > BATCH_LIMIT:
                raise HubSpotError(400, "VALIDATION_ERROR",
                                   f"Batch input size {len(inputs)} exceeds the limit of {BATCH_LIMIT}")
            if body.get("idProperty") not in (None, "hs_object_id"):
                raise HubSpotError(400, "VALIDATION_ERROR", "the sandbox reads by record id only")
            names = list(dict.fromkeys(list(body.get("properties") or DEFAULT_SEARCH_PROPERTIES)
                                       + list(ALWAYS_RETURNED)))
            started = iso_ms(int(self.clock() * 1000))
            with self.lock:
                ids = list(dict.fromkeys(str(i.get("id", "")) for i in inputs))
                results = [self._object(cid, names) for cid in ids if cid in self.contacts]
                missing = [cid for cid in ids if cid not in self.contacts]
            out: dict[str, Any] = {"status": "COMPLETE", "results": results, "startedAt": started,
                                   "completedAt": iso_ms(int(self.clock() * 1000))}
            if missing:
                out.update(numErrors=1, errors=[{
                    "status": "error", "category": "OBJECT_NOT_FOUND",
                    "message": "Could not get some CONTACT objects, they may be deleted or not exist. "
                               "Check that ids are valid.", "context": {"ids": missing},
                    "errors": [], "links": {}}])
                return ok(out, 207)
            return ok(out)

        # developers.hubspot.com/docs-beta/crm/search (filters, sorts, paging, 10,000-result
        # cap, per-account request limit; no rate-limit headers on search answers)
        @app.post("/crm/v3/objects/contacts/search")
        def search():
            return ok(self._search(body_json()))

        # SDK: hubspot/crm/contacts/api/basic_api.py (get_by_id / update); syncd itself no
        # longer reads or patches single contacts, tests use these routes.
        @app.get("/crm/v3/objects/contacts/<cid>")
        def get_contact(cid: str):
            names = [n for n in request.args.get("properties", "").split(",") if n]
            with self.lock:
                if cid not in self.contacts:
                    return error(404, "OBJECT_NOT_FOUND", "Object not found.  objectId are usually "
                                 "numeric.", context={"id": [cid]})
                return ok(self._object(cid, names or DEFAULT_SEARCH_PROPERTIES))

        @app.patch("/crm/v3/objects/contacts/<cid>")
        def patch_contact(cid: str):
            props = body_json().get("properties") or {}
            with self.lock:
                if cid not in self.contacts:
                    return error(404, "OBJECT_NOT_FOUND", "Object not found.  objectId are usually "
                                 "numeric.", context={"id": [cid]})
                problems = self._check_properties(props)
                if problems:
                    return error(400, "VALIDATION_ERROR", _invalid(problems))
                self._write(cid, {k: self._str(v) for k, v in props.items()}, self._stamp())
                return ok(self._object(cid, sorted(set(props) | set(ALWAYS_RETURNED))))

        # --- properties -----------------------------------------------------------------
        def _object_type(object_type: str) -> None:
            if object_type not in ("contacts", "contact", "0-1"):
                raise HubSpotError(400, "VALIDATION_ERROR",
                                   f"Unable to infer object type from: {object_type}")

        # SDK: hubspot/crm/properties/api/core_api.py CoreApi.get_all / get_by_name
        # (modificationMetadata.readOnlyValue marks hs_email_optout read-only)
        @app.get("/crm/v3/properties/<object_type>")
        def list_properties(object_type: str):
            _object_type(object_type)
            stamp = iso_ms(0)
            with self.lock:
                return ok({"results": [p.to_json(stamp) for p in self.properties.values()]})

        @app.get("/crm/v3/properties/<object_type>/<name>")
        def get_property(object_type: str, name: str):
            _object_type(object_type)
            with self.lock:
                prop = self.properties.get(name)
                if prop is None:
                    return error(404, "OBJECT_NOT_FOUND", f"Unable to find property {name}")
                return ok(prop.to_json(iso_ms(0)))

        # --- communication preferences v4 -------------------------------------------------
        # developers.hubspot.com/docs/api-reference/communication-preferences-subscriptions-v4/
        #   subscription-status/get-communication-preferences-v4-statuses-subscriberIdString
        #   subscription-status/post-communication-preferences-v4-statuses-subscriberIdString
        #   subscription-status/get-communication-preferences-v4-statuses-subscriberIdString-unsubscribe-all
        #   subscription-status/post-communication-preferences-v4-statuses-subscriberIdString-unsubscribe-all
        # One <path:> route per method; the unsubscribe-all suffix is split off by hand, so
        # a local part holding "/" (sent as %2F) still names its own subscriber.
        # developers.hubspot.com/docs/guides/api/marketing/subscriptions ("Get all subscription
        # types": GET /communication-preferences/v4/definitions, the types in ``results``)
        @app.get("/communication-preferences/v4/definitions")
        def definitions():
            stamp = iso_ms(0)
            with self.lock:
                subs = list(self.subscriptions.values())
            return ok({"results": [
                {"id": s.id, "name": s.name, "description": s.description, "purpose": "Marketing",
                 "communicationMethod": "Email", "isActive": True, "isDefault": s.is_default,
                 "isInternal": False, "businessUnitId": 0, "createdAt": stamp, "updatedAt": stamp}
                for s in subs]})

        @app.get("/communication-preferences/v4/statuses/<path:subscriber>")
        def get_statuses(subscriber: str):
            email, wide = self._subscriber(subscriber)
            self._channel_query(required=True)
            with self.lock:
                if wide:
                    return ok(self._batch_answer(self._wide_results(email)))
                return ok(self._batch_answer(
                    [self._status_json(email, sub) for sub in self.subscriptions.values()]))

        @app.post("/communication-preferences/v4/statuses/<path:subscriber>")
        def post_statuses(subscriber: str):
            email, wide = self._subscriber(subscriber)
            if wide:
                self._channel_query(required=True)
                return ok(self._unsubscribe_all(email, request.args.get("verbose") == "true"))
            return ok(self._set_status(email, body_json()))

    # --- communication preferences internals -----------------------------------------
    @staticmethod
    def _subscriber(subscriber: str) -> tuple[str, bool]:
        """(address, is the unsubscribe-all resource) from the path tail."""
        wide = subscriber.endswith("/unsubscribe-all")
        email = request.environ.get(_KeepEncodedSubscriber.KEY) or \
            (subscriber[: -len("/unsubscribe-all")] if wide else subscriber)
        if not re.fullmatch(r"[^@\s]+@[^@\s/]+\.[^@\s/]+", email):
            # HubSpot documents a 400 but not its text; this wording is assumed.
            raise HubSpotError(400, "VALIDATION_ERROR", f"Invalid email address: {email}")
        return email.strip().lower(), wide

    @staticmethod
    def _channel_query(required: bool) -> None:
        channel = request.args.get("channel")
        if (channel is None and required) or (channel is not None and channel != "EMAIL"):
            raise HubSpotError(400, "VALIDATION_ERROR",
                               "channel is required and the only supported channel is EMAIL")

    def _batch_answer(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        stamp = iso_ms(int(self.clock() * 1000))
        return {"status": "COMPLETE", "results": results, "requestedAt": stamp,
                "startedAt": stamp, "completedAt": stamp}

    def _status_json(self, email: str, sub: Subscription) -> dict[str, Any]:
        entry = self.statuses.get((email, sub.id)) or {}
        out = {"channel": "EMAIL", "subscriberIdString": email, "subscriptionId": int(sub.id),
               "subscriptionName": sub.name, "status": entry.get("status", "NOT_SPECIFIED"),
               "source": "syncd-sandbox", "businessUnitId": 0,
               "legalBasis": entry.get("legalBasis"),
               "legalBasisExplanation": entry.get("legalBasisExplanation"),
               "timestamp": entry.get("timestamp") or iso_ms(0)}
        if "reason" in entry:
            out["setStatusSuccessReason"] = entry["reason"]
        return out

    def _wide_results(self, email: str) -> list[dict[str, Any]]:
        """Empty unless the address opted out of all email (as HubSpot documents)."""
        when = self.unsubscribed_all.get(email)
        if when is None:
            return []
        return [{"channel": "EMAIL", "subscriberIdString": email, "wideStatusType": "PORTAL_WIDE",
                 "status": "UNSUBSCRIBED", "businessUnitId": 0, "timestamp": when}]

    def _set_status(self, email: str, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("channel") != "EMAIL":
            raise HubSpotError(400, "VALIDATION_ERROR",
                               "channel is required and the only supported channel is EMAIL")
        state = body.get("statusState")
        if state not in STATUS_STATES:
            raise HubSpotError(400, "VALIDATION_ERROR",
                               f"statusState must be one of {', '.join(STATUS_STATES)}")
        legal_basis = body.get("legalBasis")
        if legal_basis is not None and legal_basis not in LEGAL_BASES:
            raise HubSpotError(400, "VALIDATION_ERROR", f"Invalid legalBasis: {legal_basis}")
        sub_id = body.get("subscriptionId")
        if isinstance(sub_id, bool) or not isinstance(sub_id, (int, str)) \
                or not str(sub_id).isdigit():
            raise HubSpotError(400, "VALIDATION_ERROR", "subscriptionId must be an integer")
        sub_id = str(int(sub_id))
        with self.lock:
            sub = self.subscriptions.get(sub_id)
            if sub is None:  # the status and text HubSpot uses here are not documented
                raise HubSpotError(400, "VALIDATION_ERROR", f"Invalid subscription id {sub_id}")
            key = (email, sub_id)
            current = (self.statuses.get(key) or {}).get("status", "NOT_SPECIFIED")
            reason = "NO_STATUS_CHANGE" if current == state else (
                "RESUBSCRIBE_OCCURRED" if state == "SUBSCRIBED" and current == "UNSUBSCRIBED"
                else "REQUESTED_CHANGE_OCCURRED")
            self.statuses[key] = {"status": state, "legalBasis": legal_basis,
                                  "legalBasisExplanation": body.get("legalBasisExplanation"),
                                  "timestamp": iso_ms(int(self.clock() * 1000)), "reason": reason}
            record = {"email": email, "subscriptionId": sub_id, "legalBasis": legal_basis,
                      "legalBasisExplanation": body.get("legalBasisExplanation"), "at": time.time()}
            if state == "UNSUBSCRIBED":
                self.unsubscribes.append(record)
            elif state == "SUBSCRIBED":
                self.subscribes.append(record)
            flag = {"UNSUBSCRIBED": "true", "SUBSCRIBED": "false"}.get(state, "")
            self._mark_contacts(email, {f"hs_email_optout_{sub_id}": flag})
            return self._batch_answer([self._status_json(email, sub)])

    def _unsubscribe_all(self, email: str, verbose: bool) -> dict[str, Any]:
        with self.lock:
            if email not in self.unsubscribed_all:
                self.unsubscribed_all[email] = iso_ms(int(self.clock() * 1000))
                self.unsubscribes.append({"email": email, "subscriptionId": None, "legalBasis": None,
                                          "legalBasisExplanation": None, "at": time.time()})
                self._mark_contacts(email, {"hs_email_optout": "true"})
            # Without verbose=true HubSpot documents an empty answer.
            return self._batch_answer(self._wide_results(email) if verbose else [])

    def _mark_contacts(self, email: str, props: dict[str, str]) -> None:
        for cid, contact in self.contacts.items():
            if email in {a.strip().lower() for a in
                         [contact.get("email", ""), *contact.get("hs_additional_emails", "").split(";")]}:
                self._write(cid, props, self._stamp())

    # --- search -----------------------------------------------------------------------
    def _search(self, body: dict[str, Any]) -> dict[str, Any]:
        limit = body.get("limit", 10)
        if not isinstance(limit, int) or limit < 0 or limit > SEARCH_PAGE_LIMIT:
            raise HubSpotError(400, "VALIDATION_ERROR",
                               f"Invalid limit {limit}: must be between 0 and {SEARCH_PAGE_LIMIT}")
        after = body.get("after")
        try:
            offset = int(after) if after not in (None, "") else 0
        except (TypeError, ValueError):
            raise HubSpotError(400, "VALIDATION_ERROR", f"Invalid after value: {after}") from None
        if offset >= self.search_cap:
            raise HubSpotError(400, "VALIDATION_ERROR",
                               f"Search results are limited to {self.search_cap} records; "
                               "narrow the filters instead of paging further")
        groups = body.get("filterGroups") or []
        if len(groups) > MAX_FILTER_GROUPS or \
                any(len(g.get("filters") or []) > MAX_FILTERS_PER_GROUP for g in groups) or \
                sum(len(g.get("filters") or []) for g in groups) > MAX_FILTERS:
            raise HubSpotError(400, "VALIDATION_ERROR",
                               f"Too many filters: at most {MAX_FILTER_GROUPS} filterGroups, "
                               f"{MAX_FILTERS_PER_GROUP} filters per group, {MAX_FILTERS} in total")
        names = list(dict.fromkeys(list(body.get("properties") or DEFAULT_SEARCH_PROPERTIES)
                                   + list(ALWAYS_RETURNED)))
        with self.lock:
            hits = [cid for cid, c in self.contacts.items()
                    if (not groups or any(self._group_matches(c, g) for g in groups))
                    and self._query_matches(c, body.get("query"))]
            hits = self._sorted(hits, body.get("sorts") or [])
            page = [self._object(cid, names) for cid in hits[offset:offset + limit]]
        out: dict[str, Any] = {"total": len(hits), "results": page}
        if offset + limit < len(hits) and limit:
            out["paging"] = {"next": {"after": str(offset + limit),
                                      "link": f"?after={offset + limit}"}}
        return out

    def _query_matches(self, contact: dict[str, str], query: Any) -> bool:
        if not query:
            return True
        needle = str(query).lower()
        return any(needle in (contact.get(n) or "").lower()
                   for n in ("email", "firstname", "lastname", "phone", "mobilephone"))

    def _group_matches(self, contact: dict[str, str], group: dict[str, Any]) -> bool:
        return all(self._filter_matches(contact, f) for f in group.get("filters") or [])

    def _comparable(self, name: str, value: str | None) -> Any:
        prop = self.properties.get(name)
        kind = prop.type if prop else "string"
        if value is None:
            return None
        if kind in ("datetime", "date"):
            return to_ms(value)
        if kind == "number":
            try:
                return float(value)
            except ValueError:
                return None
        return value

    def _filter_matches(self, contact: dict[str, str], flt: dict[str, Any]) -> bool:
        name, op = flt.get("propertyName"), flt.get("operator", "EQ")
        if name not in self.properties:
            raise HubSpotError(400, "VALIDATION_ERROR", f"Property {name!r} does not exist")
        stored = self._value(contact, name)
        if op == "HAS_PROPERTY":
            return stored is not None
        if op == "NOT_HAS_PROPERTY":
            return stored is None
        have = self._comparable(name, stored)
        if op in ("IN", "NOT_IN"):
            # IN: exact match against any of ``values`` (hubspot-api-client 12,
            # hubspot/crm/contacts/models/filter.py: ``values: list[str]``, operators EQ ...
            # IN, NOT_IN ...). How many values one IN takes is not stated in the pages
            # retrieved: the simulator sets no cap. Matching is exact (case-sensitive).
            values = {self._comparable(name, str(v)) for v in flt.get("values") or []}
            return (have in values) == (op == "IN")
        if op in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
            pattern = str(flt.get("value", "")).lower()
            found = any(fnmatch.fnmatchcase(tok, pattern)
                        for tok in re.split(r"[\s@.,;]+", (stored or "").lower()) if tok)
            return found == (op == "CONTAINS_TOKEN")
        want = self._comparable(name, str(flt.get("value", "")))
        if op == "EQ":
            return have == want
        if op == "NEQ":
            return have != want
        if have is None or want is None:
            return False
        if op == "BETWEEN":
            high = self._comparable(name, str(flt.get("highValue", "")))
            return high is not None and want <= have <= high
        compare = {"GT": have > want, "GTE": have >= want, "LT": have < want, "LTE": have <= want}
        if op not in compare:
            raise HubSpotError(400, "VALIDATION_ERROR", f"Unsupported operator {op}")
        return compare[op]

    def _sorted(self, ids: list[str], sorts: list[Any]) -> list[str]:
        ids = sorted(ids, key=int)
        if not sorts:
            return ids
        spec = sorts[0]
        if isinstance(spec, str):
            name, descending = spec.lstrip("-"), spec.startswith("-")
        else:
            name, descending = spec.get("propertyName"), spec.get("direction") == "DESCENDING"
        if name not in self.properties:
            raise HubSpotError(400, "VALIDATION_ERROR", f"Property {name!r} does not exist")

        def key(cid: str) -> tuple[bool, Any, int]:
            value = self._comparable(name, self._value(self.contacts[cid], name))
            return (value is None, value if value is not None else 0, int(cid))
        ordered = sorted(ids, key=key)
        return list(reversed(ordered)) if descending else ordered


__all__ = ["HubSpotSandbox", "iso_ms", "to_ms", "searchable_digits"]



class _KeepEncodedSubscriber:
    """The subscriber (an email address) is one path segment that the client encodes
    whole, so a "/" in it arrives as %2F. The server decodes the path before routing,
    which would split such an address; this takes the address from the path as sent
    (waitress's REQUEST_URI) and hands it to the route in the WSGI environ."""
    PREFIX = "/communication-preferences/v4/statuses/"
    KEY = "sandbox.subscriber"

    def __init__(self, app: Callable[..., Any]):
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        raw = environ.get("REQUEST_URI", "").split("?", 1)[0]
        if raw.startswith(self.PREFIX) and "%2f" in raw.lower():
            tail = raw[len(self.PREFIX):]
            wide = tail.endswith("/unsubscribe-all")
            environ[self.KEY] = unquote(tail[: -len("/unsubscribe-all")] if wide else tail)
            environ["PATH_INFO"] = self.PREFIX + "subscriber" + ("/unsubscribe-all" if wide else "")
        return self.app(environ, start_response)
