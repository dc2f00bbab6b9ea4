"""The receiver's waitress channel: the main loop waits for a task thread's output
lock instead of polling past it (syncd/http_server.py says why that matters)."""
from __future__ import annotations

import socket
import threading

from flask import Flask

from syncd.http_server import HandOffChannel, serve_wsgi


def _server_and_channel():
    app = Flask("t")
    server = serve_wsgi(app, host="127.0.0.1", port=0, threads=1)
    ours, peer = socket.socketpair()
    channel = server.channel_class(server, ours, ("127.0.0.1", 1), server.adj, map={})
    return server, channel, peer


def hold_output_lock(channel, data: bytes, release: threading.Event) -> threading.Thread:
    """A stand-in task thread: queues ``data`` and holds the connection's output lock
    until ``release`` is set; returns once the lock is held."""
    holding = threading.Event()

    def task_thread() -> None:
        with channel.outbuf_lock:
            channel.outbufs[-1].append(data)
            channel.total_outbufs_len += len(data)
            holding.set()
            release.wait(5)

    worker = threading.Thread(target=task_thread)
    worker.start()
    assert holding.wait(5)
    return worker


def test_listeners_accept_hand_off_channels():
    server, channel, peer = _server_and_channel()
    try:
        assert server.channel_class is HandOffChannel
        assert isinstance(channel, HandOffChannel)
    finally:
        channel.close()
        peer.close()
        server.close()


def test_main_loop_flushes_after_the_task_thread_lets_go_of_the_lock():
    """A task is running and holds the output lock while the main loop is asked to
    write: waitress's own channel returns at once with the bytes unsent (and polls
    again, ready at once); ours waits for the lock and sends them."""
    server, channel, peer = _server_and_channel()
    channel.lock_wait_seconds = 5.0   # the mechanism, not the production bound
    body = b'{"allowed":false}'
    let_go = threading.Event()
    try:
        channel.requests = [object()]   # a task is in progress on this connection
        worker = hold_output_lock(channel, body, let_go)
        assert channel.writable()
        threading.Timer(0.05, let_go.set).start()
        channel.handle_write()           # the main loop's turn
        worker.join(5)
        assert channel.total_outbufs_len == 0
        peer.settimeout(5)
        assert peer.recv(100) == body
    finally:
        let_go.set()
        channel.requests = []
        channel.close()
        peer.close()
        server.close()


def test_lock_wait_is_bounded():
    """A lock held past the bound: the main loop gives up (and polls again) rather
    than stall every other connection."""
    server, channel, peer = _server_and_channel()
    channel.lock_wait_seconds = 0.05
    release = threading.Event()
    worker = None
    try:
        channel.requests = [object()]
        worker = hold_output_lock(channel, b"x", release)
        channel.handle_write()
        assert channel.total_outbufs_len == 1   # nothing sent: the task still holds the lock
    finally:
        release.set()
        if worker is not None:
            worker.join(5)
        channel.requests = []
        channel.close()
        peer.close()
        server.close()


def test_every_listener_of_a_multi_address_server_uses_the_channel():
    server = serve_wsgi(Flask("t"), listen="127.0.0.1:0 127.0.0.1:0")
    try:
        listeners = [obj for obj in server.map.values() if hasattr(obj, "channel_class")]
        assert len(listeners) == 2
        assert all(obj.channel_class is HandOffChannel for obj in listeners)
    finally:
        server.close()
