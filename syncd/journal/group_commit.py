"""Group commit: many concurrent webhooks, one transaction and one fsync.

A webhook is answered only after its event is committed. Committing each one
alone costs a transaction (and, on SQLite, an fsync) per webhook; here
concurrent requests share one. Used by both journal engines.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Sequence, TypeVar

from syncd.batching import LeaderBatches, Waiter, settle
from syncd.events import ConsentEvent
from syncd.journal.base import Recorded

# Inserts events in one transaction of its own (committed when it returns), one
# result per event in order; raises the driver's error when it rolled back.
InsertBatch = Callable[[list[ConsentEvent]], list[Recorded]]
T = TypeVar("T")


def insert_each_on_failure(insert: Callable[[list[T]], Sequence[Recorded]], items: list[T],
                           retry_on: type[BaseException] | tuple[type[BaseException], ...]
                           ) -> list[Recorded | BaseException]:
    """``insert(items)`` in one transaction; when it raises ``retry_on`` (rolled back as a
    whole: nothing in it is durable), each item in a transaction of its own, so a bad row
    fails only its own request (PostgreSQL aborts a transaction at its first error).
    Group commit and the SQLite ingest writer process (ingest_writer.py) both use it."""
    try:
        return list(insert(items))
    except retry_on:
        results: list[Recorded | BaseException] = []
        for item in items:
            try:
                results.append(insert([item])[0])
            except retry_on as exc:
                results.append(exc)
        return results


class GroupCommit(LeaderBatches[ConsentEvent, Recorded]):
    """Group commit without a writer thread (:class:`~syncd.batching.LeaderBatches`):
    the first request to find no commit in progress commits everything queued so far
    in one transaction (one fsync); each ``submit`` returns only after its own commit.

    A leader that finds fewer events queued than the previous commit carried
    waits up to ``GATHER_SECONDS`` for them: the requests released by a commit
    come back together, and without the wait the first of them would commit
    alone (under 8 concurrent requests, half the commits carried one event).
    """

    # How long a leader waits for the requests that filled the previous commit.
    GATHER_SECONDS = 0.002

    def __init__(self, insert_batch: InsertBatch, db_error: type[Exception] | tuple[type[Exception], ...]):
        super().__init__()
        self.insert_batch = insert_batch
        self.db_error = db_error
        self.gathered = threading.Condition(self.mutex)
        self.last_batch = 1
        self.gather_target = 0
        # time.monotonic() of the newest commit that succeeded / failed (0.0: none yet),
        # so readiness can trust live traffic instead of writing a probe of its own.
        self.last_ok = 0.0
        self.last_failed = 0.0

    def _joined(self) -> None:
        if self.gather_target and len(self.pending) >= self.gather_target:
            self.gathered.notify()

    def _take(self) -> list[Waiter[ConsentEvent, Recorded]]:
        self._gather()
        batch = super()._take()
        self.last_batch = len(batch)
        return batch

    def _gather(self) -> None:
        """(Holding the mutex.) Wait briefly until as many events are queued as last time."""
        target = self.last_batch
        if len(self.pending) >= target:
            return
        self.gather_target = target
        try:
            self.gathered.wait_for(lambda: len(self.pending) >= target, timeout=self.GATHER_SECONDS)
        finally:
            self.gather_target = 0

    def _handle(self, batch: list[Waiter[ConsentEvent, Recorded]],
                leader: Waiter[ConsentEvent, Recorded]) -> None:
        """Commit ``batch``; every waiter gets its outcome whatever happens."""
        results: list[Recorded | BaseException] = []
        try:
            results = insert_each_on_failure(self.insert_batch, [w.item for w in batch], self.db_error)
        except BaseException as exc:  # not a database error: nothing in the batch is durable
            results = [exc] * len(batch)
        finally:
            if any(isinstance(r, BaseException) for r in results) or len(results) < len(batch):
                self.last_failed = time.monotonic()
            else:
                self.last_ok = time.monotonic()
            settle(batch, leader, results, "journal commit interrupted")
