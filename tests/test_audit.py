"""``syncd audit``: live CRM fields against the consent ledger, over real HTTP to the
simulators; repair through the pusher; batched reads (calls counted in the simulators)."""
from __future__ import annotations

import json
import math
import re
import time
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies

from connectors.types import RecordRef
from syncd.audit import Auditor, AuditSweep, matches
from syncd.events import ConsentEvent
from tests.support.stack import Stack, wait_for
from tests.conftest import fixture_bytes

CONTACT = "003XX000004DHPYYA4"   # the seed's externalLeadId 003XX000004DHPY, 18-char form


def audit_json(st: Stack, *args: str) -> tuple[int, dict]:
    run = st.syncd("audit", "--json", *args)
    assert run.stdout.count("\n") == 1, run.stdout + run.stderr   # exactly one document
    return run.returncode, json.loads(run.stdout)


@pytest.fixture
def served_sf():
    st = Stack().start()
    daemon = st.serve()
    yield st
    assert daemon.terminate() == 0
    st.cleanup()


def test_an_unticked_opt_out_is_reported_repaired_and_then_clean(served_sf):
    st = served_sf
    sf = st.sandboxes["salesforce"]
    assert st.post_apten(fixture_bytes("apten_optout_sms.json")).status_code == 200
    assert wait_for(lambda: sf.get_record("Contact", CONTACT)["SMS_Opt_Out__c"] is True)
    assert wait_for(lambda: json.loads(st.syncd("status", "--json").stdout)["deliveries"]["done"] == 1)

    code, clean = audit_json(st)
    assert (code, clean["checked"], clean["drift"]) == (0, 1, [])

    sf.set_field("Contact", CONTACT, "SMS_Opt_Out__c", False)      # a CRM user unticks it
    code, found = audit_json(st)
    assert code == 1
    assert found["drift"] == [{"crm": "salesforce", "object": "Contact", "record_id": CONTACT,
                               "field": "SMS_Opt_Out__c", "expected": True, "actual": False}]
    assert found["repaired"] == 0

    code, repaired = audit_json(st, "--repair")
    assert (code, repaired["repaired"], len(repaired["drift"])) == (0, 1, 1)
    assert wait_for(lambda: sf.get_record("Contact", CONTACT)["SMS_Opt_Out__c"] is True)  # the daemon's push
    assert sf.get_record("Contact", CONTACT)["DoNotCall"] is False          # other channels untouched
    assert wait_for(lambda: json.loads(st.syncd("status", "--json").stdout)["deliveries"]
                    == {"pending": 0, "retrying": 0, "done": 1, "dead": 0})

    code, again = audit_json(st)
    assert (code, again["drift"]) == (0, [])


def test_the_text_report_names_the_record_and_the_repair(served_sf):
    st = served_sf
    sf = st.sandboxes["salesforce"]
    assert st.post_apten(fixture_bytes("apten_optout_sms.json")).status_code == 200
    assert wait_for(lambda: json.loads(st.syncd("status", "--json").stdout)["deliveries"]["done"] == 1)
    sf.set_field("Contact", CONTACT, "SMS_Opt_Out__c", False)
    run = st.syncd("audit")
    assert run.returncode == 1
    assert f"salesforce Contact {CONTACT}  SMS_Opt_Out__c: expected True, found False" in run.stdout
    assert "\r" not in run.stderr and "record/s" not in run.stderr   # no progress bar off a terminal


def test_a_record_deleted_in_the_crm_is_reported_not_a_crash(served_sf):
    st = served_sf
    sf = st.sandboxes["salesforce"]
    assert st.post_apten(fixture_bytes("apten_optout_sms.json")).status_code == 200
    assert wait_for(lambda: json.loads(st.syncd("status", "--json").stdout)["deliveries"]["done"] == 1)
    sf.delete_record("Contact", CONTACT)
    code, doc = audit_json(st)
    assert code == 0 and doc["drift"] == [] and doc["checked"] == 0
    assert doc["missing"] == [{"crm": "salesforce", "object": "Contact", "record_id": CONTACT}]
    text = st.syncd("audit")
    assert f"gone   salesforce Contact {CONTACT}: the record is no longer in the CRM" in text.stdout


def test_audit_refuses_a_journal_that_does_not_exist(tmp_path):
    st = Stack().start()
    try:
        run = st.syncd("audit", "--json")
        assert run.returncode == 2 and "journal" in run.stderr.lower() and not run.stdout
        other = st.syncd("audit", "--crm", "close")
        assert other.returncode == 2 and "'close' is not an enabled CRM (enabled: salesforce)" in other.stderr
    finally:
        st.cleanup()


# --- batched reads, counted in the simulators -------------------------------------------

def opt_out(n: int, ext_id: str, channel: str = "sms") -> ConsentEvent:
    at = datetime(2024, 2, 18, tzinfo=timezone.utc) + timedelta(seconds=n)
    return ConsentEvent(source="apten", source_event_id=f"a{n}", kind="opt_out", channel=channel, occurred_at=at,
                        received_at=datetime.now(timezone.utc), raw=b"{}", external_lead_id=ext_id,
                        phone=f"+1330556{n:04d}")  # no seeded record has these (fan-out would reach it)


def written(rt, events: list[ConsentEvent], deliveries: int | None = None) -> None:
    for e in events:
        rt.journal.events.record(e)
    stats = rt.tick()
    assert stats.dead == 0 and stats.done == (len(events) if deliveries is None else deliveries)


def test_450_salesforce_records_read_in_three_queries_per_object(crm_stack, stack_runtime):
    sf = crm_stack.sandboxes["salesforce"]
    leads = [sf.add_record("Lead", None, LastName=f"L{i}", Company="C", SMS_Opt_Out__c=False) for i in range(450)]
    contacts = [sf.add_record("Contact", None, LastName=f"C{i}", SMS_Opt_Out__c=False) for i in range(450)]
    written(stack_runtime, [opt_out(n, rid) for n, rid in enumerate(leads + contacts)])
    sf.set_field("Lead", leads[7], "SMS_Opt_Out__c", False)
    sf.clear_log()
    auditor = Auditor(stack_runtime.journal, stack_runtime.connectors, stack_runtime.mappings)
    result = auditor.run("salesforce")
    queries = [r.query.get("q", [""])[0] for r in sf.requests_to(r"/query/?$", "GET")]
    per_object = {obj: sum(f" FROM {obj} WHERE Id IN (" in q for q in queries) for obj in ("Lead", "Contact")}
    assert per_object == {"Lead": math.ceil(450 / 200), "Contact": math.ceil(450 / 200)}
    assert len(sf.requests) == len(queries)         # nothing but the queries (and no describe)
    assert result.checked == 900
    assert [(d.record_id, d.field, d.actual) for d in result.drift] == [(leads[7], "SMS_Opt_Out__c", False)]


def test_250_hubspot_contacts_read_in_three_batch_reads(crm_stack, stack_runtime):
    hs = crm_stack.sandboxes["hubspot"]
    ids = [hs.add_contact(None, sms_opt_out="false") for _ in range(250)]
    written(stack_runtime, [opt_out(n, cid) for n, cid in enumerate(ids)])
    hs.set_property(ids[3], "sms_opt_out", "false")
    hs.clear_log()
    result = Auditor(stack_runtime.journal, stack_runtime.connectors, stack_runtime.mappings).run("hubspot")
    reads = hs.requests_to(r"/crm/v3/objects/contacts/batch/read$", "POST")
    assert sorted(len(r.json()["inputs"]) for r in reads) == [50, 100, 100]
    assert result.checked == 250
    assert [(d.record_id, d.field, d.expected, d.actual) for d in result.drift] == [(ids[3], "sms_opt_out",
                                                                                      True, False)]


def test_close_reads_each_record_with_fields_and_email_consent(crm_stack, stack_runtime):
    cl = crm_stack.sandboxes["close"]
    by_email = opt_out(2, "lead_abc123", "email")
    by_email.email = "sam.okafor@example.com"      # the ledger keeps email consent per address
    # the email opt-out also reaches the Close contact carrying the address (fan-out)
    written(stack_runtime, [opt_out(1, "lead_abc123", "call"), by_email], deliveries=3)
    assert "sam.okafor@example.com" in cl.unsubscribed
    auditor = Auditor(stack_runtime.journal, stack_runtime.connectors, stack_runtime.mappings)
    assert auditor.run("close").drift == []
    cl.clear_log()
    with cl.lock:                                               # a user takes the address off the list
        cl.unsubscribed.pop("sam.okafor@example.com")
        cl._flag_emails("sam.okafor@example.com", False)
    result = auditor.run("close", repair=True)
    gets = cl.requests_to(r"/lead/lead_abc123/$", "GET")
    assert len(gets) == 1 and "custom." in gets[0].query.get("_fields", [""])[0]
    # the lead and its contact both carry the address: both drifted, both repaired
    assert sorted((d.record_id, d.field, d.expected, d.actual) for d in result.drift) == [
        ("cont_abc123", "@unsubscribe", True, False), ("lead_abc123", "@unsubscribe", True, False)]
    assert result.repaired == 2
    stack_runtime.tick()
    assert "sam.okafor@example.com" in cl.unsubscribed
    assert auditor.run("close").drift == []


def test_a_newer_opt_in_expects_the_opt_in_value(crm_stack, stack_runtime):
    sf = crm_stack.sandboxes["salesforce"]
    rid = sf.add_record("Contact", None, LastName="In", SMS_Opt_Out__c=False)
    out = opt_out(1, rid)
    back_in = ConsentEvent(source="apten", source_event_id="in1", kind="opt_in", channel="sms",
                           occurred_at=out.occurred_at + timedelta(hours=1), received_at=datetime.now(timezone.utc),
                           raw=b"{}", external_lead_id=rid, phone=out.phone)
    written(stack_runtime, [out, back_in])
    assert sf.get_record("Contact", rid)["SMS_Opt_Out__c"] is False
    auditor = Auditor(stack_runtime.journal, stack_runtime.connectors, stack_runtime.mappings)
    assert auditor.run().drift == []
    sf.set_field("Contact", rid, "SMS_Opt_Out__c", True)
    assert [(d.field, d.expected, d.actual) for d in auditor.run().drift] == [("SMS_Opt_Out__c", False, True)]


def test_the_sweep_reports_only_and_sets_the_gauge(crm_stack, stack_runtime, caplog):
    sf = crm_stack.sandboxes["salesforce"]
    rid = sf.add_record("Contact", None, LastName="G", SMS_Opt_Out__c=False)
    written(stack_runtime, [opt_out(1, rid)])
    sf.set_field("Contact", rid, "SMS_Opt_Out__c", False)
    sweep = AuditSweep(Auditor(stack_runtime.journal, stack_runtime.connectors, stack_runtime.mappings),
                       stack_runtime.metrics)
    with caplog.at_level("WARNING", logger="syncd.audit"):
        result = sweep.run()
    assert result is not None and len(result.drift) == 1
    assert stack_runtime.journal.reports.counts()["deliveries"]["pending"] == 0     # nothing queued
    text = stack_runtime.metrics.render().decode()
    assert 'syncd_audit_drift{crm="salesforce"} 1.0' in text
    lines = [r for r in caplog.records if r.getMessage() == "consent drift in CRM"]
    assert len(lines) == 1 and lines[0].field == "SMS_Opt_Out__c"
    assert "+1330" not in caplog.text


@pytest.mark.parametrize("expected,actual,same", [
    (True, True, True), (True, False, False), (True, None, False), (False, None, True), (True, "true", True),
    (True, "partial", False), (False, "partial", False), (True, ["Yes"], True), ("Yes", "Yes", True)])
def test_matches(expected, actual, same):
    assert matches(expected, actual) is same


def test_read_leaves_out_ids_that_are_not_the_crms(crm_stack, stack_runtime):
    sf = crm_stack.sandboxes["salesforce"]
    sf.clear_log()
    bad = [RecordRef("salesforce", "Contact", "003' OR Id != '"), RecordRef("salesforce", "Lead", "x\n")]
    assert stack_runtime.connectors["salesforce"].read(bad, ["SMS_Opt_Out__c"]) == {}
    assert sf.requests == []
    cl = crm_stack.sandboxes["close"]
    cl.clear_log()
    assert stack_runtime.connectors["close"].read([RecordRef("close", "lead", "lead_../x")], ["Call Opt Out"]) == {}
    assert cl.requests == []


# --- the journal side, on every engine ----------------------------------------------------

def test_audit_targets_and_requeue_on_every_engine(journal):
    from syncd.journal.base import Outcome

    ref = RecordRef("salesforce", "Contact", CONTACT)
    other = RecordRef("hubspot", "contact", "51")
    rec = journal.events.record(opt_out(1, "003XX000004DHPY"))
    journal.deliveries.add_targets(rec.event_id, [ref, other])
    claimed = journal.deliveries.claim(10, 60)
    journal.deliveries.settle([Outcome(d.id, "done", ref=d.ref) for d in claimed if d.ref == ref])
    rows = journal.reports.audit_targets()
    assert [(r["crm"], r["record_id"], r["event_id"], r["kind"], r["channel"], r["phone"]) for r in rows] == [
        ("salesforce", CONTACT, rec.event_id, "opt_out", "sms", "+13305560001")]  # hubspot's is still pending
    assert journal.reports.audit_targets("hubspot") == []
    assert [r["crm"] for r in journal.reports.audit_targets("salesforce")] == ["salesforce"]

    journal.deliveries.add_targets(rec.event_id, [ref])          # add_targets leaves a done pair as it is
    assert journal.reports.counts()["deliveries"]["done"] == 1
    assert journal.deliveries.requeue([(rec.event_id, ref)]) == 1  # requeue puts it back
    again = [d for d in journal.deliveries.claim(10, 60) if d.ref == ref]
    assert [(d.event_id, d.attempts) for d in again] == [(rec.event_id, 1)]
    assert journal.reports.audit_targets("salesforce") == []       # in flight: not audited
    assert journal.deliveries.requeue([(rec.event_id, ref)]) == 0  # pending already: nothing to do
    fresh = journal.events.record(opt_out(2, "003XX000004DHPY"))
    assert journal.deliveries.requeue([(fresh.event_id, ref)]) == 1  # a pair never delivered: a new delivery


def test_only_the_leader_sweeps_on_postgresql():
    import os
    import time

    url = os.environ.get("SYNCD_TEST_PG_URL")
    if not url:
        pytest.skip("SYNCD_TEST_PG_URL not set")
    from syncd.journal import journal_on
    from syncd.journal.postgres import PostgresEngine

    schema = f"audit{os.getpid()}_{time.time_ns()}"
    first, second = (journal_on(PostgresEngine(url, schema=schema)) for _ in range(2))
    try:
        sweeps = [AuditSweep(Auditor(j, {}, {})) for j in (first, second)]
        assert sweeps[0].run() is not None
        assert sweeps[1].run() is None          # the other replica leads: report nothing, read nothing
        first.ops.resign("audit")
        assert sweeps[1].run() is not None
    finally:
        first.close()
        second.close()


def test_the_sweep_interval_defaults_to_a_day_and_zero_turns_it_off(tmp_path):
    from syncd.config import ConfigError, parse_config

    base = {"crm": {"close": {"api_key": "k" * 24}}}
    assert parse_config(base, base_dir=tmp_path, env={}).schedule.audit_interval_hours == 24
    off = parse_config({**base, "schedule": {"audit_interval_hours": 0}}, base_dir=tmp_path, env={})
    assert off.schedule.audit_interval_hours == 0
    with pytest.raises(ConfigError, match="audit_interval_hours"):
        parse_config({**base, "schedule": {"audit_interval_hours": -1}}, base_dir=tmp_path, env={})


def test_the_scheduler_can_hold_a_first_run_back():
    from syncd.scheduler import Scheduler

    sched = Scheduler()
    sched.every("audit", 3600, lambda: None, first_after=3600)
    job = sched._sched.get_job("audit")
    assert job.next_run_time.timestamp() - time.time() > 3500


def test_read_leaves_out_records_the_crm_no_longer_has(crm_stack, stack_runtime):
    hs_conn, cl_conn = stack_runtime.connectors["hubspot"], stack_runtime.connectors["close"]
    known, gone = RecordRef("hubspot", "contact", "51"), RecordRef("hubspot", "contact", "99999")
    assert hs_conn.read([known, gone], ["sms_opt_out"]) == {known: {"sms_opt_out": False}}
    lead, no_lead = RecordRef("close", "lead", "lead_abc123"), RecordRef("close", "lead", "lead_gone1")
    got = cl_conn.read([lead, no_lead], ["SMS Opt Out", "@unsubscribe"])
    assert list(got) == [lead] and got[lead] == {"SMS Opt Out": False, "@unsubscribe": False}
    sf_conn = stack_runtime.connectors["salesforce"]
    there = RecordRef("salesforce", "Contact", CONTACT)
    missing = RecordRef("salesforce", "Contact", "003XX000009ZZZZ")   # valid, not in the org
    crm_stack.sandboxes["salesforce"].clear_log()
    assert sf_conn.read([there, missing], ["SMS_Opt_Out__c", "DoNotCall"]) == {
        there: {"SMS_Opt_Out__c": False, "DoNotCall": False}}


@settings(max_examples=50, deadline=None)
@given(n=strategies.integers(0, 1200), fields=strategies.lists(strategies.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,60}", fullmatch=True),
                                               max_size=400))
def test_audit_soql_covers_every_id_once_within_salesforces_limits(n, fields):
    from connectors.salesforce import READ_IDS, SOQL_MAX_CHARS, SalesforceConnector, to_18

    ids = [to_18(f"003XX{i:010d}") for i in range(n)]
    statements = list(SalesforceConnector._read_queries("Contact", ["Id", *fields], ids))
    seen = [i for soql in statements for i in re.findall(r"'([A-Za-z0-9]{18})'", soql)]
    assert seen == ids
    assert all(len(soql) <= SOQL_MAX_CHARS and soql.count("'") <= 2 * READ_IDS for soql in statements)
    if len(", ".join(["Id", *fields])) < 50_000:
        assert len(statements) == math.ceil(n / READ_IDS)


def test_the_running_daemon_sweeps_on_schedule_and_only_reports():
    import requests

    st = Stack(extra_config={"schedule": {"audit_interval_hours": 0.001}}).start()   # every 3.6 s
    daemon = st.serve()
    try:
        sf = st.sandboxes["salesforce"]
        assert st.post_apten(fixture_bytes("apten_optout_sms.json")).status_code == 200
        assert wait_for(lambda: json.loads(st.syncd("status", "--json").stdout)["deliveries"]["done"] == 1)
        sf.set_field("Contact", CONTACT, "SMS_Opt_Out__c", False)

        def drift_lines():
            return [r for r in daemon.log_lines() if r.get("msg") == "consent drift in CRM"]
        assert wait_for(lambda: drift_lines(), timeout=30, interval=0.5)
        line = drift_lines()[0]
        assert (line["crm"], line["object"], line["field"], line["expected"], line["actual"]) == (
            "salesforce", "Contact", "SMS_Opt_Out__c", "True", "False")
        assert "3305551234" not in daemon.log()
        metrics = requests.get(f"{st.admin_url}/metrics", timeout=10).text
        assert 'syncd_audit_drift{crm="salesforce"} 1.0' in metrics
        assert sf.get_record("Contact", CONTACT)["SMS_Opt_Out__c"] is False     # report only: nothing repaired
        assert json.loads(st.syncd("status", "--json").stdout)["deliveries"]["pending"] == 0
    finally:
        assert daemon.terminate() == 0
        st.cleanup()


def test_a_progress_bar_on_a_terminal_only(served_sf):
    import os
    import subprocess
    import sys

    from syncd.config import DEMO_ENV

    st = served_sf
    assert st.post_apten(fixture_bytes("apten_optout_sms.json")).status_code == 200
    assert wait_for(lambda: json.loads(st.syncd("status", "--json").stdout)["deliveries"]["done"] == 1)

    def audit_on(*args: str, terminal: bool) -> str:
        main, side = os.openpty() if terminal else (None, subprocess.PIPE)
        try:
            run = subprocess.run([sys.executable, "-m", "syncd.cli", "-c", str(st.config_path), "audit", *args],
                                 stdout=side, stderr=subprocess.PIPE, text=True, timeout=60, cwd=st.workdir,
                                 env={**os.environ, DEMO_ENV: "1"})
        finally:
            if terminal:
                os.close(side)
                os.close(main)
        assert run.returncode == 0, run.stderr
        return run.stderr

    assert "record" in audit_on(terminal=True)                   # tqdm's bar: "audit: 100%|...| 1/1 [..record/s]"
    assert "record" not in audit_on(terminal=False)
    assert "record" not in audit_on("--json", terminal=True)
