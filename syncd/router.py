"""The routing step: new events become deliveries, one per target record.

Each tick leases new events and routes them: a Sinch notification first settles the
registration it answers (see ``reflector.SinchNotifications``); an event of a channel
syncd does not model is ignored; an ``externalLeadId`` matching an id rule
(:mod:`syncd.routing`) names its record directly; otherwise the phone is looked up
in every enabled CRM. Failed lookups are deferred with backoff, then quarantined;
an event no rule and no lookup can route is quarantined.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from connectors.base import CrmConnector
from connectors.errors import ConnectorError
from connectors.types import RecordRef
from syncd.backoff import RetryPolicy
from syncd.crm_health import CrmHealthBook
from syncd.journal.base import Deliveries, Events, Operations, StoredEvent
from syncd.masking import mask_phone, mask_text
from syncd.metrics import Metrics
from syncd.pauses import CrmPauses, error_text
from syncd.routing import Router

log = logging.getLogger("syncd.router")

# True when a Sinch webhook answered a registration of ours (nothing to route).
Reconcile = Callable[[StoredEvent], bool]


@dataclass
class RouteStats:
    routed: int = 0
    quarantined: int = 0


class EventRouter:
    def __init__(self, events: Events, deliveries: Deliveries, ops: Operations, rules: Router,
                 connectors: dict[str, CrmConnector], pauses: CrmPauses, policy: RetryPolicy,
                 reconcile: Reconcile, *, batch_size: int = 1000, lease_seconds: float = 120.0,
                 metrics: Metrics | None = None, health: CrmHealthBook | None = None):
        self.events = events
        self.deliveries = deliveries
        self.ops = ops
        self.rules = rules
        self.connectors = connectors
        self.pauses = pauses
        self.policy = policy
        self.reconcile = reconcile
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.metrics = metrics
        self.health = health or CrmHealthBook(ops, connectors)  # lookups count toward a CRM's health
        self.stopping = threading.Event()  # set on SIGTERM: finish the batch in hand, take no more

    def tick(self, max_rounds: int = 20) -> RouteStats:
        """Route new events, a batch at a time, until fewer than a batch are left."""
        stats = RouteStats()
        self.ops.take_over_dead_leases()
        for _ in range(max_rounds):
            if self.stopping.is_set() or self.route_batch(stats) < self.batch_size:
                break
        return stats

    def route_batch(self, stats: RouteStats) -> int:
        events = self.events.to_route(self.batch_size, self.lease_seconds)
        by_id: list[tuple[int, list[RecordRef]]] = []
        for event in events:
            self._route(event, stats, by_id)
        # Events routed by id need no I/O: their deliveries commit together.
        self.deliveries.add_targets_many(by_id)
        return len(events)

    def _route(self, event: StoredEvent, stats: RouteStats, by_id: list[tuple[int, list[RecordRef]]]) -> None:
        ignored = event.details.get("ignored")  # a channel syncd does not model: kept, no CRM field written
        # A notification may still answer a registration of ours (joined by request_id or phone).
        could_answer = not ignored or event.phone or event.details.get("request_id")
        if event.source == "sinch" and could_answer and self.reconcile(event):
            return
        if ignored:
            self.events.ignore(event.id, str(ignored))
            log.info("event ignored", extra={"event_id": event.id, "source": event.source,
                                             "reason": mask_text(str(ignored))})
            return
        ref = self.rules.route_id(event.external_lead_id)
        if ref is not None:
            by_id.append((event.id, [ref]))
            stats.routed += 1
            log.info("event routed", extra={"event_id": event.id, "source": event.source,
                                            "targets": [f"{ref.crm}:{ref.obj}:{ref.record_id}"], "by": "id"})
            return
        if not event.phone:
            reason = self.rules.unroutable_reason(event.external_lead_id, event.phone, event.phone_raw)
            self._quarantine(event, reason or "not routable", stats)
            return
        self._route_by_phone(event, event.phone, stats)

    def _route_by_phone(self, event: StoredEvent, phone: str, stats: RouteStats) -> None:
        targets: list[RecordRef] = []
        searched: list[str] = []
        for name, connector in self.connectors.items():
            paused = self.pauses.in_force(name)
            if paused is not None:
                self.events.defer(event.id, f"phone lookup in {name} waits: CRM paused", paused)
                return
            try:
                targets.extend(connector.find_by_phone(phone))
                searched.append(name)
            except ConnectorError as exc:
                self._count_lookup(name, exc)
                self.pauses.after_error(name, exc)
                self._lookup_failed(event, name, exc, stats)
                return
            finally:
                self.pauses.check_budget(name)
            self._count_lookup(name, None)
        if not targets:
            self._quarantine(event, f"no record with this phone in {', '.join(searched) or 'any CRM'}", stats)
            return
        self.deliveries.add_targets(event.id, list(dict.fromkeys(targets)))
        stats.routed += 1
        log.info("event routed", extra={"event_id": event.id, "source": event.source, "by": "phone",
                                        "phone": mask_phone(phone),
                                        "targets": [f"{t.crm}:{t.obj}:{t.record_id}" for t in targets]})

    def _lookup_failed(self, event: StoredEvent, crm: str, exc: ConnectorError, stats: RouteStats) -> None:
        text = f"phone lookup in {crm} failed: {error_text(exc)}"
        attempts = event.route_attempts + 1
        if self.policy.give_up(exc, attempts, event.received_at):
            self._quarantine(event, text, stats)
            return
        self.events.defer(event.id, text, self.policy.next_try(exc, attempts))
        log.warning("routing deferred", extra={"event_id": event.id, "crm": crm, "error": text})

    def _quarantine(self, event: StoredEvent, reason: str, stats: RouteStats) -> None:
        self.events.quarantine(event.id, reason)
        stats.quarantined += 1
        log.warning("event quarantined", extra={"event_id": event.id, "source": event.source,
                                                "reason": reason})

    def _count_lookup(self, crm: str, exc: ConnectorError | None) -> None:
        self.health.observe(crm, exc)
        if self.metrics:
            self.metrics.crm_lookups.labels(crm, Metrics.call_status(exc)).inc()
