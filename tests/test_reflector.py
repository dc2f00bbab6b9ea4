"""CRM do-not-contact flags reflected to Sinch: real ``syncd serve``, Salesforce and
Sinch simulators, Sinch's signed notification coming back to /webhooks/sinch."""
from __future__ import annotations

import json
import time

import pytest

from syncd.config import load_config
from tests.support.stack import Stack, wait_for

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
        shown = status(st)
        assert shown["reflections"] == {"pending": 0, "done": 1, "failed": 0}
        # Sinch's answer (a WhatsApp opt-out in the ledger) is the flag's echo: not pushed back
        assert shown["deliveries"]["done"] == shown["deliveries"]["pending"] == 0
        assert sf.get_record("Contact", CONTACT)["WhatsApp_Opt_Out__c"] is False
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
    from tests.support.stack import ALL_CRMS

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


# --- without Sinch: CRM flags reach the ledger; records that appear later are flagged ----------

API_TOKEN = "consent-api-token-0123456789abcdef"
PHONE = "+13305551234"


def consent(st, channel: str, **identity: str) -> dict:
    import requests

    answer = requests.get(f"{st.url}/v1/consent", params={**identity, "channel": channel}, timeout=5,
                          headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def polls_run(st) -> float:
    """Finished runs of the scheduled poll job, from /metrics (cheaper than a CLI call)."""
    import requests

    text = requests.get(f"{st.admin_url}/metrics", timeout=5).text
    line = 'syncd_scheduler_runs_total{job="poll",result="ok"} '
    return next((float(x[len(line):]) for x in text.splitlines() if x.startswith(line)), 0.0)


def next_polls(st, n: int = 1, timeout: float = 20) -> bool:
    """Wait until ``n`` more polls have started and finished after this call."""
    target = polls_run(st) + n + 1      # + 1: the poll running now may have read before the caller's edit
    return wait_for(lambda: polls_run(st) >= target, timeout=timeout)


def delivery_states(st) -> list[str]:
    import sqlite3

    with sqlite3.connect(st.workdir / "syncd.db") as db:
        return [r[0] for r in db.execute("SELECT state FROM deliveries ORDER BY id")]


@pytest.fixture
def no_sinch_stack():
    st = Stack(poll_interval=0.5, extra_config={"api": {"token": API_TOKEN}}).start()
    yield st
    st.cleanup()


def test_crm_flag_reaches_the_consent_api_without_sinch(no_sinch_stack):
    st = no_sinch_stack
    sf = st.sandboxes["salesforce"]
    daemon = st.serve()
    try:
        assert next_polls(st)                                      # the poll runs with no Sinch configured
        assert consent(st, "call", phone=PHONE)["state"] == "unknown"
        sf.set_field("Contact", CONTACT, DoNotCall=True)          # an admin edit in Salesforce
        sf.advance(10)                                             # past the poller's settle window
        assert wait_for(lambda: consent(st, "call", phone=PHONE)["allowed"] is False, timeout=15)
        answer = consent(st, "call", phone="(330) 555-1234")
        assert (answer["state"], answer["source"]) == ("opted_out", "crm:salesforce")
        assert consent(st, "sms", phone=PHONE)["state"] == "unknown"   # only the flag's own channel
        assert next_polls(st, 2)
        shown = status(st)
        assert shown["reflections"] == {"pending": 0, "done": 0, "failed": 0}      # nothing for Sinch
        assert shown["crms"]["salesforce"]["last_poll_at"] is not None
        assert delivery_states(st) == []          # the flagged record itself is not written back
        sf.set_field("Contact", CONTACT, DoNotCall=False)         # the admin clears it again
        sf.advance(10)
        assert next_polls(st, 2)
        assert sf.get_record("Contact", CONTACT)["DoNotCall"] is False   # not overruled by its own flag
        assert delivery_states(st) == []
        assert consent(st, "call", phone=PHONE)["allowed"] is False       # clearing a flag is no opt-in
    finally:
        assert daemon.terminate() == 0


def test_lead_created_after_an_opt_out_is_flagged_once(no_sinch_stack):
    from tests.conftest import fixture_bytes

    st = no_sinch_stack
    sf = st.sandboxes["salesforce"]
    daemon = st.serve()
    try:
        assert next_polls(st)
        assert st.post_apten(fixture_bytes("apten_optout_sms.json")).status_code == 200
        assert wait_for(lambda: sf.get_record("Contact", CONTACT)["SMS_Opt_Out__c"] is True)
        sf.advance(10)                                             # the push read back: set, nothing to do
        assert next_polls(st, 2)
        assert delivery_states(st) == ["done"]
        lead = sf.add_record("Lead", None, LastName="Reyes", Company="Re-import Inc",
                             MobilePhone="(330) 555-1234", SMS_Opt_Out__c=False)   # re-imported, national format
        sf.advance(10)
        assert wait_for(lambda: sf.get_record("Lead", lead)["SMS_Opt_Out__c"] is True, timeout=15)
        assert sf.get_record("Lead", lead)["DoNotCall"] is False                 # only the event's channel
        assert wait_for(lambda: delivery_states(st) == ["done", "done"])
        writes = len(sf.requests_to(r"/composite/sobjects$", "PATCH"))
        sf.advance(10)                                             # the lead, now written by syncd, is read again
        assert next_polls(st, 3)
        time.sleep(3 * 0.2)                                        # a few push ticks
        assert delivery_states(st) == ["done", "done"]
        assert len(sf.requests_to(r"/composite/sobjects$", "PATCH")) == writes
        rows = [json.loads(x) for x in st.syncd("export", "--format", "jsonl").stdout.splitlines()]
        assert sorted(r["target_record"] for r in rows) == sorted([CONTACT, lead])
        assert {r["event_id"] for r in rows} == {rows[0]["event_id"]}              # the Apten event's own
    finally:
        assert daemon.terminate() == 0


def _runtime(st):
    from syncd.runtime import open_runtime

    rt = open_runtime(load_config(st.config_path, env={}))
    if "hubspot" in rt.connectors:
        rt.connectors["hubspot"].poll_lag_seconds = 0.0   # the simulator's search index has no lag
    return rt


def _event(sid: str, channel: str, at_second: int = 0, **identity):
    from datetime import datetime, timezone

    from syncd.events import ConsentEvent

    return ConsentEvent(source="apten", source_event_id=sid, kind="opt_out", channel=channel,
                        occurred_at=datetime(2024, 2, 18, 9, 0, at_second, tzinfo=timezone.utc),
                        received_at=datetime.now(timezone.utc), raw=b"{}", **identity)


def _deliveries(rt) -> list[tuple]:
    """(event id, crm, record id, state) of every delivery, read from the SQLite file."""
    import sqlite3

    with sqlite3.connect(rt.journal.engine.path) as db:
        return db.execute("SELECT event_id, crm, record_id, state FROM deliveries ORDER BY id").fetchall()


def test_records_that_appear_later_in_salesforce_and_hubspot_get_the_opt_out_once():
    """In process, no Sinch: an SMS opt-out by phone and an email opt-out by address are
    in the ledger; a HubSpot contact and a Salesforce lead appear with them (other
    formats, other case); one poll and one push flag them; more polls queue nothing."""
    st = Stack(crms=("salesforce", "hubspot")).start()
    rt = _runtime(st)
    try:
        sf, hs = st.sandboxes["salesforce"], st.sandboxes["hubspot"]
        assert rt.reflector is not None and rt.reflector.sinch is None
        assert rt.reflector.poll_once() == {"salesforce": 0, "hubspot": 0}   # watermarks at "now"
        sms = rt.journal.events.record(_event("sms-1", "sms", 1, phone=PHONE, phone_raw=PHONE)).event_id
        email = rt.journal.events.record(_event("email-1", "email", 2, email="Lee.Park@Example.com")).event_id
        rt.tick()     # routed: the SMS one to the Contact with the phone; nobody has the address yet
        assert _deliveries(rt) == [(sms, "salesforce", CONTACT, "done")]
        time.sleep(1.1)
        contact = hs.add_contact(None, phone="330-555-1234", email="lee.park@example.com ",
                                 sms_opt_out="false", call_opt_out="false", whatsapp_opt_out="false")
        lead = sf.add_record("Lead", None, LastName="Park", Company="Re-import Inc", Email="LEE.PARK@example.com")
        sf.advance(10)
        rt.reflector.poll_once()
        assert sorted(_deliveries(rt)[1:]) == sorted([(sms, "hubspot", contact, "pending"),
                                                       (email, "hubspot", contact, "pending"),
                                                       (email, "salesforce", lead, "pending")])
        stats = rt.tick()
        assert (stats.done, stats.dead) == (3, 0)
        assert hs.get_contact(contact)["sms_opt_out"] == "true" and hs.get_contact(contact)["call_opt_out"] == "false"
        assert [u["email"] for u in hs.unsubscribes] == ["lee.park@example.com"]
        assert sf.get_record("Lead", lead)["HasOptedOutOfEmail"] is True
        assert sf.get_record("Lead", lead)["SMS_Opt_Out__c"] is False
        assert rt.reflector.found_targets == {"hubspot": 2, "salesforce": 1}
        # syncd's own writes are read back (set, or already delivered): nothing more, ever
        time.sleep(1.1)
        sf.advance(10)
        hs.set_property(contact, "firstname", "Lee")                 # a later unrelated edit
        for _ in range(2):
            rt.reflector.poll_once()
            assert rt.tick().done == 0
        assert len(_deliveries(rt)) == 4 and len(hs.unsubscribes) == 1
        assert rt.reflector.found_targets == {"hubspot": 2, "salesforce": 1}
        # the events were routed already: their status and the ledger are as they were
        assert [e.id for e in rt.journal.events.to_route(10)] == []
    finally:
        rt.journal.close()
        st.cleanup()


def test_a_found_record_ends_a_quarantine_and_never_preempts_routing():
    """A quarantined opt-out (no record had the phone) is routed once a record with it
    appears; an event not routed yet stays for its own routing, which adds no duplicate."""
    st = Stack().start()
    rt = _runtime(st)
    try:
        sf = st.sandboxes["salesforce"]
        rt.reflector.poll_once()
        lonely = rt.journal.events.record(_event("q-1", "call", 1, phone="+13305550199",
                                                 phone_raw="+13305550199")).event_id
        assert rt.tick().quarantined == 1
        fresh = rt.journal.events.record(_event("n-1", "whatsapp", 2, phone=PHONE, phone_raw=PHONE)).event_id
        lead = sf.add_record("Lead", None, LastName="Late", Company="X", Phone="330.555.0199",
                             MobilePhone="+1 330 555 1234")
        sf.advance(10)
        rt.reflector.poll_once()
        # the seeded Contact (stamped after the first watermark) carries PHONE as well
        assert sorted(_deliveries(rt)) == sorted([(lonely, "salesforce", lead, "pending"),
                                                  (fresh, "salesforce", lead, "pending"),
                                                  (fresh, "salesforce", CONTACT, "pending")])
        assert rt.journal.events.get(lonely).status == "routed"
        assert rt.journal.events.get(fresh).status == "new"           # its own routing still runs
        stats = rt.tick()
        assert (stats.routed, stats.dead) == (1, 0)
        assert sorted(_deliveries(rt)) == sorted([(lonely, "salesforce", lead, "done"),
                                                  (fresh, "salesforce", lead, "done"),
                                                  (fresh, "salesforce", CONTACT, "done")])
        assert sf.get_record("Lead", lead)["DoNotCall"] is True
        assert sf.get_record("Lead", lead)["WhatsApp_Opt_Out__c"] is True
        assert sf.get_record("Contact", CONTACT)["WhatsApp_Opt_Out__c"] is True
    finally:
        rt.journal.close()
        st.cleanup()


def test_a_found_do_not_contact_brings_the_newer_single_channel_opt_in_along():
    """The ledger: do-not-contact at 09:00:01, an SMS opt-in at 09:00:02. A lead that
    appears with the phone gets both, so SMS stays allowed on it as the ledger says."""
    st = Stack().start()
    rt = _runtime(st)
    try:
        sf, phone = st.sandboxes["salesforce"], "+13305550142"
        rt.reflector.poll_once()
        dnc = _event("d-1", "all", 1, phone=phone, phone_raw=phone)
        dnc.kind = "do_not_contact"
        optin = _event("i-1", "sms", 2, phone=phone, phone_raw=phone)
        optin.kind = "opt_in"
        ids = [rt.journal.events.record(e).event_id for e in (dnc, optin)]
        rt.tick()                                                   # nobody has the phone yet
        assert rt.journal.ledger.state(phone, "sms").state == "opted_in"
        lead = sf.add_record("Lead", None, LastName="Late", Company="X", MobilePhone="330-555-0142")
        sf.advance(10)
        rt.reflector.poll_once()
        assert sorted(e for e, _, rec, _ in _deliveries(rt) if rec == lead) == sorted(ids)
        assert rt.tick().dead == 0
        record = sf.get_record("Lead", lead)
        assert (record["DoNotCall"], record["WhatsApp_Opt_Out__c"], record["SMS_Opt_Out__c"]) == (True, True, False)
    finally:
        rt.journal.close()
        st.cleanup()
