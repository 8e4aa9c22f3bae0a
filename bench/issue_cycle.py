"""The checkout/release cycle: through the issue service, and as raw SQL ceilings.

Each client is one agent with one live run and its own todo issue, so clients do not
contend on rows: the figures measure the cost of the path, not lock waits.

Ceilings, measured in the same run on the same database with asyncpg:
- ``same_sql``: the very statements the service issues on the fast path, in the same
  two transactions (so the ratio is the cost of gRPC, Python and SQLAlchemy);
- ``minimal_sql``: the least SQL that does the same job (one conditional UPDATE plus
  the audit row per transaction), the floor any implementation pays.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.stats import Operation
from common.actor import Actor, ActorType, sign_actor
from common.audit import record_activity
from common.sql import Tx
from issue_service.checkout_store import lock_and_check_out, lock_and_release
from issue_service.events import EventType, emit
from paperclip.issues.v1 import issues_pb2, issues_pb2_grpc


@dataclass(frozen=True)
class Seat:
    """One client's agent, live run and issue."""

    company_id: str
    agent_id: str
    run_id: str
    issue_id: str


async def seed(conn: asyncpg.Connection, clients: int) -> list[Seat]:
    """A company with ``clients`` agents, each with a running run and a todo issue."""
    prefix = "B" + uuid.uuid4().hex[:6].upper().translate(str.maketrans("0123456789", "GHIJKLMNOP"))
    company = await conn.fetchval(
        "INSERT INTO issues.companies (name, issue_prefix) VALUES ('bench', $1) RETURNING id",
        prefix,
    )
    seats = []
    for index in range(clients):
        agent = await conn.fetchval(
            "INSERT INTO runs.agents (company_id, name, name_key) VALUES ($1, $2, $2) RETURNING id",
            company,
            f"bench-{index}",
        )
        run = await conn.fetchval(
            "INSERT INTO runs.heartbeat_runs (company_id, agent_id, status, started_at) "
            "VALUES ($1, $2, 'running', now()) RETURNING id",
            company,
            agent,
        )
        number = index + 1
        issue = await conn.fetchval(
            "INSERT INTO issues.issues (company_id, issue_number, identifier, title, status) "
            "VALUES ($1, $2, $3, 'bench', 'todo') RETURNING id",
            company,
            number,
            f"{prefix}-{number}",
        )
        seats.append(Seat(str(company), str(agent), str(run), str(issue)))
    await conn.execute(
        "UPDATE issues.companies SET issue_counter = $2 WHERE id = $1", company, clients
    )
    return seats


Metadata = Sequence[tuple[str, str]]


def grpc_cycle(channel: grpc.aio.Channel, seats: Sequence[Seat], key: bytes) -> Operation:
    """CheckoutIssue then ReleaseIssue, as each seat's agent in its run, straight to the
    issue service with the actor signed by the internal key (as the gateway sends it)."""
    actors = [
        Actor(type=ActorType.AGENT, agent_id=s.agent_id, company_id=s.company_id, run_id=s.run_id)
        for s in seats
    ]
    return checkout_release(channel, seats, lambda index: sign_actor(actors[index], key))


def checkout_release(
    channel: grpc.aio.Channel, seats: Sequence[Seat], metadata: Callable[[int], Metadata]
) -> Operation:
    """CheckoutIssue then ReleaseIssue on ``channel`` for seat ``index``, with the
    headers ``metadata(index)`` returns for that cycle."""
    stub = issues_pb2_grpc.IssueServiceStub(channel)
    todo = [issues_pb2.ISSUE_STATUS_TODO]

    async def cycle(index: int) -> None:
        seat, headers = seats[index], metadata(index)
        await stub.CheckoutIssue(
            issues_pb2.CheckoutIssueRequest(
                issue_id=seat.issue_id, agent_id=seat.agent_id, expected_statuses=todo
            ),
            metadata=headers,
        )
        await stub.ReleaseIssue(
            issues_pb2.ReleaseIssueRequest(issue_id=seat.issue_id), metadata=headers
        )

    return cycle


def bare_round_trip(channel: grpc.aio.Channel) -> Operation:
    """A health check: the cheapest unary call the same server answers."""
    stub: Any = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="")

    async def call(index: int) -> None:
        await stub.Check(request)

    return call


_CHECKOUT_MINIMAL = (
    "UPDATE issues.issues SET assignee_agent_id = $2, assignee_user_id = NULL, "
    "checkout_run_id = $3, execution_run_id = $3, execution_agent_name_key = 'bench', "
    "execution_locked_at = now(), status = 'in_progress', "
    "started_at = coalesce(started_at, now()), updated_at = now() "
    "WHERE id = $1 AND status = 'todo' AND (assignee_agent_id IS NULL OR "
    "(assignee_agent_id = $2 AND (checkout_run_id IS NULL OR checkout_run_id = $3))) "
    "AND (execution_run_id IS NULL OR execution_run_id = $3) RETURNING id"
)
_RELEASE_MINIMAL = (
    "UPDATE issues.issues SET status = 'todo', assignee_agent_id = NULL, "
    "checkout_run_id = NULL, execution_run_id = NULL, execution_agent_name_key = NULL, "
    "execution_locked_at = NULL, updated_at = now() WHERE id = $1 RETURNING id"
)
_AUDIT_MINIMAL = (
    "INSERT INTO audit.activity_log (company_id, actor_type, actor_id, agent_id, run_id, "
    "action, entity_type, entity_id, details) "
    "VALUES ($1, 'agent', $2::uuid::text, $2::uuid, $3, $4, 'issue', $5, '{}'::jsonb)"
)


async def same_sql_cycle(conn: asyncpg.Connection, seat: Seat, actor: Actor) -> None:
    """The statements the service issues for one cycle, without gRPC or rules."""
    async with conn.transaction():
        tx = Tx(conn)
        locked = await lock_and_check_out(
            tx,
            issue_id=seat.issue_id,
            agent_id=seat.agent_id,
            run_id=seat.run_id,
            expected=["todo"],
        )
        assert locked is not None and locked.changed is not None
        record_activity(
            tx,
            actor=actor,
            company_id=seat.company_id,
            action="issue.checked_out",
            entity_type="issue",
            entity_id=seat.issue_id,
            details={"agentId": seat.agent_id, "runId": seat.run_id},
        )
        await tx.flush()
    async with conn.transaction():
        tx = Tx(conn)
        released = await lock_and_release(tx, issue_id=seat.issue_id, actor_run_id=seat.run_id)
        assert released is not None and released.changed is not None
        record_activity(
            tx,
            actor=actor,
            company_id=seat.company_id,
            action="issue.released",
            entity_type="issue",
            entity_id=seat.issue_id,
        )
        emit(
            tx,
            actor=actor,
            company_id=seat.company_id,
            issue_id=seat.issue_id,
            type=EventType.RELEASED,
            payload={
                "previousAssigneeAgentId": seat.agent_id,
                "previousStatus": "in_progress",
                "status": "todo",
            },
        )
        await tx.flush()


async def minimal_sql_cycle(conn: asyncpg.Connection, seat: Seat) -> None:
    """One conditional UPDATE and one audit row per transaction."""
    s = seat
    async with conn.transaction():
        await conn.fetchrow(_CHECKOUT_MINIMAL, s.issue_id, s.agent_id, s.run_id)
        await conn.execute(
            _AUDIT_MINIMAL, s.company_id, s.agent_id, s.run_id, "issue.checked_out", s.issue_id
        )
    async with conn.transaction():
        await conn.fetchrow(_RELEASE_MINIMAL, s.issue_id)
        await conn.execute(
            _AUDIT_MINIMAL, s.company_id, s.agent_id, s.run_id, "issue.released", s.issue_id
        )


def raw_cycle(pool: asyncpg.Pool, seats: Sequence[Seat], *, minimal: bool) -> Operation:
    """The same two transactions straight to PostgreSQL (see the module docstring)."""
    actors = [
        Actor(type=ActorType.AGENT, agent_id=s.agent_id, company_id=s.company_id, run_id=s.run_id)
        for s in seats
    ]

    async def cycle(index: int) -> None:
        async with pool.acquire() as conn:
            if minimal:
                await minimal_sql_cycle(conn, seats[index])  # type: ignore[arg-type]
            else:
                await same_sql_cycle(conn, seats[index], actors[index])  # type: ignore[arg-type]

    return cycle


#: What issue 12 aims at; the bench reports whether a run met it, it does not enforce it.
AIM_SERVICE_OVER_MINIMAL_C16 = 0.25
AIM_STATEMENTS_OVER_MINIMAL = 1.5


def statement_ratios(statements: dict[str, float]) -> dict[str, float]:
    """Statements per cycle (``bench.cycle_statements``) and the service's over the
    minimal SQL's."""
    out = {f"statements_per_cycle_{name}": count for name, count in statements.items()}
    out["service_statements_over_raw_minimal_sql"] = round(
        statements["service"] / statements["raw_minimal_sql"], 3
    )
    return out


def checkout_aims(ratios: dict[str, float]) -> list[str]:
    """One line per checkout aim of issue 12, saying whether this run met it."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    throughput = ratios["service_over_raw_minimal_sql_c16"]
    statements = ratios["service_statements_over_raw_minimal_sql"]
    return [
        f"aim: cycle via service >= {AIM_SERVICE_OVER_MINIMAL_C16:.0%} of the raw_minimal_sql "
        f"ceiling at 16 clients: {throughput:.1%}, "
        f"{verdict(throughput >= AIM_SERVICE_OVER_MINIMAL_C16)}",
        f"aim: service statements per cycle <= {AIM_STATEMENTS_OVER_MINIMAL:g}x the minimal "
        f"SQL's: {ratios['statements_per_cycle_service']:g} vs "
        f"{ratios['statements_per_cycle_raw_minimal_sql']:g} (x{statements:.2f}), "
        f"{verdict(statements <= AIM_STATEMENTS_OVER_MINIMAL)}",
    ]
