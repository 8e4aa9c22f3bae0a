"""Timer wakes: one per interval, deterministic
jitter, no burst after downtime, coalesced into the agent's issue-less run."""

from __future__ import annotations

from common.db import Database
from common.sql import Row, sql
from run_service.timers import jitter_seconds, tick_timers
from tests.harness import Clients, new_agent


async def _agent(db: Database, clients: Clients, company: str, interval: int) -> str:
    agent = (await new_agent(clients, company)).id
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql("UPDATE runs.agents SET heartbeat_interval_seconds = :n WHERE id = :a"),
            {"n": interval, "a": agent},
        )
    return agent


async def _last_heartbeat(db: Database, agent: str, seconds_ago: float) -> None:
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql(
                """
                INSERT INTO runs.agent_runtime_state (agent_id, last_heartbeat_at)
                VALUES (:a, now() - make_interval(secs => :s))
                ON CONFLICT (agent_id) DO UPDATE SET last_heartbeat_at = EXCLUDED.last_heartbeat_at
                """
            ),
            {"a": agent, "s": seconds_ago},
        )


async def _timer_wakes(db: Database, agent: str) -> list[Row]:
    async with db.unit_of_work() as tx:
        return await tx.fetch(
            sql(
                "SELECT * FROM runs.wakeup_requests WHERE agent_id = :a AND source = 'timer'"
                " ORDER BY requested_at"
            ),
            {"a": agent},
        )


async def _runs(db: Database, agent: str) -> list[Row]:
    async with db.unit_of_work() as tx:
        return await tx.fetch(
            sql("SELECT * FROM runs.heartbeat_runs WHERE agent_id = :a ORDER BY created_at"),
            {"a": agent},
        )


async def test_one_wake_per_interval_and_none_right_after(
    db: Database, admin_clients: Clients, company_id: str
) -> None:
    agent = await _agent(db, admin_clients, company_id, 60)
    # A new agent's interval counts from its creation.
    assert (await tick_timers(db, company_ids=[company_id])).checked == 0
    await _last_heartbeat(db, agent, 60 + 7)  # past interval + jitter (< 6 s)
    tick = await tick_timers(db, company_ids=[company_id])
    assert (tick.checked, tick.enqueued) == (1, 1)
    wakes = await _timer_wakes(db, agent)
    assert [(w["status"], w["reason"]) for w in wakes] == [("queued", "heartbeat_timer")]
    runs = await _runs(db, agent)
    assert len(runs) == 1
    assert (runs[0]["status"], runs[0]["invocation_source"], runs[0]["issue_id"]) == (
        "queued",
        "timer",
        None,
    )
    tick = await tick_timers(db, company_ids=[company_id])
    assert tick.checked == 0
    assert len(await _timer_wakes(db, agent)) == 1


async def test_downtime_gives_one_wake_not_a_burst_and_coalesces(
    db: Database, admin_clients: Clients, company_id: str
) -> None:
    agent = await _agent(db, admin_clients, company_id, 60)
    await _last_heartbeat(db, agent, 86400)  # a day of missed intervals
    tick = await tick_timers(db, company_ids=[company_id])
    assert (tick.checked, tick.enqueued) == (1, 1)
    for _ in range(3):
        assert (await tick_timers(db, company_ids=[company_id])).checked == 0
    assert len(await _timer_wakes(db, agent)) == 1
    # Another day passes while the first timer run is still queued: one more wake, merged
    # into that run.
    await _last_heartbeat(db, agent, 86400)
    tick = await tick_timers(db, company_ids=[company_id])
    assert (tick.checked, tick.coalesced) == (1, 1)
    wakes = await _timer_wakes(db, agent)
    assert [w["status"] for w in wakes] == ["queued", "coalesced"]
    assert wakes[1]["run_id"] == wakes[0]["run_id"]
    assert len(await _runs(db, agent)) == 1


async def test_paused_agent_and_agent_without_interval_get_no_timer_wake(
    db: Database, admin_clients: Clients, company_id: str
) -> None:
    paused = await _agent(db, admin_clients, company_id, 60)
    off = await _agent(db, admin_clients, company_id, 0)
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql("UPDATE runs.agents SET status = 'paused' WHERE id = :a"), {"a": paused}
        )
    await _last_heartbeat(db, paused, 86400)
    await _last_heartbeat(db, off, 86400)
    assert (await tick_timers(db, company_ids=[company_id])).checked == 0
    assert await _timer_wakes(db, paused) == []
    assert await _timer_wakes(db, off) == []


async def test_jitter_is_deterministic_and_delays_the_wake(
    db: Database, admin_clients: Clients, company_id: str
) -> None:
    interval = 600
    agents = [await _agent(db, admin_clients, company_id, interval) for _ in range(6)]
    jitters = {a: jitter_seconds(a, interval) for a in agents}
    assert all(0 <= j < interval // 10 for j in jitters.values())
    assert jitters == {a: jitter_seconds(a, interval) for a in agents}
    assert len(set(jitters.values())) > 1
    # Exactly at interval + jitter - 2 s nobody is due (the SQL uses the same jitter)...
    for agent, jitter in jitters.items():
        await _last_heartbeat(db, agent, interval + jitter - 2)
    assert (await tick_timers(db, company_ids=[company_id])).checked == 0
    # ...and 2 s past it everybody is, once.
    for agent, jitter in jitters.items():
        await _last_heartbeat(db, agent, interval + jitter + 2)
    assert (await tick_timers(db, company_ids=[company_id])).enqueued == len(agents)
    assert (await tick_timers(db, company_ids=[company_id])).checked == 0


async def test_a_tick_is_bounded(db: Database, admin_clients: Clients, company_id: str) -> None:
    agents = [await _agent(db, admin_clients, company_id, 60) for _ in range(3)]
    for agent in agents:
        await _last_heartbeat(db, agent, 3600)
    assert (await tick_timers(db, company_ids=[company_id], limit=2)).enqueued == 2
    assert (await tick_timers(db, company_ids=[company_id], limit=2)).enqueued == 1
    assert (await tick_timers(db, company_ids=[company_id], limit=2)).checked == 0
