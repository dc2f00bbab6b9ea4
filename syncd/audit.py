"""``syncd audit``: does each CRM still hold what syncd wrote?

For every record syncd has written (a done delivery, records with nothing pending),
the consent the ledger holds for the identities and channels of the events that
targeted it says what the record's mapped fields must be: an opt-out stays set until
a newer explicit opt-in, an opt-in reads as the mapping writes one. The live values
are read from each CRM in its own batches (``CrmConnector.read``) and every field
that differs is a drift. ``repair`` queues a delivery of the ledger entry's event for
each drifted record, which the running daemon's pusher applies on its next tick.

The scheduled sweep (``schedule.audit_interval_hours``) only reports: a
``syncd_audit_drift`` gauge per CRM and one masked log line per drift, on the leader.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from connectors.base import CrmConnector
from connectors.errors import ConnectorError
from connectors.types import RecordRef
from syncd.journal.base import Journal
from syncd.journal.ledger import Entry, entries_for, wins
from syncd.mapping import Mapping
from syncd.masking import mask_text
from syncd.metrics import Metrics

log = logging.getLogger("syncd.audit")

READ_CHUNK = 1000          # records per connector.read call: a multiple of Salesforce's 200 and HubSpot's 100
_TRUE = {"true", "yes", "y", "1", "on", "checked"}


@dataclass(frozen=True)
class Drift:
    crm: str
    object: str
    record_id: str
    field: str
    expected: Any
    actual: Any


@dataclass
class AuditResult:
    checked: int = 0                                   # records read and compared
    drift: list[Drift] = field(default_factory=list)
    repaired: int = 0                                  # drift entries whose record got a delivery queued
    missing: list[RecordRef] = field(default_factory=list)   # written once, gone from the CRM now
    errors: list[str] = field(default_factory=list)    # a CRM that could not be read (masked)

    @property
    def drift_left(self) -> bool:
        return bool(self.drift) and self.repaired < len(self.drift)

    def as_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "drift": [asdict(d) for d in self.drift], "repaired": self.repaired,
                "missing": [{"crm": r.crm, "object": r.obj, "record_id": r.record_id} for r in self.missing],
                "errors": self.errors}


@dataclass
class _Expectation:
    """What one field of one record must hold, and the ledger entry that says so."""

    value: Any
    entry: Entry


def matches(expected: Any, actual: Any) -> bool:
    """Whether a CRM value holds the mapping's value: flags compare as flags (a CRM may
    answer "true", "Yes" or nothing for unset), anything else as text."""
    if isinstance(actual, str) and actual == "partial":
        return False                     # some of the record's addresses only
    if isinstance(expected, bool):
        if isinstance(actual, bool):
            return actual == expected
        if isinstance(actual, (list, tuple)):
            return bool(actual) == expected
        return (isinstance(actual, str) and actual.strip().lower() in _TRUE) == expected
    return ("" if actual is None else str(actual)) == ("" if expected is None else str(expected))


class Auditor:
    def __init__(self, journal: Journal, connectors: dict[str, CrmConnector], mappings: dict[str, Mapping]):
        self.journal = journal
        self.connectors = connectors
        self.mappings = mappings

    def targets(self, crm: str | None = None) -> dict[RecordRef, list[dict[str, Any]]]:
        """The events (journal rows) that targeted each written record."""
        by_record: dict[RecordRef, list[dict[str, Any]]] = defaultdict(list)
        for row in self.journal.reports.audit_targets(crm):
            by_record[RecordRef(row["crm"], row["obj"], row["record_id"])].append(row)
        return by_record

    def expectations(self, targets: dict[RecordRef, list[dict[str, Any]]]
                     ) -> dict[RecordRef, dict[str, _Expectation]]:
        """Per record, per mapped field: the value the ledger says it must hold. Per
        channel the ledger entry that wins among the record's identities decides (as
        the pusher's newest-wins, opt-out-wins-a-tie rule does per field)."""
        keys: dict[RecordRef, set[tuple[str, str]]] = {}
        for ref, rows in targets.items():
            keys[ref] = {(e.identity, e.channel) for row in rows for e in entries_for(row, int(row["event_id"]))}
        wanted = sorted({k for ks in keys.values() for k in ks})
        ledger = dict(zip(wanted, self.journal.ledger.states(wanted)))
        out: dict[RecordRef, dict[str, _Expectation]] = {}
        for ref, record_keys in keys.items():
            mapping = self.mappings.get(ref.crm)
            om = mapping.for_object(ref.obj) if mapping is not None else None
            if om is None:
                continue
            winner: dict[str, Entry] = {}
            for key in sorted(record_keys):   # a fixed order: equal entries pick the same event each run
                entry = ledger.get(key)
                if entry is not None and wins(entry, winner.get(entry.channel)):
                    winner[entry.channel] = entry
            fields: dict[str, _Expectation] = {}
            for channel, entry in sorted(winner.items()):
                value = om.values.opt_out if entry.state == "opted_out" else om.values.opt_in
                for name in om.channels.get(channel, []):  # type: ignore[call-overload]
                    current = fields.get(name)
                    if current is None or wins(entry, current.entry):
                        fields[name] = _Expectation(value, entry)
            if fields:
                out[ref] = fields
        return out

    def run(self, crm: str | None = None, *, repair: bool = False,
            progress: Callable[[int], None] | None = None,
            on_total: Callable[[int], None] | None = None) -> AuditResult:
        """Read, compare and (with ``repair``) queue deliveries for every drifted record."""
        result = AuditResult()
        expected = self.expectations(self.targets(crm))
        if on_total is not None:
            on_total(len(expected))
        groups: dict[tuple[str, str], list[RecordRef]] = defaultdict(list)
        for ref in expected:
            groups[(ref.crm, ref.obj)].append(ref)
        drifted: dict[RecordRef, list[Drift]] = {}
        for (crm_name, obj), refs in sorted(groups.items()):
            connector = self.connectors.get(crm_name)
            if connector is None or not hasattr(connector, "read"):
                result.errors.append(f"{crm_name}: not enabled, or its connector cannot read records for an audit")
                if progress:
                    progress(len(refs))
                continue
            names = sorted({name for ref in refs for name in expected[ref]})
            for start in range(0, len(refs), READ_CHUNK):
                chunk = refs[start:start + READ_CHUNK]
                try:
                    live = connector.read(chunk, names)
                except ConnectorError as exc:
                    result.errors.append(f"{crm_name} {obj}: {mask_text(str(exc))}")
                    if progress:
                        progress(len(refs) - start)
                    break
                for ref in chunk:
                    self._compare(ref, expected[ref], live.get(ref), result, drifted)
                if progress:
                    progress(len(chunk))
        if repair and drifted:
            result.repaired = self.repair(drifted, expected)
        return result

    @staticmethod
    def _compare(ref: RecordRef, fields: dict[str, _Expectation], values: dict[str, Any] | None,
                 result: AuditResult, drifted: dict[RecordRef, list[Drift]]) -> None:
        if values is None:
            result.missing.append(ref)
            return
        result.checked += 1
        for name, want in sorted(fields.items()):
            if name not in values:
                continue  # not readable for this record (e.g. email consent of a record with no address)
            if not matches(want.value, values[name]):
                d = Drift(ref.crm, ref.obj, ref.record_id, name, want.value, values[name])
                result.drift.append(d)
                drifted.setdefault(ref, []).append(d)

    def repair(self, drifted: dict[RecordRef, list[Drift]],
               expected: dict[RecordRef, dict[str, _Expectation]]) -> int:
        """Queue the ledger entry's event for each drifted record; the drift entries
        whose record got every delivery it needs queued."""
        pairs: list[tuple[int, RecordRef]] = []
        fixable: dict[RecordRef, bool] = {}
        for ref, drifts in drifted.items():
            events = {expected[ref][d.field].entry.event_id for d in drifts}
            fixable[ref] = None not in events
            pairs.extend((event_id, ref) for event_id in sorted(e for e in events if e is not None))
        queued = self.journal.deliveries.requeue(pairs)
        if queued < len(pairs):
            log.warning("audit repair: some deliveries were already queued or could not be",
                        extra={"wanted": len(pairs), "queued": queued})
        return sum(len(drifts) for ref, drifts in drifted.items() if fixable[ref])


def log_drift(drift: Iterable[Drift]) -> None:
    """One log line per drift; values and ids pass the masking (no personal data leaves)."""
    for d in drift:
        log.warning("consent drift in CRM", extra={
            "crm": d.crm, "object": d.object, "record": mask_text(d.record_id), "field": d.field,
            "expected": mask_text(str(d.expected)), "actual": mask_text(str(d.actual))})


class AuditSweep:
    """The scheduled, report-only sweep; one replica (the leader) runs it."""

    def __init__(self, auditor: Auditor, metrics: Metrics | None = None):
        self.auditor = auditor
        self.metrics = metrics

    def run(self) -> AuditResult | None:
        if not self.auditor.journal.ops.try_leadership("audit"):
            return None
        result = self.auditor.run()
        log_drift(result.drift)
        for line in result.errors:
            log.warning("audit could not read a CRM", extra={"error": line})
        if self.metrics is not None:
            per_crm = {crm: 0 for crm in self.auditor.connectors}
            for d in result.drift:
                per_crm[d.crm] = per_crm.get(d.crm, 0) + 1
            for crm, n in per_crm.items():
                self.metrics.audit_drift.labels(crm).set(n)
        log.info("audit sweep done", extra={"checked": result.checked, "drift": len(result.drift),
                                            "missing": len(result.missing)})
        return result
