"""The Salesforce sandbox itself: wire shapes the connector (and the demo) rely on."""
from __future__ import annotations

import datetime as dt
import email.utils

import pytest

from connectors.http import make_session
from connectors.sandbox.salesforce import JWT_GRANT, ApiError, SalesforceSandbox, SoqlParser, \
    parse_datetime, sf_id18

V = "/services/data/v62.0"


@pytest.fixture(scope="module")
def sf_server():
    sb = SalesforceSandbox()
    sb.start()
    yield sb
    sb.stop()


@pytest.fixture
def sandbox(sf_server: SalesforceSandbox) -> SalesforceSandbox:
    sf_server.reset()
    return sf_server


@pytest.fixture
def http(sandbox: SalesforceSandbox):
    session = make_session(sandbox.tls.ca_bundle, timeout=10)
    token = session.post(sandbox.url + "/services/oauth2/token", data={
        "grant_type": "client_credentials", "client_id": sandbox.client_id,
        "client_secret": sandbox.client_secret}).json()["access_token"]
    session.headers["Authorization"] = f"Bearer {token}"
    return session


def test_token_response_shape(sandbox):
    session = make_session(sandbox.tls.ca_bundle)
    resp = session.post(sandbox.url + "/services/oauth2/token", data={
        "grant_type": "password", "client_id": sandbox.client_id,
        "client_secret": sandbox.client_secret, "username": sandbox.username,
        "password": sandbox.password})
    body = resp.json()
    assert resp.status_code == 200
    assert {"access_token", "instance_url", "id", "token_type", "issued_at", "signature"} <= set(body)
    assert body["instance_url"] == sandbox.url and body["token_type"] == "Bearer"
    bad = session.post(sandbox.url + "/services/oauth2/token", data={
        "grant_type": "client_credentials", "client_id": sandbox.client_id, "client_secret": "x"})
    assert bad.status_code == 400
    assert bad.json() == {"error": "invalid_client", "error_description": "invalid client credentials"}
    odd = session.post(sandbox.url + "/services/oauth2/token", data={"grant_type": "implicit"})
    assert odd.json()["error"] == "unsupported_grant_type"
    garbage = session.post(sandbox.url + "/services/oauth2/token",
                           data={"grant_type": JWT_GRANT, "assertion": "not.a.jwt"})
    assert garbage.json() == {"error": "invalid_grant", "error_description": "invalid assertion"}


def test_session_and_quota(sandbox, http):
    resp = http.get(sandbox.url + V + "/sobjects/Contact/describe")
    assert resp.status_code == 200 and resp.headers["Sforce-Limit-Info"] == "api-usage=1/15000"
    sandbox.exhaust_quota()
    resp = http.get(sandbox.url + V + "/sobjects/Contact/describe")
    assert resp.status_code == 403
    assert resp.json() == [{"message": "TotalRequests Limit exceeded.",
                            "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
    assert resp.headers["Sforce-Limit-Info"] == "api-usage=15000/15000"  # errors carry it too
    sandbox.expire_tokens()
    resp = http.get(sandbox.url + V + "/sobjects/Contact/describe")
    assert resp.status_code == 401 and resp.json()[0]["errorCode"] == "INVALID_SESSION_ID"


def test_limits_resource(sandbox, http):
    sandbox.use_quota(40)
    resp = http.get(sandbox.url + V + "/limits/")
    assert resp.status_code == 200
    assert resp.json()["DailyApiRequests"] == {"Max": 15000, "Remaining": 14960}
    assert resp.headers["Sforce-Limit-Info"] == "api-usage=40/15000"  # assumed not to count itself
    sandbox.exhaust_quota()
    assert http.get(sandbox.url + V + "/limits/").json()["DailyApiRequests"] == {"Max": 15000, "Remaining": 0}


@pytest.mark.parametrize("limit,message", [
    ("ConcurrentRequests", "ConcurrentRequests (Concurrent API Requests) Limit exceeded."),
    ("ConcurrentPerOrgLongTxn", "ConcurrentPerOrgLongTxn Limit exceeded.")])
def test_concurrent_limit_refusals(sandbox, http, limit, message):
    sandbox.refuse_concurrent(times=1, limit=limit, retry_after="2")
    resp = http.get(sandbox.url + V + "/sobjects/Contact/describe")
    assert resp.status_code == 403 and resp.headers["Retry-After"] == "2"
    assert resp.json() == [{"message": message, "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
    assert resp.headers["Sforce-Limit-Info"] == "api-usage=0/15000"  # refused calls are not counted
    assert http.get(sandbox.url + V + "/sobjects/Contact/describe").status_code == 200
    with pytest.raises(ValueError):
        sandbox.refuse_concurrent(limit="TotalRequests")


def test_jwt_audience_is_the_login_server(sandbox):
    import jwt as pyjwt
    import time as _time

    session = make_session(sandbox.tls.ca_bundle)

    def grant(aud: str):
        claims = {"iss": sandbox.client_id, "sub": sandbox.username, "aud": aud, "exp": int(_time.time()) + 60}
        assertion = pyjwt.encode(claims, sandbox.jwt_private_key_pem, algorithm="RS256")
        return session.post(sandbox.url + "/services/oauth2/token",
                            data={"grant_type": JWT_GRANT, "assertion": assertion})

    assert grant("https://login.salesforce.com").status_code == 200
    refused = grant(sandbox.url)  # the org's own URL (My Domain) is not an audience
    assert refused.status_code == 400
    assert refused.json() == {"error": "invalid_grant", "error_description": "audience is invalid"}
    sandbox.sandbox_org = True
    assert grant("https://test.salesforce.com").status_code == 200
    assert grant("https://login.salesforce.com").status_code == 400


def test_record_read_and_patch(sandbox, http):
    cid = sandbox.add_record("Contact", LastName="Ng")
    url = sandbox.url + V + "/sobjects/Contact/"
    assert http.get(url + cid[:15], params={"fields": "Id,DoNotCall"}).json() == {
        "attributes": {"type": "Contact", "url": f"{V}/sobjects/Contact/{cid}"}, "Id": cid,
        "DoNotCall": False}
    before = sandbox.get_record("Contact", cid)["SystemModstamp"]
    sandbox.advance(2)
    assert http.patch(url + cid, json={"DoNotCall": True}).status_code == 204
    after = sandbox.get_record("Contact", cid)
    assert after["DoNotCall"] is True and after["SystemModstamp"] > before
    resp = http.patch(url + cid, json={"Nope__c": True})
    assert resp.status_code == 400 and resp.json()[0]["errorCode"] == "INVALID_FIELD"
    assert resp.json()[0]["message"] == "No such column 'Nope__c' on sobject of type Contact"
    resp = http.patch(url + cid, json={"SystemModstamp": "2020-01-01T00:00:00Z"})
    assert resp.json()[0]["errorCode"] == "INVALID_FIELD_FOR_INSERT_UPDATE"
    assert http.get(url + "003SB0000000999").json() == [
        {"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]
    assert http.get(url + "003SB00000").json()[0]["errorCode"] == "MALFORMED_ID"
    assert http.get(url + "00QSB0000000001").json()[0]["errorCode"] == "MALFORMED_ID"
    resp = http.get(sandbox.url + V + "/sobjects/Widget__c/describe")
    assert resp.status_code == 404 and resp.json()[0]["errorCode"] == "NOT_FOUND"


def test_a_converted_lead_cannot_be_patched_and_describes_its_contact(sandbox, http):
    contact = sandbox.add_record("Contact", LastName="Ng")
    lead = sandbox.add_record("Lead", LastName="Ng", Company="X", IsConverted=True, ConvertedContactId=contact)
    resp = http.patch(sandbox.url + V + "/sobjects/Lead/" + lead, json={"DoNotCall": True})
    assert resp.status_code == 400
    assert resp.json() == [{"message": "cannot reference converted lead", "errorCode": "CANNOT_UPDATE_CONVERTED_LEAD",
                            "fields": []}]
    assert sandbox.get_record("Lead", lead)["DoNotCall"] is False
    fields = {f["name"]: f for f in http.get(sandbox.url + V + "/sobjects/Lead/describe").json()["fields"]}
    assert fields["ConvertedContactId"]["type"] == "reference" and not fields["ConvertedContactId"]["updateable"]
    assert not fields["IsConverted"]["updateable"]


def test_describe_follows_field_changes(sandbox, http):
    sandbox.add_field("Lead", "Consent_Source__c", "string", updateable=False)
    sandbox.remove_field("Lead", "WhatsApp_Opt_Out__c")
    fields = {f["name"]: f for f in http.get(sandbox.url + V + "/sobjects/Lead/describe").json()["fields"]}
    assert fields["Consent_Source__c"]["updateable"] is False
    assert "WhatsApp_Opt_Out__c" not in fields
    assert fields["DoNotCall"]["type"] == "boolean" and fields["SystemModstamp"]["type"] == "datetime"


def test_collection_update_semantics(sandbox, http):
    a, b, c = (sandbox.add_record("Contact", LastName=n) for n in "abc")
    sandbox.reject_record(b, "FIELD_CUSTOM_VALIDATION_EXCEPTION", "Need a reason", times=1)
    recs = [{"attributes": {"type": "Contact"}, "id": i, "DoNotCall": True} for i in (a, b, c)]
    url = sandbox.url + V + "/composite/sobjects"
    rolled = http.patch(url, json={"allOrNone": True, "records": recs}).json()
    assert rolled[1] == {"success": False, "errors": [{
        "statusCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "message": "Need a reason", "fields": []}]}
    assert rolled[0]["errors"][0]["statusCode"] == "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    assert sandbox.get_record("Contact", a)["DoNotCall"] is False
    applied = http.patch(url, json={"allOrNone": True, "records": recs}).json()  # rejection used up
    assert applied == [{"id": i, "success": True, "errors": []} for i in (a, b, c)]
    too_many = http.patch(url, json={"records": recs * 67})
    assert too_many.status_code == 400 and too_many.json()[0]["errorCode"] == "EXCEEDED_ID_LIMIT"
    assert sandbox.composite_calls == 3


def test_query_subset_and_paging(sandbox, http):
    sandbox.page_size = 2
    ids = [sandbox.add_record("Contact", LastName=f"C{i}", Phone=f"+1330555000{i}") for i in range(5)]
    q = sandbox.url + V + "/query"
    first = http.get(q, params={"q": "SELECT Id, Phone FROM Contact ORDER BY SystemModstamp, Id"}).json()
    assert first["totalSize"] == 5 and first["done"] is False and len(first["records"]) == 2
    second = http.get(sandbox.url + first["nextRecordsUrl"]).json()
    third = http.get(sandbox.url + second["nextRecordsUrl"]).json()
    assert third["done"] is True and "nextRecordsUrl" not in third
    assert [r["Id"] for r in first["records"] + second["records"] + third["records"]] == sorted(ids)
    stamp = sandbox.get_record("Contact", ids[0])["SystemModstamp"]
    keyset = (f"SELECT Id FROM Contact WHERE SystemModstamp > {stamp} OR "
              f"(SystemModstamp = {stamp} AND Id > '{ids[2][:15]}') ORDER BY SystemModstamp, Id LIMIT 10")
    assert [r["Id"] for r in http.get(q, params={"q": keyset}).json()["records"]] == sorted(ids)[3:]
    phones = ("SELECT Id FROM Contact WHERE (Phone IN ('+13305550001', '+13305550003') "
              "OR MobilePhone IN ('x')) AND NOT Id = null LIMIT 5")
    assert {r["Id"] for r in http.get(q, params={"q": phones}).json()["records"]} == {ids[1], ids[3]}
    by_id = (f"SELECT Id, LastName FROM Contact WHERE Id IN ('{ids[4]}', '{ids[0][:15]}') "
             "ORDER BY LastName DESC")
    assert [r["LastName"] for r in http.get(q, params={"q": by_id}).json()["records"]] == ["C4", "C0"]
    for bad, code in [("SELECT Id FROM Contact WHERE", "MALFORMED_QUERY"),
                      ("SELECT Id FROM Contact WHERE SystemModstamp > '2024-01-01'",
                       "INVALID_QUERY_FILTER_OPERATOR"),
                      ("SELECT Nope FROM Contact", "INVALID_FIELD"),
                      ("SELECT Id FROM Widget", "INVALID_TYPE"),
                      ("SELECT Id FROM Contact WHERE Id = 'x'' OR 1=1'", "MALFORMED_QUERY")]:
        resp = http.get(q, params={"q": bad})
        assert resp.status_code == 400 and resp.json()[0]["errorCode"] == code, bad


def test_soql_parser_unit():
    query = SoqlParser("select Id from Lead where a = 'it\\'s' and (b > 2024-01-01T00:00:00.000+0000 "
                       "or c not in ('x')) order by SystemModstamp desc nulls last, Id "
                       "limit 7 offset 1").parse()
    assert query.sobject == "Lead" and query.limit == 7 and query.offset == 1
    assert query.where.op == "AND" and query.where.parts[0].value.value == "it's"
    assert query.order == [("SystemModstamp", True, True), ("Id", False, None)]
    with pytest.raises(ApiError):
        SoqlParser("SELECT Id FROM Lead LIMIT x").parse()
    assert parse_datetime("2024-01-01T01:00:00+01:00") == dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def test_sosl_phone_search(sandbox, http):
    lead = sandbox.add_record("Lead", LastName="L", Company="X", MobilePhone="+4911113333444")
    contact = sandbox.add_record("Contact", LastName="C", Phone="(330) 555-1234")
    sandbox.add_record("Contact", LastName="Short", Phone="1234")
    search = sandbox.url + V + "/search/"

    def found(digits: str) -> set[str]:
        body = http.get(search, params={
            "q": f"FIND {{{digits}}} IN PHONE FIELDS RETURNING Lead(Id), Contact(Id, Phone)"}).json()
        return {r["Id"] for r in body["searchRecords"]}

    uk = sandbox.add_record("Contact", LastName="Uk", Phone="+44 330 555 1234")
    assert found("4911113333444") == {lead}
    # Formatting is ignored and a stored number matches when it ends with the term
    # (an assumption: Salesforce does not document phone matching), so the E.164
    # digits miss a number typed without its country code ...
    assert found("13305551234") == set()
    # ... the national number finds it, and also a number that merely ends the same
    assert found("3305551234") == {contact, uk}
    assert found("13305551234 OR 3305551234") == {contact, uk}  # the documented OR operator
    assert found("15550001234") == set()  # stored "1234" is shorter than the term
    sosl = "FIND {3305551234} IN PHONE FIELDS RETURNING Contact(Id, Phone)"
    body = http.get(search, params={"q": sosl}).json()
    assert body["searchRecords"][0] == {
        "attributes": {"type": "Contact", "url": f"{V}/sobjects/Contact/{contact}"},
        "Id": contact, "Phone": "(330) 555-1234"}
    bad = http.get(search, params={"q": "FIND 123"})
    assert bad.status_code == 400 and bad.json()[0]["errorCode"] == "MALFORMED_SEARCH"


def test_date_header_follows_the_org_clock(sandbox, http):
    sandbox.advance(3600)
    resp = http.get(sandbox.url + V + "/sobjects/Lead/describe")
    server = email.utils.parsedate_to_datetime(resp.headers["Date"])
    assert abs((server - dt.datetime.now(dt.timezone.utc)).total_seconds() - 3600) < 30
    assert sf_id18("003XX000004DHPY") == "003XX000004DHPYYA4"
