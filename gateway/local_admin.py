"""Local mode: the instance-admin board key in ``$PAPERCLIP_HOME/board-token``.

Created on the first start (mode 0600) and reused while it is still a valid key, so an
operator with nothing but grpcurl can act as the board.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from common.db import Database
from gateway import keys

BOARD_TOKEN_FILE = "board-token"
LOCAL_USER = "local-board"


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def _write(path: Path, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    tmp.replace(path)


async def ensure_board_token(db: Database, home: Path) -> Path:
    """The path of a valid instance-admin key, creating the key when needed."""
    path = home / BOARD_TOKEN_FILE
    existing = await asyncio.to_thread(_read, path)
    async with db.unit_of_work() as tx:
        if existing:
            owner = await keys.find_key(tx, existing)
            if owner is not None and not owner.revoked and owner.actor.is_instance_admin:
                return path
        _, token = await keys.create_key(
            tx,
            user_id=LOCAL_USER,
            name="local board token",
            is_instance_admin=True,
            memberships={},
        )
        await asyncio.to_thread(_write, path, token)
    return path
