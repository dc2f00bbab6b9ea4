"""The mirror image of the pusher: CRM do-not-contact flags -> Sinch opt-out registry.

``poll_once`` asks each CRM for records changed since its watermark (cost follows
the number of changes) and queues one registration per phone and Sinch channel
whose mapped flags say "do not message"; the queue and the new watermark commit
together. ``register_due`` sends queued registrations (``optouts:register``) and
waits for Sinch's signed notification, which :class:`SinchNotifications` (called
by the routing step for every Sinch webhook) joins back by ``request_id`` and turns
into an outcome. Missing or failed notifications are retried with backoff, then
dead-lettered.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

from connectors.base import CrmConnector
from connectors.errors import ConnectorError
from connectors.registry import CRM_PLUGINS
from connectors.types import Page, Watermark
from syncd.backoff import RetryPolicy
from syncd.config import Config
from syncd.journal.base import (Events, Ledger, Operations, ReflectionCandidate, ReflectionOutcome, Reflections,
                                Registration, StoredEvent)
from syncd.events import ConsentEvent, parse_iso
from syncd.journal.events import CRM_FLAG
from syncd.mapping import Mapping
from syncd.masking import mask_phone, mask_text
from syncd.metrics import Metrics
from syncd.phones import to_e164

log = logging.getLogger("syncd.reflector")

_TRUE = {"true", "yes", "y", "1", "on", "checked"}
# A first poll starts a little before "now" (in the CRM's own watermark format, from
# its plugin), so the first run costs nothing (set sinch.reflect_backfill to read
# every flag already set).
START_OVERLAP_SECONDS = 120.0
# OPT_OUT_STATUS_UNSPECIFIED / OPT_IN_STATUS_UNSPECIFIED: "the underlying channel doesn't
# support" it (Sinch, Conversation API opt-in & opt-out page).
UNSUPPORTED_SUFFIX = "_STATUS_UNSPECIFIED"


def flag_set(value: Any) -> bool:
    """CRMs spell a set checkbox differently: True, "true", "Yes" (a one-choice field)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        return any(flag_set(v) for v in value)
    return isinstance(value, str) and value.strip().lower() in _TRUE


def phones_of(values: dict[str, Any], fields: list[str], region: str) -> list[str]:
    found: list[str] = []
    for name in fields:
        raw = values.get(name)
        for item in raw if isinstance(raw, (list, tuple)) else [raw]:
            if isinstance(item, dict):
                item = item.get("phone")
            if isinstance(item, str) and item.strip():
                e164 = to_e164(item, region)
                if e164 and e164 not in found:
                    found.append(e164)
    return found


def modified_at(text: str | None) -> datetime:
    """A record's modification time as its CRM writes it (ISO text, or epoch ms for
    HubSpot); now when it says nothing readable."""
    raw = (text or "").strip()
    try:
        if raw.isdigit():
            return datetime.fromtimestamp(int(raw) / 1000, timezone.utc)
        return parse_iso(raw)
    except (ValueError, OverflowError, OSError):
        return datetime.now(timezone.utc)


def crm_flag_event(crm: str, obj: str, record_id: str, phone: str, channel: str, at: datetime,
                   modified: str | None) -> ConsentEvent:
    key = f"{obj}/{record_id}/{channel}/{phone}/{modified or ''}"
    return ConsentEvent(source=f"crm:{crm}", source_event_id=key, kind="opt_out",
                        channel=channel,  # type: ignore[arg-type]   # one of the mapping's channels
                        occurred_at=at, received_at=datetime.now(timezone.utc), raw=b"{}",
                        phone=phone, phone_raw=phone, event_type=CRM_FLAG,
                        details={"crm": crm, "object": obj, "record_id": record_id})


class Reflector:
    def __init__(self, reflections: Reflections, ops: Operations, connectors: dict[str, CrmConnector],
                 mappings: dict[str, Mapping], sinch: Any, cfg: Config, *, page_limit: int = 200,
                 max_pages: int = 50, metrics: Metrics | None = None, events: Events | None = None,
                 ledger: Ledger | None = None):
        self.reflections = reflections
        self.ledger = ledger
        self.events = events        # CRM-side flags enter the consent ledger as events
        self.ops = ops
        self.metrics = metrics
        self.connectors = connectors
        self.mappings = mappings
        self.sinch = sinch
        assert cfg.sinch is not None
        self.channels = [c.upper() for c in cfg.sinch.channels]
        self.reflect_opt_in = cfg.sinch.reflect_opt_in
        self.backfill = cfg.sinch.reflect_backfill
        self.notify_timeout = cfg.sinch.notification_timeout_seconds
        self.region = cfg.phone.default_region
        self.policy = RetryPolicy(cfg.retry)
        self.page_limit = page_limit
        self.max_pages = max_pages

    # --- polling the CRMs ------------------------------------------------------------
    def poll_once(self) -> dict[str, int]:
        """One poll of every CRM whose mapping has a reflect section; leader only."""
        if not self.ops.try_leadership("reflector"):
            return {}
        queued: dict[str, int] = {}
        for crm, connector in self.connectors.items():
            reflect = self.mappings[crm].reflect
            if not reflect.fields or not reflect.phone_fields:
                continue
            pause = self.ops.crm_pause(crm)
            if pause is not None and pause[0] > time.time():
                continue  # the CRM's API quota is paused (see Pusher): polls wait too
            try:
                queued[crm] = self._poll_crm(crm, connector, reflect.fields, reflect.phone_fields)
            except ConnectorError as exc:
                log.warning("poll failed", extra={"crm": crm, "error": mask_text(str(exc))})
        return queued

    def _poll_page(self, crm: str, connector: CrmConnector, mark: Watermark, fields: list[str]) -> Page:
        try:
            page = connector.changed_since(mark, fields, self.page_limit)
        except Exception as exc:
            if self.metrics:
                self.metrics.crm_polls.labels(crm, Metrics.call_status(exc)).inc()
            raise
        if self.metrics:
            self.metrics.crm_polls.labels(crm, "ok").inc()
        return page

    def _poll_crm(self, crm: str, connector: CrmConnector, flags: list[str], phone_fields: list[str]) -> int:
        name = f"reflect:{crm}"
        ts, last_id = self.ops.get_watermark(name)
        if ts is None and not self.backfill:
            start = datetime.fromtimestamp(time.time() - START_OVERLAP_SECONDS, timezone.utc)
            first = CRM_PLUGINS[crm].initial_watermark(start)
            self.reflections.add([], self.channels, (name, first, None))
            return 0
        mark, total = Watermark(ts, last_id), 0
        for _ in range(self.max_pages):
            page = self._poll_page(crm, connector, mark, list(dict.fromkeys([*flags, *phone_fields])))
            candidates = []
            self._enter_flags(crm, page, flags, phone_fields)
            for rec in page.records:
                flagged = any(flag_set(rec.values.get(f)) for f in flags)
                if not flagged and not self.reflect_opt_in:
                    continue
                kind = "opt_out" if flagged else "opt_in"
                for phone in phones_of(rec.values, phone_fields, self.region):
                    candidates.append(ReflectionCandidate(rec.ref, phone, kind, rec.modified))
            mark = page.next_mark
            total += self.reflections.add(candidates, self.channels, (name, mark.ts, mark.last_id))
            if not page.more:
                break
        if total:
            log.info("reflections queued", extra={"crm": crm, "count": total})
        return total

    def _enter_flags(self, crm: str, page: Page, flags: list[str], phone_fields: list[str]) -> None:
        """Each flag set inside the CRM enters the consent ledger as an opt-out from
        ``crm:<name>`` at the record's modification time (kept as a ``crm_flag`` event,
        never routed: the ledger is rebuilt from the events). Before the watermark
        moves, so a crash re-reads the page; the event key makes that idempotent."""
        if self.events is None:
            return
        found = []
        for rec in page.records:
            obj = self.mappings[crm].for_object(rec.ref.obj)
            if obj is None:
                continue
            channels = [ch for ch, names in obj.channels.items() if ch != "email"
                        and any(n in flags and flag_set(rec.values.get(n)) for n in names)]
            at = modified_at(rec.modified)
            for phone in phones_of(rec.values, phone_fields, self.region) if channels else []:
                for channel in channels:
                    found.append(crm_flag_event(crm, rec.ref.obj, rec.ref.record_id, phone, channel, at,
                                                rec.modified))
        if found and self.ledger is not None:   # already opted out (syncd's own write read back): no news
            held = self.ledger.states([(e.phone or "", e.channel or "") for e in found])
            found = [e for e, entry in zip(found, held) if entry is None or entry.state != "opted_out"]
        if found:
            self.events.record_batch(found)

    # --- registering in Sinch --------------------------------------------------------
    def register_due(self, limit: int = 100) -> dict[str, int]:
        stats = {"registered": 0, "retry": 0, "dead": 0, "expired": 0}
        stats["expired"] = self.reflections.expire(
            self.policy.max_attempts, f"no notification from Sinch within {self.notify_timeout:g} s")
        claimed = self.reflections.claim(limit, lease_seconds=120)
        outcomes = []
        for r in claimed:
            register = self.sinch.register_opt_out if r.kind == "opt_out" else self.sinch.register_opt_in
            try:
                register(r.phone, r.request_id, [r.channel])
                outcomes.append(ReflectionOutcome(r.id, "registered", at=time.time() + self.notify_timeout))
                log.info("reflection registered", extra={"reflection_id": r.id, "kind": r.kind,
                                                         "channel": r.channel, "phone": mask_phone(r.phone)})
            except ConnectorError as exc:
                outcomes.append(self._failed(r.id, r.attempts, exc))
        self.reflections.settle(outcomes)
        for o in outcomes:
            stats[o.state] += 1
        return stats

    def _failed(self, rid: int, attempts: int, exc: ConnectorError) -> ReflectionOutcome:
        text = mask_text(str(exc))[:1000]
        if self.policy.give_up(exc, attempts):
            log.error("reflection dead", extra={"reflection_id": rid, "error": text})
            return ReflectionOutcome(rid, "dead", error=text)
        return ReflectionOutcome(rid, "retry", error=text, at=self.policy.next_try(exc, attempts))


class SinchNotifications:
    """Sinch's signed notifications: a result for a registration of ours is joined
    back to it and decided here (confirmed, retry, or dead); any other consent change
    Sinch made on its own is remembered and routed to the CRMs."""

    def __init__(self, reflections: Reflections, events: Events, policy: RetryPolicy):
        self.reflections = reflections
        self.events = events
        self.policy = policy

    def reconcile(self, event: StoredEvent) -> bool:
        """True when the Sinch webhook was a result for a registration, or a result
        nobody asked for (nothing to push); False for a consent change to route."""
        d = event.details
        status = str(d.get("status") or "")
        channel = str(d.get("sinch_channel") or "WHATSAPP").upper()
        succeeded = status.endswith("_SUCCEEDED")
        registration = self.reflections.match(d.get("request_id"), event.phone, channel, event.kind)
        if registration is not None:
            outcome = self.outcome(registration, status, succeeded, d)
            self.reflections.apply_notification(event.id, outcome, f"reflection r{registration.id}: {status}")
            log.info("sinch notification reconciled", extra={"event_id": event.id, "outcome": "reflection",
                                                             "status": d.get("status")})
            return True
        if succeeded and event.phone and event.kind in ("opt_out", "opt_in"):
            self.reflections.remember_sinch_state(event.phone, channel, event.kind)
            return False
        self.events.reconciled(event.id, f"no registration matches this {status or 'result'}")
        log.info("sinch notification reconciled", extra={"event_id": event.id, "outcome": "unmatched",
                                                         "status": d.get("status")})
        return True

    def outcome(self, registration: Registration, status: str, succeeded: bool,
                details: dict[str, Any]) -> ReflectionOutcome:
        """``*_SUCCEEDED`` confirms the registration; a failure is retried with backoff
        until the attempts are spent. ``*_STATUS_UNSPECIFIED`` is Sinch's "the
        underlying channel doesn't support Opt-out" (or Opt-in): no retry can help,
        so the registration fails at once."""
        if succeeded:
            return ReflectionOutcome(registration.id, "done")
        max_attempts = self.policy.max_attempts
        error_details = details.get("error_details")
        if status.endswith(UNSUPPORTED_SUFFIX):
            max_attempts = 0
            if not error_details:
                channel = str(details.get("sinch_channel") or "?")[:40]
                what = "opt-in" if status.startswith("OPT_IN") else "opt-out"
                error_details = {"description": f"Sinch: channel {channel} does not support {what} registration"}
        # Sinch's reason text can echo the phone or email: masked before it is stored,
        # since dead-letters, export and the status page print it.
        reason = json.dumps(error_details, default=str, ensure_ascii=False)
        error = mask_text(f"{status}: {reason}")[:500]
        if registration.attempts >= max_attempts:
            return ReflectionOutcome(registration.id, "dead",
                                     error=f"gave up after {registration.attempts} attempts: {error}")
        return ReflectionOutcome(registration.id, "retry", error=error,
                                 at=self.policy.retry_at(registration.attempts))
