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

from common.db import Database
from workspace_service import host_store

logger = logging.getLogger(__name__)

#: How long a registration lasts without renewal.
LEASE_SECONDS = 15.0
#: How often a replica renews it (a third of the lease: two renewals may fail).
RENEW_SECONDS = 5.0


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
            replaced = await host_store.register_host(
                tx,
                host=self.host,
                address=address,
                instance_id=self.instance_id,
                pid=os.getpid(),
                lease_seconds=LEASE_SECONDS,
            )
        logger.info(
            "workspace host registered",
            extra={"host": self.host, "addr": address, "took_over": replaced},
        )

    async def renew(self) -> bool:
        """Push the lease out; False when another replica took the host over."""
        async with self._db.unit_of_work() as tx:
            return await host_store.renew_host(
                tx, host=self.host, instance_id=self.instance_id, lease_seconds=LEASE_SECONDS
            )

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
                await host_store.release_host(tx, host=self.host, instance_id=self.instance_id)
        except Exception:
            logger.exception("removing the workspace host registration failed")
