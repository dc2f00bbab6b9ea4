"""Group commit: many concurrent webhooks, one transaction and one fsync.

A webhook is answered only after its event is committed. Committing each one
alone costs a transaction (and, on SQLite, an fsync) per webhook; here
concurrent requests share one. Used by both journal engines.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from syncd.events import ConsentEvent
from syncd.journal.base import Recorded

# Inserts events in one transaction of its own (committed when it returns), one
# result per event in order; raises the driver's error when it rolled back.
InsertBatch = Callable[[list[ConsentEvent]], list[Recorded]]


class _Waiter:
    """One request waiting in a group commit; its lock is released exactly once:
    with its outcome, or to make it the next leader."""

    __slots__ = ("event", "result", "error", "lead", "lock")

    def __init__(self, event: ConsentEvent):
        self.event = event
        self.result: Recorded | None = None
        self.error: BaseException | None = None
        self.lead = False
        self.lock = threading.Lock()
        self.lock.acquire()

    def outcome(self) -> Recorded:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class GroupCommit:
    """Group commit without a writer thread: the first request to find no commit
    in progress commits everything queued so far in one transaction (one fsync).
    Each waiter is woken once, by the commit that holds its event; if more
    requests queued meanwhile, the first of them is woken to lead the next
    commit. Each ``submit`` returns only after its own commit.

    A leader that finds fewer events queued than the previous commit carried
    waits up to ``GATHER_SECONDS`` for them: the requests released by a commit
    come back together, and without the wait the first of them would commit
    alone (under 8 concurrent requests, half the commits carried one event).
    """

    # How long a leader waits for the requests that filled the previous commit.
    GATHER_SECONDS = 0.002

    def __init__(self, insert_batch: InsertBatch, db_error: type[Exception] | tuple[type[Exception], ...]):
        self.insert_batch = insert_batch
        self.db_error = db_error
        self.mutex = threading.Lock()
        self.gathered = threading.Condition(self.mutex)
        self.pending: list[_Waiter] = []
        self.committing = False
        self.last_batch = 1
        self.gather_target = 0
        # time.monotonic() of the newest commit that succeeded / failed (0.0: none yet),
        # so readiness can trust live traffic instead of writing a probe of its own.
        self.last_ok = 0.0
        self.last_failed = 0.0

    def submit(self, event: ConsentEvent) -> Recorded:
        me = _Waiter(event)
        with self.mutex:
            self.pending.append(me)
            lead = not self.committing
            self.committing = True
            if self.gather_target and len(self.pending) >= self.gather_target:
                self.gathered.notify()
        if not lead:
            me.lock.acquire()
            if not me.lead:
                return me.outcome()
        with self.mutex:
            self._gather()
            batch, self.pending = self.pending, []
            self.last_batch = len(batch)
        try:
            self._commit(batch, me)
        finally:
            with self.mutex:
                if self.pending:
                    successor = self.pending[0]
                    successor.lead = True
                    successor.lock.release()
                else:
                    self.committing = False
        return me.outcome()

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

    def _insert_alone(self, event: ConsentEvent) -> Recorded | BaseException:
        """After a batch failed: one event in its own transaction, so a bad row fails
        only its own request (PostgreSQL aborts a transaction at its first error)."""
        try:
            return self.insert_batch([event])[0]
        except self.db_error as exc:
            return exc

    def _commit(self, batch: list[_Waiter], leader: _Waiter) -> None:
        """Commit ``batch`` and wake every waiter in it but ``leader`` (the caller),
        whatever happens: a waiter left asleep would hang its request forever."""
        results: list[Recorded | BaseException] = []
        try:
            try:
                results = list(self.insert_batch([w.event for w in batch]))
            except self.db_error:  # rolled back as a whole: nothing in the batch is durable
                results = [self._insert_alone(w.event) for w in batch]
        except BaseException as exc:  # not a database error: nothing in the batch is durable
            results = [exc] * len(batch)
        finally:
            if any(isinstance(r, BaseException) for r in results) or len(results) < len(batch):
                self.last_failed = time.monotonic()
            else:
                self.last_ok = time.monotonic()
            for i, waiter in enumerate(batch):
                result = results[i] if i < len(results) else RuntimeError("journal commit interrupted")
                if isinstance(result, BaseException):
                    waiter.error = result
                else:
                    waiter.result = result
                if waiter is not leader:
                    waiter.lock.release()
