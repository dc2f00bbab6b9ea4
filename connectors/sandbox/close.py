"""A Close (close.com) API simulator: leads, contacts, custom fields, search, unsubscribes.

Served under ``/api/v1`` over plain HTTP on 127.0.0.1. It reproduces the parts of
Close that syncd leans on, with Close's own shapes:

* Basic auth with the API key as username and an empty password (401 otherwise).
* ``GET/PUT /lead/{id}/`` and ``/contact/{id}/``; PUT is a partial update taking
  ``custom.<field id>`` keys, validated against the custom field's type, and bumps
  ``date_updated`` (a contact write bumps its lead too). Errors use Close's bodies:
  ``{"error": "..."}`` or ``{"errors": [...], "field-errors": {...}}``.
* ``GET /custom_field/lead/`` and ``/custom_field/contact/`` (``_skip``/``_limit``/``has_more``).
* ``POST /data/search/`` (Advanced Filtering): ``and``/``or``/``object_type``/
  ``field_condition``/``has_related`` queries, ``sort``, ``_fields``, ``_limit`` and an
  opaque ``cursor``. Records that share a sort value keep insertion order, as a real
  search engine gives no id order inside a tie.
* ``POST/GET /unsubscribe/email/`` and ``DELETE /unsubscribe/email/{email}/``.
* Rate limits per endpoint group (https://developer.close.com/api/overview/rate-limits):
  each group has its own fixed window, every response carries that group's
  ``RateLimit: limit=.., remaining=.., reset=..`` and, past the limit, 429 with
  ``Retry-After`` and the (deprecated, 2024-04-24 changelog) ``{"error": {"rate_reset": ..}}``
  body. Close does not publish its groups; the simulator assumes one per (GET or
  write, resource path without ids), from the docs' example (GETs to ``/lead/`` and
  POSTs/PUTs to ``/activity/`` are two groups). See ``rate_group``.

Custom fields are seeded with the names in ``DEFAULT_LEAD_FIELDS`` /
``DEFAULT_CONTACT_FIELDS`` (fixed ids, so mappings and tests can name them).
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import re
import time
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Iterable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from connectors.sandbox.base import Sandbox

_ID_SEGMENT = re.compile(r"^(?:lead|cont|cf|[a-z]{2}cf)_|@")

API_PREFIX = "/api/v1"
DEFAULT_API_KEY = "api_sandboxKey0001.closeSandboxSecret"
MAX_LIMIT = 200

# Close models a consent flag as a one-choice "choices" field ("Yes" or empty) or a
# "checkbox"; both kinds are seeded so the connector's conversion is exercised.
DEFAULT_LEAD_FIELDS: list[dict[str, Any]] = [
    {"id": "cf_smsOptOutLead01", "name": "SMS Opt Out", "type": "choices", "choices": ["Yes"]},
    {"id": "cf_callOptOutLead01", "name": "Call Opt Out", "type": "choices", "choices": ["Yes"]},
    {"id": "cf_waOptOutLead01", "name": "WhatsApp Opt Out", "type": "checkbox"},
    {"id": "cf_dncLead01", "name": "Do Not Contact", "type": "choices", "choices": ["Yes"]},
    {"id": "cf_optReasonLead01", "name": "Opt Out Reason", "type": "text"},
    {"id": "cf_optSourceLead01", "name": "Opt Out Source", "type": "text"},
    {"id": "cf_optAtLead01", "name": "Opt Out At", "type": "datetime"},
]
DEFAULT_CONTACT_FIELDS: list[dict[str, Any]] = [
    {"id": "cf_smsOptOutCont01", "name": "SMS Opt Out", "type": "choices", "choices": ["Yes"]},
    {"id": "cf_callOptOutCont01", "name": "Call Opt Out", "type": "choices", "choices": ["Yes"]},
    {"id": "cf_waOptOutCont01", "name": "WhatsApp Opt Out", "type": "checkbox"},
]

_WRITABLE: dict[str, dict[str, type]] = {
    "lead": {"name": str, "description": str, "url": str, "status_id": str},
    "contact": {"name": str, "title": str, "phones": list, "emails": list},
}
_READ_ONLY = {
    "lead": {"id", "display_name", "status_label", "contacts", "date_created", "date_updated",
             "organization_id", "created_by", "updated_by", "opportunities", "tasks"},
    "contact": {"id", "lead_id", "display_name", "date_created", "date_updated",
                "organization_id", "created_by", "updated_by"},
}
_EMAIL_OK = re.compile(r"^[^\s@]+@[^\s@]+\.[^\s@]+$")
_CHOICE_ERROR = "Select a valid choice. That choice is not one of the available choices."
# Close documents only "400 Bad request" for POST /unsubscribe/email/; the text for an
# address already on the list is not published. This one is assumed; tests replace it.
ALREADY_UNSUBSCRIBED = {"errors": ["This email address is already unsubscribed."], "field-errors": {}}


def rate_group(method: str, path: str) -> str:
    """The simulator's endpoint group of a call: (GET or write, resource path without
    ids), e.g. ``read /lead/``, ``write /lead/``, ``write /data/search/``."""
    kind = "read" if method.upper() == "GET" else "write"
    parts: list[str] = []
    for segment in path.removeprefix(API_PREFIX).strip("/").split("/"):
        if not segment or _ID_SEGMENT.search(segment):
            break
        parts.append(segment)
    return f"{kind} /{'/'.join(parts)}/" if parts else f"{kind} /"


class _GroupWindow:
    """One endpoint group's fixed window."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self.start, self.count = 0.0, 0


class _BadRequest(Exception):
    """Raised inside handlers; becomes Close's 400 ``{"error": ...}`` body."""


def _utc(ts: str) -> datetime:
    dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status=status, headers=headers or {},
                    content_type="application/json")


class CloseSandbox(Sandbox):
    """In-memory Close organisation. Test helpers: ``add_lead``, ``add_contact``,
    ``set_custom``, ``add_custom_field``, ``set_date_updated``, ``set_rate_limit``,
    ``lead``, ``contact``, ``custom_value``; ``throttled`` counts 429s it produced."""

    name = "close"
    https = False

    def __init__(self, api_key: str = DEFAULT_API_KEY, rate_limit: int | None = None,
                 rate_window: float = 1.0, seed_fields: bool = True) -> None:
        self.api_key = api_key
        self.leads: dict[str, dict[str, Any]] = {}
        self.contacts: dict[str, dict[str, Any]] = {}
        self.custom_fields: dict[str, dict[str, dict[str, Any]]] = {"lead": {}, "contact": {}}
        self.unsubscribed: dict[str, dict[str, str]] = {}
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.throttled = 0
        self.throttled_by_group: dict[str, int] = {}
        self.already_unsubscribed_body: dict[str, Any] = ALREADY_UNSUBSCRIBED
        self._group_limits: dict[str, tuple[int | None, float]] = {}
        self._windows: dict[str, _GroupWindow] = {}
        self._last_ts = datetime(2000, 1, 1, tzinfo=timezone.utc)
        self._seed_fields = seed_fields
        self._initial_rate = (rate_limit, rate_window)
        super().__init__()
        self.reset()

    def reset(self) -> None:
        """Back to a fresh organisation (seeded fields only), keeping the server up:
        tests share one server and start each case from a clean state."""
        with self.lock:
            self.leads.clear()
            self.contacts.clear()
            self.unsubscribed.clear()
            self.custom_fields = {"lead": {}, "contact": {}}
            self.faults.clear()
            self.requests.clear()
            self.throttled = 0
            self.throttled_by_group.clear()
            self.already_unsubscribed_body = ALREADY_UNSUBSCRIBED
            self._group_limits.clear()
            self.set_rate_limit(*self._initial_rate)
            if self._seed_fields:
                for meta in DEFAULT_LEAD_FIELDS:
                    self.add_custom_field("lead", **meta)
                for meta in DEFAULT_CONTACT_FIELDS:
                    self.add_custom_field("contact", **meta)

    # --- test helpers -----------------------------------------------------------------
    def now(self) -> str:
        """A strictly increasing UTC stamp, so every write sorts after the previous one."""
        with self.lock:
            dt = datetime.now(timezone.utc)
            if dt <= self._last_ts:
                dt = self._last_ts + timedelta(microseconds=1)
            self._last_ts = dt
            return _iso(dt)

    def add_custom_field(self, obj: str, id: str, name: str, type: str,
                         choices: list[str] | None = None,
                         accepts_multiple_values: bool = False) -> dict[str, Any]:
        stamp = self.now()
        meta: dict[str, Any] = {
            "id": id, "name": name, "type": type, "description": "",
            "accepts_multiple_values": accepts_multiple_values, "editable_with_roles": [],
            "is_shared": False, "organization_id": "orga_sandbox", "created_by": "user_sandbox",
            "updated_by": "user_sandbox", "date_created": stamp, "date_updated": stamp,
        }
        if type == "choices":
            meta["choices"] = list(choices or [])
        with self.lock:
            self.custom_fields[obj][id] = meta
        return meta

    def add_lead(self, id: str, name: str = "", custom: dict[str, Any] | None = None,
                 date_updated: str | None = None, **extra: Any) -> dict[str, Any]:
        stamp = self.now()
        lead = {"id": id, "name": name or id, "display_name": name or id, "description": "",
                "url": None, "status_id": "stat_sandboxPotential", "status_label": "Potential",
                "organization_id": "orga_sandbox", "created_by": "user_sandbox",
                "updated_by": "user_sandbox", "date_created": stamp,
                "date_updated": date_updated or stamp, **extra}
        with self.lock:
            self.leads[id] = lead
            for key, value in (custom or {}).items():
                lead[f"custom.{self._field_id('lead', key)}"] = value
        return self.lead(id)

    def add_contact(self, id: str, lead_id: str, phones: Iterable[str] = (),
                    emails: Iterable[str] = (), name: str = "",
                    custom: dict[str, Any] | None = None) -> dict[str, Any]:
        stamp = self.now()
        with self.lock:
            if lead_id not in self.leads:
                raise KeyError(lead_id)
            contact = {
                "id": id, "lead_id": lead_id, "name": name, "display_name": name, "title": "",
                "phones": [{"phone": p, "phone_formatted": p, "type": "mobile"} for p in phones],
                "emails": [{"email": e, "type": "office",
                            "is_unsubscribed": e.lower() in self.unsubscribed} for e in emails],
                "organization_id": "orga_sandbox", "date_created": stamp, "date_updated": stamp,
            }
            for key, value in (custom or {}).items():
                contact[f"custom.{self._field_id('contact', key)}"] = value
            self.contacts[id] = contact
            self.leads[lead_id]["date_updated"] = stamp
        return self.contact(id)

    def set_custom(self, record_id: str, field: str, value: Any,
                   date_updated: str | None = None) -> None:
        """An admin's edit in the Close UI: sets a custom field (by name or id), bumps
        ``date_updated``. ``None`` clears the field, as Close does."""
        with self.lock:
            obj, record = self._record(record_id)
            key = f"custom.{self._field_id(obj, field)}"
            if value is None:
                record.pop(key, None)
            else:
                record[key] = value
            self._touch(obj, record, date_updated)

    def set_date_updated(self, record_id: str, stamp: str) -> None:
        with self.lock:
            self._record(record_id)[1]["date_updated"] = stamp

    def set_rate_limit(self, limit: int | None, window: float = 1.0, group: str | None = None) -> None:
        """Limit every endpoint group to ``limit`` calls per ``window`` seconds (each
        group counted on its own), or only ``group`` (see ``rate_group``)."""
        with self.lock:
            if group is None:
                self.rate_limit, self.rate_window = limit, window
                self._group_limits.clear()
                self._windows.clear()
            else:
                self._group_limits[group] = (limit, window)
                self._windows.pop(group, None)

    def lead(self, lead_id: str) -> dict[str, Any]:
        with self.lock:
            return self._render_lead(self.leads[lead_id])

    def contact(self, contact_id: str) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.contacts[contact_id])

    def custom_value(self, record_id: str, field: str) -> Any:
        with self.lock:
            obj, record = self._record(record_id)
            return copy.deepcopy(record.get(f"custom.{self._field_id(obj, field)}"))

    # --- internals --------------------------------------------------------------------
    def _record(self, record_id: str) -> tuple[str, dict[str, Any]]:
        if record_id in self.leads:
            return "lead", self.leads[record_id]
        return "contact", self.contacts[record_id]

    def _field_id(self, obj: str, key: str) -> str:
        key = key.removeprefix("custom.")
        if key in self.custom_fields[obj]:
            return key
        for meta in self.custom_fields[obj].values():
            if meta["name"] == key:
                return meta["id"]
        raise KeyError(f"no {obj} custom field {key!r}")

    def _touch(self, obj: str, record: dict[str, Any], stamp: str | None = None) -> None:
        stamp = stamp or self.now()
        record["date_updated"] = stamp
        if obj == "contact" and record["lead_id"] in self.leads:
            self.leads[record["lead_id"]]["date_updated"] = stamp

    def _render_lead(self, lead: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(lead)
        out["contacts"] = [copy.deepcopy(c) for c in self.contacts.values() if c["lead_id"] == lead["id"]]
        return out

    def _window(self, group: str) -> _GroupWindow | None:
        limit, window = self._group_limits.get(group, (self.rate_limit, self.rate_window))
        if limit is None:
            return None
        w = self._windows.get(group)
        if w is None or (w.limit, w.window) != (limit, window):
            w = self._windows[group] = _GroupWindow(limit, window)
        return w

    def _rate_check(self, group: str) -> Response | None:
        """Fixed window per API key and endpoint group; the 429 mirrors Close's."""
        with self.lock:
            w = self._window(group)
            if w is None:
                return None
            now = time.monotonic()
            if now - w.start >= w.window:
                w.start, w.count = now, 0
            w.count += 1
            if w.count <= w.limit:
                return None
            self.throttled += 1
            self.throttled_by_group[group] = self.throttled_by_group.get(group, 0) + 1
            reset = max(0.0, w.start + w.window - now)
        body = {"error": {
            "rate_reset": round(reset, 3), "rate_limit": w.limit,
            "rate_window": w.window, "rate_limit_type": "key",
            "message": f"API call count exceeded for this {w.window:g} second window"}}
        return _json(body, 429, {"Retry-After": str(max(1, math.ceil(reset)))})

    def _rate_header(self, group: str) -> str:
        with self.lock:
            w = self._window(group)
            if w is None:
                return "limit=1000, remaining=999, reset=1"
            now = time.monotonic()
            if now - w.start >= w.window:
                return f"limit={w.limit}, remaining={w.limit}, reset={w.window:g}"
            remaining = max(0, w.limit - w.count)
            reset = max(0.0, w.start + w.window - now)
            return f"limit={w.limit}, remaining={remaining}, reset={reset:.3f}"

    def _validate_custom(self, meta: dict[str, Any], value: Any) -> str | None:
        """Close's per-type validation; returns the field error or None."""
        if value is None:
            return None
        kind = meta["type"]
        if kind == "choices":
            values = value if meta.get("accepts_multiple_values") and isinstance(value, list) else [value]
            ok = all(isinstance(v, str) and v in meta.get("choices", []) for v in values)
            return None if ok else _CHOICE_ERROR
        if kind == "checkbox":
            return None if isinstance(value, bool) else "Must be a boolean."
        if kind == "number":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            return None if ok else "Enter a number."
        if kind == "date":
            try:
                date.fromisoformat(value)
                return None
            except (TypeError, ValueError):
                return "Enter a valid date."
        if kind == "datetime":
            try:
                _utc(value)
                return None
            except (TypeError, ValueError, AttributeError):
                return "Enter a valid date/time."
        return None if isinstance(value, str) else "Not a valid string."

    def _apply_put(self, obj: str, record: dict[str, Any], body: Any) -> Response:
        if not isinstance(body, dict):
            return _json({"error": "Invalid JSON body: expected an object."}, 400)
        field_errors: dict[str, str] = {}
        changes: dict[str, Any] = {}
        for key, value in body.items():
            if key.startswith("custom."):
                field_id = key[len("custom."):]
                meta = self.custom_fields[obj].get(field_id)
                if meta is None:
                    field_errors[key] = "Unknown custom field."
                    continue
                problem = self._validate_custom(meta, value)
                if problem:
                    field_errors[key] = problem
                else:
                    changes[key] = value
            elif key in _WRITABLE[obj]:
                if value is not None and not isinstance(value, _WRITABLE[obj][key]):
                    field_errors[key] = "Invalid value."
                else:
                    changes[key] = value
            elif key in _READ_ONLY[obj]:
                continue  # Close ignores read-only keys sent back from a GET
            else:
                field_errors[key] = "Unknown field."
        if field_errors:
            return _json({"errors": [], "field-errors": field_errors}, 400)
        for key, value in changes.items():
            if key == "phones":
                value = [{"phone": p.get("phone"), "phone_formatted": p.get("phone"),
                          "type": p.get("type", "mobile")} for p in value if isinstance(p, dict)]
            elif key == "emails":
                value = [{"email": e.get("email"), "type": e.get("type", "office"),
                          "is_unsubscribed": str(e.get("email", "")).lower() in self.unsubscribed}
                         for e in value if isinstance(e, dict)]
            if key.startswith("custom.") and value is None:
                record.pop(key, None)
            else:
                record[key] = value
        self._touch(obj, record)
        rendered = self._render_lead(record) if obj == "lead" else copy.deepcopy(record)
        return _json(rendered)

    # --- Advanced Filtering -----------------------------------------------------------
    def _related(self, obj_type: str, obj: dict[str, Any], related: str) -> list[tuple[str, dict[str, Any]]]:
        if obj_type == "lead":
            contacts = [c for c in self.contacts.values() if c["lead_id"] == obj["id"]]
        elif obj_type == "contact":
            contacts = [obj]
        else:
            contacts = []
        if related == "contact" and obj_type == "lead":
            return [("contact", c) for c in contacts]
        if related == "lead" and obj_type == "contact":
            lead = self.leads.get(obj["lead_id"])
            return [("lead", lead)] if lead else []
        if related == "contact_phone":
            return [("contact_phone", p) for c in contacts for p in c.get("phones", [])]
        if related == "contact_email":
            return [("contact_email", e) for c in contacts for e in c.get("emails", [])]
        raise _BadRequest(f"Unsupported related_object_type for {obj_type}: {related}")

    def _field_values(self, field: Any, obj_type: str, obj: dict[str, Any]) -> list[Any]:
        if not isinstance(field, dict):
            raise _BadRequest("field must be an object")
        if field.get("type") == "regular_field":
            if field.get("object_type") != obj_type:
                return []
            value = obj.get(str(field.get("field_name")))
        elif field.get("type") == "custom_field":
            value = obj.get(f"custom.{field.get('custom_field_id')}")
        else:
            raise _BadRequest(f"Unsupported field type: {field.get('type')}")
        return value if isinstance(value, list) else [value]

    @staticmethod
    def _moment(spec: Any, which_default: str) -> datetime:
        if isinstance(spec, str):
            return _utc(spec)
        if not isinstance(spec, dict):
            raise _BadRequest("moment must be an object")
        if spec.get("type") == "fixed_utc":
            return _utc(str(spec.get("value")))
        if spec.get("type") == "fixed_local_date":
            day = date.fromisoformat(str(spec.get("value")))
            start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
            return start + timedelta(days=1) if spec.get("which", which_default) == "end" else start
        raise _BadRequest(f"Unsupported moment type: {spec.get('type')}")

    def _condition(self, cond: Any, value: Any) -> bool:
        if not isinstance(cond, dict):
            raise _BadRequest("condition must be an object")
        kind = cond.get("type")
        if kind == "exists":
            return value not in (None, "", [])
        if value is None:
            return False
        if kind == "text":
            want = str(cond.get("value", ""))
            if cond.get("mode") == "exact_value":
                return str(value) == want
            return want.lower() in str(value).lower()
        if kind == "term":
            return value in (cond.get("values") or [])
        if kind == "number_range":
            ok = True
            for op, test in (("gte", float.__ge__), ("gt", float.__gt__),
                             ("lte", float.__le__), ("lt", float.__lt__)):
                if cond.get(op) is not None:
                    ok = ok and test(float(value), float(cond[op]))
            return ok
        if kind == "moment_range":
            try:
                when = _utc(str(value))
                bounds = [("on_or_after", "start", datetime.__ge__), ("after", "end", datetime.__ge__),
                          ("before", "start", datetime.__lt__), ("on_or_before", "end", datetime.__lt__),
                          ("gte", "start", datetime.__ge__), ("gt", "start", datetime.__gt__),
                          ("lt", "start", datetime.__lt__), ("lte", "start", datetime.__le__)]
                return all(test(when, self._moment(cond[op], which)) for op, which, test in bounds
                           if cond.get(op) is not None)
            except ValueError as exc:
                raise _BadRequest(f"Invalid date in moment_range: {exc}") from None
        raise _BadRequest(f"Unsupported condition type: {kind}")

    def _match(self, query: Any, obj_type: str, obj: dict[str, Any]) -> bool:
        if not isinstance(query, dict):
            raise _BadRequest("query must be an object")
        kind = query.get("type")
        if kind == "and":
            result = all(self._match(q, obj_type, obj) for q in query.get("queries", []))
        elif kind == "or":
            result = any(self._match(q, obj_type, obj) for q in query.get("queries", []))
        elif kind == "match_all":
            result = True
        elif kind == "object_type":
            result = query.get("object_type") == obj_type
        elif kind == "field_condition":
            values = self._field_values(query.get("field"), obj_type, obj)
            result = any(self._condition(query.get("condition"), v) for v in values)
        elif kind == "has_related":
            if query.get("this_object_type", obj_type) != obj_type:
                return False
            related_type = str(query.get("related_object_type"))
            result = any(self._match(query.get("related_query", {"type": "match_all"}), t, r)
                         for t, r in self._related(obj_type, obj, related_type))
        else:
            raise _BadRequest(f"Unsupported query type: {kind}")
        return not result if query.get("negate") else result

    def _search(self, body: Any) -> Response:
        if not isinstance(body, dict) or not isinstance(body.get("query"), dict):
            raise _BadRequest("The 'query' field is required.")
        limit = body.get("_limit", 100)
        if not isinstance(limit, int) or limit < 1 or limit > MAX_LIMIT:
            return _json({"errors": [], "field-errors": {"_limit": f"Must be between 1 and {MAX_LIMIT}."}}, 400)
        with self.lock:
            pool = [("lead", self._render_lead(lead)) for lead in self.leads.values()]
            pool += [("contact", copy.deepcopy(c)) for c in self.contacts.values()]
            hits = [(t, o) for t, o in pool if self._match(body["query"], t, o)]
        for spec in reversed(body.get("sort") or []):
            field = spec.get("field", {}) if isinstance(spec, dict) else {}
            name = str(field.get("field_name") or "")

            def key(item: tuple[str, dict[str, Any]], name: str = name) -> tuple[int, Any]:
                value = item[1].get(name)
                if value is None:
                    return (0, "")
                return (1, _utc(value) if name.startswith("date_") else value)
            hits.sort(key=key, reverse=spec.get("direction") == "desc")
        if isinstance(body.get("results_limit"), int):
            hits = hits[:body["results_limit"]]
        digest = hashlib.sha256(json.dumps([body.get("query"), body.get("sort")],
                                           sort_keys=True).encode()).hexdigest()[:16]
        offset = 0
        if body.get("cursor"):
            try:
                state = json.loads(base64.urlsafe_b64decode(str(body["cursor"]).encode()))
                offset = int(state["o"])
                if state["q"] != digest:
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                return _json({"errors": [], "field-errors": {"cursor": "Invalid cursor."}}, 400)
        page = hits[offset:offset + limit]
        more = offset + limit < len(hits)
        cursor = base64.urlsafe_b64encode(json.dumps({"o": offset + limit, "q": digest}).encode()).decode() \
            if more else None
        wanted = body.get("_fields") or {}
        data = [self._project(o, wanted.get(t)) for t, o in page]
        return _json({"data": data, "cursor": cursor})

    @staticmethod
    def _project(obj: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
        if not fields:
            return obj
        out = {k: v for k, v in obj.items() if k in fields}
        if "custom" in fields:
            out.update({k: v for k, v in obj.items() if k.startswith("custom.")})
        return out

    # --- routes -----------------------------------------------------------------------
    def routes(self, app: Flask) -> None:
        p = API_PREFIX

        # Basic auth, API key as username (every endpoint page's "Authentication", e.g.
        # https://developer.close.com/api/resources/leads/update); limits per endpoint group
        # (https://developer.close.com/api/overview/rate-limits). The 401 text is not documented: assumed.
        @app.before_request
        def _auth_and_rate() -> Response | None:
            auth = request.authorization
            if auth is None or auth.type != "basic" or auth.username != self.api_key or auth.password:
                return _json({"error": "The API key you provided is invalid."}, 401,
                             {"WWW-Authenticate": 'Basic realm="Close API"'})
            return self._rate_check(rate_group(request.method, request.path))

        @app.after_request
        def _rate_header(resp: Response) -> Response:
            resp.headers.setdefault("RateLimit", self._rate_header(rate_group(request.method, request.path)))
            return resp

        @app.errorhandler(HTTPException)
        def _http_error(exc: HTTPException) -> Response:
            return _json({"error": exc.description or exc.name}, exc.code or 500)

        @app.errorhandler(_BadRequest)
        def _bad(exc: _BadRequest) -> Response:
            return _json({"error": str(exc)}, 400)

        def paged(items: list[dict[str, Any]]) -> Response:
            try:
                skip = int(request.args.get("_skip", 0))
                limit = int(request.args.get("_limit", 100))
            except ValueError:
                raise _BadRequest("_skip and _limit must be integers") from None
            if limit < 1 or limit > MAX_LIMIT or skip < 0:
                raise _BadRequest(f"_limit must be between 1 and {MAX_LIMIT}")
            fields = request.args.get("_fields")
            page = [self._project(i, fields.split(",") if fields else None)
                    for i in items[skip:skip + limit]]
            return _json({"has_more": skip + limit < len(items), "total_results": len(items),
                          "data": page})

        def one(kind: str, record_id: str, fetch: Callable[[str], dict[str, Any]]) -> Response:
            # ``_fields`` limits the answer to the listed keys (``custom`` = every custom
            # field): https://developer.close.com/api/resources/leads.md and
            # https://developer.close.com/api/overview/fields
            fields = request.args.get("_fields")
            try:
                return _json(self._project(fetch(record_id), fields.split(",") if fields else None))
            except KeyError:
                return _json({"error": f"Empty query: {kind} matching query does not exist."}, 404)

        # https://developer.close.com/api/resources/leads/list (?query= is deprecated; search instead)
        @app.get(f"{p}/lead/")
        def list_leads() -> Response:
            if request.args.get("query"):
                raise _BadRequest("The sandbox supports POST /data/search/ instead of ?query=")
            with self.lock:
                return paged([self._render_lead(lead) for lead in self.leads.values()])

        # https://developer.close.com/api/resources/leads/get; the 404 text is not documented: assumed
        @app.get(f"{p}/lead/<lead_id>/")
        def get_lead(lead_id: str) -> Response:
            return one("Lead", lead_id, self.lead)

        # https://developer.close.com/api/resources/leads/update (PUT acts as PATCH, custom.<id>: null clears)
        @app.put(f"{p}/lead/<lead_id>/")
        def put_lead(lead_id: str) -> Response:
            with self.lock:
                lead = self.leads.get(lead_id)
                if lead is None:
                    return _json({"error": "Empty query: Lead matching query does not exist."}, 404)
                return self._apply_put("lead", lead, request.get_json(silent=True))

        # https://developer.close.com/api/resources/contacts/list, .../get, .../update;
        # emails[].is_unsubscribed from the 2024-02-15 changelog (https://developer.close.com/api/overview/changelog/2024/2/15)
        @app.get(f"{p}/contact/")
        def list_contacts() -> Response:
            lead_id = request.args.get("lead_id")
            with self.lock:
                return paged([copy.deepcopy(c) for c in self.contacts.values()
                              if lead_id is None or c["lead_id"] == lead_id])

        @app.get(f"{p}/contact/<contact_id>/")
        def get_contact(contact_id: str) -> Response:
            return one("Contact", contact_id, self.contact)

        @app.put(f"{p}/contact/<contact_id>/")
        def put_contact(contact_id: str) -> Response:
            with self.lock:
                contact = self.contacts.get(contact_id)
                if contact is None:
                    return _json({"error": "Empty query: Contact matching query does not exist."}, 404)
                return self._apply_put("contact", contact, request.get_json(silent=True))

        # https://developer.close.com/resources/custom-fields/ (lead and contact custom fields)
        @app.get(f"{p}/custom_field/<obj>/")
        def list_custom_fields(obj: str) -> Response:
            if obj not in self.custom_fields:
                return _json({"error": "Not found."}, 404)
            with self.lock:
                return paged([copy.deepcopy(m) for m in self.custom_fields[obj].values()])

        @app.get(f"{p}/custom_field/<obj>/<field_id>/")
        def get_custom_field(obj: str, field_id: str) -> Response:
            with self.lock:
                meta = self.custom_fields.get(obj, {}).get(field_id)
            if meta is None:
                return _json({"error": "Empty query: CustomField matching query does not exist."}, 404)
            return _json(copy.deepcopy(meta))

        # https://developer.close.com/resources/advanced-filtering/ (queries and, or,
        # object_type, field_condition, has_related; _fields, _limit, cursor). Lookups by
        # contact_phone / contact_email with text exact_value conditions follow Close's
        # own closeio/close-api-scripts scripts/CloseApiWrapper.py (build_contact_email_query,
        # value lower-cased; search pages of _limit 200 by cursor).
        @app.post(f"{p}/data/search/")
        def search() -> Response:
            return self._search(request.get_json(silent=True))

        # https://developer.close.com/api/resources/unsubscribed-emails/list, .../create
        # (201; the 400 for an address already listed and its text are assumed, not
        # documented), .../delete (404 if not listed)
        @app.get(f"{p}/unsubscribe/email/")
        def list_unsubscribed() -> Response:
            with self.lock:
                return paged([dict(v) for v in self.unsubscribed.values()])

        @app.post(f"{p}/unsubscribe/email/")
        def unsubscribe() -> Response:
            body = request.get_json(silent=True)
            email = body.get("email") if isinstance(body, dict) else None
            if not isinstance(email, str) or not _EMAIL_OK.match(email):
                return _json({"errors": [], "field-errors": {"email": "Enter a valid email address."}}, 400)
            with self.lock:
                if email.lower() in self.unsubscribed:
                    return _json(self.already_unsubscribed_body, 400)
                self.unsubscribed[email.lower()] = {"email": email, "date_created": self.now()}
                self._flag_emails(email, True)
            return _json({"email": email}, 201)

        @app.delete(f"{p}/unsubscribe/email/<path:email>/")
        def resubscribe(email: str) -> Response:
            with self.lock:
                if self.unsubscribed.pop(email.lower(), None) is None:
                    return _json({"error": "Empty query: UnsubscribedEmail matching query does not exist."}, 404)
                self._flag_emails(email, False)
            return _json({})

    def _flag_emails(self, email: str, unsubscribed: bool) -> None:
        for contact in self.contacts.values():
            for entry in contact.get("emails", []):
                if str(entry.get("email", "")).lower() == email.lower():
                    entry["is_unsubscribed"] = unsubscribed
