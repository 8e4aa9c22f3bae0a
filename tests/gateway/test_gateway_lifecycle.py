"""The gateway's health follows its backends and its own shutdown; a gateway restart
costs clients that retry nothing but UNAVAILABLE."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from paperclip_client import PaperclipClient

from common.db import Database
from common.errors import PaperclipError
from gateway.app import Gateway, start_gateway
from gateway.routes import PUBLIC_SERVICES
from paperclip.issues.v1 import issues_pb2, issues_pb2_grpc
from paperclip.runs.v1 import agents_pb2
from tests.gateway.conftest import GatewayEnv, World, gateway_settings, open_caller, wait_serving

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AUTH_SERVICE = "paperclip.gateway.v1.AuthService"
ISSUE_SERVICE = "paperclip.issues.v1.IssueService"
RUN_SERVICE = "paperclip.runs.v1.RunService"
WORKSPACE_SERVICE = "paperclip.workspaces.v1.WorkspaceService"


def free_port() -> int:
    """A port nothing listens on (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def extra_gateway(
    gw: GatewayEnv,
    gateway_db: Database,
    *,
    address: str = "127.0.0.1:0",
    backends: dict[str, str] | None = None,
) -> AsyncIterator[Gateway]:
    """Another gateway on the session's database, stopped at the end (if still up)."""
    gateway = await start_gateway(
        gateway_db,
        gateway_settings(gw.database_url),
        address=address,
        backends=backends or gw.suite.backends(),
    )
    try:
        yield gateway
    finally:
        await gateway.stop(0)


async def statuses(address: str, services: list[str]) -> dict[str, int]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        return {
            service: (
                await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            ).status
            for service in services
        }


ALL = ["", *PUBLIC_SERVICES, AUTH_SERVICE]


async def test_serving_once_backends_are_up(gw: GatewayEnv) -> None:
    assert await statuses(gw.address, ALL) == dict.fromkeys(ALL, SERVING)


async def test_not_serving_during_shutdown(gw: GatewayEnv, gateway_db: Database) -> None:
    async with extra_gateway(gw, gateway_db) as gateway:
        address = f"127.0.0.1:{gateway.running.port}"
        await wait_serving(address)
        async with grpc.aio.insecure_channel(address) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            watches = {
                service: stub.Watch(health_pb2.HealthCheckRequest(service=service))
                for service in ("", ISSUE_SERVICE)
            }
            for watch in watches.values():
                assert (await watch.read()).status == SERVING

            stopping = asyncio.ensure_future(gateway.stop(1.0))
            seen = {
                service: (await asyncio.wait_for(watch.read(), timeout=1.0)).status
                for service, watch in watches.items()
            }
            # Still draining (the watches are in flight), already NOT_SERVING.
            assert not stopping.done()
            await stopping

    assert seen == {"": NOT_SERVING, ISSUE_SERVICE: NOT_SERVING}


async def test_shutdown_status_is_not_undone_by_the_backend_checks(
    gw: GatewayEnv, gateway_db: Database
) -> None:
    async with extra_gateway(gw, gateway_db) as gateway:
        address = f"127.0.0.1:{gateway.running.port}"
        await wait_serving(address)

        await gateway.running.health.enter_graceful_shutdown()
        # Longer than the backend check interval (1 s): the follower ran again meanwhile.
        await asyncio.sleep(1.3)

        assert await statuses(address, ALL) == dict.fromkeys(ALL, NOT_SERVING)


async def test_a_down_backend_is_not_serving_and_its_calls_unavailable(
    gw: GatewayEnv, gateway_db: Database, world: World
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with extra_gateway(
        gw, gateway_db, backends={**gw.suite.backends(), "run_service": dead}
    ) as gateway:
        address = f"127.0.0.1:{gateway.running.port}"
        await wait_serving(address, ISSUE_SERVICE)

        seen = await statuses(address, ALL)

        caller = open_caller(address, (("authorization", f"Bearer {gw.admin_token}"),))
        try:
            company = await caller.issues.GetCompany(
                issues_pb2.GetCompanyRequest(company_id=world.company_a)
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await caller.runs.GetAgent(agents_pb2.GetAgentRequest(agent_id=world.agent_a))
        finally:
            await caller.channel.close()

    assert seen == {
        "": NOT_SERVING,
        ISSUE_SERVICE: SERVING,
        RUN_SERVICE: NOT_SERVING,
        WORKSPACE_SERVICE: SERVING,
        AUTH_SERVICE: NOT_SERVING,
    }
    assert company.id == world.company_a
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert [k for k, _ in refused.value.trailing_metadata() or ()].count("x-request-id") == 1


# -- restart ----------------------------------------------------------------------------

RETRYING_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": ISSUE_SERVICE, "method": "GetCompany"}],
                "timeout": "5s",
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class _Loop:
    """Idempotent calls in a loop; what each one ended with."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.successes: list[float] = []
        self.errors: list[str] = []
        #: Calls that were in flight on the old gateway when it stopped may be aborted
        #: by its shutdown (CANCELLED): (start time, code) of every failed call.
        self.failures: list[tuple[float, str]] = []
        self.running = True

    async def run(self) -> None:
        while self.running:
            started = time.monotonic()
            try:
                await self.call()
                self.successes.append(time.monotonic())
            except grpc.aio.AioRpcError as exc:
                self.errors.append(exc.code().name)
                self.failures.append((started, exc.code().name))
            except PaperclipError as exc:
                self.errors.append(exc.code.name)
                self.failures.append((started, exc.code.name))
            await asyncio.sleep(0.02)

    async def succeeded_after(self, moment: float, *, within: float) -> None:
        deadline = time.monotonic() + within
        while not any(t > moment for t in self.successes):
            if time.monotonic() > deadline:
                raise AssertionError(f"no call succeeded {within} s after the restart")
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("client", ["service-config-channel", "paperclip-client"])
async def test_calls_resume_after_a_gateway_restart(
    gw: GatewayEnv, gateway_db: Database, world: World, client: str
) -> None:
    address = f"127.0.0.1:{free_port()}"
    request = issues_pb2.GetCompanyRequest(company_id=world.company_a)
    metadata = (("authorization", f"Bearer {gw.admin_token}"),)
    closers: list[Callable[[], Any]] = []
    if client == "paperclip-client":
        paperclip = PaperclipClient(address, gw.admin_token)
        closers.append(paperclip.close)
        loop = _Loop(lambda: paperclip.issues.GetCompany(request))
    else:
        channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.service_config", RETRYING_CONFIG),
                ("grpc.enable_retries", 1),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        closers.append(channel.close)
        stub = issues_pb2_grpc.IssueServiceStub(channel)
        loop = _Loop(lambda: stub.GetCompany(request, metadata=metadata))

    first = await start_gateway(
        gateway_db,
        gateway_settings(gw.database_url),
        address=address,
        backends=gw.suite.backends(),
    )
    task = asyncio.ensure_future(loop.run())
    second: Gateway | None = None
    try:
        await loop.succeeded_after(0, within=5)
        stopping_at = time.monotonic()
        await first.stop(1.0)
        down_at = time.monotonic()
        await asyncio.sleep(1.0)
        second = await start_gateway(
            gateway_db,
            gateway_settings(gw.database_url),
            address=address,
            backends=gw.suite.backends(),
        )
        up_at = time.monotonic()
        await loop.succeeded_after(up_at, within=8)
        await asyncio.sleep(0.3)
    finally:
        loop.running = False
        await task
        if second is not None:
            await second.stop(0)
        for close in closers:
            await close()

    # Only UNAVAILABLE while the gateway is down; a call already in flight on the old
    # gateway when its shutdown began may end CANCELLED; nothing else, ever.
    unexpected = [
        (round(t - stopping_at, 3), code)
        for t, code in loop.failures
        if code != "UNAVAILABLE" and not (code == "CANCELLED" and t <= down_at)
    ]
    assert unexpected == [], loop.failures
    assert any(t < down_at for t in loop.successes)
    assert sum(t > up_at for t in loop.successes) >= 3
