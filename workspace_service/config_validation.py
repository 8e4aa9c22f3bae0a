"""Validation of a workspace config in a request: every bad field is named at once."""

from __future__ import annotations

import re
import uuid
from pathlib import PurePosixPath

from common.validation import MAX_NAME, Violations
from paperclip.workspaces.v1 import workspace_messages_pb2 as pb
from workspace_service.workspace_config import COMMAND_KEYS, has_field

MAX_COMMAND = 10_000
MAX_SERVICES = 20
MAX_JOBS = 50
MAX_ENV = 100
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_config(v: Violations, field: str, config: pb.WorkspaceConfig) -> None:
    """Add a violation for every malformed part of ``config``."""
    for key in COMMAND_KEYS:
        if has_field(config, key):
            _check_text(v, f"{field}.{key}", getattr(config, key), MAX_COMMAND)
    if config.HasField("environment_id") and config.environment_id.strip():
        try:
            uuid.UUID(config.environment_id.strip())
        except ValueError:
            v.add(f"{field}.environment_id", "must be a UUID")
    for index in config.service_states:
        if index < 0:
            v.add(f"{field}.service_states", "indexes must not be negative")
    if config.HasField("runtime"):
        check_runtime(v, f"{field}.runtime", config.runtime)


def check_runtime(v: Violations, field: str, runtime: pb.WorkspaceRuntime) -> None:
    if len(runtime.services) > MAX_SERVICES:
        v.add(f"{field}.services", f"at most {MAX_SERVICES} services")
    if len(runtime.jobs) > MAX_JOBS:
        v.add(f"{field}.jobs", f"at most {MAX_JOBS} jobs")
    for index, service in enumerate(runtime.services):
        _check_command(v, f"{field}.services[{index}]", service, is_service=True)
    for index, job in enumerate(runtime.jobs):
        _check_command(v, f"{field}.jobs[{index}]", job, is_service=False)


def _check_command(
    v: Violations, field: str, command: pb.WorkspaceCommand, *, is_service: bool
) -> None:
    if not command.command.strip():
        v.add(f"{field}.command", "is required")
    _check_text(v, f"{field}.command", command.command, MAX_COMMAND)
    _check_text(v, f"{field}.name", command.name, MAX_NAME)
    _check_text(v, f"{field}.id", command.id, MAX_NAME)
    if command.cwd.strip():
        path = PurePosixPath(command.cwd.strip())
        if path.is_absolute() or ".." in path.parts:
            v.add(f"{field}.cwd", "must be a path inside the workspace (relative, no '..')")
    if len(command.env) > MAX_ENV:
        v.add(f"{field}.env", f"at most {MAX_ENV} entries")
    for key, value in command.env.items():
        if not _ENV_KEY.match(key):
            v.add(f"{field}.env", f"{key[:64]!r} is not a valid variable name")
        elif key.startswith("PAPERCLIP_"):
            v.add(f"{field}.env", f"{key} is reserved for Paperclip")
        _check_text(v, f"{field}.env[{key[:64]}]", value, MAX_COMMAND)
    if not is_service:
        if not 0 <= command.timeout_seconds <= 86_400:
            v.add(f"{field}.timeout_seconds", "must be between 1 and 86400 (0: 3600)")
        return
    if not 0 <= command.port <= 65_535:
        v.add(f"{field}.port", "must be between 1 and 65535")
    if command.auto_port and command.port:
        v.add(f"{field}.port", "cannot be set together with auto_port")
    if command.port_env and not _ENV_KEY.match(command.port_env):
        v.add(f"{field}.port_env", "is not a valid variable name")
    for name, url in (("url", command.url), ("readiness.url", command.readiness.url)):
        if url and not url.startswith("http://"):
            v.add(f"{field}.{name}", "must be an http:// URL")
    if not 0 <= command.readiness.timeout_seconds <= 3600:
        v.add(f"{field}.readiness.timeout_seconds", "must be between 1 and 3600 (0: default)")
    interval = command.readiness.interval_ms
    if interval and not 100 <= interval <= 60_000:
        v.add(f"{field}.readiness.interval_ms", "must be between 100 and 60000 (0: 500)")


def _check_text(v: Violations, field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        v.add(field, f"must be at most {limit} characters")
    if "\x00" in value:
        v.add(field, "must not contain NUL characters")
