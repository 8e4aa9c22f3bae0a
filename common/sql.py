"""Named-parameter SQL run straight on the asyncpg connection of a unit of work.

SQLAlchemy owns the engine, the pool and the migrations; the statements of a unit of
work go to the pooled asyncpg connection directly, which costs a fraction of a
SQLAlchemy execution per statement on the hot paths. ``sql()`` turns ``:name``
parameters into asyncpg's ``$n`` once, when a module defines its statements.

Audit rows and outbox events are *deferred*: collected during the unit of work and
written by one statement just before commit, in the same transaction as the change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeAlias

import asyncpg

Row: TypeAlias = "asyncpg.Record"

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@dataclass(frozen=True)
class Query:
    """A statement compiled to asyncpg's positional form."""

    text: str
    names: tuple[str, ...]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for ``params`` (every name must be given)."""
        try:
            return [params[name] for name in self.names]
        except KeyError as exc:
            raise KeyError(f"missing SQL parameter {exc} for: {self.text[:80]}") from exc


@lru_cache(maxsize=1024)
def sql(text: str) -> Query:
    """Compile ``text`` with ``:name`` parameters (``::type`` casts are left alone)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return Query(_PARAM.sub(number, text), tuple(names))


@dataclass(frozen=True)
class Batch:
    """A table whose rows a unit of work defers and inserts in one statement."""

    table: str
    columns: tuple[tuple[str, str], ...]

    def cte(self, first_param: int) -> str:
        names = ", ".join(name for name, _ in self.columns)
        arrays = ", ".join(
            f"${first_param + i}::{kind}[]" for i, (_, kind) in enumerate(self.columns)
        )
        return f"INSERT INTO {self.table} ({names}) SELECT * FROM unnest({arrays})"


async def probe(conn: asyncpg.Connection, *, within: float) -> None:
    """One round trip on ``conn`` (a dedicated connection, outside any unit of work), of at
    most ``within`` seconds: raises when the connection is gone."""
    await conn.fetchval("SELECT 1", timeout=within)


@dataclass
class Tx:
    """The connection of one unit of work, inside its transaction."""

    conn: asyncpg.Connection
    deferred: dict[Batch, list[Sequence[Any]]] = field(default_factory=dict)

    async def fetchrow(self, query: Query, params: Mapping[str, Any] | None = None) -> Row | None:
        return await self.conn.fetchrow(query.text, *query.args(params or {}))

    async def fetch(self, query: Query, params: Mapping[str, Any] | None = None) -> list[Row]:
        return await self.conn.fetch(query.text, *query.args(params or {}))

    async def fetchval(self, query: Query, params: Mapping[str, Any] | None = None) -> Any:
        return await self.conn.fetchval(query.text, *query.args(params or {}))

    async def execute(self, query: Query, params: Mapping[str, Any] | None = None) -> str:
        return await self.conn.execute(query.text, *query.args(params or {}))

    def defer(self, batch: Batch, row: Sequence[Any]) -> None:
        """Insert ``row`` into ``batch``'s table when the unit of work commits."""
        self.deferred.setdefault(batch, []).append(row)

    async def flush(self) -> None:
        """Write every deferred row, all tables in one statement."""
        if not self.deferred:
            return
        parts: list[str] = []
        args: list[Any] = []
        for index, (batch, rows) in enumerate(self.deferred.items()):
            parts.append(f"d{index} AS ({batch.cte(len(args) + 1)})")
            args.extend(list(column) for column in zip(*rows, strict=True))
        self.deferred = {}
        await self.conn.execute(f"WITH {', '.join(parts)} SELECT 1", *args)
