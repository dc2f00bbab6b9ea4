"""The events store: webhooks as received (group-committed in the request; under
``serve`` on SQLite, by the ingest writer process: ingest_process.py), leased
for routing, and settled as quarantined, ignored or deferred."""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from syncd.events import ConsentEvent, iso, utcnow
from syncd.journal.base import Committer, Prepared, Recorded, StoredEvent
from syncd.journal.engine import Engine, Tx
from syncd.journal.group_commit import GroupCommit
from syncd.journal.ledger import LedgerStore, entries_for, entry_from

DEFAULT_MAX_STORED_BODY_BYTES = 65536
# A do-not-contact flag a CRM user set inside a CRM, read by the reflector's poll.
CRM_FLAG = "crm_flag"
# Stands in for a raw body over the cap. Every stored body is a JSON object (sources
# refuse anything else), so text that starts with this marker is never a body.
OVERSIZED_BODY_MARKER = b"syncd:raw-body-not-stored"


def stored_body(raw: bytes, cap: int) -> bytes:
    """``raw`` itself up to ``cap`` bytes; beyond it, the marker with the body's SHA-256
    and size, so an authenticated sender cannot grow the journal by a megabyte a post.
    Dedupe keys are computed by the sources from the full body, before this."""
    if len(raw) <= cap:
        return raw
    digest = hashlib.sha256(raw).hexdigest()
    return OVERSIZED_BODY_MARKER + f" sha256={digest} bytes={len(raw)} cap={cap}".encode()


def stored_event(row: dict[str, Any]) -> StoredEvent:
    return StoredEvent(**{**row, "details": json.loads(row["details"] or "{}")})


def ledger_columns(event: ConsentEvent) -> dict[str, Any]:
    """The columns the consent ledger reads, as the journal stores them."""
    return {"source": event.source, "event_type": event.event_type, "kind": event.kind,
            "channel": event.channel, "phone": event.phone, "email": event.email,
            "occurred_at": iso(event.occurred_at)}


class EventStore:
    def __init__(self, engine: Engine, max_stored_body_bytes: int = DEFAULT_MAX_STORED_BODY_BYTES,
                 ledger: LedgerStore | None = None):
        self.engine = engine
        self.ledger = ledger or LedgerStore(engine)
        self.max_stored_body_bytes = max_stored_body_bytes
        self.group = GroupCommit(self._insert_batch, engine.db_error)
        self.committer: Committer = self.group

    # --- ingest ----------------------------------------------------------------------
    def record(self, event: ConsentEvent) -> Recorded:
        """Durably record ``event``; concurrent calls share one commit (group commit)."""
        return self.committer.submit(event)

    def commit_through(self, committer: Committer) -> None:
        """``syncd serve`` on SQLite: webhooks are committed by the ingest writer
        process (journal/ingest_process.py) instead of a request thread of this one."""
        self.committer = committer

    def record_batch(self, events: list[ConsentEvent]) -> list[Recorded]:
        """Record many events in one transaction of the caller's own (not a webhook's)."""
        return self._insert_batch(events) if events else []

    def last_ingest_commit(self) -> tuple[float, float]:
        """``time.monotonic()`` of the newest webhook commit that succeeded and of the
        newest that failed (0.0: none since start): readiness trusts live traffic."""
        return self.committer.last_ok, self.committer.last_failed

    def _row(self, event: ConsentEvent, now: str | None) -> tuple[Any, ...]:
        status = "quarantined" if event.quarantine_reason and event.event_type == "consent" else "new"
        if event.event_type == CRM_FLAG:    # already set in its CRM: kept for the ledger, never routed
            status = "reconciled"
        return (event.source, event.source_event_id, event.event_type, event.kind, event.channel,
                event.external_lead_id, event.phone, event.phone_raw, event.email, event.reason,
                iso(event.occurred_at), iso(event.received_at),
                json.dumps(event.details, default=str, ensure_ascii=False),
                stored_body(event.raw, self.max_stored_body_bytes), status, event.quarantine_reason, now)

    def _insert_batch(self, events: list[ConsentEvent]) -> list[Recorded]:
        """Group commit's batch insert: one transaction of its own."""
        with self.engine.ingest() as tx:
            return self._insert(tx, events)

    def prepare(self, event: ConsentEvent, now: str | None) -> Prepared:
        entries = tuple((e.identity, e.channel, e.state, e.since, e.source)
                        for e in entries_for(ledger_columns(event), None))
        return (event.source, event.source_event_id), self._row(event, now), entries

    def _insert(self, tx: Tx, events: list[ConsentEvent]) -> list[Recorded]:
        now = iso(utcnow())
        return self.insert_prepared(tx, [self.prepare(e, now) for e in events])

    def insert_prepared(self, tx: Tx, items: list[Prepared]) -> list[Recorded]:
        """Insert many events with one statement (one round of the driver per batch);
        duplicates keep the existing id. Rows go in key order, so two replicas inserting
        overlapping batches take the unique index's locks in one order (no deadlock)."""
        in_key_order = sorted(items, key=lambda item: (item[0][0] or "", item[0][1] or ""))
        created = {(r["source"], r["source_event_id"]): int(r["id"])
                   for r in tx.all("insert_events", rows=[row for _, row, _ in in_key_order])}
        existing: dict[tuple[str, str], int] = {}
        for src, sid in {key for key, _, _ in items} - set(created):
            existing[(src, sid)] = int(tx.value("event_id_by_key", source=src, source_event_id=sid))
        self.ledger.apply_entries(tx, [(created[key], [entry_from(entry, created[key]) for entry in entries])
                                       for key, _, entries in in_key_order if key in created])
        results = []
        for key, _, _ in items:
            if key in created:
                results.append(Recorded(created.pop(key), True))
                existing[key] = results[-1].event_id   # a second copy in this batch is a duplicate
            else:
                results.append(Recorded(existing[key], False))
        return results

    # --- routing ---------------------------------------------------------------------
    def to_route(self, limit: int, lease_seconds: float = 120.0) -> list[StoredEvent]:
        """Lease new events for routing: replicas never route (and look up) the same
        event twice at once; one whose routing died is offered again after the lease."""
        self.engine.before_lease()
        now = time.time()
        with self.engine.begin() as tx:
            leased = tx.all("lease_events_to_route", until=now + lease_seconds, owner=self.engine.owner,
                            now=now, limit=limit)
            if not leased:
                return []
            return [stored_event(r) for r in tx.all("events_by_ids", ids=sorted(r["id"] for r in leased))]

    def get(self, event_id: int) -> StoredEvent | None:
        with self.engine.read() as tx:
            row = tx.one("event_by_id", id=event_id)
        return stored_event(row) if row else None

    def quarantine(self, event_id: int, reason: str) -> None:
        self._settle(event_id, "quarantined", reason)

    def ignore(self, event_id: int, reason: str) -> None:
        """Kept but never routed (a channel syncd does not model): no delivery, shown as ignored."""
        self._settle(event_id, "ignored", reason)

    def reconciled(self, event_id: int, reason: str) -> None:
        """A Sinch result that answers nothing of ours: kept, nothing to route."""
        self._settle(event_id, "reconciled", reason)

    def _settle(self, event_id: int, status: str, reason: str) -> None:
        with self.engine.begin() as tx:
            tx.execute("settle_new_event", status=status, reason=reason, now=iso(utcnow()), id=event_id)

    def learn_email(self, event_id: int, email: str) -> bool:
        """Keep the address of an email opt-out that named a record but no address (read
        from that record) on the event, and enter it in the consent ledger in the same
        transaction, as if it had come with the event (a rebuild gives the same ledger)."""
        with self.engine.begin() as tx:
            if not tx.execute("learn_event_email", email=email, now=iso(utcnow()), id=event_id):
                return False
            row = tx.one("event_by_id", id=event_id)
            if row is not None:
                self.ledger.apply(tx, [(event_id, row)])
        return True

    def defer(self, event_id: int, error: str, retry_at: float) -> None:
        """Route again at ``retry_at`` (a lookup failed or its CRM is paused)."""
        with self.engine.begin() as tx:
            tx.execute("defer_event", retry_at=retry_at, error=error, now=iso(utcnow()), id=event_id)

    def replay_quarantined(self, ids: list[int] | None) -> int:
        """Route quarantined events again (all of them for ``None``)."""
        now_iso = iso(utcnow())
        with self.engine.begin() as tx:
            if ids is None:
                return tx.execute("replay_quarantined_events", now=now_iso)
            return sum(tx.execute("replay_quarantined_event", now=now_iso, id=i) for i in ids)
