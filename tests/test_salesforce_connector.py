"""SalesforceConnector against the HTTPS Salesforce sandbox, through simple-salesforce."""
from __future__ import annotations

import datetime as dt
import re
import string
import time
from concurrent.futures import ThreadPoolExecutor

import certifi
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from connectors.base import CrmConnector
from connectors.errors import AuthFailed, NotFound, Permanent, QuotaExhausted, RateLimited, Transient
from connectors.salesforce import SF_ID, SalesforceConnector, default_audience, object_for_id, to_18, \
    validate_id
from connectors.sandbox.salesforce import SalesforceSandbox, sf_id18
from connectors.sandbox.tls import SandboxTLS
from connectors.types import RecordRef, RecordUpdate, Watermark

TOKEN_PATH = r"/services/oauth2/token$"
COMPOSITE = r"/composite/sobjects$"
UNUSED_INSTANCE = "https://127.0.0.1:9"  # must never be called: the token response names the instance
HYPOTHESIS = settings(max_examples=150, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def sf_tls(tmp_path_factory: pytest.TempPathFactory) -> SandboxTLS:
    return SandboxTLS.create(tmp_path_factory.mktemp("sf-ca"))


@pytest.fixture(scope="module")
def sf_server(sf_tls: SandboxTLS):
    sb = SalesforceSandbox()
    sb.start(tls=sf_tls)
    yield sb
    sb.stop()


@pytest.fixture
def sandbox(sf_server: SalesforceSandbox) -> SalesforceSandbox:
    sf_server.reset()
    return sf_server


@pytest.fixture
def connect(sandbox: SalesforceSandbox):
    def make(flow: str = "client_credentials", auth: dict | None = None,
             **kwargs) -> SalesforceConnector:
        auth_settings = {"flow": flow, "login_url": sandbox.login_url, "client_id": sandbox.client_id,
                     "client_secret": sandbox.client_secret, "username": sandbox.username,
                     "password": sandbox.password, "private_key": sandbox.jwt_private_key_pem}
        auth_settings.update(auth or {})
        kwargs.setdefault("ca_bundle", sandbox.tls.ca_bundle)
        kwargs.setdefault("retry_initial", 0.05)
        kwargs.setdefault("timeout", 10.0)
        return SalesforceConnector(kwargs.pop("instance_url", UNUSED_INSTANCE), "62.0", auth_settings,
                                   **kwargs)
    return make


@pytest.fixture
def sf(connect) -> SalesforceConnector:
    return connect()


def contact_update(record_id: str, **fields) -> RecordUpdate:
    return RecordUpdate(ref=RecordRef("salesforce", "Contact", record_id), fields=fields)


# --- ids -------------------------------------------------------------------------

def test_to_18_known_value():
    assert to_18("003XX000004DHPY") == "003XX000004DHPYYA4"
    assert to_18("003XX000004DHPYYA4") == "003XX000004DHPYYA4"
    assert object_for_id("00QXX000004DHPY") == "Lead"
    assert object_for_id("003XX000004DHPYYA4") == "Contact"
    assert object_for_id("001XX000004DHPY") is None
    assert object_for_id("003/../x") is None
    assert validate_id("003XX000004DHPYya4") == "003XX000004DHPYYA4"  # the suffix is case-insensitive
    assert validate_id("003xx000004dhpyya4") == "003XX000004DHPYYA4"  # case restored from the suffix
    unfit = "00QXX0000009BAD4AA"  # "4" marks position 1 ("0") as an upper-case letter
    assert to_18(unfit) == unfit  # a suffix that cannot fit comes back as it is ...
    with pytest.raises(Permanent):
        validate_id(unfit)  # ... and is refused before any request
    assert validate_id("003XX000004DHPY", "Contact") == "003XX000004DHPYYA4"


@HYPOTHESIS
@given(st.text(alphabet=string.ascii_letters + string.digits, min_size=15, max_size=15))
def test_to_18_property(id15: str):
    long_id = to_18(id15)
    assert len(long_id) == 18 and long_id[:15] == id15 and SF_ID.match(long_id)
    assert long_id == sf_id18(id15)  # agrees with the sandbox's independent implementation
    flipped = id15.swapcase()
    if flipped != id15:  # case-safe: ids differing only in case differ in the suffix too
        assert to_18(flipped).lower() != long_id.lower()
    # ... so an 18-char id survives a case-insensitive system
    assert to_18(long_id.lower()) == to_18(long_id.upper()) == to_18(long_id) == long_id
    assert validate_id(long_id.lower()) == long_id


@HYPOTHESIS
@given(st.one_of(st.text(), st.from_regex(r"[0-9A-Za-z/.'%?#\\ \n-]{12,20}", fullmatch=True),
                 st.from_regex(r"[0-9A-Za-z]{15}([0-9A-Za-z]{3})?\n", fullmatch=True)))
def test_invalid_ids_never_reach_the_wire(sandbox: SalesforceSandbox, sf: SalesforceConnector,
                                          raw: str):
    assume(not re.fullmatch(r"[a-zA-Z0-9]{15}([a-zA-Z0-9]{3})?", raw))  # an oracle independent of SF_ID
    with pytest.raises(Permanent):
        validate_id(raw)
    with pytest.raises(Permanent):
        sf.get(RecordRef("salesforce", "Contact", raw), ["DoNotCall"])
    [result] = sf.update([contact_update(raw, DoNotCall=True)])
    assert isinstance(result.error, Permanent)
    assert sandbox.requests == []


@pytest.mark.parametrize("raw", ["//evil.example/x", "003XX000004DHPY/../x", "a'b",
                                 "003XX000004DHPY?x=1", "003XX000004DHP", "00QXX000004DHPY",
                                 "003XX000004DHPY4AA", "003XX000004DHPY999", "003XX000004DHPY\n"])
def test_bad_ids_raise_permanent_without_io(sandbox, sf, raw):
    with pytest.raises(Permanent):
        sf.get(RecordRef("salesforce", "Contact", raw), ["DoNotCall"])
    [result] = sf.update([contact_update(raw, DoNotCall=True)])
    assert isinstance(result.error, Permanent) and not result.ok
    assert sandbox.requests == []


def test_bad_field_names_and_phones_fail_before_io(sandbox, sf):
    contact = "003XX000004DHPYYA4"
    for name in ("DoNotCall = true, Id", "DoNotCall\n"):
        [result] = sf.update([contact_update(contact, **{name: True})])
        assert isinstance(result.error, Permanent)
    with pytest.raises(Permanent):
        sf.changed_since(Watermark(), ["DoNotCall FROM Lead --"])
    for phone in ("13305551234", "+1 330 555 1234", "+1330}555", "+1' OR ''='", "", "+13305551234\n"):
        with pytest.raises(Permanent):
            sf.find_by_phone(phone)
    with pytest.raises(Permanent):
        sf.changed_since(Watermark(ts="2024-01-01 OR Id != null"), ["DoNotCall"])
    assert sandbox.requests == []


# --- auth ------------------------------------------------------------------------

def _private_key_file(tmp_path, sandbox) -> str:
    path = tmp_path / "server.key"
    path.write_text(sandbox.jwt_private_key_pem)
    return str(path)


@pytest.mark.parametrize("flow", ["client_credentials", "password", "jwt", "jwt_file", "access_token"])
def test_auth_flows(sandbox, connect, tmp_path, flow):
    auth: dict = {}
    if flow == "jwt_file":
        flow, auth = "jwt", {"private_key": None, "private_key_file": _private_key_file(tmp_path, sandbox)}
    if flow == "access_token":
        auth = {"access_token": sandbox.issue_token()}
    sf = connect(flow, auth=auth,
                 instance_url=sandbox.instance_url if flow == "access_token" else UNUSED_INSTANCE)
    assert isinstance(sf, CrmConnector)
    fields = sf.fields("Contact")
    assert fields["HasOptedOutOfEmail"].type == "boolean"
    grants = [r.body.decode() for r in sandbox.requests_to(TOKEN_PATH)]
    if flow == "access_token":
        assert grants == []
    else:
        assert len(grants) == 1
        expected = {"client_credentials": "grant_type=client_credentials",
                    "password": "grant_type=password",
                    "jwt": "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"}[flow]
        assert expected in grants[0]
    [api_call] = sandbox.requests_to(r"/services/data/")
    assert api_call.headers["Authorization"].startswith("Bearer 00D")


@pytest.mark.parametrize("flow,auth,code", [
    ("client_credentials", {"client_secret": "wrong-secret"}, "invalid_client"),
    ("password", {"password": "wrong-password"}, "invalid_grant"),
    ("jwt", {"username": "someone-else@example.com"}, "invalid_grant"),
    ("jwt", {"audience": "https://example.my.salesforce.com"}, "invalid_grant"),  # My Domain is no aud
])
def test_bad_credentials_raise_auth_failed(sandbox, connect, flow, auth, code):
    sf = connect(flow, auth=auth)
    with pytest.raises(AuthFailed) as info:
        sf.fields("Contact")
    assert info.value.code == code and info.value.status == 400
    assert "wrong-" not in str(info.value)
    assert len(sandbox.requests_to(TOKEN_PATH)) == 1  # AuthFailed is not retried
    assert sandbox.requests_to(r"/services/data/") == []


def _jwt_claims(sandbox) -> dict:
    import urllib.parse

    import jwt as pyjwt

    [grant] = sandbox.requests_to(TOKEN_PATH)
    assertion = urllib.parse.parse_qs(grant.body.decode())["assertion"][0]
    return pyjwt.decode(assertion, options={"verify_signature": False})


def test_jwt_audience_defaults_to_the_login_server_not_my_domain(sandbox, connect):
    sf = connect("jwt", instance_url="https://acme.my.salesforce.com")
    sf.fields("Contact")
    assert _jwt_claims(sandbox)["aud"] == "https://login.salesforce.com"


def test_jwt_audience_for_a_sandbox_org_is_test_salesforce_com(sandbox, connect):
    sandbox.sandbox_org = True
    sf = connect("jwt", instance_url="https://acme--uat.sandbox.my.salesforce.com")
    sf.fields("Contact")
    assert _jwt_claims(sandbox)["aud"] == "https://test.salesforce.com"
    sandbox.clear_log()
    with pytest.raises(AuthFailed) as info:  # a production default is refused by a sandbox org
        connect("jwt", instance_url="https://acme.my.salesforce.com").fields("Contact")
    assert str(info.value) == "[400 invalid_grant] audience is invalid"


def test_jwt_audience_can_be_configured(sandbox, connect):
    site = "https://acme.my.site.com/customers"
    sandbox.jwt_audiences = [site]
    connect("jwt", auth={"audience": site}).fields("Contact")
    assert _jwt_claims(sandbox)["aud"] == site


@pytest.mark.parametrize("instance,login,expected", [
    ("https://acme.my.salesforce.com", None, "https://login.salesforce.com"),
    ("https://acme--dev.sandbox.my.salesforce.com", None, "https://test.salesforce.com"),
    ("https://ACME--dev.Sandbox.My.Salesforce.com/", None, "https://test.salesforce.com"),
    ("https://acme.my.salesforce.com", "https://test.salesforce.com", "https://test.salesforce.com"),
    ("https://sandbox.my.salesforce.com.evil.example", None, "https://login.salesforce.com"),
])
def test_default_audience(instance, login, expected):
    assert default_audience(instance, login) == expected


def test_jwt_signed_with_another_key_is_refused(sandbox, connect):
    other = SalesforceSandbox()  # a different key pair
    sf = connect("jwt", auth={"private_key": other.jwt_private_key_pem})
    with pytest.raises(AuthFailed) as info:
        sf.fields("Contact")
    assert str(info.value) == "[400 invalid_grant] invalid assertion"


def test_incomplete_auth_config_is_rejected_up_front():
    with pytest.raises(AuthFailed, match="client_secret"):
        SalesforceConnector("https://127.0.0.1:9", "62.0", {"flow": "client_credentials", "client_id": "x"})
    with pytest.raises(AuthFailed, match="unknown auth flow"):
        SalesforceConnector("https://127.0.0.1:9", "62.0", {"flow": "magic"})


def test_expired_session_reauthenticates_once(sandbox, sf):
    contact = sandbox.add_record("Contact", LastName="Ng", Phone="+13305550000")
    assert sf.fields("Lead") and sf.fields("Contact")  # described (and cached) before the expiry
    sandbox.expire_tokens()
    assert [r.record_id for r in sf.find_by_phone("+13305550000")] == [contact]
    assert len(sandbox.requests_to(TOKEN_PATH)) == 2
    searches = sandbox.requests_to(r"/search/?$")
    assert len(searches) == 2  # the refused call and its one repeat
    assert searches[0].headers["Authorization"] != searches[1].headers["Authorization"]


def test_concurrent_expiry_reauthenticates_once(sandbox, sf):
    sf.fields("Contact")
    sandbox.expire_tokens()
    with ThreadPoolExecutor(max_workers=4) as pool:
        found = list(pool.map(sf.find_by_phone, ["+13305550000"] * 8))
    assert found == [[]] * 8
    assert len(sandbox.requests_to(TOKEN_PATH)) == 2


def test_refresh_refused_does_not_loop(sandbox, sf):
    sf.fields("Contact")
    sandbox.expire_tokens()
    sandbox.client_secret = "rotated-by-an-admin"
    with pytest.raises(AuthFailed) as info:
        sf.fields("Lead")
    assert info.value.code == "invalid_client"
    assert len(sandbox.requests_to(TOKEN_PATH)) == 2


def test_session_rejected_after_fresh_token_does_not_loop(sandbox, sf):
    sf.fields("Contact")
    sandbox.clear_log()
    body = [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    sandbox.add_fault("*", r"^/services/data/", 401, body, times=50)
    with pytest.raises(AuthFailed) as info:
        sf.find_by_phone("+13305551234")
    assert info.value.code == "INVALID_SESSION_ID"
    assert len(sandbox.requests_to(TOKEN_PATH)) == 1
    assert len(sandbox.requests_to(r"^/services/data/")) == 2
    for token in {r.headers.get("Authorization", "") for r in sandbox.requests}:
        if token.startswith("Bearer "):
            assert token[7:] not in str(info.value)


def test_access_token_flow_cannot_refresh(sandbox, connect):
    sf = connect("access_token", auth={"access_token": sandbox.issue_token()},
                 instance_url=sandbox.instance_url)
    sf.fields("Contact")
    sandbox.expire_tokens()
    with pytest.raises(AuthFailed):
        sf.fields("Lead")
    assert sandbox.requests_to(TOKEN_PATH) == []


# --- TLS trust -------------------------------------------------------------------

def test_ca_bundle_wins_over_environment(sandbox, connect, monkeypatch):
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(var, certifi.where())  # a bundle without the sandbox CA
    assert "Id" in connect().fields("Contact")
    untrusting = connect(ca_bundle=None, retry_attempts=1)
    with pytest.raises(Transient) as info:
        untrusting.fields("Contact")
    assert "SSLError" in str(info.value)
    assert not isinstance(info.value, RateLimited)


# --- update ----------------------------------------------------------------------

def test_fifty_updates_are_one_call(sandbox, sf):
    ids = [sandbox.add_record("Contact", LastName=f"C{i}") for i in range(50)]
    results = sf.update([contact_update(i, DoNotCall=True, SMS_Opt_Out__c=True) for i in ids])
    assert [r.ref.record_id for r in results] == ids and all(r.ok for r in results)
    [call] = sandbox.requests_to(COMPOSITE, "PATCH")
    body = call.json()
    assert body["allOrNone"] is False and len(body["records"]) == 50
    assert body["records"][0]["attributes"] == {"type": "Contact"}
    assert all(sandbox.get_record("Contact", i)["DoNotCall"] is True for i in ids)
    assert all(sandbox.get_record("Contact", i)["HasOptedOutOfEmail"] is False for i in ids)


def test_450_updates_are_three_calls(sandbox, sf):
    contacts = [sandbox.add_record("Contact", LastName=f"C{i}") for i in range(300)]
    leads = [sandbox.add_record("Lead", LastName=f"L{i}", Company="Acme") for i in range(150)]
    updates = []
    for i in range(150):  # interleaved objects, as the pusher may hand them over
        updates += [contact_update(contacts[2 * i], DoNotCall=True),
                    RecordUpdate(RecordRef("salesforce", "Lead", leads[i][:15]), {"DoNotCall": True}),
                    contact_update(contacts[2 * i + 1][:15], DoNotCall=True)]
    results = sf.update(updates)
    assert [r.ref for r in results] == [u.ref for u in updates] and all(r.ok for r in results)
    calls = sandbox.requests_to(COMPOSITE, "PATCH")
    assert len(calls) == 3 and all(len(c.json()["records"]) <= 200 for c in calls)
    sent = [rec["id"] for c in calls for rec in c.json()["records"]]
    assert all(len(i) == 18 for i in sent) and len(set(sent)) == 450
    assert all(sandbox.get_record("Lead", i)["DoNotCall"] for i in leads)
    assert all(sandbox.get_record("Contact", i)["DoNotCall"] for i in contacts)


def test_mixed_batch_reports_each_record(sandbox, sf):
    ok1, rejected, locked, deleted, ok2 = (sandbox.add_record("Contact", LastName=n) for n in "abcde")
    sandbox.reject_record(rejected, "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                          "Opt-outs need a consent source")
    sandbox.reject_record(locked, "UNABLE_TO_LOCK_ROW", "unable to obtain exclusive access to this record")
    sandbox.delete_record("Contact", deleted)
    updates = [contact_update(i, DoNotCall=True) for i in (ok1, rejected, locked, deleted, ok2)]
    updates.append(contact_update(ok2, No_Such_Field__c=True))
    results = sf.update(updates)
    assert [r.ok for r in results] == [True, False, False, False, True, False]
    assert str(results[1].error) == "[FIELD_CUSTOM_VALIDATION_EXCEPTION] Opt-outs need a consent source"
    assert type(results[1].error) is Permanent
    assert isinstance(results[2].error, Transient) and results[2].error.retryable
    assert results[2].error.code == "UNABLE_TO_LOCK_ROW"
    assert isinstance(results[3].error, NotFound) and results[3].error.code == "ENTITY_IS_DELETED"
    assert type(results[5].error) is Permanent and results[5].error.code == "INVALID_FIELD"
    assert sandbox.get_record("Contact", ok1)["DoNotCall"] is True
    assert sandbox.get_record("Contact", ok2)["DoNotCall"] is True
    assert sandbox.get_record("Contact", rejected)["DoNotCall"] is False
    # the duplicate id went into a second call rather than one Salesforce would refuse
    assert len(sandbox.requests_to(COMPOSITE, "PATCH")) == 2


def test_email_unsubscribe_writes_the_consent_field(sandbox, sf):
    contact = sandbox.add_record("Contact", LastName="Ek")
    [result] = sf.update([RecordUpdate(RecordRef("salesforce", "Contact", contact),
                                       email="ek@example.com", email_unsubscribe=True)])
    assert result.ok and sandbox.get_record("Contact", contact)["HasOptedOutOfEmail"] is True
    assert sf.get(RecordRef("salesforce", "Contact", contact), ["HasOptedOutOfEmail"]) == {
        "HasOptedOutOfEmail": True}


def test_503_with_retry_after_is_retried(sandbox, sf):
    contact = sandbox.add_record("Contact", LastName="Ro")
    sf.fields("Contact")  # authenticate first so the timing below is the retry alone
    sandbox.add_fault("PATCH", COMPOSITE, 503,
                      [{"errorCode": "SERVER_UNAVAILABLE", "message": "Server unavailable"}],
                      headers={"Retry-After": "1"})
    started = time.monotonic()
    [result] = sf.update([contact_update(contact, DoNotCall=True)])
    assert result.ok and time.monotonic() - started >= 0.9
    assert len(sandbox.requests_to(COMPOSITE, "PATCH")) == 2
    assert sandbox.get_record("Contact", contact)["DoNotCall"] is True


def test_whole_call_errors_raise_mapped(sandbox, connect):
    sf = connect(retry_attempts=2)
    contact = sandbox.add_record("Contact", LastName="Ro")
    sandbox.add_fault("PATCH", COMPOSITE, 500, [{"errorCode": "UNKNOWN_EXCEPTION",
                                                 "message": "An unexpected error occurred"}], times=2)
    with pytest.raises(Transient) as info:
        sf.update([contact_update(contact, DoNotCall=True)])
    assert str(info.value) == "[500 UNKNOWN_EXCEPTION] An unexpected error occurred"
    assert len(sandbox.requests_to(COMPOSITE, "PATCH")) == 2


def test_daily_request_limit_is_quota_exhausted_without_a_guessed_wait(sandbox, sf):
    contact = sandbox.add_record("Contact", LastName="Q")
    sf.fields("Contact")
    sandbox.exhaust_quota()
    sandbox.clear_log()
    with pytest.raises(QuotaExhausted) as info:
        sf.update([contact_update(contact, DoNotCall=True)])
    assert info.value.retry_after is None and info.value.status == 403
    assert str(info.value) == "[403 REQUEST_LIMIT_EXCEEDED] TotalRequests Limit exceeded."
    assert len(sandbox.requests) == 1  # a spent daily quota is the pusher's to pause on, not a retry loop


def test_retry_after_wins_on_request_limit_exceeded(sandbox, sf):
    contact = sandbox.add_record("Contact", LastName="Q")
    sandbox.add_fault("PATCH", COMPOSITE, 403, [{"message": "TotalRequests Limit exceeded.",
                                                 "errorCode": "REQUEST_LIMIT_EXCEEDED"}],
                      headers={"Retry-After": "120"})
    with pytest.raises(QuotaExhausted) as info:
        sf.update([contact_update(contact, DoNotCall=True)])
    assert info.value.retry_after == 120


@pytest.mark.parametrize("limit", ["ConcurrentRequests", "ConcurrentPerOrgLongTxn"])
def test_concurrent_limit_is_a_short_backoff_not_a_pause(sandbox, connect, limit):
    sf = connect(retry_attempts=3)
    contact = sandbox.add_record("Contact", LastName="Q")
    sf.fields("Contact")
    sandbox.refuse_concurrent(times=2, limit=limit)
    [result] = sf.update([contact_update(contact, DoNotCall=True)])
    assert result.ok and sandbox.get_record("Contact", contact)["DoNotCall"] is True
    assert len(sandbox.requests_to(COMPOSITE, "PATCH")) == 3
    sandbox.refuse_concurrent(times=3, limit=limit, retry_after="1")
    with pytest.raises(RateLimited) as info:
        sf.update([contact_update(contact, DoNotCall=False)])
    assert not isinstance(info.value, QuotaExhausted) and info.value.retry_after == 1
    assert info.value.code == "REQUEST_LIMIT_EXCEEDED" and limit in str(info.value)


def test_api_usage_is_read_from_every_answer(sandbox, sf):
    assert sf.api_usage() is None
    sandbox.use_quota(1000)
    sf.fields("Contact")
    assert sf.api_usage() == (1001, 15000)
    sandbox.exhaust_quota()
    with pytest.raises(QuotaExhausted):
        sf.fields("Lead")
    assert sf.api_usage() == (15000, 15000)  # the refusal carries the header too
    assert sf.probe_quota() == (15000, 15000)
    sandbox.reset_quota()
    assert sf.probe_quota() == (0, 15000)
    [limits] = sandbox.requests_to(r"/limits/?$", "GET")[-1:]
    assert limits.path.endswith("/services/data/v62.0/limits/")


def test_errors_carry_no_url_or_query(sandbox, sf):
    sandbox.add_fault("GET", r"/query/?$", 400,
                      [{"errorCode": "MALFORMED_QUERY", "message": "unexpected token: 'FROM'"}])
    with pytest.raises(Permanent) as info:
        sf.changed_since(Watermark(), ["DoNotCall"])
    exc = info.value
    assert str(exc) == "[400 MALFORMED_QUERY] unexpected token: 'FROM'"
    assert exc.__cause__ is None and exc.__suppress_context__
    with pytest.raises(NotFound):
        sf.fields("Opportunity")


# --- lookups ---------------------------------------------------------------------

def test_find_by_phone(sandbox, sf):
    lead = sandbox.add_record("Lead", LastName="Lo", Company="X", MobilePhone="+4911113333444")
    contact = sandbox.add_record("Contact", LastName="Co", Phone="(330) 555-1234")
    sandbox.add_record("Contact", LastName="Other", Phone="(330) 555-9999")
    assert sf.find_by_phone("+4911113333444") == [RecordRef("salesforce", "Lead", lead)]
    assert sf.find_by_phone("+13305551234") == [RecordRef("salesforce", "Contact", contact)]
    assert sf.find_by_phone("+14155550000") == []
    [search] = sandbox.requests_to(r"/search/?$")[:1]
    assert search.query["q"] == ["FIND {4911113333444 OR 11113333444} IN PHONE FIELDS RETURNING "
                                 "Lead(Id, MobilePhone, Phone WHERE IsConverted = false), Contact(Id, MobilePhone, Phone)"]


def test_lookups_skip_converted_leads_and_find_the_contact_they_became(sandbox, sf):
    """A converted Lead is read-only (CANNOT_UPDATE_CONVERTED_LEAD): a delivery to it
    would only dead-letter and leave the opt-out unhonoured on the compliance clock."""
    converted = sandbox.add_record("Lead", LastName="Lo", Company="X", MobilePhone="+4911113333444",
                                   Email="jonas@example.com", IsConverted=True)
    open_lead = sandbox.add_record("Lead", LastName="Lo", Company="Y", Phone="+4911113333555",
                                   Email="open@example.com")
    contact = sandbox.add_record("Contact", LastName="Lo", MobilePhone="+4911113333444", Email="jonas@example.com")
    found = {f.ref for f in sf.find(["+4911113333444", "+4911113333555"], ["jonas@example.com", "open@example.com"])}
    assert found == {RecordRef("salesforce", "Contact", contact), RecordRef("salesforce", "Lead", open_lead)}
    assert RecordRef("salesforce", "Lead", converted) not in found
    emails = [q for r in sandbox.requests_to(r"/query/?$") for q in r.query.get("q", []) if "FROM Lead" in q]
    assert emails and all(q.endswith(" AND IsConverted = false") for q in emails)


def test_a_converted_lead_refuses_updates_and_read_names_the_contact_it_became(sandbox, sf):
    """The sandbox refuses to update a converted Lead as the API does
    (CANNOT_UPDATE_CONVERTED_LEAD, through composite and a single PATCH); ``read`` with
    SUCCESSOR_FIELD names the Contact it became (Lead.ConvertedContactId), and None for an
    open Lead or a Contact."""
    from connectors.types import SUCCESSOR_FIELD

    contact = sandbox.add_record("Contact", LastName="Lo", MobilePhone="+4911113333444")
    converted = sandbox.add_record("Lead", LastName="Lo", Company="X", IsConverted=True,
                                   ConvertedContactId=contact)
    open_lead = sandbox.add_record("Lead", LastName="Lo", Company="Y")
    lead_update = RecordUpdate(ref=RecordRef("salesforce", "Lead", converted), fields={"DoNotCall": True})
    [result] = sf.update([lead_update])
    assert isinstance(result.error, Permanent) and "CANNOT_UPDATE_CONVERTED_LEAD" in str(result.error)
    assert sandbox.get_record("Lead", converted)["DoNotCall"] is False
    refs = [RecordRef("salesforce", "Lead", converted), RecordRef("salesforce", "Lead", open_lead),
            RecordRef("salesforce", "Contact", contact)]
    got = sf.read(refs, [SUCCESSOR_FIELD])
    assert got[refs[0]][SUCCESSOR_FIELD] == RecordRef("salesforce", "Contact", contact)
    assert got[refs[1]][SUCCESSOR_FIELD] is None and got[refs[2]][SUCCESSOR_FIELD] is None
    leads = [q for r in sandbox.requests_to(r"/query/?$") for q in r.query.get("q", []) if "FROM Lead" in q]
    assert leads == [f"SELECT Id, IsConverted, ConvertedContactId FROM Lead WHERE Id IN ('{converted}', '{open_lead}')"]


def test_find_batches_numbers_and_emails_and_says_which_each_record_carries(sandbox, sf):
    from connectors.types import FoundRecord

    both = sandbox.add_record("Contact", LastName="A", Phone="(330) 555-1234", Email="Dana@Example.com")
    mobile = sandbox.add_record("Lead", LastName="B", Company="X", MobilePhone="+1 415 555 0100")
    sandbox.add_record("Contact", LastName="C", Phone="+44 330 555 1234", Email="other@example.com")
    found = sf.find(["+13305551234", "+14155550100", "not a phone"], ["dana@example.com", "nobody"])
    assert sorted(found, key=lambda f: f.ref.record_id) == sorted([
        FoundRecord(RecordRef("salesforce", "Contact", both), ("+13305551234",), ("dana@example.com",)),
        FoundRecord(RecordRef("salesforce", "Lead", mobile), ("+14155550100",), ()),
    ], key=lambda f: f.ref.record_id)
    assert len(sandbox.requests_to(r"/search/?$")) == 1          # one SOSL for both numbers
    assert len(sandbox.requests_to(r"/query/?$")) == 2           # one SOQL per object for the address


def test_find_splits_a_batch_whose_answer_reaches_the_sosl_row_cap(sandbox, sf):
    """SOSL answers at most 2,000 rows: a full answer may hide the other numbers'
    records, so the batch is searched again in halves."""
    for i in range(2000):
        sandbox.add_record("Contact", LastName=f"Crowd{i}", Phone="(330) 555-0001")
    last = sandbox.add_record("Contact", LastName="Last", Phone="(330) 555-0002")
    found = sf.find(["+13305550001", "+13305550002"], [])
    assert RecordRef("salesforce", "Contact", last) in [f.ref for f in found]
    assert len(sandbox.requests_to(r"/search/?$")) == 3


def test_find_by_phone_matches_numbers_typed_without_country_code(sandbox, sf):
    """US users type (330) 555-1234; the E.164 digits alone do not find it."""
    typed = [sandbox.add_record("Contact", LastName="A", Phone="(330) 555-1234"),
             sandbox.add_record("Contact", LastName="B", MobilePhone="330.555.1234"),
             sandbox.add_record("Lead", LastName="C", Company="X", Phone="+1 330-555-1234"),
             sandbox.add_record("Lead", LastName="D", Company="X", Phone="1 (330) 555 1234")]
    found = sf.find_by_phone("+13305551234")
    assert sorted(r.record_id for r in found) == sorted(typed)


def test_find_by_phone_ignores_numbers_that_merely_end_the_same(sandbox, sf):
    own = sandbox.add_record("Contact", LastName="Own", Phone="(330) 555-1234")
    sandbox.add_record("Contact", LastName="Uk", Phone="+44 330 555 1234")      # another country
    sandbox.add_record("Lead", LastName="Ext", Company="X", Phone="+1 (216) 330-5551234")  # longer number
    assert sf.find_by_phone("+13305551234") == [RecordRef("salesforce", "Contact", own)]
    assert sf.find_by_phone("+443305551234") != []  # the UK record is found for its own number
    assert RecordRef("salesforce", "Contact", own) not in sf.find_by_phone("+443305551234")


def test_find_by_phone_uses_the_configured_region_for_national_numbers(sandbox, connect):
    london = sandbox.add_record("Contact", LastName="L", Phone="020 7946 0958")
    assert connect(default_region="GB").find_by_phone("+442079460958") == \
        [RecordRef("salesforce", "Contact", london)]
    assert connect(default_region="US").find_by_phone("+442079460958") == []


def test_fields_describe(sandbox, connect):
    sandbox.add_field("Contact", "Consent_Source__c", "string")
    sf = connect()
    fields = sf.fields("Contact")
    info = fields["HasOptedOutOfEmail"]
    assert (info.type, info.updateable) == ("boolean", True) and info.label
    assert fields["SystemModstamp"].updateable is False
    assert fields["Consent_Source__c"].type == "string"
    assert {"SMS_Opt_Out__c", "WhatsApp_Opt_Out__c", "DoNotCall"} <= set(fields)
    sf.fields("Contact")
    assert len(sandbox.requests_to(r"/sobjects/Contact/describe$")) == 1


# --- changed_since -------------------------------------------------------------------

def _drain(sf: SalesforceConnector, mark: Watermark, limit: int) -> tuple[list, Watermark]:
    seen = []
    for _ in range(50):
        page = sf.changed_since(mark, ["DoNotCall", "sms_opt_out__c", "Company"], limit=limit)
        seen += page.records
        mark = page.next_mark
        if not page.more:
            return seen, mark
    raise AssertionError("changed_since never finished")


def test_changed_since_pages_without_gaps_or_repeats(sandbox, sf):
    sandbox.page_size = 1  # also exercises nextRecordsUrl paging inside one poll
    contacts = [sandbox.add_record("Contact", LastName=f"C{i}") for i in range(4)]
    leads = [sandbox.add_record("Lead", LastName=f"L{i}", Company="Acme") for i in range(4)]
    sandbox.advance(10)
    initial, mark = _drain(sf, Watermark(), limit=3)
    assert sorted(r.ref.record_id for r in initial) == sorted(contacts + leads)

    changed = [contacts[0], contacts[2], contacts[3], leads[1], leads[3]]
    for record_id in changed:
        sandbox.set_field(object_for_id(record_id), record_id, "DoNotCall", True)
    sandbox.advance(10)
    pages = []
    while True:
        page = sf.changed_since(mark, ["DoNotCall", "sms_opt_out__c", "Company"], limit=2)
        assert len(page.records) <= 2
        pages.append(page.records)
        mark = page.next_mark
        if not page.more:
            break
    got = [r for p in pages for r in p]
    assert sorted(r.ref.record_id for r in got) == sorted(changed)  # none missing, none twice
    assert all(r.values["DoNotCall"] is True and r.values["sms_opt_out__c"] is False for r in got)
    assert [r.values.get("Company") for r in got if r.ref.obj == "Lead"] == ["Acme", "Acme"]
    assert all("Company" not in r.values for r in got if r.ref.obj == "Contact")
    stamps = [r.modified for r in got]
    assert stamps == sorted(stamps)

    sandbox.advance(10)
    quiet = sf.changed_since(mark, ["DoNotCall"], limit=2)
    assert quiet.records == [] and quiet.more is False and quiet.next_mark == mark


def test_changed_since_waits_for_the_settle_window(sandbox, sf):
    contact = sandbox.add_record("Contact", LastName="Late")
    page = sf.changed_since(Watermark(), ["DoNotCall"])
    assert page.records == [] and page.more is False and page.next_mark == Watermark()
    sandbox.advance(sf.settle_seconds + 1)
    page = sf.changed_since(page.next_mark, ["DoNotCall"])
    assert [r.ref.record_id for r in page.records] == [contact]


def test_changed_since_from_a_plain_timestamp(sandbox, sf):
    old = sandbox.add_record("Contact", LastName="Old")
    sandbox.set_modstamp("Contact", old, dt.datetime(2023, 6, 1, tzinfo=dt.timezone.utc))
    new = sandbox.add_record("Lead", LastName="New", Company="X")
    sandbox.advance(10)
    page = sf.changed_since(Watermark(ts="2024-01-01T00:00:00.000+0000"), ["DoNotCall"])
    assert [r.ref.record_id for r in page.records] == [new]
    with pytest.raises(Permanent):
        sf.changed_since(Watermark(ts='{"Lead": ["2024-01-01T00:00:00Z", "x\' OR Id != \'"]}'),
                         ["DoNotCall"])


_US_FORMATS = ["({a}) {b}-{c}", "{a}-{b}-{c}", "{a}.{b}.{c}", "{a}{b}{c}", "1 ({a}) {b}-{c}",
               "+1 {a} {b} {c}", "+1{a}{b}{c}", "1-{a}-{b}-{c}", " ({a}) {b} {c} "]


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(area=st.integers(201, 989), exchange=st.integers(200, 999), line=st.integers(0, 9999),
       form=st.sampled_from(_US_FORMATS),
       other_cc=st.sampled_from(["44", "49", "33", "61", "86"]))
def test_find_by_phone_property_us_numbers_as_typed(sandbox, sf, area, exchange, line, form, other_cc):
    """However a US number is typed, its E.164 finds it; a foreign number that ends with
    the same ten digits is never taken for it."""
    import phonenumbers

    e164 = f"+1{area}{exchange}{line:04d}"
    assume(phonenumbers.is_valid_number(phonenumbers.parse(e164)))
    sandbox.reset()
    typed = form.format(a=area, b=exchange, c=f"{line:04d}")
    own = sandbox.add_record("Contact", LastName="Own", Phone=typed)
    sandbox.add_record("Lead", LastName="Far", Company="X", MobilePhone=f"+{other_cc} {area}{exchange}{line:04d}")
    assert sf.find_by_phone(e164) == [RecordRef("salesforce", "Contact", own)]
