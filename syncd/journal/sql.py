"""The journal logic shared by the SQL engines.

Queries are written once with ``?`` placeholders; an engine converts them
(``_sql``) and supplies transactions (``_write`` / ``_read``) and the claim
statement, which is where engines differ (SKIP LOCKED vs. SQLite's single writer).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
import socket
import time
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from connectors.types import RecordRef
from syncd.events import ConsentEvent, iso, utcnow
from syncd.journal.group_commit import GroupCommit
from syncd.masking import mask_text
from syncd.journal.base import (Clock, Delivery, Outcome, Recorded, Reflection, ReflectionCandidate,
                                ReflectionOutcome, StoredEvent)

DEFAULT_MAX_STORED_BODY_BYTES = 65536
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

EVENT_COLUMNS = ("id, source, source_event_id, event_type, kind, channel, external_lead_id, phone, "
                 "phone_raw, email, reason, occurred_at, received_at, status, status_reason, "
                 "route_attempts, details")

DELIVERY_SELECT = """
SELECT d.id, d.event_id, d.crm, d.obj, d.record_id, d.attempts, d.created_at,
       e.kind, e.channel, e.occurred_at, e.source, e.email, e.reason, e.received_at
FROM deliveries d JOIN events e ON e.id = d.event_id
"""


def new_owner() -> str:
    """Identifies one process's leases (host, pid, random) for release on shutdown."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class SqlJournal:
    owner: str
    max_stored_body_bytes: int = DEFAULT_MAX_STORED_BODY_BYTES   # receiver.max_stored_body_bytes

    # --- engine hooks ----------------------------------------------------------------
    def _write(self) -> AbstractContextManager[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql

    def _claim_ids(self, cur: Any, now: float, limit: int, until: float,
                   crm: str | None = None) -> list[int]:  # pragma: no cover
        raise NotImplementedError

    def _claim_reflection_ids(self, cur: Any, now: float, limit: int, until: float) -> list[int]:  # pragma: no cover
        raise NotImplementedError

    # --- ingest ----------------------------------------------------------------------
    _group: GroupCommit  # made by each engine's __init__, with its driver's error class

    def record(self, event: ConsentEvent) -> Recorded:
        """Durably record ``event``; concurrent calls share one commit (group commit)."""
        return self._group.submit(event)

    _INSERT_EVENTS = ("INSERT INTO events (source, source_event_id, event_type, kind, channel, "
                      "external_lead_id, phone, phone_raw, email, reason, occurred_at, received_at, "
                      "details, raw, status, status_reason, updated_at) VALUES ")
    _EVENT_VALUES = "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"

    def _event_row(self, event: ConsentEvent, now: str) -> tuple[Any, ...]:
        status = "quarantined" if event.quarantine_reason and event.event_type == "consent" else "new"
        return (event.source, event.source_event_id, event.event_type, event.kind, event.channel,
                event.external_lead_id, event.phone, event.phone_raw, event.email, event.reason,
                iso(event.occurred_at), iso(event.received_at),
                json.dumps(event.details, default=str, ensure_ascii=False),
                stored_body(event.raw, self.max_stored_body_bytes), status,
                event.quarantine_reason, now)

    def _ingest_write(self) -> AbstractContextManager[Any]:
        """The transaction a group commit inserts in (PostgreSQL saves round trips)."""
        return self._write()

    def _insert_batch(self, events: list[ConsentEvent]) -> list[Recorded]:
        """Group commit's batch insert: one transaction of its own."""
        with self._ingest_write() as cur:
            return self._insert_events(cur, events)

    def _insert_events(self, cur: Any, events: list[ConsentEvent]) -> list[Recorded]:
        """Insert many events with one statement (group commit: one round of the
        driver per batch, not per event); duplicates keep the existing id. Rows go
        in key order, so two replicas inserting overlapping batches take the unique
        index's locks in the same order and cannot deadlock."""
        now = iso(utcnow())
        in_key_order = sorted(events, key=lambda e: (e.source or "", e.source_event_id or ""))
        params = [v for event in in_key_order for v in self._event_row(event, now)]
        cur.execute(self._sql(self._INSERT_EVENTS + ",".join([self._EVENT_VALUES] * len(events))
                              + " ON CONFLICT (source, source_event_id) DO NOTHING "
                              "RETURNING id, source, source_event_id"), params)
        created = {(src, sid): int(eid) for eid, src, sid in cur.fetchall()}
        missing = {(e.source, e.source_event_id) for e in events} - set(created)
        existing: dict[tuple[str, str], int] = {}
        for src, sid in missing:
            cur.execute(self._sql("SELECT id FROM events WHERE source = ? AND source_event_id = ?"), (src, sid))
            existing[(src, sid)] = int(cur.fetchone()[0])
        results = []
        for event in events:
            key = (event.source, event.source_event_id)
            if key in created:
                results.append(Recorded(created.pop(key), True))
                existing[key] = results[-1].event_id   # a second copy in this batch is a duplicate
            else:
                results.append(Recorded(existing[key], False))
        return results

    # --- routing ---------------------------------------------------------------------
    # Appended to the claim sub-selects: PostgreSQL skips rows another replica is claiming.
    _skip_locked = ""

    def events_to_route(self, limit: int, lease_seconds: float = 120.0) -> list[StoredEvent]:
        """Lease new events for routing: replicas never route (and look up) the same
        event twice at once; one whose routing died is offered again after the lease."""
        now = time.time()
        with self._write() as cur:
            cur.execute(self._sql(
                "UPDATE events SET next_route_at = ?, route_owner = ? WHERE id IN (SELECT id FROM events "
                f"WHERE status = 'new' AND next_route_at <= ? ORDER BY id LIMIT ?{self._skip_locked}) RETURNING id"),
                (now + lease_seconds, self.owner, now, limit))
            ids = sorted(r[0] for r in cur.fetchall())
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            cur.execute(self._sql(f"SELECT {EVENT_COLUMNS} FROM events WHERE id IN ({marks}) ORDER BY id"), ids)
            return [self._event(r) for r in cur.fetchall()]

    def get_event(self, event_id: int) -> StoredEvent | None:
        with self._read() as cur:
            cur.execute(self._sql(f"SELECT {EVENT_COLUMNS} FROM events WHERE id = ?"), (event_id,))
            row = cur.fetchone()
            return self._event(row) if row else None

    @staticmethod
    def _event(r: Any) -> StoredEvent:
        return StoredEvent(id=r[0], source=r[1], source_event_id=r[2], event_type=r[3], kind=r[4],
                           channel=r[5], external_lead_id=r[6], phone=r[7], phone_raw=r[8], email=r[9],
                           reason=r[10], occurred_at=r[11], received_at=r[12], status=r[13],
                           status_reason=r[14], route_attempts=r[15], details=json.loads(r[16] or "{}"))

    def add_targets(self, event_id: int, targets: list[RecordRef]) -> None:
        self.add_targets_many([(event_id, targets)])

    def add_targets_many(self, routed: list[tuple[int, list[RecordRef]]]) -> None:
        """One delivery per (event, target record), for many events in one transaction."""
        if not routed:
            return
        now_iso, now = iso(utcnow()), time.time()
        with self._write() as cur:
            for event_id, targets in routed:
                for ref in targets:
                    cur.execute(self._sql(
                        "INSERT INTO deliveries (event_id, crm, obj, record_id, state, attempts, "
                        "next_attempt_at, lease_until, created_at) VALUES (?,?,?,?,'pending',0,?,0,?) "
                        "ON CONFLICT (event_id, crm, obj, record_id) DO NOTHING"),
                        (event_id, ref.crm, ref.obj, ref.record_id, now, now_iso))
                cur.execute(self._sql(
                    "UPDATE events SET status = 'routed', status_reason = NULL, updated_at = ? "
                    "WHERE id = ? AND status IN ('new', 'quarantined')"), (now_iso, event_id))

    def quarantine(self, event_id: int, reason: str) -> None:
        with self._write() as cur:
            cur.execute(self._sql(
                "UPDATE events SET status = 'quarantined', status_reason = ?, updated_at = ? "
                "WHERE id = ? AND status = 'new'"), (reason, iso(utcnow()), event_id))

    def ignore(self, event_id: int, reason: str) -> None:
        """Kept but never routed (a channel syncd does not model): no delivery, shown as ignored."""
        with self._write() as cur:
            cur.execute(self._sql(
                "UPDATE events SET status = 'ignored', status_reason = ?, updated_at = ? "
                "WHERE id = ? AND status = 'new'"), (reason, iso(utcnow()), event_id))

    def defer_routing(self, event_id: int, error: str, retry_at: float) -> None:
        with self._write() as cur:
            cur.execute(self._sql(
                "UPDATE events SET route_attempts = route_attempts + 1, next_route_at = ?, route_owner = NULL, "
                "status_reason = ?, updated_at = ? WHERE id = ? AND status = 'new'"),
                (retry_at, error, iso(utcnow()), event_id))

    # --- delivery --------------------------------------------------------------------
    def claim(self, limit: int, lease_seconds: float, crm: str | None = None) -> list[Delivery]:
        """Lease up to ``limit`` due deliveries (of one CRM, when named), never two
        processes' leases on one record at once."""
        now = time.time()
        with self._write() as cur:
            ids = self._claim_ids(cur, now, limit, now + lease_seconds, crm)
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            cur.execute(self._sql(DELIVERY_SELECT + f" WHERE d.id IN ({marks}) ORDER BY d.id"), ids)
            rows = cur.fetchall()
        return [Delivery(id=r[0], event_id=r[1], ref=RecordRef(r[2], r[3], r[4]), attempts=r[5],
                         created_at=r[6], kind=r[7], channel=r[8], occurred_at=r[9], source=r[10],
                         email=r[11], reason=r[12], received_at=r[13]) for r in rows]

    def settle(self, outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        now_iso = iso(utcnow())
        with self._write() as cur:
            for o in outcomes:
                if o.state == "done":
                    cur.execute(self._sql(
                        "UPDATE deliveries SET state = 'done', delivered_at = ?, outcome = ?, "
                        "last_error = NULL, lease_until = 0, lease_owner = NULL "
                        "WHERE id = ? AND state = 'pending'"), (now_iso, o.note or "applied", o.delivery_id))
                elif o.state == "retry":
                    # A pause (CRM quota) is not the delivery's fault: it costs no attempt.
                    cur.execute(self._sql(
                        "UPDATE deliveries SET next_attempt_at = ?, last_error = ?, lease_until = 0, "
                        "lease_owner = NULL, attempts = attempts - ? WHERE id = ? AND state = 'pending'"),
                        (o.retry_at or time.time(), o.error, 1 if o.note == "paused" else 0, o.delivery_id))
                else:
                    cur.execute(self._sql(
                        "UPDATE deliveries SET state = 'dead', last_error = ?, outcome = ?, lease_until = 0, "
                        "lease_owner = NULL WHERE id = ? AND state = 'pending'"),
                        (o.error, o.note or "dead", o.delivery_id))
                if o.state == "done" and o.ref is not None and o.applied_at:
                    for name, value in o.applied.items():
                        self._advance_clock(cur, o.ref, name, value, o.applied_at, o.applied_event_id)
            self._touch_crm(cur, outcomes, now_iso)

    def _advance_clock(self, cur: Any, ref: RecordRef, name: str, value: Any, at: str,
                       event_id: int | None) -> None:
        cur.execute(self._sql(
            "INSERT INTO field_clocks (crm, obj, record_id, field, occurred_at, value, event_id) "
            "VALUES (?,?,?,?,?,?,?) ON CONFLICT (crm, obj, record_id, field) DO UPDATE SET "
            "occurred_at = excluded.occurred_at, value = excluded.value, event_id = excluded.event_id "
            "WHERE field_clocks.occurred_at <= excluded.occurred_at"),
            (ref.crm, ref.obj, ref.record_id, name, at, json.dumps(value), event_id))

    def _touch_crm(self, cur: Any, outcomes: list[Outcome], now_iso: str) -> None:
        done = {o.ref.crm for o in outcomes if o.state == "done" and o.ref and o.note != "superseded"}
        for crm in done:
            cur.execute(self._sql(
                "INSERT INTO crm_status (crm, last_push_at) VALUES (?, ?) "
                "ON CONFLICT (crm) DO UPDATE SET last_push_at = excluded.last_push_at"), (crm, now_iso))

    # --- CRM pauses (a spent account-wide quota): one row per CRM, so every replica
    # honours the same pause and a restart does not forget it. The pusher decides.
    def crm_pause(self, crm: str) -> tuple[float, str | None] | None:
        """(paused until, reason) for a paused CRM, else None."""
        with self._read() as cur:
            cur.execute(self._sql("SELECT paused_until, pause_reason FROM crm_status WHERE crm = ?"), (crm,))
            row = cur.fetchone()
        if row is None or row[0] is None:
            return None
        return float(row[0]), row[1]

    def pause_crm(self, crm: str, until: float, reason: str) -> None:
        with self._write() as cur:
            cur.execute(self._sql(
                "INSERT INTO crm_status (crm, paused_until, pause_reason) VALUES (?, ?, ?) "
                "ON CONFLICT (crm) DO UPDATE SET paused_until = excluded.paused_until, "
                "pause_reason = excluded.pause_reason"), (crm, until, reason))

    def take_pause_probe(self, crm: str, now: float, next_until: float) -> bool:
        """Whether this process checks an ended pause: the first to move ``paused_until``
        from the past to ``next_until`` does; the others see the pause go on meanwhile."""
        with self._write() as cur:
            cur.execute(self._sql(
                "UPDATE crm_status SET paused_until = ? "
                "WHERE crm = ? AND paused_until IS NOT NULL AND paused_until <= ?"), (next_until, crm, now))
            return (cur.rowcount or 0) == 1

    def resume_crm(self, crm: str) -> None:
        with self._write() as cur:
            cur.execute(self._sql(
                "UPDATE crm_status SET paused_until = NULL, pause_reason = NULL WHERE crm = ?"), (crm,))

    def clocks(self, refs: list[RecordRef]) -> dict[RecordRef, dict[str, Clock]]:
        out: dict[RecordRef, dict[str, Clock]] = {ref: {} for ref in refs}
        if not refs:
            return out
        with self._read() as cur:
            for i in range(0, len(refs), 300):
                chunk = refs[i:i + 300]
                where = " OR ".join("(crm = ? AND obj = ? AND record_id = ?)" for _ in chunk)
                params = [v for ref in chunk for v in (ref.crm, ref.obj, ref.record_id)]
                cur.execute(self._sql(
                    f"SELECT crm, obj, record_id, field, occurred_at, value FROM field_clocks WHERE {where}"),
                    params)
                for crm, obj, rid, name, at, value in cur.fetchall():
                    out[RecordRef(crm, obj, rid)][name] = Clock(at, json.loads(value))
        return out

    def take_over_dead_leases(self) -> int:
        """Free the leases held by processes that are gone (see PostgreSQL). SQLite
        does this once, when ``serve`` takes the file's lock."""
        return 0

    def release_leases(self) -> int:
        """Hand this process's in-flight deliveries back (graceful shutdown)."""
        with self._write() as cur:
            cur.execute(self._sql(
                "UPDATE deliveries SET lease_until = 0, lease_owner = NULL, attempts = attempts - 1 "
                "WHERE lease_owner = ? AND state = 'pending' AND attempts > 0"), (self.owner,))
            return cur.rowcount or 0

    # --- operations ------------------------------------------------------------------
    def counts(self) -> dict[str, Any]:
        now = time.time()
        with self._read() as cur:
            cur.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state")
            by_state = dict(cur.fetchall())
            cur.execute(self._sql(
                "SELECT COUNT(*) FROM deliveries WHERE state = 'pending' AND attempts > 0 "
                "AND next_attempt_at > ?"), (now,))
            retrying = cur.fetchone()[0]
            cur.execute("SELECT status, COUNT(*) FROM events WHERE event_type = 'consent' GROUP BY status")
            by_status = dict(cur.fetchall())
            cur.execute("SELECT MIN(created_at) FROM deliveries WHERE state = 'pending'")
            oldest_delivery = cur.fetchone()[0]
            cur.execute("SELECT MIN(received_at) FROM events WHERE status = 'new' AND event_type = 'consent'")
            oldest_event = cur.fetchone()[0]
            cur.execute("SELECT crm, last_push_at, last_poll_at, paused_until, pause_reason FROM crm_status "
                        "ORDER BY crm")
            crms = {r[0]: {"last_push_at": r[1], "last_poll_at": r[2],
                           "paused_until": r[3] if r[3] is not None and r[3] > now else None,
                           "pause_reason": r[4] if r[3] is not None else None} for r in cur.fetchall()}
            reflections = self._reflection_counts(cur)
        oldest = min([t for t in (oldest_delivery, oldest_event) if t], default=None)
        age = None
        if oldest:
            age = max(0.0, (utcnow() - datetime.fromisoformat(oldest.replace("Z", "+00:00"))).total_seconds())
        return {
            "deliveries": {"pending": by_state.get("pending", 0), "retrying": retrying,
                           "done": by_state.get("done", 0), "dead": by_state.get("dead", 0)},
            "events": {"received": sum(by_status.values()), "unrouted": by_status.get("new", 0),
                       "routed": by_status.get("routed", 0), "reconciled": by_status.get("reconciled", 0)},
            "quarantined": by_status.get("quarantined", 0),
            "ignored": by_status.get("ignored", 0),   # kept, never routed: a channel syncd does not model
            "reflections": reflections,
            "oldest_pending_age_seconds": age,
            "crms": crms,
        }

    def _reflection_counts(self, cur: Any) -> dict[str, int]:
        cur.execute("SELECT state, COUNT(*) FROM reflections GROUP BY state")
        by = dict(cur.fetchall())
        return {"pending": by.get("pending", 0) + by.get("registered", 0), "done": by.get("done", 0),
                "failed": by.get("dead", 0)}

    # --- reflections to Sinch --------------------------------------------------------
    def add_reflections(self, candidates: list[ReflectionCandidate], channels: list[str],
                        watermark: tuple[str, str | None, str | None] | None = None) -> int:
        """Queue registrations and move the poll watermark in one transaction, so a
        crash between poll and register loses nothing. A phone + channel whose last
        registration (or pending one) is already of this kind is skipped: an opt-out
        is registered once, never in a loop. Opt-ins are queued only for phones this
        journal knows to be opted out at Sinch."""
        now_iso, now = iso(utcnow()), time.time()
        created = 0
        with self._write() as cur:
            for c in candidates:
                for channel in channels:
                    cur.execute(self._sql("SELECT kind FROM sinch_state WHERE phone = ? AND channel = ?"),
                                (c.phone, channel))
                    row = cur.fetchone()
                    known = row[0] if row else None
                    if known == c.kind or (c.kind == "opt_in" and known != "opt_out"):
                        continue
                    cur.execute(self._sql(
                        "INSERT INTO reflections (crm, obj, record_id, phone, channel, kind, request_id, state, "
                        "attempts, next_attempt_at, lease_until, flagged_at, created_at) "
                        "VALUES (?,?,?,?,?,?,?,'pending',0,?,0,?,?) RETURNING id"),
                        (c.ref.crm, c.ref.obj, c.ref.record_id, c.phone, channel, c.kind,
                         f"syncd-{uuid.uuid4().hex}", now, c.flagged_at, now_iso))
                    rid = cur.fetchone()[0]
                    self._set_sinch_state(cur, c.phone, channel, c.kind, rid, now_iso)
                    created += 1
            if watermark is not None:
                name, ts, last_id = watermark
                self._upsert_watermark(cur, name, ts, last_id, now_iso)
                crm = name.split(":", 1)[-1]
                cur.execute(self._sql(
                    "INSERT INTO crm_status (crm, last_poll_at) VALUES (?, ?) "
                    "ON CONFLICT (crm) DO UPDATE SET last_poll_at = excluded.last_poll_at"), (crm, now_iso))
        return created

    def _set_sinch_state(self, cur: Any, phone: str, channel: str, kind: str, rid: int | None, now_iso: str) -> None:
        cur.execute(self._sql(
            "INSERT INTO sinch_state (phone, channel, kind, reflection_id, updated_at) VALUES (?,?,?,?,?) "
            "ON CONFLICT (phone, channel) DO UPDATE SET kind = excluded.kind, "
            "reflection_id = excluded.reflection_id, updated_at = excluded.updated_at"),
            (phone, channel, kind, rid, now_iso))

    def claim_reflections(self, limit: int, lease_seconds: float) -> list[Reflection]:
        now = time.time()
        with self._write() as cur:
            ids = self._claim_reflection_ids(cur, now, limit, now + lease_seconds)
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            cur.execute(self._sql(
                "SELECT id, crm, obj, record_id, phone, channel, kind, request_id, attempts, created_at "
                f"FROM reflections WHERE id IN ({marks}) ORDER BY id"), ids)
            rows = cur.fetchall()
        return [Reflection(id=r[0], ref=RecordRef(r[1], r[2], r[3]), phone=r[4], channel=r[5], kind=r[6],
                           request_id=r[7], attempts=r[8], created_at=r[9]) for r in rows]

    def settle_reflections(self, outcomes: list[ReflectionOutcome]) -> None:
        if not outcomes:
            return
        now_iso = iso(utcnow())
        with self._write() as cur:
            for o in outcomes:
                if o.state == "registered":
                    # Waiting for Sinch's OPT_OUT/OPT_IN notification until the deadline.
                    cur.execute(self._sql(
                        "UPDATE reflections SET state = 'registered', registered_at = ?, next_attempt_at = ?, "
                        "last_error = NULL, lease_until = 0 WHERE id = ? AND state = 'pending'"),
                        (now_iso, o.at or time.time(), o.id))
                elif o.state == "retry":
                    cur.execute(self._sql(
                        "UPDATE reflections SET next_attempt_at = ?, last_error = ?, lease_until = 0 "
                        "WHERE id = ? AND state = 'pending'"), (o.at or time.time(), o.error, o.id))
                else:
                    self._kill_reflection(cur, o.id, o.error)

    def _kill_reflection(self, cur: Any, rid: int, error: str | None) -> None:
        cur.execute(self._sql("UPDATE reflections SET state = 'dead', last_error = ?, lease_until = 0 "
                              "WHERE id = ?"), (error, rid))
        # Forget it at Sinch's side so a later flag (or a replay) can register again.
        cur.execute(self._sql("DELETE FROM sinch_state WHERE reflection_id = ?"), (rid,))

    def expire_registered(self, max_attempts: int, timeout_text: str) -> int:
        """Registrations whose notification never came: register again, or give up."""
        now = time.time()
        with self._write() as cur:
            cur.execute(self._sql(
                "SELECT id, attempts FROM reflections WHERE state = 'registered' AND next_attempt_at <= ?"), (now,))
            rows = cur.fetchall()
            for rid, attempts in rows:
                if attempts >= max_attempts:
                    self._kill_reflection(cur, rid, f"gave up after {attempts} attempts: {timeout_text}")
                else:
                    cur.execute(self._sql(
                        "UPDATE reflections SET state = 'pending', next_attempt_at = ?, last_error = ? "
                        "WHERE id = ?"), (now, timeout_text, rid))
        return len(rows)

    def reconcile(self, event: StoredEvent, max_attempts: int,
                  retry_at: Callable[[int], float]) -> str | None:
        """Join a Sinch notification to the registration it answers (by request_id,
        else by phone + channel + kind). Returns "reflection" when it settled one,
        "unmatched" for a result nobody asked for, None for a consent change that
        Sinch made on its own (the caller routes it to the CRMs)."""
        d = event.details
        status = str(d.get("status") or "")
        channel = str(d.get("sinch_channel") or "WHATSAPP").upper()
        succeeded = status.endswith("_SUCCEEDED")
        now_iso = iso(utcnow())
        with self._write() as cur:
            row = None
            if d.get("request_id"):
                cur.execute(self._sql("SELECT id, attempts FROM reflections WHERE request_id = ?"),
                            (d["request_id"],))
                row = cur.fetchone()
            if row is None and event.phone:
                cur.execute(self._sql(
                    "SELECT id, attempts FROM reflections WHERE phone = ? AND channel = ? AND kind = ? "
                    "AND state IN ('registered', 'pending') ORDER BY id DESC LIMIT 1"),
                    (event.phone, channel, event.kind))
                row = cur.fetchone()
            if row is not None:
                rid, attempts = row
                if succeeded:
                    cur.execute(self._sql(
                        "UPDATE reflections SET state = 'done', done_at = ?, last_error = NULL, lease_until = 0 "
                        "WHERE id = ? AND state IN ('registered', 'pending')"), (now_iso, rid))
                else:
                    # Sinch's reason text can echo the phone or email: masked before it is
                    # stored, since dead-letters, export and the status page print it.
                    reason = json.dumps(d.get("error_details"), default=str, ensure_ascii=False)
                    error = mask_text(f"{status}: {reason}")[:500]
                    if attempts >= max_attempts:
                        self._kill_reflection(cur, rid, f"gave up after {attempts} attempts: {error}")
                    else:
                        cur.execute(self._sql(
                            "UPDATE reflections SET state = 'pending', next_attempt_at = ?, last_error = ?, "
                            "lease_until = 0 WHERE id = ? AND state IN ('registered', 'pending')"),
                            (retry_at(attempts), error, rid))
                self._mark_event(cur, event.id, "reconciled", f"reflection r{rid}: {status}", now_iso)
                return "reflection"
            if succeeded and event.phone and event.kind in ("opt_out", "opt_in"):
                self._set_sinch_state(cur, event.phone, channel, event.kind, None, now_iso)
                return None
            self._mark_event(cur, event.id, "reconciled", f"no registration matches this {status or 'result'}",
                             now_iso)
            return "unmatched"

    def _mark_event(self, cur: Any, event_id: int, status: str, reason: str, now_iso: str) -> None:
        cur.execute(self._sql("UPDATE events SET status = ?, status_reason = ?, updated_at = ? "
                              "WHERE id = ? AND status = 'new'"), (status, reason, now_iso, event_id))

    def dead_letters(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        with self._read() as cur:
            cur.execute(
                "SELECT d.id, d.event_id, e.source, e.source_event_id, d.crm, d.obj, d.record_id, "
                "d.attempts, d.last_error, e.received_at, e.kind, e.channel FROM deliveries d "
                "JOIN events e ON e.id = d.event_id WHERE d.state = 'dead' ORDER BY d.id")
            for r in cur.fetchall():
                rows.append({"id": f"d{r[0]}", "type": "delivery", "event_id": r[1], "source": r[2],
                             "source_event_id": r[3], "crm": r[4], "object": r[5], "record_id": r[6],
                             "attempts": r[7], "error": r[8], "received_at": r[9], "kind": r[10],
                             "channel": r[11]})
            cur.execute(
                "SELECT id, source, source_event_id, status_reason, received_at, kind, channel "
                "FROM events WHERE status = 'quarantined' ORDER BY id")
            for r in cur.fetchall():
                rows.append({"id": f"q{r[0]}", "type": "quarantine", "event_id": r[0], "source": r[1],
                             "source_event_id": r[2], "crm": None, "object": None, "record_id": None,
                             "attempts": None, "error": r[3], "received_at": r[4], "kind": r[5],
                             "channel": r[6]})
            cur.execute(
                "SELECT id, crm, obj, record_id, attempts, last_error, created_at, kind, channel "
                "FROM reflections WHERE state = 'dead' ORDER BY id")
            for r in cur.fetchall():
                rows.append({"id": f"r{r[0]}", "type": "reflection", "event_id": None, "source": "sinch",
                             "source_event_id": None, "crm": r[1], "object": r[2], "record_id": r[3],
                             "attempts": r[4], "error": r[5], "received_at": r[6], "kind": r[7],
                             "channel": r[8].lower()})
        return rows

    def replay(self, ids: list[str] | None) -> int:
        """Re-queue dead deliveries (``d<N>``) and quarantined events (``q<N>``);
        ``None`` re-queues every one. Effects stay idempotent: field clocks decide."""
        now_iso, now = iso(utcnow()), time.time()
        count = 0
        with self._write() as cur:
            if ids is None:
                cur.execute(self._sql(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                    "lease_until = 0, outcome = NULL WHERE state = 'dead'"), (now,))
                count += cur.rowcount or 0
                cur.execute(self._sql(
                    "UPDATE events SET status = 'new', route_attempts = 0, next_route_at = 0, "
                    "updated_at = ? WHERE status = 'quarantined'"), (now_iso,))
                count += cur.rowcount or 0
                cur.execute(self._sql("SELECT id FROM reflections WHERE state = 'dead'"))
                for (rid,) in cur.fetchall():
                    count += self._revive_reflection(cur, rid, now, now_iso)
                return count
            for raw in ids:
                kind, num = parse_letter_id(raw)
                if kind == "r":
                    count += self._revive_reflection(cur, num, now, now_iso)
                    continue
                if kind == "d":
                    cur.execute(self._sql(
                        "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                        "lease_until = 0, outcome = NULL WHERE id = ? AND state = 'dead'"), (now, num))
                else:
                    cur.execute(self._sql(
                        "UPDATE events SET status = 'new', route_attempts = 0, next_route_at = 0, "
                        "updated_at = ? WHERE id = ? AND status = 'quarantined'"), (now_iso, num))
                count += cur.rowcount or 0
        return count

    def _revive_reflection(self, cur: Any, rid: int, now: float, now_iso: str) -> int:
        cur.execute(self._sql(
            "UPDATE reflections SET state = 'pending', attempts = 0, next_attempt_at = ?, lease_until = 0 "
            "WHERE id = ? AND state = 'dead' RETURNING phone, channel, kind"), (now, rid))
        row = cur.fetchone()
        if row is None:
            return 0
        self._set_sinch_state(cur, row[0], row[1], row[2], rid, now_iso)
        return 1

    def recent_activity(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest consent events with their targets' delivery state (status page)."""
        with self._read() as cur:
            cur.execute(self._sql(
                "SELECT e.id, e.source, e.received_at, e.occurred_at, e.kind, e.channel, e.status, "
                "e.status_reason, d.id, d.crm, d.obj, d.record_id, d.state, d.attempts, d.last_error, "
                "d.delivered_at FROM (SELECT * FROM events WHERE event_type = 'consent' ORDER BY id DESC "
                "LIMIT ?) e LEFT JOIN deliveries d ON d.event_id = e.id ORDER BY e.id DESC, d.id"), (limit,))
            rows = cur.fetchall()
        return [{"event_id": r[0], "source": r[1], "received_at": r[2], "occurred_at": r[3], "kind": r[4],
                 "channel": r[5], "event_status": r[6], "event_reason": r[7],
                 "delivery_id": f"d{r[8]}" if r[8] is not None else None, "crm": r[9], "object": r[10],
                 "record_id": r[11], "state": r[12], "attempts": r[13], "error": r[14], "delivered_at": r[15]}
                for r in rows]

    def export_rows(self, since: datetime | None) -> Iterator[dict[str, Any]]:
        since_iso = iso(since.astimezone(timezone.utc)) if since else ""
        with self._read() as cur:
            # The newest registration in Sinch for the target record, if any: the proof
            # that a CRM-side flag also reached the messaging platform.
            cur.execute(self._sql(
                "SELECT e.id, e.source, e.source_event_id, e.received_at, e.occurred_at, e.kind, "
                "e.channel, e.status, e.status_reason, d.crm, d.obj, d.record_id, d.state, "
                "d.delivered_at, d.attempts, d.last_error, d.outcome, r.state, "
                "COALESCE(r.done_at, r.registered_at, r.created_at), r.last_error, e.details "
                "FROM events e LEFT JOIN deliveries d ON d.event_id = e.id "
                "LEFT JOIN reflections r ON r.id = (SELECT MAX(x.id) FROM reflections x WHERE x.crm = d.crm "
                "AND x.obj = d.obj AND x.record_id = d.record_id) "
                "WHERE e.event_type = 'consent' AND e.received_at >= ? ORDER BY e.id, d.id"), (since_iso,))
            rows = cur.fetchall()
        for r in rows:
            state = r[12] or (r[7] if r[7] in ("quarantined", "reconciled", "ignored") else "unrouted")
            details = json.loads(r[20] or "{}")
            unmodelled = details.get("unmodelled") or {}
            yield {"event_id": r[0], "source": r[1], "source_event_id": r[2], "received_at": r[3],
                   "occurred_at": r[4], "kind": r[5], "channel": r[6], "target_crm": r[9],
                   "target_object": r[10], "target_record": r[11], "state": state,
                   "delivered_at": r[13], "attempts": r[14],
                   "error": r[15] if r[12] else r[8], "outcome": r[16],
                   "reflection": {"dead": "failed", "registered": "pending"}.get(r[17], r[17]),
                   "reflection_at": r[18], "reflection_error": r[19],
                   # The source's own channel value (Apten ``manual``, Sinch ``VIBERBM``...)
                   # and the fields syncd kept without modelling them.
                   "raw_channel": details.get("raw_channel") or details.get("sinch_channel"),
                   "unmodelled": ";".join(f"{k}={v}" for k, v in sorted(unmodelled.items())) or None}

    # --- watermarks & health ---------------------------------------------------------
    def get_watermark(self, name: str) -> tuple[str | None, str | None]:
        with self._read() as cur:
            cur.execute(self._sql("SELECT ts, last_id FROM watermarks WHERE name = ?"), (name,))
            row = cur.fetchone()
            return (row[0], row[1]) if row else (None, None)

    def set_watermark(self, name: str, ts: str | None, last_id: str | None) -> None:
        with self._write() as cur:
            self._upsert_watermark(cur, name, ts, last_id, iso(utcnow()))

    def _upsert_watermark(self, cur: Any, name: str, ts: str | None, last_id: str | None, now_iso: str) -> None:
        cur.execute(self._sql(
            "INSERT INTO watermarks (name, ts, last_id, updated_at) VALUES (?,?,?,?) "
            "ON CONFLICT (name) DO UPDATE SET ts = excluded.ts, last_id = excluded.last_id, "
            "updated_at = excluded.updated_at"), (name, ts, last_id, now_iso))

    def healthcheck(self) -> None:
        """Raises unless a write transaction can commit."""
        with self._write() as cur:
            cur.execute(self._sql(
                "INSERT INTO watermarks (name, ts, updated_at) VALUES ('health', NULL, ?) "
                "ON CONFLICT (name) DO UPDATE SET updated_at = excluded.updated_at"), (iso(utcnow()),))


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
