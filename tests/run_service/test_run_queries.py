"""GetRun, ListRuns, ListRunEvents and WatchRun, called directly on a real database.

Runs and events are seeded with SQL and ``run_store.append_events`` (the writers are
other modules); the functions under test are called with actors from the harness.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from common.actor import Actor, Role
from common.db import Database
from common.errors import InvalidArgument, NotFound, PaperclipError, PermissionDenied
from common.pagination import parse_page
from common.sql import sql
from paperclip.runs.v1 import run_messages_pb2 as pb
from paperclip.runs.v1 import runs_pb2
from run_service import run_queries, run_store
from tests.harness import Suite, admin, agent, board, expect_error, unique_prefix

# --- seeding (shared with test_run_control) -------------------------------------------


@dataclass(frozen=True)
class World:
    """A company with one agent, for a test."""

    company_id: str
    agent_id: str


_INSERT_COMPANY = sql(
    "INSERT INTO issues.companies (name, issue_prefix) VALUES ('Acme', :prefix) RETURNING id"
)
_INSERT_AGENT = sql(
    """
    INSERT INTO runs.agents (company_id, name, name_key, grace_seconds)
    VALUES (:company, :name, :name, :grace) RETURNING id
    """
)
_INSERT_RUN = sql(
    """
    INSERT INTO runs.heartbeat_runs
        (company_id, agent_id, issue_id, status, created_at, started_at, finished_at,
         wakeup_request_id, error_code, error)
    VALUES (:company, :agent, :issue, :status, :created,
            CASE WHEN :status <> 'queued' THEN now() END,
            CASE WHEN :status NOT IN ('queued', 'running') THEN now() END,
            :wake, :error_code, :error)
    RETURNING id
    """
)


async def new_world(db: Database, *, grace: int = 2) -> World:
    """A fresh company and agent (tests share one database)."""
    async with db.unit_of_work() as tx:
        company = await tx.fetchval(_INSERT_COMPANY, {"prefix": unique_prefix()})
        agent_id = await tx.fetchval(
            _INSERT_AGENT,
            {"company": company, "name": f"agent-{uuid.uuid4().hex[:8]}", "grace": grace},
        )
    return World(str(company), str(agent_id))


async def seed_run(
    db: Database,
    world: World,
    *,
    status: str = "running",
    agent_id: str | None = None,
    issue_id: str | None = None,
    created_at: datetime | None = None,
    wakeup_request_id: str | None = None,
    error_code: str | None = None,
    error: str | None = None,
) -> str:
    """A run row; its id."""
    async with db.unit_of_work() as tx:
        run_id = await tx.fetchval(
            _INSERT_RUN,
            {
                "company": world.company_id,
                "agent": agent_id or world.agent_id,
                "issue": issue_id,
                "status": status,
                "created": created_at or datetime.now(UTC),
                "wake": wakeup_request_id,
                "error_code": error_code,
                "error": error,
            },
        )
    return str(run_id)


async def append(
    db: Database, run_id: str, events: Sequence[tuple[str, str, Mapping[str, Any] | None]]
) -> int:
    """Append events as the executor does; the first seq."""
    async with db.unit_of_work() as tx:
        return await run_store.append_events(tx, run_id, events)


async def finish(db: Database, run_id: str, status: str = "succeeded") -> None:
    """The executor's terminal write: status and the terminal lifecycle event together."""
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql("UPDATE runs.heartbeat_runs SET status = :s, finished_at = now() WHERE id = :id"),
            {"s": status, "id": run_id},
        )
        await run_store.append_events(
            tx, run_id, [("lifecycle", f"run {status}", {"terminal": True, "status": status})]
        )


async def fetch_one(db: Database, query: str, **params: Any) -> Any:
    async with db.unit_of_work() as tx:
        return await tx.fetchval(sql(query), params)


def stdout(n: int) -> list[tuple[str, str, Mapping[str, Any] | None]]:
    return [("stdout", f"line {i}\n", None) for i in range(n)]


async def expect(error: type[PaperclipError], call: Any) -> PaperclipError:
    with pytest.raises(error) as info:
        await call
    return info.value


async def wait_until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll ``predicate`` every 10 ms; fail the test after ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def fields(error: PaperclipError) -> set[str]:
    return {v.field for v in error.violations}


# --- GetRun ---------------------------------------------------------------------------


async def test_get_run_checks_company_access(db: Database) -> None:
    world, other = await new_world(db), await new_world(db)
    run_id = await seed_run(db, world, status="running")

    run = await run_queries.get_run(db, board(world.company_id, Role.VIEWER), run_id)
    assert run.id == run_id and run.status == pb.RUN_STATUS_RUNNING
    assert run.company_id == world.company_id and run.agent_id == world.agent_id
    assert (await run_queries.get_run(db, agent(world.agent_id, world.company_id, None), run_id)).id

    denied = await expect(
        PermissionDenied, run_queries.get_run(db, board(other.company_id), run_id)
    )
    assert denied.reason == "COMPANY_ACCESS_DENIED"
    denied = await expect(
        PermissionDenied,
        run_queries.get_run(db, agent(other.agent_id, other.company_id, None), run_id),
    )
    assert denied.reason == "COMPANY_ACCESS_DENIED"


async def test_get_run_missing_and_malformed(db: Database) -> None:
    missing = await expect(NotFound, run_queries.get_run(db, admin(), str(uuid.uuid4())))
    assert missing.reason == "RUN_NOT_FOUND"
    bad = await expect(InvalidArgument, run_queries.get_run(db, admin(), "not-a-uuid"))
    assert fields(bad) == {"run_id"}
    empty = await expect(InvalidArgument, run_queries.get_run(db, admin(), ""))
    assert fields(empty) == {"run_id"}


# --- ListRuns -------------------------------------------------------------------------


async def _all_pages(
    db: Database, actor: Actor, request: runs_pb2.ListRunsRequest
) -> tuple[list[str], int]:
    ids: list[str] = []
    pages = 0
    while True:
        response = await run_queries.list_runs(db, actor, request)
        pages += 1
        ids.extend(run.id for run in response.runs)
        if not response.next_page_token:
            return ids, pages
        request.page_token = response.next_page_token


async def test_list_runs_newest_first_pages_without_duplicates(db: Database) -> None:
    world = await new_world(db)
    base = datetime.now(UTC) - timedelta(hours=1)
    created: list[tuple[datetime, str]] = []
    for i in range(11):
        # Pairs of runs share a created_at: the id breaks the tie.
        at = base + timedelta(seconds=i // 2)
        created.append((at, await seed_run(db, world, status="succeeded", created_at=at)))
    expected = [run_id for _, run_id in sorted(created, key=lambda c: (c[0], c[1]), reverse=True)]

    actor = board(world.company_id, Role.VIEWER)
    ids, pages = await _all_pages(
        db, actor, runs_pb2.ListRunsRequest(company_id=world.company_id, page_size=3)
    )
    assert ids == expected
    assert pages == 4
    assert len(set(ids)) == 11

    # Default page size holds them all; no next page.
    response = await run_queries.list_runs(
        db, actor, runs_pb2.ListRunsRequest(company_id=world.company_id)
    )
    assert [r.id for r in response.runs] == expected and response.next_page_token == ""
    # Larger than the maximum is coerced, not refused.
    huge = await run_queries.list_runs(
        db, actor, runs_pb2.ListRunsRequest(company_id=world.company_id, page_size=100_000)
    )
    assert len(huge.runs) == 11


async def test_list_runs_filters(db: Database) -> None:
    world = await new_world(db)
    async with db.unit_of_work() as tx:
        second = str(
            await tx.fetchval(
                _INSERT_AGENT,
                {"company": world.company_id, "name": f"b-{uuid.uuid4().hex[:6]}", "grace": 2},
            )
        )
    issue = str(uuid.uuid4())
    queued = await seed_run(db, world, status="queued", issue_id=issue)
    running = await seed_run(db, world, status="running")
    failed = await seed_run(db, world, status="failed", agent_id=second, issue_id=issue)
    done = await seed_run(db, world, status="succeeded", agent_id=second)
    actor = admin()

    async def ids(**kw: Any) -> set[str]:
        found, _ = await _all_pages(
            db, actor, runs_pb2.ListRunsRequest(company_id=world.company_id, page_size=1, **kw)
        )
        return set(found)

    assert await ids() == {queued, running, failed, done}
    assert await ids(agent_id=second) == {failed, done}
    assert await ids(issue_id=issue) == {queued, failed}
    assert await ids(statuses=[pb.RUN_STATUS_QUEUED, pb.RUN_STATUS_RUNNING]) == {queued, running}
    assert await ids(agent_id=second, statuses=[pb.RUN_STATUS_FAILED], issue_id=issue) == {failed}
    assert await ids(agent_id=str(uuid.uuid4())) == set()


async def test_list_runs_bad_requests(db: Database) -> None:
    world = await new_world(db)
    for _ in range(3):
        await seed_run(db, world)
    actor = admin()

    async def bad(**kw: Any) -> set[str]:
        error = await expect(
            InvalidArgument, run_queries.list_runs(db, actor, runs_pb2.ListRunsRequest(**kw))
        )
        assert error.reason == "INVALID_ARGUMENT"
        return fields(error)

    assert await bad() == {"company_id"}
    assert await bad(company_id="x", agent_id="y", issue_id="z") == {
        "company_id",
        "agent_id",
        "issue_id",
    }
    assert await bad(company_id=world.company_id, page_size=-1) == {"page_size"}
    assert await bad(company_id=world.company_id, statuses=[0]) == {"statuses[0]"}
    assert await bad(company_id=world.company_id, statuses=[pb.RUN_STATUS_RUNNING, 99]) == {
        "statuses[1]"
    }
    assert await bad(company_id=world.company_id, page_token="garbage!") == {"page_token"}
    first = await run_queries.list_runs(
        db, actor, runs_pb2.ListRunsRequest(company_id=world.company_id, page_size=1)
    )
    assert first.next_page_token
    # A token of other filters, and a forged cursor, are refused.
    assert await bad(
        company_id=world.company_id, agent_id=world.agent_id, page_token=first.next_page_token
    ) == {"page_token"}
    forged = parse_page(
        1, "", company_id=world.company_id, agent_id=None, issue_id=None, statuses=[]
    )
    token = forged.next_token({"t": "yesterday", "i": "nope"})
    assert await bad(company_id=world.company_id, page_size=1, page_token=token) == {"page_token"}

    missing = await expect(
        NotFound,
        run_queries.list_runs(db, actor, runs_pb2.ListRunsRequest(company_id=str(uuid.uuid4()))),
    )
    assert missing.reason == "COMPANY_NOT_FOUND"


async def test_list_runs_of_another_company_is_denied(db: Database) -> None:
    world, other = await new_world(db), await new_world(db)
    await seed_run(db, world)
    for actor in (board(other.company_id), agent(other.agent_id, other.company_id, None)):
        error = await expect(
            PermissionDenied,
            run_queries.list_runs(db, actor, runs_pb2.ListRunsRequest(company_id=world.company_id)),
        )
        assert error.reason == "COMPANY_ACCESS_DENIED"


# --- ListRunEvents --------------------------------------------------------------------


async def test_list_run_events_pages_after_seq(db: Database) -> None:
    world = await new_world(db)
    run_id = await seed_run(db, world)
    assert await append(db, run_id, stdout(10)) == 1
    actor = board(world.company_id, Role.VIEWER)

    request = runs_pb2.ListRunEventsRequest(run_id=run_id, after_seq=3, page_size=4)
    first = await run_queries.list_run_events(db, actor, request)
    assert [e.seq for e in first.events] == [4, 5, 6, 7]
    assert first.events[0].type == pb.RUN_EVENT_TYPE_STDOUT
    assert first.events[0].message == "line 3\n" and first.events[0].run_id == run_id
    request.page_token = first.next_page_token
    second = await run_queries.list_run_events(db, actor, request)
    assert [e.seq for e in second.events] == [8, 9, 10]
    assert second.next_page_token == ""

    everything = await run_queries.list_run_events(
        db, actor, runs_pb2.ListRunEventsRequest(run_id=run_id)
    )
    assert [e.seq for e in everything.events] == list(range(1, 11))
    assert everything.next_page_token == ""
    none_left = await run_queries.list_run_events(
        db, actor, runs_pb2.ListRunEventsRequest(run_id=run_id, after_seq=10)
    )
    assert list(none_left.events) == [] and none_left.next_page_token == ""


async def test_list_run_events_errors(db: Database) -> None:
    world, other = await new_world(db), await new_world(db)
    run_id = await seed_run(db, world)
    await append(db, run_id, stdout(3))

    async def call(actor: Actor, **kw: Any) -> runs_pb2.ListRunEventsResponse:
        return await run_queries.list_run_events(db, actor, runs_pb2.ListRunEventsRequest(**kw))

    bad = await expect(InvalidArgument, call(admin(), run_id=run_id, after_seq=-1, page_size=-5))
    assert fields(bad) == {"after_seq", "page_size"}
    bad = await expect(InvalidArgument, call(admin(), run_id="nope"))
    assert fields(bad) == {"run_id"}
    bad = await expect(InvalidArgument, call(admin(), run_id=run_id, page_token="%%%"))
    assert fields(bad) == {"page_token"}
    page = await call(admin(), run_id=run_id, page_size=1)
    bad = await expect(
        InvalidArgument, call(admin(), run_id=run_id, after_seq=2, page_token=page.next_page_token)
    )
    assert fields(bad) == {"page_token"}
    missing = await expect(NotFound, call(admin(), run_id=str(uuid.uuid4())))
    assert missing.reason == "RUN_NOT_FOUND"
    denied = await expect(PermissionDenied, call(board(other.company_id), run_id=run_id))
    assert denied.reason == "COMPANY_ACCESS_DENIED"


# --- WatchRun -------------------------------------------------------------------------


async def _collect(
    db: Database, actor: Actor, run_id: str, after_seq: int = 0, seen: list[Any] | None = None
) -> list[tuple[int, float]]:
    """(seq, monotonic arrival time) of every event the stream yields until it ends."""
    out: list[tuple[int, float]] = [] if seen is None else seen
    request = runs_pb2.WatchRunRequest(run_id=run_id, after_seq=after_seq)
    async for event in run_queries.watch_run(db, actor, request):
        out.append((event.seq, time.monotonic()))
    return out


async def test_watch_run_replays_then_streams_until_terminal_event(db: Database) -> None:
    world = await new_world(db)
    run_id = await seed_run(db, world)
    await append(db, run_id, stdout(3))
    seen: list[Any] = []
    watcher = asyncio.create_task(
        _collect(db, board(world.company_id, Role.VIEWER), run_id, 1, seen)
    )
    await asyncio.sleep(0.3)
    assert [seq for seq, _ in seen] == [2, 3]  # replay of the stored events after 1

    written = time.monotonic()
    await append(db, run_id, [("stderr", "oops", None)])
    await wait_until(lambda: len(seen) >= 3)
    # Woken by the notification, well before the 1 s re-check.
    assert seen[2][1] - written < 0.5

    await append(db, run_id, [("lifecycle", "progress", {"terminal": False})])
    await finish(db, run_id)
    # An event written after the terminal one is never sent: the stream has ended.
    result = await asyncio.wait_for(watcher, 3)
    assert [seq for seq, _ in result] == [2, 3, 4, 5, 6]
    listener = run_queries.shared_listener(db)
    assert listener.watchers == 0


async def test_watch_run_on_terminal_run_ends_after_replay(db: Database) -> None:
    world = await new_world(db)
    # Many more events than one read holds: replay pages through them in order.
    run_id = await seed_run(db, world)
    total = run_queries.WATCH_BATCH * 2 + 17
    await append(db, run_id, stdout(total))
    await finish(db, run_id, "failed")
    result = await asyncio.wait_for(_collect(db, admin(), run_id), 5)
    assert [seq for seq, _ in result] == list(range(1, total + 2))

    # A terminal run without a terminal event (an older writer): ends once replayed.
    bare = await seed_run(db, world, status="cancelled")
    await append(db, bare, stdout(2))
    result = await asyncio.wait_for(_collect(db, admin(), bare), 2)
    assert [seq for seq, _ in result] == [1, 2]
    # Nothing after after_seq: ends at once.
    assert await asyncio.wait_for(_collect(db, admin(), bare, after_seq=2), 2) == []


async def test_watch_run_refuses_bad_requests(db: Database) -> None:
    world, other = await new_world(db), await new_world(db)
    run_id = await seed_run(db, world)

    async def first(actor: Actor, **kw: Any) -> Any:
        async for event in run_queries.watch_run(db, actor, runs_pb2.WatchRunRequest(**kw)):
            return event
        return None

    assert fields(await expect(InvalidArgument, first(admin(), run_id="x"))) == {"run_id"}
    assert fields(await expect(InvalidArgument, first(admin(), run_id=run_id, after_seq=-1))) == {
        "after_seq"
    }
    missing = await expect(NotFound, first(admin(), run_id=str(uuid.uuid4())))
    assert missing.reason == "RUN_NOT_FOUND"
    denied = await expect(PermissionDenied, first(board(other.company_id), run_id=run_id))
    assert denied.reason == "COMPANY_ACCESS_DENIED"


async def _listener_backends(db: Database) -> int:
    return int(
        await fetch_one(
            db,
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = :name AND datname = current_database()",
            name=run_queries.LISTENER_APPLICATION_NAME,
        )
    )


async def test_concurrent_watchers_share_one_listener(db: Database) -> None:
    world = await new_world(db)
    runs = [await seed_run(db, world) for _ in range(3)]
    results: list[list[Any]] = [[], [], [], []]
    # Two watchers on the same run and one on each of two others.
    tasks = [
        asyncio.create_task(_collect(db, admin(), run_id, 0, results[i]))
        for i, run_id in enumerate([runs[0], runs[0], runs[1], runs[2]])
    ]
    listener = run_queries.shared_listener(db)
    await asyncio.wait_for(listener.connected.wait(), 5)
    await asyncio.sleep(0.2)
    opened = listener.connections_opened
    assert listener.watchers == 4
    assert await _listener_backends(db) == 1

    await append(db, runs[0], stdout(2))
    await append(db, runs[1], stdout(1))
    for run_id in runs:
        await finish(db, run_id)
    done = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert [[seq for seq, _ in r] for r in done] == [[1, 2, 3], [1, 2, 3], [1, 2], [1]]
    assert listener.watchers == 0
    assert listener.connections_opened == opened
    assert await _listener_backends(db) == 1  # lingers for the next watcher


async def test_watch_run_cancelled_by_client_cleans_up(db: Database) -> None:
    world = await new_world(db)
    run_id = await seed_run(db, world)
    listener = run_queries.shared_listener(db)
    before = listener.watchers
    task = asyncio.create_task(_collect(db, admin(), run_id))
    await asyncio.sleep(0.3)
    assert listener.watchers == before + 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert listener.watchers == before


async def test_watch_run_survives_listener_connection_loss(db: Database) -> None:
    world = await new_world(db)
    run_id = await seed_run(db, world)
    seen: list[Any] = []
    watcher = asyncio.create_task(_collect(db, admin(), run_id, 0, seen))
    listener = run_queries.shared_listener(db)
    await asyncio.wait_for(listener.connected.wait(), 5)
    opened = listener.connections_opened
    killed = await fetch_one(
        db,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = :name AND datname = current_database()",
        name=run_queries.LISTENER_APPLICATION_NAME,
    )
    assert killed == 1
    await append(db, run_id, stdout(1))
    await wait_until(lambda: bool(seen))
    # The listener reconnects by itself, and notifications flow again.
    await wait_until(lambda: listener.connections_opened > opened and listener.connected.is_set())
    written = time.monotonic()
    await append(db, run_id, stdout(1))
    await wait_until(lambda: len(seen) >= 2)
    assert seen[1][1] - written < 0.5
    await finish(db, run_id)
    assert [seq for seq, _ in await asyncio.wait_for(watcher, 3)] == [1, 2, 3]


def test_terminal_event_detection() -> None:
    def row(kind: str, payload: Any) -> Any:
        return {"type": kind, "payload": payload}

    assert run_queries.is_terminal_event(row("lifecycle", {"terminal": True}))
    assert run_queries.is_terminal_event(row("lifecycle", json.dumps({"terminal": True})))
    assert not run_queries.is_terminal_event(row("lifecycle", {"terminal": "yes"}))
    assert not run_queries.is_terminal_event(row("stdout", {"terminal": True}))
    assert not run_queries.is_terminal_event(row("lifecycle", "not json"))


# --- through the real RunService ------------------------------------------------------


async def test_rpc_reads_and_watch(db: Database, suite: Suite) -> None:
    world, other = await new_world(db), await new_world(db)
    run_id = await seed_run(db, world)
    await append(db, run_id, stdout(3))
    runs = suite.clients(board(world.company_id, Role.VIEWER)).runs

    assert (await runs.GetRun(runs_pb2.GetRunRequest(run_id=run_id))).id == run_id
    listed = await runs.ListRuns(runs_pb2.ListRunsRequest(company_id=world.company_id))
    assert [r.id for r in listed.runs] == [run_id]
    page = await runs.ListRunEvents(runs_pb2.ListRunEventsRequest(run_id=run_id, page_size=2))
    assert [e.seq for e in page.events] == [1, 2] and page.next_page_token

    stream = runs.WatchRun(runs_pb2.WatchRunRequest(run_id=run_id, after_seq=1))
    seen: list[int] = []

    async def read() -> None:
        async for event in stream:
            seen.append(event.seq)

    reader = asyncio.create_task(read())
    await wait_until(lambda: len(seen) == 2)
    await finish(db, run_id)
    await asyncio.wait_for(reader, 5)
    assert seen == [2, 3, 4]

    bad = await expect_error(runs.GetRun(runs_pb2.GetRunRequest(run_id="nope")))
    assert bad.code is grpc.StatusCode.INVALID_ARGUMENT
    assert fields(bad) == {"run_id"}
    bad = await expect_error(
        runs.ListRuns(runs_pb2.ListRunsRequest(company_id=world.company_id, page_token="x"))
    )
    assert bad.code is grpc.StatusCode.INVALID_ARGUMENT
    outsider = suite.clients(board(other.company_id)).runs
    denied = await expect_error(outsider.GetRun(runs_pb2.GetRunRequest(run_id=run_id)))
    assert denied.code is grpc.StatusCode.PERMISSION_DENIED
    assert denied.reason == "COMPANY_ACCESS_DENIED"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in outsider.WatchRun(runs_pb2.WatchRunRequest(run_id=run_id)):
            pass
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    missing = await expect_error(
        runs.ListRunEvents(runs_pb2.ListRunEventsRequest(run_id=str(uuid.uuid4())))
    )
    assert missing.code is grpc.StatusCode.NOT_FOUND and missing.reason == "RUN_NOT_FOUND"
