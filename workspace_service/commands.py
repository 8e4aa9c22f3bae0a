"""Workspace command definitions: the services and jobs of a runtime
config, with stable ids, display names and service indexes, and how a request selects
one.

Ids: the slug of an explicit id, else ``<kind>:<slug(name)>``, else ``<kind>:<n>``;
a repeated id gets ``-2``, ``-3``... ``service_index`` counts services only, from 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Kind = Literal["service", "job"]

DEFAULT_PORT_ENV = "PORT"
#: Readiness poll interval: default and floor.
DEFAULT_INTERVAL_MS = 500
MIN_INTERVAL_MS = 100
#: Readiness timeout: dev-server commands get longer.
DEV_SERVER_TIMEOUT_S = 90
DEFAULT_READY_TIMEOUT_S = 30
DEFAULT_JOB_TIMEOUT_S = 3600
_DEV_SERVER = re.compile(r"^\s*(pnpm|npm|yarn|bun)\s+(run\s+)?dev(\s|$)")
_SLUG_DROP = re.compile(r"[^a-z0-9:._-]+")


@dataclass(frozen=True)
class Readiness:
    url: str = ""
    timeout_seconds: int = 0
    interval_ms: int = 0


@dataclass(frozen=True)
class CommandDef:
    """One service or job of a workspace's runtime config."""

    id: str
    name: str
    kind: Kind
    command: str
    cwd: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    auto_port: bool = False
    port: int = 0
    port_env: str = DEFAULT_PORT_ENV
    url: str = ""
    readiness: Readiness = Readiness()
    timeout_seconds: int = 0
    #: Position among the services; None for jobs.
    service_index: int | None = None

    @property
    def wants_port(self) -> bool:
        return self.auto_port or self.port > 0

    def ready_timeout(self) -> int:
        """Seconds to wait for readiness: explicit, else 90 for a dev server, else 30."""
        if self.readiness.timeout_seconds > 0:
            return self.readiness.timeout_seconds
        if _DEV_SERVER.match(self.command):
            return DEV_SERVER_TIMEOUT_S
        return DEFAULT_READY_TIMEOUT_S

    def ready_interval(self) -> float:
        """Seconds between readiness probes (at least 0.1)."""
        ms = self.readiness.interval_ms or DEFAULT_INTERVAL_MS
        return max(ms, MIN_INTERVAL_MS) / 1000

    def job_timeout(self) -> int:
        return self.timeout_seconds if self.timeout_seconds > 0 else DEFAULT_JOB_TIMEOUT_S


def slug(value: str) -> str:
    """Lower case, runs of other characters as one dash, no dash at either end."""
    return _SLUG_DROP.sub("-", value.strip().lower()).strip("-")


def definitions(config: Mapping[str, Any] | None) -> list[CommandDef]:
    """Every service then every job of ``config["runtime"]``, ids made unique."""
    runtime = (config or {}).get("runtime") or {}
    out: list[CommandDef] = []
    seen: dict[str, int] = {}
    for kind, key in (("service", "services"), ("job", "jobs")):
        for position, raw in enumerate(runtime.get(key) or ()):
            command = _definition(kind, position, raw)  # type: ignore[arg-type]
            count = seen.get(command.id, 0) + 1
            seen[command.id] = count
            if count > 1:
                command = _with_id(command, f"{command.id}-{count}")
            out.append(command)
    return out


def services(config: Mapping[str, Any] | None) -> list[CommandDef]:
    return [c for c in definitions(config) if c.kind == "service"]


def jobs(config: Mapping[str, Any] | None) -> list[CommandDef]:
    return [c for c in definitions(config) if c.kind == "job"]


def find(config: Mapping[str, Any] | None, command_id: str) -> CommandDef | None:
    """The command whose id is exactly ``command_id`` (trimmed)."""
    wanted = command_id.strip()
    return next((c for c in definitions(config) if c.id == wanted), None)


def _definition(kind: Kind, position: int, raw: Mapping[str, Any]) -> CommandDef:
    number = position + 1
    label = "Service" if kind == "service" else "Job"
    name = str(raw.get("name") or "").strip() or f"{label} {number}"
    explicit = slug(str(raw.get("id") or ""))
    named = slug(str(raw.get("name") or ""))
    command_id = explicit or (f"{kind}:{named}" if named else f"{kind}:{number}")
    readiness = raw.get("readiness") or {}
    return CommandDef(
        id=command_id,
        name=name,
        kind=kind,
        command=str(raw.get("command") or "").strip(),
        cwd=str(raw.get("cwd") or "").strip(),
        env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
        auto_port=bool(raw.get("auto_port")),
        port=int(raw.get("port") or 0),
        port_env=str(raw.get("port_env") or "").strip() or DEFAULT_PORT_ENV,
        url=str(raw.get("url") or "").strip(),
        readiness=Readiness(
            url=str(readiness.get("url") or "").strip(),
            timeout_seconds=int(readiness.get("timeout_seconds") or 0),
            interval_ms=int(readiness.get("interval_ms") or 0),
        ),
        timeout_seconds=int(raw.get("timeout_seconds") or 0),
        service_index=position if kind == "service" else None,
    )


def _with_id(command: CommandDef, new_id: str) -> CommandDef:
    return replace(command, id=new_id)
