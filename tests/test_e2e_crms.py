"""Three CRMs at once: routing by id format, HubSpot batching and rate limits, Close,
email opt-outs through each CRM's own unsubscribe API."""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from syncd.events import ConsentEvent
from tests.support.stack import ALL_CRMS, Stack, wait_for
from tests.conftest import fixture_bytes

pytestmark = pytest.mark.slow


def apten(ext_id: str, channel: str, n: int = 0) -> bytes:
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    doc["data"].update(externalLeadId=ext_id, channel=channel, phone=None)
    doc["timestamp"] = f"2024-02-18T09:45:{n:02d}Z"
    return json.dumps(doc).encode()


@pytest.fixture
def served_all():
    st = Stack(crms=ALL_CRMS).start()
    daemon = st.serve()
    yield st
    assert daemon.terminate() == 0
    st.cleanup()


def test_ids_route_to_hubspot_and_close_and_email_uses_unsubscribe_apis(served_all):
    st = served_all
    hs, cl, sf = st.sandboxes["hubspot"], st.sandboxes["close"], st.sandboxes["salesforce"]
    for body in (apten("51", "sms", 1), apten("51", "email", 2), apten("lead_abc123", "call", 3),
                 apten("lead_abc123", "email", 4)):
        assert st.post_apten(body).status_code == 200
    assert wait_for(lambda: hs.get_contact("51")["sms_opt_out"] == "true")
    assert wait_for(lambda: cl.custom_value("lead_abc123", "Call Opt Out") not in (None, "", False))
    assert wait_for(lambda: len(hs.unsubscribes) == 1 and "sam.okafor@example.com" in cl.unsubscribed)
    unsub = hs.unsubscribes[0]
    assert (unsub["email"], str(unsub["subscriptionId"])) == ("ana.silva@example.com", "1001")
    assert hs.get_contact("51")["call_opt_out"] == "false"          # other channels untouched
    assert cl.custom_value("lead_abc123", "SMS Opt Out") in (None, "", False)
    assert sf.requests_to(r"/composite/") == []                     # nothing went to Salesforce

    def targets():
        return sorted((r["target_crm"], r["target_object"], r["target_record"], r["state"]) for r in
                      (json.loads(x) for x in st.syncd("export", "--format", "jsonl").stdout.splitlines()))
    # The Close email opt-out names the lead; its address (read from the lead) also reaches
    # the Close contact carrying it (fan-out by email).
    assert wait_for(lambda: targets() == [("close", "contact", "cont_abc123", "done"),
                                          ("close", "lead", "lead_abc123", "done"),
                                          ("close", "lead", "lead_abc123", "done"),
                                          ("hubspot", "contact", "51", "done"),
                                          ("hubspot", "contact", "51", "done")]), targets()


def test_phone_lookup_spans_every_crm(served_all):
    st = served_all
    st.sandboxes["hubspot"].add_contact("77", phone="+4911113333444", sms_opt_out="false")
    assert st.post_lox24(fixture_bytes("lox24_phone_unsubscribe.json")).status_code == 200
    assert wait_for(lambda: st.sandboxes["hubspot"].get_contact("77")["sms_opt_out"] == "true")
    assert wait_for(lambda: st.sandboxes["salesforce"].get_record("Lead", "00QXX000001LOX22AO")["SMS_Opt_Out__c"])
    def exported():
        return [json.loads(x) for x in st.syncd("export", "--format", "jsonl").stdout.splitlines()]
    assert wait_for(lambda: [r["state"] for r in exported()] == ["done", "done"])
    assert sorted(r["target_crm"] for r in exported()) == ["hubspot", "salesforce"]


def event(n: int, ext_id: str, channel: str = "sms") -> ConsentEvent:
    at = datetime(2024, 2, 18, tzinfo=timezone.utc) + timedelta(seconds=n)
    return ConsentEvent(source="apten", source_event_id=f"h{n}", kind="opt_out", channel=channel, occurred_at=at,
                        received_at=datetime.now(timezone.utc), raw=b"{}", external_lead_id=ext_id)


def test_150_hubspot_contacts_in_two_batch_calls(crm_stack, stack_runtime):
    hs = crm_stack.sandboxes["hubspot"]
    ids = [hs.add_contact(None, sms_opt_out="false") for _ in range(150)]
    for n, cid in enumerate(ids):
        stack_runtime.journal.events.record(event(n, cid))
    hs.clear_log()
    stats = stack_runtime.tick()
    assert (stats.done, stats.dead) == (150, 0)
    sizes = [len(r.json()["inputs"]) for r in hs.requests_to(r"/contacts/batch/update$", "POST")]
    assert sorted(sizes) == [50, 100]
    assert all(hs.get_contact(c)["sms_opt_out"] == "true" for c in ids)


def test_rolling_window_429_is_waited_out_and_the_event_lands(crm_stack, stack_runtime):
    hs = crm_stack.sandboxes["hubspot"]
    ids = ["51"] + [hs.add_contact(None, call_opt_out="false") for _ in range(249)]
    for n, cid in enumerate(ids):
        stack_runtime.journal.events.record(event(n, cid, "call"))
    hs.set_rate_limit(2, 1000)  # two requests per rolling second; the push needs three batch calls
    deadline = time.time() + 20
    while time.time() < deadline and stack_runtime.journal.reports.counts()["deliveries"]["done"] < 250:
        stack_runtime.tick()
        time.sleep(0.1)
    counts = stack_runtime.journal.reports.counts()["deliveries"]
    assert (counts["done"], counts["dead"]) == (250, 0)
    assert all(hs.get_contact(c)["call_opt_out"] == "true" for c in ids)
    assert hs.rate_limited, "the sandbox never answered 429: the test proves nothing"
    times = sorted(r.at for r in hs.requests)
    for t in hs.rate_limited:  # after each 429 the client waited out the rolling window
        later = [x for x in times if x > t + 0.001]
        assert not later or later[0] - t >= 0.9


def test_close_rate_limit_retry_after_is_honoured(crm_stack, stack_runtime):
    cl = crm_stack.sandboxes["close"]
    cl.add_fault("PUT", r"/lead/lead_abc123/$", 429, {"error": {"rate_reset": 1.0, "message": "API call limit"}},
                 headers={"Retry-After": "1"})
    stack_runtime.journal.events.record(event(1, "lead_abc123", "whatsapp"))
    started = time.time()
    stack_runtime.tick()
    puts = [r.at for r in cl.requests_to(r"/lead/lead_abc123/$", "PUT")]
    assert len(puts) == 2 and puts[1] - puts[0] >= 0.95
    assert cl.custom_value("lead_abc123", "WhatsApp Opt Out") is True
    assert time.time() - started < 10


def test_interleaved_arrivals_still_fill_each_crms_batches(crm_stack, stack_runtime):
    sf, hs = crm_stack.sandboxes["salesforce"], crm_stack.sandboxes["hubspot"]
    sf_ids = [sf.add_record("Contact", None, LastName=f"I{i}", SMS_Opt_Out__c=False) for i in range(400)]
    hs_ids = [hs.add_contact(None, sms_opt_out="false") for _ in range(400)]
    for n, (a, b) in enumerate(zip(sf_ids, hs_ids)):
        stack_runtime.journal.events.record(event(2 * n, a))
        stack_runtime.journal.events.record(event(2 * n + 1, b))
    sf.clear_log()
    hs.clear_log()
    stats = stack_runtime.tick()
    assert (stats.done, stats.dead) == (800, 0)
    assert [len(r.json()["records"]) for r in sf.requests_to(r"/composite/sobjects$", "PATCH")] == [200, 200]
    assert [len(r.json()["inputs"]) for r in hs.requests_to(r"/batch/update$", "POST")] == [100] * 4
