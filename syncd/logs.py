"""Logging: JSON lines (default) or readable text, masked everywhere.

Masking covers everything that can carry outside text: the message, every
``extra`` field and exception text (raised by client libraries) in JSON lines;
the whole line in text format. Lines are formatted on the caller's thread and
written by one background thread (see ``BackgroundStreamHandler``).
"""
from __future__ import annotations

import collections
import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

from connectors.registry import CRM_PLUGINS
from syncd.masking import mask_text

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# One encoder for every line (json.dumps with options builds a new one per call).
_encode = json.JSONEncoder(default=str, ensure_ascii=False).encode


def _masked(value: Any) -> Any:
    """A log field with personal data and secrets masked; numbers pass as they are."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return mask_text(value)
    text = mask_text(json.dumps(value, default=str, ensure_ascii=False))
    try:
        return json.loads(text)
    except ValueError:
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Only the parts that can carry outside text (the
    message, ``extra`` values, exception text) are masked, not the whole line:
    this runs once per webhook, so the encoder and each second's timestamp text
    are made once, not per line."""

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")   # replaced whole: threads never see half of it

    def _timestamp(self, created: float) -> str:
        """``created`` as ISO 8601 UTC to the millisecond (``2026-12-03T12:00:00.123+00:00``)."""
        second = int(created)
        micros = round((created - second) * 1e6)     # rounded as datetime.fromtimestamp rounds
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, datetime.fromtimestamp(second, timezone.utc)
                                     .strftime("%Y-%m-%dT%H:%M:%S"))
        return f"{cached[1]}.{micros // 1000:03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": mask_text(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = _masked(value)
        if record.exc_info:
            doc["exc"] = mask_text(self.formatException(record.exc_info))
        return _encode(doc)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return mask_text(line)


class BackgroundStreamHandler(logging.Handler):
    """Format on the caller's thread, write from one background thread, many lines per write.

    Why: the receiver logs a line per webhook from up to ``receiver.threads``
    threads. A plain ``StreamHandler`` takes a lock and makes a write system call
    per line, each a hand-off between threads: under 16 concurrent clients the
    receiver's CPU per webhook fell from ~1,000 to ~780 us with this handler
    (bench/ingest.py). Here a line is appended to a deque (atomic,
    no lock) and the writer is woken only when it is idle. ``flush()`` (called
    by ``logging.shutdown`` at exit and on SIGTERM) writes everything queued, so
    only a hard kill can lose the last few milliseconds of lines; the journal,
    not the log, is the record of what was received.
    """

    # Lines queued beyond this are written by the logging thread itself: if stderr
    # stalls (a full pipe nobody reads), callers slow down instead of memory growing.
    MAX_QUEUED = 10_000

    def __init__(self, stream, min_interval: float = 0.02) -> None:
        super().__init__()
        self.min_interval = min_interval
        self.stream = stream
        self._lines: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._closed = False
        self._writer = threading.Thread(target=self._run, name="syncd-log-writer", daemon=True)
        self._writer.start()

    def handle(self, record: logging.LogRecord) -> bool:  # no handler lock: emit is thread-safe
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
            return
        if len(self._lines) > self.MAX_QUEUED:
            self.flush()
        elif not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            self.flush()
            # At most ~50 writes a second: under load, lines gather into one write
            # instead of waking this thread (a thread hand-off) once per line.
            time.sleep(self.min_interval)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # the writer and flush() at exit take turns
            if not self._lines:
                return
            chunk = []
            while self._lines:
                chunk.append(self._lines.popleft())
            try:
                self.stream.write("".join(chunk))
                self.stream.flush()
            except (OSError, ValueError):  # stderr closed or a broken pipe: nowhere left to report it
                pass

    def close(self) -> None:
        """Write what is queued and let the writer thread end. No join: ``logging.shutdown``
        calls this holding the handler's lock, which the writer thread's own flush waits
        for, so a join only timed out (it held every ``syncd`` exit up by 2 s). The lock
        orders the two flushes; the writer finds nothing left and ends."""
        self._closed = True
        self._wake.set()
        self.flush()
        super().close()


_settings = ("INFO", "json")


def current_settings() -> tuple[str, str]:
    """The level and format :func:`setup_logging` last applied (a child process logs alike)."""
    return _settings


def setup_logging(level: str = "INFO", fmt: str = "json", stream=None) -> None:
    global _settings
    _settings = (str(level), fmt)
    # The formatters use none of these; skipping them saves work on every log call.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup (documented in the logging HOWTO, "Optimization")
    handler = BackgroundStreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, BackgroundStreamHandler):
            old.close()
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries log full URLs and payloads at DEBUG; keep them quiet unless asked.
    clients = [name for plugin in CRM_PLUGINS.values() for name in plugin.client_loggers]
    for noisy in ("urllib3", "waitress", "apscheduler", "werkzeug", *clients):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.WARNING))
    # waitress warns on every request queued behind busy threads: normal under a burst.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
