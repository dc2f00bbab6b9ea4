#!/usr/bin/env python
"""Durable ingest: signed Apten webhooks/s and ack latency, syncd vs. a bare Flask app.

Two targets, both real subprocesses served by waitress with ``threads=8``:

* ``syncd``    - ``syncd serve`` (SQLite journal, WAL, synchronous=FULL) with a
  Salesforce sandbox configured and ``push_interval_seconds=3600``: the scheduler's
  first tick runs at start-up on an empty journal, then nothing routes or pushes
  during the measurement, so the figures are the receiver alone (verify HMAC,
  parse with pydantic, commit one row in the ingest writer process, log one JSON
  line, answer). Server CPU counts ``serve`` and its writer process together.
* ``baseline`` - a Flask app that only ``json.loads`` the body and answers 200.

The load generator is identical for both: ``--clients`` threads (default 16), each
with one keep-alive ``http.client`` connection, sending bodies that were built and
signed before the clock starts. Every body is unique (leadId and timestamp vary), so
syncd's dedupe never short-circuits. After a warm-up the targets alternate for
``--rounds`` rounds (the order flips every round); medians are reported. Ratios,
not absolute times, are the result: this machine is shared and has 2 cores.

    python bench/ingest.py [--quick] [--requests N] [--rounds R] [--clients C] [--profile]
                           [--ceiling] [--journal URL] [--against DIR]

``--ceiling`` adds a third target, ``syncd-mem``: ``syncd serve`` with
``journal.record`` replaced by an in-memory stand-in, so everything but the
durable write is real; its ratio is the most any durable journal could reach.
``--journal URL`` runs syncd on another journal (e.g. PostgreSQL).
``--against DIR`` adds ``syncd-ref``: ``syncd serve`` imported from another
checkout (e.g. ``git worktree add /tmp/ref HEAD~1``), for a before/after in one run.

``--profile`` additionally calls the receiver's WSGI app in-process from 8 threads
(no HTTP, no waitress) with the log line and the durable journal switched off in
turn, and prints what each part costs per webhook under concurrency, next to the
bare baseline app and to the same steps called alone. Exit status is always 0.
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
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "apten_optout_sms.json"
TARGET_RATIO = 0.5  # issue 14: >= 0.5x the bare app with synchronous=FULL kept
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


# --- the ceiling target (this file re-invoked with --memory-journal-serve CONFIG) -------
def memory_journal_serve(config_path: str) -> None:
    """``syncd serve`` with ``journal.record`` replaced by an in-memory stand-in (no
    SQLite write, no fsync): everything else a webhook costs is real. It is never
    a way to run syncd, only the upper bound any durable journal can approach."""
    from syncd.cli import main as syncd_main
    from syncd.journal.base import Recorded
    from syncd.journal.events import EventStore

    ids = itertools.count(1)

    def record(self, event):
        return Recorded(next(ids), True)

    EventStore.record = record  # type: ignore[method-assign]
    syncd_main(["-c", config_path, "serve"])


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
Request = tuple[str, str, "bytes | None", dict[str, str]]   # method, path, body, headers


def as_posts(bodies: list[tuple[bytes, dict[str, str]]]) -> list[Request]:
    return [("POST", PATH, body, headers) for body, headers in bodies]


def drive(port: int, requests: list[Request], clients: int,
          classify: Callable[[bytes], str] | None = None) -> dict:
    """Send every request once from ``clients`` keep-alive connections; time each answer.
    ``classify`` names each 200 answer's kind; the counts come back as ``answers``."""
    cursor = itertools.count()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    answers: dict[str, int] = {}
    merge = threading.Lock()
    ready = threading.Barrier(clients + 1)
    done = threading.Barrier(clients + 1)

    def worker(slot: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        mine = latencies[slot]
        kinds: dict[str, int] = {}
        ready.wait()
        try:
            while (i := next(cursor)) < len(requests):
                method, path, body, headers = requests[i]
                t0 = time.perf_counter()
                conn.request(method, path, body, headers)
                resp = conn.getresponse()
                answer = resp.read()
                mine.append(time.perf_counter() - t0)
                if resp.status != 200:
                    errors.append(f"{resp.status} {answer[:200]!r}")
                elif classify is not None:
                    kind = classify(answer)
                    kinds[kind] = kinds.get(kind, 0) + 1
        except Exception as exc:  # noqa: BLE001 - reported, the round is marked
            errors.append(repr(exc))
        finally:
            conn.close()
            with merge:
                for k, v in kinds.items():
                    answers[k] = answers.get(k, 0) + v
            done.wait()

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    done.wait()
    elapsed = time.perf_counter() - started
    lat = sorted(x for per in latencies for x in per)
    result = {"rps": len(lat) / elapsed, "p50": pct(lat, 50) * 1000, "p99": pct(lat, 99) * 1000,
              "n": len(lat), "errors": len(errors), "first_error": errors[0] if errors else None}
    if classify is not None:
        result["answers"] = answers
    return result


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds so far of a process and its live children (``syncd
    serve``'s ingest writer process is part of the server), Linux /proc; NaN elsewhere."""
    try:
        return sum(_own_cpu(p) for p in [pid, *_children(pid)])
    except (OSError, ValueError, IndexError):
        return float("nan")


def _own_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return out


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

    st = Stack(push_interval=3600.0, journal_url=args.journal)
    st.extra_config = {"logging": {"level": "INFO", "format": "json"}}
    ceiling = Stack(push_interval=3600.0) if args.ceiling else None
    ref = Stack(push_interval=3600.0) if args.against else None
    stacks = [x for x in (st, ceiling, ref) if x is not None]
    procs: list[subprocess.Popen] = []
    base_dir = Path(tempfile.mkdtemp(prefix="syncd-bench-ingest-"))
    try:
        st.start()
        daemon = st.serve()
        procs.append(daemon.proc)
        targets = {"baseline": free_port(), "syncd": st.port}
        pids = {"syncd": daemon.proc.pid}
        launch = {"baseline": ["--baseline-server", str(targets["baseline"])]}
        if ceiling is not None:
            ceiling.extra_config = dict(st.extra_config)
            ceiling.start()
            targets["syncd-mem"] = ceiling.port
            launch["syncd-mem"] = ["--memory-journal-serve", str(ceiling.config_path)]
        if ref is not None:     # the other checkout's serve, its imports first on the path
            ref.extra_config = dict(st.extra_config)
            ref.start()
            with open(base_dir / "syncd-ref.log", "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "syncd.cli", "-c", str(ref.config_path), "serve"],
                                        stdout=out, stderr=subprocess.STDOUT, cwd=ref.workdir,
                                        env={**os.environ, "PYTHONPATH": str(Path(args.against).resolve())})
            procs.append(proc)
            targets["syncd-ref"], pids["syncd-ref"] = ref.port, proc.pid
            wait_healthy(ref.port, proc)
        for name, extra in launch.items():
            with open(base_dir / f"{name}.log", "wb") as out:
                proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *extra],
                                        stdout=out, stderr=subprocess.STDOUT, cwd=base_dir)
            procs.append(proc)
            pids[name] = proc.pid
            wait_healthy(targets[name], proc)

        journal = "PostgreSQL (" + args.journal.split("@")[-1] + ")" if args.journal else "SQLite WAL synchronous=FULL"
        print(f"ingest: {args.requests} requests x {args.rounds} rounds per target, {args.clients} clients, "
              f"waitress threads={WAITRESS_THREADS}; syncd: {journal}, "
              f"Salesforce sandbox configured, push_interval=3600 s (no pushing during the run)"
              + ("; syncd-mem: the same with journal.record in memory (ceiling)" if ceiling else ""))
        for name, port in targets.items():  # warm-up: connections, imports, SQLite pages, JIT caches
            drive(port, as_posts(make_bodies(args.warmup)), args.clients)

        rows: list[tuple[str, int, dict]] = []
        for r in range(args.rounds):
            order = list(targets) if r % 2 == 0 else list(targets)[::-1]
            for name in order:
                bodies = make_bodies(args.requests)
                cpu0, me0 = proc_cpu(pids[name]), os.times()
                res = drive(targets[name], as_posts(bodies), args.clients)
                cpu1, me1 = proc_cpu(pids[name]), os.times()
                res["cpu_us"] = (cpu1 - cpu0) / args.requests * 1e6
                res["client_cpu_us"] = ((me1.user + me1.system) - (me0.user + me0.system)) / args.requests * 1e6
                rows.append((name, r + 1, res))
                print(f"  round {r + 1} {name:<8} {res['rps']:8.0f} req/s  p50 {res['p50']:6.2f} ms  "
                      f"p99 {res['p99']:6.2f} ms  server CPU {res['cpu_us']:5.0f} us/req  "
                      f"client CPU {res['client_cpu_us']:4.0f} us/req  errors {res['errors']}", flush=True)
        report(rows, list(targets))
        queue_warnings = sum(1 for x in daemon.log_lines() if str(x.get("msg", "")).startswith("Task queue depth"))
        accepted = sum(1 for x in daemon.log_lines() if x.get("msg") == "webhook accepted")
        print(f"syncd log: {accepted} 'webhook accepted' lines and {queue_warnings} waitress "
              f"'Task queue depth' warnings")
        if daemon.proc.poll() is not None:
            print("syncd serve died during the run:\n" + daemon.log()[-2000:])
    finally:
        for p in procs:
            stop(p)
        for x in stacks:
            x.cleanup()
        shutil.rmtree(base_dir, ignore_errors=True)


def report(rows: list[tuple[str, int, dict]], names: list[str]) -> None:
    med = {}
    for name in names:
        mine = [res for n, _, res in rows if n == name]
        med[name] = {k: statistics.median(r[k] for r in mine) for k in ("rps", "p50", "p99", "cpu_us")}
        med[name]["errors"] = sum(r["errors"] for r in mine)
    print()
    print(f"{'target':<10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'srv CPU us/req':>16}{'errors':>8}"
          "   (medians over rounds)")
    for name in names:
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
    if "syncd-ref" in med:
        print(f"syncd-ref (--against) / baseline = {med['syncd-ref']['rps'] / med['baseline']['rps']:.2f}; "
              f"syncd / syncd-ref = {med['syncd']['rps'] / med['syncd-ref']['rps']:.2f}")
    if "syncd-mem" in med:
        print(f"ceiling: syncd with an in-memory journal / baseline = "
              f"{med['syncd-mem']['rps'] / med['baseline']['rps']:.2f}; the durable write costs "
              f"{med['syncd']['cpu_us'] - med['syncd-mem']['cpu_us']:.0f} us of server CPU per webhook")


# --- in-process profile ---------------------------------------------------------------
def _environ(body: bytes, headers: dict[str, str]) -> dict:
    """A WSGI environ for one webhook, so the app can be called without HTTP."""
    import io

    env = {"REQUEST_METHOD": "POST", "PATH_INFO": PATH, "SCRIPT_NAME": "", "QUERY_STRING": "",
           "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
           "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
           "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
           "wsgi.run_once": False, "wsgi.version": (1, 0), "CONTENT_LENGTH": str(len(body)),
           "CONTENT_TYPE": headers["Content-Type"]}
    for key, value in headers.items():
        if key not in ("Content-Type", "Content-Length"):
            env["HTTP_" + key.upper().replace("-", "_")] = value
    return env


def _cpu_per_call(app, n: int, threads: int) -> float:
    """CPU seconds per webhook with ``threads`` threads calling the WSGI app directly."""
    envs = [_environ(b, h) for b, h in make_bodies(n)]
    cursor = itertools.count()
    failures: list[str] = []

    def start_response(status: str, headers: list, exc_info=None) -> None:
        if not status.startswith("200"):
            failures.append(status)

    def worker() -> None:
        while (i := next(cursor)) < n:
            b"".join(app(envs[i], start_response))

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    c0 = time.process_time()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if failures:
        raise RuntimeError(f"profile: {len(failures)} webhooks failed, first {failures[0]}")
    return (time.process_time() - c0) / n


def profile(n: int, rounds: int = 4) -> None:
    """Where a syncd webhook's CPU goes, without HTTP: the WSGI app called from
    ``WAITRESS_THREADS`` threads, with parts switched off one at a time. Each
    difference is what that part costs under concurrency (GIL hand-offs included),
    which is what limits the served rate; costs of the same steps called alone,
    one thread, are printed for comparison."""
    import logging

    from flask import Flask, jsonify, request

    from syncd.config import load_config
    from syncd.events import utcnow
    from syncd.journal.base import Recorded
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
        bare = Flask("baseline")

        @bare.post(PATH)
        def _bare():
            json.loads(request.get_data(cache=False))
            return jsonify({"status": "accepted"}), 200

        receiver_log = logging.getLogger("syncd.receiver")
        durable_record = rt.journal.events.record
        memory_ids = itertools.count(10**9)

        def memory_record(event):  # an in-memory stand-in for the journal: no SQLite, no fsync
            return Recorded(next(memory_ids), True)

        variants = {
            "syncd": (app, True, durable_record),
            "syncd, no log line": (app, False, durable_record),
            "syncd, in-memory journal": (app, True, memory_record),
            "syncd, neither": (app, False, memory_record),
            "baseline app": (bare, True, durable_record),
        }
        results: dict[str, list[float]] = {name: [] for name in variants}
        _cpu_per_call(app, 300, WAITRESS_THREADS)
        _cpu_per_call(bare, 300, WAITRESS_THREADS)
        for r in range(rounds):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                target, log_on, record = variants[name]
                receiver_log.disabled = not log_on
                rt.journal.events.record = record  # type: ignore[method-assign]
                results[name].append(_cpu_per_call(target, n, WAITRESS_THREADS))
        receiver_log.disabled = False
        rt.journal.events.record = durable_record  # type: ignore[method-assign]
        med = {name: statistics.median(v) * 1e6 for name, v in results.items()}
        print(f"\nin-process, {WAITRESS_THREADS} threads calling the WSGI app (no HTTP, no waitress), "
              f"{n} webhooks x {rounds} rounds, median CPU per webhook:")
        for name, us in med.items():
            print(f"  {name:<28}{us:>8.0f} us")
        print("  marginal costs under concurrency:")
        print(f"    durable journal write     {med['syncd'] - med['syncd, in-memory journal']:>8.0f} us")
        print(f"    log line                  {med['syncd'] - med['syncd, no log line']:>8.0f} us")
        print(f"    verify, parse, route, answer (beyond the baseline app) "
              f"{med['syncd, neither'] - med['baseline app']:>5.0f} us")

        # The same steps called alone, one thread.
        from werkzeug.datastructures import Headers

        src = rt.sources["apten"]
        steps = make_bodies(n)
        heads = [Headers(h) for _, h in steps]
        now = utcnow()
        events: list = [None] * n

        def parse(i: int) -> None:
            events[i] = src.parse(steps[i][0], now)

        table = [
            ("authenticate (HMAC)", lambda i: src.authenticate(steps[i][0], heads[i], {})),
            ("parse (pydantic, hash, E.164)", parse),
            ("router.unroutable_reason", lambda i: rt.router.unroutable_reason(
                events[i].external_lead_id, events[i].phone, events[i].phone_raw)),
            ("journal.record, one at a time", lambda i: rt.journal.events.record(events[i])),
            ("log line 'webhook accepted'", lambda i: receiver_log.info("webhook accepted", extra={
                "source": "apten", "event_id": i, "status": 200, "kind": "opt_out", "channel": "sms"})),
        ]
        print(f"\nthe same steps alone, one thread, {n} calls each:")
        print(f"  {'step':<34}{'CPU us':>8}{'wall us':>9}")
        for label, fn in table:
            c0, w0 = time.process_time(), time.perf_counter()
            for i in range(n):
                fn(i)
            print(f"  {label:<34}{(time.process_time() - c0) / n * 1e6:>8.1f}"
                  f"{(time.perf_counter() - w0) / n * 1e6:>9.1f}")
        rt.journal.close()
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
    ap.add_argument("--profile", action="store_true", help="also measure what each part of a webhook costs")
    ap.add_argument("--ceiling", action="store_true",
                    help="also run syncd with an in-memory journal: the most any durable journal can reach")
    ap.add_argument("--journal", metavar="URL", help="journal.url for syncd (default: a SQLite file)")
    ap.add_argument("--against", metavar="DIR", help="also serve syncd from this checkout (target syncd-ref)")
    ap.add_argument("--baseline-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--memory-journal-serve", metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        baseline_server(args.baseline_server)
        return
    if args.memory_journal_serve:
        memory_journal_serve(args.memory_journal_serve)
        return
    if args.quick:
        args.requests, args.rounds, args.warmup = 1000, 2, 200
    run(args)
    if args.profile:
        profile(1000 if args.quick else 3000)


if __name__ == "__main__":
    main()
