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
                                    "lox24": {"token": "${LOX_TOKEN:-fallback-token}"}}},
                       env={"APTEN_SECRET": "from-the-environment"})
    assert cfg.sources.apten.secret == "from-the-environment"
    assert cfg.sources.lox24.token == "fallback-token"


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
        monkeypatch.setenv(var, "example-value-123")
    cfg = load_config(Path(__file__).parent.parent / "config.yaml")
    assert cfg.crm.enabled() == ["salesforce", "hubspot", "close"]
    assert set(cfg.secrets()) >= {"example-value-123"}


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
