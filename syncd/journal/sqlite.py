"""SQLite journal (WAL, synchronous=FULL): the embedded default.

Reads use one connection per thread; writes share one connection, each a
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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from syncd.journal.base import JournalBusy
from syncd.journal.group_commit import GroupCommit
from syncd.journal import migrate
from syncd.journal.sql import SqlJournal, new_owner

log = logging.getLogger("syncd.journal")

CLAIM_REFLECTIONS = """
UPDATE reflections SET lease_until = ?, lease_owner = ?, attempts = attempts + 1
WHERE id IN (SELECT id FROM reflections WHERE state = 'pending' AND next_attempt_at <= ?
             AND lease_until < ? ORDER BY next_attempt_at, id LIMIT ?)
RETURNING id
"""

CLAIM = """
UPDATE deliveries SET lease_until = ?, lease_owner = ?, attempts = attempts + 1
WHERE id IN (
  SELECT d.id FROM deliveries d
  WHERE d.state = 'pending' AND d.next_attempt_at <= ? AND d.lease_until < ?
    AND (? IS NULL OR d.crm = ?)
    AND NOT EXISTS (SELECT 1 FROM deliveries o WHERE o.crm = d.crm AND o.obj = d.obj
                    AND o.record_id = d.record_id AND o.state = 'pending' AND o.lease_until >= ?)
  ORDER BY d.next_attempt_at, d.id LIMIT ?)
RETURNING id
"""


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


class SqliteJournal(SqlJournal):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.owner = new_owner()
        self._local = threading.local()
        self._lock_fd: int | None = None
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._group = GroupCommit(self._insert_batch, sqlite3.Error)
        make_private_dirs(self.path.parent)
        make_private_files(self.path)
        self._migrate()

    @classmethod
    def from_url(cls, url: str, base_dir: str | Path | None = None) -> "SqliteJournal":
        raw = url[len("sqlite:///"):]
        if not raw:
            raise ValueError("journal.url: sqlite:/// needs a file path")
        path = Path(raw)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
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

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        """A write transaction on the one writer connection (writes in a process take
        turns anyway; one connection keeps its page cache warm across them)."""
        with self._write_lock:
            conn = self._writer
            if conn is None:
                conn = self._writer = self._connect()
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")
            finally:
                cur.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        conn = self._conn()
        cur = conn.cursor()
        cur.execute("BEGIN")
        try:
            yield cur
        finally:
            conn.execute("COMMIT")
            cur.close()

    def _migrate(self) -> None:
        """Apply the schema's migrations this file has not seen (one transaction)."""
        with self._write() as cur:
            cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'")
            current = 0
            if cur.fetchone() is not None:
                cur.execute("SELECT MAX(version) FROM schema_version")
                current = cur.fetchone()[0] or 0
            migrate.apply(cur.execute, "sqlite", current, str(self.path))

    def _claim_ids(self, cur: Any, now: float, limit: int, until: float, crm: str | None = None) -> list[int]:
        cur.execute(CLAIM, (until, self.owner, now, now, crm, crm, now, limit))
        return [r[0] for r in cur.fetchall()]

    def _claim_reflection_ids(self, cur: Any, now: float, limit: int, until: float) -> list[int]:
        cur.execute(CLAIM_REFLECTIONS, (until, self.owner, now, now, limit))
        return [r[0] for r in cur.fetchall()]

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
        with self._write() as cur:
            cur.execute("UPDATE deliveries SET lease_until = 0, lease_owner = NULL "
                        "WHERE state = 'pending' AND lease_until > 0")
            cur.execute("UPDATE reflections SET lease_until = 0 WHERE state = 'pending' AND lease_until > 0")
            # Routing leases too (a deferred phone lookup is simply tried again now).
            cur.execute("UPDATE events SET next_route_at = 0 WHERE status = 'new' AND next_route_at > 0")

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
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
