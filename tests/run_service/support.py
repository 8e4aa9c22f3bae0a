"""Helpers of the run-service tests: valid requests, row counts, audit rows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from common.db import Database
from paperclip.runs.v1 import agents_pb2


def process_agent(company_id: str, name: str, **fields: Any) -> agents_pb2.CreateAgentRequest:
    """A valid CreateAgent request; ``fields`` override its values."""
    values: dict[str, Any] = {
        "company_id": company_id,
        "name": name,
        "role": "engineer",
        "adapter_type": "process",
        "adapter_config": agents_pb2.AdapterConfig(command=["python3", "-c", "pass"]),
    }
    values.update(fields)
    return agents_pb2.CreateAgentRequest(**values)


async def count_rows(db: Database, table: str) -> int:
    """How many rows ``table`` holds."""
    async with db.transaction() as conn:
        return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def audit_rows(db: Database, entity_id: str) -> list[dict[str, Any]]:
    """The audit rows about one entity, oldest first."""
    async with db.transaction() as conn:
        rows = await conn.execute(
            text(
                "SELECT action, entity_type, actor_type, actor_id, details"
                " FROM audit.activity_log WHERE entity_id = :id ORDER BY id"
            ),
            {"id": entity_id},
        )
        return [dict(row) for row in rows.mappings()]
