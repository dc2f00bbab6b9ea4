"""A read-only status page at ``GET /status``, for operators.

Served on the admin listener; off unless ``admin.status_token`` is set. Scripts
send ``Authorization: Bearer <token>``; a browser signs in once with the form at
``/status/login`` (POST), which sets a session cookie: HttpOnly, SameSite=Strict,
Secure when the request came over HTTPS, holding a signed timestamp (never the
token). Tokens are compared in constant time and never accepted in the URL, where
proxies and histories would keep them. A wrong or missing token gets a 401 JSON
answer (a browser is sent to the login form instead).

The page is plain server-rendered HTML with no JavaScript. It shows the journal's
counts (with the consent ledger's size by state), each CRM's health, two inline SVG
charts (:mod:`syncd.status_charts`), the newest consent events with each target's delivery state and CRM error, and the dead
letters. Wide tables scroll inside their own box, so the page fits 390 px phones.
Every value is autoescaped (error texts come from CRMs), and
no phone, email or message text is queried or shown, except on the search's
``GET /status/trace?q=`` (:func:`_trace_view`): the person the admin typed is shown
in full, anyone found with them masked. Error texts were masked when
they were written to the journal; they are masked again here in case an older row
was not.
"""
from __future__ import annotations

import hmac
import logging
from datetime import datetime, timezone
from typing import Any, Protocol

from flask import Flask, Response, current_app, jsonify, redirect, render_template_string, request
from itsdangerous import BadSignature, TimestampSigner
from werkzeug.wrappers import Response as BaseResponse  # what redirect() returns

from syncd.masking import mask_email, mask_phone, mask_text

log = logging.getLogger("syncd.status_page")

RECENT_EVENTS = 50
MAX_DEAD_LETTERS = 500  # the page stays small; `syncd dead-letters` lists them all

SESSION_COOKIE = "syncd_status"
SESSION_SECONDS = 8 * 3600  # a signed-in browser asks again after a working day

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class StatusJournal(Protocol):
    def counts(self) -> dict[str, Any]: ...
    def recent_activity(self, limit: int = 50) -> list[dict[str, Any]]: ...
    def dead_letters(self) -> list[dict[str, Any]]: ...
    def ledger_counts(self) -> dict[str, int]: ...


def register_status_page(app: Flask, journal: StatusJournal, token: str | None) -> None:
    """Add ``GET /status`` and its login/logout to ``app`` when ``token`` is set; do
    nothing otherwise (the paths then get the app's JSON 404)."""
    if not token:
        return
    expected = token.encode("utf-8")
    # The cookie is a timestamp signed with a key derived from the token: rotating the
    # token ends every session, and the cookie reveals nothing about the token.
    signer = TimestampSigner(token, salt="syncd.status-session")

    def answer(resp: BaseResponse, status: int) -> tuple[BaseResponse, int]:
        resp.headers.update(SECURITY_HEADERS)
        return resp, status

    def token_matches(supplied: str) -> bool:
        return hmac.compare_digest(supplied.encode("utf-8"), expected)

    def signed_in() -> bool:
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie:
            return False
        try:
            signer.unsign(cookie, max_age=SESSION_SECONDS)
        except BadSignature:  # also an expired one
            return False
        return True

    def refused(reason: str) -> tuple[BaseResponse, int]:
        log.warning("status page refused", extra={"status": 401, "reason": reason})
        resp = jsonify({"error": f"{reason}: send Authorization: Bearer <token>, or sign in at /status/login "
                                 "(?token= is not accepted)", "status": 401})
        resp.headers["WWW-Authenticate"] = 'Bearer realm="syncd status"'
        return answer(resp, 401)

    def gate() -> tuple[BaseResponse, int] | None:
        """None when the request may see the page; else the answer that refuses it."""
        bearer = _bearer_token()
        if bearer is not None:  # a script: the header, when sent, decides
            if not token_matches(bearer):
                return refused("wrong status token")
        elif not signed_in():
            if _wants_html():
                return answer(redirect("/status/login", 303), 303)
            return refused("missing status token")
        return None

    def status_page() -> tuple[BaseResponse, int]:
        return gate() or render_page()

    def trace_page() -> tuple[BaseResponse, int]:
        refusal = gate()
        if refusal:
            return refusal
        html, status = render_trace(journal, request.args.get("q", ""))
        return answer(Response(html, content_type="text/html; charset=utf-8"), status)

    def login_form() -> tuple[BaseResponse, int]:
        return login_page("", 200)

    def login() -> tuple[BaseResponse, int]:
        supplied = request.form.get("token", "")
        if not supplied or not token_matches(supplied.strip()):
            log.warning("status login refused", extra={"status": 401, "reason": "wrong status token"})
            return login_page("That token is not the status token.", 401)
        resp = redirect("/status", 303)
        resp.set_cookie(SESSION_COOKIE, signer.sign(b"status").decode("ascii"), path="/status",
                        httponly=True, samesite="Strict", secure=request.is_secure)
        log.info("status login", extra={"status": 303})
        return answer(resp, 303)

    def logout() -> tuple[BaseResponse, int]:
        resp = redirect("/status/login", 303)
        resp.delete_cookie(SESSION_COOKIE, path="/status", httponly=True, samesite="Strict",
                           secure=request.is_secure)
        return answer(resp, 303)

    def login_page(message: str, status: int) -> tuple[BaseResponse, int]:
        html = render_template_string(LOGIN_PAGE, message=message)
        return answer(Response(html, content_type="text/html; charset=utf-8"), status)

    def render_page() -> tuple[BaseResponse, int]:
        try:
            counts = journal.counts()
            activity = journal.recent_activity(RECENT_EVENTS)
            letters = journal.dead_letters()
            extras = _extras(journal, counts)
            extras.update(_compliance_panel())
            ledger = journal.ledger_counts()
        except Exception as exc:  # journal locked beyond its timeout, database down...
            log.error("status page could not read the journal", extra={"error": mask_text(repr(exc))})
            return answer(jsonify({"error": "journal unavailable, please retry", "status": 503}), 503)
        html = render_template_string(
            PAGE,
            generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            counts=counts,
            oldest=_age(counts.get("oldest_pending_age_seconds")),
            crms=sorted((counts.get("crms") or {}).items()),
            rows=[_activity_row(r) for r in activity],
            recent_events=RECENT_EVENTS,
            letters=[_letter_row(r) for r in letters[:MAX_DEAD_LETTERS]],
            letters_total=len(letters),
            ledger=ledger,
            **extras,
        )
        return answer(Response(html, content_type="text/html; charset=utf-8"), 200)

    app.add_url_rule("/status", "status_page", status_page, methods=["GET"])
    app.add_url_rule("/status/trace", "status_trace", trace_page, methods=["GET"])
    app.add_url_rule("/status/login", "status_login_form", login_form, methods=["GET"])
    app.add_url_rule("/status/login", "status_login", login, methods=["POST"])
    app.add_url_rule("/status/logout", "status_logout", logout, methods=["POST"])


def _bearer_token() -> str | None:
    """The token of an ``Authorization: Bearer`` header, if one is sent."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _wants_html() -> bool:
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


LOGIN_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>syncd status: sign in</title>
<style>
body { font: 14px/1.4 system-ui, "Liberation Sans", Arial, sans-serif; margin: 1.5em; color: #1b1f24; }
h1 { font-size: 1.5em; margin: 0 0 .6em; }
label { display: block; margin: 0 0 .6em; }
input { font: inherit; padding: .3em; width: 24em; max-width: 100%; }
p.error { color: #82071e; font-weight: 600; }
</style>
</head>
<body>
<h1>syncd status</h1>
{% if message %}<p class="error" id="login-error">{{ message }}</p>{% endif %}
<form method="post" action="/status/login">
<label for="token">Status token (<code>admin.status_token</code>)</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
</form>
</body>
</html>
"""


# The daemon puts its pusher's per-CRM health report here (a callable); without it
# the health table shows what the journal knows.
CRM_HEALTH_KEY = "SYNCD_CRM_HEALTH"


# The daemon puts a :class:`syncd.compliance.ComplianceReads` here; without it the
# page has no compliance panel.
COMPLIANCE_KEY = "SYNCD_COMPLIANCE"


def _compliance_panel() -> dict[str, Any]:
    """The compliance panel's numbers and at-risk rows (ids, times, CRM names: no
    personal data), or ``compliance=None`` when the clock is not wired."""
    reads = current_app.config.get(COMPLIANCE_KEY)
    if reads is None:
        return {"compliance": None}
    summary = reads.summary()
    rows = [{"event_id": _text(r["event_id"]), "source": _text(r["source"]), "kind": _text(r["kind"]),
             "channel": _text(r["channel"]), "received_at": _time(r["received_at"]),
             "deadline": _time(r["deadline"]), "pending": mask_text(", ".join(r["pending"]) or _text(r["status"]))}
            for r in reads.at_risk()]
    return {"compliance": {"open": summary["open"], "at_risk": summary["at_risk"], "breached": summary["breached"],
                           "oldest": _age(summary["oldest_open_age_seconds"]), "rows": rows,
                           "limit": reads.limit, "business_days": reads.clock.business_days,
                           "warn_business_days": reads.clock.warn_business_days}}


def _extras(journal: Any, counts: dict[str, Any]) -> dict[str, Any]:
    from syncd.status_charts import page_extras

    return page_extras(journal, current_app.config.get(CRM_HEALTH_KEY), counts.get("crms") or {})



def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _time(value: Any) -> str:
    """``2026-12-02T14:03:42.810536Z`` -> ``2026-12-02 14:03:42Z``: narrower columns."""
    text = _text(value)
    if len(text) >= 19 and text[10:11] == "T":
        return f"{text[:10]} {text[11:19]}Z"
    return text


def _error(value: Any) -> str:
    return mask_text(_text(value))


def _target(crm: Any, obj: Any, record_id: Any) -> str:
    return ":".join(_text(p) for p in (crm, obj, record_id)) if crm else ""


def _age(seconds: Any) -> str:
    if seconds is None:
        return "none"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _event_fields(r: dict[str, Any]) -> dict[str, str]:
    """The columns every row shows: the event, its target and the attempts so far."""
    return {
        "event_id": _text(r.get("event_id")),
        "source": _text(r.get("source")),
        "event_kind": _text(r.get("kind")),
        "channel": _text(r.get("channel")),
        "received_at": _time(r.get("received_at")),
        "target": _target(r.get("crm"), r.get("object"), r.get("record_id")),
        "attempts": _text(r.get("attempts")),
    }


def _activity_row(r: dict[str, Any]) -> dict[str, str]:
    """One event x target row; an event with no target yet is one row of its own,
    whose state is the event's (unrouted or quarantined)."""
    has_delivery = r.get("delivery_id") is not None
    if has_delivery:
        state, error = _text(r.get("state")), _error(r.get("error"))
    else:
        status = _text(r.get("event_status"))
        state, error = ("unrouted" if status == "new" else status), _error(r.get("event_reason"))
    return {
        **_event_fields(r),
        "kind": "delivery" if has_delivery else "event",
        "delivery_id": _text(r.get("delivery_id")),
        "record_id": _text(r.get("record_id")),
        "state": state,
        "delivered_at": _time(r.get("delivered_at")),
        "error": error,
    }


def _letter_row(r: dict[str, Any]) -> dict[str, str]:
    return {
        **_event_fields(r),
        "id": _text(r.get("id")),
        "type": _text(r.get("type")),
        "error": _error(r.get("error")),
    }


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>syncd status</title>
<style>
body { font: 14px/1.4 system-ui, "Liberation Sans", Arial, sans-serif; margin: 1.5em; color: #1b1f24; }
h1 { font-size: 1.5em; margin: 0 0 .2em; }
h2 { font-size: 1.15em; margin: 1.6em 0 .5em; }
h3 { font-size: 1em; margin: 1em 0 .4em; color: #57606a; }
p.meta { color: #57606a; margin: 0 0 1em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.id, td.target, td.time { font-family: ui-monospace, "Liberation Mono", monospace; font-size: 12px; }
td.time { white-space: nowrap; }
td.error { min-width: 16em; max-width: 36em; overflow-wrap: anywhere; color: #82071e; }
.scroll { overflow-x: auto; max-width: 100%; }
svg.chart { display: block; width: 100%; max-width: 900px; height: auto; }
.health-ok td.state { color: #116329; font-weight: 600; }
.health-failing td.state, .health-paused td.state { color: #82071e; font-weight: 600; }
@media (max-width: 600px) {
  body { margin: .6em; font-size: 13px; }
  th, td { padding: .25em .4em; }
}
.state-done td.state { color: #116329; font-weight: 600; }
.state-dead td.state, .status-quarantined td.state { color: #82071e; font-weight: 600; }
.state-pending td.state, .status-unrouted td.state { color: #7d4e00; }
tr.dead-letter td.id { font-weight: 600; }
p.empty { color: #57606a; font-style: italic; }
form.search label { display: block; margin: 0 0 .3em; }
p.error { color: #82071e; font-weight: 600; }
form.search input { font: inherit; padding: .3em; width: 24em; max-width: 100%; box-sizing: border-box; }
div.trace-event .scroll + .scroll { margin-top: .4em; }


td.alarm { color: #82071e; font-weight: 600; }
</style>
</head>
<body>
<h1>syncd status</h1>
<p class="meta">Read-only. Generated {{ generated_at }}; reload for fresh numbers.</p>

<section id="search">
<h2>Trace a person</h2>
<form method="get" action="/status/trace" class="search">
<label for="q">Phone (any format), email, CRM record id or event id</label>
<input id="q" name="q" type="search" maxlength="254" required autocomplete="off">
<button type="submit">Trace</button>
</form>
</section>

<section id="counts">
<h2>Counts</h2>
<div class="scroll">
<table class="counts">
<tr><th>Deliveries</th>
<td>pending <span data-count="deliveries-pending">{{ counts.deliveries.pending }}</span></td>
<td>retrying <span data-count="deliveries-retrying">{{ counts.deliveries.retrying }}</span></td>
<td>done <span data-count="deliveries-done">{{ counts.deliveries.done }}</span></td>
<td>dead <span data-count="deliveries-dead">{{ counts.deliveries.dead }}</span></td></tr>
<tr><th>Events</th>
<td>received <span data-count="events-received">{{ counts.events.received }}</span></td>
<td>unrouted <span data-count="events-unrouted">{{ counts.events.unrouted }}</span></td>
<td>quarantined <span data-count="quarantined">{{ counts.quarantined }}</span></td>
<td>oldest pending <span data-count="oldest-pending">{{ oldest }}</span></td></tr>
<tr><th>Reflections to Sinch</th>
<td>pending <span data-count="reflections-pending">{{ counts.reflections.pending }}</span></td>
<td>done <span data-count="reflections-done">{{ counts.reflections.done }}</span></td>
<td>failed <span data-count="reflections-failed">{{ counts.reflections.failed }}</span></td>
<td></td></tr>
<tr class="ledger"><th>Consent ledger</th>
<td>opted out <span data-count="ledger-opted-out">{{ ledger.opted_out }}</span></td>
<td>opted in <span data-count="ledger-opted-in">{{ ledger.opted_in }}</span></td>
<td colspan="2">entries per phone or email and channel</td></tr>
{% for name, info in crms %}
<tr class="crm" data-crm="{{ name }}"><th>{{ name }}</th>
<td colspan="2">last push <span class="time">{{ info.last_push_at or "never" }}</span></td>
<td colspan="2">last poll <span class="time">{{ info.last_poll_at or "never" }}</span></td></tr>
{% endfor %}
</table>
</div>
</section>

{% if compliance %}
<section id="compliance">
<h2>Compliance clock</h2>
<p class="meta">Each opt-out is due by the end of the {{ compliance.business_days }}th business day after it arrived;
at risk with {{ compliance.warn_business_days }} business day(s) or fewer left.</p>
<div class="scroll">
<table class="compliance">
<tr><th>Opt-outs</th>
<td>open <span data-count="compliance-open">{{ compliance.open }}</span></td>
<td class="{{ 'alarm' if compliance.at_risk else '' }}">at risk <span data-count="compliance-at-risk">{{ compliance.at_risk }}</span></td>
<td class="{{ 'alarm' if compliance.breached else '' }}">breached <span data-count="compliance-breached">{{ compliance.breached }}</span></td>
<td>oldest open <span data-count="compliance-oldest">{{ compliance.oldest }}</span></td></tr>
</table>
</div>
{% if compliance.rows %}
<h3>At risk{% if compliance.rows|length >= compliance.limit %} (the oldest {{ compliance.limit }}){% endif %}</h3>
<div class="scroll">
<table class="at-risk">
<thead><tr><th>Event</th><th>Source</th><th>Kind</th><th>Channel</th><th>Received</th><th>Deadline</th>
<th>Waiting for</th></tr></thead>
<tbody>
{% for r in compliance.rows %}
<tr class="at-risk-row" data-event="{{ r.event_id }}">
<td class="id num">{{ r.event_id }}</td><td>{{ r.source }}</td><td>{{ r.kind }}</td><td>{{ r.channel }}</td>
<td class="time">{{ r.received_at }}</td><td class="time deadline">{{ r.deadline }}</td><td class="target">{{ r.pending }}</td></tr>
{% endfor %}
</tbody>
</table>
</div>
{% endif %}
</section>
{% endif %}

<section id="health">
<h2>CRM health</h2>
{% if health %}
<div class="scroll">
<table class="health">
<thead><tr><th>CRM</th><th>State</th><th>Last success</th><th>Last error</th><th>Failing since</th>
<th>Next attempt</th><th>Paused until</th></tr></thead>
<tbody>
{% for h in health %}
<tr class="health-row health-{{ h.state }}" data-crm="{{ h.crm }}">
<td>{{ h.crm }}</td><td class="state">{{ h.state }}</td><td class="time">{{ h.last_success or "never" }}</td>
<td class="error">{{ h.last_error }}{% if h.last_error_at %} <span class="time">({{ h.last_error_at }})</span>{% endif %}</td>
<td class="time">{{ h.failing_since }}</td><td class="time">{{ h.next_attempt }}</td><td class="time">{{ h.paused_until }}</td></tr>
{% endfor %}
</tbody>
</table>
</div>
{% else %}
<p class="empty">No CRM enabled.</p>
{% endif %}
</section>

<section id="charts">
<h2>Last 7 days</h2>
<h3>Events received per hour</h3>
{{ events_chart }}
<h3>Time to honour an opt-out, per CRM</h3>
{{ honour_chart }}
</section>

<section id="recent">
<h2>Recent events and deliveries <small>(newest {{ recent_events }} events)</small></h2>
{% if rows %}
<div class="scroll">
<table class="activity">
<thead><tr><th>Event</th><th>Source</th><th>Kind</th><th>Channel</th><th>Received</th>
<th>Target (crm:object:record)</th><th>State</th><th>Attempts</th><th>Delivered</th><th>Error</th></tr></thead>
<tbody>
{% for r in rows %}
{% if r.kind == "delivery" %}
<tr class="delivery state-{{ r.state }}" data-delivery="{{ r.delivery_id }}" data-event="{{ r.event_id }}" data-record="{{ r.record_id }}">
{% else %}
<tr class="event status-{{ r.state }}" data-event="{{ r.event_id }}">
{% endif %}
<td class="id num">{{ r.event_id }}</td><td>{{ r.source }}</td><td>{{ r.event_kind }}</td><td>{{ r.channel }}</td>
<td class="time">{{ r.received_at }}</td><td class="target">{{ r.target }}</td><td class="state">{{ r.state }}</td>
<td class="num">{{ r.attempts }}</td><td class="time">{{ r.delivered_at }}</td><td class="error">{{ r.error }}</td></tr>
{% endfor %}
</tbody>
</table>
</div>
{% else %}
<p class="empty">No events yet.</p>
{% endif %}
</section>

<section id="dead-letters">
<h2>Dead letters <small>({{ letters_total }})</small></h2>
{% if letters %}
{% if letters_total > letters|length %}
<p class="meta">Showing the first {{ letters|length }} of {{ letters_total }}; <code>syncd dead-letters</code> lists them all.</p>
{% endif %}
<div class="scroll">
<table class="dead-letters">
<thead><tr><th>Id</th><th>Type</th><th>Event</th><th>Source</th><th>Kind</th><th>Channel</th><th>Received</th>
<th>Target (crm:object:record)</th><th>Attempts</th><th>Error</th></tr></thead>
<tbody>
{% for d in letters %}
<tr class="dead-letter type-{{ d.type }}" data-id="{{ d.id }}">
<td class="id">{{ d.id }}</td><td>{{ d.type }}</td><td class="num">{{ d.event_id }}</td><td>{{ d.source }}</td>
<td>{{ d.event_kind }}</td><td>{{ d.channel }}</td><td class="time">{{ d.received_at }}</td>
<td class="target">{{ d.target }}</td><td class="num">{{ d.attempts }}</td><td class="error">{{ d.error }}</td></tr>
{% endfor %}
</tbody>
</table>
</div>
<p class="meta">Re-queue with <code>syncd replay ID</code> once the cause is fixed.</p>
{% else %}
<p class="empty">No dead letters.</p>
{% endif %}
</section>
</body>
</html>
"""


# --- the search: GET /status/trace?q= (the `syncd trace` view) ---------------------------
# The daemon puts its configured tracer here (phone region, routing rules, compliance
# clock: syncd.trace.tracer_for); without it, a tracer with the defaults reads the journal.
TRACE_KEY = "SYNCD_TRACE"
MAX_TRACE_EVENTS = 200  # the page stays small; `syncd trace` lists them all


def render_trace(journal: Any, text: str) -> tuple[str, int]:
    """The trace page for ``text``: 200 with the story (or "nothing found"), 400 with
    the reason for a query that is no phone, email or id, 503 when the journal cannot
    be read. Never a 5xx for what the admin typed."""
    from syncd.trace import BadQuery, Tracer, found_anything

    tracer = current_app.config.get(TRACE_KEY) or Tracer(journal)
    view: dict[str, Any] = {"q": text, "message": "", "trace": None}
    status = 200
    if text.strip():
        try:
            query = tracer.parse(text)
        except BadQuery as exc:
            view["message"], status = str(exc), 400
        else:
            try:
                doc = tracer.read(query)
            except Exception as exc:  # journal locked beyond its timeout, database down...
                log.error("status page could not trace", extra={"error": mask_text(repr(exc))})
                view["message"], status = "The journal could not be read; please retry.", 503
            else:
                if found_anything(doc):
                    view["trace"] = _trace_view(doc, {t for t in (query.phone, query.email) if t})
                else:
                    view["message"] = "Nothing found: no event, consent entry or registration in Sinch."
    html = render_template_string(TRACE_PAGE, style=_PAGE_STYLE, max_events=MAX_TRACE_EVENTS, **view)
    return html, status


def _shown(identity: Any, typed: set[str]) -> str:
    """The person the admin typed in full; anyone else found with them masked, as the
    rest of the page shows no personal data."""
    text = _text(identity)
    if text in typed:
        return text
    return (mask_email(text) if "@" in text else mask_phone(text)) or ""


def _trace_view(doc: dict[str, Any], typed: set[str]) -> dict[str, Any]:
    events = doc["events"]
    return {
        "consent": [{"identity": _shown(c["identity"], typed), "channel": _text(c["channel"]),
                     "state": _text(c["state"]), "since": _time(c["since"]), "source": _text(c["source"])}
                    for c in doc["consent"]],
        "events_total": len(events),
        "events": [{
            "event_id": _text(e["event_id"]), "source": _text(e["source"]), "kind": _text(e["kind"]),
            "channel": _text(e["channel"]), "raw_channel": _text(e.get("raw_channel")),
            "status": _text(e.get("status")), "status_reason": _error(e.get("status_reason")),
            "occurred_at": _time(e["occurred_at"]), "received_at": _time(e["received_at"]),
            "deadline": _time(e["deadline"]) or "none",
            "targets": [{"crm": _text(t["crm"]), "object": _text(t["object"]), "record_id": _text(t["record_id"]),
                         "state": _text(t["state"]), "attempts": _text(t["attempts"]),
                         "done_at": _time(t["done_at"]), "error": _error(t["error"])} for t in e["targets"]],
        } for e in events[:MAX_TRACE_EVENTS]],
        "reflections": [{
            "id": _text(r["id"]), "target": _target(r["crm"], r["object"], r["record_id"]),
            "phone": _shown(r["phone"], typed), "channel": _text(r["channel"]), "kind": _text(r["kind"]),
            "state": _text(r["state"]), "attempts": _text(r["attempts"]), "done_at": _time(r["done_at"]),
            "error": _error(r["error"]),
            "notifications": ", ".join(f"event {n['event_id']}: {_text(n['status'])}" for n in r["notifications"]),
        } for r in doc["reflections"]],
    }


# The trace page wears the status page's own style sheet.
_PAGE_STYLE = PAGE[PAGE.index("<style>"):PAGE.index("</style>") + len("</style>")]

TRACE_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>syncd status: trace</title>
{{ style|safe }}
</head>
<body>
<h1>syncd trace</h1>
<p class="meta"><a href="/status">Back to the status page</a>. Read-only; times in UTC.</p>
<section id="search">
<form method="get" action="/status/trace" class="search">
<label for="q">Phone (any format), email, CRM record id or event id</label>
<input id="q" name="q" type="search" maxlength="254" required autocomplete="off" value="{{ q }}">
<button type="submit">Trace</button>
</form>
{% if message %}<p class="error" id="trace-message">{{ message }}</p>{% endif %}
</section>
{% if trace %}
<section id="trace-consent">
<h2>Consent <small>(the ledger, per identity and channel)</small></h2>
{% if trace.consent %}
<div class="scroll">
<table class="consent">
<thead><tr><th>Identity</th><th>Channel</th><th>State</th><th>Since</th><th>Source</th></tr></thead>
<tbody>
{% for c in trace.consent %}
<tr class="consent-row consent-{{ c.state }}"><td class="id">{{ c.identity }}</td><td>{{ c.channel }}</td>
<td class="state">{{ c.state }}</td><td class="time">{{ c.since }}</td><td>{{ c.source }}</td></tr>
{% endfor %}
</tbody>
</table>
</div>
{% else %}
<p class="empty">No ledger entry.</p>
{% endif %}
</section>

<section id="trace-events">
<h2>Events <small>({{ trace.events_total }}, newest first)</small></h2>
{% if trace.events_total > trace.events|length %}
<p class="meta">Showing the newest {{ trace.events|length }}; <code>syncd trace</code> lists them all.</p>
{% endif %}
{% for e in trace.events %}
<div class="trace-event" data-event="{{ e.event_id }}">
<h3>Event {{ e.event_id }}: {{ e.source }} {{ e.kind }} {{ e.channel }}</h3>
<div class="scroll">
<table class="event-facts">
<tr><th>Status</th><td class="state">{{ e.status }}{% if e.status_reason %}: {{ e.status_reason }}{% endif %}</td></tr>
{% if e.raw_channel %}<tr><th>Raw channel</th><td>{{ e.raw_channel }}</td></tr>{% endif %}
<tr><th>Occurred</th><td class="time">{{ e.occurred_at }}</td></tr>
<tr><th>Received</th><td class="time">{{ e.received_at }}</td></tr>
<tr><th>Deadline</th><td class="time">{{ e.deadline }}</td></tr>
</table>
</div>
{% if e.targets %}
<div class="scroll">
<table class="targets">
<thead><tr><th>CRM</th><th>Object</th><th>Record</th><th>State</th><th>Attempts</th><th>Done</th><th>Last error</th></tr></thead>
<tbody>
{% for t in e.targets %}
<tr class="target state-{{ t.state }}" data-record="{{ t.record_id }}"><td>{{ t.crm }}</td><td>{{ t.object }}</td>
<td class="id">{{ t.record_id }}</td><td class="state">{{ t.state }}</td><td class="num">{{ t.attempts }}</td>
<td class="time">{{ t.done_at }}</td><td class="error">{{ t.error }}</td></tr>
{% endfor %}
</tbody>
</table>
</div>
{% else %}
<p class="empty">No targets.</p>
{% endif %}
</div>
{% endfor %}
</section>

<section id="trace-reflections">
<h2>Registrations in Sinch</h2>
{% if trace.reflections %}
<div class="scroll">
<table class="reflections">
<thead><tr><th>Id</th><th>Record (crm:object:record)</th><th>Phone</th><th>Channel</th><th>Kind</th><th>State</th>
<th>Attempts</th><th>Done</th><th>Last error</th><th>Notifications</th></tr></thead>
<tbody>
{% for r in trace.reflections %}
<tr class="reflection state-{{ r.state }}" data-id="{{ r.id }}"><td class="id">{{ r.id }}</td><td class="target">{{ r.target }}</td>
<td class="id">{{ r.phone }}</td><td>{{ r.channel }}</td><td>{{ r.kind }}</td><td class="state">{{ r.state }}</td>
<td class="num">{{ r.attempts }}</td><td class="time">{{ r.done_at }}</td><td class="error">{{ r.error }}</td>
<td>{{ r.notifications }}</td></tr>
{% endfor %}
</tbody>
</table>
</div>
{% else %}
<p class="empty">None.</p>
{% endif %}
</section>
{% endif %}
</body>
</html>
"""
