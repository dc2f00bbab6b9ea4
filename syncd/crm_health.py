"""What syncd saw of each CRM's calls (routing lookups and pushes alike): for the
status page's health table and the failing / recovered alerts."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable

from connectors.errors import ConnectorError
from syncd.alerts import Alerts
from syncd.journal.base import Operations
from syncd.pauses import error_text

log = logging.getLogger("syncd.pusher")

FAILING_AFTER = 3  # consecutive failed calls before a CRM counts as failing (and alerts)


@dataclass
class CrmHealth:
    """What was seen of one CRM."""
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failing_since: float | None = None   # first call of the current run of failures
    consecutive_failures: int = 0
    alerted: bool = False                # a "failing" alert went out; recovery will say so


class CrmHealthBook:
    def __init__(self, ops: Operations, crms: Iterable[str], alerts: Alerts | None = None):
        self.ops = ops
        self.crms = list(crms)
        self.alerts = alerts
        self.health: dict[str, CrmHealth] = {}

    def observe(self, crm: str, exc: ConnectorError | None) -> None:
        """Track each whole CRM call: ``FAILING_AFTER`` failures in a row make the CRM
        failing (logged, alerted once); the next success is its recovery."""
        health = self.health.setdefault(crm, CrmHealth())
        now = time.time()
        if exc is None:
            if health.alerted:
                down = now - (health.failing_since or now)
                log.warning("CRM recovered", extra={"crm": crm, "failing_seconds": round(down, 1)})
                if self.alerts is not None:
                    self.alerts.crm_recovered(crm, down)
            health.last_success, health.consecutive_failures = now, 0
            health.failing_since, health.alerted = None, False
            return
        health.last_error, health.last_error_at = error_text(exc), now
        if health.consecutive_failures == 0:
            health.failing_since = now
        health.consecutive_failures += 1
        if health.consecutive_failures >= FAILING_AFTER and not health.alerted:
            health.alerted = True
            log.error("CRM failing", extra={"crm": crm, "failures": health.consecutive_failures,
                                            "error": health.last_error})
            if self.alerts is not None:
                self.alerts.crm_failing(crm, health.last_error)

    def report(self) -> dict[str, dict[str, Any]]:
        """Per CRM, for the status page: epoch seconds (or None) and the last error text."""
        now = time.time()
        report: dict[str, dict[str, Any]] = {}
        for crm in sorted(set(self.crms) | set(self.health)):
            h = self.health.get(crm, CrmHealth())
            pause = self.ops.crm_pause(crm)
            paused = pause[0] if pause is not None else None
            report[crm] = {"last_success": h.last_success, "last_error": h.last_error,
                           "last_error_at": h.last_error_at,
                           "failing_since": h.failing_since if h.consecutive_failures else None,
                           "consecutive_failures": h.consecutive_failures,
                           "paused_until": paused if paused and paused > now else None}
        return report
