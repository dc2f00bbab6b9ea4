"""The consent ledger: its precedence rules (pure, and with hypothesis), kept in the
event insert's own transaction (also on the group-commit path), rebuilt from the
events identically, and built by the migration from an existing journal's events."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.events import ConsentEvent
from syncd.journal.ledger import CHANNELS, Entry, entries_for, fold, wins

T0 = datetime(2024, 2, 18, 9, 45, tzinfo=timezone.utc)
PHONE = "+13305551234"


def event(n: int, kind: str = "opt_out", channel: str | None = "sms", at: int = 0, **kw) -> ConsentEvent:
    base = dict(source="apten", source_event_id=f"ev-{n}", kind=kind, channel=channel,
                occurred_at=T0 + timedelta(seconds=at), received_at=datetime.now(timezone.utc),
                raw=b'{"x": 1}', phone=PHONE, phone_raw=PHONE)
    base.update(kw)
    return ConsentEvent(**base)


def entry(state: str, at: int, event_id: int = 1) -> Entry:
    return Entry(PHONE, "sms", state, f"2024-02-18T09:45:{at:02d}.000000Z", "apten", event_id)  # type: ignore[arg-type]


# --- the rules, pure -----------------------------------------------------------------
def test_newest_wins_and_an_opt_out_wins_a_tie():
    assert wins(entry("opted_in", 5), entry("opted_out", 4))
    assert not wins(entry("opted_in", 4), entry("opted_out", 5))
    assert wins(entry("opted_out", 5), entry("opted_in", 5))
    assert not wins(entry("opted_in", 5), entry("opted_out", 5))
    assert wins(entry("opted_out", 0), None)


def test_do_not_contact_and_all_cover_every_channel_and_unmodelled_changes_nothing():
    row = {"source": "apten", "kind": "do_not_contact", "channel": "all", "phone": PHONE,
           "email": " Jane@Example.COM ", "occurred_at": "2024-02-18T09:45:00.000000Z"}
    got = {(e.identity, e.channel, e.state) for e in entries_for(row, 7)}
    assert got == {(PHONE, "sms", "opted_out"), (PHONE, "call", "opted_out"), (PHONE, "whatsapp", "opted_out"),
                   ("jane@example.com", "email", "opted_out")}
    assert {e.channel for e in entries_for({**row, "kind": "opt_out"}, 7)} == set(CHANNELS)
    assert entries_for({**row, "source": "sinch", "kind": "opt_out", "channel": None}, 8) == []
    assert entries_for({**row, "kind": "opt_out", "event_type": "reflection_result"}, 9) == []


states = st.sampled_from(["opted_out", "opted_in"])
stream = st.lists(st.tuples(states, st.integers(0, 5)), min_size=1, max_size=12)


@given(stream)
def test_fold_keeps_the_newest_with_opt_out_winning_ties(items):
    entries = [entry(s, at, i + 1) for i, (s, at) in enumerate(items)]
    final = fold(entries)[(PHONE, "sms")]
    newest = max(at for _, at in items)
    at_newest = {s for s, at in items if at == newest}
    assert final.since.endswith(f"{newest:02d}.000000Z")
    assert final.state == ("opted_out" if "opted_out" in at_newest else "opted_in")


@given(stream)
def test_an_opt_out_is_undone_only_by_a_newer_opt_in(items):
    entries = [entry(s, at, i + 1) for i, (s, at) in enumerate(items)]
    final = fold(entries)[(PHONE, "sms")]
    outs = [at for s, at in items if s == "opted_out"]
    if final.state == "opted_in" and outs:
        assert all(at < int(final.since[17:19]) for at in outs)


# --- the store, on each engine ---------------------------------------------------------
def snapshot(journal):
    return sorted(journal.ledger.all(), key=lambda e: (e.identity, e.channel))


def test_apply_with_the_insert_and_state_lookups(journal):
    journal.events.record(event(1, at=0))
    journal.events.record(event(2, kind="opt_in", at=5))
    journal.events.record(event(3, kind="opt_out", at=3))              # older: changes nothing
    journal.events.record(event(4, channel="all", at=1, email="Jane@Example.com"))
    journal.events.record(event(5, source="sinch", channel=None, at=9))  # unmodelled channel
    sms = journal.ledger.state(PHONE, "sms")
    assert (sms.state, sms.source) == ("opted_in", "apten")
    assert sms.since == "2024-02-18T09:45:05.000000Z"
    call, email, unknown = journal.ledger.states([(PHONE, "call"), ("jane@example.com", "email"),
                                                  ("+4915112345678", "sms")])
    assert call.state == "opted_out" and email.state == "opted_out" and unknown is None
    recorded = journal.events.record(event(1, kind="opt_in", at=30))    # a duplicate: changes nothing
    assert not recorded and journal.ledger.state(PHONE, "sms").since.endswith("05.000000Z")


def test_states_at_once_answers_as_the_single_lookups_do(journal):
    """The consent API's grouped read (one statement, one row) against the one-key read,
    on each engine: every channel of a held phone, an email, unknown keys, a key twice."""
    journal.events.record(event(1, at=0))
    journal.events.record(event(2, kind="opt_in", at=5, channel="call"))
    journal.events.record(event(3, channel="all", at=1, email="Jane@Example.com"))
    keys = [(PHONE, c) for c in ("sms", "call", "whatsapp")] + [
        ("jane@example.com", "email"), ("+4915112345678", "sms"), (PHONE, "sms"), ("nobody@example.com", "email")]
    at_once = journal.ledger.states_at_once(keys)
    assert at_once == [journal.ledger.state(*key) for key in keys]
    assert [e.state if e else None for e in at_once] == \
        ["opted_out", "opted_in", "opted_out", "opted_out", None, "opted_out", None]
    assert all(isinstance(e.event_id, int) for e in at_once if e)
    assert journal.ledger.states_at_once([]) == []
    assert journal.ledger.states_at_once([("+4915112345678", "sms")]) == [None]


def test_the_group_commit_batch_applies_in_its_transaction(journal):
    threads = [threading.Thread(target=journal.events.record,
                                args=(event(n, kind="opt_in" if n % 2 else "opt_out", at=n % 7,
                                            phone=f"+1330555{n % 5:04d}"),)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live = snapshot(journal)
    assert len(live) == 5
    journal.ledger.rebuild()
    assert snapshot(journal) == live


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["opt_out", "opt_in", "do_not_contact"]),
                          st.sampled_from(["sms", "email", "call", "whatsapp", "all", None]),
                          st.integers(0, 4), st.sampled_from([PHONE, "+4915112345678"])), max_size=15))
def test_deleting_the_ledger_and_rebuilding_it_from_events_is_identical(tmp_path_factory, items):
    from syncd.journal import open_journal

    j = open_journal(f"sqlite:///{tmp_path_factory.mktemp('l')}/j.db")
    try:
        for n, (kind, channel, at, phone) in enumerate(items):
            j.events.record(event(n, kind=kind, channel=channel, at=at, phone=phone, email="a@b.example"))
        before = snapshot(j)
        with j.engine.begin() as tx:
            tx.cur.execute("DELETE FROM consent_ledger")
        assert snapshot(j) == [] or not before
        j.ledger.rebuild()
        assert snapshot(j) == before
    finally:
        j.close()


def test_rebuild_on_each_engine_is_identical(journal):
    for n in range(12):
        journal.events.record(event(n, kind=["opt_out", "opt_in", "do_not_contact"][n % 3],
                                    channel=["sms", "all", "email", "call"][n % 4], at=n % 4,
                                    email="jane@example.com"))
    before = snapshot(journal)
    assert before
    with journal.engine.begin() as tx:
        tx.cur.execute("DELETE FROM consent_ledger")
    assert snapshot(journal) == []
    assert journal.ledger.rebuild() == len(before)
    assert snapshot(journal) == before


def test_a_records_modification_time_in_each_crms_format():
    from syncd.events import iso
    from syncd.reflector import modified_at

    assert iso(modified_at("2024-02-18T09:45:00.000+0000")) == "2024-02-18T09:45:00.000000Z"      # Salesforce
    assert iso(modified_at("1708249500000")) == "2024-02-18T09:45:00.000000Z"                      # HubSpot, ms
    assert iso(modified_at("2024-02-18T09:45:00.000000+00:00")) == "2024-02-18T09:45:00.000000Z"   # Close
    assert modified_at("garbage") is not None
