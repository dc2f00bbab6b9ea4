"""LOX24 and Sinch parsers, phone normalization and masking, with hypothesis."""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.masking import mask_text, register_secrets
from syncd.phones import to_e164
from syncd.sources.apten import AptenSource
from syncd.sources.base import BadPayload, Ignored, Unauthorized
from syncd.sources.lox24 import Lox24Source
from syncd.sources.sinch import SinchSource
from tests.conftest import consent_or_none, fixture_bytes

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
LOX = Lox24Source("lox24-test-token")
SINCH = SinchSource("sinch-test-secret")
# Any code point, lone surrogates and NUL included (json.dumps writes them as JSON escapes).
any_text = st.text(st.characters(exclude_categories=()), max_size=20) | st.sampled_from(["\udfff", "\x00", "y" * 10_000])
json_leaf = st.none() | st.booleans() | st.integers(min_value=-(10**20), max_value=10**20) | any_text
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                           max_size=3), max_leaves=10)


def test_lox24_seed_fields():
    ev = LOX.parse(fixture_bytes("lox24_phone_unsubscribe.json"), NOW)
    assert (ev.source_event_id, ev.kind, ev.channel) == ("ef58b437-1319-4b0c-961b-17214cf1cf32", "opt_out", "sms")
    assert ev.occurred_at == datetime.fromtimestamp(1757849748, timezone.utc)
    assert ev.message == "zusätzlicher Benutzertext mit Erklärung" and ev.reason == "Es ist unverständlich"
    assert ev.details["unsubscribe_request_id"] == 59 and ev.details["short_link_code"] == "baaIou"


def test_lox24_token_in_header_only_by_default():
    body = fixture_bytes("lox24_phone_unsubscribe.json")
    LOX.authenticate(body, {"X-LOX24-Token": "lox24-test-token"}, {})
    for headers, query in (({}, {}), ({"X-LOX24-Token": "lox24-test-toke"}, {}), ({}, {"token": "x"}),
                           ({}, {"token": "lox24-test-token"}), ({"X-LOX24-Token": "ä" * 16}, {})):
        with pytest.raises(Unauthorized):
            LOX.authenticate(body, headers, query)


def test_lox24_query_token_only_when_allowed():
    body = fixture_bytes("lox24_phone_unsubscribe.json")
    with pytest.raises(Unauthorized, match="allow_query_token"):
        LOX.authenticate(body, {}, {"token": "lox24-test-token"})
    allowing = Lox24Source("lox24-test-token", allow_query_token=True)
    allowing.authenticate(body, {}, {"token": "lox24-test-token"})
    allowing.authenticate(body, {"X-LOX24-Token": "lox24-test-token"}, {})
    for headers, query in (({}, {"token": "x"}), ({"X-LOX24-Token": "wrong"}, {"token": "lox24-test-token"})):
        with pytest.raises(Unauthorized):
            allowing.authenticate(body, headers, query)


@pytest.mark.parametrize("mutation,needle", [
    (lambda d: d.pop("id"), "id: is required"),
    (lambda d: d.update(id="../../x"), "id"),
    (lambda d: d["data"].pop("phone"), "data.phone: is required"),
    (lambda d: d.update(attempt_number=-1), "attempt_number"),
    (lambda d: d["data"]["additional_data"]["reason"].update(id="four"), "data.additional_data.reason.id"),
])
def test_lox24_bad_payloads_name_the_field(mutation, needle):
    doc = json.loads(fixture_bytes("lox24_phone_unsubscribe.json"))
    mutation(doc)
    with pytest.raises(BadPayload) as err:
        LOX.parse(json.dumps(doc).encode(), NOW)
    assert needle in str(err.value)


def test_lox24_other_events_are_ignored():
    doc = json.loads(fixture_bytes("lox24_phone_unsubscribe.json"))
    doc["name"] = "sms.delivered"
    assert isinstance(LOX.parse(json.dumps(doc).encode(), NOW), Ignored)


def test_sinch_seed_flat_notifications():
    out = SINCH.parse(fixture_bytes("sinch_opt_out_notification.json"), NOW)
    assert (out.kind, out.channel, out.phone, out.event_type) == ("opt_out", "whatsapp", "+46712312312", "consent")
    opt_in = SINCH.parse(fixture_bytes("sinch_opt_in_notification.json"), NOW)
    assert (opt_in.kind, opt_in.event_type) == ("opt_in", "consent")


@settings(max_examples=200, deadline=None)
@given(top=st.dictionaries(st.sampled_from(["id", "name", "created_at", "api_version", "attempt_number",
                                            "attempts_total", "data"]), json_value, max_size=7),
       data=st.dictionaries(st.sampled_from(["phone", "user_id", "created_at", "campaign_code",
                                             "additional_data", "unsubscribe_request_id"]), json_value, max_size=6))
def test_lox24_any_json_parses_or_is_bad_payload(top, data):
    doc = {"id": "ef58b437", "name": "phone.unsubscribe", **top}
    if "data" not in top:
        doc["data"] = data
    ev = consent_or_none(LOX, doc, NOW)
    if ev is not None:
        assert ev.kind == "opt_out" and ev.phone_raw


@settings(max_examples=200, deadline=None)
@given(note=st.dictionaries(st.sampled_from(["contact_id", "channel", "identity", "status", "request_id",
                                             "error_details"]), json_value, max_size=6),
       envelope=st.sampled_from([None, "opt_out_notification", "opt_in_notification"]),
       event_time=st.none() | any_text)
def test_sinch_any_json_parses_or_is_bad_payload(note, envelope, event_time):
    doc = {envelope: note} if envelope else dict(note)
    if event_time is not None:
        doc["event_time"] = event_time
    ev = consent_or_none(SINCH, doc, NOW)
    if ev is not None:
        assert ev.event_type in ("consent", "reflection_result")
        assert ev.phone is None or re.fullmatch(r"\+[1-9]\d{6,14}", ev.phone)


@given(st.text(max_size=80))
def test_to_e164_never_raises_and_is_e164(raw):
    out = to_e164(raw, "US")
    assert out is None or re.fullmatch(r"\+[1-9]\d{6,14}", out)


@pytest.mark.parametrize("raw,region,expected", [("+13305551234", "US", "+13305551234"),
                                                 ("(330) 555-1234", "US", "+13305551234"),
                                                 ("0151 12345678", "DE", "+4915112345678"),
                                                 ("12", "US", None), ("not a phone", "US", None)])
def test_to_e164_examples(raw, region, expected):
    assert to_e164(raw, region) == expected


def _e164_by_phonenumbers(raw: str, region: str) -> str | None:
    """to_e164 without its North American shortcut: phonenumbers alone."""
    import phonenumbers

    try:
        number = phonenumbers.parse(raw, None if raw.strip().startswith("+") else region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@settings(max_examples=500)
@given(raw=st.from_regex(r"\+1[0-9]{8,11}", fullmatch=True) | st.from_regex(r"\+1[2-9][0-9]{9}", fullmatch=True)
       | st.from_regex(r"\+?1?[2-9][0-9]{9}.?", fullmatch=True), region=st.sampled_from(["US", "CA", "DE", "GB"]))
def test_to_e164_shortcut_for_north_american_e164_agrees_with_phonenumbers(raw, region):
    assert to_e164(raw, region) == _e164_by_phonenumbers(raw, region)


@given(digits=st.from_regex(r"\+?[1-9][0-9]{9,13}", fullmatch=True),
       local=st.from_regex(r"[a-z]{1,10}", fullmatch=True), prefix=st.text(max_size=20))
def test_mask_text_hides_phones_emails_and_secrets(digits, local, prefix):
    register_secrets(["s3cr3t-value-xyz"])
    text = f"{prefix} call {digits} or mail {local}@example.com with s3cr3t-value-xyz"
    masked = mask_text(text)
    assert digits.lstrip("+") not in masked
    assert f"{local}@example.com" not in masked
    assert "s3cr3t-value-xyz" not in masked


# --- text that is not text, values syncd does not model ----------------------------------

def _lox24_with(path: tuple[str, ...], escaped: str) -> bytes:
    """The LOX24 seed with the string at ``path`` written as raw JSON text (escapes kept)."""
    doc = json.loads(fixture_bytes("lox24_phone_unsubscribe.json"))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "@@X@@"
    return json.dumps(doc).replace('"@@X@@"', f'"{escaped}"').encode()


@pytest.mark.parametrize("path,attr", [(("data", "additional_data", "additional_text"), "message"),
                                       (("data", "additional_data", "reason", "label"), "reason")])
@pytest.mark.parametrize("escaped", ["\\ud800", "nein\\u0000", "x" * 10_000])
def test_lox24_free_text_never_costs_the_opt_out(path, attr, escaped):
    ev = LOX.parse(_lox24_with(path, escaped), NOW)
    assert ev.kind == "opt_out" and ev.phone == "+4911113333444"
    value = getattr(ev, attr)
    value.encode("utf-8")
    assert "\x00" not in value and ("\ufffd" in value or value.startswith("x"))


def test_lox24_long_label_is_clipped_and_noted():
    ev = LOX.parse(_lox24_with(("data", "additional_data", "reason", "label"), "y" * 10_000), NOW)
    assert len(ev.reason) == 500 and ev.details["clipped"] == ["reason_label"]


@pytest.mark.parametrize("path,name", [(("data", "phone"), "data.phone"), (("id",), "id")])
def test_lox24_identifier_holding_a_lone_surrogate_is_a_400_naming_it(path, name):
    with pytest.raises(BadPayload) as err:
        LOX.parse(_lox24_with(path, "\\ud800"), NOW)
    assert name in str(err.value)


def test_lox24_undocumented_reason_id_is_kept_and_listed():
    doc = json.loads(fixture_bytes("lox24_phone_unsubscribe.json"))
    doc["data"]["additional_data"]["reason"]["id"] = 1234
    ev = LOX.parse(json.dumps(doc).encode(), NOW)
    assert ev.details["reason_id"] == 1234 and ev.details["unmodelled"] == {"reason.id": "1234"}


# Every channel of the Conversation API (official Python SDK, sinch/sinch-sdk-python:
# sinch/domains/conversation/models/v1/types/conversation_channel_type.py); syncd models three.
SINCH_CHANNELS = ["WHATSAPP", "RCS", "SMS", "MESSENGER", "VIBERBM", "MMS", "INSTAGRAM", "TELEGRAM",
                  "KAKAOTALK", "KAKAOTALKCHAT", "LINE", "WECHAT", "APPLEBC"]
MODELLED = {"WHATSAPP": "whatsapp", "SMS": "sms", "MMS": "sms"}


def test_sinch_channel_list_matches_the_installed_sdk():
    sdk = pytest.importorskip("sinch.domains.conversation.models.v1.types.conversation_channel_type")
    import typing

    literal = next(a for a in typing.get_args(sdk.ConversationChannelType) if typing.get_origin(a) is typing.Literal)
    assert sorted(typing.get_args(literal)) == sorted(SINCH_CHANNELS)


@pytest.mark.parametrize("channel", [c for c in SINCH_CHANNELS if c not in MODELLED] + ["VIBER", "FUTURE_X"])
def test_sinch_unmodelled_channel_is_kept_but_writes_nothing(channel):
    body = json.dumps({"opt_out_notification": {"channel": channel, "identity": "46712312312",
                                                "status": "OPT_OUT_SUCCEEDED"}}).encode()
    ev = SINCH.parse(body, NOW)
    assert ev.event_type == "consent" and ev.kind == "opt_out"
    assert ev.channel is None  # never "whatsapp": no WhatsApp flag for a Viber opt-out
    assert ev.details["unmodelled"] == {"channel": channel}
    assert channel in ev.details["ignored"]


@pytest.mark.parametrize("channel", sorted(MODELLED))
def test_sinch_modelled_channels(channel):
    body = json.dumps({"channel": channel, "identity": "46712312312", "status": "OPT_OUT_SUCCEEDED"}).encode()
    ev = SINCH.parse(body, NOW)
    assert ev.channel == MODELLED[channel] and "ignored" not in ev.details


def test_sinch_free_text_with_lone_surrogate_is_kept():
    body = (b'{"opt_out_notification": {"channel": "WHATSAPP", "identity": "46712312312", '
            b'"status": "OPT_OUT_FAILED", "error_details": {"description": "bad \\ud800 \\u0000"}}}')
    ev = SINCH.parse(body, NOW)
    assert ev.details["error_details"] == {"description": "bad \ufffd \ufffd"}


@pytest.mark.parametrize("body,name", [
    (b'{"opt_out_notification": {"channel": "WHATSAPP", "identity": "4671\\ud800", "status": "OPT_OUT_SUCCEEDED"}}',
     "opt_out_notification.identity"),
    (b'{"channel": "WHATSAPP", "contact_id": "\\u0000", "status": "OPT_OUT_SUCCEEDED"}', "contact_id"),
    (b'{"correlation_id": "\\udfff", "opt_in_notification": {"channel": "SMS", "status": "OPT_IN_SUCCEEDED"}}',
     "correlation_id"),
])
def test_sinch_identifier_holding_a_lone_surrogate_or_nul_is_a_400_naming_it(body, name):
    with pytest.raises(BadPayload) as err:
        SINCH.parse(body, NOW)
    assert str(err.value).startswith(name)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=8), _json_values, max_size=5), ascii_only=st.booleans())
def test_load_json_cleans_exactly_what_needs_cleaning(doc, ascii_only):
    """Whether a body takes the fast path (no ``\\u`` escape: nothing to clean) or not,
    the document is the cleaned one: every lone surrogate and NUL replaced, and
    only those strings marked dirty."""
    from syncd.sources.base import _clean, load_json

    body = json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    if not ascii_only:   # a raw lone surrogate is not UTF-8: send such a document escaped
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            body = json.dumps(doc).encode()
    dirty: set[str] = set()
    expected = _clean(doc, "", dirty)
    loaded = load_json(body)
    assert loaded.doc == expected
    assert loaded.original == doc
    assert loaded.dirty == frozenset(dirty)


# --- source times: an unreadable one orders by receipt time and never costs the opt-out ---

def _with(doc: dict, path: tuple[str, ...], value) -> bytes:
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(doc).encode()


UNREADABLE_TIMES = ["yesterday", "0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", 10**30, -1,
                    1.5e9, True, {"at": 1}, ["2024-01-15T14:30:00Z"], ""]


@pytest.mark.parametrize("value", UNREADABLE_TIMES)
@pytest.mark.parametrize("source,fixture,path", [
    (AptenSource("apten-test-secret"), "apten_optout_sms.json", ("timestamp",)),
    (LOX, "lox24_phone_unsubscribe.json", ("data", "created_at")),
    (SINCH, "sinch_opt_out_notification.json", ("event_time",)),
], ids=["apten", "lox24", "sinch"])
def test_an_unreadable_source_time_keeps_the_opt_out_ordered_by_receipt(source, fixture, path, value):
    """Refusing the webhook would lose the opt-out it carries (a sender does not retry
    a 400); its time is kept for the audit and the receipt time orders it."""
    ev = source.parse(_with(json.loads(fixture_bytes(fixture)), path, value), NOW)
    assert ev.kind == "opt_out" and ev.occurred_at == NOW
    kept = ev.details["timestamp_unreadable"]
    assert kept["field"] == ".".join(path) and kept["value"] == str(value)[:100]


@pytest.mark.parametrize("source,fixture,path,value", [
    (AptenSource("apten-test-secret"), "apten_optout_sms.json", ("timestamp",), 1757849748),
    (SINCH, "sinch_opt_out_notification.json", ("event_time",), 1757849748),
    (LOX, "lox24_phone_unsubscribe.json", ("data", "created_at"), "2025-09-14T11:35:48Z"),
], ids=["apten", "sinch", "lox24"])
def test_a_time_in_a_form_the_vendor_does_not_document_is_kept_not_guessed(source, fixture, path, value):
    """Apten and Sinch document ISO 8601 text, LOX24 Unix seconds: the other form is not
    read as a time (it could mean something else), only kept."""
    ev = source.parse(_with(json.loads(fixture_bytes(fixture)), path, value), NOW)
    assert ev.occurred_at == NOW and ev.details["timestamp_unreadable"]["value"] == str(value)


@given(st.one_of(st.none(), st.text(max_size=40), st.integers(min_value=-(10**20), max_value=10**20),
                 st.floats(allow_nan=False), st.booleans(),
                 st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())),
       st.booleans())
def test_source_time_always_answers_an_aware_time_no_later_than_the_skew(raw, unix_seconds):
    from syncd.sources.base import MAX_FUTURE_SKEW, source_time

    details: dict = {}
    at = source_time(raw, NOW, details, "timestamp", unix_seconds=unix_seconds)
    assert at.tzinfo is not None and at - NOW <= MAX_FUTURE_SKEW
    if at == NOW and raw is not None:
        assert "timestamp_unreadable" in details or "source_time_in_future" in details or raw in (
            NOW.isoformat(), int(NOW.timestamp()))
