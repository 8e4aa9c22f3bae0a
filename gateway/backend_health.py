"""The gateway's health follows its backends: SERVING only while every backend it
routes to answers SERVING (checked every second), NOT_SERVING during shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger("paperclip.gateway.health")

CHECK_INTERVAL_S = 1.0
CHECK_TIMEOUT_S = 1.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def backend_serving(channel: grpc.aio.Channel) -> bool:
    """Whether one backend reports SERVING right now."""
    stub: Any = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=CHECK_TIMEOUT_S)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == SERVING)


async def follow_backends(
    servicer: health.aio.HealthServicer,
    channels: Mapping[str, grpc.aio.Channel],
    services: Mapping[str, str],
    own_services: tuple[str, ...],
    *,
    interval: float = CHECK_INTERVAL_S,
) -> None:
    """Keep the gateway's health statuses in step with its backends until cancelled.

    ``services`` maps each public service to its backend; ``own_services`` are served
    by the gateway itself and are SERVING while all backends are."""
    last: dict[str, bool] = {}
    while True:
        states = dict(
            zip(
                channels,
                await asyncio.gather(*(backend_serving(c) for c in channels.values())),
                strict=True,
            )
        )
        if states != last:
            log.info("backend health", extra={"backends": states})
            last = states
        everything = all(states.values())
        for service, backend in services.items():
            await servicer.set(service, SERVING if states[backend] else NOT_SERVING)
        for service in (*own_services, ""):
            await servicer.set(service, SERVING if everything else NOT_SERVING)
        await asyncio.sleep(interval)
