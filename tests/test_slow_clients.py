"""Slow clients against a real ``syncd serve``: sockets that send a request's headers
and one byte of its body, then stall, must neither lock signed webhooks out
(``receiver.connection_limit``) nor stay open for long (``receiver.channel_timeout_seconds``).
With waitress's own defaults (100 connections, 120 s) the first test's webhooks time out."""
from __future__ import annotations

import contextlib
import resource
import socket
import time

import pytest
import requests

from tests.support.stack import Stack, wait_for
from tests.test_reliability import optout

pytestmark = pytest.mark.slow

SLOW_SOCKETS = 150
STALLED_HEAD = (b"POST /webhooks/apten HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{")


@contextlib.contextmanager
def stalled_clients(port: int, count: int):
    """``count`` connections, each stalled one byte into a 1,000-byte body."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(STALLED_HEAD)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture
def stack_with_contacts():
    st = Stack().start()
    sf = st.sandboxes["salesforce"]
    st.contact_ids = [sf.add_record("Contact", None, LastName=f"S{i}", SMS_Opt_Out__c=False) for i in range(5)]
    yield st
    st.cleanup()


def test_a_slow_body_flood_does_not_lock_out_signed_webhooks(stack_with_contacts):
    st = stack_with_contacts
    daemon = st.serve()
    try:
        with stalled_clients(st.port, SLOW_SOCKETS) as socks:
            time.sleep(0.5)  # let the server take them all in first
            answers = [st.post_apten(optout(rid, n), timeout=10).status_code
                       for n, rid in enumerate(st.contact_ids)]
            assert answers == [200] * len(st.contact_ids)
            assert requests.get(f"{st.url}/healthz", timeout=10).status_code == 200
            assert requests.get(f"{st.admin_url}/readyz", timeout=10).status_code == 200
            assert not any(closed_by_server(s) for s in socks)  # still inside channel_timeout
    finally:
        assert daemon.terminate() == 0


def test_stalled_clients_are_dropped_after_channel_timeout(stack_with_contacts):
    st = stack_with_contacts
    st.extra_config = {"receiver": {"channel_timeout_seconds": 2}}
    st.write_config()
    daemon = st.serve()
    try:
        with stalled_clients(st.port, 20) as socks:
            # 2 s idle plus at most one cleanup interval; far below waitress's default 120 s.
            assert wait_for(lambda: all(closed_by_server(s) for s in socks), timeout=30, interval=0.5)
        assert st.post_apten(optout(st.contact_ids[0], 1), timeout=10).status_code == 200
    finally:
        assert daemon.terminate() == 0


def test_serve_lifts_a_low_open_file_limit_to_fit_the_connection_limit(stack_with_contacts):
    st = stack_with_contacts
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * 1000 + 256:
        pytest.skip(f"the hard open-file limit here ({hard}) is below what the test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the child inherits it
    try:
        daemon = st.serve()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = open(f"/proc/{daemon.proc.pid}/limits", encoding="ascii").read()
        (line,) = [x for x in limits.splitlines() if x.startswith("Max open files")]
        assert int(line.split()[3]) >= 2 * 1000 + 256, line
    finally:
        assert daemon.terminate() == 0
