"""``syncd serve``: the receiver (waitress) and the scheduler in one process.

SIGTERM/SIGINT: stop accepting, let the tick in hand finish (or give its leases
back), close the journal, exit 0 - all within about 10 seconds.
"""
from __future__ import annotations

import logging
import os
import signal
import sqlite3
import sys
import threading
from typing import Any

from waitress.server import create_server

from syncd.config import Config, ConfigError
from syncd.journal.base import JournalBusy
from syncd.receiver import create_app
from syncd.runtime import Runtime, open_runtime
from syncd.scheduler import Scheduler
from syncd.status_page import CRM_HEALTH_KEY

log = logging.getLogger("syncd.daemon")
CIRCUIT_READY_SECONDS = 900.0  # /readyz fails once a CRM has been paused this long


class CannotListen(Exception):
    """The receiver's address cannot be bound (in use, not local, no permission)."""


class Daemon:
    def __init__(self, cfg: Config, runtime: Runtime | None = None):
        self.cfg = cfg
        self.rt = runtime or open_runtime(cfg)
        acquire = getattr(self.rt.journal, "acquire_serve_lock", None)
        if acquire is not None:
            acquire()  # raises JournalBusy
        self.scheduler = Scheduler(self.rt.metrics)
        self.scheduler.every("push", cfg.schedule.push_interval_seconds, self.rt.pusher.run_once)
        for name, interval, fn in self.extra_jobs():
            self.scheduler.every(name, interval, fn)
        self.app = create_app(self.rt.journal, self.rt.sources, self.rt.router,
                              max_body_bytes=cfg.receiver.max_body_bytes, metrics=self.rt.metrics,
                              scheduler_alive=lambda: self.scheduler.running,
                              extra_ready=lambda: self.rt.pusher.circuit_problem(CIRCUIT_READY_SECONDS),
                              status_token=cfg.receiver.status_token)
        self.app.config[CRM_HEALTH_KEY] = self.rt.pusher.health_report  # the status page's CRM health
        try:
            self.server: Any = create_server(self.app, host=cfg.receiver.host, port=cfg.receiver.port,
                                             threads=cfg.receiver.threads, ident="syncd",
                                             max_request_body_size=cfg.receiver.max_body_bytes * 2 + 1024)
        except OSError as exc:
            self.rt.journal.close()
            reason = (exc.strerror or str(exc)).lower()
            raise CannotListen(f"cannot listen on {cfg.receiver.host}:{cfg.receiver.port}: {reason}") from None
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

    def probe_crms(self) -> None:
        """At start, log each CRM whose URL does not answer (config key, URL, cause:
        refused, DNS, certificate, timeout) or that refuses the credentials (one
        read-only field-metadata call); runs beside the receiver, never stops it."""
        from connectors.errors import AuthFailed, ConnectorError
        from connectors.http import make_session
        from syncd.check import connection_cause, crm_credentials, crm_endpoints
        from syncd.masking import mask_text

        session = make_session(self.cfg.http.ca_bundle, min(self.cfg.http.timeout_seconds, 15.0))
        for crm, connector in sorted(self.rt.connectors.items()):
            causes = [(key, url, connection_cause(session, url)) for key, url in crm_endpoints(self.cfg, crm)]
            for key, url, cause in causes:
                if cause:
                    log.error("CRM unreachable", extra={"crm": crm, "key": key, "url": url, "cause": cause})
            objects = list(self.rt.mappings[crm].objects) if crm in self.rt.mappings else []
            if any(cause for _, _, cause in causes) or not objects:
                continue
            try:
                connector.fields(objects[0])
            except AuthFailed as exc:
                key, url = crm_credentials(self.cfg, crm)
                log.error("CRM refused the credentials", extra={"crm": crm, "key": key, "url": url,
                                                                "cause": mask_text(str(exc))})
            except ConnectorError:
                pass  # other failures show in the pusher's own log lines and health

    def run(self) -> int:
        self.scheduler.start()
        threading.Thread(target=self.probe_crms, name="syncd-crm-probe", daemon=True).start()
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
        self.rt.pusher.stopping.set()
        try:
            self.server.close()
        except Exception:  # already closed by waitress
            pass
        finished = self.scheduler.stop(timeout=6.0)
        released = self.rt.journal.release_leases()
        if self.rt.pusher.alerts is not None:
            self.rt.pusher.alerts.close(timeout=2.0)  # post what is queued, briefly
        log.info("syncd stopped", extra={"tick_finished": finished, "leases_released": released})
        if finished:
            self.rt.journal.close()


def serve(cfg: Config) -> int:
    """Exit 2 with one line for an operator's mistake (config, mapping, journal, port);
    3 when another ``serve`` holds the journal."""
    try:
        daemon = Daemon(cfg)
    except JournalBusy as exc:
        print(f"syncd: {exc}", file=sys.stderr)
        return 3
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"syncd: config error: {line}", file=sys.stderr)
        return 2
    except CannotListen as exc:
        print(f"syncd: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError, sqlite3.Error) as exc:
        from syncd.masking import mask_text

        print(f"syncd: cannot start: {mask_text(str(exc))}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    code = daemon.run()
    logging.shutdown()
    # A tick stuck in a slow CRM call must not hold the process past the deadline;
    # its leases were handed back and the journal is consistent.
    os._exit(code)
