"""Fixtures of the gateway tests: a real gateway on a real socket in front of the
in-process issue and run services, board keys and agent run tokens, and callers that
reach the gateway with any ``authorization`` header (or none, or a forged actor)."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.actor import Role
from common.config import Settings, load_settings
from common.db import Database
from common.run_tokens import mint_run_token
from common.sql import sql
from gateway import keys
from gateway.app import Gateway, start_gateway
from paperclip.gateway.v1 import auth_pb2, auth_pb2_grpc
from paperclip.issues.v1 import issue_locks_pb2_grpc, issues_pb2, issues_pb2_grpc
from paperclip.runs.v1 import agents_pb2, runs_pb2_grpc
from tests.harness import INTERNAL_KEY, Suite, insert_run, unique_prefix

#: The run-token key of the gateway under test (32+ bytes: PyJWT warns below that).
JWT_SECRET = "gateway-test-jwt-secret-0123456789abcdef"
ADMIN_USER = "gateway-test-admin"
_ROLE_TO_PROTO = {
    Role.ADMIN: auth_pb2.ROLE_ADMIN,
    Role.MEMBER: auth_pb2.ROLE_MEMBER,
    Role.VIEWER: auth_pb2.ROLE_VIEWER,
}
#: Rows no refused call may add: everything of the test world's companies (other tests'
#: background work elsewhere cannot disturb the count), and all companies and board
#: users, memberships and keys. Fixed SQL, counted in one statement.
WATCHED_ROWS: dict[str, str] = {
    "issues.issues": "SELECT count(*) FROM issues.issues WHERE company_id = ANY(:companies)",
    "issues.issue_comments": (
        "SELECT count(*) FROM issues.issue_comments WHERE company_id = ANY(:companies)"
    ),
    "audit.activity_log": (
        "SELECT count(*) FROM audit.activity_log WHERE company_id = ANY(:companies)"
    ),
    "runs.agents": "SELECT count(*) FROM runs.agents WHERE company_id = ANY(:companies)",
    "issues.companies": "SELECT count(*) FROM issues.companies",
    "gateway.users": "SELECT count(*) FROM gateway.users",
    "gateway.company_memberships": "SELECT count(*) FROM gateway.company_memberships",
    "gateway.api_keys": "SELECT count(*) FROM gateway.api_keys",
}


def gateway_settings(database_url: str, **extra: str) -> Settings:
    """Settings of a gateway under test (its own temporary home)."""
    return load_settings(
        {
            "PAPERCLIP_HOME": tempfile.mkdtemp(prefix="paperclip-gateway-test-"),
            "PAPERCLIP_DATABASE_URL": database_url,
            "PAPERCLIP_INTERNAL_KEY": INTERNAL_KEY.decode(),
            "PAPERCLIP_JWT_SECRET": JWT_SECRET,
            **extra,
        }
    )


class _FixedMetadata:
    """Fixed metadata (``authorization``, forged headers...) added to every call."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = tuple(metadata)

    def _details(self, details: Any) -> Any:
        if not self.metadata:
            return details
        return details._replace(metadata=[*(details.metadata or ()), *self.metadata])


# grpc.aio files an interceptor under the first interceptor kind it subclasses, so each
# kind needs an object of its own.


class _UnaryHeaders(_FixedMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamHeaders(_FixedMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


@dataclass
class Caller:
    """Typed stubs on one channel to the gateway that sends fixed metadata."""

    channel: grpc.aio.Channel
    issues: issues_pb2_grpc.IssueServiceAsyncStub
    runs: runs_pb2_grpc.RunServiceAsyncStub
    auth: auth_pb2_grpc.AuthServiceAsyncStub
    #: Not served by the gateway: calls must answer UNIMPLEMENTED.
    locks: issue_locks_pb2_grpc.IssueLockServiceAsyncStub
    #: grpc_health's stubs type no async methods.
    health: Any


def open_caller(address: str, metadata: Sequence[tuple[str, str]] = ()) -> Caller:
    """A caller on a fresh channel to ``address`` (the caller closes it)."""
    channel = grpc.aio.insecure_channel(
        address, interceptors=[_UnaryHeaders(metadata), _StreamHeaders(metadata)]
    )
    return Caller(
        channel,
        issues_pb2_grpc.IssueServiceStub(channel),
        runs_pb2_grpc.RunServiceStub(channel),
        auth_pb2_grpc.AuthServiceStub(channel),
        issue_locks_pb2_grpc.IssueLockServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
    )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class GatewayEnv:
    """The gateway under test, its backends and database, and the instance-admin key."""

    address: str
    gateway: Gateway
    settings: Settings
    suite: Suite
    db: Database
    database_url: str
    admin_token: str
    _callers: list[Caller] = field(default_factory=list)
    _admin: Caller | None = None

    @property
    def jwt_secret(self) -> bytes:
        return self.settings.jwt_secret

    def caller(self, token: str | None, *extra: tuple[str, str]) -> Caller:
        """Stubs sending ``authorization: Bearer <token>`` (None: no header) and ``extra``."""
        metadata = (*(bearer(token) if token is not None else ()), *extra)
        return self.raw_caller(metadata)

    def raw_caller(self, metadata: Sequence[tuple[str, str]]) -> Caller:
        """Stubs sending exactly ``metadata``."""
        caller = open_caller(self.address, metadata)
        self._callers.append(caller)
        return caller

    @property
    def admin(self) -> Caller:
        """Stubs calling as the instance admin (one shared channel)."""
        if self._admin is None:
            self._admin = self.caller(self.admin_token)
        return self._admin

    async def new_key(
        self,
        user_id: str,
        memberships: dict[str, Role] | None = None,
        *,
        is_instance_admin: bool = False,
    ) -> auth_pb2.CreateApiKeyResponse:
        """A board key created through the gateway by the instance admin."""
        return await self.admin.auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                user_id=user_id,
                name=f"key of {user_id}",
                is_instance_admin=is_instance_admin,
                memberships=[
                    auth_pb2.CompanyMembership(company_id=c, role=_ROLE_TO_PROTO[r])
                    for c, r in (memberships or {}).items()
                ],
            )
        )

    async def run_token(
        self, company_id: str, agent_id: str, *, status: str = "running"
    ) -> tuple[str, str]:
        """A run of ``agent_id`` in ``status`` and its token: (run id, token)."""
        run_id = await insert_run(self.db, company_id=company_id, agent_id=agent_id, status=status)
        token = mint_run_token(
            self.jwt_secret, agent_id=agent_id, company_id=company_id, run_id=run_id
        )
        return run_id, token

    async def close(self) -> None:
        for caller in self._callers:
            await caller.channel.close()
        self._callers.clear()
        self._admin = None


async def wait_serving(address: str, service: str = "", *, within: float = 5.0) -> None:
    """Wait until the health of ``service`` at ``address`` is SERVING."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + within
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{address} {service!r} not SERVING within {within} s")
            await asyncio.sleep(0.05)


async def create_admin_key(db: Database, user_id: str = ADMIN_USER) -> str:
    """An instance-admin board key written straight to the database; its secret."""
    async with db.unit_of_work() as tx:
        _, token = await keys.create_key(
            tx, user_id=user_id, name="gateway tests", is_instance_admin=True, memberships={}
        )
    return token


@pytest.fixture(scope="session")
async def gateway_db(database_url: str) -> AsyncIterator[Database]:
    """The gateway's own engine (application_name ``gateway``)."""
    database = Database(database_url, pool_size=10, max_overflow=10, name="gateway")
    yield database
    await database.dispose()


@pytest.fixture(scope="session")
async def gw(
    suite: Suite, gateway_db: Database, db: Database, database_url: str
) -> AsyncIterator[GatewayEnv]:
    """A gateway on port 0 routing to the session's issue and run services."""
    settings = gateway_settings(database_url)
    gateway = await start_gateway(
        gateway_db,
        settings,
        address="127.0.0.1:0",
        backends=suite.backends(),
    )
    address = f"127.0.0.1:{gateway.running.port}"
    env = GatewayEnv(
        address=address,
        gateway=gateway,
        settings=settings,
        suite=suite,
        db=db,
        database_url=database_url,
        admin_token=await create_admin_key(db),
    )
    try:
        await wait_serving(address)
        yield env
    finally:
        await env.close()
        await gateway.stop(0.5)


@dataclass
class World:
    """Two companies (A with an issue and two agents, B with an issue and an agent) and
    board keys of members of A with each role."""

    company_a: str
    company_b: str
    issue_a: issues_pb2.Issue
    issue_b: issues_pb2.Issue
    agent_a: str
    agent_a2: str
    agent_b: str
    admin_a: auth_pb2.CreateApiKeyResponse
    member_a: auth_pb2.CreateApiKeyResponse
    viewer_a: auth_pb2.CreateApiKeyResponse


async def _agent(gw: GatewayEnv, company_id: str) -> str:
    created = await gw.admin.runs.CreateAgent(
        agents_pb2.CreateAgentRequest(
            company_id=company_id,
            name=f"agent-{unique_prefix().lower()}",
            role="engineer",
            adapter_type="process",
            adapter_config=agents_pb2.AdapterConfig(command=["python3", "-c", "pass"]),
        )
    )
    return created.id


@pytest.fixture(scope="module")
async def world(gw: GatewayEnv) -> World:
    """A fresh world, seeded through the gateway as the instance admin."""
    admin = gw.admin
    companies = [
        await admin.issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name=name, issue_prefix=unique_prefix())
        )
        for name in ("Company A", "Company B")
    ]
    a, b = (c.id for c in companies)
    issue_a, issue_b = [
        await admin.issues.CreateIssue(issues_pb2.CreateIssueRequest(company_id=c, title=t))
        for c, t in ((a, "Issue of A"), (b, "Issue of B"))
    ]
    suffix = unique_prefix().lower()
    return World(
        company_a=a,
        company_b=b,
        issue_a=issue_a,
        issue_b=issue_b,
        agent_a=await _agent(gw, a),
        agent_a2=await _agent(gw, a),
        agent_b=await _agent(gw, b),
        admin_a=await gw.new_key(f"admin-{suffix}", {a: Role.ADMIN}),
        member_a=await gw.new_key(f"member-{suffix}", {a: Role.MEMBER}),
        viewer_a=await gw.new_key(f"viewer-{suffix}", {a: Role.VIEWER}),
    )


async def row_counts(db: Database, world: World) -> dict[str, int]:
    """The watched row counts (see ``WATCHED_ROWS``)."""
    counts = ", ".join(f"({query})" for query in WATCHED_ROWS.values())
    companies = [uuid.UUID(world.company_a), uuid.UUID(world.company_b)]
    async with db.unit_of_work() as tx:
        row = await tx.fetchrow(sql(f"SELECT {counts}"), {"companies": companies})
    assert row is not None
    return {name: int(row[i]) for i, name in enumerate(WATCHED_ROWS)}
