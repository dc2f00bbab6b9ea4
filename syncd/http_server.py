"""waitress, with one hand-off fixed: the main loop waits for a task thread's
output lock instead of spinning on it.

waitress's task thread appends a response to the connection's buffer and sends it
itself, holding the buffer's lock (``HTTPChannel.write_soon``). ``send()`` releases
the GIL; if the main loop takes it then, it sees unsent bytes, asks ``poll()`` for
POLLOUT (ready at once), finds the lock taken (``_flush_some_if_lockable`` does not
wait) and polls again. Every ``poll()`` gives the GIL back for a moment, but the
main thread takes it again before the woken task thread runs, so the task thread
that holds the lock cannot finish until CPython's switch interval (5 ms) forces the
GIL over. Measured on the consent API (a SQLite read per request, whose calls also
release the GIL; bench/README.md): with one request thread, 127-152 voluntary context
switches per request and 186 main-loop polls per request, 0.21x a bare Flask app's
throughput; waiting for the lock instead: 2.4 switches, 0.95-1.16x. With eight
request threads: 0.18-0.65x before, 0.78-0.80x after.

The main thread now blocks on the lock (GIL released) for at most
:attr:`HandOffChannel.lock_wait_seconds`; the task thread only holds it to append
and to make non-blocking sends, so the wait is microseconds and other connections
are not held up.
"""
from __future__ import annotations

from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server


class HandOffChannel(HTTPChannel):
    lock_wait_seconds = 0.02

    def _flush_some_if_lockable(self, do_close: bool = True) -> None:
        # waitress's own body, with a bounded blocking acquire instead of acquire(False).
        if self.outbuf_lock.acquire(True, self.lock_wait_seconds):
            try:
                self._flush_some(do_close=do_close)  # type: ignore[attr-defined]  # not in waitress's stubs
                if self.total_outbufs_len < self.adj.outbuf_high_watermark:
                    self.outbuf_lock.notify()
            finally:
                self.outbuf_lock.release()


def serve_wsgi(app: Any, **options: Any) -> Any:
    """``waitress.create_server`` whose listeners accept :class:`HandOffChannel`s
    (one listener per address when ``host`` resolves to several)."""
    server = create_server(app, **options)
    listeners = [server] if isinstance(server, BaseWSGIServer) else list((server.map or {}).values())
    for listener in listeners:
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = HandOffChannel
    return server
