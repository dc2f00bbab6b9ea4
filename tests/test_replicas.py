"""Two ``syncd serve`` replicas on one PostgreSQL journal: webhooks posted to
both are each applied once, and polling moves to the survivor when the leader is
killed. Real processes, one shared set of simulators (Salesforce, Sinch), a fresh
database per test. Needs SYNCD_TEST_PG_URL (see .ci/pg.sh)."""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
import yaml

from tests.support.stack import APTEN_SECRET, Daemon, Stack, free_port, wait_for
from tests.conftest import fixture_bytes

URL = os.environ.get("SYNCD_TEST_PG_URL")
pytestmark = [pytest.mark.skipif(not URL, reason="SYNCD_TEST_PG_URL not set"),
              pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(90)]

POLL = 0.5  # schedule.poll_interval_seconds of both replicas


def optout(ext_id: str, n: int) -> bytes:
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    # no phone: each event targets its named record alone (fan-out lookups are tested elsewhere)
    doc["data"].update(externalLeadId=ext_id, leadId=f"replica-lead-{n}", phone=None)
    doc["timestamp"] = f"2024-02-18T10:{n // 60 % 60:02d}:{n % 60:02d}Z"
    return json.dumps(doc).encode()


def post_apten(base_url: str, body: bytes) -> requests.Response:
    from syncd.sources.apten import SIGNATURE_HEADER, sign

    return requests.post(f"{base_url}/webhooks/apten", data=body, timeout=10,
                         headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(APTEN_SECRET, body)})


def logged(daemon: Daemon, msg: str) -> list[dict]:
    return [x for x in daemon.log_lines() if x.get("msg") == msg]


def registrations_for(sinch, digits: str) -> list[dict]:
    return [r for r in list(sinch.registrations) if {"channel": "WHATSAPP", "identity": digits} in r["identities"]]


@pytest.fixture
def database():
    """A fresh database on the test server; dropped (connections and all) afterwards."""
    import psycopg
    from psycopg import sql

    name = f"syncd_rep_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(URL)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def replicas(database):
    """One Stack (Salesforce + Sinch simulators, PostgreSQL journal) served by two
    processes that differ only in ``receiver.port`` and ``admin.port``; plus a journal handle for counts."""
    from syncd.journal import open_journal

    st = Stack(journal_url=database, sinch=True, poll_interval=POLL).start()
    cfg = yaml.safe_load(st.config_path.read_text(encoding="utf-8"))
    port2 = free_port()
    cfg["receiver"]["port"] = port2
    cfg["admin"]["port"] = free_port()
    config2 = st.workdir / "config2.yaml"
    config2.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    started: list[Daemon] = []
    journal = None
    try:
        started.append(st.serve("replica1.log"))
        started.append(Daemon.start(config2, st.workdir / "replica2.log", f"http://127.0.0.1:{port2}",
                                           cwd=st.workdir))
        journal = open_journal(database)
        st.journal = journal
        yield st, started
    finally:
        for d in started:
            d.terminate()
        if journal is not None:
            journal.close()
        st.cleanup()
        ca_dir = Path(st.sandboxes["salesforce"].tls.ca_bundle).parent  # Stack.cleanup leaves it behind
        if ca_dir.name.startswith("syncd-sandbox-ca-"):
            shutil.rmtree(ca_dir, ignore_errors=True)


def test_events_posted_alternately_to_two_replicas_update_every_record_exactly_once(replicas):
    st, (one, two) = replicas
    sf = st.sandboxes["salesforce"]
    ids = [sf.add_record("Contact", None, LastName=f"R{i}", SMS_Opt_Out__c=False) for i in range(60)]
    answers: Counter = Counter()
    for n, rid in enumerate(ids):
        replica = (one, two)[n % 2]
        answers[(replica.url, post_apten(replica.url, optout(rid, n)).status_code)] += 1
    assert answers == {(one.url, 200): 30, (two.url, 200): 30}

    assert wait_for(lambda: all(sf.get_record("Contact", rid)["SMS_Opt_Out__c"] for rid in ids), timeout=30)
    assert wait_for(lambda: st.journal.reports.counts()["deliveries"]["done"] == 60, timeout=10)
    time.sleep(1.0)  # several more push ticks on both replicas: nothing is written again
    counts = sf.composite_writes()
    assert {rid: counts[rid] for rid in ids} == {rid: 1 for rid in ids}
    assert set(counts) == set(ids)
    settled = [x for d in (one, two) for x in logged(d, "delivery settled") if x.get("state") == "done"]
    assert len(settled) == 60 and len({x["delivery_id"] for x in settled}) == 60
    c = st.journal.reports.counts()["deliveries"]
    assert c["pending"] == 0 and c["dead"] == 0 and c["done"] == 60
    assert one.proc.poll() is None and two.proc.poll() is None


def test_one_leader_polls_and_the_other_replica_takes_over_when_it_is_killed(replicas):
    st, pair = replicas
    sf, sinch = st.sandboxes["salesforce"], st.sandboxes["sinch"]
    first = sf.add_record("Contact", None, LastName="First", MobilePhone="+13305550101")
    second = sf.add_record("Contact", None, LastName="Second", MobilePhone="+13305550102")
    polled = lambda: st.journal.reports.counts()["crms"].get("salesforce", {}).get("last_poll_at")  # noqa: E731
    assert wait_for(lambda: polled() is not None, timeout=15)  # the first poll set the watermark

    # Both alive: an admin's flag is polled by one replica and registered once.
    sf.set_field("Contact", first, DoNotCall=True)
    sf.advance(10)  # past the poller's settle window
    assert wait_for(lambda: len(registrations_for(sinch, "13305550101")) == 1, timeout=10)
    assert wait_for(lambda: st.journal.reports.counts()["reflections"] == {"pending": 0, "done": 1, "failed": 0},
                    timeout=10)
    time.sleep(5 * POLL)  # five more polls on the leader, ten more ticks of each register loop
    assert len(sinch.registrations) == 1
    pollers = [d for d in pair if logged(d, "reflections queued")]
    assert len(pollers) == 1, "exactly one replica polled the CRM"
    leader = pollers[0]
    survivor = pair[1 - pair.index(leader)]

    # Kill the leader: its session ends, its advisory lock goes with it.
    leader.kill9()
    sinch.callback_url = f"{survivor.url}/webhooks/sinch"  # Sinch's notifications now reach the survivor
    sf.set_field("Contact", second, DoNotCall=True)
    sf.advance(10)
    flagged = time.monotonic()
    assert wait_for(lambda: len(registrations_for(sinch, "13305550102")) == 1, timeout=15)
    assert time.monotonic() - flagged < 4 * POLL + 2.0  # a few poll intervals, plus slack
    assert logged(survivor, "reflections queued")
    assert wait_for(lambda: st.journal.reports.counts()["reflections"] == {"pending": 0, "done": 2, "failed": 0},
                    timeout=10)
    time.sleep(4 * POLL)
    assert len(registrations_for(sinch, "13305550101")) == 1
    assert len(registrations_for(sinch, "13305550102")) == 1
    assert survivor.proc.poll() is None


def test_the_same_webhook_sent_to_both_replicas_at_once_is_stored_and_applied_once(replicas):
    """A platform retrying through a load balancer can hit both replicas at the same
    moment: the unique key stores one event, one answer says duplicate, one write."""
    from concurrent.futures import ThreadPoolExecutor

    st, (one, two) = replicas
    sf = st.sandboxes["salesforce"]
    ids = [sf.add_record("Contact", None, LastName=f"D{i}", SMS_Opt_Out__c=False) for i in range(20)]
    bodies = [optout(rid, 100 + n) for n, rid in enumerate(ids)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda job: post_apten(job[0].url, job[1]),
                                [(replica, body) for body in bodies for replica in (one, two)]))
    assert [a.status_code for a in answers] == [200] * 40
    statuses = Counter(a.json()["status"] for a in answers)
    assert statuses == {"accepted": 20, "duplicate": 20}
    pairs = [(answers[2 * i].json()["event_id"], answers[2 * i + 1].json()["event_id"]) for i in range(20)]
    assert all(a == b for a, b in pairs) and len({a for a, _ in pairs}) == 20
    assert st.journal.reports.counts()["events"]["received"] == 20

    assert wait_for(lambda: all(sf.get_record("Contact", rid)["SMS_Opt_Out__c"] for rid in ids), timeout=30)
    assert wait_for(lambda: st.journal.reports.counts()["deliveries"]["done"] == 20, timeout=10)
    time.sleep(1.0)
    counts = sf.composite_writes()
    assert {rid: counts[rid] for rid in ids} == {rid: 1 for rid in ids}


def test_a_killed_replicas_leased_deliveries_are_pushed_by_the_other_at_once(database):
    """kill -9 of a replica stuck mid-push: the next replica frees its leases on its
    first tick (its database session is gone) instead of waiting out the 300 s lease."""
    st = Stack(journal_url=database, push_interval=0.2).start()
    st.extra_config = {"schedule": {"lease_seconds": 300}}
    st.write_config()
    sf = st.sandboxes["salesforce"]
    daemons: list[Daemon] = []
    try:
        ids = [sf.add_record("Contact", None, LastName=f"K{i}", SMS_Opt_Out__c=False) for i in range(6)]
        warm, ids = ids[0], ids[1:]
        first = st.serve("first.log")
        daemons.append(first)
        assert post_apten(first.url, optout(warm, 199)).status_code == 200   # holds a Salesforce session
        assert wait_for(lambda: sf.get_record("Contact", warm)["SMS_Opt_Out__c"], timeout=15)
        sf.clear_log()
        sf.stall.set()                       # the CRM hangs: the first replica is stuck holding its leases
        for n, rid in enumerate(ids):
            assert post_apten(first.url, optout(rid, 200 + n)).status_code == 200
        assert wait_for(lambda: sf.requests_to(r"/composite/sobjects$", "PATCH"), timeout=15)
        first.kill9()
        sf.stall.clear()
        started = time.monotonic()
        second = st.serve("second.log")
        daemons.append(second)
        # (the stalled PATCH still lands once the CRM recovers; the leased deliveries
        # are only settled when a live replica pushes them again)
        assert wait_for(lambda: json.loads(st.syncd("status", "--json").stdout)["deliveries"]["done"] == 6,
                        timeout=30)
        assert time.monotonic() - started < 30   # far inside the 300 s lease
        assert all(sf.get_record("Contact", rid)["SMS_Opt_Out__c"] for rid in ids)
        assert logged(second, "took over the leases of a replica that is gone")
    finally:
        for d in daemons:
            d.terminate()
        st.cleanup()
        ca_dir = Path(sf.tls.ca_bundle).parent
        if ca_dir.name.startswith("syncd-sandbox-ca-"):
            shutil.rmtree(ca_dir, ignore_errors=True)


def test_without_sinch_the_poll_still_runs_on_one_leader(database):
    """No Sinch configured: every replica has a poller for the consent ledger, one
    leads; when its journal session ends, the other takes over at its next poll."""
    from syncd.config import load_config
    from syncd.runtime import open_runtime

    st = Stack(journal_url=database).start()
    runtimes = [open_runtime(load_config(st.config_path, env={})) for _ in range(2)]
    try:
        one, two = (rt.reflector for rt in runtimes)
        assert one is not None and two is not None and one.sinch is None
        assert one.poll_once() == {"salesforce": 0}       # the leader: its first poll sets the watermark
        assert two.poll_once() == {}                       # not the leader: polls nothing
        runtimes[0].journal.close()
        assert wait_for(lambda: two.poll_once() == {"salesforce": 0}, timeout=15)
    finally:
        for rt in runtimes[1:]:
            rt.journal.close()
        st.cleanup()
