"""SQL of ``workspaces.workspace_hosts``, the registry of workspace hosts (``hosts``):
registrations and their leases, and where the host of a workspace is reached. Every
statement runs in the unit of work of the caller."""

from __future__ import annotations

from dataclasses import dataclass

from common.sql import Tx, sql

_REGISTER = sql(
    """
    INSERT INTO workspaces.workspace_hosts (host, address, instance_id, pid, lease_expires_at)
    VALUES (:host, :address, :instance, :pid, now() + make_interval(secs => :lease))
    ON CONFLICT (host) DO UPDATE
    SET address = EXCLUDED.address, instance_id = EXCLUDED.instance_id, pid = EXCLUDED.pid,
        lease_expires_at = EXCLUDED.lease_expires_at,
        registered_at = CASE WHEN workspace_hosts.instance_id = EXCLUDED.instance_id
                             THEN workspace_hosts.registered_at ELSE now() END,
        updated_at = now()
    RETURNING (xmax <> 0) AS replaced
    """
)
_RENEW = sql(
    """
    UPDATE workspaces.workspace_hosts
    SET lease_expires_at = now() + make_interval(secs => :lease), updated_at = now()
    WHERE host = :host AND instance_id = :instance
    RETURNING host
    """
)
_RELEASE = sql(
    "DELETE FROM workspaces.workspace_hosts WHERE host = :host AND instance_id = :instance"
)
_HOST = sql(
    """
    SELECT address, lease_expires_at > now() AS live
    FROM workspaces.workspace_hosts WHERE host = :host
    """
)
_WORKSPACE_HOST = sql(
    """
    SELECT w.host, h.address, COALESCE(h.lease_expires_at > now(), false) AS live
    FROM workspaces.execution_workspaces w
    LEFT JOIN workspaces.workspace_hosts h ON h.host = w.host
    WHERE w.id = :id
    """
)


@dataclass(frozen=True)
class HostAddress:
    """Where a host's workspace service is reached, and whether its lease is live."""

    host: str
    address: str | None
    live: bool


async def workspace_host(tx: Tx, workspace_id: str) -> HostAddress | None:
    """The host of a workspace (None: no such workspace, or made before hosts were
    recorded) with its replica's address."""
    row = await tx.fetchrow(_WORKSPACE_HOST, {"id": workspace_id})
    if row is None or row["host"] is None:
        return None
    return HostAddress(row["host"], row["address"], bool(row["live"]))


async def host_address(tx: Tx, host: str) -> HostAddress:
    """The registration of ``host`` (address None when none was ever made)."""
    row = await tx.fetchrow(_HOST, {"host": host})
    if row is None:
        return HostAddress(host, None, False)
    return HostAddress(host, row["address"], bool(row["live"]))


async def register_host(
    tx: Tx, *, host: str, address: str, instance_id: str, pid: int, lease_seconds: float
) -> bool:
    """Register (or take over) ``host`` at ``address`` for ``lease_seconds``; whether a
    registration of it was replaced."""
    replaced = await tx.fetchval(
        _REGISTER,
        {
            "host": host,
            "address": address,
            "instance": instance_id,
            "pid": pid,
            "lease": lease_seconds,
        },
    )
    return bool(replaced)


async def renew_host(tx: Tx, *, host: str, instance_id: str, lease_seconds: float) -> bool:
    """Push the lease of this instance's registration out; False when it holds none."""
    renewed = await tx.fetchval(
        _RENEW, {"host": host, "instance": instance_id, "lease": lease_seconds}
    )
    return renewed is not None


async def release_host(tx: Tx, *, host: str, instance_id: str) -> None:
    """Remove this instance's registration of ``host``."""
    await tx.execute(_RELEASE, {"host": host, "instance": instance_id})
