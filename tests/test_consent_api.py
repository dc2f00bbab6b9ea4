"""The consent API over real HTTP: bearer token (404 when off, 401 when wrong), 400
naming the field, answers from the ledger, the batch in order; hypothesis for the
query parsing (never a 5xx)."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.consent_api import BadCheck, parse_check
from syncd.events import ConsentEvent

TOKEN = "consent-api-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PHONE = "+13305551234"


def record(journal, n: int, kind: str, channel: str, second: int, **kw) -> int:
    base = dict(source="apten", source_event_id=f"api-{n}", kind=kind, channel=channel,
                occurred_at=datetime(2024, 2, 18, 9, 45, second, tzinfo=timezone.utc),
                received_at=datetime.now(timezone.utc), raw=b"{}", phone=PHONE, phone_raw=PHONE)
    base.update(kw)
    return journal.events.record(ConsentEvent(**base)).event_id


@pytest.fixture
def api(tmp_path):
    from syncd.journal import open_journal
    from syncd.receiver import create_app
    from syncd.routing import Router
    from syncd.config import parse_config
    from tests.conftest import LiveReceiver

    cfg = parse_config({}, base_dir=tmp_path, env={})
    journal = open_journal(f"sqlite:///{tmp_path}/api.db")
    live = LiveReceiver(create_app(journal, {}, Router.from_config(cfg), api_token=TOKEN, default_region="US"))
    live.journal = journal
    yield live
    live.close()
    journal.close()


def test_api_off_without_a_token_is_404(receiver):
    r = requests.get(f"{receiver.url}/v1/consent", params={"phone": PHONE, "channel": "sms"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["status"] == 404


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Bearer {TOKEN}x"}])
def test_missing_or_wrong_token_is_401(api, headers):
    r = requests.get(f"{api.url}/v1/consent", params={"phone": PHONE, "channel": "sms"}, headers=headers)
    assert r.status_code == 401
    assert requests.post(f"{api.url}/v1/consent", json={"checks": []}, headers=headers).status_code == 401


def test_answers_from_the_ledger(api):
    out = record(api.journal, 1, "opt_out", "sms", 0)
    record(api.journal, 2, "opt_in", "call", 1)
    record(api.journal, 3, "opt_out", "email", 2, email="Jane@Example.com")
    r = requests.get(f"{api.url}/v1/consent", params={"phone": "(330) 555-1234", "channel": "sms"}, headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {"allowed": False, "state": "opted_out", "channel": "sms",
                        "since": "2024-02-18T09:45:00.000000Z", "source": "apten", "event_id": out}
    call = requests.get(f"{api.url}/v1/consent", params={"phone": PHONE, "channel": "call"}, headers=AUTH).json()
    assert (call["allowed"], call["state"]) == (True, "opted_in")
    wa = requests.get(f"{api.url}/v1/consent", params={"phone": PHONE, "channel": "whatsapp"}, headers=AUTH).json()
    assert wa == {"allowed": True, "state": "unknown", "channel": "whatsapp", "since": None, "source": None,
                  "event_id": None}
    mail = requests.get(f"{api.url}/v1/consent", params={"email": " jane@EXAMPLE.com", "channel": "email"},
                        headers=AUTH).json()
    assert (mail["allowed"], mail["state"]) == (False, "opted_out")


def test_concurrent_checks_each_get_their_own_answer(api):
    """Concurrent GETs share ledger reads (syncd/lookup_group.py): 16 clients asking
    about 48 different phones, half of them opted out, each answer is its own phone's."""
    from concurrent.futures import ThreadPoolExecutor

    phones = [f"+1330555{2000 + i:04d}" for i in range(48)]
    expected = {}
    for i, phone in enumerate(phones):
        if i % 2 == 0:
            expected[phone] = record(api.journal, 100 + i, "opt_out", "sms", i % 60, phone=phone, phone_raw=phone)
        else:
            expected[phone] = None

    def ask(phone: str):
        with requests.Session() as s:
            return [(phone, s.get(f"{api.url}/v1/consent", params={"phone": phone, "channel": "sms"},
                                  headers=AUTH).json()) for _ in range(3)]

    with ThreadPoolExecutor(16) as pool:
        answers = [a for batch in pool.map(ask, phones) for a in batch]
    assert len(answers) == 3 * len(phones)
    for phone, body in answers:
        assert body["event_id"] == expected[phone]
        assert body["allowed"] is (expected[phone] is None)


def test_batch_answers_in_order(api):
    record(api.journal, 1, "do_not_contact", "all", 0)
    checks = [{"phone": PHONE, "channel": c} for c in ("whatsapp", "sms", "call")]
    checks.insert(1, {"phone": "+4915112345678", "channel": "sms"})
    r = requests.post(f"{api.url}/v1/consent", json={"checks": checks}, headers=AUTH)
    assert r.status_code == 200
    got = [(x["channel"], x["state"], x["allowed"]) for x in r.json()["results"]]
    assert got == [("whatsapp", "opted_out", False), ("sms", "unknown", True), ("sms", "opted_out", False),
                   ("call", "opted_out", False)]


@pytest.mark.parametrize("params,field", [
    ({"phone": "not a phone", "channel": "sms"}, "phone"),
    ({"phone": PHONE, "channel": "fax"}, "channel"),
    ({"phone": PHONE}, "channel"),
    ({"email": "nobody", "channel": "email"}, "email"),
    ({"email": "a@b.example", "channel": "sms"}, "channel"),
    ({"channel": "sms"}, "phone"),
])
def test_bad_query_is_400_naming_the_field(api, params, field):
    r = requests.get(f"{api.url}/v1/consent", params=params, headers=AUTH)
    assert r.status_code == 400 and r.json()["field"] == field


def test_batch_limits_and_bad_items(api):
    too_many = {"checks": [{"phone": PHONE, "channel": "sms"}] * 1001}
    r = requests.post(f"{api.url}/v1/consent", json=too_many, headers=AUTH)
    assert r.status_code == 400 and r.json()["field"] == "checks"
    r = requests.post(f"{api.url}/v1/consent", json={"checks": [{"phone": PHONE, "channel": "sms"}] * 1000},
                      headers=AUTH)
    assert r.status_code == 200 and len(r.json()["results"]) == 1000
    r = requests.post(f"{api.url}/v1/consent", json={"checks": [{"phone": PHONE, "channel": "sms"}, 5]},
                      headers=AUTH)
    assert r.status_code == 400 and r.json()["field"] == "checks[1]"
    r = requests.post(f"{api.url}/v1/consent", data=b"{nope", headers=AUTH)
    assert r.status_code == 400 and r.json()["field"] == "body"


anything = st.one_of(st.none(), st.text(max_size=80), st.sampled_from(["sms", "email", "call", "whatsapp",
                                                                       PHONE, "a@b.example"]))


@given(st.dictionaries(st.sampled_from(["phone", "email", "channel", "x"]), anything))
def test_parse_check_answers_a_key_or_names_a_field(check):
    try:
        identity, channel = parse_check(check, "US")
    except BadCheck as exc:
        assert exc.field in ("phone", "email", "channel")
    else:
        assert channel in ("sms", "email", "call", "whatsapp") and identity


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["phone", "email", "channel", "x"]), st.text(max_size=60)))
def test_any_query_over_http_is_never_a_5xx(api, params):
    r = requests.get(f"{api.url}/v1/consent", params=params, headers=AUTH)
    assert r.status_code in (200, 400), r.text
    body = r.json()
    assert ("allowed" in body) if r.status_code == 200 else ("field" in body)


def test_config_api_token_empty_is_off_and_short_is_refused(tmp_path):
    from syncd.config import ConfigError, parse_config

    assert parse_config({"api": {"token": ""}}, base_dir=tmp_path, env={}).api.token is None
    assert parse_config({"api": {"token": TOKEN}}, base_dir=tmp_path, env={}).api.token == TOKEN
    with pytest.raises(ConfigError, match="api.token"):
        parse_config({"api": {"token": "short"}}, base_dir=tmp_path, env={})


@pytest.mark.slow
def test_serve_answers_the_consent_api_after_a_webhook():
    from tests.support.stack import Stack
    from tests.conftest import fixture_bytes

    st = Stack(extra_config={"api": {"token": TOKEN}}).start()
    daemon = st.serve()
    try:
        url = f"{st.url}/v1/consent"
        before = requests.get(url, params={"phone": PHONE, "channel": "sms"}, headers=AUTH, timeout=5)
        assert before.status_code == 200 and before.json()["state"] == "unknown"
        assert st.post_apten(fixture_bytes("apten_optout_sms.json")).status_code == 200
        after = requests.get(url, params={"phone": PHONE, "channel": "sms"}, headers=AUTH, timeout=5).json()
        assert (after["allowed"], after["state"], after["source"]) == (False, "opted_out", "apten")
        assert after["since"] == "2024-02-18T09:45:22.000000Z"
        assert requests.get(url, params={"phone": PHONE, "channel": "sms"}, timeout=5).status_code == 401
    finally:
        assert daemon.terminate() == 0
        st.cleanup()
