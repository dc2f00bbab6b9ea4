"""Leader batches: concurrent callers' items handled together, without a thread of
its own. The first caller to find no batch in progress handles every item queued so
far; the others sleep on a lock of their own and are woken exactly once, with their
outcome or to lead the next batch. Group commit (journal/group_commit.py) and the
consent API's grouped reads (lookup_group.py) are the two uses.
"""
from __future__ import annotations

import threading
from typing import Generic, TypeVar

I = TypeVar("I")
R = TypeVar("R")


class Waiter(Generic[I, R]):
    """One caller waiting in a batch; its lock is released exactly once."""

    __slots__ = ("item", "result", "error", "lead", "lock")

    def __init__(self, item: I):
        self.item = item
        self.result: R | None = None
        self.error: BaseException | None = None
        self.lead = False
        self.lock = threading.Lock()
        self.lock.acquire()

    def outcome(self) -> R:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]   # R may itself admit None


class LeaderBatches(Generic[I, R]):
    """Subclasses say how a batch is handled (:meth:`_handle`) and, optionally, how
    it is taken from the queue (:meth:`_take`, e.g. after a short wait for company)."""

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.pending: list[Waiter[I, R]] = []
        self.busy = False

    def submit(self, item: I) -> R:
        me: Waiter[I, R] = Waiter(item)
        with self.mutex:
            self.pending.append(me)
            lead = not self.busy
            self.busy = True
            self._joined()
        if not lead:
            me.lock.acquire()
            if not me.lead:
                return me.outcome()
        with self.mutex:
            batch = self._take()
        try:
            self._handle(batch, me)
        finally:
            with self.mutex:
                if self.pending:
                    successor = self.pending[0]
                    successor.lead = True
                    successor.lock.release()
                else:
                    self.busy = False
        return me.outcome()

    def _joined(self) -> None:
        """(Holding the mutex.) An item was queued."""

    def _take(self) -> list[Waiter[I, R]]:
        """(Holding the mutex.) The next batch: everything queued."""
        batch, self.pending = self.pending, []
        return batch

    def _handle(self, batch: list[Waiter[I, R]], leader: Waiter[I, R]) -> None:
        """Give every waiter of ``batch`` its outcome and :func:`settle` them."""
        raise NotImplementedError


def settle(batch: list[Waiter[I, R]], leader: Waiter[I, R], outcomes: list[R | BaseException],
           missing: str) -> None:
    """Hand each waiter its outcome (an exception is raised to its caller) and wake
    all but ``leader``, whatever is missing: a waiter left asleep would hang its request."""
    for i, waiter in enumerate(batch):
        outcome = outcomes[i] if i < len(outcomes) else RuntimeError(missing)
        if isinstance(outcome, BaseException):
            waiter.error = outcome
        else:
            waiter.result = outcome
        if waiter is not leader:
            waiter.lock.release()
