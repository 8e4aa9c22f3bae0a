"""The registry of workspace hosts: which workspace-service replica serves which host,
at which address, while its lease lasts.

A workspace's directory and its runtime services live on one host (the replica that
created it records its host on the row). Each replica registers ``(host, address)`` on
start, renews the lease every few seconds and removes it on a clean stop; a replica
killed outright leaves a lease that runs out within ``LEASE_SECONDS``. Calls about a
workspace of another host are forwarded to that host's address (``host_routing``).
One replica serves one host: a replica registering a host takes it over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import dataclass

from common.db import Database
from common.sql import Tx, sql

logger = logging.getLogger(__name__)

#: How long a registration lasts without renewal.
LEASE_SECONDS = 15.0
#: How often a replica renews it (a third of the lease: two renewals may fail).
RENEW_SECONDS = 5.0

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
#: Reads the run service's rows: the host whose node runs an agent's run.
_RUN_HOST = sql(
    """
    SELECT n.host FROM runs.heartbeat_runs r
    JOIN runs.supervisor_nodes n ON n.id = r.supervisor_node_id
    WHERE r.id = :run
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


async def run_host(tx: Tx, run_id: str) -> str | None:
    """The host whose supervisor node runs ``run_id`` (None: not started anywhere)."""
    host = await tx.fetchval(_RUN_HOST, {"run": run_id})
    return str(host) if host is not None else None


class HostRegistration:
    """This replica's registration of its host, kept alive while it serves."""

    def __init__(self, db: Database, host: str) -> None:
        self._db = db
        self.host = host
        self.instance_id = str(uuid.uuid4())
        self.address: str | None = None

    async def register(self, address: str) -> None:
        """Register (or take over) the host at ``address``."""
        self.address = address
        async with self._db.unit_of_work() as tx:
            replaced = await tx.fetchval(
                _REGISTER,
                {
                    "host": self.host,
                    "address": address,
                    "instance": self.instance_id,
                    "pid": os.getpid(),
                    "lease": LEASE_SECONDS,
                },
            )
        logger.info(
            "workspace host registered",
            extra={"host": self.host, "addr": address, "took_over": bool(replaced)},
        )

    async def renew(self) -> bool:
        """Push the lease out; False when another replica took the host over."""
        async with self._db.unit_of_work() as tx:
            renewed = await tx.fetchval(
                _RENEW, {"host": self.host, "instance": self.instance_id, "lease": LEASE_SECONDS}
            )
        return renewed is not None

    async def keep(self, address: str, *, interval: float = RENEW_SECONDS) -> None:
        """Register, then renew every ``interval`` until cancelled; a registration lost
        to a database outage or a takeover is made again."""
        while True:
            try:
                if self.address != address or not await self.renew():
                    if self.address == address:
                        logger.warning(
                            "workspace host registration lost; registering again",
                            extra={"host": self.host},
                        )
                    await self.register(address)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("renewing the workspace host lease failed")
            await asyncio.sleep(interval)

    async def release(self) -> None:
        """Remove the registration (a clean stop): calls fail over at once."""
        if self.address is None:
            return
        try:
            async with self._db.unit_of_work() as tx:
                await tx.execute(_RELEASE, {"host": self.host, "instance": self.instance_id})
        except Exception:
            logger.exception("removing the workspace host registration failed")
