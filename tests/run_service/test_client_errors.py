"""The channels to other services raise the suite's exceptions, and the after-run calls
retry on them exactly as on the raw gRPC errors.

A small gRPC server on a free port answers a made-up method: it aborts with the status
(and ``ErrorInfo``) the request names, the way the services' interceptor does, or
sleeps past the caller's deadline, or answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from common.channels import backend_channel
from common.config import load_settings
from common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PaperclipError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    to_wire_status,
)
from paperclip.issues.v1 import issue_locks_pb2
from run_service.acknowledged_call import RETRYABLE, until_acknowledged
from run_service.issue_client import IssueClient

METHOD = "/paperclip.test.Failing/Call"
RAISED = [
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Aborted,
    Unavailable,
    Internal,
]
NOT_RETRIED = [
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
]


class Failing:
    """Answers ``METHOD`` with what each request (JSON) asks for; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def call(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self.calls += 1
        ask = json.loads(request)
        if self.calls > ask.get("fail_times", 1 << 30):
            return b"done"
        if "sleep" in ask:
            await asyncio.sleep(ask["sleep"])
            return b"late"
        if "error" in ask:
            cls = next(c for c in RAISED if c.__name__ == ask["error"])
            error = cls(
                "refused",
                reason=ask.get("reason"),
                metadata=ask.get("metadata"),
                violations=[FieldViolation(f, d) for f, d in ask.get("violations", [])],
            )
            await context.abort_with_status(to_wire_status(error))
        await context.abort(grpc.StatusCode[ask["code"]], "bare status")
        return b""


@pytest.fixture
async def failing() -> AsyncIterator[tuple[Failing, str]]:
    servicer = Failing()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "paperclip.test.Failing",
                {"Call": grpc.unary_unary_rpc_method_handler(servicer.call)},
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def channel(failing: tuple[Failing, str]) -> AsyncIterator[grpc.aio.Channel]:
    channel = backend_channel(failing[1])
    try:
        yield channel
    finally:
        await channel.close()


def caller(channel: grpc.aio.Channel, timeout: float = 5.0) -> Callable[..., Awaitable[bytes]]:
    multicallable: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)

    async def call(**ask: Any) -> bytes:
        reply: bytes = await multicallable(json.dumps(ask).encode(), timeout=timeout)
        return reply

    return call


async def raised(call: Awaitable[bytes]) -> PaperclipError:
    with pytest.raises(PaperclipError) as caught:
        await call
    return caught.value


@pytest.mark.parametrize("cls", RAISED, ids=lambda cls: cls.__name__)
async def test_each_status_raises_its_class_with_reason_and_metadata(
    channel: grpc.aio.Channel, cls: type[PaperclipError]
) -> None:
    error = await raised(
        caller(channel)(
            error=cls.__name__,
            reason="WIDGET_JAMMED",
            metadata={"widget_id": "w-1", "attempt": "3"},
            violations=[["widget.name", "is empty"]],
        )
    )
    assert type(error) is cls
    assert error.code is cls.code
    assert error.message == "refused"
    assert error.reason == "WIDGET_JAMMED"
    assert error.metadata == {"widget_id": "w-1", "attempt": "3"}
    assert error.violations == (FieldViolation("widget.name", "is empty"),)
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)
    assert error.__cause__.code() is cls.code


async def test_the_default_reason_when_the_server_names_none(channel: grpc.aio.Channel) -> None:
    error = await raised(caller(channel)(error="NotFound"))
    assert isinstance(error, NotFound)
    assert (error.reason, error.metadata) == ("NOT_FOUND", {})


async def test_a_bare_status_keeps_its_code(channel: grpc.aio.Channel) -> None:
    unavailable = await raised(caller(channel)(code="UNAVAILABLE"))
    assert isinstance(unavailable, Unavailable)
    assert unavailable.reason == "UNAVAILABLE"
    unimplemented = await raised(caller(channel)(code="UNIMPLEMENTED"))
    assert type(unimplemented) is PaperclipError
    assert unimplemented.code is grpc.StatusCode.UNIMPLEMENTED
    assert unimplemented.reason == "UNIMPLEMENTED"


async def test_a_missed_deadline_raises_with_its_code(channel: grpc.aio.Channel) -> None:
    error = await raised(caller(channel, timeout=0.2)(sleep=2.0))
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.reason == "DEADLINE_EXCEEDED"


async def test_an_answer_passes_through(channel: grpc.aio.Channel) -> None:
    assert await caller(channel)(fail_times=0) == b"done"


async def test_raw_errors_channel_raises_the_grpc_error(failing: tuple[Failing, str]) -> None:
    channel = backend_channel(failing[1], raw_errors=True)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await caller(channel)(error="NotFound", reason="WIDGET_GONE")
    finally:
        await channel.close()
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


# --- the retry layer ---------------------------------------------------------------


async def acknowledged(call: Callable[[], Awaitable[bytes]], closing: bool = False) -> bytes | None:
    event = asyncio.Event()
    if closing:
        event.set()
    return await until_acknowledged(call, name="Call", run_id="run-1", closing=event)


@pytest.mark.parametrize("code", sorted(RETRYABLE - {grpc.StatusCode.CANCELLED}, key=str))
async def test_transient_statuses_are_retried_until_answered(
    channel: grpc.aio.Channel, failing: tuple[Failing, str], code: grpc.StatusCode
) -> None:
    call = caller(channel)
    assert await acknowledged(lambda: call(code=code.name, fail_times=2)) == b"done"
    assert failing[0].calls == 3


async def test_unavailable_with_details_is_retried(
    channel: grpc.aio.Channel, failing: tuple[Failing, str]
) -> None:
    call = caller(channel)
    reply = await acknowledged(
        lambda: call(error="Unavailable", reason="DATABASE_UNAVAILABLE", fail_times=1)
    )
    assert reply == b"done"
    assert failing[0].calls == 2


async def test_a_missed_deadline_is_retried(
    channel: grpc.aio.Channel, failing: tuple[Failing, str]
) -> None:
    call = caller(channel, timeout=0.2)
    assert await acknowledged(lambda: call(sleep=2.0, fail_times=1)) == b"done"
    assert failing[0].calls == 2


@pytest.mark.parametrize("code", NOT_RETRIED, ids=str)
async def test_refusals_are_given_up_at_once(
    channel: grpc.aio.Channel, failing: tuple[Failing, str], code: grpc.StatusCode
) -> None:
    call = caller(channel)
    assert await acknowledged(lambda: call(code=code.name, fail_times=5)) is None
    assert failing[0].calls == 1


async def test_shutdown_makes_one_attempt_at_most(
    channel: grpc.aio.Channel, failing: tuple[Failing, str]
) -> None:
    call = caller(channel)
    assert await acknowledged(lambda: call(code="UNAVAILABLE"), closing=True) is None
    assert failing[0].calls == 1


# --- the issue client over such a channel ----------------------------------------------


class Locks:
    """Two methods of an issue lock service: it refuses locks and is down for the first
    releases."""

    def __init__(self) -> None:
        self.releases = 0

    async def acquire(
        self,
        request: issue_locks_pb2.AcquireExecutionLockRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> issue_locks_pb2.AcquireExecutionLockResponse:
        held = FailedPrecondition(
            "the issue is locked by another run",
            reason="ISSUE_EXECUTION_LOCKED",
            metadata={"issue_id": request.issue_id, "run_id": "other-run"},
        )
        await context.abort_with_status(to_wire_status(held))
        raise AssertionError("unreachable")

    async def release(
        self,
        request: issue_locks_pb2.ReleaseRunLocksRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> issue_locks_pb2.ReleaseRunLocksResponse:
        self.releases += 1
        if self.releases <= 2:
            await context.abort_with_status(
                to_wire_status(Unavailable("database down", reason="DATABASE_UNAVAILABLE"))
            )
        return issue_locks_pb2.ReleaseRunLocksResponse(issue_ids=["issue-1"])


@pytest.fixture
async def issue_client(tmp_path: Path) -> AsyncIterator[tuple[IssueClient, Locks]]:
    locks = Locks()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "paperclip.issues.v1.IssueLockService",
                {
                    "AcquireExecutionLock": grpc.unary_unary_rpc_method_handler(
                        locks.acquire,
                        request_deserializer=issue_locks_pb2.AcquireExecutionLockRequest.FromString,
                        response_serializer=issue_locks_pb2.AcquireExecutionLockResponse.SerializeToString,
                    ),
                    "ReleaseRunLocks": grpc.unary_unary_rpc_method_handler(
                        locks.release,
                        request_deserializer=issue_locks_pb2.ReleaseRunLocksRequest.FromString,
                        response_serializer=issue_locks_pb2.ReleaseRunLocksResponse.SerializeToString,
                    ),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    settings = load_settings(
        {
            "PAPERCLIP_HOME": str(tmp_path),
            "PAPERCLIP_ISSUE_SERVICE_ADDR": f"127.0.0.1:{port}",
            "PAPERCLIP_INTERNAL_KEY": "internal-key-of-the-test",
            "PAPERCLIP_JWT_SECRET": "jwt-secret-of-the-test",
        }
    )
    client = IssueClient(settings)
    try:
        yield client, locks
    finally:
        await client.close()
        await server.stop(None)


async def test_issue_client_raises_the_refusal_with_its_reason(
    issue_client: tuple[IssueClient, Locks],
) -> None:
    client, _ = issue_client
    with pytest.raises(FailedPrecondition) as caught:
        await client.acquire_execution_lock(issue_id="issue-1", run_id="run-1", agent_id="a-1")
    assert caught.value.reason == "ISSUE_EXECUTION_LOCKED"
    assert caught.value.metadata == {"issue_id": "issue-1", "run_id": "other-run"}


async def test_issue_client_release_is_retried_until_acknowledged(
    issue_client: tuple[IssueClient, Locks],
) -> None:
    client, locks = issue_client
    assert await client.release_run_locks("run-1") == ["issue-1"]
    # Two refusals, whether the channel (an idempotent method) or the loop retried them.
    assert locks.releases == 3
