"""``@name`` and ``agent://<id>`` mentions in comment bodies."""

from __future__ import annotations

import re
import uuid

from common.sql import Tx, sql

_NAME = re.compile(r"(?<![\w@])@([A-Za-z0-9][A-Za-z0-9_.-]{0,99})")
_LINK = re.compile(r"agent://([0-9a-fA-F-]{36})")
MAX_MENTIONS = 50


def mention_tokens(body: str) -> tuple[set[str], set[str]]:
    """(lower-cased names, agent ids) mentioned in ``body``."""
    names = {m.group(1).rstrip(".").lower() for m in _NAME.finditer(body)}
    ids: set[str] = set()
    for match in _LINK.finditer(body):
        try:
            ids.add(str(uuid.UUID(match.group(1))))
        except ValueError:
            continue
    return names, ids


async def resolve_mentions(tx: Tx, company_id: str, body: str) -> list[str]:
    """Ids of the company's agents that ``body`` mentions (by name or link)."""
    names, ids = mention_tokens(body)
    if not names and not ids:
        return []
    rows = await tx.fetch(
        sql(
            """
            SELECT id FROM runs.agents
            WHERE company_id = :company AND status <> 'terminated'
              AND (name_key = ANY(CAST(:names AS text[])) OR id = ANY(CAST(:ids AS uuid[])))
            ORDER BY name_key LIMIT :limit
            """
        ),
        {"company": company_id, "names": sorted(names), "ids": sorted(ids), "limit": MAX_MENTIONS},
    )
    return [str(r[0]) for r in rows]
