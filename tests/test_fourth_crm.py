"""A fourth CRM is one connector module, one mapping and one registry line.

``tinycrm`` below is such a CRM, built here and nowhere else: a small HTTP service
(a real server on a loopback port), a connector speaking to it with requests, and
its plugin. Registered for the test, it is configured, routed to by id, pushed to
over HTTP, polled by the reflector and checked by ``syncd check`` without any
change to syncd itself.
"""
from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from connectors.errors import AuthFailed, ConnectorError, NotFound, Permanent
from connectors.plugin import BuildContext, CrmPlugin, IdRule
from connectors.registry import CRM_PLUGINS
from connectors.settings import CrmSettings, OutboundUrl, Secret
from connectors.types import (ChangedRecord, FieldInfo, FoundRecord, Page, RecordRef, RecordUpdate, UpdateResult,
                              Watermark)
from syncd.config import ConfigError, parse_config
from syncd.events import ConsentEvent
from tests.support.stack import APTEN_SECRET

API_KEY = "tiny-api-key-0123456789"
FLAGS = ("sms_opt_out", "call_opt_out")


# --- the CRM: people with a phone and two flags, stamped in epoch seconds ---------------

class TinyCrm:
    def __init__(self) -> None:
        self.people: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []     # (method, path with query)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, record_id: str, phone: str, modified: int) -> None:
        self.people[record_id] = {"id": record_id, "phone": phone, "modified": modified,
                                  **{f: False for f in FLAGS}}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        crm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                crm.requests.append((self.command, self.path))
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    self._answer(401, {"error": "bad key"})
                    return False
                return True

            def do_GET(self) -> None:
                if not self._authorised():
                    return
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                if url.path == "/v1/fields":
                    self._answer(200, [{"name": n, "type": "boolean", "writable": True} for n in FLAGS]
                                 + [{"name": "phone", "type": "phone", "writable": True}])
                elif url.path == "/v1/people":
                    after = int(query.get("modified_after", ["0"])[0])
                    phone = query.get("phone", [None])[0]
                    found = sorted((p for p in crm.people.values()
                                    if p["modified"] > after and (phone is None or p["phone"] == phone)),
                                   key=lambda p: (p["modified"], p["id"]))
                    self._answer(200, {"people": found[:int(query.get("limit", ["100"])[0])]})
                else:
                    self._answer(404, {"error": "no such path"})

            def do_PATCH(self) -> None:
                if not self._authorised():
                    return
                m = re.fullmatch(r"/v1/people/(tc-[0-9]+)", self.path)
                person = crm.people.get(m.group(1)) if m else None
                if person is None:
                    self._answer(404, {"error": "no such person"})
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                person.update({k: v for k, v in body["fields"].items() if k in FLAGS})
                person["modified"] = int(time.time())
                self._answer(200, person)

        return Handler

    def __enter__(self) -> "TinyCrm":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the connector module: connector, settings model, plugin -----------------------------

TINY_ID = re.compile(r"^tc-[0-9]{1,12}\Z")


class TinyConnector:
    name = "tinycrm"

    def __init__(self, base_url: str, api_key: str, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.session.request(method, self.base_url + path, timeout=self.timeout, **kwargs)
        if resp.status_code == 401:
            raise AuthFailed("tinycrm refused the API key")
        if resp.status_code == 404:
            raise NotFound(resp.json().get("error", "not found"))
        if resp.status_code >= 400:
            raise Permanent(f"tinycrm answered {resp.status_code}")
        return resp.json()

    def update(self, updates: list[RecordUpdate]) -> list[UpdateResult]:
        results = []
        for upd in updates:
            try:
                if not TINY_ID.fullmatch(upd.ref.record_id):
                    raise Permanent("not a tinycrm id")
                self._call("PATCH", f"/v1/people/{upd.ref.record_id}", json={"fields": upd.fields})
                results.append(UpdateResult(upd.ref))
            except ConnectorError as exc:
                results.append(UpdateResult(upd.ref, exc))
        return results

    def find_by_phone(self, e164: str) -> list[RecordRef]:
        found = self._call("GET", "/v1/people", params={"phone": e164})["people"]
        return [RecordRef(self.name, "person", p["id"]) for p in found]

    def find(self, phones: list[str], emails: list[str]) -> list[FoundRecord]:
        # TinyCRM has no batch search and no emails: one lookup per phone
        return [FoundRecord(ref, phones=(phone,)) for phone in phones for ref in self.find_by_phone(phone)]

    def changed_since(self, mark: Watermark, fields: list[str], limit: int = 100) -> Page:
        found = self._call("GET", "/v1/people", params={"modified_after": mark.ts or "0", "limit": limit})["people"]
        records = [ChangedRecord(RecordRef(self.name, "person", p["id"]), {f: p.get(f) for f in fields},
                                 str(p["modified"])) for p in found]
        last = found[-1] if found else None
        next_mark = Watermark(str(last["modified"]), last["id"]) if last else mark
        return Page(records, next_mark, more=len(found) >= limit)

    def fields(self, obj: str) -> dict[str, FieldInfo]:
        return {f["name"]: FieldInfo(f["name"], f["type"], f["writable"]) for f in self._call("GET", "/v1/fields")}


class TinySettings(CrmSettings):
    base_url: OutboundUrl
    credential: Secret          # a key name syncd does not know as secret: the type says so
    mapping: str = "mappings/tinycrm.yaml"


def build(settings: TinySettings, ctx: BuildContext) -> TinyConnector:
    return TinyConnector(settings.base_url, settings.credential, ctx.timeout)


PLUGIN = CrmPlugin(name="tinycrm", title="TinyCRM", settings=TinySettings, build=build,
                   watermark=lambda t: str(int(t.timestamp())),
                   id_rules=(IdRule(TINY_ID.pattern, "person"),))

MAPPING = """\
objects:
  person:
    channels:
      sms: [sms_opt_out]
      call: [call_opt_out]
    values: {opt_out: true, opt_in: false}
reflect:
  fields: [sms_opt_out, call_opt_out]
  phone_fields: [phone]
"""


# --- the test ---------------------------------------------------------------------------

@pytest.fixture
def tiny():
    with TinyCrm() as crm:
        crm.add("tc-42", "+13305551234", modified=int(time.time()) - 3600)
        crm.add("tc-43", "+13305559876", modified=int(time.time()) - 3600)
        yield crm


def tiny_config(tmp_path, url: str, sinch: bool = True):
    (tmp_path / "mappings").mkdir(exist_ok=True)
    (tmp_path / "mappings" / "tinycrm.yaml").write_text(MAPPING)
    data: dict[str, Any] = {
        "journal": {"url": "sqlite:///syncd.db"},
        "sources": {"apten": {"secret": APTEN_SECRET}},
        "crm": {"tinycrm": {"base_url": url, "credential": API_KEY}},
        "retry": {"initial_backoff_seconds": 0.1, "max_backoff_seconds": 1},
    }
    if sinch:  # the reflector runs when Sinch is configured; this test never registers anything
        data["sinch"] = {"project_id": "p1", "app_id": "a1", "key_id": "k1", "key_secret": "s1"}
    return parse_config(data, base_dir=tmp_path, env={})


def test_an_unregistered_crm_is_an_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match=r"crm\.tinycrm: unknown key"):
        tiny_config(tmp_path, "http://127.0.0.1:1")


def test_a_fourth_crm_is_one_module_one_mapping_one_registry_line(tmp_path, tiny, monkeypatch):
    from syncd.check import run_check
    from syncd.runtime import open_runtime

    monkeypatch.setitem(CRM_PLUGINS, PLUGIN.name, PLUGIN)           # the registry line
    with pytest.raises(ConfigError, match=r"crm\.tinycrm\.credential: required key is missing"):
        parse_config({"crm": {"tinycrm": {"base_url": tiny.url}}}, env={})
    with pytest.raises(ConfigError, match=r"crm\.tinycrm\.base_url: must be an https:// URL"):
        parse_config({"crm": {"tinycrm": {"base_url": "http://tiny.example", "credential": "k"}}}, env={})
    assert run_check(tiny_config(tmp_path, tiny.url, sinch=False)) == []  # fields read over HTTP
    assert ("GET", "/v1/fields") in tiny.requests
    cfg = tiny_config(tmp_path, tiny.url)
    assert cfg.crm.enabled() == ["tinycrm"]
    assert API_KEY in cfg.secrets()                                   # masked in logs and errors

    rt = open_runtime(cfg)
    try:
        # routing: the plugin's id rule; other CRMs' ids are not routed (they are off)
        assert rt.router.route_id("tc-42") == RecordRef("tinycrm", "person", "tc-42")
        assert rt.router.route_id("tc-42/../x") is None
        assert rt.router.route_id("003XX000004DHPY") is None

        # pushing: an opt-out for tc-42 becomes a PATCH over HTTP
        at = datetime.now(timezone.utc) - timedelta(minutes=1)
        rt.journal.events.record(ConsentEvent(source="apten", source_event_id="e1", kind="opt_out", channel="sms",
                                              occurred_at=at, received_at=at, raw=b"{}", external_lead_id="tc-42"))
        stats = rt.tick()
        assert (stats.routed, stats.done, stats.dead) == (1, 1, 0)
        assert ("PATCH", "/v1/people/tc-42") in tiny.requests
        assert tiny.people["tc-42"]["sms_opt_out"] is True and tiny.people["tc-42"]["call_opt_out"] is False

        # reflecting: the first poll starts at the plugin's watermark (epoch seconds, a
        # little before now), so records changed an hour ago are not read ...
        assert rt.reflector is not None
        assert rt.reflector.poll_once() == {"tinycrm": 0}
        start, _ = rt.journal.ops.get_watermark("reflect:tinycrm")
        assert start is not None and start.isdigit() and abs(int(start) - time.time()) < 600
        # ... and the next poll reads what changed since: tc-42's push and an admin's edit
        tiny.people["tc-43"].update(call_opt_out=True, modified=int(time.time()))
        assert rt.reflector.poll_once() == {"tinycrm": 2}
        polls = [path for method, path in tiny.requests if path.startswith("/v1/people?")]
        assert polls and all("modified_after=" in p for p in polls)
        queued = rt.journal.reflections.claim(10, lease_seconds=60)
        assert sorted((r.ref.record_id, r.phone, r.kind) for r in queued) == [
            ("tc-42", "+13305551234", "opt_out"), ("tc-43", "+13305559876", "opt_out")]
    finally:
        rt.journal.close()


def test_a_new_crms_narrow_ids_are_tried_before_salesforces_broad_pattern(monkeypatch):
    """Salesforce's 15/18 alphanumerics also match other CRMs' ids: a plugin's narrow
    rule wins wherever it sits in the registry, and config rules still come first."""
    from connectors.salesforce import to_18
    from syncd.routing import Router

    narrow = CrmPlugin(name="tinycrm", title="TinyCRM", settings=TinySettings, build=build,
                       watermark=lambda t: str(int(t.timestamp())),
                       id_rules=(IdRule(r"^TC[0-9]{13}\Z", "person"),))
    monkeypatch.setitem(CRM_PLUGINS, narrow.name, narrow)
    crm = {"salesforce": {"instance_url": "https://x.example", "auth": {"flow": "access_token", "access_token": "t"}},
           "tinycrm": {"base_url": "https://tiny.example", "credential": "k"}}
    router = Router.from_config(parse_config({"crm": crm}, env={}))
    assert router.route_id("TC0000000000042") == RecordRef("tinycrm", "person", "TC0000000000042")
    assert router.route_id("003XX000004DHPY") == RecordRef("salesforce", "Contact", "003XX000004DHPYYA4")
    rules = [{"pattern": r"^TC[0-9]{13}$", "crm": "salesforce", "object": "Contact"}]
    router = Router.from_config(parse_config({"crm": crm, "routing": {"rules": rules}}, env={}))
    assert router.route_id("TC0000000000042") == RecordRef("salesforce", "Contact", to_18("TC0000000000042"))
