"""SinchConnector, the Sinch callback signature, and the Sinch sandbox, over real HTTP on 127.0.0.1."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal

import pytest
from pydantic import BaseModel, ConfigDict
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

import connectors.sinch as sinch_module
from connectors.errors import AuthFailed, Permanent, RateLimited, Transient
from connectors.http import short_retry
from connectors.sandbox.sinch import SinchSandbox
from connectors.sinch import SinchConnector
from connectors.sinch_signing import (HEADER_ALGORITHM, HEADER_NONCE, HEADER_SIGNATURE,
                                      HEADER_TIMESTAMP, sign, timestamp_fresh, verify)

# Published vector: sinch/sinch-sdk-node,
# packages/sdk-client/tests/utils/authorization.helper.test.ts ("Webhook signature
# (Conversation API)"); the same body, nonce, timestamp and signature appear in
# sinch/sinch-sdk-dotnet's Conversation webhook tests. Byte-exact, no trailing newline.
VECTOR_SECRET = "foo_secret1234"
VECTOR_BODY = (
    b'{"app_id":"","accepted_time":"2021-10-18T17:49:13.813615Z",'
    b'"project_id":"e2df3a34-a71b-4448-9db5-a8d2baad28e4",'
    b'"contact_create_notification":{"contact":{"id":"01FJA8B466Y0R2GNXD78MD9SM1",'
    b'"channel_identities":[{"channel":"SMS","identity":"48123456789","app_id":""}],'
    b'"display_name":"New Test Contact","email":"new.contact@email.com","external_id":"",'
    b'"metadata":"","language":"EN_US"}},"message_metadata":""}'
)
VECTOR_NONCE = "01FJA8B4A7BM43YGWSG9GBV067"
VECTOR_TIMESTAMP = "1634579353"
VECTOR_SIGNATURE = "6bpJoRmFoXVjfJIVglMoJzYXxnoxRujzR4k2GOXewOE="

PHONE = "+14707864783"
CALLBACK_SECRET = "callback-secret-for-tests"


# --- fixtures ---------------------------------------------------------------------------
@dataclass
class Receiver:
    """A tiny webhook receiver: records every POST, answers with queued statuses (then 200)."""

    statuses: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    url: str = ""

    def __call__(self, environ, start_response):
        req = Request(environ)
        with self.cond:
            self.received.append(({k.lower(): v for k, v in req.headers.items()}, req.get_data()))
            status = self.statuses.pop(0) if self.statuses else 200
            self.cond.notify_all()
        return Response('{"ok":true}', status=status, content_type="application/json")(
            environ, start_response)

    def wait(self, count: int, timeout: float = 5.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.received) < count and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            return list(self.received)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[SinchSandbox, Receiver]]:
    """One sandbox and one receiver for the module: stopping a werkzeug server costs
    its poll interval, so tests share them and reset state instead."""
    rec = Receiver()
    server = make_server("127.0.0.1", 0, rec, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    rec.url = f"http://127.0.0.1:{server.server_port}/webhooks/sinch"
    sb = SinchSandbox(callback_backoff=0.05).start()
    yield sb, rec
    sb.stop()
    server.shutdown()
    server.server_close()


@pytest.fixture
def sandbox(servers) -> SinchSandbox:
    """The shared sandbox, reset; callbacks are recorded as dropped unless a test asks
    for ``receiver``."""
    sb, _ = servers
    for thread in threading.enumerate():  # let the previous test's notifications finish
        if thread.name == "sandbox-sinch-callback":
            thread.join(timeout=5)
    sb.reset()
    sb.callback_url = None
    sb.callback_secret = None
    return sb


@pytest.fixture
def receiver(servers, sandbox) -> Receiver:
    _, rec = servers
    with rec.cond:
        rec.received.clear()
        rec.statuses.clear()
    sandbox.callback_url = rec.url
    sandbox.callback_secret = CALLBACK_SECRET
    return rec


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """Keep the connector's short retries but shrink their exponential backoff
    (Retry-After is still honoured exactly)."""
    monkeypatch.setattr(sinch_module, "short_retry",
                        lambda: short_retry(initial=0.01, maximum=0.05))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_connector(sb: SinchSandbox, **overrides) -> SinchConnector:
    params = dict(base_url=sb.url, auth_url=f"{sb.url}/oauth2/token", project_id=sb.project_id,
                  app_id=sb.app_id, key_id=sb.key_id, key_secret=sb.key_secret, timeout=5.0)
    params.update(overrides)
    return SinchConnector(**params)


def api_requests(sb: SinchSandbox):
    return sb.requests_to(r"^/v1/projects/.*:register$", "POST")


# --- signature --------------------------------------------------------------------------
def test_published_vector_verifies():
    assert sign(VECTOR_SECRET, VECTOR_BODY, VECTOR_NONCE, VECTOR_TIMESTAMP) == VECTOR_SIGNATURE
    assert verify(VECTOR_SECRET, VECTOR_BODY, VECTOR_NONCE, VECTOR_TIMESTAMP, VECTOR_SIGNATURE)


@pytest.mark.parametrize("field_name", ["body", "nonce", "timestamp", "secret", "signature"])
def test_published_vector_fails_when_anything_changes(field_name):
    args = dict(secret=VECTOR_SECRET, body=VECTOR_BODY, nonce=VECTOR_NONCE,
                timestamp=VECTOR_TIMESTAMP, signature=VECTOR_SIGNATURE)
    if field_name == "body":
        args["body"] = VECTOR_BODY.replace(b"48123456789", b"48123456788")
    elif field_name == "nonce":
        args["nonce"] = VECTOR_NONCE[:-1] + "8"
    elif field_name == "timestamp":
        args["timestamp"] = "1634579354"
    elif field_name == "secret":
        args["secret"] = "foo_secret1235"
    else:
        args["signature"] = "7" + VECTOR_SIGNATURE[1:]
    assert not verify(**args)


def test_every_single_byte_change_in_the_body_fails():
    for i in range(0, len(VECTOR_BODY), 7):
        tampered = VECTOR_BODY[:i] + bytes([VECTOR_BODY[i] ^ 1]) + VECTOR_BODY[i + 1:]
        assert not verify(VECTOR_SECRET, tampered, VECTOR_NONCE, VECTOR_TIMESTAMP, VECTOR_SIGNATURE)


@pytest.mark.parametrize("signature", [None, "", "   ", "not-base64", "é" * 44])
def test_verify_rejects_missing_or_malformed_signature_without_raising(signature):
    assert not verify(VECTOR_SECRET, VECTOR_BODY, VECTOR_NONCE, VECTOR_TIMESTAMP, signature)
    assert not verify(VECTOR_SECRET, VECTOR_BODY, None, VECTOR_TIMESTAMP, VECTOR_SIGNATURE)
    assert not verify(VECTOR_SECRET, VECTOR_BODY, VECTOR_NONCE, "", VECTOR_SIGNATURE)


def test_timestamp_freshness():
    assert timestamp_fresh(VECTOR_TIMESTAMP, 300, now=1634579353 + 299)
    assert not timestamp_fresh(VECTOR_TIMESTAMP, 300, now=1634579353 + 301)
    assert not timestamp_fresh("yesterday", 300)
    assert not timestamp_fresh(None, 300)


@settings(max_examples=200, deadline=None)
@given(secret=st.text(min_size=1), body=st.binary(), nonce=st.text(min_size=1),
       timestamp=st.text(min_size=1), extra=st.binary(min_size=1, max_size=4))
def test_sign_verify_round_trip(secret, body, nonce, timestamp, extra):
    signature = sign(secret, body, nonce, timestamp)
    assert verify(secret, body, nonce, timestamp, signature)
    assert not verify(secret, body + extra, nonce, timestamp, signature)


# --- construction and validation --------------------------------------------------------
@pytest.mark.parametrize("field_name,value", [("project_id", "p/../x"), ("project_id", ""),
                                              ("app_id", "app?x=1"), ("app_id", "a b"),
                                              ("project_id", "p1\n")])
def test_ids_are_validated_at_construction(field_name, value):
    with pytest.raises(ValueError):
        SinchConnector(base_url="http://127.0.0.1:9", auth_url="http://127.0.0.1:9/oauth2/token",
                       **{"project_id": "p1", "app_id": "a1", field_name: value},
                       key_id="k", key_secret="s")


@pytest.mark.parametrize("phone", ["14707864783", "+04707864783", "+1 470 786 4783", "+12345",
                                   "+1234567890123456", "+1470786478x", "", "+1470786\n4783",
                                   "+14707864783\n", "+١٤٧٠٧٨٦٤٧٨٣"])
def test_invalid_phone_never_produces_a_request(sandbox, phone):
    conn = make_connector(sandbox)
    with pytest.raises(Permanent):
        conn.register_opt_out(phone, "req-1")
    with pytest.raises(Permanent):
        conn.register_opt_in(phone, "req-1")
    assert sandbox.requests == []


def test_invalid_channels_or_request_id_never_produce_a_request(sandbox):
    conn = make_connector(sandbox)
    with pytest.raises(Permanent):
        conn.register_opt_out(PHONE, "req-1", channels=["whatsapp/../x"])
    with pytest.raises(Permanent):
        conn.register_opt_out(PHONE, "")
    assert sandbox.requests == []


def test_repr_holds_no_secret(sandbox):
    assert sandbox.key_secret not in repr(make_connector(sandbox))


# --- wire format and notifications ------------------------------------------------------
def test_register_opt_out_wire_format_and_signed_notification(sandbox, receiver):
    conn = make_connector(sandbox)
    answer = conn.register_opt_out(PHONE, "req-out-1")

    assert answer["request_id"] == "req-out-1"
    assert answer["opt_out"]["app_id"] == sandbox.app_id
    [sent] = api_requests(sandbox)
    assert sent.path == f"/v1/projects/{sandbox.project_id}/optouts:register"
    assert sent.headers["Authorization"].startswith("Bearer ")
    # request_id travels in the query, as the official SDK sends it; the body has none.
    assert sent.query == {"request_id": ["req-out-1"]}
    assert sent.json() == {
        "app_id": sandbox.app_id,
        "channels": ["WHATSAPP"],
        "recipient": {"identified_by": {"channel_identities": [
            {"channel": "WHATSAPP", "identity": "14707864783"}]}},
    }
    assert sandbox.registrations[0]["kind"] == "opt_out"
    assert sandbox.registrations[0]["identities"] == [{"channel": "WHATSAPP", "identity": "14707864783"}]

    [(headers, body)] = receiver.wait(1)
    assert headers[HEADER_ALGORITHM] == "HmacSHA256"
    assert verify(CALLBACK_SECRET, body, headers[HEADER_NONCE], headers[HEADER_TIMESTAMP],
                  headers[HEADER_SIGNATURE])
    assert not verify("another-secret", body, headers[HEADER_NONCE], headers[HEADER_TIMESTAMP],
                      headers[HEADER_SIGNATURE])
    assert timestamp_fresh(headers[HEADER_TIMESTAMP], 300)
    envelope = json.loads(body)
    assert envelope["app_id"] == sandbox.app_id and envelope["project_id"] == sandbox.project_id
    assert {"accepted_time", "event_time", "correlation_id"} <= envelope.keys()
    note = envelope["opt_out_notification"]
    assert note["request_id"] == "req-out-1"
    assert note["channel"] == "WHATSAPP" and note["identity"] == "14707864783"
    assert note["status"] == "OPT_OUT_SUCCEEDED" and "error_details" not in note
    assert note["contact_id"]


def test_request_id_is_sent_in_the_query_so_the_notification_carries_ours(sandbox, receiver):
    """A request_id in the body is not Sinch's contract: the outcome would carry an id
    Sinch made up and the journal could not join it to the registration."""
    make_connector(sandbox).register_opt_out(PHONE, "r 42/ü&x=1")
    [sent] = api_requests(sandbox)
    assert sent.query == {"request_id": ["r 42/ü&x=1"]}
    assert "request_id" not in sent.json()
    [(_, body)] = receiver.wait(1)
    assert json.loads(body)["opt_out_notification"]["request_id"] == "r 42/ü&x=1"


def test_sandbox_reads_request_id_from_the_query_only(sandbox):
    import requests

    token = requests.post(f"{sandbox.url}/oauth2/token", data={"grant_type": "client_credentials"},
                          auth=(sandbox.key_id, sandbox.key_secret), timeout=5).json()["access_token"]
    url = f"{sandbox.url}/v1/projects/{sandbox.project_id}/optouts:register"
    body = {"app_id": sandbox.app_id, "channels": ["WHATSAPP"], "recipient": {"identified_by": {
        "channel_identities": [{"channel": "WHATSAPP", "identity": "14707864783"}]}},
        "request_id": "in-the-body"}
    answer = requests.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
    assert answer["request_id"] != "in-the-body"
    assert sandbox.registrations[0]["request_id"] == answer["request_id"]


# --- the simulator against the official SDK's models --------------------------------------
class _OptNotification(BaseModel):
    """The opt-out / opt-in notification as the official Python SDK models it from 2.4.0
    (sinch.domains.conversation.models.v1.sinch_events.opt_in_out.OptOutNotification,
    https://developers.sinch.com/sdk/sinch-sdk-python/2.4.0/api/sinch.domains.conversation.models.v1.sinch_events.opt_in_out.opt_out_notification.html;
    sinch/sinch-sdk-java OptOutEventNotificationImpl has the same fields). The sinch
    release installed here (2.3) has only the envelope, so this transcription stands in
    for the inner model; ``extra="forbid"``: a field the SDK does not know fails."""

    model_config = ConfigDict(extra="forbid", strict=True)
    request_id: str | None = None
    contact_id: str | None = None
    channel: Literal["WHATSAPP", "RCS", "SMS", "MESSENGER", "VIBERBM", "MMS", "INSTAGRAM", "TELEGRAM",
                     "KAKAOTALK", "KAKAOTALKCHAT", "LINE", "WECHAT", "APPLEBC"] | None = None
    identity: str | None = None
    status: Literal["OPT_OUT_SUCCEEDED", "OPT_OUT_FAILED", "OPT_OUT_STATUS_UNSPECIFIED",
                    "OPT_IN_SUCCEEDED", "OPT_IN_FAILED", "OPT_IN_STATUS_UNSPECIFIED"] | None = None
    error_details: dict[Literal["description"], str] | None = None
    processing_mode: Literal["CONVERSATION", "DISPATCH"] | None = None


def _sdk_inner_model(kind: str):
    """The SDK's own notification model when the installed release has one (2.4+)."""
    try:
        from sinch.domains.conversation.models.v1.sinch_events import opt_in_out
    except ImportError:
        return _OptNotification
    return opt_in_out.OptOutNotification if kind == "opt_out" else opt_in_out.OptInNotification


@pytest.mark.parametrize("kind,outcome", [("opt_out", "SUCCEEDED"), ("opt_out", "FAILED"),
                                          ("opt_out", "STATUS_UNSPECIFIED"), ("opt_in", "SUCCEEDED")])
def test_simulator_notifications_parse_with_the_official_sdk(sandbox, receiver, kind, outcome):
    """The official sinch SDK verifies the simulator's signature and parses its envelope,
    so the simulator cannot drift from the vendor's shapes."""
    from sinch.domains.conversation.models.v1.sinch_events import ConversationSinchEventBase
    from sinch.domains.conversation.sinch_events.v1.conversation_sinch_event import ConversationSinchEvent

    sandbox.set_outcome(PHONE, outcome, "no such user" if outcome == "FAILED" else None)
    conn = make_connector(sandbox)
    (conn.register_opt_out if kind == "opt_out" else conn.register_opt_in)(PHONE, "req-sdk-1")
    [(headers, body)] = receiver.wait(1)

    handler = ConversationSinchEvent(CALLBACK_SECRET)
    assert handler.validate_authentication_header(headers, body)
    assert not ConversationSinchEvent("another-secret").validate_authentication_header(headers, body)
    event = handler.parse_event(body, headers)
    assert isinstance(event, ConversationSinchEventBase)
    assert event.app_id == sandbox.app_id and event.project_id == sandbox.project_id
    assert event.accepted_time is not None and event.event_time is not None

    inner = json.loads(body)[f"{kind}_notification"]
    note = _sdk_inner_model(kind).model_validate(inner)
    assert note.request_id == "req-sdk-1" and note.identity == "14707864783" and note.channel == "WHATSAPP"
    assert note.status == f"{kind.upper()}_{outcome}"
    assert (note.error_details is not None) == (outcome == "FAILED")


def test_opt_in_failure_outcome_and_several_channels(sandbox, receiver):
    sandbox.set_outcome(PHONE, "FAILED", "Recipient is not reachable on this channel")
    conn = make_connector(sandbox, channels=("WHATSAPP", "RCS"))
    conn.register_opt_in(PHONE, "req-in-1")

    [sent] = api_requests(sandbox)
    assert sent.path.endswith("/optins:register")
    assert sent.json()["channels"] == ["WHATSAPP", "RCS"]
    notes = [json.loads(body)["opt_in_notification"] for _, body in receiver.wait(2)]
    assert sorted(n["channel"] for n in notes) == ["RCS", "WHATSAPP"]
    for note in notes:
        assert note["status"] == "OPT_IN_FAILED"
        assert note["error_details"] == {"description": "Recipient is not reachable on this channel"}


def test_callback_retried_while_the_receiver_errors(sandbox, receiver):
    receiver.statuses = [500, 503]
    make_connector(sandbox).register_opt_out(PHONE, "req-retry")
    received = receiver.wait(3)
    assert len(received) == 3
    assert len({body for _, body in received}) == 1  # the same notification each time
    for headers, body in received:
        assert verify(CALLBACK_SECRET, body, headers[HEADER_NONCE], headers[HEADER_TIMESTAMP],
                      headers[HEADER_SIGNATURE])
    assert [c.status for c in sandbox.wait_for_callbacks(3)] == [500, 503, 200]


def test_dropped_callbacks_simulate_missing_notifications(sandbox, receiver):
    sandbox.drop_callbacks = True
    make_connector(sandbox).register_opt_out(PHONE, "req-lost")
    time.sleep(0.3)
    assert receiver.received == []
    assert len(sandbox.registrations) == 1
    assert sandbox.dropped[0]["opt_out_notification"]["request_id"] == "req-lost"


# --- tokens -----------------------------------------------------------------------------
def test_token_fetched_once_then_refreshed_before_expiry(sandbox):
    clock = FakeClock()
    conn = make_connector(sandbox, clock=clock)
    for i in range(3):
        conn.register_opt_out(PHONE, f"req-{i}")
    assert sandbox.token_requests() == 1
    [token_call] = sandbox.requests_to("^/oauth2/token$")
    assert token_call.headers["Authorization"].startswith("Basic ")
    assert b"grant_type=client_credentials" in token_call.body

    clock.now += sandbox.token_ttl - 61  # still more than 60 s left: keep it
    conn.register_opt_out(PHONE, "req-3")
    assert sandbox.token_requests() == 1
    clock.now += 2  # within 60 s of expiry: renew
    conn.register_opt_out(PHONE, "req-4")
    assert sandbox.token_requests() == 2
    first, *_, last = api_requests(sandbox)
    assert first.headers["Authorization"] != last.headers["Authorization"]


def test_concurrent_callers_share_one_token(sandbox):
    conn = make_connector(sandbox)
    errors: list[Exception] = []

    def call(i: int) -> None:
        try:
            conn.register_opt_out(PHONE, f"req-c{i}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sandbox.token_requests() == 1
    assert len(api_requests(sandbox)) == 8


def test_revoked_token_is_refreshed_once_and_the_call_retried(sandbox):
    conn = make_connector(sandbox)
    conn.register_opt_out(PHONE, "req-a")
    sandbox.revoke_tokens()
    conn.register_opt_out(PHONE, "req-b")
    assert sandbox.token_requests() == 2
    assert len(api_requests(sandbox)) == 3  # a, b refused with 401, b again


def test_persistent_401_raises_auth_failed_without_looping(sandbox):
    conn = make_connector(sandbox)
    sandbox.add_fault("POST", r":register$", 401, times=10, body={"error": {
        "code": 401, "message": "Request had invalid authentication credentials.",
        "status": "UNAUTHENTICATED", "details": []}})
    with pytest.raises(AuthFailed) as info:
        conn.register_opt_out(PHONE, "req-x")
    assert info.value.code == "UNAUTHENTICATED"
    assert "invalid authentication credentials" in str(info.value)
    assert len(api_requests(sandbox)) == 2
    assert sandbox.token_requests() == 2


def test_bad_credentials_raise_auth_failed_without_the_secret(sandbox):
    wrong = "wrong-key-secret-9f8e7d"
    conn = make_connector(sandbox, key_secret=wrong)
    with pytest.raises(AuthFailed) as info:
        conn.register_opt_out(PHONE, "req-1")
    assert wrong not in str(info.value) and wrong not in repr(info.value)
    assert "Client authentication failed" in str(info.value)
    assert info.value.status == 401
    assert api_requests(sandbox) == []
    assert sandbox.token_requests() == 1  # not retried
    with pytest.raises(AuthFailed):
        conn.check()
    make_connector(sandbox).check()  # the right key authenticates


def test_remote_error_text_is_scrubbed_of_token_and_phone(sandbox):
    conn = make_connector(sandbox)
    conn.register_opt_out(PHONE, "req-1")
    token = api_requests(sandbox)[0].headers["Authorization"].split(" ", 1)[1]
    sandbox.add_fault("POST", r":register$", 400, body={"error": {
        "code": 400, "message": f"Bad identity 14707864783 for token {token}",
        "status": "INVALID_ARGUMENT", "details": []}})
    with pytest.raises(Permanent) as info:
        conn.register_opt_out(PHONE, "req-2")
    text = str(info.value)
    assert token not in text and "14707864783" not in text
    assert "Bad identity" in text and info.value.code == "INVALID_ARGUMENT"
    assert info.value.status == 400


# --- error mapping ----------------------------------------------------------------------
def test_429_retry_after_is_honoured(sandbox):
    conn = make_connector(sandbox)
    sandbox.add_fault("POST", r":register$", 429, headers={"Retry-After": "1"}, body={"error": {
        "code": 429, "message": "Too many requests", "status": "RESOURCE_EXHAUSTED", "details": []}})
    started = time.monotonic()
    assert conn.register_opt_out(PHONE, "req-1")["request_id"] == "req-1"
    assert time.monotonic() - started >= 0.95
    assert len(api_requests(sandbox)) == 2


def test_429_with_a_long_retry_after_is_left_to_the_journal(sandbox):
    conn = make_connector(sandbox)
    sandbox.add_fault("POST", r":register$", 429, headers={"Retry-After": "120"}, body={"error": {
        "code": 429, "message": "Too many requests", "status": "RESOURCE_EXHAUSTED", "details": []}})
    with pytest.raises(RateLimited) as info:
        conn.register_opt_out(PHONE, "req-1")
    assert info.value.retry_after == 120
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert len(api_requests(sandbox)) == 1


def test_5xx_is_transient_after_short_retries(sandbox):
    conn = make_connector(sandbox)
    sandbox.add_fault("POST", r":register$", 503, times=10, body={"error": {
        "code": 503, "message": "The service is currently unavailable.", "status": "UNAVAILABLE",
        "details": []}})
    with pytest.raises(Transient) as info:
        conn.register_opt_out(PHONE, "req-1")
    assert "currently unavailable" in str(info.value) and info.value.status == 503
    assert len(api_requests(sandbox)) == 3


def test_timeout_is_transient(sandbox):
    conn = make_connector(sandbox, timeout=0.3)
    conn.check()
    sandbox.add_fault("POST", r":register$", 200, times=1, delay=0.6, body={})
    assert conn.register_opt_out(PHONE, "req-1")["request_id"] == "req-1"  # retried, then ok
    sandbox.add_fault("POST", r":register$", 200, times=3, delay=0.6, body={})
    with pytest.raises(Transient) as info:
        conn.register_opt_out(PHONE, "req-2")
    assert "Timeout" in str(info.value)


def test_sandbox_rejects_identity_with_plus_and_wrong_app(sandbox):
    import requests

    token = requests.post(f"{sandbox.url}/oauth2/token", data={"grant_type": "client_credentials"},
                          auth=(sandbox.key_id, sandbox.key_secret), timeout=5).json()
    assert token["token_type"].lower() == "bearer" and token["expires_in"] == sandbox.token_ttl
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    url = f"{sandbox.url}/v1/projects/{sandbox.project_id}/optouts:register"
    body = {"app_id": sandbox.app_id, "channels": ["WHATSAPP"], "recipient": {"identified_by": {
        "channel_identities": [{"channel": "WHATSAPP", "identity": "+14707864783"}]}}}
    resp = requests.post(url, json=body, headers=headers, timeout=5)
    assert resp.status_code == 400 and resp.json()["error"]["status"] == "INVALID_ARGUMENT"
    body["recipient"]["identified_by"]["channel_identities"][0]["identity"] = "14707864783"
    resp = requests.post(url, json={**body, "app_id": "OTHER"}, headers=headers, timeout=5)
    assert resp.status_code == 400
    resp = requests.post(url, json=body, headers=headers, timeout=5)
    assert resp.status_code == 200 and resp.json()["request_id"]  # generated when absent
    other = f"{sandbox.url}/v1/projects/other-project/optouts:register"
    assert requests.post(other, json=body, headers=headers, timeout=5).status_code == 403
