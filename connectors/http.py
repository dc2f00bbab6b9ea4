"""HTTP plumbing shared by the requests-based connectors.

``make_session`` returns a ``requests.Session`` whose TLS trust and timeout are
fixed at start-up. requests lets ``REQUESTS_CA_BUNDLE`` override ``Session.verify``
on every call; a configured ``ca_bundle`` must win (users behind TLS-inspecting
proxies set both), so the session pins it in ``merge_environment_settings``.
"""
from __future__ import annotations

import email.utils
import re
import socket
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import requests
from tenacity import (RetryCallState, retry, retry_if_exception, stop_after_attempt,
                      wait_exponential_jitter)

from connectors.errors import (AuthFailed, ConnectorError, NotFound, Permanent, QuotaExhausted,
                               RateLimited, Transient)

USER_AGENT = "syncd/0.1 (+consent sync daemon)"


class PinnedSession(requests.Session):
    """A Session whose configured CA bundle and default timeout always apply."""

    def __init__(self, ca_bundle: str | None = None, timeout: float = 30.0):
        super().__init__()
        self.pinned_verify: str | bool | None = ca_bundle
        if ca_bundle:
            self.verify = ca_bundle
        self.default_timeout = timeout
        self.headers["User-Agent"] = USER_AGENT

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[override]
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self.pinned_verify:
            settings["verify"] = self.pinned_verify
        return settings

    def request(self, method, url, *args: Any, **kwargs: Any):  # type: ignore[override]
        kwargs.setdefault("timeout", self.default_timeout)
        return super().request(method, url, *args, **kwargs)


def make_session(ca_bundle: str | None = None, timeout: float = 30.0) -> PinnedSession:
    return PinnedSession(ca_bundle=ca_bundle, timeout=timeout)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def error_for_status(resp: requests.Response, message: str, code: str | None = None) -> ConnectorError:
    """Map an HTTP error response onto the taxonomy (message is the remote's own text)."""
    status = resp.status_code
    if status == 429:
        return RateLimited(message, retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                           code=code, status=status)
    if status in (401, 403):
        return AuthFailed(message, code=code, status=status)
    if status in (404, 410):
        return NotFound(message, code=code, status=status)
    if status == 408 or status >= 500:
        return Transient(message, code=code, status=status)
    return Permanent(message, code=code, status=status)


def wrap_transport_error(exc: requests.RequestException) -> Transient:
    """Timeouts and connection failures, naming the host and the cause in words; never
    the path, query string or credentials."""
    kind = type(exc).__name__
    url = getattr(getattr(exc, "request", None), "url", None) or ""
    parts = urlsplit(url) if url else None
    where = f" {parts.scheme}://{parts.netloc.rpartition('@')[2]}" if parts and parts.netloc else ""
    return Transient(f"{kind} talking to the remote API{where}: {transport_cause(exc)}")


def transport_cause(exc: BaseException) -> str:
    """Why a request got no HTTP answer: connection refused, DNS, TLS certificate,
    timeout (else the exception's class name). Walks the chain requests and urllib3 build."""
    if isinstance(exc, requests.exceptions.SSLError):
        found = re.search(r"certificate verify failed: ([^(')\]]+)", str(exc))
        return f"TLS certificate not trusted: {found.group(1).strip()}" if found else "TLS handshake failed"
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    seen: list[BaseException] = []
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or e in seen:
            continue
        seen.append(e)
        if isinstance(e, socket.gaierror) or "NameResolutionError" in type(e).__name__:
            return "DNS: host name not found"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        stack += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
    text = str(exc)
    if any(s in text for s in ("Name or service not known", "getaddrinfo failed", "nodename nor servname")):
        return "DNS: host name not found"
    if "Connection refused" in text:
        return "connection refused"
    return type(exc).__name__


class _WaitRetryAfter:
    """tenacity wait: honour RateLimited.retry_after, else exponential backoff with jitter."""

    def __init__(self, initial: float, maximum: float, max_retry_after: float):
        self.backoff = wait_exponential_jitter(multiplier=initial, max=maximum)
        self.max_retry_after = max_retry_after

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_retry_after)
        return self.backoff(state)


def _short_retry_ok(max_retry_after: float) -> Callable[[BaseException], bool]:
    def check(exc: BaseException) -> bool:
        if not isinstance(exc, Transient) or isinstance(exc, QuotaExhausted):
            return False  # a spent account-wide quota is the caller's to pause on
        # A server that asks for a long pause is answered by the journal's own
        # schedule, not by blocking the pusher thread.
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            return exc.retry_after <= max_retry_after
        return True
    return check


def short_retry(attempts: int = 3, initial: float = 0.5, maximum: float = 8.0,
                max_retry_after: float = 15.0):
    """Decorator for one remote call: a few quick retries of Transient errors.

    Longer outages are the journal's job (deliveries get ``next_attempt_at``), so
    this stays short and re-raises the last error for the caller to schedule.
    """
    return retry(
        retry=retry_if_exception(_short_retry_ok(max_retry_after)),
        stop=stop_after_attempt(attempts),
        wait=_WaitRetryAfter(initial, maximum, max_retry_after),
        reraise=True,
    )
