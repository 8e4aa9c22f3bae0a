"""The sweep next to live work: two replicas sweeping at once do the work once (the
advisory lock), and a sweep over thousands of expired rows runs while checkout/release
cycles through the issue service keep working, without an error."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import asyncpg
import grpc
from prometheus_client import REGISTRY

from bench.issue_cycle import grpc_cycle, seed
from common.config import Settings
from common.database_url import asyncpg_dsn
from common.db import Database
from common.retention import sweep
from issue_service import retention as issue_retention
from run_service import retention as run_retention
from tests.harness import INTERNAL_KEY, Suite
from tests.retention import support as s


def _deleted_metric(table: str) -> float:
    value = REGISTRY.get_sample_value("paperclip_retention_rows_deleted_total", {"table": table})
    return value or 0.0


async def test_two_replicas_sweeping_at_once_do_the_work_once(
    own_db: Database, settings: Settings
) -> None:
    company = await s.company(own_db)
    agent = await s.agent(own_db, company)
    skipped = await s.wakes(own_db, company, agent, 400, status="skipped", days_ago=10)
    other_replica = Database(own_db.engine.url.render_as_string(hide_password=False))
    before = _deleted_metric("runs.wakeup_requests")
    policies = run_retention.policies(settings)
    try:
        results = await asyncio.gather(
            *(
                sweep(db, policies, lock_key=run_retention.LOCK_KEY, batch=20, pause=0.01)
                for db in (own_db, other_replica)
            )
        )
    finally:
        await other_replica.dispose()

    ran = [r for r in results if r.ran]
    assert len(ran) == 1
    assert ran[0].deleted("runs.wakeup_requests:skipped") == 400
    assert ran[0].batches("runs.wakeup_requests:skipped") == 400 // 20 + 1
    assert _deleted_metric("runs.wakeup_requests") - before == 400
    assert await s.count_in(own_db, "runs.wakeup_requests", "id", skipped) == 0
    # The lock is released with the sweep: the next one runs.
    again = await sweep(own_db, policies, lock_key=run_retention.LOCK_KEY, batch=20, pause=0)
    assert again.ran and again.deleted("runs.wakeup_requests:skipped") == 0


async def test_a_sweep_runs_while_checkout_cycles_keep_working(
    suite: Suite, database_url: str, settings: Settings
) -> None:
    db = suite.db
    company = await s.company(db)
    agent = await s.agent(db, company)
    expired_runs = await s.runs(db, company, agent, 1500, days_ago=40, events=4)
    expired_wakes = await s.wakes(db, company, agent, 1500, status="coalesced", days_ago=5)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        seats = await seed(conn, 8)
    finally:
        await conn.close()
    cycles = 0
    errors: list[BaseException] = []
    sweeping = asyncio.Event()
    done = asyncio.Event()

    async with grpc.aio.insecure_channel(suite.issue_addr) as channel:
        cycle = grpc_cycle(channel, seats, INTERNAL_KEY)

        async def client(index: int) -> None:
            nonlocal cycles
            await sweeping.wait()
            while not done.is_set():
                try:
                    await cycle(index)
                    cycles += 1
                except grpc.aio.AioRpcError as exc:
                    errors.append(exc)
                    return

        clients = [asyncio.create_task(client(i)) for i in range(len(seats))]
        policies = [*run_retention.policies(settings), *issue_retention.policies(settings)]
        started = time.monotonic()
        sweeping.set()
        try:
            result = await sweep(db, policies, lock_key="test-load", batch=500, pause=0.01)
        finally:
            elapsed = time.monotonic() - started
            done.set()
            await asyncio.gather(*clients)

    assert errors == []
    assert cycles >= 10 * elapsed
    assert result.deleted("runs.run_events") >= 1500 * 4
    assert result.batches("runs.run_events") >= 1500 * 4 // 500
    assert result.deleted("runs.heartbeat_runs") >= 1500
    assert result.deleted("runs.wakeup_requests:skipped") >= 1500
    assert await s.count_in(db, "runs.heartbeat_runs", "id", expired_runs) == 0
    assert await s.count_in(db, "runs.wakeup_requests", "id", expired_wakes) == 0
    live = [seat.run_id for seat in seats]
    assert await s.count_in(db, "runs.heartbeat_runs", "id", live) == len(live)


def test_the_default_horizons(settings: Settings) -> None:
    off = replace(settings, retention_issue_events_days=0)
    assert issue_retention.policies(off)[0].keep is None
    assert [p.keep.days if p.keep else 0 for p in run_retention.policies(settings)] == [
        14,
        3,
        30,
        30,
        30,
    ]
