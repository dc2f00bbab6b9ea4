"""Grouped lookups: concurrent ``get`` calls answered by shared reads, each caller
with its own answer, every caller woken whatever the read does."""
from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.lookup_group import LookupGroup


def run_concurrently(group: LookupGroup, keys: list, timeout: float = 10.0) -> list:
    results: list = [None] * len(keys)
    start = threading.Barrier(len(keys))

    def one(i: int) -> None:
        start.wait()
        try:
            results[i] = ("ok", group.get(keys[i]))
        except Exception as exc:   # the caller's answer, kept for the assertion
            results[i] = ("error", exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a caller was never woken"
    return results


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=-50, max_value=50), min_size=1, max_size=24))
def test_each_caller_gets_the_answer_for_its_own_key(keys):
    calls: list[list[int]] = []

    def read_many(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        return [k * 10 for k in batch]

    results = run_concurrently(LookupGroup(read_many), keys)
    assert results == [("ok", k * 10) for k in keys]
    assert sorted(k for batch in calls for k in batch) == sorted(keys)   # every key read exactly once


def test_callers_that_arrive_during_a_read_share_the_next_one():
    first_read_started, release_first = threading.Event(), threading.Event()
    calls: list[list[str]] = []

    def read_many(batch: list[str]) -> list[str]:
        calls.append(list(batch))
        if len(calls) == 1:
            first_read_started.set()
            assert release_first.wait(10)
        return [k.upper() for k in batch]

    group: LookupGroup[str, str] = LookupGroup(read_many)
    leader_answer: list[str] = []
    leader = threading.Thread(target=lambda: leader_answer.append(group.get("a")))
    leader.start()
    assert first_read_started.wait(10)
    followers: list[str] = []
    threads = [threading.Thread(target=lambda k=k: followers.append(group.get(k))) for k in "bcdef"]
    for t in threads:
        t.start()
    while len(group.pending) < 5:          # all five queued behind the read in progress
        threading.Event().wait(0.001)
    release_first.set()
    for t in [leader, *threads]:
        t.join(10)
    assert leader_answer == ["A"] and sorted(followers) == list("BCDEF")
    assert len(calls) == 2 and calls[0] == ["a"] and sorted(calls[1]) == list("bcdef")


def test_a_failed_read_fails_every_caller_of_its_batch_and_the_next_batch_runs():
    gate = threading.Event()
    fail = [True]

    def read_many(batch: list[int]) -> list[int]:
        if fail[0]:
            gate.wait(0.2)                 # let the others queue behind it
            fail[0] = False
            raise RuntimeError("database is locked")
        return list(batch)

    group: LookupGroup[int, int] = LookupGroup(read_many)
    results = run_concurrently(group, list(range(8)))
    assert group.get(99) == 99 and group.busy is False   # the group is not left stuck
    errors = [r for r in results if r[0] == "error"]
    assert errors and all(isinstance(e, RuntimeError) and "locked" in str(e) for _, e in errors)
    assert all(r == ("ok", i) for i, r in enumerate(results) if r[0] == "ok")
    assert sum(r[0] == "ok" for r in results) + len(errors) == 8


def test_a_short_answer_fails_the_unanswered_callers_instead_of_hanging_them():
    group: LookupGroup[int, int] = LookupGroup(lambda batch: [])
    with pytest.raises(RuntimeError, match="interrupted"):
        group.get(1)
    assert group.busy is False


def test_batches_are_capped():
    sizes: list[int] = []
    hold = threading.Event()

    def read_many(batch: list[int]) -> list[int]:
        sizes.append(len(batch))
        if len(sizes) == 1:
            hold.wait(0.3)
        return batch

    results = run_concurrently(LookupGroup(read_many, max_batch=3), list(range(12)))
    assert results == [("ok", i) for i in range(12)]
    assert max(sizes) <= 3 and sum(sizes) == 12
