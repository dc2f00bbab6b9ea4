"""``serve``'s webhook commits, in a writer process of their own (SQLite journal).

Why: group commit in the server's own request threads (group_commit.py) puts
each commit on the critical path of every waiting webhook, and in one process
that path competes for the GIL with every other request: the driver gives up the
GIL around each SQLite call, and the committing thread then queues for it again
behind the threads parsing the next webhooks. Measured served under 16 clients
(bench/README.md): a commit of ~6 events took 3.0-3.4 ms of wall time against
~0.9 ms in a quiet process. Here each request thread prepares its row
(EventStore.prepare), sends it to the writer (ingest_writer.py; the protocol is
ingest_wire.py) and sleeps until its commit answers: a webhook is still answered
only after its own row is on disk.

A writer that dies is started again at once by a watcher thread; requests it
held get a 503 and are retried by their sender (dedupe keeps one row if the
commit had happened).
"""
from __future__ import annotations

import logging
import os
import pickle
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from syncd.events import ConsentEvent, iso, utcnow
from syncd.journal.base import Prepared, Recorded
from syncd.journal.ingest_wire import WriteFailed, WriterUnavailable, frame, read_frame

log = logging.getLogger("syncd.journal")

START_SECONDS = 30.0                  # the writer opens (and checks) the journal before it answers "ready"
STOP_SECONDS = 10.0


class IngestProcess:
    """``serve``'s handle on its writer: start it, send it each webhook's event from
    the request's own thread, start it again when it dies (a watcher thread waits on
    it, so a request costs no liveness check), stop it at shutdown."""

    RESTART_PAUSE_SECONDS = 1.0     # between attempts when a writer cannot be started

    def __init__(self, db_path: str | Path, prepare: Callable[[ConsentEvent, str | None], Prepared],
                 log_level: str = "INFO", log_format: str = "json"):
        self.db_path = str(db_path)
        self.prepare = prepare      # EventStore.prepare: the row, its body already capped
        self.args = [log_level, log_format]
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
        proc = subprocess.Popen([sys.executable, "-m", "syncd.journal.ingest_writer", self.db_path,
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
        log.info("ingest writer started", extra={"pid": proc.pid, "socket": self.socket_path})

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
            answer = read_frame(conn)
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
