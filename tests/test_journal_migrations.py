"""Journals written by the syncd before the numbered migration files (schema versions
1 and 2, SQLite and PostgreSQL) are migrated in place: every row survives and works.

The old journals are built with the old code's own DDL, kept verbatim in
``tests/fixtures/old_journal/``, and filled with rows of every kind."""
from __future__ import annotations

import os
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from connectors.types import RecordRef
from syncd.events import ConsentEvent
from syncd.journal import migrate, open_journal
from syncd.journal.base import Outcome, ReflectionOutcome

OLD = Path(__file__).parent / "fixtures" / "old_journal"
PG_URL = os.environ.get("SYNCD_TEST_PG_URL")
REF = RecordRef("salesforce", "Contact", "003XX000004DHPYYA4")
OTHER = RecordRef("hubspot", "contacts", "51")
FAR = 4_000_000_000.0        # a time that is never due
RAW = b'{"leadId": "old", "optOutMessage": "STOP"}'


def fill(execute) -> dict[str, int]:
    """Rows of every kind, as the old code wrote them; ``execute(sql, params)`` returns
    the first column of a RETURNING row. Returns the ids by name."""
    ids: dict[str, int] = {}

    def event(name: str, status: str, reason: str | None = None, event_type: str = "consent") -> None:
        ids[name] = execute(
            "INSERT INTO events (source, source_event_id, event_type, kind, channel, external_lead_id, phone, "
            "phone_raw, email, reason, message, occurred_at, received_at, details, raw, status, status_reason, "
            "route_attempts, next_route_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
            ("apten", f"old-{name}", event_type, "opt_out", "sms", "003XX000004DHPY", "+13305551234",
             "(330) 555-1234", "jane@example.com", "STOP", "STOP", "2024-02-18T09:45:00.000000Z",
             "2024-02-18T09:45:01.000000Z", '{"raw_channel": "sms"}', RAW, status, reason, 0, 0,
             "2024-02-18T09:45:01.000000Z"))

    def delivery(name: str, event: str, ref: RecordRef, state: str, attempts: int, error: str | None = None,
                 outcome: str | None = None, delivered_at: str | None = None) -> None:
        ids[name] = execute(
            "INSERT INTO deliveries (event_id, crm, obj, record_id, state, attempts, next_attempt_at, lease_until, "
            "last_error, outcome, created_at, delivered_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
            (ids[event], ref.crm, ref.obj, ref.record_id, state, attempts, 0.0, 0.0, error, outcome,
             "2024-02-18T09:45:02.000000Z", delivered_at))

    def reflection(name: str, phone: str, state: str, attempts: int, error: str | None = None) -> None:
        ids[name] = execute(
            "INSERT INTO reflections (crm, obj, record_id, phone, channel, kind, request_id, state, attempts, "
            "next_attempt_at, lease_until, last_error, flagged_at, created_at, registered_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
            (REF.crm, REF.obj, REF.record_id, phone, "WHATSAPP", "opt_out", f"syncd-old-{name}", state, attempts,
             0.0 if state == "pending" else FAR, 0.0, error, "2024-02-18T09:00:00Z", "2024-02-18T09:50:00Z",
             "2024-02-18T09:51:00Z" if state == "registered" else None))
        execute("INSERT INTO sinch_state (phone, channel, kind, reflection_id, updated_at) VALUES (?,?,?,?,?) "
                "RETURNING reflection_id", (phone, "WHATSAPP", "opt_out", ids[name], "2024-02-18T09:50:00Z"))

    event("routed", "routed")
    event("new", "new")
    event("quarantined", "quarantined", "no record matches this phone")
    delivery("pending", "routed", REF, "pending", 0)
    delivery("dead", "routed", OTHER, "dead", 5, "HubSpot said no", "dead")
    delivery("done", "quarantined", RecordRef("close", "lead", "lead_1"), "done", 1, None, "applied",
             "2024-02-18T09:46:00.000000Z")
    execute("INSERT INTO field_clocks (crm, obj, record_id, field, occurred_at, value, event_id) "
            "VALUES (?,?,?,?,?,?,?) RETURNING event_id",
            ("close", "lead", "lead_1", "sms_opt_out", "2024-02-18T09:45:00.000000Z", "true", ids["quarantined"]))
    execute("INSERT INTO watermarks (name, ts, last_id, updated_at) VALUES (?,?,?,?) RETURNING name",
            ("reflector:salesforce", "2024-02-18T09:00:00Z", "003OLD", "2024-02-18T09:00:00Z"))
    execute("INSERT INTO crm_status (crm, last_push_at, last_poll_at, paused_until, pause_reason) "
            "VALUES (?,?,?,?,?) RETURNING crm", ("hubspot", "2024-02-18T09:46:00Z", None, FAR, "quota exhausted"))
    reflection("r_pending", "+4915112345678", "pending", 0)
    reflection("r_registered", "+4915112345679", "registered", 1)
    reflection("r_dead", "+4915112345670", "dead", 3, "gave up")
    return ids


def old_sqlite(tmp_path: Path, version: int) -> tuple[str, dict[str, int], callable]:
    path = tmp_path / f"v{version}.db"
    conn = sqlite3.connect(path)
    conn.executescript((OLD / f"sqlite_v{version}.sql").read_text())
    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    ids = fill(lambda sql, params: conn.execute(sql, params).fetchone()[0])
    conn.commit()
    conn.close()

    def query(sql: str) -> list[tuple]:
        with sqlite3.connect(path) as c:
            return c.execute(sql).fetchall()

    return f"sqlite:///{path}", ids, query


def old_postgres(schema: str, version: int) -> tuple[str, dict[str, int], callable]:
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'SET search_path TO "{schema}"')
        conn.execute((OLD / "postgres_v1.sql").read_text())
        if version >= 2:
            conn.execute((OLD / "postgres_v2.sql").read_text())
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        ids = fill(lambda sql, params: conn.execute(sql.replace("?", "%s"), params).fetchone()[0])

    def query(sql: str) -> list[tuple]:
        with psycopg.connect(PG_URL, autocommit=True) as c:
            c.execute(f'SET search_path TO "{schema}"')
            return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in c.execute(sql)]

    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}schema={schema}", ids, query


@pytest.fixture(params=[("sqlite", 1), ("sqlite", 2), ("postgres", 1), ("postgres", 2)],
                ids=["sqlite-v1", "sqlite-v2", "postgres-v1", "postgres-v2"])
def old_journal(request, tmp_path):
    engine, version = request.param
    if engine == "sqlite":
        yield old_sqlite(tmp_path, version)
        return
    if not PG_URL:
        pytest.skip("SYNCD_TEST_PG_URL not set")
    import psycopg

    schema = f"tm{os.getpid()}_{time.time_ns()}"
    try:
        yield old_postgres(schema, version)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_every_row_of_an_old_journal_survives_and_works(old_journal):
    url, ids, query = old_journal
    j = open_journal(url)
    try:
        assert query("SELECT version FROM schema_version") == [(migrate.latest_version(),)]
        assert query("SELECT raw FROM events ORDER BY id") == [(RAW,)] * 3
        counts = j.reports.counts()
        assert counts["deliveries"] == {"pending": 1, "retrying": 0, "done": 1, "dead": 1}
        assert counts["events"]["received"] == 3 and counts["quarantined"] == 1
        assert counts["reflections"] == {"pending": 2, "done": 0, "failed": 1}
        assert counts["crms"]["hubspot"]["pause_reason"] == "quota exhausted"
        assert j.ops.crm_pause("hubspot") == (FAR, "quota exhausted")
        assert j.ops.get_watermark("reflector:salesforce") == ("2024-02-18T09:00:00Z", "003OLD")
        assert j.deliveries.clocks([RecordRef("close", "lead", "lead_1")])[RecordRef("close", "lead", "lead_1")][
            "sms_opt_out"].value is True

        (routable,) = j.events.to_route(10)          # takes a routing lease (route_owner: new in v2)
        assert (routable.id, routable.source_event_id, routable.phone, routable.phone_raw, routable.email,
                routable.external_lead_id, routable.details) == (
            ids["new"], "old-new", "+13305551234", "(330) 555-1234", "jane@example.com", "003XX000004DHPY",
            {"raw_channel": "sms"})
        assert query(f"SELECT route_owner FROM events WHERE id = {ids['new']}") == [(j.engine.owner,)]
        j.deliveries.add_targets(routable.id, [RecordRef("close", "lead", "lead_2")])

        assert {d["id"] for d in j.reports.dead_letters()} == {f"d{ids['dead']}", f"q{ids['quarantined']}",
                                                         f"r{ids['r_dead']}"}
        (pending,) = j.deliveries.claim(10, 60, crm="salesforce")
        assert (pending.id, pending.event_id, pending.ref, pending.email) == (
            ids["pending"], ids["routed"], REF, "jane@example.com")
        j.deliveries.settle([Outcome(pending.id, "done", ref=REF, applied={"sms_opt_out": True},
                          applied_at=pending.occurred_at, applied_event_id=pending.event_id)])
        assert j.deliveries.clocks([REF])[REF]["sms_opt_out"].value is True

        assert j.replay([f"d{ids['dead']}", f"r{ids['r_dead']}"]) == 2
        assert [d.id for d in j.deliveries.claim(10, 60, crm="hubspot")] == [ids["dead"]]
        assert [d.event_id for d in j.deliveries.claim(10, 60, crm="close")] == [ids["new"]]
        claimed = j.reflections.claim(10, 60)          # takes a reflection lease (lease_owner: new in v2)
        assert sorted(r.id for r in claimed) == sorted([ids["r_pending"], ids["r_dead"]])
        assert query(f"SELECT lease_owner FROM reflections WHERE id = {ids['r_pending']}") == [(j.engine.owner,)]
        j.reflections.settle([ReflectionOutcome(r.id, "registered", at=FAR) for r in claimed])

        rows = list(j.reports.export_rows(None))
        by_target = {(r["event_id"], r["target_crm"]): r for r in rows}
        assert by_target[(ids["routed"], "salesforce")]["state"] == "done"
        assert by_target[(ids["quarantined"], "close")]["outcome"] == "applied"
        assert by_target[(ids["routed"], "salesforce")]["raw_channel"] == "sms"

        fresh = j.events.record(ConsentEvent(source="apten", source_event_id="after-migration", kind="opt_out",
                                      channel="sms", occurred_at=datetime.now(timezone.utc),
                                      received_at=datetime.now(timezone.utc), raw=b"{}", phone="+13305550000"))
        assert fresh.created and fresh.event_id > max(ids["routed"], ids["new"], ids["quarantined"])
    finally:
        j.close()
    again = open_journal(url)            # a second start finds the schema current and changes nothing
    try:
        assert again.reports.counts()["events"]["received"] == 4
    finally:
        again.close()


def test_a_journal_newer_than_this_syncd_is_refused(tmp_path):
    url, _, _ = old_sqlite(tmp_path, 2)
    with sqlite3.connect(url[len("sqlite:///"):]) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(RuntimeError, match="schema version 99, newer than this syncd"):
        open_journal(url)


def test_the_unread_message_column_is_no_longer_written_and_old_rows_keep_theirs(old_journal):
    """``events.message`` repeated the raw body's text and nothing read it: new rows
    leave it NULL. It is not dropped yet: during a rolling upgrade of PostgreSQL
    replicas, a replica still running the old code writes it, and a dropped column
    would turn that replica's webhooks into 503s."""
    url, _, query = old_journal
    j = open_journal(url)
    try:
        j.events.record(ConsentEvent(source="apten", source_event_id="new", kind="opt_out", channel="sms",
                                     occurred_at=datetime.now(timezone.utc), received_at=datetime.now(timezone.utc),
                                     raw=RAW, phone="+13305550000", message="STOP"))
    finally:
        j.close()
    rows = query("SELECT source_event_id, message, raw FROM events ORDER BY id")
    assert [(sid, msg) for sid, msg, _ in rows] == [("old-routed", "STOP"), ("old-new", "STOP"),
                                                    ("old-quarantined", "STOP"), ("new", None)]
    assert all(b"STOP" in raw for _, _, raw in rows)


def test_both_engines_run_the_same_migration_files():
    files = migrate.migrations()
    assert [m.version for m in files] == list(range(1, len(files) + 1))
    sqlite_tables = [s for s in files[0].statements("sqlite") if s.startswith("CREATE TABLE")]
    pg_tables = [s for s in files[0].statements("postgresql") if s.startswith("CREATE TABLE")]
    assert len(sqlite_tables) == len(pg_tables) == 8
    assert "BYTEA" in " ".join(pg_tables) and "BLOB" in " ".join(sqlite_tables)


def test_the_migration_builds_the_consent_ledger_from_the_events_held(old_journal):
    url, ids, query = old_journal
    j = open_journal(url)
    try:
        got = j.ledger.state("+13305551234", "sms")
        assert got is not None
        assert (got.state, got.since, got.source, got.event_id) == (
            "opted_out", "2024-02-18T09:45:00.000000Z", "apten", ids["routed"])
        assert j.ledger.state("jane@example.com", "email") is None   # an sms opt-out says nothing of email
        built = j.ledger.all()
        j.ledger.rebuild()
        assert j.ledger.all() == built
    finally:
        j.close()


def _execute_before_migration(url: str, sql: str) -> None:
    """Change an old journal's rows as the old code could have left them."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///"):]) as conn:
            conn.execute(sql)
        return
    import psycopg

    base, _, schema = url.rpartition("schema=")
    with psycopg.connect(base.rstrip("?&"), autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        conn.execute(sql)


def test_the_compliance_migration_honours_opt_outs_already_delivered_everywhere(old_journal):
    """0004: an opt-out whose every target was done before the upgrade is honoured when
    its last target was; the others stay open for the compliance clock."""
    from syncd.compliance import ComplianceClock

    url, ids, query = old_journal
    _execute_before_migration(url, "UPDATE deliveries SET state = 'done', delivered_at = "
                                   f"'2024-02-18T09:47:00.000000Z' WHERE event_id = {ids['routed']}")
    j = open_journal(url)
    try:
        honoured = dict(query("SELECT id, honoured_at FROM events ORDER BY id"))
        assert honoured == {ids["routed"]: "2024-02-18T09:47:00.000000Z", ids["new"]: None,
                            ids["quarantined"]: None}
        clock = ComplianceClock(now=lambda: datetime(2024, 2, 19, 12, tzinfo=timezone.utc))
        summary = clock.summary(j.compliance)
        assert (summary["open"], summary["at_risk"], summary["breached"]) == (2, 0, 0)
        (row, *_) = [r for r in j.reports.export_rows(None) if r["event_id"] == ids["routed"]]
        # Received on a Sunday; Monday 2024-02-19 is Presidents' Day: day 10 is Monday 2024-03-04.
        assert clock.export_columns(row) == {"deadline": "2024-03-05T04:59:59.999999Z",
                                             "honoured_at": "2024-02-18T09:47:00.000000Z", "within_deadline": True}
    finally:
        j.close()
