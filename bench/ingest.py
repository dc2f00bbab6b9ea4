#!/usr/bin/env python
"""Durable ingest: signed Apten webhooks/s and ack latency, syncd vs. a bare Flask app.

Two targets, both real subprocesses served by waitress with ``threads=8``:

* ``syncd``    - ``syncd serve`` (SQLite journal, WAL, synchronous=FULL) with a
  Salesforce sandbox configured and ``push_interval_seconds=3600``: the scheduler's
  first tick runs at start-up on an empty journal, then nothing routes or pushes
  during the measurement, so the figures are the receiver alone (verify HMAC,
  parse with pydantic, commit one row, log one JSON line, answer).
* ``baseline`` - a Flask app that only ``json.loads`` the body and answers 200.

The load generator is identical for both: ``--clients`` threads (default 16), each
with one keep-alive ``http.client`` connection, sending bodies that were built and
signed before the clock starts. Every body is unique (leadId and timestamp vary), so
syncd's dedupe never short-circuits. After a warm-up the targets alternate for
``--rounds`` rounds (the order flips every round); medians are reported. Ratios,
not absolute times, are the result: this machine is shared and has 2 cores.

    python bench/ingest.py [--quick] [--requests N] [--rounds R] [--clients C] [--profile]

``--profile`` additionally runs the syncd receiver in-process under cProfile with
Flask's test client (no HTTP, no waitress) and prints where a request's time goes,
plus the cost of ``journal.record`` alone. Exit status is always 0.
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "apten_optout_sms.json"
TARGET_RATIO = 0.7
TARGET_P99_MS = 50.0
WAITRESS_THREADS = 8
PATH = "/webhooks/apten"


# --- the baseline server (this file re-invoked with --baseline-server PORT) -----------
def baseline_server(port: int) -> None:
    from flask import Flask, jsonify, request
    from waitress.server import create_server

    app = Flask("baseline")

    @app.post(PATH)
    def webhook():
        json.loads(request.get_data(cache=False))
        return jsonify({"status": "accepted"}), 200

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    server = create_server(app, host="127.0.0.1", port=port, threads=WAITRESS_THREADS, ident="baseline")
    server.run()


# --- bodies ---------------------------------------------------------------------------
_serial = itertools.count()


def make_bodies(n: int) -> list[tuple[bytes, dict[str, str]]]:
    """``n`` unique, signed Apten optOut bodies with the headers to send them."""
    from syncd.sources.apten import SIGNATURE_HEADER, sign
    from syncd.stack import APTEN_SECRET

    doc = json.loads(FIXTURE.read_bytes())
    out = []
    for _ in range(n):
        k = next(_serial)
        doc["data"]["leadId"] = f"bench-{os.getpid()}-{k}"
        doc["timestamp"] = f"2024-02-{1 + k // 86400 % 28:02d}T{k // 3600 % 24:02d}:{k // 60 % 60:02d}:{k % 60:02d}Z"
        body = json.dumps(doc).encode()
        out.append((body, {"Content-Type": "application/json", SIGNATURE_HEADER: sign(APTEN_SECRET, body),
                           "Content-Length": str(len(body))}))
    return out


# --- load generator -------------------------------------------------------------------
def drive(port: int, bodies: list[tuple[bytes, dict[str, str]]], clients: int) -> dict:
    """Send every body once from ``clients`` keep-alive connections; time each ack."""
    cursor = itertools.count()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    ready = threading.Barrier(clients + 1)
    done = threading.Barrier(clients + 1)

    def worker(slot: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        mine = latencies[slot]
        ready.wait()
        try:
            while True:
                i = next(cursor)
                if i >= len(bodies):
                    break
                body, headers = bodies[i]
                t0 = time.perf_counter()
                conn.request("POST", PATH, body, headers)
                resp = conn.getresponse()
                resp.read()
                mine.append(time.perf_counter() - t0)
                if resp.status != 200:
                    errors.append(str(resp.status))
        except Exception as exc:  # noqa: BLE001 - reported, the round is marked
            errors.append(repr(exc))
        finally:
            conn.close()
            done.wait()

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    done.wait()
    elapsed = time.perf_counter() - started
    lat = sorted(x for per in latencies for x in per)
    return {"rps": len(lat) / elapsed, "p50": pct(lat, 50) * 1000, "p99": pct(lat, 99) * 1000,
            "n": len(lat), "errors": len(errors), "first_error": errors[0] if errors else None}


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


# --- targets --------------------------------------------------------------------------
def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"target on port {port} exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"target on port {port} not healthy")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace) -> None:
    from syncd.stack import Stack, free_port

    st = Stack(push_interval=3600.0)
    st.extra_config = {"logging": {"level": "INFO", "format": "json"}}
    procs: list[subprocess.Popen] = []
    base_dir = Path(tempfile.mkdtemp(prefix="syncd-bench-ingest-"))
    try:
        st.start()
        daemon = st.serve()
        procs.append(daemon.proc)
        base_port = free_port()
        base_log = open(base_dir / "baseline.log", "wb")
        base = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--baseline-server", str(base_port)],
                                stdout=base_log, stderr=subprocess.STDOUT, cwd=base_dir)
        base_log.close()
        procs.append(base)
        wait_healthy(base_port, base)
        targets = {"baseline": base_port, "syncd": st.port}
        pids = {"baseline": base.pid, "syncd": daemon.proc.pid}

        print(f"ingest: {args.requests} requests x {args.rounds} rounds per target, {args.clients} clients, "
              f"waitress threads={WAITRESS_THREADS}; syncd: SQLite WAL synchronous=FULL, "
              f"Salesforce sandbox configured, push_interval=3600 s (no pushing during the run)")
        for name, port in targets.items():  # warm-up: connections, imports, SQLite pages, JIT caches
            drive(port, make_bodies(args.warmup), args.clients)

        rows: list[tuple[str, int, dict]] = []
        for r in range(args.rounds):
            order = ["baseline", "syncd"] if r % 2 == 0 else ["syncd", "baseline"]
            for name in order:
                bodies = make_bodies(args.requests)
                cpu0, me0 = proc_cpu(pids[name]), os.times()
                res = drive(targets[name], bodies, args.clients)
                cpu1, me1 = proc_cpu(pids[name]), os.times()
                res["cpu_us"] = (cpu1 - cpu0) / args.requests * 1e6
                res["client_cpu_us"] = ((me1.user + me1.system) - (me0.user + me0.system)) / args.requests * 1e6
                rows.append((name, r + 1, res))
                print(f"  round {r + 1} {name:<8} {res['rps']:8.0f} req/s  p50 {res['p50']:6.2f} ms  "
                      f"p99 {res['p99']:6.2f} ms  server CPU {res['cpu_us']:5.0f} us/req  "
                      f"client CPU {res['client_cpu_us']:4.0f} us/req  errors {res['errors']}", flush=True)
        report(rows)
        queue_warnings = sum(1 for x in daemon.log_lines() if str(x.get("msg", "")).startswith("Task queue depth"))
        accepted = sum(1 for x in daemon.log_lines() if x.get("msg") == "webhook accepted")
        print(f"syncd log: {accepted} 'webhook accepted' lines and {queue_warnings} waitress "
              f"'Task queue depth' warnings")
        if daemon.proc.poll() is not None:
            print("syncd serve died during the run:\n" + daemon.log()[-2000:])
    finally:
        for p in procs:
            stop(p)
        st.cleanup()
        shutil.rmtree(base_dir, ignore_errors=True)


def report(rows: list[tuple[str, int, dict]]) -> None:
    med = {}
    for name in ("baseline", "syncd"):
        mine = [res for n, _, res in rows if n == name]
        med[name] = {k: statistics.median(r[k] for r in mine) for k in ("rps", "p50", "p99", "cpu_us")}
        med[name]["errors"] = sum(r["errors"] for r in mine)
    print()
    print(f"{'target':<10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'srv CPU us/req':>16}{'errors':>8}"
          "   (medians over rounds)")
    for name in ("baseline", "syncd"):
        m = med[name]
        print(f"{name:<10}{m['rps']:>10.0f}{m['p50']:>10.2f}{m['p99']:>10.2f}{m['cpu_us']:>16.0f}{m['errors']:>8}")
    ratio = med["syncd"]["rps"] / med["baseline"]["rps"]
    p99 = med["syncd"]["p99"]
    print()
    print(f"throughput ratio syncd/baseline = {ratio:.2f}   target >= {TARGET_RATIO}   "
          f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'}")
    print(f"syncd p99 ack latency = {p99:.1f} ms   target < {TARGET_P99_MS:g} ms   "
          f"{'PASS' if p99 < TARGET_P99_MS else 'FAIL'}")
    print(f"p99 ratio syncd/baseline = {p99 / med['baseline']['p99']:.2f}   "
          f"server CPU per request ratio syncd/baseline = {med['syncd']['cpu_us'] / med['baseline']['cpu_us']:.2f}")


# --- in-process profile ---------------------------------------------------------------
def profile(n: int) -> None:
    """Where a syncd request's time goes, without HTTP: Flask test client + cProfile."""
    import cProfile
    import io
    import logging
    import pstats

    from syncd.config import load_config
    from syncd.events import utcnow
    from syncd.logs import setup_logging
    from syncd.receiver import create_app
    from syncd.runtime import open_runtime
    from syncd.stack import Stack

    st = Stack(push_interval=3600.0).start()
    sink = open(os.devnull, "w")
    try:
        setup_logging("INFO", "json", stream=sink)  # the receiver logs one line per webhook, as in serve
        rt = open_runtime(load_config(st.config_path, env={}))
        app = create_app(rt.journal, rt.sources, rt.router, metrics=rt.metrics)
        client = app.test_client()
        for body, headers in make_bodies(200):
            client.post(PATH, data=body, headers=headers)
        bodies = make_bodies(n)
        c0, t0 = time.process_time(), time.perf_counter()
        for body, headers in bodies:
            assert client.post(PATH, data=body, headers=headers).status_code == 200
        whole, whole_cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n

        # The baseline app, in-process the same way.
        from flask import Flask, jsonify, request

        bare = Flask("baseline")

        @bare.post(PATH)
        def _bare():
            json.loads(request.get_data(cache=False))
            return jsonify({"status": "accepted"}), 200

        bare_client = bare.test_client()
        bodies = make_bodies(n)
        c0, t0 = time.process_time(), time.perf_counter()
        for body, headers in bodies:
            bare_client.post(PATH, data=body, headers=headers)
        bare_wall, bare_cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n

        # The request's steps one by one (CPU and wall per call, same bodies).
        from werkzeug.datastructures import Headers

        src = rt.sources["apten"]
        steps = make_bodies(n)
        heads = [Headers(h) for _, h in steps]
        now = utcnow()
        events: list = [None] * n
        rlog = logging.getLogger("syncd.receiver")

        def parse(i: int) -> None:
            events[i] = src.parse(steps[i][0], now)

        def record_fresh(i: int) -> None:
            events[i].source_event_id += "-alone"
            rt.journal.record(events[i])

        table = [
            ("authenticate (HMAC)", lambda i: src.authenticate(steps[i][0], heads[i], {})),
            ("parse (pydantic, hash, E.164)", parse),
            ("router.unroutable_reason", lambda i: rt.router.unroutable_reason(
                events[i].external_lead_id, events[i].phone, events[i].phone_raw)),
            ("journal.record (FULL)", lambda i: rt.journal.record(events[i])),
            ("log line 'webhook accepted'", lambda i: rlog.info("webhook accepted", extra={
                "source": "apten", "event_id": i, "status": 200, "kind": "opt_out", "channel": "sms"})),
        ]
        timings = []
        for label, fn in table:
            c0, w0 = time.process_time(), time.perf_counter()
            for i in range(n):
                fn(i)
            timings.append((label, (time.process_time() - c0) / n, (time.perf_counter() - w0) / n))
        with app.app_context():
            c0, w0 = time.process_time(), time.perf_counter()
            for i in range(n):
                jsonify({"status": "accepted", "event_id": i})
            timings.append(("jsonify answer", (time.process_time() - c0) / n, (time.perf_counter() - w0) / n))
        rt.journal._conn().execute("PRAGMA synchronous=NORMAL")  # noqa: SLF001 - measurement only
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(n):
            record_fresh(i)
        timings.append(("journal.record (NORMAL, compare)", (time.process_time() - c0) / n,
                        (time.perf_counter() - w0) / n))
        rt.journal._conn().execute("PRAGMA synchronous=FULL")  # noqa: SLF001

        prof = cProfile.Profile()
        bodies = make_bodies(n)
        prof.enable()
        for body, headers in bodies:
            client.post(PATH, data=body, headers=headers)
        prof.disable()
        rt.journal.close()
        print(f"\nin-process, one thread, {n} requests (Flask test client, no HTTP):")
        print(f"  {'step':<34}{'CPU us':>8}{'wall us':>9}")
        print(f"  {'whole syncd request':<34}{whole_cpu * 1e6:>8.1f}{whole * 1e6:>9.1f}")
        print(f"  {'whole baseline request':<34}{bare_cpu * 1e6:>8.1f}{bare_wall * 1e6:>9.1f}")
        for label, cpu, wall in timings:
            print(f"  {label:<34}{cpu * 1e6:>8.1f}{wall * 1e6:>9.1f}")
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(20)
        print("\ncProfile, top 20 by own time (under the profiler, times are inflated):")
        print("\n".join(out.getvalue().splitlines()[4:]))
        logging.shutdown()
    finally:
        sink.close()
        st.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="requests per target per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="1000 requests, 2 rounds, 200 warm-up")
    ap.add_argument("--profile", action="store_true", help="also profile the receiver in-process")
    ap.add_argument("--baseline-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        baseline_server(args.baseline_server)
        return
    if args.quick:
        args.requests, args.rounds, args.warmup = 1000, 2, 200
    run(args)
    if args.profile:
        profile(1000 if args.quick else 2000)


if __name__ == "__main__":
    main()
