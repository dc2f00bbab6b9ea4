"""The reports store: read-only views across the journal for ``syncd status``,
``dead-letters``, ``export``, ``trace``, the status page and the metrics."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from syncd.events import iso, parse_iso, utcnow
from syncd.journal.base import TraceQuery
from syncd.journal.engine import Engine, Tx
from syncd.journal.ledger import normalize_email

TRACE_CHUNK = 500   # ids per IN (...) list


def _identity_columns(r: dict[str, Any]) -> dict[str, Any]:
    """The person the event is about, as the consent ledger keys them: the phone in
    E.164 (as parsed on receipt; a number that did not parse has none) and the email
    lower-cased and trimmed."""
    email = r["email"]
    return {"phone": r["phone"] or None, "email": normalize_email(email) if email and email.strip() else None}


class ReportStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def counts(self) -> dict[str, Any]:
        now = time.time()
        with self.engine.read() as tx:
            by_state = {r["state"]: r["n"] for r in tx.all("deliveries_by_state")}
            retrying = tx.value("deliveries_retrying", now=now)
            by_status = {r["status"]: r["n"] for r in tx.all("consent_events_by_status")}
            oldest_delivery = tx.value("oldest_pending_delivery")
            oldest_event = tx.value("oldest_unrouted_event")
            crms = {r["crm"]: {"last_push_at": r["last_push_at"], "last_poll_at": r["last_poll_at"],
                               "paused_until": r["paused_until"] if r["paused_until"] is not None
                               and r["paused_until"] > now else None,
                               "pause_reason": r["pause_reason"] if r["paused_until"] is not None else None}
                    for r in tx.all("crm_statuses")}
            reflections = self._reflection_counts(tx)
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

    def ledger_counts(self) -> dict[str, int]:
        """The consent ledger's size by state (identity x channel entries). A scan of the
        state index: read separately from :meth:`counts` so callers can cache it longer."""
        with self.engine.read() as tx:
            by = {r["state"]: int(r["n"]) for r in tx.all("ledger_counts")}
        return {"opted_out": by.get("opted_out", 0), "opted_in": by.get("opted_in", 0)}

    @staticmethod
    def _reflection_counts(tx: Tx) -> dict[str, int]:
        by = {r["state"]: r["n"] for r in tx.all("reflections_by_state")}
        return {"pending": by.get("pending", 0) + by.get("registered", 0), "done": by.get("done", 0),
                "failed": by.get("dead", 0)}

    def dead_letters(self) -> list[dict[str, Any]]:
        """Dead deliveries (``d<N>``), quarantined events (``q<N>``) and dead
        registrations in Sinch (``r<N>``), in one shape."""
        with self.engine.read() as tx:
            deliveries = tx.all("dead_deliveries")
            quarantined = tx.all("quarantined_events")
            reflections = tx.all("dead_reflections")
        rows: list[dict[str, Any]] = []
        for r in deliveries:
            rows.append({"id": f"d{r['id']}", "type": "delivery", "event_id": r["event_id"], "source": r["source"],
                         "source_event_id": r["source_event_id"], "crm": r["crm"], "object": r["obj"],
                         "record_id": r["record_id"], "attempts": r["attempts"], "error": r["last_error"],
                         "received_at": r["received_at"], "kind": r["kind"], "channel": r["channel"]})
        for r in quarantined:
            rows.append({"id": f"q{r['id']}", "type": "quarantine", "event_id": r["id"], "source": r["source"],
                         "source_event_id": r["source_event_id"], "crm": None, "object": None, "record_id": None,
                         "attempts": None, "error": r["status_reason"], "received_at": r["received_at"],
                         "kind": r["kind"], "channel": r["channel"]})
        for r in reflections:
            rows.append({"id": f"r{r['id']}", "type": "reflection", "event_id": None, "source": "sinch",
                         "source_event_id": None, "crm": r["crm"], "object": r["obj"], "record_id": r["record_id"],
                         "attempts": r["attempts"], "error": r["last_error"], "received_at": r["created_at"],
                         "kind": r["kind"], "channel": r["channel"].lower()})
        return rows

    def recent_activity(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest consent events with their targets' delivery state (status page)."""
        with self.engine.read() as tx:
            rows = tx.all("recent_activity", limit=limit)
        return [{"event_id": r["event_id"], "source": r["source"], "received_at": r["received_at"],
                 "occurred_at": r["occurred_at"], "kind": r["kind"], "channel": r["channel"],
                 "event_status": r["event_status"], "event_reason": r["event_reason"],
                 "delivery_id": f"d{r['delivery_id']}" if r["delivery_id"] is not None else None,
                 "crm": r["crm"], "object": r["obj"], "record_id": r["record_id"], "state": r["state"],
                 "attempts": r["attempts"], "error": r["last_error"], "delivered_at": r["delivered_at"]}
                for r in rows]

    def page_stats(self, since_iso: str, limit: int = 100_000) -> dict[str, Any]:
        """For the status page's charts and health table: events received per hour
        (``YYYY-MM-DDTHH`` -> n), ``(crm, received_at, delivered_at)`` of the newest
        ``limit`` deliveries done since ``since_iso``, and each CRM's next retry time."""
        with self.engine.read() as tx:
            per_hour = {str(r["hour"]): int(r["n"]) for r in tx.all("events_per_hour", since=since_iso)}
            done = [(str(r["crm"]), str(r["received_at"]), str(r["delivered_at"]))
                    for r in tx.all("deliveries_done_since", since=since_iso, limit=limit)]
            next_attempt = {str(r["crm"]): float(r["next_attempt_at"]) for r in tx.all("next_retry_per_crm")}
        return {"per_hour": per_hour, "done": done, "next_attempt": next_attempt}

    def export_rows(self, since: datetime | None) -> Iterator[dict[str, Any]]:
        since_iso = iso(since.astimezone(timezone.utc)) if since else ""
        with self.engine.read() as tx:
            rows = tx.all("export_rows", since=since_iso)
        for r in rows:
            state = r["state"] or (r["event_status"] if r["event_status"] in ("quarantined", "reconciled", "ignored")
                                   else "unrouted")
            details = json.loads(r["details"] or "{}")
            unmodelled = details.get("unmodelled") or {}
            yield {"event_id": r["event_id"], "source": r["source"], "source_event_id": r["source_event_id"],
                   "received_at": r["received_at"], "occurred_at": r["occurred_at"], "kind": r["kind"],
                   "channel": r["channel"], "target_crm": r["crm"], "target_object": r["obj"],
                   "target_record": r["record_id"], "state": state, "delivered_at": r["delivered_at"],
                   "attempts": r["attempts"], "error": r["last_error"] if r["state"] else r["event_reason"],
                   "outcome": r["outcome"],
                   "reflection": {"dead": "failed", "registered": "pending"}.get(r["reflection_state"],
                                                                                  r["reflection_state"]),
                   "reflection_at": r["reflection_at"], "reflection_error": r["reflection_error"],
                   # The source's own channel value (Apten ``manual``, Sinch ``VIBERBM``...)
                   # and the fields syncd kept without modelling them.
                   "raw_channel": details.get("raw_channel") or details.get("sinch_channel"),
                   "unmodelled": ";".join(f"{k}={v}" for k, v in sorted(unmodelled.items())) or None,
                   "honoured_at": r["honoured_at"],   # the compliance clock's (syncd export adds the deadline)
                   **_identity_columns(r)}

    # --- trace: one person's whole story ------------------------------------------------
    def trace(self, query: TraceQuery,
              deadline: Callable[[datetime], datetime] | None = None) -> dict[str, Any]:
        """Everything the journal knows about a phone, an email, a record or an event:
        the ledger's consent for every identity involved, each event (newest first)
        with its targets, and the registrations in Sinch with their notifications.
        ``deadline`` (the compliance clock) gives an opt-out's deadline from its
        received time; without it ``deadline`` is null. Nothing is masked: this is the
        operator's own lookup (callers mask what they log)."""
        with self.engine.read() as tx:
            events = _trace_events(tx, query)
            targets = _chunked(lambda ids: tx.all("trace_targets", event_ids=ids), sorted(events))
            phones = sorted({p for p in [query.phone, *(e["phone"] for e in events.values())] if p})
            emails = {normalize_email(e) for e in [query.email, *(e["email"] for e in events.values())]
                      if e and e.strip()}
            consent = _chunked(lambda ids: tx.all("ledger_states", identities=ids), sorted({*phones, *emails}))
            reflections = {r["id"]: r for r in _chunked(
                lambda part: tx.all("trace_reflections_by_phone", phones=part), phones)}
            reflections.update((r["id"], r) for r in _chunked(
                lambda part: tx.all("trace_reflections_by_record", ids=part), list(query.record_ids)))
            notes = _chunked(lambda part: tx.all("trace_sinch_notifications", phones=part),
                             sorted({r["phone"] for r in reflections.values()}))
        by_event: dict[int, list[dict[str, Any]]] = {}
        for t in targets:
            by_event.setdefault(int(t["event_id"]), []).append(t)
        newest_first = sorted(events.values(), key=lambda e: (str(e["received_at"]), int(e["id"])), reverse=True)
        return {
            "query": query.text,
            "consent": [{"identity": c["identity"], "channel": c["channel"], "state": c["state"],
                         "since": c["since"], "source": c["source"]}
                        for c in sorted(consent, key=lambda c: (c["identity"], c["channel"]))],
            "events": [_trace_event(e, by_event.get(int(e["id"]), []), deadline) for e in newest_first],
            "reflections": [_trace_reflection(r, notes) for r in sorted(reflections.values(),
                                                                         key=lambda r: int(r["id"]), reverse=True)],
        }

    # --- audit ---------------------------------------------------------------------------
    def audit_targets(self, crm: str | None = None) -> list[dict[str, Any]]:
        """Done deliveries (one row per record and event that targeted it) of records
        with nothing pending, with the event's kind, channel and identities."""
        with self.engine.read() as tx:
            return tx.all("audit_targets", all_crms=1 if crm is None else 0, crm=crm or "")


OPT_OUT_KINDS = ("opt_out", "do_not_contact")


def _chunked(read: Callable[[list[Any]], list[dict[str, Any]]], values: list[Any]) -> list[dict[str, Any]]:
    """``read`` over ``values`` in IN-lists of :data:`TRACE_CHUNK` (no call when empty)."""
    return [row for start in range(0, len(values), TRACE_CHUNK) for row in read(values[start:start + TRACE_CHUNK])]


def _trace_events(tx: Tx, query: TraceQuery) -> dict[int, dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if query.phone:
        rows += tx.all("trace_events_by_phone", phone=query.phone)
    if query.email:
        rows += tx.all("trace_events_by_email", email=query.email)
    if query.record_ids:
        rows += tx.all("trace_events_by_record", ids=list(query.record_ids))
        for record_id in query.record_ids:
            rows += [r for r in tx.all("trace_crm_flags_by_record", pattern=f'%"record_id": "{record_id}"%')
                     if json.loads(r["details"] or "{}").get("record_id") == record_id]
    if query.event_id is not None:
        rows += tx.all("trace_event_by_id", id=query.event_id)
    return {int(r["id"]): r for r in rows}


def _trace_event(row: dict[str, Any], targets: list[dict[str, Any]],
                 deadline: Callable[[datetime], datetime] | None) -> dict[str, Any]:
    details = json.loads(row["details"] or "{}")
    # The source's own channel value (Apten ``manual``, Sinch ``MMS``...), where it is
    # not what syncd modelled.
    raw = details.get("raw_channel") or details.get("sinch_channel")
    raw_channel = str(raw) if raw is not None and str(raw).strip().lower() != (row["channel"] or "") else None
    due = None
    # An opt-out to honour: not Sinch's confirmation of a registration of ours (reconciled).
    if deadline is not None and row["event_type"] == "consent" and row["kind"] in OPT_OUT_KINDS \
            and row["status"] != "reconciled":
        due = iso(deadline(parse_iso(str(row["received_at"]))))
    return {
        "event_id": int(row["id"]), "source": row["source"], "kind": row["kind"], "channel": row["channel"],
        "occurred_at": row["occurred_at"], "received_at": row["received_at"], "deadline": due,
        "targets": [{"crm": t["crm"], "object": t["obj"], "record_id": t["record_id"], "state": t["state"],
                     "attempts": t["attempts"], "done_at": t["delivered_at"], "error": t["last_error"]}
                    for t in targets],
        # Beyond the contract's keys: what the source sent and why an event has no target.
        "raw_channel": raw_channel,
        "status": "unrouted" if row["status"] == "new" else row["status"],
        "status_reason": row["status_reason"],
    }


def _trace_reflection(row: dict[str, Any], notes: list[dict[str, Any]]) -> dict[str, Any]:
    """A registration in Sinch and the notifications that answered it."""
    named = f"reflection r{row['id']}:"
    answers = []
    for n in notes:
        details = json.loads(n["details"] or "{}")
        if details.get("request_id") == row["request_id"] or str(n["status_reason"] or "").startswith(named):
            answers.append({"event_id": int(n["id"]), "status": details.get("status"),
                            "received_at": n["received_at"]})
    return {"id": f"r{row['id']}", "crm": row["crm"], "object": row["obj"], "record_id": row["record_id"],
            "phone": row["phone"], "channel": row["channel"], "kind": row["kind"], "state": row["state"],
            "attempts": row["attempts"], "created_at": row["created_at"], "registered_at": row["registered_at"],
            "done_at": row["done_at"], "error": row["last_error"], "notifications": answers}

