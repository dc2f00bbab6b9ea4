"""``syncd demo``: the daemon end to end against the built-in sandbox CRMs.

Starts the Salesforce simulator (HTTPS, throwaway CA), writes a config with a
fresh SQLite journal, runs ``syncd serve`` as a real process, sends Apten's two
published ``optOut`` examples signed, and shows the Contact before and after.
"""
from __future__ import annotations

import json
import time

import click

from syncd.stack import Stack, wait_for

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
CONSENT_FIELDS = ("HasOptedOutOfEmail", "DoNotCall", "SMS_Opt_Out__c", "WhatsApp_Opt_Out__c")
CONTACT = "003XX000004DHPYYA4"


def _fields(sf) -> str:
    rec = sf.get_record("Contact", CONTACT)
    return "  ".join(f"{name}={rec[name]}" for name in CONSENT_FIELDS)


def run_demo(keep: bool = False) -> int:
    echo = click.echo
    stack = Stack(push_interval=0.5).start()
    sf = stack.sandboxes["salesforce"]
    echo("syncd demo")
    echo(f"  sandbox Salesforce  {sf.url}  (HTTPS, throwaway CA {sf.tls.ca_bundle})")
    echo(f"  config              {stack.config_path}")
    daemon = stack.serve()
    try:
        echo(f"  syncd serve         {stack.url}  pid {daemon.proc.pid}  log {daemon.log_path}")
        echo("")
        echo(f"Contact {CONTACT} before:")
        echo(f"  {_fields(sf)}")
        echo("")
        for label, body in (("Apten optOut, channel sms", APTEN_SMS), ("Apten optOut, channel email", APTEN_EMAIL),
                            ("the sms webhook again (a retry)", APTEN_SMS)):
            resp = stack.post_apten(body)
            echo(f"POST /webhooks/apten  {label:<34} -> {resp.status_code} {resp.text.strip()}")
        started = time.time()
        landed = wait_for(lambda: all(sf.get_record("Contact", CONTACT)[f] for f in
                                      ("SMS_Opt_Out__c", "HasOptedOutOfEmail")), timeout=30)
        echo("")
        echo(f"Contact {CONTACT} after ({time.time() - started:.1f} s):")
        echo(f"  {_fields(sf)}")
        calls = len(sf.requests_to(r"/composite/sobjects$", "PATCH"))
        echo(f"  Salesforce composite update calls: {calls}")
        status = stack.syncd("status", "--json")
        echo("")
        echo("syncd status --json")
        echo("  " + json.dumps(json.loads(status.stdout)))
        if keep:
            echo(f"\nserving on {stack.url} (Ctrl-C to stop)")
            try:
                daemon.proc.wait()
            except KeyboardInterrupt:
                pass
        return 0 if landed else 1
    finally:
        daemon.terminate()
        stack.cleanup()
