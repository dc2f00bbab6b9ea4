"""PostgreSQL-only journal properties under real concurrency (several journal
instances = several replicas sharing one database). Needs SYNCD_TEST_PG_URL
(see .ci/pg.sh)."""
from __future__ import annotations

import os
import random
import socket
import threading
import time
from datetime import datetime, timezone

import pytest

from connectors.types import RecordRef
from syncd.events import ConsentEvent
from syncd.journal.base import Outcome

URL = os.environ.get("SYNCD_TEST_PG_URL")
pytestmark = [pytest.mark.skipif(not URL, reason="SYNCD_TEST_PG_URL not set"), pytest.mark.timeout(60)]

if URL:
    import psycopg

    from syncd.journal import migrate
    from syncd.journal import Journal, journal_on
    from syncd.journal.postgres import PostgresEngine, PostgresUnavailable

    def PostgresJournal(url: str, **kw) -> Journal:
        """The stores over a PostgreSQL engine on ``url``."""
        return journal_on(PostgresEngine(url, **kw))


@pytest.fixture
def schema():
    name = f"tp{os.getpid()}_{time.time_ns()}"
    yield name
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def journals(schema):
    """Factory for journals on the test's schema; all are closed at the end."""
    made: list[Journal] = []

    def make(**kw) -> Journal:
        j = PostgresJournal(URL, schema=schema, **kw)
        made.append(j)
        return j

    yield make
    for j in made:
        j.close()


def event(n: int, **kw) -> ConsentEvent:
    base = dict(source="apten", source_event_id=f"ev-{n}", kind="opt_out", channel="sms",
                occurred_at=datetime(2024, 2, 18, 9, 45, n % 60, tzinfo=timezone.utc),
                received_at=datetime.now(timezone.utc), raw=b'{"x": 1}', external_lead_id="003XX000004DHPY")
    base.update(kw)
    return ConsentEvent(**base)


def run_threads(n: int, target) -> list:
    """Start ``n`` threads at once (barrier); return their results, re-raising any error."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    return results


def test_two_replicas_never_lease_one_record_together(journals):
    setup = journals()
    refs = [RecordRef("salesforce", "Contact", f"003XX00000{r:05d}AAA") for r in range(50)]
    for n in range(200):  # a record's four deliveries are adjacent in claim order: the hard case
        rec = setup.events.record(event(n))
        setup.deliveries.add_targets(rec.event_id, [refs[n // 4]])
    with setup.engine.read() as tx:
        cur = tx.cur
        cur.execute("SELECT id FROM deliveries")
        all_ids = {r[0] for r in cur.fetchall()}
    assert len(all_ids) == 200

    a, b = journals(), journals()
    held: dict[RecordRef, str] = {}          # record -> replica holding it (claim return .. settle call)
    held_lock = threading.Lock()
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    violations: list[str] = []
    settled = [0]
    stop = threading.Event()

    def replica(name: str, j: Journal) -> None:
        rnd = random.Random(name)
        while True:
            with held_lock:
                if settled[0] >= 200:
                    return
            batch = j.deliveries.claim(rnd.randint(1, 8), 60)
            if not batch:
                time.sleep(0.002)
                continue
            with held_lock:
                for d in batch:
                    other = held.get(d.ref)
                    if other is not None and other != name:
                        violations.append(f"{d.ref} claimed by {name} while {other} holds it")
                    held[d.ref] = name
                claimed[name].extend(d.id for d in batch)
            time.sleep(rnd.uniform(0, 0.004))  # "push" to the CRM
            with held_lock:
                for d in batch:
                    held.pop(d.ref, None)
            j.deliveries.settle([Outcome(d.id, "done", ref=d.ref) for d in batch])
            with held_lock:
                settled[0] += len(batch)

    def monitor() -> None:
        """The database itself must never show two owners' live leases on one record."""
        with psycopg.connect(URL, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{setup.engine.schema}"')
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT crm, obj, record_id FROM deliveries WHERE state = 'pending' "
                    "AND lease_until >= %s GROUP BY crm, obj, record_id "
                    "HAVING COUNT(DISTINCT lease_owner) > 1", (time.time(),)).fetchall()
                violations.extend(f"database shows two owners on {r}" for r in rows)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    try:
        run_threads(2, lambda i: replica("ab"[i], (a, b)[i]))
    finally:
        stop.set()
        watcher.join(10)

    assert violations == []
    together = claimed["a"] + claimed["b"]
    assert len(together) == len(set(together)) == 200      # each delivery exactly once ...
    assert set(together) == all_ids
    assert claimed["a"] and claimed["b"]                    # ... and both replicas did work
    counts = setup.reports.counts()["deliveries"]
    assert (counts["pending"], counts["done"]) == (0, 200)
    with setup.engine.read() as tx:
        cur = tx.cur
        cur.execute("SELECT MIN(attempts), MAX(attempts) FROM deliveries")
        assert cur.fetchone() == (1, 1)


def test_concurrent_duplicate_webhooks_get_one_event(journals, schema):
    replicas = [journals(max_size=2) for _ in range(8)]

    # Round 1: eight replicas record the same event at the same moment.
    results = run_threads(8, lambda i: replicas[i].events.record(event(1)))
    assert sum(r.created for r in results) == 1
    assert len({r.event_id for r in results}) == 1

    # Round 2: force the overlap. A SHARE lock on events blocks every INSERT; once
    # all eight wait, releasing it lets them race on the unique key together, so
    # the losers wait for the winner's commit inside ON CONFLICT DO NOTHING and
    # must then find its row.
    with psycopg.connect(URL) as gate:
        gate.execute(f'SET search_path TO "{schema}"')
        gate.execute("LOCK TABLE events IN SHARE MODE")
        out: list = []
        worker = threading.Thread(
            target=lambda: out.append(run_threads(8, lambda i: replicas[i].events.record(event(2)))))
        worker.start()
        deadline = time.monotonic() + 10
        with psycopg.connect(URL, autocommit=True) as probe:
            while time.monotonic() < deadline:
                waiting = probe.execute(
                    "SELECT COUNT(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
                    (f'"{schema}".events',)).fetchone()[0]
                if waiting == 8:
                    break
                time.sleep(0.01)
        assert waiting == 8
        gate.commit()
        worker.join(20)
    results = out[0]
    assert sum(r.created for r in results) == 1
    assert len({r.event_id for r in results}) == 1
    assert replicas[0].reports.counts()["events"]["received"] == 2


def test_one_leader_and_takeover_when_its_connection_dies(journals):
    a, b = journals(), journals()
    assert a.ops.try_leadership("poller")
    assert a.ops.try_leadership("poller")          # re-entrant for the holder
    assert not b.ops.try_leadership("poller")
    assert a.ops.is_leader("poller") and not b.ops.is_leader("poller")
    assert b.ops.try_leadership("reflector")       # names are independent

    # The leader's connection dies (backend killed, as on a network cut or crash).
    pid = a.engine._leaders["poller"].info.backend_pid
    with psycopg.connect(URL, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
    deadline = time.monotonic() + 5
    while not b.ops.try_leadership("poller"):
        assert time.monotonic() < deadline, "leadership not released after its connection died"
        time.sleep(0.05)
    assert not a.ops.is_leader("poller")
    assert not a.ops.try_leadership("poller")

    # Closing the journal (process exit) hands leadership over too; resign does as well.
    b.close()
    assert a.ops.try_leadership("poller")
    a.ops.resign("poller")
    assert not a.ops.is_leader("poller")
    c = journals()
    assert c.ops.try_leadership("poller")


def test_concurrent_migrations_are_harmless(schema):
    made = run_threads(8, lambda i: PostgresJournal(URL, schema=schema, max_size=2))
    made.append(PostgresJournal(URL, schema=schema))       # and once more, afterwards
    try:
        with made[0].engine.read() as tx:
            cur = tx.cur
            cur.execute("SELECT version FROM schema_version")
            assert cur.fetchall() == [(migrate.latest_version(),)]
            cur.execute("SELECT COUNT(*) FROM pg_tables WHERE schemaname = %s", (schema,))
            assert cur.fetchone()[0] == sum(s.startswith("CREATE TABLE") for m in migrate.migrations()
                                           for s in m.statements("postgresql"))
        rec = made[1].events.record(event(1))
        assert made[2].events.get(rec.event_id).source_event_id == "ev-1"
    finally:
        for j in made:
            j.close()


def test_placeholders_and_percent_signs(journals):
    j = journals()
    from syncd.journal.engine import Query

    query = Query.parse("t", "SELECT '100%' || %(x)s, %(n)s::int + 1", "postgresql")
    with j.engine.read() as tx:
        tx.cur.execute(*query.render({"x": "x", "n": 41}))
        assert tx.cur.fetchone() == ("100%x", 42)


def test_unreachable_server_error_is_clear_and_hides_the_password():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]           # closed again: nothing listens there
    with pytest.raises(PostgresUnavailable) as err:
        PostgresJournal(f"postgresql://syncd:Sup3rSecretPw@127.0.0.1:{port}/syncd")
    text = str(err.value)
    assert f"127.0.0.1:{port}" in text and "refused" in text.lower()
    assert "Sup3rSecretPw" not in text and "\n" not in text
    with pytest.raises(ValueError, match="schema"):
        PostgresJournal(URL, schema='x"; DROP TABLE events; --')


def test_schema_named_in_the_url(schema):
    """``journal.url: postgresql://…/db?schema=NAME`` keeps syncd's tables in NAME
    (libpq has no such parameter: it is taken out before connecting)."""
    from syncd.journal import open_journal

    sep = "&" if "?" in URL else "?"
    j = open_journal(f"{URL}{sep}schema={schema}")
    try:
        assert j.engine.schema == schema and f"(schema {schema})" in j.engine.where
        assert j.events.record(event(1)).created
        with psycopg.connect(URL) as conn:
            (n,) = conn.execute(f'SELECT count(*) FROM "{schema}".events').fetchone()
        assert n == 1
    finally:
        j.close()
    with pytest.raises(ValueError, match="schema"):
        open_journal(f"{URL}{sep}schema=Bad-Name")


def test_leases_of_a_replica_that_is_gone_are_taken_over_at_once(journals):
    """A replica whose database session ended (kill -9, lost host) leaves leased
    deliveries behind; another frees them on its next tick, not after the lease."""
    from connectors.types import RecordRef

    from syncd.journal.base import ReflectionCandidate

    alive, doomed = journals(), journals()
    for n in range(3):
        rec = alive.events.record(event(n))
        alive.deliveries.add_targets(rec.event_id, [RecordRef("salesforce", "Contact", f"003XX00000000{n:02d}AAA")])
    routing = alive.events.record(event(50, external_lead_id=None, phone="+13305551234"))  # waits for a phone lookup
    ref = RecordRef("salesforce", "Contact", "003XX0000000099AAA")
    assert alive.reflections.add([ReflectionCandidate(ref, "+13305551234", "opt_out")], ["WHATSAPP"]) == 1
    for j in (alive, doomed):
        j.ops.take_over_dead_leases()                # each asserts it is alive
    taken = doomed.deliveries.claim(10, lease_seconds=600)
    assert [e.id for e in doomed.events.to_route(10, lease_seconds=600)] == [routing.event_id]
    reflection = doomed.reflections.claim(10, lease_seconds=600)
    assert len(taken) == 3 and len(reflection) == 1
    assert alive.deliveries.claim(10, 600) == [] and alive.events.to_route(10, 600) == []
    alive.engine._next_takeover = 0.0
    assert alive.ops.take_over_dead_leases() == 0  # the owner is alive: its leases stay
    assert alive.deliveries.claim(10, 600) == [] and alive.reflections.claim(10, 600) == []

    conn = doomed.engine._leaders[doomed.engine._alive_name(doomed.engine.owner)]
    conn.pgconn.finish()                         # the session ends as if the process died
    freed, deadline = 0, time.time() + 10      # the server drops its locks as the backend exits
    while freed < 3 and time.time() < deadline:
        alive.engine._next_takeover = 0.0
        freed += alive.ops.take_over_dead_leases()
        time.sleep(0.05)
    assert freed == 5
    assert sorted(d.id for d in alive.deliveries.claim(10, 600)) == sorted(d.id for d in taken)
    assert [e.id for e in alive.events.to_route(10, 600)] == [routing.event_id]
    assert [r.id for r in alive.reflections.claim(10, 600)] == [r.id for r in reflection]


def test_an_event_and_its_ledger_entries_commit_together(journals, monkeypatch):
    """The ledger is written in the event's transaction: when the ledger write fails,
    the event is not left committed without it, and the group commit's retry records
    both (an autocommit INSERT used to keep the event, so the retry found a duplicate
    and the opt-out never reached the ledger)."""
    from syncd.journal.ledger import LedgerStore

    j = journals()
    real_apply = LedgerStore.apply_entries
    failures = []

    def apply_failing_once(self, tx, entries):
        if not failures:
            failures.append(entries)
            raise psycopg.errors.QueryCanceled("ledger write interrupted")
        return real_apply(self, tx, entries)

    monkeypatch.setattr(LedgerStore, "apply_entries", apply_failing_once)
    recorded = j.events.record(event(7, phone="+13305551234"))
    assert failures, "the ledger write was not attempted"
    assert recorded.created
    entry = j.ledger.state("+13305551234", "sms")
    assert entry is not None and entry.state == "opted_out" and entry.event_id == recorded.event_id
