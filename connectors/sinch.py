"""Sinch Conversation API client: register WhatsApp (or other channel) opt-outs and opt-ins.

Used by the reflector to mirror do-not-contact flags set inside a CRM back to
Sinch. Registration is asynchronous on Sinch's side: the POST answers with the
registered request, and the real outcome arrives later as an OPT_OUT / OPT_IN
callback carrying the ``request_id`` sent here, which is how the journal joins
the two. ``request_id`` is a query parameter (``?request_id=``), not a body field:
the official Python SDK's register endpoints send it so and strip it from the body
(sinch/sinch-sdk-python v1.1.4, sinch/domains/conversation/endpoints/opt_out.py and
opt_in.py, ``build_query_params`` / ``request_body``). Authentication is OAuth2
client credentials against ``auth_url``.

Per Sinch, the opt-in/opt-out service is documented for WhatsApp only and a
registration does not by itself stop sending: consent management lists
(OPT_OUT_ALL ...) on the app do. A notification with ``*_STATUS_UNSPECIFIED``
means the channel does not support registration.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Callable, Iterable

import requests

from connectors.errors import AuthFailed, ConnectorError, Permanent, Transient
from connectors.http import error_for_status, make_session, short_retry, wrap_transport_error

log = logging.getLogger(__name__)

ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
E164_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")
CHANNEL_RE = re.compile(r"^[A-Z][A-Z_]{0,31}$")
REQUEST_ID_MAX = 128
TOKEN_REFRESH_MARGIN = 60.0  # seconds before expiry at which a cached token is renewed
_DIGIT_RUN_RE = re.compile(r"\+?\d{7,}")
_MAX_MESSAGE = 300


def _mask_digits(text: str) -> str:
    """Mask phone-like digit runs: Sinch error text may echo the recipient identity."""
    return _DIGIT_RUN_RE.sub(lambda m: "*" * (len(m.group()) - 2) + m.group()[-2:], text)


class SinchConnector:
    """A small typed client for ``optouts:register`` / ``optins:register``.

    Thread-safe: one instance serves every pusher/reflector thread and shares the
    cached token. Errors are the shared taxonomy, carrying Sinch's own
    ``error.message`` / ``error.status`` with secrets, tokens and phone digits removed.
    """

    name = "sinch"

    def __init__(self, base_url: str, auth_url: str, project_id: str, app_id: str,
                 key_id: str, key_secret: str, channels: Iterable[str] = ("WHATSAPP",),
                 ca_bundle: str | None = None, timeout: float = 30.0, *,
                 clock: Callable[[], float] = time.monotonic):
        for label, value in (("project_id", project_id), ("app_id", app_id)):
            # Both end up in the URL or body; a strict pattern keeps path tricks out.
            if not isinstance(value, str) or not ID_RE.fullmatch(value):
                raise ValueError(f"sinch {label} must match {ID_RE.pattern}")
        for label, url in (("base_url", base_url), ("auth_url", auth_url)):
            if not isinstance(url, str) or not re.match(r"^https?://[^\s/]+", url):
                raise ValueError(f"sinch {label} must be an http(s) URL")
        if not key_id or not key_secret:
            raise ValueError("sinch key_id and key_secret are required")
        self.base_url = base_url.rstrip("/")
        self.auth_url = auth_url
        self.project_id = project_id
        self.app_id = app_id
        self.channels = self._check_channels(channels, error=ValueError)
        self._key_id = key_id
        self._key_secret = key_secret
        self._session = make_session(ca_bundle=ca_bundle, timeout=timeout)
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._token_expires_at = 0.0

    def __repr__(self) -> str:
        return f"SinchConnector(base_url={self.base_url!r}, project_id={self.project_id!r})"

    # --- public API -------------------------------------------------------------------
    def register_opt_out(self, phone_e164: str, request_id: str,
                         channels: Iterable[str] | None = None) -> dict[str, Any]:
        """Register an opt-out; returns the registered request as Sinch echoes it."""
        return self._register("optouts:register", phone_e164, request_id, channels)

    def register_opt_in(self, phone_e164: str, request_id: str,
                        channels: Iterable[str] | None = None) -> dict[str, Any]:
        """Register an opt-in (only for an explicit, newer opt-in event)."""
        return self._register("optins:register", phone_e164, request_id, channels)

    def check(self) -> None:
        """Authenticate with a fresh token (for ``syncd check``); raises on failure."""
        short_retry()(self._fetch_token)()

    # --- registration -----------------------------------------------------------------
    def _register(self, action: str, phone_e164: str, request_id: str,
                  channels: Iterable[str] | None) -> dict[str, Any]:
        # Validation happens before any I/O: a bad value is the event's fault and
        # must go to dead letters, never to Sinch.
        if not isinstance(phone_e164, str) or not E164_RE.fullmatch(phone_e164):
            raise Permanent("phone is not an E.164 number (+ and 7-15 digits)")
        if (not isinstance(request_id, str) or not request_id or len(request_id) > REQUEST_ID_MAX
                or not request_id.isprintable()):
            raise Permanent(f"request_id must be 1-{REQUEST_ID_MAX} printable characters")
        chosen = self.channels if channels is None else self._check_channels(channels, Permanent)
        identity = phone_e164[1:]  # Sinch channel identities are MSISDNs without "+"
        body = {
            "app_id": self.app_id,
            "channels": list(chosen),
            "recipient": {"identified_by": {"channel_identities": [
                {"channel": ch, "identity": identity} for ch in chosen]}},
        }
        params = {"request_id": request_id}
        url = f"{self.base_url}/v1/projects/{self.project_id}/{action}"
        refreshed = False

        def attempt() -> dict[str, Any]:
            nonlocal refreshed
            token = self._get_token()
            resp = self._post_api(url, token, body, params)
            if resp.status_code == 401 and not refreshed:
                # An expired or revoked token: renew once per call, never in a loop.
                refreshed = True
                self._invalidate(token)
                resp = self._post_api(url, self._get_token(), body, params)
            if resp.status_code >= 400:
                raise self._api_error(resp)
            try:
                data = resp.json()
            except ValueError:
                data = None
            return data if isinstance(data, dict) else {}

        return short_retry()(attempt)()

    def _post_api(self, url: str, token: str, body: dict[str, Any],
                  params: dict[str, str]) -> requests.Response:
        try:
            return self._session.post(url, json=body, params=params, headers={
                "Authorization": f"Bearer {token}", "Accept": "application/json"})
        except requests.RequestException as exc:
            raise wrap_transport_error(exc) from None

    @staticmethod
    def _check_channels(channels: Iterable[str], error: type[Exception]) -> tuple[str, ...]:
        chosen = (channels,) if isinstance(channels, str) else tuple(channels)
        if not chosen or not all(isinstance(c, str) and CHANNEL_RE.fullmatch(c) for c in chosen):
            raise error("sinch channels must be a non-empty list like ['WHATSAPP']")
        return chosen

    # --- OAuth2 token -----------------------------------------------------------------
    def _get_token(self) -> str:
        """The cached token, renewed ``TOKEN_REFRESH_MARGIN`` seconds before it expires.

        The lock is held across the fetch so concurrent callers wait for one
        request instead of each asking the auth server for a token.
        """
        with self._lock:
            if self._token is None or self._clock() >= self._token_expires_at - TOKEN_REFRESH_MARGIN:
                self._fetch_token_locked()
            assert self._token is not None
            return self._token

    def _fetch_token(self) -> str:
        with self._lock:
            self._fetch_token_locked()
            assert self._token is not None
            return self._token

    def _invalidate(self, token: str) -> None:
        with self._lock:
            if self._token == token:  # another thread may have renewed it already
                self._token = None

    def _fetch_token_locked(self) -> None:
        started = self._clock()
        try:
            resp = self._session.post(self.auth_url, data={"grant_type": "client_credentials"},
                                      auth=(self._key_id, self._key_secret),
                                      headers={"Accept": "application/json"})
        except requests.RequestException as exc:
            raise wrap_transport_error(exc) from None
        if resp.status_code >= 400:
            message, code = self._remote_message(resp)
            if resp.status_code in (400, 401, 403):
                # Refused credentials or grant: a config problem, not the event's.
                raise AuthFailed(f"Sinch token request refused: {message}", code=code,
                                 status=resp.status_code)
            raise error_for_status(resp, f"Sinch token request failed: {message}", code)
        try:
            data = resp.json()
        except ValueError:
            data = None
        token = data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise Transient("Sinch token response has no access_token")
        try:
            expires_in = float(data.get("expires_in", 3600))
        except (TypeError, ValueError):
            expires_in = 3600.0
        self._token = token
        self._token_expires_at = started + expires_in
        log.debug("sinch access token renewed, valid for %.0f s", expires_in)

    # --- errors -----------------------------------------------------------------------
    def _api_error(self, resp: requests.Response) -> ConnectorError:
        message, code = self._remote_message(resp)
        return error_for_status(resp, message, code)

    def _remote_message(self, resp: requests.Response) -> tuple[str, str | None]:
        """Sinch's own error text and status name, whatever shape the body has.

        Conversation API: ``{"error": {"code", "message", "status", "details"}}``;
        the auth server: OAuth2 ``{"error", "error_description"}``; some gateways:
        problem+json ``{"title", "detail"}``.
        """
        try:
            data = resp.json()
        except ValueError:
            data = None
        message: str | None = None
        code: str | None = None
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict):
                message, code = err.get("message"), err.get("status")
            elif isinstance(err, str):
                message, code = data.get("error_description") or err, err
            elif data.get("detail") or data.get("title"):
                message = data.get("detail") or data.get("title")
        if not isinstance(message, str) or not message.strip():
            message = f"HTTP {resp.status_code} from Sinch"
        return self._scrub(message), (self._scrub(code)[:64] if isinstance(code, str) else None)

    def _scrub(self, text: str) -> str:
        for secret in (self._key_secret, self._token):
            if secret:
                text = text.replace(secret, "***")
        return _mask_digits(text.strip())[:_MAX_MESSAGE]
