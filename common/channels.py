"""Channels to a service that may run as several replicas.

An address setting names one replica (``host:port``), several (``10.0.0.5:50061,
10.0.0.6:50061``), or a DNS name that resolves to all of them (``dns:///paperclip-issue:
50061``, a Kubernetes headless Service). Either way the channel balances calls over the
replicas with gRPC's own ``round_robin`` policy and watches each one's
``grpc.health.v1`` status, so a replica that stops or reports NOT_SERVING gets no new
calls. Calls that may safely be sent twice are retried on UNAVAILABLE by the channel's
service config (another replica answers the retry), never by a loop of our own.

A failed call on such a channel raises the exception the server raised (the
``common.errors`` class of its status code, with the ``ErrorInfo`` reason and metadata):
callers catch those, never ``grpc.aio.AioRpcError``. A proxy that relays each status as
it came asks for the raw errors instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pool
from paperclip_client.channels import (
    SCHEMES,
    balanced_service_config,
    grpc_target,
)

from common import tracing
from common.errors import from_rpc_error

#: Retries of an idempotent call on UNAVAILABLE: the first retry goes out at once to
#: another replica (a stopped or killed one is out of the picker within a moment).
RETRY_POLICY: dict[str, object] = {
    "maxAttempts": 5,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
#: The health service name every server reports SERVING while it accepts calls (and
#: NOT_SERVING once it drains): what channels balancing over replicas check. A replica
#: whose database is down stays in rotation and says so (``DATABASE_UNAVAILABLE``); its
#: overall status (``""``) is NOT_SERVING meanwhile.
LIVE_HEALTH_SERVICE = "paperclip.live"

BACKEND_OPTIONS: tuple[tuple[str, int], ...] = (
    # Long-lived channels: keep them warm and notice dead peers.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    # Reconnect to a restarted replica within a couple of seconds.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.enable_retries", 1),
    # Resolve a DNS name again every few seconds at most when a replica goes away, so
    # a new pod behind a headless Service is found quickly.
    ("grpc.dns_min_time_between_resolutions_ms", 2_000),
)


def replica_addresses(address: str) -> list[str]:
    """The ``host:port`` entries of an address setting (a DNS target is one entry)."""
    if address.strip().startswith(SCHEMES):
        return [address.strip()]
    return [part.strip() for part in address.split(",") if part.strip()]


def retry_entries(idempotent_methods: Iterable[str]) -> list[dict[str, object]]:
    """``methodConfig`` entries retrying each ``package.Service/Method`` on UNAVAILABLE."""
    entries: list[dict[str, object]] = []
    for path in sorted(idempotent_methods):
        service, _, method = path.partition("/")
        entries.append(
            {"name": [{"service": service, "method": method}], "retryPolicy": RETRY_POLICY}
        )
    return entries


class RaiseProjectErrors(grpc.aio.UnaryUnaryClientInterceptor):
    """Makes a failed unary call raise the ``common.errors`` exception its status carries
    (``from_rpc_error``: the class of the status code, the ``ErrorInfo`` reason and
    metadata, the field violations), with the ``grpc.aio.AioRpcError`` as its cause.

    It runs outside the tracing interceptors, so a client span still records the status
    code that came over the wire."""

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        try:
            call = await continuation(client_call_details, request)
            await call
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        return call


def backend_channel(
    address: str,
    *,
    idempotent_methods: Iterable[str] = (),
    setting: str = "address",
    raw_errors: bool = False,
) -> grpc.aio.Channel:
    """A balanced, health-checked channel to a service of the suite at ``address``.

    Its unary calls raise ``common.errors`` exceptions (:class:`RaiseProjectErrors`);
    with ``raw_errors`` they raise the ``grpc.aio.AioRpcError`` as it came."""
    config = json.dumps(
        balanced_service_config(
            retry_entries(idempotent_methods), health_service=LIVE_HEALTH_SERVICE
        )
    )
    errors: tuple[grpc.aio.ClientInterceptor, ...] = () if raw_errors else (RaiseProjectErrors(),)
    return grpc.aio.insecure_channel(
        grpc_target(address, setting=setting),
        options=[*BACKEND_OPTIONS, ("grpc.service_config", config)],
        interceptors=[*errors, *tracing.client_interceptors()] or None,
    )


def service_methods(*services: str) -> frozenset[str]:
    """Every ``package.Service/Method`` of the named services (all idempotent ones)."""
    pool = descriptor_pool.Default()
    return frozenset(
        f"{name}/{method.name}"
        for name in services
        for method in pool.FindServiceByName(name).methods
    )
