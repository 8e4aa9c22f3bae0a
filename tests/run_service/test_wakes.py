"""Wakes: coalescing, deferral,
skips, idempotency, races and the promotion of deferred wakes, on real PostgreSQL.

Rows are seeded straight into the tables and ``wake_agent`` / ``enqueue_wake`` /
``promote_deferred`` are called directly, so these tests need only the database."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from google.protobuf import struct_pb2
from sqlalchemy import text

from common.actor import Role
from common.db import Database
from common.errors import InvalidArgument, NotFound, PermissionDenied
from paperclip.runs.v1 import run_messages_pb2 as pb
from paperclip.runs.v1 import runs_pb2
from run_service import wake_store
from run_service.wakes import enqueue_wake, promote_deferred, wake_agent
from tests.harness import (
    Suite,
    admin,
    agent,
    board,
    expect_error,
    insert_run,
    service,
    set_run_status,
    unique_prefix,
)


async def seed_company(db: Database) -> str:
    async with db.transaction() as conn:
        row = await conn.execute(
            text(
                "INSERT INTO issues.companies (name, issue_prefix) VALUES ('Acme', :p) RETURNING id"
            ),
            {"p": unique_prefix()},
        )
        return str(row.scalar_one())


async def seed_agent(
    db: Database,
    company_id: str,
    *,
    status: str = "active",
    heartbeat: int = 0,
    wake_on_demand: bool = True,
) -> str:
    name = f"agent-{uuid.uuid4().hex[:8]}"
    async with db.transaction() as conn:
        row = await conn.execute(
            text(
                """
                INSERT INTO runs.agents (company_id, name, name_key, status,
                                         heartbeat_interval_seconds, wake_on_demand)
                VALUES (:c, :n, :n, :s, :h, :w) RETURNING id
                """
            ),
            {"c": company_id, "n": name, "s": status, "h": heartbeat, "w": wake_on_demand},
        )
        return str(row.scalar_one())


async def seed_issue(db: Database, company_id: str) -> str:
    number = uuid.uuid4().int % 1_000_000_000
    async with db.transaction() as conn:
        row = await conn.execute(
            text(
                """
                INSERT INTO issues.issues (company_id, issue_number, identifier, title, status)
                VALUES (:c, :n, :i, 'Fix it', 'todo') RETURNING id
                """
            ),
            {"c": company_id, "n": number, "i": f"T-{uuid.uuid4().hex}"},
        )
        return str(row.scalar_one())


async def set_agent_status(db: Database, agent_id: str, status: str) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            text("UPDATE runs.agents SET status = :s WHERE id = :a"), {"s": status, "a": agent_id}
        )


async def rows(db: Database, query: str, **params: Any) -> list[dict[str, Any]]:
    async with db.transaction() as conn:
        result = await conn.execute(text(query), params)
        return [dict(r) for r in result.mappings()]


async def wakes_of(db: Database, agent_id: str) -> list[dict[str, Any]]:
    return await rows(
        db,
        "SELECT * FROM runs.wakeup_requests WHERE agent_id = :a ORDER BY requested_at, id",
        a=agent_id,
    )


async def runs_of_issue(db: Database, issue_id: str) -> list[dict[str, Any]]:
    return await rows(
        db,
        "SELECT * FROM runs.heartbeat_runs WHERE issue_id = :i ORDER BY created_at, id",
        i=issue_id,
    )


def as_dict(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else dict(value)


def request(
    agent_id: str,
    *,
    source: int = pb.WAKE_SOURCE_ON_DEMAND,
    reason: str = "",
    issue_id: str = "",
    payload: dict[str, Any] | None = None,
    key: str = "",
) -> runs_pb2.WakeAgentRequest:
    struct = struct_pb2.Struct()
    struct.update(payload or {})
    return runs_pb2.WakeAgentRequest(
        agent_id=agent_id,
        source=source,  # type: ignore[arg-type]
        reason=reason,
        issue_id=issue_id,
        payload=struct,
        idempotency_key=key,
    )


async def wake(db: Database, agent_id: str, **kwargs: Any) -> runs_pb2.WakeAgentResponse:
    return await wake_agent(db, service(), request(agent_id, **kwargs))


async def test_c22_approval_like_comment_wake_while_same_agent_runs_is_deferred(
    db: Database,
) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    await insert_run(db, company_id=company, agent_id=a, issue_id=issue, status="running")

    out = await wake(
        db,
        a,
        reason="approval_approved",
        issue_id=issue,
        payload={"approvalId": "ap1", "approvalStatus": "approved"},
    )

    assert not out.HasField("run")
    assert out.wakeup_request.status == pb.WAKEUP_STATUS_DEFERRED
    deferred = [w for w in await wakes_of(db, a) if w["status"] == "deferred"]
    assert len(deferred) == 1
    payload = as_dict(deferred[0]["payload"])
    assert payload["issueId"] == issue
    assert payload["approvalId"] == "ap1"
    assert payload["approvalStatus"] == "approved"
    assert payload["wakeReason"] == "approval_approved"
    assert len(await runs_of_issue(db, issue)) == 1

    # A comment while the same run is running is a follow-up too: deferred, merged.
    out = await wake(db, a, reason="issue_commented", issue_id=issue, payload={"commentId": "c1"})
    assert not out.HasField("run")
    deferred = [w for w in await wakes_of(db, a) if w["status"] == "deferred"]
    assert len(deferred) == 1
    assert as_dict(deferred[0]["payload"])["commentIds"] == ["c1"]
    assert len(await runs_of_issue(db, issue)) == 1


async def test_c23_two_comments_during_run_merge_into_one_deferred_wake_with_ordered_comment_ids(
    db: Database,
) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    run1 = await insert_run(db, company_id=company, agent_id=a, issue_id=issue)

    for comment in ("c2", "c3"):
        out = await wake(
            db, a, reason="issue_commented", issue_id=issue, payload={"commentId": comment}
        )
        assert not out.HasField("run")

    deferred = [w for w in await wakes_of(db, a) if w["status"] == "deferred"]
    assert len(deferred) == 1
    assert deferred[0]["coalesced_count"] == 1
    payload = as_dict(deferred[0]["payload"])
    assert payload["commentIds"] == ["c2", "c3"]
    assert payload["latestCommentId"] == "c3"

    # Run 1 ends and releases the issue: the deferred batch becomes run 2.
    await set_run_status(db, run1, "succeeded")
    run2 = await promote_deferred(db, issue)
    assert run2 is not None
    runs = await runs_of_issue(db, issue)
    assert [str(r["id"]) for r in runs] == [run1, run2]
    context = as_dict(runs[1]["context"])
    assert context["commentIds"] == ["c2", "c3"]
    assert context["latestCommentId"] == "c3"
    assert runs[1]["status"] == "queued"
    assert runs[1]["wake_reason"] == "issue_commented"
    promoted = [w for w in await wakes_of(db, a) if str(w["id"]) == str(deferred[0]["id"])]
    assert promoted[0]["status"] == "queued"
    assert str(promoted[0]["run_id"]) == run2


async def test_c28_mention_while_another_agent_holds_the_issue_is_deferred(
    db: Database,
) -> None:
    company = await seed_company(db)
    primary = await seed_agent(db, company)
    mentioned = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    run1 = await insert_run(db, company_id=company, agent_id=primary, issue_id=issue)

    out = await wake(
        db, mentioned, reason="issue_comment_mentioned", issue_id=issue, payload={"commentId": "m"}
    )
    assert out.wakeup_request.status == pb.WAKEUP_STATUS_DEFERRED
    assert len(await runs_of_issue(db, issue)) == 1

    await set_run_status(db, run1, "succeeded")
    run2 = await promote_deferred(db, issue)
    runs = await runs_of_issue(db, issue)
    assert str(runs[-1]["id"]) == run2
    assert str(runs[-1]["agent_id"]) == mentioned
    assert runs[-1]["wake_reason"] == "issue_comment_mentioned"


async def test_same_agent_queued_issue_run_absorbs_wakes(db: Database) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    first = await wake(db, a, reason="issue_assigned", issue_id=issue, payload={"x": 1})
    assert first.run.status == pb.RUN_STATUS_QUEUED
    second = await wake(
        db, a, reason="issue_commented", issue_id=issue, payload={"commentId": "c9", "x": 2}
    )
    assert second.wakeup_request.status == pb.WAKEUP_STATUS_COALESCED
    assert second.wakeup_request.run_id == first.run.id
    assert not second.HasField("run")
    runs = await runs_of_issue(db, issue)
    assert len(runs) == 1
    context = as_dict(runs[0]["context"])
    assert context["x"] == 2  # incoming keys win
    assert context["commentIds"] == ["c9"]


async def test_e38_timer_wake_coalesces_into_queued_issueless_run(db: Database) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company, heartbeat=60)
    queued = await insert_run(db, company_id=company, agent_id=a, status="queued")

    out = await wake(db, a, source=pb.WAKE_SOURCE_TIMER)
    assert out.wakeup_request.status == pb.WAKEUP_STATUS_COALESCED
    assert out.wakeup_request.run_id == queued
    assert out.wakeup_request.reason == "heartbeat_timer"
    assert not out.HasField("run")

    # The same while the issue-less run is running; no burst of catch-up runs either.
    await set_run_status(db, queued, "running")
    for _ in range(3):
        out = await wake(db, a, source=pb.WAKE_SOURCE_TIMER)
        assert out.wakeup_request.status == pb.WAKEUP_STATUS_COALESCED
        assert out.wakeup_request.run_id == queued
    count = await rows(db, "SELECT count(*) AS n FROM runs.heartbeat_runs WHERE agent_id = :a", a=a)
    assert count[0]["n"] == 1

    # Once it ended, the next tick queues a fresh run.
    await set_run_status(db, queued, "succeeded")
    out = await wake(db, a, source=pb.WAKE_SOURCE_TIMER)
    assert out.wakeup_request.status == pb.WAKEUP_STATUS_QUEUED
    assert out.run.invocation_source == pb.WAKE_SOURCE_TIMER


async def test_wake_for_paused_agent_is_skipped_with_reason(db: Database) -> None:
    company = await seed_company(db)
    cases = [
        (await seed_agent(db, company, status="paused"), {}, "agent_paused"),
        (await seed_agent(db, company, status="terminated"), {}, "agent_terminated"),
        (
            await seed_agent(db, company, heartbeat=0),
            {"source": pb.WAKE_SOURCE_TIMER},
            "heartbeat_disabled",
        ),
        (
            await seed_agent(db, company, wake_on_demand=False),
            {},
            "wake_on_demand_disabled",
        ),
    ]
    for agent_id, extra, reason in cases:
        out = await wake(db, agent_id, **extra)
        assert out.wakeup_request.status == pb.WAKEUP_STATUS_SKIPPED
        assert out.wakeup_request.skip_reason == reason
        assert out.wakeup_request.HasField("finished_at")
        assert not out.HasField("run")
        count = await rows(
            db, "SELECT count(*) AS n FROM runs.heartbeat_runs WHERE agent_id = :a", a=agent_id
        )
        assert count[0]["n"] == 0


async def test_issue_of_another_company_is_skipped(db: Database) -> None:
    company = await seed_company(db)
    other = await seed_company(db)
    a = await seed_agent(db, company)
    foreign = await seed_issue(db, other)
    out = await wake(db, a, issue_id=foreign)
    assert out.wakeup_request.status == pb.WAKEUP_STATUS_SKIPPED
    assert out.wakeup_request.skip_reason == "issue_execution_issue_not_found"
    assert not out.HasField("run")


async def test_idempotency_key_returns_first_outcome(db: Database) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    first = await wake(db, a, issue_id=issue, key="k-1", payload={"n": 1})
    assert first.run.status == pb.RUN_STATUS_QUEUED
    again = await wake(db, a, issue_id=issue, key="k-1", payload={"n": 2})
    assert again.wakeup_request.id == first.wakeup_request.id
    assert again.wakeup_request.status == pb.WAKEUP_STATUS_QUEUED
    assert again.run.id == first.run.id
    assert len(await wakes_of(db, a)) == 1
    runs = await runs_of_issue(db, issue)
    assert len(runs) == 1
    assert as_dict(runs[0]["context"])["n"] == 1  # nothing was merged by the repeat

    # A skipped first outcome repeats as skipped, even after the agent is resumed.
    paused = await seed_agent(db, company, status="paused")
    skipped = await wake(db, paused, key="k-2")
    await set_agent_status(db, paused, "active")
    again = await wake(db, paused, key="k-2")
    assert again.wakeup_request.id == skipped.wakeup_request.id
    assert again.wakeup_request.status == pb.WAKEUP_STATUS_SKIPPED


async def test_concurrent_wakes_for_one_issue_create_one_run(db: Database) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    issue = await seed_issue(db, company)

    outs = await asyncio.gather(*(wake(db, a, issue_id=issue, payload={"i": i}) for i in range(20)))

    queued = [o for o in outs if o.wakeup_request.status == pb.WAKEUP_STATUS_QUEUED]
    coalesced = [o for o in outs if o.wakeup_request.status == pb.WAKEUP_STATUS_COALESCED]
    assert len(queued) == 1
    assert len(coalesced) == 19
    assert {o.wakeup_request.run_id for o in coalesced} == {queued[0].run.id}
    runs = await runs_of_issue(db, issue)
    assert [str(r["id"]) for r in runs] == [queued[0].run.id]


async def test_concurrent_wakes_with_one_key_write_one_wake(db: Database) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    outs = await asyncio.gather(*(wake(db, a, key="same") for _ in range(10)))
    assert len({o.wakeup_request.id for o in outs}) == 1
    assert len(await wakes_of(db, a)) == 1


async def test_promote_deferred_oldest_first_one_per_release(db: Database) -> None:
    company = await seed_company(db)
    holder = await seed_agent(db, company)
    first, second, third = [await seed_agent(db, company) for _ in range(3)]
    issue = await seed_issue(db, company)
    held = await insert_run(db, company_id=company, agent_id=holder, issue_id=issue)
    for agent_id in (first, second, third):
        out = await wake(db, agent_id, issue_id=issue, payload={"who": agent_id})
        assert out.wakeup_request.status == pb.WAKEUP_STATUS_DEFERRED

    # Nothing is promoted while the issue still has an active run.
    assert await promote_deferred(db, issue) is None

    await set_agent_status(db, first, "paused")
    await set_run_status(db, held, "succeeded")
    promoted = await promote_deferred(db, issue)
    assert promoted is not None
    runs = await runs_of_issue(db, issue)
    assert str(runs[-1]["agent_id"]) == second
    assert as_dict(runs[-1]["context"])["who"] == second
    skipped = (await wakes_of(db, first))[0]
    assert skipped["status"] == "failed"
    assert skipped["skip_reason"] == "agent_not_invokable"
    # One per release: the third still waits, also on a second call.
    assert await promote_deferred(db, issue) is None
    assert (await wakes_of(db, third))[0]["status"] == "deferred"

    await set_run_status(db, promoted, "succeeded")
    last = await promote_deferred(db, issue)
    runs = await runs_of_issue(db, issue)
    assert str(runs[-1]["id"]) == last
    assert str(runs[-1]["agent_id"]) == third
    assert await promote_deferred(db, issue) is None


async def test_own_write_never_wakes_the_writer(db: Database) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    run = await insert_run(db, company_id=company, agent_id=a, status="succeeded")
    async with db.unit_of_work() as tx:
        agent_row = await wake_store.agent_for_wake(tx, a)
        assert agent_row is not None
        wake_row, queued = await enqueue_wake(
            tx,
            agent=agent_row,
            source="assignment",
            reason="issue_commented",
            issue_id=issue,
            payload={"commentId": "own"},
            idempotency_key=None,
            requested_by=agent(a, company, run),
        )
    assert queued is None
    assert wake_row["status"] == "skipped"
    assert wake_row["skip_reason"] == "own_write"
    assert await runs_of_issue(db, issue) == []


async def test_wake_agent_checks_caller_and_fields(db: Database) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    with pytest.raises(PermissionDenied) as denied:
        await wake_agent(db, agent(a, company, None), request(a))
    assert denied.value.reason == "BOARD_REQUIRED"
    with pytest.raises(PermissionDenied):
        await wake_agent(db, board(company, Role.VIEWER), request(a))
    with pytest.raises(PermissionDenied):
        await wake_agent(db, board(str(uuid.uuid4())), request(a))
    with pytest.raises(NotFound) as missing:
        await wake_agent(db, service(), request(str(uuid.uuid4())))
    assert missing.value.reason == "AGENT_NOT_FOUND"
    with pytest.raises(InvalidArgument):
        await wake_agent(db, service(), request(a, source=0))
    with pytest.raises(InvalidArgument):
        await wake_agent(db, service(), request(a, reason="r" * 201))
    with pytest.raises(InvalidArgument):
        await wake_agent(db, service(), request(a, payload={"big": "x" * 70_000}))
    with pytest.raises(InvalidArgument):
        await wake_agent(db, service(), request(a, issue_id="not-a-uuid"))
    with pytest.raises(InvalidArgument):
        await wake_agent(db, service(), request(a, key="k" * 201))
    ok = await wake_agent(db, board(company, Role.MEMBER), request(a))
    assert ok.wakeup_request.status == pb.WAKEUP_STATUS_QUEUED
    assert ok.run.agent_id == a


async def test_wake_agent_rpc(suite: Suite, db: Database) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    runs = suite.clients(admin()).runs
    out = await runs.WakeAgent(request(a, issue_id=issue, reason="issue_assigned", key="rpc"))
    assert out.wakeup_request.status == pb.WAKEUP_STATUS_QUEUED
    assert out.run.issue_id == issue
    again = await runs.WakeAgent(request(a, issue_id=issue, key="rpc"))
    assert again.run.id == out.run.id
    error = await expect_error(
        suite.clients(agent(a, company, None)).runs.WakeAgent(request(a, issue_id=issue))
    )
    assert error.reason == "BOARD_REQUIRED"
