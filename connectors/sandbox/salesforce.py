"""A Salesforce REST API simulator (HTTPS), for tests, benchmarks and ``syncd demo``.

It covers what syncd touches: the OAuth token endpoint (client credentials,
username-password and JWT bearer flows), sObject describe / read / update,
sObject Collections update, SOQL queries with paging, and SOSL phone search.
Response bodies and error shapes follow Salesforce's REST API documentation,
so the connector is exercised through simple-salesforce's real code paths.

Deliberate simplifications: a small SOQL subset (no relationships, functions
or aggregates), ids compare as case-sensitive strings, datetimes have
one-second resolution (as Salesforce stores them).
"""
from __future__ import annotations

from collections import Counter

import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypedDict

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Response, request

from connectors.sandbox.base import Sandbox
from connectors.sandbox.tls import SandboxTLS

KEY_PREFIXES = {"Lead": "00Q", "Contact": "003"}
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# The JWT bearer flow's accepted audiences (Salesforce Help, "OAuth 2.0 JWT Bearer Flow for
# Server-to-Server Integration", remoteaccess_oauth_jwt_flow.htm): the login server, not My Domain.
PRODUCTION_AUDIENCE = "https://login.salesforce.com"
SOQL_MAX_CHARS = 100_000
SANDBOX_AUDIENCE = "https://test.salesforce.com"
# REQUEST_LIMIT_EXCEEDED texts. The REST API guide ("Status Codes and Error Responses",
# errorcodes.htm) documents 403 and the errorCode but not the messages; these are the
# texts Salesforce is widely reported to send (help article 000389067 for the first).
TOTAL_REQUESTS_EXCEEDED = "TotalRequests Limit exceeded."
CONCURRENT_LIMIT_MESSAGES = {
    "ConcurrentRequests": "ConcurrentRequests (Concurrent API Requests) Limit exceeded.",
    "ConcurrentPerOrgLongTxn": "ConcurrentPerOrgLongTxn Limit exceeded.",
}
_ID = re.compile(r"^[a-zA-Z0-9]{15}([a-zA-Z0-9]{3})?\Z")
SOSL_MAX_ROWS = 2000
_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_UTC = dt.timezone.utc
_SESSION_INVALID = [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
_NOT_FOUND = [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]
_ROLLED_BACK = ("Record rolled back because not all records were valid and the request "
                "was using AllOrNone header")


def _checksum(id15: str) -> str:
    out = ""
    for start in (0, 5, 10):
        bits = sum(1 << i for i, ch in enumerate(id15[start:start + 5]) if "A" <= ch <= "Z")
        out += _SUFFIX[bits]
    return out


def restore_id(id18: str) -> str | None:
    """An 18-char id with its case restored from the suffix (Salesforce accepts
    18-char ids case-insensitively), or None when the suffix does not fit."""
    suffix = id18[15:].upper()
    if len(id18) != 18 or any(ch not in _SUFFIX for ch in suffix):
        return None
    base = ""
    for pos, ch in enumerate(id18[:15]):
        upper = _SUFFIX.index(suffix[pos // 5]) >> (pos % 5) & 1
        if upper and not ch.isalpha():
            return None
        base += ch.upper() if upper else ch.lower()
    return base + suffix


def sf_id18(value: str) -> str:
    """18-char form of a 15- or 18-char id; lenient (for test helpers): an 18-char id
    whose suffix does not fit is re-suffixed from its first 15 chars."""
    if len(value) == 18:
        restored = restore_id(value)
        if restored is not None:
            return restored
    return value[:15] + _checksum(value[:15])


def format_datetime(value: dt.datetime) -> str:
    """Salesforce's JSON datetime form: ``2024-01-01T00:00:00.000+0000``."""
    value = value.astimezone(_UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}+0000"


def parse_datetime(text: str) -> dt.datetime:
    """A SOQL / JSON datetime (``Z``, ``+hh:mm`` or ``+hhmm`` offsets, optional fraction)."""
    m = re.fullmatch(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:?\d{2})", text)
    if not m:
        raise ValueError(f"not a datetime: {text!r}")
    base, frac, zone = m.groups()
    zone = "+00:00" if zone == "Z" else (zone if ":" in zone else f"{zone[:3]}:{zone[3:]}")
    micro = (frac or ".0")[1:7].ljust(6, "0")
    return dt.datetime.fromisoformat(f"{base}.{micro}{zone}").astimezone(_UTC)


# --- field metadata ---------------------------------------------------------------

_SOAP_TYPES = {"id": "tns:ID", "boolean": "xsd:boolean", "datetime": "xsd:dateTime",
               "reference": "tns:ID"}
_STANDARD_FIELDS: list[tuple[str, str, bool, str]] = [
    ("Id", "id", False, "Record ID"),
    ("IsDeleted", "boolean", False, "Deleted"),
    ("FirstName", "string", True, "First Name"),
    ("LastName", "string", True, "Last Name"),
    ("Name", "string", False, "Full Name"),
    ("Email", "email", True, "Email"),
    ("Phone", "phone", True, "Phone"),
    ("MobilePhone", "phone", True, "Mobile Phone"),
    ("HasOptedOutOfEmail", "boolean", True, "Email Opt Out"),
    ("DoNotCall", "boolean", True, "Do Not Call"),
    ("CreatedDate", "datetime", False, "Created Date"),
    ("LastModifiedDate", "datetime", False, "Last Modified Date"),
    ("SystemModstamp", "datetime", False, "System Modstamp"),
    ("SMS_Opt_Out__c", "boolean", True, "SMS Opt Out"),
    ("WhatsApp_Opt_Out__c", "boolean", True, "WhatsApp Opt Out"),
]
# Lead.IsConverted: true once the lead is converted into a Contact (and Account);
# Lead.ConvertedContactId: "the ID of the contact created in the lead conversion".
# Change Data Capture, "Change Events for Lead Conversion"; both set by conversion, not
# updateable through the API. An update of a converted lead is refused with
# CANNOT_UPDATE_CONVERTED_LEAD, "cannot reference converted lead": the code and text as
# API clients report them (restforce's error-code list; a client's trace in GitLab issue
# customers-gitlab-com#272), not on a Salesforce page we found.
_EXTRA_FIELDS = {"Lead": [("Company", "string", True, "Company"),
                          ("IsConverted", "boolean", False, "Converted"),
                          ("ConvertedContactId", "reference", False, "Converted Contact ID")]}
CONVERTED_LEAD_ERROR = {"statusCode": "CANNOT_UPDATE_CONVERTED_LEAD", "message": "cannot reference converted lead",
                        "fields": []}


def _field_meta(name: str, ftype: str, updateable: bool, label: str) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": ftype, "updateable": updateable,
        "createable": updateable, "nillable": ftype != "boolean" and name != "Id",
        "custom": name.endswith("__c"), "calculated": name == "Name",
        "defaultedOnCreate": ftype == "boolean" or ftype == "datetime",
        "filterable": True, "sortable": True,
        "length": 0 if ftype in ("boolean", "datetime") else (18 if ftype == "id" else 255),
        "soapType": _SOAP_TYPES.get(ftype, "xsd:string"),
    }


# --- SOQL ---------------------------------------------------------------------------

class ApiError(Exception):
    """An error answer: HTTP status, Salesforce errorCode and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _malformed(message: str) -> ApiError:
    return ApiError(400, "MALFORMED_QUERY", message)


_TOKEN = re.compile(r"""\s*(?:
    (?P<str>'(?:[^'\\]|\\.)*')
  | (?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2}))
  | (?P<date>\d{4}-\d{2}-\d{2})
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),])
)""", re.X)
_UNESCAPE = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}


@dataclass
class Token:
    kind: str
    text: str

    def kw(self, *words: str) -> bool:
        return self.kind == "ident" and self.text.upper() in words


@dataclass
class Literal:
    kind: str  # str | dt | date | num | bool | null
    value: Any


@dataclass
class Compare:
    field: str
    op: str
    value: Literal


@dataclass
class InList:
    field: str
    values: list[Literal]
    negate: bool = False


@dataclass
class BoolOp:
    op: str  # AND | OR | NOT
    parts: list[Any]


@dataclass
class Query:
    fields: list[str]
    sobject: str
    where: Any = None
    order: list[tuple[str, bool, bool | None]] = field(default_factory=list)  # name, desc, nulls_last
    limit: int | None = None
    offset: int = 0


def tokenize(text: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(text):
        if not text[pos:].strip():
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise _malformed(f"unexpected token at position {pos}")
        kind = m.lastgroup or ""
        tokens.append(Token(kind, m.group(kind)))
        pos = m.end()
    return tokens


class SoqlParser:
    """Recursive descent over the subset: SELECT f[, f] FROM Obj [WHERE cond]
    [ORDER BY f [ASC|DESC] [NULLS FIRST|LAST], ...] [LIMIT n] [OFFSET n]."""

    def __init__(self, text: str):
        self.tokens = tokenize(text)
        self.pos = 0

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> Token:
        tok = self.peek()
        if tok is None:
            raise _malformed("unexpected end of query")
        self.pos += 1
        return tok

    def expect_kw(self, *words: str) -> Token:
        tok = self.take()
        if not tok.kw(*words):
            raise _malformed(f"expecting {' or '.join(words)}, found '{tok.text}'")
        return tok

    def expect_punct(self, ch: str) -> None:
        tok = self.take()
        if tok.kind != "punct" or tok.text != ch:
            raise _malformed(f"expecting '{ch}', found '{tok.text}'")

    def ident(self) -> str:
        tok = self.take()
        if tok.kind != "ident":
            raise _malformed(f"expecting a name, found '{tok.text}'")
        return tok.text

    def parse(self) -> Query:
        self.expect_kw("SELECT")
        fields = [self.ident()]
        while (tok := self.peek()) is not None and tok.kind == "punct" and tok.text == ",":
            self.take()
            fields.append(self.ident())
        self.expect_kw("FROM")
        query = Query(fields=fields, sobject=self.ident())
        if (tok := self.peek()) is not None and tok.kw("WHERE"):
            self.take()
            query.where = self.condition()
        if (tok := self.peek()) is not None and tok.kw("ORDER"):
            self.take()
            self.expect_kw("BY")
            query.order.append(self.order_item())
            while (tok := self.peek()) is not None and tok.kind == "punct" and tok.text == ",":
                self.take()
                query.order.append(self.order_item())
        for word in ("LIMIT", "OFFSET"):
            if (tok := self.peek()) is not None and tok.kw(word):
                self.take()
                num = self.take()
                if num.kind != "num" or not num.text.isdigit():
                    raise _malformed(f"{word} needs a non-negative integer")
                setattr(query, word.lower(), int(num.text))
        if self.peek() is not None:
            raise _malformed(f"unexpected token: '{self.peek().text}'")  # type: ignore[union-attr]
        return query

    def order_item(self) -> tuple[str, bool, bool | None]:
        name, desc, nulls_last = self.ident(), False, None
        if (tok := self.peek()) is not None and tok.kw("ASC", "DESC"):
            desc = self.take().text.upper() == "DESC"
        if (tok := self.peek()) is not None and tok.kw("NULLS"):
            self.take()
            nulls_last = self.expect_kw("FIRST", "LAST").text.upper() == "LAST"
        return name, desc, nulls_last

    def condition(self) -> Any:
        parts = [self.conjunction()]
        while (tok := self.peek()) is not None and tok.kw("OR"):
            self.take()
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else BoolOp("OR", parts)

    def conjunction(self) -> Any:
        parts = [self.unary()]
        while (tok := self.peek()) is not None and tok.kw("AND"):
            self.take()
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else BoolOp("AND", parts)

    def unary(self) -> Any:
        tok = self.peek()
        if tok is not None and tok.kw("NOT"):
            self.take()
            return BoolOp("NOT", [self.unary()])
        if tok is not None and tok.kind == "punct" and tok.text == "(":
            self.take()
            inner = self.condition()
            self.expect_punct(")")
            return inner
        return self.comparison()

    def comparison(self) -> Any:
        name = self.ident()
        tok = self.take()
        negate = False
        if tok.kw("NOT"):
            negate, tok = True, self.take()
            if not tok.kw("IN"):
                raise _malformed("expecting IN after NOT")
        if tok.kw("IN"):
            self.expect_punct("(")
            values = [self.literal()]
            while (nxt := self.take()).kind == "punct" and nxt.text == ",":
                values.append(self.literal())
            if nxt.text != ")":
                raise _malformed(f"expecting ')', found '{nxt.text}'")
            return InList(name, values, negate)
        if tok.kind != "op" and not tok.kw("LIKE"):
            raise _malformed(f"expecting an operator, found '{tok.text}'")
        op = "!=" if tok.text == "<>" else tok.text.upper()
        return Compare(name, op, self.literal())

    def literal(self) -> Literal:
        tok = self.take()
        if tok.kind == "str":
            body = tok.text[1:-1]
            return Literal("str", re.sub(r"\\(.)", lambda m: _UNESCAPE.get(m.group(1), m.group(1)), body))
        if tok.kind == "dt":
            return Literal("dt", parse_datetime(tok.text))
        if tok.kind == "date":
            return Literal("date", dt.date.fromisoformat(tok.text))
        if tok.kind == "num":
            return Literal("num", float(tok.text) if "." in tok.text else int(tok.text))
        if tok.kw("TRUE", "FALSE"):
            return Literal("bool", tok.text.upper() == "TRUE")
        if tok.kw("NULL"):
            return Literal("null", None)
        raise _malformed(f"unexpected value: '{tok.text}'")


# --- the simulator -----------------------------------------------------------------

@dataclass
class Rejection:
    status_code: str
    message: str
    fields: list[str]
    times: int | None  # None: every time


class _OrgDefaults(TypedDict):
    """The constructor's settings, restored by a reset."""
    client_id: str
    client_secret: str
    username: str
    password: str
    page_size: int
    api_limit: int


class SalesforceSandbox(Sandbox):
    """In-memory Salesforce org. Records live in ``self.records[sobject][id18]``."""

    name = "salesforce"
    https = True
    ORG_ID = sf_id18("00D5g000000SYNC")
    USER_ID = sf_id18("0055g000000SYNC")

    def __init__(self, *, client_id: str = "3MVG9sandbox.syncd.consumer",
                 client_secret: str = "sandbox-consumer-secret",
                 username: str = "integration@syncd.example", password: str = "sandbox-password",
                 page_size: int = 2000, api_limit: int = 15000) -> None:
        self._defaults = _OrgDefaults(client_id=client_id, client_secret=client_secret, username=username,
                                      password=password, page_size=page_size, api_limit=api_limit)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.jwt_private_key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()
        self.jwt_public_key_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self._init_state()
        super().__init__()

    def _init_state(self) -> None:
        d = self._defaults
        self.client_id: str = d["client_id"]
        self.client_secret: str = d["client_secret"]
        self.username: str = d["username"]
        self.password: str = d["password"]
        self.page_size: int = d["page_size"]
        self.api_limit: int = d["api_limit"]
        self.api_usage = 0
        self.clock_offset = 0.0  # the org's clock is real time plus this (see advance())
        self.sandbox_org = False  # a sandbox org: JWT aud must be test.salesforce.com
        self.jwt_audiences: list[str] = []  # accepted besides the login server's (Experience Cloud sites)
        self._concurrent_refusals: list[tuple[str, str | None]] = []  # (limit name, Retry-After)
        self.fields_meta: dict[str, dict[str, dict[str, Any]]] = {}
        self.records: dict[str, dict[str, dict[str, Any]]] = {}
        self.deleted: dict[str, set[str]] = {}
        for sobject in KEY_PREFIXES:
            specs = _STANDARD_FIELDS + _EXTRA_FIELDS.get(sobject, [])
            self.fields_meta[sobject] = {s[0]: _field_meta(*s) for s in specs}
            self.records[sobject] = {}
            self.deleted[sobject] = set()
        self._tokens: set[str] = set()
        self._rejections: dict[str, Rejection] = {}
        self._cursors: dict[str, list[dict[str, Any]]] = {}
        self._serial = 0

    def reset(self) -> None:
        """Back to a fresh org on the same URL, CA and JWT key (one server per module
        is much faster than one per test), with no faults and an empty request log."""
        with self.lock:
            self._init_state()
            self.faults.clear()
            self.requests.clear()
        self.stall.clear()

    # --- test helpers ---------------------------------------------------------------
    @property
    def instance_url(self) -> str:
        return self.url

    @property
    def login_url(self) -> str:
        return self.url

    def now(self) -> dt.datetime:
        """The org's clock (stamps and the Date header), one-second resolution."""
        moment = dt.datetime.now(_UTC) + dt.timedelta(seconds=self.clock_offset)
        return moment.replace(microsecond=0)

    def advance(self, seconds: float) -> None:
        """Move the org's clock forward, e.g. past a poller's settle window."""
        with self.lock:
            self.clock_offset += seconds

    def start(self, port: int = 0, tls: SandboxTLS | None = None) -> "SalesforceSandbox":
        """Serve as the base class does, with the Date header on the org's clock
        (clients read Salesforce's time from it)."""
        super().start(port=port, tls=tls)
        assert self._server is not None
        sandbox, handler = self, self._server.RequestHandlerClass

        class _OrgClockHandler(handler):  # type: ignore[misc, valid-type]
            def date_time_string(self, timestamp: float | None = None) -> str:
                if timestamp is None:
                    timestamp = time.time() + sandbox.clock_offset
                return email.utils.formatdate(timestamp, usegmt=True)

        self._server.RequestHandlerClass = _OrgClockHandler
        return self

    def new_id(self, sobject: str) -> str:
        with self.lock:
            self._serial += 1
            serial = self._serial
        return sf_id18(f"{KEY_PREFIXES[sobject]}SB{serial:010d}")

    def add_record(self, sobject: str, id18: str | None = None, **fields: Any) -> str:
        """Create a record (as if entered in the UI) and return its 18-char id."""
        record_id = sf_id18(id18) if id18 else self.new_id(sobject)
        stamp = self.now()
        with self.lock:
            meta = self.fields_meta[sobject]
            record: dict[str, Any] = {name: (False if m["type"] == "boolean" else None)
                                      for name, m in meta.items()}
            for name, value in fields.items():
                record[self._canonical(sobject, name)] = value
            record.update(Id=record_id, CreatedDate=stamp, LastModifiedDate=stamp,
                          SystemModstamp=stamp, IsDeleted=False)
            self.records[sobject][record_id] = record
        return record_id

    def get_record(self, sobject: str, record_id: str) -> dict[str, Any] | None:
        """A copy of the stored record (datetimes as Salesforce renders them), or None."""
        with self.lock:
            record = self.records.get(sobject, {}).get(sf_id18(record_id))
            if record is None:
                return None
            return {k: self._value(sobject, record, k) for k in record}

    def set_field(self, sobject: str, record_id: str, field_name: str | None = None,
                  value: Any = None, /, **values: Any) -> None:
        """An admin edit in the UI: writes the field(s) and bumps SystemModstamp."""
        if field_name is not None:
            values[field_name] = value
        stamp = self.now()
        with self.lock:
            record = self.records[sobject][sf_id18(record_id)]
            for name, val in values.items():
                record[self._canonical(sobject, name)] = val
            record["SystemModstamp"] = record["LastModifiedDate"] = stamp

    def set_modstamp(self, sobject: str, record_id: str, when: dt.datetime) -> None:
        """Force a record's SystemModstamp (a transaction that committed late)."""
        with self.lock:
            record = self.records[sobject][sf_id18(record_id)]
            record["SystemModstamp"] = record["LastModifiedDate"] = when.astimezone(_UTC)

    def delete_record(self, sobject: str, record_id: str) -> None:
        with self.lock:
            key = sf_id18(record_id)
            self.records[sobject].pop(key, None)
            self.deleted[sobject].add(key)

    def add_field(self, sobject: str, name: str, type: str = "boolean",  # noqa: A002
                  updateable: bool = True, label: str | None = None) -> None:
        with self.lock:
            self.fields_meta[sobject][name] = _field_meta(name, type, updateable, label or name)
            for record in self.records[sobject].values():
                record.setdefault(name, False if type == "boolean" else None)

    def remove_field(self, sobject: str, name: str) -> None:
        with self.lock:
            self.fields_meta[sobject].pop(name, None)
            for record in self.records[sobject].values():
                record.pop(name, None)

    def reject_record(self, record_id: str, status_code: str, message: str,
                      times: int | None = None, fields: list[str] | None = None) -> None:
        """Make updates of this record fail with ``status_code`` (``times`` times, or always)."""
        with self.lock:
            self._rejections[sf_id18(record_id)] = Rejection(status_code, message, fields or [], times)

    def accept_record(self, record_id: str) -> None:
        """Undo ``reject_record``: the admin fixed the validation rule."""
        with self.lock:
            self._rejections.pop(sf_id18(record_id), None)

    def issue_token(self) -> str:
        """A valid access token, as if obtained elsewhere (for the access_token flow)."""
        token = f"{self.ORG_ID}!{secrets.token_urlsafe(32)}"
        with self.lock:
            self._tokens.add(token)
        return token

    def expire_tokens(self) -> None:
        with self.lock:
            self._tokens.clear()

    def exhaust_quota(self) -> None:
        with self.lock:
            self.api_usage = self.api_limit

    def reset_quota(self) -> None:
        with self.lock:
            self.api_usage = 0

    def use_quota(self, calls: int) -> None:
        """Count ``calls`` API requests as made by other integrations of the org."""
        with self.lock:
            self.api_usage = min(self.api_limit, self.api_usage + calls)

    def refuse_concurrent(self, times: int = 1, limit: str = "ConcurrentRequests",
                          retry_after: str | None = None) -> None:
        """The next ``times`` API requests meet a full concurrency limit (other
        long-running calls in the org): 403 REQUEST_LIMIT_EXCEEDED naming ``limit``."""
        if limit not in CONCURRENT_LIMIT_MESSAGES:
            raise ValueError(f"limit must be one of {', '.join(CONCURRENT_LIMIT_MESSAGES)}")
        with self.lock:
            self._concurrent_refusals.extend([(limit, retry_after)] * times)

    @property
    def composite_calls(self) -> int:
        return len(self.requests_to(r"/composite/sobjects/?$", "PATCH"))

    def composite_writes(self) -> Counter:
        """How many times each record id was sent in a composite update."""
        seen: Counter = Counter()
        for r in self.requests_to(r"/composite/sobjects/?$", "PATCH"):
            for rec in (r.json() or {}).get("records", []):
                seen[rec.get("id")] += 1
        return seen

    # --- internals ------------------------------------------------------------------
    def _canonical(self, sobject: str, name: str) -> str:
        meta = self._find_field(sobject, name)
        if meta is None:
            raise KeyError(f"no field {name!r} on {sobject}")
        return str(meta["name"])

    def _find_field(self, sobject: str, name: str) -> dict[str, Any] | None:
        fields = self.fields_meta[sobject]
        if name in fields:
            return fields[name]
        lowered = name.lower()
        return next((m for n, m in fields.items() if n.lower() == lowered), None)

    def _value(self, sobject: str, record: dict[str, Any], name: str) -> Any:
        if name == "Name":
            return " ".join(p for p in (record.get("FirstName"), record.get("LastName")) if p) or None
        value = record.get(name)
        return format_datetime(value) if isinstance(value, dt.datetime) else value

    def _render(self, sobject: str, record: dict[str, Any], fields: list[str], version: str) -> dict:
        out: dict[str, Any] = {"attributes": {
            "type": sobject, "url": f"/services/data/v{version}/sobjects/{sobject}/{record['Id']}"}}
        for name in fields:
            out[name] = self._value(sobject, record, name)
        return out

    @staticmethod
    def _json(body: Any, status: int = 200) -> Response:
        return Response(json.dumps(body), status=status, content_type="application/json;charset=UTF-8")

    def _error(self, exc: ApiError) -> Response:
        return self._json([{"message": exc.message, "errorCode": exc.code}], exc.status)

    def _id_for(self, sobject: str, raw: str) -> str:
        key = None
        if _ID.match(raw):
            key = raw + _checksum(raw) if len(raw) == 15 else restore_id(raw)
        if key is None or not key.startswith(KEY_PREFIXES[sobject]):
            raise ApiError(400, "MALFORMED_ID", f"{sobject} ID: id value of incorrect type: {raw}")
        return key

    # --- routes ---------------------------------------------------------------------
    def routes(self, app: Flask) -> None:
        @app.after_request
        def _limit_info(resp: Response) -> Response:
            # REST API guide, "Limit Info Header" (headers_api_usage.htm): on every REST
            # answer (errors included), the org's daily usage as api-usage=used/limit.
            if request.path.startswith("/services/data"):
                resp.headers["Sforce-Limit-Info"] = f"api-usage={self.api_usage}/{self.api_limit}"
            return resp

        @app.post("/services/oauth2/token")
        def _token() -> Response:
            try:
                return self._json(self._grant(request.form))
            except ApiError as exc:
                return self._json({"error": exc.code, "error_description": exc.message}, exc.status)

        @app.route("/services/data/<path:rest>", methods=["GET", "POST", "PATCH", "DELETE", "PUT"])
        def _api(rest: str) -> Response:
            try:
                return self._dispatch(rest)
            except ApiError as exc:
                return self._error(exc)

    def _grant(self, form: Any) -> dict[str, Any]:
        grant = form.get("grant_type")
        if grant in ("client_credentials", "password"):
            if form.get("client_id") != self.client_id or not hmac.compare_digest(
                    str(form.get("client_secret", "")), self.client_secret):
                raise ApiError(400, "invalid_client", "invalid client credentials")
            if grant == "password" and (form.get("username") != self.username or not hmac.compare_digest(
                    str(form.get("password", "")), self.password)):
                raise ApiError(400, "invalid_grant", "authentication failure")
        elif grant == JWT_GRANT:
            self._verify_assertion(str(form.get("assertion", "")))
        else:
            raise ApiError(400, "unsupported_grant_type", "grant type not supported")
        issued_at = str(int(time.time() * 1000))
        identity = f"{self.url}/id/{self.ORG_ID}/{self.USER_ID}"
        signature = base64.b64encode(hmac.new(self.client_secret.encode(), (identity + issued_at).encode(),
                                              hashlib.sha256).digest()).decode()
        return {"access_token": self.issue_token(), "signature": signature, "scope": "api",
                "instance_url": self.url, "id": identity, "token_type": "Bearer",
                "issued_at": issued_at}

    def _verify_assertion(self, assertion: str) -> None:
        # Salesforce accepts only its login server as aud (not the org's My Domain URL);
        # the refusal body is not in Salesforce's docs: "audience is invalid" is what
        # integrators report (an assumption).
        audiences = [SANDBOX_AUDIENCE if self.sandbox_org else PRODUCTION_AUDIENCE, *self.jwt_audiences]
        try:
            claims = jwt.decode(assertion, self.jwt_public_key_pem, algorithms=["RS256"],
                                audience=audiences, options={"require": ["exp", "iss", "sub", "aud"]})
        except jwt.InvalidAudienceError:
            raise ApiError(400, "invalid_grant", "audience is invalid") from None
        except jwt.PyJWTError:
            raise ApiError(400, "invalid_grant", "invalid assertion") from None
        if claims.get("iss") != self.client_id:
            raise ApiError(400, "invalid_client_id", "client identifier invalid")
        if claims.get("sub") != self.username:
            raise ApiError(400, "invalid_grant", "user hasn't approved this consumer")

    def _dispatch(self, rest: str) -> Response:
        m = re.fullmatch(r"v(\d+\.\d+)/(.*?)/?", rest)
        if not m:
            return self._json(_NOT_FOUND, 404)
        version, path = m.groups()
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        with self.lock:
            if scheme not in ("Bearer", "OAuth") or token not in self._tokens:
                return self._json(_SESSION_INVALID, 401)
            if self._concurrent_refusals:
                limit, retry_after = self._concurrent_refusals.pop(0)
                resp = self._error(ApiError(403, "REQUEST_LIMIT_EXCEEDED", CONCURRENT_LIMIT_MESSAGES[limit]))
                if retry_after is not None:
                    resp.headers["Retry-After"] = retry_after
                return resp
            # The limits resource is assumed free and answered with the quota spent:
            # Salesforce does not say whether it counts (the Versions resource "/" does not).
            free = request.method == "GET" and re.fullmatch(r"v\d+\.\d+/limits/?", rest) is not None
            if not free:
                if self.api_usage >= self.api_limit:
                    raise ApiError(403, "REQUEST_LIMIT_EXCEEDED", TOTAL_REQUESTS_EXCEEDED)
                self.api_usage += 1
        method = request.method
        routes: list[tuple[str, str, Callable[..., Response]]] = [
            ("GET", r"sobjects/(\w+)/describe", self._describe),
            ("GET", r"sobjects/(\w+)/([^/]+)", self._read),
            ("PATCH", r"sobjects/(\w+)/([^/]+)", self._patch),
            ("DELETE", r"sobjects/(\w+)/([^/]+)", self._delete),
            ("PATCH", r"composite/sobjects", self._collection_update),
            ("GET", r"query", self._query),
            ("GET", r"query/([^/]+)", self._query_more),
            ("GET", r"search", self._search),
            ("GET", r"limits", self._limits),
        ]
        for verb, pattern, handler in routes:
            found = re.fullmatch(pattern, path)
            if found and verb == method:
                return handler(version, *found.groups())
        return self._json(_NOT_FOUND, 404)

    def _limits(self, version: str) -> Response:
        """REST API guide, "Limits" (resources_limits.htm): each limit as {Max, Remaining};
        only the daily API requests are modelled."""
        with self.lock:
            daily = {"Max": self.api_limit, "Remaining": max(0, self.api_limit - self.api_usage)}
        return self._json({"DailyApiRequests": daily})

    def _sobject(self, name: str) -> str:
        for sobject in self.fields_meta:
            if sobject.lower() == name.lower():
                return sobject
        raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")

    def _describe(self, version: str, name: str) -> Response:
        sobject = self._sobject(name)
        with self.lock:
            fields = [dict(m) for m in self.fields_meta[sobject].values()]
        return self._json({
            "name": sobject, "label": sobject, "labelPlural": sobject + "s",
            "keyPrefix": KEY_PREFIXES[sobject], "custom": False, "createable": True,
            "updateable": True, "queryable": True, "searchable": True, "fields": fields,
            "urls": {"describe": f"/services/data/v{version}/sobjects/{sobject}/describe",
                     "sobject": f"/services/data/v{version}/sobjects/{sobject}"}})

    def _existing(self, sobject: str, raw_id: str) -> dict[str, Any]:
        key = self._id_for(sobject, raw_id)
        if key in self.deleted[sobject]:
            raise ApiError(404, "ENTITY_IS_DELETED", "entity is deleted")
        record = self.records[sobject].get(key)
        if record is None:
            raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
        return record

    def _read(self, version: str, name: str, raw_id: str) -> Response:
        sobject = self._sobject(name)
        with self.lock:
            record = self._existing(sobject, raw_id)
            wanted = request.args.get("fields")
            names = list(self.fields_meta[sobject])
            if wanted:
                names = []
                for item in wanted.split(","):
                    meta = self._find_field(sobject, item.strip())
                    if meta is None:
                        raise ApiError(400, "INVALID_FIELD",
                                       f"No such column '{item.strip()}' on sobject of type {sobject}")
                    names.append(meta["name"])
            return self._json(self._render(sobject, record, names, version))

    def _patch(self, version: str, name: str, raw_id: str) -> Response:
        sobject = self._sobject(name)
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise ApiError(400, "JSON_PARSER_ERROR", "The request body is not a JSON object")
        with self.lock:
            record = self._existing(sobject, raw_id)
            rejection = self._take_rejection(record["Id"])
            if rejection is not None:
                return self._json([{"message": rejection.message, "errorCode": rejection.status_code,
                                    "fields": rejection.fields}], 400)
            changes, error = self._changes(sobject, body)
            if error is None and record.get("IsConverted"):
                error = CONVERTED_LEAD_ERROR
            if error is not None:
                return self._json([{"message": error["message"], "errorCode": error["statusCode"],
                                    "fields": error["fields"]}], 400)
            self._apply(record, changes)
        return Response(status=204)

    def _delete(self, version: str, name: str, raw_id: str) -> Response:
        sobject = self._sobject(name)
        with self.lock:
            record = self._existing(sobject, raw_id)
            self.delete_record(sobject, record["Id"])
        return Response(status=204)

    def _take_rejection(self, key: str) -> Rejection | None:
        rejection = self._rejections.get(key)
        if rejection is None:
            return None
        if rejection.times is not None:
            rejection.times -= 1
            if rejection.times <= 0:
                del self._rejections[key]
        return rejection

    def _changes(self, sobject: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict | None]:
        """Validated field changes, or a SaveResult error entry."""
        changes: dict[str, Any] = {}
        for name, value in body.items():
            if name in ("attributes", "id", "Id"):
                continue
            meta = self._find_field(sobject, name)
            if meta is None:
                return {}, {"statusCode": "INVALID_FIELD", "fields": [name],
                            "message": f"No such column '{name}' on sobject of type {sobject}"}
            if not meta["updateable"]:
                return {}, {"statusCode": "INVALID_FIELD_FOR_INSERT_UPDATE", "fields": [meta["name"]],
                            "message": f"Unable to create/update fields: {meta['name']}. Please check "
                                       "the security settings of this field and verify that it is "
                                       "read/write for your profile or permission set."}
            if meta["type"] == "boolean" and value is not None and not isinstance(value, bool):
                return {}, {"statusCode": "INVALID_TYPE_ON_FIELD_IN_RECORD", "fields": [meta["name"]],
                            "message": f"{meta['name']}: value not of required type: {value}"}
            changes[meta["name"]] = (False if value is None and meta["type"] == "boolean" else value)
        return changes, None

    def _apply(self, record: dict[str, Any], changes: dict[str, Any]) -> None:
        record.update(changes)
        record["SystemModstamp"] = record["LastModifiedDate"] = self.now()

    def _collection_update(self, version: str) -> Response:
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            raise ApiError(400, "JSON_PARSER_ERROR", "Expected a JSON object with a records list")
        records = body["records"]
        if len(records) > 200:
            raise ApiError(400, "EXCEEDED_ID_LIMIT",
                           "record limit reached. cannot submit more than 200 records into this call")
        all_or_none = bool(body.get("allOrNone", False))
        for rec in records:
            sobject = (rec.get("attributes") or {}).get("type") if isinstance(rec, dict) else None
            if not isinstance(sobject, str):
                raise ApiError(400, "INVALID_TYPE", "The attributes map must contain a value for type")
            self._sobject(sobject)
        with self.lock:
            planned: list[tuple[dict[str, Any] | None, dict[str, Any], dict | None]] = []
            for rec in records:
                planned.append(self._plan(self._sobject(rec["attributes"]["type"]), rec))
            failed = any(err is not None for _, _, err in planned)
            results: list[dict[str, Any]] = []
            for record, changes, err in planned:
                if err is not None:
                    results.append({"success": False, "errors": [err]})
                elif all_or_none and failed:
                    assert record is not None
                    results.append({"id": record["Id"], "success": False, "errors": [{
                        "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                        "message": _ROLLED_BACK, "fields": []}]})
                else:
                    assert record is not None
                    self._apply(record, changes)
                    results.append({"id": record["Id"], "success": True, "errors": []})
        return self._json(results)

    def _plan(self, sobject: str, rec: dict[str, Any]) -> tuple[dict | None, dict[str, Any], dict | None]:
        raw = rec.get("id") or rec.get("Id")
        if not isinstance(raw, str) or not raw:
            return None, {}, {"statusCode": "MISSING_ARGUMENT", "fields": [],
                              "message": "Id not specified in an update call"}
        try:
            key = self._id_for(sobject, raw)
        except ApiError as exc:
            return None, {}, {"statusCode": exc.code, "message": exc.message, "fields": ["Id"]}
        if key in self.deleted[sobject]:
            return None, {}, {"statusCode": "ENTITY_IS_DELETED", "message": "entity is deleted",
                              "fields": []}
        record = self.records[sobject].get(key)
        if record is None:
            return None, {}, {"statusCode": "INVALID_CROSS_REFERENCE_KEY",
                              "message": "invalid cross reference id", "fields": []}
        rejection = self._take_rejection(key)
        if rejection is not None:
            return None, {}, {"statusCode": rejection.status_code, "message": rejection.message,
                              "fields": rejection.fields}
        changes, error = self._changes(sobject, rec)
        if error is None and record.get("IsConverted"):
            error = dict(CONVERTED_LEAD_ERROR)
        return (None if error else record), changes, error

    # --- SOQL -----------------------------------------------------------------------
    def _query(self, version: str) -> Response:
        text = request.args.get("q", "")
        if not text.strip():
            raise _malformed("the q parameter is required")
        # "Maximum length of SOQL statements: by default, 100,000 characters" (Developer
        # Limits, "SOQL and SOSL Limits for Search Queries"); the error code and text are
        # not documented there: MALFORMED_QUERY is assumed.
        if len(text) > SOQL_MAX_CHARS:
            raise _malformed(f"SOQL statements cannot exceed {SOQL_MAX_CHARS} characters")
        query = SoqlParser(text).parse()
        sobject = self._sobject_for_query(query.sobject)
        with self.lock:
            select = [self._query_field(sobject, f) for f in query.fields]
            where = self._bind(sobject, query.where) if query.where is not None else None
            rows = [r for r in self.records[sobject].values() if where is None or self._eval(where, r)]
            for name, desc, nulls_last in reversed(query.order):
                fname = self._query_field(sobject, name)
                ftype = self.fields_meta[sobject][fname]["type"]
                last = desc if nulls_last is None else nulls_last
                present = [r for r in rows if r.get(fname) is not None]
                missing = [r for r in rows if r.get(fname) is None]
                present.sort(key=lambda r: self._sort_key(ftype, r[fname]), reverse=desc)
                rows = present + missing if last else missing + present
            rows = rows[query.offset:]
            if query.limit is not None:
                rows = rows[:query.limit]
            rendered = [self._render(sobject, r, select, version) for r in rows]
        return self._json(self._page(version, rendered, 0))

    def _query_more(self, version: str, locator: str) -> Response:
        cursor, _, offset = locator.rpartition("-")
        with self.lock:
            rows = self._cursors.get(cursor)
        if rows is None or not offset.isdigit() or int(offset) > len(rows):
            raise ApiError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        return self._json(self._page(version, rows, int(offset), cursor))

    def _page(self, version: str, rows: list[dict], offset: int, cursor: str | None = None) -> dict:
        end = offset + max(1, self.page_size)
        body: dict[str, Any] = {"totalSize": len(rows), "done": end >= len(rows),
                                "records": rows[offset:end]}
        if end < len(rows):
            if cursor is None:
                cursor = "01g" + secrets.token_hex(8)
                with self.lock:
                    self._cursors[cursor] = rows
            body["nextRecordsUrl"] = f"/services/data/v{version}/query/{cursor}-{end}"
        return body

    def _sobject_for_query(self, name: str) -> str:
        try:
            return self._sobject(name)
        except ApiError:
            raise ApiError(400, "INVALID_TYPE", f"sObject type '{name}' is not supported.") from None

    def _query_field(self, sobject: str, name: str) -> str:
        meta = self._find_field(sobject, name)
        if meta is None:
            raise ApiError(400, "INVALID_FIELD", f"No such column '{name}' on entity '{sobject}'.")
        return str(meta["name"])

    @staticmethod
    def _sort_key(ftype: str, value: Any) -> Any:
        return value.lower() if isinstance(value, str) and ftype != "id" else value

    def _bind(self, sobject: str, node: Any) -> Any:
        """Resolve field names and check literal types: the bound tree ``_eval`` runs."""
        if isinstance(node, BoolOp):
            return BoolOp(node.op, [self._bind(sobject, p) for p in node.parts])
        name = self._query_field(sobject, node.field)
        ftype = self.fields_meta[sobject][name]["type"]
        literals = node.values if isinstance(node, InList) else [node.value]
        values = [self._coerce(name, ftype, lit) for lit in literals]
        if isinstance(node, InList):
            return ("in", name, ftype, values, node.negate)
        return ("cmp", name, ftype, node.op, values[0])

    @staticmethod
    def _coerce(name: str, ftype: str, lit: Literal) -> Any:
        bad = ApiError(400, "INVALID_QUERY_FILTER_OPERATOR",
                       f"value of filter criterion for field '{name}' must be of type {ftype}")
        if lit.kind == "null":
            return None
        if ftype == "datetime":
            if lit.kind != "dt":
                raise bad
            return lit.value
        if ftype == "boolean":
            if lit.kind != "bool":
                raise bad
            return lit.value
        if lit.kind != "str":
            raise bad
        if ftype == "id":
            if not _ID.match(lit.value):
                raise ApiError(400, "INVALID_QUERY_FILTER_OPERATOR", f"invalid ID field: {lit.value}")
            return sf_id18(lit.value)
        return lit.value

    def _eval(self, node: Any, record: dict[str, Any]) -> bool:
        if isinstance(node, BoolOp):
            if node.op == "AND":
                return all(self._eval(p, record) for p in node.parts)
            if node.op == "OR":
                return any(self._eval(p, record) for p in node.parts)
            return not self._eval(node.parts[0], record)
        if node[0] == "in":
            _, name, ftype, values, negate = node
            value = self._sort_key(ftype, record.get(name))
            hit = value in [self._sort_key(ftype, v) for v in values]
            return hit != negate
        _, name, ftype, op, literal = node
        left, right = self._sort_key(ftype, record.get(name)), self._sort_key(ftype, literal)
        if op == "=":
            return left == right
        if op == "!=":
            return left != right
        if left is None or right is None:
            return False
        if op == "LIKE":
            pattern = re.escape(str(right)).replace("%", ".*").replace("_", ".")
            return re.fullmatch(pattern, str(left), re.S) is not None
        return {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[op]

    # --- SOSL -----------------------------------------------------------------------
    _SOSL = re.compile(r"\s*FIND\s*\{((?:[^{}\\]|\\.)*)\}\s*(?:IN\s+(ALL|NAME|EMAIL|PHONE)\s+FIELDS\s*)?"
                       r"(?:RETURNING\s+(.*?))?\s*(?:LIMIT\s+(\d+))?\s*", re.I | re.S)

    def _search(self, version: str) -> Response:
        m = self._SOSL.fullmatch(request.args.get("q", ""))
        if not m:
            raise ApiError(400, "MALFORMED_SEARCH", "No search term found. The search term must be "
                                                     "enclosed in braces.")
        term, scope, returning, limit = m.groups()
        term = re.sub(r"\\(.)", r"\1", term).strip()
        if len(term) < 2:
            raise ApiError(400, "MALFORMED_SEARCH", "search term must be longer than one character")
        # "RETURNING ObjectTypeName [(FieldList [WHERE] ...)]" (SOQL and SOSL Reference,
        # "RETURNING FieldSpec", sforce-api-calls-sosl-returning; "WHERE",
        # sforce-api-calls-sosl-where): a SOQL-style condition on that object's rows.
        specs: list[tuple[str, list[str], Any]] = []
        if returning:
            for part in re.findall(r"(?:[^,(]|\([^()]*\))+", returning):
                item = re.fullmatch(r"\s*(\w+)\s*(?:\(([^()]*)\))?\s*", part)
                if item is None:
                    raise ApiError(400, "MALFORMED_SEARCH", "unexpected RETURNING clause")
                inside = item.group(2) or "Id"
                cut = re.search(r"(?i)\bWHERE\b", inside)
                field_text, condition = (inside[:cut.start()], inside[cut.end():]) if cut else (inside, "")
                where = (SoqlParser(f"SELECT Id FROM {item.group(1)} WHERE {condition}").parse().where
                         if condition.strip() else None)
                fields = [f.strip() for f in field_text.split(",") if f.strip()]
                specs.append((item.group(1), fields, where))
        else:
            specs = [(s, ["Id"], None) for s in KEY_PREFIXES]
        scope = (scope or "ALL").upper()
        # FIND {a OR b}: the documented OR operator (SOQL and SOSL Reference, "FIND
        # {SearchQuery}", sforce_api_calls_sosl_find.htm). AND / AND NOT are not modelled.
        # "SOSL Syntax": beyond 10,000 characters the search returns no rows; beyond 4,000
        # its logical operators are removed (AND turns into OR), which changes nothing for
        # the OR-only searches modelled here.
        if len(term) > 10000:
            return self._json({"searchRecords": []})
        alternatives = [alt.strip().strip('"') for alt in re.split(r"\s+OR\s+", term, flags=re.I)]
        found: list[dict[str, Any]] = []
        with self.lock:
            for name, fields, condition in specs:
                sobject = self._sobject_for_query(name)
                select = [self._query_field(sobject, f) for f in fields]
                where = self._bind(sobject, condition) if condition is not None else None
                for record in self.records[sobject].values():
                    if where is not None and not self._eval(where, record):
                        continue
                    if any(self._search_match(sobject, record, scope, alt, re.sub(r"\D", "", alt))
                           for alt in alternatives if alt):
                        found.append(self._render(sobject, record, select, version))
        # "LIMIT n": at most 2,000 rows, the default when no LIMIT is given (SOQL and SOSL
        # Reference, "SOSL Syntax", sforce_api_calls_sosl_syntax.htm).
        found = found[:min(int(limit), SOSL_MAX_ROWS) if limit else SOSL_MAX_ROWS]
        return self._json({"searchRecords": found})

    def _search_match(self, sobject: str, record: dict[str, Any], scope: str, term: str,
                      digits: str) -> bool:
        # How SOSL matches phone fields is not documented: the reference says only that
        # IN PHONE FIELDS searches phone fields and that text is split into tokens at
        # spaces and punctuation. Assumed here: formatting is ignored and a stored number
        # matches when its digits END WITH the term's digits, so "(330) 555-1234" is found
        # by 3305551234 but not by 13305551234, and "+44 330 555 1234" is found by
        # 3305551234 too. Callers must re-check what comes back.
        if scope in ("PHONE", "ALL") and len(digits) >= 2:
            for name, meta in self.fields_meta[sobject].items():
                if meta["type"] != "phone" or not record.get(name):
                    continue
                if re.sub(r"\D", "", str(record[name])).endswith(digits):
                    return True
        if scope == "PHONE":
            return False
        kinds = {"NAME": ("string",), "EMAIL": ("email",)}.get(scope, ("string", "email"))
        needle = term.lower()
        return any(meta["type"] in kinds and needle in str(record.get(name) or "").lower()
                   for name, meta in self.fields_meta[sobject].items())
