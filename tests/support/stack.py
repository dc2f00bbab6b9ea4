"""The demo's sandbox stack (``syncd.stack``) with what only tests need: signed Sinch
webhooks and ``kill -9`` of the daemon."""
from __future__ import annotations

import time
import uuid

import requests

from syncd.stack import (ALL_CRMS, APTEN_SECRET, HUBSPOT_SUBSCRIPTION, LOX24_TOKEN, SINCH_SECRET,  # noqa: F401
                         DaemonProcess, default_mapping_text, free_port, seed_close, seed_hubspot, seed_salesforce,
                         wait_for)
from syncd.stack import Stack as DemoStack


class Daemon(DaemonProcess):
    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Stack(DemoStack):
    def serve(self, log_name: str = "serve.log") -> Daemon:
        return Daemon.start(self.config_path, self.workdir / log_name, self.url, cwd=self.workdir)

    def post_sinch(self, body: bytes, secret: str = SINCH_SECRET, timeout: float = 10) -> requests.Response:
        from connectors.sinch_signing import signature_headers

        headers = signature_headers(secret, body, uuid.uuid4().hex, str(int(time.time())))
        return requests.post(f"{self.url}/webhooks/sinch", data=body, timeout=timeout,
                             headers={"Content-Type": "application/json", **headers})
