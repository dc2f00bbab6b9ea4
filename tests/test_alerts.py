"""Alerts to a Slack-compatible webhook, checked against a real HTTP sink on 127.0.0.1;
the dead-letter warning in the log; APScheduler's skipped-tick notice filtered."""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from syncd.alerts import Alerts
from syncd.scheduler import Scheduler
from tests.support.stack import Stack, wait_for
from tests.conftest import fixture_bytes


class Sink:
    """A tiny incoming-webhook receiver: records every JSON body; ``status`` and
    ``delay`` shape its answer."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.status = 200
        self.delay = 0.0
        self.release = threading.Event()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if sink.delay:
                    sink.release.wait(sink.delay)
                sink.bodies.append(json.loads(body))
                self.send_response(sink.status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok" if sink.status == 200 else b"invalid_payload")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/XXXXsecretXXXX"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def test_one_message_per_cause_per_cooldown_masked(sink):
    now = [1000.0]
    alerts = Alerts(sink.url, cooldown_seconds=3600, clock=lambda: now[0])
    err = "[400 FIELD_CUSTOM_VALIDATION_EXCEPTION] bad phone +13305551234 for jane.doe@example.com"
    assert alerts.dead_letter("d1", "salesforce", "Contact", "003A", err)
    assert not alerts.dead_letter("d2", "salesforce", "Contact", "003B", err)    # same cause: held back
    assert alerts.dead_letter("d3", "hubspot", "contact", "51", "[400 VALIDATION_ERROR] nope")
    now[0] += 3601
    assert alerts.dead_letter("d4", "salesforce", "Contact", "003C", err)        # an hour later: again
    assert alerts.flush(10)
    assert len(sink.bodies) == 3 and alerts.suppressed == 1
    first = sink.bodies[0]
    assert first["text"].startswith("syncd: a delivery was dead-lettered (salesforce:Contact:003A): [400 FIELD_")
    assert first["syncd"]["kind"] == "dead_letter" and first["syncd"]["dead_letter"] == "d1"
    fields = {f["title"]: f["value"] for f in first["attachments"][0]["fields"]}
    assert fields["replay"] == "syncd replay d1"
    raw = json.dumps(sink.bodies)
    assert "3305551234" not in raw and "jane.doe@example.com" not in raw
    alerts.close()


def test_a_failing_or_stalled_sink_never_raises_or_blocks(sink, caplog):
    sink.status = 500
    alerts = Alerts(sink.url, timeout=5, max_queued=2)
    with caplog.at_level(logging.WARNING, logger="syncd.alerts"):
        assert alerts.crm_failing("salesforce", "[503] down")
        assert alerts.flush(10)
        assert alerts.failed == 1
        assert any(r.getMessage() == "alert refused" for r in caplog.records)
        sink.status, sink.delay = 200, 30.0       # the sink now hangs: posts pile up
        results = [alerts.crm_failing(f"crm{i}", "down") for i in range(6)]
        # one is in flight, two wait in the queue, the rest are dropped (and logged), not waited for
        assert results.count(False) >= 3
        assert any(r.getMessage() == "alert dropped: queue full" for r in caplog.records)
    assert "XXXXsecretXXXX" not in caplog.text
    sink.release.set()
    alerts.close()


def test_skipped_tick_notice_is_filtered_but_other_warnings_pass(caplog):
    Scheduler()  # installs the filter
    aps = logging.getLogger("apscheduler.scheduler")
    with caplog.at_level(logging.WARNING):
        aps.warning('Execution of job "%s" skipped: maximum number of running instances reached (%d)', "push", 1)
        aps.warning("Run time of job %s was missed by %s", "push", "0:00:05")
    messages = [r.getMessage() for r in caplog.records if r.name == "apscheduler.scheduler"]
    assert messages == ["Run time of job push was missed by 0:00:05"]


def _optout(ext_id: str, n: int) -> bytes:
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    doc["data"].update(externalLeadId=ext_id, leadId=f"lead-{n}")
    doc["timestamp"] = f"2024-02-18T09:00:{n:02d}Z"
    return json.dumps(doc).encode()


def test_serve_alerts_dead_letter_failing_and_recovered(sink):
    st = Stack(extra_config={"alerts": {"webhook_url": sink.url}}).start()
    try:
        sf = st.sandboxes["salesforce"]
        bad, good = (sf.add_record("Contact", None, LastName=f"A{i}", SMS_Opt_Out__c=False) for i in range(2))
        sf.reject_record(bad, "FIELD_CUSTOM_VALIDATION_EXCEPTION", "consent source missing for +13305551234")
        daemon = st.serve()
        try:
            assert st.post_apten(_optout(bad, 1)).status_code == 200
            assert wait_for(lambda: any(b["syncd"]["kind"] == "dead_letter" for b in sink.bodies), timeout=30)
            # The CRM goes down: every composite call answers 503 until the faults run out.
            sf.add_fault("PATCH", r"/composite/sobjects$", 503,
                         [{"errorCode": "SERVER_UNAVAILABLE", "message": "down for maintenance"}],
                         headers={"Retry-After": "0"}, times=12)
            assert st.post_apten(_optout(good, 2)).status_code == 200
            assert wait_for(lambda: sf.get_record("Contact", good)["SMS_Opt_Out__c"] is True, timeout=90)
            assert wait_for(lambda: any(b["syncd"]["kind"] == "crm_recovered" for b in sink.bodies), timeout=15)
        finally:
            assert daemon.terminate() == 0
        kinds = [b["syncd"]["kind"] for b in sink.bodies]
        assert kinds.count("dead_letter") == 1 and kinds.count("crm_failing") == 1, kinds
        assert kinds.index("crm_failing") < kinds.index("crm_recovered")
        assert "3305551234" not in json.dumps(sink.bodies)
        warned = [x for x in daemon.log_lines() if x.get("msg") == "delivery dead-lettered"]
        assert warned and warned[0]["level"] == "warning" and warned[0]["crm"] == "salesforce"
        assert "FIELD_CUSTOM_VALIDATION_EXCEPTION" in warned[0]["error"]
        assert "3305551234" not in daemon.log()
        assert "maximum number of running instances" not in daemon.log()
    finally:
        st.cleanup()
