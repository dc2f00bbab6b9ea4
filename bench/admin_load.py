#!/usr/bin/env python
"""Signed-webhook latency with and without load on the admin listener.

A real ``syncd serve`` (SQLite journal pre-filled with ``--events`` routed events, so
the journal gauges have whole tables to count; ``push_interval_seconds`` 3600 so
nothing routes or pushes during the run) takes signed Apten webhooks from
``--clients`` keep-alive connections on the public port. The same webhook load is
timed twice per round: quiet, and while 8 threads loop over ``/metrics``,
``/readyz`` and ``/status`` (bearer token) on the admin port as fast as they are
answered. Rounds alternate the order; medians of the rounds are reported, with the
ratio loaded/quiet of the webhook p95 (target: < 2x; before the admin listener and
the gauge cache, 8 loops on /metrics took p95 from 3 ms to 1.2 s).

    python bench/admin_load.py [--quick] [--events N] [--webhooks N] [--rounds N]
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import sqlite3
import statistics
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ingest import make_bodies, pct  # signed unique bodies; the same nearest-rank percentile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from syncd.stack import Stack  # noqa: E402

STATUS_TOKEN = "bench-status-token-0123456789abcdef"
ADMIN_LOOPS = 8
ADMIN_PATHS = ("/metrics", "/readyz", "/status")


def prefill(db_path: Path, n: int) -> None:
    """``n`` routed consent events, written in batches through the journal itself."""
    from syncd.events import ConsentEvent
    from syncd.journal import open_journal

    journal = open_journal(f"sqlite:///{db_path}")
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    try:
        for first in range(0, n, 2000):
            events = [ConsentEvent(source="apten", source_event_id=f"prefill-{i}", kind="opt_out", channel="sms",
                                   occurred_at=start + timedelta(seconds=i), received_at=start + timedelta(seconds=i),
                                   raw=b"{}", external_lead_id="003XX000004DHPYYA4")
                      for i in range(first, min(n, first + 2000))]
            journal.events._insert_batch(events)  # one transaction per batch: a bench shortcut
    finally:
        journal.close()
    with sqlite3.connect(db_path) as conn:  # already routed: the scheduler's first tick has nothing to do
        conn.execute("UPDATE events SET status = 'routed'")


def webhooks(port: int, bodies, clients: int) -> list[float]:
    """Send every body once from ``clients`` keep-alive connections; each ack's seconds."""
    cursor = itertools.count()
    out: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while (i := next(cursor)) < len(bodies):
                body, headers = bodies[i]
                t0 = time.perf_counter()
                conn.request("POST", "/webhooks/apten", body, headers)
                resp = conn.getresponse()
                resp.read()
                took = time.perf_counter() - t0
                if resp.status != 200:
                    raise RuntimeError(f"webhook answered {resp.status}")
                with lock:
                    out.append(took)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(out)


def admin_loops(port: int, stop: threading.Event, served: list[int],
                paths: tuple[str, ...] = ADMIN_PATHS) -> list[threading.Thread]:
    """``ADMIN_LOOPS`` threads cycling through ``paths`` until ``stop``."""
    def loop(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        n = 0
        try:
            for path in itertools.islice(itertools.cycle(paths), offset, None):
                if stop.is_set():
                    break
                conn.request("GET", path, headers={"Authorization": f"Bearer {STATUS_TOKEN}"})
                conn.getresponse().read()
                n += 1
        finally:
            conn.close()
            served.append(n)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(ADMIN_LOOPS)]
    for t in threads:
        t.start()
    return threads


def measure(st: Stack, n: int, clients: int, loaded: bool, paths: tuple[str, ...] = ADMIN_PATHS) -> dict:
    bodies = make_bodies(n)
    stop, served = threading.Event(), []
    threads = admin_loops(st.admin_port, stop, served, paths) if loaded else []
    if loaded:
        time.sleep(0.5)  # the loops are running before the first webhook
    started = time.perf_counter()
    lat = webhooks(st.port, bodies, clients)
    elapsed = time.perf_counter() - started
    stop.set()
    for t in threads:
        t.join(30)
    return {"p50": pct(lat, 50) * 1000, "p95": pct(lat, 95) * 1000, "p99": pct(lat, 99) * 1000,
            "admin_rps": sum(served) / elapsed if loaded else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer events and webhooks (a smoke run)")
    ap.add_argument("--events", type=int, default=200_000, help="events pre-filled into the journal")
    ap.add_argument("--webhooks", type=int, default=600, help="webhooks per measurement")
    ap.add_argument("--clients", type=int, default=2, help="concurrent webhook senders")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--paths", default=",".join(ADMIN_PATHS), help="admin paths the loops cycle through")
    args = ap.parse_args()
    if args.quick:
        args.events, args.webhooks, args.rounds = 20_000, 200, 1
    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())

    st = Stack(push_interval=3600.0, extra_config={"admin": {"status_token": STATUS_TOKEN}}).start()
    daemon = None
    try:
        t0 = time.perf_counter()
        prefill(st.workdir / "syncd.db", args.events)
        print(f"journal pre-filled with {args.events} events in {time.perf_counter() - t0:.1f} s")
        daemon = st.serve()
        measure(st, 100, args.clients, loaded=False)  # warm-up
        quiet, loaded = [], []
        for r in range(args.rounds):
            for is_loaded in ((False, True) if r % 2 == 0 else (True, False)):
                (loaded if is_loaded else quiet).append(measure(st, args.webhooks, args.clients, is_loaded, paths))
        med = {name: {k: statistics.median(m[k] for m in runs) for k in runs[0]}
               for name, runs in (("quiet", quiet), ("loaded", loaded))}
        print(f"{args.webhooks} signed webhooks x {args.rounds} rounds from {args.clients} clients; "
              f"loaded = {ADMIN_LOOPS} loops on {', '.join(paths)} (admin port)")
        print(f"{'':8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'admin req/s':>12}")
        for name in ("quiet", "loaded"):
            m = med[name]
            print(f"{name:8} {m['p50']:8.1f} {m['p95']:8.1f} {m['p99']:8.1f} {m['admin_rps']:12.0f}")
        ratio = med["loaded"]["p95"] / med["quiet"]["p95"]
        print(f"webhook p95 loaded/quiet: {ratio:.2f}x  {'PASS' if ratio < 2 else 'FAIL'} (target < 2x)")
    finally:
        if daemon is not None:
            daemon.terminate()
        st.cleanup()


if __name__ == "__main__":
    main()
