"""The pusher against the Salesforce sandbox (real HTTPS, real simple-salesforce)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from syncd.events import ConsentEvent



def apten_event(n: int, ext_id: str, channel: str = "sms", kind: str = "opt_out", seconds: int = 0) -> ConsentEvent:
    at = datetime(2024, 2, 18, 9, 0, tzinfo=timezone.utc) + timedelta(seconds=seconds)
    return ConsentEvent(source="apten", source_event_id=f"e{n}", kind=kind, channel=channel, occurred_at=at,
                        received_at=datetime.now(timezone.utc), raw=b"{}", external_lead_id=ext_id)


def contact_ids(sf, n: int) -> list[str]:
    return [sf.add_record("Contact", None, LastName=f"C{i}", SMS_Opt_Out__c=False) for i in range(n)]


def test_fifty_contacts_one_composite_call(runtime, sf_sandbox):
    ids = contact_ids(sf_sandbox, 50)
    for n, rid in enumerate(ids):
        runtime.journal.record(apten_event(n, rid[:15]))
    sf_sandbox.clear_log()
    stats = runtime.pusher.run_once()
    assert (stats.routed, stats.done, stats.dead) == (50, 50, 0)
    calls = sf_sandbox.requests_to(r"/composite/sobjects$", "PATCH")
    assert len(calls) == 1 and len(calls[0].json()["records"]) == 50
    assert all(sf_sandbox.get_record("Contact", rid)["SMS_Opt_Out__c"] is True for rid in ids)


def test_batches_are_at_most_200(runtime, sf_sandbox):
    ids = contact_ids(sf_sandbox, 450)
    for n, rid in enumerate(ids):
        runtime.journal.record(apten_event(n, rid))
    sf_sandbox.clear_log()
    runtime.pusher.run_once()
    sizes = [len(r.json()["records"]) for r in sf_sandbox.requests_to(r"/composite/sobjects$", "PATCH")]
    assert sorted(sizes) == [50, 200, 200]


def test_backlog_for_one_record_coalesces_into_one_update(runtime, sf_sandbox):
    rid = "003XX000004DHPYYA4"
    runtime.journal.record(apten_event(1, rid, "sms", "opt_out", seconds=1))
    runtime.journal.record(apten_event(2, rid, "sms", "opt_in", seconds=5))
    runtime.journal.record(apten_event(3, rid, "call", "opt_out", seconds=3))
    sf_sandbox.clear_log()
    runtime.pusher.run_once()
    calls = sf_sandbox.requests_to(r"/composite/sobjects$", "PATCH")
    assert len(calls) == 1
    (record,) = calls[0].json()["records"]
    assert {k: v for k, v in record.items() if k not in ("attributes", "id")} == \
        {"SMS_Opt_Out__c": False, "DoNotCall": True}


def test_older_event_arriving_later_does_not_undo_a_newer_one(runtime, sf_sandbox):
    rid = "003XX000004DHPYYA4"
    runtime.journal.record(apten_event(1, rid, "sms", "opt_out", seconds=10))
    runtime.pusher.run_once()
    runtime.journal.record(apten_event(2, rid, "sms", "opt_in", seconds=1))  # older opt-in, late
    sf_sandbox.clear_log()
    stats = runtime.pusher.run_once()
    assert stats.done == 1
    assert sf_sandbox.requests_to(r"/composite/") == []
    assert sf_sandbox.get_record("Contact", rid)["SMS_Opt_Out__c"] is True
    row = [r for r in runtime.journal.export_rows(None) if r["source_event_id"] == "e2"][0]
    assert row["outcome"] == "superseded"


def test_rejected_record_is_dead_with_salesforces_text_and_the_rest_land(runtime, sf_sandbox):
    ids = contact_ids(sf_sandbox, 3)
    sf_sandbox.reject_record(ids[1], "FIELD_CUSTOM_VALIDATION_EXCEPTION", "Opt-outs need a reason")
    for n, rid in enumerate(ids):
        runtime.journal.record(apten_event(n, rid))
    stats = runtime.pusher.run_once()
    assert (stats.done, stats.dead) == (2, 1)
    dead = runtime.journal.dead_letters()
    assert len(dead) == 1 and dead[0]["record_id"] == ids[1]
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION" in dead[0]["error"]
    assert "Opt-outs need a reason" in dead[0]["error"]
    assert sf_sandbox.get_record("Contact", ids[0])["SMS_Opt_Out__c"] is True
    assert sf_sandbox.get_record("Contact", ids[1])["SMS_Opt_Out__c"] is False


def test_transient_failure_is_retried_not_dead(runtime, sf_sandbox):
    rid = "003XX000004DHPYYA4"
    runtime.journal.record(apten_event(1, rid))
    sf_sandbox.add_fault("PATCH", r"/composite/sobjects$", 503,
                         [{"errorCode": "SERVER_UNAVAILABLE", "message": "busy"}], times=10)
    stats = runtime.pusher.run_once()
    assert (stats.retry, stats.dead) == (1, 0)
    assert runtime.journal.counts()["deliveries"]["retrying"] == 1
    sf_sandbox.faults.clear()
    import time

    time.sleep(1.2)
    stats = runtime.pusher.run_once()
    assert stats.done == 1
    assert sf_sandbox.get_record("Contact", rid)["SMS_Opt_Out__c"] is True


def test_unknown_record_is_dead_letter_with_not_found(runtime, sf_sandbox):
    from connectors.salesforce import to_18

    runtime.journal.record(apten_event(1, to_18("003XX0000000000")))
    stats = runtime.pusher.run_once()
    assert stats.dead == 1
    error = runtime.journal.dead_letters()[0]["error"]
    assert any(code in error for code in ("NOT_FOUND", "ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY"))


def test_export_has_the_audit_fields(runtime, sf_sandbox):
    runtime.journal.record(apten_event(1, "003XX000004DHPY"))
    runtime.pusher.run_once()
    (row,) = list(runtime.journal.export_rows(None))
    assert row["source_event_id"] == "e1" and row["target_record"] == "003XX000004DHPYYA4"
    assert row["state"] == "done" and row["delivered_at"] and json.dumps(row)




def test_daily_quota_pauses_the_crm_without_burning_retries(runtime, sf_sandbox):
    import time

    ids = contact_ids(sf_sandbox, 3)
    for n, rid in enumerate(ids):
        runtime.journal.record(apten_event(n, rid))
    sf_sandbox.exhaust_quota()
    first = runtime.pusher.run_once()
    assert (first.retry, first.dead) == (3, 0)
    assert len(sf_sandbox.requests_to(r"/composite/sobjects$", "PATCH")) == 1
    assert runtime.pusher.paused_until["salesforce"] > time.time() + 3000
    # While paused, due work for the CRM is not sent and costs no attempt.
    with runtime.journal._write() as cur:
        cur.execute("UPDATE deliveries SET next_attempt_at = 0")
    sf_sandbox.clear_log()
    second = runtime.pusher.run_once()
    assert (second.retry, second.dead) == (3, 0)
    assert sf_sandbox.requests_to(r"/composite/") == []
    with runtime.journal._write() as cur:
        cur.execute("UPDATE deliveries SET next_attempt_at = 0")
    assert [d.attempts for d in runtime.journal.claim(10, 60)] == [2, 2, 2]  # 1 real try, then this claim
    assert runtime.pusher.circuit_problem(longer_than=0) is not None
    assert runtime.pusher.circuit_problem(longer_than=900) is None


def test_retries_are_bounded_by_attempts(runtime, sf_sandbox):
    import time

    from syncd.backoff import RetryPolicy

    runtime.pusher.policy = RetryPolicy(runtime.cfg.retry.model_copy(update={"max_attempts": 2}))
    runtime.journal.record(apten_event(1, "003XX000004DHPY"))
    sf_sandbox.add_fault("PATCH", r"/composite/sobjects$", 503,
                         [{"errorCode": "SERVER_UNAVAILABLE", "message": "maintenance"}], times=100)
    assert runtime.pusher.run_once().retry == 1
    with runtime.journal._write() as cur:
        cur.execute("UPDATE deliveries SET next_attempt_at = 0")
    time.sleep(0.01)
    assert runtime.pusher.run_once().dead == 1
    (dead,) = runtime.journal.dead_letters()
    assert dead["error"].startswith("gave up after 2 attempts: ") and "maintenance" in dead["error"]


def test_retries_are_bounded_by_age(runtime, sf_sandbox):
    from syncd.backoff import RetryPolicy

    runtime.pusher.policy = RetryPolicy(runtime.cfg.retry.model_copy(update={"max_age_hours": 1.0}))
    old = apten_event(1, "003XX000004DHPY")
    old.received_at = datetime.now(timezone.utc) - timedelta(hours=2)
    runtime.journal.record(old)
    sf_sandbox.add_fault("PATCH", r"/composite/sobjects$", 503,
                         [{"errorCode": "SERVER_UNAVAILABLE", "message": "maintenance"}], times=100)
    assert runtime.pusher.run_once().dead == 1
    assert runtime.journal.dead_letters()[0]["error"].startswith("gave up after 1 h: ")


def test_delivery_for_a_crm_no_longer_configured_is_dead_lettered_not_stuck(runtime, sf_sandbox):
    from connectors.types import RecordRef

    rec = runtime.journal.record(apten_event(1, "lead_abc123"))
    runtime.journal.add_targets(rec.event_id, [RecordRef("close", "lead", "lead_abc123")])
    stats = runtime.pusher.run_once()
    assert stats.dead == 1
    assert "CRM close is not enabled" in runtime.journal.dead_letters()[0]["error"]
