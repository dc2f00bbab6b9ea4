"""CloseConnector against the Close sandbox over real HTTP on 127.0.0.1."""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.base import CrmConnector
from connectors.close import CLOSE_CONTACT, CLOSE_LEAD, CloseConnector, _Pacer, _rate_state, rate_group
from connectors.errors import AuthFailed, NotFound, Permanent, RateLimited
from connectors.sandbox.close import DEFAULT_API_KEY, CloseSandbox
from connectors.sandbox.close import rate_group as sandbox_rate_group
from connectors.types import RecordRef, RecordUpdate, Watermark

SMS_LEAD = "cf_smsOptOutLead01"
WA_LEAD = "cf_waOptOutLead01"
RATE_BODY = {"error": {"rate_reset": 1.0, "rate_limit": 10, "rate_window": 1, "rate_limit_type": "key",
                       "message": "API call count exceeded for this 1 second window"}}


@pytest.fixture(scope="module")
def server() -> Iterator[CloseSandbox]:
    with CloseSandbox() as sb:
        yield sb


@pytest.fixture
def sandbox(server: CloseSandbox) -> CloseSandbox:
    """One server for the module, a fresh organisation per test."""
    server.reset()
    server.add_lead("lead_abc123", "Acme")
    server.add_contact("cont_abc1", "lead_abc123", phones=["+15551230001"], emails=["ann@example.com"])
    server.add_lead("lead_other9", "Other Co")
    server.add_contact("cont_oth1", "lead_other9", phones=["+15551230001", "+15551230009"])
    server.clear_log()
    return server


@pytest.fixture
def close(sandbox: CloseSandbox) -> CloseConnector:
    return CloseConnector(sandbox.url + "/api/v1", DEFAULT_API_KEY, timeout=5.0)


def lead_ref(record_id: str = "lead_abc123") -> RecordRef:
    return RecordRef("close", "lead", record_id)


def test_satisfies_protocol(close: CloseConnector) -> None:
    assert isinstance(close, CrmConnector)
    assert close.name == "close"


def test_update_sets_mapped_custom_field_by_name(close: CloseConnector, sandbox: CloseSandbox) -> None:
    before = sandbox.lead("lead_abc123")["date_updated"]
    [result] = close.update([RecordUpdate(lead_ref(), {"SMS Opt Out": True, "WhatsApp Opt Out": True})])
    assert result.ok, result.error
    assert sandbox.custom_value("lead_abc123", "SMS Opt Out") == "Yes"   # one-choice field
    assert sandbox.custom_value("lead_abc123", "WhatsApp Opt Out") is True  # checkbox
    assert sandbox.lead("lead_abc123")["date_updated"] > before
    [put] = sandbox.requests_to(r"/lead/lead_abc123/$", "PUT")
    assert put.json() == {f"custom.{SMS_LEAD}": "Yes", f"custom.{WA_LEAD}": True}
    assert put.headers["Authorization"].startswith("Basic ")


def test_update_by_field_id_and_false_clears(close: CloseConnector, sandbox: CloseSandbox) -> None:
    sandbox.set_custom("lead_abc123", "SMS Opt Out", "Yes")
    [result] = close.update([RecordUpdate(lead_ref(), {SMS_LEAD: False})])
    assert result.ok, result.error
    assert sandbox.custom_value("lead_abc123", SMS_LEAD) is None
    assert sandbox.requests_to("/lead/lead_abc123/$", "PUT")[0].json() == {f"custom.{SMS_LEAD}": None}


def test_metadata_fetched_once_and_contact_fields_resolved(close: CloseConnector, sandbox: CloseSandbox) -> None:
    results = close.update([
        RecordUpdate(lead_ref(), {"SMS Opt Out": True}),
        RecordUpdate(lead_ref("lead_other9"), {"SMS Opt Out": True}),
        RecordUpdate(RecordRef("close", "contact", "cont_abc1"), {"SMS Opt Out": True}),
    ])
    assert all(r.ok for r in results), results
    assert len(sandbox.requests_to("/custom_field/lead/$")) == 1
    assert len(sandbox.requests_to("/custom_field/contact/$")) == 1
    assert sandbox.custom_value("cont_abc1", "SMS Opt Out") == "Yes"
    assert sandbox.requests_to("/contact/cont_abc1/$", "PUT")[0].json() == {"custom.cf_smsOptOutCont01": "Yes"}


def test_email_unsubscribe_and_resubscribe(close: CloseConnector, sandbox: CloseSandbox) -> None:
    unsub = RecordUpdate(lead_ref(), email="ann@example.com", email_unsubscribe=True)
    assert close.update([unsub])[0].ok
    assert "ann@example.com" in sandbox.unsubscribed
    assert sandbox.contact("cont_abc1")["emails"][0]["is_unsubscribed"] is True
    assert close.update([unsub])[0].ok  # the record says is_unsubscribed: done, nothing sent
    assert len(sandbox.requests_to("/unsubscribe/email/$", "POST")) == 1
    assert not sandbox.requests_to("/lead/", "PUT")  # no fields: no PUT

    resub = RecordUpdate(lead_ref(), email="ann@example.com", email_unsubscribe=False)
    assert close.update([resub])[0].ok
    assert sandbox.unsubscribed == {}
    assert close.update([resub])[0].ok  # 404: never unsubscribed is the wanted state
    assert [r.path for r in sandbox.requests_to("/unsubscribe/email/.+/$", "DELETE")] == \
        ["/api/v1/unsubscribe/email/ann@example.com/"] * 2


def test_an_events_odd_email_never_reaches_close(close: CloseConnector, sandbox: CloseSandbox) -> None:
    for email in ("no-at-sign", "a/b@x.com", "a@b.com/../x", "a@b.com?x=1"):
        [result] = close.update([RecordUpdate(lead_ref(), {"SMS Opt Out": True}, email=email,
                                              email_unsubscribe=True)])
        assert result.ok, result.error
    sent = [r for r in sandbox.requests if r.method != "GET"]
    assert not any(bad in r.path or bad.encode() in r.body for r in sent
                   for bad in ("no-at-sign", "a/b@x.com", "a@b.com/../x", "a@b.com?x=1"))
    assert set(sandbox.unsubscribed) == {"ann@example.com"}  # the record's own address


def test_email_opt_out_unsubscribes_the_records_addresses_never_the_webhooks(
        close: CloseConnector, sandbox: CloseSandbox) -> None:
    """Issue 17: an event for lead_abc123 naming other@... must not unsubscribe other@..."""
    [result] = close.update([RecordUpdate(lead_ref(), {}, email="other@example.org", email_unsubscribe=True)])
    assert result.ok, result.error
    assert "other@example.org" not in sandbox.unsubscribed
    assert set(sandbox.unsubscribed) == {"ann@example.com"}
    assert all(r.json() == {"email": "ann@example.com"}
               for r in sandbox.requests_to("/unsubscribe/email/$", "POST"))


def test_email_opt_out_naming_one_of_the_records_addresses_leaves_the_others(
        close: CloseConnector, sandbox: CloseSandbox) -> None:
    sandbox.add_contact("cont_abc2", "lead_abc123", emails=["ann.work@example.com"])
    named = RecordUpdate(lead_ref(), {}, email="ANN.work@example.com", email_unsubscribe=True)
    [result] = close.update([named])
    assert result.ok, result.error
    assert set(sandbox.unsubscribed) == {"ann.work@example.com"}


def test_opt_in_never_resubscribes_an_address_the_record_does_not_hold(
        close: CloseConnector, sandbox: CloseSandbox) -> None:
    sandbox.unsubscribed["other@example.org"] = {"email": "other@example.org", "date_created": sandbox.now()}
    opt_in = RecordUpdate(lead_ref(), {}, email="other@example.org", email_unsubscribe=False)
    [result] = close.update([opt_in])
    assert isinstance(result.error, Permanent) and "not on the record" in str(result.error)
    assert "other@example.org" in sandbox.unsubscribed
    assert not sandbox.requests_to("/unsubscribe/email/", "DELETE")


def test_already_unsubscribed_is_done_after_a_status_check_not_by_its_error_text(
        close: CloseConnector, sandbox: CloseSandbox) -> None:
    """Close documents no text for a duplicate unsubscribe: whatever it says, the
    record's ``is_unsubscribed`` decides. Another 400 stays a failure."""
    sandbox.already_unsubscribed_body = {"errors": [], "field-errors": {"email": "Duplicate entry."}}
    # Someone unsubscribes the address in Close between our read of the lead and our POST.
    before = sandbox.lead("lead_abc123")
    requests.post(sandbox.url + "/api/v1/unsubscribe/email/", json={"email": "ann@example.com"},
                  auth=(DEFAULT_API_KEY, ""), timeout=5).raise_for_status()
    sandbox.add_fault("GET", r"/lead/lead_abc123/$", 200, before)
    sandbox.clear_log()
    [result] = close.update([RecordUpdate(lead_ref(), {}, email="ann@example.com", email_unsubscribe=True)])
    assert result.ok, result.error
    assert len(sandbox.requests_to("/unsubscribe/email/$", "POST")) == 1
    assert len(sandbox.requests_to("/lead/lead_abc123/$", "GET")) == 2  # read, then the status check

    sandbox.add_fault("POST", r"/unsubscribe/email/$", 400,
                      {"errors": [], "field-errors": {"email": "Enter a valid email address."}})
    sandbox.add_lead("lead_fresh1", "Fresh")
    sandbox.add_contact("cont_fresh1", "lead_fresh1", emails=["fresh@example.com"])
    [refused] = close.update([RecordUpdate(lead_ref("lead_fresh1"), {}, email_unsubscribe=True)])
    assert isinstance(refused.error, Permanent) and "Enter a valid email address" in str(refused.error)


def test_unsubscribe_without_an_address_uses_the_records_own(close: CloseConnector,
                                                              sandbox: CloseSandbox) -> None:
    sandbox.add_lead("lead_mailx1", name="Mail")
    sandbox.add_contact("cont_mailx1", "lead_mailx1", emails=["Pat@Example.com", "pat.work@example.com"])
    sandbox.add_lead("lead_nomail1", name="No mail")
    [ok] = close.update([RecordUpdate(RecordRef("close", "lead", "lead_mailx1"), {}, email_unsubscribe=True)])
    assert ok.ok, ok.error
    assert {"pat@example.com", "pat.work@example.com"} <= set(sandbox.unsubscribed)
    [bad] = close.update([RecordUpdate(RecordRef("close", "lead", "lead_nomail1"), {}, email_unsubscribe=True)])
    assert isinstance(bad.error, Permanent) and "no usable email" in str(bad.error)


def test_429_is_retried_no_earlier_than_retry_after(close: CloseConnector, sandbox: CloseSandbox) -> None:
    close.fields("lead")
    sandbox.add_fault("PUT", r"/lead/lead_abc123/$", 429, RATE_BODY,
                      headers={"Retry-After": "1", "RateLimit": "limit=10, remaining=0, reset=1"})
    [result] = close.update([RecordUpdate(lead_ref(), {"SMS Opt Out": True})])
    assert result.ok, result.error
    first, second = sandbox.requests_to(r"/lead/lead_abc123/$", "PUT")
    assert second.at - first.at >= 1.0
    assert sandbox.custom_value("lead_abc123", SMS_LEAD) == "Yes"


def test_429_without_retry_after_uses_body_rate_reset(close: CloseConnector, sandbox: CloseSandbox) -> None:
    close.fields("lead")
    body = {"error": {**RATE_BODY["error"], "rate_reset": 0.4}}
    sandbox.add_fault("PUT", r"/lead/lead_abc123/$", 429, body)
    [result] = close.update([RecordUpdate(lead_ref(), {"SMS Opt Out": True})])
    assert result.ok, result.error
    first, second = sandbox.requests_to(r"/lead/lead_abc123/$", "PUT")
    assert second.at - first.at >= 0.4


def test_long_retry_after_becomes_rate_limited(close: CloseConnector, sandbox: CloseSandbox) -> None:
    close.fields("lead")
    sandbox.add_fault("PUT", r"/lead/", 429, RATE_BODY, headers={"Retry-After": "120"})
    results = close.update([RecordUpdate(lead_ref(), {"SMS Opt Out": True}),
                            RecordUpdate(lead_ref("lead_other9"), {"SMS Opt Out": True})])
    assert all(isinstance(r.error, RateLimited) for r in results)
    assert results[0].error.retry_after == 120
    assert len(sandbox.requests_to("/lead/", "PUT")) == 1  # the outage cost one call
    # The pacer now holds further lead writes back without spending a request...
    sandbox.clear_log()
    [held] = close.update([RecordUpdate(lead_ref(), {"SMS Opt Out": True})])
    assert isinstance(held.error, RateLimited)
    assert sandbox.requests == []
    # ...while other endpoint groups go on (Close limits each group on its own).
    assert "SMS Opt Out" in close.fields("lead")
    assert close.find_by_phone("+15551230001")


def test_rate_group_names_the_endpoint_group() -> None:
    assert rate_group("PUT", "/lead/lead_abc123/") == rate_group("PUT", "/lead/lead_x/") == "write /lead/"
    assert rate_group("GET", "/lead/lead_abc123/") == "read /lead/"
    assert rate_group("POST", "/data/search/") == "write /data/search/"
    assert rate_group("DELETE", "/unsubscribe/email/a@b.com/") == rate_group("POST", "/unsubscribe/email/")
    assert rate_group("GET", "/custom_field/lead/") == "read /custom_field/lead/"
    assert sandbox_rate_group("PUT", "/api/v1/lead/lead_abc123/") == rate_group("PUT", "/lead/lead_abc123/")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["RateLimit", "RateLimit-Remaining", "RateLimit-Reset", "RateLimit-Limit",
                                        "X-RateLimit-Reset", "X-Rate-Limit-Remaining"]),
                       st.one_of(st.text(max_size=60), st.sampled_from(
                           ["nan", "inf", "-1", "1e999", "limit=9, remaining=0, reset=" + "9" * 400,
                            "limit=5, remaining=0, reset=1e20", "remaining=0, reset=99999999999"]))))
def test_rate_headers_from_the_wire_never_break_the_pacer(headers: dict[str, str]) -> None:
    limit, remaining, reset = _rate_state(headers)
    for value in (limit, remaining, reset):
        assert value is None or (math.isfinite(value) and value >= 0)
    assert reset is None or reset <= 86400
    pacer = _Pacer(max_wait=0.0)
    pacer.wait("write /lead/")
    pacer.done("write /lead/", headers)
    try:
        pacer.wait("write /lead/")
    except RateLimited as exc:
        assert exc.retry_after is not None and math.isfinite(exc.retry_after)


def test_pacer_probes_a_new_group_once_then_follows_its_header() -> None:
    pacer = _Pacer(max_wait=5.0)
    pacer.wait("write /lead/")
    second = threading.Thread(target=pacer.wait, args=("write /lead/",))
    second.start()
    second.join(0.3)
    assert second.is_alive()          # the group's first answer is awaited before a second call
    pacer.wait("read /lead/")         # another group is not held
    pacer.done("write /lead/", {"RateLimit": "limit=2, remaining=1, reset=30"})
    second.join(2)
    assert not second.is_alive()      # took the last slot of the window
    pacer.max_wait = 1.0
    with pytest.raises(RateLimited) as info:  # the window is spent for 30 s: not worth blocking
        pacer.wait("write /lead/")
    assert 25 < info.value.retry_after <= 30
    # Answers without a RateLimit header leave a group unpaced, not serialised.
    pacer.wait("read /custom_field/lead/")
    pacer.done("read /custom_field/lead/", {})
    pacer.wait("read /custom_field/lead/")
    pacer.wait("read /custom_field/lead/")


def test_a_spent_group_does_not_hold_back_another(close: CloseConnector, sandbox: CloseSandbox) -> None:
    """The search window is spent for a minute: lead writes are neither refused nor held."""
    close.fields("lead")
    sandbox.set_rate_limit(1, window=60.0, group="write /data/search/")
    assert close.find_by_phone("+15551230009") == [lead_ref("lead_other9"),
                                                  RecordRef("close", "contact", "cont_oth1")]
    with pytest.raises(RateLimited):  # the search group's window is spent: held without a call
        close.find_by_phone("+15551230009")
    assert len(sandbox.requests_to("/data/search/$", "POST")) == 1
    results = close.update([RecordUpdate(lead_ref(i), {"SMS Opt Out": True})
                            for i in ("lead_abc123", "lead_other9")])
    assert all(r.ok for r in results), results
    assert sandbox.throttled == 0


def test_concurrent_writers_stay_under_the_groups_limit(sandbox: CloseSandbox) -> None:
    """Four threads, 24 lead writes against 6 per second: no 429; the rate is reported."""
    sandbox.set_rate_limit(6, window=1.0, group="write /lead/")
    close = CloseConnector(sandbox.url + "/api/v1", DEFAULT_API_KEY, timeout=5.0)
    close.fields("lead")
    ids = ["lead_abc123", "lead_other9"] * 12
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        batches = pool.map(lambda i: close.update([RecordUpdate(lead_ref(i), {"SMS Opt Out": True})]), ids)
        results = [r for batch in batches for r in batch]
    elapsed = time.monotonic() - start
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert sandbox.throttled == 0
    puts = sandbox.requests_to("/lead/", "PUT")
    assert len(puts) == 24
    print(f"close pacing: 24 writes in {elapsed:.2f} s = {24 / elapsed:.1f} req/s against 6/s, "
          f"{sandbox.throttled} x 429")


def test_ratelimit_remaining_zero_paces_the_next_call(close: CloseConnector, sandbox: CloseSandbox) -> None:
    close.fields("lead")
    sandbox.set_rate_limit(2, window=1.0)
    start = time.monotonic()
    results = close.update([RecordUpdate(lead_ref(i), {"SMS Opt Out": True})
                            for i in ("lead_abc123", "lead_other9", "lead_abc123")])
    assert all(r.ok for r in results), results
    assert sandbox.throttled == 0  # paced, never refused
    puts = sandbox.requests_to("/lead/", "PUT")
    assert len(puts) == 3
    assert puts[2].at - puts[0].at >= 0.9
    assert time.monotonic() - start < 5


def test_401_is_auth_failed_without_the_key(sandbox: CloseSandbox) -> None:
    wrong_key = "api_wrongKey123.verySecretValue"
    bad = CloseConnector(sandbox.url + "/api/v1", wrong_key)
    with pytest.raises(AuthFailed) as info:
        bad.fields("lead")
    text = f"{info.value} {info.value!r} {info.value.message}"
    assert wrong_key not in text and "verySecretValue" not in text
    assert info.value.status == 401 and "API key" in info.value.message
    with pytest.raises(AuthFailed):  # an auth failure stops the whole batch
        bad.update([RecordUpdate(lead_ref(), {"SMS Opt Out": True})])
    assert wrong_key not in repr(bad)


def test_404_is_not_found_with_close_text(close: CloseConnector) -> None:
    [result] = close.update([RecordUpdate(lead_ref("lead_missing1"), {"SMS Opt Out": True})])
    assert isinstance(result.error, NotFound)
    assert result.error.status == 404
    assert "Lead matching query does not exist" in result.error.message


def test_unknown_custom_field_is_permanent_with_close_field_error(close: CloseConnector,
                                                                 sandbox: CloseSandbox) -> None:
    results = close.update([
        RecordUpdate(lead_ref(), {"No Such Field": True}),
        RecordUpdate(lead_ref(), {"cf_nope123": True}),
        RecordUpdate(lead_ref("lead_other9"), {"SMS Opt Out": True}),  # later records still go
    ])
    for result, key in zip(results, ("custom.No Such Field", "custom.cf_nope123")):
        assert type(result.error) is Permanent and result.error.status == 400
        assert result.error.message == f"{key}: Unknown custom field."
    assert results[2].ok
    assert sandbox.custom_value("lead_abc123", SMS_LEAD) is None


def test_close_error_text_is_scrubbed_of_personal_data(close: CloseConnector, sandbox: CloseSandbox) -> None:
    sandbox.add_fault("PUT", "/lead/", 400, {"errors": ["bob@example.com is invalid"],
                                             "field-errors": {"phones": "+15551234567 is taken"}})
    [result] = close.update([RecordUpdate(lead_ref(), {"SMS Opt Out": True})])
    assert isinstance(result.error, Permanent)
    assert "bob@example.com" not in result.error.message and "5551234567" not in result.error.message
    assert "is invalid" in result.error.message and "phones:" in result.error.message


def test_server_error_is_retried(close: CloseConnector, sandbox: CloseSandbox) -> None:
    close.fields("lead")
    sandbox.add_fault("PUT", "/lead/", 503, {"error": "Service unavailable"})
    [result] = close.update([RecordUpdate(lead_ref(), {"SMS Opt Out": True})])
    assert result.ok, result.error
    assert len(sandbox.requests_to("/lead/", "PUT")) == 2


BAD_IDS = ["lead_../x", "//evil", "lead_abc/../../x", "lead_abc?x=1", "lead_abc#f", "lead_abc\n",
           "lead_", "LEAD_abc", " lead_abc", "lead_abc%2F..", "http://127.0.0.2/lead_x", "lead_ab c",
           "cont_a/b", "lead_ａｂｃ", "", "00Q000000000001"]


@pytest.mark.parametrize("record_id", BAD_IDS)
def test_invalid_ids_never_produce_a_request(close: CloseConnector, sandbox: CloseSandbox,
                                             record_id: str) -> None:
    sandbox.clear_log()
    [result] = close.update([RecordUpdate(RecordRef("close", "lead", record_id), {"SMS Opt Out": True},
                                          email="ann@example.com", email_unsubscribe=True)])
    assert type(result.error) is Permanent
    assert sandbox.requests == []


def test_ref_object_must_match_id(close: CloseConnector, sandbox: CloseSandbox) -> None:
    sandbox.clear_log()
    [result] = close.update([RecordUpdate(RecordRef("close", "lead", "cont_abc1"), {"SMS Opt Out": True})])
    assert type(result.error) is Permanent
    assert sandbox.requests == []


@settings(max_examples=300, deadline=None)
@given(record_id=st.text(max_size=40) | st.from_regex(r"(lead|cont)_[^A-Za-z0-9]{1,5}.*", fullmatch=True),
       obj=st.sampled_from(["lead", "contact"]))
def test_generated_invalid_ids_never_produce_a_request(server: CloseSandbox, record_id: str,
                                                       obj: str) -> None:
    if CLOSE_LEAD.fullmatch(record_id) or CLOSE_CONTACT.fullmatch(record_id):
        return
    server.clear_log()
    close = CloseConnector(server.url + "/api/v1", DEFAULT_API_KEY)
    [result] = close.update([RecordUpdate(RecordRef("close", obj, record_id), {"SMS Opt Out": True})])
    assert type(result.error) is Permanent
    assert server.requests == []


def test_find_by_phone_returns_leads_then_contacts(close: CloseConnector, sandbox: CloseSandbox) -> None:
    refs = close.find_by_phone("+15551230001")
    assert refs == [lead_ref("lead_abc123"), lead_ref("lead_other9"),
                    RecordRef("close", "contact", "cont_abc1"), RecordRef("close", "contact", "cont_oth1")]
    assert close.find_by_phone("+15551230009") == [lead_ref("lead_other9"),
                                                   RecordRef("close", "contact", "cont_oth1")]
    assert close.find_by_phone("+15559999999") == []
    leads_only = CloseConnector(sandbox.url + "/api/v1", DEFAULT_API_KEY, phone_lookup=("lead",))
    assert leads_only.find_by_phone("+15551230001") == [lead_ref("lead_abc123"), lead_ref("lead_other9")]


def test_find_looks_up_phones_and_emails_in_one_search(close: CloseConnector, sandbox: CloseSandbox) -> None:
    from connectors.types import FoundRecord

    found = close.find(["+15551230009", "not-a-phone"], ["ANN@example.com", "nobody@example.com"])
    assert [f.ref.obj for f in found] == ["lead", "lead", "contact", "contact"]
    assert set(found) == {
        FoundRecord(lead_ref("lead_other9"), ("+15551230009",), ()),
        FoundRecord(lead_ref("lead_abc123"), (), ("ann@example.com",)),
        FoundRecord(RecordRef("close", "contact", "cont_oth1"), ("+15551230009",), ()),
        FoundRecord(RecordRef("close", "contact", "cont_abc1"), (), ("ann@example.com",))}
    assert len(sandbox.requests_to(r"/data/search/$", "POST")) == 1


def test_find_by_phone_pages_through_the_cursor(sandbox: CloseSandbox, close: CloseConnector) -> None:
    for n in range(250):
        sandbox.add_lead(f"lead_many{n}")
        sandbox.add_contact(f"cont_many{n}", f"lead_many{n}", phones=["+15557770000"])
    refs = close.find_by_phone("+15557770000")
    assert len(refs) == 500 and len(set(refs)) == 500
    assert len(sandbox.requests_to("/data/search/$", "POST")) == 2


def test_find_by_phone_rejects_non_e164_without_io(close: CloseConnector, sandbox: CloseSandbox) -> None:
    sandbox.clear_log()
    for phone in ("5551230001", "+1 555 123", "+15551230001\n", "", "+0123456789"):
        with pytest.raises(Permanent):
            close.find_by_phone(phone)
    assert sandbox.requests == []


def test_changed_since_pages_without_misses_or_repeats(close: CloseConnector, sandbox: CloseSandbox) -> None:
    base = "2020-01-01T00:00:%02d.000000+00:00"
    # Leads that tie on date_updated are inserted out of id order on purpose.
    plan = [("lead_p1", 1), ("lead_t3", 2), ("lead_t1", 2), ("lead_t2", 2), ("lead_p5", 3),
            ("lead_p6", 4), ("lead_p7", 5)]
    for lead_id, second in plan:
        sandbox.add_lead(lead_id, custom={"SMS Opt Out": "Yes"} if lead_id == "lead_t1" else None)
        sandbox.set_date_updated(lead_id, base % second)
    sandbox.add_contact("cont_t1", "lead_t1", phones=["+15551110001"])
    sandbox.set_date_updated("lead_t1", base % 2)
    for old in ("lead_abc123", "lead_other9"):  # the fixture's leads predate the mark
        sandbox.set_date_updated(old, "2019-06-01T00:00:00.000000+00:00")

    mark = Watermark(ts="2019-12-31T23:59:59Z")
    seen: list[str] = []
    pages = 0
    while True:
        page = close.changed_since(mark, ["SMS Opt Out", "WhatsApp Opt Out"], limit=2)
        pages += 1
        seen += [r.ref.record_id for r in page.records]
        for rec in page.records:
            assert set(rec.values) == {"SMS Opt Out", "WhatsApp Opt Out", "phones"}
        mark = page.next_mark
        if not page.more:
            break
        assert pages < 10
    assert seen == ["lead_p1", "lead_t1", "lead_t2", "lead_t3", "lead_p5", "lead_p6", "lead_p7"]
    assert mark == Watermark(ts=base % 5, last_id="lead_p7")

    again = close.changed_since(mark, ["SMS Opt Out"])
    assert again.records == [] and again.next_mark == mark and not again.more

    sandbox.set_custom("lead_t1", "SMS Opt Out", None)  # an admin edit after the mark
    later = close.changed_since(mark, ["SMS Opt Out", "cf_waOptOutLead01"])
    [rec] = later.records
    assert rec.ref == lead_ref("lead_t1")
    assert rec.values == {"SMS Opt Out": False, "cf_waOptOutLead01": False, "phones": ["+15551110001"]}
    assert later.next_mark.last_id == "lead_t1"


def test_changed_since_values_and_errors(close: CloseConnector, sandbox: CloseSandbox) -> None:
    sandbox.set_custom("lead_abc123", "SMS Opt Out", "Yes")
    sandbox.set_custom("lead_abc123", "WhatsApp Opt Out", True)
    page = close.changed_since(Watermark(), ["SMS Opt Out", "WhatsApp Opt Out"], limit=100)
    by_id = {r.ref.record_id: r for r in page.records}
    assert by_id["lead_abc123"].values == {"SMS Opt Out": True, "WhatsApp Opt Out": True,
                                           "phones": ["+15551230001"]}
    assert by_id["lead_other9"].values["phones"] == ["+15551230001", "+15551230009"]
    assert [r.ref.record_id for r in page.records] == ["lead_other9", "lead_abc123"]  # oldest first
    with pytest.raises(Permanent):
        close.changed_since(Watermark(), ["No Such Field"])
    with pytest.raises(Permanent):
        close.changed_since(Watermark(ts="yesterday"), ["SMS Opt Out"])


def test_fields_lists_names_and_ids(close: CloseConnector) -> None:
    lead = close.fields("lead")
    assert lead["SMS Opt Out"].type == "choices" and lead["SMS Opt Out"].updateable
    assert lead[SMS_LEAD].label == "SMS Opt Out" and lead[SMS_LEAD].name == SMS_LEAD
    assert lead["WhatsApp Opt Out"].type == "checkbox"
    assert lead["name"].updateable and not lead["date_updated"].updateable
    assert not lead["phones"].updateable  # what changed_since reports in values["phones"]
    contact = close.fields("contact")
    assert "cf_smsOptOutCont01" in contact and "Opt Out Reason" not in contact
    with pytest.raises(Permanent):
        close.fields("opportunity")
