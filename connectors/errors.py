"""The shared error taxonomy every connector raises.

The daemon decides what to do from the class alone: retry later (Transient,
RateLimited), dead-letter (Permanent, NotFound) or stop and tell an operator
(AuthFailed). ``message`` carries the remote system's own error text, already
free of secrets; ``code`` is the remote error code where it has one.
"""
from __future__ import annotations


class ConnectorError(Exception):
    """Base class. ``retryable`` tells the scheduler whether a retry can help."""

    retryable = False

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __str__(self) -> str:
        parts = [p for p in (str(self.status) if self.status else None, self.code) if p]
        prefix = f"[{' '.join(parts)}] " if parts else ""
        return f"{prefix}{self.message}"


class Transient(ConnectorError):
    """Timeouts, connection errors, 5xx, row locks: the same call may succeed later."""

    retryable = True


class RateLimited(Transient):
    """429 or a quota header: retry no earlier than ``retry_after`` seconds from now."""

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None,
                 status: int | None = 429):
        super().__init__(message, code=code, status=status)
        self.retry_after = retry_after


class QuotaExhausted(RateLimited):
    """A quota for the whole account is used up (Salesforce's daily TotalRequests):
    every call fails until it refills, so the caller pauses the CRM instead of
    retrying; ``retry_after`` is the server's own hint when it sent one."""

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None,
                 status: int | None = 403):
        super().__init__(message, retry_after=retry_after, code=code, status=status)


class Permanent(ConnectorError):
    """Validation errors, malformed requests: retrying the same call cannot help."""


class NotFound(Permanent):
    """The record (or object) does not exist, or was deleted."""


class AuthFailed(ConnectorError):
    """Credentials were refused. Retrying the same call cannot help until config changes."""
