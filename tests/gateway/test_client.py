"""PaperclipClient against a small IssueService test server over a real socket: auth
metadata, rich errors, retries only for idempotent methods, per-method timeouts."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
import grpc.aio
import pytest
from paperclip_client import (
    IDEMPOTENT_METHODS,
    PUBLIC_SERVICES,
    REQUEST_ID_HEADER,
    PaperclipClient,
    build_service_config,
    method_path,
)

from common.errors import (
    ConfigError,
    FailedPrecondition,
    NotFound,
    PaperclipError,
    Unavailable,
    to_wire_status,
)
from gateway.routes import build_routes
from paperclip.issues.v1 import issues_pb2, issues_pb2_grpc

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

TOKEN = "run-token-0123456789"
ISSUE_ID = "0b6a3c1e-5b8e-4c3a-9f1e-2d7c8a9b0c1d"
PROBE_SERVICE = "paperclip.test.v1.StreamProbe"


@dataclass
class Attempt:
    """One call as the server saw it."""

    method: str
    metadata: dict[str, str]


class RecordingIssues(issues_pb2_grpc.IssueServiceServicer):
    """Records every attempt; fails the first ``fail_first`` attempts of each method
    with UNAVAILABLE; sleeps for issues named ``slow``."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self.fail_first: dict[str, int] = {}

    async def _record(self, method: str, context: Context) -> None:
        metadata = {
            key: value
            for key, value in (context.invocation_metadata() or ())
            if isinstance(value, str)
        }
        self.attempts.append(Attempt(method, metadata))
        seen = sum(1 for attempt in self.attempts if attempt.method == method)
        if seen <= self.fail_first.get(method, 0):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    def count(self, method: str) -> int:
        return sum(1 for attempt in self.attempts if attempt.method == method)

    async def GetIssue(
        self, request: issues_pb2.GetIssueRequest, context: Context
    ) -> issues_pb2.Issue:
        await self._record("GetIssue", context)
        if request.issue == "missing":
            error = NotFound(
                "issue missing not found", reason="ISSUE_NOT_FOUND", metadata={"issue": "missing"}
            )
            await context.abort_with_status(to_wire_status(error))
        if request.issue == "slow":
            await asyncio.sleep(1.0)
        return issues_pb2.Issue(id=ISSUE_ID, identifier=request.issue)

    async def ListIssues(
        self, request: issues_pb2.ListIssuesRequest, context: Context
    ) -> issues_pb2.ListIssuesResponse:
        await self._record("ListIssues", context)
        await asyncio.sleep(0.5)
        return issues_pb2.ListIssuesResponse(issues=[issues_pb2.Issue(id=ISSUE_ID)])

    async def AddComment(
        self, request: issues_pb2.AddCommentRequest, context: Context
    ) -> issues_pb2.Comment:
        await self._record("AddComment", context)
        return issues_pb2.Comment(issue_id=request.issue_id, body=request.body)


async def _watch(
    request: issues_pb2.GetIssueRequest, context: Context
) -> AsyncIterator[issues_pb2.Issue]:
    """A server-streaming probe: echoes the bearer token twice, then fails richly."""
    metadata = dict(context.invocation_metadata() or ())
    yield issues_pb2.Issue(id=ISSUE_ID, description=str(metadata.get("authorization")))
    yield issues_pb2.Issue(id=ISSUE_ID, description=str(metadata.get(REQUEST_ID_HEADER)))
    error = FailedPrecondition("checkout held", reason="ISSUE_CHECKOUT_CONFLICT")
    await context.abort_with_status(to_wire_status(error))


@dataclass
class ProbeServer:
    address: str
    issues: RecordingIssues
    server: grpc.aio.Server = field(repr=False)


@pytest.fixture
async def probe_server() -> AsyncIterator[ProbeServer]:
    server = grpc.aio.server()
    # The generated .pyi marks every RPC abstract; the runtime base answers UNIMPLEMENTED
    # for the ones this test server leaves out.
    issues = RecordingIssues()  # type: ignore[abstract]
    issues_pb2_grpc.add_IssueServiceServicer_to_server(issues, server)
    probe = grpc.method_handlers_generic_handler(
        PROBE_SERVICE,
        {
            "Watch": grpc.unary_stream_rpc_method_handler(
                _watch,
                request_deserializer=issues_pb2.GetIssueRequest.FromString,
                response_serializer=issues_pb2.Issue.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((probe,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield ProbeServer(f"127.0.0.1:{port}", issues, server)
    await server.stop(0)


@pytest.fixture
async def client(probe_server: ProbeServer) -> AsyncIterator[PaperclipClient]:
    async with PaperclipClient(probe_server.address, TOKEN) as paperclip:
        yield paperclip


async def test_every_call_carries_the_bearer_token_and_a_fresh_request_id(
    client: PaperclipClient, probe_server: ProbeServer
) -> None:
    issue = await client.issues.GetIssue(issues_pb2.GetIssueRequest(issue="PAP-1"))
    await client.issues.GetIssue(issues_pb2.GetIssueRequest(issue="PAP-2"))

    assert issue.identifier == "PAP-1"
    first, second = probe_server.issues.attempts
    assert first.metadata["authorization"] == f"Bearer {TOKEN}"
    assert re.fullmatch(r"[0-9a-f]{32}", first.metadata[REQUEST_ID_HEADER])
    assert first.metadata[REQUEST_ID_HEADER] != second.metadata[REQUEST_ID_HEADER]


async def test_a_request_id_the_caller_passes_is_kept(
    client: PaperclipClient, probe_server: ProbeServer
) -> None:
    metadata = grpc.aio.Metadata((REQUEST_ID_HEADER, "caller-chosen-id"))

    await client.issues.GetIssue(issues_pb2.GetIssueRequest(issue="PAP-1"), metadata=metadata)
    await client.issues.GetIssue(issues_pb2.GetIssueRequest(issue="PAP-1"))

    assert probe_server.issues.attempts[0].metadata[REQUEST_ID_HEADER] == "caller-chosen-id"
    # The caller's Metadata object is not changed behind its back.
    assert list(metadata) == [(REQUEST_ID_HEADER, "caller-chosen-id")]
    assert probe_server.issues.attempts[1].metadata[REQUEST_ID_HEADER] != "caller-chosen-id"


async def test_rich_status_becomes_the_project_exception_with_its_reason(
    client: PaperclipClient,
) -> None:
    with pytest.raises(NotFound) as caught:
        await client.issues.GetIssue(issues_pb2.GetIssueRequest(issue="missing"))

    assert caught.value.reason == "ISSUE_NOT_FOUND"
    assert caught.value.metadata == {"issue": "missing"}
    assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)
    assert any(note.startswith(REQUEST_ID_HEADER) for note in caught.value.__notes__)


async def test_idempotent_get_is_retried_on_unavailable_with_one_request_id(
    client: PaperclipClient, probe_server: ProbeServer
) -> None:
    probe_server.issues.fail_first["GetIssue"] = 2

    issue = await client.issues.GetIssue(issues_pb2.GetIssueRequest(issue="PAP-7"))

    assert issue.identifier == "PAP-7"
    assert probe_server.issues.count("GetIssue") == 3
    assert len({a.metadata[REQUEST_ID_HEADER] for a in probe_server.issues.attempts}) == 1


async def test_add_comment_is_not_retried_on_unavailable(
    client: PaperclipClient, probe_server: ProbeServer
) -> None:
    probe_server.issues.fail_first["AddComment"] = 2

    with pytest.raises(Unavailable):
        await client.issues.AddComment(issues_pb2.AddCommentRequest(issue_id=ISSUE_ID, body="hi"))

    assert probe_server.issues.count("AddComment") == 1


async def test_per_method_timeout_override_expires_only_that_method(
    probe_server: ProbeServer,
) -> None:
    timeouts = {"paperclip.issues.v1.IssueService/GetIssue": 0.2}
    async with PaperclipClient(probe_server.address, TOKEN, timeouts=timeouts) as client:
        started = time.monotonic()
        with pytest.raises(PaperclipError) as caught:
            await client.issues.GetIssue(issues_pb2.GetIssueRequest(issue="slow"))
        elapsed = time.monotonic() - started
        # ListIssues takes 0.5 s and keeps the 30 s default.
        listed = await client.issues.ListIssues(issues_pb2.ListIssuesRequest())

    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.reason == "DEADLINE_EXCEEDED"
    assert elapsed < 0.8
    assert len(listed.issues) == 1


async def test_streaming_calls_carry_auth_and_raise_project_errors(
    client: PaperclipClient,
) -> None:
    watch = client.channel.unary_stream(
        f"/{PROBE_SERVICE}/Watch",
        request_serializer=issues_pb2.GetIssueRequest.SerializeToString,
        response_deserializer=issues_pb2.Issue.FromString,
    )
    received: list[str] = []

    with pytest.raises(FailedPrecondition) as caught:
        async for issue in watch(issues_pb2.GetIssueRequest(issue="PAP-1")):
            received.append(issue.description)

    assert received[0] == f"Bearer {TOKEN}"
    assert re.fullmatch(r"[0-9a-f]{32}", received[1])
    assert caught.value.reason == "ISSUE_CHECKOUT_CONFLICT"


async def test_from_env_reaches_the_gateway_with_the_agent_token(
    probe_server: ProbeServer,
) -> None:
    env = {"PAPERCLIP_API_URL": probe_server.address, "PAPERCLIP_AGENT_TOKEN": "env-token\n"}

    async with PaperclipClient.from_env(env) as client:
        await client.issues.GetIssue(issues_pb2.GetIssueRequest(issue="PAP-1"))

    assert probe_server.issues.attempts[0].metadata["authorization"] == "Bearer env-token"


@pytest.mark.parametrize(
    ("env", "missing", "present"),
    [
        ({}, ["PAPERCLIP_API_URL", "PAPERCLIP_AGENT_TOKEN"], []),
        ({"PAPERCLIP_API_URL": "127.0.0.1:1"}, ["PAPERCLIP_AGENT_TOKEN"], ["PAPERCLIP_API_URL"]),
        (
            {"PAPERCLIP_API_URL": " ", "PAPERCLIP_AGENT_TOKEN": "t"},
            ["PAPERCLIP_API_URL"],
            ["PAPERCLIP_AGENT_TOKEN"],
        ),
    ],
)
async def test_from_env_names_each_missing_variable(
    env: dict[str, str], missing: list[str], present: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        PaperclipClient.from_env(env)

    assert isinstance(caught.value, ValueError)
    for name in missing:
        assert name in str(caught.value)
    for name in present:
        assert name not in str(caught.value)


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_from_env_sends_the_runs_trace_with_every_call_unless_the_call_has_one(
    probe_server: ProbeServer,
) -> None:
    env = {
        "PAPERCLIP_API_URL": probe_server.address,
        "PAPERCLIP_AGENT_TOKEN": "env-token",
        "TRACEPARENT": TRACEPARENT,
        "TRACESTATE": "paperclip=run",
    }
    own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async with PaperclipClient.from_env(env) as client:
        await client.issues.GetIssue(issues_pb2.GetIssueRequest(issue="PAP-1"))
        await client.issues.GetIssue(
            issues_pb2.GetIssueRequest(issue="PAP-2"), metadata=(("traceparent", own),)
        )

    first, second = probe_server.issues.attempts
    assert (first.metadata["traceparent"], first.metadata["tracestate"]) == (
        TRACEPARENT,
        "paperclip=run",
    )
    assert second.metadata["traceparent"] == own
    assert "tracestate" not in second.metadata


@pytest.mark.parametrize(
    "value", ["", "  ", "not-a-trace", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"]
)
async def test_from_env_leaves_out_a_missing_or_malformed_traceparent(
    probe_server: ProbeServer, value: str
) -> None:
    env = {
        "PAPERCLIP_API_URL": probe_server.address,
        "PAPERCLIP_AGENT_TOKEN": "env-token",
        "TRACEPARENT": value,
    }

    async with PaperclipClient.from_env(env) as client:
        await client.issues.GetIssue(issues_pb2.GetIssueRequest(issue="PAP-1"))

    assert "traceparent" not in probe_server.issues.attempts[0].metadata


async def test_a_malformed_traceparent_given_to_the_client_is_refused() -> None:
    with pytest.raises(ConfigError, match="traceparent"):
        PaperclipClient("127.0.0.1:1", TOKEN, traceparent=TRACEPARENT.upper())


def _method_configs(config: str) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for entry in json.loads(config)["methodConfig"]:
        for name in entry["name"]:
            if name:
                entries[f"{name['service']}/{name['method']}"] = entry
    return entries


def test_service_config_retries_only_idempotent_methods() -> None:
    entries = _method_configs(build_service_config())
    public = {method_path(m) for service in PUBLIC_SERVICES for m in service.methods}
    never_retried = [
        "paperclip.issues.v1.IssueService/CreateIssue",
        "paperclip.issues.v1.IssueService/AddComment",
        "paperclip.issues.v1.IssueService/UpdateIssue",
        "paperclip.issues.v1.IssueService/ReleaseIssue",
        "paperclip.issues.v1.IssueService/ForceReleaseIssue",
        "paperclip.issues.v1.IssueService/CreateCompany",
        "paperclip.runs.v1.RunService/CreateAgent",
        "paperclip.runs.v1.RunService/UpdateAgent",
        "paperclip.gateway.v1.AuthService/CreateApiKey",
        "paperclip.workspaces.v1.WorkspaceService/CreateExecutionWorkspace",
        "paperclip.workspaces.v1.WorkspaceService/ControlRuntimeServices",
        "paperclip.workspaces.v1.WorkspaceService/ArchiveExecutionWorkspace",
        "paperclip.workspaces.v1.WorkspaceService/AcquireEnvironmentLease",
    ]

    assert public <= entries.keys()
    for path in public:
        assert ("retryPolicy" in entries[path]) == (path in IDEMPOTENT_METHODS), path
    for path in never_retried:
        assert path not in IDEMPOTENT_METHODS
    policy = entries["paperclip.issues.v1.IssueService/CheckoutIssue"]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert policy["maxAttempts"] == 5


def test_timeouts_override_one_method_and_reject_bad_keys() -> None:
    entries = _method_configs(
        build_service_config({"paperclip.issues.v1.IssueService/GetIssue": 5.0})
    )

    assert entries["paperclip.issues.v1.IssueService/GetIssue"]["timeout"] == "5s"
    assert entries["paperclip.issues.v1.IssueService/ListIssues"]["timeout"] == "30s"
    with pytest.raises(ValueError, match="Service/Method"):
        build_service_config({"GetIssue": 5.0})
    with pytest.raises(ValueError, match="at least"):
        build_service_config({"paperclip.issues.v1.IssueService/GetIssue": 0.0})


def test_calls_that_run_commands_get_the_long_timeout() -> None:
    entries = _method_configs(build_service_config())
    workspaces = "paperclip.workspaces.v1.WorkspaceService"

    for method in (
        "CreateExecutionWorkspace",
        "ControlRuntimeServices",
        "ArchiveExecutionWorkspace",
    ):
        assert entries[f"{workspaces}/{method}"]["timeout"] == "3600s", method
    assert entries[f"{workspaces}/GetExecutionWorkspace"]["timeout"] == "30s"
    routes = build_routes()
    assert routes[f"/{workspaces}/ControlRuntimeServices"].long_running
    assert not routes[f"/{workspaces}/GetCloseReadiness"].long_running
