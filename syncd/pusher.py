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
from connectors.errors import ConnectorError, QuotaExhausted
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


@dataclass(frozen=True)
class QuotaPolicy:
    """How much of a CRM's daily API quota syncd may use (``budget_percent``) and how
    often a paused CRM's quota is checked again (``probe_seconds``)."""

    budget_percent: float = 90.0
    probe_seconds: float = 300.0


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
                 metrics: Metrics | None = None, quotas: dict[str, QuotaPolicy] | None = None):
        self.journal = journal
        self.connectors = connectors
        self.mappings = mappings
        self.router = router
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.metrics = metrics
        self.policy = RetryPolicy(retry)
        self.quotas = quotas or {}
        self.paused_since: dict[str, float] = {}  # when this process first saw each pause
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
        ignored = event.details.get("ignored")  # a channel syncd does not model: kept, no CRM field written
        # A notification may still answer a registration of ours (joined by request_id or phone).
        could_answer = not ignored or event.phone or event.details.get("request_id")
        if event.source == "sinch" and could_answer and self.reconcile(event):
            return
        if ignored:
            self.journal.ignore(event.id, str(ignored))
            log.info("event ignored", extra={"event_id": event.id, "source": event.source,
                                             "reason": mask_text(str(ignored))})
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
            paused = self.pause_in_force(name)
            if paused is not None:
                self.journal.defer_routing(event.id, f"phone lookup in {name} waits: CRM paused", paused)
                return
            try:
                targets.extend(connector.find_by_phone(event.phone))
                searched.append(name)
            except ConnectorError as exc:
                self._count_lookup(name, exc)
                self._maybe_pause(name, exc)
                self._routing_failed(event, name, exc, stats)
                return
            finally:
                self._check_budget(name)
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
        paused = self.pause_in_force(crm)
        if paused is not None:
            return [Outcome(d.id, "retry", error="CRM paused: API quota", retry_at=paused, ref=d.ref,
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
            self._check_budget(crm)
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

    # --- pauses (a spent account-wide quota) ----------------------------------------------
    # The pause lives in the journal so that every replica honours it and a restart
    # does not forget it. When it ends, one replica asks the CRM whether quota is back
    # (Salesforce's /limits) and either resumes or pauses again for ``probe_seconds``.
    def pause_in_force(self, crm: str) -> float | None:
        """The time a paused CRM may be called again, or None when it is not paused."""
        pause = self.journal.crm_pause(crm)
        now = time.time()
        if pause is None:
            self.paused_since.pop(crm, None)
            return None
        self.paused_since.setdefault(crm, now)
        until, reason = pause
        if until > now:
            return until
        next_until = now + self.quota(crm).probe_seconds
        if not self.journal.take_pause_probe(crm, now, next_until):
            pause = self.journal.crm_pause(crm)  # another replica is checking
            return pause[0] if pause is not None and pause[0] > now else None
        return self._probe(crm, next_until, reason)

    def _probe(self, crm: str, next_until: float, reason: str | None) -> float | None:
        probe = getattr(self.connectors.get(crm), "probe_quota", None)
        if probe is not None:
            try:
                used, limit = probe()
            except ConnectorError as exc:
                log.warning("CRM still paused", extra={"crm": crm, "error": _error_text(exc)})
                return next_until
            if self._over_budget(crm, used, limit):
                self._pause(crm, next_until, self._budget_reason(crm, used, limit))
                return next_until
        self.journal.resume_crm(crm)
        self.paused_since.pop(crm, None)
        log.warning("CRM resumed", extra={"crm": crm, "was": reason})
        return None

    def quota(self, crm: str) -> QuotaPolicy:
        return self.quotas.get(crm) or QuotaPolicy()

    def _over_budget(self, crm: str, used: int, limit: int) -> bool:
        return limit > 0 and used >= limit * self.quota(crm).budget_percent / 100.0

    def _budget_reason(self, crm: str, used: int, limit: int) -> str:
        return f"API budget reached: {used} of {limit} daily requests used (budget " \
               f"{self.quota(crm).budget_percent:g}%)"

    def _check_budget(self, crm: str) -> None:
        """Slow down before the CRM's limit: pause at the configured share of the quota
        (read from the usage the CRM reports with every answer)."""
        usage_of = getattr(self.connectors.get(crm), "api_usage", None)
        usage = usage_of() if usage_of is not None else None
        if usage is not None and self._over_budget(crm, *usage) and self.journal.crm_pause(crm) is None:
            self._pause(crm, time.time() + self.quota(crm).probe_seconds, self._budget_reason(crm, *usage))

    def _maybe_pause(self, crm: str, exc: ConnectorError) -> None:
        """A spent daily quota (Salesforce TotalRequests) pauses the whole CRM instead of
        burning every delivery's retries; the CRM's Retry-After, when sent, sets the
        length, else the quota is checked again after ``probe_seconds``."""
        if isinstance(exc, QuotaExhausted):
            wait = exc.retry_after if exc.retry_after is not None else self.quota(crm).probe_seconds
            self._pause(crm, time.time() + wait, f"quota exhausted: {_error_text(exc)}")

    def _pause(self, crm: str, until: float, reason: str) -> None:
        self.journal.pause_crm(crm, until, reason)
        self.paused_since.setdefault(crm, time.time())
        log.error("CRM paused", extra={"crm": crm, "until": until, "reason": reason})

    def health_report(self) -> dict[str, dict[str, Any]]:
        """Per CRM, for the status page: epoch seconds (or None) and the last error text."""
        now = time.time()
        report: dict[str, dict[str, Any]] = {}
        for crm in sorted(set(self.connectors) | set(self.health)):
            h = self.health.get(crm, CrmHealth())
            pause = self.journal.crm_pause(crm)
            paused = pause[0] if pause is not None else None
            report[crm] = {"last_success": h.last_success, "last_error": h.last_error,
                           "last_error_at": h.last_error_at,
                           "failing_since": h.failing_since if h.consecutive_failures else None,
                           "consecutive_failures": h.consecutive_failures,
                           "paused_until": paused if paused and paused > now else None}
        return report

    def circuit_problem(self, longer_than: float) -> str | None:
        """For /readyz: a CRM paused (open circuit) for longer than ``longer_than`` seconds
        (counted from when this process first saw the pause)."""
        now = time.time()
        for crm in self.connectors:
            pause = self.journal.crm_pause(crm)
            if pause is None:
                self.paused_since.pop(crm, None)
                continue
            since = self.paused_since.setdefault(crm, now)
            if now - since > longer_than:
                return f"{crm} paused for {now - since:.0f} s ({pause[1] or 'quota'})"
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
