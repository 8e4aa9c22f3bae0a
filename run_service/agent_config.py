"""What an agent is configured with: the validated values of CreateAgent and UpdateAgent.

Pure rules, no I/O. Every malformed field is added to a ``Violations`` so that one
INVALID_ARGUMENT names them all, with BadRequest paths such as
``runtime_config.max_concurrent_runs`` or ``adapter_config.command[2]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

from common.validation import Violations, collect_uuid
from paperclip.runs.v1 import agents_pb2

MAX_NAME_LENGTH = 100
MAX_ROLE_LENGTH = 100
ADAPTER_TYPES = ("process",)
DEFAULT_ADAPTER_TYPE = "process"
MAX_COMMAND_ARGS = 256
MAX_ARG_LENGTH = 4096
MAX_CWD_LENGTH = 4096
MAX_ENV_ENTRIES = 256
MAX_ENV_VALUE_LENGTH = 32 * 1024
#: The run service sets these for every run; an agent's own env may never shadow them.
RESERVED_ENV_PREFIX = "PAPERCLIP_"

#: ``@name`` mentions resolve to agents: ASCII letters, digits, '-', '_' and '.', starting
#: with a letter or digit and not ending with '.' (so "ask @bob." mentions "bob").
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

RuntimeField = Literal[
    "max_concurrent_runs",
    "timeout_seconds",
    "idle_timeout_seconds",
    "grace_seconds",
    "heartbeat_interval_seconds",
    "wake_on_demand",
    "daily_run_budget",
]
RUNTIME_FIELDS: tuple[RuntimeField, ...] = (
    "max_concurrent_runs",
    "timeout_seconds",
    "idle_timeout_seconds",
    "grace_seconds",
    "heartbeat_interval_seconds",
    "wake_on_demand",
    "daily_run_budget",
)
#: Inclusive ranges of the integer runtime fields (heartbeat: 0, or this range).
_RANGES: dict[str, tuple[int, int]] = {
    "max_concurrent_runs": (1, 100),
    "timeout_seconds": (1, 604_800),
    "idle_timeout_seconds": (0, 604_800),
    "grace_seconds": (1, 600),
    "heartbeat_interval_seconds": (30, 604_800),
    "daily_run_budget": (0, 100_000),
}


@dataclass(frozen=True, kw_only=True)
class RuntimeLimits:
    """The effective runtime config of an agent; the defaults are the documented ones."""

    max_concurrent_runs: int = 5
    timeout_seconds: int = 7200
    idle_timeout_seconds: int = 1800
    grace_seconds: int = 15
    heartbeat_interval_seconds: int = 0
    wake_on_demand: bool = True
    #: Runs per 24 hours; 0: no budget.
    daily_run_budget: int = 0

    def to_json(self) -> dict[str, int | bool]:
        """Every field by name (the audit form, and the column values)."""
        return {name: getattr(self, name) for name in RUNTIME_FIELDS}

    @classmethod
    def from_json(cls, data: Mapping[str, int | bool]) -> RuntimeLimits:
        """The limits named in ``data`` (by field name); missing fields take defaults."""
        default = cls()
        return cls(
            max_concurrent_runs=int(data.get("max_concurrent_runs", default.max_concurrent_runs)),
            timeout_seconds=int(data.get("timeout_seconds", default.timeout_seconds)),
            idle_timeout_seconds=int(
                data.get("idle_timeout_seconds", default.idle_timeout_seconds)
            ),
            grace_seconds=int(data.get("grace_seconds", default.grace_seconds)),
            heartbeat_interval_seconds=int(
                data.get("heartbeat_interval_seconds", default.heartbeat_interval_seconds)
            ),
            wake_on_demand=bool(data.get("wake_on_demand", default.wake_on_demand)),
            daily_run_budget=int(data.get("daily_run_budget", default.daily_run_budget)),
        )

    def to_proto(self) -> agents_pb2.RuntimeConfig:
        """Every field set to its effective value."""
        return agents_pb2.RuntimeConfig(
            max_concurrent_runs=self.max_concurrent_runs,
            timeout_seconds=self.timeout_seconds,
            idle_timeout_seconds=self.idle_timeout_seconds,
            grace_seconds=self.grace_seconds,
            heartbeat_interval_seconds=self.heartbeat_interval_seconds,
            wake_on_demand=self.wake_on_demand,
            daily_run_budget=self.daily_run_budget,
        )


DEFAULT_RUNTIME = RuntimeLimits()


@dataclass(frozen=True, kw_only=True)
class AdapterSpec:
    """How the ``process`` adapter starts the agent."""

    command: tuple[str, ...]
    cwd: str = ""
    env: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The form stored in ``runs.agents.adapter_config``."""
        return {"command": list(self.command), "cwd": self.cwd, "env": dict(self.env)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AdapterSpec:
        """Read the stored form back."""
        return cls(
            command=tuple(str(arg) for arg in data.get("command") or ()),
            cwd=str(data.get("cwd") or ""),
            env={str(k): str(v) for k, v in (data.get("env") or {}).items()},
        )

    def to_proto(self) -> agents_pb2.AdapterConfig:
        """The API form."""
        return agents_pb2.AdapterConfig(command=self.command, cwd=self.cwd, env=self.env)

    def audit_form(self) -> dict[str, Any]:
        """What the audit log records: env values may be secrets, so only their keys."""
        return {"command": list(self.command), "cwd": self.cwd, "env_keys": sorted(self.env)}


@dataclass(frozen=True, kw_only=True)
class NewAgent:
    """A validated CreateAgent request."""

    company_id: str
    name: str
    role: str
    adapter_type: str
    adapter: AdapterSpec
    runtime: RuntimeLimits

    @property
    def name_key(self) -> str:
        """The case-insensitive identity of the name within its company."""
        return name_key(self.name)


def check_uuid(v: Violations, path: str, value: str) -> str:
    """The canonical form of a required UUID string ('' when it is not one)."""
    return collect_uuid(v, path, value) or ""


def name_key(name: str) -> str:
    """The unique key of an agent name (names are ASCII, so lower() is exact)."""
    return name.lower()


def check_name(v: Violations, path: str, value: str) -> str:
    """The stripped name; a violation unless it is a usable ``@mention``."""
    name = value.strip()
    if not name:
        v.add(path, "is required")
    elif len(name) > MAX_NAME_LENGTH:
        v.add(path, f"must be at most {MAX_NAME_LENGTH} characters")
    elif not _NAME.fullmatch(name):
        v.add(
            path,
            "must be usable as an @mention: ASCII letters, digits, '-', '_' and '.', "
            "starting with a letter or digit and not ending with '.'",
        )
    return name


def check_role(v: Violations, path: str, value: str) -> str:
    """The stripped role (free text, may be empty)."""
    role = value.strip()
    if len(role) > MAX_ROLE_LENGTH:
        v.add(path, f"must be at most {MAX_ROLE_LENGTH} characters")
    if "\x00" in role:
        v.add(path, "must not contain NUL characters")
    return role


def check_adapter_type(v: Violations, path: str, value: str) -> str:
    """The adapter type; empty means the default, ``process``."""
    adapter_type = value.strip() or DEFAULT_ADAPTER_TYPE
    if adapter_type not in ADAPTER_TYPES:
        v.add(path, f"must be one of {', '.join(ADAPTER_TYPES)}")
    return adapter_type


def check_adapter(v: Violations, path: str, config: agents_pb2.AdapterConfig) -> AdapterSpec:
    """The adapter config, with every bad argument, env entry and cwd reported."""
    command = tuple(config.command)
    if not command:
        v.add(f"{path}.command", "is required: the program and its arguments")
    elif len(command) > MAX_COMMAND_ARGS:
        v.add(f"{path}.command", f"at most {MAX_COMMAND_ARGS} arguments")
    else:
        for index, arg in enumerate(command):
            _check_arg(v, f"{path}.command[{index}]", arg)
    if len(config.env) > MAX_ENV_ENTRIES:
        v.add(f"{path}.env", f"at most {MAX_ENV_ENTRIES} entries")
    for key in sorted(config.env):
        _check_env(v, f"{path}.env", key, config.env[key])
    cwd = config.cwd
    if cwd:
        if len(cwd) > MAX_CWD_LENGTH:
            v.add(f"{path}.cwd", f"must be at most {MAX_CWD_LENGTH} characters")
        elif "\x00" in cwd:
            v.add(f"{path}.cwd", "must not contain NUL characters")
        elif not PurePosixPath(cwd).is_absolute():
            v.add(f"{path}.cwd", "must be an absolute path")
    return AdapterSpec(command=command, cwd=cwd, env=dict(config.env))


def _check_arg(v: Violations, path: str, arg: str) -> None:
    if not arg:
        v.add(path, "must not be empty")
    elif len(arg) > MAX_ARG_LENGTH:
        v.add(path, f"must be at most {MAX_ARG_LENGTH} characters")
    elif "\x00" in arg:
        v.add(path, "must not contain NUL characters")


def _check_env(v: Violations, path: str, key: str, value: str) -> None:
    shown = repr(key[:64])
    if not _ENV_KEY.fullmatch(key):
        v.add(path, f"key {shown} must match [A-Za-z_][A-Za-z0-9_]*")
    elif key.upper().startswith(RESERVED_ENV_PREFIX):
        v.add(path, f"key {shown} is reserved: the run service sets PAPERCLIP_* variables")
    if len(value) > MAX_ENV_VALUE_LENGTH:
        v.add(path, f"value of {shown} must be at most {MAX_ENV_VALUE_LENGTH} characters")
    elif "\x00" in value:
        v.add(path, f"value of {shown} must not contain NUL characters")


def check_runtime(
    v: Violations,
    path: str,
    config: agents_pb2.RuntimeConfig,
    *,
    fields: Iterable[RuntimeField] = RUNTIME_FIELDS,
) -> dict[str, int | bool]:
    """The new values of ``fields``: the request's value if set, else the default."""
    values: dict[str, int | bool] = {}
    for name in fields:
        if not config.HasField(name):
            values[name] = getattr(DEFAULT_RUNTIME, name)
            continue
        value = getattr(config, name)
        values[name] = value
        if name in _RANGES:
            low, high = _RANGES[name]
            in_range = low <= value <= high
            if name == "heartbeat_interval_seconds":
                in_range = in_range or value == 0
                if not in_range:
                    v.add(f"{path}.{name}", f"must be 0 (disabled) or between {low} and {high}")
            elif not in_range and low == 0:
                v.add(f"{path}.{name}", f"must be 0 (disabled) or at most {high}")
            elif not in_range:
                v.add(f"{path}.{name}", f"must be between {low} and {high}")
    return values


def apply_runtime(base: RuntimeLimits, values: Mapping[str, int | bool]) -> RuntimeLimits:
    """``base`` with ``values`` replaced."""
    return RuntimeLimits.from_json({**base.to_json(), **values})
