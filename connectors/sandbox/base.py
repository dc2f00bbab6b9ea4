"""Shared machinery for the sandbox simulators: serving, request log, fault injection."""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, request
from werkzeug.serving import BaseWSGIServer, make_server

from connectors.sandbox.tls import SandboxTLS


@dataclass
class Fault:
    """Answer the next ``times`` requests matching method + path regex with this response
    instead of the simulator's own. ``delay`` stalls before answering (seconds)."""

    method: str
    path: str
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1
    delay: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and re.search(self.path, path) is not None


@dataclass
class LoggedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class Sandbox:
    """Base class: subclasses implement ``routes(app)`` and keep their own state."""

    name = "sandbox"
    https = False

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.requests: list[LoggedRequest] = []
        self.faults: list[Fault] = []
        self.stall = threading.Event()  # set() => every API request waits until cleared
        self.stall.clear()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.tls: SandboxTLS | None = None
        self.app = self._build_app()

    # --- to be provided by simulators -------------------------------------------------
    def routes(self, app: Flask) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- app --------------------------------------------------------------------------
    def _build_app(self) -> Flask:
        app = Flask(f"sandbox-{self.name}")
        app.config["MAX_CONTENT_LENGTH"] = 64 * 1024 * 1024
        # A path parameter may hold an encoded "/" (an email's local part may: "a/b@x.io");
        # Werkzeug would fold the decoded "//" and answer a 308 redirect no vendor sends.
        app.url_map.merge_slashes = False

        @app.before_request
        def _log_and_fault():
            with self.lock:
                self.requests.append(LoggedRequest(
                    method=request.method, path=request.path,
                    query={k: request.args.getlist(k) for k in request.args},
                    headers=dict(request.headers), body=request.get_data(), at=time.time()))
                fault = next((f for f in self.faults if f.matches(request.method, request.path)), None)
                if fault is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
            while self.stall.is_set():
                time.sleep(0.02)
            if fault is not None:
                if fault.delay:
                    time.sleep(fault.delay)
                body = fault.body if isinstance(fault.body, (str, bytes)) else json.dumps(fault.body)
                return Response(body, status=fault.status, headers=fault.headers,
                                content_type=fault.headers.get("Content-Type", "application/json"))
            return None

        self.routes(app)
        return app

    # --- test helpers -----------------------------------------------------------------
    def add_fault(self, method: str, path: str, status: int, body: Any = None,
                  headers: dict[str, str] | None = None, times: int = 1, delay: float = 0.0) -> Fault:
        fault = Fault(method, path, status, body, headers or {}, times, delay)
        with self.lock:
            self.faults.append(fault)
        return fault

    def requests_to(self, path_regex: str, method: str | None = None) -> list[LoggedRequest]:
        with self.lock:
            return [r for r in self.requests
                    if re.search(path_regex, r.path) and (method is None or r.method == method)]

    def clear_log(self) -> None:
        with self.lock:
            self.requests.clear()

    # --- serving ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "sandbox not started"
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_port}"

    def start(self, port: int = 0, tls: SandboxTLS | None = None) -> "Sandbox":
        self._own_tls = self.https and tls is None
        if self._own_tls:
            tls = SandboxTLS.create()
        self.tls = tls
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request access log
        ssl_context = tls.server_context() if tls else None
        self._server = make_server("127.0.0.1", port, self.app, threaded=True,
                                   ssl_context=ssl_context)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"sandbox-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stall.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.tls is not None and getattr(self, "_own_tls", False):
            self.tls.cleanup()  # the throwaway CA's folder

    def __enter__(self) -> "Sandbox":
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
