"""``syncd serve``: the receiver (waitress), the admin listener and the scheduler
in one process.

SIGTERM/SIGINT: stop accepting, let the tick in hand finish (or give its leases
back), close the journal, exit 0 - all within about 10 seconds.
"""
from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import sqlite3
import sys
import threading
from typing import Any

from syncd.admin import Readiness, create_admin_app
from syncd.compliance import ComplianceReads, watch_metrics
from syncd.config import Config, ConfigError
from syncd.http_server import serve_wsgi
from syncd.journal.base import JournalBusy
from syncd.receiver import create_app
from syncd.runtime import Runtime, open_runtime
from syncd.scheduler import Scheduler
from syncd.status_page import COMPLIANCE_KEY, CRM_HEALTH_KEY, TRACE_KEY
from syncd.trace import tracer_for

log = logging.getLogger("syncd.daemon")
CIRCUIT_READY_SECONDS = 900.0  # /readyz fails once a CRM has been paused this long
COMPLIANCE_CHECK_SECONDS = 60.0  # breaches stamped and at-risk opt-outs announced this often
ADMIN_SERVER_OPTIONS: dict[str, Any] = {
    "threads": 2,  # scrapes and the status page never take a webhook's thread
    "ident": "syncd-admin", "max_request_body_size": 16 * 1024, "asyncore_use_poll": True,
    # A TLS proxy on this host may say the browser spoke HTTPS: the status session
    # cookie then gets its Secure flag (the header can only make the cookie stricter).
    "trusted_proxy": "127.0.0.1", "trusted_proxy_headers": {"x-forwarded-proto"},
}


def public_server_options(cfg: Config) -> dict[str, Any]:
    """waitress adjustments for the webhook port (docs.pylonsproject.org/projects/waitress,
    "Arguments"). ``channel_timeout`` closes a connection that has neither sent nor
    received anything for that long, checked every ``cleanup_interval``; poll() because
    select() cannot watch descriptors above 1024."""
    r = cfg.receiver
    return {"threads": r.threads, "ident": "syncd", "max_request_body_size": r.max_body_bytes * 2 + 1024,
            "connection_limit": r.connection_limit, "channel_timeout": r.channel_timeout_seconds,
            "cleanup_interval": max(1, min(30, r.channel_timeout_seconds // 3)), "asyncore_use_poll": True}


def raise_open_file_limit(connection_limit: int) -> None:
    """Lift the soft open-file limit (often 1,024) to what ``connection_limit``
    connections can need (a connection takes up to three descriptors in waitress; two
    is the common case), within the hard limit; warn when the hard limit is lower."""
    needed = 2 * connection_limit + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("open-file limit raised", extra={"from": soft, "to": target})
    if target < needed:
        log.warning("open-file hard limit is below what receiver.connection_limit needs; raise LimitNOFILE",
                    extra={"hard_limit": hard, "needed": needed})


def freeze_startup_objects() -> None:
    """Move everything built at start-up (Flask, pydantic validators, phonenumbers'
    metadata: ~67,000 tracked objects) out of the garbage collector's reach: they live
    as long as the process, and every full collection walked them while holding the
    GIL, stalling all webhooks at once (~300 ms on a loaded 2-vCPU machine, once per few
    thousand webhooks; bench/README.md). Objects created later are collected as before."""
    gc.collect()
    gc.freeze()


def start_ingest_writer(rt: Runtime) -> Any:
    """On SQLite, webhooks are committed by a writer process of their own
    (journal/ingest_process.py: the commit off this process's GIL); PostgreSQL's
    driver waits on the network, and group commit stays in the request threads."""
    engine = rt.journal.engine
    if engine.dialect != "sqlite":
        return None
    from syncd.journal.ingest_process import IngestProcess
    from syncd.logs import current_settings

    events = rt.journal.events
    level, fmt = current_settings()
    writer = IngestProcess(getattr(engine, "path"), events.prepare, level, fmt)
    events.commit_through(writer)
    return writer


class CannotListen(Exception):
    """The receiver's address cannot be bound (in use, not local, no permission)."""


class Daemon:
    def __init__(self, cfg: Config, runtime: Runtime | None = None):
        self.cfg = cfg
        self.rt = runtime or open_runtime(cfg)
        self.rt.journal.ops.acquire_serve_lock()  # raises JournalBusy
        self.scheduler = Scheduler(self.rt.metrics)
        self.scheduler.every("push", cfg.schedule.push_interval_seconds, self.rt.tick)
        for name, interval, fn in self.extra_jobs():
            self.scheduler.every(name, interval, fn)
        if cfg.schedule.audit_interval_hours > 0:  # report-only drift sweep, first one after an interval
            audit_seconds = cfg.schedule.audit_interval_hours * 3600
            self.scheduler.every("audit", audit_seconds, self.audit_sweep().run, first_after=audit_seconds)

        if self.rt.compliance is not None:   # the deadline clock: breaches and at-risk alerts
            self.scheduler.every("compliance", COMPLIANCE_CHECK_SECONDS, self.rt.compliance.run_once)
        self.app = create_app(self.rt.journal, self.rt.sources, self.rt.router,
                              max_body_bytes=cfg.receiver.max_body_bytes, metrics=self.rt.metrics,
                              api_token=cfg.api.token, default_region=cfg.phone.default_region)
        journal_file = getattr(self.rt.journal.engine, "path", None)  # SQLite; a PostgreSQL disk is not ours
        readiness = Readiness(self.rt.journal.ops, last_commit=self.rt.journal.events.last_ingest_commit,
                              scheduler_alive=lambda: self.scheduler.running,
                              extra_ready=lambda: self.rt.pauses.circuit_problem(CIRCUIT_READY_SECONDS),
                              disk_path=journal_file.parent if journal_file else None,
                              min_free_disk_mb=cfg.admin.min_free_disk_mb)
        self.admin_app = create_admin_app(self.rt.journal.reports, self.rt.metrics, readiness,
                                          status_token=cfg.admin.status_token)
        self.admin_app.config[CRM_HEALTH_KEY] = self.rt.health.report  # the status page's CRM health
        self.admin_app.config[TRACE_KEY] = tracer_for(cfg, self.rt.journal.reports)  # the status page's search

        self._watch_compliance()
        self.server: Any = self._listen(self.app, cfg.receiver.host, cfg.receiver.port, public_server_options(cfg))
        self.admin_server: Any = self._listen(self.admin_app, cfg.admin.host, cfg.admin.port, ADMIN_SERVER_OPTIONS)
        self.ingest: Any = start_ingest_writer(self.rt)   # both ports are ours: nothing to undo past here
        self._stopped = threading.Event()

    def _listen(self, app: Any, host: str, port: int, options: dict[str, Any]) -> Any:
        """A waitress server bound to ``host:port``; a port that cannot be bound is one
        clear line for the operator (CannotListen), not a traceback."""
        try:
            return serve_wsgi(app, host=host, port=port, **options)
        except OSError as exc:
            if getattr(self, "server", None) is not None:
                self.server.close()
            self.rt.journal.close()
            reason = (exc.strerror or str(exc)).lower()
            raise CannotListen(f"cannot listen on {host}:{port}: {reason}") from None

    def _watch_compliance(self) -> None:
        """The compliance clock on ``/metrics`` and the status page."""
        check = self.rt.compliance
        if check is None:
            return
        watch_metrics(self.rt.metrics, check.clock, check.store)
        self.admin_app.config[COMPLIANCE_KEY] = ComplianceReads(check.clock, check.store)

    def extra_jobs(self) -> list[tuple[str, float, Any]]:
        """Jobs beyond the pusher: the reflector's CRM poll (whenever a CRM is enabled:
        CRM flags feed the consent ledger) and, with Sinch configured, its registrations."""
        reflector = self.rt.reflector
        if reflector is None:
            return []
        jobs = [("poll", self.cfg.schedule.poll_interval_seconds, reflector.poll_once)]
        if reflector.sinch is not None:
            jobs.append(("reflect", self.cfg.schedule.push_interval_seconds, reflector.register_due))
        return jobs

    def audit_sweep(self) -> Any:
        from syncd.audit import Auditor, AuditSweep

        return AuditSweep(Auditor(self.rt.journal, self.rt.connectors, self.rt.mappings), self.rt.metrics)

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
        freeze_startup_objects()
        self.scheduler.start()
        threading.Thread(target=self._run_admin, name="syncd-admin", daemon=True).start()
        threading.Thread(target=self.probe_crms, name="syncd-crm-probe", daemon=True).start()
        log.info("syncd serving", extra={"host": self.cfg.receiver.host, "port": self.port,
                                         "admin_host": self.cfg.admin.host,
                                         "admin_port": int(self.admin_server.effective_port),
                                         "sources": sorted(self.rt.sources), "crms": sorted(self.rt.connectors),
                                         "pid": os.getpid()})
        try:
            self.server.run()
        finally:
            self.shutdown()
        return 0

    def _run_admin(self) -> None:
        """The admin listener's own loop, so a flood on the webhook port cannot starve it."""
        try:
            self.admin_server.run()
        except (OSError, ValueError):  # its socket closed under it at shutdown
            if not self._stopped.is_set():
                log.exception("admin listener stopped")

    def request_stop(self, *_: Any) -> None:
        """Signal handler: waitress's loop exits on SystemExit raised in the main thread."""
        if not self._stopped.is_set():
            self._stopped.set()
            log.info("shutdown requested")
            raise SystemExit(0)

    def shutdown(self) -> None:
        self.rt.stop_ticking()
        self._stopped.set()
        for server in (self.server, self.admin_server):
            try:
                server.close()
            except Exception:  # already closed by waitress
                pass
        finished = self.scheduler.stop(timeout=6.0)
        released = self.rt.journal.deliveries.release_leases()
        if self.ingest is not None:
            self.ingest.close()   # the receiver is closed: the writer finishes what it holds and exits
        if self.rt.alerts is not None:
            self.rt.alerts.close(timeout=2.0)  # post what is queued, briefly
        log.info("syncd stopped", extra={"tick_finished": finished, "leases_released": released})
        if finished:
            self.rt.journal.close()


def serve(cfg: Config) -> int:
    """Exit 2 with one line for an operator's mistake (config, mapping, journal, port);
    3 when another ``serve`` holds the journal."""
    raise_open_file_limit(cfg.receiver.connection_limit)
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
