"""The routing step: new events become deliveries, one per target record.

Each tick leases new events and routes them: a Sinch notification first settles the
registration it answers (see ``reflector.SinchNotifications``); an event of a channel
syncd does not model is ignored; an ``externalLeadId`` matching an id rule
(:mod:`syncd.routing`) names its record directly.

Fan-out (``routing.fan_out``, the default): besides the named record, every record in
every enabled CRM that carries the event's phone (sms, call, whatsapp, all) or email
(email, all) is a target: one person, every duplicate. Without fan-out, only an event
with no routable id is looked up, by phone. Lookups are batched: the phones and emails
of a whole routing batch go to each CRM's ``find`` ``LOOKUP_CHUNK`` at a time, so a
phone shared by many events is looked up once.

A named record that has become another (a converted Salesforce Lead, read-only from
then on) is routed to the record it became (``read`` with ``SUCCESSOR_FIELD``, one
call per CRM and batch, for the objects its plugin lists in ``successor_objects``).

An email opt-out that names a record but carries no address (Apten's ``optOut``) first
reads the named record's address (``read`` with ``EMAILS_FIELD``, one call per CRM and
batch), keeps it on the event and in the ledger (``Events.learn_email``), then fans out
by it.

A failed lookup defers the event with backoff; the records already known (the named
one, those found in CRMs that answered) get their deliveries at once and the event
keeps waiting for the rest. When the retries give up, the event is routed to what is
known, with the failure kept as its status reason; with nothing known it is
quarantined. An event no rule and no lookup can route is quarantined.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from connectors.base import CrmConnector
from connectors.errors import ConnectorError
from connectors.types import EMAILS_FIELD, SUCCESSOR_FIELD, RecordRef
from syncd.backoff import RetryPolicy
from syncd.crm_health import CrmHealthBook
from syncd.journal.base import Deliveries, Events, Operations, StoredEvent
from syncd.journal.ledger import normalize_email
from syncd.masking import mask_email, mask_phone, mask_text
from syncd.metrics import Metrics
from syncd.pauses import CrmPauses, error_text
from syncd.routing import Router

log = logging.getLogger("syncd.router")

# True when a Sinch webhook answered a registration of ours (nothing to route).
Reconcile = Callable[[StoredEvent], bool]
T = TypeVar("T")

# Phones and emails per ``find`` call. Each connector batches inside to its CRM's own
# limits (SOSL text length, HubSpot's IN filters, Close's searches); a failure costs
# at most this chunk's results.
LOOKUP_CHUNK = 100
PHONE_CHANNELS = ("sms", "call", "whatsapp")


@dataclass
class RouteStats:
    routed: int = 0
    quarantined: int = 0


@dataclass
class Plan:
    """One event's routing: the record it names and the identities to look up."""

    event: StoredEvent
    named: RecordRef | None
    phones: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    # Reading the named record (its successor, its address): (crm, error) when it
    # failed, (crm, until) when its CRM is paused, and what was being read.
    read_failure: tuple[str, ConnectorError] | None = None
    read_paused: tuple[str, float] | None = None
    read_what: str = "email"
    # The named record may have become another and could not be checked: it gets no
    # delivery while the event waits (a converted Lead would only dead-letter), only
    # when the retries give up.
    named_unchecked: bool = False

    @property
    def identities(self) -> tuple[str, ...]:
        return self.phones + self.emails


@dataclass
class Lookups:
    """What one routing batch's lookups found, per CRM and identity."""

    found: dict[str, dict[str, list[RecordRef]]] = field(default_factory=dict)
    failed: dict[str, dict[str, ConnectorError]] = field(default_factory=dict)
    paused: dict[str, float] = field(default_factory=dict)


@dataclass
class Routed:
    """A routing batch's writes, committed together at its end."""

    done: list[tuple[int, list[RecordRef]]] = field(default_factory=list)
    notes: dict[int, str] = field(default_factory=dict)
    partial: list[tuple[int, list[RecordRef]]] = field(default_factory=list)  # event still routing
    deferred: list[tuple[int, str, float]] = field(default_factory=list)


class EventRouter:
    def __init__(self, events: Events, deliveries: Deliveries, ops: Operations, rules: Router,
                 connectors: dict[str, CrmConnector], pauses: CrmPauses, policy: RetryPolicy,
                 reconcile: Reconcile, *, batch_size: int = 1000, lease_seconds: float = 120.0,
                 metrics: Metrics | None = None, health: CrmHealthBook | None = None, fan_out: bool = True,
                 successor_objects: dict[str, frozenset[str]] | None = None):
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
        self.fan_out = fan_out
        self.successor_objects = successor_objects or {}
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
        out = Routed()
        plans = [plan for plan in (self._plan(event, stats) for event in events) if plan is not None]
        self._follow_successors(plans)
        self._learn_emails([plan for plan in plans if self._needs_address(plan)])
        needs_lookup = [plan for plan in plans if plan.identities]
        lookups = self._look_up(needs_lookup) if needs_lookup else Lookups()
        for plan in plans:
            self._settle(plan, lookups, stats, out)
        # Deliveries first: a crash before the deferrals only repeats idempotent inserts.
        self.deliveries.add_targets_many(out.partial, still_routing={event_id for event_id, _ in out.partial})
        for event_id, text, retry_at in out.deferred:
            self.events.defer(event_id, text, retry_at)
        self.deliveries.add_targets_many(out.done, notes=out.notes)
        return len(events)

    # --- what each event needs ------------------------------------------------------
    def _plan(self, event: StoredEvent, stats: RouteStats) -> Plan | None:
        ignored = event.details.get("ignored")  # a channel syncd does not model: kept, no CRM field written
        # A notification may still answer a registration of ours (joined by request_id or phone).
        could_answer = not ignored or event.phone or event.details.get("request_id")
        if event.source == "sinch" and could_answer and self.reconcile(event):
            return None
        if ignored:
            self.events.ignore(event.id, str(ignored))
            log.info("event ignored", extra={"event_id": event.id, "source": event.source,
                                             "reason": mask_text(str(ignored))})
            return None
        named = self.rules.route_id(event.external_lead_id)
        plan = Plan(event, named, *self._identities(event, named))
        if named is None and not plan.identities:
            reason = self.rules.unroutable_reason(event.external_lead_id, event.phone, event.phone_raw)
            self._quarantine(event, reason or "not routable", stats)
            return None
        return plan

    def _identities(self, event: StoredEvent, named: RecordRef | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The phones and emails to look up: without fan-out, the phone of an event
        with no routable id; with it, the identities of the event's channel."""
        if not self.fan_out:
            return ((event.phone,) if named is None and event.phone else ()), ()
        every = event.kind == "do_not_contact" or event.channel == "all"
        phones = (event.phone,) if event.phone and (every or event.channel in PHONE_CHANNELS) else ()
        email = normalize_email(event.email) if event.email and (every or event.channel == "email") else ""
        emails = (email,) if "@" in email else ()
        if named is None and not phones and not emails and event.phone:
            phones = (event.phone,)  # no id and no identity of its channel: the phone decides, as ever
        return phones, emails

    def _needs_address(self, plan: Plan) -> bool:
        event = plan.event
        wants_email = event.kind == "do_not_contact" or event.channel in ("email", "all")
        return (self.fan_out and wants_email and plan.named is not None and not plan.emails
                and not (event.email or "").strip())

    def _named_by_crm(self, plans: list[Plan]) -> dict[str, list[Plan]]:
        by_crm: dict[str, list[Plan]] = {}
        for plan in plans:
            if plan.named is not None:
                by_crm.setdefault(plan.named.crm, []).append(plan)
        return by_crm

    def _read_named(self, crm: str, plans: list[Plan], field_name: str, what: str) -> dict[RecordRef, dict]:
        """``field_name`` of each plan's named record in ``crm`` (one ``read``); a paused
        CRM or a failed read is noted on the plans (they wait, with backoff)."""
        connector = self.connectors.get(crm)
        if connector is None:
            return {}
        paused = self.pauses.in_force(crm)
        if paused is not None:
            for plan in plans:
                plan.read_paused, plan.read_what = (crm, paused), what
            return {}
        refs = list(dict.fromkeys(plan.named for plan in plans if plan.named is not None))
        try:
            return self._ask(crm, lambda: connector.read(refs, [field_name]))
        except ConnectorError as exc:
            for plan in plans:
                if plan.read_failure is None:
                    plan.read_failure, plan.read_what = (crm, exc), what
            return {}

    def _follow_successors(self, plans: list[Plan]) -> None:
        """Route a named record that has become another (a converted Salesforce Lead,
        which can no longer be updated) to the record it became."""
        wanted = [plan for plan in plans if plan.named is not None
                  and plan.named.obj in self.successor_objects.get(plan.named.crm, ())]
        for crm, group in self._named_by_crm(wanted).items():
            values = self._read_named(crm, group, SUCCESSOR_FIELD, "conversion")
            for plan in group:
                plan.named_unchecked = plan.read_failure is not None or plan.read_paused is not None
                named = plan.named
                successor = values.get(named, {}).get(SUCCESSOR_FIELD) if named is not None else None
                if isinstance(successor, RecordRef) and named is not None:
                    log.info("named record was converted; routed to the record it became", extra={
                        "event_id": plan.event.id, "named": f"{named.crm}:{named.obj}:{named.record_id}",
                        "became": f"{successor.crm}:{successor.obj}:{successor.record_id}"})
                    plan.named = successor

    def _learn_emails(self, plans: list[Plan]) -> None:
        """Read the address of each named record (one ``read`` per CRM) and keep it on
        the event, so the ledger and the consent API know it and fan-out reaches every
        record carrying it."""
        for crm, group in self._named_by_crm(plans).items():
            values = self._read_named(crm, group, EMAILS_FIELD, "email")
            for plan in group:
                if plan.named is None or plan.named not in values:
                    continue
                addresses = values[plan.named].get(EMAILS_FIELD) or []
                email = next((normalize_email(a) for a in addresses if "@" in str(a)), None)
                if email is not None:
                    self.events.learn_email(plan.event.id, email)
                    plan.emails = (email,)

    # --- lookups --------------------------------------------------------------------
    def _look_up(self, plans: list[Plan]) -> Lookups:
        """Each CRM's ``find`` once per chunk of the batch's distinct phones and emails.
        A paused CRM is not asked; after a failure the CRM is asked no more this batch."""
        phones = sorted({p for plan in plans for p in plan.phones})
        emails = sorted({e for plan in plans for e in plan.emails})
        identities = [(p, True) for p in phones] + [(e, False) for e in emails]
        out = Lookups()
        for name, connector in self.connectors.items():
            paused = self.pauses.in_force(name)
            if paused is not None:
                out.paused[name] = paused
                continue
            found = out.found.setdefault(name, {})
            for start in range(0, len(identities), LOOKUP_CHUNK):
                chunk = identities[start:start + LOOKUP_CHUNK]
                try:
                    records = self._ask(name, lambda: connector.find([i for i, is_phone in chunk if is_phone],
                                                                     [i for i, is_phone in chunk if not is_phone]))
                except ConnectorError as exc:
                    out.failed[name] = {i: exc for i, _ in identities[start:]}
                    break
                for record in records:
                    for identity in record.phones + record.emails:
                        found.setdefault(identity, []).append(record.ref)
        return out

    def _ask(self, crm: str, call: Callable[[], T]) -> T:
        """One lookup call to a CRM: counted toward its health and metrics, its error
        (re-raised) shown to the pauses, its API budget checked after."""
        try:
            result = call()
        except ConnectorError as exc:
            self._count_lookup(crm, exc)
            self.pauses.after_error(crm, exc)
            raise
        finally:
            self.pauses.check_budget(crm)
        self._count_lookup(crm, None)
        return result

    # --- decisions ------------------------------------------------------------------
    def _settle(self, plan: Plan, lookups: Lookups, stats: RouteStats, out: Routed) -> None:
        event = plan.event
        targets = [plan.named] if plan.named is not None and not plan.named_unchecked else []
        failure: tuple[str, ConnectorError] | None = plan.read_failure
        for crm in self.connectors:
            for identity in plan.identities:
                exc = lookups.failed.get(crm, {}).get(identity)
                if exc is not None:
                    failure = failure or (crm, exc)
                targets.extend(lookups.found.get(crm, {}).get(identity, []))
        targets = list(dict.fromkeys(targets))
        paused = {crm: lookups.paused[crm] for crm in self.connectors if crm in lookups.paused} if plan.identities else {}
        if plan.read_paused is not None:
            paused[plan.read_paused[0]] = plan.read_paused[1]
        if paused:
            until = max(paused.values())
            self._wait(plan, targets, f"lookup in {', '.join(paused)} waits: CRM paused", until, out)
        elif failure is not None:
            self._lookup_failed(plan, targets, *failure, stats, out)
        elif targets:
            self._route(plan, targets, stats, out)
        else:
            searched = ", ".join(self.connectors) or "any CRM"
            self._quarantine(event, f"no record with this {self._what(plan)} in {searched}", stats)

    def _lookup_failed(self, plan: Plan, targets: list[RecordRef], crm: str, exc: ConnectorError,
                       stats: RouteStats, out: Routed) -> None:
        text = f"{self._what(plan)} lookup in {crm} failed: {error_text(exc)}"
        attempts = plan.event.route_attempts + 1
        gave_up = self.policy.give_up(exc, attempts, plan.event.received_at)
        if gave_up is None:
            self._wait(plan, targets, text, self.policy.next_try(exc, attempts), out)
            log.warning("routing deferred", extra={"event_id": plan.event.id, "crm": crm, "error": text,
                                                   "targets_now": len(targets)})
        elif targets or plan.named_unchecked:  # the named record (and what other CRMs found) must not wait forever
            if plan.named_unchecked and plan.named is not None:
                targets = list(dict.fromkeys([plan.named, *targets]))
            out.notes[plan.event.id] = f"{gave_up.prefix}{text}"
            self._route(plan, targets, stats, out)
            log.warning("fan-out lookup gave up; routed to the records known", extra={
                "event_id": plan.event.id, "crm": crm, "error": f"{gave_up.prefix}{text}"})
        else:
            self._quarantine(plan.event, f"{gave_up.prefix}{text}", stats)

    def _wait(self, plan: Plan, targets: list[RecordRef], text: str, retry_at: float, out: Routed) -> None:
        """Route again at ``retry_at``; the records already known get their deliveries now."""
        if targets:
            out.partial.append((plan.event.id, targets))
        out.deferred.append((plan.event.id, text, retry_at))

    def _route(self, plan: Plan, targets: list[RecordRef], stats: RouteStats, out: Routed) -> None:
        out.done.append((plan.event.id, targets))
        stats.routed += 1
        by = "id" if not plan.identities else ("id+lookup" if plan.named is not None else "lookup")
        log.info("event routed", extra={
            "event_id": plan.event.id, "source": plan.event.source, "by": by,
            "phone": mask_phone(plan.phones[0]) if plan.phones else None,
            "email": mask_email(plan.emails[0]) if plan.emails else None,
            "targets": [f"{t.crm}:{t.obj}:{t.record_id}" for t in targets]})

    @staticmethod
    def _what(plan: Plan) -> str:
        return " or ".join(kind for kind, values in (("phone", plan.phones), ("email", plan.emails)) if values) \
            or plan.read_what   # what could not be read of the named record

    def _quarantine(self, event: StoredEvent, reason: str, stats: RouteStats) -> None:
        self.events.quarantine(event.id, reason)
        stats.quarantined += 1
        log.warning("event quarantined", extra={"event_id": event.id, "source": event.source,
                                                "reason": reason})

    def _count_lookup(self, crm: str, exc: ConnectorError | None) -> None:
        self.health.observe(crm, exc)
        if self.metrics:
            self.metrics.crm_lookups.labels(crm, Metrics.call_status(exc)).inc()
