from pathlib import Path

import pytest

from connectors.types import RecordRef
from syncd.config import ConfigError
from syncd.journal.base import Clock, Delivery
from syncd.mapping import load_mapping, plan_record

ROOT = Path(__file__).parent.parent
MAPPING = load_mapping(ROOT / "mappings" / "salesforce.yaml")
REF = RecordRef("salesforce", "Contact", "003XX000004DHPYYA4")


def delivery(i: int, kind: str, channel: str, at: str) -> Delivery:
    return Delivery(id=i, event_id=i, ref=REF, attempts=1, created_at=at, kind=kind, channel=channel,
                    occurred_at=at, source="apten", email=None, reason=None, received_at=at)


def test_repo_mapping_equals_packaged_default():
    packaged = ROOT / "syncd" / "defaults" / "salesforce.yaml"
    assert (ROOT / "mappings" / "salesforce.yaml").read_text() == packaged.read_text()


@pytest.mark.parametrize("channel,field", [("email", "HasOptedOutOfEmail"), ("call", "DoNotCall"),
                                           ("sms", "SMS_Opt_Out__c"), ("whatsapp", "WhatsApp_Opt_Out__c")])
def test_one_channel_writes_only_its_field(channel, field):
    plan = plan_record(REF, [delivery(1, "opt_out", channel, "2024-01-01T00:00:00.000000Z")], MAPPING, {})
    assert plan.update.fields == {field: True}


def test_do_not_contact_writes_every_channel():
    plan = plan_record(REF, [delivery(1, "do_not_contact", "all", "2024-01-01T00:00:00.000000Z")], MAPPING, {})
    assert plan.update.fields == {"HasOptedOutOfEmail": True, "DoNotCall": True, "SMS_Opt_Out__c": True,
                                  "WhatsApp_Opt_Out__c": True}


def test_backlog_coalesces_newest_wins_per_field():
    ds = [delivery(1, "opt_out", "sms", "2024-01-01T00:00:02.000000Z"),
          delivery(2, "opt_in", "sms", "2024-01-01T00:00:01.000000Z"),   # older: loses
          delivery(3, "opt_in", "call", "2024-01-01T00:00:03.000000Z"),
          delivery(4, "opt_out", "call", "2024-01-01T00:00:01.000000Z")]
    plan = plan_record(REF, ds, MAPPING, {})
    assert plan.update.fields == {"SMS_Opt_Out__c": True, "DoNotCall": False}
    assert plan.winners == {1: {"SMS_Opt_Out__c": True}, 3: {"DoNotCall": False}}


def test_older_event_than_the_field_clock_writes_nothing():
    clocks = {"SMS_Opt_Out__c": Clock("2024-06-01T00:00:00.000000Z", True)}
    plan = plan_record(REF, [delivery(1, "opt_in", "sms", "2024-01-01T00:00:00.000000Z")], MAPPING, clocks)
    assert plan.update is None and plan.problem is None


def test_same_instant_opt_out_beats_opt_in():
    at = "2024-01-01T00:00:00.000000Z"
    plan = plan_record(REF, [delivery(1, "opt_in", "sms", at), delivery(2, "opt_out", "sms", at)], MAPPING, {})
    assert plan.update.fields == {"SMS_Opt_Out__c": True}
    clocks = {"SMS_Opt_Out__c": Clock(at, True)}
    assert plan_record(REF, [delivery(3, "opt_in", "sms", at)], MAPPING, clocks).update is None


def test_unmapped_object_or_channel_is_a_problem_not_a_silent_drop(tmp_path):
    lead_only = tmp_path / "m.yaml"
    lead_only.write_text("objects:\n  Lead:\n    channels:\n      sms: [SMS_Opt_Out__c]\n")
    mapping = load_mapping(lead_only)
    plan = plan_record(REF, [delivery(1, "opt_out", "sms", "2024-01-01T00:00:00.000000Z")], mapping, {})
    assert "no mapping for object Contact" in plan.problem
    lead = RecordRef("salesforce", "Lead", "00QXX000001LOX22AO")
    d = delivery(1, "opt_out", "call", "2024-01-01T00:00:00.000000Z")
    d.ref = lead
    assert "maps no field for channel call" in plan_record(lead, [d], mapping, {}).problem


def test_audit_fields_follow_the_newest_event(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("objects:\n  Contact:\n    channels: {sms: [SMS_Opt_Out__c]}\n"
                    "    audit: {reason: Reason__c, source: Source__c, occurred_at: When__c}\n")
    d = delivery(1, "opt_out", "sms", "2024-01-01T00:00:00.000000Z")
    d.reason = "STOP"
    plan = plan_record(REF, [d], load_mapping(path), {})
    assert plan.update.fields == {"SMS_Opt_Out__c": True, "Reason__c": "STOP", "Source__c": "apten",
                                  "When__c": "2024-01-01T00:00:00.000000Z"}


@pytest.mark.parametrize("text,needle", [
    ("objects: {}\n", "objects"),
    ("objects:\n  Lead:\n    channels: {fax: [X]}\n", "fax"),
    ("objects:\n  Lead:\n    channels: {sms: ['bad name; drop']}\n", "not a field name"),
    ("objects:\n  Lead:\n    channels: {sms: [A]}\n    colour: red\n", "colour"),
])
def test_bad_mapping_files_name_the_problem(tmp_path, text, needle):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_mapping(path)
    assert needle in str(err.value) and str(path) in str(err.value)
