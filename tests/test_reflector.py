"""CRM do-not-contact flags reflected to Sinch: real ``syncd serve``, Salesforce and
Sinch simulators, Sinch's signed notification coming back to /webhooks/sinch."""
from __future__ import annotations

import json
import time

import pytest

from syncd.config import load_config
from syncd.stack import Stack, wait_for

pytestmark = pytest.mark.slow
CONTACT = "003XX000004DHPYYA4"


def status(st) -> dict:
    return json.loads(st.syncd("status", "--json").stdout)


def polled(st) -> str | None:
    return status(st)["crms"].get("salesforce", {}).get("last_poll_at")


@pytest.fixture
def sinch_stack():
    st = Stack(sinch=True, poll_interval=0.5).start()
    yield st
    st.cleanup()


def test_admin_flag_is_registered_once_and_confirmed(sinch_stack):
    st = sinch_stack
    sf, sinch = st.sandboxes["salesforce"], st.sandboxes["sinch"]
    daemon = st.serve()
    try:
        assert wait_for(lambda: polled(st) is not None)         # the first poll set the watermark
        sf.set_field("Contact", CONTACT, DoNotCall=True)        # an admin edit in Salesforce
        sf.advance(10)                                           # past the poller's settle window
        edited = time.monotonic()
        assert wait_for(lambda: len(sinch.registrations) == 1, timeout=15)
        assert time.monotonic() - edited < 0.5 + 2.0             # one poll interval, plus slack
        reg = sinch.registrations[0]
        assert reg["kind"] == "opt_out" and reg["identities"] == [{"channel": "WHATSAPP", "identity": "13305551234"}]
        assert reg["channels"] == ["WHATSAPP"] and reg["request_id"].startswith("syncd-")
        assert wait_for(lambda: status(st)["reflections"] == {"pending": 0, "done": 1, "failed": 0})
        first_poll = polled(st)
        sf.set_field("Contact", CONTACT, DoNotCall=False)       # cleared: not reflected by default
        sf.advance(10)
        time.sleep(5 * 0.5 + 1.0)                                 # five more polls
        assert polled(st) != first_poll
        assert len(sinch.registrations) == 1
        assert status(st)["reflections"] == {"pending": 0, "done": 1, "failed": 0}
    finally:
        assert daemon.terminate() == 0


def test_failed_notification_is_retried_then_lands(sinch_stack):
    st = sinch_stack
    sf, sinch = st.sandboxes["salesforce"], st.sandboxes["sinch"]
    sinch.set_outcome("13305551234", "FAILED", "recipient not reachable")
    daemon = st.serve()
    try:
        assert wait_for(lambda: polled(st) is not None)
        sf.set_field("Contact", CONTACT, WhatsApp_Opt_Out__c=True)
        sf.advance(10)
        assert wait_for(lambda: len(sinch.registrations) >= 1, timeout=15)
        sinch.set_outcome("13305551234", "SUCCEEDED")
        assert wait_for(lambda: status(st)["reflections"]["done"] == 1, timeout=20)
        assert len(sinch.registrations) >= 2
        assert len({r["request_id"] for r in sinch.registrations}) == 1   # the same registration, retried
    finally:
        assert daemon.terminate() == 0


def test_channel_without_opt_out_support_fails_at_once(sinch_stack):
    """OPT_OUT_STATUS_UNSPECIFIED: the channel does not support opt-out; retrying cannot help."""
    st = sinch_stack
    sf, sinch = st.sandboxes["salesforce"], st.sandboxes["sinch"]
    sinch.set_outcome("13305551234", "STATUS_UNSPECIFIED")
    daemon = st.serve()
    try:
        assert wait_for(lambda: polled(st) is not None)
        sf.set_field("Contact", CONTACT, WhatsApp_Opt_Out__c=True)
        sf.advance(10)
        assert wait_for(lambda: status(st)["reflections"]["failed"] == 1, timeout=20)
        assert len(sinch.registrations) == 1
        rows = json.loads(st.syncd("dead-letters", "--json").stdout)  # one JSON array
        [dead] = [d for d in rows if d["type"] == "reflection"]
        assert "OPT_OUT_STATUS_UNSPECIFIED" in dead["error"] and "does not support" in dead["error"]
    finally:
        assert daemon.terminate() == 0


def test_restart_between_poll_and_register_loses_nothing_and_registers_once(sinch_stack):
    st = sinch_stack
    sf, sinch = st.sandboxes["salesforce"], st.sandboxes["sinch"]
    sinch.add_fault("POST", r"optouts:register$", 503,
                    {"error": {"code": 503, "message": "unavailable", "status": "UNAVAILABLE"}}, times=10_000)
    daemon = st.serve()
    assert wait_for(lambda: polled(st) is not None)
    sf.set_field("Contact", CONTACT, DoNotCall=True)
    sf.advance(10)
    assert wait_for(lambda: status(st)["reflections"]["pending"] == 1, timeout=15)
    daemon.kill9()                                   # polled and queued, never registered
    assert sinch.registrations == []
    sinch.faults.clear()
    daemon = st.serve("serve2.log")
    try:
        assert wait_for(lambda: status(st)["reflections"]["done"] == 1, timeout=20)
        time.sleep(2)
        assert len(sinch.registrations) == 1
    finally:
        assert daemon.terminate() == 0


def _poll_cost(unchanged: int) -> tuple[int, int]:
    """Requests one steady-state poll makes with ``unchanged`` quiet records and 3 edits."""
    from syncd.runtime import open_runtime

    st = Stack(sinch=True).start()
    try:
        sf = st.sandboxes["salesforce"]
        sf.advance(-3600)                           # the quiet records were last touched an hour ago
        for i in range(unchanged):
            sf.add_record("Contact", None, LastName=f"Q{i}", MobilePhone=f"+1330556{i:04d}", DoNotCall=True)
        sf.advance(3600)
        rt = open_runtime(load_config(st.config_path, env={}))
        rt.reflector.poll_once()                    # first run: watermark at "now"
        rt.reflector.poll_once()                    # a steady-state poll with nothing changed
        sf.advance(10)
        for i in range(3):
            sf.add_record("Contact", None, LastName=f"N{i}", MobilePhone=f"+1330557{i:04d}", DoNotCall=True)
        sf.advance(10)
        sf.clear_log()
        queued = rt.reflector.poll_once().get("salesforce", 0)
        requests_made = len([r for r in sf.requests if "/query" in r.path])
        rt.journal.close()
        return requests_made, queued
    finally:
        st.cleanup()


def test_poll_cost_follows_changes_not_crm_size():
    small = _poll_cost(10)
    large = _poll_cost(10_000)
    assert small[1] == large[1] == 3
    assert small[0] == large[0] >= 1


def test_source_opt_out_pushed_to_crm_is_reflected_once_and_exported(sinch_stack):
    from tests.conftest import fixture_bytes

    st = sinch_stack
    sf, sinch = st.sandboxes["salesforce"], st.sandboxes["sinch"]
    daemon = st.serve()
    try:
        assert wait_for(lambda: polled(st) is not None)
        assert st.post_apten(fixture_bytes("apten_optout_sms.json")).status_code == 200
        assert wait_for(lambda: sf.get_record("Contact", CONTACT)["SMS_Opt_Out__c"] is True)
        sf.advance(10)
        assert wait_for(lambda: status(st)["reflections"]["done"] == 1, timeout=15)
        # Sinch's notification came back as a webhook: reconciled, not pushed to the CRM again.
        pushes = len(sf.requests_to(r"/composite/sobjects$", "PATCH"))
        time.sleep(5 * 0.5 + 0.5)
        assert len(sinch.registrations) == 1
        assert len(sf.requests_to(r"/composite/sobjects$", "PATCH")) == pushes
        rows = [json.loads(x) for x in st.syncd("export", "--format", "jsonl").stdout.splitlines()]
        assert sorted((r["source"], r["target_record"], r["state"], r["reflection"]) for r in rows) == [
            ("apten", CONTACT, "done", "done"), ("sinch", None, "reconciled", None)]
        apten = next(r for r in rows if r["source"] == "apten")
        assert apten["reflection_at"] >= apten["delivered_at"]
    finally:
        assert daemon.terminate() == 0


def test_cleared_flag_registers_an_opt_in_only_when_enabled():
    st = Stack(sinch=True, poll_interval=0.5, extra_config={"sinch": {"reflect_opt_in": True}}).start()
    sf, sinch = st.sandboxes["salesforce"], st.sandboxes["sinch"]
    daemon = st.serve()
    try:
        assert wait_for(lambda: polled(st) is not None)
        sf.set_field("Contact", CONTACT, DoNotCall=True)
        sf.advance(10)
        assert wait_for(lambda: status(st)["reflections"]["done"] == 1, timeout=15)
        sf.set_field("Contact", CONTACT, DoNotCall=False)   # the admin clears the flag
        sf.advance(10)
        assert wait_for(lambda: status(st)["reflections"]["done"] == 2, timeout=15)
        assert [r["kind"] for r in sinch.registrations] == ["opt_out", "opt_in"]
    finally:
        assert daemon.terminate() == 0
        st.cleanup()


def test_hubspot_and_close_flags_are_polled_and_registered():
    from syncd.runtime import open_runtime
    from syncd.stack import ALL_CRMS

    st = Stack(crms=ALL_CRMS, sinch=True).start()
    try:
        hs, cl, sinch = st.sandboxes["hubspot"], st.sandboxes["close"], st.sandboxes["sinch"]
        rt = open_runtime(load_config(st.config_path, env={}))
        rt.connectors["hubspot"].poll_lag_seconds = 0.0   # the simulator's search index has no lag
        assert rt.reflector.poll_once() == {"salesforce": 0, "hubspot": 0, "close": 0}  # watermarks at "now"
        time.sleep(1.1)
        hs.set_property("51", "call_opt_out", "true")
        cl.set_custom("lead_abc123", "Call Opt Out", "Yes")
        queued = rt.reflector.poll_once()
        assert (queued["hubspot"], queued["close"]) == (1, 1)
        assert rt.reflector.register_due()["registered"] == 2
        phones = sorted(i["identity"] for r in sinch.registrations for i in r["identities"])
        assert phones == ["13305550151", "13305550177"]
        assert rt.reflector.poll_once() == {"salesforce": 0, "hubspot": 0, "close": 0}
        # 2 polls that read pages (the first only sets the watermarks), one page each per CRM
        text = rt.metrics.render().decode()
        for crm in ("salesforce", "hubspot", "close"):
            assert f'syncd_crm_polls_total{{crm="{crm}",status="ok"}} 2.0' in text, crm
        rt.journal.close()
    finally:
        st.cleanup()


def test_poll_waits_while_the_crm_is_paused_for_quota():

    from syncd.runtime import open_runtime

    st = Stack(sinch=True).start()
    try:
        sf = st.sandboxes["salesforce"]
        rt = open_runtime(load_config(st.config_path, env={}))
        rt.reflector.poll_once()  # first run: the watermark starts at "now", no query
        rt.journal.ops.pause_crm("salesforce", time.time() + 300, "API budget reached")
        sf.clear_log()
        assert rt.reflector.poll_once() == {}
        assert [r for r in sf.requests if "/query" in r.path] == []
        rt.journal.ops.resume_crm("salesforce")
        rt.reflector.poll_once()
        assert [r for r in sf.requests if "/query" in r.path] != []
        rt.journal.close()
    finally:
        st.cleanup()


def test_crm_side_flag_enters_the_consent_ledger_as_an_opt_out_from_the_crm():
    from datetime import datetime, timezone

    from syncd.events import ConsentEvent
    from syncd.runtime import open_runtime

    st = Stack(sinch=True).start()
    try:
        sf = st.sandboxes["salesforce"]
        rt = open_runtime(load_config(st.config_path, env={}))
        ledger = rt.journal.ledger
        rt.reflector.poll_once()                                  # the first poll sets the watermark
        apten = rt.journal.events.record(ConsentEvent(
            source="apten", source_event_id="sms-1", kind="opt_out", channel="sms",
            occurred_at=datetime(2024, 2, 18, tzinfo=timezone.utc), received_at=datetime.now(timezone.utc),
            raw=b"{}", phone="+13305551234"))
        sf.set_field("Contact", CONTACT, DoNotCall=True, SMS_Opt_Out__c=True)   # an admin edit in Salesforce
        sf.advance(10)                                             # past the poller's settle window
        rt.reflector.poll_once()
        call = ledger.state("+13305551234", "call")
        assert call is not None and (call.state, call.source) == ("opted_out", "crm:salesforce")
        assert call.since.startswith("20") and call.since.endswith("Z")   # the record's SystemModstamp, in UTC
        sms = ledger.state("+13305551234", "sms")                 # already opted out: the flag is no news
        assert sms is not None and (sms.source, sms.event_id) == ("apten", apten.event_id)
        assert ledger.state("+13305551234", "whatsapp") is None   # only the flags' own channels
        assert [e.source for e in rt.journal.events.to_route(10)] == ["apten"]   # flags are never routed
        before = ledger.all()
        rt.reflector.poll_once()                                   # nothing changed: nothing new
        assert ledger.all() == before
        ledger.rebuild()
        assert ledger.all() == before
        rt.journal.close()
    finally:
        st.cleanup()
