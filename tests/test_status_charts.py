"""The status page's health rows and server-side SVG charts, from journal data."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone


from connectors.types import RecordRef
from syncd.events import ConsentEvent, iso
from syncd.journal.base import Outcome
from syncd.status_charts import events_per_hour_svg, health_rows, page_extras, time_to_honour_svg

NOW = datetime(2026, 12, 2, 14, 30, tzinfo=timezone.utc)


def test_events_per_hour_draws_one_bar_per_busy_hour_with_its_count():
    svg = str(events_per_hour_svg({"2026-12-02T14": 3, "2026-12-01T09": 1, "2026-11-20T10": 99}, NOW))
    titles = re.findall(r"<rect [^>]*><title>([^<]+)</title>", svg)
    assert titles == ["2026-12-01 09:00 UTC: 1 events", "2026-12-02 14:00 UTC: 3 events"]  # 11-20: too old
    assert "<script" not in svg and "href" not in svg


def test_time_to_honour_median_and_p95_per_crm_and_day():
    done = [("salesforce", "2026-12-02T10:00:00Z", f"2026-12-02T10:00:{s:02d}Z") for s in (1, 2, 3, 4, 50)]
    done.append(("hubspot", "2026-11-30T10:00:00Z", "2026-11-30T10:02:00Z"))
    svg = str(time_to_honour_svg(done, NOW))
    assert "salesforce 2026-12-02: median 3.0 s, p95 50 s, 5 deliveries" in svg
    assert "hubspot 2026-11-30: median 2 min, p95 2 min, 1 deliveries" in svg
    assert "No deliveries" in str(time_to_honour_svg([], NOW))


def test_health_rows_states_and_masking():
    report = {"salesforce": {"last_success": None, "last_error": "[503] down for +13305551234",
                             "last_error_at": 1764685800.0, "failing_since": 1764685800.0,
                             "consecutive_failures": 3, "paused_until": None},
              "hubspot": {"last_success": 1764685800.0, "paused_until": 1764689400.0}}
    rows = {r["crm"]: r for r in health_rows(report, {"close": {"last_push_at": "2026-12-02T14:00:00Z"}},
                                            {"salesforce": 1764685860.0})}
    assert rows["salesforce"]["state"] == "failing" and "3305551234" not in rows["salesforce"]["last_error"]
    assert rows["salesforce"]["failing_since"] == "2025-12-02 14:30:00Z"
    assert rows["salesforce"]["next_attempt"] == "2025-12-02 14:31:00Z"
    assert rows["hubspot"]["state"] == "paused" and rows["hubspot"]["paused_until"] == "2025-12-02 15:30:00Z"
    assert rows["close"]["state"] == "ok" and rows["close"]["last_success"] == "2026-12-02T14:00:00Z"


def test_page_stats_from_either_journal(journal):
    now = datetime.now(timezone.utc)
    ref = RecordRef("salesforce", "Contact", "003XX000004DHPYYA4")
    rec = journal.events.record(ConsentEvent(source="apten", source_event_id="e1", kind="opt_out", channel="sms",
                                             occurred_at=now, received_at=now, raw=b"{}", external_lead_id="003X"))
    journal.deliveries.add_targets(rec.event_id, [ref])
    d = journal.deliveries.claim(10, 60)[0]
    journal.deliveries.settle([Outcome(d.id, "done", ref=ref, note="applied")])
    stats = journal.reports.page_stats(iso(now - timedelta(days=7)))
    assert stats["per_hour"] == {now.strftime("%Y-%m-%dT%H"): 1}
    assert [crm for crm, _, _ in stats["done"]] == ["salesforce"] and stats["next_attempt"] == {}
    extras = page_extras(journal.reports, None, {})
    assert 'id="events-chart"' in extras["events_chart"] and 'id="honour-chart"' in extras["honour_chart"]
