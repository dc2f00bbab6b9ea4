"""Shared fixtures: sandbox CRMs over real HTTP(S), configs and journals."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from syncd.config import DEMO_ENV, parse_config
from tests.support.stack import APTEN_SECRET, Stack

FIXTURES = Path(__file__).parent / "fixtures"

# The tests sign with the demo stack's published secrets, which a config accepts only here.
os.environ[DEMO_ENV] = "1"


def consent_or_none(source, doc, now):
    """What a source makes of the JSON document ``doc``: its event, or None when the
    source ignores it or rejects it with a BadPayload (whose message must say why)."""
    import json

    from syncd.sources import BadPayload, Ignored

    try:
        result = source.parse(json.dumps(doc).encode(), now)
    except BadPayload as exc:
        assert str(exc)
        return None
    return None if isinstance(result, Ignored) else result


def keep_screenshots(folder: Path, names: tuple[str, ...]) -> None:
    """Copy a browser test's screenshots to ``$SYNCD_KEEP_SCREENSHOTS`` when it is set."""
    keep = os.environ.get("SYNCD_KEEP_SCREENSHOTS")
    if keep:
        for name in names:
            shutil.copy(folder / name, Path(keep) / name)


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def seed_delivered_and_dead(stack, error: str) -> str:
    """Against a serving stack: Apten's seed example delivered to the seeded Contact,
    and one opt-out for a second Contact the org refuses for good with ``error`` (a
    dead letter); returns the second Contact's id once both have settled."""
    import json

    from tests.support.stack import wait_for

    sf = stack.sandboxes["salesforce"]
    assert stack.post_apten(fixture_bytes("apten_optout_sms.json")).json()["status"] == "accepted"
    other = sf.add_record("Contact", None, LastName="X", SMS_Opt_Out__c=False)
    sf.reject_record(other, "FIELD_CUSTOM_VALIDATION_EXCEPTION", error)
    doc = json.loads(fixture_bytes("apten_optout_sms.json"))
    doc["data"].update(externalLeadId=other, leadId="b1c2d3e4-0000-4000-8000-000000000002", phone=None)
    assert stack.post_apten(json.dumps(doc).encode()).json()["status"] == "accepted"

    def settled() -> bool:
        counts = json.loads(stack.syncd("status", "--json").stdout)["deliveries"]
        return counts["done"] == 1 and counts["dead"] == 1
    assert wait_for(settled, timeout=30, interval=0.2)
    return other


@pytest.fixture
def sf_sandbox():
    from connectors.sandbox.salesforce import SalesforceSandbox
    from tests.support.stack import seed_salesforce

    sb = SalesforceSandbox()
    seed_salesforce(sb)
    sb.start()
    yield sb
    sb.stop()


@pytest.fixture
def sf_config(tmp_path, sf_sandbox):
    """A validated Config for an in-process runtime against the Salesforce sandbox."""
    from tests.support.stack import default_mapping_text

    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "salesforce.yaml").write_text(default_mapping_text("salesforce"))
    return parse_config({
        "journal": {"url": "sqlite:///syncd.db"},
        "http": {"ca_bundle": sf_sandbox.tls.ca_bundle, "timeout_seconds": 10},
        "sources": {"apten": {"secret": APTEN_SECRET}},
        "crm": {"salesforce": {
            "instance_url": sf_sandbox.url, "api_version": "62.0",
            "auth": {"flow": "client_credentials", "login_url": sf_sandbox.url,
                     "client_id": sf_sandbox.client_id, "client_secret": sf_sandbox.client_secret},
            "mapping": "mappings/salesforce.yaml"}},
        "retry": {"initial_backoff_seconds": 0.1, "max_backoff_seconds": 1},
    }, base_dir=tmp_path, env={})


@pytest.fixture
def runtime(sf_config):
    from syncd.runtime import open_runtime

    rt = open_runtime(sf_config)
    yield rt
    rt.journal.close()


@pytest.fixture
def stack():
    st = Stack().start()
    yield st
    st.cleanup()


class LiveReceiver:
    """The receiver app served by waitress on a free port, in a thread."""

    def __init__(self, app):
        import threading

        from waitress.server import create_server

        self.server = create_server(app, host="127.0.0.1", port=0, threads=4, asyncore_loop_timeout=0.05)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.closing = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.server.run()
        except (OSError, ValueError):
            if not self.closing:  # the loop trips over its closed socket only when we close it
                raise

    def close(self):
        self.closing = True
        self.server.close()
        self.thread.join(2)


@pytest.fixture
def receiver(tmp_path):
    """A receiver with all three sources and a Salesforce route, on a fresh journal."""
    from syncd.journal import open_journal
    from syncd.receiver import create_app
    from syncd.routing import Router
    from syncd.sources import build_sources
    from tests.support.stack import LOX24_TOKEN, SINCH_SECRET

    cfg = parse_config({
        "sources": {"apten": {"secret": APTEN_SECRET}, "lox24": {"token": LOX24_TOKEN},
                    "sinch": {"secret": SINCH_SECRET}},
        "receiver": {"max_body_bytes": 65536},
        "crm": {"salesforce": {"instance_url": "https://127.0.0.1:9", "auth": {"flow": "access_token",
                                                                            "access_token": "x"}}},
    }, base_dir=tmp_path, env={})
    journal = open_journal(f"sqlite:///{tmp_path}/r.db")
    from syncd.metrics import Metrics

    metrics = Metrics()
    app = create_app(journal, build_sources(cfg), Router.from_config(cfg), max_body_bytes=65536, metrics=metrics)
    live = LiveReceiver(app)
    live.journal = journal
    live.metrics = metrics  # /metrics is served by the admin listener, not the webhook port
    yield live
    live.close()
    journal.close()


@pytest.fixture
def crm_stack():
    """Sandboxes of all three CRMs (no daemon process), config written."""
    from tests.support.stack import ALL_CRMS

    st = Stack(crms=ALL_CRMS).start()
    yield st
    st.cleanup()


@pytest.fixture
def stack_runtime(crm_stack):
    """An in-process runtime (journal, connectors, pusher) on the crm_stack's config."""
    from syncd.config import load_config
    from syncd.runtime import open_runtime

    rt = open_runtime(load_config(crm_stack.config_path, env={}))
    yield rt
    rt.journal.close()


@pytest.fixture(params=["sqlite", "postgres"])
def journal(request, tmp_path):
    """A fresh journal on each engine (PostgreSQL in a schema of its own, when
    SYNCD_TEST_PG_URL is set)."""
    import time

    from syncd.journal import open_journal

    if request.param == "sqlite":
        j = open_journal(f"sqlite:///{tmp_path}/j.db")
    else:
        url = os.environ.get("SYNCD_TEST_PG_URL")
        if not url:
            pytest.skip("SYNCD_TEST_PG_URL not set")
        from syncd.journal import journal_on
        from syncd.journal.postgres import PostgresEngine

        j = journal_on(PostgresEngine(url, schema=f"t{os.getpid()}_{time.time_ns()}"))
    yield j
    j.close()
