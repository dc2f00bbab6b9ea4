import subprocess
import sys

import pytest

from syncd.config import ConfigError, load_config, parse_config


def test_defaults_fill_an_empty_config():
    cfg = parse_config({}, env={})
    assert cfg.journal.url == "sqlite:///syncd.db"
    assert cfg.receiver.max_body_bytes == 1048576
    assert cfg.retry.max_attempts == 15
    assert cfg.crm.enabled() == []


def test_env_interpolation_with_default_and_value():
    cfg = parse_config({"sources": {"apten": {"secret": "${APTEN_SECRET}"},
                                    "lox24": {"token": "${LOX_TOKEN:-fallback-token-of-24-characters}"}}},
                       env={"APTEN_SECRET": "from-the-environment-0123456789"})
    assert cfg.sources.apten.secret == "from-the-environment-0123456789"
    assert cfg.sources.lox24.token == "fallback-token-of-24-characters"


def test_missing_env_var_names_the_key():
    with pytest.raises(ConfigError) as err:
        parse_config({"sources": {"apten": {"secret": "${NOT_SET_ANYWHERE}"}}}, env={})
    assert str(err.value) == "sources.apten.secret: environment variable NOT_SET_ANYWHERE is not set"


@pytest.mark.parametrize("data,expected", [
    ({"receiver": {"prot": 1}}, "receiver.prot: unknown key"),
    ({"receiver": {"port": "eighty"}}, "receiver.port:"),
    ({"journal": {"url": "mysql://x"}}, "journal.url: must start with sqlite:/// or postgresql://"),
    ({"crm": {"salesforce": {"instance_url": "https://x", "auth": {"flow": "jwt"}}}},
     "crm.salesforce.auth: flow jwt needs login_url, client_id, username, private_key_file"),
    ({"crm": {"hubspot": {}}}, "crm.hubspot.access_token: required key is missing"),
    ({"routing": {"rules": [{"pattern": "([", "crm": "close"}]}}, "routing.rules.0.pattern: not a regular"),
])
def test_errors_are_one_line_naming_the_key(data, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(data, env={})
    assert str(err.value).startswith(expected)
    assert "\n" not in str(err.value)


def test_cli_prints_a_clear_line_not_a_traceback(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("receiver:\n  port: 99999\n")
    run = subprocess.run([sys.executable, "-m", "syncd.cli", "-c", str(path), "status"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("syncd: config error: receiver.port:")
    assert "Traceback" not in run.stderr


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("journal: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_example_config_validates(monkeypatch):
    from pathlib import Path

    for var in ("APTEN_WEBHOOK_SECRET", "LOX24_WEBHOOK_TOKEN", "SINCH_WEBHOOK_SECRET", "SF_CLIENT_ID",
                "SF_CLIENT_SECRET", "HUBSPOT_TOKEN", "CLOSE_API_KEY", "SINCH_PROJECT_ID", "SINCH_APP_ID",
                "SINCH_KEY_ID", "SINCH_KEY_SECRET"):
        monkeypatch.setenv(var, "example-value-0123456789abcdef")
    cfg = load_config(Path(__file__).parent.parent / "config.yaml")
    assert cfg.crm.enabled() == ["salesforce", "hubspot", "close"]
    assert set(cfg.secrets()) >= {"example-value-0123456789abcdef"}


def test_salesforce_audience_and_api_budget():
    sf = {"instance_url": "https://acme--uat.sandbox.my.salesforce.com",
          "auth": {"flow": "jwt", "login_url": "https://test.salesforce.com", "client_id": "c",
                   "username": "u@example.com", "private_key_file": "key.pem"}}
    cfg = parse_config({"crm": {"salesforce": sf}}, env={})
    assert cfg.crm.salesforce.auth.audience is None  # the connector picks test.salesforce.com
    assert cfg.crm.salesforce.api_budget_percent == 90.0 and cfg.crm.salesforce.limits_probe_seconds == 300.0
    sf["auth"]["audience"] = "https://acme.my.site.com/customers"
    sf.update(api_budget_percent=75, limits_probe_seconds=60)
    cfg = parse_config({"crm": {"salesforce": sf}}, env={})
    assert cfg.crm.salesforce.auth.audience == "https://acme.my.site.com/customers"
    assert cfg.crm.salesforce.api_budget_percent == 75.0
    for bad in (0, 101):
        with pytest.raises(ConfigError, match="api_budget_percent"):
            parse_config({"crm": {"salesforce": {**sf, "api_budget_percent": bad}}}, env={})




GOOD_SECRET = "kq3V0w7nJd2LxR9tYbHs4uPc"  # 24 characters


@pytest.mark.parametrize("key,block", [
    ("sources.apten.secret", {"sources": {"apten": {"secret": "short-secret"}}}),
    ("sources.lox24.token", {"sources": {"lox24": {"token": "short-token"}}}),
    ("sources.sinch.secret", {"sources": {"sinch": {"secret": GOOD_SECRET[:-1]}}}),
    ("receiver.status_token", {"receiver": {"status_token": "letmein"}}),
])
def test_every_secret_syncd_checks_has_at_least_24_characters(key, block):
    with pytest.raises(ConfigError) as err:
        parse_config(block, env={})
    assert str(err.value).startswith(f"{key}: must be at least 24 characters")
    assert 'python -c "import secrets; print(secrets.token_urlsafe(32))"' in str(err.value)


def test_24_characters_are_enough_and_an_empty_status_token_turns_the_page_off():
    cfg = parse_config({"sources": {"apten": {"secret": GOOD_SECRET}, "lox24": {"token": GOOD_SECRET},
                                    "sinch": {"secret": GOOD_SECRET}},
                        "receiver": {"status_token": "${SYNCD_STATUS_TOKEN:-}"}}, env={})
    assert cfg.sources.apten.secret == GOOD_SECRET and cfg.receiver.status_token is None


def test_vendor_credentials_keep_the_vendors_own_shape():
    cfg = parse_config({"crm": {"hubspot": {"access_token": "pat-1"}, "close": {"api_key": "k"}}}, env={})
    assert cfg.crm.hubspot.access_token == "pat-1"


@pytest.mark.parametrize("source,key", [("apten", "secret"), ("lox24", "token"), ("sinch", "secret")])
def test_the_demos_published_secrets_are_refused_outside_the_demo(monkeypatch, source, key):
    from syncd.config import DEMO_ENV, DEMO_SECRETS

    block = {"sources": {source: {key: DEMO_SECRETS[source]}}}
    monkeypatch.setenv(DEMO_ENV, "1")
    parse_config(block, env={})
    monkeypatch.delenv(DEMO_ENV)
    with pytest.raises(ConfigError) as err:
        parse_config(block, env={})
    assert str(err.value).startswith(f"sources.{source}.{key}: is the published value of syncd demo")
    assert "secrets.token_urlsafe(32)" in str(err.value)


def test_the_demos_consent_api_token_is_refused_outside_the_demo(monkeypatch):
    from syncd.config import DEMO_ENV, DEMO_SECRETS

    monkeypatch.setenv(DEMO_ENV, "1")
    assert parse_config({"api": {"token": DEMO_SECRETS["api"]}}, env={}).api.token == DEMO_SECRETS["api"]
    monkeypatch.delenv(DEMO_ENV)
    with pytest.raises(ConfigError) as err:
        parse_config({"api": {"token": DEMO_SECRETS["api"]}}, env={})
    assert str(err.value).startswith("api.token: is the published value of syncd demo")


def test_serve_refuses_a_config_with_the_demos_secret(tmp_path):
    import os

    from syncd.config import DEMO_ENV
    from tests.support.stack import APTEN_SECRET

    path = tmp_path / "config.yaml"
    path.write_text(f"sources:\n  apten: {{secret: {APTEN_SECRET}}}\n")
    env = {k: v for k, v in os.environ.items() if k != DEMO_ENV}
    run = subprocess.run([sys.executable, "-m", "syncd.cli", "-c", str(path), "serve"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 2
    assert run.stderr.startswith("syncd: config error: sources.apten.secret: is the published value of syncd demo")


_SF_AUTH = {"flow": "client_credentials", "login_url": "https://login.salesforce.com", "client_id": "c",
            "client_secret": "s"}


@pytest.mark.parametrize("key,data", [
    ("crm.hubspot.base_url", {"crm": {"hubspot": {"base_url": "http://169.254.169.254/", "access_token": "t"}}}),
    ("crm.close.base_url", {"crm": {"close": {"base_url": "http://api.close.com/api/v1", "api_key": "k"}}}),
    ("crm.salesforce.instance_url", {"crm": {"salesforce": {"instance_url": "http://example.my.salesforce.com",
                                                            "auth": _SF_AUTH}}}),
    ("crm.salesforce.auth.login_url", {"crm": {"salesforce": {
        "instance_url": "https://example.my.salesforce.com",
        "auth": {**_SF_AUTH, "login_url": "http://login.salesforce.com"}}}}),
    ("sinch.base_url", {"sinch": {"base_url": "http://10.0.0.1", "project_id": "p", "app_id": "a",
                                  "key_id": "k", "key_secret": "s"}}),
    ("sinch.auth_url", {"sinch": {"auth_url": "http://auth.sinch.com/oauth2/token", "project_id": "p",
                                  "app_id": "a", "key_id": "k", "key_secret": "s"}}),
    ("crm.hubspot.base_url", {"crm": {"hubspot": {"base_url": "http://localhost.evil.example",
                                                  "access_token": "t"}}}),
])
def test_outbound_urls_must_be_https(key, data):
    with pytest.raises(ConfigError) as err:
        parse_config(data, env={})
    assert str(err.value).startswith(f"{key}: must be an https:// URL (http:// only for a loopback host")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8081", "http://127.5.0.1/x", "http://[::1]:9000",
                                 "http://localhost:8080/api/v1", "https://api.hubapi.com"])
def test_https_or_loopback_is_accepted(url):
    cfg = parse_config({"crm": {"hubspot": {"base_url": url, "access_token": "t"}}}, env={})
    assert cfg.crm.hubspot.base_url == url
