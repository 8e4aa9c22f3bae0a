"""Test harness: signed-actor channels to the real servers, and direct seeding of
the rows other services own (runs) for scenarios that need them."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from sqlalchemy import text

from common.actor import Actor, ActorType, Role, service_actor, sign_actor
from common.db import Database
from common.errors import PaperclipError, from_rpc_error
from paperclip.issues.v1 import issue_locks_pb2_grpc, issues_pb2, issues_pb2_grpc
from paperclip.runs.v1 import agents_pb2, runs_pb2_grpc
from paperclip.workspaces.v1 import workspace_leases_pb2_grpc, workspaces_pb2_grpc

INTERNAL_KEY = b"test-internal-key-0123456789abcdef"


class _SignUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds a freshly signed actor to every unary call, as the gateway does."""

    def __init__(self, actor: Actor | None, key: bytes) -> None:
        self.actor = actor
        self.key = key

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_signed(details, self.actor, self.key), request)


class _SignStream(grpc.aio.UnaryStreamClientInterceptor):
    """The same for server-streaming calls (grpc.aio files an interceptor under one kind)."""

    def __init__(self, actor: Actor | None, key: bytes) -> None:
        self.actor = actor
        self.key = key

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_signed(details, self.actor, self.key), request)


def _signed(details: Any, actor: Actor | None, key: bytes) -> Any:
    if actor is None:
        return details
    metadata = list(details.metadata or ()) + list(sign_actor(actor, key))
    return details._replace(metadata=metadata)


@dataclass
class Clients:
    """Typed stubs on one channel that carries one actor."""

    channel: grpc.aio.Channel
    issues: issues_pb2_grpc.IssueServiceAsyncStub
    locks: issue_locks_pb2_grpc.IssueLockServiceAsyncStub
    runs: runs_pb2_grpc.RunServiceAsyncStub
    workspaces: workspaces_pb2_grpc.WorkspaceServiceAsyncStub
    leases: workspace_leases_pb2_grpc.WorkspaceLeaseServiceAsyncStub
    #: Channels besides ``channel`` closed with it.
    others: tuple[grpc.aio.Channel, ...] = ()

    async def close(self) -> None:
        await self.channel.close()
        for channel in self.others:
            await channel.close()


@dataclass
class Suite:
    """The servers under test and the database behind them."""

    issue_addr: str
    run_addr: str
    db: Database
    #: Empty when the suite under test has no workspace service: its stubs then reach
    #: the issue service, which answers UNIMPLEMENTED.
    workspace_addr: str = ""
    key: bytes = INTERNAL_KEY
    _open: list[Clients] | None = None

    def backends(self) -> dict[str, str]:
        """The gateway's backend addresses for these servers."""
        addresses = {"issue_service": self.issue_addr, "run_service": self.run_addr}
        if self.workspace_addr:
            addresses["workspace_service"] = self.workspace_addr
        return addresses

    def clients(self, actor: Actor | None, *, key: bytes | None = None) -> Clients:
        """Stubs calling as ``actor`` (None: no actor metadata at all)."""
        signing_key = key or self.key
        interceptors = [_SignUnary(actor, signing_key), _SignStream(actor, signing_key)]
        issue_channel = grpc.aio.insecure_channel(self.issue_addr, interceptors=interceptors)
        run_channel = grpc.aio.insecure_channel(self.run_addr, interceptors=interceptors)
        workspace_channel = grpc.aio.insecure_channel(
            self.workspace_addr or self.issue_addr, interceptors=interceptors
        )
        clients = Clients(
            issue_channel,
            issues_pb2_grpc.IssueServiceStub(issue_channel),
            issue_locks_pb2_grpc.IssueLockServiceStub(issue_channel),
            runs_pb2_grpc.RunServiceStub(run_channel),
            workspaces_pb2_grpc.WorkspaceServiceStub(workspace_channel),
            workspace_leases_pb2_grpc.WorkspaceLeaseServiceStub(workspace_channel),
            others=(run_channel, workspace_channel),
        )
        if self._open is None:
            self._open = []
        self._open.append(clients)
        return clients

    async def close(self) -> None:
        for clients in self._open or []:
            await clients.close()


def admin() -> Actor:
    """An instance-admin board user."""
    return Actor(type=ActorType.BOARD, user_id="board-user", is_instance_admin=True)


def board(company_id: str, role: Role = Role.ADMIN, user_id: str = "board-user") -> Actor:
    """A board user who is a member of one company."""
    return Actor(type=ActorType.BOARD, user_id=user_id, memberships={company_id: role})


def agent(agent_id: str, company_id: str, run_id: str | None) -> Actor:
    """An agent acting inside one of its runs."""
    return Actor(type=ActorType.AGENT, agent_id=agent_id, company_id=company_id, run_id=run_id)


def service() -> Actor:
    return service_actor("run_service")


async def expect_error(call: Awaitable[Any]) -> PaperclipError:
    """Await a call that must fail; the project error it failed with."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return from_rpc_error(exc)
    raise AssertionError("the call succeeded but an error was expected")


def unique_prefix() -> str:
    """A fresh company issue prefix (tests share one database)."""
    letters = uuid.uuid4().hex.upper()
    return "".join(chr(ord("A") + int(c, 16) % 26) for c in letters[:8])


async def new_company(clients: Clients, name: str = "Acme") -> issues_pb2.Company:
    return await clients.issues.CreateCompany(
        issues_pb2.CreateCompanyRequest(name=name, issue_prefix=unique_prefix())
    )


async def new_agent(clients: Clients, company_id: str, name: str | None = None) -> agents_pb2.Agent:
    return await clients.runs.CreateAgent(
        agents_pb2.CreateAgentRequest(
            company_id=company_id,
            name=name or f"agent-{uuid.uuid4().hex[:8]}",
            role="engineer",
            adapter_type="process",
            adapter_config=agents_pb2.AdapterConfig(command=["python3", "-c", "pass"]),
        )
    )


async def insert_run(
    db: Database,
    *,
    company_id: str,
    agent_id: str,
    status: str = "running",
    issue_id: str | None = None,
) -> str:
    """A heartbeat run row as the run service would write it; its id."""
    async with db.transaction() as conn:
        row = await conn.execute(
            text(
                """
                INSERT INTO runs.heartbeat_runs
                    (company_id, agent_id, issue_id, status, started_at, finished_at)
                VALUES (:c, :a, :i, :s,
                        CASE WHEN :s <> 'queued' THEN now() END,
                        CASE WHEN :s NOT IN ('queued', 'running') THEN now() END)
                RETURNING id
                """
            ),
            {"c": company_id, "a": agent_id, "i": issue_id, "s": status},
        )
        return str(row.scalar_one())


async def set_run_status(db: Database, run_id: str, status: str) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            text("UPDATE runs.heartbeat_runs SET status = :s, updated_at = now() WHERE id = :r"),
            {"s": status, "r": run_id},
        )


async def delete_run(db: Database, run_id: str) -> None:
    async with db.transaction() as conn:
        await conn.execute(text("DELETE FROM runs.heartbeat_runs WHERE id = :r"), {"r": run_id})


async def fetch_value(db: Database, sql: str, **params: Any) -> Any:
    async with db.transaction() as conn:
        return (await conn.execute(text(sql), params)).scalar()


CallFactory = Callable[[], Awaitable[Any]]
