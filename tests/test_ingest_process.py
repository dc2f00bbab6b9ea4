"""The SQLite journal's ingest writer process (syncd/journal/ingest_process.py, ingest_writer.py): webhooks
are committed by a process of its own, answered only after their row is on disk, and
the writer never outlives or strands ``serve``. Real processes, real signals."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from syncd.events import ConsentEvent
from syncd.journal import open_journal
from syncd.journal.ingest_process import IngestProcess
from syncd.journal.ingest_wire import WriteFailed, frame, read_frame
from tests.support.stack import Stack, wait_for


def event(n: int, **kw) -> ConsentEvent:
    base = dict(source="apten", source_event_id=f"ev-{n}", kind="opt_out", channel="sms",
                occurred_at=datetime(2024, 2, 18, 9, 45, n % 60, tzinfo=timezone.utc),
                received_at=datetime.now(timezone.utc), raw=b'{"x": 1}', external_lead_id=None,
                phone=f"+1330555{n:04d}", phone_raw=f"+1330555{n:04d}")
    base.update(kw)
    return ConsentEvent(**base)


@pytest.fixture
def writer(tmp_path):
    journal = open_journal(f"sqlite:///{tmp_path}/j.db")
    w = IngestProcess(journal.engine.path, journal.events.prepare)  # type: ignore[attr-defined]
    journal.events.commit_through(w)
    yield journal, w
    w.close()
    journal.close()


def gone(pid: int) -> bool:
    """No such process, or only its zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_concurrent_webhooks_are_committed_by_the_writer_with_ledger_and_dedupe(writer):
    journal, w = writer
    out: dict[int, object] = {}

    def send(n: int) -> None:
        out[n] = journal.events.record(event(n % 150))    # 150 distinct events, 50 sent twice

    threads = [threading.Thread(target=lambda k=k: [send(n) for n in range(k, 200, 8)]) for k in range(8)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert len(out) == 200
    created = [r for r in out.values() if r.created]   # type: ignore[attr-defined]
    assert len(created) == 150 and len({r.event_id for r in created}) == 150  # type: ignore[attr-defined]
    for n in range(150, 200):                           # each copy answered with the first one's id
        assert out[n].event_id == out[n - 150].event_id  # type: ignore[attr-defined]
    assert journal.reports.counts()["events"]["received"] == 150
    # The ledger entry is written in the writer's transaction, like the row itself.
    assert journal.ledger.state("+13305550007", "sms").state == "opted_out"
    assert w.last_ok > 0 and w.last_failed == 0.0


def test_a_row_the_journal_refuses_fails_only_its_own_request(writer):
    journal, _ = writer
    results: dict[int, object] = {}
    start = threading.Barrier(6)

    def send(n: int) -> None:
        start.wait()
        try:
            results[n] = journal.events.record(event(n, source=None) if n == 3 else event(n))
        except WriteFailed as exc:
            results[n] = exc

    threads = [threading.Thread(target=send, args=(n,)) for n in range(6)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert isinstance(results[3], WriteFailed) and "NOT NULL" in str(results[3])
    assert all(results[n].created for n in (0, 1, 2, 4, 5))  # type: ignore[attr-defined]
    assert journal.reports.counts()["events"]["received"] == 5


def test_a_frame_naming_a_class_is_refused_and_the_writer_keeps_serving(writer):
    journal, w = writer
    assert os.stat(w.folder).st_mode & 0o777 == 0o700      # only this user reaches the socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(w.socket_path)
        conn.sendall(frame(event(1)))          # a ConsentEvent object, not plain data
        assert read_frame(conn) == ("error", "ProtocolError", "not a journal event")
        assert conn.recv(1) == b""             # and the connection is closed
    assert journal.events.record(event(2)).created
    assert journal.reports.counts()["events"]["received"] == 1


def test_a_killed_writer_is_started_again_at_once(writer):
    journal, w = writer
    assert journal.events.record(event(1)).created
    first = w.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: w.pid not in (None, first), timeout=10)   # before any webhook asks
    assert journal.events.record(event(2)).created     # the new writer took it
    assert journal.reports.counts()["events"]["received"] == 2


def test_close_lets_the_writer_exit_promptly(writer):
    _, w = writer
    pid = w.pid
    started = time.monotonic()
    w.close()
    assert time.monotonic() - started < 3
    assert pid is not None and wait_for(lambda: gone(pid), timeout=5)
    assert not os.path.exists(w.folder)


# --- under syncd serve ------------------------------------------------------------------
@pytest.fixture
def stack():
    st = Stack().start()
    yield st
    st.cleanup()


def optout(n: int) -> bytes:
    doc = json.loads((Path(__file__).parent / "fixtures" / "apten_optout_sms.json").read_bytes())
    doc["data"]["leadId"] = f"writer-{n}"
    doc["timestamp"] = f"2024-02-18T09:45:{n % 60:02d}Z"
    return json.dumps(doc).encode()


def writer_pids(daemon) -> list[int]:
    return [int(x["pid"]) for x in daemon.log_lines() if x.get("msg") == "ingest writer started"]


def test_serve_commits_through_its_writer_and_restarts_it_after_kill_9(stack):
    daemon = stack.serve()
    try:
        assert stack.post_apten(optout(1)).status_code == 200
        (first,) = writer_pids(daemon)
        assert first != daemon.proc.pid and not gone(first)
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: len(writer_pids(daemon)) == 2, timeout=10)   # started again at once
        assert wait_for(lambda: gone(first), timeout=10)
        codes = [stack.post_apten(optout(n)).status_code for n in range(2, 6)]
        assert codes == [200, 200, 200, 200]
        assert any(x.get("msg") == "ingest writer exited; starting it again" for x in daemon.log_lines())
    finally:
        assert daemon.terminate() == 0
    status = json.loads(stack.syncd("status", "--json").stdout)
    assert status["events"]["received"] == 5


def test_the_writer_never_outlives_serve(stack):
    daemon = stack.serve()
    assert stack.post_apten(optout(1)).status_code == 200
    (pid,) = writer_pids(daemon)
    (socket_path,) = [x["socket"] for x in daemon.log_lines() if x.get("msg") == "ingest writer started"]
    assert os.path.exists(socket_path)
    daemon.kill9()                              # no shutdown code runs: the writer sees its stdin close
    assert wait_for(lambda: gone(pid), timeout=10)
    assert wait_for(lambda: not os.path.exists(os.path.dirname(socket_path)), timeout=10)   # nothing left in /tmp
    daemon = stack.serve("serve2.log")          # and the journal is free for the next serve
    try:
        assert stack.post_apten(optout(2)).status_code == 200
        (second,) = writer_pids(daemon)
    finally:
        assert daemon.terminate() == 0
    assert wait_for(lambda: gone(second), timeout=10)


def test_a_signal_to_the_whole_process_group_lets_serve_drain_first(stack):
    """SIGTERM sent to every process of the group (as a terminal's Ctrl-C or some
    supervisors do): the writer ignores it and ends when serve closes its stdin."""
    daemon = stack.serve()
    assert stack.post_apten(optout(1)).status_code == 200
    (pid,) = writer_pids(daemon)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    assert not gone(pid)
    assert stack.post_apten(optout(2)).status_code == 200
    assert writer_pids(daemon) == [pid]         # the same writer: it ignored the signal
    assert daemon.terminate() == 0
    assert wait_for(lambda: gone(pid), timeout=10)


def test_kill_9_of_the_writer_under_load_loses_no_acknowledged_webhook(stack):
    """Webhooks stream in from 6 threads while the writer is killed: each answer is a
    200 (its row is on disk) or a 503 (retry), none hangs, and every 200 is in the journal."""
    import sqlite3

    daemon = stack.serve()
    answers: dict[int, int] = {}
    try:
        assert stack.post_apten(optout(0)).status_code == 200
        (first,) = writer_pids(daemon)

        def send(k: int) -> None:
            for n in range(1 + k, 241, 6):
                try:
                    answers[n] = stack.post_apten(optout(n), timeout=20).status_code
                except Exception as exc:  # noqa: BLE001 - recorded as a failed answer
                    answers[n] = repr(exc)  # type: ignore[assignment]

        threads = [threading.Thread(target=send, args=(k,)) for k in range(6)]
        [t.start() for t in threads]
        assert wait_for(lambda: len(answers) >= 60, timeout=30)
        os.kill(first, signal.SIGKILL)
        [t.join(60) for t in threads]
        assert not any(t.is_alive() for t in threads), "a webhook was left hanging"
    finally:
        assert daemon.terminate() == 0
    assert len(answers) == 240 and set(answers.values()) <= {200, 503}, set(answers.values())
    acked = {f"writer-{n}" for n, code in answers.items() if code == 200}
    assert len(acked) >= 200                      # only requests in flight at the kill may fail
    with sqlite3.connect(stack.workdir / "syncd.db") as db:
        stored = {json.loads(raw)["data"]["leadId"] for (raw,) in db.execute("SELECT raw FROM events")}
    assert acked <= stored
    assert len(writer_pids(daemon)) == 2


def test_a_frame_of_the_wrong_shape_fails_alone_in_its_batch(tmp_path):
    """Plain data, but not a prepared event, in the same batch as a good one: the batch
    is rolled back and retried one by one, so only the bad request gets an error."""
    from syncd.journal.ingest_writer import Writer, _Connection

    journal = open_journal(f"sqlite:///{tmp_path}/j.db")

    def insert(items):
        with journal.engine.ingest() as tx:
            return journal.events.insert_prepared(tx, items)

    read_end, write_end = os.pipe()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "w.sock"))
        writer = Writer(insert, listener, read_end)
        (bad, bad_peer), (good, good_peer) = socket.socketpair(), socket.socketpair()
        prepared = journal.events.prepare(event(5), "2024-02-18T09:45:05.000000Z")
        writer._commit([(_Connection(bad_peer), ("not", "an", "event")), (_Connection(good_peer), prepared)])
        assert read_frame(bad)[0] == "error"
        assert read_frame(good)[0::2] == ("ok", True)
        for sock in (bad, bad_peer, good, good_peer):
            sock.close()
    os.close(read_end)
    os.close(write_end)
    assert journal.reports.counts()["events"]["received"] == 1
    journal.close()


def test_the_largest_body_the_config_allows_to_be_stored_crosses_to_the_writer(tmp_path):
    """receiver.max_stored_body_bytes may be up to 64 MiB (config.py): a body that size
    must commit, not be refused by the frame bound (its sender would retry in vain)."""
    from syncd.config import ReceiverConfig

    cap = ReceiverConfig.model_fields["max_stored_body_bytes"].metadata
    largest = min(m.le for m in cap if hasattr(m, "le"))
    journal = open_journal(f"sqlite:///{tmp_path}/j.db", max_stored_body_bytes=largest)
    w = IngestProcess(journal.engine.path, journal.events.prepare)  # type: ignore[attr-defined]
    try:
        raw = b'{"pad": "' + b"x" * (largest - 11) + b'"}'
        assert len(raw) == largest
        assert w.submit(event(1, raw=raw)).created
    finally:
        w.close()
    import sqlite3

    with sqlite3.connect(tmp_path / "j.db") as db:
        (size,) = db.execute("SELECT length(raw) FROM events").fetchone()
    assert size == largest
    journal.close()
