"""Supervisor nodes (``runs.supervisor_nodes``): this node's lease row (registration,
renewal, stop), the reads that tell live nodes from dead ones, and the liveness probe of
a node's dedicated LISTEN connection."""

from __future__ import annotations

from datetime import datetime

from common.sql import Row, Tx, sql

#: How long a node's lease lasts from its registration or last renewal.
LEASE_SECONDS = 15

_REGISTER = sql(
    f"""
    INSERT INTO runs.supervisor_nodes
        (host, boot_id, pid, process_started_at, max_processes, lease_expires_at)
    VALUES (:host, :boot, :pid, :started, :max,
            now() + make_interval(secs => {LEASE_SECONDS}))
    RETURNING id
    """
)
_RENEW = sql(
    f"""
    UPDATE runs.supervisor_nodes
    SET renewed_at = now(), lease_expires_at = now() + make_interval(secs => {LEASE_SECONDS})
    WHERE id = :id AND stopped_at IS NULL
    """
)
_STOPPED = sql(
    """
    UPDATE runs.supervisor_nodes SET stopped_at = now(), lease_expires_at = now()
    WHERE id = :id
    """
)
#: The nodes other than ``:me`` that still have ``running`` runs, with what tells whether
#: they are dead (public: the bench explains its plan).
DEAD_NODE_CANDIDATES = sql(
    """
    SELECT n.id, n.host, n.boot_id, n.pid, n.process_started_at,
           n.stopped_at IS NOT NULL AS stopped,
           (n.stopped_at IS NOT NULL OR n.lease_expires_at < now()) AS expired
    FROM runs.supervisor_nodes n
    WHERE n.id <> CAST(:me AS uuid)
      AND EXISTS (SELECT 1 FROM runs.heartbeat_runs r
                  WHERE r.supervisor_node_id = n.id AND r.status = 'running')
    """
)
_LIVE_HOSTS = sql(
    """
    SELECT DISTINCT host FROM runs.supervisor_nodes
    WHERE stopped_at IS NULL AND lease_expires_at >= now()
    """
)
#: A round trip on a LISTEN connection, to find out that it is still alive.


async def register_node(
    tx: Tx,
    *,
    host: str,
    boot: str,
    pid: int,
    started: datetime,
    max_processes: int,
) -> str:
    """Insert this node's row with a lease of ``LEASE_SECONDS``; its id."""
    node = await tx.fetchval(
        _REGISTER,
        {"host": host, "boot": boot, "pid": pid, "started": started, "max": max_processes},
    )
    return str(node)


async def renew_lease(tx: Tx, node_id: str) -> None:
    """Push the node's lease ``LEASE_SECONDS`` out (not once it is stopped)."""
    await tx.execute(_RENEW, {"id": node_id})


async def mark_stopped(tx: Tx, node_id: str) -> None:
    """Mark the node stopped, its lease expired now."""
    await tx.execute(_STOPPED, {"id": node_id})


async def dead_node_candidates(tx: Tx, me: str) -> list[Row]:
    """The rows of :data:`DEAD_NODE_CANDIDATES` (nodes other than ``me`` with running
    runs): id, host, boot_id, pid, process_started_at, stopped, expired."""
    return await tx.fetch(DEAD_NODE_CANDIDATES, {"me": me})


async def live_hosts(tx: Tx) -> set[str]:
    """The hosts with at least one node neither stopped nor past its lease."""
    return {row["host"] for row in await tx.fetch(_LIVE_HOSTS)}
