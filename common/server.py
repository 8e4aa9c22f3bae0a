"""Server bootstrap shared by every service: a grpc.aio server with health per
service, reflection, the interceptor chain and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import tracing
from common.channels import LIVE_HEALTH_SERVICE
from common.interceptors import Authenticator, ServiceInterceptor, SignedActorAuthenticator

log = logging.getLogger("paperclip.server")

#: Grace for in-flight calls on shutdown; shorter than Kubernetes' default 30 s kill
#: timer so the process exits on its own before it is SIGKILLed.
SHUTDOWN_GRACE_SECONDS = 5.0

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # Refuse to share a port with another process: two servers silently splitting one
    # address is how duplicate schedulers happen.
    ("grpc.so_reuseport", 0),
    # Ping idle clients every 30 s so dead peers (and their streams) are noticed.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Let clients keep connections alive with pings of their own, without calls.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Ask clients to reconnect every 5 minutes (calls in flight may finish, streams
    # included, within the hour a stream may last): a client resolving a `dns:///` name
    # resolves it again, so replicas added since get calls.
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 3_600_000),
    # 16 MiB: run logs and workspace output pages fit; larger pages are paginated.
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    # 64 KiB of request metadata, with the soft limit at the hard one: gRPC would refuse
    # headers past 8 KiB at random, and past 16 KiB always, with RESOURCE_EXHAUSTED.
    # Below this the gateway's authenticator refuses an oversized token (UNAUTHENTICATED)
    # and a board user's signed actor (one entry per membership) reaches the services.
    ("grpc.max_metadata_size", 64 * 1024),
    ("grpc.absolute_max_metadata_size", 64 * 1024),
)


@dataclass(frozen=True)
class ServiceSpec:
    """One gRPC service a process serves: its full name and how to register it."""

    name: str
    register: Callable[[grpc.aio.Server], None]


@dataclass
class RunningServer:
    """A started server: its port and health, and how to stop it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    services: Sequence[str]
    background: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """NOT_SERVING first (so balancers drain), then stop within ``grace``."""
        await self.health.enter_graceful_shutdown()
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.server.stop(grace)


async def start_server(
    specs: Sequence[ServiceSpec],
    address: str,
    internal_key: bytes,
    *,
    authenticator: Authenticator | None = None,
    generic_handlers: Sequence[grpc.GenericRpcHandler] = (),
    reflected: Sequence[str] = (),
    serving: bool = True,
) -> RunningServer:
    """Start serving ``specs`` on ``address`` (port 0 picks a free one).

    Callers are authenticated by their signed actor unless ``authenticator`` says
    otherwise; ``generic_handlers`` serve further methods (the gateway's proxy), and
    ``reflected`` names further services for reflection. With ``serving`` false the
    health status starts NOT_SERVING and the caller sets it."""
    auth = authenticator or SignedActorAuthenticator(internal_key)
    server = grpc.aio.server(
        interceptors=[*tracing.server_interceptors(), ServiceInterceptor(auth)],
        options=SERVER_OPTIONS,
    )
    if generic_handlers:
        server.add_generic_rpc_handlers(tuple(generic_handlers))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for spec in specs:
        spec.register(server)
    names = [spec.name for spec in specs]
    reflection.enable_server_reflection(
        [
            *names,
            *reflected,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in [*names, *reflected, ""]:
        await health_servicer.set(name, status)
    await health_servicer.set(LIVE_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, health_servicer, names)


def write_ready_file(path: Path, service: str, address: str) -> None:
    """Announce ``address`` atomically once the server is serving."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"service": service, "addr": address, "pid": os.getpid()}))
    tmp.replace(path)


def host_of(address: str) -> str:
    """The host part of ``host:port``."""
    return address.rsplit(":", 1)[0]


async def serve_until_signalled(
    running: RunningServer,
    *,
    service: str,
    address: str,
    ready_file: Path | None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = f"{host_of(address)}:{running.port}"
    log.info("listening", extra={"addr": bound})
    if ready_file is not None:
        write_ready_file(ready_file, service, bound)
    await stop.wait()
    log.info("stopping", extra={"grace_s": SHUTDOWN_GRACE_SECONDS})
    await running.stop()
    if on_stop is not None:
        await on_stop()
    log.info("stopped")
