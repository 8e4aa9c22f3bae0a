"""A workspace's configuration: its host-executed
commands, its runtime services and jobs, and their desired state.

Stored as one JSON object in ``execution_workspaces.config`` (NULL when empty). The
read rules: strings are trimmed and an empty one is absent; unknown desired states are
dropped; a config with nothing in it is no config. The merge rules: only the keys a
patch names change; a ``None`` patch, or a merge that leaves nothing, deletes the
config. A start or stop patches the desired state of what it targets (``desired_state``
for the whole workspace, ``service_states`` per service).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, cast

from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.message import Message

from paperclip.workspaces.v1 import workspace_messages_pb2 as pb

Config = dict[str, Any]

#: The command keys of a config, each a shell command run on the host.
COMMAND_KEYS = ("provision_command", "teardown_command", "cleanup_command")
STRING_KEYS = (*COMMAND_KEYS, "environment_id")
#: Every key a config may hold, in the order they are read.
KEYS = (*STRING_KEYS, "runtime", "desired_state", "service_states")

DESIRED_STATES = ("running", "stopped", "manual")
DesiredState = Literal["running", "stopped", "manual"]

_STATE_TO_PROTO = {
    "running": pb.DESIRED_STATE_RUNNING,
    "stopped": pb.DESIRED_STATE_STOPPED,
    "manual": pb.DESIRED_STATE_MANUAL,
}
_STATE_FROM_PROTO = {value: key for key, value in _STATE_TO_PROTO.items()}


def has_field(message: Message, name: str) -> bool:
    """``message.HasField(name)`` for a field named at run time."""
    return message.HasField(name)


def read_config(raw: Mapping[str, Any] | None) -> Config | None:
    """The typed reading of a stored (or proposed) config: trimmed, cleaned, or None."""
    if not raw:
        return None
    out: Config = {}
    for key in STRING_KEYS:
        value = raw.get(key)
        if isinstance(value, str) and value.strip():
            out[key] = value.strip()
    runtime = raw.get("runtime")
    if isinstance(runtime, Mapping):
        services = [dict(s) for s in runtime.get("services") or () if isinstance(s, Mapping)]
        jobs = [dict(j) for j in runtime.get("jobs") or () if isinstance(j, Mapping)]
        if services or jobs:
            out["runtime"] = {"services": services, "jobs": jobs}
    state = raw.get("desired_state")
    if state in DESIRED_STATES:
        out["desired_state"] = state
    states = raw.get("service_states")
    if isinstance(states, Mapping):
        kept = {
            str(int(index)): value
            for index, value in states.items()
            if str(index).isdigit() and value in DESIRED_STATES
        }
        if kept:
            out["service_states"] = kept
    return out or None


def merge_config(current: Config | None, patch: Mapping[str, Any] | None) -> Config | None:
    """``current`` with the keys of ``patch`` replaced (a key set to None is removed); a
    None patch deletes the whole config."""
    if patch is None:
        return None
    merged = dict(current or {})
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return read_config(merged)


def config_from_proto(message: pb.WorkspaceConfig) -> Config | None:
    """The stored form of a config message (unset and empty fields are absent)."""
    raw: Config = {}
    for key in STRING_KEYS:
        if has_field(message, key):
            raw[key] = getattr(message, key)
    if message.HasField("runtime"):
        raw["runtime"] = runtime_to_json(message.runtime)
    if message.desired_state in _STATE_FROM_PROTO:
        raw["desired_state"] = _STATE_FROM_PROTO[message.desired_state]
    if message.service_states:
        raw["service_states"] = {
            str(index): _STATE_FROM_PROTO[state]
            for index, state in message.service_states.items()
            if state in _STATE_FROM_PROTO
        }
    return read_config(raw)


def field_from_proto(message: pb.WorkspaceConfig, key: str) -> Any:
    """The stored form of one field of a config message, None when unset (a patch of
    that one key)."""
    if key in STRING_KEYS:
        value = getattr(message, key).strip() if has_field(message, key) else ""
        return value or None
    if key == "runtime":
        return runtime_to_json(message.runtime) if message.HasField("runtime") else None
    whole = config_from_proto(message) or {}
    return whole.get(key)


def config_to_proto(config: Config | None) -> pb.WorkspaceConfig:
    """The message form of a stored config."""
    out = pb.WorkspaceConfig()
    if not config:
        return out
    for key in STRING_KEYS:
        if key in config:
            setattr(out, key, config[key])
    if "runtime" in config:
        out.runtime.CopyFrom(runtime_from_json(config["runtime"]))
    if "desired_state" in config:
        out.desired_state = _STATE_TO_PROTO[config["desired_state"]]
    for index, state in (config.get("service_states") or {}).items():
        out.service_states[int(index)] = _STATE_TO_PROTO[state]
    return out


def runtime_to_json(runtime: pb.WorkspaceRuntime) -> dict[str, Any]:
    """The stored form of a runtime (proto field names)."""
    data = MessageToDict(runtime, preserving_proto_field_name=True)
    return {"services": data.get("services", []), "jobs": data.get("jobs", [])}


def runtime_from_json(data: Mapping[str, Any]) -> pb.WorkspaceRuntime:
    """The message form of a stored runtime (unknown keys of older rows are ignored)."""
    return ParseDict(dict(data), pb.WorkspaceRuntime(), ignore_unknown_fields=True)


def has_host_commands(config: Config | None) -> list[str]:
    """The keys of ``config`` that hold host-executed commands."""
    if not config:
        return []
    return [key for key in (*COMMAND_KEYS, "runtime") if key in config]


def service_state(config: Config | None, index: int) -> DesiredState:
    """The desired state of service ``index``: its own, else the overall, else stopped."""
    config = config or {}
    own = (config.get("service_states") or {}).get(str(index))
    if own in DESIRED_STATES:
        return own  # type: ignore[no-any-return]
    overall = config.get("desired_state")
    return cast(DesiredState, overall) if overall in DESIRED_STATES else "stopped"


def desired_state_patch(
    config: Config | None,
    *,
    action: Literal["start", "stop", "restart"],
    service_count: int,
    index: int | None,
) -> Config:
    """The ``desired_state`` / ``service_states`` keys after ``action``
    on every service (``index`` None) or on one. ``manual`` entries never change; the
    overall state is running if any entry runs, else manual if any is manual, else
    stopped."""
    target: DesiredState = "stopped" if action == "stop" else "running"
    states: dict[str, DesiredState] = {}
    for i in range(service_count):
        state = service_state(config, i)
        if state != "manual" and (index is None or i == index):
            state = target
        states[str(i)] = state
    return {"desired_state": overall_state(states.values()), "service_states": states}


def overall_state(states: Iterable[DesiredState]) -> DesiredState:
    values = list(states)
    if "running" in values:
        return "running"
    if "manual" in values:
        return "manual"
    return "stopped"
