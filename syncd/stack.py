"""A whole syncd installation on one machine, against the sandbox CRMs.

Used by ``syncd demo`` (and, extended in ``tests/support``, by the tests and the
benchmarks): starts the simulators, writes a config next to a fresh SQLite journal,
runs ``syncd serve`` as a real subprocess and signs webhooks the way each platform does.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import requests
import yaml

from syncd.config import DEMO_ENV, DEMO_SECRETS

# Published with the source: a config carrying them works only under this stack (DEMO_ENV).
APTEN_SECRET = DEMO_SECRETS["apten"]
LOX24_TOKEN = DEMO_SECRETS["lox24"]
SINCH_SECRET = DEMO_SECRETS["sinch"]
API_TOKEN = DEMO_SECRETS["api"]
HUBSPOT_SUBSCRIPTION = "1001"  # the sandbox's "Marketing Information" subscription type
ALL_CRMS = ("salesforce", "hubspot", "close")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_mapping_text(crm: str) -> str:
    return resources.files("syncd.defaults").joinpath(f"{crm}.yaml").read_text(encoding="utf-8")


@dataclass
class Stack:
    """Sandboxes + a config directory. ``crms`` picks which simulators run."""

    crms: tuple[str, ...] = ("salesforce",)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="syncd-stack-")))
    push_interval: float = 0.2
    retry: dict[str, Any] = field(default_factory=dict)
    sandboxes: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    admin_port: int = 0
    journal_url: str | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)
    sinch: bool = False
    poll_interval: float = 1.0

    def start(self) -> "Stack":
        # This process and its children run the demo stack: its published secrets are accepted.
        os.environ[DEMO_ENV] = "1"
        if "salesforce" in self.crms:
            from connectors.sandbox.salesforce import SalesforceSandbox

            sf = SalesforceSandbox()
            seed_salesforce(sf)
            self.sandboxes["salesforce"] = sf.start()
        if "hubspot" in self.crms:
            from connectors.sandbox.hubspot import HubSpotSandbox

            hs = HubSpotSandbox()
            seed_hubspot(hs)
            self.sandboxes["hubspot"] = hs.start()
        if "close" in self.crms:
            from connectors.sandbox.close import CloseSandbox

            cl = CloseSandbox()
            seed_close(cl)
            self.sandboxes["close"] = cl.start()
        self.port = self.port or free_port()
        self.admin_port = self.admin_port or free_port()
        if self.sinch:
            from connectors.sandbox.sinch import SinchSandbox

            self.sandboxes["sinch"] = SinchSandbox(callback_url=f"{self.url}/webhooks/sinch",
                                                   callback_secret=SINCH_SECRET).start()
        self.write_config()
        return self

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yaml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        """The admin listener: /metrics, /readyz, /status."""
        return f"http://127.0.0.1:{self.admin_port}"

    def config(self) -> dict[str, Any]:
        crm: dict[str, Any] = {}
        ca_bundle = None
        if "salesforce" in self.sandboxes:
            sf = self.sandboxes["salesforce"]
            ca_bundle = sf.tls.ca_bundle
            crm["salesforce"] = {
                "instance_url": sf.url, "api_version": "62.0",
                "auth": {"flow": "client_credentials", "login_url": sf.url,
                         "client_id": sf.client_id, "client_secret": sf.client_secret},
                "mapping": "mappings/salesforce.yaml",
            }
        if "hubspot" in self.sandboxes:
            hs = self.sandboxes["hubspot"]
            crm["hubspot"] = {"base_url": hs.url, "access_token": hs.token, "mapping": "mappings/hubspot.yaml"}
        if "close" in self.sandboxes:
            cl = self.sandboxes["close"]
            crm["close"] = {"base_url": f"{cl.url}/api/v1", "api_key": cl.api_key, "mapping": "mappings/close.yaml"}
        cfg: dict[str, Any] = {
            "journal": {"url": self.journal_url or "sqlite:///syncd.db"},
            "receiver": {"host": "127.0.0.1", "port": self.port},
            "admin": {"host": "127.0.0.1", "port": self.admin_port},
            "http": {"timeout_seconds": 10, "ca_bundle": ca_bundle},
            "phone": {"default_region": "US"},
            "sources": {"apten": {"secret": APTEN_SECRET}, "lox24": {"token": LOX24_TOKEN},
                        "sinch": {"secret": SINCH_SECRET}},
            "crm": crm,
            "schedule": {"push_interval_seconds": self.push_interval,
                         "poll_interval_seconds": self.poll_interval},
            "retry": {"max_attempts": 15, "max_age_hours": 72, "initial_backoff_seconds": 0.2,
                      "max_backoff_seconds": 2, **self.retry},
            "logging": {"level": "INFO", "format": "json"},
        }
        if "sinch" in self.sandboxes:
            sn = self.sandboxes["sinch"]
            cfg["sinch"] = {"base_url": sn.url, "auth_url": f"{sn.url}/oauth2/token", "project_id": sn.project_id,
                            "app_id": sn.app_id, "key_id": sn.key_id, "key_secret": sn.key_secret,
                            "channels": ["WHATSAPP"], "notification_timeout_seconds": 30}
        for key, value in self.extra_config.items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        return cfg

    def write_config(self) -> None:
        (self.workdir / "mappings").mkdir(parents=True, exist_ok=True)
        for crm in self.crms:
            target = self.workdir / "mappings" / f"{crm}.yaml"
            if not target.exists():
                text = default_mapping_text(crm).replace("${HUBSPOT_EMAIL_SUBSCRIPTION_ID:-}",
                                                         HUBSPOT_SUBSCRIPTION)
                target.write_text(text, encoding="utf-8")
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False), encoding="utf-8")

    def stop(self) -> None:
        for sb in self.sandboxes.values():
            sb.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- the daemon as a real process ------------------------------------------------
    def syncd(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "syncd.cli", "-c", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=timeout, cwd=self.workdir,
                              env={**os.environ, DEMO_ENV: "1", **(env or {})})

    def serve(self, log_name: str = "serve.log") -> "DaemonProcess":
        return DaemonProcess.start(self.config_path, self.workdir / log_name, self.url, cwd=self.workdir)

    # --- webhooks --------------------------------------------------------------------
    def post_apten(self, body: bytes, secret: str = APTEN_SECRET, timeout: float = 10) -> requests.Response:
        from syncd.sources.apten import SIGNATURE_HEADER, sign

        return requests.post(f"{self.url}/webhooks/apten", data=body, timeout=timeout,
                             headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body)})

    def post_lox24(self, body: bytes, token: str = LOX24_TOKEN, timeout: float = 10) -> requests.Response:
        return requests.post(f"{self.url}/webhooks/lox24", data=body, timeout=timeout,
                             headers={"Content-Type": "application/json", "X-LOX24-Token": token})


def seed_salesforce(sf: Any) -> None:
    """The records the seed documents talk about."""
    consent = {"HasOptedOutOfEmail": False, "DoNotCall": False, "SMS_Opt_Out__c": False,
               "WhatsApp_Opt_Out__c": False}
    sf.add_record("Contact", "003XX000004DHPYYA4", FirstName="Dana", LastName="Reyes",
                  Email="dana.reyes@example.com", Phone="+13305551234", **consent)
    sf.add_record("Lead", "00QXX000001LOX22AO", FirstName="Jonas", LastName="Berg",
                  Company="Example GmbH", MobilePhone="+4911113333444", **consent)


def seed_hubspot(hs: Any) -> None:
    hs.add_contact("51", firstname="Ana", lastname="Silva", email="ana.silva@example.com",
                   phone="+13305550151", sms_opt_out="false", call_opt_out="false", whatsapp_opt_out="false")


def seed_duplicate(hs: Any) -> str:
    """``syncd demo``'s duplicate: the Salesforce Contact's person again, as a HubSpot
    contact with the same phone written another way. Not in :func:`seed_hubspot`: a
    second record with that phone would change what phone lookups find in other uses."""
    return hs.add_contact(DUPLICATE_CONTACT, firstname="Dana", lastname="Reyes", email="dana.reyes@example.com",
                          phone="+1 330-555-1234", sms_opt_out="false", call_opt_out="false",
                          whatsapp_opt_out="false")


DUPLICATE_CONTACT = "52"


def seed_close(cl: Any) -> None:
    cl.add_lead("lead_abc123", name="Example Ltd")
    cl.add_contact("cont_abc123", "lead_abc123", name="Sam Okafor", phones=["+13305550177"],
                   emails=["sam.okafor@example.com"])


@dataclass
class DaemonProcess:
    proc: subprocess.Popen
    log_path: Path
    url: str

    @classmethod
    def start(cls, config_path: Path, log_path: Path, url: str, cwd: Path, wait: float = 30) -> "DaemonProcess":
        log = open(log_path, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "syncd.cli", "-c", str(config_path), "serve"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, DEMO_ENV: "1"})
        log.close()
        daemon = cls(proc, log_path, url)
        daemon.wait_ready(wait)
        return daemon

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"syncd serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"syncd serve did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    def terminate(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def wait_for(predicate, timeout: float = 20, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
