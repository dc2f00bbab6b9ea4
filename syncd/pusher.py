"""The scheduled loop's work: route new events, then push due deliveries.

Routing turns an event into deliveries (one per target record): by id pattern,
or by looking the phone up in every enabled CRM. Pushing claims due deliveries,
coalesces them per record (newest ``occurred_at`` per field wins), maps them to
field values and hands each CRM one ``update`` call (the connector batches), then
settles every delivery in one transaction: done, retry at a time, or dead.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

from connectors.base import CrmConnector
from connectors.errors import ConnectorError, RateLimited
from connectors.types import RecordRef
from syncd.backoff import RetryPolicy
from syncd.config import RetryConfig
from syncd.journal.base import Delivery, Journal, Outcome, StoredEvent
from syncd.mapping import Mapping, RecordPlan, plan_record
from syncd.alerts import Alerts
from syncd.masking import mask_phone, mask_text
from syncd.metrics import Metrics
from syncd.routing import Router

log = logging.getLogger("syncd.pusher")


@dataclass
class TickStats:
    routed: int = 0
    quarantined: int = 0
    claimed: int = 0
    done: int = 0
    retry: int = 0
    dead: int = 0


FAILING_AFTER = 3  # consecutive failed calls before a CRM counts as failing (and alerts)


@dataclass
class CrmHealth:
    """What the pusher saw of one CRM (for the status page and the failing/recovered alerts)."""
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failing_since: float | None = None   # first call of the current run of failures
    consecutive_failures: int = 0
    alerted: bool = False                # a "failing" alert went out; recovery will say so


def _error_text(exc: BaseException) -> str:
    return mask_text(str(exc))[:2000]


class Pusher:
    def __init__(self, journal: Journal, connectors: dict[str, CrmConnector], mappings: dict[str, Mapping],
                 router: Router, retry: RetryConfig, *, batch_size: int = 1000, lease_seconds: float = 120.0,
                 metrics: Metrics | None = None):
        self.journal = journal
        self.connectors = connectors
        self.mappings = mappings
        self.router = router
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.metrics = metrics
        self.policy = RetryPolicy(retry)
        self.paused_until: dict[str, float] = {}
        self.paused_since: dict[str, float] = {}
        self.health: dict[str, CrmHealth] = {}
        self.alerts: Alerts | None = None  # set by the runtime when alerts.webhook_url is configured
        self.stopping = threading.Event()  # set on SIGTERM: finish the batch in hand, take no more
        # Sinch webhooks first settle the registration they answer (the reflector
        # replaces this with its own, which also logs); what is left is a consent change.
        self.reconcile: Callable[[StoredEvent], bool] = lambda event: self.journal.reconcile(
            event, self.policy.max_attempts, self.policy.retry_at) is not None

    # --- one scheduler tick ----------------------------------------------------------
    def run_once(self, max_rounds: int = 20) -> TickStats:
        stats = TickStats()
        self.journal.take_over_dead_leases()
        for _ in range(max_rounds):
            if self.stopping.is_set() or self.route_pending(stats) < self.batch_size:
                break
        for _ in range(max_rounds):
            if self.stopping.is_set() or self.push_due(stats) < self.batch_size:
                break
        return stats

    # --- routing ---------------------------------------------------------------------
    def route_pending(self, stats: TickStats) -> int:
        events = self.journal.events_to_route(self.batch_size, self.lease_seconds)
        by_id: list[tuple[int, list[RecordRef]]] = []
        for event in events:
            self._route(event, stats, by_id)
        # Events routed by id need no I/O: their deliveries commit together.
        self.journal.add_targets_many(by_id)
        return len(events)

    def _route(self, event: StoredEvent, stats: TickStats, by_id: list[tuple[int, list[RecordRef]]]) -> None:
        if event.source == "sinch" and self.reconcile(event):
            return
        ref = self.router.route_id(event.external_lead_id)
        if ref is not None:
            by_id.append((event.id, [ref]))
            stats.routed += 1
            log.info("event routed", extra={"event_id": event.id, "source": event.source,
                                            "targets": [f"{ref.crm}:{ref.obj}:{ref.record_id}"], "by": "id"})
            return
        if not event.phone:
            reason = self.router.unroutable_reason(event.external_lead_id, event.phone, event.phone_raw)
            self._quarantine(event, reason or "not routable", stats)
            return
        targets: list[RecordRef] = []
        searched: list[str] = []
        for name, connector in self.connectors.items():
            try:
                targets.extend(connector.find_by_phone(event.phone))
                searched.append(name)
            except ConnectorError as exc:
                self._count_lookup(name, exc)
                self._routing_failed(event, name, exc, stats)
                return
            self._count_lookup(name, None)
        if not targets:
            self._quarantine(event, f"no record with this phone in {', '.join(searched) or 'any CRM'}", stats)
            return
        self.journal.add_targets(event.id, list(dict.fromkeys(targets)))
        stats.routed += 1
        log.info("event routed", extra={"event_id": event.id, "source": event.source, "by": "phone",
                                        "phone": mask_phone(event.phone),
                                        "targets": [f"{t.crm}:{t.obj}:{t.record_id}" for t in targets]})

    def _routing_failed(self, event: StoredEvent, crm: str, exc: ConnectorError, stats: TickStats) -> None:
        text = f"phone lookup in {crm} failed: {_error_text(exc)}"
        attempts = event.route_attempts + 1
        if self.policy.give_up(exc, attempts, event.received_at):
            self._quarantine(event, text, stats)
            return
        self.journal.defer_routing(event.id, text, self.policy.next_try(exc, attempts))
        log.warning("routing deferred", extra={"event_id": event.id, "crm": crm, "error": text})

    def _quarantine(self, event: StoredEvent, reason: str, stats: TickStats) -> None:
        self.journal.quarantine(event.id, reason)
        stats.quarantined += 1
        log.warning("event quarantined", extra={"event_id": event.id, "source": event.source,
                                                "reason": reason})

    # --- pushing ---------------------------------------------------------------------
    def push_due(self, stats: TickStats) -> int:
        """Claim and push one batch per CRM, so each CRM's batches fill up to its own
        limit (Salesforce 200, HubSpot 100) whatever order events arrived in; a last
        claim across CRMs picks up deliveries for CRMs no longer configured.
        Returns the largest batch claimed (a full one means: go again)."""
        fullest = 0
        for crm in self.connectors:
            claimed = self.journal.claim(self.batch_size, self.lease_seconds, crm)
            if claimed:
                self._push_claimed(claimed, stats)
            fullest = max(fullest, len(claimed))
        if fullest < self.batch_size:  # configured CRMs drained: whatever is left is for others
            claimed = self.journal.claim(self.batch_size, self.lease_seconds)
            if claimed:
                self._push_claimed(claimed, stats)
            fullest = max(fullest, len(claimed))
        return fullest

    def _push_claimed(self, claimed: list[Delivery], stats: TickStats) -> None:
        stats.claimed += len(claimed)
        by_crm: dict[str, list[Delivery]] = defaultdict(list)
        for d in claimed:
            by_crm[d.ref.crm].append(d)
        outcomes: list[Outcome] = []
        for crm, deliveries in by_crm.items():
            outcomes.extend(self._push_crm(crm, deliveries))
        self.journal.settle(outcomes)
        for o in outcomes:
            setattr(stats, o.state, getattr(stats, o.state) + 1)
            if self.metrics and o.ref:
                self.metrics.deliveries_settled.labels(o.ref.crm, o.state).inc()
            log.info("delivery settled", extra={
                "delivery_id": o.delivery_id, "state": o.state, "note": o.note,
                "crm": o.ref.crm if o.ref else None,
                "record": f"{o.ref.obj}:{o.ref.record_id}" if o.ref else None, "error": o.error})
            if o.state == "dead":
                self._dead_lettered(o)

    def _dead_lettered(self, o: Outcome) -> None:
        """An operator must act on a dead letter: a warning carrying the CRM's own text
        (masked), and the alert hook."""
        crm = o.ref.crm if o.ref else None
        log.warning("delivery dead-lettered", extra={
            "delivery_id": o.delivery_id, "dead_letter": f"d{o.delivery_id}", "crm": crm,
            "record": f"{o.ref.obj}:{o.ref.record_id}" if o.ref else None, "reason": o.note,
            "error": mask_text(o.error or "")})
        if self.alerts is not None:
            self.alerts.dead_letter(f"d{o.delivery_id}", crm, o.ref.obj if o.ref else None,
                                    o.ref.record_id if o.ref else None, o.error or "")

    def _push_crm(self, crm: str, deliveries: list[Delivery]) -> list[Outcome]:
        connector, mapping = self.connectors.get(crm), self.mappings.get(crm)
        if connector is None or mapping is None:
            return [self._failed(d, ConnectorError(f"CRM {crm} is not enabled in the config")) for d in deliveries]
        paused = self.paused_until.get(crm, 0.0)
        if paused > time.time():
            return [Outcome(d.id, "retry", error="CRM paused: quota exceeded", retry_at=paused, ref=d.ref,
                            note="paused") for d in deliveries]
        by_record: dict[RecordRef, list[Delivery]] = defaultdict(list)
        for d in deliveries:
            by_record[d.ref].append(d)
        clocks = self.journal.clocks(list(by_record))
        outcomes: list[Outcome] = []
        plans: list[RecordPlan] = []
        for ref, group in by_record.items():
            plan = plan_record(ref, group, mapping, clocks[ref])
            if plan.problem:
                outcomes.extend(Outcome(d.id, "dead", error=plan.problem, ref=ref, note="mapping") for d in group)
            elif plan.update is None:
                outcomes.extend(Outcome(d.id, "done", ref=ref, note="superseded") for d in group)
            else:
                plans.append(plan)
        if not plans:
            return outcomes
        started = time.monotonic()
        try:
            results = connector.update([p.update for p in plans if p.update is not None])
        except ConnectorError as exc:
            self._count(crm, exc)
            self._maybe_pause(crm, exc)
            for plan in plans:
                outcomes.extend(self._failed(d, exc) for d in plan.deliveries)
            return outcomes
        finally:
            if self.metrics:
                self.metrics.push_duration.labels(crm).observe(time.monotonic() - started)
        self._count(crm, None)
        for plan, result in zip(plans, results):
            if result.ok:
                outcomes.extend(self._done(d, plan) for d in plan.deliveries)
            else:
                outcomes.extend(self._failed(d, result.error) for d in plan.deliveries)  # type: ignore[arg-type]
        return outcomes

    def _done(self, d: Delivery, plan: RecordPlan) -> Outcome:
        applied = plan.winners.get(d.id, {})
        return Outcome(d.id, "done", ref=d.ref, note="applied" if applied else "superseded",
                       applied=applied, applied_at=d.occurred_at, applied_event_id=d.event_id)

    def _failed(self, d: Delivery, exc: ConnectorError) -> Outcome:
        text = _error_text(exc)
        stop = self.policy.give_up(exc, d.attempts, d.received_at)
        if stop is None:
            return Outcome(d.id, "retry", error=text, retry_at=self.policy.next_try(exc, d.attempts), ref=d.ref)
        note = type(exc).__name__ if stop.kind == "permanent" else stop.kind
        return Outcome(d.id, "dead", error=stop.prefix + text, ref=d.ref, note=note)

    def _maybe_pause(self, crm: str, exc: ConnectorError) -> None:
        """A daily quota (Salesforce REQUEST_LIMIT_EXCEEDED) pauses the whole CRM
        instead of burning every delivery's retries against it."""
        if isinstance(exc, RateLimited) and exc.code == "REQUEST_LIMIT_EXCEEDED":
            now = time.time()
            if self.paused_until.get(crm, 0.0) <= now:
                self.paused_since[crm] = now
            self.paused_until[crm] = now + (exc.retry_after or 3600.0)
            log.error("CRM paused", extra={"crm": crm, "until": self.paused_until[crm], "error": _error_text(exc)})

    def health_report(self) -> dict[str, dict[str, Any]]:
        """Per CRM, for the status page: epoch seconds (or None) and the last error text."""
        now = time.time()
        report: dict[str, dict[str, Any]] = {}
        for crm in sorted(set(self.connectors) | set(self.health)):
            h = self.health.get(crm, CrmHealth())
            paused = self.paused_until.get(crm)
            report[crm] = {"last_success": h.last_success, "last_error": h.last_error,
                           "last_error_at": h.last_error_at,
                           "failing_since": h.failing_since if h.consecutive_failures else None,
                           "consecutive_failures": h.consecutive_failures,
                           "paused_until": paused if paused and paused > now else None}
        return report

    def circuit_problem(self, longer_than: float) -> str | None:
        """For /readyz: a CRM paused (open circuit) for longer than ``longer_than`` seconds."""
        now = time.time()
        for crm, until in self.paused_until.items():
            since = self.paused_since.get(crm, now)
            if until > now and now - since > longer_than:
                return f"{crm} paused for {now - since:.0f} s (quota exceeded)"
        return None

    def _count_lookup(self, crm: str, exc: ConnectorError | None) -> None:
        self._observe(crm, exc)
        if self.metrics:
            self.metrics.crm_lookups.labels(crm, Metrics.call_status(exc)).inc()

    def _count(self, crm: str, exc: ConnectorError | None) -> None:
        self._observe(crm, exc)
        if self.metrics:
            self.metrics.crm_requests.labels(crm, Metrics.call_status(exc)).inc()

    def _observe(self, crm: str, exc: ConnectorError | None) -> None:
        """Track each whole CRM call: ``FAILING_AFTER`` failures in a row make the CRM
        failing (logged, alerted once); the next success is its recovery."""
        health = self.health.setdefault(crm, CrmHealth())
        now = time.time()
        if exc is None:
            if health.alerted:
                down = now - (health.failing_since or now)
                log.warning("CRM recovered", extra={"crm": crm, "failing_seconds": round(down, 1)})
                if self.alerts is not None:
                    self.alerts.crm_recovered(crm, down)
            health.last_success, health.consecutive_failures = now, 0
            health.failing_since, health.alerted = None, False
            return
        health.last_error, health.last_error_at = _error_text(exc), now
        if health.consecutive_failures == 0:
            health.failing_since = now
        health.consecutive_failures += 1
        if health.consecutive_failures >= FAILING_AFTER and not health.alerted:
            health.alerted = True
            log.error("CRM failing", extra={"crm": crm, "failures": health.consecutive_failures,
                                            "error": health.last_error})
            if self.alerts is not None:
                self.alerts.crm_failing(crm, health.last_error)
