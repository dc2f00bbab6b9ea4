"""What every webhook source provides, and the errors the receiver turns into answers."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from syncd.events import ConsentEvent, parse_iso


M = TypeVar("M", bound=BaseModel)


class Unauthorized(Exception):
    """Missing or wrong credentials: answered 401."""


class BadPayload(Exception):
    """Not this source's schema: answered 400 with the reason."""


@dataclass
class Ignored:
    """An authenticated, well-formed webhook that carries no consent change
    (e.g. an Apten ``messageReceived``): answered 200 and counted, not stored."""

    reason: str


class HeaderLookup(Protocol):
    """What a source reads from request headers: a dict, or Flask's
    case-insensitive ``request.headers`` (which is not a Mapping)."""

    def get(self, key: str) -> str | None: ...


class Source(Protocol):
    name: str

    def authenticate(self, body: bytes, headers: HeaderLookup, query: Mapping[str, str]) -> None:
        """Raise Unauthorized unless the request carries valid credentials."""
        ...

    def parse(self, body: bytes, received_at: datetime) -> ConsentEvent | Ignored:
        """Raise BadPayload for anything that is not the source's schema."""
        ...


# Code points that are not text: a lone UTF-16 surrogate (a JSON escape such as
# "\ud800", or an undecodable byte) cannot be encoded or stored, and PostgreSQL
# refuses NUL in TEXT. Free text keeps its place with U+FFFD; identifiers refuse.
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


@dataclass
class Loaded:
    """A webhook body as a JSON object, made safe to store.

    ``doc`` has every string (and key) with non-text code points replaced by U+FFFD;
    ``original`` is the document as decoded (the dedupe hash is taken over it, so
    two bodies that differ only in those code points stay distinct); ``dirty``
    holds the dotted path of every string that needed a replacement."""

    doc: dict[str, Any]
    original: dict[str, Any]
    dirty: frozenset[str]

    def require_text(self, *paths: str) -> None:
        """An identifier (id, phone, email) must be real text: 400 naming the field."""
        for path in paths:
            if path in self.dirty:
                raise BadPayload(f"{path}: holds a lone surrogate or NUL character (an identifier must be text)")


def _clean(value: Any, path: str, dirty: set[str]) -> Any:
    if isinstance(value, str):
        if _NOT_TEXT.search(value):
            dirty.add(path)
            return _NOT_TEXT.sub(REPLACEMENT, value)
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            clean_key = _NOT_TEXT.sub(REPLACEMENT, key)
            sub = f"{path}.{clean_key}" if path else clean_key
            if clean_key != key:
                dirty.add(sub)
            out[clean_key] = _clean(item, sub, dirty)
        return out
    if isinstance(value, list):
        return [_clean(item, f"{path}.{i}", dirty) for i, item in enumerate(value)]
    return value


def load_json(body: bytes) -> Loaded:
    """Parse a JSON-object body. Bytes that are not UTF-8 inside an otherwise valid
    JSON body are read as lone surrogates (and then handled like a JSON escape of one), so a bad
    byte in a message does not cost the opt-out; a body that is not JSON is a 400."""
    try:
        text = body.decode("utf-8")
        escaped = "\\u" in text
    except UnicodeDecodeError:
        text = body.decode("utf-8", "surrogateescape")
        escaped = True
        if not text.lstrip().startswith("{"):
            raise BadPayload("body is not UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise BadPayload("body is not valid JSON") from None
    except RecursionError:
        raise BadPayload("body is not valid JSON (nested too deeply)") from None
    except ValueError:  # an integer of more than 4,300 digits (Python's int conversion limit)
        raise BadPayload("body is not valid JSON (a number is too long)") from None
    if not isinstance(data, dict):
        raise BadPayload("body must be a JSON object")
    if not escaped:
        # Valid UTF-8 without a JSON \u escape holds no lone surrogate, and a raw NUL is not
        # valid in a JSON string: nothing to clean (saves walking every webhook's document).
        return Loaded(data, data, frozenset())
    dirty: set[str] = set()
    try:
        doc = _clean(data, "", dirty)
    except RecursionError:  # json.loads allows nearly the interpreter's limit; we are deeper in the stack
        raise BadPayload("body is not valid JSON (nested too deeply)") from None
    return Loaded(doc, data, frozenset(dirty))


def clip(text: str | None, limit: int, name: str, details: dict[str, Any]) -> str | None:
    """Free text longer than we store is cut (and noted); the raw body keeps it all.
    Refusing it would lose the opt-out that carried it."""
    if text is None or len(text) <= limit:
        return text
    details.setdefault("clipped", []).append(name)
    return text[:limit]


def describe_validation_error(exc: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    """First few pydantic errors as ``field: problem``; never echoes input values."""
    parts = []
    for err in exc.errors(include_input=False)[:5]:
        loc = ".".join(str(p) for p in (*prefix, *err["loc"]))
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "is required"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def validated(model: type[M], data: Any, prefix: tuple[str, ...] = ()) -> M:
    """``model.model_validate(data)``, or BadPayload naming the fields at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadPayload(describe_validation_error(exc, prefix)) from None


MAX_FUTURE_SKEW = timedelta(minutes=5)


# Unix seconds between 2000 and 2100: anything else is not a real event time.
MIN_EPOCH, MAX_EPOCH = 946684800, 4102444800
MAX_KEPT_TIME_TEXT = 100


def source_time(raw: Any, received_at: datetime, details: dict[str, Any], field: str,
                unix_seconds: bool = False) -> datetime:
    """When the event happened, for "newest wins", from the source's own time field, in
    the one form its vendor documents: ISO 8601 text, or (``unix_seconds``) an integer.
    Missing: the receipt time (noted). Unreadable (another form or type, out of range):
    the receipt time as well, the value kept for the audit: refusing the webhook would
    lose the opt-out it carries."""
    if raw is None:
        details["timestamp_missing"] = True
        return received_at
    try:
        if unix_seconds and isinstance(raw, int) and not isinstance(raw, bool) and MIN_EPOCH <= raw <= MAX_EPOCH:
            return bounded_occurred_at(datetime.fromtimestamp(raw, timezone.utc), received_at, details)
        if not unix_seconds and isinstance(raw, str):
            return bounded_occurred_at(parse_iso(raw), received_at, details)
    except (ValueError, OverflowError):   # not ISO 8601; a year that leaves the range in UTC
        pass
    details["timestamp_unreadable"] = {"field": field, "value": str(raw)[:MAX_KEPT_TIME_TEXT]}
    return received_at


def bounded_occurred_at(occurred: datetime, received_at: datetime, details: dict[str, Any]) -> datetime:
    """A source clock far in the future would let one event outrank every later one
    for the record; such a time is kept for the audit but ordering uses receipt time."""
    if occurred - received_at > MAX_FUTURE_SKEW:
        details["source_time_in_future"] = occurred.isoformat()
        return received_at
    return occurred
