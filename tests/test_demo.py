"""``syncd demo --keep`` as a real process: SIGTERM stops its ``serve`` child and
removes its folders (as Ctrl-C does)."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_keep_cleans_up_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "syncd.cli", "demo", "--keep"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    seen: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while not any(x.startswith("serving webhooks on") for x in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            try:
                seen.append(lines.get(timeout=1).strip())
            except queue.Empty:
                pass
        text = "\n".join(seen)
        workdir = Path(re.search(r"^config\s+(\S+)", text, re.M).group(1)).parent
        ca_dir = Path(re.search(r"throwaway CA (\S+)\)", text).group(1)).parent
        serve_pid = int(re.search(r"^syncd serve\s+\S+\s+pid (\d+)", text, re.M).group(1))
        assert workdir.is_dir() and ca_dir.is_dir() and _alive(serve_pid)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not workdir.exists() and not ca_dir.exists()
    deadline = time.monotonic() + 10
    while _alive(serve_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(serve_pid)


def test_demo_checks_consent_before_and_after_the_opt_out_and_reports_the_duplicate():
    """The demo asks the consent API about the sms example's phone before the opt-out
    (unknown, allowed) and after it (opted out, not allowed), and says how many of the
    records carrying that phone (a Salesforce Contact and its HubSpot duplicate) it reached."""
    done = subprocess.run([sys.executable, "-m", "syncd.cli", "demo"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [x.strip() for x in done.stdout.splitlines()]
    first_post = next(i for i, x in enumerate(lines) if x.startswith("POST /webhooks/"))
    before = lines.index("consent check +1 330 555 1234 sms: allowed (unknown)")
    assert before < first_post
    (after,) = [x for x in lines[first_post:] if x.startswith("consent check +1 330 555 1234 sms:")]
    assert re.fullmatch(r"consent check \+1 330 555 1234 sms: allowed \(unknown\) -> not allowed "
                        r"\(opted_out since 2024-02-18T09:45:22(\.0+)?Z, source apten\)", after), after
    assert any(x.startswith("HubSpot contact 52: the same person as Salesforce Contact 003XX000004DHPYYA4")
               for x in lines[:first_post])
    (reached,) = [x for x in lines if x.startswith("the sms opt-out for +1 330 555 1234 reached")]
    assert re.match(r"the sms opt-out for \+1 330 555 1234 reached 2 of the 2 records with that phone: "
                    r"Salesforce Contact 003XX000004DHPYYA4, HubSpot contact 52$", reached), reached
