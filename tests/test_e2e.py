"""End to end: a real ``syncd serve`` process, Apten's seed examples over HTTP, the
Salesforce sandbox over HTTPS (throwaway CA) reached through simple-salesforce."""
from __future__ import annotations

import json
import time

import pytest
import requests

from tests.support.stack import wait_for
from tests.conftest import fixture_bytes

CONTACT = "003XX000004DHPYYA4"
pytestmark = pytest.mark.slow


@pytest.fixture
def served(stack):
    daemon = stack.serve()
    yield stack, daemon
    assert daemon.terminate() == 0


def contact(stack):
    return stack.sandboxes["salesforce"].get_record("Contact", CONTACT)


def test_seed_examples_reach_the_salesforce_contact(served):
    stack, daemon = served
    sms, email = fixture_bytes("apten_optout_sms.json"), fixture_bytes("apten_optout_email.json")
    assert stack.post_apten(sms).json()["status"] == "accepted"
    assert stack.post_apten(email).json()["status"] == "accepted"
    assert wait_for(lambda: contact(stack)["SMS_Opt_Out__c"] and contact(stack)["HasOptedOutOfEmail"])
    # One channel's opt-out never writes another channel's field.
    assert contact(stack)["DoNotCall"] is False and contact(stack)["WhatsApp_Opt_Out__c"] is False
    assert wait_for(lambda: json.loads(stack.syncd("status", "--json").stdout)["deliveries"]
                    == {"pending": 0, "retrying": 0, "done": 2, "dead": 0})


def test_bad_signatures_are_refused_and_store_nothing(served):
    stack, daemon = served
    body = fixture_bytes("apten_optout_sms.json")
    url = f"{stack.url}/webhooks/apten"
    unsigned = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=10)
    wrong = stack.post_apten(body, secret="not-the-secret")
    assert (unsigned.status_code, wrong.status_code) == (401, 401)
    assert "X-Signature-SHA256" in unsigned.json()["error"]
    status = json.loads(stack.syncd("status", "--json").stdout)
    assert status["events"]["received"] == 0
    assert stack.sandboxes["salesforce"].requests_to(r"/composite/") == []


def test_invalid_json_is_a_400_with_the_reason(served):
    stack, _ = served
    resp = stack.post_apten(b'{"event": "optOut", "data": ')
    assert resp.status_code == 400
    assert resp.json() == {"error": "body is not valid JSON", "status": 400}


def test_the_same_body_twice_has_one_effect(served):
    stack, _ = served
    sf = stack.sandboxes["salesforce"]
    body = fixture_bytes("apten_optout_sms.json")
    first, second = stack.post_apten(body), stack.post_apten(body)
    assert (first.json()["status"], second.json()["status"]) == ("accepted", "duplicate")
    assert first.json()["event_id"] == second.json()["event_id"]
    assert wait_for(lambda: json.loads(stack.syncd("status", "--json").stdout)["deliveries"]["done"] == 1)
    assert contact(stack)["SMS_Opt_Out__c"] is True
    stack.post_apten(body)
    time.sleep(0.5)  # a few push intervals: a third copy must not cause another write
    status = json.loads(stack.syncd("status", "--json").stdout)
    assert status["events"]["received"] == 1 and status["deliveries"]["done"] == 1
    patches = [r for r in sf.requests_to(r"/composite/sobjects$", "PATCH")]
    assert len(patches) == 1 and len(patches[0].json()["records"]) == 1


def test_unroutable_event_is_quarantined_with_202(served):
    stack, _ = served
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    doc["data"]["externalLeadId"] = "//evil.example/x"
    doc["data"]["phone"] = None
    resp = stack.post_apten(json.dumps(doc).encode())
    assert resp.status_code == 202 and resp.json()["status"] == "quarantined"
    dead = stack.syncd("dead-letters", "--json")
    rows = json.loads(dead.stdout)
    assert [r["type"] for r in rows] == ["quarantine"]
    assert "externalLeadId matches no routing rule" in rows[0]["error"]
    assert all("evil" not in r.path for r in stack.sandboxes["salesforce"].requests)


def test_second_serve_on_the_same_journal_is_refused(served):
    stack, _ = served
    other = stack.syncd("serve", timeout=30)
    assert other.returncode == 3
    assert "another syncd serve" in other.stderr and "Traceback" not in other.stderr


def test_sigterm_exits_zero_promptly(stack):

    daemon = stack.serve()
    started = time.monotonic()
    assert daemon.terminate(timeout=12) == 0
    assert time.monotonic() - started < 10
    assert any(line.get("msg") == "syncd stopped" for line in daemon.log_lines())


LEAD = "00QXX000001LOX22AO"


def test_lox24_seed_flags_the_lead_found_by_phone(served):
    stack, _ = served
    sf = stack.sandboxes["salesforce"]
    body = fixture_bytes("lox24_phone_unsubscribe.json")
    assert stack.post_lox24(body).json()["status"] == "accepted"
    assert wait_for(lambda: sf.get_record("Lead", LEAD)["SMS_Opt_Out__c"] is True)
    assert sf.get_record("Lead", LEAD)["DoNotCall"] is False
    assert stack.post_lox24(body).json()["status"] == "duplicate"
    assert stack.post_lox24(body, token="wrong-token-123").status_code == 401
    assert wait_for(lambda: json.loads(stack.syncd("status", "--json").stdout)["deliveries"]["done"] == 1)
    assert json.loads(stack.syncd("status", "--json").stdout)["events"]["received"] == 1
    assert len(sf.requests_to(r"/search")) == 1  # one phone lookup, nothing cached across events


def test_phone_with_no_record_is_quarantined_then_replayed_once_fixed(served):
    stack, _ = served
    sf = stack.sandboxes["salesforce"]
    doc = json.loads(fixture_bytes("lox24_phone_unsubscribe.json"))
    doc["id"] = "0f6a2d4e-0000-4000-8000-000000000001"
    doc["data"]["phone"] = "+4915112345678"
    resp = stack.post_lox24(json.dumps(doc).encode())
    assert resp.status_code == 200  # answered before any lookup: the receiver does no CRM I/O
    assert wait_for(lambda: json.loads(stack.syncd("status", "--json").stdout)["quarantined"] == 1)
    (row,) = json.loads(stack.syncd("dead-letters", "--json").stdout)
    assert row["id"].startswith("q") and "no record with this phone in salesforce" in row["error"]
    lead = sf.add_record("Lead", None, LastName="Late", Company="X", MobilePhone="+49 151 12345678",
                         SMS_Opt_Out__c=False)
    assert stack.syncd("replay", row["id"]).stdout.startswith(f"{row['id']}: re-queued  (unrouted)")
    assert wait_for(lambda: sf.get_record("Lead", lead)["SMS_Opt_Out__c"] is True)


def test_metrics_and_readiness_of_a_running_daemon(served):
    stack, _ = served
    assert stack.post_apten(fixture_bytes("apten_optout_sms.json")).status_code == 200
    assert wait_for(lambda: json.loads(stack.syncd("status", "--json").stdout)["deliveries"]["done"] == 1)
    assert requests.get(f"{stack.admin_url}/readyz", timeout=10).json() == {"status": "ready"}
    text = requests.get(f"{stack.admin_url}/metrics", timeout=10).text
    for name in ('syncd_events_received_total{outcome="accepted",source="apten"} 1.0',
                 'syncd_deliveries{state="done"} 1.0', "syncd_journal_oldest_pending_age_seconds ",
                 'syncd_crm_requests_total{crm="salesforce",status="ok"}', "syncd_push_duration_seconds_bucket",
                 'syncd_deliveries{state="quarantined"} 0.0'):
        assert name in text, name
    assert "3305551234" not in text and "003XX" not in text   # no personal data or ids in labels
    # routed by id, fanned out by phone: one search for the duplicates
    assert 'syncd_crm_lookups_total{crm="salesforce",status="ok"} 1.0' in text
    assert stack.post_lox24(fixture_bytes("lox24_phone_unsubscribe.json")).status_code == 200
    assert wait_for(lambda: 'syncd_crm_lookups_total{crm="salesforce",status="ok"} 1.0'
                    in requests.get(f"{stack.admin_url}/metrics", timeout=10).text)


def test_admin_paths_are_only_on_the_admin_listener(served):
    stack, _ = served
    for path in ("/metrics", "/readyz", "/status", "/status/login"):
        resp = requests.get(f"{stack.url}{path}", timeout=10)
        assert resp.status_code == 404 and resp.json()["status"] == 404, path
    assert requests.get(f"{stack.admin_url}/metrics", timeout=10).status_code == 200
    for url in (stack.url, stack.admin_url):
        assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    # Webhooks only on the public port.
    resp = requests.post(f"{stack.admin_url}/webhooks/apten", data=b"{}", timeout=10)
    assert resp.status_code in (404, 405)
