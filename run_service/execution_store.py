"""The rows of the runs a node executes: the claimed runs of a node that never recorded a
process."""

from __future__ import annotations

from common.sql import Tx, sql

#: A node's claimed runs that never recorded a process (requeued on a graceful stop).
_UNSPAWNED = sql(
    """
    SELECT id FROM runs.heartbeat_runs
    WHERE supervisor_node_id = :id AND status = 'running' AND process_pid IS NULL
    """
)


async def unspawned_runs(tx: Tx, node_id: str) -> list[str]:
    """The node's ``running`` runs without a recorded process."""
    return [str(row["id"]) for row in await tx.fetch(_UNSPAWNED, {"id": node_id})]
