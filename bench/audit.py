#!/usr/bin/env python
"""``syncd audit`` cost: CRM calls and time for 10,000 written records across three CRMs.

The simulators get 10,000 records: Salesforce Leads and Contacts, HubSpot contacts and
Close leads (a quarter each by default). An in-process runtime (``open_runtime`` on the
Stack's config, SQLite journal) journals one SMS opt-out per record and pushes until
nothing is pending, so every record is one syncd has written. Then a few fields per
CRM are unticked inside the simulators (drift), the logs are cleared and one
``Auditor.run()`` (what ``syncd audit`` runs) reads every record back.

Calls are counted from the simulators' request logs. Targets: Salesforce at most
ceil(records/200) SOQL queries per object, HubSpot ceil(records/100) batch reads
(SMS opt-outs only: no email consent to read, which would add one GET per address),
Close one GET per record (Close documents no read of many records by id). The time is
wall time against local simulators: it says how much of a run is syncd itself, not
what a real CRM's latency adds.

    python bench/audit.py [--quick] [--records N]
"""
from __future__ import annotations

import argparse
import math
import os
import time
from datetime import datetime, timedelta, timezone

DRIFT_PER_CRM = 5


def timed(fn, into: dict, key: str):
    """``fn``, adding its wall time to ``into[key]``."""
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            into[key] += time.perf_counter() - t0
    return wrapper


def run(n: int) -> dict:
    from syncd.audit import Auditor
    from syncd.config import load_config
    from syncd.events import ConsentEvent
    from syncd.logs import setup_logging
    from syncd.runtime import open_runtime
    from syncd.stack import ALL_CRMS, Stack

    st = Stack(crms=ALL_CRMS, push_interval=3600.0).start()
    devnull = open(os.devnull, "w")
    setup_logging("WARNING", "json", stream=devnull)  # the pusher logs one line per delivery at INFO
    try:
        sf, hs, cl = (st.sandboxes[c] for c in ALL_CRMS)
        quarter = n // 4
        leads = [sf.add_record("Lead", None, LastName=f"L{i}", Company="C", SMS_Opt_Out__c=False)
                 for i in range(quarter)]
        contacts = [sf.add_record("Contact", None, LastName=f"C{i}", SMS_Opt_Out__c=False) for i in range(quarter)]
        hs_ids = [hs.add_contact(None, sms_opt_out="false") for _ in range(quarter)]
        cl_ids = [f"lead_bench{i}" for i in range(n - 3 * quarter)]
        for lead_id in cl_ids:
            cl.add_lead(lead_id, name=lead_id)
        targets = leads + contacts + hs_ids + cl_ids

        rt = open_runtime(load_config(st.config_path, env={}))
        base = datetime(2024, 2, 18, tzinfo=timezone.utc)
        for k, rid in enumerate(targets):
            rt.journal.events.record(ConsentEvent(
                source="apten", source_event_id=f"audit-{k}", kind="opt_out", channel="sms",
                occurred_at=base + timedelta(seconds=k), received_at=datetime.now(timezone.utc),
                raw=b'{"event":"optOut"}', external_lead_id=rid, phone=f"+1330{k:07d}"))
        t0 = time.perf_counter()
        for _ in range(500):
            rt.tick()
            c = rt.journal.reports.counts()
            if c["deliveries"]["pending"] == 0 and c["events"]["unrouted"] == 0:
                break
        pushed = time.perf_counter() - t0
        done = rt.journal.reports.counts()["deliveries"]["done"]

        for i in range(DRIFT_PER_CRM):
            sf.set_field("Lead", leads[i], "SMS_Opt_Out__c", False)
            hs.set_property(hs_ids[i], "sms_opt_out", "false")
            cl.set_custom(cl_ids[i], "SMS Opt Out", None)
        for sb in (sf, hs, cl):
            sb.clear_log()
        read_s = {name: 0.0 for name in rt.connectors}
        for name, conn in rt.connectors.items():
            conn.read = timed(conn.read, read_s, name)  # type: ignore[method-assign]
        t0 = time.perf_counter()
        result = Auditor(rt.journal, rt.connectors, rt.mappings).run()
        audited = time.perf_counter() - t0
        rt.journal.close()

        queries = [r.query.get("q", [""])[0] for r in sf.requests_to(r"/query/?$", "GET")]
        drift_by_crm = {c: sum(d.crm == c for d in result.drift) for c in ALL_CRMS}
        return {
            "n": len(targets), "done": done, "pushed_s": pushed, "audit_s": audited, "checked": result.checked,
            "drift": drift_by_crm, "errors": result.errors, "missing": len(result.missing),
            "rows": [
                ("salesforce", "Lead", len(leads), sum(" FROM Lead " in q for q in queries), math.ceil(len(leads) / 200)),
                ("salesforce", "Contact", len(contacts), sum(" FROM Contact " in q for q in queries),
                 math.ceil(len(contacts) / 200)),
                ("hubspot", "contact", len(hs_ids),
                 len(hs.requests_to(r"/crm/v3/objects/contacts/batch/read$", "POST")), math.ceil(len(hs_ids) / 100)),
                ("close", "lead", len(cl_ids), len(cl.requests_to(r"/lead/lead_[^/]+/$", "GET")), len(cl_ids)),
            ],
            "read_s": read_s,
            "all_requests": {"salesforce": len(sf.requests), "hubspot": len(hs.requests), "close": len(cl.requests)},
        }
    finally:
        st.cleanup()
        devnull.close()


def report(r: dict) -> None:
    print(f"\n{'CRM':<12}{'object':<9}{'records':>8}{'calls':>7}{'target':>8}{'verdict':>9}{'drift found':>13}"
          f"{'read s (CRM)':>14}")
    for crm, obj, records, calls, target in r["rows"]:
        verdict = "PASS" if calls <= target else "FAIL"
        first = obj in ("Lead", "contact", "lead")
        drift = str(r["drift"][crm]) if first else ""
        seconds = f"{r['read_s'][crm]:.1f}" if first else ""
        print(f"{crm:<12}{obj:<9}{records:>8}{calls:>7}{target:>8}{verdict:>9}{drift:>13}{seconds:>14}")
    total = sum(row[3] for row in r["rows"])
    print(f"\naudited {r['checked']} of {r['n']} written records ({r['done']} deliveries done) in "
          f"{r['audit_s']:.1f} s ({r['checked'] / r['audit_s']:.0f} records/s), {total} CRM calls; "
          f"requests seen by each simulator during the audit: {r['all_requests']}; missing {r['missing']}, "
          f"errors {r['errors'] or 'none'}; drift planted {DRIFT_PER_CRM} per CRM "
          f"(Salesforce Leads only); the push that wrote them took {r['pushed_s']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000, help="written records across the three CRMs")
    ap.add_argument("--quick", action="store_true", help="2,000 records")
    args = ap.parse_args()
    n = 2000 if args.quick else args.records
    print(f"audit: {n} written records (a quarter each: Salesforce Leads, Salesforce Contacts, HubSpot "
          f"contacts, Close leads), SMS opt-outs, in-process runtime, SQLite journal")
    report(run(n))


if __name__ == "__main__":
    main()
