"""The typed client agents and tools use to call the public gateway.

``PaperclipClient`` opens one plaintext channel to the gateway and exposes the generated
async stubs on it, so every call keeps its generated request and response types::

    async with PaperclipClient.from_env() as client:
        issue = await client.issues.CheckoutIssue(request)

One client interceptor adds ``authorization: Bearer <token>``, an ``x-request-id`` and,
when the client was given one (``TRACEPARENT`` in an agent run's environment), the W3C
``traceparent`` of the trace its calls continue to every call, and turns a failed call
into the project's ``PaperclipError`` subclasses (``NotFound``,
``FailedPrecondition``...) instead of ``grpc.aio.AioRpcError``. Timeouts
and retries are not code: they are the channel's gRPC service config, built from the
service descriptors, so a new RPC gets the default timeout and is never retried until
it is named in ``IDEMPOTENT_METHODS``.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Self, TypeVar

import grpc
import grpc.aio
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from paperclip.gateway.v1 import auth_pb2, auth_pb2_grpc
from paperclip.issues.v1 import issues_pb2, issues_pb2_grpc
from paperclip.runs.v1 import runs_pb2, runs_pb2_grpc
from paperclip.workspaces.v1 import workspaces_pb2, workspaces_pb2_grpc
from paperclip_client.channels import balanced_service_config, grpc_target
from paperclip_client.errors import ConfigError, PaperclipError, from_rpc_error

API_URL_ENV = "PAPERCLIP_API_URL"
TOKEN_ENV = "PAPERCLIP_AGENT_TOKEN"
#: The trace an agent run's calls continue (OpenTelemetry's environment carrier of the
#: W3C trace context): the run service sets them when it traces.
TRACEPARENT_ENV = "TRACEPARENT"
TRACESTATE_ENV = "TRACESTATE"
#: A W3C ``traceparent`` the gateway accepts: version, trace id, parent id, flags (all
#: lower-case hex, neither id all zeros).
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
#: The header the services log and echo in error trailers (common.interceptors).
REQUEST_ID_HEADER = "x-request-id"

#: Ceiling for any unary call: well above a healthy call, low enough that a stuck
#: gateway surfaces as DEADLINE_EXCEEDED instead of a hung agent.
DEFAULT_TIMEOUT_SECONDS = 30.0
#: Ceiling for server-streaming calls (WatchRun: a watch lives as long as the run) and
#: for the workspace calls that run commands (``routes.LONG_RUNNING_METHODS``).
STREAM_TIMEOUT_SECONDS = 3600.0

#: The health service name a gateway reports SERVING while it takes calls (whatever its
#: backends' state): what clients balance on.
GATEWAY_HEALTH_SERVICE = "paperclip.gateway"

#: The services the gateway serves publicly; their methods get a service-config entry.
PUBLIC_SERVICES: tuple[ServiceDescriptor, ...] = (
    issues_pb2.DESCRIPTOR.services_by_name["IssueService"],
    runs_pb2.DESCRIPTOR.services_by_name["RunService"],
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
    workspaces_pb2.DESCRIPTOR.services_by_name["WorkspaceService"],
)

#: Calls that may safely be sent twice, and so are retried on UNAVAILABLE. Everything
#: else (CreateIssue without request_id, AddComment, Update*, Release*, Create*...) is
#: sent at most once. Names of RPCs that do not exist yet are harmless.
#: Calls that run commands in a workspace: they get the long deadline.
LONG_RUNNING_METHODS = frozenset(
    {
        "/paperclip.workspaces.v1.WorkspaceService/CreateExecutionWorkspace",
        "/paperclip.workspaces.v1.WorkspaceService/ArchiveExecutionWorkspace",
        "/paperclip.workspaces.v1.WorkspaceService/ControlRuntimeServices",
    }
)

IDEMPOTENT_METHODS: frozenset[str] = frozenset(
    {
        "paperclip.issues.v1.IssueService/GetCompany",
        "paperclip.issues.v1.IssueService/ListCompanies",
        "paperclip.issues.v1.IssueService/GetIssue",
        "paperclip.issues.v1.IssueService/ListIssues",
        "paperclip.issues.v1.IssueService/ListComments",
        "paperclip.issues.v1.IssueService/ListActivity",
        # Idempotent for the same run: a repeat returns the issue already checked out.
        "paperclip.issues.v1.IssueService/CheckoutIssue",
        "paperclip.runs.v1.RunService/GetAgent",
        "paperclip.runs.v1.RunService/ListAgents",
        "paperclip.runs.v1.RunService/GetRun",
        "paperclip.runs.v1.RunService/ListRuns",
        "paperclip.runs.v1.RunService/ListRunEvents",
        # A heartbeat: sending it twice only refreshes the same timestamp.
        "paperclip.runs.v1.RunService/ReportRunActivity",
        # Read-only; gRPC retries a stream only before its first response arrives.
        "paperclip.runs.v1.RunService/WatchRun",
        "paperclip.gateway.v1.AuthService/WhoAmI",
        "paperclip.workspaces.v1.WorkspaceService/GetExecutionWorkspace",
        "paperclip.workspaces.v1.WorkspaceService/ListExecutionWorkspaces",
        "paperclip.workspaces.v1.WorkspaceService/GetCloseReadiness",
        "paperclip.workspaces.v1.WorkspaceService/ListRuntimeServices",
        "paperclip.workspaces.v1.WorkspaceService/ListWorkspaceOperations",
        "paperclip.workspaces.v1.WorkspaceService/GetWorkspaceOperation",
        # Renewing twice only pushes the same expiry; releasing an ended lease returns it.
        "paperclip.workspaces.v1.WorkspaceService/RenewEnvironmentLease",
        "paperclip.workspaces.v1.WorkspaceService/ReleaseEnvironmentLease",
    }
)

RETRY_POLICY: dict[str, object] = {
    # Five tries in all (gRPC's own cap): rides out a gateway restart of a few seconds.
    "maxAttempts": 5,
    # Delays are drawn at random below 0.1 s, 0.2 s, 0.4 s, 0.8 s (capped at 2 s): quick
    # first retry, spread out so many agents do not reconnect in lockstep.
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    # Only "the request never reached a handler / the gateway is restarting". Never
    # DEADLINE_EXCEEDED or ABORTED: the call may have been applied.
    "retryableStatusCodes": ["UNAVAILABLE"],
}

#: Stop retrying while most attempts fail (tokens fall by 1 per failure, rise by 0.1 per
#: success; retries pause below half): a down gateway is not hammered 5x by every agent.
RETRY_THROTTLING: dict[str, object] = {"maxTokens": 10, "tokenRatio": 0.1}

_ReqT = TypeVar("_ReqT")
_RespT = TypeVar("_RespT")


def method_path(method: MethodDescriptor) -> str:
    """``package.Service/Method``: the key of ``IDEMPOTENT_METHODS`` and ``timeouts``."""
    return f"{method.containing_service.full_name}/{method.name}"


def _duration(seconds: float) -> str:
    """A protobuf JSON duration (``"0.25s"``), as the service config wants it."""
    if not math.isfinite(seconds) or seconds < 0.001:
        raise ValueError(f"timeout must be at least 0.001 s, got {seconds!r}")
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def build_service_config(timeouts: Mapping[str, float] | None = None) -> str:
    """The channel's service config (JSON): a timeout per public method, retries for
    ``IDEMPOTENT_METHODS``, and ``timeouts`` (``"pkg.Service/Method": seconds``) on top;
    calls are balanced (``round_robin``) over the gateways whose ``paperclip.gateway``
    health is SERVING.

    A call's deadline is the earlier of this timeout and the ``timeout=`` it passes, so
    ``timeouts`` is how a caller raises a ceiling.
    """
    seconds: dict[str, float] = {}
    for service in PUBLIC_SERVICES:
        for method in service.methods:
            long_lived = (
                method.server_streaming
                or method.client_streaming
                or f"/{method_path(method)}" in LONG_RUNNING_METHODS
            )
            seconds[method_path(method)] = (
                STREAM_TIMEOUT_SECONDS if long_lived else DEFAULT_TIMEOUT_SECONDS
            )
    for path, value in (timeouts or {}).items():
        service_name, _, method_name = path.partition("/")
        if not service_name or not method_name or "/" in method_name:
            raise ValueError(f"timeouts keys are 'package.Service/Method', got {path!r}")
        seconds[path] = value
    method_config: list[dict[str, object]] = [
        # Empty name: the default for every other method on the channel (health, any
        # stub a caller builds on client.channel).
        {"name": [{}], "timeout": _duration(DEFAULT_TIMEOUT_SECONDS)}
    ]
    for path, value in sorted(seconds.items()):
        service_name, _, method_name = path.partition("/")
        entry: dict[str, object] = {
            "name": [{"service": service_name, "method": method_name}],
            "timeout": _duration(value),
        }
        if path in IDEMPOTENT_METHODS:
            entry["retryPolicy"] = RETRY_POLICY
        method_config.append(entry)
    config = balanced_service_config(method_config, health_service=GATEWAY_HEALTH_SERVICE)
    config["retryThrottling"] = RETRY_THROTTLING
    return json.dumps(config)


def channel_options(service_config: str) -> list[tuple[str, str | int]]:
    """Channel arguments for a long-lived agent process talking to the gateway."""
    return [
        ("grpc.service_config", service_config),
        # Retries are on by default in current gRPC; say so, the policy above relies on it.
        ("grpc.enable_retries", 1),
        # Agents live for hours and sit idle between tool calls; NAT/firewalls drop idle
        # TCP and a vanished gateway host leaves a half-open socket. Pinging after 30 s
        # of silence (10 s to answer) finds a dead connection before the next call or a
        # WatchRun stream hangs on it. The services accept pings every 10 s, with or
        # without calls (common.server.SERVER_OPTIONS), so this never earns a GOAWAY.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Keep pinging on a quiet stream (the default stops after 2 pings without data).
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect within 10 s of the gateway coming back (the default backs off to 2 min).
        ("grpc.initial_reconnect_backoff_ms", 1_000),
        ("grpc.max_reconnect_backoff_ms", 10_000),
        # The services send pages of up to 16 MiB (run logs); the client default is 4 MiB.
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.primary_user_agent", "paperclip-client"),
    ]


def _project_error(error: grpc.aio.AioRpcError, request_id: str) -> PaperclipError:
    converted = from_rpc_error(error)
    converted.add_note(f"{REQUEST_ID_HEADER}: {request_id}")
    return converted


async def _stream_raising_project_errors(
    call: grpc.aio.UnaryStreamCall[_ReqT, _RespT], request_id: str
) -> AsyncIterator[_RespT]:
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError as error:
        raise _project_error(error, request_id) from error


class _CallHeaders:
    """Adds ``authorization``, ``x-request-id`` and the trace context to a call unless the
    caller set them."""

    def __init__(self, token: str, trace: tuple[tuple[str, str], ...] = ()) -> None:
        self._authorization = f"Bearer {token}"
        self._trace = trace

    def apply(self, details: grpc.aio.ClientCallDetails) -> tuple[grpc.aio.ClientCallDetails, str]:
        """The call's details with the headers, and the request id it carries."""
        # A copy: the caller's Metadata object may be reused for other calls.
        metadata = grpc.aio.Metadata.from_tuple(tuple(details.metadata or ()))
        if metadata.get("authorization") is None:
            metadata.add("authorization", self._authorization)
        request_id = metadata.get(REQUEST_ID_HEADER)
        if not isinstance(request_id, str) or not request_id:
            request_id = uuid.uuid4().hex
            metadata[REQUEST_ID_HEADER] = request_id
        if self._trace and metadata.get("traceparent") is None:
            for key, value in self._trace:
                metadata.add(key, value)
        new = grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )
        return new, request_id


def trace_headers(
    traceparent: str | None, tracestate: str | None = None
) -> tuple[tuple[str, str], ...]:
    """The metadata that continues the W3C trace ``traceparent`` (with its ``tracestate``);
    none without one. Raises ``ConfigError`` for a malformed ``traceparent``."""
    parent = (traceparent or "").strip()
    if not parent:
        return ()
    if not _TRACEPARENT.fullmatch(parent):
        raise ConfigError(f"not a W3C traceparent: {parent[:64]!r}")
    state = (tracestate or "").strip()
    return (("traceparent", parent), ("tracestate", state)) if state else (("traceparent", parent),)


# grpc.aio files an interceptor under the first of the four interceptor kinds it
# subclasses and ignores the rest, so each kind needs its own object.


class _UnaryInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Headers on unary calls; a failed call raises the project's exception."""

    def __init__(self, headers: _CallHeaders) -> None:
        self._headers = headers

    async def intercept_unary_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, _ReqT], Awaitable[grpc.aio.UnaryUnaryCall[_ReqT, _RespT]]
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _ReqT,
    ) -> _RespT | grpc.aio.UnaryUnaryCall[_ReqT, _RespT]:
        details, request_id = self._headers.apply(client_call_details)
        call = await continuation(details, request)
        try:
            await call
        except grpc.aio.AioRpcError as error:
            raise _project_error(error, request_id) from error
        # The finished call, not just its response: metadata stays readable.
        return call


class _StreamInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    """Headers on server-streaming calls; a failed stream raises the project's exception."""

    def __init__(self, headers: _CallHeaders) -> None:
        self._headers = headers

    async def intercept_unary_stream(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, _ReqT],
            Awaitable[grpc.aio.UnaryStreamCall[_ReqT, _RespT]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _ReqT,
    ) -> AsyncIterator[_RespT] | grpc.aio.UnaryStreamCall[_ReqT, _RespT]:
        details, request_id = self._headers.apply(client_call_details)
        call = await continuation(details, request)
        # grpc.aio keeps `call` behind the iterator: cancel() and metadata still work.
        return _stream_raising_project_errors(call, request_id)


class PaperclipClient:
    """One channel to the gateway with typed stubs for the public services.

    ``issues``, ``runs`` and ``auth`` are the generated async stubs: every method takes
    and returns its generated message types and raises ``PaperclipError`` subclasses.
    Create it inside a running event loop; close it (or use ``async with``).
    """

    issues: issues_pb2_grpc.IssueServiceAsyncStub
    runs: runs_pb2_grpc.RunServiceAsyncStub
    auth: auth_pb2_grpc.AuthServiceAsyncStub

    def __init__(
        self,
        target: str,
        token: str,
        *,
        timeouts: Mapping[str, float] | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> None:
        """Connect (lazily) to ``target`` (plaintext) as ``token``: one gateway
        (``host:port``), several (``10.0.0.5:50051,10.0.0.6:50051``) or a ``dns:///``
        name; calls are balanced over the healthy ones.

        ``timeouts`` maps ``"package.Service/Method"`` to seconds, replacing the
        default ceilings (30 s, 3600 s for streams) for those methods.

        ``traceparent`` (W3C, with its ``tracestate``) is sent with every call that does
        not carry its own, so the calls continue that trace at the gateway.
        """
        target, token = target.strip(), token.strip()
        if not target:
            raise ConfigError("the gateway address is empty")
        if not token:
            raise ConfigError("the token is empty")
        self.target = target
        headers = _CallHeaders(token, trace_headers(traceparent, tracestate))
        self.channel: grpc.aio.Channel = grpc.aio.insecure_channel(
            grpc_target(target, setting="gateway address"),
            options=channel_options(build_service_config(timeouts)),
            interceptors=[_UnaryInterceptor(headers), _StreamInterceptor(headers)],
        )
        self.issues = issues_pb2_grpc.IssueServiceStub(self.channel)
        self.runs = runs_pb2_grpc.RunServiceStub(self.channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(self.channel)
        self.workspaces = workspaces_pb2_grpc.WorkspaceServiceStub(self.channel)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        timeouts: Mapping[str, float] | None = None,
    ) -> Self:
        """The client an agent run is given: ``PAPERCLIP_API_URL`` and
        ``PAPERCLIP_AGENT_TOKEN`` from ``env`` (default ``os.environ``), and the run's
        trace, ``TRACEPARENT`` and ``TRACESTATE``, when set (a ``TRACEPARENT`` that is
        not a W3C ``traceparent`` is left out: it is not this client's to refuse)."""
        source = os.environ if env is None else env
        missing = [name for name in (API_URL_ENV, TOKEN_ENV) if not source.get(name, "").strip()]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} must be set to reach the gateway")
        parent = source.get(TRACEPARENT_ENV, "").strip()
        return cls(
            source[API_URL_ENV],
            source[TOKEN_ENV],
            timeouts=timeouts,
            traceparent=parent if _TRACEPARENT.fullmatch(parent) else None,
            tracestate=source.get(TRACESTATE_ENV),
        )

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; calls still running get ``grace`` seconds, then CANCELLED."""
        await self.channel.close(grace)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"PaperclipClient(target={self.target!r})"


__all__ = [
    "API_URL_ENV",
    "DEFAULT_TIMEOUT_SECONDS",
    "GATEWAY_HEALTH_SERVICE",
    "IDEMPOTENT_METHODS",
    "LONG_RUNNING_METHODS",
    "PUBLIC_SERVICES",
    "REQUEST_ID_HEADER",
    "STREAM_TIMEOUT_SECONDS",
    "TOKEN_ENV",
    "TRACEPARENT_ENV",
    "TRACESTATE_ENV",
    "PaperclipClient",
    "build_service_config",
    "channel_options",
    "method_path",
]
