"""The reflections store: CRM do-not-contact flags queued for registration in Sinch,
their leases and outcomes, and what this journal knows Sinch holds per phone and
channel (``sinch_state``), so an opt-out is registered once, never in a loop."""
from __future__ import annotations

import time
import uuid

from connectors.types import RecordRef
from syncd.events import iso, utcnow
from syncd.journal.base import Reflection, ReflectionCandidate, ReflectionOutcome, Registration
from syncd.journal.engine import Engine, Tx


class ReflectionStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def add(self, candidates: list[ReflectionCandidate], channels: list[str],
            watermark: tuple[str, str | None, str | None] | None = None) -> int:
        """Queue registrations and move the poll watermark in one transaction, so a
        crash between poll and register loses nothing. A phone + channel whose last
        registration (or pending one) is already of this kind is skipped. Opt-ins are
        queued only for phones this journal knows to be opted out at Sinch."""
        now_iso, now = iso(utcnow()), time.time()
        created = 0
        with self.engine.begin() as tx:
            for c in candidates:
                for channel in channels:
                    known = tx.value("sinch_kind", phone=c.phone, channel=channel)
                    if known == c.kind or (c.kind == "opt_in" and known != "opt_out"):
                        continue
                    rid = tx.value("insert_reflection", crm=c.ref.crm, obj=c.ref.obj, record_id=c.ref.record_id,
                                   phone=c.phone, channel=channel, kind=c.kind,
                                   request_id=f"syncd-{uuid.uuid4().hex}", now=now, flagged_at=c.flagged_at,
                                   now_iso=now_iso)
                    self._set_sinch_state(tx, c.phone, channel, c.kind, rid, now_iso)
                    created += 1
            if watermark is not None:
                name, ts, last_id = watermark
                tx.execute("set_watermark", name=name, ts=ts, last_id=last_id, now_iso=now_iso)
                tx.execute("note_poll", crm=name.split(":", 1)[-1], now_iso=now_iso)
        return created

    @staticmethod
    def _set_sinch_state(tx: Tx, phone: str, channel: str, kind: str, rid: int | None,
                         now_iso: str | None) -> None:
        tx.execute("set_sinch_state", phone=phone, channel=channel, kind=kind, reflection_id=rid, now_iso=now_iso)

    def claim(self, limit: int, lease_seconds: float) -> list[Reflection]:
        self.engine.before_lease()
        now = time.time()
        with self.engine.begin() as tx:
            ids = [r["id"] for r in tx.all("claim_reflections", until=now + lease_seconds, owner=self.engine.owner,
                                           now=now, limit=limit)]
            if not ids:
                return []
            rows = tx.all("reflections_by_ids", ids=sorted(ids))
        return [Reflection(id=r["id"], ref=RecordRef(r["crm"], r["obj"], r["record_id"]), phone=r["phone"],
                           channel=r["channel"], kind=r["kind"], request_id=r["request_id"], attempts=r["attempts"],
                           created_at=r["created_at"]) for r in rows]

    def settle(self, outcomes: list[ReflectionOutcome]) -> None:
        """Apply the outcomes of registration calls: registered (wait for the
        notification until ``at``), retry at ``at``, or dead."""
        if not outcomes:
            return
        now_iso = iso(utcnow())
        with self.engine.begin() as tx:
            for o in outcomes:
                if o.state == "registered":
                    tx.execute("reflection_registered", now_iso=now_iso, deadline=o.at or time.time(), id=o.id)
                elif o.state == "retry":
                    tx.execute("reflection_retry", retry_at=o.at or time.time(), error=o.error, id=o.id)
                else:
                    self._kill(tx, o.id, o.error)

    @staticmethod
    def _kill(tx: Tx, rid: int, error: str | None) -> None:
        tx.execute("reflection_dead", error=error, id=rid)
        # Forget it at Sinch's side so a later flag (or a replay) can register again.
        tx.execute("forget_sinch_state", id=rid)

    def expire(self, max_attempts: int, timeout_text: str) -> int:
        """Registrations whose notification never came: register again, or give up."""
        now = time.time()
        with self.engine.begin() as tx:
            rows = tx.all("registrations_past_deadline", now=now)
            for r in rows:
                if r["attempts"] >= max_attempts:
                    self._kill(tx, r["id"], f"gave up after {r['attempts']} attempts: {timeout_text}")
                else:
                    tx.execute("reflection_pending_again", now=now, error=timeout_text, id=r["id"])
        return len(rows)

    # --- Sinch notifications (the reflector decides; see Reflector.reconcile) --------
    def match(self, request_id: str | None, phone: str | None, channel: str, kind: str | None) -> Registration | None:
        """The registration a Sinch notification answers: by ``request_id``, else the
        newest open one for this phone, channel and kind."""
        with self.engine.read() as tx:
            row = tx.one("reflection_by_request_id", request_id=request_id) if request_id else None
            if row is None and phone:
                row = tx.one("open_reflection_by_phone", phone=phone, channel=channel, kind=kind)
        return Registration(row["id"], row["attempts"]) if row else None

    def apply_notification(self, event_id: int, outcome: ReflectionOutcome, note: str) -> None:
        """Settle the registration a notification answered (done, retry at ``at``, or
        dead) and mark the notification's event reconciled, in one transaction."""
        now_iso = iso(utcnow())
        with self.engine.begin() as tx:
            if outcome.state == "done":
                tx.execute("reflection_confirmed", now_iso=now_iso, id=outcome.id)
            elif outcome.state == "retry":
                tx.execute("reflection_refused", retry_at=outcome.at or time.time(), error=outcome.error,
                           id=outcome.id)
            else:
                self._kill(tx, outcome.id, outcome.error)
            tx.execute("settle_new_event", status="reconciled", reason=note, now=now_iso, id=event_id)

    def remember_sinch_state(self, phone: str, channel: str, kind: str) -> None:
        """Sinch changed this phone's consent on its own (not answering a registration)."""
        with self.engine.begin() as tx:
            self._set_sinch_state(tx, phone, channel, kind, None, iso(utcnow()))

    def replay_dead(self, ids: list[int] | None) -> int:
        """Queue dead registrations again (all of them for ``None``)."""
        now_iso, now = iso(utcnow()), time.time()
        count = 0
        with self.engine.begin() as tx:
            if ids is None:
                ids = [r["id"] for r in tx.all("dead_reflection_ids")]
            for rid in ids:
                row = tx.one("revive_reflection", now=now, id=rid)
                if row is not None:
                    self._set_sinch_state(tx, row["phone"], row["channel"], row["kind"], rid, now_iso)
                    count += 1
        return count
