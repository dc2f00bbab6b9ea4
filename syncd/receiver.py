"""The webhook receiver (Flask app factory): the public port.

It verifies, parses, records and answers; it does no CRM I/O. A 2xx means the
event is committed to the journal. Bad input always gets a 4xx JSON answer.
Metrics, readiness and the status page live on the admin listener
(:mod:`syncd.admin`); here those paths are a JSON 404 like any unknown path.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from syncd.consent_api import add_consent_api
from syncd.events import ConsentEvent, utcnow
from syncd.journal.base import Journal
from syncd.masking import mask_text
from syncd.metrics import Metrics
from syncd.routing import Router
from syncd.sources import BadPayload, Ignored, Source, Unauthorized

log = logging.getLogger("syncd.receiver")

_JSON_TYPES = ("application/json", "text/plain")


def _answer(doc: dict[str, Any], status: int = 200) -> Response:
    """A JSON answer built directly (one per webhook: skips Flask's JSON provider)."""
    return Response(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n", status,
                    mimetype="application/json")


def _error(status: int, message: str, **extra: Any) -> Response:
    return _answer({"error": message, "status": status, **extra}, status)


def create_app(journal: Journal, sources: dict[str, Source], router: Router, *,
               max_body_bytes: int = 1_048_576, metrics: Metrics | None = None,
               api_token: str | None = None, default_region: str = "US") -> Flask:
    app = Flask("syncd")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    metrics = metrics or Metrics()

    counters: dict[tuple[str, str], Any] = {}

    def count(source: str, outcome: str) -> None:
        counter = counters.get((source, outcome))
        if counter is None:  # label values are source names and fixed outcomes: a small, bounded set
            counter = counters[(source, outcome)] = metrics.events_received.labels(source, outcome)
        counter.inc()

    volumes: dict[str, Any] = {}

    def volume(source: str) -> Any:
        """Bytes received per enabled source (a bounded label), authenticated or not."""
        counter = volumes.get(source)
        if counter is None:
            counter = volumes[source] = metrics.body_bytes.labels(source)
        return counter

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        if status == 413:
            return _error(413, f"body larger than {max_body_bytes} bytes")
        return _error(status, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.error("unexpected error in receiver", extra={"error": mask_text(repr(exc))})
        return _error(500, "internal error; the event was not recorded, please retry")

    @app.post("/webhooks/<name>")
    def webhook(name: str):
        source = sources.get(name)
        if source is None:
            return _error(404, f"no enabled source named {name[:40]!r}")
        ctype = (request.mimetype or "").lower()
        if ctype and not (ctype in _JSON_TYPES or ctype.endswith("+json")):
            count(name, "unsupported_media_type")
            return _error(415, f"content type {ctype[:60]!r} is not JSON")
        body = request.get_data(cache=False)
        volume(name).inc(len(body))
        try:
            source.authenticate(body, request.headers, request.args)
        except Unauthorized as exc:
            count(name, "unauthorized")
            log.warning("webhook refused", extra={"source": name, "status": 401, "reason": str(exc)})
            return _error(401, str(exc))
        received_at = utcnow()
        try:
            parsed = source.parse(body, received_at)
        except BadPayload as exc:
            count(name, "bad_request")
            log.warning("webhook rejected", extra={"source": name, "status": 400, "reason": mask_text(str(exc))})
            return _error(400, str(exc))
        if isinstance(parsed, Ignored):
            count(name, "ignored")
            log.info("webhook ignored", extra={"source": name, "status": 200, "reason": parsed.reason})
            return _answer({"status": "ignored", "reason": parsed.reason})
        event: ConsentEvent = parsed
        ignored = event.details.get("ignored")
        if event.event_type == "consent" and not ignored:
            event.quarantine_reason = router.unroutable_reason(event.external_lead_id, event.phone,
                                                               event.phone_raw)
        try:
            recorded = journal.events.record(event)
        except Exception as exc:  # disk full, locked beyond the busy timeout...
            count(name, "journal_error")
            log.error("journal write failed", extra={"source": name, "error": mask_text(repr(exc))})
            return _error(503, "journal unavailable; the event was not recorded, please retry")
        if not recorded.created:
            count(name, "duplicate")
            log.info("webhook duplicate", extra={"source": name, "event_id": recorded.event_id, "status": 200})
            return _answer({"status": "duplicate", "event_id": recorded.event_id})
        for field in event.details.get("unmodelled") or ():
            # Field names come from each parser's fixed list: a small, bounded label set.
            metrics.unmodelled_values.labels(name, field).inc()
        if ignored:
            count(name, "stored_ignored")
            log.info("webhook stored, ignored", extra={"source": name, "event_id": recorded.event_id,
                                                       "status": 200, "reason": mask_text(ignored)})
            return _answer({"status": "ignored", "event_id": recorded.event_id, "reason": ignored})
        if event.quarantine_reason:
            count(name, "quarantined")
            log.warning("webhook quarantined", extra={"source": name, "event_id": recorded.event_id,
                                                      "status": 202, "reason": event.quarantine_reason})
            return _answer({"status": "quarantined", "event_id": recorded.event_id,
                            "reason": event.quarantine_reason}, 202)
        count(name, "accepted")
        log.info("webhook accepted", extra={"source": name, "event_id": recorded.event_id, "status": 200,
                                            "kind": event.kind, "channel": event.channel})
        return _answer({"status": "accepted", "event_id": recorded.event_id})

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    add_consent_api(app, journal.ledger, api_token, default_region)

    return app
