"""Operator alerts to a Slack-compatible incoming webhook (``alerts.webhook_url``).

A message is ``{"text": ..., "attachments": [{"fallback", "color", "fields": [{"title",
"value", "short"}]}]}``: Slack's incoming-webhook ``text`` plus its legacy message
attachment fields (https://api.slack.com/reference/messaging/attachments#fields; field
shape as in @slack/types ``MessageAttachmentField``), which Mattermost and Rocket.Chat
also render. A top-level ``syncd`` object carries the same facts for machine readers.

Alerts never hold up the pipeline: callers only enqueue (a bounded queue; when it is
full the alert is dropped and logged), one background thread posts with a timeout,
and a failed post is logged, never raised. Each cause (a CRM failing, one CRM's kind of
dead letter, ...) sends at most one message per ``cooldown`` seconds. Every text is
masked (phones, emails, secrets) before it leaves the process.
"""
from __future__ import annotations

import logging
import queue
import re
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from connectors.http import make_session
from syncd.masking import mask_text, register_secrets

log = logging.getLogger("syncd.alerts")

COLORS = {"dead_letter": "danger", "crm_failing": "danger", "crm_recovered": "good", "at_risk": "warning"}


def _cause_of(error: str) -> str:
    """What makes two dead letters "the same cause": the bracketed status/code the
    connectors put first (``[400 FIELD_CUSTOM_VALIDATION_EXCEPTION]``), else the text
    with numbers and ids blurred."""
    found = re.match(r"\s*(?:[a-z_]+: )?\[([^\]]+)\]", error)
    if found:
        return found.group(1)
    return re.sub(r"[0-9A-Za-z]*\d[0-9A-Za-z]*", "#", error)[:120]


class Alerts:
    def __init__(self, webhook_url: str, *, cooldown_seconds: float = 3600.0, timeout: float = 10.0,
                 max_queued: int = 100, ca_bundle: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        register_secrets([webhook_url])  # an incoming-webhook URL is a credential
        self.url = webhook_url
        self.where = urlsplit(webhook_url).hostname or "webhook"
        self.cooldown = cooldown_seconds
        self.clock = clock
        self.session = make_session(ca_bundle, timeout)
        self.sent = 0
        self.suppressed = 0
        self.failed = 0
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=max_queued)
        self._thread = threading.Thread(target=self._run, name="syncd-alerts", daemon=True)
        self._thread.start()

    # --- what the pipeline reports ------------------------------------------------------
    def dead_letter(self, letter_id: str, crm: str | None, obj: str | None, record_id: str | None,
                    error: str) -> bool:
        where = f"{crm}:{obj}:{record_id}" if crm else "(unrouted)"
        return self.notify(f"dead_letter:{crm}:{_cause_of(error)}", "dead_letter",
                           f"syncd: a delivery was dead-lettered ({where}): {error}",
                           {"dead letter": letter_id, "crm": crm or "-", "record": where, "error": error,
                            "replay": f"syncd replay {letter_id}"})

    def crm_failing(self, crm: str, error: str) -> bool:
        return self.notify(f"crm_failing:{crm}", "crm_failing", f"syncd: {crm} is failing: {error}",
                           {"crm": crm, "error": error})

    def crm_recovered(self, crm: str, down_seconds: float) -> bool:
        return self.notify(f"crm_recovered:{crm}", "crm_recovered",
                           f"syncd: {crm} recovered after {down_seconds:.0f} s",
                           {"crm": crm, "failing for": f"{down_seconds:.0f} s"})

    def opt_out_at_risk(self, event_id: int, deadline: str, pending: list[str]) -> bool:
        """Hook for the compliance check: an opt-out close to its legal deadline."""
        return self.notify(f"at_risk:{event_id}", "at_risk",
                           f"syncd: opt-out event {event_id} is at risk: not honoured everywhere, "
                           f"deadline {deadline}", {"event": str(event_id), "deadline": deadline,
                                                    "pending": ", ".join(pending) or "-"})

    # --- plumbing -------------------------------------------------------------------------
    def notify(self, cause: str, kind: str, text: str, fields: dict[str, Any]) -> bool:
        """Queue one message unless ``cause`` sent one within the cooldown. Never blocks."""
        now = self.clock()
        with self._lock:
            last = self._last.get(cause)
            if last is not None and now - last < self.cooldown:
                self.suppressed += 1
                return False
            self._last[cause] = now
        text = mask_text(text)
        masked = {k: mask_text(str(v)) for k, v in fields.items()}
        message = {
            "text": text,
            "attachments": [{"fallback": text, "color": COLORS.get(kind, "warning"),
                             "fields": [{"title": k, "value": v, "short": len(v) <= 40}
                                        for k, v in masked.items()]}],
            "syncd": {"kind": kind, **{k.replace(" ", "_"): v for k, v in masked.items()}},
        }
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            log.warning("alert dropped: queue full", extra={"kind": kind})
            return False
        return True

    def _run(self) -> None:
        while True:
            message = self._queue.get()
            try:
                if message is None:
                    return
                self._post(message)
            finally:
                self._queue.task_done()

    def _post(self, message: dict[str, Any]) -> None:
        try:
            resp = self.session.post(self.url, json=message)
        except Exception as exc:  # noqa: BLE001 - an alert must never take the daemon down
            self.failed += 1
            log.warning("alert not delivered", extra={"to": self.where, "kind": message["syncd"]["kind"],
                                                      "error": type(exc).__name__})
            return
        if resp.status_code >= 300:
            self.failed += 1
            log.warning("alert refused", extra={"to": self.where, "kind": message["syncd"]["kind"],
                                                "status": resp.status_code, "answer": mask_text(resp.text[:200])})
            return
        self.sent += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued was posted (or failed). True if it was."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 3.0) -> None:
        self.flush(timeout)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
