"""Fan-out routing over real HTTP: one opt-out reaches the named record and every
duplicate (same phone, formatting aside; same address for email) in every enabled
CRM, with batched lookups; ``routing.fan_out: false`` keeps the named record only."""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import phonenumbers
import pytest
from hypothesis import given, settings, strategies as st

from syncd.events import ConsentEvent
from tests.support.stack import ALL_CRMS, Stack
from tests.conftest import fixture_bytes

pytestmark = pytest.mark.slow

NAMED = "003XX000004DHPYYA4"          # the seeded Salesforce Contact the Apten seed names (+13305551234)
SEARCHES = {"salesforce": ("GET", r"/search/?$"), "hubspot": ("POST", r"/contacts/search$"),
            "close": ("POST", r"/data/search/$")}


@pytest.fixture
def make_runtime():
    """A stack of all three CRMs and an in-process runtime on its config."""
    from syncd.config import load_config
    from syncd.runtime import open_runtime

    made = []

    def make(**stack_args):
        st_ = Stack(crms=ALL_CRMS, **stack_args).start()
        rt = open_runtime(load_config(st_.config_path, env={}))
        made.append((st_, rt))
        return st_, rt
    yield make
    for st_, rt in made:
        rt.journal.close()
        st_.cleanup()


def duplicates(st_) -> dict[str, str]:
    """Records of the seed's person (+1 330 555 1234) typed as people type them, and
    look-alikes whose number merely ends the same."""
    sf, hs, cl = st_.sandboxes["salesforce"], st_.sandboxes["hubspot"], st_.sandboxes["close"]
    consent = {"HasOptedOutOfEmail": False, "DoNotCall": False, "SMS_Opt_Out__c": False,
               "WhatsApp_Opt_Out__c": False}
    ids = {
        "sf_lead": sf.add_record("Lead", None, LastName="Reyes", Company="X", Phone="(330) 555-1234", **consent),
        "sf_uk": sf.add_record("Contact", None, LastName="Other", Phone="+44 330 555 1234", **consent),
        "hs_dup": hs.add_contact(None, phone="+1 330-555-1234", sms_opt_out="false", call_opt_out="false"),
        "hs_de": hs.add_contact(None, phone="+49 330 5551234", sms_opt_out="false", call_opt_out="false"),
    }
    cl.add_lead("lead_dup1", name="Dup Ltd")
    cl.add_contact("cont_dup1", "lead_dup1", name="Dana", phones=["+13305551234"])
    cl.add_lead("lead_uk1", name="UK Ltd")
    cl.add_contact("cont_uk1", "lead_uk1", name="Other", phones=["+443305551234"])
    return ids


def apten_seed(rt, name: str = "apten_optout_sms.json"):
    event = rt.sources["apten"].parse(fixture_bytes(name), datetime.now(timezone.utc))
    return rt.journal.events.record(event).event_id


def event(n: int, **fields) -> ConsentEvent:
    at = datetime(2024, 2, 18, tzinfo=timezone.utc) + timedelta(seconds=n)
    base = dict(source="apten", source_event_id=f"f{n}", kind="opt_out", channel="sms", occurred_at=at,
                received_at=datetime.now(timezone.utc), raw=b"{}")
    return ConsentEvent(**{**base, **fields})


def searches(st_, crm: str) -> int:
    method, path = SEARCHES[crm]
    return len(st_.sandboxes[crm].requests_to(path, method))


def sms_set(st_, ids) -> dict[str, bool]:
    sf, hs, cl = st_.sandboxes["salesforce"], st_.sandboxes["hubspot"], st_.sandboxes["close"]
    return {
        "sf_contact": sf.get_record("Contact", NAMED)["SMS_Opt_Out__c"],
        "sf_lead": sf.get_record("Lead", ids["sf_lead"])["SMS_Opt_Out__c"],
        "sf_uk": sf.get_record("Contact", ids["sf_uk"])["SMS_Opt_Out__c"],
        "hs_dup": hs.get_contact(ids["hs_dup"])["sms_opt_out"] == "true",
        "hs_de": hs.get_contact(ids["hs_de"])["sms_opt_out"] == "true",
        "close_dup": cl.custom_value("lead_dup1", "SMS Opt Out") not in (None, "", False),
        "close_uk": cl.custom_value("lead_uk1", "SMS Opt Out") not in (None, "", False),
    }


def test_one_sms_opt_out_reaches_every_duplicate_in_every_crm_and_no_look_alike(make_runtime):
    st_, rt = make_runtime()
    ids = duplicates(st_)
    apten_seed(rt)
    stats = rt.tick()
    assert (stats.routed, stats.dead) == (1, 0)
    assert sms_set(st_, ids) == {"sf_contact": True, "sf_lead": True, "hs_dup": True, "close_dup": True,
                                 "sf_uk": False, "hs_de": False, "close_uk": False}
    sf, hs = st_.sandboxes["salesforce"], st_.sandboxes["hubspot"]
    # only the event's channel's fields were written
    assert not sf.get_record("Lead", ids["sf_lead"])["DoNotCall"]
    assert hs.get_contact(ids["hs_dup"])["call_opt_out"] == "false"
    written = {k for r in sf.requests_to(r"/composite/sobjects$", "PATCH") for rec in r.json()["records"]
               for k in rec} - {"attributes", "id"}
    assert written == {"SMS_Opt_Out__c"}
    assert [searches(st_, crm) for crm in ALL_CRMS] == [1, 1, 1]


def test_an_email_opt_out_reaches_every_record_with_the_address_and_writes_no_phone_field(make_runtime):
    st_, rt = make_runtime()
    sf, hs, cl = st_.sandboxes["salesforce"], st_.sandboxes["hubspot"], st_.sandboxes["close"]
    ids = duplicates(st_)  # same phone, other address: an email opt-out must not touch them
    lead = sf.add_record("Lead", None, LastName="Reyes", Company="Y", Email="Dana.Reyes@example.com",
                         Phone="+15555550100", DoNotCall=False, SMS_Opt_Out__c=False)
    hs_mail = hs.add_contact(None, email="dana.reyes@example.com", sms_opt_out="false", call_opt_out="false")
    cl.add_lead("lead_mail1", name="Mail Ltd")
    cl.add_contact("cont_mail1", "lead_mail1", name="Dana", emails=["dana.reyes@example.com"])
    # Apten's doNotContact carries the address; as an email opt-out it names the Contact
    rt.journal.events.record(event(1, channel="email", external_lead_id=NAMED, phone="+13305551234",
                                   email="Dana.Reyes@Example.com "))
    stats = rt.tick()
    assert (stats.routed, stats.dead) == (1, 0)
    assert sf.get_record("Contact", NAMED)["HasOptedOutOfEmail"] is True
    assert sf.get_record("Lead", lead)["HasOptedOutOfEmail"] is True
    assert [u["email"] for u in hs.unsubscribes] == ["dana.reyes@example.com"]
    assert "dana.reyes@example.com" in cl.unsubscribed
    written = {k for r in sf.requests_to(r"/composite/sobjects$", "PATCH") for rec in r.json()["records"]
               for k in rec} - {"attributes", "id"}
    assert written == {"HasOptedOutOfEmail"}                       # no phone field, DoNotCall as it was
    assert not sf.get_record("Lead", lead)["DoNotCall"] and not sf.get_record("Lead", lead)["SMS_Opt_Out__c"]
    assert hs.get_contact(hs_mail)["sms_opt_out"] == "false"
    assert not sf.get_record("Lead", ids["sf_lead"])["HasOptedOutOfEmail"]  # same phone, not the address
    assert hs.requests_to(r"/contacts/batch/update$", "POST") == []           # email is no property write
    assert sf.requests_to(r"/search/?$", "GET") == []                         # no phone lookup for email


def test_an_email_opt_out_without_an_address_reads_the_named_records_and_fans_out_by_it(make_runtime):
    # Apten's optOut carries no address: the named Contact's Email (dana.reyes@example.com)
    # is read first, kept on the event and in the ledger, then every record with it is reached.
    st_, rt = make_runtime()
    sf, hs, cl = st_.sandboxes["salesforce"], st_.sandboxes["hubspot"], st_.sandboxes["close"]
    lead = sf.add_record("Lead", None, LastName="Reyes", Company="Y", Email="DANA.REYES@example.com",
                         Phone="+15555550100", HasOptedOutOfEmail=False, DoNotCall=False)
    hs.add_contact(None, email="dana.reyes@example.com", sms_opt_out="false")
    cl.add_lead("lead_mail2", name="Mail Ltd")
    cl.add_contact("cont_mail2", "lead_mail2", name="Dana", emails=["dana.reyes@example.com"])
    event_id = apten_seed(rt, "apten_optout_email.json")
    assert rt.journal.events.get(event_id).email is None
    stats = rt.tick()
    assert (stats.routed, stats.dead) == (1, 0)
    assert rt.journal.events.get(event_id).email == "dana.reyes@example.com"
    assert sf.get_record("Contact", NAMED)["HasOptedOutOfEmail"] is True
    assert sf.get_record("Lead", lead)["HasOptedOutOfEmail"] is True
    assert not sf.get_record("Lead", lead)["DoNotCall"]
    assert [u["email"] for u in hs.unsubscribes] == ["dana.reyes@example.com"]
    assert "dana.reyes@example.com" in cl.unsubscribed
    reads = sf.requests_to(r"/query/?$", "GET")
    assert any("WHERE Id IN" in r.query["q"][0] for r in reads)       # one read of the named record
    entry = rt.journal.ledger.state("dana.reyes@example.com", "email")
    assert (entry.state, entry.event_id) == ("opted_out", event_id)
    before = sorted(rt.journal.ledger.all())
    rt.journal.ledger.rebuild()                                       # the events still hold the whole truth
    assert sorted(rt.journal.ledger.all()) == before


def test_each_crm_reads_a_records_own_addresses(make_runtime):
    from connectors.types import EMAILS_FIELD, RecordRef

    st_, rt = make_runtime()
    st_.sandboxes["close"].add_contact("cont_abc124", "lead_abc123", name="Kim", emails=["Kim@Example.com"])
    refs = {"salesforce": RecordRef("salesforce", "Contact", NAMED), "hubspot": RecordRef("hubspot", "contacts", "51"),
            "close": RecordRef("close", "lead", "lead_abc123")}
    got = {crm: rt.connectors[crm].read([ref], [EMAILS_FIELD])[ref][EMAILS_FIELD] for crm, ref in refs.items()}
    assert got == {"salesforce": ["dana.reyes@example.com"], "hubspot": ["ana.silva@example.com"],
                   "close": ["sam.okafor@example.com", "Kim@Example.com"]}


def test_an_unreadable_named_record_delays_the_email_fan_out_but_not_the_record(make_runtime):
    st_, rt = make_runtime(retry={"max_attempts": 3, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.1})
    sf = st_.sandboxes["salesforce"]
    fault = sf.add_fault("GET", r"/query/?$", 503, [{"errorCode": "SERVER_UNAVAILABLE", "message": "down"}],
                         times=1000)
    event_id = apten_seed(rt, "apten_optout_email.json")
    rt.tick()
    fault.times = 0                                                   # Salesforce answers again
    stored = rt.journal.events.get(event_id)
    assert stored.status == "new" and "salesforce" in (stored.status_reason or "")   # deferred, read again later
    assert sf.get_record("Contact", NAMED)["HasOptedOutOfEmail"] is True               # the named record did not wait
    deadline = time.time() + 20
    while rt.journal.events.get(event_id).status == "new" and time.time() < deadline:
        time.sleep(0.1)
        rt.tick()
    assert rt.journal.events.get(event_id).email == "dana.reyes@example.com"
    assert rt.journal.events.get(event_id).status == "routed"


def test_a_phone_shared_by_many_events_of_a_batch_is_looked_up_once_per_crm(make_runtime):
    st_, rt = make_runtime()
    duplicates(st_)
    for n in range(30):
        rt.journal.events.record(event(n, phone="+13305551234", channel=("sms", "call", "whatsapp")[n % 3]))
    stats = rt.routing.tick()
    assert stats.routed == 30
    assert [searches(st_, crm) for crm in ALL_CRMS] == [1, 1, 1]


def test_a_hundred_distinct_phones_cost_one_search_per_crm(make_runtime):
    st_, rt = make_runtime()
    hs = st_.sandboxes["hubspot"]
    phones = [f"+1330555{n:04d}" for n in range(100)]
    for n, phone in enumerate(phones):
        hs.add_contact(None, phone=phone, sms_opt_out="false")
        rt.journal.events.record(event(n, phone=phone))
    assert rt.routing.tick().routed == 100
    assert [searches(st_, crm) for crm in ALL_CRMS] == [1, 1, 1]
    sosl = st_.sandboxes["salesforce"].requests_to(r"/search/?$", "GET")[0].query["q"][0]
    assert len(sosl[sosl.index("{") + 1:sosl.index("}")]) <= 4000   # SOSL keeps its ORs below 4,000 chars


def test_fan_out_false_writes_the_named_record_only_and_looks_nothing_up(make_runtime):
    st_, rt = make_runtime(extra_config={"routing": {"fan_out": False}})
    ids = duplicates(st_)
    apten_seed(rt)
    assert rt.tick().routed == 1
    assert sms_set(st_, ids) == {"sf_contact": True, "sf_lead": False, "hs_dup": False, "close_dup": False,
                                 "sf_uk": False, "hs_de": False, "close_uk": False}
    assert [searches(st_, crm) for crm in ALL_CRMS] == [0, 0, 0]
    rt.journal.events.record(event(5, phone="+13305551234"))      # no id: the phone lookup decides, as before
    assert rt.tick().routed == 1
    assert sms_set(st_, ids)["hs_dup"] is True


def test_a_lookup_that_gives_up_still_delivers_the_named_record_and_keeps_the_failure(make_runtime):
    st_, rt = make_runtime(retry={"max_attempts": 2, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.1})
    ids = duplicates(st_)
    st_.sandboxes["hubspot"].add_fault("POST", r"/contacts/search$", 503, {"message": "search is down"},
                                       times=1000)
    event_id = apten_seed(rt)
    stats = rt.tick()
    assert stats.routed == 0                                         # deferred: HubSpot still owes its lookup
    state = sms_set(st_, ids)
    assert state["sf_contact"] and state["sf_lead"] and state["close_dup"]   # ...but no one waits for it
    assert not state["hs_dup"]
    assert rt.journal.events.get(event_id).status == "new"
    deadline = time.time() + 20
    while rt.journal.events.get(event_id).status == "new" and time.time() < deadline:
        time.sleep(0.1)
        rt.tick()
    stored = rt.journal.events.get(event_id)
    assert stored.status == "routed"                                 # never quarantined with a named record
    assert "hubspot" in stored.status_reason and "gave up after 2 attempts" in stored.status_reason
    counts = rt.journal.reports.counts()["deliveries"]
    assert (counts["done"], counts["dead"]) == (4, 0)               # SF Contact and Lead, Close lead and contact


def test_a_lookup_with_no_match_and_no_id_is_quarantined(make_runtime):
    st_, rt = make_runtime()
    rt.journal.events.record(event(1, phone="+15555550199"))
    stats = rt.tick()
    assert (stats.routed, stats.quarantined) == (0, 1)
    [letter] = json.loads(st_.syncd("dead-letters", "--json").stdout)
    assert "no record with this phone in salesforce, hubspot, close" in json.dumps(letter)


# --- the normalisers behind the lookups ---------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(2_000_000_000, 9_999_999_999), min_size=1, max_size=400, unique=True),
       st.integers(60, 5000))
def test_sosl_batches_keep_every_number_once_and_stay_within_the_limit(numbers, limit):
    from connectors.salesforce import _sosl_terms, _text_batches

    phones = [f"+1{n}" for n in numbers]
    batches = list(_text_batches(phones, _sosl_terms, limit))
    assert [p for b in batches for p in b] == phones
    for batch in batches:
        text = " OR ".join(t for p in batch for t in _sosl_terms(p))
        assert len(batch) == 1 or len(text) <= limit


US = st.tuples(st.integers(201, 989), st.integers(200, 999), st.integers(0, 9999))


@settings(max_examples=200, deadline=None)
@given(US, st.sampled_from(["({a}) {b}-{c}", "{a}-{b}-{c}", "+1 {a} {b} {c}", "1{a}{b}{c}", "+1-{a}-{b}-{c}",
                            "{a}.{b}.{c}"]),
       st.sampled_from(["44", "49", "61"]))
def test_hubspot_reads_a_stored_number_as_the_same_person_whatever_its_format(parts, form, other_cc):
    from connectors.hubspot import _e164s

    a, b, c = str(parts[0]), str(parts[1]), f"{parts[2]:04d}"
    e164 = f"+1{a}{b}{c}"
    if not phonenumbers.is_possible_number(phonenumbers.parse(e164, None)):
        return
    assert e164 in _e164s(form.format(a=a, b=b, c=c), {"US"})
    assert e164 not in _e164s(f"+{other_cc} {a}{b}{c}", {"US"})   # ends the same, another country


def converted_lead(st_) -> tuple[str, str]:
    """A Salesforce Lead converted into a Contact (Lead.IsConverted, Lead.ConvertedContactId)."""
    sf = st_.sandboxes["salesforce"]
    contact = sf.add_record("Contact", None, LastName="Moss", SMS_Opt_Out__c=False)
    lead = sf.add_record("Lead", None, LastName="Moss", Company="M", SMS_Opt_Out__c=False, IsConverted=True,
                         ConvertedContactId=contact)
    return lead, contact


def test_an_opt_out_naming_a_converted_lead_reaches_the_contact_it_became(make_runtime):
    """A converted Lead is read-only (CANNOT_UPDATE_CONVERTED_LEAD): written as routed,
    the opt-out dead-lettered and was never honoured in the CRM."""
    st_, rt = make_runtime()
    sf = st_.sandboxes["salesforce"]
    lead, contact = converted_lead(st_)
    rt.journal.events.record(event(1, external_lead_id=lead[:15]))
    stats = rt.tick()
    assert (stats.routed, stats.dead) == (1, 0)
    assert sf.get_record("Contact", contact)["SMS_Opt_Out__c"] is True
    assert sf.get_record("Lead", lead)["SMS_Opt_Out__c"] is False
    deliveries = rt.journal.reports.counts()["deliveries"]
    assert (deliveries["done"], deliveries["dead"]) == (1, 0)          # one delivery: the Contact's
    # An open Lead named the same way is still written itself.
    open_lead = sf.add_record("Lead", None, LastName="Open", Company="O", SMS_Opt_Out__c=False)
    rt.journal.events.record(event(2, external_lead_id=open_lead))
    assert rt.tick().routed == 1
    assert sf.get_record("Lead", open_lead)["SMS_Opt_Out__c"] is True


def test_a_failed_conversion_check_defers_the_event_instead_of_writing_the_lead(make_runtime):
    st_, rt = make_runtime(retry={"max_attempts": 5, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.1})
    sf = st_.sandboxes["salesforce"]
    lead, contact = converted_lead(st_)
    fault = sf.add_fault("GET", r"/query/?$", 503, [{"errorCode": "SERVER_UNAVAILABLE", "message": "down"}],
                         times=1000)
    event_id = rt.journal.events.record(event(1, external_lead_id=lead)).event_id
    rt.tick()
    fault.times = 0
    stored = rt.journal.events.get(event_id)
    assert stored.status == "new" and "conversion lookup in salesforce failed" in (stored.status_reason or "")
    assert rt.journal.reports.counts()["deliveries"]["dead"] == 0
    deadline = time.time() + 20
    while rt.journal.events.get(event_id).status == "new" and time.time() < deadline:
        time.sleep(0.1)
        rt.tick()
    assert rt.journal.events.get(event_id).status == "routed"
    assert sf.get_record("Contact", contact)["SMS_Opt_Out__c"] is True
    assert sf.get_record("Lead", lead)["SMS_Opt_Out__c"] is False


def test_when_the_conversion_check_gives_up_the_named_lead_is_written_as_a_last_resort(make_runtime):
    st_, rt = make_runtime(retry={"max_attempts": 2, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.1})
    sf = st_.sandboxes["salesforce"]
    lead = sf.add_record("Lead", None, LastName="Kim", Company="K", SMS_Opt_Out__c=False)   # not converted
    sf.add_fault("GET", r"/query/?$", 503, [{"errorCode": "SERVER_UNAVAILABLE", "message": "down"}], times=1000)
    event_id = rt.journal.events.record(event(1, external_lead_id=lead)).event_id
    deadline = time.time() + 20
    while rt.journal.events.get(event_id).status == "new" and time.time() < deadline:
        rt.tick()
        time.sleep(0.1)
    stored = rt.journal.events.get(event_id)
    assert stored.status == "routed" and "conversion lookup in salesforce failed" in (stored.status_reason or "")
    assert sf.get_record("Lead", lead)["SMS_Opt_Out__c"] is True
