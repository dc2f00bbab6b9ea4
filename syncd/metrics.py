"""Prometheus metrics (prometheus-client). Labels carry no personal data:
only source names, outcomes, CRM names, states and HTTP status classes."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events_received = Counter(
            "syncd_events_received", "Webhooks received, by source and outcome",
            ["source", "outcome"], registry=self.registry)
        self.body_bytes = Counter(
            "syncd_webhook_body_bytes", "Bytes of webhook bodies received, by source",
            ["source"], registry=self.registry)
        self.unmodelled_values = Counter(
            "syncd_source_unmodelled_values",
            "Events kept with a value syncd does not model (e.g. Apten channel manual), by source and field",
            ["source", "field"], registry=self.registry)
        self.crm_requests = Counter(
            "syncd_crm_requests", "CRM write calls by CRM and result",
            ["crm", "status"], registry=self.registry)
        self.crm_lookups = Counter(
            "syncd_crm_lookups", "Record lookups (phone/email searches) by CRM and result",
            ["crm", "status"], registry=self.registry)
        self.crm_polls = Counter(
            "syncd_crm_polls", "Reflector polls for changed records, one per page, by CRM and result",
            ["crm", "status"], registry=self.registry)
        self.push_duration = Histogram(
            "syncd_push_duration_seconds", "Time to push one batch to a CRM",
            ["crm"], registry=self.registry)
        self.deliveries_settled = Counter(
            "syncd_deliveries_settled", "Delivery outcomes by CRM and state",
            ["crm", "state"], registry=self.registry)
        self.scheduler_runs = Counter(
            "syncd_scheduler_runs", "Scheduled job runs by job and result",
            ["job", "result"], registry=self.registry)
        self.audit_drift = Gauge(
            "syncd_audit_drift", "Mapped fields found different from the consent ledger by the last audit sweep",
            ["crm"], registry=self.registry)
        self._journal_counts: Callable[[], dict] | None = None
        self.honour_seconds = Histogram(
            "syncd_opt_out_honour_seconds", "Time from an opt-out's arrival to a CRM target settled done",
            ["crm"], buckets=HONOUR_BUCKETS, registry=self.registry)
        self._compliance: Callable[[], dict] | None = None

    def watch_journal(self, counts: Callable[[], dict], max_age_seconds: float = 5.0) -> None:
        """Journal gauges are read from the journal, so every replica reports the truth;
        at most once per ``max_age_seconds`` (the counts scan whole tables)."""
        if self._journal_counts is None:
            self.registry.register(_JournalCollector(CachedRead(counts, max_age_seconds)))
        self._journal_counts = counts

    def watch_compliance(self, summary: Callable[[], dict], max_age_seconds: float = 5.0) -> None:
        """The compliance gauges and breach counter, from the journal (every replica
        reports the same numbers), read at most once per ``max_age_seconds``."""
        if self._compliance is None:
            self.registry.register(_ComplianceCollector(CachedRead(self._compliance_summary, max_age_seconds)))
        self._compliance = summary

    def _compliance_summary(self) -> dict:
        assert self._compliance is not None
        return self._compliance()

    @staticmethod
    def call_status(exc: BaseException | None) -> str:
        """A CRM call's result as a label: ``ok``, the HTTP status, or the error class."""
        if exc is None:
            return "ok"
        status = getattr(exc, "status", None)
        return str(status) if status else type(exc).__name__

    def render(self) -> bytes:
        return generate_latest(self.registry)


# An opt-out's way to its CRM: seconds when all is well, days when a CRM is down, and
# the legal limit (10 business days) is about two weeks.
HONOUR_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400, 14 * 86400,
                  21 * 86400)


class CachedRead:
    """A journal read remembered for ``max_age`` seconds; concurrent callers share one read."""

    def __init__(self, read: Callable[[], Any], max_age: float):
        self._read = read
        self.max_age = max_age
        self._lock = threading.Lock()
        self._value: Any = None
        self._read_at = 0.0

    def __call__(self) -> Any:
        with self._lock:
            if self._value is None or time.monotonic() - self._read_at >= self.max_age:
                self._value = self._read()
                self._read_at = time.monotonic()
            return self._value


class _JournalCollector:
    def __init__(self, counts: Callable[[], dict]):
        self.counts = counts

    def describe(self):
        return []

    def collect(self):
        c = self.counts()
        deliveries = GaugeMetricFamily("syncd_deliveries", "Deliveries by state", labels=["state"])
        for state, n in c["deliveries"].items():
            deliveries.add_metric([state], n)
        deliveries.add_metric(["quarantined"], c["quarantined"])
        yield deliveries
        refl = GaugeMetricFamily("syncd_reflections", "Reflections to Sinch by state", labels=["state"])
        for state, n in c["reflections"].items():
            refl.add_metric([state], n)
        yield refl
        yield GaugeMetricFamily("syncd_journal_oldest_pending_age_seconds",
                                "Age of the oldest event or delivery not yet settled",
                                value=c["oldest_pending_age_seconds"] or 0.0)


class _ComplianceCollector:
    def __init__(self, summary: Callable[[], dict]):
        self.summary = summary

    def describe(self):
        return []

    def collect(self):
        c = self.summary()
        yield GaugeMetricFamily("syncd_compliance_open", "Opt-outs not yet honoured everywhere", value=c["open"])
        yield GaugeMetricFamily("syncd_compliance_at_risk",
                                "Opt-outs not honoured with compliance.warn_business_days or fewer left",
                                value=c["at_risk"])
        yield CounterMetricFamily("syncd_compliance_breached", "Opt-outs ever seen open past their deadline",
                                  value=c.get("breached_total", 0))
