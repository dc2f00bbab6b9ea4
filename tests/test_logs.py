"""A run with the seed payloads leaves no phone digits, emails, message text or
secrets in the daemon's logs, and logs one line per event and per delivery outcome."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from tests.support.stack import APTEN_SECRET, LOX24_TOKEN, SINCH_SECRET, Stack, wait_for
from tests.conftest import fixture_bytes

pytestmark = pytest.mark.slow


def test_logs_carry_no_personal_data_or_secrets():
    st = Stack().start()
    sf = st.sandboxes["salesforce"]
    # A CRM error that echoes personal data back, as validation messages often do.
    rejected = sf.add_record("Contact", None, LastName="Echo", Email="echo.person@example.org",
                             Phone="+1 (415) 555-0199", SMS_Opt_Out__c=False)
    sf.reject_record(rejected, "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                     "Cannot opt out echo.person@example.org at +14155550199")
    daemon = st.serve()
    try:
        bodies = [fixture_bytes("apten_optout_sms.json"), fixture_bytes("apten_optout_email.json"),
                  fixture_bytes("apten_do_not_contact.json")]
        echo = json.loads(fixture_bytes("apten_optout_sms.json"))
        echo["data"].update(externalLeadId=rejected, phone="+14155550199", optOutMessage="STOP ALL")
        bodies.append(json.dumps(echo).encode())
        for body in bodies:
            assert st.post_apten(body).status_code == 200
        assert st.post_lox24(fixture_bytes("lox24_phone_unsubscribe.json")).status_code == 200
        assert st.post_sinch(fixture_bytes("sinch_opt_out_notification.json")).status_code in (200, 202)
        assert st.post_apten(b"{}", secret="wrong").status_code == 401
        assert wait_for(lambda: json.loads(st.syncd("status", "--json").stdout)["deliveries"]["dead"] == 1)
        assert wait_for(lambda: json.loads(st.syncd("status", "--json").stdout)["deliveries"]["pending"] == 0)
    finally:
        assert daemon.terminate() == 0
        st.stop()
    log = daemon.log()
    lines = daemon.log_lines()
    assert lines and len(lines) == len([x for x in log.splitlines() if x.strip()])  # every line is JSON
    forbidden = ["3305551234", "330-555", "4911113333444", "46712312312", "4155550199", "555-0199",
                 "dana.reyes@example.com", "echo.person@example.org", '"STOP', "STOP ALL", "unsubscribe me",
                 "zusätzlicher", "Benutzertext", "Do not contact me",
                 APTEN_SECRET, LOX24_TOKEN, SINCH_SECRET, sf.client_secret]
    leaks = [f for f in forbidden if f in log]
    assert leaks == [], leaks
    accepted = [x for x in lines if x.get("msg") == "webhook accepted"]
    settled = [x for x in lines if x.get("msg") == "delivery settled"]
    assert len(accepted) == 6 and len(settled) >= 5
    dead = [x for x in settled if x["state"] == "dead"]
    assert dead and "FIELD_CUSTOM_VALIDATION_EXCEPTION" in dead[0]["error"]
    assert any(x.get("msg") == "webhook refused" and x.get("status") == 401 for x in lines)


def test_text_format_is_masked_too():
    import io
    import logging

    from syncd.logs import setup_logging
    from syncd.masking import register_secrets

    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("INFO", "text", stream=stream)
    register_secrets(["text-format-secret"])
    try:
        raise ValueError("refused +4911113333444 for pat@example.com with text-format-secret")
    except ValueError:
        logging.getLogger("syncd.test").exception("push failed", extra={"crm": "close", "phone": "+13305551234"})
    finally:
        for handler in root.handlers:
            handler.close()  # lines are written by a background thread; close() writes what is queued
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    out = stream.getvalue()
    assert "push failed" in out and "crm=close" in out and not out.lstrip().startswith("{")
    for leak in ("4911113333444", "pat@example.com", "text-format-secret", "3305551234"):
        assert leak not in out, leak


def test_background_handler_keeps_every_line_in_order_and_writes_them_at_close():
    """Lines from many threads all arrive, each thread's in order; close() writes what is queued."""
    import io
    import logging
    import threading

    from syncd.logs import BackgroundStreamHandler, JsonFormatter

    stream = io.StringIO()
    handler = BackgroundStreamHandler(stream, min_interval=0.05)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("syncd.test.background")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        def emit(worker: int) -> None:
            for i in range(500):
                logger.info("line", extra={"worker": worker, "i": i})

        threads = [threading.Thread(target=emit, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        logger.removeHandler(handler)
        handler.close()
    docs = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(docs) == 8 * 500
    for worker in range(8):
        assert [d["i"] for d in docs if d["worker"] == worker] == list(range(500))


def test_json_lines_mask_nested_extras_and_keep_numbers():
    import logging

    from syncd.logs import JsonFormatter

    record = logging.LogRecord("syncd.test", logging.INFO, "", 0, "lookup for +4911113333444 failed", (), None)
    record.__dict__.update(event_id=7, ok=True, ratio=0.5, reason="pat@example.com refused",
                           fields={"phone": "+1 (415) 555-0199", "n": 3}, ids=["dana.reyes@example.com"])
    line = JsonFormatter().format(record)
    doc = json.loads(line)
    assert doc["event_id"] == 7 and doc["ok"] is True and doc["ratio"] == 0.5 and doc["fields"]["n"] == 3
    for leak in ("4911113333444", "pat@example.com", "555-0199", "dana.reyes@example.com"):
        assert leak not in line, leak


def test_a_stalled_stream_slows_callers_instead_of_growing_memory():
    """While the stream blocks, at most MAX_QUEUED lines wait in memory; the caller
    that would exceed it writes (and waits) itself, so nothing is dropped."""
    import logging
    import threading

    from syncd.logs import BackgroundStreamHandler, JsonFormatter

    class Gate:
        def __init__(self) -> None:
            self.open = threading.Event()
            self.lines = 0

        def write(self, text: str) -> None:
            self.open.wait()
            self.lines += text.count("\n")

        def flush(self) -> None:
            pass

    stream = Gate()
    handler = BackgroundStreamHandler(stream)
    handler.MAX_QUEUED = 50
    handler.setFormatter(JsonFormatter())
    record = logging.LogRecord("syncd.test", logging.INFO, "", 0, "line", (), None)
    caller = threading.Thread(target=lambda: [handler.handle(record) for _ in range(200)], daemon=True)
    caller.start()
    caller.join(timeout=1.0)
    assert caller.is_alive()                               # held back by the stalled stream...
    assert len(handler._lines) <= handler.MAX_QUEUED + 1   # ...with a bounded queue
    stream.open.set()
    caller.join(timeout=10)
    assert not caller.is_alive()
    handler.close()
    assert stream.lines == 200


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_json_timestamps_are_datetime_isoformat_to_the_millisecond(created):
    from datetime import datetime, timezone

    from syncd.logs import JsonFormatter
    formatter = JsonFormatter()
    assert formatter._timestamp(created) == datetime.fromtimestamp(created, timezone.utc).isoformat(
        timespec="milliseconds")
    assert formatter._timestamp(created) == formatter._timestamp(created)   # from the cached second too


def test_logging_shutdown_writes_the_last_lines_without_waiting_for_the_writer_thread():
    """``logging.shutdown`` (every exit) holds the handler's lock around flush and close;
    a close that joined the writer thread, itself waiting for that lock, held each exit
    up by its 2 s join timeout."""
    import io
    import logging
    import time
    import weakref

    from syncd.logs import BackgroundStreamHandler

    stream = io.StringIO()
    handler = BackgroundStreamHandler(stream)
    logger = logging.getLogger("syncd.test.shutdown")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("first")
        assert wait_for(lambda: "first" in stream.getvalue(), timeout=5)   # the writer thread is idle again
        logger.warning("last words")
        started = time.monotonic()
        logging.shutdown([weakref.ref(handler)])
        assert time.monotonic() - started < 1.0
        assert "last words" in stream.getvalue()
    finally:
        logger.removeHandler(handler)
