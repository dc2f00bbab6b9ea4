"""The journal contract, run against every engine (PostgreSQL when SYNCD_TEST_PG_URL is set)."""
from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from connectors.types import RecordRef
from syncd.events import ConsentEvent
from syncd.journal import open_journal
from syncd.journal.base import JournalBusy, Outcome

REF = RecordRef("salesforce", "Contact", "003XX000004DHPYYA4")


def notifications(journal, max_attempts: int):
    """The reflector's side of Sinch notifications: it decides, the store applies."""
    from syncd.backoff import RetryPolicy
    from syncd.config import RetryConfig
    from syncd.reflector import SinchNotifications

    policy = RetryPolicy(RetryConfig(max_attempts=max_attempts))
    if journal is None:
        return SinchNotifications(None, None, policy)  # type: ignore[arg-type]   # decisions only
    return SinchNotifications(journal.reflections, journal.events, policy)


def event(n: int = 1, **kw) -> ConsentEvent:
    base = dict(source="apten", source_event_id=f"ev-{n}", kind="opt_out", channel="sms",
                occurred_at=datetime(2024, 2, 18, 9, 45, n % 60, tzinfo=timezone.utc),
                received_at=datetime.now(timezone.utc), raw=b'{"x": 1}', external_lead_id="003XX000004DHPY",
                phone="+13305551234", phone_raw="+13305551234", message="STOP")
    base.update(kw)
    return ConsentEvent(**base)


def test_record_is_idempotent_per_source_and_id(journal):
    first = journal.events.record(event(1))
    again = journal.events.record(event(1))
    other_source = journal.events.record(event(1, source="lox24"))
    assert first.created and not again.created and other_source.created
    assert first.event_id == again.event_id != other_source.event_id
    assert journal.reports.counts()["events"]["received"] == 2


def test_raw_body_and_details_survive(journal):
    rec = journal.events.record(event(1, raw=b"\x00\xffbytes", details={"reason_label": "Es ist unverständlich"}))
    stored = journal.events.get(rec.event_id)
    assert stored.details == {"reason_label": "Es ist unverständlich"}
    assert stored.status == "new"


def test_route_claim_settle_cycle(journal):
    rec = journal.events.record(event(1))
    assert [e.id for e in journal.events.to_route(10)] == [rec.event_id]
    journal.deliveries.add_targets(rec.event_id, [REF])
    journal.deliveries.add_targets(rec.event_id, [REF])  # idempotent
    assert journal.events.to_route(10) == []
    claimed = journal.deliveries.claim(10, 60)
    assert [(d.ref, d.attempts, d.kind, d.channel) for d in claimed] == [(REF, 1, "opt_out", "sms")]
    assert journal.deliveries.claim(10, 60) == []  # leased
    journal.deliveries.settle([Outcome(claimed[0].id, "done", ref=REF, applied={"SMS_Opt_Out__c": True},
                            applied_at=claimed[0].occurred_at, applied_event_id=rec.event_id)])
    counts = journal.reports.counts()
    assert counts["deliveries"] == {"pending": 0, "retrying": 0, "done": 1, "dead": 0}
    assert journal.deliveries.clocks([REF])[REF]["SMS_Opt_Out__c"].value is True
    row = next(journal.reports.export_rows(None))
    assert row["state"] == "done" and row["target_record"] == REF.record_id and row["delivered_at"]


def test_found_targets_are_unique_per_event_and_record_and_never_preempt_routing(journal):
    """The reflector's poll adds targets of its own: a new event keeps waiting for its
    routing, a quarantined one is routed, and a target an event has is never added twice."""
    lead = RecordRef("salesforce", "Lead", "00QXX000001LOX22AO")
    new = journal.events.record(event(1)).event_id
    parked = journal.events.record(event(2)).event_id
    journal.events.quarantine(parked, "no record has this phone")
    assert journal.deliveries.add_found_targets([(new, [lead]), (parked, [lead])]) == 2
    assert journal.events.get(new).status == "new" and journal.events.get(parked).status == "routed"
    assert journal.deliveries.add_found_targets([(new, [lead]), (parked, [lead])]) == 0
    assert [e.id for e in journal.events.to_route(10)] == [new]          # its own routing still runs
    journal.deliveries.add_targets(new, [REF, lead])
    assert journal.deliveries.add_found_targets([(new, [REF, lead])]) == 0
    assert sorted((d.event_id, d.ref.record_id) for d in journal.deliveries.claim(10, 60)) == [
        (new, REF.record_id), (new, lead.record_id), (parked, lead.record_id)]


def test_expired_lease_is_claimed_again(journal):
    rec = journal.events.record(event(1))
    journal.deliveries.add_targets(rec.event_id, [REF])
    assert len(journal.deliveries.claim(10, 0.2)) == 1
    time.sleep(0.3)
    again = journal.deliveries.claim(10, 60)
    assert len(again) == 1 and again[0].attempts == 2


def test_retry_then_dead_then_replay(journal):
    rec = journal.events.record(event(1))
    journal.deliveries.add_targets(rec.event_id, [REF])
    d = journal.deliveries.claim(10, 60)[0]
    journal.deliveries.settle([Outcome(d.id, "retry", error="503 busy", retry_at=time.time() + 0.2, ref=REF)])
    assert journal.deliveries.claim(10, 60) == []
    assert journal.reports.counts()["deliveries"]["retrying"] == 1
    time.sleep(0.25)
    d = journal.deliveries.claim(10, 60)[0]
    journal.deliveries.settle([Outcome(d.id, "dead", error="FIELD_CUSTOM_VALIDATION_EXCEPTION: nope", ref=REF)])
    dead = journal.reports.dead_letters()
    assert [(x["id"], x["error"]) for x in dead] == [(f"d{d.id}", "FIELD_CUSTOM_VALIDATION_EXCEPTION: nope")]
    assert journal.replay([f"d{d.id}"]) == 1
    assert journal.reports.dead_letters() == []
    assert journal.deliveries.claim(10, 60)[0].attempts == 1


def test_quarantine_visible_and_replayable(journal):
    rec = journal.events.record(event(1, external_lead_id="//evil.example/x", phone=None, phone_raw=None,
                               quarantine_reason="no route"))
    assert journal.events.to_route(10) == []
    assert journal.reports.counts()["quarantined"] == 1
    assert [x["id"] for x in journal.reports.dead_letters()] == [f"q{rec.event_id}"]
    assert journal.replay(None) == 1
    assert [e.id for e in journal.events.to_route(10)] == [rec.event_id]


def test_a_records_deliveries_are_claimed_together(journal):
    for n in range(3):
        rec = journal.events.record(event(n))
        journal.deliveries.add_targets(rec.event_id, [REF])
    first = journal.deliveries.claim(2, 60)
    assert len(first) == 2
    assert journal.deliveries.claim(10, 60) == []  # the third waits: its record has a live lease


def test_field_clock_never_moves_backwards(journal):
    rec = journal.events.record(event(1))
    journal.deliveries.add_targets(rec.event_id, [REF])
    d = journal.deliveries.claim(10, 60)[0]
    journal.deliveries.settle([Outcome(d.id, "done", ref=REF, applied={"F": True},
                                       applied_at="2024-06-01T00:00:00.000000Z")])
    rec2 = journal.events.record(event(2))
    journal.deliveries.add_targets(rec2.event_id, [REF])
    d2 = journal.deliveries.claim(10, 60)[0]
    journal.deliveries.settle([Outcome(d2.id, "done", ref=REF, applied={"F": False},
                                       applied_at="2024-01-01T00:00:00.000000Z")])
    clock = journal.deliveries.clocks([REF])[REF]["F"]
    assert (clock.occurred_at, clock.value) == ("2024-06-01T00:00:00.000000Z", True)


def test_release_leases_returns_in_flight_work(journal):
    rec = journal.events.record(event(1))
    journal.deliveries.add_targets(rec.event_id, [REF])
    assert len(journal.deliveries.claim(10, 600)) == 1
    assert journal.deliveries.release_leases() == 1
    again = journal.deliveries.claim(10, 600)
    assert len(again) == 1 and again[0].attempts == 1


def test_watermarks(journal):
    assert journal.ops.get_watermark("salesforce") == (None, None)
    journal.ops.set_watermark("salesforce", "2024-01-01T00:00:00Z", "003A")
    journal.ops.set_watermark("salesforce", "2024-01-02T00:00:00Z", "003B")
    assert journal.ops.get_watermark("salesforce") == ("2024-01-02T00:00:00Z", "003B")


def test_replay_rejects_malformed_ids(journal):
    with pytest.raises(ValueError):
        journal.replay(["x1; DROP TABLE events"])


def test_one_serve_per_sqlite_file(tmp_path):
    a = open_journal(f"sqlite:///{tmp_path}/j.db")
    b = open_journal(f"sqlite:///{tmp_path}/j.db")
    a.ops.acquire_serve_lock()
    with pytest.raises(JournalBusy, match="another syncd serve"):
        b.ops.acquire_serve_lock()
    a.close()
    b.ops.acquire_serve_lock()
    b.close()


# --- reflections to Sinch ------------------------------------------------------------------

def test_reflection_registered_once_per_phone_and_channel(journal):
    from syncd.journal.base import ReflectionCandidate

    cand = ReflectionCandidate(REF, "+13305551234", "opt_out")
    assert journal.reflections.add([cand, cand], ["WHATSAPP"], ("reflect:salesforce", "t1", "id1")) == 1
    assert journal.reflections.add([cand], ["WHATSAPP"]) == 0          # a later poll sees it again
    assert journal.ops.get_watermark("reflect:salesforce") == ("t1", "id1")
    assert journal.reflections.add([ReflectionCandidate(REF, "+13305551234", "opt_in")], ["WHATSAPP"]) == 1
    assert journal.reflections.add([ReflectionCandidate(REF, "+15550000000", "opt_in")], ["WHATSAPP"]) == 0
    assert journal.reports.counts()["reflections"] == {"pending": 2, "done": 0, "failed": 0}


def test_reflection_lifecycle_with_notification(journal):
    from syncd.journal.base import ReflectionCandidate, ReflectionOutcome

    journal.reflections.add([ReflectionCandidate(REF, "+13305551234", "opt_out")], ["WHATSAPP"])
    (r,) = journal.reflections.claim(10, 60)
    assert journal.reflections.claim(10, 60) == []
    journal.reflections.settle([ReflectionOutcome(r.id, "registered", at=time.time() + 60)])
    note = event(9, source="sinch", event_type="consent", kind="opt_out", channel="whatsapp",
                 details={"status": "OPT_OUT_SUCCEEDED", "request_id": r.request_id, "sinch_channel": "WHATSAPP"})
    stored = journal.events.get(journal.events.record(note).event_id)
    assert notifications(journal, 15).reconcile(stored) is True
    assert journal.reports.counts()["reflections"] == {"pending": 0, "done": 1, "failed": 0}
    assert journal.events.get(stored.id).status == "reconciled"


def test_failed_and_missing_notifications_retry_then_die_then_replay(journal):
    from syncd.journal.base import ReflectionCandidate, ReflectionOutcome

    journal.reflections.add([ReflectionCandidate(REF, "+13305551234", "opt_out")], ["WHATSAPP"])
    (r,) = journal.reflections.claim(10, 60)
    journal.reflections.settle([ReflectionOutcome(r.id, "registered", at=time.time() - 1)])
    assert journal.reflections.expire(2, "no notification") == 1       # deadline passed: register again
    (r,) = journal.reflections.claim(10, 60)
    assert r.attempts == 2
    journal.reflections.settle([ReflectionOutcome(r.id, "registered", at=time.time() + 60)])
    failed = event(8, source="sinch", event_type="reflection_result", kind="opt_out", channel="whatsapp",
                   details={"status": "OPT_OUT_FAILED", "request_id": r.request_id, "sinch_channel": "WHATSAPP",
                            "error_details": {"description": "not a WhatsApp user"}})
    stored = journal.events.get(journal.events.record(failed).event_id)
    assert notifications(journal, 2).reconcile(stored) is True
    (dead,) = [x for x in journal.reports.dead_letters() if x["type"] == "reflection"]
    assert "not a WhatsApp user" in dead["error"]
    assert journal.reports.counts()["reflections"]["failed"] == 1
    # dead: Sinch never took it, so a new flag may register again; replay re-queues it
    assert journal.replay([dead["id"]]) == 1
    assert journal.reports.counts()["reflections"] == {"pending": 1, "done": 0, "failed": 0}


def test_sinch_opt_out_from_elsewhere_is_remembered(journal):
    from syncd.journal.base import ReflectionCandidate

    note = event(7, source="sinch", kind="opt_out", channel="whatsapp", phone="+13305551234",
                 details={"status": "OPT_OUT_SUCCEEDED", "sinch_channel": "WHATSAPP"})
    stored = journal.events.get(journal.events.record(note).event_id)
    assert notifications(journal, 15).reconcile(stored) is False   # a consent change to route
    assert journal.reflections.add([ReflectionCandidate(REF, "+13305551234", "opt_out")], ["WHATSAPP"]) == 0


def test_events_are_leased_for_routing(journal):
    rec = journal.events.record(event(1))
    assert [e.id for e in journal.events.to_route(10, lease_seconds=0.2)] == [rec.event_id]
    assert journal.events.to_route(10) == []          # another replica sees nothing while leased
    time.sleep(0.3)
    assert [e.id for e in journal.events.to_route(10)] == [rec.event_id]  # routing died: offered again


def test_a_new_serve_takes_over_a_dead_serves_routing_leases(tmp_path):
    dead = open_journal(f"sqlite:///{tmp_path}/j.db")
    rec = dead.events.record(event(1))
    assert len(dead.events.to_route(10, lease_seconds=600)) == 1   # then the process is killed
    successor = open_journal(f"sqlite:///{tmp_path}/j.db")
    assert successor.events.to_route(10) == []
    successor.ops.acquire_serve_lock()                                   # proves the old serve is gone
    assert [e.id for e in successor.events.to_route(10)] == [rec.event_id]
    successor.close()
    dead.close()


def test_concurrent_records_group_commit_with_duplicates(journal):
    """Eight threads record overlapping events at once: each distinct event is created
    exactly once, and every copy gets that event's id (batched inserts included)."""
    import threading

    results: list[tuple[int, int, bool]] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        for n in range(offset, offset + 40):
            rec = journal.events.record(event(n % 60))      # threads overlap on most ids
            with lock:
                results.append((n % 60, rec.event_id, rec.created))

    threads = [threading.Thread(target=worker, args=(i * 5,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    by_key: dict[int, set[int]] = {}
    for key, event_id, _ in results:
        by_key.setdefault(key, set()).add(event_id)
    assert all(len(ids) == 1 for ids in by_key.values())
    assert sum(1 for _, _, created in results if created) == len(by_key)
    assert journal.reports.counts()["events"]["received"] == len(by_key)


def test_a_bad_row_fails_only_its_own_request(journal):
    j = journal
    good = event(1)
    bad = event(2, source=None)          # violates NOT NULL
    import threading

    out: dict[str, object] = {}

    def rec(name, ev):
        try:
            out[name] = j.events.record(ev)
        except Exception as exc:  # the journal's own error for this request
            out[name] = exc

    threads = [threading.Thread(target=rec, args=(name, ev)) for name, ev in (("good", good), ("bad", bad))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert out["good"].created and isinstance(out["bad"], Exception)
    assert j.events.record(event(3)).created                  # and the journal goes on


def test_a_failed_commit_wakes_every_waiting_request(tmp_path, monkeypatch):
    """When the transaction itself fails (disk full, I/O error), every request in
    the batch gets the error; none is left waiting, and later requests still commit."""
    import sqlite3
    import threading
    from contextlib import contextmanager

    j = open_journal(f"sqlite:///{tmp_path}/j.db")
    real_write = j.engine.ingest
    failing = threading.Event()
    failing.set()

    @contextmanager
    def flaky_write():
        with real_write() as cur:
            yield cur
            if failing.is_set():
                time.sleep(0.05)  # let the other requests queue up behind this commit
                raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(j.engine, "ingest", flaky_write)
    out: dict[int, object] = {}

    def rec(n: int) -> None:
        try:
            out[n] = j.events.record(event(n))
        except Exception as exc:  # the journal's own error for this request
            out[n] = exc

    threads = [threading.Thread(target=rec, args=(n,), daemon=True) for n in range(8)]
    [t.start() for t in threads]
    [t.join(timeout=10) for t in threads]
    assert not any(t.is_alive() for t in threads), "a request was left waiting"
    assert all(isinstance(out[n], sqlite3.OperationalError) for n in range(8))
    assert j.reports.counts()["events"]["received"] == 0               # nothing half-committed
    failing.clear()
    assert j.events.record(event(99)).created
    j.close()


def test_a_lone_request_after_a_burst_waits_only_briefly(tmp_path):
    """The leader waits for as many events as the last commit carried, but only for
    GATHER_SECONDS: a request arriving alone after a burst is not held up."""
    import threading

    j = open_journal(f"sqlite:///{tmp_path}/j.db")
    threads = [threading.Thread(target=j.events.record, args=(event(n),)) for n in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    j.events.group.last_batch = 8                    # as after a full batch of 8
    started = time.perf_counter()
    rec = j.events.record(event(100))
    elapsed = time.perf_counter() - started
    assert rec.created and j.events.group.last_batch == 1
    assert elapsed < j.events.group.GATHER_SECONDS + 0.5, elapsed
    j.close()


def test_a_bad_row_in_the_same_batch_as_good_ones_fails_alone(journal):
    """Deterministic form of the test above: one batch holding a bad row between two good ones."""
    from syncd.batching import Waiter

    first, bad, last = Waiter(event(1)), Waiter(event(2, source=None)), Waiter(event(3))
    journal.events.group._handle([first, bad, last], first)
    assert first.outcome().created and last.outcome().created
    assert isinstance(bad.error, Exception)
    assert not bad.lock.locked() and not last.lock.locked()     # both were woken
    assert journal.reports.counts()["events"]["received"] == 2


def test_crm_pause_is_shared_and_one_process_checks_its_end(journal):
    assert journal.ops.crm_pause("salesforce") is None
    journal.ops.pause_crm("salesforce", 2_000_000_000.0, "quota exhausted: TotalRequests Limit exceeded.")
    assert journal.ops.crm_pause("salesforce") == (2_000_000_000.0, "quota exhausted: TotalRequests Limit exceeded.")
    assert journal.ops.crm_pause("hubspot") is None
    assert not journal.ops.take_pause_probe("salesforce", now=1_000.0, next_until=1_300.0)  # not over yet
    journal.ops.pause_crm("salesforce", 900.0, "quota exhausted")
    assert journal.ops.take_pause_probe("salesforce", now=1_000.0, next_until=1_300.0)
    assert not journal.ops.take_pause_probe("salesforce", now=1_000.0, next_until=1_300.0)  # taken already
    assert journal.ops.crm_pause("salesforce") == (1_300.0, "quota exhausted")
    assert journal.reports.counts()["crms"]["salesforce"]["pause_reason"] == "quota exhausted"
    journal.ops.resume_crm("salesforce")
    assert journal.ops.crm_pause("salesforce") is None
    assert not journal.ops.take_pause_probe("salesforce", now=5_000.0, next_until=5_300.0)


def test_sinch_error_details_are_stored_masked(journal):
    from syncd.journal.base import ReflectionCandidate, ReflectionOutcome

    journal.reflections.add([ReflectionCandidate(REF, "+4911113333444", "opt_out")], ["WHATSAPP"])
    (r,) = journal.reflections.claim(10, 60)
    journal.reflections.settle([ReflectionOutcome(r.id, "registered", at=time.time() + 60)])
    failed = event(6, source="sinch", event_type="reflection_result", kind="opt_out", channel="whatsapp",
                   details={"status": "OPT_OUT_FAILED", "request_id": r.request_id, "sinch_channel": "WHATSAPP",
                            "error_details": {"description": "4911113333444 (jürgen.müller@exämple.de) "
                                                             "is not a WhatsApp user"}})
    stored = journal.events.get(journal.events.record(failed).event_id)
    assert notifications(journal, 1).reconcile(stored) is True
    (dead,) = [x for x in journal.reports.dead_letters() if x["type"] == "reflection"]
    assert "is not a WhatsApp user" in dead["error"] and "OPT_OUT_FAILED" in dead["error"]
    assert "4911113333444" not in dead["error"] and "jürgen.müller" not in dead["error"]
    assert "49********444" in dead["error"] and "j***@exämple.de" in dead["error"]


# --- the stores apply decisions; the callers make them -------------------------------------

def _claimed_once(journal):
    rec = journal.events.record(event(1))
    journal.deliveries.add_targets(rec.event_id, [REF])
    (d,) = journal.deliveries.claim(10, 60)
    return d


def test_a_paused_outcome_gives_the_attempt_back_and_a_retry_never_does(journal):
    d = _claimed_once(journal)
    assert d.attempts == 1
    journal.deliveries.settle([Outcome(d.id, "paused", error="CRM paused: API quota", retry_at=0, ref=REF)])
    (d,) = journal.deliveries.claim(10, 60)
    assert d.attempts == 1                                   # the pause cost no attempt
    journal.deliveries.settle([Outcome(d.id, "retry", error="x", retry_at=0, ref=REF, note="paused")])
    (d,) = journal.deliveries.claim(10, 60)
    assert d.attempts == 2                                   # a note is only a note: a retry costs one


def test_only_outcomes_that_wrote_to_the_crm_count_as_its_last_push(journal):
    d = _claimed_once(journal)
    journal.deliveries.settle([Outcome(d.id, "done", ref=REF, note="applied", wrote=False)])
    assert "salesforce" not in journal.reports.counts()["crms"]
    rec = journal.events.record(event(2))
    journal.deliveries.add_targets(rec.event_id, [REF])
    (d,) = journal.deliveries.claim(10, 60)
    journal.deliveries.settle([Outcome(d.id, "done", ref=REF, note="superseded", wrote=True)])
    assert journal.reports.counts()["crms"]["salesforce"]["last_push_at"] is not None


def test_sinch_results_are_decided_by_the_reflector():
    from syncd.journal.base import Registration

    decide = notifications(None, 3).outcome
    assert decide(Registration(7, 1), "OPT_OUT_SUCCEEDED", True, {}).state == "done"
    retry = decide(Registration(7, 1), "OPT_OUT_FAILED", False,
                   {"error_details": {"description": "+4915112345678 is unknown"}})
    assert retry.state == "retry" and retry.at and retry.at > time.time()
    assert "OPT_OUT_FAILED" in retry.error and "is unknown" in retry.error and "+4915112345678" not in retry.error
    dead = decide(Registration(7, 3), "OPT_OUT_FAILED", False, {})
    assert dead.state == "dead" and dead.error.startswith("gave up after 3 attempts: OPT_OUT_FAILED")
    unsupported = decide(Registration(7, 1), "OPT_IN_STATUS_UNSPECIFIED", False, {"sinch_channel": "VIBERBM"})
    assert unsupported.state == "dead" and "channel VIBERBM does not support opt-in registration" in unsupported.error
