"""The receiver over real HTTP (waitress): auth, answers, and hostile input."""
from __future__ import annotations

import json
import time
import uuid

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.sinch_signing import signature_headers
from syncd.sources.apten import sign as apten_sign
from tests.support.stack import APTEN_SECRET, LOX24_TOKEN, SINCH_SECRET
from tests.conftest import fixture_bytes

JSON = {"Content-Type": "application/json"}


def post_apten(r, body: bytes, **headers):
    return requests.post(f"{r.url}/webhooks/apten", data=body, timeout=10,
                         headers={**JSON, "X-Signature-SHA256": apten_sign(APTEN_SECRET, body), **headers})


def post_lox24(r, body: bytes, token: str | None = LOX24_TOKEN, via: str = "header"):
    headers, params = dict(JSON), {}
    if token is not None and via == "header":
        headers["X-LOX24-Token"] = token
    elif token is not None:
        params["token"] = token
    return requests.post(f"{r.url}/webhooks/lox24", data=body, headers=headers, params=params, timeout=10)


def post_sinch(r, body: bytes, secret: str = SINCH_SECRET, timestamp: int | None = None):
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    headers = {**JSON, **signature_headers(secret, body, uuid.uuid4().hex, stamp)}
    return requests.post(f"{r.url}/webhooks/sinch", data=body, headers=headers, timeout=10)


# --- LOX24 -------------------------------------------------------------------------------

def test_lox24_seed_accepted_verbatim_and_retries_change_nothing(receiver):
    body = fixture_bytes("lox24_phone_unsubscribe.json")
    first = post_lox24(receiver, body)
    assert first.status_code == 200 and first.json()["status"] == "accepted"
    retry = json.loads(body)
    retry["attempt_number"] = 2  # LOX24's next attempt: same id, new attempt number
    second = post_lox24(receiver, json.dumps(retry).encode())
    assert second.json() == {"status": "duplicate", "event_id": first.json()["event_id"]}
    stored = receiver.journal.events.get(first.json()["event_id"])
    assert stored.phone == "+4911113333444" and stored.external_lead_id is None
    assert stored.details["reason_label"] == "Es ist unverständlich"
    assert stored.details["campaign_code"] == "3KCKb5nMD" and stored.details["reason_id"] == 4


def test_lox24_accepts_both_attempt_total_spellings(receiver):
    doc = json.loads(fixture_bytes("lox24_phone_unsubscribe.json"))
    doc["id"] = str(uuid.uuid4())
    doc["attempt_total"] = doc.pop("attempts_total")
    resp = post_lox24(receiver, json.dumps(doc).encode())
    assert resp.status_code == 200
    assert receiver.journal.events.get(resp.json()["event_id"]).details["attempts_total"] == 4


@pytest.mark.parametrize("token,via", [(None, "header"), ("wrong-token", "header"), ("wrong-token", "query"),
                                       ("", "query"), (LOX24_TOKEN, "query")])
def test_lox24_wrong_or_missing_token_is_401(receiver, token, via):
    resp = post_lox24(receiver, fixture_bytes("lox24_phone_unsubscribe.json"), token=token, via=via)
    assert resp.status_code == 401 and "X-LOX24-Token" in resp.json()["error"]
    assert receiver.journal.reports.counts()["events"]["received"] == 0


def test_lox24_query_token_is_refused_unless_allowed_in_config(tmp_path):
    from syncd.config import parse_config
    from syncd.sources import build_sources

    body = fixture_bytes("lox24_phone_unsubscribe.json")
    for allowed in (False, True):
        cfg = parse_config({"sources": {"lox24": {"token": LOX24_TOKEN, "allow_query_token": allowed}}},
                           base_dir=tmp_path, env={})
        source = build_sources(cfg)["lox24"]
        if allowed:
            source.authenticate(body, {}, {"token": LOX24_TOKEN})
        else:
            with pytest.raises(Exception, match="allow_query_token"):
                source.authenticate(body, {}, {"token": LOX24_TOKEN})


# --- Sinch -------------------------------------------------------------------------------

def test_sinch_flat_and_envelope_forms(receiver):
    flat = post_sinch(receiver, fixture_bytes("sinch_opt_out_notification.json"))
    assert flat.status_code == 200, flat.text
    envelope = json.dumps({"app_id": "app", "project_id": "p", "accepted_time": "2026-01-01T00:00:00Z",
                           "event_time": "2026-01-01T00:00:00Z", "correlation_id": "r-1",
                           "opt_out_notification": {"request_id": "r-1", "contact_id": "c", "channel": "WHATSAPP",
                                                    "identity": "13305551234", "status": "OPT_OUT_SUCCEEDED"}})
    resp = post_sinch(receiver, envelope.encode())
    assert resp.status_code == 200, resp.text
    stored = receiver.journal.events.get(resp.json()["event_id"])
    assert (stored.kind, stored.channel, stored.phone) == ("opt_out", "whatsapp", "+13305551234")
    assert stored.details["request_id"] == "r-1"


def test_sinch_failed_result_is_kept_as_reflection_result_not_consent(receiver):
    body = json.dumps({"opt_out_notification": {"channel": "WHATSAPP", "identity": "13305551234",
                                                "status": "OPT_OUT_FAILED",
                                                "error_details": {"description": "not on WhatsApp"}}}).encode()
    resp = post_sinch(receiver, body)
    assert resp.status_code == 200
    stored = receiver.journal.events.get(resp.json()["event_id"])
    assert stored.event_type == "reflection_result"
    assert receiver.journal.reports.counts()["events"]["received"] == 0  # not a consent event


def test_sinch_stale_or_wrongly_signed_is_401(receiver):
    body = fixture_bytes("sinch_opt_out_notification.json")
    stale = post_sinch(receiver, body, timestamp=int(time.time()) - 301)
    future = post_sinch(receiver, body, timestamp=int(time.time()) + 305)  # int() and the round trip eat up to ~1 s
    wrong = post_sinch(receiver, body, secret="other-secret")
    missing = requests.post(f"{receiver.url}/webhooks/sinch", data=body, headers=JSON, timeout=10)
    assert [x.status_code for x in (stale, future, wrong, missing)] == [401, 401, 401, 401]
    assert "more than 300 s" in stale.json()["error"]
    assert receiver.journal.reports.counts()["events"]["received"] == 0


def test_sinch_published_test_vector_verifies():
    from connectors.sinch_signing import verify

    body = (b'{"app_id":"","accepted_time":"2021-10-18T17:49:13.813615Z","project_id":'
            b'"e2df3a34-a71b-4448-9db5-a8d2baad28e4","contact_create_notification":{"contact":'
            b'{"id":"01FJA8B466Y0R2GNXD78MD9SM1","channel_identities":[{"channel":"SMS","identity":'
            b'"48123456789","app_id":""}],"display_name":"New Test Contact","email":"new.contact@email.com",'
            b'"external_id":"","metadata":"","language":"EN_US"}},"message_metadata":""}')
    assert verify("foo_secret1234", body, "01FJA8B4A7BM43YGWSG9GBV067", "1634579353",
                  "6bpJoRmFoXVjfJIVglMoJzYXxnoxRujzR4k2GOXewOE=")
    assert not verify("foo_secret1234", body + b" ", "01FJA8B4A7BM43YGWSG9GBV067", "1634579353",
                      "6bpJoRmFoXVjfJIVglMoJzYXxnoxRujzR4k2GOXewOE=")


# --- hostile input -----------------------------------------------------------------------

def test_oversized_body_is_413_json(receiver):
    body = b'{"event": "optOut", "data": {"optOutMessage": "' + b"x" * 70000 + b'"}}'
    resp = post_apten(receiver, body)
    assert resp.status_code == 413 and "larger than 65536" in resp.json()["error"]


def test_wrong_content_type_is_415(receiver):
    body = fixture_bytes("apten_optout_sms.json")
    resp = post_apten(receiver, body, **{"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 415 and resp.json()["status"] == 415


def test_unknown_source_is_404_json(receiver):
    resp = requests.post(f"{receiver.url}/webhooks/twilio", data=b"{}", headers=JSON, timeout=10)
    assert resp.status_code == 404 and "no enabled source" in resp.json()["error"]


def test_wrong_method_is_405_json(receiver):
    resp = requests.get(f"{receiver.url}/webhooks/apten", timeout=10)
    assert resp.status_code == 405 and resp.json()["status"] == 405


def test_unroutable_id_is_quarantined_202_and_visible(receiver):
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    doc["data"].update(externalLeadId="//evil.example/x", phone=None)
    resp = post_apten(receiver, json.dumps(doc).encode())
    assert resp.status_code == 202 and resp.json()["status"] == "quarantined"
    assert receiver.journal.reports.counts()["quarantined"] == 1
    assert receiver.journal.reports.dead_letters()[0]["type"] == "quarantine"


def test_public_port_has_health_but_no_admin_paths(receiver):
    assert requests.get(f"{receiver.url}/healthz", timeout=10).json() == {"status": "ok"}
    for path in ("/metrics", "/readyz", "/status", "/status/login"):
        resp = requests.get(f"{receiver.url}{path}", timeout=10)
        assert resp.status_code == 404 and resp.json()["status"] == 404, path


json_leaf = st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=12), c,
                                                                                           max_size=4), max_leaves=15)
KEYS = ["event", "data", "timestamp", "id", "name", "created_at", "phone", "externalLeadId", "channel",
        "status", "identity", "opt_out_notification", "attempts_total", "additional_data", "reason"]


def mutate(seed: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(seed))
    for k, v in extra.items():
        target = out["data"] if isinstance(out.get("data"), dict) and k in out["data"] else out
        target[k] = v
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(["apten", "lox24", "sinch"]),
       body=st.one_of(st.binary(max_size=200),
                      st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.sampled_from(KEYS), json_value,
                                                                                  max_size=6)),
                      st.builds(lambda s, d: json.dumps(mutate(json.loads(s), d)).encode(),
                                st.sampled_from([fixture_bytes("apten_optout_sms.json").decode(),
                                                 fixture_bytes("lox24_phone_unsubscribe.json").decode(),
                                                 fixture_bytes("apten_do_not_contact.json").decode()]),
                                st.dictionaries(st.sampled_from(KEYS), json_value, max_size=3))))
def test_fuzz_every_endpoint_never_5xx(receiver, endpoint, body):
    if endpoint == "apten":
        resp = post_apten(receiver, body)
    elif endpoint == "lox24":
        resp = post_lox24(receiver, body)
    else:
        resp = post_sinch(receiver, body)
    assert resp.status_code < 500, resp.text
    assert resp.status_code in (200, 202, 400), resp.text
    assert isinstance(resp.json(), dict)


def test_still_healthy_after_fuzzing(receiver):
    for body in (b"\x00" * 100, b"{" * 5000, b'{"event": "optOut", "data": {"phone": "' + "٣" .encode() * 50 + b'"}}',
                 b'{"id": "x", "name": "phone.unsubscribe", "data": {"phone": "1", "created_at": 1e400}}',
                 b'{"event": "optOut", "data": {}, "timestamp": "9999-99-99"}'):
        for post in (post_apten, post_lox24, post_sinch):
            assert post(receiver, body).status_code < 500
    assert requests.get(f"{receiver.url}/healthz", timeout=10).status_code == 200


def test_serve_moves_start_up_objects_out_of_full_collections():
    """What exists when ``serve`` starts is frozen: full collections no longer walk it
    (each walk held the GIL over ~67,000 objects and stalled every webhook)."""
    import gc

    from syncd.daemon import freeze_startup_objects

    built_at_start = {"validators": [{"field": "phone"}]}
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        assert not any(o is built_at_start for o in gc.get_objects())
        created_later = {"event": []}
        assert any(o is created_later for o in gc.get_objects())
    finally:
        gc.unfreeze()
