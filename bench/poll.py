#!/usr/bin/env python
"""The reflector's poll cost: requests per steady-state poll vs. CRM size and changes.

For each CRM size (10, 1,000, 10,000 quiet Salesforce Contacts, all flagged
DoNotCall, last modified an hour ago) an in-process runtime with the Sinch sandbox
configured polls once (the first poll only sets the watermark), once more with
nothing changed, and then once after each of 3, 30 and 300 new flagged Contacts
(created 10 s before the poll, past the connector's 5 s settle window; the org's
clock is moved with ``sf.advance``, as in tests/test_reflector.py). The requests
counted are the SOQL calls in the Salesforce simulator's log (``/query`` and
``queryMore``); the reflector reads at most 200 records a page.

The figure is the ratio to the smallest CRM: requests at size N / requests at size
10. It should be 1.0 across a row (cost follows changes, not CRM size) and grow
with the number of changes (one page per 200). Wall time is shown too, but the
simulator scans all records for every query (a real org uses the SystemModstamp
index), so it grows with size for reasons that are not syncd's.

    python bench/poll.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import time

CHANGES = (0, 3, 30, 300)


def measure(size: int, changes: tuple[int, ...]) -> dict[int, tuple[int, int, float]]:
    """{changes: (requests, queued, seconds)} for one CRM size."""
    from syncd.config import load_config
    from syncd.logs import setup_logging
    from syncd.runtime import open_runtime
    from syncd.stack import Stack

    st = Stack(sinch=True).start()
    devnull = open(os.devnull, "w")
    setup_logging("WARNING", "json", stream=devnull)
    out: dict[int, tuple[int, int, float]] = {}
    try:
        sf = st.sandboxes["salesforce"]
        sf.advance(-3600)                       # the quiet records were last touched an hour ago
        for i in range(size):
            sf.add_record("Contact", None, LastName=f"Q{i}", MobilePhone=f"+1330556{i:04d}", DoNotCall=True)
        sf.advance(3600)
        rt = open_runtime(load_config(st.config_path, env={}))
        rt.reflector.poll_once()                # first run: the watermark starts at "now"
        sf.advance(10)
        rt.reflector.poll_once()                # warm: the connector fetches its token here
        serial = 0
        for n in changes:
            if n:
                sf.advance(10)
                for _ in range(n):
                    sf.add_record("Contact", None, LastName=f"N{serial}", MobilePhone=f"+1330557{serial:04d}",
                                  DoNotCall=True)
                    serial += 1
            sf.advance(10)                      # past the poller's settle window
            sf.clear_log()
            t0 = time.perf_counter()
            queued = rt.reflector.poll_once().get("salesforce", 0)
            seconds = time.perf_counter() - t0
            calls = len([r for r in sf.requests if "/query" in r.path])
            out[n] = (calls, queued, seconds)
        rt.journal.close()
    finally:
        st.cleanup()
        devnull.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="sizes 10 and 1,000 only")
    args = ap.parse_args()
    sizes = (10, 1000) if args.quick else (10, 1000, 10_000)
    print(f"poll: Salesforce sandbox, Contacts flagged DoNotCall; sizes {', '.join(map(str, sizes))} quiet "
          f"records; changes {', '.join(map(str, CHANGES))} per poll; reflector page limit 200")
    table: dict[int, dict[int, tuple[int, int, float]]] = {}
    for size in sizes:
        table[size] = measure(size, CHANGES)
        print(f"  size {size}: " + ", ".join(f"{c} changes -> {v[0]} requests" for c, v in table[size].items()),
              flush=True)

    def grid(title: str, cell) -> None:
        """One table: a row per CRM size, a column per number of changes."""
        print()
        print(title)
        print(f"{'size':>8}" + "".join(f"{f'{c} changes':>16}" for c in CHANGES))
        for size in sizes:
            print(f"{size:>8}" + "".join(f"{cell(size, c):>16}" for c in CHANGES))

    grid("SOQL requests per steady-state poll (queued reflections in brackets)",
         lambda s, c: f"{table[s][c][0]} [{table[s][c][1]}]")
    grid("ratio: requests at size N / requests at size 10 (flat = 1.00)",
         lambda s, c: f"{table[s][c][0] / table[sizes[0]][c][0]:.2f}")
    grid("ratio: requests with k changes / requests with 3 changes (per size)",
         lambda s, c: f"{table[s][c][0] / table[s][3][0]:.2f}")
    grid("wall ms per poll (grows with size only because the simulator scans every record per query)",
         lambda s, c: f"{table[s][c][2] * 1000:.1f}")
    flat = all(table[s][c][0] == table[sizes[0]][c][0] for s in sizes for c in CHANGES)
    right = all(table[s][c][1] == c for s in sizes for c in CHANGES)
    print()
    print(f"flat in CRM size: {'PASS' if flat else 'FAIL'}; every change queued exactly once: "
          f"{'PASS' if right else 'FAIL'}")


if __name__ == "__main__":
    main()
