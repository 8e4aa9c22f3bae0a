"""Retention of the workspace service's tables and runtime-service logs (README
"Retention"; ``common.retention``).

``workspaces.workspace_operations`` (default 30 days): finished operations of closed
workspaces (``closed_at`` set, older than the horizon), and finished operations of no
workspace, finished longer ago than the horizon. An operation's output (the kept
stdout/stderr tails, excerpts and digests) lives in its row and goes with it. Never
deleted: operations of open workspaces, ``running`` operations, and an operation
another one names as its parent (a foreign key: the child goes first).

``workspaces.environment_leases`` (default 7 days): leases released, expired or failed
longer ago than the horizon. Active leases are never deleted.

Runtime-service logs (``<home>/workspace-service-logs/<service>.log``, default 10 MiB
and 3 old files): the service process holds its log open for appending, so a log past
the size is rotated by copy and truncate (``.log.1`` is the newest old file,
``.log.<N>`` the oldest, older ones are removed) while the service keeps writing; what
it writes between the copy and the truncate (microseconds) is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from common.config import Settings
from common.db import Database
from common.retention import Policy, counting, days, sweep_by_settings
from common.sql import sql
from workspace_service.service_process import LOG_DIR

log = logging.getLogger("paperclip.workspace_service.retention")

LOCK_KEY = "workspace_service.retention"

OPERATIONS = sql(
    """
    WITH victims AS (
        SELECT o.id FROM workspaces.workspace_operations o
        LEFT JOIN workspaces.execution_workspaces w ON w.id = o.workspace_id
        WHERE o.status <> 'running' AND o.finished_at < :cutoff
          AND (o.workspace_id IS NULL OR (w.closed_at IS NOT NULL AND w.closed_at < :cutoff))
          AND NOT EXISTS (
              SELECT 1 FROM workspaces.workspace_operations c WHERE c.parent_operation_id = o.id)
        LIMIT :limit
        FOR UPDATE OF o SKIP LOCKED
    ),
    gone AS (
        DELETE FROM workspaces.workspace_operations o USING victims v WHERE o.id = v.id
        RETURNING 1
    )
    SELECT count(*) FROM gone
    """
)

LEASES = sql(
    """
    WITH victims AS (
        SELECT id FROM workspaces.environment_leases
        WHERE status <> 'active' AND released_at < :cutoff
        ORDER BY released_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ),
    gone AS (
        DELETE FROM workspaces.environment_leases l USING victims v WHERE l.id = v.id
        RETURNING 1
    )
    SELECT count(*) FROM gone
    """
)


def policies(settings: Settings) -> Sequence[Policy]:
    """The workspace service's policies, in sweep order."""
    return [
        Policy(
            "workspaces.workspace_operations",
            days(settings.retention_workspace_operations_days),
            counting(OPERATIONS, until_empty=True),
        ),
        Policy(
            "workspaces.environment_leases", days(settings.retention_leases_days), counting(LEASES)
        ),
    ]


async def retention_forever(db: Database, settings: Settings) -> None:
    """The workspace service's periodic sweep (one replica at a time)."""
    await sweep_by_settings(db, settings, policies, lock_key=LOCK_KEY)


# -- runtime-service logs ----------------------------------------------------------------


def rotated(path: Path, index: int) -> Path:
    """The ``index``-th old file of log ``path`` (1: the newest)."""
    return path.with_name(f"{path.name}.{index}")


def rotate_log(path: Path, *, max_bytes: int, keep: int) -> bool:
    """Rotate ``path`` if it is larger than ``max_bytes``: old files shift by one (the
    oldest beyond ``keep`` is removed), the log's content is copied to ``.1`` and the
    log truncated in place (its writer appends, so it goes on at the new end). Whether
    it was rotated."""
    try:
        if max_bytes <= 0 or path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for index in range(keep, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.replace(rotated(path, index), rotated(path, index + 1))
    with contextlib.suppress(FileNotFoundError):
        rotated(path, keep + 1).unlink()
    if keep > 0:
        staging = path.with_name(f"{path.name}.rotating")
        with open(path, "rb") as source, open(staging, "wb") as target:
            shutil.copyfileobj(source, target, 1024 * 1024)
            os.truncate(path, 0)
        os.replace(staging, rotated(path, 1))
    else:
        os.truncate(path, 0)
    return True


def rotate_logs(directory: Path, *, max_bytes: int, keep: int) -> int:
    """Rotate every runtime-service log in ``directory`` past ``max_bytes``; how many."""
    if not directory.is_dir():
        return 0
    return sum(rotate_log(path, max_bytes=max_bytes, keep=keep) for path in directory.glob("*.log"))


async def rotate_logs_forever(settings: Settings) -> None:
    """Check this host's runtime-service logs every few seconds until cancelled
    (``PAPERCLIP_RETENTION_RUNTIME_LOG_BYTES`` 0: never); failures are logged."""
    if settings.retention_runtime_log_bytes <= 0:
        return
    directory = settings.home / LOG_DIR
    while True:
        await asyncio.sleep(settings.retention_runtime_log_check_seconds)
        try:
            count = await asyncio.to_thread(
                rotate_logs,
                directory,
                max_bytes=settings.retention_runtime_log_bytes,
                keep=settings.retention_runtime_log_files,
            )
            if count:
                log.info("runtime-service logs rotated", extra={"logs": count})
        except OSError:
            log.exception("rotating runtime-service logs failed")
