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
        runtime.journal.events.record(apten_event(n, rid[:15]))
    sf_sandbox.clear_log()
    stats = runtime.tick()
    assert (stats.routed, stats.done, stats.dead) == (50, 50, 0)
    calls = sf_sandbox.requests_to(r"/composite/sobjects$", "PATCH")
    assert len(calls) == 1 and len(calls[0].json()["records"]) == 50
    assert all(sf_sandbox.get_record("Contact", rid)["SMS_Opt_Out__c"] is True for rid in ids)


def test_batches_are_at_most_200(runtime, sf_sandbox):
    ids = contact_ids(sf_sandbox, 450)
    for n, rid in enumerate(ids):
        runtime.journal.events.record(apten_event(n, rid))
    sf_sandbox.clear_log()
    runtime.tick()
    sizes = [len(r.json()["records"]) for r in sf_sandbox.requests_to(r"/composite/sobjects$", "PATCH")]
    assert sorted(sizes) == [50, 200, 200]


def test_backlog_for_one_record_coalesces_into_one_update(runtime, sf_sandbox):
    rid = "003XX000004DHPYYA4"
    runtime.journal.events.record(apten_event(1, rid, "sms", "opt_out", seconds=1))
    runtime.journal.events.record(apten_event(2, rid, "sms", "opt_in", seconds=5))
    runtime.journal.events.record(apten_event(3, rid, "call", "opt_out", seconds=3))
    sf_sandbox.clear_log()
    runtime.tick()
    calls = sf_sandbox.requests_to(r"/composite/sobjects$", "PATCH")
    assert len(calls) == 1
    (record,) = calls[0].json()["records"]
    assert {k: v for k, v in record.items() if k not in ("attributes", "id")} == \
        {"SMS_Opt_Out__c": False, "DoNotCall": True}


def test_older_event_arriving_later_does_not_undo_a_newer_one(runtime, sf_sandbox):
    rid = "003XX000004DHPYYA4"
    runtime.journal.events.record(apten_event(1, rid, "sms", "opt_out", seconds=10))
    runtime.tick()
    runtime.journal.events.record(apten_event(2, rid, "sms", "opt_in", seconds=1))  # older opt-in, late
    sf_sandbox.clear_log()
    stats = runtime.tick()
    assert stats.done == 1
    assert sf_sandbox.requests_to(r"/composite/") == []
    assert sf_sandbox.get_record("Contact", rid)["SMS_Opt_Out__c"] is True
    row = [r for r in runtime.journal.reports.export_rows(None) if r["source_event_id"] == "e2"][0]
    assert row["outcome"] == "superseded"


def test_rejected_record_is_dead_with_salesforces_text_and_the_rest_land(runtime, sf_sandbox):
    ids = contact_ids(sf_sandbox, 3)
    sf_sandbox.reject_record(ids[1], "FIELD_CUSTOM_VALIDATION_EXCEPTION", "Opt-outs need a reason")
    for n, rid in enumerate(ids):
        runtime.journal.events.record(apten_event(n, rid))
    stats = runtime.tick()
    assert (stats.done, stats.dead) == (2, 1)
    dead = runtime.journal.reports.dead_letters()
    assert len(dead) == 1 and dead[0]["record_id"] == ids[1]
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION" in dead[0]["error"]
    assert "Opt-outs need a reason" in dead[0]["error"]
    assert sf_sandbox.get_record("Contact", ids[0])["SMS_Opt_Out__c"] is True
    assert sf_sandbox.get_record("Contact", ids[1])["SMS_Opt_Out__c"] is False


def test_transient_failure_is_retried_not_dead(runtime, sf_sandbox):
    rid = "003XX000004DHPYYA4"
    runtime.journal.events.record(apten_event(1, rid))
    sf_sandbox.add_fault("PATCH", r"/composite/sobjects$", 503,
                         [{"errorCode": "SERVER_UNAVAILABLE", "message": "busy"}], times=10)
    stats = runtime.tick()
    assert (stats.retry, stats.dead) == (1, 0)
    assert runtime.journal.reports.counts()["deliveries"]["retrying"] == 1
    sf_sandbox.faults.clear()
    import time

    time.sleep(1.2)
    stats = runtime.tick()
    assert stats.done == 1
    assert sf_sandbox.get_record("Contact", rid)["SMS_Opt_Out__c"] is True


def test_unknown_record_is_dead_letter_with_not_found(runtime, sf_sandbox):
    from connectors.salesforce import to_18

    runtime.journal.events.record(apten_event(1, to_18("003XX0000000000")))
    stats = runtime.tick()
    assert stats.dead == 1
    error = runtime.journal.reports.dead_letters()[0]["error"]
    assert any(code in error for code in ("NOT_FOUND", "ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY"))


def test_export_has_the_audit_fields(runtime, sf_sandbox):
    runtime.journal.events.record(apten_event(1, "003XX000004DHPY"))
    runtime.tick()
    (row,) = list(runtime.journal.reports.export_rows(None))
    assert row["source_event_id"] == "e1" and row["target_record"] == "003XX000004DHPYYA4"
    assert row["state"] == "done" and row["delivered_at"] and json.dumps(row)




def _due_now(journal) -> None:
    with journal.engine.begin() as tx:
        cur = tx.cur
        cur.execute("UPDATE deliveries SET next_attempt_at = 0")


def _end_pause(journal, crm: str = "salesforce") -> None:
    """Let the pause's time run out (as if ``limits_probe_seconds`` had passed)."""
    until, reason = journal.ops.crm_pause(crm)
    journal.ops.pause_crm(crm, 0.0, reason)


def test_daily_quota_pauses_the_crm_without_burning_retries(runtime, sf_sandbox):
    import time

    ids = contact_ids(sf_sandbox, 3)
    for n, rid in enumerate(ids):
        runtime.journal.events.record(apten_event(n, rid))
    sf_sandbox.exhaust_quota()
    first = runtime.tick()
    assert (first.retry, first.dead) == (3, 0)
    assert len(sf_sandbox.requests_to(r"/composite/sobjects$", "PATCH")) == 1  # no retry loop against it
    until, reason = runtime.journal.ops.crm_pause("salesforce")
    # not a blind hour: the quota is checked again after limits_probe_seconds (300 s by default)
    assert time.time() + 250 < until < time.time() + 350
    assert "TotalRequests Limit exceeded." in reason
    # While paused, due work for the CRM is not sent and costs no attempt.
    _due_now(runtime.journal)
    sf_sandbox.clear_log()
    second = runtime.tick()
    assert (second.retry, second.dead) == (3, 0)
    assert sf_sandbox.requests_to(r"/services/data/") == []
    _due_now(runtime.journal)
    assert [d.attempts for d in runtime.journal.deliveries.claim(10, 60)] == [2, 2, 2]  # 1 real try, then this claim
    time.sleep(0.01)
    assert runtime.pauses.circuit_problem(longer_than=0) is not None
    assert runtime.pauses.circuit_problem(longer_than=900) is None


def test_daily_pause_ends_as_soon_as_limits_reports_quota(runtime, sf_sandbox):
    ids = contact_ids(sf_sandbox, 2)
    for n, rid in enumerate(ids):
        runtime.journal.events.record(apten_event(n, rid))
    sf_sandbox.exhaust_quota()
    runtime.tick()
    # The probe time comes, quota still spent: /limits is asked, nothing is written.
    _end_pause(runtime.journal)
    _due_now(runtime.journal)
    sf_sandbox.clear_log()
    assert runtime.tick().done == 0
    assert len(sf_sandbox.requests_to(r"/limits/?$", "GET")) == 1
    assert sf_sandbox.requests_to(r"/composite/") == []
    assert runtime.journal.ops.crm_pause("salesforce") is not None
    # Quota is back (the 24-hour window rolled on): the next probe resumes at once.
    sf_sandbox.reset_quota()
    _end_pause(runtime.journal)
    _due_now(runtime.journal)
    assert runtime.tick().done == 2
    assert runtime.journal.ops.crm_pause("salesforce") is None
    assert all(sf_sandbox.get_record("Contact", rid)["SMS_Opt_Out__c"] is True for rid in ids)
    assert runtime.pauses.circuit_problem(longer_than=0) is None


def test_probe_refused_keeps_the_pause(runtime, sf_sandbox):
    """Should Salesforce refuse /limits itself while the quota is spent, the pause goes on."""
    runtime.journal.events.record(apten_event(1, contact_ids(sf_sandbox, 1)[0]))
    runtime.journal.ops.pause_crm("salesforce", 0.0, "quota exhausted")
    sf_sandbox.add_fault("GET", r"/limits/?$", 403, [{"message": "TotalRequests Limit exceeded.",
                                                     "errorCode": "REQUEST_LIMIT_EXCEEDED"}])
    assert runtime.tick().retry == 1
    assert sf_sandbox.requests_to(r"/composite/") == []
    assert runtime.journal.ops.crm_pause("salesforce")[0] > 1e9


def test_retry_after_sets_the_pause_length(runtime, sf_sandbox):
    import time

    runtime.journal.events.record(apten_event(1, contact_ids(sf_sandbox, 1)[0]))
    sf_sandbox.add_fault("PATCH", r"/composite/sobjects$", 403, [{"message": "TotalRequests Limit exceeded.",
                                                                  "errorCode": "REQUEST_LIMIT_EXCEEDED"}],
                         headers={"Retry-After": "40"})
    assert runtime.tick().retry == 1
    until, _ = runtime.journal.ops.crm_pause("salesforce")
    assert time.time() + 30 < until < time.time() + 45


def test_a_retry_after_holds_the_next_batch_for_other_records_too(runtime, sf_sandbox):
    """A 429/503 with Retry-After speaks for the client: a delivery for another record
    arriving in the next tick waits too (no attempt spent), then both land."""
    import time

    first, second = contact_ids(sf_sandbox, 2)
    runtime.journal.events.record(apten_event(1, first))
    sf_sandbox.add_fault("PATCH", r"/composite/sobjects$", 429,
                         [{"errorCode": "REQUEST_LIMIT", "message": "try later"}],
                         headers={"Retry-After": "2"}, times=20)
    assert runtime.tick().retry == 1
    sf_sandbox.faults.clear()
    patches = len(sf_sandbox.requests_to(r"/composite/sobjects$", "PATCH"))
    runtime.journal.events.record(apten_event(2, second))
    stats = runtime.tick()
    assert (stats.done, stats.dead) == (0, 0)
    assert len(sf_sandbox.requests_to(r"/composite/sobjects$", "PATCH")) == patches   # held: no call
    (held,) = [r for r in runtime.journal.reports.export_rows(None) if r["target_record"] == second]
    assert held["attempts"] == 0 and "Retry-After" in (held["error"] or "")
    time.sleep(2.2)
    assert runtime.tick().done == 2
    assert all(sf_sandbox.get_record("Contact", r)["SMS_Opt_Out__c"] for r in (first, second))


def test_concurrent_limit_is_retried_not_a_pause(runtime, sf_sandbox):
    rid = contact_ids(sf_sandbox, 1)[0]
    runtime.journal.events.record(apten_event(1, rid))
    sf_sandbox.refuse_concurrent(times=1, limit="ConcurrentPerOrgLongTxn")
    stats = runtime.tick()
    assert stats.done == 1 and runtime.journal.ops.crm_pause("salesforce") is None
    assert len(sf_sandbox.requests_to(r"/composite/sobjects$", "PATCH")) == 2  # refused, then retried
    assert sf_sandbox.get_record("Contact", rid)["SMS_Opt_Out__c"] is True


def test_api_budget_pauses_before_the_limit(runtime, sf_sandbox):
    ids = contact_ids(sf_sandbox, 2)
    runtime.journal.events.record(apten_event(1, ids[0]))
    sf_sandbox.use_quota(13_499)  # other integrations; the budget is 90 % of 15,000 = 13,500
    assert runtime.tick().done == 1  # the composite call makes 13,500: budget reached
    until, reason = runtime.journal.ops.crm_pause("salesforce")
    assert reason == "API budget reached: 13500 of 15000 daily requests used (budget 90%)"
    runtime.journal.events.record(apten_event(2, ids[1]))
    sf_sandbox.clear_log()
    assert runtime.tick().retry == 1
    assert sf_sandbox.requests_to(r"/services/data/") == []
    # The probe finds usage still at the budget: paused again; later it has fallen: resumed.
    _end_pause(runtime.journal)
    _due_now(runtime.journal)
    assert runtime.tick().retry == 1
    assert runtime.journal.ops.crm_pause("salesforce") is not None
    sf_sandbox.reset_quota()
    _end_pause(runtime.journal)
    _due_now(runtime.journal)
    assert runtime.tick().done == 1
    assert runtime.journal.ops.crm_pause("salesforce") is None


def test_budget_is_configurable(sf_config, sf_sandbox):
    from syncd.runtime import open_runtime

    sf_config.crm.salesforce.api_budget_percent = 50.0
    rt = open_runtime(sf_config)
    try:
        rt.journal.events.record(apten_event(1, contact_ids(sf_sandbox, 1)[0]))
        sf_sandbox.use_quota(7_600)
        rt.tick()
        assert "budget 50%" in rt.journal.ops.crm_pause("salesforce")[1]
    finally:
        rt.journal.close()


def _pause_survives_a_new_pusher(cfg, sf_sandbox):
    """A pause set by one process is honoured by another on the same journal (a replica,
    or the same daemon after a restart)."""
    import time

    from syncd.runtime import open_runtime

    ids = contact_ids(sf_sandbox, 2)
    first = open_runtime(cfg)
    try:
        first.journal.events.record(apten_event(1, ids[0]))
        sf_sandbox.exhaust_quota()
        first.tick()
        assert first.journal.ops.crm_pause("salesforce") is not None
    finally:
        first.journal.close()
    sf_sandbox.reset_quota()  # quota is back, but nobody has looked yet
    second = open_runtime(cfg)
    try:
        second.journal.events.record(apten_event(2, ids[1]))
        _due_now(second.journal)
        sf_sandbox.clear_log()
        stats = second.tick()
        assert stats.retry == 2 and stats.done == 0
        assert sf_sandbox.requests_to(r"/services/data/") == []
        time.sleep(0.01)
        assert second.pauses.circuit_problem(longer_than=0) is not None  # /readyz sees it too
        _end_pause(second.journal)
        _due_now(second.journal)
        assert second.tick().done == 2
    finally:
        second.journal.close()


def test_pause_is_kept_in_the_journal_sqlite(sf_config, sf_sandbox):
    _pause_survives_a_new_pusher(sf_config, sf_sandbox)


def test_pause_is_kept_in_the_journal_postgres(sf_config, sf_sandbox):
    import os
    import time

    import pytest

    url = os.environ.get("SYNCD_TEST_PG_URL")
    if not url:
        pytest.skip("SYNCD_TEST_PG_URL not set")
    import psycopg

    schema = f"tpause{os.getpid()}_{time.time_ns()}"
    sf_config.journal.url = f"{url}{'&' if '?' in url else '?'}schema={schema}"
    try:
        _pause_survives_a_new_pusher(sf_config, sf_sandbox)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_routing_waits_while_paused(runtime, sf_sandbox):
    from syncd.events import ConsentEvent as Event

    runtime.journal.ops.pause_crm("salesforce", 4e9, "quota exhausted")
    runtime.journal.events.record(Event(source="apten", source_event_id="p1", kind="opt_out", channel="sms",
                                 occurred_at=datetime(2024, 2, 18, tzinfo=timezone.utc),
                                 received_at=datetime.now(timezone.utc), raw=b"{}", phone="+13305551234"))
    sf_sandbox.clear_log()
    stats = runtime.tick()
    assert (stats.routed, stats.quarantined) == (0, 0)
    assert sf_sandbox.requests_to(r"/search/") == []


def test_retries_are_bounded_by_attempts(runtime, sf_sandbox):
    import time

    from syncd.backoff import RetryPolicy

    runtime.pusher.policy = RetryPolicy(runtime.cfg.retry.model_copy(update={"max_attempts": 2}))
    runtime.journal.events.record(apten_event(1, "003XX000004DHPY"))
    sf_sandbox.add_fault("PATCH", r"/composite/sobjects$", 503,
                         [{"errorCode": "SERVER_UNAVAILABLE", "message": "maintenance"}], times=100)
    assert runtime.tick().retry == 1
    with runtime.journal.engine.begin() as tx:
        cur = tx.cur
        cur.execute("UPDATE deliveries SET next_attempt_at = 0")
    time.sleep(0.01)
    assert runtime.tick().dead == 1
    (dead,) = runtime.journal.reports.dead_letters()
    assert dead["error"].startswith("gave up after 2 attempts: ") and "maintenance" in dead["error"]


def test_retries_are_bounded_by_age(runtime, sf_sandbox):
    from syncd.backoff import RetryPolicy

    runtime.pusher.policy = RetryPolicy(runtime.cfg.retry.model_copy(update={"max_age_hours": 1.0}))
    old = apten_event(1, "003XX000004DHPY")
    old.received_at = datetime.now(timezone.utc) - timedelta(hours=2)
    runtime.journal.events.record(old)
    sf_sandbox.add_fault("PATCH", r"/composite/sobjects$", 503,
                         [{"errorCode": "SERVER_UNAVAILABLE", "message": "maintenance"}], times=100)
    assert runtime.tick().dead == 1
    assert runtime.journal.reports.dead_letters()[0]["error"].startswith("gave up after 1 h: ")


def test_delivery_for_a_crm_no_longer_configured_is_dead_lettered_not_stuck(runtime, sf_sandbox):
    from connectors.types import RecordRef

    rec = runtime.journal.events.record(apten_event(1, "lead_abc123"))
    runtime.journal.deliveries.add_targets(rec.event_id, [RecordRef("close", "lead", "lead_abc123")])
    stats = runtime.tick()
    assert stats.dead == 1
    assert "CRM close is not enabled" in runtime.journal.reports.dead_letters()[0]["error"]


def test_routing_is_its_own_step_and_the_pusher_only_pushes(runtime, sf_sandbox):
    (rid,) = contact_ids(sf_sandbox, 1)
    runtime.journal.events.record(apten_event(1, rid))
    sf_sandbox.clear_log()
    stats = runtime.pusher.run_once()                     # nothing routed yet: nothing to push
    assert (stats.claimed, stats.done) == (0, 0)
    assert runtime.journal.reports.counts()["events"]["unrouted"] == 1
    assert runtime.routing.tick().routed == 1             # the routing step makes the delivery...
    assert sf_sandbox.requests_to(r"/composite/") == []   # ...and writes nothing to the CRM
    assert runtime.pusher.run_once().done == 1
    assert sf_sandbox.get_record("Contact", rid)["SMS_Opt_Out__c"] is True


def test_failed_phone_lookups_count_toward_the_crms_health(runtime, sf_sandbox):
    """Routing's lookups and the pusher's updates feed one health record per CRM (the
    status page's table and the failing / recovered alerts)."""
    from syncd.crm_health import FAILING_AFTER

    sf_sandbox.add_fault("GET", r"/search/", 503, [{"errorCode": "SERVER_UNAVAILABLE", "message": "busy"}],
                         times=1000)
    for n in range(FAILING_AFTER):  # lookups are batched per tick: one failing search a tick
        runtime.journal.events.record(ConsentEvent(
            source="apten", source_event_id=f"l{n}", kind="opt_out", channel="sms",
            occurred_at=datetime(2024, 2, 18, tzinfo=timezone.utc), received_at=datetime.now(timezone.utc),
            raw=b"{}", phone="+13305551234"))
        stats = runtime.tick()
        assert (stats.routed, stats.quarantined) == (0, 0)                   # deferred, not lost
    health = runtime.health.report()["salesforce"]
    assert health["consecutive_failures"] == FAILING_AFTER and health["failing_since"] is not None
    assert "busy" in health["last_error"]
    sf_sandbox.faults.clear()
    runtime.journal.events.record(apten_event(99, "003XX000004DHPYYA4"))  # routed by id, then pushed
    assert runtime.tick().done >= 1
    health = runtime.health.report()["salesforce"]
    assert health["consecutive_failures"] == 0 and health["last_success"] is not None
