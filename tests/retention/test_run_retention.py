"""Retention of run events, wakeup requests and finished runs (``run_service.retention``):
each table filled past its horizon, swept in small batches; exactly the expired rows
go, in several batches, and every row still needed stays."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from common.config import Settings
from common.db import Database
from common.retention import Policy, sweep
from run_service import retention, wake_breaker_store
from tests.retention import support as s

BATCH = 25
LOOP_WINDOW_SECONDS = 1800


async def test_run_events_of_finished_runs_go_after_their_horizon_the_rest_stay(
    own_db: Database, settings: Settings
) -> None:
    db = own_db
    company = await s.company(db)
    agent = await s.agent(db, company)
    expired = await s.runs(db, company, agent, 30, days_ago=20, events=7)
    recent = await s.runs(db, company, agent, 3, days_ago=5, events=4)
    live = await s.runs(db, company, agent, 1, status="running", days_ago=40, events=6)
    locked = await s.runs(db, company, agent, 1, days_ago=40, events=5)
    await s.scalar(
        db,
        "UPDATE issues.issues SET execution_run_id = :r WHERE id = :i",
        r=locked[0],
        i=await s.issue(db, company, status="in_progress", assignee=agent),
    )

    result = await sweep(
        db, retention.policies(settings)[:1], lock_key="test-run-events", batch=BATCH, pause=0
    )

    assert result.deleted("runs.run_events") == 30 * 7
    assert result.batches("runs.run_events") >= 30 * 7 // BATCH
    assert await s.count_in(db, "runs.run_events", "run_id", expired) == 0
    assert await s.count_in(db, "runs.run_events", "run_id", recent) == 3 * 4
    assert await s.count_in(db, "runs.run_events", "run_id", live) == 6
    assert await s.count_in(db, "runs.run_events", "run_id", locked) == 5
    # The runs themselves are younger than their own horizon: all still there.
    assert await s.count_in(db, "runs.heartbeat_runs", "id", expired + recent) == 33


async def test_wakes_skipped_and_coalesced_go_first_live_wakes_stay(
    own_db: Database, settings: Settings
) -> None:
    db = own_db
    company = await s.company(db)
    agent = await s.agent(db, company)
    skipped = await s.wakes(db, company, agent, 60, status="skipped", days_ago=5)
    coalesced = await s.wakes(db, company, agent, 20, status="coalesced", days_ago=4)
    young_skips = await s.wakes(db, company, agent, 10, status="skipped", days_ago=1)
    completed_old = await s.wakes(db, company, agent, 30, status="completed", days_ago=40)
    completed_5d = await s.wakes(db, company, agent, 10, status="completed", days_ago=5)
    queued = await s.wakes(db, company, agent, 2, status="queued", days_ago=60)
    claimed = await s.wakes(db, company, agent, 2, status="claimed", days_ago=60)
    deferred = await s.wakes(
        db, company, agent, 1, status="deferred", days_ago=60, issue_id=await s.issue(db, company)
    )
    # A live run started for an old, already completed wake: that wake stays.
    started_for = await s.wakes(db, company, agent, 1, status="completed", days_ago=40)
    run = (await s.runs(db, company, agent, 1, status="running"))[0]
    await s.scalar(
        db,
        "UPDATE runs.heartbeat_runs SET wakeup_request_id = :w WHERE id = :r",
        w=started_for[0],
        r=run,
    )

    result = await sweep(
        db, retention.policies(settings)[1:3], lock_key="test-wakes", batch=BATCH, pause=0
    )

    assert result.deleted("runs.wakeup_requests:skipped") == 80
    assert result.batches("runs.wakeup_requests:skipped") == 80 // BATCH + 1
    assert result.deleted("runs.wakeup_requests:finished") == 30
    assert result.batches("runs.wakeup_requests:finished") == 2
    assert await s.count_in(db, "runs.wakeup_requests", "id", skipped + coalesced) == 0
    assert await s.count_in(db, "runs.wakeup_requests", "id", completed_old) == 0
    kept = young_skips + completed_5d + queued + claimed + deferred + started_for
    assert await s.count_in(db, "runs.wakeup_requests", "id", kept) == len(kept)


async def test_finished_runs_go_with_their_events_runs_still_needed_stay(
    own_db: Database, settings: Settings
) -> None:
    db = own_db
    company = await s.company(db)
    agent = await s.agent(db, company)
    expired = await s.runs(db, company, agent, 70, status="failed", days_ago=40, events=2)
    young = await s.runs(db, company, agent, 5, days_ago=10, events=2)
    live = await s.runs(db, company, agent, 2, status="queued", days_ago=45)
    # Named by an issue's checkout/execution lock.
    locked = await s.runs(db, company, agent, 2, days_ago=45)
    for column, run in zip(("checkout_run_id", "execution_run_id"), locked, strict=True):
        await s.scalar(
            db,
            f"UPDATE issues.issues SET {column} = :r WHERE id = :i",
            r=run,
            i=await s.issue(db, company, status="in_progress", assignee=agent),
        )
    # Retried by a live run (a foreign key), and a chain of two old retries: the whole
    # chain goes, child first.
    retried = await s.runs(db, company, agent, 1, days_ago=45)
    await s.runs(db, company, agent, 1, status="running", retry_of=retried[0])
    chain_root = await s.runs(db, company, agent, 1, days_ago=42)
    chain_child = await s.runs(db, company, agent, 1, days_ago=41, retry_of=chain_root[0])
    # Named by a kept wake (a foreign key) and by wakes swept first in the same sweep.
    claimed_for = await s.runs(db, company, agent, 1, days_ago=45)
    await s.wakes(db, company, agent, 1, status="claimed", days_ago=45, run_id=claimed_for[0])
    completed_for = await s.runs(db, company, agent, 1, days_ago=45)
    await s.wakes(db, company, agent, 3, status="completed", days_ago=45, run_id=completed_for[0])
    # Named by an active lease.
    leased = await s.runs(db, company, agent, 1, days_ago=45)
    workspace = await s.workspace(db, company)
    await s.scalar(
        db,
        """
        INSERT INTO workspaces.environment_leases (company_id, environment_id, workspace_id,
            run_id, holder_type, holder_id, ttl_seconds, expires_at)
        VALUES (:c, gen_random_uuid(), :w, :r, 'agent', 'a', 60, now() + interval '1 minute')
        """,
        c=company,
        w=workspace,
        r=leased[0],
    )
    # The latest run of an open issue's agent stays; an older one of the pair goes.
    open_issue = await s.issue(db, company, assignee=agent)
    older_of_pair = await s.runs(db, company, agent, 1, days_ago=50, issue_id=open_issue)
    latest_of_pair = await s.runs(db, company, agent, 1, days_ago=45, issue_id=open_issue)
    closed_issue = await s.issue(db, company, status="done", assignee=agent)
    of_closed = await s.runs(db, company, agent, 1, days_ago=45, issue_id=closed_issue)

    result = await sweep(
        db, retention.policies(settings), lock_key="test-runs", batch=BATCH, pause=0
    )

    gone = expired + chain_root + chain_child + completed_for + older_of_pair + of_closed
    assert result.deleted("runs.heartbeat_runs") == len(gone)
    assert result.batches("runs.heartbeat_runs") >= len(gone) // BATCH + 1
    assert result.deleted("runs.wakeup_requests:finished") == 3
    assert await s.count_in(db, "runs.heartbeat_runs", "id", gone) == 0
    assert await s.count_in(db, "runs.run_events", "run_id", expired) == 0
    kept = young + live + locked + retried + claimed_for + leased + latest_of_pair
    assert await s.count_in(db, "runs.heartbeat_runs", "id", kept) == len(kept)
    assert await s.count_in(db, "runs.run_events", "run_id", young) == 5 * 2


async def test_a_zero_horizon_keeps_everything(own_db: Database, settings: Settings) -> None:
    db = own_db
    company = await s.company(db)
    agent = await s.agent(db, company)
    old = await s.runs(db, company, agent, 3, days_ago=400, events=2)
    off = replace(settings, retention_runs_days=0, retention_run_events_days=0)

    result = await sweep(db, retention.policies(off), lock_key="test-off", batch=BATCH, pause=0)

    assert result.batches("runs.heartbeat_runs") == 0
    assert await s.count_in(db, "runs.run_events", "run_id", old) == 6
    assert retention.policies(off)[0].keep is None
    assert retention.policies(settings)[0].keep == timedelta(days=14)


def wake_breakers_policy(settings: Settings) -> Policy:
    (policy,) = [p for p in retention.policies(settings) if p.table == "runs.wake_breakers"]
    return policy


async def loop_standing(db: Database, company: str, agent: str, issue: str) -> tuple[bool, int]:
    async with db.unit_of_work() as tx:
        row = await wake_breaker_store.loop_state(
            tx,
            company_id=company,
            agent_id=agent,
            issue_id=issue,
            reason="issue_commented",
            window=LOOP_WINDOW_SECONDS,
        )
    return bool(row["standing"]), int(row["runs"])


async def test_wake_breaker_trips_go_once_they_decide_nothing(
    own_db: Database, settings: Settings
) -> None:
    db = own_db
    company = await s.company(db)
    agent = await s.agent(db, company)
    issues = {name: await s.issue(db, company) for name in ("budget", *"ABCDEF")}
    budget_gone = [
        await s.trip(db, company, agent, issues["budget"], kind="daily_run_budget", days_ago=40),
        await s.trip(
            db, company, agent, None, kind="daily_run_budget", days_ago=40, announced=False
        ),
    ]
    budget_kept = [
        # Its comment is still to be posted.
        await s.trip(
            db,
            company,
            agent,
            issues["budget"],
            kind="daily_run_budget",
            days_ago=40,
            announced=False,
        ),
        await s.trip(db, company, agent, issues["budget"], kind="daily_run_budget", days_ago=10),
    ]
    # A: superseded by a later trip, which stands (nothing cleared it).
    superseded = await s.trip(db, company, agent, issues["A"], days_ago=50)
    standing = await s.trip(db, company, agent, issues["A"], days_ago=40)
    # B: cleared by a board comment 35 days ago; E: by an agent's status change.
    cleared_by_board = await s.trip(db, company, agent, issues["B"], days_ago=40)
    await s.activity(
        db,
        company,
        issues["B"],
        actor="user",
        action="issue.comment_added",
        status=False,
        days_ago=35,
    )
    cleared_by_status = await s.trip(db, company, agent, issues["E"], days_ago=40)
    await s.activity(
        db, company, issues["E"], actor="agent", action="issue.updated", status=True, days_ago=35
    )
    # C: cleared 2 days ago, within the longest loop window: it still bounds the count.
    cleared_lately = await s.trip(db, company, agent, issues["C"], days_ago=40)
    await s.activity(
        db, company, issues["C"], actor="user", action="issue.updated", status=False, days_ago=2
    )
    # D: an agent's comment does not clear a trip; F: a young trip.
    not_cleared = await s.trip(db, company, agent, issues["D"], days_ago=40)
    await s.activity(
        db,
        company,
        issues["D"],
        actor="agent",
        action="issue.comment_added",
        status=False,
        days_ago=35,
    )
    young = await s.trip(db, company, agent, issues["F"], days_ago=5)
    before = {name: await loop_standing(db, company, agent, issues[name]) for name in "ABCDEF"}

    result = await sweep(
        db, [wake_breakers_policy(settings)], lock_key="test-breakers", batch=2, pause=0
    )

    gone = [*budget_gone, superseded, cleared_by_board, cleared_by_status]
    kept = [*budget_kept, standing, cleared_lately, not_cleared, young]
    assert await s.count_in(db, "runs.wake_breakers", "id", gone) == 0
    assert await s.count_in(db, "runs.wake_breakers", "id", kept) == len(kept)
    assert result.deleted("runs.wake_breakers") >= len(gone)
    assert result.batches("runs.wake_breakers") >= 3
    # What the breaker decides on each issue is what it decided before the sweep.
    after = {name: await loop_standing(db, company, agent, issues[name]) for name in "ABCDEF"}
    assert after == before
    assert {name for name, (stands, _) in after.items() if stands} == {"A", "D", "F"}


async def test_a_zero_wake_breaker_horizon_keeps_every_trip(
    own_db: Database, settings: Settings
) -> None:
    db = own_db
    company = await s.company(db)
    agent = await s.agent(db, company)
    old = await s.trip(db, company, agent, None, kind="daily_run_budget", days_ago=400)
    off = replace(settings, retention_wake_breakers_days=0)

    result = await sweep(db, [wake_breakers_policy(off)], lock_key="test-off", batch=BATCH, pause=0)

    assert result.batches("runs.wake_breakers") == 0
    assert await s.count_in(db, "runs.wake_breakers", "id", [old]) == 1
