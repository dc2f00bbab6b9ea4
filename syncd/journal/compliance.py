"""The compliance store: the open opt-outs the compliance clock (:mod:`syncd.compliance`)
reads, and the two stamps it keeps on an event (``honoured_at``, ``breached_at``).

Reads touch only open opt-outs (the partial index ``events_compliance_open``), never
every event ever received. The deadline arithmetic is the clock's: it turns ``now``
into two ``received_at`` cut-offs (before ``breach_before``: breached; before
``risk_before``: at risk), which works because a later arrival never has an earlier
deadline."""
from __future__ import annotations

from typing import Any

from syncd.journal.engine import Engine

PHONE_CHUNK = 500


class ComplianceStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def counts(self, breach_before: str, risk_before: str, with_flags: bool) -> dict[str, Any]:
        """``open``, ``at_risk``, ``breached``, ``oldest`` (received_at or None) and
        ``breached_total`` (every opt-out ever seen past its deadline)."""
        with self.engine.read() as tx:
            row = tx.one("compliance_counts", breach_before=breach_before, risk_before=risk_before,
                         flags=int(with_flags)) or {}
            total = tx.value("breached_total")
        return {"open": int(row.get("open") or 0), "at_risk": int(row.get("at_risk") or 0),
                "breached": int(row.get("breached") or 0), "oldest": row.get("oldest"),
                "breached_total": int(total or 0)}

    def open_between(self, start: str, before: str, with_flags: bool, limit: int = 500) -> list[dict[str, Any]]:
        """Open opt-outs received in ``[start, before)``, oldest first, each with its
        targets not yet done (``pending``: ``crm:object (state)``)."""
        with self.engine.read() as tx:
            rows = tx.all("compliance_at_risk", flags=int(with_flags), before=before, limit=limit,
                          **{"from": start})
        out: dict[int, dict[str, Any]] = {}
        for r in rows:
            event = out.setdefault(r["id"], {
                "event_id": r["id"], "source": r["source"], "event_type": r["event_type"], "kind": r["kind"],
                "channel": r["channel"], "status": r["status"], "received_at": r["received_at"], "pending": []})
            if r["crm"] is not None:
                event["pending"].append(f"{r['crm']}:{r['obj']} ({r['state']})")
        return list(out.values())

    def mark_breached(self, breach_before: str, now_iso: str, with_flags: bool) -> int:
        """Stamp ``breached_at`` on open opt-outs past their deadline (once each)."""
        with self.engine.begin() as tx:
            return tx.execute("mark_breached", breach_before=breach_before, now_iso=now_iso, flags=int(with_flags))

    def open_crm_flags(self, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Open CRM-side flags (``crm_flag`` events), by id after ``after``."""
        with self.engine.read() as tx:
            return tx.all("open_crm_flags", after=after, limit=limit)

    def sinch_confirmations(self, phones: list[str]) -> dict[str, dict[str, tuple[str, str | None, Any]]]:
        """phone -> Sinch channel -> (kind, reflection state or None, when): what this
        journal knows Sinch holds."""
        out: dict[str, dict[str, tuple[str, str | None, Any]]] = {}
        unique = sorted(set(p for p in phones if p))
        with self.engine.read() as tx:
            for i in range(0, len(unique), PHONE_CHUNK):
                for r in tx.all("sinch_confirmations", phones=unique[i:i + PHONE_CHUNK]):
                    state = r["state"] if r["reflection_id"] is not None else None
                    out.setdefault(r["phone"], {})[r["channel"]] = (r["kind"], state, r["at"])
        return out

    def honour(self, stamps: list[tuple[int, str]]) -> int:
        """Stamp ``honoured_at`` on events (``(event_id, at)``) not yet honoured."""
        if not stamps:
            return 0
        with self.engine.begin() as tx:
            return sum(tx.execute("honour_event", id=event_id, at=at) for event_id, at in stamps)
