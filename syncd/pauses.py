"""CRM pauses: a spent account-wide API quota pauses the whole CRM (routing lookups,
pushes and polls alike) instead of burning every delivery's retries.

The pause lives in the journal so that every replica honours it and a restart does
not forget it. When it ends, one replica asks the CRM whether quota is back
(Salesforce's /limits) and either resumes or pauses again for ``probe_seconds``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from connectors.base import CrmConnector
from connectors.errors import ConnectorError, QuotaExhausted, RateLimited
from syncd.journal.base import Operations
from syncd.masking import mask_text

log = logging.getLogger("syncd.pusher")


@dataclass(frozen=True)
class QuotaPolicy:
    """How much of a CRM's daily API quota syncd may use (``budget_percent``) and how
    often a paused CRM's quota is checked again (``probe_seconds``)."""

    budget_percent: float = 90.0
    probe_seconds: float = 300.0


def error_text(exc: BaseException) -> str:
    return mask_text(str(exc))[:2000]


class CrmPauses:
    def __init__(self, ops: Operations, connectors: dict[str, CrmConnector],
                 quotas: dict[str, QuotaPolicy] | None = None):
        self.ops = ops
        self.connectors = connectors
        self.quotas = quotas or {}
        self.paused_since: dict[str, float] = {}  # when this process first saw each pause
        # A CRM's Retry-After holds every call of this process to it, not only the retried
        # one: a 429/503 speaks for the client, and the next batch must not hit it early.
        self.holds: dict[str, float] = {}

    def held(self, crm: str) -> float | None:
        """Until when the CRM's last Retry-After asks this process to wait, or None."""
        until = self.holds.get(crm)
        if until is not None and until > time.time():
            return until
        self.holds.pop(crm, None)
        return None

    def in_force(self, crm: str) -> float | None:
        """The time a paused (or Retry-After held) CRM may be called again, or None."""
        held = self.held(crm)
        if held is not None:
            return held
        pause = self.ops.crm_pause(crm)
        now = time.time()
        if pause is None:
            self.paused_since.pop(crm, None)
            return None
        self.paused_since.setdefault(crm, now)
        until, reason = pause
        if until > now:
            return until
        next_until = now + self.quota(crm).probe_seconds
        if not self.ops.take_pause_probe(crm, now, next_until):
            pause = self.ops.crm_pause(crm)  # another replica is checking
            return pause[0] if pause is not None and pause[0] > now else None
        return self._probe(crm, next_until, reason)

    def _probe(self, crm: str, next_until: float, reason: str | None) -> float | None:
        probe = getattr(self.connectors.get(crm), "probe_quota", None)
        if probe is not None:
            try:
                used, limit = probe()
            except ConnectorError as exc:
                log.warning("CRM still paused", extra={"crm": crm, "error": error_text(exc)})
                return next_until
            if self._over_budget(crm, used, limit):
                self._pause(crm, next_until, self._budget_reason(crm, used, limit))
                return next_until
        self.ops.resume_crm(crm)
        self.paused_since.pop(crm, None)
        log.warning("CRM resumed", extra={"crm": crm, "was": reason})
        return None

    def quota(self, crm: str) -> QuotaPolicy:
        return self.quotas.get(crm) or QuotaPolicy()

    def _over_budget(self, crm: str, used: int, limit: int) -> bool:
        return limit > 0 and used >= limit * self.quota(crm).budget_percent / 100.0

    def _budget_reason(self, crm: str, used: int, limit: int) -> str:
        return f"API budget reached: {used} of {limit} daily requests used (budget " \
               f"{self.quota(crm).budget_percent:g}%)"

    def check_budget(self, crm: str) -> None:
        """Slow down before the CRM's limit: pause at the configured share of the quota
        (read from the usage the CRM reports with every answer)."""
        usage_of = getattr(self.connectors.get(crm), "api_usage", None)
        usage = usage_of() if usage_of is not None else None
        if usage is not None and self._over_budget(crm, *usage) and self.ops.crm_pause(crm) is None:
            self._pause(crm, time.time() + self.quota(crm).probe_seconds, self._budget_reason(crm, *usage))

    def after_error(self, crm: str, exc: ConnectorError) -> None:
        """A spent daily quota (Salesforce TotalRequests) pauses the whole CRM; the CRM's
        Retry-After, when sent, sets the length, else the quota is checked again after
        ``probe_seconds``."""
        if isinstance(exc, QuotaExhausted):
            wait = exc.retry_after if exc.retry_after is not None else self.quota(crm).probe_seconds
            self._pause(crm, time.time() + wait, f"quota exhausted: {error_text(exc)}")
        elif isinstance(exc, RateLimited) and exc.retry_after is not None and exc.retry_after > 0:
            self.holds[crm] = max(self.holds.get(crm, 0.0), time.time() + exc.retry_after)

    def _pause(self, crm: str, until: float, reason: str) -> None:
        self.ops.pause_crm(crm, until, reason)
        self.paused_since.setdefault(crm, time.time())
        log.error("CRM paused", extra={"crm": crm, "until": until, "reason": reason})

    def circuit_problem(self, longer_than: float) -> str | None:
        """For /readyz: a CRM paused (open circuit) for longer than ``longer_than`` seconds
        (counted from when this process first saw the pause)."""
        now = time.time()
        for crm in self.connectors:
            pause = self.ops.crm_pause(crm)
            if pause is None:
                self.paused_since.pop(crm, None)
                continue
            since = self.paused_since.setdefault(crm, now)
            if now - since > longer_than:
                return f"{crm} paused for {now - since:.0f} s ({pause[1] or 'quota'})"
        return None
