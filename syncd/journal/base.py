"""Journal data types and the interface every engine implements."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterator, Literal, Protocol

from connectors.types import RecordRef
from syncd.events import ConsentEvent


class JournalMissing(Exception):
    """A read-only command named a journal that does not exist (a typo must not create one)."""


class JournalBusy(Exception):
    """Another process holds the journal (a second ``serve`` on one SQLite file)."""


@dataclass(frozen=True)
class Recorded:
    event_id: int
    created: bool       # False: a duplicate of an event already journaled

    def __bool__(self) -> bool:
        return self.created


@dataclass
class StoredEvent:
    id: int
    source: str
    source_event_id: str
    event_type: str
    kind: str | None
    channel: str | None
    external_lead_id: str | None
    phone: str | None
    phone_raw: str | None
    email: str | None
    reason: str | None
    occurred_at: str
    received_at: str
    status: str
    status_reason: str | None
    route_attempts: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Delivery:
    """One event's change for one CRM record, as claimed by a pusher."""

    id: int
    event_id: int
    ref: RecordRef
    attempts: int          # including this claim
    created_at: str
    kind: str
    channel: str
    occurred_at: str       # ISO UTC, fixed width: sorts as text
    source: str
    email: str | None
    reason: str | None
    received_at: str


@dataclass
class Outcome:
    """How one claimed delivery ended. ``applied`` maps field -> value for the
    field clocks; ``applied_at`` is the occurred_at those values carry."""

    delivery_id: int
    state: Literal["done", "retry", "dead"]
    error: str | None = None
    retry_at: float | None = None       # epoch seconds, for "retry"
    note: str | None = None             # "applied", "superseded", ...
    ref: RecordRef | None = None
    applied: dict[str, Any] = field(default_factory=dict)
    applied_at: str | None = None
    applied_event_id: int | None = None


@dataclass(frozen=True)
class ReflectionCandidate:
    """A CRM record whose mapped do-not-contact flags say this phone must (not) be
    messaged: to be registered in Sinch once per phone and channel."""

    ref: RecordRef
    phone: str          # E.164
    kind: str           # "opt_out" | "opt_in"
    flagged_at: str | None = None


@dataclass
class Reflection:
    id: int
    ref: RecordRef
    phone: str
    channel: str        # Sinch channel name, e.g. WHATSAPP
    kind: str
    request_id: str
    attempts: int
    created_at: str


@dataclass
class ReflectionOutcome:
    id: int
    state: Literal["registered", "retry", "dead"]
    error: str | None = None
    at: float | None = None   # retry time, or for "registered" the notification deadline


@dataclass(frozen=True)
class Clock:
    occurred_at: str
    value: Any


class Journal(Protocol):
    def record(self, event: ConsentEvent) -> Recorded: ...
    def events_to_route(self, limit: int, lease_seconds: float = 120.0) -> list[StoredEvent]: ...
    def add_targets(self, event_id: int, targets: list[RecordRef]) -> None: ...
    def add_targets_many(self, routed: list[tuple[int, list[RecordRef]]]) -> None: ...
    def quarantine(self, event_id: int, reason: str) -> None: ...
    def ignore(self, event_id: int, reason: str) -> None: ...
    def defer_routing(self, event_id: int, error: str, retry_at: float) -> None: ...
    def claim(self, limit: int, lease_seconds: float, crm: str | None = None) -> list[Delivery]: ...
    def settle(self, outcomes: list[Outcome]) -> None: ...
    def clocks(self, refs: list[RecordRef]) -> dict[RecordRef, dict[str, Clock]]: ...
    def crm_pause(self, crm: str) -> tuple[float, str | None] | None: ...
    def pause_crm(self, crm: str, until: float, reason: str) -> None: ...
    def take_pause_probe(self, crm: str, now: float, next_until: float) -> bool: ...
    def resume_crm(self, crm: str) -> None: ...
    def take_over_dead_leases(self) -> int: ...
    def release_leases(self) -> int: ...
    def counts(self) -> dict[str, Any]: ...
    def dead_letters(self) -> list[dict[str, Any]]: ...
    def replay(self, ids: list[str] | None) -> int: ...
    def export_rows(self, since: datetime | None) -> Iterator[dict[str, Any]]: ...
    def recent_activity(self, limit: int = 50) -> list[dict[str, Any]]: ...
    def get_watermark(self, name: str) -> tuple[str | None, str | None]: ...
    def set_watermark(self, name: str, ts: str | None, last_id: str | None) -> None: ...
    def healthcheck(self) -> None: ...
    def close(self) -> None: ...
