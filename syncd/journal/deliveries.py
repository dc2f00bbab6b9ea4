"""The deliveries store: one row per (event, target record), leased by pushers and
settled with the outcome the pusher decided; the field clocks that make pushes
idempotent (newest ``occurred_at`` per field wins)."""
from __future__ import annotations

import json
import time
from typing import Collection, Mapping

from connectors.types import RecordRef
from syncd.events import iso, utcnow
from syncd.journal.base import Clock, Delivery, Outcome
from syncd.journal.engine import Engine, Tx

CLOCK_CHUNK = 300   # records per field-clock query


class DeliveryStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def add_targets(self, event_id: int, targets: list[RecordRef]) -> None:
        self.add_targets_many([(event_id, targets)])

    def add_targets_many(self, routed: list[tuple[int, list[RecordRef]]], *,
                         still_routing: Collection[int] = (), notes: Mapping[int, str] | None = None) -> None:
        """One delivery per (event, target record), for many events in one transaction.
        Events in ``still_routing`` get their deliveries but keep waiting for routing (a
        lookup is still owed; a later pass adds the rest, and inserts are idempotent).
        ``notes`` keeps, as the event's status reason, why it was routed short of a lookup."""
        if not routed:
            return
        now_iso, now = iso(utcnow()), time.time()
        with self.engine.begin() as tx:
            for event_id, targets in routed:
                for ref in targets:
                    tx.execute("insert_delivery", event_id=event_id, crm=ref.crm, obj=ref.obj,
                               record_id=ref.record_id, now=now, now_iso=now_iso)
                if event_id not in still_routing:
                    tx.execute("mark_event_routed", now=now_iso, id=event_id, reason=(notes or {}).get(event_id))
                    tx.execute("honour_routed_event", now_iso=now_iso, id=event_id)

    def requeue(self, targets: list[tuple[int, RecordRef]]) -> int:
        """Push (event, record) again (``syncd audit --repair``): a new delivery, or the
        done/dead one of that pair back to pending (``add_targets`` keeps an existing
        pair as it is). Returns how many were queued."""
        if not targets:
            return 0
        now_iso, now = iso(utcnow()), time.time()
        queued = 0
        with self.engine.begin() as tx:
            for event_id, ref in targets:
                keys = {"event_id": event_id, "crm": ref.crm, "obj": ref.obj, "record_id": ref.record_id}
                added = tx.execute("insert_delivery", now=now, now_iso=now_iso, **keys)
                queued += added or tx.execute("requeue_delivery_for_audit", now=now, **keys)
        return queued

    def add_found_targets(self, found: list[tuple[int, list[RecordRef]]]) -> int:
        """Deliveries for records found outside routing (the reflector's poll saw a record
        appear with an identity the ledger holds as opted out): one per (event, record),
        so a target the event already has (pending, done or dead) is never added twice.
        Unlike :meth:`add_targets_many`, an event still waiting for routing stays so (its
        own routing must still reach the named record); a quarantined one is routed now.
        Returns the number of deliveries added."""
        if not found:
            return 0
        now_iso, now = iso(utcnow()), time.time()
        added = 0
        with self.engine.begin() as tx:
            for event_id, targets in sorted(found, key=lambda p: p[0]):
                for ref in targets:
                    added += tx.execute("insert_delivery", event_id=event_id, crm=ref.crm, obj=ref.obj,
                                        record_id=ref.record_id, now=now, now_iso=now_iso)
                tx.execute("mark_quarantined_event_routed", now=now_iso, id=event_id)
        return added

    def claim(self, limit: int, lease_seconds: float, crm: str | None = None) -> list[Delivery]:
        """Lease up to ``limit`` due deliveries (of one CRM, when named), never two
        processes' leases on one record at once."""
        self.engine.before_lease()
        now = time.time()
        with self.engine.begin() as tx:
            self.engine.lock_claims(tx)
            ids = [r["id"] for r in tx.all("claim_deliveries", until=now + lease_seconds, owner=self.engine.owner,
                                           now=now, crm=crm, limit=limit)]
            if not ids:
                return []
            rows = tx.all("deliveries_by_ids", ids=sorted(ids))
        return [Delivery(id=r["id"], event_id=r["event_id"], ref=RecordRef(r["crm"], r["obj"], r["record_id"]),
                         attempts=r["attempts"], created_at=r["created_at"], kind=r["kind"], channel=r["channel"],
                         occurred_at=r["occurred_at"], source=r["source"], email=r["email"], reason=r["reason"],
                         received_at=r["received_at"]) for r in rows]

    def settle(self, outcomes: list[Outcome]) -> None:
        """Apply outcomes as decided: done (advancing the field clocks), retry (a
        ``paused`` retry gives the claim's attempt back) or dead."""
        if not outcomes:
            return
        now_iso = iso(utcnow())
        with self.engine.begin() as tx:
            pushed: set[str] = set()
            for o in outcomes:
                if o.state == "done":
                    tx.execute("settle_delivery_done", now_iso=now_iso, note=o.note or "applied", id=o.delivery_id)
                    if o.ref is not None and o.applied_at:
                        for name, value in o.applied.items():
                            self._advance_clock(tx, o, name, value)
                    if o.ref is not None and o.wrote:
                        pushed.add(o.ref.crm)
                elif o.state in ("retry", "paused"):
                    tx.execute("settle_delivery_retry", retry_at=o.retry_at or time.time(), error=o.error,
                               refund=1 if o.state == "paused" else 0, id=o.delivery_id)
                else:
                    tx.execute("settle_delivery_dead", error=o.error, note=o.note or "dead", id=o.delivery_id)
            for crm in sorted(pushed):
                tx.execute("note_push", crm=crm, now_iso=now_iso)
            self._honour_events(tx, [o.delivery_id for o in outcomes if o.state == "done"], now_iso)

    @staticmethod
    def _honour_events(tx: Tx, done_ids: list[int], now_iso: str | None) -> None:
        """An opt-out whose last target just settled done is honoured now (the
        compliance clock's ``honoured_at``), in the settle's own transaction."""
        if done_ids:
            tx.execute("honour_settled_events", ids=done_ids, now_iso=now_iso)

    @staticmethod
    def _advance_clock(tx: Tx, o: Outcome, name: str, value: object) -> None:
        assert o.ref is not None
        tx.execute("advance_clock", crm=o.ref.crm, obj=o.ref.obj, record_id=o.ref.record_id, field=name,
                   occurred_at=o.applied_at, value=json.dumps(value), event_id=o.applied_event_id)

    def clocks(self, refs: list[RecordRef]) -> dict[RecordRef, dict[str, Clock]]:
        out: dict[RecordRef, dict[str, Clock]] = {ref: {} for ref in refs}
        if not refs:
            return out
        with self.engine.read() as tx:
            for i in range(0, len(refs), CLOCK_CHUNK):
                chunk = [(ref.crm, ref.obj, ref.record_id) for ref in refs[i:i + CLOCK_CHUNK]]
                for r in tx.all("clocks_of_records", refs=chunk):
                    out[RecordRef(r["crm"], r["obj"], r["record_id"])][r["field"]] = \
                        Clock(r["occurred_at"], json.loads(r["value"]))
        return out

    def release_leases(self) -> int:
        """Hand this process's in-flight deliveries back (graceful shutdown)."""
        with self.engine.begin() as tx:
            return tx.execute("release_leases", owner=self.engine.owner)

    def replay_dead(self, ids: list[int] | None) -> int:
        """Deliver dead deliveries again (all of them for ``None``); field clocks keep it idempotent."""
        now = time.time()
        with self.engine.begin() as tx:
            if ids is None:
                return tx.execute("replay_dead_deliveries", now=now)
            return sum(tx.execute("replay_dead_delivery", now=now, id=i) for i in ids)
