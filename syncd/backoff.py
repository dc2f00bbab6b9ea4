"""When to try a failed delivery again: exponential backoff with jitter (tenacity's
wait strategy), never earlier than the remote's ``Retry-After``."""
from __future__ import annotations

import time
from dataclasses import dataclass

from tenacity import wait_exponential_jitter


@dataclass
class _Attempt:
    attempt_number: int


class Backoff:
    def __init__(self, initial: float, maximum: float):
        self._wait = wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        wait = self._wait(_Attempt(max(1, attempts)))  # type: ignore[arg-type]
        return max(wait, retry_after or 0.0)

    def retry_at(self, attempts: int, retry_after: float | None = None) -> float:
        return time.time() + self.delay(attempts, retry_after)
