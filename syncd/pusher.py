"""The push step: claim due deliveries, plan, update, settle.

Routing (:mod:`syncd.router`) has turned events into deliveries, one per target
record. The pusher claims due deliveries, coalesces them per record (newest
``occurred_at`` per field wins), maps them to field values and hands each CRM one
``update`` call (the connector batches), then settles every delivery in one
transaction with the outcome it decided: done, retry at a time, paused, or dead.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from connectors.base import CrmConnector
from connectors.errors import ConnectorError
from connectors.types import RecordRef
from syncd.alerts import Alerts
from syncd.backoff import RetryPolicy
from syncd.crm_health import CrmHealthBook
from syncd.events import parse_iso, utcnow
from syncd.journal.base import Deliveries, Delivery, Operations, Outcome
from syncd.mapping import Mapping, RecordPlan, plan_record
from syncd.masking import mask_text
from syncd.metrics import Metrics
from syncd.pauses import CrmPauses, error_text

log = logging.getLogger("syncd.pusher")


@dataclass
class TickStats:
    routed: int = 0         # filled in by Runtime.tick from the routing step
    quarantined: int = 0
    claimed: int = 0
    done: int = 0
    retry: int = 0          # paused deliveries count as retries
    dead: int = 0


class Pusher:
    def __init__(self, deliveries: Deliveries, ops: Operations, connectors: dict[str, CrmConnector],
                 mappings: dict[str, Mapping], pauses: CrmPauses, policy: RetryPolicy, *,
                 batch_size: int = 1000, lease_seconds: float = 120.0, metrics: Metrics | None = None,
                 health: CrmHealthBook | None = None, alerts: Alerts | None = None):
        self.deliveries = deliveries
        self.ops = ops
        self.connectors = connectors
        self.mappings = mappings
        self.pauses = pauses
        self.policy = policy
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.metrics = metrics
        self.health = health or CrmHealthBook(ops, connectors)
        self.alerts = alerts  # alerts.webhook_url: dead letters are posted there
        self.stopping = threading.Event()  # set on SIGTERM: finish the batch in hand, take no more

    # --- one scheduler tick ----------------------------------------------------------
    def run_once(self, max_rounds: int = 20) -> TickStats:
        stats = TickStats()
        self.ops.take_over_dead_leases()
        for _ in range(max_rounds):
            if self.stopping.is_set() or self.push_due(stats) < self.batch_size:
                break
        return stats

    # --- pushing ---------------------------------------------------------------------
    def push_due(self, stats: TickStats) -> int:
        """Claim and push one batch per CRM, so each CRM's batches fill up to its own
        limit (Salesforce 200, HubSpot 100) whatever order events arrived in; a last
        claim across CRMs picks up deliveries for CRMs no longer configured.
        Returns the largest batch claimed (a full one means: go again)."""
        fullest = 0
        for crm in self.connectors:
            claimed = self.deliveries.claim(self.batch_size, self.lease_seconds, crm)
            if claimed:
                self._push_claimed(claimed, stats)
            fullest = max(fullest, len(claimed))
        if fullest < self.batch_size:  # configured CRMs drained: whatever is left is for others
            claimed = self.deliveries.claim(self.batch_size, self.lease_seconds)
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
        self.deliveries.settle(outcomes)
        self._observe_honour(claimed, outcomes)
        for o in outcomes:
            state = "retry" if o.state == "paused" else o.state
            setattr(stats, state, getattr(stats, state) + 1)
            if self.metrics and o.ref:
                self.metrics.deliveries_settled.labels(o.ref.crm, state).inc()
            log.info("delivery settled", extra={
                "delivery_id": o.delivery_id, "state": state, "note": o.note,
                "crm": o.ref.crm if o.ref else None,
                "record": f"{o.ref.obj}:{o.ref.record_id}" if o.ref else None, "error": o.error})
            if o.state == "dead":
                self._dead_lettered(o)

    def _observe_honour(self, claimed: list[Delivery], outcomes: list[Outcome]) -> None:
        """``syncd_opt_out_honour_seconds{crm}``: an opt-out's arrival to its target done."""
        if self.metrics is None:
            return
        by_id = {d.id: d for d in claimed}
        now = utcnow()
        for o in outcomes:
            d = by_id.get(o.delivery_id)
            if o.state == "done" and d is not None and d.kind in ("opt_out", "do_not_contact"):
                seconds = (now - parse_iso(d.received_at)).total_seconds()
                self.metrics.honour_seconds.labels(d.ref.crm).observe(max(0.0, seconds))

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
        paused = self.pauses.in_force(crm)
        if paused is not None:
            why = "CRM asked to wait (Retry-After)" if self.pauses.held(crm) is not None else "CRM paused: API quota"
            return [Outcome(d.id, "paused", error=why, retry_at=paused, ref=d.ref, note="paused")
                    for d in deliveries]
        by_record: dict[RecordRef, list[Delivery]] = defaultdict(list)
        for d in deliveries:
            by_record[d.ref].append(d)
        clocks = self.deliveries.clocks(list(by_record))
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
            self.pauses.after_error(crm, exc)
            for plan in plans:
                outcomes.extend(self._failed(d, exc) for d in plan.deliveries)
            return outcomes
        finally:
            self.pauses.check_budget(crm)
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
                       applied=applied, applied_at=d.occurred_at, applied_event_id=d.event_id,
                       wrote=bool(applied))

    def _failed(self, d: Delivery, exc: ConnectorError) -> Outcome:
        text = error_text(exc)
        stop = self.policy.give_up(exc, d.attempts, d.received_at)
        if stop is None:
            return Outcome(d.id, "retry", error=text, retry_at=self.policy.next_try(exc, d.attempts), ref=d.ref)
        note = type(exc).__name__ if stop.kind == "permanent" else stop.kind
        return Outcome(d.id, "dead", error=stop.prefix + text, ref=d.ref, note=note)

    def _count(self, crm: str, exc: ConnectorError | None) -> None:
        self.health.observe(crm, exc)
        if self.metrics:
            self.metrics.crm_requests.labels(crm, Metrics.call_status(exc)).inc()
