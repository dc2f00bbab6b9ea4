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
    (b'{"event": "optOut", "data": {"channel": 5}}', "data.channel"),
    (b'{"event": "optOut", "data": {"externalLeadId": 12345}}', "data.externalLeadId"),
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


# Text with every code point, lone surrogates and NUL included: json.dumps writes them as
# "\ud800" / "\u0000" escapes, as a sender's JSON encoder would.
any_text = st.text(st.characters(exclude_categories=()), max_size=30) | st.sampled_from(["\ud800", "a\x00b", "x" * 10_000])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(event=st.sampled_from(["optOut", "doNotContact", "x"]) | st.text(max_size=20),
       data=st.dictionaries(st.sampled_from(["leadId", "externalLeadId", "phone", "email", "channel",
                                             "optOutReason", "isTwilioOptOut", "optOutMessage",
                                             "isDoNotContact"]) | st.text(st.characters(exclude_categories=()), max_size=8),
                            json_values, max_size=9),
       timestamp=st.none() | any_text | st.integers())
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


# --- values Apten documents (or may send) that syncd does not model ----------------------

def _optout(**data) -> bytes:
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    doc["data"].update(data)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("raw,shown", [("manual", "manual"), ("MANUAL", "MANUAL"), ("fax", "fax"),
                                       (None, "null"), ("", "")])
def test_manual_or_unknown_channel_is_kept_as_all_with_the_raw_value(raw, shown):
    # https://docs.apten.ai/webhooks/overview: lead webhooks carry channel sms, email, call or manual.
    ev = SRC.parse(_optout(channel=raw), NOW)
    assert (ev.kind, ev.channel) == ("opt_out", "all")
    assert ev.details["raw_channel"] == shown
    assert ev.details["unmodelled"] == {"channel": shown}


@pytest.mark.parametrize("raw,channel", [("sms", "sms"), ("email", "email"), ("call", "call"), ("SMS", "sms")])
def test_documented_channels_are_modelled_and_not_listed(raw, channel):
    ev = SRC.parse(_optout(channel=raw), NOW)
    assert ev.channel == channel and "unmodelled" not in ev.details


def test_missing_channel_stays_sms_as_in_apten_first_payloads():
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    del doc["data"]["channel"]
    assert SRC.parse(json.dumps(doc).encode(), NOW).channel == "sms"


def test_unknown_opt_out_reason_is_kept_and_listed():
    known = SRC.parse(_optout(channel="email", optOutReason="COMPLAINT"), NOW)
    assert known.reason == "COMPLAINT" and "unmodelled" not in known.details
    unknown = SRC.parse(_optout(channel="email", optOutReason="SPAM_TRAP"), NOW)
    assert unknown.reason == "SPAM_TRAP"
    assert unknown.details["unmodelled"] == {"optOutReason": "SPAM_TRAP"}


def test_do_not_contact_keeps_the_email_for_the_email_channel():
    # https://docs.apten.ai/webhooks/do-not-contact: data.email, "if available".
    doc = json.loads(fixture_bytes("apten_do_not_contact.json"))
    doc["data"]["email"] = "  Lead@Example.com "
    ev = SRC.parse(json.dumps(doc).encode(), NOW)
    assert (ev.kind, ev.channel, ev.email) == ("do_not_contact", "all", "Lead@Example.com")


# --- text that is not text ----------------------------------------------------------------

def _with_escape(field: str, escaped: str) -> bytes:
    """The SMS seed with ``data[field]`` written as raw JSON string text (escapes kept)."""
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    doc["data"][field] = "@@X@@"
    return json.dumps(doc).replace('"@@X@@"', f'"{escaped}"').encode()


@pytest.mark.parametrize("field,attr", [("optOutMessage", "message"), ("optOutReason", "reason")])
@pytest.mark.parametrize("escaped", ["STOP \\ud800", "\\udfff", "a\\u0000b", "\\ud83d"])
def test_free_text_with_lone_surrogates_or_nul_keeps_the_opt_out(field, attr, escaped):
    body = _with_escape(field, escaped)
    ev = SRC.parse(body, NOW)
    value = getattr(ev, attr)
    assert "\ufffd" in value and value.encode("utf-8")  # storable text
    assert ev.raw == body  # the exact bytes are kept as well
    assert len(ev.source_event_id) == 64


@pytest.mark.parametrize("field", ["leadId", "externalLeadId", "phone", "email"])
@pytest.mark.parametrize("escaped", ["\\ud800", "003XX000004DHPY\\udc00", "\\u0000"])
def test_identifier_with_lone_surrogate_or_nul_is_a_400_naming_it(field, escaped):
    with pytest.raises(BadPayload) as err:
        SRC.parse(_with_escape(field, escaped), NOW)
    assert f"data.{field}" in str(err.value)


def test_bodies_differing_only_in_a_lone_surrogate_are_distinct_events():
    a = SRC.parse(_with_escape("optOutMessage", "\\ud800"), NOW).source_event_id
    b = SRC.parse(_with_escape("optOutMessage", "\\ud801"), NOW).source_event_id
    assert a != b


def test_invalid_utf8_byte_inside_the_message_keeps_the_opt_out():
    body = _with_escape("optOutMessage", "STOP").replace(b"STOP", b"ST\xffOP")
    assert SRC.parse(body, NOW).message == "ST\ufffdOP"


def test_integer_beyond_pythons_digit_limit_is_a_400():
    with pytest.raises(BadPayload, match="number is too long"):
        SRC.parse(b'{"event": "optOut", "data": {"n": ' + b"9" * 5000 + b"}}", NOW)
