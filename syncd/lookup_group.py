"""Grouped reads: concurrent single-key lookups answered by one statement.

The consent API reads one ledger key per request. On SQLite each read is three
calls into the library (step to the row, step to the end, reset), and each call
gives up the GIL; under eight request threads every give-up is a hand-off between
threads, so the reads cost more in context switches than in SQLite. Here the first
request to find no read in progress reads every key queued so far with one
statement that answers in one row; the others wait on a lock of their own and are
woken once, with their answer or to lead the next read (group commit's scheme,
without the gathering wait: a read is cheap, so nobody is held back for company).
"""
from __future__ import annotations

import threading
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Waiter(Generic[K, V]):
    __slots__ = ("key", "value", "error", "lead", "lock")

    def __init__(self, key: K):
        self.key = key
        self.value: V | None = None
        self.error: BaseException | None = None
        self.lead = False
        self.lock = threading.Lock()
        self.lock.acquire()


class LookupGroup(Generic[K, V]):
    """``get(key)`` from many threads; ``read_many(keys)`` answers keys in order."""

    def __init__(self, read_many: Callable[[list[K]], list[V]], max_batch: int = 500):
        self.read_many = read_many
        self.max_batch = max_batch
        self.mutex = threading.Lock()
        self.pending: list[_Waiter[K, V]] = []
        self.reading = False

    def get(self, key: K) -> V:
        me: _Waiter[K, V] = _Waiter(key)
        with self.mutex:
            self.pending.append(me)
            lead = not self.reading
            self.reading = True
        if not lead:
            me.lock.acquire()
            if not me.lead:
                return self._outcome(me)
        with self.mutex:
            batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
        try:
            self._read(batch, me)
        finally:
            with self.mutex:
                if self.pending:
                    successor = self.pending[0]
                    successor.lead = True
                    successor.lock.release()
                else:
                    self.reading = False
        return self._outcome(me)

    def _read(self, batch: list[_Waiter[K, V]], leader: _Waiter[K, V]) -> None:
        """Answer ``batch`` and wake every waiter in it but ``leader``, whatever
        happens: a waiter left asleep would hang its request."""
        values: list[V] = []
        error: BaseException | None = None
        try:
            values = self.read_many([w.key for w in batch])
        except BaseException as exc:   # every request of the batch answers with it (a 503)
            error = exc
        finally:
            for i, waiter in enumerate(batch):
                if error is not None or i >= len(values):
                    waiter.error = error or RuntimeError("lookup interrupted")
                else:
                    waiter.value = values[i]
                if waiter is not leader:
                    waiter.lock.release()

    @staticmethod
    def _outcome(waiter: _Waiter[K, V]) -> V:
        if waiter.error is not None:
            raise waiter.error
        return waiter.value  # type: ignore[return-value]   # V may itself admit None
