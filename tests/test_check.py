"""``syncd check`` against the sandbox CRMs' own field metadata."""
from __future__ import annotations

import pytest

from tests.support.stack import ALL_CRMS, Stack


@pytest.fixture
def all_crms():
    st = Stack(crms=ALL_CRMS, sinch=True).start()
    yield st
    st.cleanup()


def test_default_mappings_pass(all_crms):
    run = all_crms.syncd("check")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "ok: config, mappings and CRM fields agree"
    assert ("hubspot: email mode: subscription type 1001: an opt-out sets it UNSUBSCRIBED "
            "(legal basis LEGITIMATE_INTEREST_CLIENT), a newer opt-in SUBSCRIBED") in run.stderr.splitlines()


def test_unknown_field_is_named_with_file_and_object(all_crms):
    path = all_crms.workdir / "mappings" / "salesforce.yaml"
    path.write_text(path.read_text().replace("sms: [SMS_Opt_Out__c]", "sms: [Not_A_Field__c]"))
    run = all_crms.syncd("check")
    assert run.returncode == 1
    lines = run.stdout.strip().splitlines()
    assert f"{path}: Lead.Not_A_Field__c: no such field in salesforce" in lines
    assert f"{path}: Contact.Not_A_Field__c: no such field in salesforce" in lines
    assert len(lines) == 2 and "Traceback" not in run.stderr


def test_read_only_and_wrongly_typed_fields_are_reported(all_crms):
    sf = all_crms.sandboxes["salesforce"]
    sf.add_field("Contact", "Consent_Note__c", type="string")
    path = all_crms.workdir / "mappings" / "salesforce.yaml"
    text = path.read_text().replace("call: [DoNotCall]", "call: [SystemModstamp]")
    text = text.replace("  Contact: *consent_fields", "  Contact:\n    channels: {sms: [Consent_Note__c]}")
    path.write_text(text)
    lines = all_crms.syncd("check").stdout.splitlines()
    assert f"{path}: Lead.SystemModstamp: field is read-only in salesforce" in lines
    assert any("Contact.Consent_Note__c: field type is string" in x for x in lines)


def test_hubspot_without_subscription_id_is_the_unsubscribe_all_mode(all_crms):
    hs_map = all_crms.workdir / "mappings" / "hubspot.yaml"
    hs_map.write_text(hs_map.read_text().replace('subscription_id: "1001"', 'subscription_id: ""'))
    run = all_crms.syncd("check")
    assert run.returncode == 0, run.stdout + run.stderr
    [mode] = [x for x in run.stderr.splitlines() if x.startswith("hubspot: email mode:")]
    assert "unsubscribe from all email" in mode and "subscription_id" in mode


def test_unknown_hubspot_subscription_type_and_bad_credentials(all_crms):
    hs_map = all_crms.workdir / "mappings" / "hubspot.yaml"
    hs_map.write_text(hs_map.read_text().replace('subscription_id: "1001"', 'subscription_id: "4242"'))
    cfg = all_crms.config_path
    cfg.write_text(cfg.read_text().replace(all_crms.sandboxes["close"].api_key, "wrong-close-key"))
    run = all_crms.syncd("check")
    assert run.returncode == 1
    out = run.stdout
    assert f"{hs_map}: email_unsubscribe.subscription_id: 4242 is not a subscription type in hubspot" in out
    close_url = all_crms.sandboxes["close"].url
    assert f"config: crm.close.api_key: close refused the credentials ({close_url}/api/v1): [401" in out
    assert "wrong-close-key" not in out


def test_sinch_channels_other_than_whatsapp_are_reported():
    st = Stack(crms=("close",), sinch=True,
               extra_config={"sinch": {"channels": ["WHATSAPP", "SMS", "RCS"]}}).start()
    try:
        run = st.syncd("check")
    finally:
        st.cleanup()
    assert run.returncode == 1
    lines = [x for x in run.stdout.splitlines() if x.startswith("config: sinch.channels:")]
    assert [x.split(":")[2].strip() for x in lines] == ["SMS", "RCS"]
    assert all("WHATSAPP only" in x for x in lines)


def test_bad_hubspot_legal_basis_is_a_mapping_error(all_crms):
    hs_map = all_crms.workdir / "mappings" / "hubspot.yaml"
    hs_map.write_text(hs_map.read_text().replace("legal_basis: LEGITIMATE_INTEREST_CLIENT",
                                                 "legal_basis: BECAUSE_WE_SAY_SO"))
    run = all_crms.syncd("check")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "email_unsubscribe.legal_basis" in run.stdout


def test_config_problems_are_reported_by_check(tmp_path):
    (tmp_path / "config.yaml").write_text("crm:\n  hubspot: {}\n")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "syncd.cli", "-c", str(tmp_path / "config.yaml"), "check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "crm.hubspot.access_token: required key is missing" in out.stderr


def test_refused_sinch_credentials_name_the_keys_and_auth_url(all_crms):
    sn = all_crms.sandboxes["sinch"]
    cfg = all_crms.config_path
    cfg.write_text(cfg.read_text().replace(sn.key_secret, "wrong-sinch-key-secret"))
    run = all_crms.syncd("check")
    assert run.returncode == 1
    (line,) = [x for x in run.stdout.splitlines() if "sinch" in x]
    assert line.startswith(f"config: sinch.key_id/sinch.key_secret: Sinch refused the credentials "
                           f"({sn.url}/oauth2/token): ")
    assert "invalid_client" in line and "wrong-sinch-key-secret" not in run.stdout + run.stderr
