"""``syncd demo``: the daemon end to end against the built-in sandbox CRMs.

Starts the Salesforce (HTTPS, throwaway CA), HubSpot and Close simulators,
writes a config with a fresh SQLite journal, runs ``syncd serve`` as a real
process, sends Apten's two published ``optOut`` examples and LOX24's published
``phone.unsubscribe`` example, signed, plus one opt-out each for a HubSpot and a
Close id, and shows the records before and after. Then it reflects those
do-not-contact flags to the Sinch simulator (``optouts:register``) and shows the
signed notifications reconciling them.

One duplicate is seeded (a HubSpot contact with the Salesforce Contact's phone): the
demo says how many of the records with that phone the sms opt-out reached, and asks
the consent API (``GET /v1/consent``, the demo's ``api.token``) about the phone
before and after the opt-out.
"""
from __future__ import annotations

import json
import signal
import time

import click

import requests

from syncd.stack import ALL_CRMS, API_TOKEN, DUPLICATE_CONTACT, Stack, seed_duplicate, wait_for

# Apten's published optOut examples, byte for byte.
APTEN_SMS = b"""{
  "event": "optOut",
  "data": {
    "leadId": "a7e92c5d-f301-4b89-ae16-8f35d02cx9z",
    "externalLeadId": "003XX000004DHPY",
    "phone": "+13305551234",
    "channel": "sms",
    "optOutReason": null,
    "isTwilioOptOut": true,
    "optOutMessage": "STOP",
    "isDoNotContact": false
  },
  "timestamp": "2024-02-18T09:45:22Z"
}
"""
APTEN_EMAIL = b"""{
  "event": "optOut",
  "data": {
    "leadId": "a7e92c5d-f301-4b89-ae16-8f35d02cx9z",
    "externalLeadId": "003XX000004DHPY",
    "phone": "+13305551234",
    "channel": "email",
    "optOutReason": "UNSUBSCRIBE_LINK",
    "isTwilioOptOut": null,
    "optOutMessage": "Please unsubscribe me from all future emails.",
    "isDoNotContact": false
  },
  "timestamp": "2024-02-18T09:45:22Z"
}
"""
LOX24_EXAMPLE = b"""{
"id": "ef58b437-1319-4b0c-961b-17214cf1cf32",
"data": {
"phone": "+4911113333444",
"user_id": 2,
"created_at": 1757849748,
"campaign_code": "3KCKb5nMD",
"additional_data": {
"reason": {
"id": 4,
"label": "Es ist unverst\xc3\xa4ndlich"
},
"additional_text": "zus\xc3\xa4tzlicher Benutzertext mit Erkl\xc3\xa4rung"
},
"short_link_code": "baaIou",
"unsubscribe_request_id": 59
},
"name": "phone.unsubscribe",
"created_at": 1757849748,
"api_version": "2022-05-25",
"attempt_number": 1,
"attempts_total": 4
}
"""
SF_FIELDS = ("HasOptedOutOfEmail", "DoNotCall", "SMS_Opt_Out__c", "WhatsApp_Opt_Out__c")
CONTACT = "003XX000004DHPYYA4"
LEAD = "00QXX000001LOX22AO"
CHECK_PHONE, CHECK_SHOWN = "+13305551234", "+1 330 555 1234"   # the sms example's phone


def _apten(ext_id: str, channel: str) -> bytes:
    doc = json.loads(APTEN_SMS)
    doc["data"].update(externalLeadId=ext_id, channel=channel)
    return json.dumps(doc).encode()


def _records(stack: Stack) -> list[str]:
    sf, hs, cl = (stack.sandboxes[n] for n in ALL_CRMS)
    contact, lead, hub = sf.get_record("Contact", CONTACT), sf.get_record("Lead", LEAD), hs.get_contact("51")
    return [
        f"Salesforce Contact {CONTACT}: " + "  ".join(f"{f}={contact[f]}" for f in SF_FIELDS),
        f"Salesforce Lead    {LEAD}: " + "  ".join(f"{f}={lead[f]}" for f in SF_FIELDS),
        "HubSpot contact 51: " + "  ".join(f"{p}={hub[p]}" for p in ("sms_opt_out", "call_opt_out")),
        "Close lead_abc123: " + "  ".join(f"{n}={cl.custom_value('lead_abc123', n)!r}"
                                          for n in ("SMS Opt Out", "Call Opt Out")),
    ]


def _landed(stack: Stack) -> bool:
    sf, hs, cl = (stack.sandboxes[n] for n in ALL_CRMS)
    contact = sf.get_record("Contact", CONTACT)
    return bool(contact["SMS_Opt_Out__c"] and contact["HasOptedOutOfEmail"]
                and sf.get_record("Lead", LEAD)["SMS_Opt_Out__c"]
                and hs.get_contact("51")["sms_opt_out"] == "true"
                and cl.custom_value("lead_abc123", "Call Opt Out") not in (None, "", False))


# --- the person behind the records: a consent check, and the duplicate ------------------
def _consent(stack: Stack) -> dict:
    """``GET /v1/consent`` for the sms example's phone, as a messaging platform asks
    before a send (the demo's ``api.token``)."""
    resp = requests.get(f"{stack.url}/v1/consent", params={"phone": CHECK_PHONE, "channel": "sms"},
                        headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10)
    resp.raise_for_status()
    return resp.json()


def _verdict(answer: dict) -> str:
    allowed = "allowed" if answer["allowed"] else "not allowed"
    if answer["state"] == "unknown":
        return f"{allowed} (unknown)"
    return f"{allowed} ({answer['state']} since {answer['since']}, source {answer['source']})"


def _sms_records(stack: Stack) -> list[tuple[str, bool]]:
    """Every demo record carrying the sms example's phone, and whether its sms flag is set."""
    sf, hs = stack.sandboxes["salesforce"], stack.sandboxes["hubspot"]
    return [(f"Salesforce Contact {CONTACT}", bool(sf.get_record("Contact", CONTACT)["SMS_Opt_Out__c"])),
            (f"HubSpot contact {DUPLICATE_CONTACT}",
             hs.get_contact(DUPLICATE_CONTACT)["sms_opt_out"] == "true")]


def _stop(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` below stops ``serve`` and
    removes the demo's folders instead of leaving them behind."""
    raise SystemExit(128 + signum)


def run_demo(keep: bool = False) -> int:
    previous = signal.signal(signal.SIGTERM, _stop)
    stack = Stack(crms=ALL_CRMS, push_interval=0.5, sinch=True, poll_interval=0.5,
                  extra_config={"api": {"token": API_TOKEN}})
    daemon = None
    try:
        stack.start()
        seed_duplicate(stack.sandboxes["hubspot"])
        daemon = stack.serve()
        return _run(stack, daemon, keep)
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        if daemon is not None:
            daemon.terminate()
        stack.cleanup()
        signal.signal(signal.SIGTERM, previous)


def _run(stack: Stack, daemon, keep: bool) -> int:
    echo = click.echo
    sf = stack.sandboxes["salesforce"]
    echo("syncd demo")
    echo(f"  sandbox Salesforce  {sf.url}  (HTTPS, throwaway CA {sf.tls.ca_bundle})")
    echo(f"  sandbox HubSpot     {stack.sandboxes['hubspot'].url}")
    echo(f"  sandbox Close       {stack.sandboxes['close'].url}/api/v1")
    echo(f"  sandbox Sinch       {stack.sandboxes['sinch'].url}")
    echo(f"  config              {stack.config_path}")
    echo(f"  syncd serve         {stack.url}  pid {daemon.proc.pid}  log {daemon.log_path}")
    echo(f"  admin listener      {stack.admin_url}  (/metrics, /readyz, /status)")
    echo(f"  consent API         {stack.url}/v1/consent  (api.token {API_TOKEN})")
    echo("")
    echo("before:")
    for line in _records(stack):
        echo(f"  {line}")
    echo(f"  HubSpot contact {DUPLICATE_CONTACT}: the same person as Salesforce Contact {CONTACT} "
         f"(phone +1 330-555-1234), a duplicate")
    before = _consent(stack)
    echo(f"  consent check {CHECK_SHOWN} sms: {_verdict(before)}")
    echo("")
    sends = (("apten", "Apten optOut example, sms", APTEN_SMS),
             ("apten", "Apten optOut example, email", APTEN_EMAIL),
             ("apten", "the sms example again (a retry)", APTEN_SMS),
             ("lox24", "LOX24 phone.unsubscribe example", LOX24_EXAMPLE),
             ("apten", "Apten optOut, HubSpot id 51, sms", _apten("51", "sms")),
             ("apten", "Apten optOut, Close lead_abc123, call", _apten("lead_abc123", "call")))
    for source, label, body in sends:
        resp = stack.post_apten(body) if source == "apten" else stack.post_lox24(body)
        echo(f"POST /webhooks/{source:<6} {label:<40} -> {resp.status_code} {resp.text.strip()}")
    started = time.time()
    landed = wait_for(lambda: _landed(stack), timeout=30)
    echo("")
    echo(f"after ({time.time() - started:.1f} s):")
    for line in _records(stack):
        echo(f"  {line}")
    calls = len(sf.requests_to(r"/composite/sobjects$", "PATCH"))
    echo(f"  Salesforce composite update calls: {calls}")
    wait_for(lambda: all(flagged for _, flagged in _sms_records(stack)), timeout=3)
    records = _sms_records(stack)
    reached = [name for name, flagged in records if flagged]
    echo(f"  the sms opt-out for {CHECK_SHOWN} reached {len(reached)} of the {len(records)} records with "
         f"that phone: {', '.join(reached) or 'none'}")
    echo(f"  consent check {CHECK_SHOWN} sms: {_verdict(before)} -> {_verdict(_consent(stack))}")
    echo("")
    sinch = stack.sandboxes["sinch"]
    sf.advance(10)  # the org's clock moves past the poller's settle window
    reflected = wait_for(lambda: json.loads(stack.syncd("status", "--json").stdout)["reflections"]["done"] >= 2,
                         timeout=30)
    echo("CRM flags reflected to Sinch (optouts:register, confirmed by signed OPT_OUT notifications):")
    for reg in sinch.registrations:
        who = ", ".join(f"{i['channel']} +{i['identity'][:2]}***{i['identity'][-3:]}" for i in reg["identities"])
        echo(f"  {reg['kind']:<8} {who}  request_id {reg['request_id']}")
    status = stack.syncd("status", "--json")
    echo("")
    echo("syncd status --json")
    echo("  " + json.dumps(json.loads(status.stdout)))
    if keep:
        echo(f"\nserving webhooks on {stack.url}, admin on {stack.admin_url} (Ctrl-C to stop)")
        try:
            daemon.proc.wait()
        except KeyboardInterrupt:
            pass
    return 0 if landed and reflected else 1
