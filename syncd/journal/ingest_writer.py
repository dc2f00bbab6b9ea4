"""The SQLite journal's webhook writer: a process of its own under ``syncd serve``
(started and watched by ingest_process.py; why, there).

It commits every request that is waiting when it looks: one transaction, one
fsync. A failed batch is retried one event per transaction, as group commit does,
so a bad row fails only its own request. It exits when its stdin reaches end of
file (``serve`` closed it, or died, even by ``kill -9``) and ignores SIGINT and
SIGTERM, so a signal to the whole process group lets ``serve`` drain first.

    python -m syncd.journal.ingest_writer DB SOCKET LEVEL FORMAT
"""
from __future__ import annotations

import logging
import os
import pickle
import selectors
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from syncd.journal.base import Prepared, Recorded
from syncd.journal.group_commit import insert_each_on_failure
from syncd.journal.ingest_wire import LENGTH, MAX_FRAME, frame, loads_plain

log = logging.getLogger("syncd.journal")


class _Connection:
    """The writer's side of one request thread's connection: bytes received so far."""

    __slots__ = ("sock", "buffer")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()

    def frames(self) -> list[bytes]:
        """Whole frames received so far (the rest stays buffered)."""
        out = []
        while len(self.buffer) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(self.buffer)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes")
            if len(self.buffer) < LENGTH.size + size:
                break
            out.append(bytes(self.buffer[LENGTH.size:LENGTH.size + size]))
            del self.buffer[:LENGTH.size + size]
        return out


class Writer:
    """Accepts request threads' connections and commits what they send, a batch per
    look: everything that arrived while the previous commit ran."""

    def __init__(self, insert: Callable[[list[Prepared]], list[Recorded]], listener: socket.socket, parent: int):
        self.insert = insert
        self.listener = listener
        self.parent = parent
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, "listener")
        self.selector.register(parent, selectors.EVENT_READ, "parent")
        self.stopping = False

    def run(self) -> None:
        """Commit whatever is waiting, as soon as anything is: no gathering wait. Requests
        that arrive during a commit make the next batch; a wait for company (as group
        commit does in-process) measured slower here: the commit no longer competes with
        the request threads for a GIL, and 2 ms of gathering cost more than the extra
        fsyncs (bench/README.md)."""
        while not self.stopping:
            batch = self._look()
            if batch:
                self._commit(batch)

    def _look(self) -> list[tuple[_Connection, Any]]:
        """The requests that arrived (waiting until something happens)."""
        batch: list[tuple[_Connection, Any]] = []
        for key, _ in self.selector.select():
            if key.data == "parent":
                if not os.read(self.parent, 4096):
                    self.stopping = True            # serve closed our stdin (or died)
            elif key.data == "listener":
                sock, _ = self.listener.accept()
                sock.setblocking(False)
                self.selector.register(sock, selectors.EVENT_READ, _Connection(sock))
            else:
                batch.extend(self._receive(key.data))
        return batch

    def _receive(self, conn: _Connection) -> list[tuple[_Connection, Any]]:
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return []
        conn.buffer += data
        try:
            return [(conn, loads_plain(f)) for f in conn.frames()]
        except (ValueError, pickle.UnpicklingError, EOFError) as exc:
            log.error("ingest writer refused a frame", extra={"error": str(exc)[:200]})
            self._answer(conn, ("error", "ProtocolError", "not a journal event"))
            self._drop(conn)
            return []

    def _commit(self, batch: list[tuple[_Connection, Any]]) -> None:
        # Any failure (a bad row, a frame of the wrong shape) is retried one by one.
        results = insert_each_on_failure(self.insert, [item for _, item in batch], Exception)
        for (conn, _), result in zip(batch, results):
            if isinstance(result, BaseException):
                self._answer(conn, ("error", type(result).__name__, str(result)[:500]))
            else:
                self._answer(conn, ("ok", result.event_id, result.created))

    def _answer(self, conn: _Connection, message: tuple[Any, ...]) -> None:
        data = frame(message)
        try:
            sent = conn.sock.send(data)     # a few dozen bytes: the socket buffer takes them
            if sent < len(data):
                conn.sock.setblocking(True)
                conn.sock.sendall(data[sent:])
                conn.sock.setblocking(False)
        except OSError:     # its request thread is gone: nothing to tell
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()


def writer_main(argv: list[str]) -> int:
    """The writer process's main (see the module's docstring for its arguments)."""
    db, sock_path, level, fmt = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # serve drains its requests, then closes our stdin
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from syncd.journal.events import EventStore
    from syncd.journal.sqlite import SqliteEngine
    from syncd.logs import setup_logging

    setup_logging(level, fmt)
    engine = SqliteEngine(Path(db))
    store = EventStore(engine)   # rows arrive prepared: the stored-body cap was applied in serve

    def insert(items: list[Prepared]) -> list[Recorded]:
        with engine.ingest() as tx:
            return store.insert_prepared(tx, items)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(256)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        Writer(insert, listener, sys.stdin.fileno()).run()
    finally:
        listener.close()
        _remove_socket(sock_path)   # also when serve was killed and cannot clean up itself
        engine.close()
        logging.shutdown()
    return 0


def _remove_socket(sock_path: str) -> None:
    """The socket and its private folder (serve made it for this writer alone)."""
    try:
        os.unlink(sock_path)
        os.rmdir(os.path.dirname(sock_path))
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(writer_main(sys.argv[1:]))
