"""The admin listener (Flask app factory): ``/metrics``, ``/readyz``, ``/status``
and ``/healthz``, served on ``admin.host``/``admin.port``, apart from the public
webhook port.

Nothing here may slow the webhooks down: the journal gauges behind ``/metrics``
are read at most every few seconds (:class:`syncd.metrics.CachedRead`), as are the status page's, and
``/readyz`` writes no probe of its own while webhooks are committing anyway.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from flask import Flask, Response, jsonify
from flask.templating import Environment
from werkzeug.exceptions import HTTPException

from syncd.masking import mask_text
from syncd.metrics import CachedRead, Metrics
from syncd.status_page import register_status_page

log = logging.getLogger("syncd.admin")

GAUGE_MAX_AGE_SECONDS = 5.0   # journal gauges in /metrics are at most this old
STATUS_MAX_AGE_SECONDS = 2.0  # the status page's journal reads are at most this old
LEDGER_COUNTS_MAX_AGE_SECONDS = 30.0  # the consent ledger's size by state on the status page
PROBE_MAX_AGE_SECONDS = 10.0  # /readyz writes at most one probe per this, none while webhooks commit


class Readiness:
    """Is this process fit to take traffic? Cheap enough to be polled every second.

    The journal counts as writable when a webhook commit succeeded in the last
    ``PROBE_MAX_AGE_SECONDS`` and none failed since (``last_commit``: the events
    store's ``last_ingest_commit``); otherwise one write probe (``ops.healthcheck()``)
    answers, and its result is reused for that long. Free disk space is one
    ``statvfs`` call.
    """

    def __init__(self, ops: Any, *, last_commit: Callable[[], tuple[float, float]] | None = None,
                 scheduler_alive: Callable[[], bool] | None = None,
                 extra_ready: Callable[[], str | None] | None = None,
                 disk_path: Path | None = None, min_free_disk_mb: int = 0,
                 probe_max_age: float = PROBE_MAX_AGE_SECONDS):
        self.ops = ops
        self.last_commit = last_commit
        self.scheduler_alive = scheduler_alive
        self.extra_ready = extra_ready
        self.disk_path = disk_path
        self.min_free_disk_mb = min_free_disk_mb
        self.probe_max_age = probe_max_age
        self._lock = threading.Lock()
        self._probed_at = 0.0
        self._probe_problem: str | None = None
        self._disk_was_low = False

    def problems(self) -> list[str]:
        found = [p for p in (self._journal_problem(), self._disk_problem()) if p]
        if self.scheduler_alive is not None and not self.scheduler_alive():
            found.append("scheduler not running")
        if self.extra_ready is not None:
            extra = self.extra_ready()
            if extra:
                found.append(extra)
        return found

    def _journal_problem(self) -> str | None:
        now = time.monotonic()
        if self.last_commit is not None:
            ok_at, failed_at = self.last_commit()
            if ok_at > failed_at and now - ok_at < self.probe_max_age:
                return None
        if not self._lock.acquire(blocking=False):  # a probe is running: its last answer stands
            return self._probe_problem
        try:
            if self._probed_at == 0.0 or now - self._probed_at >= self.probe_max_age:
                try:
                    self.ops.healthcheck()
                    self._probe_problem = None
                except Exception as exc:
                    self._probe_problem = f"journal not writable: {mask_text(type(exc).__name__)}"
                self._probed_at = time.monotonic()
            return self._probe_problem
        finally:
            self._lock.release()

    def _disk_problem(self) -> str | None:
        if not self.min_free_disk_mb or self.disk_path is None:
            return None
        try:
            free_mb = shutil.disk_usage(self.disk_path).free // (1024 * 1024)
        except OSError as exc:
            return f"free disk space unknown: {type(exc).__name__}"
        low = free_mb < self.min_free_disk_mb
        if low != self._disk_was_low:  # log the change, not every poll
            self._disk_was_low = low
            (log.warning if low else log.info)(
                "free disk space low" if low else "free disk space recovered",
                extra={"free_mb": free_mb, "min_free_disk_mb": self.min_free_disk_mb})
        if low:
            return f"free disk space {free_mb} MB is below admin.min_free_disk_mb ({self.min_free_disk_mb} MB)"
        return None


class StatusReads:
    """The status page's reads of the reports store, each remembered for ``max_age``
    seconds: however often the page is reloaded, the journal is read at most once per interval."""

    def __init__(self, reports: Any, max_age: float = STATUS_MAX_AGE_SECONDS):
        self._reports = reports
        self._max_age = max_age
        self.counts = CachedRead(reports.counts, max_age)
        self.dead_letters = CachedRead(reports.dead_letters, max_age)
        # A scan of the ledger's state index (~0.1-0.3 s at 1,000,000 entries): read less often.
        self.ledger_counts = CachedRead(reports.ledger_counts, max(max_age, LEDGER_COUNTS_MAX_AGE_SECONDS))
        self._recent: dict[int, CachedRead] = {}
        self._stats: tuple[str, CachedRead] | None = None  # (since, read): the charts' window moves hourly

    def recent_activity(self, limit: int = 50) -> Any:
        read = self._recent.get(limit)
        if read is None:
            read = self._recent.setdefault(
                limit, CachedRead(lambda: self._reports.recent_activity(limit), self._max_age))
        return read()

    def trace(self, query: Any, deadline: Any = None) -> Any:
        """The status page's search: read fresh each time (never cached)."""
        return self._reports.trace(query, deadline)

    def page_stats(self, since: str) -> Any:
        if self._stats is None or self._stats[0] != since:
            self._stats = (since, CachedRead(lambda: self._reports.page_stats(since), self._max_age))
        return self._stats[1]()


class _TemplatesCompiledOnce(Environment):
    """Flask's ``render_template_string`` compiles its source on every call (about 50 ms
    for the status page on a busy 2-core machine, all of it holding the GIL the webhook
    threads need). The pages' sources are module constants: compile each once."""

    def from_string(self, source: Any, globals: Any = None, template_class: Any = None) -> Any:
        if globals is not None or template_class is not None or not isinstance(source, str):
            return super().from_string(source, globals, template_class)
        compiled = self._compiled.get(source)
        if compiled is None:
            compiled = self._compiled[source] = super().from_string(source)
        return compiled

    @property
    def _compiled(self) -> dict[str, Any]:
        cache = self.__dict__.get("_compiled_sources")
        if cache is None:
            cache = self.__dict__["_compiled_sources"] = {}
        return cache


class _AdminFlask(Flask):
    jinja_environment = _TemplatesCompiledOnce


def create_admin_app(reports: Any, metrics: Metrics, readiness: Readiness, *,
                     status_token: str | None = None) -> Flask:
    """``reports``: the journal's reports store (gauges and the status page)."""
    app = _AdminFlask("syncd.admin")
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024  # only the status login form is ever posted
    app.json.sort_keys = False  # type: ignore[attr-defined]
    metrics.watch_journal(reports.counts, max_age_seconds=GAUGE_MAX_AGE_SECONDS)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        return jsonify({"error": exc.description or exc.name, "status": status}), status

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.error("unexpected error on the admin listener", extra={"error": mask_text(repr(exc))})
        return jsonify({"error": "internal error", "status": 500}), 500

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        problems = readiness.problems()
        if problems:
            return jsonify({"status": "not ready", "problems": problems}), 503
        return jsonify({"status": "ready"})

    @app.get("/metrics")
    def metrics_view():
        return Response(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    register_status_page(app, StatusReads(reports), status_token)
    return app
