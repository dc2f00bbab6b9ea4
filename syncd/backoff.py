"""The one retry policy of the scheduled loop (deliveries, phone lookups and Sinch
registrations alike): which failures are worth another try, when to try again
(exponential backoff with jitter from tenacity, never earlier than the remote's
``Retry-After``), and when to stop (attempts and age budgets from ``retry``)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

from tenacity import wait_exponential_jitter

from connectors.errors import AuthFailed, ConnectorError, RateLimited
from syncd.config import RetryConfig


@dataclass
class _Attempt:
    attempt_number: int


@dataclass(frozen=True)
class GiveUp:
    """Why a failure ends the retries: ``kind`` is "permanent" (retrying cannot
    help), "attempts" or "age" (the budget is spent); ``prefix`` explains the latter
    two in front of the remote's own error text."""

    kind: str
    prefix: str = ""


class RetryPolicy:
    def __init__(self, retry: RetryConfig):
        self.max_attempts = retry.max_attempts
        self.max_age_hours = retry.max_age_hours
        self._wait = wait_exponential_jitter(multiplier=retry.initial_backoff_seconds,
                                             max=retry.max_backoff_seconds, jitter=retry.initial_backoff_seconds)

    def retry_at(self, attempts: int, retry_after: float | None = None) -> float:
        wait = self._wait(_Attempt(max(1, attempts)))  # type: ignore[arg-type]
        return time.time() + max(wait, retry_after or 0.0)

    def next_try(self, exc: ConnectorError, attempts: int) -> float:
        return self.retry_at(attempts, exc.retry_after if isinstance(exc, RateLimited) else None)

    def give_up(self, exc: ConnectorError, attempts: int, received_at: str | None = None) -> GiveUp | None:
        """None while another try makes sense. Credentials refused are retried too:
        an operator may fix them, and the budget still bounds the retries."""
        if not (exc.retryable or isinstance(exc, AuthFailed)):
            return GiveUp("permanent")
        if attempts >= self.max_attempts:
            return GiveUp("attempts", f"gave up after {attempts} attempts: ")
        if received_at is not None and self._age_hours(received_at) > self.max_age_hours:
            return GiveUp("age", f"gave up after {self.max_age_hours:g} h: ")
        return None

    @staticmethod
    def _age_hours(received_at: str) -> float:
        received = datetime.fromisoformat(received_at.replace("Z", "+00:00"))
        return (datetime.now(timezone.utc) - received).total_seconds() / 3600
