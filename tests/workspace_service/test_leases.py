"""Environment leases over the real workspace server (scenarios 33-34): acquire, renew,
release, ReleaseRunLeases, one active lease per (environment, workspace) under a race,
authorization and bad input.

Runs are rows written as the run service would (``insert_run``): these tests pin the
lease rules; ``test_lease_runs`` ends real runs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.actor import Role
from common.db import Database
from common.errors import PaperclipError, from_rpc_error
from common.sql import Row, sql
from paperclip.runs.v1 import run_messages_pb2 as runs_pb
from paperclip.workspaces.v1 import workspace_leases_pb2 as internal_pb
from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from tests.harness import (
    Clients,
    Suite,
    admin,
    agent,
    board,
    delete_run,
    expect_error,
    insert_run,
    new_agent,
    new_company,
    service,
)
from tests.workspace_service.support import insert_workspace

# -- shared with test_lease_sweep and test_lease_runs ---------------------------------


@dataclass
class World:
    """A company with an agent and an open workspace, and callers on it."""

    company_id: str
    agent_id: str
    workspace_id: str
    #: An admin member of the company.
    owner: Clients
    #: The run service, as a service actor.
    service: Clients
    suite: Suite

    def as_agent(self, run_id: str | None) -> Clients:
        """Stubs calling as the world's agent inside ``run_id``."""
        return self.suite.clients(agent(self.agent_id, self.company_id, run_id))


async def new_world(suite: Suite, db: Database, cwd: Path) -> World:
    """A fresh company (tests share one database) with an agent and a workspace."""
    company_id = (await new_company(suite.clients(admin()))).id
    owner = suite.clients(board(company_id, Role.ADMIN, user_id="owner"))
    agent_id = (await new_agent(owner, company_id)).id
    workspace = await insert_workspace(db, company_id, cwd=str(cwd))
    return World(company_id, agent_id, workspace.id, owner, suite.clients(service()), suite)


def acquire(world: World, **fields: Any) -> pb.AcquireEnvironmentLeaseRequest:
    """A valid acquire request on the world's workspace (a fresh environment unless
    ``environment_id`` is given); ``fields`` override its values."""
    values: dict[str, Any] = {
        "company_id": world.company_id,
        "environment_id": str(uuid.uuid4()),
        "workspace_id": world.workspace_id,
    }
    values.update(fields)
    return pb.AcquireEnvironmentLeaseRequest(**values)


async def lease_row(db: Database, lease_id: str) -> Row:
    """The lease's row."""
    async with db.unit_of_work() as tx:
        row = await tx.fetchrow(
            sql("SELECT * FROM workspaces.environment_leases WHERE id = :id"), {"id": lease_id}
        )
    assert row is not None
    return row


async def lease_audit(db: Database, lease_id: str) -> list[Row]:
    """The audit rows about one lease, oldest first."""
    async with db.unit_of_work() as tx:
        return await tx.fetch(
            sql(
                "SELECT action, actor_type, actor_id, details FROM audit.activity_log"
                " WHERE entity_type = 'environment_lease' AND entity_id = :id ORDER BY id"
            ),
            {"id": lease_id},
        )


async def end_run(
    db: Database, run_id: str, status: str, *, error: str | None = None, code: str | None = None
) -> None:
    """Write a run's terminal status as the run service would."""
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql(
                "UPDATE runs.heartbeat_runs SET status = :s, error = :e, error_code = :c,"
                " finished_at = now(), updated_at = now() WHERE id = :id"
            ),
            {"s": status, "e": error, "c": code, "id": run_id},
        )


async def backdate(db: Database, lease_id: str) -> None:
    """Move the lease's expiry into the past (it was not renewed in time)."""
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql(
                "UPDATE workspaces.environment_leases"
                " SET expires_at = now() - interval '1 second' WHERE id = :id"
            ),
            {"id": lease_id},
        )


async def release_run(
    world: World, run_id: str, status: runs_pb.RunStatus.ValueType = runs_pb.RUN_STATUS_UNSPECIFIED
) -> list[str]:
    """ReleaseRunLeases as the run service calls it; the lease ids ended."""
    reply = await world.service.leases.ReleaseRunLeases(
        internal_pb.ReleaseRunLeasesRequest(run_id=run_id, run_status=status)
    )
    return list(reply.lease_ids)


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture
async def world(suite: Suite, db: Database, tmp_path: Path) -> World:
    return await new_world(suite, db, tmp_path)


@pytest.fixture
async def run_id(db: Database, world: World) -> str:
    """A running run of the world's agent."""
    return await insert_run(db, company_id=world.company_id, agent_id=world.agent_id)


# -- scenario 33 and the lease itself -------------------------------------------------


async def test_scenario_33_local_lease_is_active_then_released_by_its_run_once(
    db: Database, world: World, run_id: str
) -> None:
    lease = await world.owner.workspaces.AcquireEnvironmentLease(acquire(world, run_id=run_id))
    assert lease.status == messages.LEASE_STATUS_ACTIVE
    assert (lease.provider, lease.provider_lease_id) == ("local", f"local:{lease.id}")
    assert (lease.run_id, lease.lease_policy) == (run_id, "ephemeral")
    row = await lease_row(db, lease.id)
    assert row["expires_at"] - row["renewed_at"] == timedelta(seconds=300)
    assert not lease.HasField("released_at")

    await end_run(db, run_id, "succeeded")
    assert await release_run(world, run_id, runs_pb.RUN_STATUS_SUCCEEDED) == [lease.id]
    assert await release_run(world, run_id, runs_pb.RUN_STATUS_SUCCEEDED) == []
    row = await lease_row(db, lease.id)
    assert (row["status"], row["failure_reason"]) == ("released", None)
    assert row["released_at"] is not None
    audit = await lease_audit(db, lease.id)
    assert [a["action"] for a in audit] == [
        "environment.lease_acquired",
        "environment.lease_released",
    ]
    assert (audit[1]["actor_type"], audit[1]["actor_id"]) == ("service", "run_service")


# Scenario 34: (recorded run status or None when missing, status the caller claims)
# -> the lease's end.
MAPPING: list[tuple[str | None, runs_pb.RunStatus.ValueType, str]] = [
    ("succeeded", runs_pb.RUN_STATUS_SUCCEEDED, "released"),
    ("failed", runs_pb.RUN_STATUS_FAILED, "failed"),
    ("timed_out", runs_pb.RUN_STATUS_TIMED_OUT, "failed"),
    ("cancelled", runs_pb.RUN_STATUS_CANCELLED, "expired"),
    ("failed", runs_pb.RUN_STATUS_SUCCEEDED, "failed"),  # the recorded status wins
    (None, runs_pb.RUN_STATUS_SUCCEEDED, "released"),
    (None, runs_pb.RUN_STATUS_FAILED, "failed"),
    (None, runs_pb.RUN_STATUS_TIMED_OUT, "failed"),
    (None, runs_pb.RUN_STATUS_CANCELLED, "expired"),
    (None, runs_pb.RUN_STATUS_RUNNING, "released"),
    (None, runs_pb.RUN_STATUS_QUEUED, "released"),
    (None, runs_pb.RUN_STATUS_UNSPECIFIED, "released"),
]


@pytest.mark.parametrize(
    "case", MAPPING, ids=[f"{r}-{runs_pb.RunStatus.Name(c)}" for r, c, _ in MAPPING]
)
async def test_scenario_34_run_leases_end_as_the_run_ended(
    db: Database,
    world: World,
    run_id: str,
    case: tuple[str | None, runs_pb.RunStatus.ValueType, str],
) -> None:
    recorded, claimed, expected = case
    lease = await world.service.workspaces.AcquireEnvironmentLease(acquire(world, run_id=run_id))
    if recorded is None:
        await delete_run(db, run_id)
    else:
        await end_run(
            db, run_id, recorded, error="Process exited with code 3", code="adapter_failed"
        )

    assert await release_run(world, run_id, claimed) == [lease.id]
    row = await lease_row(db, lease.id)
    assert row["status"] == expected
    reasons = {
        "released": None,
        "expired": "run_cancelled",
        # The run's error when it is known, else the status it ended with.
        "failed": "Process exited with code 3" if recorded else ("failed", "timed_out"),
    }
    want = reasons[expected]
    assert (
        row["failure_reason"] in want if isinstance(want, tuple) else row["failure_reason"] == want
    )


@pytest.mark.parametrize("status", ["queued", "running"])
async def test_scenario_35_release_run_leases_refuses_a_live_run(
    db: Database, world: World, status: str
) -> None:
    run_id = await insert_run(
        db, company_id=world.company_id, agent_id=world.agent_id, status=status
    )
    lease = await world.owner.workspaces.AcquireEnvironmentLease(acquire(world, run_id=run_id))
    error = await expect_error(release_run(world, run_id, runs_pb.RUN_STATUS_SUCCEEDED))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RUN_NOT_TERMINAL")
    assert (await lease_row(db, lease.id))["status"] == "active"


async def test_release_run_leases_is_for_services_only(
    suite: Suite, world: World, run_id: str
) -> None:
    request = internal_pb.ReleaseRunLeasesRequest(run_id=run_id)
    for caller in (suite.clients(admin()), world.as_agent(run_id)):
        error = await expect_error(caller.leases.ReleaseRunLeases(request))
        assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SERVICE_REQUIRED")


async def test_release_is_idempotent_and_records_a_failure_reason(
    db: Database, world: World, run_id: str
) -> None:
    first = await world.owner.workspaces.AcquireEnvironmentLease(acquire(world, run_id=run_id))
    ended = await world.owner.workspaces.ReleaseEnvironmentLease(
        pb.ReleaseEnvironmentLeaseRequest(lease_id=first.id, failure_reason="sandbox crashed")
    )
    assert (ended.status, ended.failure_reason) == (messages.LEASE_STATUS_FAILED, "sandbox crashed")
    again = await world.owner.workspaces.ReleaseEnvironmentLease(
        pb.ReleaseEnvironmentLeaseRequest(lease_id=first.id)
    )
    assert again == ended  # returned as it is: still failed, same released_at

    second = await world.owner.workspaces.AcquireEnvironmentLease(acquire(world, run_id=run_id))
    released = await world.owner.workspaces.ReleaseEnvironmentLease(
        pb.ReleaseEnvironmentLeaseRequest(lease_id=second.id)
    )
    assert (released.status, released.failure_reason) == (messages.LEASE_STATUS_RELEASED, "")
    assert released.HasField("released_at")
    assert [a["action"] for a in await lease_audit(db, first.id)] == [
        "environment.lease_acquired",
        "environment.lease_released",
    ]


# -- one active lease per (environment, workspace) ----------------------------------


async def test_holder_gets_its_lease_back_renewed_and_others_are_refused(
    db: Database, world: World, run_id: str
) -> None:
    environment = str(uuid.uuid4())
    first = await world.owner.workspaces.AcquireEnvironmentLease(
        acquire(world, environment_id=environment, run_id=run_id, ttl_seconds=60)
    )
    # The same run (here through its agent) gets the same lease, with the new TTL.
    mine = world.as_agent(run_id)
    again = await mine.workspaces.AcquireEnvironmentLease(
        acquire(world, environment_id=environment, ttl_seconds=600)
    )
    assert again.id == first.id
    row = await lease_row(db, first.id)
    assert row["expires_at"] - row["renewed_at"] == timedelta(seconds=600)

    other_run = await insert_run(db, company_id=world.company_id, agent_id=world.agent_id)
    error = await expect_error(
        world.owner.workspaces.AcquireEnvironmentLease(
            acquire(world, environment_id=environment, run_id=other_run)
        )
    )
    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ENVIRONMENT_LEASE_HELD",
    )
    assert error.metadata["lease_id"] == first.id
    assert error.metadata["holder_run_id"] == run_id
    assert error.metadata["expires_at"] == row["expires_at"].isoformat()
    # Another environment of the same workspace is free.
    assert (
        await world.owner.workspaces.AcquireEnvironmentLease(acquire(world, run_id=other_run))
    ).id


async def test_run_less_board_lease_belongs_to_its_user(suite: Suite, world: World) -> None:
    environment = str(uuid.uuid4())
    first = await world.owner.workspaces.AcquireEnvironmentLease(
        acquire(world, environment_id=environment)
    )
    assert first.run_id == ""
    again = await world.owner.workspaces.AcquireEnvironmentLease(
        acquire(world, environment_id=environment)
    )
    assert again.id == first.id
    colleague = suite.clients(board(world.company_id, Role.MEMBER, user_id="colleague"))
    error = await expect_error(
        colleague.workspaces.AcquireEnvironmentLease(acquire(world, environment_id=environment))
    )
    assert error.reason == "ENVIRONMENT_LEASE_HELD"
    assert error.metadata["holder_run_id"] == ""


async def test_acquire_replaces_an_expired_lease_and_one_of_an_ended_run(
    db: Database, world: World, run_id: str
) -> None:
    environment = str(uuid.uuid4())
    stale = await world.owner.workspaces.AcquireEnvironmentLease(
        acquire(world, environment_id=environment, run_id=run_id)
    )
    await backdate(db, stale.id)
    second_run = await insert_run(db, company_id=world.company_id, agent_id=world.agent_id)
    taken = await world.owner.workspaces.AcquireEnvironmentLease(
        acquire(world, environment_id=environment, run_id=second_run)
    )
    assert taken.id != stale.id
    row = await lease_row(db, stale.id)
    assert (row["status"], row["failure_reason"]) == ("expired", "ttl_expired")
    assert [a["action"] for a in await lease_audit(db, stale.id)][-1] == "environment.lease_expired"

    # The run service's ReleaseRunLeases was lost: the next acquire converges it.
    await end_run(db, second_run, "timed_out", error="run timed out", code="timeout")
    third_run = await insert_run(db, company_id=world.company_id, agent_id=world.agent_id)
    third = await world.owner.workspaces.AcquireEnvironmentLease(
        acquire(world, environment_id=environment, run_id=third_run)
    )
    assert third.id != taken.id
    row = await lease_row(db, taken.id)
    assert (row["status"], row["failure_reason"]) == ("failed", "run timed out")


async def test_concurrent_acquires_leave_exactly_one_active_lease(
    suite: Suite, db: Database, world: World
) -> None:
    environment = str(uuid.uuid4())
    runs = [
        await insert_run(db, company_id=world.company_id, agent_id=world.agent_id)
        for _ in range(20)
    ]
    callers = [world.as_agent(run) for run in runs]

    async def attempt(caller: Clients) -> messages.EnvironmentLease | PaperclipError:
        try:
            return await caller.workspaces.AcquireEnvironmentLease(
                acquire(world, environment_id=environment)
            )
        except grpc.aio.AioRpcError as exc:
            return from_rpc_error(exc)

    outcomes = await asyncio.gather(*(attempt(c) for c in callers))
    winners = [o for o in outcomes if isinstance(o, messages.EnvironmentLease)]
    losers = [o for o in outcomes if isinstance(o, PaperclipError)]
    assert len(winners) == 1, outcomes
    assert {(e.code, e.reason) for e in losers} == {
        (grpc.StatusCode.FAILED_PRECONDITION, "ENVIRONMENT_LEASE_HELD")
    }
    assert {e.metadata["lease_id"] for e in losers} == {winners[0].id}
    async with db.unit_of_work() as tx:
        active = await tx.fetchval(
            sql(
                "SELECT count(*) FROM workspaces.environment_leases"
                " WHERE environment_id = :e AND status = 'active'"
            ),
            {"e": environment},
        )
    assert active == 1


# -- renew ------------------------------------------------------------------------------


async def test_renew_pushes_the_expiry_out_by_the_ttl(
    db: Database, world: World, run_id: str
) -> None:
    lease = await world.owner.workspaces.AcquireEnvironmentLease(
        acquire(world, run_id=run_id, ttl_seconds=30)
    )
    # The run's agent renews with a TTL of its own, then with the lease's (the default).
    renewed = await world.as_agent(run_id).workspaces.RenewEnvironmentLease(
        pb.RenewEnvironmentLeaseRequest(lease_id=lease.id, ttl_seconds=900)
    )
    assert renewed.status == messages.LEASE_STATUS_ACTIVE
    row = await lease_row(db, lease.id)
    assert row["expires_at"] - row["renewed_at"] == timedelta(seconds=900)
    await world.service.workspaces.RenewEnvironmentLease(
        pb.RenewEnvironmentLeaseRequest(lease_id=lease.id)
    )
    row = await lease_row(db, lease.id)
    assert row["expires_at"] - row["renewed_at"] == timedelta(seconds=30)
    assert row["renewed_at"] > row["created_at"]


async def test_renew_refuses_a_lease_that_ended_or_expired(
    db: Database, world: World, run_id: str
) -> None:
    lapsed = await world.owner.workspaces.AcquireEnvironmentLease(acquire(world, run_id=run_id))
    await backdate(db, lapsed.id)
    ended = await world.owner.workspaces.AcquireEnvironmentLease(acquire(world, run_id=run_id))
    await world.owner.workspaces.ReleaseEnvironmentLease(
        pb.ReleaseEnvironmentLeaseRequest(lease_id=ended.id)
    )
    for lease_id in (lapsed.id, ended.id):
        before = await lease_row(db, lease_id)
        error = await expect_error(
            world.owner.workspaces.RenewEnvironmentLease(
                pb.RenewEnvironmentLeaseRequest(lease_id=lease_id)
            )
        )
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "LEASE_NOT_ACTIVE",
        )
        assert await lease_row(db, lease_id) == before


# -- authorization, missing and closed things ------------------------------------------


async def test_agent_leases_are_for_its_own_run_only(
    suite: Suite, db: Database, world: World, run_id: str
) -> None:
    mine = await world.as_agent(run_id).workspaces.AcquireEnvironmentLease(acquire(world))
    assert mine.run_id == run_id  # the agent's run is the default

    other_run = await insert_run(db, company_id=world.company_id, agent_id=world.agent_id)
    theirs = await world.owner.workspaces.AcquireEnvironmentLease(acquire(world, run_id=other_run))
    as_agent = world.as_agent(run_id).workspaces
    calls: list[Awaitable[Any]] = [
        as_agent.AcquireEnvironmentLease(acquire(world, run_id=other_run)),
        as_agent.RenewEnvironmentLease(pb.RenewEnvironmentLeaseRequest(lease_id=theirs.id)),
        as_agent.ReleaseEnvironmentLease(pb.ReleaseEnvironmentLeaseRequest(lease_id=theirs.id)),
    ]
    for call in calls:
        error = await expect_error(call)
        assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "AGENT_MISMATCH")
    assert (await lease_row(db, theirs.id))["status"] == "active"


async def test_other_companies_and_viewers_are_refused(
    suite: Suite, db: Database, world: World, run_id: str, tmp_path: Path
) -> None:
    lease = await world.owner.workspaces.AcquireEnvironmentLease(acquire(world, run_id=run_id))
    stranger = await new_world(suite, db, tmp_path / "other")
    stranger_run = await insert_run(db, company_id=stranger.company_id, agent_id=stranger.agent_id)
    callers = {
        "viewer": suite.clients(board(world.company_id, Role.VIEWER, user_id="viewer")),
        "other board": stranger.owner,
        "other agent": stranger.as_agent(stranger_run),
    }
    for name, caller in callers.items():
        calls: list[Awaitable[Any]] = [
            caller.workspaces.AcquireEnvironmentLease(acquire(world)),
            caller.workspaces.RenewEnvironmentLease(
                pb.RenewEnvironmentLeaseRequest(lease_id=lease.id)
            ),
            caller.workspaces.ReleaseEnvironmentLease(
                pb.ReleaseEnvironmentLeaseRequest(lease_id=lease.id)
            ),
        ]
        for call in calls:
            error = await expect_error(call)
            assert (error.code, error.reason) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "COMPANY_ACCESS_DENIED",
            ), name
    assert (await lease_row(db, lease.id))["status"] == "active"


async def test_acquire_needs_an_open_workspace_and_a_live_run_of_the_company(
    suite: Suite, db: Database, world: World, tmp_path: Path
) -> None:
    stranger = await new_world(suite, db, tmp_path / "other")
    stranger_run = await insert_run(db, company_id=stranger.company_id, agent_id=stranger.agent_id)
    ended_run = await insert_run(
        db, company_id=world.company_id, agent_id=world.agent_id, status="succeeded"
    )
    closed = await insert_workspace(db, world.company_id, cwd=str(tmp_path / "closed"))
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql(
                "UPDATE workspaces.execution_workspaces SET status = 'archived',"
                " closed_at = now() WHERE id = :id"
            ),
            {"id": closed.id},
        )
    cases = [
        (acquire(world, workspace_id=str(uuid.uuid4())), "NOT_FOUND", "WORKSPACE_NOT_FOUND"),
        (acquire(world, workspace_id=stranger.workspace_id), "NOT_FOUND", "WORKSPACE_NOT_FOUND"),
        (acquire(world, workspace_id=closed.id), "FAILED_PRECONDITION", "WORKSPACE_CLOSED"),
        (acquire(world, run_id=str(uuid.uuid4())), "NOT_FOUND", "RUN_NOT_FOUND"),
        (acquire(world, run_id=stranger_run), "NOT_FOUND", "RUN_NOT_FOUND"),
        (acquire(world, run_id=ended_run), "FAILED_PRECONDITION", "RUN_NOT_ACTIVE"),
    ]
    for request, code, reason in cases:
        error = await expect_error(world.owner.workspaces.AcquireEnvironmentLease(request))
        assert (error.code.name, error.reason) == (code, reason), request
    missing = str(uuid.uuid4())
    for call in (
        world.owner.workspaces.RenewEnvironmentLease(
            pb.RenewEnvironmentLeaseRequest(lease_id=missing)
        ),
        world.owner.workspaces.ReleaseEnvironmentLease(
            pb.ReleaseEnvironmentLeaseRequest(lease_id=missing)
        ),
    ):
        error = await expect_error(call)
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "LEASE_NOT_FOUND")
    assert await lease_count(db, world.company_id) == 0


# -- bad input ------------------------------------------------------------------------


async def lease_count(db: Database, company_id: str) -> int:
    """How many leases (any status) and lease audit rows the company has."""
    async with db.unit_of_work() as tx:
        value = await tx.fetchval(
            sql(
                "SELECT (SELECT count(*) FROM workspaces.environment_leases"
                "         WHERE company_id = :c)"
                "     + (SELECT count(*) FROM audit.activity_log"
                "         WHERE company_id = :c AND entity_type = 'environment_lease')"
            ),
            {"c": company_id},
        )
    return int(value)


# (rpc, request fields, the field named in the BadRequest violation)
BAD_INPUT: list[tuple[str, dict[str, Any], str]] = [
    ("acquire", {"company_id": ""}, "company_id"),
    ("acquire", {"company_id": "acme"}, "company_id"),
    ("acquire", {"environment_id": ""}, "environment_id"),
    ("acquire", {"workspace_id": "ws-1"}, "workspace_id"),
    ("acquire", {"run_id": "run-1"}, "run_id"),
    ("acquire", {"issue_id": "PAP-1"}, "issue_id"),
    ("acquire", {"ttl_seconds": 4}, "ttl_seconds"),
    ("acquire", {"ttl_seconds": 86_401}, "ttl_seconds"),
    ("acquire", {"ttl_seconds": -1}, "ttl_seconds"),
    ("acquire", {"lease_policy": "sticky"}, "lease_policy"),
    ("renew", {"lease_id": ""}, "lease_id"),
    ("renew", {"lease_id": "lease-1"}, "lease_id"),
    ("renew", {"ttl_seconds": 3}, "ttl_seconds"),
    ("renew", {"ttl_seconds": -5}, "ttl_seconds"),
    ("release", {"lease_id": ""}, "lease_id"),
    ("release", {"lease_id": "lease-1"}, "lease_id"),
    ("release", {"failure_reason": "x" * 2001}, "failure_reason"),
    ("release", {"failure_reason": "bad\x00byte"}, "failure_reason"),
    ("release_run", {"run_id": ""}, "run_id"),
    ("release_run", {"run_id": "run-1"}, "run_id"),
    ("release_run", {"run_status": 99}, "run_status"),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[f"{r}-{f}" for r, _, f in BAD_INPUT])
async def test_bad_input_is_invalid_argument_and_writes_nothing(
    db: Database, world: World, run_id: str, case: tuple[str, dict[str, Any], str]
) -> None:
    rpc, fields, field = case
    lease = await world.owner.workspaces.AcquireEnvironmentLease(acquire(world, run_id=run_id))
    await end_run(db, run_id, "failed")
    before = await lease_count(db, world.company_id)
    stubs = world.service
    call: Any
    if rpc == "acquire":
        call = stubs.workspaces.AcquireEnvironmentLease(acquire(world, **fields))
    elif rpc == "renew":
        request = {"lease_id": lease.id, **fields}
        call = stubs.workspaces.RenewEnvironmentLease(pb.RenewEnvironmentLeaseRequest(**request))
    elif rpc == "release":
        request = {"lease_id": lease.id, **fields}
        call = stubs.workspaces.ReleaseEnvironmentLease(
            pb.ReleaseEnvironmentLeaseRequest(**request)
        )
    else:
        request = {"run_id": run_id, **fields}
        call = stubs.leases.ReleaseRunLeases(internal_pb.ReleaseRunLeasesRequest(**request))
    error = await expect_error(call)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert [v.field for v in error.violations] == [field]
    assert await lease_count(db, world.company_id) == before
    assert (await lease_row(db, lease.id))["status"] == "active"
