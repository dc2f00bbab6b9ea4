"""HubSpotConnector over real HTTP against the HubSpot sandbox, through the real
hubspot-api-client code paths (no mocks between the connector and the wire)."""
from __future__ import annotations

from typing import Iterator

import pytest
import requests
from hypothesis import example, HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import CrmConnector
from connectors.errors import AuthFailed, NotFound, Permanent, RateLimited, Transient
from connectors.hubspot import HubSpotConnector
from connectors.sandbox.hubspot import HubSpotSandbox, iso_ms, to_ms
from connectors.sandbox.tls import SandboxTLS
from connectors.types import RecordRef, RecordUpdate, Watermark

TOKEN = "pat-na1-5f2e-test-token"
SUBSCRIPTION = "1001"
EMAIL = "ann.example@example.com"
BATCH = r"/crm/v3/objects/contacts/batch/update$"
SEARCH = r"/crm/v3/objects/contacts/search$"
STATUSES = r"/communication-preferences/v4/statuses/[^/]+$"
UNSUBSCRIBE_ALL = r"/communication-preferences/v4/statuses/[^/]+/unsubscribe-all$"
OTHER = "other.person@example.com"


@pytest.fixture(scope="module")
def server() -> Iterator[HubSpotSandbox]:
    sandbox = HubSpotSandbox(token=TOKEN).start()
    yield sandbox
    sandbox.stop()


@pytest.fixture
def sandbox(server: HubSpotSandbox) -> HubSpotSandbox:
    server.reset()
    return server


@pytest.fixture
def hub(sandbox: HubSpotSandbox) -> HubSpotConnector:
    return HubSpotConnector(sandbox.url, TOKEN, timeout=5.0, email_subscription_id=SUBSCRIPTION)


def ref(record_id: str) -> RecordRef:
    return RecordRef(crm="hubspot", obj="contact", record_id=record_id)


def sms_out(record_id: str) -> RecordUpdate:
    return RecordUpdate(ref=ref(record_id), fields={"sms_opt_out": True})


# --- update -----------------------------------------------------------------------------
def test_is_a_crm_connector(hub: HubSpotConnector) -> None:
    assert isinstance(hub, CrmConnector) and hub.name == "hubspot"


def test_update_sets_sms_opt_out(sandbox: HubSpotSandbox, hub: HubSpotConnector) -> None:
    sandbox.add_contact("51", email=EMAIL, sms_opt_out="false")
    before = to_ms(sandbox.get_contact("51")["lastmodifieddate"])

    [result] = hub.update([sms_out("51")])

    assert result.ok and result.ref == ref("51")
    contact = sandbox.get_contact("51")
    assert contact["sms_opt_out"] == "true"
    assert to_ms(contact["lastmodifieddate"]) > before
    [call] = sandbox.requests_to(BATCH, "POST")
    assert call.json() == {"inputs": [{"id": "51", "properties": {"sms_opt_out": "true"}}]}
    assert call.headers["Authorization"] == f"Bearer {TOKEN}"


def test_150_updates_go_out_as_two_batches(sandbox: HubSpotSandbox, hub: HubSpotConnector) -> None:
    ids = [str(n) for n in range(1, 151)]
    for rid in ids:
        sandbox.add_contact(rid)

    results = hub.update([sms_out(rid) for rid in ids])

    assert [r.ref.record_id for r in results] == ids and all(r.ok for r in results)
    calls = sandbox.requests_to(BATCH, "POST")
    assert [len(c.json()["inputs"]) for c in calls] == [100, 50]
    assert all(sandbox.get_contact(rid)["sms_opt_out"] == "true" for rid in ids)


def test_updates_of_one_record_are_merged_into_one_input(sandbox: HubSpotSandbox,
                                                         hub: HubSpotConnector) -> None:
    sandbox.add_contact("51")
    results = hub.update([sms_out("51"),
                          RecordUpdate(ref=ref("51"), fields={"call_opt_out": True})])
    assert all(r.ok for r in results)
    [call] = sandbox.requests_to(BATCH)
    assert call.json()["inputs"] == [{"id": "51", "properties": {"sms_opt_out": "true",
                                                                 "call_opt_out": "true"}}]


def test_partial_207_maps_errors_to_their_records(sandbox: HubSpotSandbox,
                                                   hub: HubSpotConnector) -> None:
    sandbox.add_contact("51")
    sandbox.add_contact("52")

    ok1, missing, ok2 = hub.update([sms_out("51"), sms_out("999"), sms_out("52")])

    assert ok1.ok and ok2.ok
    assert isinstance(missing.error, NotFound)
    assert "Could not get some CONTACT objects" in missing.error.message
    assert missing.error.code == "OBJECT_NOT_FOUND"
    assert sandbox.get_contact("51")["sms_opt_out"] == "true"
    assert sandbox.get_contact("52")["sms_opt_out"] == "true"


def test_validation_errors_are_permanent_per_record(sandbox: HubSpotSandbox,
                                                    hub: HubSpotConnector) -> None:
    for rid in ("51", "52", "53"):
        sandbox.add_contact(rid)
    unknown, read_only, fine = hub.update([
        RecordUpdate(ref=ref("51"), fields={"nope": True}),
        RecordUpdate(ref=ref("52"), fields={"hs_email_optout": True}),
        sms_out("53"),
    ])
    assert type(unknown.error) is Permanent and 'Property "nope" does not exist' in unknown.error.message
    assert type(read_only.error) is Permanent and "VALIDATION_ERROR" in read_only.error.message
    assert fine.ok
    assert "hs_email_optout" not in sandbox.get_contact("52")


def test_transient_5xx_is_retried_and_lands(sandbox: HubSpotSandbox, hub: HubSpotConnector) -> None:
    sandbox.add_contact("51")
    sandbox.add_fault("POST", BATCH, 503, {"status": "error", "message": "Service unavailable",
                                           "category": "INTERNAL_ERROR"})
    [result] = hub.update([sms_out("51")])
    assert result.ok and len(sandbox.requests_to(BATCH)) == 2


# --- email consent (communication preferences v4) -----------------------------------------
def email_out(record_id: str, email: str | None = None) -> RecordUpdate:
    return RecordUpdate(ref=ref(record_id), email=email, email_unsubscribe=True)


def email_in(record_id: str) -> RecordUpdate:
    return RecordUpdate(ref=ref(record_id), email_unsubscribe=False)


def test_email_opt_out_leaves_the_configured_subscription_through_v4(
        sandbox: HubSpotSandbox, hub: HubSpotConnector) -> None:
    sandbox.add_contact("51", email=EMAIL)

    [result] = hub.update([email_out("51", EMAIL)])

    assert result.ok
    check, [write] = sandbox.requests_to(STATUSES, "GET"), sandbox.requests_to(STATUSES, "POST")
    assert len(check) == 1 and check[0].query == {"channel": ["EMAIL"]}
    assert write.path.endswith("/statuses/" + EMAIL)
    assert write.json() == {"channel": "EMAIL", "statusState": "UNSUBSCRIBED",
                            "subscriptionId": int(SUBSCRIPTION),
                            "legalBasis": "LEGITIMATE_INTEREST_CLIENT",
                            "legalBasisExplanation": write.json()["legalBasisExplanation"]}
    assert write.json()["legalBasisExplanation"]
    assert sandbox.email_status(EMAIL, SUBSCRIPTION) == "UNSUBSCRIBED"
    assert [u["subscriptionId"] for u in sandbox.unsubscribes] == [SUBSCRIPTION]
    assert sandbox.get_contact("51")[f"hs_email_optout_{SUBSCRIPTION}"] == "true"
    assert sandbox.requests_to(BATCH) == [] and sandbox.requests_to(UNSUBSCRIBE_ALL) == []


def test_email_opt_out_without_subscription_id_unsubscribes_from_all_email(
        sandbox: HubSpotSandbox) -> None:
    hub = HubSpotConnector(sandbox.url, TOKEN, timeout=5.0)  # no subscription type configured
    sandbox.add_contact("51", email=EMAIL)

    [result] = hub.update([email_out("51")])

    assert result.ok, result.error
    assert sandbox.is_unsubscribed_from_all(EMAIL)
    assert sandbox.get_contact("51")["hs_email_optout"] == "true"
    assert [r.method for r in sandbox.requests_to(UNSUBSCRIBE_ALL)] == ["GET", "POST"]
    assert sandbox.requests_to(STATUSES) == []


def test_already_unsubscribed_is_done_after_a_status_check(sandbox: HubSpotSandbox,
                                                           hub: HubSpotConnector) -> None:
    sandbox.add_contact("51", email=EMAIL)
    sandbox.set_email_status(EMAIL, SUBSCRIPTION, "UNSUBSCRIBED")
    assert hub.update([email_out("51")])[0].ok
    assert len(sandbox.requests_to(STATUSES, "GET")) == 1
    assert sandbox.requests_to(STATUSES, "POST") == [] and sandbox.unsubscribes == []

    sandbox.set_unsubscribed_from_all(EMAIL)
    all_mode = HubSpotConnector(sandbox.url, TOKEN, timeout=5.0)
    assert all_mode.update([email_out("51")])[0].ok
    assert [r.method for r in sandbox.requests_to(UNSUBSCRIBE_ALL)] == ["GET"]


def test_newer_email_opt_in_resubscribes_through_v4(sandbox: HubSpotSandbox,
                                                    hub: HubSpotConnector) -> None:
    sandbox.add_contact("51", email=EMAIL)
    assert hub.update([email_out("51")])[0].ok

    [result] = hub.update([email_in("51")])

    assert result.ok, result.error
    assert sandbox.email_status(EMAIL, SUBSCRIPTION) == "SUBSCRIBED"
    [sub] = sandbox.subscribes
    assert sub["legalBasis"] == "LEGITIMATE_INTEREST_CLIENT" and sub["email"] == EMAIL
    assert sandbox.get_contact("51")[f"hs_email_optout_{SUBSCRIPTION}"] == "false"


def test_opt_in_without_subscription_id_is_a_dead_letter_that_says_why(
        sandbox: HubSpotSandbox) -> None:
    hub = HubSpotConnector(sandbox.url, TOKEN, timeout=5.0)
    sandbox.add_contact("51", email=EMAIL)
    sandbox.add_contact("52", email=OTHER)
    sandbox.set_unsubscribed_from_all(EMAIL)

    opted_out_of_all, never_opted_out = hub.update([email_in("51"), email_in("52")])

    assert type(opted_out_of_all.error) is Permanent
    assert "subscription_id is not configured" in opted_out_of_all.error.message
    assert EMAIL not in str(opted_out_of_all.error)
    assert never_opted_out.ok  # nothing was unsubscribed, so the opt-in already holds
    assert sandbox.is_unsubscribed_from_all(EMAIL) and sandbox.subscribes == []
    assert [r.method for r in sandbox.requests_to(UNSUBSCRIBE_ALL)] == ["GET", "GET"]


def test_webhook_email_never_overrides_the_contacts_own(sandbox: HubSpotSandbox,
                                                        hub: HubSpotConnector) -> None:
    """An email opt-out for contact 51 that carries someone else's address changes
    only the addresses contact 51 holds in HubSpot."""
    sandbox.add_contact("51", email=EMAIL, hs_additional_emails="ann+work@example.com; ")
    sandbox.add_contact("52", email=OTHER)

    [result] = hub.update([email_out("51", OTHER)])

    assert result.ok, result.error
    assert sandbox.email_status(OTHER, SUBSCRIPTION) is None
    assert sorted(u["email"] for u in sandbox.unsubscribes) == ["ann+work@example.com", EMAIL]
    [read] = sandbox.requests_to(r"/crm/v3/objects/contacts/batch/read$", "POST")
    assert read.json()["inputs"] == [{"id": "51"}]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(address=st.emails())
@example(address="/@A.ad")  # a "/" in the local part: encoded, never folded or redirected
def test_any_valid_address_reaches_its_own_subscriber(sandbox: HubSpotSandbox,
                                                      address: str) -> None:
    """The address goes into the v4 URL path: whatever RFC 5322 allows in it
    (+ % ? # / ...) is encoded by the client and names that subscriber only."""
    sandbox.reset()
    hub = HubSpotConnector(sandbox.url, TOKEN, timeout=5.0, email_subscription_id=SUBSCRIPTION)
    sandbox.add_contact("51", email=address)
    [result] = hub.update([email_out("51")])
    assert result.ok, result.error
    assert [u["email"] for u in sandbox.unsubscribes] == [address.strip().lower()]
    assert sandbox.email_status(address, SUBSCRIPTION) == "UNSUBSCRIBED"


def test_email_consent_reads_own_addresses_in_batches_of_100(sandbox: HubSpotSandbox,
                                                             hub: HubSpotConnector) -> None:
    ids = [sandbox.add_contact(str(n), email=f"p{n}@example.com") for n in range(1, 151)]
    sandbox.add_contact("900")  # no address at all
    results = hub.update([email_out(rid) for rid in ids] + [email_out("900"), email_out("999")])
    assert all(r.ok for r in results[:150])
    no_address, missing = results[150:]
    assert type(no_address.error) is Permanent and "no email address" in no_address.error.message
    assert isinstance(missing.error, NotFound)
    reads = sandbox.requests_to(r"/contacts/batch/read$", "POST")
    assert sorted(len(r.json()["inputs"]) for r in reads) == [52, 100]


def test_invalid_legal_basis_is_refused_at_construction(sandbox: HubSpotSandbox) -> None:
    with pytest.raises(ValueError):
        HubSpotConnector(sandbox.url, TOKEN, legal_basis="BECAUSE")


# --- rate limits and auth ---------------------------------------------------------------
def test_429_is_retried_after_the_window_and_lands(sandbox: HubSpotSandbox,
                                                   hub: HubSpotConnector) -> None:
    sandbox.add_contact("51")
    sandbox.set_rate_limit(1, interval_ms=1000)
    spent = requests.get(f"{sandbox.url}/crm/v3/properties/contacts",
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert spent.headers["X-HubSpot-RateLimit-Remaining"] == "0"

    [result] = hub.update([sms_out("51")])

    assert result.ok and sandbox.get_contact("51")["sms_opt_out"] == "true"
    refused, landed = sandbox.requests_to(BATCH)
    assert landed.at - refused.at >= 1.0 - 0.01  # waited out the 1 s window, no hammering


def test_long_retry_after_is_left_to_the_journal(sandbox: HubSpotSandbox,
                                                 hub: HubSpotConnector) -> None:
    sandbox.add_contact("51")
    sandbox.add_contact("52")
    sandbox.add_fault("POST", BATCH, 429, {"status": "error", "errorType": "RATE_LIMIT",
                                           "message": "You have reached your daily limit.",
                                           "policyName": "DAILY", "correlationId": "x"},
                      headers={"Retry-After": "60"}, times=5)
    results = hub.update([sms_out("51"), email_out("52", EMAIL)])
    assert all(isinstance(r.error, RateLimited) and r.error.retry_after == 60 for r in results)
    assert len(sandbox.requests) == 1  # one refusal, nothing after it


def test_401_is_auth_failed_without_the_token(sandbox: HubSpotSandbox) -> None:
    sandbox.add_contact("51")
    wrong = "pat-na1-wrong-secret-7c1d"
    hub = HubSpotConnector(sandbox.url, wrong)
    with pytest.raises(AuthFailed) as caught:
        hub.update([sms_out("51")])
    err = caught.value
    assert err.status == 401 and err.code == "INVALID_AUTHENTICATION"
    assert "Authentication credentials not found" in err.message
    assert wrong not in str(err) and wrong not in repr(err) and TOKEN not in str(err)
    with pytest.raises(AuthFailed):
        hub.fields("contact")


ID_REFUSED = "record id is not a HubSpot contact id (digits only)"
_NOT_AN_ID = st.one_of(
    st.text(max_size=30),
    st.from_regex(r"[0-9]{1,6}[\n ]", fullmatch=True),
    st.sampled_from(["", " 51", "51 ", "5 1", "-51", "51.0", "\u0665\u0661", "00Q5e000001AbCdEAF",
                     "lead_abc", "51/../52", "51?archived=true", "%35%31"]),
).filter(lambda s: not (s and all(c in "0123456789" for c in s)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record_id=_NOT_AN_ID)
def test_invalid_ids_never_produce_a_request(sandbox: HubSpotSandbox, record_id: str) -> None:
    hub = HubSpotConnector(sandbox.url, TOKEN, email_subscription_id=SUBSCRIPTION)
    results = hub.update([sms_out(record_id), email_out(record_id, EMAIL)])
    assert all(type(r.error) is Permanent for r in results)
    assert {r.error.message for r in results} == {ID_REFUSED}  # the id is never echoed
    assert sandbox.requests == []


# --- lookups and polling ----------------------------------------------------------------
def test_find_by_phone(sandbox: HubSpotSandbox, hub: HubSpotConnector) -> None:
    sandbox.add_contact("1", phone="+14155550123")
    sandbox.add_contact("2", mobilephone="+14155550123", phone="+14155550100")
    sandbox.add_contact("3", phone="(415) 555-0123")       # typed without country code
    sandbox.add_contact("4", phone="+49 4155550123")       # same digits, another country
    sandbox.add_contact("5", phone="+14155550199")

    refs = hub.find_by_phone("+14155550123")

    assert sorted(r.record_id for r in refs) == ["1", "2", "3"]
    assert all(r.crm == "hubspot" and r.obj == "contact" for r in refs)
    [call] = sandbox.requests_to(SEARCH, "POST")
    body = call.json()
    assert body["limit"] <= 200 and len(body["filterGroups"]) <= 5
    assert {"propertyName": "phone", "operator": "IN", "values": ["+14155550123"]} in \
        [f for g in body["filterGroups"] for f in g["filters"]]
    assert hub.find_by_phone("+15005550000") == []


def test_find_batches_phones_and_emails_into_one_search(sandbox: HubSpotSandbox, hub: HubSpotConnector) -> None:
    from connectors.types import FoundRecord, RecordRef

    sandbox.add_contact("1", phone="(415) 555-0123", email="ann@example.com")
    sandbox.add_contact("2", mobilephone="+1 212 555 0100")
    sandbox.add_contact("3", phone="+49 4155550123")                # same digits, another country
    sandbox.add_contact("4", email="bob@example.com")
    found = hub.find(["+14155550123", "+12125550100"], ["Ann@Example.com", "bob@example.com"])
    assert sorted(found, key=lambda f: f.ref.record_id) == [
        FoundRecord(RecordRef("hubspot", "contact", "1"), ("+14155550123",), ("ann@example.com",)),
        FoundRecord(RecordRef("hubspot", "contact", "2"), ("+12125550100",), ()),
        FoundRecord(RecordRef("hubspot", "contact", "4"), (), ("bob@example.com",))]
    [call] = sandbox.requests_to(SEARCH, "POST")
    groups = call.json()["filterGroups"]
    assert len(groups) == 5 and all(f["operator"] == "IN" for g in groups for f in g["filters"])


def test_concurrent_searchers_share_one_pace_and_meet_no_429(sandbox: HubSpotSandbox) -> None:
    """Four threads, each with its own connector, run phone lookups (as routing
    does) and polls (as the reflector does) at once: the process-wide pacer keeps them all under the
    simulator's per-account search limit, which answers 429 beyond it."""
    import threading

    sandbox.add_contact("1", phone="+14155550123")
    threads_n, calls = 4, 4
    hubs = [HubSpotConnector(sandbox.url, TOKEN, timeout=10.0) for _ in range(threads_n)]
    found: list[int] = []

    def lookups(hub: HubSpotConnector) -> None:
        for _ in range(calls):
            found.append(len(hub.find_by_phone("+14155550123")))

    def polls(hub: HubSpotConnector) -> None:
        hub.fields("contact")  # property metadata is not a search
        for _ in range(calls):
            found.append(len(hub.changed_since(Watermark(), ["sms_opt_out"]).records))

    workers = [threading.Thread(target=lookups if n % 2 else polls, args=(h,))
               for n, h in enumerate(hubs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)

    assert found == [1] * threads_n * calls
    assert sandbox.search_rate_limited == []
    stamps = sorted(r.at for r in sandbox.requests_to(SEARCH, "POST"))
    assert len(stamps) == threads_n * calls
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    print(f"\nsearch pacing: {len(stamps)} searches from {threads_n} threads, "
          f"{rate:.2f} req/s against a limit of {sandbox.search_limit_per_second}/s, 0 x 429")


def test_search_pacer_hands_out_evenly_spaced_slots() -> None:
    from connectors.hubspot import SEARCH_PACER, SearchPacer

    now = [100.0]
    slept: list[float] = []
    pacer = SearchPacer(rate=4.0, clock=lambda: now[0], sleep=slept.append)
    for _ in range(5):
        pacer.wait()
    assert slept == [0.25, 0.5, 0.75, 1.0]
    now[0] = 200.0  # idle long enough: the next caller goes at once
    pacer.wait()
    assert slept == [0.25, 0.5, 0.75, 1.0]
    assert HubSpotConnector("https://api.hubapi.com", TOKEN).search_pacer is SEARCH_PACER


def _drain(hub: HubSpotConnector, mark: Watermark, limit: int) -> tuple[list[list[str]], Watermark]:
    pages: list[list[str]] = []
    while True:
        page = hub.changed_since(mark, ["sms_opt_out"], limit=limit)
        pages.append([r.ref.record_id for r in page.records])
        mark = page.next_mark
        if not page.more:
            return pages, mark


def test_changed_since_pages_without_misses_or_repeats(sandbox: HubSpotSandbox,
                                                       hub: HubSpotConnector) -> None:
    for rid in ("11", "12", "13", "14", "15"):
        sandbox.add_contact(rid, sms_opt_out="false")
    _, mark = _drain(hub, Watermark(), limit=2)

    order = ["13", "11", "15", "12", "14"]
    for rid in order:
        sandbox.set_property(rid, "sms_opt_out", "true")
    pages, mark = _drain(hub, mark, limit=2)

    assert pages == [["13", "11"], ["15", "12"], ["14"]]
    assert mark.last_id == "14" and int(mark.ts) == to_ms(sandbox.get_contact("14")["lastmodifieddate"])
    page = hub.changed_since(mark, ["sms_opt_out"], limit=2)
    assert page.records == [] and page.next_mark == mark and not page.more

    sandbox.set_property("12", "sms_opt_out", "false")
    [again] = hub.changed_since(mark, ["sms_opt_out"], limit=2).records
    assert again.ref.record_id == "12" and again.values == {"sms_opt_out": False}
    assert again.modified == sandbox.get_contact("12")["lastmodifieddate"]
    search = sandbox.requests_to(SEARCH)[-1].json()
    assert search["sorts"] == [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}]
    assert search["filterGroups"][0]["filters"][0]["operator"] == "GT"


def test_changed_since_never_splits_equal_stamps(sandbox: HubSpotSandbox,
                                                 hub: HubSpotConnector) -> None:
    sandbox.unique_stamps = False
    sandbox.clock = lambda: 1_700_000_000.0
    for rid in ("21", "22", "23"):
        sandbox.add_contact(rid)
    sandbox.clock = lambda: 1_700_000_001.0
    sandbox.add_contact("24")

    first = hub.changed_since(Watermark(), ["sms_opt_out"], limit=2)
    assert [r.ref.record_id for r in first.records] == ["21", "22", "23"] and first.more
    assert first.next_mark.ts == str(1_700_000_000_000)
    second = hub.changed_since(first.next_mark, ["sms_opt_out"], limit=2)
    assert [r.ref.record_id for r in second.records] == ["24"] and not second.more


def test_changed_since_restarts_before_the_search_cap(sandbox: HubSpotSandbox,
                                                      hub: HubSpotConnector) -> None:
    sandbox.search_cap = hub.search_result_cap = 4  # stands in for HubSpot's 10,000
    sandbox.unique_stamps = False
    sandbox.clock = lambda: 1_700_000_000.0
    for rid in ("31", "32", "33", "34", "35"):
        sandbox.add_contact(rid)
    sandbox.clock = lambda: 1_700_000_002.0
    sandbox.add_contact("36")

    pages, mark = _drain(hub, Watermark(), limit=3)

    assert pages == [["31", "32", "33", "34", "35"], ["36"]]
    assert mark == Watermark(ts=str(1_700_000_002_000), last_id="36")
    searches = [r.json() for r in sandbox.requests_to(SEARCH)]
    assert all(int(s.get("after") or 0) < 4 for s in searches)
    ties = searches[1]  # the rest of the stamp, by id instead of by offset
    assert ties.get("after") is None and ties["sorts"][0]["propertyName"] == "hs_object_id"
    assert ties["filterGroups"][0]["filters"] == [
        {"propertyName": "lastmodifieddate", "operator": "EQ", "value": str(1_700_000_000_000)}]


def test_poll_lag_keeps_fresh_changes_for_a_later_poll(sandbox: HubSpotSandbox) -> None:
    sandbox.add_contact("41")
    lagging = HubSpotConnector(sandbox.url, TOKEN, poll_lag_seconds=3600)
    page = lagging.changed_since(Watermark(), ["sms_opt_out"])
    assert page.records == [] and page.next_mark == Watermark() and not page.more


# --- transport --------------------------------------------------------------------------
def test_configured_ca_bundle_wins_and_tls_failures_are_transient(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import certifi
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())  # does not trust the sandbox CA
    tls = SandboxTLS.create()
    with HubSpotSandbox(token=TOKEN).start(tls=tls) as secure:
        assert secure.url.startswith("https://127.0.0.1:")
        trusted = HubSpotConnector(secure.url, TOKEN, ca_bundle=tls.ca_bundle, timeout=5.0)
        assert trusted.fields("contact")["sms_opt_out"].updateable
        untrusted = HubSpotConnector(secure.url, TOKEN, timeout=5.0)
        with pytest.raises(Transient) as caught:
            untrusted.fields("contact")
        assert TOKEN not in str(caught.value)


# --- metadata ---------------------------------------------------------------------------
def test_fields_reports_read_only_email_optout(hub: HubSpotConnector) -> None:
    fields = hub.fields("contact")
    assert fields["hs_email_optout"].updateable is False
    assert fields["sms_opt_out"].updateable is True and fields["sms_opt_out"].type == "bool"
    assert {"call_opt_out", "whatsapp_opt_out", "phone", "mobilephone"} <= set(fields)
    with pytest.raises(Permanent):
        hub.fields("deal")


def test_sandbox_speaks_hubspot_shapes(sandbox: HubSpotSandbox) -> None:
    """Spot checks of the raw wire format other tests rely on."""
    sandbox.add_contact("51", email=EMAIL)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    got = requests.get(f"{sandbox.url}/crm/v3/objects/contacts/404", headers=auth, timeout=5)
    assert got.status_code == 404 and got.json()["category"] == "OBJECT_NOT_FOUND"
    assert got.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
    patched = requests.patch(f"{sandbox.url}/crm/v3/objects/contacts/51", headers=auth,
                             json={"properties": {"call_opt_out": "true"}}, timeout=5)
    assert patched.status_code == 200 and patched.json()["properties"]["call_opt_out"] == "true"
    too_many = requests.post(f"{sandbox.url}/crm/v3/objects/contacts/batch/update", headers=auth,
                             json={"inputs": [{"id": str(n), "properties": {}} for n in range(101)]},
                             timeout=5)
    assert too_many.status_code == 400 and too_many.json()["category"] == "VALIDATION_ERROR"
    deep = requests.post(f"{sandbox.url}/crm/v3/objects/contacts/search", headers=auth,
                         json={"after": "10000", "limit": 10}, timeout=5)
    assert deep.status_code == 400
    wide = requests.post(f"{sandbox.url}/crm/v3/objects/contacts/search", headers=auth,
                         json={"limit": 201}, timeout=5)
    assert wide.status_code == 400
    v4 = f"{sandbox.url}/communication-preferences/v4/statuses/{EMAIL}"
    status = requests.get(v4, params={"channel": "EMAIL"}, headers=auth, timeout=5).json()
    assert status["status"] == "COMPLETE"
    assert {r["subscriptionId"] for r in status["results"]} >= {int(SUBSCRIPTION)}
    assert all(r["status"] == "NOT_SPECIFIED" for r in status["results"])
    assert requests.get(v4, headers=auth, timeout=5).status_code == 400  # channel is required
    bad = requests.post(v4, headers=auth, timeout=5, json={"channel": "EMAIL", "statusState": "OFF",
                                                          "subscriptionId": 1001})
    assert bad.status_code == 400 and bad.json()["category"] == "VALIDATION_ERROR"
    wide = requests.get(f"{v4}/unsubscribe-all", params={"channel": "EMAIL"}, headers=auth,
                        timeout=5).json()
    assert wide["results"] == []
    for legacy in ("/communication-preferences/v3/unsubscribe", "/communication-preferences/v3/subscribe"):
        assert requests.post(sandbox.url + legacy, headers=auth, json={}, timeout=5).status_code == 404
    assert iso_ms(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
    bad = requests.get(f"{sandbox.url}/crm/v3/properties/contacts", timeout=5)
    assert bad.status_code == 401 and bad.json()["category"] == "INVALID_AUTHENTICATION"
