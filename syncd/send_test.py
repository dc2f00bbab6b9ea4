"""``syncd send-test SOURCE``: post a source's documented example, signed with the
configured secret, to the running receiver - the hand-made webhook an admin would
otherwise build with curl (the README shows the same as one curl line per source).

Examples: Apten's published ``optOut`` (sms), LOX24's published ``phone.unsubscribe``
(both byte for byte, as in ``syncd demo``) and Sinch's published opt-out notification
(Conversation API "Opt-in & Opt-out" page). Signatures: Apten, hex HMAC-SHA256 of the
raw body in ``X-Signature-SHA256``; LOX24, the shared token in ``X-LOX24-Token``; Sinch,
base64 HMAC-SHA256 of ``body.nonce.timestamp`` with its nonce, timestamp and algorithm
headers (:mod:`connectors.sinch_signing`).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import requests

from syncd.config import Config, ConfigError
from syncd.demo import APTEN_SMS, LOX24_EXAMPLE

SINCH_EXAMPLE = b"""{
  "contact_id": "{{CONTACT_ID}}",
  "channel": "WHATSAPP",
  "identity": "46712312312",
  "status": "OPT_OUT_SUCCEEDED"
}
"""
EXAMPLES = {"apten": APTEN_SMS, "lox24": LOX24_EXAMPLE, "sinch": SINCH_EXAMPLE}


@dataclass
class Answer:
    url: str
    status: int
    body: str


def example(source: str, phone: str | None = None, record: str | None = None) -> bytes:
    """The documented example; with ``phone`` / ``record`` swapped in (then re-serialised)."""
    body = EXAMPLES[source]
    if record is not None and source != "apten":
        raise ValueError(f"--record: {source} payloads carry no CRM record id (they are routed by phone)")
    if phone is None and record is None:
        return body
    doc = json.loads(body)
    if source == "sinch":
        doc["identity"] = phone.lstrip("+") if phone else doc["identity"]
    else:
        if phone is not None:
            doc["data"]["phone"] = phone
        if record is not None:
            doc["data"]["externalLeadId"] = record
    return json.dumps(doc, ensure_ascii=False, indent=2).encode("utf-8")


def signed_headers(cfg: Config, source: str, body: bytes) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    src = getattr(cfg.sources, source)
    if src is None:
        raise ConfigError(f"sources.{source}: not configured, so the receiver has no /webhooks/{source}")
    if source == "apten":
        from syncd.sources.apten import SIGNATURE_HEADER, sign

        headers[SIGNATURE_HEADER] = sign(src.secret, body)
    elif source == "lox24":
        from syncd.sources.lox24 import TOKEN_HEADER

        headers[TOKEN_HEADER] = src.token
    else:
        from connectors.sinch_signing import signature_headers

        headers.update(signature_headers(src.secret, body, uuid.uuid4().hex, str(int(time.time()))))
    return headers


def receiver_url(cfg: Config) -> str:
    host = cfg.receiver.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.receiver.port}"


def send(cfg: Config, source: str, phone: str | None = None, record: str | None = None,
         base_url: str | None = None, timeout: float = 15.0) -> Answer:
    body = example(source, phone, record)
    url = f"{(base_url or receiver_url(cfg)).rstrip('/')}/webhooks/{source}"
    resp = requests.post(url, data=body, headers=signed_headers(cfg, source, body), timeout=timeout)
    return Answer(url=url, status=resp.status_code, body=resp.text.strip())
