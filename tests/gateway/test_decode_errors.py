"""Requests that cannot be decoded, nest their JSON too deeply, or carry an oversized
token: INVALID_ARGUMENT naming the field (UNAUTHENTICATED for the token), through the
gateway and straight at the services, never UNKNOWN, and nothing written."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from common.errors import PaperclipError, from_rpc_error
from common.request_decoding import MAX_STRUCT_DEPTH
from common.server import SERVER_OPTIONS
from gateway.authn import MAX_AUTHORIZATION_LENGTH
from paperclip.gateway.v1 import auth_pb2
from paperclip.runs.v1 import run_messages_pb2, runs_pb2, runs_pb2_grpc
from paperclip.workspaces.v1 import workspace_messages_pb2, workspaces_pb2, workspaces_pb2_grpc
from tests.gateway.conftest import GatewayEnv, World, row_counts
from tests.harness import admin, fetch_value
from tests.workspace_service.support import insert_workspace

WAKE = "/paperclip.runs.v1.RunService/WakeAgent"
UPDATE_WORKSPACE = "/paperclip.workspaces.v1.WorkspaceService/UpdateExecutionWorkspace"
CREATE_ISSUE = "/paperclip.issues.v1.IssueService/CreateIssue"
WHO_AM_I = "/paperclip.gateway.v1.AuthService/WhoAmI"


def nested(levels: int, into: struct_pb2.Struct | None = None) -> struct_pb2.Struct:
    """``{"a": {"a": ... {"x": 1}}}`` with ``levels`` objects, built in place (copying a
    Struct deeper than protobuf's decode limit into a message would fail)."""
    out = into if into is not None else struct_pb2.Struct()
    cur = out
    for _ in range(levels - 1):
        cur = cur.fields["a"].struct_value
    cur.fields["x"].number_value = 1
    return out


def wake(agent_id: str, levels: int) -> runs_pb2.WakeAgentRequest:
    request = runs_pb2.WakeAgentRequest(
        agent_id=agent_id, source=run_messages_pb2.WAKE_SOURCE_ON_DEMAND, reason="decode test"
    )
    nested(levels, request.payload)
    return request


def update_metadata(
    workspace_id: str, levels: int
) -> workspaces_pb2.UpdateExecutionWorkspaceRequest:
    request = workspaces_pb2.UpdateExecutionWorkspaceRequest(
        update_mask=field_mask_pb2.FieldMask(paths=["metadata"])
    )
    request.workspace.id = workspace_id
    nested(levels, request.workspace.metadata)
    return request


async def failure(call: Any) -> tuple[grpc.aio.AioRpcError, PaperclipError]:
    """The raw error of a call that must fail, and the project error it carries."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc, from_rpc_error(exc)
    raise AssertionError("the call succeeded but an error was expected")


def assert_invalid(raw: grpc.aio.AioRpcError, error: PaperclipError, field: str) -> None:
    assert raw.code() is grpc.StatusCode.INVALID_ARGUMENT, raw
    assert error.reason == "INVALID_ARGUMENT"
    assert [v.field for v in error.violations] == [field]
    assert "Unexpected" not in (raw.details() or "")
    assert "Error" not in (raw.details() or "")


@dataclass
class Targets:
    """Channels to the gateway (as the instance admin) and to the services (signed
    actor), and the rows the calls aim at."""

    gateway: grpc.aio.Channel
    runs: grpc.aio.Channel
    workspaces: grpc.aio.Channel
    agent_id: str
    workspace_id: str


@pytest.fixture(scope="module")
async def targets(gw: GatewayEnv, world: World) -> AsyncIterator[Targets]:
    clients = gw.suite.clients(admin())
    _, run_channel, workspace_channel = clients.channel, *clients.others
    workspace = await insert_workspace(
        gw.db, world.company_a, cwd=tempfile.mkdtemp(prefix="paperclip-decode-test-")
    )
    yield Targets(
        gw.admin.channel, run_channel, workspace_channel, world.agent_a, str(workspace.id)
    )


async def fingerprint(gw: GatewayEnv, world: World, targets: Targets) -> tuple[Any, ...]:
    """What a refused call must leave as it was: the watched counts, the agent's wakes
    and runs, and the workspace's row."""
    wakes = await fetch_value(
        gw.db,
        "SELECT count(*) FROM runs.wakeup_requests WHERE agent_id = CAST(:a AS uuid)",
        a=targets.agent_id,
    )
    runs = await fetch_value(
        gw.db,
        "SELECT count(*) FROM runs.heartbeat_runs WHERE agent_id = CAST(:a AS uuid)",
        a=targets.agent_id,
    )
    workspace = await fetch_value(
        gw.db,
        "SELECT concat(updated_at, metadata::text) FROM workspaces.execution_workspaces"
        " WHERE id = CAST(:w AS uuid)",
        w=targets.workspace_id,
    )
    return (await row_counts(gw.db, world), wakes, runs, workspace)


@pytest.mark.parametrize("route", ["gateway", "service"])
async def test_wake_with_a_99_level_payload_is_invalid_payload(
    gw: GatewayEnv, world: World, targets: Targets, route: str
) -> None:
    channel = targets.gateway if route == "gateway" else targets.runs
    before = await fingerprint(gw, world, targets)
    raw, error = await failure(
        runs_pb2_grpc.RunServiceStub(channel).WakeAgent(wake(targets.agent_id, 99))
    )
    assert_invalid(raw, error, "payload")
    assert await fingerprint(gw, world, targets) == before


@pytest.mark.parametrize("route", ["gateway", "service"])
async def test_workspace_update_with_99_level_metadata_is_invalid_metadata(
    gw: GatewayEnv, world: World, targets: Targets, route: str
) -> None:
    channel = targets.gateway if route == "gateway" else targets.workspaces
    before = await fingerprint(gw, world, targets)
    raw, error = await failure(
        workspaces_pb2_grpc.WorkspaceServiceStub(channel).UpdateExecutionWorkspace(
            update_metadata(targets.workspace_id, 99)
        )
    )
    assert_invalid(raw, error, "workspace.metadata")
    assert await fingerprint(gw, world, targets) == before


async def test_json_one_level_past_the_limit_is_refused_and_at_the_limit_round_trips(
    gw: GatewayEnv, world: World, targets: Targets
) -> None:
    """The suite's limit sits below protobuf's: a payload just past it decodes but is
    refused by name; one at it is accepted and the response carrying it decodes."""
    runs = runs_pb2_grpc.RunServiceStub(targets.gateway)
    workspaces = workspaces_pb2_grpc.WorkspaceServiceStub(targets.gateway)
    before = await fingerprint(gw, world, targets)
    raw, error = await failure(runs.WakeAgent(wake(targets.agent_id, MAX_STRUCT_DEPTH + 1)))
    assert_invalid(raw, error, "payload")
    raw, error = await failure(
        workspaces.UpdateExecutionWorkspace(
            update_metadata(targets.workspace_id, MAX_STRUCT_DEPTH + 1)
        )
    )
    assert_invalid(raw, error, "workspace.metadata")
    assert await fingerprint(gw, world, targets) == before

    woken = await runs.WakeAgent(wake(targets.agent_id, MAX_STRUCT_DEPTH))
    assert woken.wakeup_request.payload == nested(MAX_STRUCT_DEPTH)
    updated = await workspaces.UpdateExecutionWorkspace(
        update_metadata(targets.workspace_id, MAX_STRUCT_DEPTH)
    )
    assert updated.metadata == nested(MAX_STRUCT_DEPTH)
    listed = await workspaces.ListExecutionWorkspaces(
        workspaces_pb2.ListExecutionWorkspacesRequest(company_id=world.company_a)
    )
    assert any(w.metadata == nested(MAX_STRUCT_DEPTH) for w in listed.workspaces)


def _raw(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(
        method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )


#: Bytes that are no message, and the field each is blamed on.
UNDECODABLE: list[tuple[str, bytes, str]] = [
    ("corrupt framing", b"\xff\xff\xff", "request"),
    ("truncated field", b"\x0a\x05ab", "request"),
    ("bad UTF-8 in a string", b"\x0a\x02\xff\xfe", "agent_id"),
    ("corrupt Struct", b"\x2a\x03\x0a\x05a", "payload"),
]


@pytest.mark.parametrize(
    "case", [(data, field) for _, data, field in UNDECODABLE], ids=[c[0] for c in UNDECODABLE]
)
@pytest.mark.parametrize("route", ["gateway", "service"])
async def test_undecodable_bytes_are_invalid_argument(
    gw: GatewayEnv, world: World, targets: Targets, route: str, case: tuple[bytes, str]
) -> None:
    data, field = case
    channel = targets.gateway if route == "gateway" else targets.runs
    before = await fingerprint(gw, world, targets)
    raw, error = await failure(_raw(channel, WAKE)(data))
    assert_invalid(raw, error, field)
    assert await fingerprint(gw, world, targets) == before


async def test_undecodable_bytes_to_the_gateways_own_service_are_invalid_argument(
    gw: GatewayEnv, world: World, targets: Targets
) -> None:
    raw, error = await failure(_raw(targets.gateway, WHO_AM_I)(b"\xff\xff"))
    assert_invalid(raw, error, "request")


async def test_undecodable_bytes_from_an_unauthenticated_caller_are_unauthenticated(
    gw: GatewayEnv,
) -> None:
    """The caller is authenticated before the request is judged."""
    caller = gw.caller(None)
    for method in (WAKE, CREATE_ISSUE, WHO_AM_I):
        raw, error = await failure(_raw(caller.channel, method)(b"\xff\xff"))
        assert raw.code() is grpc.StatusCode.UNAUTHENTICATED, method
        assert error.reason == "UNAUTHENTICATED"


@pytest.mark.parametrize("length", [MAX_AUTHORIZATION_LENGTH + 1, 12_000, 40_000])
async def test_oversized_token_is_unauthenticated(gw: GatewayEnv, length: int) -> None:
    """Past what gRPC refuses by default (8 KiB at random, 16 KiB always) and below the
    servers' metadata limit, the authenticator refuses the token, every time."""
    caller = gw.caller("pcb_" + "a" * length)
    for _ in range(3):
        raw, error = await failure(caller.auth.WhoAmI(auth_pb2.WhoAmIRequest()))
        assert raw.code() is grpc.StatusCode.UNAUTHENTICATED
        assert error.reason == "UNAUTHENTICATED"


async def test_metadata_past_the_server_limit_is_resource_exhausted_from_grpc(
    gw: GatewayEnv,
) -> None:
    """The documented exception: gRPC itself refuses it before any handler runs."""
    limit = dict(SERVER_OPTIONS)["grpc.absolute_max_metadata_size"]
    caller = gw.caller("pcb_" + "a" * (limit + 1))
    raw, _ = await failure(caller.auth.WhoAmI(auth_pb2.WhoAmIRequest()))
    assert raw.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_message_past_the_receive_limit_is_resource_exhausted_from_grpc(
    gw: GatewayEnv, world: World, targets: Targets
) -> None:
    """The documented exception: gRPC itself refuses it before any handler runs, and
    nothing is written."""
    limit = dict(SERVER_OPTIONS)["grpc.max_receive_message_length"]
    request = workspace_messages_pb2.ExecutionWorkspace(id=targets.workspace_id)
    request.cleanup_reason = "x" * (limit + 1)
    data = workspaces_pb2.UpdateExecutionWorkspaceRequest(
        workspace=request, update_mask=field_mask_pb2.FieldMask(paths=["cleanup_reason"])
    ).SerializeToString()
    before = await fingerprint(gw, world, targets)
    for channel in (targets.gateway, targets.workspaces):
        raw, _ = await failure(_raw(channel, UPDATE_WORKSPACE)(data))
        assert raw.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await fingerprint(gw, world, targets) == before


# Found by the fuzzer (tests/gateway/test_fuzz.py): both answered INTERNAL.


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
async def test_json_numbers_that_are_not_finite_are_invalid(
    gw: GatewayEnv, world: World, targets: Targets, number: float
) -> None:
    runs = runs_pb2_grpc.RunServiceStub(targets.gateway)
    workspaces = workspaces_pb2_grpc.WorkspaceServiceStub(targets.gateway)
    woken = wake(targets.agent_id, 1)
    woken.payload.fields["n"].list_value.values.add().number_value = number
    updated = update_metadata(targets.workspace_id, 1)
    updated.workspace.metadata.fields["n"].number_value = number
    before = await fingerprint(gw, world, targets)
    raw, error = await failure(runs.WakeAgent(woken))
    assert_invalid(raw, error, "payload")
    raw, error = await failure(workspaces.UpdateExecutionWorkspace(updated))
    assert_invalid(raw, error, "workspace.metadata")
    assert await fingerprint(gw, world, targets) == before


@pytest.mark.parametrize(("seconds", "nanos"), [(2**62, 0), (-(2**40), 0), (0, -1), (0, 10**9)])
async def test_workspace_cleanup_time_out_of_range_is_invalid(
    gw: GatewayEnv, world: World, targets: Targets, seconds: int, nanos: int
) -> None:
    request = workspaces_pb2.UpdateExecutionWorkspaceRequest(
        update_mask=field_mask_pb2.FieldMask(paths=["cleanup_eligible_at"])
    )
    request.workspace.id = targets.workspace_id
    request.workspace.cleanup_eligible_at.seconds = seconds
    request.workspace.cleanup_eligible_at.nanos = nanos
    before = await fingerprint(gw, world, targets)
    raw, error = await failure(
        workspaces_pb2_grpc.WorkspaceServiceStub(targets.gateway).UpdateExecutionWorkspace(request)
    )
    assert_invalid(raw, error, "workspace.cleanup_eligible_at")
    assert await fingerprint(gw, world, targets) == before
