"""Wiring of the gateway process: backends, authentication, proxy, health."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import grpc.aio

from common.config import Settings
from common.db import Database
from common.embedded_pg import asyncpg_dsn
from common.server import RunningServer, ServiceSpec, start_server
from gateway.api import AuthApi
from gateway.authn import AuthCache, BearerAuthenticator, listen_for_invalidations
from gateway.backend_health import follow_backends
from gateway.proxy import Proxy
from gateway.routes import PUBLIC_SERVICES, build_routes
from paperclip.gateway.v1 import auth_pb2_grpc

AUTH_SERVICE = "paperclip.gateway.v1.AuthService"

BACKEND_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # Long-lived channels to the backends: keep them warm and notice dead peers.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    # Fail fast when a backend is down (UNAVAILABLE goes back to the client, whose
    # retry policy decides) instead of queueing calls on a reconnecting channel.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


def backend_addresses(settings: Settings) -> dict[str, str]:
    """Where each backend listens; the gateway needs real addresses, not port 0."""
    addresses = {
        "issue_service": settings.issue_service_addr,
        "run_service": settings.run_service_addr,
        "workspace_service": settings.workspace_service_addr,
    }
    for name, address in addresses.items():
        if address.endswith(":0"):
            raise SystemExit(f"gateway: PAPERCLIP_{name.upper()}_ADDR must name the running {name}")
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
    channels = {
        name: grpc.aio.insecure_channel(target, options=BACKEND_CHANNEL_OPTIONS)
        for name, target in backends.items()
    }
    cache = AuthCache()
    authenticator = BearerAuthenticator(db, settings.jwt_secret, cache)
    proxy = Proxy(build_routes(), channels, settings.internal_key)
    auth = AuthApi(db)
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
    assert settings.database_url is not None
    running.background += [
        asyncio.create_task(listen_for_invalidations(asyncpg_dsn(settings.database_url), cache)),
        asyncio.create_task(
            follow_backends(running.health, channels, PUBLIC_SERVICES, (AUTH_SERVICE,))
        ),
    ]
    return Gateway(running, channels)
