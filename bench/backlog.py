#!/usr/bin/env python
"""CRM calls per event when a backlog drains: 10,000 events per CRM (Salesforce + HubSpot).

The Salesforce and HubSpot simulators get 10,000 records each. An in-process runtime
(``open_runtime`` on the Stack's config: SQLite journal, default ``schedule.batch_size``
1000) journals one SMS opt-out per record with ``journal.record``, then calls
``rt.tick()`` (route, then push) until nothing is pending. The CRM calls are counted from the
simulators' request logs: Salesforce sObject Collections ``PATCH composite/sobjects``
(limit 200 records a call) and HubSpot ``POST batch/update`` (limit 100 inputs).

Two arrival orders are measured, because the pusher claims ``batch_size`` deliveries
across all CRMs at once and the connectors cut each claim's share into batches:
``grouped`` (all Salesforce events, then all HubSpot events) and ``interleaved``
(alternating, which is how webhooks for several CRMs really arrive).

The baseline is the drain's floor: the same field writes sent by a bare
``requests.Session`` loop in the minimum number of calls (ceil(N/200) composite
calls, ceil(N/100) batch calls) to the same simulators. The ratio
``syncd drain time / baseline time`` is the cost of the journal (routing, claims,
field clocks, settling) on top of the HTTP calls themselves.

    python bench/backlog.py [--quick] [--events N] [--order grouped|interleaved|both]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import datetime, timedelta, timezone

SF_TARGET = 1 / 200
HS_TARGET = 1 / 100


class Timed:
    """Wraps a callable and adds up the wall time spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def run_order(order: str, n: int) -> dict:
    from syncd.config import load_config
    from syncd.events import ConsentEvent
    from syncd.logs import setup_logging
    from syncd.runtime import open_runtime
    from syncd.stack import Stack

    st = Stack(crms=("salesforce", "hubspot"), push_interval=3600.0).start()
    devnull = open(os.devnull, "w")
    setup_logging("WARNING", "json", stream=devnull)  # the pusher logs one line per delivery at INFO
    try:
        sf, hs = st.sandboxes["salesforce"], st.sandboxes["hubspot"]
        t0 = time.perf_counter()
        sf_ids = [sf.add_record("Contact", None, LastName=f"B{i}", SMS_Opt_Out__c=False) for i in range(n)]
        hs_ids = [hs.add_contact(None, lastname=f"B{i}", sms_opt_out="false") for i in range(n)]
        seeded = time.perf_counter() - t0

        rt = open_runtime(load_config(st.config_path, env={}))
        base = datetime(2024, 2, 18, tzinfo=timezone.utc)
        if order == "grouped":
            targets = [("sf", r) for r in sf_ids] + [("hs", r) for r in hs_ids]
        else:
            targets = [x for pair in zip((("sf", r) for r in sf_ids), (("hs", r) for r in hs_ids)) for x in pair]
        t0 = time.perf_counter()
        for k, (_, rid) in enumerate(targets):
            rt.journal.events.record(ConsentEvent(
                source="apten", source_event_id=f"backlog-{order}-{k}", kind="opt_out", channel="sms",
                occurred_at=base + timedelta(seconds=k), received_at=datetime.now(timezone.utc),
                raw=b'{"event":"optOut"}', external_lead_id=rid))
        journaled = time.perf_counter() - t0

        # Where the drain's time goes (wrapping in-process callables; syncd is unchanged).
        add_targets = Timed(rt.journal.deliveries.add_targets)
        rt.journal.deliveries.add_targets = add_targets  # type: ignore[method-assign]
        updates = {name: Timed(c.update) for name, c in rt.connectors.items()}
        for name, c in rt.connectors.items():
            c.update = updates[name]  # type: ignore[method-assign]
        sf.clear_log()
        hs.clear_log()
        ticks = 0
        t0 = time.perf_counter()
        while True:
            rt.tick()
            ticks += 1
            c = rt.journal.reports.counts()
            if c["deliveries"]["pending"] == 0 and c["events"]["unrouted"] == 0:
                break
            if ticks > 200:
                raise RuntimeError(f"backlog did not drain: {c}")
        drained = time.perf_counter() - t0
        counts = rt.journal.reports.counts()
        rt.journal.close()

        sf_calls = len(sf.requests_to(r"/composite/sobjects/?$", "PATCH"))
        hs_calls = len(hs.requests_to(r"/crm/v3/objects/contacts/batch/update$", "POST"))
        sf_sizes = [len(r.json()["records"]) for r in sf.requests_to(r"/composite/sobjects/?$", "PATCH")]
        hs_sizes = [len(r.json()["inputs"]) for r in hs.requests_to(r"/crm/v3/objects/contacts/batch/update$", "POST")]
        sf_all, hs_all = len(sf.requests), len(hs.requests)
        sf_ok = sum(1 for r in sf_ids if sf.get_record("Contact", r)["SMS_Opt_Out__c"] is True)
        hs_ok = sum(1 for r in hs_ids if hs.get_contact(r).get("sms_opt_out") == "true")

        # Baseline: the same writes in the fewest calls, straight from a requests loop.
        raw = raw_calls(st, sf_ids, hs_ids)
        return {"order": order, "n": n, "seeded": seeded, "journaled": journaled, "drained": drained,
                "ticks": ticks, "sf_calls": sf_calls, "hs_calls": hs_calls, "sf_all": sf_all, "hs_all": hs_all,
                "sf_sizes": sf_sizes, "hs_sizes": hs_sizes, "sf_ok": sf_ok, "hs_ok": hs_ok,
                "done": counts["deliveries"]["done"], "dead": counts["deliveries"]["dead"],
                "routing_s": add_targets.seconds, "routing_txns": add_targets.calls,
                "crm_s": sum(u.seconds for u in updates.values()), **raw}
    finally:
        st.cleanup()
        devnull.close()


def raw_calls(st, sf_ids: list[str], hs_ids: list[str]) -> dict:
    import requests

    sf, hs = st.sandboxes["salesforce"], st.sandboxes["hubspot"]
    s = requests.Session()
    ca = sf.tls.ca_bundle  # passed per call: REQUESTS_CA_BUNDLE in the environment would beat Session.verify
    t0 = time.perf_counter()
    token = s.post(f"{sf.url}/services/oauth2/token", data={
        "grant_type": "client_credentials", "client_id": sf.client_id,
        "client_secret": sf.client_secret}, timeout=30, verify=ca).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    sf_calls = 0
    for i in range(0, len(sf_ids), 200):
        records = [{"attributes": {"type": "Contact"}, "id": r, "WhatsApp_Opt_Out__c": True}
                   for r in sf_ids[i:i + 200]]
        resp = s.patch(f"{sf.url}/services/data/v62.0/composite/sobjects", headers=auth, timeout=60, verify=ca,
                       json={"allOrNone": False, "records": records})
        resp.raise_for_status()
        sf_calls += 1
    sf_s = time.perf_counter() - t0
    h = requests.Session()
    t0 = time.perf_counter()
    hs_calls = 0
    for i in range(0, len(hs_ids), 100):
        inputs = [{"id": r, "properties": {"whatsapp_opt_out": "true"}} for r in hs_ids[i:i + 100]]
        resp = h.post(f"{hs.url}/crm/v3/objects/contacts/batch/update", json={"inputs": inputs}, timeout=60,
                      headers={"Authorization": f"Bearer {hs.token}"})
        resp.raise_for_status()
        hs_calls += 1
    hs_s = time.perf_counter() - t0
    return {"raw_sf_calls": sf_calls, "raw_hs_calls": hs_calls, "raw_s": sf_s + hs_s}


def report(rows: list[dict]) -> None:
    print()
    head = (f"{'order':<12}{'CRM':<11}{'events':>7}{'calls':>7}{'calls/event':>13}{'target':>9}"
            f"{'verdict':>9}{'records/call (min-max)':>24}{'updated':>9}")
    print(head)
    for r in rows:
        for crm, calls, sizes, ok, target in (("salesforce", r["sf_calls"], r["sf_sizes"], r["sf_ok"], SF_TARGET),
                                              ("hubspot", r["hs_calls"], r["hs_sizes"], r["hs_ok"], HS_TARGET)):
            per = calls / r["n"]
            verdict = "PASS" if per <= target + 1e-12 else "FAIL"
            span = f"{sum(sizes) / len(sizes):.0f} ({min(sizes)}-{max(sizes)})" if sizes else "-"
            print(f"{r['order']:<12}{crm:<11}{r['n']:>7}{calls:>7}{'1/%.0f' % (1 / per) if per else '-':>13}"
                  f"{'1/%.0f' % (1 / target):>9}{verdict:>9}{span:>24}{ok:>9}")
    print()
    print(f"{'order':<12}{'events':>7}{'drain s':>9}{'events/s':>10}{'ticks':>7}{'routing s':>11}"
          f"{'CRM calls s':>13}{'rest s':>8}{'baseline s':>12}{'drain/baseline':>16}")
    for r in rows:
        total = 2 * r["n"]
        rest = r["drained"] - r["routing_s"] - r["crm_s"]
        print(f"{r['order']:<12}{total:>7}{r['drained']:>9.2f}{total / r['drained']:>10.0f}{r['ticks']:>7}"
              f"{r['routing_s']:>11.2f}{r['crm_s']:>13.2f}{rest:>8.2f}{r['raw_s']:>12.2f}"
              f"{r['drained'] / r['raw_s']:>16.1f}")
    for r in rows:
        extra_sf = r["sf_all"] - r["sf_calls"]
        extra_hs = r["hs_all"] - r["hs_calls"]
        print(f"\n{r['order']}: journaled {2 * r['n']} events in {r['journaled']:.1f} s "
              f"({2 * r['n'] / r['journaled']:.0f}/s, one transaction each); routing = {r['routing_txns']} "
              f"add_targets transactions; other requests during the drain: salesforce {extra_sf}, "
              f"hubspot {extra_hs}; deliveries done {r['done']}, dead {r['dead']}; baseline used "
              f"{r['raw_sf_calls']} + {r['raw_hs_calls']} calls")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000, help="events (and records) per CRM")
    ap.add_argument("--order", choices=("grouped", "interleaved", "both"), default="both")
    ap.add_argument("--quick", action="store_true", help="2,000 events per CRM")
    args = ap.parse_args()
    n = 2000 if args.quick else args.events
    orders = ("grouped", "interleaved") if args.order == "both" else (args.order,)
    print(f"backlog: {n} events per CRM (Salesforce Contacts, HubSpot contacts), SMS opt-outs, in-process "
          f"runtime, SQLite journal, schedule.batch_size=1000; orders: {', '.join(orders)}")
    rows = []
    for order in orders:
        rows.append(run_order(order, n))
        r = rows[-1]
        print(f"  {order}: drained in {r['drained']:.1f} s, {r['sf_calls']} Salesforce + {r['hs_calls']} "
              f"HubSpot calls", flush=True)
    report(rows)
    if any(math.isclose(0, r["raw_s"]) for r in rows):
        sys.exit(0)


if __name__ == "__main__":
    main()
