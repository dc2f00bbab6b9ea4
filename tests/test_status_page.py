"""The read-only status page (GET /status on the admin listener): off by default,
behind a bearer token or a login form's session cookie (never ?token=), autoescaped,
with security headers; and in a real browser against a real ``syncd serve``:
signing in through the form, then a delivered event and a dead letter."""
from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.types import RecordRef
from syncd.events import ConsentEvent
from syncd.journal.base import Outcome
from tests.support.stack import Stack
from tests.conftest import LiveReceiver, seed_delivered_and_dead

TOKEN = "status-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
CONTACT = "003XX000004DHPYYA4"
XSS = '<script>alert(1)</script> "quoted" & <b>bold</b>'
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


# --- parsing the page the way a test (not a person) reads it -------------------------
class Rows(HTMLParser):
    """Every <tr>: its attributes and the text of its cells."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[dict] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append({"attrs": dict(attrs), "cells": []})
        elif tag in ("td", "th") and self.rows:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1]["cells"].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def rows(html: str, css_class: str) -> list[dict]:
    parser = Rows()
    parser.feed(html)
    return [r for r in parser.rows if css_class in (r["attrs"].get("class") or "").split()]


# --- the page over real HTTP, on a journal filled in-process ---------------------------
def make_receiver(tmp_path: Path, status_token: str | None):
    from syncd.admin import Readiness, create_admin_app
    from syncd.journal import open_journal
    from syncd.metrics import Metrics

    journal = open_journal(f"sqlite:///{tmp_path}/status.db")
    app = create_admin_app(journal.reports, Metrics(), Readiness(journal.ops), status_token=status_token)
    live = LiveReceiver(app)
    live.journal = journal
    return live


def event(n: int, **kw) -> ConsentEvent:
    base = dict(source="apten", source_event_id=f"ev-{n}", kind="opt_out", channel="sms",
                occurred_at=datetime(2024, 2, 18, 9, 45, n, tzinfo=timezone.utc),
                received_at=datetime.now(timezone.utc), raw=b'{"x": 1}', external_lead_id="003XX000004DHPY",
                phone="+13305551234", phone_raw="+13305551234", email="dana.reyes@example.com", message="STOP")
    return ConsentEvent(**{**base, **kw})


def fill(journal) -> None:
    """One delivered event, one dead delivery whose CRM error is hostile HTML, one
    quarantined event."""
    done = journal.events.record(event(1)).event_id
    dead = journal.events.record(event(2, external_lead_id="003XX000004DHPZ")).event_id
    journal.events.record(event(3, external_lead_id=None, quarantine_reason="no externalLeadId; no phone"))
    journal.deliveries.add_targets(done, [RecordRef("salesforce", "Contact", CONTACT)])
    journal.deliveries.add_targets(dead, [RecordRef("salesforce", "Contact", "003XX000004DHPZAA4")])
    claimed = {d.event_id: d for d in journal.deliveries.claim(10, 60)}
    journal.deliveries.settle([Outcome(claimed[done].id, "done"),
                    Outcome(claimed[dead].id, "dead", error=f"FIELD_CUSTOM_VALIDATION_EXCEPTION: {XSS}")])


@pytest.fixture
def page(tmp_path):
    live = make_receiver(tmp_path, TOKEN)
    fill(live.journal)
    yield live
    live.close()
    live.journal.close()


@pytest.mark.parametrize("token", [None, ""])
def test_off_unless_a_token_is_configured(tmp_path, token):
    live = make_receiver(tmp_path, token)
    try:
        for url in (f"{live.url}/status", f"{live.url}/status?token={TOKEN}"):
            resp = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
            assert resp.status_code == 404
            assert resp.json()["status"] == 404
    finally:
        live.close()
        live.journal.close()


@pytest.mark.parametrize("headers,query", [
    ({}, ""),
    ({"Authorization": "Bearer wrong-token"}, ""),
    ({}, "?token=wrong-token"),
    ({}, "?token="),
    ({"Authorization": "Bearer "}, ""),
    ({"Authorization": f"Basic {TOKEN}"}, ""),
    ({"Authorization": f"Bearer {TOKEN[:-1]}"}, ""),
    ({"Authorization": f"Bearer {TOKEN}x"}, ""),
    ({"Authorization": "Bearer wrong-token"}, f"?token={TOKEN}"),  # the header, when sent, decides
    ({}, f"?token={TOKEN}"),  # never in the URL, where proxies and histories keep it
])
def test_missing_or_wrong_token_is_401_json(page, headers, query):
    resp = requests.get(f"{page.url}/status{query}", headers=headers, timeout=5)
    assert resp.status_code == 401
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert body["status"] == 401 and "token" in body["error"]
    assert TOKEN not in resp.text
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert resp.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {TOKEN}"},
    {"Authorization": f"bearer  {TOKEN} "},
])
def test_the_bearer_token_gets_the_page(page, headers):
    resp = requests.get(f"{page.url}/status", headers=headers, timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<h1>syncd status</h1>" in resp.text


def test_page_shows_deliveries_dead_letters_and_counts(page):
    html = requests.get(f"{page.url}/status", headers=BEARER, timeout=5).text
    (done,) = rows(html, "state-done")
    assert done["attrs"]["data-record"] == CONTACT and done["attrs"]["data-delivery"].startswith("d")
    assert f"salesforce:Contact:{CONTACT}" in done["cells"] and "apten" in done["cells"]
    (dead_row,) = rows(html, "state-dead")
    (quarantined,) = rows(html, "status-quarantined")
    assert "no externalLeadId; no phone" in quarantined["cells"]
    letters = {r["attrs"]["data-id"] for r in rows(html, "dead-letter")}
    assert letters == {dead_row["attrs"]["data-delivery"], f"q{quarantined['attrs']['data-event']}"}
    assert 'data-count="deliveries-done">1<' in html and 'data-count="deliveries-dead">1<' in html
    assert 'data-count="quarantined">1<' in html


def test_crm_error_text_is_escaped(page):
    html = requests.get(f"{page.url}/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).text
    assert "<script" not in html.lower() and "<b>bold" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &#34;quoted&#34; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    # Read back as text, the cell says exactly what the CRM said.
    (letter,) = [r for r in rows(html, "dead-letter") if r["attrs"]["data-id"].startswith("d")]
    assert letter["cells"][-1] == f"FIELD_CUSTOM_VALIDATION_EXCEPTION: {XSS}"


def test_no_personal_data_on_the_page(page):
    html = requests.get(f"{page.url}/status", headers=BEARER, timeout=5).text
    for personal in ("+13305551234", "3305551234", "STOP", "dana.reyes", "example.com"):
        assert personal not in html


def test_security_headers(page):
    resp = requests.get(f"{page.url}/status", headers=BEARER, timeout=5)
    for name, value in SECURITY_HEADERS.items():
        assert resp.headers[name] == value
    # No JavaScript at all: no script element, no inline handler, no javascript: URL.
    assert "<script" not in resp.text.lower() and "javascript:" not in resp.text.lower()
    assert not re.search(r"<[^>]+\son[a-z]+\s*=", resp.text, re.I)


def test_only_get(page):
    resp = requests.post(f"{page.url}/status", headers=BEARER, timeout=5)
    assert resp.status_code == 405 and resp.json()["status"] == 405


# --- the login form and its session cookie ----------------------------------------------
def login(page, token: str = TOKEN) -> requests.Response:
    return requests.post(f"{page.url}/status/login", data={"token": token}, allow_redirects=False, timeout=5)


def test_login_form_is_plain_html_with_the_strict_headers(page):
    resp = requests.get(f"{page.url}/status/login", timeout=5)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert '<form method="post" action="/status/login">' in resp.text
    assert 'type="password"' in resp.text
    for name, value in SECURITY_HEADERS.items():
        assert resp.headers[name] == value
    assert "<script" not in resp.text.lower() and not re.search(r"<[^>]+\son[a-z]+\s*=", resp.text, re.I)


def test_a_browser_without_a_session_is_sent_to_the_login_form(page):
    resp = requests.get(f"{page.url}/status", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"},
                        allow_redirects=False, timeout=5)
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/status/login")
    assert "Set-Cookie" not in resp.headers


@pytest.mark.parametrize("token", ["", "wrong-token", TOKEN[:-1], TOKEN + "x"])
def test_login_with_a_wrong_token_is_401_and_sets_no_cookie(page, token):
    resp = login(page, token)
    assert resp.status_code == 401 and "Set-Cookie" not in resp.headers
    assert 'id="login-error"' in resp.text and TOKEN not in resp.text


def test_login_sets_an_httponly_samesite_strict_session_cookie_that_opens_the_page(page):
    resp = login(page)
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/status")
    cookie_header = resp.headers["Set-Cookie"]
    attributes = [a.strip().lower() for a in cookie_header.split(";")]
    assert "httponly" in attributes and "samesite=strict" in attributes and "path=/status" in attributes
    assert "secure" not in attributes  # plain HTTP on 127.0.0.1: a Secure cookie would never come back
    value = resp.cookies["syncd_status"]
    assert TOKEN not in value and TOKEN not in cookie_header
    page_resp = requests.get(f"{page.url}/status", cookies={"syncd_status": value}, timeout=5)
    assert page_resp.status_code == 200 and "<h1>syncd status</h1>" in page_resp.text


def test_a_forged_or_foreign_session_cookie_is_refused(page, tmp_path):
    from itsdangerous import TimestampSigner

    value = login(page).cookies["syncd_status"]
    payload, stamp, signature = value.split(".")
    other_token = TimestampSigner("another-status-token-0123", salt="syncd.status-session").sign(b"status")
    for forged in (f"{payload}.{stamp}.{signature[:-2]}xx", f"admin.{stamp}.{signature}", TOKEN, "",
                   other_token.decode()):
        resp = requests.get(f"{page.url}/status", cookies={"syncd_status": forged}, timeout=5)
        assert resp.status_code == 401, forged


COOKIE_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters='";,\\')


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=st.text(max_size=80), cookie=st.text(COOKIE_CHARS, max_size=120), accept=st.sampled_from(
    ["*/*", "application/json", "text/html"]))
def test_any_other_token_or_cookie_is_refused_without_5xx(page, token, cookie, accept):
    if token.strip() != TOKEN:
        resp = login(page, token)
        assert resp.status_code == 401 and "Set-Cookie" not in resp.headers
    resp = requests.get(f"{page.url}/status", cookies={"syncd_status": cookie}, headers={"Accept": accept},
                        allow_redirects=False, timeout=5)
    assert resp.status_code in (401, 303)  # 303: a browser is sent to the login form


def test_logout_clears_the_cookie(page):
    session = requests.Session()
    assert session.post(f"{page.url}/status/login", data={"token": TOKEN}, timeout=5).status_code == 200
    assert session.get(f"{page.url}/status", timeout=5).status_code == 200
    resp = session.post(f"{page.url}/status/logout", allow_redirects=False, timeout=5)
    assert resp.status_code == 303 and "syncd_status" not in session.cookies
    assert session.get(f"{page.url}/status", timeout=5).status_code == 401


# --- a real `syncd serve` and a real browser ------------------------------------------
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; .ci/chromium.sh installs Debian's chromium package")
    pytest.skip("chromium is not installed (bash .ci/chromium.sh installs it)")


class BrowserError(Exception):
    pass


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe
    (``--remote-debugging-pipe``: commands on fd 3, replies on fd 4, NUL-separated
    JSON), so the test types into the login form and presses Enter like a person;
    the page itself runs no JavaScript."""

    def __init__(self, binary: str, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Above fd 4, so that placing them on 3 and 4 in the child cannot clobber each other.
        child_r, child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)

        def wire_fds() -> None:  # in the child: its fd 3 reads commands, fd 4 writes replies
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            pass_fds=(3, 4), preexec_fn=wire_fds)
        os.close(child_r)
        os.close(child_w)
        self._next_id = 0
        self._inbox: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._from_browser, 65536)
            if not chunk:
                return
            buffer += chunk
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                self._inbox.put(json.loads(message))

    def call(self, method: str, session: bool = False, timeout: float = 30, **params) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for_load(self, url_suffix: str, timeout: float = 30) -> None:
        """Until the page has loaded a document whose URL ends with ``url_suffix``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.events.clear()
            try:
                if self.url().endswith(url_suffix) and self.ready_state() == "complete":
                    return
            except BrowserError:  # between two documents: nothing to ask yet
                pass
            time.sleep(0.1)
        pytest.fail(f"page did not load {url_suffix!r}; at {self.url()!r}")

    def ready_state(self) -> str:
        return self.call("Runtime.evaluate", session=True, expression="document.readyState")["result"]["value"]

    def url(self) -> str:
        return self.call("Page.getNavigationHistory", session=True)["entries"][-1]["url"]

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)

    def html(self) -> str:
        root = self.call("DOM.getDocument", session=True)["root"]["nodeId"]
        return self.call("DOM.getOuterHTML", session=True, nodeId=root)["outerHTML"]

    def type_into(self, selector: str, text: str) -> None:
        root = self.call("DOM.getDocument", session=True)["root"]["nodeId"]
        node = self.call("DOM.querySelector", session=True, nodeId=root, selector=selector)["nodeId"]
        assert node, f"no {selector} on the page"
        self.call("DOM.focus", session=True, nodeId=node)
        self.call("Input.insertText", session=True, text=text)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", session=True, type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, **({"text": "\r"} if kind == "keyDown" else {}))

    def cookies(self) -> list[dict]:
        return self.call("Network.getCookies", session=True)["cookies"]

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", session=True, format="png")["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self._to_browser)


@pytest.fixture
def served_with_status():
    stack = Stack(extra_config={"admin": {"status_token": TOKEN}}).start()
    try:
        daemon = stack.serve()
    except BaseException:
        stack.cleanup()
        raise
    yield stack
    try:
        assert daemon.terminate() == 0
    finally:
        stack.cleanup()


@pytest.mark.slow
def test_browser_shows_a_delivered_event_and_a_dead_letter(served_with_status, tmp_path):
    chromium = find_chromium()
    stack = served_with_status
    sf = stack.sandboxes["salesforce"]

    # Apten's seed example delivered; a second contact the org rejects for good: a dead letter.
    other = seed_delivered_and_dead(stack, "needs a reason")
    assert sf.get_record("Contact", CONTACT)["SMS_Opt_Out__c"] is True

    browser = Browser(chromium, tmp_path / "profile")
    try:
        # Not signed in: the page sends the browser to the login form; the token goes in
        # the form's password field, never into a URL.
        browser.navigate(f"{stack.admin_url}/status")
        browser.wait_for_load("/status/login")
        browser.type_into("#token", TOKEN)
        browser.press_enter()
        browser.wait_for_load("/status")
        html = browser.html()
        (session,) = [c for c in browser.cookies() if c["name"] == "syncd_status"]
        script_sees = browser.call("Runtime.evaluate", session=True, expression="document.cookie")["result"]
        visited = [e["url"] for e in browser.call("Page.getNavigationHistory", session=True)["entries"]]
        shot = browser.screenshot()
    finally:
        browser.close()
    assert "<h1>syncd status</h1>" in html, html[:2000]
    assert session["httpOnly"] is True and session["sameSite"] == "Strict" and session["path"] == "/status"
    assert TOKEN not in session["value"]
    assert script_sees["value"] == ""  # HttpOnly: scripts cannot read the session
    assert not any(TOKEN in u for u in visited)
    # The webhook port has no status page.
    assert requests.get(f"{stack.url}/status", headers=BEARER, timeout=5).status_code == 404

    (done,) = rows(html, "state-done")
    assert done["attrs"]["data-record"] == CONTACT
    assert f"salesforce:Contact:{CONTACT}" in done["cells"] and "done" in done["cells"]
    assert done["cells"][8], "delivered_at is shown"
    (dead_row,) = rows(html, "state-dead")
    assert dead_row["attrs"]["data-record"] == other
    (letter,) = rows(html, "dead-letter")
    assert letter["attrs"]["data-id"] == dead_row["attrs"]["data-delivery"]
    assert f"salesforce:Contact:{other}" in letter["cells"]
    assert "needs a reason" in letter["cells"][-1]
    assert "+13305551234" not in html and "STOP" not in html

    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 5 * 1024
    if os.environ.get("SYNCD_KEEP_SCREENSHOT"):
        Path(os.environ["SYNCD_KEEP_SCREENSHOT"]).write_bytes(shot)
