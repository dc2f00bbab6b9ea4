import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.events import canonical_hash
from syncd.sources.apten import AptenSource, sign
from syncd.sources.base import BadPayload, Ignored, Unauthorized
from tests.conftest import consent_or_none, fixture_bytes

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
SRC = AptenSource("apten-test-secret")


def test_seed_sms_example_verbatim():
    ev = SRC.parse(fixture_bytes("apten_optout_sms.json"), NOW)
    assert (ev.kind, ev.channel) == ("opt_out", "sms")
    assert ev.external_lead_id == "003XX000004DHPY"
    assert ev.phone == "+13305551234"
    assert ev.message == "STOP"
    assert ev.occurred_at == datetime(2024, 2, 18, 9, 45, 22, tzinfo=timezone.utc)
    assert ev.details["is_twilio_opt_out"] is True
    assert ev.raw == fixture_bytes("apten_optout_sms.json")


def test_seed_email_example_verbatim():
    ev = SRC.parse(fixture_bytes("apten_optout_email.json"), NOW)
    assert (ev.kind, ev.channel, ev.reason) == ("opt_out", "email", "UNSUBSCRIBE_LINK")


def test_do_not_contact_is_every_channel():
    ev = SRC.parse(fixture_bytes("apten_do_not_contact.json"), NOW)
    assert (ev.kind, ev.channel) == ("do_not_contact", "all")
    assert ev.email is None


def test_dedupe_key_ignores_formatting_but_not_content():
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    a = SRC.parse(json.dumps(doc).encode(), NOW).source_event_id
    b = SRC.parse(json.dumps(doc, indent=4, sort_keys=True).encode(), NOW).source_event_id
    doc["data"]["channel"] = "call"
    c = SRC.parse(json.dumps(doc).encode(), NOW).source_event_id
    assert a == b == canonical_hash(json.loads(fixture_bytes("apten_optout_sms.json")))
    assert a != c


def test_signature_checked_over_raw_bytes():
    body = fixture_bytes("apten_optout_sms.json")
    SRC.authenticate(body, {"X-Signature-SHA256": sign("apten-test-secret", body)}, {})
    SRC.authenticate(body, {"X-Signature-SHA256": sign("apten-test-secret", body).upper()}, {})
    for headers in ({}, {"X-Signature-SHA256": ""}, {"X-Signature-SHA256": sign("other", body)},
                    {"X-Signature-SHA256": sign("apten-test-secret", body + b" ")},
                    {"X-Signature-SHA256": "é" * 64}):
        with pytest.raises(Unauthorized):
            SRC.authenticate(body, headers, {})


def test_other_apten_events_are_ignored_not_stored():
    body = json.dumps({"event": "messageReceived", "data": {"leadId": "x"},
                       "timestamp": "2024-01-15T14:30:00Z"}).encode()
    assert isinstance(SRC.parse(body, NOW), Ignored)


@pytest.mark.parametrize("body,needle", [
    (b"not json", "not valid JSON"),
    (b"[1,2]", "JSON object"),
    (b"\xff\xfe", "UTF-8"),
    (b'{"event": "optOut"}', "data: is required"),
    (b'{"event": "optOut", "data": {"channel": "fax"}}', "data.channel"),
    (b'{"event": "optOut", "data": {"externalLeadId": 12345}}', "data.externalLeadId"),
    (b'{"event": "optOut", "data": {}, "timestamp": "yesterday"}', "timestamp"),
    (b'{"event": 7, "data": {}}', "event"),
])
def test_bad_payloads_name_the_problem(body, needle):
    with pytest.raises(BadPayload) as err:
        SRC.parse(body, NOW)
    assert needle in str(err.value)


def test_future_timestamp_does_not_outrank_later_events():
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    doc["timestamp"] = (NOW + timedelta(days=400)).isoformat()
    ev = SRC.parse(json.dumps(doc).encode(), NOW)
    assert ev.occurred_at == NOW
    assert "source_time_in_future" in ev.details


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(event=st.sampled_from(["optOut", "doNotContact", "x"]) | st.text(max_size=20),
       data=st.dictionaries(st.sampled_from(["leadId", "externalLeadId", "phone", "email", "channel",
                                             "optOutReason", "isTwilioOptOut", "optOutMessage",
                                             "isDoNotContact"]) | st.text(max_size=8),
                            json_values, max_size=9),
       timestamp=st.none() | st.text(max_size=30) | st.integers())
def test_any_json_either_parses_or_is_a_clear_bad_payload(event, data, timestamp):
    doc = {"event": event, "data": data}
    if timestamp is not None:
        doc["timestamp"] = timestamp
    result = consent_or_none(SRC, doc, NOW)
    if result is not None:
        assert result.kind in ("opt_out", "do_not_contact")
        assert result.channel in ("sms", "email", "call", "whatsapp", "all")
        assert result.occurred_at.tzinfo is not None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_other_exceptions(body):
    try:
        SRC.parse(body, NOW)
    except BadPayload:
        pass
