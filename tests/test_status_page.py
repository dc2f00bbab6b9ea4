"""The read-only status page (GET /status): off by default, token-protected,
autoescaped, with security headers; and in a real browser against a real
``syncd serve``, showing a delivered event and a dead letter."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests

from connectors.types import RecordRef
from syncd.events import ConsentEvent
from syncd.journal.base import Outcome
from syncd.stack import Stack, wait_for
from tests.conftest import LiveReceiver, fixture_bytes

TOKEN = "status-token-0123456789abcdef"
CONTACT = "003XX000004DHPYYA4"
XSS = '<script>alert(1)</script> "quoted" & <b>bold</b>'
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
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
    from syncd.config import parse_config
    from syncd.journal import open_journal
    from syncd.receiver import create_app
    from syncd.routing import Router

    cfg = parse_config({"crm": {"salesforce": {"instance_url": "https://127.0.0.1:9",
                                               "auth": {"flow": "access_token", "access_token": "x"}}}},
                       base_dir=tmp_path, env={})
    journal = open_journal(f"sqlite:///{tmp_path}/status.db")
    app = create_app(journal, {}, Router.from_config(cfg), status_token=status_token)
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


@pytest.mark.parametrize("headers,query", [
    ({"Authorization": f"Bearer {TOKEN}"}, ""),
    ({"Authorization": f"bearer  {TOKEN} "}, ""),
    ({}, f"?token={TOKEN}"),
])
def test_either_form_of_the_token_gets_the_page(page, headers, query):
    resp = requests.get(f"{page.url}/status{query}", headers=headers, timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<h1>syncd status</h1>" in resp.text


def test_page_shows_deliveries_dead_letters_and_counts(page):
    html = requests.get(f"{page.url}/status", params={"token": TOKEN}, timeout=5).text
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
    html = requests.get(f"{page.url}/status", params={"token": TOKEN}, timeout=5).text
    for personal in ("+13305551234", "3305551234", "STOP", "dana.reyes", "example.com"):
        assert personal not in html


def test_security_headers(page):
    resp = requests.get(f"{page.url}/status", params={"token": TOKEN}, timeout=5)
    for name, value in SECURITY_HEADERS.items():
        assert resp.headers[name] == value
    # No JavaScript at all: no script element, no inline handler, no javascript: URL.
    assert "<script" not in resp.text.lower() and "javascript:" not in resp.text.lower()
    assert not re.search(r"<[^>]+\son[a-z]+\s*=", resp.text, re.I)


def test_only_get(page):
    resp = requests.post(f"{page.url}/status", params={"token": TOKEN}, timeout=5)
    assert resp.status_code == 405 and resp.json()["status"] == 405


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


def run_chromium(binary: str, profile: Path, *args: str, timeout: float = 60) -> str:
    """Run headless Chromium in its own process group; on timeout end that group."""
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {timeout} s")
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{err[-3000:]}"
    return out


@pytest.fixture
def served_with_status():
    stack = Stack(extra_config={"receiver": {"status_token": TOKEN}}).start()
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

    # Apten's seed example: delivered to the seeded contact.
    assert stack.post_apten(fixture_bytes("apten_optout_sms.json")).json()["status"] == "accepted"
    # A second contact whose updates the org rejects for good: a dead letter.
    other = sf.add_record("Contact", None, LastName="X", SMS_Opt_Out__c=False)
    sf.reject_record(other, "FIELD_CUSTOM_VALIDATION_EXCEPTION", "needs a reason")
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    doc["data"].update(externalLeadId=other, leadId="b1c2d3e4-0000-4000-8000-000000000002", phone=None)
    assert stack.post_apten(json.dumps(doc).encode()).json()["status"] == "accepted"

    def settled() -> bool:
        counts = json.loads(stack.syncd("status", "--json").stdout)["deliveries"]
        return counts["done"] == 1 and counts["dead"] == 1
    assert wait_for(settled, timeout=30, interval=0.2)
    assert sf.get_record("Contact", CONTACT)["SMS_Opt_Out__c"] is True

    url = f"{stack.url}/status?token={TOKEN}"
    html = run_chromium(chromium, tmp_path / "profile-dom", "--dump-dom", url)
    assert "<h1>syncd status</h1>" in html, html[:2000]

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

    shot = tmp_path / "status.png"
    run_chromium(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,900", url)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 5 * 1024
    if os.environ.get("SYNCD_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["SYNCD_KEEP_SCREENSHOT"])
