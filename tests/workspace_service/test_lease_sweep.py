"""The lease sweep (user asks row 23): leases not renewed within their TTL expire,
leases of ended or missing runs are released with their run's mapping, one replica at
a time, in bounded batches, skipping rows other transactions hold.

The sweep looks at the whole table, and tests share one database: each test first
drains what earlier tests left behind, then asserts on its own leases.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from common.db import Database
from common.sql import sql
from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from tests.harness import Suite, delete_run, insert_run
from tests.workspace_service.test_leases import (
    World,
    acquire,
    backdate,
    end_run,
    lease_audit,
    lease_row,
    new_world,
)
from workspace_service import lease_sweep
from workspace_service.lease_sweep import SWEEP_LOCK_KEY, sweep_once


@pytest.fixture
async def world(suite: Suite, db: Database, tmp_path: Path) -> World:
    await drain(db)
    return await new_world(suite, db, tmp_path)


async def drain(db: Database) -> None:
    """Sweep until nothing is left to end (what earlier tests left behind)."""
    while True:
        result = await sweep_once(db)
        if not (result.expired or result.released):
            return


async def lease_for(world: World, run_id: str | None = None) -> messages.EnvironmentLease:
    """A fresh lease of the world's workspace (for ``run_id``, when given)."""
    return await world.owner.workspaces.AcquireEnvironmentLease(acquire(world, run_id=run_id or ""))


async def test_sweep_expires_leases_past_their_ttl(db: Database, world: World) -> None:
    lapsed = await lease_for(world)
    fresh = await lease_for(world)
    await backdate(db, lapsed.id)

    result = await sweep_once(db)
    assert (result.expired, result.released, result.ran) == ([lapsed.id], [], True)
    row = await lease_row(db, lapsed.id)
    assert (row["status"], row["failure_reason"]) == ("expired", "ttl_expired")
    assert row["released_at"] is not None
    audit = await lease_audit(db, lapsed.id)
    assert (audit[-1]["action"], audit[-1]["actor_type"]) == ("environment.lease_expired", "system")
    assert (await lease_row(db, fresh.id))["status"] == "active"


@pytest.mark.parametrize(
    ("run_status", "expected", "reason"),
    [
        ("failed", "failed", "Process exited with code 1"),
        ("timed_out", "failed", "Process exited with code 1"),
        ("cancelled", "expired", "run_cancelled"),
        ("succeeded", "released", None),
        (None, "released", None),  # the run row is gone
    ],
)
async def test_sweep_releases_leases_of_ended_runs(
    db: Database, world: World, run_status: str | None, expected: str, reason: str | None
) -> None:
    ended = await insert_run(db, company_id=world.company_id, agent_id=world.agent_id)
    live = await insert_run(db, company_id=world.company_id, agent_id=world.agent_id)
    lease = await lease_for(world, ended)
    kept = await lease_for(world, live)
    if run_status is None:
        await delete_run(db, ended)
    else:
        await end_run(db, ended, run_status, error="Process exited with code 1")

    result = await sweep_once(db)
    assert (result.released, result.expired) == ([lease.id], [])
    row = await lease_row(db, lease.id)
    assert (row["status"], row["failure_reason"]) == (expected, reason)
    audit = await lease_audit(db, lease.id)
    assert audit[-1]["action"] == "environment.lease_released"
    assert (await lease_row(db, kept.id))["status"] == "active"


async def test_sweep_works_in_bounded_batches(db: Database, world: World) -> None:
    leases = [await lease_for(world) for _ in range(3)]
    for lease in leases:
        await backdate(db, lease.id)
    first = await sweep_once(db, batch=2)
    second = await sweep_once(db, batch=2)
    assert (len(first.expired), first.filled(2)) == (2, True)
    assert (len(second.expired), second.filled(2)) == (1, False)
    assert sorted(first.expired + second.expired) == sorted(lease.id for lease in leases)


async def test_only_one_replica_sweeps_at_a_time(db: Database, world: World) -> None:
    lease = await lease_for(world)
    await backdate(db, lease.id)
    async with db.unit_of_work() as other_replica:
        await other_replica.execute(
            sql("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": SWEEP_LOCK_KEY}
        )
        result = await sweep_once(db)
        assert (result.ran, result.expired) == (False, [])
    assert (await lease_row(db, lease.id))["status"] == "active"
    assert (await sweep_once(db)).expired == [lease.id]


async def test_sweep_skips_a_lease_another_transaction_holds(db: Database, world: World) -> None:
    held = await lease_for(world)
    free = await lease_for(world)
    for lease in (held, free):
        await backdate(db, lease.id)
    async with db.unit_of_work() as renewing:
        await renewing.execute(
            sql("SELECT 1 FROM workspaces.environment_leases WHERE id = :id FOR UPDATE"),
            {"id": held.id},
        )
        # SKIP LOCKED: no wait for the row lock, the other lease is ended meanwhile.
        assert (await sweep_once(db)).expired == [free.id]
    assert (await sweep_once(db)).expired == [held.id]


async def test_sweep_forever_converges_in_the_background(db: Database, world: World) -> None:
    lease = await lease_for(world)
    await backdate(db, lease.id)
    task = asyncio.create_task(lease_sweep.sweep_forever(db, interval=0.05))
    try:
        deadline = time.monotonic() + 10
        while (await lease_row(db, lease.id))["status"] == "active":
            assert time.monotonic() < deadline, "the background sweep never expired the lease"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert (await lease_row(db, lease.id))["status"] == "expired"
