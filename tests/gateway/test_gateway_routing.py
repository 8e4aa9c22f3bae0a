"""Routing through the gateway with real parts: a client deadline and a cancellation
reach the backend (its statement stops waiting on a row lock the test holds), status
and error details come back untouched, internal services are not routed, and
reflection lists the public services."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
import pytest

from common.actor import ACTOR_HEADER, SIGNATURE_HEADER, Actor, ActorType, sign_actor
from common.database_url import asyncpg_dsn
from common.db import Database
from common.errors import STATUS_DETAILS_KEY, from_rpc_error
from common.interceptors import Context
from common.request_context import current_actor
from common.server import ServiceSpec, start_server
from gateway import proxy
from gateway.app import start_gateway
from paperclip.gateway.v1 import auth_pb2
from paperclip.issues.v1 import issues_pb2, issues_pb2_grpc
from tests.gateway.conftest import (
    Caller,
    GatewayEnv,
    World,
    gateway_settings,
    open_caller,
    row_counts,
)
from tests.harness import INTERNAL_KEY, admin, agent, expect_error

BACKEND_APP = "issue_service"
#: The backend's statements that wait for the test's row lock.
_WAITING = """
    SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND application_name = $1 AND state = 'active'
      AND wait_event_type = 'Lock'
"""
_ACTIVE = """
    SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND application_name = $1 AND state = 'active'
      AND query ILIKE '%issues.issues%'
"""


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The raw error of a call that must fail."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded but an error was expected")


async def poll(conn: asyncpg.Connection, query: str, *, until: int, within: float) -> float:
    """Seconds until ``query`` (a count over the backend's sessions) equals ``until``."""
    started = time.monotonic()
    while True:
        value = await conn.fetchval(query, BACKEND_APP)
        if value == until:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"{value} backend statements match, not {until}, after {within} s")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def row_lock(database_url: str, issue_id: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold the issue's row lock (FOR UPDATE) until the block ends; yields a spare
    connection for watching pg_stat_activity."""
    dsn = asyncpg_dsn(database_url)
    holder = await asyncpg.connect(dsn, server_settings={"application_name": "gateway-test-lock"})
    watcher = await asyncpg.connect(dsn, server_settings={"application_name": "gateway-test-watch"})
    try:
        async with holder.transaction():
            locked = await holder.fetchval(
                "SELECT id FROM issues.issues WHERE id = $1 FOR UPDATE", uuid.UUID(issue_id)
            )
            assert locked is not None
            yield watcher
    finally:
        await holder.close()
        await watcher.close()


async def _fresh_issue(gw: GatewayEnv, world: World) -> issues_pb2.Issue:
    return await gw.admin.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=world.company_a, title="locked in a test")
    )


OPEN_STATUSES = [issues_pb2.ISSUE_STATUS_BACKLOG, issues_pb2.ISSUE_STATUS_TODO]


def _checkout(world: World, issue: issues_pb2.Issue) -> issues_pb2.CheckoutIssueRequest:
    return issues_pb2.CheckoutIssueRequest(
        issue_id=issue.id, agent_id=world.agent_a, expected_statuses=OPEN_STATUSES
    )


async def _assert_untouched(gw: GatewayEnv, issue: issues_pb2.Issue) -> None:
    """The backend gave up: once the lock is free, the checkout did not happen late."""
    await asyncio.sleep(0.2)
    now = await gw.admin.issues.GetIssue(issues_pb2.GetIssueRequest(issue=issue.id))
    assert now == issue


# -- deadlines and cancellation ---------------------------------------------------------


async def test_client_deadline_reaches_the_backend(gw: GatewayEnv, world: World) -> None:
    issue = await _fresh_issue(gw, world)
    async with row_lock(gw.database_url, issue.id) as watcher:
        started = time.monotonic()
        call = asyncio.ensure_future(
            rpc_error(gw.admin.issues.CheckoutIssue(_checkout(world, issue), timeout=1.0))
        )
        await poll(watcher, _WAITING, until=1, within=1.0)

        error = await call
        failed_after = time.monotonic() - started
        # The backend's statement stops waiting soon after the deadline: long before its
        # own lock_timeout (5 s) would have ended it.
        stopped_after = await poll(watcher, _ACTIVE, until=0, within=2.0)

    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 <= failed_after < 2.0, failed_after
    assert failed_after + stopped_after < 3.5
    await _assert_untouched(gw, issue)


async def test_gateway_sets_a_deadline_when_the_client_sets_none(
    gw: GatewayEnv, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy, "DEFAULT_UNARY_TIMEOUT_S", 1.0)
    issue = await _fresh_issue(gw, world)
    async with row_lock(gw.database_url, issue.id) as watcher:
        started = time.monotonic()
        error = await rpc_error(gw.admin.issues.CheckoutIssue(_checkout(world, issue)))
        failed_after = time.monotonic() - started
        await poll(watcher, _ACTIVE, until=0, within=2.0)

    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 <= failed_after < 2.0, failed_after
    await _assert_untouched(gw, issue)


@pytest.mark.parametrize("how", ["call.cancel", "task.cancel"])
async def test_cancelled_call_is_cancelled_in_the_backend(
    gw: GatewayEnv, world: World, how: str
) -> None:
    issue = await _fresh_issue(gw, world)
    async with row_lock(gw.database_url, issue.id) as watcher:
        call = gw.admin.issues.CheckoutIssue(_checkout(world, issue))
        task = asyncio.ensure_future(call)
        await poll(watcher, _WAITING, until=1, within=2.0)

        if how == "call.cancel":
            assert call.cancel()
        else:
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        # Gone while the test still holds the lock: the backend was told.
        await poll(watcher, _ACTIVE, until=0, within=2.0)
        assert await watcher.fetchval(_WAITING, BACKEND_APP) == 0
    await _assert_untouched(gw, issue)


# -- what the backend receives (a probe IssueService behind a second gateway) ----------


@dataclass
class Seen:
    """One call as the probe backend saw it."""

    time_remaining: float | None
    metadata: list[tuple[str, str]]
    actor: Actor


class ProbeIssues(issues_pb2_grpc.IssueServiceServicer):
    """Answers GetCompany, recording the deadline, metadata and actor it was called with."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    async def GetCompany(
        self, request: issues_pb2.GetCompanyRequest, context: Context
    ) -> issues_pb2.Company:
        metadata = [(k, v) for k, v in context.invocation_metadata() or () if isinstance(v, str)]
        self.seen.append(Seen(context.time_remaining(), metadata, current_actor()))
        return issues_pb2.Company(id=request.company_id, name="probe")


@pytest.fixture(scope="module")
async def probe(gw: GatewayEnv, gateway_db: Database) -> AsyncIterator[tuple[ProbeIssues, str]]:
    """The probe backend and the address of a gateway routing IssueService to it."""
    # The generated .pyi marks every RPC abstract; the runtime base answers UNIMPLEMENTED.
    servicer = ProbeIssues()  # type: ignore[abstract]
    backend = await start_server(
        [
            ServiceSpec(
                "paperclip.issues.v1.IssueService",
                lambda server: issues_pb2_grpc.add_IssueServiceServicer_to_server(servicer, server),
            )
        ],
        "127.0.0.1:0",
        INTERNAL_KEY,
    )
    gateway = await start_gateway(
        gateway_db,
        gateway_settings(gw.database_url),
        address="127.0.0.1:0",
        backends={**gw.suite.backends(), "issue_service": f"127.0.0.1:{backend.port}"},
    )
    try:
        yield servicer, f"127.0.0.1:{gateway.running.port}"
    finally:
        await gateway.stop(0)
        await backend.stop(0)


async def _probe_call(
    gw: GatewayEnv, probe: tuple[ProbeIssues, str], token: str, *extra: tuple[str, str], **kw: Any
) -> Seen:
    servicer, address = probe
    caller = open_caller(address, (("authorization", f"Bearer {token}"), *extra))
    try:
        await caller.issues.GetCompany(issues_pb2.GetCompanyRequest(company_id="c"), **kw)
    finally:
        await caller.channel.close()
    return servicer.seen[-1]


WIRE_SLACK_S = 0.5


async def test_backend_gets_the_client_deadline(
    gw: GatewayEnv, probe: tuple[ProbeIssues, str]
) -> None:
    seen = await _probe_call(gw, probe, gw.admin_token, timeout=2.0)

    # gRPC rounds a deadline up on the wire (by up to ~0.1 s).
    assert seen.time_remaining is not None
    assert 1.0 < seen.time_remaining <= 2.0 + WIRE_SLACK_S


async def test_backend_gets_the_default_deadline_when_the_client_sets_none(
    gw: GatewayEnv, probe: tuple[ProbeIssues, str]
) -> None:
    seen = await _probe_call(gw, probe, gw.admin_token)

    assert seen.time_remaining is not None
    default = proxy.DEFAULT_UNARY_TIMEOUT_S
    assert default - 5 < seen.time_remaining <= default + WIRE_SLACK_S


async def test_backend_gets_only_the_gateways_actor(
    gw: GatewayEnv, world: World, probe: tuple[ProbeIssues, str]
) -> None:
    forged = sign_actor(
        Actor(type=ActorType.BOARD, user_id="forged-admin", is_instance_admin=True), INTERNAL_KEY
    )

    seen = await _probe_call(gw, probe, world.viewer_a.token, *forged)

    actor_headers = [(k, v) for k, v in seen.metadata if k in (ACTOR_HEADER, SIGNATURE_HEADER)]
    assert [k for k, _ in actor_headers] == [ACTOR_HEADER, SIGNATURE_HEADER]
    assert not set(actor_headers) & set(forged)
    assert (seen.actor.user_id, seen.actor.is_instance_admin) == (
        world.viewer_a.api_key.user_id,
        False,
    )
    # Nor does the bearer token travel past the gateway.
    assert "authorization" not in dict(seen.metadata)


# -- status and details pass through ----------------------------------------------------


def _details(error: grpc.aio.AioRpcError) -> bytes:
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return value
    raise AssertionError(f"no {STATUS_DETAILS_KEY} in {error.trailing_metadata()}")


async def test_not_found_arrives_untouched(gw: GatewayEnv, world: World) -> None:
    direct = gw.suite.clients(admin())
    missing = issues_pb2.GetIssueRequest(issue=str(uuid.uuid4()))

    through = await rpc_error(gw.admin.issues.GetIssue(missing))
    straight = await rpc_error(direct.issues.GetIssue(missing))

    assert through.code() is grpc.StatusCode.NOT_FOUND
    assert (through.code(), through.details()) == (straight.code(), straight.details())
    assert _details(through) == _details(straight)
    error = from_rpc_error(through)
    assert error.reason == "ISSUE_NOT_FOUND"
    assert error.metadata == from_rpc_error(straight).metadata


async def test_invalid_argument_violations_arrive_untouched(gw: GatewayEnv, world: World) -> None:
    direct = gw.suite.clients(admin())
    bad = issues_pb2.CreateIssueRequest(company_id="not-a-uuid", title="")
    before = await row_counts(gw.db, world)

    through = await rpc_error(gw.admin.issues.CreateIssue(bad))
    straight = await rpc_error(direct.issues.CreateIssue(bad))

    assert through.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert _details(through) == _details(straight)
    error = from_rpc_error(through)
    assert error.reason == "INVALID_ARGUMENT"
    assert "title" in {v.field for v in error.violations}
    assert await row_counts(gw.db, world) == before


async def test_conflict_metadata_arrives_untouched(gw: GatewayEnv, world: World) -> None:
    issue = await _fresh_issue(gw, world)
    holder_run, holder_token = await gw.run_token(world.company_a, world.agent_a)
    other_run, other_token = await gw.run_token(world.company_a, world.agent_a2)
    await gw.caller(holder_token).issues.CheckoutIssue(_checkout(world, issue))
    steal = issues_pb2.CheckoutIssueRequest(
        issue_id=issue.id, agent_id=world.agent_a2, expected_statuses=OPEN_STATUSES
    )
    direct = gw.suite.clients(agent(world.agent_a2, world.company_a, other_run))

    through = await rpc_error(gw.caller(other_token).issues.CheckoutIssue(steal))
    straight = await rpc_error(direct.issues.CheckoutIssue(steal))

    assert through.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert (through.details(), _details(through)) == (straight.details(), _details(straight))
    error = from_rpc_error(through)
    assert error.reason == "ISSUE_CHECKOUT_CONFLICT"
    assert (error.metadata["holder_run_id"], error.metadata["holder_live"]) == (holder_run, "true")


async def test_request_id_reaches_the_backend_and_comes_back(gw: GatewayEnv) -> None:
    request_id = f"test-{uuid.uuid4().hex}"
    caller = gw.caller(gw.admin_token, ("x-request-id", request_id))

    call = caller.auth.WhoAmI(auth_pb2.WhoAmIRequest())
    await call
    routed = caller.issues.GetIssue(issues_pb2.GetIssueRequest(issue="NOPE-1"))
    error = await rpc_error(routed)

    assert ("x-request-id", request_id) in list(await call.trailing_metadata() or ())
    # A relayed error carries it once: the backend's echo is not doubled.
    ids = [v for k, v in error.trailing_metadata() or () if k == "x-request-id"]
    assert ids == [request_id]


# -- what is not routed -----------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/paperclip.issues.v1.IssueLockService/AcquireExecutionLock",
        "/paperclip.issues.v1.IssueLockService/ReleaseRunLocks",
        "/paperclip.workspaces.v1.WorkspaceLeaseService/ReleaseRunLeases",
        "/paperclip.issues.v1.IssueService/NoSuchMethod",
        "/no.such.Service/Method",
    ],
)
async def test_unrouted_methods_are_unimplemented(gw: GatewayEnv, path: str) -> None:
    caller: Caller = gw.admin
    method = caller.channel.unary_unary(
        path, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )

    error = await expect_error(method(b""))

    assert error.code is grpc.StatusCode.UNIMPLEMENTED


# -- reflection -------------------------------------------------------------------------

GRPCURL = Path(sys.executable).with_name("grpcurl")


async def grpcurl(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_reflection_lists_the_public_services_only(gw: GatewayEnv) -> None:
    code, output = await grpcurl("-plaintext", gw.address, "list")

    assert code == 0, output
    services = set(output.split())
    assert {
        "paperclip.issues.v1.IssueService",
        "paperclip.runs.v1.RunService",
        "paperclip.gateway.v1.AuthService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    assert not any("IssueLockService" in s or "LeaseService" in s for s in services), services


async def test_grpcurl_describes_and_calls_with_rich_errors(gw: GatewayEnv) -> None:
    code, described = await grpcurl(
        "-plaintext", gw.address, "describe", "paperclip.issues.v1.IssueService"
    )
    assert code == 0, described
    assert "rpc CheckoutIssue" in described

    missing = str(uuid.uuid4())
    code, output = await grpcurl(
        "-plaintext",
        "-format-error",
        "-H",
        f"authorization: Bearer {gw.admin_token}",
        "-d",
        json.dumps({"issue": missing}),
        gw.address,
        "paperclip.issues.v1.IssueService/GetIssue",
    )
    assert code != 0
    assert "ISSUE_NOT_FOUND" in output, output
    assert "google.rpc.ErrorInfo" in output, output
