"""Close (close.com) connector: a small typed client on requests + tenacity.

Close has no batch update, so ``update`` sends one ``PUT /lead|contact/{id}/`` per
record. Close takes custom fields only as ``custom.<field id>``; mappings may name a
field by its id (``cf_...``) or by its name, and names are resolved through the custom
field metadata, fetched once per object and cached. Email opt-outs go through Close's
organisation-wide unsubscribe list rather than a field.

Rate limits: Close limits each endpoint group separately and reports the group of the
call in ``RateLimit: limit=.., remaining=.., reset=<seconds>``. The pacer keeps one
window per group (see ``rate_group``), so a spent search window never holds back
lead updates; a 429 is honoured through ``Retry-After`` (else the deprecated body's
``error.rate_reset``, else the header's ``reset``). Pauses too long to block a worker
thread surface as ``RateLimited(retry_after)`` for the journal to schedule.

Lookups use the Advanced Filtering API (``POST /data/search/``, cursor paging): the
``?query=`` parameter of ``GET /lead/`` is deprecated by Close.
"""
from __future__ import annotations

import logging
import math
import re
import threading
import time
from datetime import datetime, timezone
from typing import Any, Iterator
from urllib.parse import quote

import requests

from connectors.errors import (ConnectorError, NotFound, Permanent, RateLimited, Transient)
from connectors.http import (error_for_status, make_session, parse_retry_after, short_retry,
                             wrap_transport_error)
from connectors.plugin import BuildContext, CrmPlugin, IdRule
from connectors.settings import CrmSettings, OutboundUrl, Secret
from connectors.types import (EMAILS_FIELD, ChangedRecord, FieldInfo, FoundRecord, Page, RecordRef, RecordUpdate,
                              UpdateResult, Watermark)

log = logging.getLogger(__name__)

CLOSE_LEAD = re.compile(r"^lead_[A-Za-z0-9]+$")
CLOSE_CONTACT = re.compile(r"^cont_[A-Za-z0-9]+$")
OBJECTS = ("lead", "contact")
UNSUBSCRIBE_FIELD = "@unsubscribe"  # a mapping's name for email consent kept on the unsubscribe list

_CUSTOM_ID = re.compile(r"^[a-z]{0,2}cf_[A-Za-z0-9]+$")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
# Conservative on purpose: the address ends up in a URL path for DELETE.
_EMAIL = re.compile(r"^[^\s@/\\?#%\x00-\x1f\x7f]+@[^\s@/\\?#%\x00-\x1f\x7f]+\.[^\s@/\\?#%\x00-\x1f\x7f]+$")
_MASK_EMAIL = re.compile(r"[^\s@\"',;:<>()]+@[^\s@\"',;:<>()]+\.[A-Za-z]{2,}")
_MASK_PHONE = re.compile(r"(?<![A-Za-z0-9])\+?\(?\d(?:[\s().-]{0,2}\d){6,18}(?![A-Za-z0-9])")
_RATE_PAIR = re.compile(r"([A-Za-z-]+)\s*=\s*([0-9]+(?:\.[0-9]+)?)")
_TRUE_WORDS = {"yes", "true", "1", "y", "on", "opted out", "opt out", "opted-out", "checked"}
_FALSE_WORDS = {"no", "false", "0", "n", "off"}

MAX_PAGE = 200          # Close's largest _limit for lists and searches
# Phones and emails per lookup search. Close documents no cap on a query's size;
# 100 conditions a search is our own choice, not Close's.
LOOKUP_BATCH = 100
METADATA_TTL = 30.0     # a missed field name refetches metadata at most this often
MAX_RESET = 86400.0     # a RateLimit reset beyond a day is an epoch stamp (or nonsense)

_RO, _RW = False, True
BUILTIN_FIELDS: dict[str, dict[str, FieldInfo]] = {
    "lead": {n: FieldInfo(n, t, u, label) for n, t, u, label in (
        ("name", "text", _RW, "Company name"), ("description", "text", _RW, "Description"),
        ("url", "text", _RW, "URL"), ("status_id", "text", _RW, "Status"),
        ("status_label", "text", _RO, "Status label"), ("contacts", "list", _RO, "Contacts"),
        ("phones", "list", _RO, "Phones of the lead's contacts (E.164)"),
        ("date_created", "datetime", _RO, "Created"), ("date_updated", "datetime", _RO, "Updated"))},
    "contact": {n: FieldInfo(n, t, u, label) for n, t, u, label in (
        ("name", "text", _RW, "Name"), ("title", "text", _RW, "Title"),
        ("phones", "list", _RW, "Phones"), ("emails", "list", _RW, "Emails"),
        ("lead_id", "text", _RO, "Lead"), ("date_created", "datetime", _RO, "Created"),
        ("date_updated", "datetime", _RO, "Updated"))},
}


def record_object(record_id: object) -> str:
    """``"lead"`` or ``"contact"`` for a valid Close id, else Permanent.

    ``fullmatch``, not ``match``: ``$`` also matches before a trailing newline, and an
    id is put into a URL path, so nothing but the exact pattern may pass.
    """
    if isinstance(record_id, str):
        if CLOSE_LEAD.fullmatch(record_id):
            return "lead"
        if CLOSE_CONTACT.fullmatch(record_id):
            return "contact"
    raise Permanent("record id is not a Close lead_/cont_ id")


def _usable_email(email: object) -> bool:
    return isinstance(email, str) and len(email) <= 254 and _EMAIL.fullmatch(email) is not None


def _parse_ts(value: str) -> datetime:
    dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


_ID_SEGMENT = re.compile(r"^(?:lead|cont|cf|[a-z]{2}cf)_|@")


def rate_group(method: str, path: str) -> str:
    """The endpoint group a call is paced in: reads or writes of one resource path.

    Close limits "per endpoint group" of URL paths and methods, its example being
    GETs to ``/lead/`` and POSTs/PUTs to ``/activity/`` as two groups, and does not
    publish the groups. So a group here is (GET or write, resource path without
    record ids or addresses): ``read /lead/``, ``write /lead/``, ``write /data/search/``.
    Should Close fold two of these into one group, a 429's reset still applies.
    """
    kind = "read" if method.upper() == "GET" else "write"
    parts: list[str] = []
    for segment in path.strip("/").split("/"):
        if not segment or _ID_SEGMENT.search(segment):
            break
        parts.append(segment)
    return f"{kind} /{'/'.join(parts)}/" if parts else f"{kind} /"


class _Window:
    """What Close last said about one endpoint group's window, minus our calls since."""

    __slots__ = ("limit", "remaining", "resets_at", "length", "inflight", "answered")

    def __init__(self) -> None:
        self.limit: float | None = None
        self.remaining: float | None = None
        self.resets_at = 0.0
        self.length = 0.0
        self.inflight = 0
        self.answered = False  # an answer came back, with or without a RateLimit header


_PROBE_WAIT = 0.05  # while a group's first answer is awaited, others wait this long at most


class _Pacer:
    """Client-side pacing per endpoint group (``RateLimit: limit, remaining, reset``
    describes the group of the call that got it), shared by threads.

    A call takes one of its group's ``remaining`` before it is sent; calls still in
    flight count as spent when an answer is read, and the window only rolls over
    once every window Close has told of has ended. So concurrent callers never
    overrun a window, a spent group waits for its ``reset``, and other groups go on.
    Until a group's first answer is in, one call probes it at a time. A wait longer
    than ``max_wait`` raises RateLimited for the journal to schedule.
    """

    def __init__(self, max_wait: float):
        self.max_wait = max_wait
        self._cond = threading.Condition()
        self._windows: dict[str, _Window] = {}

    def wait(self, group: str) -> None:
        with self._cond:
            while True:
                w = self._windows.setdefault(group, _Window())
                if w.remaining is None and w.inflight and not w.answered:
                    self._cond.wait(_PROBE_WAIT)  # the group's first answer is on its way
                    continue
                delay = self._reserve(w, time.monotonic())
                if delay <= 0:
                    return
                if delay > self.max_wait:
                    raise RateLimited(f"Close rate limit window of {group} is spent", retry_after=delay,
                                      status=None)
                log.info("close: %s window spent, pausing %.2fs", group, delay)
                self._cond.wait(delay)

    @staticmethod
    def _reserve(w: _Window, now: float) -> float:
        """Take a slot in the group's window (0.0) or say how long to wait for one."""
        if now >= w.resets_at and w.remaining is not None:
            # Every window Close told of has ended: a new one, as long as the longest seen.
            w.remaining = None if w.limit is None else w.limit - w.inflight
            w.resets_at = now + w.length
        if w.remaining is None:
            pass  # nothing known (or Close sends no header here): go, and learn
        elif w.remaining <= 0:
            return max(w.resets_at - now, 0.001)
        else:
            w.remaining -= 1
        w.inflight += 1
        return 0.0

    def done(self, group: str, headers: Any) -> None:
        """A call of ``group`` ended; ``headers`` (None: no answer) say where the window is."""
        limit, remaining, reset = _rate_state(headers) if headers is not None else (None, None, None)
        with self._cond:
            w = self._windows.setdefault(group, _Window())
            w.inflight = max(0, w.inflight - 1)
            w.answered = w.answered or headers is not None
            if remaining is not None and reset is not None:
                now = time.monotonic()
                room = remaining - w.inflight  # others in flight may not be counted yet
                w.length = max(w.length, reset)
                if limit is not None:
                    w.limit = limit
                if w.remaining is None or now >= w.resets_at:
                    w.remaining, w.resets_at = room, now + reset
                else:
                    w.remaining = min(w.remaining, room)
                    w.resets_at = max(w.resets_at, now + reset)
            self._cond.notify_all()

    def block(self, group: str, seconds: float) -> None:
        with self._cond:
            w = self._windows.setdefault(group, _Window())
            w.remaining = 0
            w.resets_at = max(w.resets_at, time.monotonic() + seconds)


def _rate_state(headers: Any) -> tuple[float | None, float | None, float | None]:
    """(limit, remaining, reset seconds) from ``RateLimit: limit=, remaining=, reset=``
    or the older split headers Close sent before adopting the IETF draft. Values that
    are not finite non-negative numbers are ignored; ``reset`` is at most a day."""
    pairs: dict[str, float] = {}
    combined = headers.get("RateLimit")
    if combined:
        for key, value in _RATE_PAIR.findall(str(combined)):
            pairs.setdefault(key.lower(), float(value))
    for prefix in ("RateLimit-", "X-RateLimit-", "X-Rate-Limit-"):
        for part in ("limit", "remaining", "reset"):
            raw = headers.get(prefix + part)
            if raw and part not in pairs:
                try:
                    pairs[part] = float(raw)
                except ValueError:
                    pass
    pairs = {k: v for k, v in pairs.items() if math.isfinite(v) and v >= 0}
    reset = pairs.get("reset")
    if reset is not None and reset > MAX_RESET:  # an epoch stamp, not a delta
        reset = min(MAX_RESET, max(0.0, reset - time.time()))
    return pairs.get("limit"), pairs.get("remaining"), reset


def _scrub(text: str, secret: str) -> str:
    """Close echoes submitted values in some messages; keep emails, phones and the key out."""
    if secret and secret in text:
        text = text.replace(secret, "***")
    text = _MASK_EMAIL.sub("***@***", text)
    return _MASK_PHONE.sub("***", text)


def _close_message(resp: requests.Response) -> str:
    """Close's own error text from ``{"error": ...}`` or ``{"errors", "field-errors"}``."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    parts: list[str] = []
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, str):
            parts.append(error)
        elif isinstance(error, dict) and error.get("message"):
            parts.append(str(error["message"]))
        errors = body.get("errors")
        if isinstance(errors, list):
            parts.extend(str(e) for e in errors if e)
        field_errors = body.get("field-errors")
        if isinstance(field_errors, dict):
            parts.extend(f"{k}: {v}" for k, v in field_errors.items())
    if not parts:
        text = (resp.text or "").strip()[:200]
        parts.append(text or f"HTTP {resp.status_code} {resp.reason or ''}".strip())
    return "; ".join(parts)[:1000]


class CloseConnector:
    """``CrmConnector`` for Close. Objects are ``lead`` and ``contact``.

    ``max_pace_wait`` bounds how long one call may block on rate limits (client pacing
    or ``Retry-After``) before raising RateLimited for the caller to schedule.
    ``phone_lookup`` picks what ``find_by_phone`` returns: the leads, the contacts, or both.
    """

    name = "close"

    def __init__(self, base_url: str, api_key: str, ca_bundle: str | None = None,
                 timeout: float = 30.0, *, max_pace_wait: float = 15.0, retry_attempts: int = 3,
                 phone_lookup: tuple[str, ...] = ("lead", "contact")):
        if not re.match(r"^https?://[^/?#]+", base_url or ""):
            raise ValueError("Close base_url must be an http(s) URL")
        if not api_key:
            raise ValueError("Close api_key is empty")
        if not set(phone_lookup) <= set(OBJECTS):
            raise ValueError("phone_lookup may only contain 'lead' and 'contact'")
        self.base_url = base_url.rstrip("/")
        self.phone_lookup = tuple(phone_lookup)
        self._key = api_key
        self._session = make_session(ca_bundle=ca_bundle, timeout=timeout)
        self._session.auth = (api_key, "")  # Close: API key as username, empty password
        self._session.headers["Accept"] = "application/json"
        self._pacer = _Pacer(max_pace_wait)
        self._meta_lock = threading.Lock()
        self._meta: dict[str, tuple[float, dict[str, dict[str, Any]]]] = {}
        self._call = short_retry(attempts=retry_attempts, max_retry_after=max_pace_wait)(self._call_once)

    def __repr__(self) -> str:
        return f"CloseConnector(base_url={self.base_url!r})"

    # --- transport --------------------------------------------------------------------
    def _call_once(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                   json: Any = None) -> Any:
        group = rate_group(method, path)
        self._pacer.wait(group)
        try:
            resp = self._session.request(method, self.base_url + path, params=params, json=json)
        except requests.RequestException as exc:
            self._pacer.done(group, None)
            # ``from None``: the original text carries the URL, which may hold an email.
            raise wrap_transport_error(exc) from None
        self._pacer.done(group, resp.headers)
        if resp.status_code >= 400:
            raise self._error(resp, group)
        if resp.status_code == 204 or not resp.content:
            return {}
        try:
            return resp.json()
        except ValueError:
            raise Transient("Close answered with a body that is not JSON", status=resp.status_code) from None

    def _error(self, resp: requests.Response, group: str) -> ConnectorError:
        message = _scrub(_close_message(resp), self._key)
        if resp.status_code != 429:
            return error_for_status(resp, message)
        wait = parse_retry_after(resp.headers.get("Retry-After"))
        if wait is None:
            try:
                wait = float(resp.json()["error"]["rate_reset"])
            except (ValueError, KeyError, TypeError):
                wait = _rate_state(resp.headers)[2]
        if wait is not None:
            self._pacer.block(group, wait)
        return RateLimited(message, retry_after=wait, status=429)

    def _search(self, body: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
        """Pages of ``POST /data/search/``, following Close's opaque cursor."""
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            page = self._call("POST", "/data/search/", json={**body, "cursor": cursor})
            data = page.get("data") if isinstance(page, dict) else None
            yield [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []
            cursor = page.get("cursor") if isinstance(page, dict) else None
            if not cursor:
                return
            if cursor in seen:
                raise Transient("Close search returned the same cursor twice")
            seen.add(cursor)

    # --- custom field metadata --------------------------------------------------------
    def _custom_fields(self, obj: str, *, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """{field id: metadata} for ``obj``; fetched once, refreshed on request."""
        with self._meta_lock:
            cached = self._meta.get(obj)
        if cached is not None and not refresh:
            return cached[1]
        fields: dict[str, dict[str, Any]] = {}
        skip = 0
        while True:
            page = self._call("GET", f"/custom_field/{obj}/", params={"_skip": skip, "_limit": MAX_PAGE})
            data = page.get("data") if isinstance(page, dict) else None
            for meta in data if isinstance(data, list) else []:
                if (isinstance(meta, dict) and isinstance(meta.get("id"), str)
                        and isinstance(meta.get("name"), str)):
                    fields[meta["id"]] = meta
            if not (isinstance(page, dict) and page.get("has_more")) or not data:
                break
            skip += len(data)
        with self._meta_lock:
            self._meta[obj] = (time.monotonic(), fields)
        return fields

    def _lookup(self, obj: str, key: str) -> dict[str, Any] | None:
        """Custom field metadata by id or exact name; one refresh if the name is new."""
        name = key.removeprefix("custom.")
        for attempt in (0, 1):
            fields = self._custom_fields(obj)
            if name in fields:
                return fields[name]
            for meta in fields.values():
                if meta["name"] == name:
                    return meta
            with self._meta_lock:
                age = time.monotonic() - self._meta[obj][0]
            if attempt or age < METADATA_TTL:
                return None
            self._custom_fields(obj, refresh=True)
        return None

    @staticmethod
    def _to_close(meta: dict[str, Any], value: Any) -> Any:
        """Our bool -> Close's representation: a one-choice "choices" field holds its
        choice for True and is cleared for False; "checkbox" takes the bool itself."""
        if not isinstance(value, bool):
            return value
        kind = meta.get("type")
        many = bool(meta.get("accepts_multiple_values"))
        if kind == "choices":
            choices = [c for c in meta.get("choices") or [] if isinstance(c, str)]
            words = _TRUE_WORDS if value else _FALSE_WORDS
            pick = next((c for c in choices if c.strip().lower() in words), None)
            if pick is None and value and len(choices) == 1:
                pick = choices[0]
            if pick is None:
                return value if value else None  # True with no fitting choice: Close says why
            return [pick] if many else pick
        if kind in ("text", "textarea"):
            return "true" if value else "false"
        return value

    @staticmethod
    def _from_close(meta: dict[str, Any] | None, value: Any) -> Any:
        """Inverse of ``_to_close`` for flag-like fields; other values pass through."""
        if meta is None:
            return value
        kind = meta.get("type")
        if kind == "checkbox":
            return bool(value)
        if kind == "choices":
            choices = meta.get("choices") or []
            values = value if isinstance(value, list) else ([] if value is None else [value])
            if len(choices) == 1:
                return bool(values)
            lowered = {str(v).strip().lower() for v in values}
            if lowered and lowered <= _TRUE_WORDS:
                return True
            if not values or lowered <= _FALSE_WORDS:
                return False
        return value

    def _body(self, obj: str, fields: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for key, value in fields.items():
            builtin = BUILTIN_FIELDS[obj].get(key)
            if builtin is not None and builtin.updateable:
                body[key] = value
                continue
            meta = self._lookup(obj, key)
            if meta is None:
                # Unknown to the metadata: send it and let Close name the problem.
                body[f"custom.{key.removeprefix('custom.')}"] = value
            else:
                body[f"custom.{meta['id']}"] = self._to_close(meta, value)
        return body

    # --- CrmConnector -----------------------------------------------------------------
    def update(self, updates: list[RecordUpdate]) -> list[UpdateResult]:
        """One PUT per record (Close has no batch endpoint), then the email list call.

        Per-record failures land in ``UpdateResult.error``. A Transient/RateLimited
        failure (after short retries) is given to that record and to every record not
        yet attempted, so an outage costs one call, not one per record. AuthFailed raises.
        """
        results: list[UpdateResult] = []
        outage: Transient | None = None
        for upd in updates:
            if outage is not None:
                results.append(UpdateResult(upd.ref, outage))
                continue
            try:
                self._update_one(upd)
                results.append(UpdateResult(upd.ref))
            except Transient as exc:
                outage = exc
                results.append(UpdateResult(upd.ref, exc))
            except Permanent as exc:
                results.append(UpdateResult(upd.ref, exc))
        return results

    def _update_one(self, upd: RecordUpdate) -> None:
        obj = record_object(upd.ref.record_id)
        if str(upd.ref.obj).lower() != obj:
            raise Permanent(f"record id is a Close {obj} id but the ref says {str(upd.ref.obj)[:20]!r}")
        addresses: dict[str, bool] = {}
        if upd.email_unsubscribe is not None:
            addresses = self._email_targets(obj, upd.ref.record_id, upd.email, upd.email_unsubscribe)
        if upd.fields:
            body = self._body(obj, upd.fields)
            self._call("PUT", f"/{obj}/{upd.ref.record_id}/", json=body)
        for email, unsubscribed in addresses.items():
            if upd.email_unsubscribe and not unsubscribed:
                self._unsubscribe(obj, upd.ref.record_id, email)
            elif not upd.email_unsubscribe:
                self._resubscribe(email)

    def _email_targets(self, obj: str, record_id: str, named: str | None,
                       unsubscribe: bool) -> dict[str, bool]:
        """{address: already unsubscribed} of the record's own addresses to act on.

        Addresses come from Close, never from the event: a webhook naming another
        address must not unsubscribe (or resubscribe) someone else. An opt-out for an
        address the record holds acts on that one; naming none, or one the record does
        not hold, acts on all of the record's addresses (the record asked to be left
        alone). An opt-in only ever resubscribes the address it names, or all when it
        names none.
        """
        own = self._record_emails(obj, record_id)
        if not own or not all(_usable_email(e) for e in own):
            raise Permanent("email change requested but the record has no usable email address")
        wanted = named.strip().lower() if isinstance(named, str) and named.strip() else None
        if wanted is None:
            return own
        if wanted in own:
            return {wanted: own[wanted]}
        if unsubscribe:
            log.warning("close: the event's email is not on the record; unsubscribing the record's own")
            return own
        raise Permanent("the opt-in names an email address that is not on the record; nothing resubscribed")

    def _record_emails(self, obj: str, record_id: str) -> dict[str, bool]:
        """{address: is_unsubscribed} for every address on the record (a lead's
        contacts' too), lower-cased, as Close reports them on the contact."""
        data = self._call("GET", f"/{obj}/{record_id}/")
        people = data.get("contacts") or [] if obj == "lead" else [data]
        found: dict[str, bool] = {}
        for person in people:
            for entry in (person.get("emails") or []) if isinstance(person, dict) else []:
                if isinstance(entry, dict) and isinstance(entry.get("email"), str) and entry["email"].strip():
                    email = entry["email"].strip().lower()
                    found[email] = found.get(email, False) or entry.get("is_unsubscribed") is True
        return found

    def _unsubscribe(self, obj: str, record_id: str, email: str) -> None:
        """POST to the unsubscribe list. Close documents no error text for an address
        already on it, so a refusal is checked against the record's own
        ``emails[].is_unsubscribed`` before it counts as a failure."""
        try:
            self._call("POST", "/unsubscribe/email/", json={"email": email})
        except Permanent as exc:
            if isinstance(exc, NotFound) or exc.status != 400:
                raise
            if self._record_emails(obj, record_id).get(email):
                return  # the state we want, whatever Close's words for it
            raise

    def _resubscribe(self, email: str) -> None:
        try:
            self._call("DELETE", f"/unsubscribe/email/{quote(email, safe='@')}/")
        except NotFound:
            return  # never unsubscribed: already the state we want

    def find_by_phone(self, e164: str) -> list[RecordRef]:
        """Leads (first) and contacts with a contact phone equal to ``e164``."""
        if not isinstance(e164, str) or not _E164.fullmatch(e164):
            raise Permanent("phone number is not in E.164 form")
        return [found.ref for found in self.find([e164], [])]

    def find(self, phones: list[str], emails: list[str]) -> list[FoundRecord]:
        """Leads (first) and contacts whose contact carries one of ``phones`` (E.164, as
        Close stores them) or ``emails``: one Advanced Filtering search per batch of
        ``LOOKUP_BATCH`` values, an ``or`` of exact-value conditions on the contact's
        phones and emails (addresses lower-cased, as Close's own scripts send them),
        paged by cursor and paced in the search group like every search."""
        wanted_phones = list(dict.fromkeys(p for p in phones if isinstance(p, str) and _E164.fullmatch(p)))
        wanted_emails = list(dict.fromkeys(e.strip().lower() for e in emails
                                           if isinstance(e, str) and _EMAIL.fullmatch(e.strip())))
        leads: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
        contacts: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
        values = [("phone", p) for p in wanted_phones] + [("email", e) for e in wanted_emails]
        for start in range(0, len(values), LOOKUP_BATCH):
            batch = values[start:start + LOOKUP_BATCH]
            for page in self._search(self._lookup_body(batch)):
                for contact in page:
                    self._take_match(contact, batch, leads, contacts)
        refs: list[FoundRecord] = []
        if "lead" in self.phone_lookup:
            refs += [FoundRecord(RecordRef(self.name, "lead", i), tuple(p), tuple(e)) for i, (p, e) in leads.items()]
        if "contact" in self.phone_lookup:
            refs += [FoundRecord(RecordRef(self.name, "contact", i), tuple(p), tuple(e))
                     for i, (p, e) in contacts.items()]
        return refs

    @staticmethod
    def _lookup_body(batch: list[tuple[str, str]]) -> dict[str, Any]:
        def related(kind: str) -> dict[str, Any] | None:
            wanted = [value for k, value in batch if k == kind]
            if not wanted:
                return None
            related_type = f"contact_{kind}"
            return {"type": "has_related", "this_object_type": "contact", "related_object_type": related_type,
                    "related_query": {"type": "or", "queries": [
                        {"type": "field_condition",
                         "field": {"type": "regular_field", "object_type": related_type, "field_name": kind},
                         "condition": {"type": "text", "mode": "exact_value", "value": value}}
                        for value in wanted]}}
        either = [q for q in (related("phone"), related("email")) if q is not None]
        return {"query": {"type": "and", "queries": [{"type": "object_type", "object_type": "contact"},
                                                     {"type": "or", "queries": either}]},
                "_fields": {"contact": ["id", "lead_id", "phones", "emails"]}, "_limit": MAX_PAGE}

    @staticmethod
    def _take_match(contact: dict[str, Any], batch: list[tuple[str, str]],
                    leads: dict[str, tuple[dict[str, None], dict[str, None]]],
                    contacts: dict[str, tuple[dict[str, None], dict[str, None]]]) -> None:
        """Record which looked-up values this contact (and so its lead) carries. Ids
        from the wire are checked too: they go into URLs later."""
        own_phones = {p.get("phone") for p in contact.get("phones") or [] if isinstance(p, dict)}
        own_emails = {str(e.get("email") or "").strip().lower()
                      for e in contact.get("emails") or [] if isinstance(e, dict)}
        phones = [v for k, v in batch if k == "phone" and v in own_phones]
        emails = [v for k, v in batch if k == "email" and v in own_emails]
        if not phones and not emails:
            return
        for ident, pattern, into in ((contact.get("id"), CLOSE_CONTACT, contacts),
                                     (contact.get("lead_id"), CLOSE_LEAD, leads)):
            if isinstance(ident, str) and pattern.fullmatch(ident):
                mine = into.setdefault(ident, ({}, {}))
                mine[0].update(dict.fromkeys(phones))
                mine[1].update(dict.fromkeys(emails))

    def changed_since(self, mark: Watermark, fields: list[str], limit: int = 100) -> Page:
        """Leads whose ``date_updated`` is after ``mark``, oldest first, at most ``limit``.

        ``values`` holds each requested field under the name it was asked by (flag-like
        custom fields as bools) and ``phones``: the E.164 numbers of the lead's contacts.
        Order is (date_updated, id) and ``mark.last_id`` breaks ties. Close sorts by
        date only, so a tie group is never cut at a page boundary on the wire: reading
        continues until the timestamp after the cut is seen, then sorts by id locally.
        """
        limit = max(1, min(int(limit), 1000))
        since: datetime | None = None
        if mark.ts:
            try:
                since = _parse_ts(mark.ts)
            except ValueError:
                raise Permanent("watermark is not an ISO timestamp") from None
        wanted: dict[str, str | None] = {}  # requested name -> custom field id (None: built-in)
        metas: dict[str, dict[str, Any]] = {}
        for name in fields:
            if name in BUILTIN_FIELDS["lead"]:
                wanted[name] = None
                continue
            meta = self._lookup("lead", name)
            if meta is None:
                raise Permanent(f"unknown Close lead field: {name}")
            wanted[name], metas[name] = meta["id"], meta
        queries: list[dict[str, Any]] = [{"type": "object_type", "object_type": "lead"}]
        if since is not None:
            queries.append({
                "type": "field_condition",
                "field": {"type": "regular_field", "object_type": "lead", "field_name": "date_updated"},
                "condition": {"type": "moment_range",
                              "on_or_after": {"type": "fixed_utc", "value": since.isoformat()}}})
        lead_fields = ["id", "date_updated", "contacts"]
        lead_fields += [n for n, cf in wanted.items()
                        if cf is None and n not in lead_fields and n != "phones"]
        lead_fields += [f"custom.{cf}" for cf in wanted.values() if cf]
        body = {
            "query": {"type": "and", "queries": queries},
            "sort": [{"direction": "asc", "field": {"type": "regular_field", "object_type": "lead",
                                                    "field_name": "date_updated"}}],
            "_fields": {"lead": lead_fields},
            "_limit": min(MAX_PAGE, limit + 1),
        }
        after = (since, mark.last_id or "") if since is not None else None
        rows: list[tuple[datetime, str, dict[str, Any]]] = []
        exhausted = True
        for page in self._search(body):
            newest: datetime | None = None
            for lead in page:
                lead_id, stamp = lead.get("id"), lead.get("date_updated")
                if not (isinstance(lead_id, str) and CLOSE_LEAD.fullmatch(lead_id)
                        and isinstance(stamp, str)):
                    continue
                try:
                    when = _parse_ts(stamp)
                except ValueError:
                    continue
                newest = when if newest is None or when > newest else newest
                if after is None or (when, lead_id) > after:
                    rows.append((when, lead_id, lead))
            if len(rows) > limit and newest is not None:
                rows.sort(key=lambda r: (r[0], r[1]))
                if newest > rows[limit - 1][0]:
                    exhausted = False  # the tie group at the cut is complete
                    break
        rows.sort(key=lambda r: (r[0], r[1]))
        more = not exhausted or len(rows) > limit
        records = [self._changed(lead, wanted, metas) for _, _, lead in rows[:limit]]
        if records:
            last = records[-1]
            next_mark = Watermark(ts=last.modified, last_id=last.ref.record_id)
        else:
            next_mark = Watermark(ts=mark.ts, last_id=mark.last_id)
        return Page(records=records, next_mark=next_mark, more=more)

    def _changed(self, lead: dict[str, Any], wanted: dict[str, str | None],
                 metas: dict[str, dict[str, Any]]) -> ChangedRecord:
        phones: list[str] = []
        for contact in lead.get("contacts") or []:
            for entry in (contact.get("phones") or []) if isinstance(contact, dict) else []:
                phone = entry.get("phone") if isinstance(entry, dict) else None
                if isinstance(phone, str) and phone not in phones:
                    phones.append(phone)
        values: dict[str, Any] = {}
        for name, field_id in wanted.items():
            if field_id is None:
                values[name] = phones if name == "phones" else lead.get(name)
            else:
                values[name] = self._from_close(metas.get(name), lead.get(f"custom.{field_id}"))
        values["phones"] = phones
        return ChangedRecord(ref=RecordRef(self.name, "lead", lead["id"]), values=values,
                             modified=str(lead["date_updated"]))

    # --- audit: read mapped fields of known records ------------------------------------
    def read(self, refs: list[RecordRef], fields: list[str]) -> dict[RecordRef, dict[str, Any]]:
        """The values of ``fields`` on each lead or contact: one ``GET /lead|contact/{id}/``
        with ``_fields`` per record (Close documents no read of many records by id),
        paced per endpoint group by ``RateLimit`` like every call. Flag-like custom
        fields come back as booleans. ``@unsubscribe`` reads the record's own addresses'
        ``is_unsubscribed``: True when all are, False when none is, ``"partial"``
        otherwise; left out for a record without an address. A record Close does not
        have (404) is absent from the answer; an id that is not Close's is never sent."""
        found: dict[RecordRef, dict[str, Any]] = {}
        for ref in refs:
            if ref.crm != self.name:
                continue
            try:
                obj = record_object(ref.record_id)
            except Permanent:
                continue
            if str(ref.obj).lower() != obj:
                continue
            try:
                found[ref] = self._read_one(obj, ref.record_id, fields)
            except NotFound:
                continue
        return found

    def _read_one(self, obj: str, record_id: str, fields: list[str]) -> dict[str, Any]:
        want_email = UNSUBSCRIBE_FIELD in fields
        want_emails = EMAILS_FIELD in fields
        wanted: dict[str, dict[str, Any] | None] = {}  # requested name -> custom field meta (None: built-in)
        for name in dict.fromkeys(fields):
            if name in (UNSUBSCRIBE_FIELD, EMAILS_FIELD):
                continue
            if name in BUILTIN_FIELDS[obj]:
                wanted[name] = None
                continue
            meta = self._lookup(obj, name)
            if meta is None:
                raise Permanent(f"unknown Close {obj} field: {name}")
            wanted[name] = meta
        keys = ["id", *[n if meta is None else f"custom.{meta['id']}" for n, meta in wanted.items()]]
        if want_email or want_emails:
            keys.append("contacts" if obj == "lead" else "emails")
        data = self._call("GET", f"/{obj}/{record_id}/", params={"_fields": ",".join(dict.fromkeys(keys))})
        data = data if isinstance(data, dict) else {}
        values = {name: data.get(name) if meta is None else self._from_close(meta, data.get(f"custom.{meta['id']}"))
                  for name, meta in wanted.items()}
        people = (data.get("contacts") or []) if obj == "lead" else [data]
        if want_emails:
            values[EMAILS_FIELD] = list(dict.fromkeys(
                entry["email"].strip() for person in people if isinstance(person, dict)
                for entry in person.get("emails") or []
                if isinstance(entry, dict) and isinstance(entry.get("email"), str) and entry["email"].strip()))
        if want_email:
            states = [entry.get("is_unsubscribed") is True
                      for person in people if isinstance(person, dict)
                      for entry in person.get("emails") or []
                      if isinstance(entry, dict) and isinstance(entry.get("email"), str) and entry["email"].strip()]
            if states:
                values[UNSUBSCRIBE_FIELD] = True if all(states) else ("partial" if any(states) else False)
        return values

    def fields(self, obj: str) -> dict[str, FieldInfo]:
        """Built-in fields plus every custom field under both its name and its id.

        Custom fields count as updateable: role restrictions (``editable_with_roles``)
        depend on the key's user, which the metadata does not say.
        """
        obj = str(obj).lower()
        if obj not in OBJECTS:
            raise Permanent("Close objects are 'lead' and 'contact'")
        out: dict[str, FieldInfo] = {}
        for meta in self._custom_fields(obj, refresh=True).values():
            kind = str(meta.get("type") or "")
            out[meta["name"]] = FieldInfo(meta["name"], kind, True, label=meta["name"])
            out[meta["id"]] = FieldInfo(meta["id"], kind, True, label=meta["name"])
        out.update(BUILTIN_FIELDS[obj])  # a built-in name always means the built-in
        return out


# --- the plugin ------------------------------------------------------------------------

class CloseSettings(CrmSettings):
    """``crm.close`` in config.yaml."""

    base_url: OutboundUrl = "https://api.close.com/api/v1"
    api_key: Secret
    mapping: str = "mappings/close.yaml"


def build(settings: CloseSettings, ctx: BuildContext) -> CloseConnector:
    return CloseConnector(base_url=settings.base_url, api_key=settings.api_key, ca_bundle=ctx.ca_bundle,
                          timeout=ctx.timeout)


PLUGIN = CrmPlugin(
    name="close",
    title="Close",
    settings=CloseSettings,
    build=build,
    watermark=lambda t: t.isoformat(timespec="seconds"),
    id_rules=(IdRule(CLOSE_LEAD.pattern, "lead"), IdRule(CLOSE_CONTACT.pattern, "contact")),
    email_unsubscribe=True,
    flag_types=frozenset({"choices"}),     # a flag is a one-choice field; the connector converts booleans
    credentials=lambda s: ("api_key", s.base_url),
)
