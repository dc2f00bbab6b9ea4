"""SQLite journal (WAL, synchronous=FULL): the embedded default.

The engine under the journal's stores (:mod:`syncd.journal.engine`). Reads use
one connection per thread; writes share one connection, each a
``BEGIN IMMEDIATE`` transaction, so a webhook is answered only after its row is on
disk. Writers in this process take turns on a lock instead of SQLite's busy handler (whose back-off sleeps up to
100 ms), and webhooks are group-committed (:mod:`syncd.journal.group_commit`): one transaction
and one fsync for every event queued while the previous commit ran. One ``serve`` per file is
enforced by an exclusive ``flock`` on ``<file>.serve.lock`` (released by the
kernel when the process dies, even by ``kill -9``).
"""
from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import stat
import threading
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Iterator

from syncd.journal import migrate
from syncd.journal.base import JournalBusy, JournalMissing
from syncd.journal.engine import Tx, load_queries, new_owner

log = logging.getLogger("syncd.journal")

def make_private_dirs(folder: Path) -> None:
    """Create the missing folders of ``folder`` as 0700 (whatever the umask); folders
    that already exist are the operator's and left as they are."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)  # mkdir's mode passes through the umask


def make_private_files(db: Path) -> None:
    """The journal holds phones, emails and message texts: its file is created 0600
    before SQLite opens it (SQLite creates ``-wal`` and ``-shm`` with the database
    file's mode), and an existing file readable by others is narrowed to 0600."""
    fd = os.open(db, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            try:
                os.chmod(path, 0o600)
            except PermissionError:  # not ours to change: say so, keep working
                log.warning("journal file is readable by other users", extra={"path": str(path),
                                                                              "mode": oct(mode)})
            else:
                log.warning("journal file was readable by other users; narrowed to 0600",
                            extra={"path": str(path), "mode": oct(mode)})


class SqliteEngine:
    dialect = "sqlite"
    db_error = sqlite3.Error

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.owner = new_owner()
        self.queries = load_queries(self.dialect)
        self._local = threading.local()
        self._lock_fd: int | None = None
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._writers_fd: int | None = None
        make_private_dirs(self.path.parent)
        make_private_files(self.path)
        self._migrate()

    @classmethod
    def from_url(cls, url: str, base_dir: str | Path | None = None, must_exist: bool = False) -> "SqliteEngine":
        raw = url[len("sqlite:///"):]
        if not raw:
            raise ValueError("journal.url: sqlite:/// needs a file path")
        path = Path(raw)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if must_exist and not path.is_file():
            raise JournalMissing(f"journal not found: {path} (journal.url); check the path, "
                                 "or run `syncd serve` once to create it")
        return cls(path)

    # --- connections -----------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        with self._all_lock:
            self._all.append(conn)
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, for reads."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def ingest(self) -> AbstractContextManager[Tx]:
        return self.begin()

    @contextmanager
    def begin(self) -> Iterator[Tx]:
        """A write transaction on the one writer connection (writes in a process take
        turns anyway; one connection keeps its page cache warm across them)."""
        with self._write_lock, self._writers_turn():
            conn = self._writer
            if conn is None:
                conn = self._writer = self._connect()
                # A statement's undo log (SQLite's statement journal) stays in memory: by
                # default it spills to a temporary file past 64 KiB, and a group commit's
                # multi-row statements crossed that on about every other commit (a file
                # created, written and unlinked per commit). Bounded by the largest statement.
                conn.execute("PRAGMA temp_store=MEMORY")
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(cur, self.queries)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")
            finally:
                cur.close()

    @contextmanager
    def _writers_turn(self) -> Iterator[None]:
        """Writers in every process take turns on an ``flock`` of ``<file>.write.lock``
        (``serve``'s ingest writer process, its scheduler, a CLI command): a waiter is
        woken the moment the lock is free, where SQLite's busy handler would sleep and
        poll (1, 2, 5, 10... ms), and a steady stream of webhook commits could keep a
        push waiting through poll after poll."""
        if self._writers_fd is None:
            self._writers_fd = os.open(f"{self.path}.write.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._writers_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._writers_fd, fcntl.LOCK_UN)

    @contextmanager
    def read(self) -> Iterator[Tx]:
        conn = self._conn()
        cur = conn.cursor()
        cur.execute("BEGIN")
        try:
            yield Tx(cur, self.queries)
        finally:
            conn.execute("COMMIT")
            cur.close()

    def read_one(self, query: str, /, **params: Any) -> dict[str, Any] | None:
        """The first row of one read statement, run on its own (SQLite reads a single
        statement consistently without BEGIN/COMMIT: a third of the calls of
        :meth:`read`, for the consent API's per-request lookup)."""
        sql, args = self.queries[query].render(params)
        cur = self._conn().execute(sql, args)
        rows = cur.fetchall()   # to the end: the statement resets and ends its read snapshot now
        return dict(zip([d[0] for d in cur.description], rows[0])) if rows else None

    def _migrate(self) -> None:
        """Apply the schema's migrations this file has not seen (one transaction)."""
        with self.begin() as tx:
            cur = tx.cur
            cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'")
            current = 0
            if cur.fetchone() is not None:
                cur.execute("SELECT MAX(version) FROM schema_version")
                current = cur.fetchone()[0] or 0
            migrate.apply(cur.execute, "sqlite", current, str(self.path))

    def before_lease(self) -> None:
        return None

    def lock_claims(self, tx: Tx) -> None:
        return None   # one writer connection: claims already take turns

    def take_over_dead_leases(self) -> int:
        """SQLite frees dead processes' leases once, when ``serve`` takes the file's lock."""
        return 0

    # One serve per file: it is always the poller's leader.
    def try_leadership(self, name: str) -> bool:
        return True

    def is_leader(self, name: str) -> bool:
        return True

    def resign(self, name: str) -> None:
        return None

    # --- single-writer lock ----------------------------------------------------------
    def acquire_serve_lock(self) -> None:
        """Refuse a second ``serve`` on this file (other commands may run beside it)."""
        lock_path = str(self.path) + ".serve.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip()
            finally:
                os.close(fd)
            raise JournalBusy(f"another syncd serve (pid {holder or 'unknown'}) is using journal "
                              f"{self.path}; one serve per SQLite journal (use PostgreSQL for replicas)")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        # Holding the lock proves no other serve runs: every live lease belongs to a
        # process that died (kill -9, power loss), so its work is resumed at once.
        with self.begin() as tx:
            tx.execute("free_delivery_leases")
            tx.execute("free_reflection_leases")
            # Routing leases too (a deferred phone lookup is simply tried again now).
            tx.execute("free_routing_leases")

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()
        self._writer = None
        with self._write_lock:
            if self._writers_fd is not None:
                os.close(self._writers_fd)
                self._writers_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
