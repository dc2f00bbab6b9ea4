"""HubSpot connector: contact properties through hubspot-api-client (CRM v3) and
email consent through the v4 communication-preferences API.

``hs_email_optout`` is read-only in HubSpot, so an email opt-out is never a
property write: with a subscription type configured it sets that type
UNSUBSCRIBED (with the mapping's legal basis); with none it unsubscribes the
address from all email. v3 is legacy, covers one subscription type and cannot
resubscribe; hubspot-api-client 12 ships only v3, so v4 goes through the
generated client's generic ``ApiClient.call_api`` (same TLS trust, timeout and
error type as every other call). The addresses changed are always the
contact's own, read from HubSpot, never one that only the webhook names.

The client's own urllib3 retries are switched off: retries belong to
``connectors.http.short_retry`` (which honours HubSpot's rate-limit window) and,
beyond that, to the journal's schedule. Searches are paced by one process-wide
``SearchPacer``: HubSpot limits search per account and sends no rate-limit
headers with it.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from datetime import date, datetime, timezone
from importlib import metadata
from typing import Any, Callable, Iterator

import certifi
import phonenumbers
import urllib3
from hubspot import communication_preferences as hs_comm
from hubspot.crm import contacts as hs_contacts
from hubspot.crm import properties as hs_properties

from connectors.errors import (AuthFailed, ConnectorError, NotFound, Permanent, RateLimited,
                               Transient)
from connectors.http import USER_AGENT, parse_retry_after, short_retry
from connectors.plugin import BuildContext, CrmPlugin, IdRule
from connectors.settings import CrmSettings, OutboundUrl, Secret
from connectors.types import (EMAILS_FIELD, ChangedRecord, FieldInfo, FoundRecord, Page, RecordRef, RecordUpdate,
                              UpdateResult, Watermark)

HUBSPOT_ID = re.compile(r"^[0-9]+$")
BATCH_SIZE = 100          # batch/update and batch/read accept at most 100 inputs
SEARCH_PAGE = 200         # search accepts limit <= 200
SEARCH_CAP = 10_000       # search cannot page past 10,000 results of one query
# Values per IN filter in a lookup. HubSpot's pages retrieved here state no number of
# values for IN; 100 (its batch size elsewhere) is our own cap, not HubSpot's.
IN_VALUES = 100
LEGAL_BASES = ("LEGITIMATE_INTEREST_PQL", "LEGITIMATE_INTEREST_CLIENT", "PERFORMANCE_OF_CONTRACT",
               "CONSENT_WITH_NOTICE", "NON_GDPR", "PROCESS_AND_STORE", "LEGITIMATE_INTEREST_OTHER")
DEFAULT_EXPLANATION = "Opt-out received through a messaging channel and synced by syncd."
# HubSpot documents the search limit per account (4/s per token in its changelog,
# "about 5/s per account" today) and sends no X-HubSpot-RateLimit headers with
# search answers, so the budget cannot be read: pace below the lower figure.
SEARCH_RATE = 4.0
STATUSES = "/communication-preferences/v4/statuses/{subscriberIdString}"
OWN_EMAILS = ("email", "hs_additional_emails")  # hs_additional_emails: ";"-separated
UNSUBSCRIBE_FIELD = "@unsubscribe"  # a mapping's name for email consent kept outside properties
_OBJECTS = ("contact", "contacts")
_API_ERRORS = (hs_contacts.ApiException, hs_properties.ApiException, hs_comm.ApiException)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_PHONE = re.compile(r"\+\d[\d\s().-]{5,20}\d")
_E164 = re.compile(r"^\+[1-9][0-9]{3,14}\Z")


def scrub(text: str) -> str:
    """HubSpot echoes email addresses (and sometimes phones) in its errors; mask them."""
    return _PHONE.sub("<phone>", _EMAIL.sub("<email>", text))


def readable(message: str) -> str:
    """HubSpot nests property validation details as a JSON list inside ``message``;
    keep the per-property sentences, which are what an admin needs to read."""
    prefix = "Property values were not valid: "
    if message.startswith(prefix):
        try:
            details = json.loads(message[len(prefix):])
            parts = [d["message"] for d in details if isinstance(d, dict) and d.get("message")]
        except (ValueError, TypeError, KeyError):
            parts = []
        if parts:
            message = prefix + "; ".join(parts)
    return scrub(message)


def to_hubspot_value(value: Any) -> str:
    """HubSpot property values are strings: booleans as "true"/"false", datetimes
    as ISO 8601 UTC, and an empty string clears the property."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value
        return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def epoch_ms(value: str | None) -> int | None:
    """A HubSpot datetime (ISO 8601 as the v3 API returns it, or epoch ms) as epoch ms."""
    if not value:
        return None
    if value.isdigit():
        return int(value)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    when = when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when
    return int(round(when.timestamp() * 1000))


def _retry_after(headers: Any, policy: str | None) -> float:
    """How long HubSpot wants us to stay away: ``Retry-After`` when sent, else the
    window of the policy that tripped (the rolling window's length from
    ``X-HubSpot-RateLimit-Interval-Milliseconds``, 10 s when absent)."""
    headers = headers or {}
    explicit = parse_retry_after(headers.get("Retry-After"))
    if explicit is not None:
        return explicit
    if policy == "DAILY":
        return 3600.0  # resets at midnight in the account's time zone, which we do not know
    if policy == "SECONDLY":
        return 1.0
    try:
        return max(0.0, float(headers.get("X-HubSpot-RateLimit-Interval-Milliseconds")) / 1000)
    except (TypeError, ValueError):
        return 10.0


def error_from_api(exc: Any) -> ConnectorError:
    """An ApiException from any hubspot-api-client package, as the shared taxonomy.
    The text is HubSpot's own ``message`` and category (PII masked), never headers."""
    status = int(exc.status or 0)
    try:
        body = json.loads(exc.body or b"{}")
    except (TypeError, ValueError):
        body = {}
    body = body if isinstance(body, dict) else {}
    category = body.get("category") or body.get("errorType")
    text = readable(str(body.get("message") or exc.reason or "no error message"))
    message = f"{text} ({category})" if category else text
    if status == 0:  # the client reports TLS failures this way
        return Transient("TLS or transport error talking to HubSpot")
    if status == 429:
        policy = body.get("policyName")
        return RateLimited(message, retry_after=_retry_after(exc.headers, policy),
                           code=policy or category, status=status)
    if status in (401, 403):
        return AuthFailed(message, code=category, status=status)
    if status in (404, 410):
        return NotFound(message, code=category, status=status)
    if status in (408, 423) or status >= 500:
        return Transient(message, code=category, status=status)
    return Permanent(message, code=category, status=status)


def _record_error(err: Any) -> ConnectorError:
    """One entry of a 207 answer's ``errors`` as the error of the records it names."""
    category = err.category or "ERROR"
    message = f"{readable(err.message or 'no error message')} ({category})"
    if category == "OBJECT_NOT_FOUND":
        return NotFound(message, code=category)
    if category == "RATE_LIMIT":
        return RateLimited(message, retry_after=10.0, code=category, status=None)
    return Permanent(message, code=category)


def _offset(after: str) -> int:
    """HubSpot's search cursor is a result offset in a string; 0 if it is ever not."""
    return int(after) if str(after).isdigit() else 0


def _flt(name: str, operator: str, value: str) -> dict[str, str]:
    return {"propertyName": name, "operator": operator, "value": value}


def _eq(name: str, value: str) -> dict[str, Any]:
    return {"filters": [_flt(name, "EQ", value)]}


def _in(name: str, values: list[str]) -> dict[str, Any]:
    """A filter group of one ``IN`` filter (exact match against any of ``values``)."""
    return {"filters": [{"propertyName": name, "operator": "IN", "values": list(values)}]}


def _national(e164: str) -> str | None:
    try:
        return str(phonenumbers.parse(e164, None).national_number)
    except phonenumbers.NumberParseException:
        return None


def _region(e164: str) -> str | None:
    try:
        return phonenumbers.region_code_for_number(phonenumbers.parse(e164, None))
    except phonenumbers.NumberParseException:
        return None


def _e164s(stored: str | None, regions: set[str | None]) -> set[str]:
    """What a stored number can be as E.164: read as written when it has a ``+``,
    else in each region of the numbers being looked up."""
    if not stored or not stored.strip():
        return set()
    out = set()
    for region in ({None} if stored.strip().startswith("+") else regions - {None}):
        try:
            parsed = phonenumbers.parse(stored, region)
        except phonenumbers.NumberParseException:
            continue
        out.add(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))
    return out


class SearchPacer:
    """Spaces search requests at most ``rate`` per second, across threads. One
    instance (``SEARCH_PACER``) is shared by every connector in the process, so
    route lookups and reflector polls together stay under the account's limit."""

    def __init__(self, rate: float = SEARCH_RATE,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = rate
        self._interval = 1.0 / rate
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self) -> None:
        """Block until this caller's slot; slots are handed out in call order."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self._interval
        if slot > now:
            self._sleep(slot - now)


SEARCH_PACER = SearchPacer()


def _split_emails(props: dict[str, Any]) -> list[str]:
    """A contact's own addresses: ``email`` plus ``hs_additional_emails`` (";"-separated)."""
    found: dict[str, str] = {}
    for name in OWN_EMAILS:
        for address in str(props.get(name) or "").split(";"):
            address = address.strip()
            if address:
                found.setdefault(address.lower(), address)
    return list(found.values())


_BY_STAMP = {"propertyName": "lastmodifieddate", "direction": "ASCENDING"}
_BY_ID = {"propertyName": "hs_object_id", "direction": "ASCENDING"}


class HubSpotConnector:
    """``CrmConnector`` for HubSpot contacts. API objects are built once and shared;
    every remote call passes ``_request_timeout`` and runs under ``short_retry``."""

    name = "hubspot"
    search_result_cap = SEARCH_CAP

    def __init__(self, base_url: str, access_token: str, ca_bundle: str | None = None,
                 timeout: float = 30.0, email_subscription_id: str | None = None,
                 legal_basis: str | None = "LEGITIMATE_INTEREST_CLIENT",
                 legal_basis_explanation: str = DEFAULT_EXPLANATION,
                 poll_lag_seconds: float = 0.0, search_pacer: SearchPacer | None = None):
        if legal_basis is not None and legal_basis not in LEGAL_BASES:
            raise ValueError(f"legal_basis must be one of {', '.join(LEGAL_BASES)}")
        self.timeout = timeout
        self.email_subscription_id = str(email_subscription_id) if email_subscription_id else None
        self.legal_basis = legal_basis
        self.legal_basis_explanation = legal_basis_explanation
        # HubSpot's search index trails writes by seconds; a lag > 0 keeps the poll
        # watermark behind records that may not be searchable yet.
        self.poll_lag_seconds = poll_lag_seconds
        self.search_pacer = search_pacer or SEARCH_PACER
        # Same trust as the requests-based connectors: the configured bundle, else
        # REQUESTS_CA_BUNDLE, else certifi (urllib3 alone would use the OS store).
        trust = (ca_bundle or os.environ.get("REQUESTS_CA_BUNDLE")
                 or os.environ.get("CURL_CA_BUNDLE") or certifi.where())
        contacts = self._client(hs_contacts, base_url, access_token, trust)
        props = self._client(hs_properties, base_url, access_token, trust)
        comm = self._client(hs_comm, base_url, access_token, trust)
        self._cfg = contacts.configuration
        self._comm = comm
        self._batch_api = hs_contacts.BatchApi(contacts)
        self._search_api = hs_contacts.SearchApi(contacts)
        self._properties_api = hs_properties.CoreApi(props)
        self._types: dict[str, str] | None = None

    @staticmethod
    def _client(package: Any, base_url: str, token: str, trust: str) -> Any:
        cfg = package.Configuration(host=base_url.rstrip("/"), ssl_ca_cert=trust)
        cfg.access_token = token
        cfg.retries = False
        client = package.ApiClient(configuration=cfg)
        client.user_agent = f"{USER_AGENT} hubspot-api-client-python/{metadata.version('hubspot-api-client')}"
        return client

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, _request_timeout=self.timeout, **kwargs)
        except _API_ERRORS as exc:
            raise error_from_api(exc) from None
        except AttributeError as exc:
            # hubspot-api-client 12 turns TLS failures into ApiException(status=0)
            # and then trips over that exception's missing body while decoding it.
            if isinstance(exc.__context__, _API_ERRORS):
                raise error_from_api(exc.__context__) from None
            raise
        except urllib3.exceptions.HTTPError as exc:
            raise Transient(f"{type(exc).__name__} talking to HubSpot") from None

    # --- remote calls (one HTTP request each) ----------------------------------------
    @short_retry()
    def _batch_update(self, inputs: list[tuple[str, dict[str, str]]]) -> Any:
        body = hs_contacts.BatchInputSimplePublicObjectBatchInput(
            inputs=[hs_contacts.SimplePublicObjectBatchInput(id=i, properties=p,
                                                             local_vars_configuration=self._cfg)
                    for i, p in inputs], local_vars_configuration=self._cfg)
        return self._call(self._batch_api.update, batch_input_simple_public_object_batch_input=body)

    @short_retry()
    def _search(self, filter_groups: list[dict[str, Any]], properties: list[str],
                sort: dict[str, str], limit: int, after: str | None) -> Any:
        body = hs_contacts.PublicObjectSearchRequest(
            filter_groups=filter_groups, properties=properties, sorts=[sort], limit=limit,
            after=after, local_vars_configuration=self._cfg)
        self.search_pacer.wait()  # each attempt, retries included, takes a slot
        return self._call(self._search_api.do_search, public_object_search_request=body)

    @short_retry()
    def _read_emails(self, ids: list[str]) -> dict[str, list[str]]:
        """The own addresses of up to 100 contacts (one batch/read); ids HubSpot
        does not know are left out of the answer."""
        body = hs_contacts.BatchReadInputSimplePublicObjectId(
            inputs=[hs_contacts.SimplePublicObjectId(id=i, local_vars_configuration=self._cfg)
                    for i in ids],
            properties=list(OWN_EMAILS), properties_with_history=[],
            local_vars_configuration=self._cfg)
        answer = self._call(self._batch_api.read, batch_read_input_simple_public_object_id=body,
                            archived=False)
        return {r.id: _split_emails(r.properties or {}) for r in answer.results or []}

    @short_retry()
    def _preferences(self, method: str, email: str, path: str = "", query: bool = True,
                     body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One v4 communication-preferences call for ``email`` (path-encoded by the
        client, never formatted into the URL by hand)."""
        answer = self._call(
            self._comm.call_api, STATUSES + path, method,
            path_params={"subscriberIdString": email},
            query_params=[("channel", "EMAIL")] if query else [],
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            body=body, response_types_map={200: "object"}, auth_settings=["oauth2"],
            _return_http_data_only=True)
        return answer if isinstance(answer, dict) else {}

    @short_retry()
    def _definitions(self) -> dict[str, Any]:
        answer = self._call(
            self._comm.call_api, "/communication-preferences/v4/definitions", "GET",
            header_params={"Accept": "application/json"}, response_types_map={200: "object"},
            auth_settings=["oauth2"], _return_http_data_only=True)
        return answer if isinstance(answer, dict) else {}

    @short_retry()
    def _properties(self) -> Any:
        return self._call(self._properties_api.get_all, object_type="contacts", archived=False)

    # --- CrmConnector ----------------------------------------------------------------
    def update(self, updates: list[RecordUpdate]) -> list[UpdateResult]:
        """Field writes go out in batch/update chunks of <= 100 (several updates of one
        record are merged, HubSpot refuses duplicate ids in a batch), then email
        consent goes through communication preferences for each address the
        contact itself holds (batch/read); ``RecordUpdate.email`` is not used, so a
        webhook can never name the address that gets unsubscribed. A chunk that
        fails as a whole gives its error to each of its records; after a retryable
        failure the remaining calls are not made (they would meet the same limit).
        AuthFailed is raised: no call can succeed until the token changes."""
        errors: list[ConnectorError | None] = [None] * len(updates)
        invalid: set[int] = set()
        writes: dict[str, dict[str, str]] = {}
        owners: dict[str, list[int]] = {}
        for i, upd in enumerate(updates):
            problem = self._check_ref(upd.ref)
            if problem is not None:
                errors[i] = problem
                invalid.add(i)
            elif upd.fields:
                props = writes.setdefault(upd.ref.record_id, {})
                props.update({k: to_hubspot_value(v) for k, v in upd.fields.items()})
                owners.setdefault(upd.ref.record_id, []).append(i)

        blocked: ConnectorError | None = None
        ids = list(writes)
        for start in range(0, len(ids), BATCH_SIZE):
            chunk = ids[start:start + BATCH_SIZE]
            if blocked is not None:
                outcome: dict[str, ConnectorError | None] = dict.fromkeys(chunk, blocked)
            else:
                try:
                    outcome = self._write_chunk(chunk, writes)
                except AuthFailed:
                    raise
                except ConnectorError as exc:
                    outcome = dict.fromkeys(chunk, exc)
                    blocked = exc if exc.retryable else None
            for rid, err in outcome.items():
                for i in owners[rid]:
                    errors[i] = errors[i] or err

        consent = [i for i, u in enumerate(updates)
                   if i not in invalid and u.email_unsubscribe is not None]
        own: dict[str, list[str]] = {}
        if consent and blocked is None:
            try:
                own = self._own_emails(sorted({updates[i].ref.record_id for i in consent}))
            except AuthFailed:
                raise
            except ConnectorError as exc:
                blocked = exc
        for i in consent:
            upd = updates[i]
            if blocked is not None:
                errors[i] = errors[i] or blocked
                continue
            try:
                for address in self._addresses(upd.ref.record_id, own):
                    self._email_consent(address, bool(upd.email_unsubscribe))
            except AuthFailed:
                raise
            except ConnectorError as exc:
                errors[i] = errors[i] or exc
                blocked = exc if exc.retryable else None
        return [UpdateResult(ref=u.ref, error=e) for u, e in zip(updates, errors)]

    def find_by_phone(self, e164: str) -> list[RecordRef]:
        """Contacts whose phone or mobile phone is this number (see :meth:`find`)."""
        e164 = (e164 or "").strip()
        if not e164:
            return []
        return [found.ref for found in self.find([e164], [])]

    def find(self, phones: list[str], emails: list[str]) -> list[FoundRecord]:
        """Contacts whose phone or mobile phone is one of ``phones`` (E.164) or whose
        email is one of ``emails``: one search per batch of up to 100 of each, with
        ``IN`` filters in five filter groups (HubSpot allows five). HubSpot keeps
        numbers as typed, so besides exact matches the search also asks HubSpot's
        calculated searchable numbers (national digits), and a contact counts only for
        the numbers its stored phone parses to (the national digits alone can collide
        across countries). Only the primary ``email`` is searched: the
        ``;``-separated ``hs_additional_emails`` cannot be matched with ``IN``."""
        wanted_phones = list(dict.fromkeys(p.strip() for p in phones
                                           if isinstance(p, str) and _E164.match(p.strip())))
        wanted_emails = list(dict.fromkeys(e.strip().lower() for e in emails
                                           if isinstance(e, str) and _EMAIL.fullmatch(e.strip())))
        found: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
        for start in range(0, max(len(wanted_phones), len(wanted_emails)), IN_VALUES):
            chunk_phones = wanted_phones[start:start + IN_VALUES]
            chunk_emails = wanted_emails[start:start + IN_VALUES]
            regions = {_region(p) for p in chunk_phones}
            for obj in self._search_all(self._lookup_groups(chunk_phones, chunk_emails),
                                        ["phone", "mobilephone", "email"]):
                props = obj.properties or {}
                numbers = {n for name in ("phone", "mobilephone") for n in _e164s(props.get(name), regions)}
                matched = (sorted(numbers & set(chunk_phones)),
                           [e for e in [str(props.get("email") or "").strip().lower()] if e in chunk_emails])
                if matched[0] or matched[1]:
                    mine = found.setdefault(str(obj.id), ({}, {}))
                    mine[0].update(dict.fromkeys(matched[0]))
                    mine[1].update(dict.fromkeys(matched[1]))
        return [FoundRecord(RecordRef(crm=self.name, obj="contact", record_id=cid), tuple(p), tuple(e))
                for cid, (p, e) in found.items() if HUBSPOT_ID.match(cid)]

    @staticmethod
    def _lookup_groups(phones: list[str], emails: list[str]) -> list[dict[str, Any]]:
        groups = []
        if phones:
            nationals = sorted({n for n in (_national(p) for p in phones) if n})
            groups += [_in("phone", phones), _in("mobilephone", phones),
                       _in("hs_searchable_calculated_phone_number", nationals),
                       _in("hs_searchable_calculated_mobile_number", nationals)]
        if emails:
            groups.append(_in("email", emails))
        return groups

    def changed_since(self, mark: Watermark, fields: list[str], limit: int = 100) -> Page:
        """Contacts with ``lastmodifieddate`` after ``mark.ts`` (epoch ms), oldest first.

        A page never ends inside a run of equal stamps: HubSpot's order among ties
        is not defined, so the next poll can filter with a strict GT and lose
        nothing. Paging must not cross the 10,000-result cap, so before it would,
        the search restarts from the newest stamp seen: first the rest of that
        stamp's records by ``hs_object_id`` (no offset involved), then GT it.
        Values come back as HubSpot strings, except bool properties (True/False)
        and empty values (None)."""
        limit = max(1, limit)
        page_size = min(SEARCH_PAGE, limit + 1)
        names = list(dict.fromkeys([*fields, "lastmodifieddate"]))
        types = self._field_types()
        ceiling = (str(int((time.time() - self.poll_lag_seconds) * 1000))
                   if self.poll_lag_seconds > 0 else None)
        records: list[ChangedRecord] = []
        seen: set[str] = set()
        last: tuple[int, str] | None = None

        def take(obj: Any, stamp: int) -> None:
            nonlocal last
            props = obj.properties or {}
            seen.add(obj.id)
            last = (stamp, obj.id)
            records.append(ChangedRecord(
                ref=RecordRef(crm=self.name, obj="contact", record_id=obj.id),
                values={f: self._from_hubspot(props.get(f), types.get(f)) for f in fields},
                modified=props.get("lastmodifieddate") or ""))

        def page(more: bool) -> Page:
            nxt = Watermark(ts=str(last[0]), last_id=last[1]) if last else mark
            return Page(records=records, next_mark=nxt, more=more)

        floor, after = mark.ts, None
        while True:
            filters = [_flt("lastmodifieddate", "GT", floor)] if floor is not None else []
            if ceiling is not None:
                filters.append(_flt("lastmodifieddate", "LTE", ceiling))
            answer = self._search([{"filters": filters}] if filters else [], names,
                                  _BY_STAMP, page_size, after)
            for obj in answer.results or []:
                stamp = epoch_ms((obj.properties or {}).get("lastmodifieddate"))
                if obj.id in seen or stamp is None:
                    continue
                if len(records) >= limit and last is not None and stamp != last[0]:
                    return page(more=True)
                take(obj, stamp)
            nxt = answer.paging.next.after if answer.paging and answer.paging.next else None
            if nxt is None:
                return page(more=False)
            if _offset(nxt) + page_size <= self.search_result_cap or last is None:
                after = nxt
                continue
            stamp, cursor = last[0], None
            while True:  # the rest of the newest stamp's records, in id order
                tie = [_flt("lastmodifieddate", "EQ", str(stamp))]
                if cursor is not None:
                    tie.append(_flt("hs_object_id", "GT", cursor))
                answer = self._search([{"filters": tie}], names, _BY_ID, SEARCH_PAGE, None)
                for obj in answer.results or []:
                    cursor = obj.id
                    if obj.id not in seen:
                        take(obj, stamp)
                if not answer.results or not (answer.paging and answer.paging.next):
                    break
            floor, after = str(stamp), None
    # --- audit: read mapped properties and email consent of known contacts ------------
    def read(self, refs: list[RecordRef], fields: list[str]) -> dict[RecordRef, dict[str, Any]]:
        """Property values of each contact (batch/read, ``BATCH_SIZE`` ids a call); a
        contact HubSpot no longer has is absent from the answer. Booleans come back as
        True/False, empty values as None. ``@unsubscribe`` among ``fields`` reads the
        email consent of the contact's own addresses through communication preferences
        v4: True when every address is unsubscribed (from the configured subscription
        type, else from all email), False when none is, ``"partial"`` otherwise; left
        out for a contact without an address. That costs one GET per address: the v4
        batch status reads need Marketing Hub Enterprise scopes (see SOURCES.md)."""
        want_email = UNSUBSCRIBE_FIELD in fields
        want_emails = EMAILS_FIELD in fields
        props = [f for f in dict.fromkeys(fields) if f not in (UNSUBSCRIBE_FIELD, EMAILS_FIELD)]
        names = list(dict.fromkeys([*props, *(OWN_EMAILS if want_email or want_emails else ())]))
        wanted = {ref.record_id: ref for ref in refs if ref.crm == self.name and self._check_ref(ref) is None}
        ids = list(wanted)
        found: dict[RecordRef, dict[str, Any]] = {}
        for start in range(0, len(ids), BATCH_SIZE):
            for obj in self._read_properties(ids[start:start + BATCH_SIZE], names):
                ref = wanted.get(str(obj.id))
                if ref is None:
                    continue
                values = obj.properties or {}
                found[ref] = {name: self._from_batch_read(values.get(name)) for name in props}
                if want_emails:
                    found[ref][EMAILS_FIELD] = _split_emails(values)
                if want_email:
                    addresses = _split_emails(values)
                    if addresses:
                        found[ref][UNSUBSCRIBE_FIELD] = self._email_opted_out(addresses)
        return found

    @short_retry()
    def _read_properties(self, ids: list[str], names: list[str]) -> list[Any]:
        """One batch/read of up to 100 contacts; unknown ids are left out of the answer."""
        body = hs_contacts.BatchReadInputSimplePublicObjectId(
            inputs=[hs_contacts.SimplePublicObjectId(id=i, local_vars_configuration=self._cfg) for i in ids],
            properties=names, properties_with_history=[], local_vars_configuration=self._cfg)
        answer = self._call(self._batch_api.read, batch_read_input_simple_public_object_id=body,
                            archived=False)
        return list(answer.results or [])

    @staticmethod
    def _from_batch_read(value: Any) -> Any:
        """HubSpot answers strings: "true"/"false" for a checkbox, "" for no value."""
        if value is None or value == "":
            return None
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return value

    def _email_opted_out(self, addresses: list[str]) -> bool | str:
        states = []
        for address in addresses:
            if self.email_subscription_id:
                answer = self._preferences("GET", address)
                status = next((r.get("status") for r in answer.get("results") or []
                               if isinstance(r, dict)
                               and str(r.get("subscriptionId")) == self.email_subscription_id), None)
                states.append(status == "UNSUBSCRIBED")
            else:
                states.append(self._unsubscribed_from_all(address))
        if all(states):
            return True
        return "partial" if any(states) else False

    def fields(self, obj: str) -> dict[str, FieldInfo]:
        """Contact property metadata; ``updateable`` is False where HubSpot marks the
        value read-only (``hs_email_optout`` among them)."""
        if obj.lower() not in _OBJECTS:
            raise Permanent(f"the HubSpot connector handles contacts, not {obj!r}")
        out = {}
        for prop in self._properties().results or []:
            meta = prop.modification_metadata
            out[prop.name] = FieldInfo(name=prop.name, type=prop.type or "string",
                                       updateable=not (meta and meta.read_only_value),
                                       label=prop.label or "")
        self._types = {name: info.type for name, info in out.items()}
        return out

    def subscription_types(self) -> dict[str, str]:
        """The account's email subscription types, id -> name (for ``syncd check``)."""
        found = self._definitions().get("results") or []
        return {str(d["id"]): str(d.get("name") or "") for d in found
                if isinstance(d, dict) and d.get("id") is not None}

    # --- helpers ---------------------------------------------------------------------
    def _check_ref(self, ref: RecordRef) -> ConnectorError | None:
        """Ids that are not HubSpot's never reach a URL or a request body."""
        if ref.obj.lower() not in _OBJECTS:
            return Permanent(f"the HubSpot connector updates contacts, not {ref.obj!r}")
        if not isinstance(ref.record_id, str) or not HUBSPOT_ID.fullmatch(ref.record_id):
            return Permanent("record id is not a HubSpot contact id (digits only)")
        return None

    def _write_chunk(self, chunk: list[str],
                     writes: dict[str, dict[str, str]]) -> dict[str, ConnectorError | None]:
        """One batch/update; a 207 names failed ids in ``errors[].context.ids``. An id
        that is neither confirmed nor named takes an error that names no ids, if any
        (HubSpot drops merged records from ``results`` without an error)."""
        answer = self._batch_update([(rid, writes[rid]) for rid in chunk])
        outcome: dict[str, ConnectorError | None] = {}
        unnamed: ConnectorError | None = None
        for err in getattr(answer, "errors", None) or []:
            mapped = _record_error(err)
            ids = (err.context or {}).get("ids") or []
            for rid in ids:
                outcome.setdefault(str(rid), mapped)
            if not ids and unnamed is None:
                unnamed = mapped
        confirmed = {r.id for r in answer.results or []}
        for rid in chunk:
            if rid in confirmed:
                outcome[rid] = None
            elif rid not in outcome:
                outcome[rid] = unnamed
        return {rid: outcome[rid] for rid in chunk}

    def _own_emails(self, ids: list[str]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for start in range(0, len(ids), BATCH_SIZE):
            found.update(self._read_emails(ids[start:start + BATCH_SIZE]))
        return found

    @staticmethod
    def _addresses(record_id: str, own: dict[str, list[str]]) -> list[str]:
        if record_id not in own:
            raise NotFound("contact not found in HubSpot (batch read)", code="OBJECT_NOT_FOUND")
        if not own[record_id]:
            raise Permanent("the contact has no email address in HubSpot; nothing to unsubscribe")
        return own[record_id]

    def _email_consent(self, email: str, unsubscribe: bool) -> None:
        """Bring one address to the wanted state. The current state is read first
        (GET statuses), so an address already there is done without a write and
        replays or retries change nothing."""
        if self.email_subscription_id:
            self._set_subscription_state(email, self.email_subscription_id,
                                         "UNSUBSCRIBED" if unsubscribe else "SUBSCRIBED")
        elif unsubscribe:
            if not self._unsubscribed_from_all(email):
                self._preferences("POST", email, "/unsubscribe-all")
        elif self._unsubscribed_from_all(email):
            # v4 has no "resubscribe to all"; an opt-in needs a type to subscribe to.
            raise Permanent("email opt-in not applied: the address is unsubscribed from all email "
                            "and email_unsubscribe.subscription_id is not configured, so there is "
                            "no subscription type to resubscribe it to")

    def _set_subscription_state(self, email: str, subscription_id: str, state: str) -> None:
        answer = self._preferences("GET", email)
        current = next((r.get("status") for r in answer.get("results") or []
                        if isinstance(r, dict)
                        and str(r.get("subscriptionId")) == subscription_id), None)
        if current == state:
            return
        body = {"channel": "EMAIL", "statusState": state,
                "subscriptionId": int(subscription_id) if subscription_id.isdigit() else subscription_id,
                "legalBasis": self.legal_basis, "legalBasisExplanation": self.legal_basis_explanation}
        self._preferences("POST", email, query=False,
                          body={k: v for k, v in body.items() if v is not None})

    def _unsubscribed_from_all(self, email: str) -> bool:
        """HubSpot answers an empty ``results`` unless the address opted out of all email."""
        answer = self._preferences("GET", email, "/unsubscribe-all")
        return any(isinstance(r, dict) and r.get("status") == "UNSUBSCRIBED"
                   for r in answer.get("results") or [])

    def _search_all(self, groups: list[dict[str, Any]], names: list[str]) -> Iterator[Any]:
        after = None
        while True:
            answer = self._search(groups, names, _BY_ID, SEARCH_PAGE, after)
            yield from answer.results or []
            after = answer.paging.next.after if answer.paging and answer.paging.next else None
            if after is None or _offset(after) + SEARCH_PAGE > self.search_result_cap:
                return

    def _field_types(self) -> dict[str, str]:
        if self._types is None:
            self.fields("contact")
        return self._types or {}

    @staticmethod
    def _from_hubspot(value: str | None, kind: str | None) -> Any:
        if value is None or value == "":
            return None
        if kind == "bool":
            return value.strip().lower() == "true"
        return value



# --- the plugin ------------------------------------------------------------------------

class HubSpotSettings(CrmSettings):
    """``crm.hubspot`` in config.yaml."""

    base_url: OutboundUrl = "https://api.hubapi.com"
    access_token: Secret
    mapping: str = "mappings/hubspot.yaml"



def build(settings: HubSpotSettings, ctx: BuildContext) -> HubSpotConnector:
    unsub = ctx.email_unsubscribe
    kwargs: dict[str, Any] = {}
    if unsub is not None:
        kwargs = {"email_subscription_id": unsub.get("subscription_id"), "legal_basis": unsub.get("legal_basis"),
                  "legal_basis_explanation": unsub.get("legal_basis_explanation", DEFAULT_EXPLANATION)}
    # HubSpot's search index trails writes by seconds: poll a little behind.
    return HubSpotConnector(base_url=settings.base_url, access_token=settings.access_token,
                            ca_bundle=ctx.ca_bundle, timeout=ctx.timeout, poll_lag_seconds=30.0, **kwargs)


def check_subscription(connector: HubSpotConnector, options: dict[str, Any],
                       mask: Callable[[str], str]) -> list[str]:
    """A configured subscription type must exist in the account."""
    sub = options.get("subscription_id")
    if not sub:
        return []
    try:
        types = connector.subscription_types()
    except ConnectorError as exc:
        return [f"email_unsubscribe: cannot read subscription types from hubspot: {mask(str(exc))}"]
    if str(sub) not in types:
        return [f"email_unsubscribe.subscription_id: {sub} is not a subscription type "
                f"in hubspot (known: {', '.join(sorted(types)) or 'none'})"]
    return []


def email_mode(options: dict[str, Any] | None) -> str:
    """How an email opt-out is applied, for ``syncd check``."""
    sub = (options or {}).get("subscription_id")
    if sub:
        return (f"subscription type {sub}: an opt-out sets it UNSUBSCRIBED "
                f"(legal basis {(options or {}).get('legal_basis')}), a newer opt-in SUBSCRIBED")
    return ("unsubscribe from all email (no email_unsubscribe.subscription_id); "
            "an opt-in cannot undo that: set a subscription type to resubscribe")


PLUGIN = CrmPlugin(
    name="hubspot",
    title="HubSpot",
    settings=HubSpotSettings,
    build=build,
    watermark=lambda t: str(int(t.timestamp() * 1000)),     # lastmodifieddate in epoch ms
    id_rules=(IdRule(r"^[0-9]+$", "contact"),),              # all digits: HubSpot's, never Salesforce's
    email_unsubscribe=True,
    check_email_unsubscribe=check_subscription,
    email_mode=email_mode,
    client_loggers=("hubspot",),
    credentials=lambda s: ("access_token", s.base_url),
)


__all__ = ["HUBSPOT_ID", "HubSpotConnector", "error_from_api", "to_hubspot_value", "scrub", "PLUGIN"]
