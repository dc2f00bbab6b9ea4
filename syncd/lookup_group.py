"""Grouped reads: concurrent single-key lookups answered by one statement.

The consent API reads one ledger key per request. On SQLite each read is three
calls into the library (step to the row, step to the end, reset), and each call
gives up the GIL; under eight request threads every give-up is a hand-off between
threads, so the reads cost more in context switches than in SQLite. Here the first
request to find no read in progress reads every key queued so far with one
statement that answers in one row; the others wait and are woken once, with their
answer or to lead the next read (:class:`~syncd.batching.LeaderBatches`, as group
commit, without its gathering wait: a read is cheap, so nobody is held back for
company).
"""
from __future__ import annotations

from typing import Callable, Hashable, TypeVar

from syncd.batching import LeaderBatches, Waiter, settle

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LookupGroup(LeaderBatches[K, V]):
    """``get(key)`` from many threads; ``read_many(keys)`` answers keys in order,
    at most ``max_batch`` at a time."""

    def __init__(self, read_many: Callable[[list[K]], list[V]], max_batch: int = 500):
        super().__init__()
        self.read_many = read_many
        self.max_batch = max_batch

    def get(self, key: K) -> V:
        return self.submit(key)

    def _take(self) -> list[Waiter[K, V]]:
        batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
        return batch

    def _handle(self, batch: list[Waiter[K, V]], leader: Waiter[K, V]) -> None:
        values: list[V | BaseException] = []
        try:
            values = list(self.read_many([w.item for w in batch]))
        except BaseException as exc:   # every request of the batch answers with it (a 503)
            values = [exc] * len(batch)
        finally:
            settle(batch, leader, values, "lookup interrupted")
