"""``syncd trace QUERY``: the journal's trace read (on every engine), the query parser,
the command line (``--json`` in the contract's shape, the terminal tables, exit codes),
and end to end against a real ``syncd serve`` and the Salesforce simulator."""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import phonenumbers
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.types import RecordRef
from syncd.cli import cli
from syncd.events import ConsentEvent
from syncd.journal import open_journal
from syncd.journal.base import Outcome, ReflectionCandidate, ReflectionOutcome, TraceQuery
from syncd.trace import BadQuery, parse_query, record_id_forms
from tests.conftest import fixture_bytes

PHONE = "+13305551234"
CONTACT = "003XX000004DHPYYA4"      # 18 chars; the Apten seed names it as 003XX000004DHPY
HUBSPOT_ID = "4242"
TOP_KEYS = {"query", "consent", "events", "reflections"}
CONSENT_KEYS = {"identity", "channel", "state", "since", "source"}
EVENT_KEYS = {"event_id", "source", "kind", "channel", "occurred_at", "received_at", "deadline", "targets"}
EVENT_EXTRAS = {"raw_channel", "status", "status_reason"}   # documented in the README
TARGET_KEYS = {"crm", "object", "record_id", "state", "attempts", "done_at", "error"}


def consent_event(n: int, **kw) -> ConsentEvent:
    base = dict(source="apten", source_event_id=f"ev-{n}", kind="opt_out", channel="sms",
                occurred_at=datetime(2024, 2, 18, 9, 45, n, tzinfo=timezone.utc),
                received_at=datetime(2026, 12, 2, 15, 0, n, tzinfo=timezone.utc), raw=b"{}",
                external_lead_id="003XX000004DHPY", phone=PHONE, phone_raw=PHONE, details={"raw_channel": "sms"})
    return ConsentEvent(**{**base, **kw})


def seed(journal) -> dict[str, int]:
    """An Apten SMS opt-out delivered to the Contact; an Apten ``manual`` opt-out (channel
    all) with an email, dead in HubSpot; another person's event; an opt-in; and a CRM flag
    registered in Sinch and confirmed by Sinch's notification."""
    ids = {}
    ids["sms"] = journal.events.record(consent_event(1)).event_id
    ids["manual"] = journal.events.record(consent_event(
        2, channel="all", external_lead_id=None, email=" Dana.Reyes@Example.com ",
        details={"raw_channel": "manual", "unmodelled": {"channel": "manual"}})).event_id
    ids["other"] = journal.events.record(consent_event(3, phone="+13305550000", phone_raw="+13305550000",
                                                       external_lead_id="003XX000004DHPZ")).event_id
    ids["opt_in"] = journal.events.record(consent_event(4, kind="opt_in", channel="whatsapp",
                                                        external_lead_id=None)).event_id
    journal.deliveries.add_targets(ids["sms"], [RecordRef("salesforce", "Contact", CONTACT)])
    journal.deliveries.add_targets(ids["manual"], [RecordRef("hubspot", "contact", HUBSPOT_ID)])
    claimed = {d.event_id: d for d in journal.deliveries.claim(10, 60)}
    journal.deliveries.settle([Outcome(claimed[ids["sms"]].id, "done"),
                               Outcome(claimed[ids["manual"]].id, "dead", error="PROPERTY_DOESNT_EXIST: whatsapp")])
    journal.reflections.add([ReflectionCandidate(RecordRef("salesforce", "Contact", CONTACT), PHONE, "opt_out")],
                            ["WHATSAPP"])
    (reg,) = journal.reflections.claim(10, 60)
    journal.reflections.settle([ReflectionOutcome(reg.id, "registered", at=time.time() + 60)])
    note = journal.events.record(consent_event(
        5, source="sinch", kind="opt_out", channel="whatsapp", external_lead_id=None,
        details={"status": "OPT_OUT_SUCCEEDED", "request_id": reg.request_id, "sinch_channel": "WHATSAPP"}))
    journal.reflections.apply_notification(note.event_id, ReflectionOutcome(reg.id, "done"), f"reflection r{reg.id}")
    ids["note"], ids["reflection"] = note.event_id, reg.id
    return ids


def trace(journal, text: str, deadline=None) -> dict:
    return journal.reports.trace(parse_query(text, "US"), deadline)


def event_ids(doc: dict) -> list[int]:
    return [e["event_id"] for e in doc["events"]]


# --- the journal's read, on every engine ---------------------------------------------------
def test_a_phone_in_another_format_finds_the_whole_story_newest_first(journal):
    ids = seed(journal)
    doc = trace(journal, "(330) 555-1234")
    assert doc["query"] == "(330) 555-1234"
    assert event_ids(doc) == [ids["note"], ids["opt_in"], ids["manual"], ids["sms"]]   # not the other person
    sms = doc["events"][-1]
    assert sms["targets"] == [{"crm": "salesforce", "object": "Contact", "record_id": CONTACT, "state": "done",
                               "attempts": 1, "done_at": sms["targets"][0]["done_at"], "error": None}]
    assert sms["targets"][0]["done_at"]
    manual = doc["events"][-2]
    assert manual["channel"] == "all" and manual["raw_channel"] == "manual" and sms["raw_channel"] is None
    assert manual["targets"][0]["state"] == "dead"
    assert manual["targets"][0]["error"] == "PROPERTY_DOESNT_EXIST: whatsapp"
    consent = {(c["identity"], c["channel"]): c["state"] for c in doc["consent"]}
    assert consent == {(PHONE, "sms"): "opted_out", (PHONE, "call"): "opted_out",
                       (PHONE, "whatsapp"): "opted_out", ("dana.reyes@example.com", "email"): "opted_out"}
    (reflection,) = doc["reflections"]
    assert reflection["id"] == f"r{ids['reflection']}" and reflection["state"] == "done"
    assert reflection["notifications"] == [{"event_id": ids["note"], "status": "OPT_OUT_SUCCEEDED",
                                            "received_at": doc["events"][0]["received_at"]}]


def test_the_contracts_keys(journal):
    seed(journal)
    doc = trace(journal, PHONE)
    assert set(doc) == TOP_KEYS
    assert doc["consent"] and all(set(c) == CONSENT_KEYS for c in doc["consent"])
    assert all(set(e) == EVENT_KEYS | EVENT_EXTRAS for e in doc["events"])
    assert all(set(t) == TARGET_KEYS for e in doc["events"] for t in e["targets"])
    json.dumps(doc)  # plain data


@pytest.mark.parametrize("text", ["003XX000004DHPY", CONTACT, CONTACT.lower(), " 003XX000004DHPYYA4 "])
def test_a_salesforce_record_id_in_15_or_18_chars_finds_the_event(journal, text):
    ids = seed(journal)
    doc = trace(journal, text)
    assert event_ids(doc) == [ids["sms"]]
    assert [r["id"] for r in doc["reflections"]] == [f"r{ids['reflection']}"]   # flagged on the same record
    assert {c["identity"] for c in doc["consent"]} == {PHONE}


def test_a_record_only_reached_by_fan_out_finds_its_event(journal):
    ids = seed(journal)
    assert event_ids(trace(journal, HUBSPOT_ID)) == [ids["manual"]]


def test_a_flag_set_inside_the_crm_is_part_of_the_records_story(journal):
    from syncd.reflector import crm_flag_event

    ids = seed(journal)
    flag = journal.events.record(crm_flag_event("salesforce", "Contact", CONTACT, PHONE, "call",
                                                datetime(2024, 3, 1, tzinfo=timezone.utc), None)).event_id
    other = journal.events.record(crm_flag_event("salesforce", "Contact", "003XX000004DHPZZZZ", PHONE, "call",
                                                 datetime(2024, 3, 1, tzinfo=timezone.utc), None)).event_id
    found = event_ids(trace(journal, "003XX000004DHPY"))
    assert flag in found and ids["sms"] in found and other not in found
    (e,) = [e for e in trace(journal, CONTACT)["events"] if e["event_id"] == flag]
    assert e["source"] == "crm:salesforce" and e["status"] == "reconciled" and e["deadline"] is None


def test_an_email_any_case_finds_its_events(journal):
    ids = seed(journal)
    doc = trace(journal, "  DANA.reyes@example.COM ")
    assert event_ids(doc) == [ids["manual"]]
    assert ("dana.reyes@example.com", "email", "opted_out") in [(c["identity"], c["channel"], c["state"])
                                                               for c in doc["consent"]]


def test_an_event_id_finds_that_event(journal):
    ids = seed(journal)
    doc = trace(journal, str(ids["other"]))
    assert event_ids(doc) == [ids["other"]]
    assert {c["identity"] for c in doc["consent"]} == {"+13305550000"}


def test_all_digits_are_a_hubspot_record_id_and_an_event_id_at_once(journal):
    ids = seed(journal)
    journal.deliveries.add_targets(ids["other"], [RecordRef("hubspot", "contact", str(ids["sms"]))])
    doc = trace(journal, str(ids["sms"]))
    assert sorted(event_ids(doc)) == sorted([ids["sms"], ids["other"]])


def test_deadline_comes_from_the_clock_for_opt_outs_only(journal):
    ids = seed(journal)
    seen = []

    def clock(received_at: datetime) -> datetime:
        seen.append(received_at)
        return received_at + timedelta(days=14)

    doc = trace(journal, PHONE, deadline=clock)
    by_id = {e["event_id"]: e for e in doc["events"]}
    assert by_id[ids["sms"]]["deadline"] == "2026-12-16T15:00:01.000000Z"
    assert by_id[ids["opt_in"]]["deadline"] is None
    assert by_id[ids["note"]]["deadline"] is None      # Sinch confirming our registration: nothing to honour
    assert all(d.tzinfo is not None for d in seen)
    assert all(e["deadline"] is None for e in trace(journal, PHONE)["events"])


def test_nothing_found_is_empty_lists(journal):
    seed(journal)
    assert trace(journal, "+4915112345678") == {"query": "+4915112345678", "consent": [], "events": [],
                                                "reflections": []}


def test_a_quarantined_event_says_why(journal):
    rec = journal.events.record(consent_event(9, external_lead_id="nope", quarantine_reason="no CRM is enabled"))
    (e,) = trace(journal, PHONE)["events"]
    assert e["event_id"] == rec.event_id and e["status"] == "quarantined"
    assert e["status_reason"] == "no CRM is enabled" and e["targets"] == []


# --- the query ----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["+13305551234", "(330) 555-1234", "330-555-1234", "330.555.1234",
                                  "1 330 555 1234", "+1 (330) 555-1234", "3305551234"])
def test_phone_formats_are_one_e164(text):
    assert parse_query(text, "US").phone == PHONE


def test_a_national_number_uses_the_configured_region():
    assert parse_query("030 1234567", "DE").phone == "+49301234567"


def test_salesforce_ids_match_in_both_lengths():
    assert set(record_id_forms("003XX000004DHPY")) == {"003XX000004DHPY", CONTACT}
    assert set(record_id_forms(CONTACT.lower())) == {CONTACT.lower(), CONTACT, "003XX000004DHPY"}
    assert record_id_forms("lead_abc123") == ("lead_abc123",)


def test_the_configs_own_id_rules_count():
    with pytest.raises(BadQuery):
        parse_query("CUST-0042")
    assert parse_query("CUST-0042", "US", [r"^CUST-\d+$"]).record_ids == ("CUST-0042",)


@pytest.mark.parametrize("text", ["", "   ", "hello world", "foo", "x@", "@example.com", "a@b", "<script>",
                                  "1" * 300, "003XX000004DHP!"])
def test_bad_queries_say_why(text):
    with pytest.raises(BadQuery) as info:
        parse_query(text, "US")
    assert "query" in str(info.value) or "not" in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_a_query_or_a_bad_query(text):
    try:
        query = parse_query(text, "US")
    except BadQuery:
        return
    assert isinstance(query, TraceQuery) and query.text == text.strip()
    assert query.phone or query.email or query.record_ids or query.event_id is not None
    if query.event_id is not None:
        assert 0 <= query.event_id < 2 ** 63


@settings(max_examples=100, deadline=None)
@given(national=st.integers(2012000000, 9899999999),
       style=st.sampled_from([phonenumbers.PhoneNumberFormat.E164, phonenumbers.PhoneNumberFormat.NATIONAL,
                              phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.RFC3966]))
def test_any_format_of_a_number_reads_as_its_e164(national, style):
    number = phonenumbers.parse(f"+1{national}")
    if not phonenumbers.is_possible_number(number):
        return
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    text = phonenumbers.format_number(number, style)
    if style == phonenumbers.PhoneNumberFormat.RFC3966:
        text = text.removeprefix("tel:")
    assert parse_query(text, "US").phone == e164


# --- the command line ---------------------------------------------------------------------
def config_file(tmp_path: Path, journal: str = "sqlite:///j.db") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f'journal: {{url: "{journal}"}}\nsources:\n  apten: {{secret: abcdefghij0123456789abcdef}}\n')
    return path


@pytest.fixture
def seeded(tmp_path):
    journal = open_journal(f"sqlite:///{tmp_path}/j.db")
    ids = seed(journal)
    journal.close()
    return config_file(tmp_path), ids


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_json_is_one_document_in_the_contracts_shape(seeded):
    path, ids = seeded
    result = run("-c", str(path), "trace", "(330) 555-1234", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)       # exactly one document
    assert set(doc) == TOP_KEYS and event_ids(doc)[-1] == ids["sms"]
    assert PHONE in result.stdout and "dana.reyes@example.com" in result.stdout   # the operator's own lookup


def test_cli_deadline_is_the_configured_compliance_clocks(seeded):
    path, ids = seeded
    doc = json.loads(run("-c", str(path), "trace", PHONE, "--json").stdout)
    by_id = {e["event_id"]: e for e in doc["events"]}
    # Received Wednesday 2026-12-02 (New York): 10 US business days end on Wednesday 2026-12-16.
    assert by_id[ids["sms"]]["deadline"] == "2026-12-17T04:59:59.999999Z"
    assert by_id[ids["opt_in"]]["deadline"] is None


def test_cli_terminal_form_has_the_tables_in_local_time_and_utc(seeded, monkeypatch):
    path, ids = seeded
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        result = run("trace", CONTACT, "-c", str(path))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "IDENTITY" in out and "opted_out" in out and f"Event {ids['sms']}" in out
    assert "2024-02-18 04:45:01 EST (2024-02-18 09:45:01 UTC)" in out      # occurred, local and UTC
    assert "2026-12-02 10:00:01 EST (2026-12-02 15:00:01 UTC)" in out      # received
    target_line = next(line for line in out.splitlines() if CONTACT in line and "salesforce" in line)
    assert "done" in target_line
    assert "Registrations in Sinch" in out and f"r{ids['reflection']}" in out


def test_cli_raw_channel_is_shown_where_it_differed(seeded):
    path, ids = seeded
    out = run("-c", str(path), "trace", str(ids["manual"])).stdout
    assert "raw channel  manual" in out


def test_cli_nothing_found_exits_1(seeded):
    path, _ = seeded
    result = run("-c", str(path), "trace", "+4915112345678")
    assert result.exit_code == 1
    assert "nothing found for '+4915112345678'" in result.stderr and result.stdout == ""
    as_json = run("-c", str(path), "trace", "+4915112345678", "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout) == {"query": "+4915112345678", "consent": [], "events": [], "reflections": []}


@pytest.mark.parametrize("text", ["hello world", "x@", ""])
def test_cli_bad_query_exits_2_with_the_reason(seeded, text):
    path, _ = seeded
    result = run("-c", str(path), "trace", text)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("syncd trace: ") and "Traceback" not in result.stderr


def test_cli_refuses_a_journal_that_does_not_exist(tmp_path):
    path = config_file(tmp_path, "sqlite:///typo.db")
    result = run("-c", str(path), "trace", PHONE)
    assert result.exit_code == 2
    assert f"journal not found: {tmp_path}/typo.db" in result.stderr
    assert not (tmp_path / "typo.db").exists()


# --- end to end: a real receiver, pusher and Salesforce simulator --------------------------
@pytest.mark.slow
def test_trace_finds_a_delivered_webhook_by_phone_and_by_record_id():
    from tests.support.stack import Stack, wait_for

    stack = Stack().start()
    try:
        daemon = stack.serve()
        try:
            assert stack.post_apten(fixture_bytes("apten_optout_sms.json")).json()["status"] == "accepted"
            assert wait_for(lambda: json.loads(stack.syncd("status", "--json").stdout)["deliveries"]["done"] == 1,
                            timeout=30, interval=0.2)
            by_phone = stack.syncd("trace", "(330) 555-1234", "--json")
            by_record = stack.syncd("trace", CONTACT, "--json")
            as_text = stack.syncd("trace", "330 555 1234")
        finally:
            assert daemon.terminate() == 0
    finally:
        stack.cleanup()
    assert by_phone.returncode == 0 and by_record.returncode == 0, (by_phone.stderr, by_record.stderr)
    for doc in (json.loads(by_phone.stdout), json.loads(by_record.stdout)):
        (event,) = doc["events"]
        assert event["source"] == "apten" and event["kind"] == "opt_out" and event["channel"] == "sms"
        assert event["occurred_at"].startswith("2024-02-18T09:45:22")
        (target,) = event["targets"]
        assert (target["crm"], target["object"], target["record_id"], target["state"]) == \
            ("salesforce", "Contact", CONTACT, "done")
        assert {"identity": PHONE, "channel": "sms", "state": "opted_out",
                "since": event["occurred_at"], "source": "apten"} in doc["consent"]
    assert as_text.returncode == 0 and CONTACT in as_text.stdout


@pytest.mark.parametrize("query, params, index", [
    ("trace_events_by_phone", {"phone": "+13305551234"}, "events_phone"),
    ("trace_events_by_email", {"email": "dana.reyes@example.com"}, "events_email"),
    ("trace_events_by_record", {"ids": ["003XX000004DHPYYA4"]}, "deliveries_record_id"),
    ("trace_events_by_record", {"ids": ["003XX000004DHPYYA4"]}, "events_external_lead_id"),
    ("trace_crm_flags_by_record", {"pattern": "%x%"}, "events_crm_flags"),
    ("trace_reflections_by_phone", {"phones": ["+13305551234"]}, "reflections_phone"),
])
def test_trace_lookups_read_an_index_not_every_event(tmp_path, query, params, index):
    """A person is found through an index (0006_trace_indexes.sql): on 200,000 events a
    full scan took 50-170 ms per lookup, the indexes about 1-2 ms."""
    j = open_journal(f"sqlite:///{tmp_path}/plan.db")
    try:
        with j.engine.read() as tx:
            sql, args = tx.queries[query].render(params)
            plan = " ".join(str(r[-1]) for r in tx.cur.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall())
    finally:
        j.close()
    assert index in plan, plan
