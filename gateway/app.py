"""Wiring of the gateway process: backends, authentication, proxy, health."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import grpc.aio
from paperclip_client import GATEWAY_HEALTH_SERVICE, IDEMPOTENT_METHODS
from paperclip_client.channels import grpc_target

from common.channels import backend_channel, replica_addresses
from common.config import Settings
from common.database_url import asyncpg_dsn
from common.db import Database
from common.errors import ConfigError
from common.outage import watch_database
from common.server import RunningServer, ServiceSpec, start_server
from gateway.api import AuthServicer
from gateway.authn import AuthCache, BearerAuthenticator, listen_for_invalidations
from gateway.backend_health import SERVING, follow_backends
from gateway.proxy import Proxy
from gateway.routes import PUBLIC_SERVICES, build_routes
from paperclip.gateway.v1 import auth_pb2_grpc

AUTH_SERVICE = "paperclip.gateway.v1.AuthService"


def backend_addresses(settings: Settings) -> dict[str, str]:
    """Where each backend listens (one replica, a list, or a ``dns:///`` name); the
    gateway needs real addresses, not port 0."""
    addresses = {
        "issue_service": settings.issue_service_addr,
        "run_service": settings.run_service_addr,
        "workspace_service": settings.workspace_service_addr,
    }
    for name, address in addresses.items():
        setting = f"PAPERCLIP_{name.upper()}_ADDR"
        if any(entry.endswith(":0") for entry in replica_addresses(address)):
            raise SystemExit(f"gateway: {setting} must name the running {name}")
        try:
            grpc_target(address, setting=setting)
        except ConfigError as exc:
            raise SystemExit(f"gateway: {exc}") from exc
    return addresses


@dataclass
class Gateway:
    """A started gateway: its server and its channels to the backends."""

    running: RunningServer
    channels: Mapping[str, grpc.aio.Channel]

    async def stop(self, grace: float | None = None) -> None:
        if grace is None:
            await self.running.stop()
        else:
            await self.running.stop(grace)
        await asyncio.gather(*(c.close() for c in self.channels.values()))


async def start_gateway(
    db: Database, settings: Settings, *, address: str, backends: Mapping[str, str]
) -> Gateway:
    """Serve the public services on ``address``, routed to ``backends``."""
    # Balanced over each backend's healthy replicas; the calls a client may repeat are
    # retried on UNAVAILABLE (another replica answers), all others are sent once. The
    # proxy relays each backend status as it came: the channels raise it raw.
    channels = {
        name: backend_channel(
            target,
            idempotent_methods=IDEMPOTENT_METHODS,
            setting=f"PAPERCLIP_{name.upper()}_ADDR",
            raw_errors=True,
        )
        for name, target in backends.items()
    }
    cache = AuthCache()
    authenticator = BearerAuthenticator(db, settings.jwt_secret, cache)
    proxy = Proxy(build_routes(), channels, settings.internal_key)
    auth = AuthServicer(db)
    running = await start_server(
        [
            ServiceSpec(
                AUTH_SERVICE,
                lambda server: auth_pb2_grpc.add_AuthServiceServicer_to_server(auth, server),
            )
        ],
        address,
        settings.internal_key,
        authenticator=authenticator,
        generic_handlers=[proxy],
        reflected=list(PUBLIC_SERVICES),
        serving=False,
    )
    # The gateway itself takes calls from now until shutdown: what clients balance on.
    await running.health.set(GATEWAY_HEALTH_SERVICE, SERVING)
    assert settings.database_url is not None
    running.background += [
        asyncio.create_task(listen_for_invalidations(asyncpg_dsn(settings.database_url), cache)),
        asyncio.create_task(
            follow_backends(running.health, channels, PUBLIC_SERVICES, (AUTH_SERVICE,))
        ),
        asyncio.create_task(watch_database(db, None, ())),
    ]
    return Gateway(running, channels)
