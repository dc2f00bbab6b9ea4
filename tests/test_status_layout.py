"""The status page as an admin sees it: headless Chromium, driven over the DevTools
protocol (``--remote-debugging-pipe``, so no extra client library), at 1280 and 390 px
wide, against a real ``syncd serve`` with a delivered event and a dead letter.
Screenshots are written to the test's folder (and copied to ``$SYNCD_KEEP_SCREENSHOTS``
when set)."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.stack import Stack
from tests.conftest import keep_screenshots, seed_delivered_and_dead
from tests.test_status_page import CHROMIUM_FLAGS, TOKEN, find_chromium

pytestmark = pytest.mark.slow

LONG_ERROR = ("Consent_Source__c is required when SMS_Opt_Out__c changes; see the validation rule "
              "SMS_Opt_Out_Needs_Source_With_A_Rather_Long_Identifier_Name_That_Does_Not_Break in Setup")


class DevTools:
    """Chromium's DevTools protocol over the pipe on fds 3 (in) and 4 (out):
    NUL-terminated JSON messages."""

    def __init__(self, binary: str, profile: Path):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds() -> None:
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, "--remote-debugging-pipe",
                                      f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=fds, pass_fds=(3, 4), start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict:
        self._next += 1
        msg: dict = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next:
                assert "error" not in answer, answer
                return answer["result"]
            self.events.append(answer)

    def wait_event(self, method: str, session: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method and e.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - ending it below either way
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


def look(devtools: DevTools, url: str, width: int, shot: Path) -> dict:
    target = devtools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = devtools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    devtools.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                         "mobile": width < 600}, session)
    devtools.call("Network.enable", {}, session)
    devtools.call("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {TOKEN}"}}, session)
    devtools.call("Page.enable", {}, session)
    devtools.call("Page.navigate", {"url": url}, session)
    devtools.wait_event("Page.loadEventFired", session)
    expression = """JSON.stringify({
      scrollWidth: document.documentElement.scrollWidth, innerWidth: innerWidth,
      svgs: document.querySelectorAll('svg.chart').length,
      bars: document.querySelectorAll('#events-chart rect').length,
      honour: document.querySelectorAll('#honour-chart rect').length,
      atRisk: document.querySelectorAll('tr.at-risk-row td.deadline').length,
      health: [...document.querySelectorAll('tr.health-row')].map(r => r.dataset.crm + ':' +
              r.querySelector('td.state').textContent),
      errorWidth: Math.min(...[...document.querySelectorAll('table.dead-letters td.error')]
                            .map(td => td.getBoundingClientRect().width)),
      title: document.title})"""
    result = devtools.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
    png = devtools.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session)
    shot.write_bytes(base64.b64decode(png["data"]))
    devtools.call("Target.closeTarget", {"targetId": target})
    return json.loads(result["result"]["value"])


def status_url(stack: Stack) -> str:
    return f"{stack.admin_url}/status"


def seed_at_risk(stack: Stack) -> None:
    """An opt-out that arrived nine business days ago and is still open: the
    compliance panel lists it with its deadline."""
    from datetime import datetime, timedelta, timezone

    from syncd.compliance import ComplianceClock
    from syncd.events import ConsentEvent
    from syncd.journal import open_journal

    clock = ComplianceClock()
    now = datetime.now(timezone.utc)
    received = next(now - timedelta(hours=h) for h in range(24, 24 * 40)
                    if clock.warn_at(now - timedelta(hours=h)) < now <= clock.deadline(now - timedelta(hours=h)))
    journal = open_journal(f"sqlite:///{stack.workdir / 'syncd.db'}", must_exist=True)
    try:
        journal.events.record(ConsentEvent(
            source="apten", source_event_id="at-risk-1", kind="opt_out", channel="sms", occurred_at=received,
            received_at=received, raw=b"{}", quarantine_reason="no record with this phone in salesforce",
            phone="+13305550199"))
    finally:
        journal.close()


def test_status_page_fits_1280_and_390_with_health_and_charts(tmp_path):
    chromium = find_chromium()
    stack = Stack(extra_config={"admin": {"status_token": TOKEN}}).start()
    try:
        daemon = stack.serve()
        try:
            seed_delivered_and_dead(stack, LONG_ERROR)
            seed_at_risk(stack)

            devtools = DevTools(chromium, tmp_path / "profile")
            try:
                wide = look(devtools, status_url(stack), 1280, tmp_path / "status-1280.png")
                narrow = look(devtools, status_url(stack), 390, tmp_path / "status-390.png")
            finally:
                devtools.close()
        finally:
            assert daemon.terminate() == 0
    finally:
        stack.cleanup()
    keep_screenshots(tmp_path, ("status-1280.png", "status-390.png"))
    for seen, width in ((wide, 1280), (narrow, 390)):
        assert seen["title"] == "syncd status"
        assert seen["innerWidth"] == width
        assert seen["scrollWidth"] <= seen["innerWidth"], seen
        assert seen["svgs"] == 2 and seen["bars"] >= 1 and seen["honour"] >= 1, seen
        assert seen["health"] == ["salesforce:ok"], seen
        assert seen["atRisk"] == 1, seen     # the compliance panel lists the at-risk opt-out
    assert wide["errorWidth"] >= 200, wide   # the Error column no longer collapses to a letter per line
    for name in ("status-1280.png", "status-390.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
