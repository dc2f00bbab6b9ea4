"""``syncd trace QUERY``: one person's whole story from the journal.

QUERY is read as every thing it can be (:func:`parse_query`): a phone in any format
(E.164 through phonenumbers with ``phone.default_region``, as the sources store it),
an email (lower-cased, trimmed, as the ledger keeps it), a CRM record id (any id a
routing rule accepts; a Salesforce id matches in its 15- and 18-char forms), and an
event id (all digits). An all-digit query is looked up as each of them at once (a
HubSpot record id, an event id, a phone) and every match is shown. The journal's
:meth:`~syncd.journal.reports.ReportStore.trace` does the reading; this module
parses the query and draws the terminal form.
"""
from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Callable, Iterable

from connectors.registry import CRM_PLUGINS
from syncd.journal.base import TraceQuery
from syncd.phones import to_e164

MAX_QUERY_LEN = 254         # the longest email address
MAX_EVENT_ID_DIGITS = 18    # fits a signed 64-bit id
_PHONE_TEXT = re.compile(r"\+?[\d\s().\-/]+")
Deadline = Callable[[datetime], datetime]


class BadQuery(ValueError):
    """QUERY is neither a phone, an email, a record id nor an event id."""


def parse_query(text: str, region: str = "US", id_patterns: Iterable[str] = ()) -> TraceQuery:
    """Every reading of ``text``; :class:`BadQuery` (with the reason) when there is none.
    ``id_patterns``: the config's own ``routing.rules`` patterns, beside the CRMs' built-in ones."""
    query = (text or "").strip()
    if not query:
        raise BadQuery("empty query: give a phone, an email, a CRM record id or an event id")
    if len(query) > MAX_QUERY_LEN:
        raise BadQuery(f"query longer than {MAX_QUERY_LEN} characters")
    if "@" in query:
        return TraceQuery(text=query, email=_email(query))
    phone = to_e164(query, region) if _PHONE_TEXT.fullmatch(query) else None
    record_ids = record_id_forms(query, id_patterns)
    event_id = int(query) if query.isascii() and query.isdigit() and len(query) <= MAX_EVENT_ID_DIGITS else None
    if phone is None and not record_ids and event_id is None:
        raise BadQuery(f"not a phone, an email, a CRM record id or an event id: {query[:80]!r}")
    return TraceQuery(text=query, phone=phone, record_ids=record_ids, event_id=event_id)


def _email(text: str) -> str:
    from syncd.consent_api import BadCheck, _email as checked_email

    try:
        return checked_email(text, "query")
    except BadCheck:
        raise BadQuery(f"not an email address: {text[:80]!r}") from None


def record_id_forms(text: str, id_patterns: Iterable[str] = ()) -> tuple[str, ...]:
    """The forms under which a CRM record id may be stored: as typed, each matching CRM's
    canonical form, and for Salesforce also the 15-char one. Empty when no rule accepts it."""
    forms: set[str] = set()
    for pattern in id_patterns:
        if re.fullmatch(pattern, text):
            forms.add(text)
    for plugin in CRM_PLUGINS.values():
        if not any(re.fullmatch(rule.pattern, text) for rule in plugin.id_rules):
            continue
        forms.add(text)
        canonical = plugin.normalise_id(text)
        if canonical:
            forms.add(canonical)
            if plugin.name == "salesforce":
                forms.add(canonical[:15])
    return tuple(sorted(forms))


class Tracer:
    """``syncd trace`` over a reports store: text in, the contract's document out."""

    def __init__(self, reports: Any, region: str = "US", id_patterns: Iterable[str] = (),
                 deadline: Deadline | None = None):
        self.reports = reports
        self.region = region
        self.id_patterns = tuple(id_patterns)
        self.deadline = deadline

    def parse(self, text: str) -> TraceQuery:
        return parse_query(text, self.region, self.id_patterns)

    def read(self, query: TraceQuery) -> dict[str, Any]:
        return self.reports.trace(query, self.deadline)

    def __call__(self, text: str) -> dict[str, Any]:
        return self.read(self.parse(text))


def tracer_for(cfg: Any, reports: Any) -> Tracer:
    """The tracer a config asks for (phone region, routing rules). ``deadline`` is the
    compliance clock's, where one is configured."""
    return Tracer(reports, cfg.phone.default_region, [r.pattern for r in cfg.routing.rules],
                  deadline=_compliance_deadline(cfg))


def _compliance_deadline(cfg: Any) -> Deadline | None:
    """The compliance clock's ``deadline(received_at)`` (config ``compliance.*``)."""
    from syncd.compliance import ComplianceClock

    return ComplianceClock.from_config(cfg).deadline


def found_anything(doc: dict[str, Any]) -> bool:
    return bool(doc["events"] or doc["consent"] or doc["reflections"])


# --- the terminal form -------------------------------------------------------------------
def _parse(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        from syncd.events import parse_iso

        return parse_iso(str(value))
    except ValueError:
        return None


def utc_text(value: Any) -> str:
    """``2024-02-18 09:45:22Z``; ``-`` when there is none."""
    dt = _parse(value)
    return dt.strftime("%Y-%m-%d %H:%M:%SZ") if dt else ("-" if not value else str(value))


def local_and_utc(value: Any) -> str:
    """``2024-02-18 04:45:22 EST (2024-02-18 09:45:22 UTC)``: the machine's local time first."""
    dt = _parse(value)
    if dt is None:
        return "-" if not value else str(value)
    local = dt.astimezone()
    return f"{local:%Y-%m-%d %H:%M:%S %Z} ({dt:%Y-%m-%d %H:%M:%S} UTC)"


def table(header: list[str], rows: list[list[Any]], indent: str = "  ") -> list[str]:
    """Left-aligned columns, as wide as their widest cell."""
    cells = [[("-" if v is None or v == "" else str(v)).replace("\n", " ") for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]

    def line(values: list[str]) -> str:
        return (indent + "  ".join(v.ljust(w) for v, w in zip(values, widths))).rstrip()
    return [line(header), *(line(r) for r in cells)]


def render_text(doc: dict[str, Any]) -> str:
    """The trace for a terminal: the consent table, a table per event with its targets,
    then the registrations in Sinch."""
    events, consent, reflections = doc["events"], doc["consent"], doc["reflections"]
    entries = "entry" if len(consent) == 1 else "entries"
    out = [f"trace {doc['query']}: {len(events)} event(s), {len(consent)} consent {entries},"
           f" {len(reflections)} registration(s) in Sinch", ""]
    out.append("Consent (ledger, per identity and channel)")
    if consent:
        out += table(["IDENTITY", "CHANNEL", "STATE", "SINCE (UTC)", "SOURCE"],
                     [[c["identity"], c["channel"], c["state"], utc_text(c["since"]), c["source"]] for c in consent])
    else:
        out.append("  none")
    for e in events:
        out += ["", f"Event {e['event_id']}  ({e.get('status') or '-'}"
                    f"{': ' + str(e['status_reason']) if e.get('status_reason') else ''})"]
        facts = [["source", e["source"]], ["kind", e["kind"]], ["channel", e["channel"]]]
        if e.get("raw_channel"):   # only where the source's value differed from the modelled one
            facts.append(["raw channel", e["raw_channel"]])
        facts += [["occurred", local_and_utc(e["occurred_at"])], ["received", local_and_utc(e["received_at"])],
                  ["deadline", local_and_utc(e["deadline"]) if e["deadline"] else "-"]]
        out += table(["", ""], facts)[1:]
        if e["targets"]:
            out += table(["CRM", "OBJECT", "RECORD", "STATE", "ATTEMPTS", "DONE (UTC)", "LAST ERROR"],
                         [[t["crm"], t["object"], t["record_id"], t["state"], t["attempts"],
                           utc_text(t["done_at"]) if t["done_at"] else "-", t["error"]] for t in e["targets"]])
        else:
            out.append("  no targets")
    out += ["", "Registrations in Sinch"]
    if reflections:
        out += table(["ID", "RECORD (crm:object:record)", "PHONE", "CHANNEL", "KIND", "STATE", "ATTEMPTS",
                      "DONE (UTC)", "LAST ERROR", "NOTIFICATIONS"],
                     [[r["id"], f"{r['crm']}:{r['object']}:{r['record_id']}", r["phone"], r["channel"], r["kind"],
                       r["state"], r["attempts"], utc_text(r["done_at"]) if r["done_at"] else "-", r["error"],
                       ", ".join(f"event {n['event_id']} {n['status']}" for n in r["notifications"])]
                      for r in reflections])
    else:
        out.append("  none")
    return "\n".join(out)
