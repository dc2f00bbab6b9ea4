"""``syncd serve``: the receiver (waitress) and the scheduler in one process.

SIGTERM/SIGINT: stop accepting, let the tick in hand finish (or give its leases
back), close the journal, exit 0 - all within about 10 seconds.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

from waitress.server import create_server

from syncd.config import Config
from syncd.journal.base import JournalBusy
from syncd.receiver import create_app
from syncd.runtime import Runtime, open_runtime
from syncd.scheduler import Scheduler

log = logging.getLogger("syncd.daemon")
CIRCUIT_READY_SECONDS = 900.0  # /readyz fails once a CRM has been paused this long


class Daemon:
    def __init__(self, cfg: Config, runtime: Runtime | None = None):
        self.cfg = cfg
        self.rt = runtime or open_runtime(cfg)
        self.rt.journal.ops.acquire_serve_lock()  # raises JournalBusy
        self.scheduler = Scheduler(self.rt.metrics)
        self.scheduler.every("push", cfg.schedule.push_interval_seconds, self.rt.tick)
        for name, interval, fn in self.extra_jobs():
            self.scheduler.every(name, interval, fn)
        self.app = create_app(self.rt.journal, self.rt.sources, self.rt.router,
                              max_body_bytes=cfg.receiver.max_body_bytes, metrics=self.rt.metrics,
                              scheduler_alive=lambda: self.scheduler.running,
                              extra_ready=lambda: self.rt.pauses.circuit_problem(CIRCUIT_READY_SECONDS),
                              status_token=cfg.receiver.status_token)
        self.server: Any = create_server(self.app, host=cfg.receiver.host, port=cfg.receiver.port,
                                         threads=cfg.receiver.threads, ident="syncd",
                                         max_request_body_size=cfg.receiver.max_body_bytes * 2 + 1024)
        self._stopped = threading.Event()

    def extra_jobs(self) -> list[tuple[str, float, Any]]:
        """Jobs beyond the pusher: the reflector's CRM poll and Sinch registrations."""
        reflector = self.rt.reflector
        if reflector is None:
            return []
        return [("poll", self.cfg.schedule.poll_interval_seconds, reflector.poll_once),
                ("reflect", self.cfg.schedule.push_interval_seconds, reflector.register_due)]

    @property
    def port(self) -> int:
        return int(self.server.effective_port)

    def run(self) -> int:
        self.scheduler.start()
        log.info("syncd serving", extra={"host": self.cfg.receiver.host, "port": self.port,
                                         "sources": sorted(self.rt.sources), "crms": sorted(self.rt.connectors),
                                         "pid": os.getpid()})
        try:
            self.server.run()
        finally:
            self.shutdown()
        return 0

    def request_stop(self, *_: Any) -> None:
        """Signal handler: waitress's loop exits on SystemExit raised in the main thread."""
        if not self._stopped.is_set():
            self._stopped.set()
            log.info("shutdown requested")
            raise SystemExit(0)

    def shutdown(self) -> None:
        self.rt.stop_ticking()
        try:
            self.server.close()
        except Exception:  # already closed by waitress
            pass
        finished = self.scheduler.stop(timeout=6.0)
        released = self.rt.journal.deliveries.release_leases()
        log.info("syncd stopped", extra={"tick_finished": finished, "leases_released": released})
        if finished:
            self.rt.journal.close()


def serve(cfg: Config) -> int:
    try:
        daemon = Daemon(cfg)
    except JournalBusy as exc:
        print(f"syncd: {exc}", file=sys.stderr)
        return 3
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    code = daemon.run()
    logging.shutdown()
    # A tick stuck in a slow CRM call must not hold the process past the deadline;
    # its leases were handed back and the journal is consistent.
    os._exit(code)
