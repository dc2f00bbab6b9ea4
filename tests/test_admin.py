"""The admin listener (metrics, readiness, status page): apart from the webhook port,
cheap to poll (journal gauges cached, no write probe per /readyz), and failing
readiness when the disk runs low."""
from __future__ import annotations

import shutil

import pytest
import requests

from tests.support.stack import Stack, wait_for
from tests.conftest import LiveReceiver, fixture_bytes
from tests.test_receiver import post_apten

STATUS_TOKEN = "admin-test-status-token-0123"


class Spy:
    """A journal store that counts the calls the admin endpoints make into ``calls``
    (``healthcheck_error``: what the operations store's write probe raises)."""

    def __init__(self, store, healthcheck_error: Exception | None = None, calls: dict[str, int] | None = None):
        self.store = store
        self.calls: dict[str, int] = {} if calls is None else calls
        self.healthcheck_error = healthcheck_error

    def healthcheck(self):
        self.calls["healthcheck"] = self.calls.get("healthcheck", 0) + 1
        if self.healthcheck_error is not None:
            raise self.healthcheck_error
        return self.store.healthcheck()

    def __getattr__(self, name):
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)
        return counted


@pytest.fixture
def admin(tmp_path, receiver):
    """The admin app on the ``receiver`` fixture's journal, sharing nothing but the journal."""
    from syncd.admin import Readiness, create_admin_app
    from syncd.metrics import Metrics

    journal = receiver.journal
    reports = Spy(journal.reports)
    ops = Spy(journal.ops, calls=reports.calls)
    readiness = Readiness(ops, last_commit=journal.events.last_ingest_commit, disk_path=tmp_path)
    live = LiveReceiver(create_admin_app(reports, Metrics(), readiness, status_token=STATUS_TOKEN))
    live.spy = reports
    yield live
    live.close()


def make_admin(tmp_path, journal, ops=None, **readiness):
    from syncd.admin import Readiness, create_admin_app
    from syncd.metrics import Metrics

    ready = Readiness(ops or journal.ops, last_commit=journal.events.last_ingest_commit, **readiness)
    return LiveReceiver(create_admin_app(journal.reports, Metrics(), ready))


def test_metrics_gauges_are_read_once_for_many_scrapes(admin):
    for _ in range(20):
        text = requests.get(f"{admin.url}/metrics", timeout=10).text
        assert 'syncd_deliveries{state="pending"} 0.0' in text
    assert admin.spy.calls["counts"] == 1


def test_status_page_reads_the_journal_once_for_many_reloads(admin):
    for _ in range(10):
        resp = requests.get(f"{admin.url}/status", headers={"Authorization": f"Bearer {STATUS_TOKEN}"}, timeout=10)
        assert resp.status_code == 200
    assert (admin.spy.calls["counts"], admin.spy.calls["recent_activity"], admin.spy.calls["dead_letters"]) == (1, 1, 1)


def test_readiness_writes_no_probe_per_call(admin, receiver):
    for _ in range(20):
        assert requests.get(f"{admin.url}/readyz", timeout=10).json() == {"status": "ready"}
    assert admin.spy.calls.get("healthcheck", 0) == 1  # one probe, reused


def test_readiness_trusts_a_webhook_commit_that_just_succeeded(admin, receiver):
    assert post_apten(receiver, fixture_bytes("apten_optout_sms.json")).status_code == 200
    for _ in range(5):
        assert requests.get(f"{admin.url}/readyz", timeout=10).json() == {"status": "ready"}
    assert admin.spy.calls.get("healthcheck", 0) == 0


def test_readiness_fails_when_the_journal_cannot_write(tmp_path, receiver):
    spy = Spy(receiver.journal.ops, healthcheck_error=OSError("disk I/O error"))
    live = make_admin(tmp_path, receiver.journal, ops=spy)
    try:
        resp = requests.get(f"{live.url}/readyz", timeout=10)
        assert resp.status_code == 503
        assert resp.json()["problems"] == ["journal not writable: OSError"]
    finally:
        live.close()


def test_readiness_fails_below_the_free_disk_threshold(tmp_path, receiver):
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    low = make_admin(tmp_path, receiver.journal, disk_path=tmp_path, min_free_disk_mb=free_mb + 10_000)
    fine = make_admin(tmp_path, receiver.journal, disk_path=tmp_path, min_free_disk_mb=1)
    try:
        resp = requests.get(f"{low.url}/readyz", timeout=10)
        assert resp.status_code == 503
        (problem,) = resp.json()["problems"]
        assert "below admin.min_free_disk_mb" in problem
        assert requests.get(f"{fine.url}/readyz", timeout=10).json() == {"status": "ready"}
    finally:
        low.close()
        fine.close()


@pytest.mark.slow
def test_serve_readiness_fails_when_free_disk_is_below_the_threshold():
    """A real ``syncd serve`` whose journal's disk has less free space than configured."""
    st = Stack()
    try:
        free_mb = shutil.disk_usage(st.workdir).free // (1024 * 1024)
        st.extra_config = {"admin": {"min_free_disk_mb": free_mb + 100_000}}
        st.start()
        daemon = st.serve()
        try:
            resp = requests.get(f"{st.admin_url}/readyz", timeout=10)
            assert resp.status_code == 503
            assert any("admin.min_free_disk_mb" in p for p in resp.json()["problems"])
            # Webhooks are still taken: readiness tells the orchestrator, it does not refuse events.
            assert st.post_apten(fixture_bytes("apten_optout_sms.json")).json()["status"] == "accepted"
            # Lines are written by the log's background writer, up to ~20 ms after the call.
            assert wait_for(lambda: any(x.get("msg") == "free disk space low" for x in daemon.log_lines()),
                            timeout=10)
        finally:
            assert daemon.terminate() == 0
    finally:
        st.cleanup()


def test_receiver_status_token_is_a_deprecated_alias(caplog):
    from syncd.config import parse_config

    with caplog.at_level("WARNING", logger="syncd.config"):
        cfg = parse_config({"receiver": {"status_token": "old-place-token-0123456789"}}, env={})
    assert cfg.admin.status_token == "old-place-token-0123456789"
    assert any("receiver.status_token is deprecated" in r.getMessage() for r in caplog.records)
    cfg = parse_config({"receiver": {"status_token": "old-place-token-0123456789"},
                        "admin": {"status_token": "new-place-token-0123456789"}}, env={})
    assert cfg.admin.status_token == "new-place-token-0123456789"


def test_admin_port_must_differ_from_the_webhook_port():
    from syncd.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="admin.port"):
        parse_config({"receiver": {"port": 9000}, "admin": {"port": 9000}}, env={})
    cfg = parse_config({}, env={})
    assert (cfg.admin.host, cfg.admin.port, cfg.admin.min_free_disk_mb) == ("127.0.0.1", 9090, 512)
    assert (cfg.receiver.connection_limit, cfg.receiver.channel_timeout_seconds) == (1000, 15)


@pytest.mark.slow
def test_status_page_under_the_old_key_is_served_on_the_admin_port():
    """An existing config with receiver.status_token keeps its page (now on the admin port)."""
    st = Stack(extra_config={"receiver": {"status_token": "old-place-token-0123456789"}}).start()
    try:
        daemon = st.serve()
        try:
            resp = requests.get(f"{st.admin_url}/status", timeout=10,
                                headers={"Authorization": "Bearer old-place-token-0123456789"})
            assert resp.status_code == 200 and "<h1>syncd status</h1>" in resp.text
            assert "receiver.status_token is deprecated" in daemon.log()
            # Behind a TLS proxy on the same host, the session cookie is Secure.
            for proto, secure in (("https", True), (None, False)):
                login = requests.post(f"{st.admin_url}/status/login", data={"token": "old-place-token-0123456789"},
                                      headers={"X-Forwarded-Proto": proto} if proto else {},
                                      allow_redirects=False, timeout=10)
                attributes = [a.strip().lower() for a in login.headers["Set-Cookie"].split(";")]
                assert ("secure" in attributes) is secure and "httponly" in attributes
        finally:
            assert daemon.terminate() == 0
    finally:
        st.cleanup()
