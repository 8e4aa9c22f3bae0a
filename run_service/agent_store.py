"""SQL of the agent registry (``runs.agents``) and the mapping of its rows to protos.

Every function takes the connection of the caller's unit of work; none commits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from common import protoconv
from common.errors import AlreadyExists
from common.sql import Row, Tx, sql
from paperclip.runs.v1 import agents_pb2
from run_service.agent_config import (
    RUNTIME_FIELDS,
    AdapterSpec,
    NewAgent,
    RuntimeLimits,
    name_key,
)

ACTIVE = "active"
PAUSED = "paused"
TERMINATED = "terminated"

STATUS_TO_PROTO: dict[str, agents_pb2.AgentStatus.ValueType] = {
    ACTIVE: agents_pb2.AGENT_STATUS_ACTIVE,
    PAUSED: agents_pb2.AGENT_STATUS_PAUSED,
    TERMINATED: agents_pb2.AGENT_STATUS_TERMINATED,
}
STATUS_FROM_PROTO: dict[int, str] = {v: k for k, v in STATUS_TO_PROTO.items()}

_UNIQUE_VIOLATION = "23505"
_COLUMNS = """
    id, company_id, name, role, status, adapter_type, adapter_config,
    max_concurrent_runs, timeout_seconds, idle_timeout_seconds, grace_seconds,
    heartbeat_interval_seconds, wake_on_demand, daily_run_budget, created_at, updated_at
"""


@dataclass(frozen=True, kw_only=True)
class AgentRecord:
    """One row of ``runs.agents``."""

    id: str
    company_id: str
    name: str
    role: str
    status: str
    adapter_type: str
    adapter: AdapterSpec
    runtime: RuntimeLimits
    created_at: datetime
    updated_at: datetime

    def to_proto(self, *, redact_env: bool = False) -> agents_pb2.Agent:
        """The API form, with every runtime field at its effective value; with
        ``redact_env`` the values of the adapter's env (often secrets) are blanked."""
        adapter = self.adapter.to_proto()
        if redact_env:
            for key in adapter.env:
                adapter.env[key] = ""
        return agents_pb2.Agent(
            id=self.id,
            company_id=self.company_id,
            name=self.name,
            role=self.role,
            status=STATUS_TO_PROTO[self.status],
            adapter_type=self.adapter_type,
            adapter_config=adapter,
            runtime_config=self.runtime.to_proto(),
            created_at=protoconv.timestamp(self.created_at),
            updated_at=protoconv.timestamp(self.updated_at),
        )


def name_taken(name: str) -> AlreadyExists:
    """The error for a name another agent of the company already has."""
    return AlreadyExists(
        f"an agent named {name!r} already exists in this company",
        reason="AGENT_NAME_TAKEN",
        metadata={"name": name},
    )


def _record(row: Row) -> AgentRecord:
    raw = row["adapter_config"]
    adapter = json.loads(raw) if isinstance(raw, str) else raw
    return AgentRecord(
        id=str(row["id"]),
        company_id=str(row["company_id"]),
        name=row["name"],
        role=row["role"],
        status=row["status"],
        adapter_type=row["adapter_type"],
        adapter=AdapterSpec.from_json(adapter or {}),
        runtime=RuntimeLimits.from_json({name: row[name] for name in RUNTIME_FIELDS}),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def insert_agent(tx: Tx, new: NewAgent) -> AgentRecord:
    """Insert ``new``; ``AlreadyExists`` if its name is taken in the company."""
    row = await tx.fetchrow(
        sql(
            f"""
            INSERT INTO runs.agents
                (company_id, name, name_key, role, status, adapter_type, adapter_config,
                 max_concurrent_runs, timeout_seconds, idle_timeout_seconds, grace_seconds,
                 heartbeat_interval_seconds, wake_on_demand, daily_run_budget)
            VALUES (:company_id, :name, :name_key, :role, 'active', :adapter_type,
                    CAST(:adapter_config AS jsonb), :max_concurrent_runs, :timeout_seconds,
                    :idle_timeout_seconds, :grace_seconds, :heartbeat_interval_seconds,
                    :wake_on_demand, :daily_run_budget)
            ON CONFLICT (company_id, name_key) DO NOTHING
            RETURNING {_COLUMNS}
            """
        ),
        {
            "company_id": new.company_id,
            "name": new.name,
            "name_key": new.name_key,
            "role": new.role,
            "adapter_type": new.adapter_type,
            "adapter_config": json.dumps(new.adapter.to_json()),
            **new.runtime.to_json(),
        },
    )
    if row is None:
        raise name_taken(new.name)
    return _record(row)


async def get_agent(tx: Tx, agent_id: str, *, for_update: bool = False) -> AgentRecord | None:
    """The agent, or None; ``for_update`` locks its row until the transaction ends."""
    lock = "FOR UPDATE" if for_update else ""
    row = await tx.fetchrow(
        sql(f"SELECT {_COLUMNS} FROM runs.agents WHERE id = :id {lock}"), {"id": agent_id}
    )
    return None if row is None else _record(row)


async def list_agents(
    tx: Tx,
    *,
    company_id: str,
    statuses: Sequence[str],
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[AgentRecord]:
    """Up to ``limit`` agents of the company in (created_at, id) order, after ``after``."""
    conditions = ["company_id = :company_id"]
    params: dict[str, Any] = {"company_id": company_id, "limit": limit}
    if statuses:
        conditions.append("status = ANY(CAST(:statuses AS text[]))")
        params["statuses"] = list(statuses)
    if after is not None:
        conditions.append(
            "(created_at, id) > (CAST(:after_ts AS timestamptz), CAST(:after_id AS uuid))"
        )
        params["after_ts"], params["after_id"] = after
    rows = await tx.fetch(
        sql(
            f"""
            SELECT {_COLUMNS} FROM runs.agents
            WHERE {" AND ".join(conditions)}
            ORDER BY created_at, id
            LIMIT :limit
            """
        ),
        params,
    )
    return [_record(row) for row in rows]


async def update_agent(tx: Tx, record: AgentRecord) -> AgentRecord:
    """Write every mutable column of ``record``; ``AlreadyExists`` if the name is taken."""
    try:
        row = await tx.fetchrow(
            sql(
                f"""
                UPDATE runs.agents SET
                    name = :name, name_key = :name_key, role = :role, status = :status,
                    adapter_config = CAST(:adapter_config AS jsonb),
                    max_concurrent_runs = :max_concurrent_runs,
                    timeout_seconds = :timeout_seconds,
                    idle_timeout_seconds = :idle_timeout_seconds,
                    grace_seconds = :grace_seconds,
                    heartbeat_interval_seconds = :heartbeat_interval_seconds,
                    wake_on_demand = :wake_on_demand,
                    daily_run_budget = :daily_run_budget,
                    updated_at = now()
                WHERE id = :id
                RETURNING {_COLUMNS}
                """
            ),
            {
                "id": record.id,
                "name": record.name,
                "name_key": name_key(record.name),
                "role": record.role,
                "status": record.status,
                "adapter_config": json.dumps(record.adapter.to_json()),
                **record.runtime.to_json(),
            },
        )
    except asyncpg.UniqueViolationError as exc:
        raise name_taken(record.name) from exc
    assert row is not None, "update_agent needs a locked, existing agent"
    return _record(row)
