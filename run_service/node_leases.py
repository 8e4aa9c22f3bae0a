"""This node's lease: its ``runs.supervisor_nodes`` row (host, boot id, pid, process
start time, ``max_processes``), a lease of ``node_store.LEASE_SECONDS`` renewed every
``RENEW_SECONDS``, and its end (the row marked stopped, the lease expired at once) on a
graceful stop. Other nodes take this node for dead once its lease has run out
(:mod:`run_service.dead_nodes`)."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime

import psutil

from common.db import Database
from run_service import node_store
from supervision.process_tree import boot_id

logger = logging.getLogger("run_service.runner")

RENEW_SECONDS = 5.0


async def register(db: Database, *, hostname: str, max_processes: int) -> str:
    """Insert this process's node row with a fresh lease; the node id."""
    me = psutil.Process()
    async with db.unit_of_work() as tx:
        return await node_store.register_node(
            tx,
            host=hostname,
            boot=boot_id(),
            pid=os.getpid(),
            started=datetime.fromtimestamp(me.create_time(), UTC),
            max_processes=max_processes,
        )


async def renew_forever(db: Database, node_id: str) -> None:
    """Renew the node's lease every ``RENEW_SECONDS`` until cancelled (a failed renewal
    is logged)."""
    while True:
        await asyncio.sleep(RENEW_SECONDS)
        try:
            async with db.unit_of_work() as tx:
                await node_store.renew_lease(tx, node_id)
        except Exception:
            logger.exception("renewing the node lease failed")


async def mark_stopped(db: Database, node_id: str) -> None:
    """Mark the node stopped (its lease expired now); a failure is logged."""
    try:
        async with db.unit_of_work() as tx:
            await node_store.mark_stopped(tx, node_id)
    except Exception:
        logger.exception("marking the node stopped failed")
