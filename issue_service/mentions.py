"""``@name`` and ``agent://<id>`` mentions in comment bodies."""

from __future__ import annotations

import re
import uuid

from common.sql import Tx
from issue_service import foreign_reads

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
    return await foreign_reads.mentioned_agents(
        tx, company_id, names=names, ids=ids, limit=MAX_MENTIONS
    )
