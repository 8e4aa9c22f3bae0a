"""The append-only audit log, written in the same transaction as the change it records.

Rows are deferred to the end of the unit of work (``Tx.defer``) and inserted together
with the other deferred rows in one statement just before commit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from common.actor import Actor
from common.sql import Batch, Tx

#: Details larger than this are replaced by a marker: audit rows stay small.
MAX_DETAILS_BYTES = 64 * 1024

ACTIVITY = Batch(
    "audit.activity_log",
    (
        ("company_id", "uuid"),
        ("actor_type", "text"),
        ("actor_id", "text"),
        ("agent_id", "uuid"),
        ("run_id", "uuid"),
        ("action", "text"),
        ("entity_type", "text"),
        ("entity_id", "text"),
        ("details", "jsonb"),
    ),
)


def encode_details(details: Mapping[str, Any] | None) -> str:
    """The JSON text stored for ``details``, capped at ``MAX_DETAILS_BYTES``."""
    raw = json.dumps(dict(details or {}), default=str, separators=(",", ":"))
    if len(raw.encode()) > MAX_DETAILS_BYTES:
        return json.dumps({"truncated": True, "original_bytes": len(raw.encode())})
    return raw


def record_activity(
    tx: Tx,
    *,
    actor: Actor,
    company_id: str,
    action: str,
    entity_type: str,
    entity_id: str,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Append one audit row for a change made by ``actor`` (written at commit)."""
    actor_type, actor_id, agent_id, run_id = actor.audit_identity()
    tx.defer(
        ACTIVITY,
        (
            company_id,
            actor_type,
            actor_id,
            agent_id,
            run_id,
            action,
            entity_type,
            entity_id,
            encode_details(details),
        ),
    )
