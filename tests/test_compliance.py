"""The compliance clock: deadlines in business days (weekends, public holidays, the
configured time zone), which opt-outs are open, at risk or breached, and where an
operator sees it (status, export, metrics, the status page, the at-risk alert)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import requests
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.types import RecordRef
from syncd.cli import cli
from syncd.compliance import ComplianceCheck, ComplianceClock, ComplianceReads, watch_metrics
from syncd.config import ConfigError, parse_config
from syncd.events import ConsentEvent
from syncd.journal.base import Outcome, ReflectionCandidate, ReflectionOutcome
from syncd.metrics import Metrics

NY = ZoneInfo("America/New_York")
UTC = timezone.utc
SF = RecordRef("salesforce", "Contact", "003XX000004DHPYYA4")
HS = RecordRef("hubspot", "contacts", "51")


def at(y, mo, d, h=12, mi=0, tz=NY) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=tz)


def end_of(y, mo, d, tz=NY) -> datetime:
    """The last microsecond of a local day, in UTC."""
    return datetime(y, mo, d, 23, 59, 59, 999999, tzinfo=tz).astimezone(UTC)


# --- the calendar ------------------------------------------------------------------------
def test_a_deadline_skips_the_weekend():
    one = ComplianceClock(business_days=1)
    assert one.deadline(at(2026, 12, 4, 10)) == end_of(2026, 12, 7)      # Friday -> end of Monday
    assert one.deadline(at(2026, 12, 5, 10)) == end_of(2026, 12, 7)      # Saturday -> end of Monday
    ten = ComplianceClock()
    assert ten.deadline(at(2026, 12, 4, 10)) == end_of(2026, 12, 18)     # two full weeks


def test_a_deadline_skips_a_us_federal_holiday():
    """Received the Wednesday before Thanksgiving (2026-11-26): Thursday does not count,
    Friday does (not a federal holiday), so day 10 is Thursday 2026-12-10."""
    received = at(2026, 11, 25, 9)
    assert ComplianceClock(holidays="US").deadline(received) == end_of(2026, 12, 10)
    assert ComplianceClock(holidays=None).deadline(received) == end_of(2026, 12, 9)
    assert ComplianceClock(holidays="US").deadline(received).isoformat() == "2026-12-11T04:59:59.999999+00:00"


def test_a_subdivision_has_its_own_holidays():
    # California also keeps the day after Thanksgiving and Cesar Chavez Day (2026-03-31).
    assert ComplianceClock(holidays="US-CA").deadline(at(2026, 11, 25, 9)) == end_of(2026, 12, 11)
    assert ComplianceClock(business_days=1, holidays="US").deadline(at(2026, 3, 30)) == end_of(2026, 3, 31)
    assert ComplianceClock(business_days=1, holidays="US-CA").deadline(at(2026, 3, 30)) == end_of(2026, 4, 1)
    # Bavaria keeps Epiphany (2026-01-06, a Tuesday); Germany as a whole does not.
    berlin = ZoneInfo("Europe/Berlin")
    monday = at(2026, 1, 5, 10, tz=berlin)
    de = ComplianceClock(business_days=1, holidays="DE", tz="Europe/Berlin")
    by = ComplianceClock(business_days=1, holidays="DE-BY", tz="Europe/Berlin")
    assert de.deadline(monday) == end_of(2026, 1, 6, tz=berlin)
    assert by.deadline(monday) == end_of(2026, 1, 7, tz=berlin)


def test_days_are_counted_in_the_configured_time_zone_not_utc():
    """23:30 in New York is already the next day in UTC."""
    friday_night = at(2026, 12, 4, 23, 30)                  # = 2026-12-05T04:30Z, a Saturday in UTC
    assert friday_night.astimezone(UTC).date().isoformat() == "2026-12-05"
    ny, utc = ComplianceClock(), ComplianceClock(tz="UTC")
    assert ny.deadline(friday_night) == end_of(2026, 12, 18)                     # 2026-12-19T04:59:59Z
    assert utc.deadline(friday_night) == end_of(2026, 12, 18, tz=UTC)            # 2026-12-18T23:59:59Z
    thursday_night = at(2026, 12, 3, 23, 30)                # Friday in UTC: a whole business day apart
    assert ny.deadline(thursday_night) == end_of(2026, 12, 17)
    assert utc.deadline(thursday_night) == end_of(2026, 12, 18, tz=UTC)
    # A naive time is UTC, as the journal stores it.
    assert ny.deadline(datetime(2026, 12, 5, 4, 30)) == end_of(2026, 12, 18)


@settings(max_examples=300, deadline=None)
@given(received=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2027, 12, 31)),
       later=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=40)),
       days=st.integers(1, 15), warn=st.integers(0, 15),
       zone=st.sampled_from(["America/New_York", "UTC", "Europe/Berlin", "Pacific/Auckland"]))
def test_the_received_at_cutoffs_classify_as_each_deadline_does(received, later, days, warn, zone):
    """status counts by comparing received_at with two cut-offs; that must agree with
    each event's own deadline and warning time, and the deadline is a business day."""
    warn = min(warn, days)
    clock = ComplianceClock(business_days=days, warn_business_days=warn, tz=zone)
    received = received.replace(tzinfo=UTC)
    now = received + later
    cut = clock.cutoffs(now)
    assert (received < cut.breach_before) == (now > clock.deadline(received))
    assert (received < cut.risk_before) == (now > clock.warn_at(received))
    last_day = clock.deadline(received).astimezone(ZoneInfo(zone)).date()
    assert clock.is_business_day(last_day) and last_day > received.astimezone(ZoneInfo(zone)).date()
    assert clock.warn_at(received) <= clock.deadline(received)


# --- config ------------------------------------------------------------------------------
def test_compliance_config_defaults_and_keys():
    c = parse_config({}, env={}).compliance
    assert (c.business_days, c.holidays, c.timezone, c.warn_business_days) == (10, "US", "America/New_York", 2)
    c = parse_config({"compliance": {"business_days": 5, "holidays": "us-ca", "timezone": "Europe/Berlin",
                                     "warn_business_days": 1}}, env={}).compliance
    assert (c.business_days, c.holidays, c.timezone, c.warn_business_days) == (5, "US-CA", "Europe/Berlin", 1)
    assert ComplianceClock.from_config(parse_config({"compliance": {"holidays": None}}, env={})).deadline(
        at(2026, 11, 25)) == end_of(2026, 12, 9)


@pytest.mark.parametrize("block,message", [
    ({"holidays": "XX"}, "compliance.holidays: unknown country 'XX'"),
    ({"holidays": "US-ZZ"}, "compliance.holidays: US has no subdivision 'ZZ'"),
    ({"timezone": "America/Nowhere"}, "compliance.timezone: unknown time zone 'America/Nowhere'"),
    ({"timezone": "../etc/passwd"}, "compliance.timezone: unknown time zone"),
    ({"business_days": 0}, "compliance.business_days: Input should be greater than or equal to 1"),
    ({"warn_business_days": 11}, "compliance: warn_business_days (11) must not exceed business_days (10)"),
    ({"buisness_days": 10}, "compliance.buisness_days: unknown key (did you mean business_days?)"),
])
def test_compliance_config_errors_name_the_key(block, message):
    with pytest.raises(ConfigError) as exc:
        parse_config({"compliance": block}, env={})
    assert message in str(exc.value)


# --- the journal: which opt-outs are open, at risk, breached -----------------------------
def opt_out(n: int, received: datetime, **kw) -> ConsentEvent:
    base = dict(source="apten", source_event_id=f"c-{n}", kind="opt_out", channel="sms",
                occurred_at=received - timedelta(seconds=5), received_at=received, raw=b"{}",
                external_lead_id="003XX000004DHPY", phone="+13305551234")
    return ConsentEvent(**{**base, **kw})


class FakeNow:
    def __init__(self, now: datetime):
        self.value = now

    def __call__(self) -> datetime:
        return self.value


class AlertBook:
    """Stands in for syncd.alerts.Alerts: records the at-risk calls."""

    def __init__(self):
        self.calls: list[tuple[int, str, list[str]]] = []
        self.notes: list[str] = []

    def opt_out_at_risk(self, event_id: int, deadline: str, pending: list[str]) -> bool:
        self.calls.append((event_id, deadline, pending))
        return True

    def notify(self, cause: str, kind: str, text: str, fields: dict) -> bool:
        self.notes.append(text)
        return True


def summary(clock, journal) -> dict:
    s = clock.summary(journal.compliance)
    return {k: s[k] for k in ("open", "at_risk", "breached", "breached_total")}


def test_a_dead_letter_turns_at_risk_then_breached_and_is_honoured_after_replay(journal):
    # The journal stamps honoured_at with the real time: the story is set in the past, so
    # the late honour is late whatever day the test runs.
    received = at(2025, 11, 26, 9)      # Wednesday before Thanksgiving; deadline: end of Thursday 2025-12-11
    now = FakeNow(received + timedelta(hours=1))
    clock = ComplianceClock(now=now)
    alerts = AlertBook()
    check = ComplianceCheck(clock, journal.compliance, ops=journal.ops, alerts=alerts)
    eid = journal.events.record(opt_out(1, received)).event_id
    journal.deliveries.add_targets(eid, [SF, HS])
    claimed = {d.ref: d for d in journal.deliveries.claim(10, 60)}
    journal.deliveries.settle([Outcome(claimed[SF].id, "done", ref=SF),
                               Outcome(claimed[HS].id, "dead", error="[400] nope", ref=HS)])

    assert summary(clock, journal) == {"open": 1, "at_risk": 0, "breached": 0, "breached_total": 0}
    assert check.run_once() == {"honoured": 0, "breached": 0, "alerted": 0}

    now.value = at(2025, 12, 9, 23, 59)                     # business day 8 not over yet: 3 days left
    assert summary(clock, journal)["at_risk"] == 0
    now.value = at(2025, 12, 10, 0, 1)                       # two business days left: at risk, before the deadline
    assert summary(clock, journal) == {"open": 1, "at_risk": 1, "breached": 0, "breached_total": 0}
    assert check.run_once()["alerted"] == 1
    assert alerts.calls == [(eid, "2025-12-12T04:59:59.999999Z", ["hubspot:contacts (dead)"])]
    (risky,) = clock.at_risk(journal.compliance)
    assert (risky["event_id"], risky["deadline"]) == (eid, "2025-12-12T04:59:59.999999Z")
    now.value = at(2025, 12, 11, 15)
    assert check.run_once()["alerted"] == 0                 # once per event, not once per check
    assert len(alerts.calls) == 1

    now.value = at(2025, 12, 12, 0, 1)                      # the deadline passed
    assert summary(clock, journal) == {"open": 1, "at_risk": 0, "breached": 1, "breached_total": 0}
    assert check.run_once()["breached"] == 1
    assert check.run_once()["breached"] == 0                # stamped once
    assert summary(clock, journal)["breached_total"] == 1

    assert journal.replay([f"d{claimed[HS].id}"]) == 1
    (again,) = journal.deliveries.claim(10, 60)
    journal.deliveries.settle([Outcome(again.id, "done", ref=HS)])
    assert summary(clock, journal) == {"open": 0, "at_risk": 0, "breached": 0, "breached_total": 1}
    (row, _) = [r for r in journal.reports.export_rows(None) if r["event_id"] == eid]
    assert row["honoured_at"] is not None
    assert clock.export_columns(row)["within_deadline"] is False   # honoured, but late


def test_many_opt_outs_turning_at_risk_at_once_send_a_bounded_number_of_messages(tmp_path):
    from syncd.compliance import MAX_ALERTS_PER_CHECK
    from syncd.journal import open_journal

    j = open_journal(f"sqlite:///{tmp_path}/many.db")
    try:
        for n in range(MAX_ALERTS_PER_CHECK + 5):
            j.events.record(opt_out(n, at(2025, 11, 26, 9) + timedelta(seconds=n), quarantine_reason="none"))
        alerts = AlertBook()
        check = ComplianceCheck(ComplianceClock(now=FakeNow(at(2025, 12, 10, 0, 1))), j.compliance, alerts=alerts)
        assert check.run_once()["alerted"] == MAX_ALERTS_PER_CHECK + 5
        assert len(alerts.calls) == MAX_ALERTS_PER_CHECK
        assert alerts.notes == ["syncd: 5 more opt-outs turned at risk (deadlines from 2025-12-12T04:59:59.999999Z); "
                                "see syncd status and the status page"]
        assert check.run_once()["alerted"] == 0 and len(alerts.calls) == MAX_ALERTS_PER_CHECK
    finally:
        j.close()


def test_which_events_count(journal):
    received = at(2026, 11, 2, 9)
    now = FakeNow(at(2026, 11, 3, 9))
    clock = ComplianceClock(now=now)
    quarantined = journal.events.record(opt_out(1, received, quarantine_reason="no record")).event_id
    journal.events.record(opt_out(2, received, kind="opt_in"))
    ignored = journal.events.record(opt_out(3, received, channel=None)).event_id
    journal.events.ignore(ignored, "channel manual is not modelled")
    unrouted = journal.events.record(opt_out(4, received, kind="do_not_contact")).event_id
    reconciled = journal.events.record(opt_out(5, received, source="sinch")).event_id
    journal.events.reconciled(reconciled, "reflection r1: OPT_OUT_SUCCEEDED")
    assert summary(clock, journal)["open"] == 2               # the quarantined and the unrouted opt-out
    assert {r["event_id"] for r in clock.at_risk(journal.compliance, now=at(2026, 11, 16, 1))} == {
        quarantined, unrouted}
    # An opt-in's delivery being done honours nothing; an opt-out's does.
    journal.deliveries.add_targets(unrouted, [SF])
    (d,) = journal.deliveries.claim(10, 60)
    journal.deliveries.settle([Outcome(d.id, "done", ref=SF)])
    assert summary(clock, journal)["open"] == 1


def test_an_opt_out_delivered_while_a_lookup_was_owed_is_honoured_when_routing_ends(journal):
    # Fan-out delivers the named record at once and keeps the event waiting for a lookup
    # that failed; when routing ends with every target already done, the opt-out is honoured.
    clock = ComplianceClock(now=FakeNow(at(2026, 11, 3, 9)))
    eid = journal.events.record(opt_out(1, at(2026, 11, 2, 9))).event_id
    journal.deliveries.add_targets_many([(eid, [SF])], still_routing={eid})
    (d,) = journal.deliveries.claim(10, 60)
    journal.deliveries.settle([Outcome(d.id, "done", ref=SF)])
    assert summary(clock, journal)["open"] == 1              # a lookup is still owed
    journal.deliveries.add_targets_many([(eid, [])], notes={eid: "phone lookup in hubspot failed"})
    assert summary(clock, journal)["open"] == 0
    (row,) = [r for r in journal.reports.export_rows(None) if r["event_id"] == eid]
    assert row["honoured_at"] is not None


def test_a_crm_flag_counts_only_with_sinch_and_is_honoured_when_sinch_confirms(journal):
    from syncd.reflector import crm_flag_event

    received = at(2026, 11, 2, 9)
    flag = crm_flag_event("salesforce", "Contact", SF.record_id, "+13305551234", "sms", received, "m1")
    flag.received_at = received
    eid = journal.events.record(flag).event_id
    now = FakeNow(at(2026, 11, 3, 9))
    without_sinch = ComplianceClock(now=now)
    with_sinch = ComplianceClock(now=now, count_crm_flags=True)
    assert summary(without_sinch, journal)["open"] == 0
    assert summary(with_sinch, journal)["open"] == 1
    check = ComplianceCheck(with_sinch, journal.compliance, sinch_channels=["WHATSAPP", "RCS"])

    journal.reflections.add([ReflectionCandidate(SF, "+13305551234", "opt_out")], ["WHATSAPP", "RCS"])
    regs = journal.reflections.claim(10, 60)
    journal.reflections.settle([ReflectionOutcome(r.id, "registered", at=4e9) for r in regs])
    assert check.run_once()["honoured"] == 0                 # registered, not yet confirmed
    whatsapp = next(r for r in regs if r.channel == "WHATSAPP")
    notice = journal.events.record(opt_out(9, received, source="sinch", event_type="reflection_result")).event_id
    journal.reflections.apply_notification(notice, ReflectionOutcome(whatsapp.id, "done"), "ok")
    assert check.run_once()["honoured"] == 0                 # RCS still open
    rcs = next(r for r in regs if r.channel == "RCS")
    journal.reflections.apply_notification(notice, ReflectionOutcome(rcs.id, "done"), "ok")
    assert check.run_once()["honoured"] == 1
    assert summary(with_sinch, journal)["open"] == 0
    with journal.engine.read() as tx:
        tx.cur.execute(f"SELECT honoured_at FROM events WHERE id = {int(eid)}")
        (honoured_at,) = tx.cur.fetchone()
    assert honoured_at >= "2026-11-02T14:00:00"     # Sinch's confirmation, never before the flag arrived


def test_open_counts_read_only_open_opt_outs_through_the_index(tmp_path):
    """The counts use the partial index of open opt-outs (never a scan of every event)."""
    from syncd.journal import open_journal

    j = open_journal(f"sqlite:///{tmp_path}/plan.db")
    try:
        with j.engine.read() as tx:
            sql, args = tx.queries["compliance_counts"].render(
                {"breach_before": "a", "risk_before": "b", "flags": 1})
            plan = " ".join(str(r[-1]) for r in tx.cur.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall())
    finally:
        j.close()
    assert "events_compliance_open" in plan, plan


# --- surfaces ----------------------------------------------------------------------------
def _config(tmp_path: Path, extra: str = "") -> Path:
    from tests.support.stack import default_mapping_text

    (tmp_path / "hs.yaml").write_text(default_mapping_text("hubspot"))
    path = tmp_path / "config.yaml"
    path.write_text("journal: {url: \"sqlite:///j.db\"}\nsources:\n  apten: {secret: abcdefghij0123456789abcdef}\n"
                    "crm:\n  hubspot: {base_url: \"http://127.0.0.1:1\", access_token: tok, mapping: hs.yaml}\n"
                    + extra)
    return path


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_status_json_has_the_compliance_object(tmp_path):
    from syncd.journal import open_journal

    path = _config(tmp_path)
    j = open_journal(f"sqlite:///{tmp_path}/j.db")
    j.events.record(opt_out(1, datetime(2024, 2, 16, 15, tzinfo=UTC)))      # long past its deadline
    j.events.record(opt_out(2, datetime.now(UTC), quarantine_reason="no record"))
    j.close()
    status = json.loads(_run("-c", str(path), "status", "--json").stdout)
    c = status["compliance"]
    assert set(c) == {"open", "at_risk", "breached", "oldest_open_age_seconds"}
    assert (c["open"], c["at_risk"], c["breached"]) == (2, 0, 1)
    assert c["oldest_open_age_seconds"] > 86400 * 365
    text = _run("-c", str(path), "status").stdout
    assert "compliance   open opt-outs 2  at risk 0  breached 1" in text


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_export_rows_carry_the_clock_columns(tmp_path, fmt):
    """Received Friday 2024-02-16 with one business day: the weekend and Presidents' Day
    (Monday 2024-02-19) are skipped, so the deadline is the end of Tuesday in New York."""
    import csv
    import io

    from syncd.journal import open_journal

    path = _config(tmp_path, "compliance: {business_days: 1, warn_business_days: 1}\n")
    j = open_journal(f"sqlite:///{tmp_path}/j.db")
    done = j.events.record(opt_out(1, datetime(2024, 2, 16, 15, tzinfo=UTC))).event_id
    j.events.record(opt_out(2, datetime(2024, 2, 16, 16, tzinfo=UTC)))
    j.events.record(opt_out(3, datetime(2024, 2, 16, 17, tzinfo=UTC), kind="opt_in"))
    j.deliveries.add_targets(done, [HS])
    (d,) = j.deliveries.claim(10, 60)
    j.deliveries.settle([Outcome(d.id, "done", ref=HS)])
    j.close()
    out = _run("-c", str(path), "export", "--format", fmt).stdout
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert {"deadline", "honoured_at", "within_deadline"} <= set(rows[0])
    elif fmt == "jsonl":
        rows = [json.loads(line) for line in out.splitlines()]
    else:
        rows = json.loads(out)
    by_event = {str(r["event_id"]): r for r in rows}
    honoured, open_, opt_in = by_event[str(done)], by_event[str(done + 1)], by_event[str(done + 2)]
    assert honoured["deadline"] == open_["deadline"] == "2024-02-21T04:59:59.999999Z"
    assert honoured["honoured_at"] and not open_["honoured_at"]
    late = "false" if fmt == "csv" else False
    assert honoured["within_deadline"] == late and open_["within_deadline"] == late
    assert not opt_in["deadline"] and not opt_in["within_deadline"]


def test_metrics_show_the_clock(journal):
    now = FakeNow(at(2026, 12, 9, 0, 1))
    clock = ComplianceClock(now=now)
    journal.events.record(opt_out(1, at(2026, 11, 25, 9)))                  # at risk
    journal.events.record(opt_out(2, at(2026, 11, 2, 9)))                   # breached
    ComplianceCheck(clock, journal.compliance).run_once()
    metrics = Metrics()
    watch_metrics(metrics, clock, journal.compliance, max_age_seconds=0)
    text = metrics.render().decode()
    assert "syncd_compliance_open 2.0" in text
    assert "syncd_compliance_at_risk 1.0" in text
    assert "syncd_compliance_breached_total 1.0" in text
    assert "# TYPE syncd_opt_out_honour_seconds histogram" in text


def test_honour_time_is_observed_per_crm_when_a_target_is_done(runtime, sf_sandbox):
    received = datetime.now(UTC) - timedelta(hours=2)
    runtime.journal.events.record(opt_out(1, received, external_lead_id=SF.record_id))
    runtime.tick()
    text = runtime.metrics.render().decode()
    assert 'syncd_opt_out_honour_seconds_count{crm="salesforce"} 1.0' in text
    assert 'syncd_opt_out_honour_seconds_bucket{crm="salesforce",le="3600.0"} 0.0' in text
    assert 'syncd_opt_out_honour_seconds_bucket{crm="salesforce",le="14400.0"} 1.0' in text
    clock = ComplianceClock.from_config(runtime.cfg)
    assert clock.summary(runtime.journal.compliance)["open"] == 0


def test_serve_wires_the_clock_into_metrics_and_the_check(runtime):
    from syncd.daemon import Daemon

    assert runtime.compliance is not None and runtime.compliance.clock.business_days == 10
    runtime.cfg.receiver.port = 0
    runtime.cfg.admin.port = 0
    daemon = Daemon(runtime.cfg, runtime)
    try:
        text = daemon.admin_app.test_client().get("/metrics").get_data(as_text=True)
        assert "syncd_compliance_open 0.0" in text and "syncd_compliance_breached_total 0.0" in text
        assert "compliance" in [job.id for job in daemon.scheduler._sched.get_jobs()]
    finally:
        daemon.server.close()
        daemon.admin_server.close()


def status_page_with_clock(tmp_path: Path, clock: ComplianceClock):
    """The admin app over real HTTP, the compliance panel wired as ``syncd serve`` does."""
    from syncd.admin import Readiness, create_admin_app
    from syncd.journal import open_journal
    from syncd.status_page import COMPLIANCE_KEY
    from tests.conftest import LiveReceiver
    from tests.test_status_page import TOKEN

    journal = open_journal(f"sqlite:///{tmp_path}/status.db")
    app = create_admin_app(journal.reports, Metrics(), Readiness(journal.ops), status_token=TOKEN)
    app.config[COMPLIANCE_KEY] = ComplianceReads(clock, journal.compliance, max_age=0)
    live = LiveReceiver(app)
    live.journal = journal
    return live


def test_the_status_page_has_a_compliance_panel(tmp_path):
    from tests.test_status_page import BEARER, rows

    clock = ComplianceClock(now=FakeNow(at(2026, 12, 9, 0, 1)))
    live = status_page_with_clock(tmp_path, clock)
    try:
        j = live.journal
        risky = j.events.record(opt_out(1, at(2026, 11, 25, 9), email="dana.reyes@example.com")).event_id
        j.deliveries.add_targets(risky, [HS])
        (d,) = j.deliveries.claim(10, 60)
        j.deliveries.settle([Outcome(d.id, "dead", error="[400] nope", ref=HS)])
        j.events.record(opt_out(2, at(2026, 11, 2, 9)))                     # breached
        j.events.record(opt_out(3, at(2026, 12, 8, 9)))                     # open, plenty of time
        html = requests.get(f"{live.url}/status", headers=BEARER, timeout=5).text
    finally:
        live.close()
        live.journal.close()
    assert 'data-count="compliance-open">3<' in html
    assert 'data-count="compliance-at-risk">1<' in html
    assert 'data-count="compliance-breached">1<' in html
    (row,) = rows(html, "at-risk-row")
    assert row["attrs"]["data-event"] == str(risky)
    assert "2026-12-11 04:59:59Z" in row["cells"] and "hubspot:contacts (dead)" in row["cells"]
    for personal in ("+13305551234", "3305551234", "dana.reyes", "example.com"):
        assert personal not in html


def test_the_status_page_has_no_panel_without_the_clock(tmp_path):
    from tests.test_status_page import BEARER, TOKEN, make_receiver

    live = make_receiver(tmp_path, TOKEN)
    try:
        html = requests.get(f"{live.url}/status", headers=BEARER, timeout=5).text
    finally:
        live.close()
        live.journal.close()
    assert "<h1>syncd status</h1>" in html and 'id="compliance"' not in html


def test_the_at_risk_alert_reaches_a_slack_compatible_sink_once(tmp_path):
    """The real Alerts client posting to a local incoming-webhook sink over HTTP."""
    from syncd.alerts import Alerts
    from syncd.journal import open_journal
    from tests.test_alerts import Sink

    sink = Sink()
    alerts = Alerts(sink.url, cooldown_seconds=0)     # no cooldown: the check itself says "once"
    j = open_journal(f"sqlite:///{tmp_path}/alert.db")
    try:
        eid = j.events.record(opt_out(1, at(2025, 11, 26, 9), email="jane.doe@example.com")).event_id
        j.deliveries.add_targets(eid, [HS])
        now = FakeNow(at(2025, 12, 10, 0, 1))
        check = ComplianceCheck(ComplianceClock(now=now), j.compliance, ops=j.ops, alerts=alerts)
        check.run_once()
        now.value += timedelta(hours=3)
        check.run_once()
        assert alerts.flush(10)
    finally:
        j.close()
        alerts.close()
        sink.close()
    (body,) = sink.bodies
    assert body["syncd"] == {"kind": "at_risk", "event": str(eid), "deadline": "2025-12-12T04:59:59.999999Z",
                             "pending": "hubspot:contacts (pending)"}
    assert body["text"] == (f"syncd: opt-out event {eid} is at risk: not honoured everywhere, "
                            "deadline 2025-12-12T04:59:59.999999Z")
    assert "3305551234" not in json.dumps(body) and "jane.doe" not in json.dumps(body)
