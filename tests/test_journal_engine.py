"""The journal's engine layer: named statements, their parameters, and the module graph."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.journal.engine import Query, load_queries, parse_blocks

JOURNAL = Path(__file__).parent.parent / "syncd" / "journal"


def used_statement_names(*files: str) -> set[str]:
    """The statement names these modules run (``tx.execute("name", ...)`` etc.)."""
    names: set[str] = set()
    for name in files:
        names |= set(re.findall(r"(?:tx\.(?:execute|one|all|value)|engine\.read_one)\(\s*f?\"(\w+)\"", (JOURNAL / name).read_text()))
    return names


def test_every_statement_a_store_or_engine_runs_exists_in_its_dialects():
    stores = used_statement_names("events.py", "deliveries.py", "reflections.py", "operations.py", "reports.py",
                                  "ledger.py", "compliance.py")
    assert {"claim_deliveries", "insert_events", "export_rows"} <= stores
    sqlite, postgres = set(load_queries("sqlite")), set(load_queries("postgresql"))
    assert stores <= sqlite and stores <= postgres, (stores - sqlite, stores - postgres)
    assert used_statement_names("sqlite.py") <= sqlite
    take_over = {f"take_over_{t}" for t in ("deliveries", "events", "reflections")}   # named by table
    assert used_statement_names("postgres.py") | take_over <= postgres
    assert sqlite - stores == used_statement_names("sqlite.py")          # nothing defined for nobody
    assert postgres - stores == used_statement_names("postgres.py") | take_over


def test_only_the_claims_differ_between_dialects():
    common = parse_blocks((JOURNAL / "queries" / "common.sql").read_text())
    for dialect in ("sqlite", "postgresql"):
        own = parse_blocks((JOURNAL / "queries" / f"{dialect}.sql").read_text())
        assert not set(own) & set(common), "a dialect file repeats a common statement"
        assert {"claim_deliveries", "claim_reflections", "lease_events_to_route"} <= set(own)


def test_a_missing_parameter_or_an_empty_list_is_an_error_not_bad_sql():
    q = Query.parse("q", "SELECT 1 FROM t WHERE id IN (%(ids)s) AND a = %(a)s", "sqlite")
    with pytest.raises(TypeError, match="needs parameter 'a'"):
        q.render({"ids": [1]})
    with pytest.raises(ValueError, match="empty list"):
        q.render({"ids": [], "a": 1})


@given(ids=st.lists(st.integers(), min_size=1, max_size=20),
       rows=st.lists(st.tuples(st.text(max_size=5), st.integers()), min_size=1, max_size=10),
       dialect=st.sampled_from(["sqlite", "postgresql"]))
def test_list_parameters_expand_to_one_placeholder_per_value(ids, rows, dialect):
    q = Query.parse("q", "INSERT INTO t VALUES %(rows)s; -- 100% %(x)s IN (%(ids)s)", dialect)
    sql, args = q.render({"rows": rows, "x": None, "ids": ids})
    mark = "?" if dialect == "sqlite" else "%s"
    assert sql.count(mark) == len(args) == 2 * len(rows) + 1 + len(ids)
    assert args == [v for row in rows for v in row] + [None] + ids
    assert ("100%%" if dialect == "postgresql" else "100% ") in sql


def test_group_commit_imports_no_store_or_engine():
    tree = ast.parse((JOURNAL / "group_commit.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "typing", "syncd.batching", "syncd.events", "syncd.journal.base"}, imported


def test_field_clock_lookups_use_the_primary_key_not_a_scan(tmp_path):
    """The pusher reads the clocks of up to a batch of records per claim; a table scan
    per chunk would grow with every record ever written."""
    from syncd.journal import open_journal

    j = open_journal(f"sqlite:///{tmp_path}/j.db")
    try:
        sql, args = load_queries("sqlite")["clocks_of_records"].render({"refs": [("a", "b", "c"), ("d", "e", "f")]})
        with j.engine.read() as tx:
            plan = " | ".join(str(row[3]) for row in tx.cur.execute("EXPLAIN QUERY PLAN " + sql, args))
    finally:
        j.close()
    assert "SCAN field_clocks" not in plan and "SEARCH f USING INDEX" in plan, plan


_TEMP_FILE_PROBE = r'''
import ctypes, os, struct, sys, tempfile
from datetime import datetime, timezone
from syncd.events import ConsentEvent
from syncd.journal.events import EventStore
from syncd.journal.sqlite import SqliteEngine

libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(os.O_NONBLOCK)
libc.inotify_add_watch(fd, os.environ["SQLITE_TMPDIR"].encode(), 0x100)   # IN_CREATE
engine = SqliteEngine(os.path.join(sys.argv[1], "j.db"))
store = EventStore(engine)
if sys.argv[2] == "sqlite-default":
    with engine.begin():
        pass
    engine._writer.execute("PRAGMA temp_store=DEFAULT")
now = datetime.now(timezone.utc)
for batch in range(40):
    store.record_batch([ConsentEvent(source="apten", source_event_id=f"{batch}-{i}", kind="opt_out",
                                     channel="sms", occurred_at=now, received_at=now, raw=b"{}" * 300,
                                     phone=f"+1330555{batch:02d}{i:02d}", external_lead_id=f"{batch * 97 + i * 31}")
                        for i in range(8)])
created = 0
try:
    while True:
        data = os.read(fd, 65536)
        created += data.count(b"etilqs")   # SQLite's temporary file names
except BlockingIOError:
    pass
print(created)
'''


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="inotify: Linux only")
def test_group_commits_create_no_temporary_files(tmp_path):
    """SQLite keeps a statement's undo log in a temporary file once it passes 64 KiB,
    which a group commit's multi-row statements did on about every other commit; the
    writer keeps it in memory. Run in a subprocess: SQLite reads SQLITE_TMPDIR once."""
    import os
    import subprocess
    import sys

    def temp_files_created(mode: str) -> int:
        work, temp = tmp_path / mode, tmp_path / f"{mode}-tmp"
        work.mkdir()
        temp.mkdir()
        out = subprocess.run([sys.executable, "-c", _TEMP_FILE_PROBE, str(work), mode], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "SQLITE_TMPDIR": str(temp)},
                             cwd=Path(__file__).resolve().parent.parent)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    assert temp_files_created("sqlite-default") > 0    # the probe sees them when SQLite makes them
    assert temp_files_created("journal") == 0


def test_writers_in_two_processes_take_turns_on_the_write_lock_not_the_busy_handler(tmp_path):
    """A second process's write waits in flock on ``<file>.write.lock`` (the kernel
    wakes it when the lock is freed; /proc/locks lists it as blocked), not in SQLite's
    busy handler, which sleeps and polls."""
    import subprocess
    import sys
    import time

    from syncd.journal.sqlite import SqliteEngine
    from tests.support.stack import wait_for

    db = tmp_path / "j.db"
    holder = SqliteEngine(db)
    script = ("import sys; from syncd.journal.sqlite import SqliteEngine\n"
              "e = SqliteEngine(sys.argv[1])\n"
              "with e.begin() as tx: tx.execute('free_delivery_leases')\n"
              "print('wrote')")
    with holder.begin() as tx:
        tx.execute("free_delivery_leases")
        other = subprocess.Popen([sys.executable, "-c", script, str(db)], stdout=subprocess.PIPE, text=True)

        def blocked_in_flock() -> bool:
            with open("/proc/locks") as f:
                return any("->" in line and "FLOCK" in line and f" {other.pid} " in f" {line} " for line in f)

        assert wait_for(blocked_in_flock, timeout=20), "the other writer is not waiting on the write lock"
        time.sleep(0.2)
        assert other.poll() is None
    out, _ = other.communicate(timeout=20)
    assert other.returncode == 0 and out.strip() == "wrote"
    holder.close()
