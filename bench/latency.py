#!/usr/bin/env python
"""End-to-end latency: webhook acknowledged -> the write reaches Salesforce.

A real ``syncd serve`` (SQLite journal, ``schedule.push_interval_seconds`` 0.2 by
default, ``--interval``) against the Salesforce simulator, each event for its own
Contact. Latency is measured from the moment the webhook's 200 came back to the
moment the simulator received the sObject Collections PATCH that carries the
record (``LoggedRequest.at``; the simulator runs in this process, so both times are
on the same clock).

* ``single``: events posted one at a time; the next one is posted a random
  0..interval seconds after the previous one reached the CRM, so arrivals fall at
  random phases of the push schedule.
* ``burst``: 100 events posted at once from 16 threads, 3 times (``--bursts``), each
  burst starting at a random phase of the push schedule; latencies are pooled.

Latency is reported as p50/p99 and as a ratio to the push interval: the expected
floor is ~0.5x (waiting for the next tick, on average) and the ceiling ~1x plus
one tick's routing and push time.

    python bench/latency.py [--quick] [--interval S] [--single N] [--burst N]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path

import requests

from ingest import pct  # the same nearest-rank percentile as the ingest benchmark

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "apten_optout_sms.json"


def body_for(rid: str, n: int) -> bytes:
    doc = json.loads(FIXTURE.read_bytes())
    doc["data"].update(externalLeadId=rid, leadId=f"lat-{n}")
    doc["timestamp"] = f"2024-02-18T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z"
    return json.dumps(doc).encode()


class WriteWatch:
    """When each record id first appeared in a composite PATCH, from the simulator's log."""

    def __init__(self, sf):
        self.sf, self.seen, self.calls = sf, {}, 0

    def refresh(self) -> None:
        reqs = self.sf.requests_to(r"/composite/sobjects/?$", "PATCH")
        for r in reqs[self.calls:]:
            for rec in r.json()["records"]:
                self.seen.setdefault(rec["id"], r.at)
        self.calls = len(reqs)

    def wait(self, ids: list[str], timeout: float = 30) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.refresh()
            if all(i in self.seen for i in ids):
                return True
            time.sleep(0.002)
        return False


def main() -> None:
    from syncd.sources.apten import SIGNATURE_HEADER, sign
    from syncd.stack import APTEN_SECRET, Stack

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.2, help="schedule.push_interval_seconds")
    ap.add_argument("--single", type=int, default=100, help="events posted one at a time")
    ap.add_argument("--burst", type=int, default=100, help="events posted at once")
    ap.add_argument("--bursts", type=int, default=3, help="how many bursts")
    ap.add_argument("--quick", action="store_true", help="30 single events, 2 bursts of 100")
    args = ap.parse_args()
    if args.quick:
        args.single, args.bursts = 30, 2
    rng = random.Random(11)
    st = Stack(push_interval=args.interval)
    daemon = None
    try:
        st.start()
        sf = st.sandboxes["salesforce"]
        ids = [sf.add_record("Contact", None, LastName=f"L{i}", SMS_Opt_Out__c=False)
               for i in range(args.single + args.burst * args.bursts + 1)]
        daemon = st.serve()
        watch = WriteWatch(sf)
        session = requests.Session()
        url = f"{st.url}/webhooks/apten"

        def post(rid: str, n: int, s: requests.Session = session) -> float:
            body = body_for(rid, n)
            resp = s.post(url, data=body, timeout=10, headers={
                "Content-Type": "application/json", SIGNATURE_HEADER: sign(APTEN_SECRET, body)})
            acked = time.time()
            if resp.status_code != 200:
                raise RuntimeError(f"webhook answered {resp.status_code}: {resp.text[:200]}")
            return acked

        # Warm-up: the daemon's first push fetches the Salesforce token.
        post(ids[-1], 0)
        assert watch.wait([ids[-1]]), "warm-up event never reached the CRM"

        print(f"latency: syncd serve, SQLite journal, push_interval={args.interval:g} s, Salesforce sandbox; "
              f"{args.single} single events, {args.bursts} bursts of {args.burst}")
        single: list[float] = []
        for k, rid in enumerate(ids[:args.single]):
            time.sleep(rng.uniform(0, args.interval))
            acked = post(rid, k + 1)
            if not watch.wait([rid]):
                raise RuntimeError(f"event {k} never reached the CRM")
            single.append(watch.seen[rid] - acked)

        burst: list[float] = []
        burst_notes: list[str] = []
        for b in range(args.bursts):
            time.sleep(rng.uniform(0, args.interval))
            first = args.single + b * args.burst
            burst_ids = ids[first:first + args.burst]
            acks: dict[str, float] = {}
            calls_before = watch.calls
            lock = threading.Lock()
            cursor = iter(enumerate(burst_ids))

            def worker(cursor=cursor, acks=acks, lock=lock) -> None:
                s = requests.Session()
                while True:
                    with lock:
                        item = next(cursor, None)
                    if item is None:
                        return
                    k, rid = item
                    acks[rid] = post(rid, 10_000 + first + k, s)

            threads = [threading.Thread(target=worker) for _ in range(16)]
            first_post = time.time()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            all_acked = time.time()
            if not watch.wait(burst_ids):
                raise RuntimeError("burst never fully reached the CRM")
            burst.extend(watch.seen[r] - acks[r] for r in burst_ids)
            last_write = max(watch.seen[r] for r in burst_ids)
            burst_notes.append(
                f"burst {b + 1}: {args.burst} webhooks acknowledged in {(all_acked - first_post) * 1e3:.0f} ms, "
                f"written in {watch.calls - calls_before} composite call(s); last write "
                f"{(last_write - first_post) * 1e3:.0f} ms after the first POST "
                f"({(last_write - first_post) / args.interval:.2f} x interval)")

        print()
        print(f"{'run':<8}{'events':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'p50/interval':>14}"
              f"{'p99/interval':>14}")
        for name, lat in (("single", single), ("burst", burst)):
            lat = sorted(lat)
            p50, p99 = pct(lat, 50), pct(lat, 99)
            print(f"{name:<8}{len(lat):>7}{p50 * 1e3:>9.1f}{p99 * 1e3:>9.1f}{max(lat) * 1e3:>9.1f}"
                  f"{p50 / args.interval:>14.2f}{p99 / args.interval:>14.2f}")
        print()
        print(f"single: mean {statistics.mean(single) * 1e3:.1f} ms (a uniform wait for the next tick alone "
              f"would average {args.interval * 500:.0f} ms)")
        for note in burst_notes:
            print(note)
    finally:
        if daemon is not None:
            daemon.terminate()
        st.cleanup()


if __name__ == "__main__":
    main()
