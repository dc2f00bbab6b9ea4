"""What every webhook source provides, and the errors the receiver turns into answers."""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Mapping, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from syncd.events import ConsentEvent


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


class Source(Protocol):
    name: str

    def authenticate(self, body: bytes, headers: Mapping[str, str], query: Mapping[str, str]) -> None:
        """Raise Unauthorized unless the request carries valid credentials."""
        ...

    def parse(self, body: bytes, received_at: datetime) -> ConsentEvent | Ignored:
        """Raise BadPayload for anything that is not the source's schema."""
        ...


def load_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadPayload("body is not UTF-8") from None
    except (json.JSONDecodeError, RecursionError):
        raise BadPayload("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadPayload("body must be a JSON object")
    return data


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


def bounded_occurred_at(occurred: datetime, received_at: datetime, details: dict[str, Any]) -> datetime:
    """A source clock far in the future would let one event outrank every later one
    for the record; such a time is kept for the audit but ordering uses receipt time."""
    if occurred - received_at > MAX_FUTURE_SKEW:
        details["source_time_in_future"] = occurred.isoformat()
        return received_at
    return occurred
