"""Salesforce connector on simple-salesforce.

simple-salesforce does the REST calls; this module adds what a daemon needs
around them: OAuth against any login URL (simple-salesforce's own login only
knows ``*.salesforce.com``), one re-authentication on an expired session,
pinned TLS trust, short retries, batching into sObject Collections, and the
mapping of Salesforce errors onto :mod:`connectors.errors`.

Ids and phone numbers are validated before they reach a URL or a query.
Mapped errors carry Salesforce's own errorCode (``code``) and message only
(``str(exc)`` reads ``[400 INVALID_FIELD] No such column ...``): never the
access token, never a URL with its query string. They are raised ``from
None`` because simple-salesforce's exceptions embed the full URL (and with it
SOQL/SOSL text holding phone numbers).
"""
from __future__ import annotations

import datetime as dt
import email.utils
import json
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, TypeVar, cast
from urllib.parse import urlparse

import phonenumbers
import requests
from pydantic import Field, field_validator, model_validator

from connectors.errors import AuthFailed, ConnectorError, NotFound, Permanent, QuotaExhausted, RateLimited, \
    Transient
from connectors.http import error_for_status, make_session, parse_retry_after, short_retry, \
    wrap_transport_error
from connectors.plugin import BuildContext, CrmPlugin, IdRule, QuotaLimits
from connectors.settings import CrmSettings, OptionalSecret, OutboundUrl, Strict
from connectors.types import EMAILS_FIELD, SUCCESSOR_FIELD, ChangedRecord, FieldInfo, FoundRecord, Page, RecordRef, RecordUpdate, \
    UpdateResult, Watermark

if TYPE_CHECKING:
    from simple_salesforce import Salesforce
    from simple_salesforce.exceptions import SalesforceError

# simple-salesforce (with zeep) and PyJWT load on first use, not on import: every
# ``syncd`` command imports this module for its settings model (the CRM registry).

T = TypeVar("T")

# \Z, not $: in Python "$" also matches before a trailing newline, and "id\n" must
# never pass into a URL or a query.
SF_ID = re.compile(r"^[a-zA-Z0-9]{15}([a-zA-Z0-9]{3})?\Z")
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
E164 = re.compile(r"^\+[1-9][0-9]{3,14}\Z")
KEY_PREFIXES = {"00Q": "Lead", "003": "Contact"}
OBJECTS = ("Lead", "Contact")
BATCH_SIZE = 200  # sObject Collections limit
READ_IDS = 200    # ids per audit query (``Id IN (...)``)
# "Maximum length of SOQL statements: by default, 100,000 characters" (Salesforce
# Developer Limits, "SOQL and SOSL Limits for Search Queries").
SOQL_MAX_CHARS = 100_000
# SOQL and SOSL Reference, "FIND {SearchQuery}": beyond 4,000 characters the search
# text loses its logical operators; a SOSL answer holds at most 2,000 rows ("LIMIT n").
SOSL_MAX_QUERY = 4000
SOSL_MAX_ROWS = 2000
# A converted Lead is read-only (updates fail with CANNOT_UPDATE_CONVERTED_LEAD, "cannot
# reference converted lead"); the person lives on in the Contact it was converted into,
# which the same lookup finds. Lookups therefore skip converted Leads (Lead.IsConverted;
# SOQL and SOSL Reference, "RETURNING FieldSpec" and SOSL "WHERE").
_OPEN_ONLY = {"Lead": "IsConverted = false"}
# A named Lead that was converted is followed to its Contact (``read`` with
# SUCCESSOR_FIELD): Lead.IsConverted and Lead.ConvertedContactId, "the ID of the contact
# created in the lead conversion" (Change Data Capture, "Change Events for Lead Conversion").
_CONVERSION = ["IsConverted", "ConvertedContactId"]
# Emails per SOQL IN list, by characters: REST requests are limited to 16,384 bytes of
# URI and headers (Help article 000386264), and the query travels in the URL.
SOQL_MAX_IN = 4000
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# The JWT bearer flow's ``aud`` is Salesforce's login server, never the org's own My
# Domain: login.salesforce.com, or test.salesforce.com for sandboxes (Salesforce Help,
# "OAuth 2.0 JWT Bearer Flow for Server-to-Server Integration").
PRODUCTION_AUDIENCE = "https://login.salesforce.com"
SANDBOX_AUDIENCE = "https://test.salesforce.com"
FLOWS = {
    "client_credentials": ("client_id", "client_secret"),
    "password": ("client_id", "client_secret", "username", "password"),
    "jwt": ("client_id", "username"),
    "access_token": ("access_token",),
}
_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_SF_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:?\d{2})\Z")
_NOT_FOUND_CODES = {"ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY", "NOT_FOUND"}
_TRANSIENT_CODES = {"UNABLE_TO_LOCK_ROW", "ALL_OR_NONE_OPERATION_ROLLED_BACK", "SERVER_UNAVAILABLE",
                    "REQUEST_RUNNING_TOO_LONG", "QUERY_TIMEOUT"}
_MAX_MESSAGE = 500
# REQUEST_LIMIT_EXCEEDED names the limit in its message: "TotalRequests Limit exceeded."
# is the daily quota; "ConcurrentRequests (Concurrent API Requests) Limit exceeded" and
# "ConcurrentPerOrgLongTxn Limit exceeded" clear as soon as long calls finish.
_CONCURRENT_LIMIT = re.compile(r"\bConcurrent", re.I)


# --- ids ---------------------------------------------------------------------------

def _suffix(id15: str) -> str:
    # Each 5-char chunk contributes a 5-bit mask of its upper-case letters, as A-Z0-5.
    return "".join(_SUFFIX[sum(1 << i for i, ch in enumerate(id15[start:start + 5]) if "A" <= ch <= "Z")]
                   for start in (0, 5, 10))


def _restore_case(id18: str) -> str | None:
    """The id with its letters' case taken from the suffix (what the suffix is for:
    surviving case-insensitive systems), or None when the suffix cannot be right."""
    chars = list(id18[:15])
    for chunk, code in enumerate(id18[15:].upper()):
        if code not in _SUFFIX:
            return None
        bits = _SUFFIX.index(code)
        for i in range(5):
            pos = chunk * 5 + i
            if bits >> i & 1:
                if not chars[pos].isalpha():
                    return None
                chars[pos] = chars[pos].upper()
            else:
                chars[pos] = chars[pos].lower()
    return "".join(chars) + id18[15:].upper()


def to_18(record_id: str) -> str:
    """The canonical 18-char form of a 15- or 18-char id.

    A 15-char id gains its checksum suffix. An 18-char id gets its letters' case
    restored from the suffix, so one that passed through a case-insensitive
    system (``003xx000004dhpyya4``) names the right record again. Never raises
    for an id matching ``SF_ID``: one whose suffix cannot be right comes back
    unchanged (suffix upper-cased) for :func:`validate_id` to refuse.
    """
    if not SF_ID.match(record_id):
        raise Permanent("not a Salesforce record id", code="MALFORMED_ID")
    if len(record_id) == 15:
        return record_id + _suffix(record_id)
    return _restore_case(record_id) or record_id[:15] + record_id[15:].upper()


def object_for_id(record_id: str) -> str | None:
    """``Lead`` or ``Contact`` from the key prefix; None for other or invalid ids."""
    if not SF_ID.match(record_id):
        return None
    return KEY_PREFIXES.get(record_id[:3])


def validate_id(record_id: Any, obj: str | None = None) -> str:
    """The 18-char id, or Permanent (before any I/O) for anything else.

    With ``obj``, a known key prefix must also agree with it (a Lead id sent
    as a Contact would fail remotely with a less helpful message).
    """
    if not isinstance(record_id, str) or not SF_ID.match(record_id):
        raise Permanent("not a Salesforce record id", code="MALFORMED_ID")
    long_id = to_18(record_id)
    if _suffix(long_id[:15]) != long_id[15:]:
        raise Permanent("Salesforce record id has a wrong checksum suffix", code="MALFORMED_ID")
    known = KEY_PREFIXES.get(record_id[:3])
    if obj is not None and known is not None and known != obj:
        raise Permanent(f"id has the key prefix of {known}, not {obj}", code="MALFORMED_ID")
    return long_id


def soql_quote(value: str) -> str:
    """A SOQL string literal (backslash and quote escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _plausible_email(value: Any) -> bool:
    """Worth searching as an address: one ``@`` with text on both sides, no spaces."""
    if not isinstance(value, str):
        return False
    local, at, domain = value.strip().partition("@")
    return bool(at and local and domain and "@" not in domain and not any(c.isspace() for c in value.strip()))


def _sosl_terms(e164: str) -> list[str]:
    """How one E.164 number is searched: its digits, and its national number when
    that differs (numbers typed without the country code)."""
    terms = [e164[1:]]
    try:
        national = phonenumbers.national_significant_number(phonenumbers.parse(e164, None))
    except phonenumbers.NumberParseException:
        national = ""
    if len(national) >= 2 and national != terms[0]:
        terms.append(national)
    return terms


def _text_batches(values: list[str], terms: Callable[[str], list[str]], limit: int,
                  sep: str = " OR ") -> Iterable[list[str]]:
    """``values`` in batches whose joined terms stay within ``limit`` characters."""
    batch: list[str] = []
    size = 0
    for value in values:
        cost = sum(len(t) + len(sep) for t in terms(value))
        if batch and size + cost > limit:
            yield batch
            batch, size = [], 0
        batch.append(value)
        size += cost
    if batch:
        yield batch


def _validate_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not FIELD_NAME.match(name):
        raise Permanent(f"invalid {what} name", code="INVALID_FIELD")
    return name


def default_audience(instance_url: str, login_url: str | None = None) -> str:
    """The JWT ``aud`` Salesforce accepts: test.salesforce.com for a sandbox org
    (``*.sandbox.my.salesforce.com``, or logging in through test.salesforce.com),
    login.salesforce.com otherwise."""
    hosts = {(urlparse(url).hostname or "").lower() for url in (instance_url, login_url) if url}
    if any(h.endswith(".sandbox.my.salesforce.com") or h == "test.salesforce.com" for h in hosts):
        return SANDBOX_AUDIENCE
    return PRODUCTION_AUDIENCE


def _supported(obj: Any) -> str:
    if obj not in OBJECTS:
        raise Permanent(f"object must be one of {', '.join(OBJECTS)}", code="INVALID_TYPE")
    return str(obj)


def _parse_sf_datetime(text: str) -> dt.datetime:
    m = _SF_DATETIME.match(text)
    if not m:
        raise Permanent("invalid watermark timestamp", code="INVALID_WATERMARK")
    zone = m.group(2)
    zone = "+00:00" if zone == "Z" else (zone if ":" in zone else f"{zone[:3]}:{zone[3:]}")
    base = text[:19]
    frac = (m.group(1) or ".0")[1:7].ljust(6, "0")
    return dt.datetime.fromisoformat(f"{base}.{frac}{zone}").astimezone(dt.timezone.utc)


def _sf_format(value: dt.datetime) -> str:
    """Salesforce's own rendering, as SystemModstamp comes back in JSON."""
    value = value.astimezone(dt.timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}+0000"


def _soql_datetime(value: dt.datetime) -> str:
    # Salesforce stores datetimes to the second; a SOQL literal has no quotes.
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _open_only(obj: str, keyword: str) -> str:
    """`` WHERE|AND <condition>`` that leaves out ``obj``'s closed records (see ``_OPEN_ONLY``)."""
    return f" {keyword} {_OPEN_ONLY[obj]}" if obj in _OPEN_ONLY else ""


# --- the connector -------------------------------------------------------------------


class SalesforceConnector:
    """CrmConnector for Salesforce Leads and Contacts.

    ``auth`` keys: ``flow`` (client_credentials | jwt | password | access_token),
    ``login_url`` (defaults to ``instance_url``), ``client_id``, ``client_secret``,
    ``username``, ``password`` (plus optional ``security_token``), ``private_key``
    or ``private_key_file`` (PEM, for jwt; optional ``audience``, see
    :func:`default_audience`), ``access_token``.

    Nothing is fetched at construction: the first call authenticates.
    ``settle_seconds`` keeps :meth:`changed_since` from reading records modified
    in the last few seconds of Salesforce's own clock (see there).
    ``default_region`` is the country of phone numbers stored without one.
    """

    name = "salesforce"

    def __init__(self, instance_url: str, api_version: str, auth: dict[str, Any],
                 ca_bundle: str | None = None, timeout: float = 30.0, *,
                 settle_seconds: float = 5.0, retry_attempts: int = 3,
                 retry_initial: float = 0.5, default_region: str = "US") -> None:
        self.instance_url = instance_url.rstrip("/")
        self.api_version = str(api_version).lstrip("v")
        if not re.fullmatch(r"\d+\.\d", self.api_version):
            raise ValueError("api_version must look like '62.0'")
        self.flow = str(auth.get("flow", "client_credentials"))
        if self.flow not in FLOWS:
            raise AuthFailed(f"unknown auth flow {self.flow!r}; use one of {', '.join(FLOWS)}")
        missing = [k for k in FLOWS[self.flow] if not auth.get(k)]
        if self.flow == "jwt" and not (auth.get("private_key") or auth.get("private_key_file")):
            missing.append("private_key or private_key_file")
        if missing:
            raise AuthFailed(f"auth flow {self.flow!r} needs: {', '.join(missing)}")
        self._auth = dict(auth)
        self.login_url = str(auth.get("login_url") or self.instance_url).rstrip("/")
        self.audience = str(auth.get("audience") or default_audience(self.instance_url, self.login_url))
        self.default_region = default_region
        self._usage: tuple[int, int] | None = None
        self.settle_seconds = settle_seconds
        self._retry = short_retry(attempts=retry_attempts, initial=retry_initial)
        self._session = make_session(ca_bundle, timeout)
        self._session.hooks["response"].append(self._remember_response)
        self._last = threading.local()
        self._lock = threading.Lock()
        self._sf: Salesforce | None = None
        self._token: str | None = None
        self._generation = 0
        self._fields: dict[str, dict[str, FieldInfo]] = {}

    @property
    def instance_in_use(self) -> str | None:
        """The instance the last token answer named (it can differ from ``instance_url``)."""
        return f"https://{self._sf.sf_instance}" if self._sf is not None else None

    # --- auth ---------------------------------------------------------------------
    def _authenticate(self) -> None:
        """Fetch a token (or take the configured one) and build a fresh client."""
        from simple_salesforce import Salesforce

        if self.flow == "access_token":
            token, instance = str(self._auth["access_token"]), self.instance_url
        else:
            token, instance = self._token_request()
        self._sf = Salesforce(instance_url=instance, session_id=token, version=self.api_version,
                              session=self._session)
        self._token = token
        self._generation += 1

    def _token_request(self) -> tuple[str, str]:
        a = self._auth
        if self.flow == "client_credentials":
            data = {"grant_type": "client_credentials", "client_id": a["client_id"],
                    "client_secret": a["client_secret"]}
        elif self.flow == "password":
            data = {"grant_type": "password", "client_id": a["client_id"],
                    "client_secret": a["client_secret"], "username": a["username"],
                    "password": str(a["password"]) + str(a.get("security_token") or "")}
        else:
            data = {"grant_type": JWT_GRANT, "assertion": self._jwt_assertion()}
        try:
            resp = self._session.post(f"{self.login_url}/services/oauth2/token", data=data,
                                      headers={"Accept": "application/json"})
        except requests.RequestException as exc:
            raise wrap_transport_error(exc) from None
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if resp.status_code != 200:
            code = str(body.get("error") or f"HTTP {resp.status_code}")
            message = self._clean(str(body.get("error_description") or "token request refused"))
            if resp.status_code in (400, 401, 403):
                raise AuthFailed(message, code=code, status=resp.status_code)
            raise error_for_status(resp, message, code)
        token, instance = body.get("access_token"), body.get("instance_url")
        if not isinstance(token, str) or not token or not isinstance(instance, str) \
                or not instance.startswith("https://"):
            raise AuthFailed("token response has no access_token or https instance_url")
        return token, instance

    def _jwt_assertion(self) -> str:
        import jwt

        a = self._auth
        key = a.get("private_key")
        if not key:
            try:
                key = Path(str(a["private_key_file"])).read_text()
            except OSError:
                raise AuthFailed("jwt private_key_file cannot be read") from None
        claims = {"iss": a["client_id"], "sub": a["username"],
                  "aud": self.audience,
                  "exp": int(time.time()) + 180}
        try:
            return jwt.encode(claims, key, algorithm="RS256")
        except (ValueError, TypeError, jwt.PyJWTError):
            raise AuthFailed("jwt private key is not a usable RSA PEM key") from None

    def _client(self) -> tuple[Salesforce, int]:
        with self._lock:
            if self._sf is None:
                self._authenticate()
            assert self._sf is not None
            return self._sf, self._generation

    def _reauthenticate(self, failed_generation: int) -> tuple[Salesforce, int]:
        """Re-auth unless another thread already replaced the failed session."""
        with self._lock:
            if self._sf is None or self._generation == failed_generation:
                self._authenticate()
            assert self._sf is not None
            return self._sf, self._generation

    # --- calling ------------------------------------------------------------------
    def _remember_response(self, resp: requests.Response, *args: Any, **kwargs: Any) -> None:
        """requests hook: keep the headers simple-salesforce's exceptions drop, and the
        org's API usage from ``Sforce-Limit-Info``, which every REST answer carries
        (errors too; simple-salesforce reads it from successful answers only)."""
        self._last.status = resp.status_code
        self._last.headers = {k: resp.headers.get(k) for k in ("Retry-After", "Date")}
        info = resp.headers.get("Sforce-Limit-Info")
        if info:
            from simple_salesforce import Salesforce

            usage = Salesforce.parse_api_usage(info).get("api-usage")
            if usage is not None and usage[1] > 0:
                self._usage = (int(usage[0]), int(usage[1]))

    def api_usage(self) -> tuple[int, int] | None:
        """(used, daily limit) from the last ``Sforce-Limit-Info`` seen; None before any."""
        return self._usage

    def probe_quota(self) -> tuple[int, int]:
        """(used, daily limit) fresh from the ``/limits`` resource (DailyApiRequests)."""
        body = self._call(lambda sf: sf.limits())
        daily = body.get("DailyApiRequests") if isinstance(body, dict) else None
        limit = daily.get("Max") if isinstance(daily, dict) else None
        remaining = daily.get("Remaining") if isinstance(daily, dict) else None
        if not isinstance(limit, int) or not isinstance(remaining, int) or limit <= 0:
            raise Transient("limits response has no DailyApiRequests Max/Remaining")
        self._usage = (max(0, limit - remaining), limit)
        return self._usage

    def _last_header(self, name: str, status: int | None = None) -> str | None:
        if status is not None and getattr(self._last, "status", None) != status:
            return None
        return (getattr(self._last, "headers", None) or {}).get(name)

    def _call(self, op: Callable[[Salesforce], T]) -> T:
        """Run one remote operation: short retries for Transient errors, and on an
        expired session exactly one re-authentication and one repeat."""
        def attempt() -> T:
            sf, generation = self._client()
            try:
                return self._mapped(op, sf)
            except AuthFailed as exc:
                if exc.code != "INVALID_SESSION_ID" or self.flow == "access_token":
                    raise
            sf, _ = self._reauthenticate(generation)
            return self._mapped(op, sf)
        return self._retry(attempt)()

    def _mapped(self, op: Callable[[Salesforce], T], sf: Salesforce) -> T:
        from simple_salesforce.exceptions import SalesforceError

        try:
            return op(sf)
        except SalesforceError as exc:
            raise self._map_error(exc) from None
        except requests.RequestException as exc:
            raise wrap_transport_error(exc) from None

    def _map_error(self, exc: SalesforceError) -> ConnectorError:
        status = int(exc.status or 0)
        code, text = self._error_parts(exc.content)
        message = self._clean(text)
        retry_after = parse_retry_after(self._last_header("Retry-After", status))
        if code == "REQUEST_LIMIT_EXCEEDED":
            # Retry-After, when sent, is the server's word; otherwise a concurrency limit
            # gets the short backoff and the daily quota a pause (the pusher's decision).
            if _CONCURRENT_LIMIT.search(text):
                return RateLimited(message, retry_after=retry_after, code=code, status=status)
            return QuotaExhausted(message, retry_after=retry_after, code=code, status=status)
        if status == 429 or (status >= 500 and retry_after is not None):
            return RateLimited(message, retry_after=retry_after, code=code, status=status)
        if code in _TRANSIENT_CODES:
            return Transient(message, code=code, status=status)
        if status == 401:
            return AuthFailed(message, code=code or "INVALID_SESSION_ID", status=status)
        if status == 403:
            return AuthFailed(message, code=code, status=status)
        if status == 404 or code in _NOT_FOUND_CODES:
            return NotFound(message, code=code, status=status)
        if status == 408 or status >= 500:
            return Transient(message, code=code, status=status)
        return Permanent(message, code=code, status=status)

    @staticmethod
    def _error_parts(content: Any) -> tuple[str | None, str]:
        """Salesforce's errorCode and message from an error body (list, dict or text)."""
        if isinstance(content, (bytes, bytearray)):
            content = content.decode("utf-8", "replace")
        if isinstance(content, str):
            try:
                content = json.loads(content)
            except ValueError:
                return None, "unexpected non-JSON error response"
        if isinstance(content, list) and content and isinstance(content[0], dict):
            content = content[0]
        if isinstance(content, dict):
            code = content.get("errorCode") or content.get("error")
            text = content.get("message") or content.get("error_description") or "no message"
            return (str(code) if code else None), str(text)
        return None, "unexpected error response"

    def _clean(self, message: str) -> str:
        if self._token:
            message = message.replace(self._token, "***")
        return message[:_MAX_MESSAGE]

    # --- CrmConnector ---------------------------------------------------------------
    def fields(self, obj: str) -> dict[str, FieldInfo]:
        """Field metadata from describe, cached for the connector's lifetime."""
        _validate_name(obj, "object")
        cached = self._fields.get(obj)
        if cached is not None:
            return cached
        from simple_salesforce import SFType

        described = self._call(lambda sf: SFType(obj, sf.session_id, sf.sf_instance, self.api_version,
                                                 session=self._session, salesforce=sf).describe())
        result = {str(f["name"]): FieldInfo(name=str(f["name"]), type=str(f.get("type", "")),
                                           updateable=bool(f.get("updateable")),
                                           label=str(f.get("label") or ""))
                  for f in (described or {}).get("fields", []) if isinstance(f, dict) and f.get("name")}
        self._fields[obj] = result
        return result

    def get(self, ref: RecordRef, fields: list[str]) -> dict[str, Any]:
        """One record's values (for checks and tests). Bad ids raise Permanent before I/O."""
        _supported(ref.obj)
        record_id = validate_id(ref.record_id, ref.obj)
        names = [_validate_name(f, "field") for f in fields]
        body = self._call(lambda sf: sf.restful(f"sobjects/{ref.obj}/{record_id}",
                                                params={"fields": ",".join(names)} if names else None))
        return {k: v for k, v in (body or {}).items() if k != "attributes"}

    def update(self, updates: list[RecordUpdate]) -> list[UpdateResult]:
        """Write updates through sObject Collections (``allOrNone: false``), 200 a call.

        Invalid refs and field names fail alone, before any I/O. Updates are
        sorted by object (so a call has at most two type chunks) and an id never
        appears twice in one call; results come back in input order.
        """
        results: list[UpdateResult | None] = [None] * len(updates)
        pending: list[tuple[int, dict[str, Any]]] = []
        for index, upd in enumerate(updates):
            try:
                record = self._collection_record(upd)
            except Permanent as exc:
                results[index] = UpdateResult(upd.ref, exc)
                continue
            if len(record) == 2:  # attributes + id: nothing to write
                results[index] = UpdateResult(upd.ref)
            else:
                pending.append((index, record))
        pending.sort(key=lambda item: item[1]["attributes"]["type"])
        for batch in self._batches(pending):
            records = [rec for _, rec in batch]

            def write(sf: Salesforce, records: list[dict[str, Any]] = records) -> Any:
                return sf.restful("composite/sobjects", method="PATCH",
                                  json={"allOrNone": False, "records": records})

            answers = self._call(write)
            if not isinstance(answers, list) or len(answers) != len(batch):
                raise Transient("unexpected sObject Collections response")
            for (index, _), answer in zip(batch, answers):
                results[index] = UpdateResult(updates[index].ref, self._save_error(answer))
        return cast("list[UpdateResult]", results)  # every slot is filled above

    @staticmethod
    def _collection_record(upd: RecordUpdate) -> dict[str, Any]:
        obj = _supported(upd.ref.obj)
        record: dict[str, Any] = {"attributes": {"type": obj}, "id": validate_id(upd.ref.record_id, obj)}
        for name, value in upd.fields.items():
            if _validate_name(name, "field").lower() in ("id", "attributes"):
                raise Permanent("the record id cannot be updated", code="INVALID_FIELD")
            record[name] = value
        # Salesforce has no separate unsubscribe API: email consent is the field itself.
        if upd.email_unsubscribe is not None and "HasOptedOutOfEmail" not in record:
            record["HasOptedOutOfEmail"] = bool(upd.email_unsubscribe)
        return record

    @staticmethod
    def _batches(pending: list[tuple[int, dict[str, Any]]]) -> Iterable[list[tuple[int, dict]]]:
        batch: list[tuple[int, dict[str, Any]]] = []
        ids: set[str] = set()
        for item in pending:
            if len(batch) == BATCH_SIZE or item[1]["id"] in ids:
                yield batch
                batch, ids = [], set()
            batch.append(item)
            ids.add(item[1]["id"])
        if batch:
            yield batch

    def _save_error(self, answer: Any) -> ConnectorError | None:
        """None for a successful SaveResult, else its first error mapped."""
        if isinstance(answer, dict) and answer.get("success") is True:
            return None
        errors = answer.get("errors") if isinstance(answer, dict) else None
        first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
        code = str(first.get("statusCode") or "UNKNOWN_EXCEPTION")
        message = self._clean(str(first.get("message") or "record not saved"))
        if code in _TRANSIENT_CODES:
            return Transient(message, code=code)
        if code in _NOT_FOUND_CODES:
            return NotFound(message, code=code)
        return Permanent(message, code=code)

    def find_by_phone(self, e164: str) -> list[RecordRef]:
        """Leads and Contacts with this number in a phone field (see :meth:`find`)."""
        if not isinstance(e164, str) or not E164.match(e164):
            raise Permanent("phone number is not in E.164 form", code="INVALID_PHONE")
        return [found.ref for found in self.find([e164], [])]

    def find(self, phones: list[str], emails: list[str]) -> list[FoundRecord]:
        """Leads and Contacts carrying one of ``phones`` (E.164) in a phone field or one
        of ``emails`` in ``Email``.

        Phones: one SOSL ``FIND {a OR b OR ...} IN PHONE FIELDS`` per batch, the search
        text kept within SOSL's 4,000 characters (beyond them Salesforce drops the OR
        operators). Salesforce keeps numbers as typed (US users mostly type ``(330)
        555-1234``, without the country code), so each number is searched as its E.164
        digits OR its national number, and a record counts only for the numbers one of
        its phone fields parses to (in ``default_region``): a hit whose number merely
        ends the same (another country, an extension) is not this person. A batch whose
        answer reaches SOSL's 2,000-row cap is split and searched again.

        Converted Leads are skipped (``_OPEN_ONLY``).

        Emails: ``SELECT Id, Email FROM Lead|Contact WHERE Email IN (...)`` per batch
        (SOQL compares text case-insensitively), kept to the same length so the GET URL
        stays far below the 16,384-byte limit.
        """
        wanted_phones = list(dict.fromkeys(p for p in phones if isinstance(p, str) and E164.match(p)))
        wanted_emails = list(dict.fromkeys(e.strip().lower() for e in emails if _plausible_email(e)))
        found: dict[RecordRef, tuple[dict[str, None], dict[str, None]]] = {}
        if wanted_phones:
            phone_fields = {obj: self._phone_fields(obj) for obj in OBJECTS}
            for batch in _text_batches(wanted_phones, _sosl_terms, SOSL_MAX_QUERY):
                self._search_phones(batch, phone_fields, found)
        for batch in _text_batches(wanted_emails, lambda e: [soql_quote(e)], SOQL_MAX_IN, sep=", "):
            for obj in OBJECTS:
                self._query_emails(obj, batch, found)
        return [FoundRecord(ref, tuple(p), tuple(e)) for ref, (p, e) in found.items()]

    def _search_phones(self, batch: list[str], phone_fields: dict[str, list[str]],
                       found: dict[RecordRef, tuple[dict[str, None], dict[str, None]]]) -> None:
        terms = [t for phone in batch for t in _sosl_terms(phone)]
        returning = ", ".join(f"{obj}({', '.join(['Id', *phone_fields[obj]])}{_open_only(obj, 'WHERE')})"
                              for obj in OBJECTS)
        sosl = f"FIND {{{' OR '.join(terms)}}} IN PHONE FIELDS RETURNING {returning}"
        body = self._call(lambda sf: sf.search(sosl))
        rows = [r for r in (body or {}).get("searchRecords", []) or [] if isinstance(r, dict)]
        if len(rows) >= SOSL_MAX_ROWS and len(batch) > 1:
            half = len(batch) // 2  # the answer may be cut short: search each half alone
            self._search_phones(batch[:half], phone_fields, found)
            self._search_phones(batch[half:], phone_fields, found)
            return
        wanted = set(batch)
        for row in rows:
            ref = self._row_ref(row)
            if ref is None:
                continue
            numbers = {n for n in (self._e164(row.get(name)) for name in phone_fields[ref.obj]) if n} & wanted
            for number in sorted(numbers):
                found.setdefault(ref, ({}, {}))[0].setdefault(number)

    def _query_emails(self, obj: str, batch: list[str],
                      found: dict[RecordRef, tuple[dict[str, None], dict[str, None]]]) -> None:
        soql = (f"SELECT Id, Email FROM {obj} WHERE Email IN ({', '.join(soql_quote(e) for e in batch)})"
                f"{_open_only(obj, 'AND')}")
        body = self._call(lambda sf: sf.query_all(soql))
        wanted = set(batch)
        for row in (body or {}).get("records", []) or []:
            ref = self._row_ref(row) if isinstance(row, dict) else None
            email = row.get("Email") if ref is not None else None
            if ref is not None and isinstance(email, str) and email.strip().lower() in wanted:
                found.setdefault(ref, ({}, {}))[1].setdefault(email.strip().lower())

    def _row_ref(self, row: dict[str, Any]) -> RecordRef | None:
        """The record a search or query row names, when its type and id are ones syncd
        may put into a URL."""
        obj = (row.get("attributes") or {}).get("type")
        record_id = row.get("Id")
        if obj not in OBJECTS or not isinstance(record_id, str) or not SF_ID.match(record_id):
            return None
        return RecordRef(crm=self.name, obj=obj, record_id=to_18(record_id))

    def _phone_fields(self, obj: str) -> list[str]:
        """The object's phone-type fields (those SOSL's PHONE FIELDS scope searches)."""
        return sorted(name for name, info in self.fields(obj).items()
                      if info.type == "phone" and FIELD_NAME.match(name))

    def _e164(self, stored: Any) -> str | None:
        """A stored phone value as E.164 (national numbers read in ``default_region``)."""
        if not isinstance(stored, str) or not stored.strip():
            return None
        try:
            parsed = phonenumbers.parse(stored, self.default_region)
        except phonenumbers.NumberParseException:
            return None
        return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)

    def changed_since(self, mark: Watermark, fields: list[str], limit: int = 200) -> Page:
        """Leads and Contacts modified after ``mark``, oldest first, with ``fields``.

        Watermark format: ``ts`` is JSON ``{"Contact": [stamp, id], "Lead": [stamp, id]}``,
        one position per object, because each object is read with its own
        ``SystemModstamp > t OR (SystemModstamp = t AND Id > 'id')`` keyset query
        and ids only order reliably within one object. ``last_id`` is not used in
        returned marks. A plain Salesforce datetime in ``ts`` (with ``last_id`` as
        tie-breaker when it is that object's id, otherwise ``>=``) starts both
        objects there; ``ts=None`` reads from the beginning.

        Records stamped within ``settle_seconds`` of Salesforce's clock (the
        response's Date header) are left for a later poll: a transaction still
        committing can carry an older stamp than rows already read, and
        stamps have one-second resolution.
        """
        if limit < 1:
            raise ValueError("limit must be positive")
        wanted = [_validate_name(f, "field") for f in fields]
        positions = self._positions(mark)
        per_object: list[tuple[str, list[tuple[dt.datetime, dict[str, Any]]], bool]] = []
        for obj in OBJECTS:
            rows, full, server_now = self._changed_rows(obj, positions.get(obj), wanted, limit)
            cutoff = server_now - dt.timedelta(seconds=self.settle_seconds)
            settled = [(stamp, row) for stamp, row in rows if stamp <= cutoff]
            per_object.append((obj, settled, full and len(settled) == len(rows)))
        # Oldest first across objects; within one object Salesforce's own order is kept.
        merged = sorted(((stamp, OBJECTS.index(obj), n, obj, row) for obj, rows, _ in per_object
                         for n, (stamp, row) in enumerate(rows)), key=lambda t: t[:3])
        taken = merged[:limit]
        more = len(merged) > limit or any(full for _, _, full in per_object)
        new_positions = {obj: [_sf_format(pos[0]), pos[1]] for obj, pos in positions.items()
                         if pos is not None}
        records: list[ChangedRecord] = []
        for stamp, _, _, obj, row in taken:
            record_id = to_18(row["Id"])
            new_positions[obj] = [_sf_format(stamp), record_id]
            values = {name: row.get(name) for name in row if name not in ("attributes", "Id")}
            records.append(ChangedRecord(ref=RecordRef(self.name, obj, record_id),
                                         values=self._requested(values, wanted),
                                         modified=str(row["SystemModstamp"])))
        ts = json.dumps(new_positions, sort_keys=True, separators=(",", ":")) if new_positions else mark.ts
        next_mark = Watermark(ts=ts, last_id=None if new_positions else mark.last_id)
        return Page(records=records, next_mark=next_mark, more=more)

    @staticmethod
    def _requested(values: dict[str, Any], wanted: list[str]) -> dict[str, Any]:
        """Values keyed by the caller's names (Salesforce names are case-insensitive)."""
        lowered = {k.lower(): v for k, v in values.items()}
        return {name: lowered[name.lower()] for name in wanted if name.lower() in lowered}

    @staticmethod
    def _positions(mark: Watermark) -> dict[str, tuple[dt.datetime, str | None] | None]:
        """Per-object (stamp, last id) from a watermark; see :meth:`changed_since`."""
        if not mark.ts:
            return {obj: None for obj in OBJECTS}
        if mark.ts.lstrip().startswith("{"):
            try:
                raw = json.loads(mark.ts)
                out: dict[str, tuple[dt.datetime, str | None] | None] = {}
                for obj in OBJECTS:
                    item = raw.get(obj)
                    out[obj] = None if item is None else (
                        _parse_sf_datetime(str(item[0])),
                        None if item[1] is None else validate_id(item[1], obj))
                return out
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                raise Permanent("invalid watermark", code="INVALID_WATERMARK") from None
        stamp = _parse_sf_datetime(mark.ts)
        last = mark.last_id if mark.last_id and SF_ID.match(mark.last_id) else None
        return {obj: (stamp, validate_id(last) if last and object_for_id(last) == obj else None)
                for obj in OBJECTS}

    def _changed_rows(self, obj: str, position: tuple[dt.datetime, str | None] | None,
                      wanted: list[str], limit: int
                      ) -> tuple[list[tuple[dt.datetime, dict[str, Any]]], bool, dt.datetime]:
        """Up to ``limit`` rows of one object past ``position``, whether the limit
        was reached, and Salesforce's clock at answer time."""
        existing = {name.lower(): name for name in self.fields(obj)}
        select = ["Id", "SystemModstamp"]
        for name in wanted:
            canonical = existing.get(name.lower())
            if canonical and canonical not in select:
                select.append(canonical)
        soql = f"SELECT {', '.join(select)} FROM {obj}"
        if position is not None:
            stamp, last_id = position
            literal = _soql_datetime(stamp)
            if last_id:
                soql += (f" WHERE SystemModstamp > {literal} OR (SystemModstamp = {literal}"
                         f" AND Id > {soql_quote(last_id)})")
            else:
                soql += f" WHERE SystemModstamp >= {literal}"
        soql += f" ORDER BY SystemModstamp, Id LIMIT {int(limit)}"

        def run(sf: Salesforce) -> tuple[list[dict[str, Any]], dt.datetime]:
            page = sf.query(soql)
            server_now = self._server_time()
            rows = list(page.get("records", []))
            while not page.get("done", True) and page.get("nextRecordsUrl") and len(rows) < limit:
                page = sf.query_more(page["nextRecordsUrl"], identifier_is_url=True)
                rows.extend(page.get("records", []))
            return rows, server_now

        rows, server_now = self._call(run)
        out: list[tuple[dt.datetime, dict[str, Any]]] = []
        for row in rows[:limit]:
            record_id, modstamp = row.get("Id"), row.get("SystemModstamp")
            if isinstance(record_id, str) and SF_ID.match(record_id) and isinstance(modstamp, str) \
                    and _SF_DATETIME.match(modstamp):
                out.append((_parse_sf_datetime(modstamp), dict(row)))
        return out, len(rows) >= limit, server_now

    # --- audit: read mapped fields of known records ---------------------------------
    def read(self, refs: list[RecordRef], fields: list[str]) -> dict[RecordRef, dict[str, Any]]:
        """The values of ``fields`` on each record, by SOQL ``Id IN (...)``: at most
        ``READ_IDS`` ids per query, fewer if the statement would pass Salesforce's
        100,000-character SOQL limit. A record that no longer exists (deleted, or an id
        of another org) is simply absent from the answer. Ids are validated (and
        refs of other objects or CRMs left out) before any text reaches the query."""
        want_emails = EMAILS_FIELD in fields
        want_successor = SUCCESSOR_FIELD in fields
        names = [_validate_name(f, "field") for f in fields if f not in (EMAILS_FIELD, SUCCESSOR_FIELD)]
        extra = ["Email"] if want_emails else []
        by_obj: dict[str, dict[str, RecordRef]] = {}
        for ref in refs:
            if ref.crm != self.name or ref.obj not in OBJECTS:
                continue
            try:
                long_id = validate_id(ref.record_id, ref.obj)
            except Permanent:
                continue
            by_obj.setdefault(ref.obj, {})[long_id] = ref
        found: dict[RecordRef, dict[str, Any]] = {}
        for obj, wanted in by_obj.items():
            conversion = _CONVERSION if want_successor and obj == "Lead" else []
            select = ["Id", *[n for n in dict.fromkeys([*names, *extra, *conversion]) if n.lower() != "id"]]
            for soql in self._read_queries(obj, select, list(wanted)):
                for row in self._query_rows(soql):
                    record_id = row.get("Id")
                    if not isinstance(record_id, str) or not SF_ID.match(record_id):
                        continue
                    hit = wanted.get(to_18(record_id))
                    if hit is not None:
                        values = {k: v for k, v in row.items() if k not in ("attributes", "Id")}
                        found[hit] = self._requested(values, names)
                        if want_emails:
                            email = self._requested(values, ["Email"]).get("Email")
                            found[hit][EMAILS_FIELD] = [email] if isinstance(email, str) and email.strip() else []
                        if want_successor:
                            found[hit][SUCCESSOR_FIELD] = self._converted_to(self._requested(values, conversion))
        return found

    def _converted_to(self, values: dict[str, Any]) -> RecordRef | None:
        """The Contact a converted Lead became (None: not converted, or no valid id)."""
        contact = values.get("ConvertedContactId")
        if values.get("IsConverted") is not True or not isinstance(contact, str) or not SF_ID.match(contact):
            return None
        return RecordRef(self.name, "Contact", to_18(contact))

    @staticmethod
    def _read_queries(obj: str, select: list[str], ids: list[str]) -> Iterable[str]:
        """``SELECT <select> FROM <obj> WHERE Id IN (...)`` statements covering ``ids``."""
        head = f"SELECT {', '.join(select)} FROM {obj} WHERE Id IN ("
        chunk: list[str] = []
        size = len(head) + 1
        for record_id in ids:
            literal = soql_quote(record_id)
            if chunk and (len(chunk) == READ_IDS or size + len(literal) + 2 > SOQL_MAX_CHARS):
                yield head + ", ".join(chunk) + ")"
                chunk, size = [], len(head) + 1
            chunk.append(literal)
            size += len(literal) + 2
        if chunk:
            yield head + ", ".join(chunk) + ")"

    def _query_rows(self, soql: str) -> list[dict[str, Any]]:
        """Every row of one SOQL query (following ``nextRecordsUrl``)."""
        def run(sf: Salesforce) -> list[dict[str, Any]]:
            page = sf.query(soql)
            rows = list(page.get("records", []))
            while not page.get("done", True) and page.get("nextRecordsUrl"):
                page = sf.query_more(page["nextRecordsUrl"], identifier_is_url=True)
                rows.extend(page.get("records", []))
            return rows
        return [row for row in self._call(run) if isinstance(row, dict)]

    def _server_time(self) -> dt.datetime:
        """Salesforce's clock from the last response's Date header (ours if absent)."""
        header = self._last_header("Date")
        if header:
            try:
                return email.utils.parsedate_to_datetime(header).astimezone(dt.timezone.utc)
            except (TypeError, ValueError):
                pass
        return dt.datetime.now(dt.timezone.utc)


# --- the plugin ------------------------------------------------------------------------

class SalesforceAuth(Strict):
    flow: Literal["client_credentials", "jwt", "password", "access_token"]
    login_url: OutboundUrl | None = None
    client_id: str | None = None
    client_secret: OptionalSecret = None
    username: str | None = None
    password: OptionalSecret = None
    private_key_file: str | None = None
    audience: str | None = None  # jwt aud; default: login.salesforce.com / test.salesforce.com
    access_token: OptionalSecret = None

    @model_validator(mode="after")
    def _needs(self) -> "SalesforceAuth":
        needs = {
            "client_credentials": ("login_url", "client_id", "client_secret"),
            "jwt": ("login_url", "client_id", "username", "private_key_file"),
            "password": ("login_url", "client_id", "client_secret", "username", "password"),
            "access_token": ("access_token",),
        }[self.flow]
        missing = [k for k in needs if not getattr(self, k)]
        if missing:
            raise ValueError(f"flow {self.flow} needs {', '.join(missing)}")
        return self


class SalesforceSettings(CrmSettings):
    """``crm.salesforce`` in config.yaml."""

    instance_url: OutboundUrl
    api_version: str = "62.0"
    auth: SalesforceAuth
    mapping: str = "mappings/salesforce.yaml"
    # Share of the org's daily API quota syncd may use (other integrations need the rest);
    # at it, pushes pause and /limits is checked every limits_probe_seconds until quota is back.
    api_budget_percent: float = Field(90.0, gt=0, le=100)
    limits_probe_seconds: float = Field(300.0, gt=0, le=3600)

    @field_validator("api_version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not re.fullmatch(r"\d{2,3}\.0", v):
            raise ValueError("must look like \"62.0\"")
        return v


def build(settings: SalesforceSettings, ctx: BuildContext) -> SalesforceConnector:
    auth = settings.auth.model_dump()
    if settings.auth.private_key_file:
        auth["private_key_file"] = ctx.resolve(settings.auth.private_key_file)
    return SalesforceConnector(instance_url=settings.instance_url, api_version=settings.api_version, auth=auth,
                               ca_bundle=ctx.ca_bundle, timeout=ctx.timeout, default_region=ctx.default_region)


def _routable_id(ext_id: str) -> str | None:
    """The 18-char id; None for anything a (possibly looser) routing rule let through
    that is not a Salesforce id."""
    return to_18(ext_id) if SF_ID.fullmatch(ext_id) else None


def _endpoints(settings: SalesforceSettings) -> list[tuple[str, str]]:
    """The token endpoint's server is called first, except with a ready access token."""
    if settings.auth.flow != "access_token" and settings.auth.login_url:
        return [("auth.login_url", settings.auth.login_url)]
    return [("instance_url", settings.instance_url)]


def _credentials(settings: SalesforceSettings) -> tuple[str, str]:
    if settings.auth.flow == "access_token":
        return "auth.access_token", settings.instance_url
    return "auth", f"{(settings.auth.login_url or settings.instance_url).rstrip('/')}/services/oauth2/token"


PLUGIN = CrmPlugin(
    name="salesforce",
    title="Salesforce",
    settings=SalesforceSettings,
    build=build,
    watermark=lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.000+0000"),
    # The object comes from the key prefix. Broad: all-digit ids are HubSpot's when HubSpot is on.
    id_rules=(IdRule(SF_ID.pattern, broad=True),),
    normalise_id=_routable_id,
    object_for_id=object_for_id,
    # No separate unsubscribe API: email consent is a field on the record.
    unsubscribe_hint="map a field such as HasOptedOutOfEmail",
    client_loggers=("simple_salesforce",),
    quota=lambda s: QuotaLimits(budget_percent=s.api_budget_percent, probe_seconds=s.limits_probe_seconds),
    endpoints=_endpoints,
    credentials=_credentials,
    successor_objects=frozenset({"Lead"}),      # a converted Lead is followed to its Contact
)
