"""The SQLite journal's webhook writer, a process of its own under ``syncd serve``.

Why a process: group commit in the server's own request threads (group_commit.py)
puts each commit on the critical path of every waiting webhook, and in one
process that path competes for the GIL with every other request: the driver
gives up the GIL around each SQLite call and the committing thread then queues
for it again behind the threads parsing the next webhooks. Measured served under
16 clients (bench/README.md): a group commit of ~6 events took 3.0-3.4 ms of
wall time against ~0.9 ms in a quiet process. Here the commit runs in a process
whose only thread is the commit: the request threads prepare their rows in
parallel (EventStore.prepare), send them, and sleep until their commit answers.
A webhook is still answered only after its own row is on disk.

Protocol, over one Unix-socket connection per request thread (a private 0700
folder): each request is one frame (4-byte big-endian length, then a pickle of
plain data only: tuples, strings, bytes, numbers, None; anything naming a class
is refused), the answer one frame: ``("ok", event_id, created)`` or
``("error", type, text)``. The writer commits every request that is waiting when
it looks (one transaction, one fsync); a failed batch is retried one event per
transaction, as group commit does, so a bad row fails only its own request.

Lifecycle: ``serve`` starts the writer at start-up and closes its stdin at
shutdown; the writer exits when its stdin reaches end of file (so also when
``serve`` is killed, even by ``kill -9``) and ignores SIGINT/SIGTERM, so a
signal to the process group lets the server drain its requests first. A writer
that died is started again by the next webhook; requests it held get a 503 and
are retried by their sender (dedupe keeps one row if the commit had happened).
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from syncd.events import ConsentEvent, iso, utcnow
from syncd.journal.base import Prepared, Recorded

log = logging.getLogger("syncd.journal")

_LENGTH = struct.Struct("!I")
MAX_FRAME = 16 * 1024 * 1024          # far above a capped body (journal.max_stored_body_bytes) and its row
START_SECONDS = 30.0                  # the writer opens (and checks) the journal before it answers "ready"
STOP_SECONDS = 10.0


class WriterUnavailable(OSError):
    """The ingest writer could not be reached or did not answer (the event may not be durable)."""


class WriteFailed(Exception):
    """The ingest writer could not commit the event (its SQLite error, as text)."""


class _PlainData(pickle.Unpickler):
    """Unpickles plain data only: a frame that names any class or function is refused
    (the documented way to restrict pickle, docs.python.org/3/library/pickle.html,
    "Restricting Globals")."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def loads_plain(data: bytes) -> Any:
    return _PlainData(io.BytesIO(data)).load()


def frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def _read_frame(conn: socket.socket) -> Any:
    """One whole frame from a blocking socket (the client side): an answer is a few
    dozen bytes, so one ``recv`` (one hand-back of the GIL) usually holds all of it."""
    data = conn.recv(4096)
    if not data:
        raise WriterUnavailable("ingest writer closed the connection")
    if len(data) < _LENGTH.size:
        data += _read_exactly(conn, _LENGTH.size - len(data))
    (size,) = _LENGTH.unpack_from(data)
    if size > MAX_FRAME:
        raise WriterUnavailable(f"ingest writer answered a frame of {size} bytes")
    body = data[_LENGTH.size:]
    if len(body) < size:
        body += _read_exactly(conn, size - len(body))
    return loads_plain(body)


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(left)
        if not chunk:
            raise WriterUnavailable("ingest writer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# --- the writer process ----------------------------------------------------------------
class _Connection:
    """The writer's side of one request thread's connection: bytes received so far."""

    __slots__ = ("sock", "buffer")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()

    def frames(self) -> list[bytes]:
        """Whole frames received so far (the rest stays buffered)."""
        out = []
        while len(self.buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self.buffer)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes")
            if len(self.buffer) < _LENGTH.size + size:
                break
            out.append(bytes(self.buffer[_LENGTH.size:_LENGTH.size + size]))
            del self.buffer[:_LENGTH.size + size]
        return out


class Writer:
    """Accepts request threads' connections and commits what they send, a batch per
    look: everything that arrived while the previous commit ran."""

    def __init__(self, insert: Callable[[list[Prepared]], list[Recorded]], db_error: type[Exception],
                 listener: socket.socket, parent: int):
        self.insert = insert
        self.db_error = db_error
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
            batch = self._look(None)
            if batch:
                self._commit(batch)

    def _look(self, timeout: float | None) -> list[tuple[_Connection, Any]]:
        """The requests that arrived (waiting up to ``timeout``; None: until one does)."""
        batch: list[tuple[_Connection, Any]] = []
        for key, _ in self.selector.select(timeout):
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
        items = [item for _, item in batch]
        results: list[Recorded | BaseException]
        try:
            results = list(self.insert(items))
        except self.db_error:   # rolled back as a whole: one event per transaction instead
            results = [self._insert_alone(item) for item in items]
        except Exception as exc:  # e.g. a frame of the wrong shape: nothing in the batch is durable
            results = [exc] * len(items)
        for (conn, _), result in zip(batch, results):
            if isinstance(result, BaseException):
                self._answer(conn, ("error", type(result).__name__, str(result)[:500]))
            else:
                self._answer(conn, ("ok", result.event_id, result.created))

    def _insert_alone(self, item: Any) -> Recorded | BaseException:
        try:
            return self.insert([item])[0]
        except Exception as exc:
            return exc

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
    """``python -m syncd.journal.ingest_process DB SOCKET MAX_BODY LEVEL FORMAT``."""
    db, sock_path, cap, level, fmt = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # serve drains its requests, then closes our stdin
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from syncd.journal.events import EventStore
    from syncd.journal.sqlite import SqliteEngine
    from syncd.logs import setup_logging

    setup_logging(level, fmt)
    engine = SqliteEngine(Path(db))
    store = EventStore(engine, int(cap))

    def insert(items: list[Prepared]) -> list[Recorded]:
        with engine.ingest() as tx:
            return store.insert_prepared(tx, items)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(256)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        Writer(insert, engine.db_error, listener, sys.stdin.fileno()).run()
    finally:
        listener.close()
        engine.close()
        logging.shutdown()
    return 0


# --- the server's side ----------------------------------------------------------------
class IngestProcess:
    """``serve``'s handle on its writer: start it, send it each webhook's event from
    the request's own thread, start it again when it dies (a watcher thread waits on
    it, so a request costs no liveness check), stop it at shutdown."""

    RESTART_PAUSE_SECONDS = 1.0     # between attempts when a writer cannot be started

    def __init__(self, db_path: str | Path, prepare: Callable[[ConsentEvent, str | None], Prepared],
                 max_stored_body_bytes: int, log_level: str = "INFO", log_format: str = "json"):
        self.db_path = str(db_path)
        self.prepare = prepare
        self.args = [str(max_stored_body_bytes), log_level, log_format]
        self.folder = tempfile.mkdtemp(prefix="syncd-ingest-")    # 0700: only this user can connect
        self.socket_path = os.path.join(self.folder, "writer.sock")
        self.last_ok = 0.0
        self.last_failed = 0.0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._proc: subprocess.Popen[bytes] | None = None
        self._generation = 0
        self._closed = False
        with self._lock:
            self._start()
        self._watcher = threading.Thread(target=self._watch, name="syncd-ingest-watch", daemon=True)
        self._watcher.start()

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    def _start(self) -> None:
        """(Holding the lock.) Start a writer and wait until it listens."""
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        proc = subprocess.Popen([sys.executable, "-m", "syncd.journal.ingest_process", self.db_path,
                                 self.socket_path, *self.args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        assert proc.stdout is not None
        ready = _readline(proc.stdout, START_SECONDS)
        proc.stdout.close()
        if ready != b"ready\n":
            proc.kill()
            proc.wait()
            raise RuntimeError("the journal's ingest writer did not start "
                               f"(exit status {proc.returncode}); see the log lines above")
        self._proc = proc
        self._generation += 1
        log.info("ingest writer started", extra={"pid": proc.pid})

    def _watch(self) -> None:
        """Wait on the writer; when it dies (not at shutdown), start another."""
        while True:
            proc = self._proc
            code = proc.wait() if proc is not None else None
            with self._lock:
                if self._closed:
                    return
                log.error("ingest writer exited; starting it again", extra={"exit_status": code})
                self._generation += 1           # every request thread reconnects
                try:
                    self._start()
                    continue
                except (OSError, RuntimeError) as exc:
                    log.error("ingest writer could not be started", extra={"error": str(exc)[:300]})
            time.sleep(self.RESTART_PAUSE_SECONDS)

    def _connection(self) -> socket.socket:
        """This thread's connection to the current writer."""
        conn: socket.socket | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.generation == self._generation:
            return conn
        self._forget()
        with self._lock:
            if self._closed:
                raise WriterUnavailable("the journal's ingest writer is stopped (shutting down)")
            generation = self._generation
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.socket_path)
        except OSError:
            conn.close()
            raise
        self._local.conn, self._local.generation = conn, generation
        return conn

    def _forget(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def submit(self, event: ConsentEvent) -> Recorded:
        """Commit ``event``; returns only after its row is on disk (or raises)."""
        message = frame(self.prepare(event, iso(utcnow())))
        try:
            conn = self._connection()
            conn.sendall(message)
            answer = _read_frame(conn)
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            self._forget()
            self.last_failed = time.monotonic()
            if isinstance(exc, WriterUnavailable):
                raise
            raise WriterUnavailable(f"ingest writer unavailable: {exc}") from exc
        if answer[0] != "ok":
            self.last_failed = time.monotonic()
            raise WriteFailed(f"{answer[1]}: {answer[2]}")
        self.last_ok = time.monotonic()
        return Recorded(int(answer[1]), bool(answer[2]))

    def close(self) -> None:
        """Let the writer finish what it holds and exit (it sees its stdin close)."""
        with self._lock:
            self._closed = True
            proc = self._proc
        if proc is not None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forget()
        shutil.rmtree(self.folder, ignore_errors=True)


def _readline(stream: Any, timeout: float) -> bytes:
    """One line from a child's stdout, or b"" after ``timeout`` seconds."""
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    try:
        if not selector.select(timeout):
            return b""
        return bytes(stream.readline())
    finally:
        selector.close()


if __name__ == "__main__":
    sys.exit(writer_main(sys.argv[1:]))
