"""The append-only audit log, written in the same transaction as the change it records."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from common.actor import Actor

#: Details larger than this are replaced by a marker: audit rows stay small.
MAX_DETAILS_BYTES = 64 * 1024

_INSERT = text(
    """
    INSERT INTO audit.activity_log
        (company_id, actor_type, actor_id, agent_id, run_id, action,
         entity_type, entity_id, details)
    VALUES (:company_id, :actor_type, :actor_id, :agent_id, :run_id, :action,
            :entity_type, :entity_id, CAST(:details AS jsonb))
    """
)


def encode_details(details: Mapping[str, Any] | None) -> str:
    """The JSON text stored for ``details``, capped at ``MAX_DETAILS_BYTES``."""
    raw = json.dumps(dict(details or {}), default=str, separators=(",", ":"))
    if len(raw.encode()) > MAX_DETAILS_BYTES:
        return json.dumps({"truncated": True, "original_bytes": len(raw.encode())})
    return raw


async def record_activity(
    conn: AsyncConnection,
    *,
    actor: Actor,
    company_id: str,
    action: str,
    entity_type: str,
    entity_id: str,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Append one audit row for a change made by ``actor``."""
    actor_type, actor_id, agent_id, run_id = actor.audit_identity()
    await conn.execute(
        _INSERT,
        {
            "company_id": company_id,
            "actor_type": actor_type,
            "actor_id": actor_id,
            "agent_id": agent_id,
            "run_id": run_id,
            "action": action,
            "entity_type": entity_type,
            "entity_id": entity_id,
            "details": encode_details(details),
        },
    )
