"""Channels to a service that may run as several replicas.

An address setting names one replica (``host:port``), several (``10.0.0.5:50061,
10.0.0.6:50061``), or a DNS name that resolves to all of them (``dns:///paperclip-issue:
50061``, a Kubernetes headless Service). Either way the channel balances calls over the
replicas with gRPC's own ``round_robin`` policy and watches each one's
``grpc.health.v1`` status, so a replica that stops or reports NOT_SERVING gets no new
calls. Calls that may safely be sent twice are retried on UNAVAILABLE by the channel's
service config (another replica answers the retry), never by a loop of our own.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence

import grpc
import grpc.aio
from google.protobuf import descriptor_pool

from common import tracing
from common.config import ConfigError

#: Retries of an idempotent call on UNAVAILABLE: the first retry goes out at once to
#: another replica (a stopped or killed one is out of the picker within a moment).
RETRY_POLICY: dict[str, object] = {
    "maxAttempts": 5,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
#: Stop retrying while most attempts fail, so a down service is not hammered.
#: The health service name every server reports SERVING while it accepts calls (and
#: NOT_SERVING once it drains): what channels balancing over replicas check. A replica
#: whose database is down stays in rotation and says so (``DATABASE_UNAVAILABLE``); its
#: overall status (``""``) is NOT_SERVING meanwhile.
LIVE_HEALTH_SERVICE = "paperclip.live"

RETRY_THROTTLING: dict[str, object] = {"maxTokens": 20, "tokenRatio": 0.1}

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

_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


def _split_host_port(entry: str, setting: str) -> tuple[str, int]:
    host, sep, port = entry.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{setting}: {entry!r} is not host:port")
    return host.strip("[]"), int(port)


def grpc_target(address: str, *, setting: str = "address") -> str:
    """The gRPC target for an address setting (see the module docstring).

    A list must name replicas by IP address (``localhost`` stands for 127.0.0.1): gRPC
    resolves a list only that way. Use a ``dns:///`` name for replicas known by name."""
    address = address.strip()
    if not address:
        raise ConfigError(f"{setting} is empty")
    if address.startswith(_SCHEMES) or "," not in address:
        return address
    v4: list[str] = []
    v6: list[str] = []
    for entry in (part.strip() for part in address.split(",")):
        if not entry:
            raise ConfigError(f"{setting}: empty entry in {address!r}")
        host, port = _split_host_port(entry, setting)
        if host == "localhost":
            host = "127.0.0.1"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError as exc:
            raise ConfigError(
                f"{setting}: {entry!r} in a list must be an IP address; "
                "name replicas known by name with a dns:/// address"
            ) from exc
        if ip.version == 4:
            v4.append(f"{host}:{port}")
        else:
            v6.append(f"[{host}]:{port}")
    if v4 and v6:
        raise ConfigError(f"{setting}: a list cannot mix IPv4 and IPv6 addresses")
    return f"ipv4:{','.join(v4)}" if v4 else f"ipv6:{','.join(v6)}"


def replica_addresses(address: str) -> list[str]:
    """The ``host:port`` entries of an address setting (a DNS target is one entry)."""
    if address.strip().startswith(_SCHEMES):
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


def balanced_service_config(
    method_config: Sequence[dict[str, object]], *, health_service: str = ""
) -> dict[str, object]:
    """A service config that balances over the replicas whose ``health_service`` is
    SERVING, with ``method_config`` (timeouts, retry policies) for the calls."""
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": health_service},
        "methodConfig": list(method_config),
        "retryThrottling": RETRY_THROTTLING,
    }


def backend_channel(
    address: str,
    *,
    idempotent_methods: Iterable[str] = (),
    setting: str = "address",
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A balanced, health-checked channel to a service of the suite at ``address``."""
    config = json.dumps(
        balanced_service_config(
            retry_entries(idempotent_methods), health_service=LIVE_HEALTH_SERVICE
        )
    )
    return grpc.aio.insecure_channel(
        grpc_target(address, setting=setting),
        options=[*BACKEND_OPTIONS, ("grpc.service_config", config)],
        interceptors=[*tracing.client_interceptors(), *interceptors] or None,
    )


def service_methods(*services: str) -> frozenset[str]:
    """Every ``package.Service/Method`` of the named services (all idempotent ones)."""
    pool = descriptor_pool.Default()
    return frozenset(
        f"{name}/{method.name}"
        for name in services
        for method in pool.FindServiceByName(name).methods
    )
