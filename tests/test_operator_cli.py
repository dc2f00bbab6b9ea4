"""Operator-facing errors and CLI output: one line that says where and why, one JSON
document per ``--json``, read-only commands that never create a journal."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from connectors.types import RecordRef
from syncd.cli import cli
from syncd.config import ConfigError, parse_config
from syncd.events import ConsentEvent
from syncd.journal import open_journal
from syncd.journal.base import Outcome
from tests.support.stack import Stack, default_mapping_text, free_port

REF = RecordRef("salesforce", "Contact", "003XX000004DHPYYA4")


def _config(tmp_path: Path, journal: str = "sqlite:///j.db", extra: str = "") -> Path:
    (tmp_path / "hs.yaml").write_text(default_mapping_text("hubspot"))
    path = tmp_path / "config.yaml"
    path.write_text(f"journal: {{url: \"{journal}\"}}\nsources:\n  apten: {{secret: abcdefghij0123456789abcdef}}\n"
                    f"crm:\n  hubspot: {{base_url: \"http://127.0.0.1:1\", access_token: tok, mapping: hs.yaml}}\n"
                    + extra)
    return path


def _syncd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "syncd.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _dead_letter(db: Path, n: int = 1) -> str:
    j = open_journal(f"sqlite:///{db}")
    rec = j.events.record(ConsentEvent(source="apten", source_event_id=f"ev-{n}", kind="opt_out", channel="sms",
                                       occurred_at=datetime(2024, 2, 18, tzinfo=timezone.utc),
                                       received_at=datetime.now(timezone.utc), raw=b"{}",
                                       external_lead_id="003XX000004DHPY", phone="+13305551234"))
    j.deliveries.add_targets(rec.event_id, [REF])
    d = j.deliveries.claim(10, 60)[0]
    j.deliveries.settle([Outcome(d.id, "dead", error="FIELD_CUSTOM_VALIDATION_EXCEPTION: nope", ref=REF)])
    j.close()
    return f"d{d.id}"


# --- config: everything in one run, with "did you mean" --------------------------------
def test_every_unset_variable_and_unknown_key_is_reported_at_once():
    data = {"sources": {"apten": {"secret": "${APTEN_SECRT}"}, "lox24": {"token": "${LOX24_TOKEN}"}},
            "recever": {}, "crm": {"hubspot": {"access_token": "${HS_TOKEN}", "mapin": "x.yaml"}}}
    with pytest.raises(ConfigError) as err:
        parse_config(data, env={"APTEN_SECRET": "abcdefghij"})
    lines = str(err.value).splitlines()
    assert lines == [
        "sources.apten.secret: environment variable APTEN_SECRT is not set (did you mean APTEN_SECRET?)",
        "sources.lox24.token: environment variable LOX24_TOKEN is not set",
        "crm.hubspot.access_token: environment variable HS_TOKEN is not set",
        "crm.hubspot.mapin: unknown key (did you mean mapping?)",
        "recever: unknown key (did you mean receiver?)",
    ]


@pytest.mark.parametrize("key,value", [
    ("crm.hubspot.base_url", "api.hubapi.com"),
    ("crm.close.base_url", "ftp://api.close.com"),
    ("sinch.auth_url", "auth.sinch.com/oauth2/token"),
    ("alerts.webhook_url", "hooks.slack.com/services/T/B/x"),
])
def test_a_url_without_scheme_is_a_config_error(key, value):
    data: dict = {"crm": {"hubspot": {"access_token": "t"}, "close": {"api_key": "k"}},
                  "sinch": {"project_id": "p", "app_id": "a", "key_id": "k", "key_secret": "s"}}
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    with pytest.raises(ConfigError) as err:
        parse_config(data, env={})
    assert str(err.value) == f"{key}: {value!r} is not a URL: it must start with https:// and name a host"


# --- serve: one line, exit 2, no traceback ---------------------------------------------
def test_serve_with_a_missing_mapping_file_is_one_line(tmp_path):
    path = _config(tmp_path)
    (tmp_path / "hs.yaml").unlink()
    run = _syncd("-c", str(path), "serve")
    assert run.returncode == 2
    assert run.stderr.strip() == f"syncd: config error: crm.hubspot.mapping: mapping file not found: {tmp_path}/hs.yaml"


def test_serve_on_a_port_in_use_is_one_line(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        run = _syncd("-c", str(_config(tmp_path, extra=f"receiver: {{port: {port}}}\n")), "serve")
    finally:
        holder.close()
    assert run.returncode == 2
    assert run.stderr.strip() == f"syncd: cannot listen on 127.0.0.1:{port}: address already in use"


def test_serve_with_a_bad_config_is_one_line_per_problem(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("receiver: {port: 99999}\n")
    run = _syncd("-c", str(path), "serve")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == "syncd: config error: receiver.port: Input should be less than or equal to 65535"


# --- read-only commands refuse a journal that does not exist -----------------------------
@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["dead-letters"], ["export"],
                                     ["replay", "d1"]])
def test_read_only_commands_refuse_a_missing_sqlite_journal(tmp_path, command):
    path = _config(tmp_path, journal="sqlite:///typo.db")
    result = _run("-c", str(path), *command)
    assert result.exit_code == 2
    assert f"journal not found: {tmp_path}/typo.db" in result.stderr
    assert not (tmp_path / "typo.db").exists()


def test_read_only_commands_refuse_a_missing_postgres_schema(tmp_path):
    url = os.environ.get("SYNCD_TEST_PG_URL")
    if not url:
        pytest.skip("SYNCD_TEST_PG_URL not set")
    schema = f"missing{os.getpid()}_{time.time_ns()}"
    sep = "&" if "?" in url else "?"
    path = _config(tmp_path, journal=f"{url}{sep}schema={schema}")
    result = _run("-c", str(path), "status")
    assert result.exit_code == 2
    assert "journal not found: PostgreSQL" in result.stderr and f"schema {schema}" in result.stderr
    import psycopg

    with psycopg.connect(url) as conn:  # nothing was created
        assert conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is None


# --- replay, --json, -c after the subcommand --------------------------------------------
def test_replay_says_what_happened_per_id(tmp_path):
    path = _config(tmp_path)
    dead = _dead_letter(tmp_path / "j.db")

    dry = _run("replay", dead, "-c", str(path), "--dry-run")
    assert dry.exit_code == 0
    assert dry.stdout.strip() == (f"{dead}: would re-queue  salesforce:Contact:003XX000004DHPYYA4  "
                                  "(FIELD_CUSTOM_VALIDATION_EXCEPTION: nope)")
    assert json.loads(_run("-c", str(path), "dead-letters", "--json").stdout)[0]["id"] == dead

    mixed = _run("-c", str(path), "replay", dead, "d999", "zz")
    assert mixed.exit_code == 1
    lines = mixed.stdout.strip().splitlines()
    assert lines[0].startswith(f"{dead}: re-queued  salesforce:Contact:003XX000004DHPYYA4")
    assert lines[1].startswith("d999: not re-queued  (no dead letter with this id")
    assert lines[2].startswith("zz: not re-queued  (not a dead-letter id")

    again = _run("-c", str(path), "replay", dead, "--json")
    assert again.exit_code == 1
    assert [r["result"] for r in json.loads(again.stdout)] == ["not-dead"]


def test_replay_all_dead_lists_each(tmp_path):
    path = _config(tmp_path)
    first, second = _dead_letter(tmp_path / "j.db", 1), _dead_letter(tmp_path / "j.db", 2)
    run = _run("-c", str(path), "replay", "--all-dead")
    assert run.exit_code == 0
    assert [x.split(":")[0] for x in run.stdout.splitlines()] == [first, second]
    assert json.loads(_run("-c", str(path), "dead-letters", "--json").stdout) == []
    assert _run("-c", str(path), "replay", "--all-dead").stdout.strip() == "no dead letters"


def test_dead_letters_json_is_one_array(tmp_path):
    path = _config(tmp_path)
    open_journal(f"sqlite:///{tmp_path}/j.db").close()
    empty = _run("dead-letters", "--json", "-c", str(path))
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []
    _dead_letter(tmp_path / "j.db")
    one = json.loads(_run("dead-letters", "--json", "-c", str(path)).stdout)
    assert isinstance(one, list) and len(one) == 1 and one[0]["crm"] == "salesforce"


def test_check_json_is_one_document(tmp_path):
    result = _run("check", "--json", "-c", str(_config(tmp_path)))
    doc = json.loads(result.stdout)
    assert result.exit_code == 1 and doc["ok"] is False
    assert doc["problems"] == ["config: crm.hubspot.base_url: cannot reach http://127.0.0.1:1: connection refused"]


# --- check: URL and cause against the config key -------------------------------------------
@pytest.fixture
def sf_stack():
    st = Stack(crms=("salesforce",)).start()
    yield st
    st.cleanup()


def test_check_names_the_url_and_cause_against_the_key(sf_stack):
    import yaml

    cfg = yaml.safe_load(sf_stack.config_path.read_text())
    sf_url = cfg["crm"]["salesforce"]["auth"]["login_url"]
    cfg["crm"]["salesforce"]["auth"]["client_secret"] = "wrong-secret-value"
    sf_stack.config_path.write_text(yaml.safe_dump(cfg))
    run = sf_stack.syncd("check")
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"config: crm.salesforce.auth: salesforce refused the credentials ({sf_url}/services/oauth2/token): "
        "[400 invalid_client] invalid client credentials"]
    assert "wrong-secret-value" not in run.stdout + run.stderr
    assert f"connecting to {sf_url} (crm.salesforce.auth.login_url)" in run.stderr

    cfg["crm"]["salesforce"]["auth"]["login_url"] = f"https://127.0.0.1:{free_port()}"
    sf_stack.config_path.write_text(yaml.safe_dump(cfg))
    refused = sf_stack.syncd("check")
    assert refused.stdout.strip().endswith(": connection refused")
    assert refused.stdout.startswith("config: crm.salesforce.auth.login_url: cannot reach https://127.0.0.1:")

    cfg["crm"]["salesforce"]["auth"]["login_url"] = "https://no-such-host.invalid"
    sf_stack.config_path.write_text(yaml.safe_dump(cfg))
    assert sf_stack.syncd("check").stdout.strip() == (
        "config: crm.salesforce.auth.login_url: cannot reach https://no-such-host.invalid: DNS: host name not found")

    cfg["crm"]["salesforce"]["auth"]["login_url"] = sf_url
    cfg["http"].pop("ca_bundle", None)
    sf_stack.config_path.write_text(yaml.safe_dump(cfg))
    untrusted = sf_stack.syncd("check", env={"REQUESTS_CA_BUNDLE": "", "CURL_CA_BUNDLE": ""})
    assert untrusted.stdout.startswith(f"config: crm.salesforce.auth.login_url: cannot reach {sf_url}: "
                                       "TLS certificate not trusted")


def test_check_prints_the_instance_it_used(sf_stack):
    run = sf_stack.syncd("check")
    assert run.returncode == 0, run.stdout + run.stderr
    used = sf_stack.sandboxes["salesforce"].url
    assert f"salesforce: instance in use {used}" in run.stderr


def test_serve_names_an_unreachable_crm_url_at_start(sf_stack):
    import yaml

    cfg = yaml.safe_load(sf_stack.config_path.read_text())
    port = free_port()
    cfg["crm"]["salesforce"]["auth"]["login_url"] = f"https://127.0.0.1:{port}"
    sf_stack.config_path.write_text(yaml.safe_dump(cfg))
    daemon = sf_stack.serve()
    try:
        def probed() -> list[dict]:
            return [x for x in daemon.log_lines() if x.get("msg") == "CRM unreachable"]
        from tests.support.stack import wait_for

        assert wait_for(probed, timeout=20)
    finally:
        assert daemon.terminate() == 0
    (line,) = probed()
    assert (line["level"], line["key"], line["url"], line["cause"]) == (
        "error", "crm.salesforce.auth.login_url", f"https://127.0.0.1:{port}", "connection refused")


def test_export_json_is_one_array(tmp_path):
    path = _config(tmp_path)
    open_journal(f"sqlite:///{tmp_path}/j.db").close()
    assert json.loads(_run("-c", str(path), "export", "--format", "json").stdout) == []
    _dead_letter(tmp_path / "j.db")
    (row,) = json.loads(_run("export", "--format", "json", "-c", str(path)).stdout)
    assert row["state"] == "dead" and row["target_record"] == "003XX000004DHPYYA4"


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_export_uses_no_deprecated_click_api(tmp_path, fmt):
    """click.get_text_stream is deprecated (gone in Click 9): export writes to stdout itself."""
    path = _config(tmp_path)
    _dead_letter(tmp_path / "j.db")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        out = _run("-c", str(path), "export", "--format", fmt).stdout
    assert "003XX000004DHPYYA4" in out


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_NAMES = st.from_regex(r"[A-Z][A-Z0-9_]{0,10}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(refs=st.lists(_NAMES, min_size=1, max_size=6, unique=True), data=st.data())
def test_every_unset_variable_is_reported_once_in_one_run(refs, data):
    """Whatever mix of set and unset variables the secrets reference, one run names
    exactly the unset ones, each against the key that references it."""
    keys = ["apten.secret", "lox24.token", "sinch.secret"][:len(refs)]
    refs = refs[:len(keys)]
    set_names = data.draw(st.sets(st.sampled_from(refs)))
    env = {n: "a-long-enough-value-0123456789" for n in set_names}  # 24+ characters
    sources = {k.split(".")[0]: {k.split(".")[1]: f"${{{n}}}"} for k, n in zip(keys, refs)}
    unset = [(k, n) for k, n in zip(keys, refs) if n not in set_names]
    if not unset:
        parse_config({"sources": sources}, env=env)
        return
    with pytest.raises(ConfigError) as err:
        parse_config({"sources": sources}, env=env)
    lines = str(err.value).splitlines()
    assert len(lines) == len(unset)
    for (key, name), line in zip(unset, lines):
        assert line.startswith(f"sources.{key}: environment variable {name} is not set")


def test_connector_transport_errors_name_host_and_cause(sf_stack, monkeypatch):
    """What reaches dead letters and logs at run time: host and cause, never path or query."""
    from connectors.close import CloseConnector
    from connectors.errors import Transient
    from connectors.salesforce import SalesforceConnector

    port = free_port()
    with pytest.raises(Transient) as refused:
        CloseConnector(base_url=f"http://127.0.0.1:{port}/api/v1", api_key="k-123456").fields("lead")
    assert str(refused.value) == f"ConnectionError talking to the remote API http://127.0.0.1:{port}: connection refused"
    sf = sf_stack.sandboxes["salesforce"]
    untrusted = SalesforceConnector(instance_url=sf.url, api_version="62.0", ca_bundle=None, auth={
        "flow": "client_credentials", "login_url": sf.url, "client_id": sf.client_id, "client_secret": sf.client_secret})
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    with pytest.raises(Transient) as tls:
        untrusted.fields("Contact")
    assert str(tls.value).startswith(f"SSLError talking to the remote API {sf.url}: TLS certificate not trusted")


def test_serve_names_refused_credentials_at_start(sf_stack):
    import yaml

    from tests.support.stack import wait_for

    cfg = yaml.safe_load(sf_stack.config_path.read_text())
    cfg["crm"]["salesforce"]["auth"]["client_secret"] = "wrong-secret-value"
    sf_stack.config_path.write_text(yaml.safe_dump(cfg))
    sf_url = sf_stack.sandboxes["salesforce"].url
    daemon = sf_stack.serve()
    try:
        def refused() -> list[dict]:
            return [x for x in daemon.log_lines() if x.get("msg") == "CRM refused the credentials"]
        assert wait_for(refused, timeout=20)
    finally:
        assert daemon.terminate() == 0
    (line,) = refused()
    assert (line["key"], line["url"]) == ("crm.salesforce.auth", f"{sf_url}/services/oauth2/token")
    assert line["cause"] == "[400 invalid_client] invalid client credentials"
    assert "wrong-secret-value" not in daemon.log()


def test_shell_completion_as_documented():
    script = _syncd(env={"_SYNCD_COMPLETE": "bash_source"})
    assert script.returncode == 0 and "_syncd_completion()" in script.stdout
    done = _syncd(env={"_SYNCD_COMPLETE": "bash_complete", "COMP_WORDS": "syncd dead", "COMP_CWORD": "1"})
    assert done.stdout.strip() == "plain,dead-letters"
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert 'eval "$(_SYNCD_COMPLETE=bash_source syncd)"' in readme
