"""Sinch simulator: the OAuth2 token endpoint, Conversation API opt-out/opt-in
registration, and the signed OPT_OUT / OPT_IN callbacks that follow.

Like the real service, registration answers at once with the registered request
and the outcome arrives later on the webhook, so tests can exercise the daemon's
asynchronous join on ``request_id``, failed outcomes, and notifications that
never come (``drop_callbacks``).
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import requests
from flask import Flask, Response, request

from connectors.sandbox.base import Sandbox
from connectors.sinch_signing import signature_headers

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_STATUS_SUFFIXES = ("SUCCEEDED", "FAILED", "STATUS_UNSPECIFIED")
_MSISDN_RE = re.compile(r"^[1-9][0-9]{6,14}$")


def ulid() -> str:
    """A ULID-shaped id (Sinch ids look like ``01FJA8B4A7BM43YGWSG9GBV067``)."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def _contact_id(identity: str) -> str:
    """A stable contact id per identity, as Sinch keeps one contact per recipient."""
    digest = int.from_bytes(hashlib.sha256(identity.encode()).digest()[:16], "big")
    return "01" + "".join(_CROCKFORD[(digest >> s) & 31] for s in range(115, -1, -5))


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _error(status: int, grpc_status: str, message: str) -> Response:
    """Conversation API error shape (google.rpc.Status inside ``error``)."""
    body = {"error": {"code": status, "message": message, "status": grpc_status, "details": []}}
    return Response(json.dumps(body), status=status, content_type="application/json")


def _loopback_only(url: str) -> str:
    """The simulator posts signed test data; it must never leave this machine."""
    host = urlsplit(url).hostname or ""
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError
        except ValueError:
            raise ValueError("sandbox callback_url must point at a loopback address") from None
    return url


@dataclass
class CallbackAttempt:
    """One POST of a notification to the callback URL (``status`` None: no answer)."""

    url: str
    body: bytes
    headers: dict[str, str]
    attempt: int
    status: int | None
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


class SinchSandbox(Sandbox):
    """``POST /oauth2/token`` and ``POST /v1/projects/<project>/{optouts,optins}:register``."""

    name = "sinch"
    https = False

    def __init__(self, project_id: str = "sandbox-project", app_id: str = "SANDBOXAPP",
                 key_id: str = "sandbox-key-id", key_secret: str = "sandbox-key-secret",
                 token_ttl: int = 3600, callback_url: str | None = None,
                 callback_secret: str | None = None, callback_attempts: int = 3,
                 callback_backoff: float = 0.2):
        self.project_id = project_id
        self.app_id = app_id
        self.key_id = key_id
        self.key_secret = key_secret
        self.token_ttl = token_ttl
        self._callback_url = _loopback_only(callback_url) if callback_url else None
        self.callback_secret = callback_secret
        self.callback_attempts = callback_attempts
        self.callback_backoff = callback_backoff
        self.drop_callbacks = False
        self.tokens: dict[str, float] = {}  # token -> expiry (epoch seconds)
        self.registrations: list[dict[str, Any]] = []
        self.callbacks: list[CallbackAttempt] = []
        self.dropped: list[dict[str, Any]] = []
        self.outcomes: dict[str, tuple[str, str | None]] = {}  # identity -> (suffix, reason)
        self._callback_done = threading.Condition()
        self._closing = threading.Event()
        super().__init__()

    # --- test controls ----------------------------------------------------------------
    @property
    def callback_url(self) -> str | None:
        return self._callback_url

    @callback_url.setter
    def callback_url(self, url: str | None) -> None:
        self._callback_url = _loopback_only(url) if url else None

    def set_outcome(self, phone: str, status: str, error_description: str | None = None) -> None:
        """Make notifications for ``phone`` report ``status`` (SUCCEEDED, FAILED,
        STATUS_UNSPECIFIED, or a full OPT_OUT_* / OPT_IN_* name) with ``error_details``."""
        suffix = status.upper().removeprefix("OPT_OUT_").removeprefix("OPT_IN_")
        if suffix not in _STATUS_SUFFIXES:
            raise ValueError(f"status must be one of {_STATUS_SUFFIXES}")
        with self.lock:
            self.outcomes[phone.lstrip("+")] = (suffix, error_description)

    def reset(self) -> None:
        """Forget everything a previous test did (tokens, log, faults, outcomes, callbacks)."""
        with self.lock:
            for bucket in (self.requests, self.faults, self.registrations, self.dropped):
                bucket.clear()
            self.tokens.clear()
            self.outcomes.clear()
            self.drop_callbacks = False
        with self._callback_done:
            self.callbacks.clear()

    def revoke_tokens(self) -> None:
        """Invalidate every issued token, as an expiry or key rotation would."""
        with self.lock:
            self.tokens.clear()

    def token_requests(self) -> int:
        return len(self.requests_to(r"^/oauth2/token$", "POST"))

    def wait_for_callbacks(self, count: int, timeout: float = 5.0) -> list[CallbackAttempt]:
        """Block until ``count`` callback attempts have been made (or timeout)."""
        deadline = time.monotonic() + timeout
        with self._callback_done:
            while len(self.callbacks) < count and time.monotonic() < deadline:
                self._callback_done.wait(max(0.0, deadline - time.monotonic()))
            return list(self.callbacks)

    def start(self, *args: Any, **kwargs: Any) -> "SinchSandbox":
        self._closing.clear()
        super().start(*args, **kwargs)
        return self

    def stop(self) -> None:
        self._closing.set()  # pending callback retries give up instead of outliving the test
        super().stop()

    # --- routes -----------------------------------------------------------------------
    def routes(self, app: Flask) -> None:
        # sinch/sinch-sdk-python sinch/domains/authentication/endpoints/v1/oauth.py:
        # POST {auth origin}/oauth2/token, basic auth, grant_type=client_credentials.
        @app.post("/oauth2/token")
        def token():
            auth = request.authorization
            if (auth is None or auth.type != "basic"
                    or not secrets.compare_digest(auth.username or "", self.key_id)
                    or not secrets.compare_digest(auth.password or "", self.key_secret)):
                body = {"error": "invalid_client",
                        "error_description": "Client authentication failed."}
                return Response(json.dumps(body), status=401, content_type="application/json",
                                headers={"WWW-Authenticate": 'Basic realm="sinch"'})
            if request.form.get("grant_type") != "client_credentials":
                body = {"error": "unsupported_grant_type",
                        "error_description": "Only client_credentials is supported."}
                return Response(json.dumps(body), status=400, content_type="application/json")
            value = secrets.token_urlsafe(32)
            with self.lock:
                self.tokens[value] = time.time() + self.token_ttl
            return {"access_token": value, "expires_in": self.token_ttl, "scope": "",
                    "token_type": "Bearer"}

        # The Opt-in & Opt-out page (the seed document) and sinch/sinch-sdk-python v1.1.4
        # sinch/domains/conversation/endpoints/opt_out.py / opt_in.py (?request_id= in the
        # query; the answer is {"request_id", "opt_out"|"opt_in"}). Error bodies follow
        # google.rpc.Status; their texts are assumed.
        @app.post("/v1/projects/<project>/optouts:register")
        def opt_out(project: str):
            return self._register("opt_out", project)

        @app.post("/v1/projects/<project>/optins:register")
        def opt_in(project: str):
            return self._register("opt_in", project)

    def _authorized(self) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return False
        with self.lock:
            expiry = self.tokens.get(header[len("Bearer "):])
        return expiry is not None and expiry > time.time()

    def _register(self, kind: str, project: str) -> Response:
        if not self._authorized():
            return _error(401, "UNAUTHENTICATED",
                          "Request had invalid authentication credentials. "
                          "Expected OAuth 2 access token or other valid authentication credential.")
        if project != self.project_id:
            return _error(403, "PERMISSION_DENIED", "Permission denied on the requested project.")
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            return _error(400, "INVALID_ARGUMENT", "Invalid JSON payload.")
        problem = self._invalid(data)
        if problem:
            return _error(400, "INVALID_ARGUMENT", problem)
        # request_id is read from the query only, as the official SDK sends it
        # (sinch-sdk-python v1.1.4, conversation/endpoints/opt_out.py). What Sinch does
        # with one in the body is undocumented; the simulator ignores it, so an outcome
        # then carries an id Sinch made up, as a client that puts it there would see.
        request_id = request.args.get("request_id") or ulid()
        contact_id = data["recipient"].get("contact_id")
        identities = [] if contact_id else data["recipient"]["identified_by"]["channel_identities"]
        registration = {
            "kind": kind, "request_id": request_id, "app_id": data["app_id"],
            "channels": list(data["channels"]), "contact_id": contact_id,
            "identities": [{"channel": ci["channel"], "identity": ci["identity"]}
                           for ci in identities],
            "at": time.time(),
        }
        with self.lock:
            self.registrations.append(registration)
        echoed = {k: data[k] for k in ("app_id", "channels", "recipient", "processing_strategy")
                  if k in data}
        threading.Thread(target=self._notify, args=(registration,), daemon=True,
                         name="sandbox-sinch-callback").start()
        return Response(json.dumps({"request_id": request_id, kind: echoed}), status=200,
                        content_type="application/json")

    def _invalid(self, data: dict[str, Any]) -> str | None:
        """The reason a register body is refused, or None."""
        if data.get("app_id") != self.app_id:
            return "app_id is not a valid app of this project."
        channels = data.get("channels")
        if not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels):
            return "channels must be a non-empty list of channel names."
        recipient = data.get("recipient")
        if not isinstance(recipient, dict):
            return "recipient is required."
        contact_id = recipient.get("contact_id")
        if contact_id:
            return None if isinstance(contact_id, str) else "contact_id must be a string."
        identified = recipient.get("identified_by")
        identities = identified.get("channel_identities") if isinstance(identified, dict) else None
        if not isinstance(identities, list) or not identities:
            return "recipient needs contact_id or identified_by.channel_identities."
        for ci in identities:
            if not isinstance(ci, dict) or not isinstance(ci.get("channel"), str):
                return "each channel identity needs a channel."
            identity = ci.get("identity")
            if not isinstance(identity, str) or not _MSISDN_RE.fullmatch(identity):
                return "identity must be an MSISDN of digits only, without '+'."
        return None

    # --- callbacks --------------------------------------------------------------------
    def _notify(self, registration: dict[str, Any]) -> None:
        kind = registration["kind"]
        prefix = "OPT_OUT" if kind == "opt_out" else "OPT_IN"
        targets = registration["identities"] or [
            {"channel": ch, "identity": ""} for ch in registration["channels"]]
        for target in targets:
            identity = target["identity"]
            with self.lock:
                suffix, reason = self.outcomes.get(identity, ("SUCCEEDED", None))
            accepted = _now_iso()
            envelope = {
                "app_id": registration["app_id"],
                "project_id": self.project_id,
                "accepted_time": accepted,
                "event_time": accepted,
                "message_metadata": "",
                "correlation_id": "",
                # Fields as the official SDKs model the notification (sinch-sdk-java
                # OptOutEventNotificationImpl, sinch-sdk-node opt-out-event.ts);
                # error_details only when the registration failed, as Sinch omits
                # unset fields.
                f"{kind}_notification": {
                    "request_id": registration["request_id"],
                    "contact_id": registration["contact_id"] or _contact_id(identity),
                    "channel": target["channel"],
                    "identity": identity,
                    "status": f"{prefix}_{suffix}",
                    "processing_mode": "CONVERSATION",
                    **({"error_details": {"description": reason}} if reason else {}),
                },
            }
            url, secret = self.callback_url, self.callback_secret
            if self.drop_callbacks or not url or not secret:
                with self.lock:
                    self.dropped.append(envelope)
                continue
            self._deliver(url, secret, json.dumps(envelope, separators=(",", ":")).encode())

    def _deliver(self, url: str, secret: str, body: bytes) -> None:
        """POST one notification, retrying on no answer, 429 or 5xx like Sinch does.

        Each attempt is signed afresh (new nonce and timestamp) over the same body,
        so a receiver's freshness window holds across retries.
        """
        with requests.Session() as http:
            http.trust_env = False  # loopback callbacks never go through a proxy
            for attempt in range(1, self.callback_attempts + 1):
                if self._closing.is_set():
                    return
                headers = {"Content-Type": "application/json",
                           **signature_headers(secret, body, ulid(), str(int(time.time())))}
                try:
                    status: int | None = http.post(url, data=body, headers=headers,
                                                   timeout=5).status_code
                except requests.RequestException:
                    status = None
                with self._callback_done:
                    self.callbacks.append(CallbackAttempt(url, body, headers, attempt, status,
                                                          time.time()))
                    self._callback_done.notify_all()
                if status is not None and status < 500 and status != 429:
                    return
                self._closing.wait(self.callback_backoff * (2 ** (attempt - 1)))


__all__ = ["SinchSandbox", "CallbackAttempt", "ulid"]
