"""One APScheduler BackgroundScheduler per process (coalesce, max_instances=1)."""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from syncd.masking import mask_text
from syncd.metrics import Metrics

log = logging.getLogger("syncd.scheduler")


class Scheduler:
    def __init__(self, metrics: Metrics | None = None):
        self._sched = BackgroundScheduler(
            timezone=timezone.utc,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self.metrics = metrics
        self.stopping = threading.Event()
        self._busy = threading.Lock()
        self.last_ok: dict[str, float] = {}

    def every(self, name: str, seconds: float, fn: Callable[[], object]) -> None:
        def job() -> None:
            if self.stopping.is_set():
                return
            with self._busy:
                try:
                    fn()
                    self.last_ok[name] = time.time()
                    result = "ok"
                except Exception as exc:  # one bad tick must not stop the daemon
                    result = "error"
                    log.error("scheduled job failed", extra={"job": name, "error": mask_text(repr(exc))})
                if self.metrics:
                    self.metrics.scheduler_runs.labels(name, result).inc()

        self._sched.add_job(job, "interval", seconds=seconds, id=name, name=name,
                            next_run_time=datetime.now(timezone.utc))

    def start(self) -> None:
        self._sched.start()

    @property
    def running(self) -> bool:
        return bool(self._sched.running) and not self.stopping.is_set()

    def stop(self, timeout: float = 8.0) -> bool:
        """Stop scheduling; wait up to ``timeout`` for the running job. True if it finished."""
        self.stopping.set()
        self._sched.shutdown(wait=False)
        finished = self._busy.acquire(timeout=timeout)
        if finished:
            self._busy.release()
        return finished
