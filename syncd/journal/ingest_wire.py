"""What ``serve``'s request threads and the journal's ingest writer process say to
each other (ingest_process.py, ingest_writer.py), over one Unix-socket connection
per request thread: each request is one frame (4-byte big-endian length, then a
pickle of plain data only: tuples, strings, bytes, numbers, None; anything naming
a class is refused), the answer one frame: ``("ok", event_id, created)`` or
``("error", type, text)``."""
from __future__ import annotations

import io
import pickle
import socket
import struct
from typing import Any

LENGTH = struct.Struct("!I")
# A sanity bound, not a policy: config.py caps receiver.max_body_bytes and
# receiver.max_stored_body_bytes at 64 MiB each, and a prepared row holds at most the
# stored body plus details taken from the body, so no webhook syncd accepts comes near it.
MAX_FRAME = 4 * 64 * 1024 * 1024


class WriterUnavailable(OSError):
    """The ingest writer could not be reached or did not answer (the event may not be durable)."""


class WriteFailed(Exception):
    """The ingest writer could not commit the event (its SQLite error, as text)."""


class _PlainData(pickle.Unpickler):
    """Unpickles plain data only: a frame that names any class or function is refused
    (the documented way to restrict pickle, docs.python.org/3/library/pickle.html,
    "Restricting Globals")."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def loads_plain(data: bytes) -> Any:
    return _PlainData(io.BytesIO(data)).load()


def frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return LENGTH.pack(len(data)) + data


def read_frame(conn: socket.socket) -> Any:
    """One whole frame from a blocking socket (the client side): an answer is a few
    dozen bytes, so one ``recv`` (one hand-back of the GIL) usually holds all of it."""
    data = conn.recv(4096)
    if not data:
        raise WriterUnavailable("ingest writer closed the connection")
    if len(data) < LENGTH.size:
        data += _read_exactly(conn, LENGTH.size - len(data))
    (size,) = LENGTH.unpack_from(data)
    if size > MAX_FRAME:
        raise WriterUnavailable(f"ingest writer answered a frame of {size} bytes")
    body = data[LENGTH.size:]
    if len(body) < size:
        body += _read_exactly(conn, size - len(body))
    return loads_plain(body)


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(left)
        if not chunk:
            raise WriterUnavailable("ingest writer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
