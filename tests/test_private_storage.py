"""The journal is private (0700 folder, 0600 files, whatever the umask) and bounded
(raw bodies over receiver.max_stored_body_bytes are stored as their hash)."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import requests

from syncd.events import ConsentEvent
from syncd.journal import open_journal
from tests.support.stack import LOX24_TOKEN, Stack
from tests.conftest import fixture_bytes


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def an_event(n: int = 1, raw: bytes = b'{"x": 1}') -> ConsentEvent:
    now = datetime.now(timezone.utc)
    return ConsentEvent(source="apten", source_event_id=f"ev-{n}", kind="opt_out", channel="sms",
                        occurred_at=now, received_at=now, raw=raw, phone="+13305551234")


def test_a_new_journal_is_private_under_umask_022(tmp_path):
    db = tmp_path / "var" / "syncd" / "syncd.db"
    with umask(0o022):
        journal = open_journal(f"sqlite:///{db}")
        try:
            journal.events.record(an_event())
            wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
            assert wal.exists() and shm.exists()   # the connection is open: WAL mode keeps both
            assert {p.name: oct(mode(p)) for p in (db, wal, shm)} == {
                "syncd.db": "0o600", "syncd.db-wal": "0o600", "syncd.db-shm": "0o600"}
            assert oct(mode(db.parent)) == oct(mode(db.parent.parent)) == "0o700"
        finally:
            journal.close()


def test_an_existing_journal_readable_by_others_is_narrowed(tmp_path):
    db = tmp_path / "syncd.db"
    with umask(0o022):
        sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.close()
        assert mode(db) == 0o644
        before = mode(tmp_path)
        journal = open_journal(f"sqlite:///{db}")
        journal.events.record(an_event())
        journal.close()
    assert mode(db) == 0o600
    assert mode(tmp_path) == before


def test_serve_keeps_its_journal_private_under_umask_022():
    st = Stack()
    st.journal_url = f"sqlite:///{st.workdir}/data/syncd.db"
    st.start()
    try:
        with umask(0o022):
            daemon = st.serve()
        try:
            assert st.post_lox24(fixture_bytes("lox24_phone_unsubscribe.json")).status_code == 200
            db = st.workdir / "data" / "syncd.db"
            files = [db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}.serve.lock"), Path(f"{db}.write.lock")]
            assert {p.name: oct(mode(p)) for p in files} == {p.name: "0o600" for p in files}
            assert oct(mode(db.parent)) == "0o700"
        finally:
            daemon.terminate()
    finally:
        st.cleanup()


# --- bounded storage -------------------------------------------------------------------------
def stored_raw(db: Path) -> list[bytes]:
    with sqlite3.connect(db) as conn:
        return [bytes(r[0]) for r in conn.execute("SELECT raw FROM events ORDER BY id")]


def padded_apten(padding: str) -> bytes:
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    doc["padding"] = padding
    return json.dumps(doc).encode()


def test_an_oversized_body_is_stored_as_its_hash_and_dedupes_on_the_whole_body(tmp_path):
    from syncd.metrics import Metrics
    from syncd.receiver import create_app
    from syncd.routing import Router
    from syncd.sources import build_sources
    from tests.support.stack import APTEN_SECRET
    from syncd.config import parse_config
    from syncd.sources.apten import SIGNATURE_HEADER, sign
    from tests.conftest import LiveReceiver

    cfg = parse_config({"sources": {"apten": {"secret": APTEN_SECRET}},
                        "receiver": {"max_stored_body_bytes": 4096}}, env={})
    journal = open_journal(f"sqlite:///{tmp_path}/j.db", max_stored_body_bytes=cfg.receiver.max_stored_body_bytes)
    metrics = Metrics()
    live = LiveReceiver(create_app(journal, build_sources(cfg), Router.from_config(cfg),
                                   max_body_bytes=1_048_576, metrics=metrics))
    small, big_a, big_b = padded_apten(""), padded_apten("a" * 100_000), padded_apten("a" * 99_999 + "b")
    try:
        answers = []
        for body in (small, big_a, big_a, big_b):
            resp = requests.post(f"{live.url}/webhooks/apten", data=body, timeout=10, headers={
                "Content-Type": "application/json", SIGNATURE_HEADER: sign(APTEN_SECRET, body)})
            answers.append(resp.json()["status"])
    finally:
        live.close()
        journal.close()
    # The same big body twice is one event; two bodies that differ past the cap are two.
    assert answers == ["accepted", "accepted", "duplicate", "accepted"]
    raws = stored_raw(tmp_path / "j.db")
    assert raws[0] == small
    for raw, body in zip(raws[1:], (big_a, big_b)):
        assert raw == (f"syncd:raw-body-not-stored sha256={hashlib.sha256(body).hexdigest()} "
                       f"bytes={len(body)} cap=4096").encode()
    text = metrics.render().decode()
    sent = len(small) + 2 * len(big_a) + len(big_b)
    assert f'syncd_webhook_body_bytes_total{{source="apten"}} {float(sent)}' in text


def test_five_padded_lox24_posts_grow_the_journal_by_far_less_than_5_mb():
    st = Stack(extra_config={"receiver": {"max_body_bytes": 2 * 1024 * 1024}}).start()
    try:
        daemon = st.serve()
        try:
            db = st.workdir / "syncd.db"

            def size() -> int:
                return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())

            before = size()
            doc = json.loads(fixture_bytes("lox24_phone_unsubscribe.json"))
            for n in range(5):
                doc.update(id=f"padded-{n}", padding="x" * 1_000_000)
                assert st.post_lox24(json.dumps(doc).encode(), token=LOX24_TOKEN).status_code == 200
            grown = size() - before
        finally:
            daemon.terminate()
    finally:
        st.cleanup()
    print(f"five 1 MB-padded LOX24 posts grew the journal by {grown} bytes")
    assert grown < 512 * 1024, f"the journal grew by {grown} bytes"
