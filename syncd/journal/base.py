"""Journal data types, the interface of each store, and the ``Journal`` that composes them."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterator, Literal, Mapping, Protocol

from connectors.types import RecordRef
from syncd.events import ConsentEvent

if TYPE_CHECKING:
    from syncd.journal.engine import Engine, Tx
    from syncd.journal.ledger import Entry


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
    """How one claimed delivery ended, as the pusher decided: ``done``, ``retry`` at
    ``retry_at``, ``paused`` (retry at ``retry_at`` without costing an attempt: the
    CRM's quota is spent, not the delivery's fault) or ``dead``. ``applied`` maps
    field -> value for the field clocks; ``applied_at`` is the occurred_at those
    values carry; ``wrote``: this delivery's values reached the CRM (its last push)."""

    delivery_id: int
    state: Literal["done", "retry", "paused", "dead"]
    error: str | None = None
    retry_at: float | None = None       # epoch seconds, for "retry" and "paused"
    note: str | None = None             # "applied", "superseded", ...
    ref: RecordRef | None = None
    applied: dict[str, Any] = field(default_factory=dict)
    applied_at: str | None = None
    applied_event_id: int | None = None
    wrote: bool = False


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
    """How a registration went: ``registered`` (wait for the notification until
    ``at``), ``done`` (Sinch confirmed it), ``retry`` at ``at``, or ``dead``."""

    id: int
    state: Literal["registered", "done", "retry", "dead"]
    error: str | None = None
    at: float | None = None   # retry time, or for "registered" the notification deadline


@dataclass(frozen=True)
class Registration:
    """The registration a Sinch notification answers."""

    id: int
    attempts: int


@dataclass(frozen=True)
class TraceQuery:
    """What ``syncd trace`` looks for, already normalised (:func:`syncd.trace.parse_query`
    reads the operator's text): any of a phone, an email, record ids and an event id."""

    text: str                           # as the operator typed it
    phone: str | None = None            # E.164
    email: str | None = None            # lower-cased, trimmed
    record_ids: tuple[str, ...] = ()    # every form a CRM may hold (Salesforce's 15 and 18 chars)
    event_id: int | None = None


@dataclass(frozen=True)
class Clock:
    occurred_at: str
    value: Any


# One event ready for the journal, built by the request's own thread: its dedupe key,
# its events row and its ledger entries (identity, channel, state, since, source),
# all plain data, so it can cross to the ingest writer process (ingest_process.py).
LedgerTuple = tuple[str, str, str, str, str]
Prepared = tuple[tuple[str, str], tuple[Any, ...], tuple[LedgerTuple, ...]]


class Committer(Protocol):
    """Commits one webhook's event durably before returning (group commit in this
    process, or the ingest writer process under ``syncd serve`` on SQLite)."""

    last_ok: float
    last_failed: float

    def submit(self, event: ConsentEvent) -> Recorded: ...


class Events(Protocol):
    def record(self, event: ConsentEvent) -> Recorded: ...
    def record_batch(self, events: list[ConsentEvent]) -> list[Recorded]: ...
    def last_ingest_commit(self) -> tuple[float, float]: ...
    def prepare(self, event: ConsentEvent, now: str | None) -> Prepared: ...
    def commit_through(self, committer: Committer) -> None: ...
    def to_route(self, limit: int, lease_seconds: float = 120.0) -> list[StoredEvent]: ...
    def get(self, event_id: int) -> StoredEvent | None: ...
    def quarantine(self, event_id: int, reason: str) -> None: ...
    def ignore(self, event_id: int, reason: str) -> None: ...
    def reconciled(self, event_id: int, reason: str) -> None: ...
    def learn_email(self, event_id: int, email: str) -> bool: ...
    def defer(self, event_id: int, error: str, retry_at: float) -> None: ...
    def replay_quarantined(self, ids: list[int] | None) -> int: ...


class Deliveries(Protocol):
    def add_targets(self, event_id: int, targets: list[RecordRef]) -> None: ...
    def add_targets_many(self, routed: list[tuple[int, list[RecordRef]]], *, still_routing: Collection[int] = (),
                         notes: Mapping[int, str] | None = None) -> None: ...
    def add_found_targets(self, found: list[tuple[int, list[RecordRef]]]) -> int: ...
    def claim(self, limit: int, lease_seconds: float, crm: str | None = None) -> list[Delivery]: ...
    def settle(self, outcomes: list[Outcome]) -> None: ...
    def clocks(self, refs: list[RecordRef]) -> dict[RecordRef, dict[str, Clock]]: ...
    def release_leases(self) -> int: ...
    def replay_dead(self, ids: list[int] | None) -> int: ...
    def requeue(self, targets: list[tuple[int, RecordRef]]) -> int: ...


class Reflections(Protocol):
    def add(self, candidates: list[ReflectionCandidate], channels: list[str],
            watermark: tuple[str, str | None, str | None] | None = None) -> int: ...
    def claim(self, limit: int, lease_seconds: float) -> list[Reflection]: ...
    def settle(self, outcomes: list[ReflectionOutcome]) -> None: ...
    def expire(self, max_attempts: int, timeout_text: str) -> int: ...
    def match(self, request_id: str | None, phone: str | None, channel: str,
              kind: str | None) -> Registration | None: ...
    def apply_notification(self, event_id: int, outcome: ReflectionOutcome, note: str) -> None: ...
    def remember_sinch_state(self, phone: str, channel: str, kind: str) -> None: ...
    def replay_dead(self, ids: list[int] | None) -> int: ...


class Operations(Protocol):
    def crm_pause(self, crm: str) -> tuple[float, str | None] | None: ...
    def pause_crm(self, crm: str, until: float, reason: str) -> None: ...
    def take_pause_probe(self, crm: str, now: float, next_until: float) -> bool: ...
    def resume_crm(self, crm: str) -> None: ...
    def get_watermark(self, name: str) -> tuple[str | None, str | None]: ...
    def set_watermark(self, name: str, ts: str | None, last_id: str | None) -> None: ...
    def try_leadership(self, name: str) -> bool: ...
    def is_leader(self, name: str) -> bool: ...
    def resign(self, name: str) -> None: ...
    def acquire_serve_lock(self) -> None: ...
    def take_over_dead_leases(self) -> int: ...
    def healthcheck(self) -> None: ...


class Ledger(Protocol):
    def apply(self, tx: Tx, events: list[tuple[int, Mapping[str, Any]]]) -> None: ...
    def state(self, identity: str, channel: str) -> Entry | None: ...
    def states(self, keys: list[tuple[str, str]]) -> list[Entry | None]: ...
    def states_at_once(self, keys: list[tuple[str, str]]) -> list[Entry | None]: ...
    def all(self) -> list[Entry]: ...
    def rebuild(self) -> int: ...


class Reports(Protocol):
    def counts(self) -> dict[str, Any]: ...
    def ledger_counts(self) -> dict[str, int]: ...
    def dead_letters(self) -> list[dict[str, Any]]: ...
    def export_rows(self, since: datetime | None) -> Iterator[dict[str, Any]]: ...
    def recent_activity(self, limit: int = 50) -> list[dict[str, Any]]: ...
    def page_stats(self, since_iso: str, limit: int = 100_000) -> dict[str, Any]: ...
    def trace(self, query: TraceQuery,
              deadline: Callable[[datetime], datetime] | None = None) -> dict[str, Any]: ...


    def audit_targets(self, crm: str | None = None) -> list[dict[str, Any]]: ...


class Compliance(Protocol):
    """The compliance clock's reads and stamps (syncd/journal/compliance.py)."""
    def counts(self, breach_before: str, risk_before: str, with_flags: bool) -> dict[str, Any]: ...
    def open_between(self, start: str, before: str, with_flags: bool,
                     limit: int = 500) -> list[dict[str, Any]]: ...
    def mark_breached(self, breach_before: str, now_iso: str, with_flags: bool) -> int: ...
    def open_crm_flags(self, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]: ...
    def sinch_confirmations(self, phones: list[str]) -> dict[str, dict[str, tuple[str, str | None, Any]]]: ...
    def honour(self, stamps: list[tuple[int, str]]) -> int: ...


@dataclass
class Journal:
    """The stores over one engine; callers take the store they need."""

    events: Events
    deliveries: Deliveries
    reflections: Reflections
    ops: Operations
    reports: Reports
    engine: Engine
    ledger: Ledger
    compliance: Compliance

    def replay(self, ids: list[str] | None) -> int:
        """Re-queue dead deliveries (``d<N>``), quarantined events (``q<N>``) and dead
        registrations in Sinch (``r<N>``); ``None`` re-queues every one. Effects stay
        idempotent: field clocks decide. Every id is checked before anything changes."""
        if ids is None:
            return (self.deliveries.replay_dead(None) + self.events.replay_quarantined(None)
                    + self.reflections.replay_dead(None))
        by_kind: dict[str, list[int]] = {"d": [], "q": [], "r": []}
        for raw in ids:
            kind, num = parse_letter_id(raw)
            by_kind[kind].append(num)
        return (self.deliveries.replay_dead(by_kind["d"]) + self.events.replay_quarantined(by_kind["q"])
                + self.reflections.replay_dead(by_kind["r"]))

    def close(self) -> None:
        self.engine.close()


def parse_letter_id(raw: str) -> tuple[str, int]:
    """``d12`` (dead delivery), ``q7`` (quarantined event) or ``r3`` (reflection to
    Sinch); a bare number is a delivery."""
    text = raw.strip().lower()
    kind = "d"
    if text[:1] in ("d", "q", "r"):
        kind, text = text[0], text[1:]
    if not text.isdigit() or len(text) > 18:
        raise ValueError(f"not a dead-letter id: {raw!r} (expected d<N>, q<N> or r<N>)")
    return kind, int(text)
