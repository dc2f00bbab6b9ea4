#!/usr/bin/env python
"""Consent checks: ``GET /v1/consent`` throughput and p99, syncd vs. a bare Flask app.

Three targets, all real subprocesses served by waitress with ``threads=8``:

* ``syncd-10k`` and ``syncd-1M`` - ``syncd serve`` (SQLite journal, WAL,
  synchronous=FULL, ``api.token`` set, ``push_interval_seconds`` and
  ``poll_interval_seconds`` 3600 so nothing routes, pushes or polls meanwhile) on a
  journal whose consent ledger holds 10,000 and 1,000,000 rows (bulk-loaded with one
  SQL transaction before ``serve`` starts: a bench shortcut, not how rows get there).
* ``baseline`` - a Flask app that reads the query's ``phone`` and ``channel`` and
  answers a constant JSON document of the same shape.

The load generator is identical for all: ``--clients`` threads (default 16), each
with one keep-alive ``http.client`` connection, sending ``GET /v1/consent?phone=…&
channel=…`` with the bearer token. Requests were built before the clock starts; 90 %
ask about a phone the ledger holds (random over the whole ledger, so the 1M journal
cannot answer from a few hot pages), 10 % about one it does not. After a warm-up the
targets alternate for ``--rounds`` rounds (the order rotates every round); medians
are reported. Ratios, not absolute times, are the result: this machine is shared.

Afterwards the ledger lookup alone (``journal.ledger.state``, in-process, one
thread, no HTTP) is timed on both journals: flat in size means the per-request cost
does not grow with the ledger.

    python bench/consent.py [--quick] [--requests N] [--rounds R] [--clients C]
                            [--small N] [--large N] [--journal postgresql://…]

``--journal`` runs the syncd targets on a PostgreSQL journal (two schemas of that
database, dropped at the end). Exit status is always 0.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import drive as ingest_drive, proc_cpu, stop, wait_healthy  # noqa: E402  (same house tools)

TARGET_RATIO = 0.8
WAITRESS_THREADS = 8
PATH = "/v1/consent"
TOKEN = "bench-consent-api-token-0123456789abcdef"
HIT_SHARE = 0.9
FIRST_PHONE = 2_000_000_000     # +1 200 000 0000 onwards: possible US numbers, one per row


# --- the baseline server (this file re-invoked with --baseline-server PORT) -----------
def baseline_server(port: int) -> None:
    from flask import Flask, jsonify, request
    from waitress.server import create_server

    app = Flask("baseline")

    @app.get(PATH)
    def consent():
        channel = request.args.get("channel")
        request.args.get("phone")
        return jsonify({"allowed": True, "state": "unknown", "channel": channel, "since": None,
                        "source": None, "event_id": None})

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    server = create_server(app, host="127.0.0.1", port=port, threads=WAITRESS_THREADS, ident="baseline")
    server.run()


# --- the ledger -----------------------------------------------------------------------
def phone(i: int) -> str:
    return f"+1{FIRST_PHONE + i}"


def ledger_rows(n: int):
    """``n`` ledger rows, one phone each; every third opted in, channels rotate."""
    channels = ("sms", "call", "whatsapp")
    for i in range(n):
        yield (phone(i), channels[i % 3], "opted_in" if i % 3 == 0 else "opted_out",
               f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T09:45:22.000000Z", "apten", None)


def fill_ledger(journal_url: str, base_dir: Path, n: int) -> float:
    """Create the journal (migrations) and load ``n`` ledger rows in one transaction;
    seconds taken. Direct SQL: a bench shortcut around 1M webhooks."""
    from syncd.journal import open_journal

    open_journal(journal_url, base_dir=str(base_dir)).close()
    started = time.perf_counter()
    insert = "INSERT INTO consent_ledger (identity, channel, state, since, source, event_id) VALUES "
    if journal_url.startswith("sqlite:"):
        import sqlite3

        conn = sqlite3.connect(base_dir / journal_url[len("sqlite:///"):], isolation_level=None)
        conn.execute("PRAGMA cache_size=-262144")   # the loader's own connection: 256 MB of page cache
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(insert + "(?, ?, ?, ?, ?, ?)", ledger_rows(n))
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
        conn.close()
    else:
        import psycopg

        with psycopg.connect(_pg_dsn(journal_url)) as conn, conn.cursor() as cur:
            cur.execute(f"SET search_path TO {_pg_schema(journal_url)}")
            with cur.copy("COPY consent_ledger (identity, channel, state, since, source, event_id) "
                          "FROM STDIN") as copy:
                for row in ledger_rows(n):
                    copy.write_row(row)
            conn.commit()
            cur.execute("ANALYZE consent_ledger")
            conn.commit()
    return time.perf_counter() - started


def _pg_dsn(url: str) -> str:
    return url.split("?", 1)[0]


def _pg_schema(url: str) -> str:
    return url.split("schema=", 1)[1].split("&", 1)[0]


def drop_pg_schema(url: str) -> None:
    import psycopg

    with psycopg.connect(_pg_dsn(url), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {_pg_schema(url)} CASCADE")


# --- requests and the load generator ---------------------------------------------------
def make_requests(n: int, ledger_size: int, rng: random.Random) -> list[str]:
    """``n`` request paths: ``HIT_SHARE`` phones the ledger holds, the rest unknown."""
    channels = ("sms", "call", "whatsapp")
    out = []
    for _ in range(n):
        i = rng.randrange(ledger_size) if rng.random() < HIT_SHARE else ledger_size + rng.randrange(10**6)
        out.append(f"{PATH}?phone={quote(phone(i))}&channel={channels[i % 3]}")
    return out


def drive(port: int, paths: list[str], clients: int) -> dict:
    """Send every path once from ``clients`` keep-alive connections; time each answer
    and count the answers' states."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return ingest_drive(port, [("GET", p, None, headers) for p in paths], clients,
                        classify=lambda body: str(json.loads(body).get("state", "-")))


# --- the run ----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> None:
    from syncd.stack import Stack, free_port

    sizes = {f"syncd-{label(args.small)}": args.small, f"syncd-{label(args.large)}": args.large}
    rng = random.Random(20261202)
    stacks: dict[str, Stack] = {}
    procs: list[subprocess.Popen] = []
    base_dir = Path(tempfile.mkdtemp(prefix="syncd-bench-consent-"))
    pg_urls: list[str] = []
    try:
        targets: dict[str, int] = {"baseline": free_port()}
        pids: dict[str, int] = {}
        for name, size in sizes.items():
            url = None
            if args.journal:
                schema = f"bench_consent_{os.getpid()}_{size}"
                url = args.journal + ("&" if "?" in args.journal else "?") + f"schema={schema}"
                pg_urls.append(url)
            st = Stack(push_interval=3600.0, poll_interval=3600.0, journal_url=url)
            st.extra_config = {"api": {"token": TOKEN}, "logging": {"level": "INFO", "format": "json"}}
            stacks[name] = st.start()
            took = fill_ledger(st.config()["journal"]["url"], st.workdir, size)
            print(f"{name}: {size:,} ledger rows loaded in {took:.1f} s", flush=True)
            daemon = st.serve()
            procs.append(daemon.proc)
            targets[name], pids[name] = st.port, daemon.proc.pid
        with open(base_dir / "baseline.log", "wb") as out:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--baseline-server",
                                     str(targets["baseline"])], stdout=out, stderr=subprocess.STDOUT, cwd=base_dir)
        procs.append(proc)
        pids["baseline"] = proc.pid
        wait_healthy(targets["baseline"], proc)

        journal = "PostgreSQL (" + args.journal.split("@")[-1] + ")" if args.journal else "SQLite WAL"
        print(f"consent: {args.requests} GET /v1/consent x {args.rounds} rounds per target, {args.clients} "
              f"clients, waitress threads={WAITRESS_THREADS}; syncd: {journal}, {HIT_SHARE:.0%} of the "
              f"phones in the ledger")
        for name, port in targets.items():
            drive(port, make_requests(args.warmup, sizes.get(name, args.small), rng), args.clients)

        rows: list[tuple[str, int, dict]] = []
        names = list(targets)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                paths = make_requests(args.requests, sizes.get(name, args.small), rng)
                cpu0 = proc_cpu(pids[name])
                res = drive(targets[name], paths, args.clients)
                res["cpu_us"] = (proc_cpu(pids[name]) - cpu0) / args.requests * 1e6
                rows.append((name, r + 1, res))
                print(f"  round {r + 1} {name:<11} {res['rps']:8.0f} req/s  p50 {res['p50']:6.2f} ms  "
                      f"p99 {res['p99']:6.2f} ms  server CPU {res['cpu_us']:5.0f} us/req  errors {res['errors']}"
                      + (f"  first: {res['first_error']}" if res["errors"] else "")
                      + (f"  answers {dict(sorted(res['answers'].items()))}" if name != "baseline" else ""),
                      flush=True)
        report(rows, names, list(sizes))
        for p in procs:
            stop(p)
        lookups(stacks, sizes, args.lookups, rng)
    finally:
        for p in procs:
            stop(p)
        for st in stacks.values():
            st.cleanup()
        for url in pg_urls:
            drop_pg_schema(url)
        shutil.rmtree(base_dir, ignore_errors=True)


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else \
        f"{n // 1000}k" if n % 1000 == 0 else str(n)


def report(rows: list[tuple[str, int, dict]], names: list[str], syncd_names: list[str]) -> None:
    med = {}
    for name in names:
        mine = [res for n, _, res in rows if n == name]
        med[name] = {k: statistics.median(r[k] for r in mine) for k in ("rps", "p50", "p99", "cpu_us")}
        med[name]["errors"] = sum(r["errors"] for r in mine)
    print()
    print(f"{'target':<12}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'srv CPU us/req':>16}{'errors':>8}{'ratio':>8}"
          "   (medians over rounds; ratio = req/s / baseline req/s)")
    for name in names:
        m = med[name]
        print(f"{name:<12}{m['rps']:>9.0f}{m['p50']:>9.2f}{m['p99']:>9.2f}{m['cpu_us']:>16.0f}{m['errors']:>8}"
              f"{m['rps'] / med['baseline']['rps']:>8.2f}")
    print()
    for name in syncd_names:
        ratio = med[name]["rps"] / med["baseline"]["rps"]
        print(f"throughput ratio {name}/baseline = {ratio:.2f}   target >= {TARGET_RATIO}   "
              f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'}   p99 {med[name]['p99']:.1f} ms "
              f"(baseline {med['baseline']['p99']:.1f} ms)")
    small, large = syncd_names
    print(f"size: {large} / {small} throughput = {med[large]['rps'] / med[small]['rps']:.2f}, "
          f"p99 = {med[large]['p99'] / med[small]['p99']:.2f}, server CPU = "
          f"{med[large]['cpu_us'] / med[small]['cpu_us']:.2f}   (flat = 1.00)")


def lookups(stacks: dict, sizes: dict[str, int], n: int, rng: random.Random) -> None:
    """``journal.ledger.state`` alone, in-process, one thread: µs per lookup per size
    (and ``states_at_once`` with one key: the API's read when no other check queued)."""
    from syncd.journal import open_journal

    print(f"\nledger lookup alone (journal.ledger.state, one thread, in-process, {n} lookups, "
          f"{HIT_SHARE:.0%} hits; CPU time, best of 3):")
    per = {}
    for name, st in stacks.items():
        journal = open_journal(st.config()["journal"]["url"], base_dir=str(st.workdir), must_exist=True)
        try:
            keys = [(phone(i), ("sms", "call", "whatsapp")[i % 3])
                    for i in (rng.randrange(sizes[name]) if rng.random() < HIT_SHARE
                              else sizes[name] + rng.randrange(10**6) for _ in range(n))]
            for identity, channel in keys[:200]:
                journal.ledger.state(identity, channel)
            one, at_once = journal.ledger.state, journal.ledger.states_at_once
            per[name] = best_of_3(lambda: [one(i, c) for i, c in keys]) / n * 1e6
            grouped = best_of_3(lambda: [at_once([k]) for k in keys]) / n * 1e6
            print(f"  {name:<12}{sizes[name]:>12,} rows{per[name]:>8.1f} us per lookup "
                  f"(states_at_once, one key: {grouped:.1f} us)")
        finally:
            journal.close()
    small, large = per
    print(f"  {large} / {small} = {per[large] / per[small]:.2f}   (flat = 1.00)")


def best_of_3(work) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        work()
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000, help="requests per target per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--small", type=int, default=10_000, help="ledger rows of the small journal")
    ap.add_argument("--large", type=int, default=1_000_000, help="ledger rows of the large journal")
    ap.add_argument("--lookups", type=int, default=20_000, help="in-process lookups per size")
    ap.add_argument("--quick", action="store_true",
                    help="1,000 and 100,000 rows, 1000 requests x 2 rounds, 200 warm-up")
    ap.add_argument("--journal", metavar="URL", help="a PostgreSQL journal.url for the syncd targets")
    ap.add_argument("--baseline-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        baseline_server(args.baseline_server)
        return
    if args.quick:
        args.requests, args.rounds, args.warmup, args.small, args.large, args.lookups = \
            1000, 2, 200, 1000, 100_000, 5000
    run(args)


if __name__ == "__main__":
    main()
