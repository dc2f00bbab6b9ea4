"""The mirror image of the pusher: CRM do-not-contact flags -> consent ledger and
Sinch opt-out registry; records that appear later -> deliveries.

``poll_once`` asks each enabled CRM for records changed since its watermark (cost
follows the number of changes), whether Sinch is configured or not. Per page:

* each flag set inside the CRM enters the consent ledger as an opt-out from
  ``crm:<name>`` (a ``crm_flag`` event);
* a record whose phone or email the ledger holds as opted out for a channel, and
  whose mapped field for that channel is not set (a lead re-imported after the
  opt-out), gets a delivery of the ledger entry's event; one per (event, record),
  so syncd's own writes read back (the field is set) or a second sighting queue
  nothing more;
* with Sinch configured, one registration per phone and Sinch channel whose mapped
  flags say "do not message" is queued. Without Sinch nothing is queued (no channel
  to register in), and the watermark still moves with each page.

The queue and the new watermark commit together. ``register_due`` sends queued
registrations (``optouts:register``) and waits for Sinch's signed notification,
which :class:`SinchNotifications` (called by the routing step for every Sinch
webhook) joins back by ``request_id`` and turns into an outcome. Missing or failed
notifications are retried with backoff, then dead-lettered.
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
from syncd.journal.base import (Deliveries, Events, Ledger, Operations, ReflectionCandidate, ReflectionOutcome,
                                Reflections, Registration, StoredEvent)
from syncd.events import ConsentEvent, parse_iso
from syncd.journal.events import CRM_FLAG
from syncd.journal.ledger import CHANNELS, PHONE_CHANNELS, Entry, normalize_email
from syncd.mapping import UNSUBSCRIBE, Mapping, ObjectMapping
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


def emails_of(values: dict[str, Any], fields: list[str]) -> list[str]:
    """The record's addresses as the ledger keys them (lower-cased, trimmed)."""
    found: list[str] = []
    for name in fields:
        raw = values.get(name)
        for item in raw if isinstance(raw, (list, tuple)) else [raw]:
            if isinstance(item, dict):
                item = item.get("email")
            if isinstance(item, str) and "@" in item:
                email = normalize_email(item)
                if email not in found:
                    found.append(email)
    return found


def channel_set(om: ObjectMapping, channel: str, values: dict[str, Any]) -> bool:
    """Whether the record already carries the opt-out for ``channel``: every mapped
    field of it read back set. A field the poll cannot read (``@unsubscribe``, a field
    the CRM did not return) counts as not set: the delivery is queued once per event
    and record, and the push is idempotent."""
    names = om.channels.get(channel) or []  # type: ignore[call-overload]
    if not names:
        return True   # nothing to write for this channel on this object
    return all(name != UNSUBSCRIBE and name in values
               and (flag_set(values[name]) or values[name] == om.values.opt_out) for name in names)


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
    """Polls every enabled CRM (leader only). ``sinch`` None: CRM flags still reach the
    consent ledger and records that appear later still get deliveries; no registration
    is queued (``register_due`` has nothing to send and is not scheduled)."""

    def __init__(self, reflections: Reflections, ops: Operations, connectors: dict[str, CrmConnector],
                 mappings: dict[str, Mapping], sinch: Any, cfg: Config, *, page_limit: int = 200,
                 max_pages: int = 50, metrics: Metrics | None = None, events: Events | None = None,
                 ledger: Ledger | None = None, deliveries: Deliveries | None = None):
        self.reflections = reflections
        self.ledger = ledger
        self.events = events        # CRM-side flags enter the consent ledger as events
        self.deliveries = deliveries  # records that appear later with an opted-out identity
        self.ops = ops
        self.metrics = metrics
        self.connectors = connectors
        self.mappings = mappings
        self.sinch = sinch
        # No Sinch: no channel to register in, so the poll queues no registration.
        self.channels = [c.upper() for c in cfg.sinch.channels] if sinch is not None and cfg.sinch else []
        self.reflect_opt_in = bool(cfg.sinch and cfg.sinch.reflect_opt_in)
        self.backfill = bool(cfg.sinch and cfg.sinch.reflect_backfill)
        self.notify_timeout = cfg.sinch.notification_timeout_seconds if cfg.sinch else 0.0
        self.found_targets: dict[str, int] = {}   # deliveries queued for records that appeared, per CRM
        self.region = cfg.phone.default_region
        self.policy = RetryPolicy(cfg.retry)
        self.page_limit = page_limit
        self.max_pages = max_pages

    # --- polling the CRMs ------------------------------------------------------------
    def poll_once(self) -> dict[str, int]:
        """One poll of every CRM whose mapping names the fields that identify a person
        (``reflect.phone_fields`` / ``email_fields``); leader only. Answers the number
        of registrations queued per CRM (0 without Sinch)."""
        if not self.ops.try_leadership("reflector"):
            return {}
        queued: dict[str, int] = {}
        for crm, connector in self.connectors.items():
            reflect = self.mappings[crm].reflect
            if not reflect.phone_fields and not reflect.email_fields:
                continue
            pause = self.ops.crm_pause(crm)
            if pause is not None and pause[0] > time.time():
                continue  # the CRM's API quota is paused (see Pusher): polls wait too
            try:
                queued[crm] = self._poll_crm(crm, connector, reflect.fields, reflect.phone_fields)
            except ConnectorError as exc:
                log.warning("poll failed", extra={"crm": crm, "error": mask_text(str(exc))})
        return queued

    def _read_fields(self, crm: str) -> list[str]:
        """What a poll asks for: the flags, the identity fields, and (for records that
        appear later) every mapped channel field the CRM can read back."""
        mapping = self.mappings[crm]
        r = mapping.reflect
        mapped: list[str] = []
        if self.deliveries is not None and self.ledger is not None:
            mapped = [n for om in mapping.objects.values() for names in om.channels.values()
                      for n in names if n != UNSUBSCRIBE]
        return list(dict.fromkeys([*r.fields, *r.phone_fields, *r.email_fields, *mapped]))

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
        mark, total, found = Watermark(ts, last_id), 0, 0
        fields = self._read_fields(crm)
        for _ in range(self.max_pages):
            page = self._poll_page(crm, connector, mark, fields)
            self._enter_flags(crm, page, flags, phone_fields)
            found += self._queue_found_targets(crm, page)
            candidates = self._candidates(page, flags, phone_fields) if self.channels else []
            mark = page.next_mark
            total += self.reflections.add(candidates, self.channels, (name, mark.ts, mark.last_id))
            if not page.more:
                break
        if total:
            log.info("reflections queued", extra={"crm": crm, "count": total})
        if found:
            self.found_targets[crm] = self.found_targets.get(crm, 0) + found
            log.info("deliveries queued for records holding an opted-out identity",
                     extra={"crm": crm, "count": found})
        return total

    def _candidates(self, page: Page, flags: list[str], phone_fields: list[str]) -> list[ReflectionCandidate]:
        """Registrations in Sinch: a flagged record's phones (cleared ones with reflect_opt_in)."""
        candidates = []
        for rec in page.records:
            flagged = any(flag_set(rec.values.get(f)) for f in flags)
            if not flagged and not self.reflect_opt_in:
                continue
            kind = "opt_out" if flagged else "opt_in"
            for phone in phones_of(rec.values, phone_fields, self.region):
                candidates.append(ReflectionCandidate(rec.ref, phone, kind, rec.modified))
        return candidates

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

    def _queue_found_targets(self, crm: str, page: Page) -> int:
        """A record on this page whose phone or email the ledger holds as opted out for
        a channel the record does not carry yet gets a delivery of the entry's event
        (one ledger look-up per page). Runs after :meth:`_enter_flags`, so a flag set on
        one record reaches its duplicates. The deliveries are unique per (event,
        record): syncd's own write read back is set, and a second sighting adds nothing."""
        if self.deliveries is None or self.ledger is None or not page.records:
            return 0
        mapping = self.mappings[crm]
        reflect = mapping.reflect
        per_record: list[tuple[Any, ObjectMapping, list[tuple[str, str]]]] = []
        for rec in page.records:
            om = mapping.for_object(rec.ref.obj)
            if om is None:
                continue
            keys: list[tuple[str, str]] = [(phone, ch) for phone in phones_of(rec.values, reflect.phone_fields,
                                                                             self.region)
                                           for ch in PHONE_CHANNELS if ch in om.channels]
            keys += [(email, "email") for email in emails_of(rec.values, reflect.email_fields)
                     if "email" in om.channels]
            if keys:
                per_record.append((rec, om, keys))
        wanted = list(dict.fromkeys(k for _, _, keys in per_record for k in keys))
        if not wanted:
            return 0
        held = dict(zip(wanted, self.ledger.states(wanted)))
        stored: dict[int, StoredEvent | None] = {}   # events read for this page, by id
        targets: dict[int, list[Any]] = {}
        for rec, om, keys in per_record:
            entries = [e for e in (held[k] for k in keys) if e is not None and e.event_id is not None]
            missing = {int(e.event_id) for e in entries  # type: ignore[arg-type]
                       if e.state == "opted_out" and not channel_set(om, e.channel, rec.values)
                       and not self._flagged_here(e, rec.ref, stored) and not self._echo(e, stored)}
            if not missing:
                continue
            for event_id in sorted(missing | self._newer_opt_ins(entries, missing, stored)):
                targets.setdefault(event_id, []).append(rec.ref)
        return self.deliveries.add_found_targets(sorted(targets.items())) if targets else 0

    def _stored(self, event_id: int, cache: dict[int, StoredEvent | None]) -> StoredEvent | None:
        if event_id not in cache:
            cache[event_id] = self.events.get(event_id) if self.events is not None else None
        return cache[event_id]

    def _flagged_here(self, entry: Entry, ref: Any, cache: dict[int, StoredEvent | None]) -> bool:
        """A CRM-side flag read from this very record: a user who clears it there is
        not overruled by the flag they cleared (as a record syncd wrote is not
        rewritten: one delivery per event and record)."""
        if not entry.source.startswith("crm:") or entry.event_id is None:
            return False
        event = self._stored(entry.event_id, cache)
        d = event.details if event is not None else {}
        return (d.get("crm"), d.get("object"), d.get("record_id")) == (ref.crm, ref.obj, ref.record_id)

    def _echo(self, entry: Entry, cache: dict[int, StoredEvent | None]) -> bool:
        """Sinch's notification answering a registration syncd made for a CRM flag
        (reconciled, never routed): the flag itself is in the ledger, its echo on
        the Sinch channel is no news for the CRMs."""
        if entry.source != "sinch" or entry.event_id is None:
            return False
        event = self._stored(entry.event_id, cache)
        return event is not None and event.status == "reconciled"

    def _newer_opt_ins(self, entries: list[Entry], events: set[int], cache: dict[int, StoredEvent | None]
                       ) -> set[int]:
        """An opt-out queued for a record may cover channels (``all``, do-not-contact)
        that the ledger holds as opted in by a newer event: that opt-in goes along, so
        the pusher (newest per field wins) writes what the ledger says, not more. Only
        an opt-in of that one channel: a wide one could also outrank, on this record,
        an opt-out the ledger keeps for another identity (the safe side is the opt-out)."""
        opted_in = [e for e in entries if e.state == "opted_in" and e.event_id not in events]
        if not opted_in:
            return set()
        covered: set[str] = set()
        for event_id in events:
            covered |= self._channels_of(self._stored(event_id, cache))
        return {int(e.event_id) for e in opted_in  # type: ignore[arg-type]
                if e.event_id is not None and e.channel in covered
                and self._channels_of(self._stored(int(e.event_id), cache)) == {e.channel}}

    @staticmethod
    def _channels_of(event: StoredEvent | None) -> set[str]:
        """The channels an event writes (``all`` and do-not-contact: every one)."""
        if event is None:
            return set()
        if event.kind == "do_not_contact" or event.channel not in CHANNELS:
            return set(CHANNELS)
        return {str(event.channel)}

    # --- registering in Sinch --------------------------------------------------------
    def register_due(self, limit: int = 100) -> dict[str, int]:
        stats = {"registered": 0, "retry": 0, "dead": 0, "expired": 0}
        if self.sinch is None:
            return stats
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
