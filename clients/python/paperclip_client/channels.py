"""Targets and service configs of channels to a service that may run as several
replicas (the gateway, or a service behind it).

An address names one replica (``host:port``), several (``10.0.0.5:50051,10.0.0.6:50051``)
or a DNS name that resolves to all of them (``dns:///paperclip-gateway:50051``). The
channel balances calls over the replicas with gRPC's own ``round_robin`` policy and
watches each one's ``grpc.health.v1`` status, so a replica that stops or reports
NOT_SERVING gets no new calls.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from paperclip_client.errors import ConfigError

#: Stop retrying while most attempts fail, so a down service is not hammered.
RETRY_THROTTLING: dict[str, object] = {"maxTokens": 20, "tokenRatio": 0.1}

SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


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
    if address.startswith(SCHEMES) or "," not in address:
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
