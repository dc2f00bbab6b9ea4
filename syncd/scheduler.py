"""One APScheduler BackgroundScheduler per process (coalesce, max_instances=1)."""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from syncd.masking import mask_text
from syncd.metrics import Metrics

log = logging.getLogger("syncd.scheduler")


class SkippedTickFilter(logging.Filter):
    """Drops APScheduler's "skipped: maximum number of running instances reached"
    warning. With ``max_instances=1`` a tick that outlasts the interval makes the next
    one skip by design (``coalesce`` runs it right after); it is not an operator's
    concern. Every other APScheduler record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in str(record.msg)


def _install_skipped_tick_filter() -> None:
    logger = logging.getLogger("apscheduler.scheduler")
    if not any(isinstance(f, SkippedTickFilter) for f in logger.filters):
        logger.addFilter(SkippedTickFilter())


class Scheduler:
    def __init__(self, metrics: Metrics | None = None):
        _install_skipped_tick_filter()
        self._sched = BackgroundScheduler(
            timezone=timezone.utc,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self.metrics = metrics
        self.stopping = threading.Event()
        self._running = 0
        self._idle = threading.Condition()

    def every(self, name: str, seconds: float, fn: Callable[[], object], *, first_after: float = 0.0) -> None:
        """Run ``fn`` every ``seconds``: now, or ``first_after`` seconds from now."""
        def job() -> None:
            with self._idle:
                if self.stopping.is_set():
                    return
                self._running += 1
            try:
                fn()
                result = "ok"
            except Exception as exc:  # one bad tick must not stop the daemon
                result = "error"
                log.error("scheduled job failed", extra={"job": name, "error": mask_text(repr(exc))})
            finally:
                with self._idle:
                    self._running -= 1
                    self._idle.notify_all()
            if self.metrics:
                self.metrics.scheduler_runs.labels(name, result).inc()

        self._sched.add_job(job, "interval", seconds=seconds, id=name, name=name,
                            next_run_time=datetime.now(timezone.utc) + timedelta(seconds=first_after))

    def start(self) -> None:
        self._sched.start()

    @property
    def running(self) -> bool:
        return bool(self._sched.running) and not self.stopping.is_set()

    def stop(self, timeout: float = 8.0) -> bool:
        """Stop scheduling; wait up to ``timeout`` for running jobs. True if they finished."""
        with self._idle:
            self.stopping.set()
        self._sched.shutdown(wait=False)
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout=timeout)
