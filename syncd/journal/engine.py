"""The thin layer between the stores and a database driver.

Every statement is a named block in ``queries/common.sql`` (or, for the few that
differ, ``queries/<dialect>.sql``), loaded once. Parameters are named
(``%(name)s``); a list parameter expands to a comma list (of ``(…)`` rows when its
items are tuples), for ``IN (%(ids)s)`` and multi-row ``VALUES %(rows)s``. Rows come
back as dicts. An engine (SQLite, PostgreSQL) supplies the transactions and the
few things the dialects do differently (claim locks, leadership, lease take-over).
"""
from __future__ import annotations

import os
import re
import socket
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping, Protocol

def new_owner() -> str:
    """Identifies one process's leases (host, pid, random) for release on shutdown."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


_PARAM = re.compile(r"%\((\w+)\)s")
_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$")


@dataclass(frozen=True)
class Query:
    name: str
    parts: tuple[str, ...]      # the text around the parameters: len(params) + 1 pieces
    params: tuple[str, ...]
    mark: str                   # the driver's positional placeholder: ? or %s

    @classmethod
    def parse(cls, name: str, text: str, dialect: str) -> "Query":
        pieces = _PARAM.split(text)
        parts, params = pieces[0::2], pieces[1::2]
        if dialect == "postgresql":     # psycopg reads % in the text as a placeholder
            parts = [p.replace("%", "%%") for p in parts]
        return cls(name, tuple(parts), tuple(params), "?" if dialect == "sqlite" else "%s")

    def render(self, values: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """The statement for the driver and its positional arguments."""
        out = [self.parts[0]]
        args: list[Any] = []
        for param, text in zip(self.params, self.parts[1:]):
            try:
                value = values[param]
            except KeyError:
                raise TypeError(f"query {self.name} needs parameter {param!r}") from None
            if isinstance(value, list):
                if not value:
                    raise ValueError(f"query {self.name}: parameter {param!r} is an empty list")
                if isinstance(value[0], tuple):
                    row = "(" + ",".join([self.mark] * len(value[0])) + ")"
                    out.append(",".join([row] * len(value)))
                    args.extend(v for item in value for v in item)
                else:
                    out.append(",".join([self.mark] * len(value)))
                    args.extend(value)
            else:
                out.append(self.mark)
                args.append(value)
            out.append(text)
        return "".join(out), args


def parse_blocks(text: str) -> dict[str, str]:
    """``-- name: x`` blocks: the statement of each, comment lines and the final ``;`` dropped."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _NAME.match(line.strip())
        if match:
            if match.group(1) in blocks:
                raise ValueError(f"query {match.group(1)} is defined twice")
            current = blocks[match.group(1)] = []
        elif current is not None and not line.lstrip().startswith("--"):
            current.append(line)
    return {name: "\n".join(lines).strip().rstrip(";").strip() for name, lines in blocks.items()}


@lru_cache(maxsize=4)
def load_queries(dialect: str) -> dict[str, Query]:
    """Every named statement for ``dialect``: the common file, overridden or extended
    by the dialect's own."""
    folder = resources.files("syncd.journal") / "queries"
    texts = parse_blocks((folder / "common.sql").read_text(encoding="utf-8"))
    texts.update(parse_blocks((folder / f"{dialect}.sql").read_text(encoding="utf-8")))
    return {name: Query.parse(name, text, dialect) for name, text in texts.items()}


class Tx:
    """One transaction's cursor: run named statements with named parameters."""

    __slots__ = ("cur", "queries")

    def __init__(self, cur: Any, queries: dict[str, Query]):
        self.cur = cur
        self.queries = queries

    def _run(self, name: str, params: Mapping[str, Any]) -> Any:
        sql, args = self.queries[name].render(params)
        self.cur.execute(sql, args)
        return self.cur

    def execute(self, query: str, /, **params: Any) -> int:
        """Run a statement; the number of rows it changed."""
        return self._run(query, params).rowcount or 0

    def all(self, query: str, /, **params: Any) -> list[dict[str, Any]]:
        cur = self._run(query, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def one(self, query: str, /, **params: Any) -> dict[str, Any] | None:
        rows = self.all(query, **params)
        return rows[0] if rows else None

    def value(self, query: str, /, **params: Any) -> Any:
        """The first column of the first row (None when there is no row)."""
        cur = self._run(query, params)
        row = cur.fetchone()
        return None if row is None else row[0]


class Engine(Protocol):
    """What the stores need from a database (see sqlite.py and postgres.py)."""

    dialect: str
    owner: str      # this process's lease owner id

    @property
    def db_error(self) -> type[Exception]: ...                  # the driver's base error

    def begin(self) -> AbstractContextManager[Tx]: ...          # a write transaction
    def read(self) -> AbstractContextManager[Tx]: ...           # a read-only one
    def read_one(self, query: str, /, **params: Any) -> dict[str, Any] | None: ...  # one statement alone
    def ingest(self) -> AbstractContextManager[Tx]: ...         # group commit's insert
    def before_lease(self) -> None: ...                         # before a process takes a lease
    def lock_claims(self, tx: Tx) -> None: ...                  # serialize claims (PostgreSQL)
    def take_over_dead_leases(self) -> int: ...
    def try_leadership(self, name: str) -> bool: ...
    def is_leader(self, name: str) -> bool: ...
    def resign(self, name: str) -> None: ...
    def acquire_serve_lock(self) -> None: ...
    def close(self) -> None: ...
