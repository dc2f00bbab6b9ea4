"""A throwaway certificate authority for the HTTPS simulators (trustme)."""
from __future__ import annotations

import shutil
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
    temp_dir: str | None = None  # created here, removed by cleanup()

    @classmethod
    def create(cls, directory: str | Path | None = None) -> "SandboxTLS":
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        temp_dir = None if directory else tempfile.mkdtemp(prefix="syncd-sandbox-ca-")
        folder = Path(directory or temp_dir)  # type: ignore[arg-type]
        folder.mkdir(parents=True, exist_ok=True)
        bundle = folder / "sandbox-ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        return cls(ca=ca, cert=cert, ca_bundle=str(bundle), temp_dir=temp_dir)

    def cleanup(self) -> None:
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(ctx)
        return ctx
