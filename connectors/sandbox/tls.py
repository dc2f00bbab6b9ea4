"""A throwaway certificate authority for the HTTPS simulators (trustme)."""
from __future__ import annotations

import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class SandboxTLS:
    ca: trustme.CA
    cert: trustme.LeafCert
    ca_bundle: str  # path of the CA's PEM file: what clients pass as ca_bundle

    @classmethod
    def create(cls, directory: str | Path | None = None) -> "SandboxTLS":
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        directory = Path(directory or tempfile.mkdtemp(prefix="syncd-sandbox-ca-"))
        directory.mkdir(parents=True, exist_ok=True)
        bundle = directory / "sandbox-ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        return cls(ca=ca, cert=cert, ca_bundle=str(bundle))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(ctx)
        return ctx
