"""The consent ledger in the operator's views: its size by state in ``syncd status``
(text and ``--json``), in the status page, and the identity columns of ``export``;
and the consent API's single-key lookup agreeing with the batch one."""
from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests
from click.testing import CliRunner

from syncd.cli import EXPORT_COLUMNS, cli
from syncd.events import ConsentEvent
from syncd.journal import open_journal
from tests.test_status_page import BEARER, TOKEN, make_receiver

T0 = datetime(2024, 2, 18, 9, 45, tzinfo=timezone.utc)
OLD_COLUMNS = ["event_id", "source", "source_event_id", "received_at", "occurred_at", "kind", "channel",
               "target_crm", "target_object", "target_record", "state", "delivered_at", "attempts",
               "error", "outcome", "reflection", "reflection_at", "reflection_error", "raw_channel",
               "unmodelled"]


def event(n: int, kind: str = "opt_out", channel: str = "sms", **kw) -> ConsentEvent:
    base = dict(source="apten", source_event_id=f"ev-{n}", kind=kind, channel=channel,
                occurred_at=T0 + timedelta(seconds=n), received_at=datetime.now(timezone.utc), raw=b"{}",
                external_lead_id="003XX000004DHPY", phone="+13305551234", phone_raw="+1 (330) 555-1234")
    return ConsentEvent(**{**base, **kw})


def fill(journal) -> None:
    """Ledger: +13305551234 sms opted out, call opted in (a newer opt-in), email
    opted out (do_not_contact: every channel of both identities)... exactly:"""
    journal.events.record(event(1, "opt_out", "sms"))
    journal.events.record(event(2, "opt_in", "call"))
    journal.events.record(event(3, "opt_out", "email", phone=None, phone_raw=None,
                                email="  Dana.Reyes@Example.COM "))
    journal.events.record(event(4, "opt_out", "sms", phone="+13305550151", phone_raw="+13305550151"))


EXPECTED = {"opted_out": 3, "opted_in": 1}


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text('journal: {url: "sqlite:///j.db"}\nsources:\n  apten: {secret: abcdefghij0123456789abcdef}\n')
    return path


def _journal(tmp_path: Path) -> Path:
    path = _config(tmp_path)
    j = open_journal(f"sqlite:///{tmp_path}/j.db")
    fill(j)
    j.close()
    return path


def _run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_ledger_counts_by_state_on_both_engines(journal):
    assert journal.reports.ledger_counts() == {"opted_out": 0, "opted_in": 0}
    fill(journal)
    assert journal.reports.ledger_counts() == EXPECTED
    assert len(journal.ledger.all()) == sum(EXPECTED.values())


def test_status_json_adds_the_ledger_and_keeps_the_contract_keys(tmp_path):
    doc = json.loads(_run("-c", str(_journal(tmp_path)), "status", "--json"))
    assert doc["ledger"] == EXPECTED
    assert {"deliveries", "quarantined", "reflections", "events", "ignored", "crms"} <= set(doc)
    assert {"pending", "done", "dead"} <= set(doc["deliveries"])


def test_status_text_shows_the_ledger_by_state(tmp_path):
    out = _run("-c", str(_journal(tmp_path)), "status")
    assert "ledger       opted_out 3  opted_in 1" in out.splitlines()


def test_status_page_shows_the_ledger_by_state(tmp_path):
    live = make_receiver(tmp_path, TOKEN)
    try:
        fill(live.journal)
        html = requests.get(f"{live.url}/status", headers=BEARER, timeout=5).text
        assert 'data-count="ledger-opted-out">3<' in html and 'data-count="ledger-opted-in">1<' in html
        for personal in ("3305551234", "dana.reyes"):   # counts only, no identity on the page
            assert personal not in html
    finally:
        live.close()
        live.journal.close()


def test_export_csv_adds_the_identity_columns_at_the_end(tmp_path):
    out = _run("-c", str(_journal(tmp_path)), "export", "--format", "csv")
    reader = csv.DictReader(io.StringIO(out))
    assert reader.fieldnames == OLD_COLUMNS + ["deadline", "honoured_at", "within_deadline", "phone", "email"] == EXPORT_COLUMNS
    rows = {r["source_event_id"]: r for r in reader}
    assert (rows["ev-1"]["phone"], rows["ev-1"]["email"]) == ("+13305551234", "")
    assert (rows["ev-3"]["phone"], rows["ev-3"]["email"]) == ("", "dana.reyes@example.com")
    assert rows["ev-4"]["phone"] == "+13305550151"


def test_export_jsonl_carries_the_identities_as_the_ledger_keys_them(tmp_path, journal):
    path = _journal(tmp_path)
    rows = {r["source_event_id"]: r for r in map(json.loads, _run("-c", str(path), "export", "--format",
                                                                  "jsonl").splitlines())}
    assert (rows["ev-1"]["phone"], rows["ev-1"]["email"]) == ("+13305551234", None)
    assert (rows["ev-3"]["phone"], rows["ev-3"]["email"]) == (None, "dana.reyes@example.com")
    # The same keys the ledger holds: an export row finds its ledger entry.
    fill(journal)
    keys = {(e.identity, e.channel) for e in journal.ledger.all()}
    assert ("dana.reyes@example.com", "email") in keys and ("+13305551234", "sms") in keys


def test_single_lookup_answers_as_the_batch_does(journal):
    fill(journal)
    keys = [("+13305551234", "sms"), ("+13305551234", "call"), ("dana.reyes@example.com", "email"),
            ("+13305551234", "whatsapp"), ("+19999999999", "sms")]
    assert [journal.ledger.state(*k) for k in keys] == journal.ledger.states(keys)
    assert journal.ledger.state("+13305551234", "call").state == "opted_in"
    assert journal.ledger.state("+19999999999", "sms") is None


def test_single_lookup_sees_each_new_commit(journal):
    """The one-statement lookup holds no read snapshot between calls: an opt-out
    recorded after a lookup is seen by the next lookup on the same thread."""
    assert journal.ledger.state("+13305551234", "sms") is None
    journal.events.record(event(1, "opt_out", "sms"))
    assert journal.ledger.state("+13305551234", "sms").state == "opted_out"
    journal.events.record(event(9, "opt_in", "sms"))
    assert journal.ledger.state("+13305551234", "sms").state == "opted_in"


def test_postgres_lookup_survives_a_dropped_connection(journal):
    """PostgreSQL: the per-thread reader connection of the single-key lookup is replaced
    when the server dropped it (restart, failover, idle kill), and the read retried."""
    engine = journal.ledger.engine
    if engine.dialect != "postgresql":
        return
    journal.events.record(event(1, "opt_out", "sms"))
    assert journal.ledger.state("+13305551234", "sms").state == "opted_out"
    victim = engine._local.reader.info.backend_pid
    with engine.pool.connection() as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (victim,))
    assert journal.ledger.state("+13305551234", "sms").state == "opted_out"
    assert engine._local.reader.info.backend_pid != victim


def test_consent_api_answers_503_when_the_ledger_cannot_be_read(tmp_path, monkeypatch):
    import sqlite3

    from syncd.config import parse_config
    from syncd.receiver import create_app
    from syncd.routing import Router
    from tests.conftest import LiveReceiver

    journal = open_journal(f"sqlite:///{tmp_path}/api.db")

    def locked(*_args, **_kw):
        raise sqlite3.OperationalError("database is locked")

    for read in ("state", "states", "states_at_once"):   # before the app binds its readers
        monkeypatch.setattr(journal.ledger, read, locked)
    live = LiveReceiver(create_app(journal, {}, Router.from_config(parse_config({}, base_dir=tmp_path, env={})),
                                   api_token=TOKEN, default_region="US"))
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        got = requests.get(f"{live.url}/v1/consent", params={"phone": "+13305551234", "channel": "sms"},
                           headers=auth, timeout=5)
        assert got.status_code == 503 and got.json()["error"] == "consent ledger unavailable, please retry"
        posted = requests.post(f"{live.url}/v1/consent", json={"checks": [{"phone": "+13305551234",
                                                                           "channel": "sms"}]},
                               headers=auth, timeout=5)
        assert posted.status_code == 503
    finally:
        live.close()
        journal.close()
