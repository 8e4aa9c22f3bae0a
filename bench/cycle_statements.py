"""Statements per checkout/release cycle: the service's, and each raw ceiling's.

Every statement is one round trip to PostgreSQL (BEGIN and COMMIT included; prepared
statements are cached per connection, so after a warm-up no cycle pays a Parse round
trip). They are counted with asyncpg's query logger, which sees every statement a
connection sends:

- ``service``: ``checkout_issue`` then ``release_issue``, the issue service's own
  functions, run in this process on a ``Database`` like the service's (the gRPC layer in
  front of them sends no SQL);
- ``raw_same_sql`` and ``raw_minimal_sql``: the ceilings of ``bench.issue_cycle``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from sqlalchemy import event

from bench.issue_cycle import Seat, minimal_sql_cycle, same_sql_cycle, seed
from bench.run_cycle import hold_runs
from common.actor import Actor, ActorType
from common.database_url import asyncpg_dsn
from common.db import Database
from issue_service import checkout
from paperclip.issues.v1 import issues_pb2

WARMUP_CYCLES = 5
COUNTED_CYCLES = 20


async def _per_cycle(cycle: Callable[[], Awaitable[None]], counter: list[int]) -> float:
    for _ in range(WARMUP_CYCLES):
        await cycle()
    await asyncio.sleep(0)  # the logger's callbacks run on the next loop iteration
    counter.clear()
    for _ in range(COUNTED_CYCLES):
        await cycle()
    await asyncio.sleep(0)
    return round(len(counter) / COUNTED_CYCLES, 2)


def _actor(seat: Seat) -> Actor:
    return Actor(
        type=ActorType.AGENT,
        agent_id=seat.agent_id,
        company_id=seat.company_id,
        run_id=seat.run_id,
    )


async def _service(database_url: str, seat: Seat, counter: list[int]) -> float:
    db = Database(database_url, pool_size=1, max_overflow=0, name="bench-statements")

    @event.listens_for(db.engine.sync_engine, "connect")
    def log_queries(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(lambda _query: counter.append(1))

    actor = _actor(seat)
    todo = [issues_pb2.ISSUE_STATUS_TODO]

    async def cycle() -> None:
        await checkout.checkout_issue(
            db, actor, issue_id=seat.issue_id, agent_id=seat.agent_id, expected_statuses=todo
        )
        await checkout.release_issue(db, actor, issue_id=seat.issue_id)

    try:
        return await _per_cycle(cycle, counter)
    finally:
        await db.dispose()


async def statements_per_cycle(database_url: str) -> dict[str, float]:
    """Statements per cycle of the service and of each raw ceiling, on a fresh seat."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        (seat,) = await seed(conn, 1)
        await hold_runs(conn, [seat.run_id])
        counter: list[int] = []
        conn.add_query_logger(lambda _query: counter.append(1))
        actor = _actor(seat)
        same = await _per_cycle(lambda: same_sql_cycle(conn, seat, actor), counter)
        minimal = await _per_cycle(lambda: minimal_sql_cycle(conn, seat), counter)
        service = await _service(database_url, seat, [])
    finally:
        await conn.close()
    return {"service": service, "raw_same_sql": same, "raw_minimal_sql": minimal}
