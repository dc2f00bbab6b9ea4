"""Inbound values syncd does not model, and text that is not text, over the real
receiver (waitress) and through the pusher to the Salesforce sandbox: such events are
kept, never answered 5xx, and never write a field they do not name."""
from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime, timezone

import pytest
from prometheus_client import generate_latest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.sources.apten import AptenSource
from syncd.sources.sinch import SinchSource
from tests.support.stack import APTEN_SECRET, SINCH_SECRET
from tests.conftest import fixture_bytes
from tests.test_receiver import post_apten, post_lox24, post_sinch

CONTACT = "003XX000004DHPYYA4"   # the seeded Salesforce contact, phone +13305551234
CONSENT_FIELDS = ("HasOptedOutOfEmail", "DoNotCall", "SMS_Opt_Out__c", "WhatsApp_Opt_Out__c")


def _apten(**data) -> bytes:
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    doc["data"].update(data)
    return json.dumps(doc).encode()


def _sinch(channel: str, identity: str = "13305551234") -> bytes:
    return json.dumps({"app_id": "app", "project_id": "p", "event_time": datetime.now(timezone.utc).isoformat(),
                       "opt_out_notification": {"contact_id": "c1", "channel": channel, "identity": identity,
                                                "status": "OPT_OUT_SUCCEEDED"}}).encode()


# --- over HTTP: answers, metric, export --------------------------------------------------

def test_apten_manual_channel_is_accepted_counted_and_exported(receiver):
    resp = post_apten(receiver, _apten(channel="manual"))
    assert resp.status_code == 200 and resp.json()["status"] == "accepted", resp.text
    stored = receiver.journal.events.get(resp.json()["event_id"])
    assert stored.channel == "all" and stored.details["raw_channel"] == "manual"
    unknown = post_apten(receiver, _apten(channel="email", optOutReason="SPAM_TRAP"))
    assert unknown.status_code == 200, unknown.text
    metrics = generate_latest(receiver.metrics.registry).decode()
    assert 'syncd_source_unmodelled_values_total{field="channel",source="apten"} 1.0' in metrics
    assert 'syncd_source_unmodelled_values_total{field="optOutReason",source="apten"} 1.0' in metrics
    rows = {r["event_id"]: r for r in receiver.journal.reports.export_rows(None)}
    assert rows[resp.json()["event_id"]]["raw_channel"] == "manual"
    assert rows[resp.json()["event_id"]]["unmodelled"] == "channel=manual"
    assert rows[unknown.json()["event_id"]]["unmodelled"] == "optOutReason=SPAM_TRAP"


def route_all(journal, rules) -> None:
    """One tick of the routing step with no CRM connected."""
    from syncd.backoff import RetryPolicy
    from syncd.config import RetryConfig
    from syncd.pauses import CrmPauses
    from syncd.reflector import SinchNotifications
    from syncd.router import EventRouter

    policy = RetryPolicy(RetryConfig())
    notifications = SinchNotifications(journal.reflections, journal.events, policy)
    EventRouter(journal.events, journal.deliveries, journal.ops, rules, {}, CrmPauses(journal.ops, {}), policy,
                notifications.reconcile).tick()


def test_sinch_unmodelled_channel_is_stored_answered_200_and_never_routed(receiver):
    from syncd.routing import Router

    resp = post_sinch(receiver, _sinch("VIBERBM"))
    assert resp.status_code == 200 and resp.json()["status"] == "ignored", resp.text
    event_id = resp.json()["event_id"]
    assert "VIBERBM" in resp.json()["reason"]
    again = post_sinch(receiver, _sinch("INSTAGRAM", identity="no phone here"))  # no phone: still not quarantined
    assert again.status_code == 200 and again.json()["status"] == "ignored", again.text
    route_all(receiver.journal, Router([], ["salesforce"]))
    counts = receiver.journal.reports.counts()
    assert counts["ignored"] == 2 and counts["quarantined"] == 0
    assert counts["deliveries"] == {"pending": 0, "retrying": 0, "done": 0, "dead": 0}
    row = next(r for r in receiver.journal.reports.export_rows(None) if r["event_id"] == event_id)
    assert (row["state"], row["raw_channel"], row["target_crm"]) == ("ignored", "VIBERBM", None)
    assert "not modelled" in row["error"] and row["unmodelled"] == "channel=VIBERBM"
    metrics = generate_latest(receiver.metrics.registry).decode()
    assert 'syncd_source_unmodelled_values_total{field="channel",source="sinch"} 2.0' in metrics


# --- through the pusher to the Salesforce sandbox -----------------------------------------

def _contact(sf):
    return {f: sf.get_record("Contact", CONTACT)[f] for f in CONSENT_FIELDS}


def test_viber_opt_out_sets_no_whatsapp_flag_and_manual_opt_out_sets_every_channel(runtime, sf_sandbox):
    now = datetime.now(timezone.utc)
    viber = SinchSource(SINCH_SECRET).parse(_sinch("VIBERBM"), now)
    runtime.journal.events.record(viber)
    sf_sandbox.clear_log()
    runtime.tick()
    assert _contact(sf_sandbox) == dict.fromkeys(CONSENT_FIELDS, False)
    assert sf_sandbox.requests_to(r"/composite/sobjects$", "PATCH") == []
    assert runtime.journal.reports.counts()["ignored"] == 1

    manual = AptenSource(APTEN_SECRET).parse(_apten(channel="manual", externalLeadId=CONTACT[:15]), now)
    runtime.journal.events.record(manual)
    runtime.tick()
    assert _contact(sf_sandbox) == dict.fromkeys(CONSENT_FIELDS, True)


@pytest.mark.skipif(not os.environ.get("SYNCD_TEST_PG_URL"), reason="SYNCD_TEST_PG_URL not set")
def test_nul_in_free_text_is_storable_in_postgresql():
    import psycopg

    from syncd.journal import journal_on
    from syncd.journal.postgres import PostgresEngine

    url, schema = os.environ["SYNCD_TEST_PG_URL"], f"tnul{os.getpid()}_{time.time_ns()}"
    journal = journal_on(PostgresEngine(url, schema=schema))
    try:
        body = _apten().replace(b'"STOP"', b'"STOP\\u0000"')   # PostgreSQL TEXT refuses NUL
        recorded = journal.events.record(AptenSource(APTEN_SECRET).parse(body, datetime.now(timezone.utc)))
        assert recorded.created
        assert journal.events.get(recorded.event_id).phone == "+13305551234"
    finally:
        journal.close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# --- fuzz: every string field of every source, as raw JSON escapes -----------------------

# (source, path in the seed body, role). "id": an identifier, 400 naming it when it holds
# a lone surrogate or NUL; "free": free text, the opt-out is always kept (200/202);
# "code": a value the source's schema decides on (an event name, a status). A source's
# time is "free": one syncd cannot read orders the event by its receipt time.
FIELDS = [
    ("apten", ("event",), "code"), ("apten", ("timestamp",), "free"),
    ("apten", ("data", "leadId"), "id"), ("apten", ("data", "externalLeadId"), "id"),
    ("apten", ("data", "phone"), "id"), ("apten", ("data", "email"), "id"),
    ("apten", ("data", "channel"), "free"), ("apten", ("data", "optOutReason"), "free"),
    ("apten", ("data", "optOutMessage"), "free"), ("apten", ("data", "somethingNew"), "free"),
    ("lox24", ("id",), "id"), ("lox24", ("name",), "code"), ("lox24", ("api_version",), "free"),
    ("lox24", ("data", "phone"), "id"), ("lox24", ("data", "campaign_code"), "free"),
    ("lox24", ("data", "short_link_code"), "free"), ("lox24", ("data", "additional_data", "reason", "label"), "free"),
    ("lox24", ("data", "additional_data", "additional_text"), "free"), ("lox24", ("data", "somethingNew"), "free"),
    ("sinch", ("app_id",), "free"), ("sinch", ("project_id",), "free"), ("sinch", ("correlation_id",), "id"),
    ("sinch", ("event_time",), "free"), ("sinch", ("message_metadata",), "free"),
    ("sinch", ("opt_out_notification", "contact_id"), "id"), ("sinch", ("opt_out_notification", "identity"), "id"),
    ("sinch", ("opt_out_notification", "request_id"), "id"), ("sinch", ("opt_out_notification", "channel"), "code"),
    ("sinch", ("opt_out_notification", "status"), "code"),
    ("sinch", ("opt_out_notification", "error_details", "description"), "free"),
]
SEEDS = {"apten": "apten_optout_sms.json", "lox24": "lox24_phone_unsubscribe.json"}

# Pieces of a JSON string literal, as they appear in the body's bytes.
surrogate = st.integers(0xD800, 0xDFFF).map(lambda n: f"\\u{n:04x}")
piece = st.one_of(surrogate, st.just("\\u0000"), st.just("\\ud83d\\ude00"),
                  st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=5)
                  .map(lambda t: json.dumps(t, ensure_ascii=False)[1:-1]))
long_run = st.sampled_from(["a" * 10_000, "\\u00e9" * 10_000, "\\ud800" * 10_000, "\\u0000" * 10_000,
                            "+1330555" + "4" * 9_992])
escaped_literal = st.one_of(st.lists(piece, min_size=1, max_size=8).map("".join), long_run,
                            st.tuples(st.lists(piece, max_size=3).map("".join), long_run).map("".join))


def _body(source: str, path: tuple[str, ...], literal: str) -> bytes:
    if source == "sinch":
        doc = json.loads(_sinch("WHATSAPP"))
        doc["opt_out_notification"]["error_details"] = {"description": "ok"}
    else:
        doc = json.loads(fixture_bytes(SEEDS[source]))
        if source == "lox24":
            doc["id"] = str(uuid.uuid4())   # a new event each time, not a duplicate
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "@@FUZZ@@"
    return json.dumps(doc).replace('"@@FUZZ@@"', f'"{literal}"').encode()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), literal=escaped_literal)
def test_fuzz_json_escapes_in_every_string_field_never_5xx_never_lose_free_text(receiver, field, literal):
    source, path, role = field
    body = _body(source, path, literal)
    resp = {"apten": post_apten, "lox24": post_lox24, "sinch": post_sinch}[source](receiver, body)
    assert resp.status_code < 500, resp.text
    assert resp.status_code in (200, 202, 400), resp.text
    value = json.loads('"' + literal + '"')
    not_text = any(c == "\x00" or 0xD800 <= ord(c) <= 0xDFFF for c in value)
    if role == "free":
        assert resp.status_code in (200, 202), (path, resp.text)   # the opt-out is kept
    elif role == "id" and not_text:
        assert resp.status_code == 400 and ".".join(path) in resp.json()["error"], resp.text


def test_deeply_nested_valid_json_is_never_a_5xx(receiver):
    # json.loads accepts nesting close to the interpreter's recursion limit; everything
    # after it (cleaning, hashing, storing) runs deeper in the stack.
    for depth in range(800, 1000, 8):
        nested = '{"a":' * depth + "1" + "}" * depth
        apten = f'{{"event":"optOut","data":{{"phone":"+13305551234","x":{nested}}}}}'.encode()
        sinch = json.loads(_sinch("WHATSAPP"))
        sinch_body = json.dumps(sinch).replace('"status"', f'"x":{nested},"status"', 1).encode()
        for resp in (post_apten(receiver, apten), post_sinch(receiver, sinch_body)):
            assert resp.status_code in (200, 400), (depth, resp.text)


def test_status_and_export_commands_show_ignored_and_raw_channels(receiver, tmp_path):
    import csv
    import io
    import subprocess
    import sys

    from syncd.routing import Router

    viber = post_sinch(receiver, _sinch("VIBERBM")).json()["event_id"]
    manual = post_apten(receiver, _apten(channel="manual")).json()["event_id"]
    route_all(receiver.journal, Router([], []))
    (tmp_path / "cli.yaml").write_text(
        "journal:\n  url: sqlite:///r.db\nsources:\n  apten:\n    secret: " + uuid.uuid4().hex + "\n")

    def syncd(*args: str) -> str:
        run = subprocess.run([sys.executable, "-m", "syncd.cli", "-c", str(tmp_path / "cli.yaml"), *args],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        return run.stdout

    status = json.loads(syncd("status", "--json"))
    assert status["ignored"] == 1 and {"deliveries", "quarantined", "reflections"} <= set(status)
    assert "ignored 1" in syncd("status")
    rows = {int(r["event_id"]): r for r in csv.DictReader(io.StringIO(syncd("export")))}
    assert (rows[viber]["state"], rows[viber]["raw_channel"]) == ("ignored", "VIBERBM")
    assert (rows[manual]["channel"], rows[manual]["raw_channel"], rows[manual]["unmodelled"]) == \
        ("all", "manual", "channel=manual")


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "yesterday", 1.5e9])
def test_a_source_time_out_of_range_or_unreadable_is_recorded_not_a_4xx_or_5xx(receiver, stamp):
    """A year that leaves the range once converted to UTC raised OverflowError: a 500."""
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    doc["timestamp"] = stamp
    resp = post_apten(receiver, json.dumps(doc).encode())
    assert resp.status_code == 200 and resp.json()["status"] == "accepted", resp.text
    event = receiver.journal.events.get(resp.json()["event_id"])
    assert event.details["timestamp_unreadable"] == {"field": "timestamp", "value": str(stamp)}
    assert event.occurred_at == event.received_at
