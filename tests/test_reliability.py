"""Nothing lost, nothing doubled: real ``syncd serve`` processes killed with SIGKILL
and SIGTERM at several points, CRM faults with Retry-After, dead letters and replay."""
from __future__ import annotations

import json
import random
import threading
import time

import pytest
import requests

from tests.support.stack import Stack, wait_for
from tests.conftest import fixture_bytes

pytestmark = pytest.mark.slow


def optout(ext_id: str, n: int, channel: str = "sms") -> bytes:
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    # no phone: each event targets its named record alone (fan-out lookups are tested elsewhere)
    doc["data"].update(externalLeadId=ext_id, channel=channel, phone=None)
    doc["timestamp"] = f"2024-02-18T09:{n // 60 % 60:02d}:{n % 60:02d}Z"
    doc["data"]["leadId"] = f"lead-{n}"
    return json.dumps(doc).encode()


def warm_up(st) -> None:
    """One delivery first, so the daemon holds a Salesforce session before the CRM stalls."""
    sf, rid = st.sandboxes["salesforce"], st.contact_ids[-1]
    assert st.post_apten(optout(rid, 3599, "call")).status_code == 200
    assert wait_for(lambda: sf.get_record("Contact", rid)["DoNotCall"] is True)
    sf.clear_log()


def status(stack) -> dict:
    return json.loads(stack.syncd("status", "--json").stdout)


@pytest.fixture
def stack_with_contacts():
    st = Stack().start()
    sf = st.sandboxes["salesforce"]
    st.contact_ids = [sf.add_record("Contact", None, LastName=f"K{i}", SMS_Opt_Out__c=False) for i in range(40)]
    yield st
    st.cleanup()


def test_kill_9_during_push_loses_nothing(stack_with_contacts):
    st = stack_with_contacts
    sf = st.sandboxes["salesforce"]
    daemon = st.serve()
    warm_up(st)
    sf.stall.set()  # the CRM hangs: the pusher is stuck mid-call holding its leases
    acked = [rid for n, rid in enumerate(st.contact_ids[:10]) if st.post_apten(optout(rid, n)).status_code == 200]
    assert len(acked) == 10
    assert wait_for(lambda: sf.requests_to(r"/composite/sobjects$", "PATCH"), timeout=15)
    daemon.kill9()
    sf.stall.clear()
    daemon = st.serve("serve2.log")
    try:
        assert wait_for(lambda: all(sf.get_record("Contact", rid)["SMS_Opt_Out__c"] for rid in acked), timeout=30)
        counts = sf.composite_writes()
        assert all(1 <= counts[rid] <= 2 for rid in acked)
        assert wait_for(lambda: status(st)["deliveries"]["done"] == 11)
    finally:
        assert daemon.terminate() == 0


def test_kill_9_during_ingest_and_claim_at_random_points(stack_with_contacts):
    st = stack_with_contacts
    sf = st.sandboxes["salesforce"]
    acked: list[str] = []
    rng = random.Random(7)
    daemon = st.serve()
    n = 0
    for round_no, kill_after in enumerate((0.15, 0.35, 0.6)):
        stop = threading.Event()

        def sender(start: int) -> None:
            i = start
            while not stop.is_set() and i < len(st.contact_ids):
                rid = st.contact_ids[i]
                try:
                    resp = st.post_apten(optout(rid, i), timeout=2)
                except requests.RequestException:
                    return  # the daemon died under us: this one was never acknowledged
                if resp.status_code == 200:
                    acked.append(rid)
                i += 1
                time.sleep(rng.uniform(0, 0.02))

        thread = threading.Thread(target=sender, args=(n,))
        thread.start()
        time.sleep(kill_after)
        daemon.kill9()
        stop.set()
        thread.join()
        n = len(st.contact_ids) if not acked else st.contact_ids.index(acked[-1]) + 1
        daemon = st.serve(f"serve{round_no + 2}.log")
    try:
        assert acked, "nothing was acknowledged: the test proves nothing"
        assert wait_for(lambda: all(sf.get_record("Contact", rid)["SMS_Opt_Out__c"] for rid in acked), timeout=40)
        counts = sf.composite_writes()
        assert max(counts[rid] for rid in acked) <= 2
        exported = [json.loads(x) for x in st.syncd("export", "--format", "jsonl").stdout.splitlines()]
        assert {r["target_record"] for r in exported if r["state"] == "done"} >= set(acked)
    finally:
        assert daemon.terminate() == 0


def test_sigterm_with_work_in_flight_exits_0_and_resumes(stack_with_contacts):
    st = stack_with_contacts
    sf = st.sandboxes["salesforce"]
    daemon = st.serve()
    warm_up(st)
    sf.stall.set()
    rid = st.contact_ids[0]
    assert st.post_apten(optout(rid, 1)).status_code == 200
    assert wait_for(lambda: sf.requests_to(r"/composite/sobjects$", "PATCH"), timeout=15)
    started = time.monotonic()
    assert daemon.terminate(timeout=12) == 0
    assert time.monotonic() - started < 10
    stopped = [x for x in daemon.log_lines() if x.get("msg") == "syncd stopped"]
    assert stopped and stopped[0]["leases_released"] == 1
    sf.stall.clear()
    daemon = st.serve("serve2.log")
    try:
        assert wait_for(lambda: sf.get_record("Contact", rid)["SMS_Opt_Out__c"] is True, timeout=20)
    finally:
        assert daemon.terminate() == 0


def test_burst_of_503_and_429_is_ridden_out_honouring_retry_after(stack_with_contacts):
    st = stack_with_contacts
    sf = st.sandboxes["salesforce"]
    for status_code in (503, 429, 503, 429):
        sf.add_fault("PATCH", r"/composite/sobjects$", status_code,
                     [{"errorCode": "SERVER_UNAVAILABLE" if status_code == 503 else "REQUEST_LIMIT",
                       "message": "try later"}], headers={"Retry-After": "1"})
    daemon = st.serve()
    try:
        rids = st.contact_ids[:5]
        for n, rid in enumerate(rids):
            assert st.post_apten(optout(rid, n)).status_code == 200
        assert wait_for(lambda: all(sf.get_record("Contact", r)["SMS_Opt_Out__c"] for r in rids), timeout=30)
        times = [r.at for r in sf.requests_to(r"/composite/sobjects$", "PATCH")]
        assert len(times) >= 5
        gaps = [b - a for a, b in zip(times, times[1:])][:4]  # after each of the four faults
        assert all(g >= 0.95 for g in gaps), gaps
        s = status(st)
        assert s["deliveries"]["dead"] == 0 and s["deliveries"]["done"] == 5
    finally:
        assert daemon.terminate() == 0


def test_rejected_record_is_dead_with_crm_text_then_replay_delivers(stack_with_contacts):
    st = stack_with_contacts
    sf = st.sandboxes["salesforce"]
    bad = st.contact_ids[1]
    sf.reject_record(bad, "FIELD_CUSTOM_VALIDATION_EXCEPTION", "SMS opt-out needs a consent source")
    daemon = st.serve()
    try:
        sf.stall.set()  # let all three queue up so they go out in one batch
        for n, rid in enumerate(st.contact_ids[:3]):
            assert st.post_apten(optout(rid, n)).status_code == 200
        sf.stall.clear()
        assert wait_for(lambda: status(st)["deliveries"]["dead"] == 1 and status(st)["deliveries"]["done"] == 2)
        (dead,) = json.loads(st.syncd("dead-letters", "--json").stdout)
        assert dead["record_id"] == bad
        assert "FIELD_CUSTOM_VALIDATION_EXCEPTION" in dead["error"]
        assert "SMS opt-out needs a consent source" in dead["error"]
        assert sf.get_record("Contact", bad)["SMS_Opt_Out__c"] is False
        sf.accept_record(bad)
        replay = st.syncd("replay", dead["id"])
        assert replay.returncode == 0
        assert replay.stdout.startswith(f"{dead['id']}: re-queued  salesforce:Contact:{bad}  (")
        assert wait_for(lambda: sf.get_record("Contact", bad)["SMS_Opt_Out__c"] is True)
        assert wait_for(lambda: status(st)["deliveries"] == {"pending": 0, "retrying": 0, "done": 3, "dead": 0})
    finally:
        assert daemon.terminate() == 0
