"""``syncd send-test``: each source's documented example, signed with the configured
secret, accepted by a real running receiver."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from syncd.send_test import EXAMPLES, example
from tests.support.stack import APTEN_SECRET, LOX24_TOKEN, SINCH_SECRET, Stack
from tests.conftest import fixture_bytes


def test_examples_are_the_published_ones():
    assert json.loads(EXAMPLES["apten"]) == json.loads(fixture_bytes("apten_optout_sms.json"))
    assert json.loads(EXAMPLES["lox24"]) == json.loads(fixture_bytes("lox24_phone_unsubscribe.json"))
    assert json.loads(EXAMPLES["sinch"]) == json.loads(fixture_bytes("sinch_opt_out_notification.json"))
    with pytest.raises(ValueError, match="--record: lox24 payloads carry no CRM record id"):
        example("lox24", record="003X")


def test_send_test_posts_each_source_signed_to_the_running_receiver():
    st = Stack(crms=("salesforce",)).start()
    try:
        down = st.syncd("send-test", "apten")
        assert down.returncode == 2
        assert down.stderr.strip() == (f"syncd: cannot reach the receiver at {st.url}: connection refused "
                                       "(is syncd serve running?)")
        daemon = st.serve()
        try:
            for source in ("apten", "lox24", "sinch"):
                run = st.syncd("send-test", source)
                assert run.returncode == 0, run.stdout + run.stderr
                assert run.stdout.startswith(f"POST {st.url}/webhooks/{source} -> 200 ")
            run = st.syncd("send-test", "apten", "--record", "003XX000004DHPYYA4", "--phone", "+13305550000",
                           "--json")
            doc = json.loads(run.stdout)
            assert run.returncode == 0 and doc["status"] == 200 and doc["answer"]["status"] == "accepted"
            assert json.loads(st.syncd("status", "--json").stdout)["events"]["received"] == 4
            wrong = st.syncd("send-test", "lox24", "--record", "x")
            assert wrong.returncode == 2 and "carry no CRM record id" in wrong.stderr
            _readme_curl_lines_are_accepted(st)
        finally:
            assert daemon.terminate() == 0
    finally:
        st.cleanup()


def _readme_curl_lines_are_accepted(st: Stack) -> None:
    """The README's hand-signed curl line per source, run as written (bash, openssl, curl)."""
    if not (shutil.which("curl") and shutil.which("openssl")):
        pytest.skip("curl or openssl not installed")
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("Trying a webhook by hand", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    lines = [x for x in block.splitlines() if x.strip() and not x.startswith("#")]
    assert len(lines) == 3
    env = {"PATH": "/usr/bin:/bin", "APTEN_WEBHOOK_SECRET": APTEN_SECRET, "LOX24_WEBHOOK_TOKEN": LOX24_TOKEN,
           "SINCH_WEBHOOK_SECRET": SINCH_SECRET}
    for line in lines:
        line = line.replace("http://127.0.0.1:8080", st.url)
        run = subprocess.run(["bash", "-c", line + " -w ' HTTP %{http_code}'"], capture_output=True, text=True,
                             cwd=Path(__file__).parent / "fixtures", env=env, timeout=30)
        assert re.search(r"HTTP 200$", run.stdout), (line, run.stdout, run.stderr)
