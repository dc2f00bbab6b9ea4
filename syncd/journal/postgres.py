"""PostgreSQL journal: one database shared by several ``serve`` replicas.

Connections come from a ``psycopg_pool.ConnectionPool``; every pooled connection
runs READ COMMITTED (forced, whatever the server default) with ``search_path``
set to the journal's schema. This engine runs the stores' named statements
(:mod:`syncd.journal.engine`) and supplies transactions, claim serialization,
leader election for the pollers and the take-over of dead replicas' leases.

Concurrency, in short:

* **Claims** are serialized per schema by a transaction-level advisory lock
  (see :meth:`PostgresEngine.lock_claims`), and rows are taken with
  ``FOR UPDATE SKIP LOCKED`` so a claim never waits on a row that a concurrent
  ``settle``/``replay`` is changing.
* **Webhooks** are group-committed (:mod:`syncd.journal.group_commit`): the
  events that arrive while one insert transaction runs share the next one.
* **Duplicate webhooks** racing on ``(source, source_event_id)``: the loser's
  ``INSERT ... ON CONFLICT DO NOTHING`` waits for the winner's commit and then
  inserts nothing; its follow-up ``SELECT`` is a new statement, so under READ
  COMMITTED it sees the winner's committed row and returns that id.
* **Pollers** run on one leader: a session-level advisory lock held on a
  dedicated, non-pooled connection (:meth:`PostgresEngine.try_leadership`).
* **Migrations** run under a transaction-level advisory lock, so replicas
  starting together apply them once.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Iterator
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout

from syncd.journal import migrate
from syncd.journal.base import JournalMissing
from syncd.journal.engine import Tx, load_queries, new_owner

log = logging.getLogger(__name__)

# Two-int advisory lock keys: (class, hashtext(schema)). The two-int key space
# never overlaps the one-bigint space used for leadership.
MIGRATE_LOCK_CLASS = 0x73796E01
CLAIM_LOCK_CLASS = 0x73796E02

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# A frozen replica must not hold the claim lock (or row locks) forever.
IDLE_IN_TRANSACTION_TIMEOUT = "60s"
LEADER_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                     "keepalives_count": 3}


class PostgresUnavailable(RuntimeError):
    """The journal database cannot be reached or opened (text never carries the password)."""


class PostgresEngine:
    """Journal engine on PostgreSQL. ``schema`` (default ``public``) is created if missing
    and set as ``search_path`` on every pooled connection."""

    dialect = "postgresql"
    db_error = psycopg.Error

    def __init__(self, url: str, *, schema: str | None = None, min_size: int = 1,
                 max_size: int = 10, timeout: float = 30.0, must_exist: bool = False):
        url, url_schema = _split_schema(url)
        self.schema = schema or url_schema or "public"
        if not _IDENT.match(self.schema) or self.schema.startswith("pg_"):
            raise ValueError(f"journal schema {self.schema!r} is not a plain lower-case identifier "
                             "(a-z, 0-9, _; at most 63 characters; not pg_*)")
        self.owner = new_owner()
        self.queries = load_queries(self.dialect)
        params = _parse(url)
        self._password = params.get("password") or ""
        self.where = _describe(params, self.schema)
        params.setdefault("connect_timeout", "10")
        params.setdefault("application_name", "syncd")
        self._conninfo = make_conninfo(**params)
        self._search_path = f'"{self.schema}"'
        self._leaders: dict[str, psycopg.Connection] = {}
        self._leader_lock = threading.Lock()
        self._local = threading.local()                  # per-thread reader for read_one
        self._readers: set[psycopg.Connection] = set()
        self._pool: ConnectionPool | None = None
        self._next_takeover = 0.0

        self._migrate(must_exist)
        pool = ConnectionPool(self._conninfo, min_size=min_size, max_size=max_size, open=True,
                              configure=self._configure, check=ConnectionPool.check_connection,
                              name=f"syncd-journal-{self.schema}", timeout=timeout)
        try:
            pool.wait(timeout=timeout)
        except PoolTimeout:
            pool.close()
            raise PostgresUnavailable(f"cannot reach PostgreSQL journal {self.where}: no connection "
                                      f"within {timeout:g}s") from None
        self._pool = pool

    def __repr__(self) -> str:
        return f"PostgresEngine({self.where})"

    # --- connections -----------------------------------------------------------------
    def _configure(self, conn: psycopg.Connection) -> None:
        """Pool ``configure`` hook: runs once per new pooled connection."""
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        conn.execute("SELECT set_config('search_path', %s, false), "
                     "set_config('idle_in_transaction_session_timeout', %s, false)",
                     (self._search_path, IDLE_IN_TRANSACTION_TIMEOUT))
        conn.commit()

    def _connect(self, **kwargs: Any) -> psycopg.Connection:
        try:
            return psycopg.connect(self._conninfo, **kwargs)
        except psycopg.Error as exc:
            raise PostgresUnavailable(f"cannot reach PostgreSQL journal {self.where}: "
                                      f"{self._scrub(str(exc))}") from None

    def _scrub(self, text: str) -> str:
        """One line, password removed (libpq may echo parts of the connection string)."""
        text = " ".join(text.split())
        for secret in {self._password, unquote(self._password)}:
            if secret:
                text = text.replace(secret, "***")
        return text

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None or self._pool.closed:
            raise PostgresUnavailable(f"PostgreSQL journal {self.where} is closed")
        return self._pool

    @contextmanager
    def begin(self) -> Iterator[Tx]:
        """One transaction on a pooled connection: commit on success, roll back on error."""
        with self.pool.connection() as conn:
            with conn.transaction(), conn.cursor() as cur:
                yield Tx(cur, self.queries)

    def ingest(self) -> AbstractContextManager[Tx]:
        """Group commit's batch: the events and their ledger entries in one transaction
        (the INSERT carries the BEGIN, then the ledger upsert and the COMMIT: 3 round
        trips). An autocommit INSERT was one round trip less but committed the events
        before their ledger entries were written."""
        return self.begin()

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A READ ONLY transaction (psycopg puts it in the BEGIN: no extra round trip)."""
        with self.pool.connection() as conn:
            conn.read_only = True
            try:
                with conn.transaction(), conn.cursor() as cur:
                    yield Tx(cur, self.queries)
            finally:
                if conn.info.transaction_status == TransactionStatus.IDLE:
                    conn.read_only = False
                # else the connection is broken and the pool discards it

    def read_one(self, query: str, /, **params: Any) -> dict[str, Any] | None:
        """The first row of one read statement, on this thread's own autocommit connection:
        one round trip (a pooled read costs BEGIN, SELECT, COMMIT and the pool's liveness
        query at checkout). For the consent API's per-request lookup; fine on a replica. A
        connection that broke since its last use is replaced and the read tried once more."""
        for attempt in (1, 2):
            conn = self._reader()
            try:
                with conn.cursor() as cur:
                    return Tx(cur, self.queries).one(query, **params)
            except psycopg.OperationalError:
                self._drop_reader(conn)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _reader(self) -> psycopg.Connection:
        conn = getattr(self._local, "reader", None)
        if conn is None or conn.closed:
            self.pool  # noqa: B018 - raises PostgresUnavailable once the engine is closed
            conn = self._connect(autocommit=True)
            conn.execute("SELECT set_config('search_path', %s, false)", (self._search_path,))
            self._local.reader = conn
            with self._leader_lock:
                self._readers.add(conn)
        return conn

    def _drop_reader(self, conn: psycopg.Connection) -> None:
        self._local.reader = None
        with self._leader_lock:
            self._readers.discard(conn)
        try:
            conn.close()
        except psycopg.Error:
            pass

    # --- schema ----------------------------------------------------------------------
    def _migrate(self, must_exist: bool = False) -> None:
        """Create the schema and tables if missing. Serialized across replicas by an
        advisory transaction lock; a no-op when the schema version is current."""
        with self._connect(autocommit=False) as conn:
            conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s::int4, hashtext(%s))",
                                 (MIGRATE_LOCK_CLASS, self.schema))
                    schema_missing = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                                                  (self.schema,)).fetchone() is None
                    if must_exist and (schema_missing or (conn.execute(
                            "SELECT to_regclass(%s)", (f'"{self.schema}".schema_version',)).fetchone()
                            or (None,))[0] is None):
                        raise JournalMissing(f"journal not found: PostgreSQL {self.where} has no syncd tables "
                                             "(journal.url); check the URL and schema, or run `syncd serve` "
                                             "once to create them")
                    if schema_missing:
                        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
                    conn.execute("SELECT set_config('search_path', %s, true)", (self._search_path,))
                    version = 0
                    if (conn.execute("SELECT to_regclass('schema_version')").fetchone() or (None,))[0] is not None:
                        version = (conn.execute("SELECT MAX(version) FROM schema_version").fetchone() or (0,))[0] or 0
                    try:
                        latest = migrate.apply(conn.execute, "postgresql", version, self.where)
                    except migrate.SchemaTooNew as exc:
                        raise PostgresUnavailable(f"PostgreSQL {exc}") from None
                    if latest != version:
                        log.info("journal schema migrated", extra={"journal": self.where,
                                                                   "from_version": version,
                                                                   "to_version": latest})
            except psycopg.Error as exc:
                raise PostgresUnavailable(f"cannot migrate PostgreSQL journal {self.where}: "
                                          f"{self._scrub(str(exc))}") from None

    # --- claims ----------------------------------------------------------------------
    def lock_claims(self, tx: Tx) -> None:
        """Serialize claims per schema (released at commit).

        ``FOR UPDATE SKIP LOCKED`` alone is not enough here: the rule "no other
        pending delivery of the same record holds a live lease" reads *other*
        rows, and two concurrent claims each see a snapshot without the other's
        uncommitted leases, so both could lease different deliveries of one
        record. The lock is taken in its own statement first, so under READ
        COMMITTED the claim statement's snapshot is taken after the previous
        claimer committed and sees its leases. A per-record lock would not fit:
        the set of records is only known inside the claim query. Claims are one
        short statement plus a SELECT, so the serialization costs little; a stalled
        claimer is cut off by ``idle_in_transaction_session_timeout``. ``SKIP
        LOCKED`` still keeps a claim from waiting on rows a concurrent settle or
        replay is updating.
        """
        tx.execute("claim_lock", lock_class=CLAIM_LOCK_CLASS, schema=self.schema)

    # --- leader election -------------------------------------------------------------
    def _leader_key(self, name: str) -> str:
        # Schema-qualified, so journals in different schemas of one database elect separately.
        return f"syncd:{self.schema}:{name}"

    def try_leadership(self, name: str) -> bool:
        """Become the leader for ``name`` (e.g. ``"poller"``) unless another replica is.

        Leadership is a session-level ``pg_try_advisory_lock(hashtext(key))`` on a
        dedicated, non-pooled connection kept open while leader; when that
        connection (or the process) dies, the server releases the lock and
        another replica's next ``try_leadership`` wins. Call it before each
        poll: it returns True while the lock is still held (checking the
        connection), and never blocks on another replica.
        """
        with self._leader_lock:
            if self._leader_alive(name):
                return True
            try:
                conn = self._connect(autocommit=True, **LEADER_KEEPALIVES)
            except PostgresUnavailable as exc:
                log.warning("leader election failed", extra={"leader": name, "error": str(exc)})
                return False
            try:
                got = (conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                                    (self._leader_key(name),)).fetchone() or (False,))[0]
            except psycopg.Error as exc:
                conn.close()
                log.warning("leader election failed", extra={"leader": name,
                                                             "error": self._scrub(str(exc))})
                return False
            if got:
                self._leaders[name] = conn
                return True
            conn.close()
            return False

    def is_leader(self, name: str) -> bool:
        """True while this journal holds ``name``'s leadership (one round trip to check)."""
        with self._leader_lock:
            return self._leader_alive(name)

    def resign(self, name: str) -> None:
        """Give ``name``'s leadership up (no-op when not leader)."""
        with self._leader_lock:
            conn = self._leaders.pop(name, None)
            if conn is None:
                return
            try:
                if not conn.closed:
                    conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self._leader_key(name),))
            except psycopg.Error:
                pass  # closing the session releases it anyway
            finally:
                conn.close()

    def _leader_alive(self, name: str) -> bool:
        conn = self._leaders.get(name)
        if conn is None:
            return False
        if not conn.closed and not conn.broken:
            try:
                conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                pass
        log.warning("leadership lost: its database connection is gone", extra={"leader": name})
        self._leaders.pop(name, None)
        conn.close()
        return False

    # --- leases of replicas that died -----------------------------------------------
    # How often a replica looks for leases held by a replica that is gone.
    TAKEOVER_EVERY_SECONDS = 5.0

    def _alive_name(self, owner: str) -> str:
        return f"alive:{owner}"

    def before_lease(self) -> None:
        """Hold this replica's liveness lock before taking any lease (see take_over_dead_leases)."""
        self.try_leadership(self._alive_name(self.owner))

    def take_over_dead_leases(self) -> int:
        """Free the deliveries, routing leases and reflections leased by replicas whose
        process is gone, at once instead of when their lease expires.

        Every replica holds a session advisory lock named after its lease owner id
        (the same mechanism as leadership); the server drops it when the process or
        its connection dies. A lease whose owner's lock can be taken belongs to a dead
        replica (every lease is taken after ``before_lease``). Called at the start of
        each push tick; it scans at most every ``TAKEOVER_EVERY_SECONDS``. If a live
        replica merely lost its connection, its work may be pushed twice: updates are
        idempotent, so the CRM ends the same.
        """
        self.before_lease()
        now = time.time()
        if now < self._next_takeover:
            return 0
        self._next_takeover = now + self.TAKEOVER_EVERY_SECONDS
        freed = {"deliveries": 0, "events": 0, "reflections": 0}
        with self.begin() as tx:
            owners = [r["owner"] for r in tx.all("live_lease_owners", now=now)
                      if r["owner"] and r["owner"] != self.owner]
            for owner in owners:
                # Held until this transaction ends, so the owner cannot come back meanwhile.
                if not tx.value("try_xact_lock", key=self._leader_key(self._alive_name(owner))):
                    continue
                for table in freed:
                    freed[table] += tx.execute(f"take_over_{table}", owner=owner)
        if any(freed.values()):
            log.warning("took over the leases of a replica that is gone", extra=freed)
        return sum(freed.values())

    # --- lifecycle -------------------------------------------------------------------
    def acquire_serve_lock(self) -> None:
        """Replicas share a PostgreSQL journal: any number may serve."""
        return None

    def close(self) -> None:
        """Drop any leadership and close the pool. Safe to call twice."""
        for name in list(self._leaders):
            self.resign(name)
        with self._leader_lock:
            readers, self._readers = list(self._readers), set()
        for conn in readers:
            try:
                conn.close()
            except psycopg.Error:
                pass
        if self._pool is not None and not self._pool.closed:
            self._pool.close()


def _split_schema(url: str) -> tuple[str, str | None]:
    """``postgresql://…/db?schema=syncd`` -> (the URL without it, ``syncd``). libpq has no
    such parameter; syncd takes it out before connecting and creates the schema."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    if not schemas:
        return url, None
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schemas[-1]


def _parse(url: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(url)
    except psycopg.Error:
        # libpq's message may quote the malformed part, password included.
        raise ValueError("journal.url is not a valid PostgreSQL URL "
                         "(postgresql://user:password@host:port/dbname)") from None


def _describe(params: dict[str, Any], schema: str) -> str:
    """``user@host:port/db (schema s)`` - for messages; never the password."""
    user = params.get("user") or ""
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    db = params.get("dbname") or user
    return f"{user + '@' if user else ''}{host}:{port}/{db} (schema {schema})"
