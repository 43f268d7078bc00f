"""The SQL connector: an effect is one statement, applied at most once per key.

Idempotency lives in the target database: in the same transaction as the statement, the
key is inserted into ``edgeos_effects`` (created on first use). If the key is there
already, the statement is skipped and the delivery reports ``{"duplicate": true}``; if the
statement fails, the key goes with it. So a redelivery — after a crash, a lost commit
acknowledgement, or two workers racing — never applies a row twice.

Statements name payload fields as ``:name`` (``INSERT INTO orders (sku, qty) VALUES (:sku,
:qty)``) for both backends; nested lists and objects are passed as JSON text.

Backends: SQLite through the standard library, in a worker thread, one short connection
per delivery (so a file that was replaced or a volume that was remounted is simply
opened again); PostgreSQL through psycopg 3's async connections, a few kept open.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import math
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from edgeos.connectors.base import DeliveryError, UnknownOperation
from edgeos.connectors.config import SQLITE_PREFIX, SqlConnectorConfig, SqlOperation
from edgeos.connectors.secret_refs import resolve

if TYPE_CHECKING:
    # psycopg is the optional "postgres" extra: imported only when a binding uses it.
    import psycopg
    from psycopg import AsyncConnection
    from psycopg.rows import TupleRow

#: Rows a statement with RETURNING may report back; results stay small.
MAX_ROWS = 20

_SQLITE_TABLE = (
    "CREATE TABLE IF NOT EXISTS edgeos_effects "
    "(key TEXT PRIMARY KEY, operation TEXT NOT NULL, applied_at REAL NOT NULL)"
)
_POSTGRES_TABLE = (
    "CREATE TABLE IF NOT EXISTS edgeos_effects (key TEXT PRIMARY KEY, "
    "operation TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
)

# SQLite primary result codes that describe the moment, not the statement: the file is
# busy, locked, missing (a volume not mounted yet), or the disk is full or failing.
_SQLITE_TRANSIENT = {
    5: "SQLITE_BUSY",
    6: "SQLITE_LOCKED",
    7: "SQLITE_NOMEM",
    10: "SQLITE_IOERR",
    13: "SQLITE_FULL",
    14: "SQLITE_CANTOPEN",
    15: "SQLITE_PROTOCOL",
}


class SqlConnector:
    """Applies statements to an SQLite file or a PostgreSQL database, once per key."""

    #: The key is claimed in ``edgeos_effects`` in the statement's own transaction.
    idempotency_keys = True

    def __init__(
        self,
        name: str,
        *,
        url: str,
        operations: Mapping[str, SqlOperation],
        timeout_s: float = 10.0,
        max_connections: int = 4,
        secrets: Callable[[str], str] | None = None,
    ) -> None:
        """``secrets(name)`` fills ``${secret:NAME}`` in a PostgreSQL URL at each new
        connection: the vault as far as the binding's scopes allow."""
        self.name = name
        self.url = url
        self._secrets = secrets
        self.operations = dict(operations)
        self.timeout_s = timeout_s
        self._params = {op: placeholders(o.statement) for op, o in self.operations.items()}
        self._backend: _Backend
        if url.startswith(SQLITE_PREFIX):
            path = Path(url[len(SQLITE_PREFIX) :]).absolute()
            self._backend = _SqliteBackend(self, path)
        else:
            self._backend = _PostgresBackend(self, max_connections)

    @classmethod
    def from_config(
        cls, config: SqlConnectorConfig, secrets: Callable[[str], str] | None = None
    ) -> SqlConnector:
        """The connector for a validated binding."""
        return cls(
            config.name, url=config.url, operations=config.operations,
            timeout_s=config.timeout_s, secrets=secrets,
        )  # fmt: skip

    async def deliver(
        self, operation: str, payload: dict[str, Any], key: str
    ) -> dict[str, Any] | None:
        """Run the operation's statement with ``payload`` unless ``key`` was applied before.

        Returns ``{"duplicate": false, "rowcount": n}`` (plus ``"rows"`` for a statement
        that returns rows), or ``{"duplicate": true}`` when the key was already applied.
        """
        op = self.operations.get(operation)
        if op is None:
            raise UnknownOperation(self.name, operation, list(self.operations))
        missing = [p for p in self._params[operation] if p not in payload]
        if missing:
            raise self._error(
                operation,
                f"the payload has no field {', '.join(map(repr, missing))} "
                f"for the statement's placeholders",
                retryable=False,
            )
        params = {name: _param(value) for name, value in payload.items()}
        return await self._backend.apply(operation, op.statement, params, key)

    async def close(self) -> None:
        """Close open database connections. Safe to call twice."""
        await self._backend.close()

    def _error(self, operation: str, problem: str, *, retryable: bool) -> DeliveryError:
        return DeliveryError(self.name, operation, problem, retryable=retryable)


class _Backend:
    async def apply(
        self, operation: str, statement: str, params: dict[str, Any], key: str
    ) -> dict[str, Any]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


# -- SQLite -----------------------------------------------------------------------------
class _SqliteBackend(_Backend):
    def __init__(self, owner: SqlConnector, path: Path) -> None:
        self.owner = owner
        self.path = path

    async def apply(
        self, operation: str, statement: str, params: dict[str, Any], key: str
    ) -> dict[str, Any]:
        # sqlite3 blocks (busy waits, fsync): keep it off the event loop.
        return await asyncio.to_thread(self._apply, operation, statement, params, key)

    async def close(self) -> None:
        """Nothing stays open between deliveries."""

    def _apply(
        self, operation: str, statement: str, params: dict[str, Any], key: str
    ) -> dict[str, Any]:
        owner = self.owner
        try:
            # mode=rw: a missing file is "not there yet" (retryable), not a new empty
            # database in which every statement would fail for want of its tables.
            conn = sqlite3.connect(
                f"{self.path.as_uri()}?mode=rw",
                uri=True,
                isolation_level=None,
                timeout=owner.timeout_s,
            )
        except sqlite3.Error as exc:
            raise self._translate(operation, exc, f"cannot open {self.path}") from exc
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(_SQLITE_TABLE)
                claimed = conn.execute(
                    "INSERT INTO edgeos_effects (key, operation, applied_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO NOTHING",
                    (key, operation, time.time()),
                ).rowcount
                if claimed == 0:
                    conn.execute("ROLLBACK")
                    return {"duplicate": True}
                cursor = conn.execute(statement, params)
                # Fetch every row: SQLite finishes a statement only when it is stepped
                # to the end, and the rowcount is final only then.
                rows = cursor.fetchall()
                result = _result(cursor.description, rows[:MAX_ROWS], cursor.rowcount)
                conn.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._translate(operation, exc, f"{self.path}") from exc
        finally:
            conn.close()

    def _translate(self, operation: str, exc: sqlite3.Error, where: str) -> DeliveryError:
        code = getattr(exc, "sqlite_errorcode", None)
        name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        transient = code is not None and (code & 0xFF) in _SQLITE_TRANSIENT
        return self.owner._error(operation, f"{where}: {name}: {exc}", retryable=transient)


# -- PostgreSQL -------------------------------------------------------------------------
class _PostgresBackend(_Backend):
    """A few async connections, each used by one delivery at a time."""

    def __init__(self, owner: SqlConnector, max_connections: int) -> None:
        self.owner = owner
        self._idle: list[AsyncConnection[TupleRow]] = []
        # One transaction per connection at a time: a shared connection would interleave
        # the statements of concurrent deliveries.
        self._slots = asyncio.Semaphore(max_connections)
        self._table_ready = False
        self._table_lock = asyncio.Lock()
        self._queries: dict[str, str] = {}
        self._closed = False

    async def apply(
        self, operation: str, statement: str, params: dict[str, Any], key: str
    ) -> dict[str, Any]:
        import psycopg

        query = self._queries.get(statement)
        if query is None:
            query = self._queries[statement] = to_pyformat(statement)
        async with self._slots:
            conn = await self._connect(operation)
            try:
                await self._ensure_table(conn)
                async with conn.transaction():
                    cursor = await conn.execute(
                        "INSERT INTO edgeos_effects (key, operation) VALUES (%s, %s) "
                        "ON CONFLICT (key) DO NOTHING",
                        (key, operation),
                    )
                    if cursor.rowcount == 0:
                        return {"duplicate": True}
                    cursor = await conn.execute(query, params)
                    rows = await cursor.fetchmany(MAX_ROWS) if cursor.description else []
                    return _result(cursor.description, rows, cursor.rowcount)
            except psycopg.errors.UndefinedTable as exc:
                if "edgeos_effects" not in str(exc):
                    raise self._translate(operation, exc) from exc
                # Dropped behind our back: create it again on the next attempt.
                self._table_ready = False
                raise self.owner._error(
                    operation, f"PostgreSQL: {_first_line(exc)}", retryable=True
                ) from exc
            except psycopg.Error as exc:
                raise self._translate(operation, exc) from exc
            finally:
                await self._release(conn)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    async def _connect(self, operation: str) -> AsyncConnection[TupleRow]:
        import psycopg

        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not conn.broken:
                return conn
            await conn.close()
        timeout = self.owner.timeout_s
        owner = self.owner
        # Resolved for this connection only; the server may quote the user back in errors.
        url = resolve(owner.url, owner._secrets, binding=owner.name, operation=operation,
                      what="the database URL", in_url=True)  # fmt: skip
        try:
            # autocommit: transactions are only the explicit ``conn.transaction()`` blocks,
            # and the session setting below does not open one.
            conn = await psycopg.AsyncConnection.connect(
                url.text, connect_timeout=max(1, math.ceil(timeout)), autocommit=True
            )
        except psycopg.Error as exc:
            problem = url.mask(f"cannot connect to PostgreSQL: {_first_line(exc)}")
            # Not chained: the driver's exception may carry the URL with the password.
            raise owner._error(operation, problem, retryable=True) from None
        try:
            # A statement stuck behind a lock must not hold a delivery slot for ever; the
            # server cancels it (57014, retryable) and the key goes back with it.
            await conn.execute(f"SET statement_timeout = {max(1, round(timeout * 1000))}")
        except psycopg.Error as exc:
            await conn.close()
            raise self._translate(operation, exc) from exc
        return conn

    async def _release(self, conn: AsyncConnection[TupleRow]) -> None:
        from psycopg.pq import TransactionStatus

        # A failed statement rolled its transaction back and leaves the connection idle
        # and usable; a broken one (server gone, cancelled mid-query) is dropped so the
        # next delivery connects afresh.
        idle = not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE
        if idle and not self._closed:
            self._idle.append(conn)
        else:
            await conn.close()

    async def _ensure_table(self, conn: AsyncConnection[TupleRow]) -> None:
        import psycopg

        async with self._table_lock:  # uncontended after the first delivery: cheap
            if self._table_ready:
                return
            try:
                async with conn.transaction():
                    await conn.execute(_POSTGRES_TABLE)
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
                pass  # another connection created it at the same moment: it exists now
            self._table_ready = True

    def _translate(self, operation: str, exc: psycopg.Error) -> DeliveryError:
        import psycopg

        # OperationalError: the connection or the server failed (down, restarting, admin
        # shutdown, out of resources, statement timeout); TransactionRollback: a
        # serialization failure or deadlock. Both may pass on retry. Everything else
        # (constraint, syntax, undefined table, bad data) would fail the same way again.
        retryable = isinstance(exc, psycopg.OperationalError | psycopg.errors.TransactionRollback)
        state = f" [{exc.sqlstate}]" if exc.sqlstate else ""
        return self.owner._error(
            operation, f"PostgreSQL{state}: {_first_line(exc)}", retryable=retryable
        )


# -- helpers ----------------------------------------------------------------------------
_TOKENS = re.compile(
    r"""
      (?P<quoted>'(?:[^']|'')*'|"(?:[^"]|"")*")      # literals and quoted identifiers
    | (?P<comment>--[^\n]*|/\*.*?\*/)                 # comments
    | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*|)\$.*?\$(?P=tag)\$)  # $tag$ bodies $tag$
    | (?P<cast>::)                                    # a PostgreSQL cast, not a name
    | :(?P<name>[A-Za-z_][A-Za-z0-9_]*)               # a :name placeholder
    | (?P<percent>%)
    """,
    re.VERBOSE | re.DOTALL,
)


def _scan(statement: str) -> Iterator[re.Match[str]]:
    return _TOKENS.finditer(statement)


def placeholders(statement: str) -> list[str]:
    """The ``:name`` placeholders of a statement, outside literals and comments."""
    seen: list[str] = []
    for match in _scan(statement):
        name = match.group("name")
        if name and name not in seen:
            seen.append(name)
    return seen


def to_pyformat(statement: str) -> str:
    """Rewrite ``:name`` placeholders as psycopg's ``%(name)s`` (and ``%`` as ``%%``)."""

    def replace(match: re.Match[str]) -> str:
        if match.group("name"):
            return f"%({match.group('name')})s"
        # psycopg reads % everywhere in the query, even inside literals.
        return match.group(0).replace("%", "%%")

    out: list[str] = []
    last = 0
    for match in _scan(statement):
        out.append(statement[last : match.start()].replace("%", "%%"))
        out.append(replace(match))
        last = match.end()
    out.append(statement[last:].replace("%", "%%"))
    return "".join(out)


def _param(value: Any) -> Any:
    """A payload value as a statement parameter: nested values become JSON text."""
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return value


def _result(description: Any, rows: list[Any], rowcount: int) -> dict[str, Any]:
    result: dict[str, Any] = {"duplicate": False, "rowcount": rowcount}
    if description:
        names = [column[0] for column in description]
        result["rows"] = [{n: _plain(v) for n, v in zip(names, row, strict=True)} for row in rows]
    return result


def _plain(value: Any) -> Any:
    """A database value as JSON: numbers and text as they are, the rest as text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict | list):
        return orjson.loads(orjson.dumps(value, default=str))
    return str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
