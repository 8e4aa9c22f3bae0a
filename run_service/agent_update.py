"""UpdateAgent rules (AIP-134): the updatable paths, status transitions, what changed.

Mask semantics: a path in ``update_mask`` takes the request's value. For
``runtime_config`` (the whole message) every unset field goes back to its default; for
``runtime_config.<field>`` only that field changes, to its default when unset.

Status: ``active <-> paused`` (pause, resume), ``active | paused -> terminated``.
Terminated is final: any update that would change a terminated agent fails with
FAILED_PRECONDITION ``AGENT_TERMINATED``. An update that changes nothing (setting the
status it already has, the same name...) is a no-op, also on a terminated agent, so a
retried terminate succeeds.

Audit scheme, one ``audit.activity_log`` row per update that changes something: the
action is ``agent.paused`` / ``agent.resumed`` / ``agent.terminated`` when the status
changes (whatever else changed with it), else ``agent.updated``; ``details.changes``
maps each changed field (runtime fields as ``runtime_config.<field>``) to
``{"from": previous, "to": new}``. Env values may be secrets: the audit row records
``adapter_config`` with env keys only, plus the keys whose values changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from common.errors import FailedPrecondition
from common.validation import Violations
from paperclip.runs.v1 import agents_pb2
from run_service.agent_config import (
    RUNTIME_FIELDS,
    AdapterSpec,
    RuntimeField,
    apply_runtime,
    check_adapter,
    check_name,
    check_role,
    check_runtime,
    check_uuid,
)
from run_service.agent_store import (
    ACTIVE,
    PAUSED,
    STATUS_FROM_PROTO,
    TERMINATED,
    AgentRecord,
)

UPDATABLE_PATHS: tuple[str, ...] = (
    "name",
    "role",
    "status",
    "adapter_config",
    "runtime_config",
    *(f"runtime_config.{name}" for name in RUNTIME_FIELDS),
)
#: Allowed status changes and the audit action each one records.
TRANSITIONS: dict[tuple[str, str], str] = {
    (ACTIVE, PAUSED): "agent.paused",
    (PAUSED, ACTIVE): "agent.resumed",
    (ACTIVE, TERMINATED): "agent.terminated",
    (PAUSED, TERMINATED): "agent.terminated",
}
UPDATED_ACTION = "agent.updated"

Changes = dict[str, dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class AgentPatch:
    """A validated UpdateAgent request: the new values of the masked fields."""

    agent_id: str
    name: str | None = None
    role: str | None = None
    status: str | None = None
    adapter: AdapterSpec | None = None
    runtime: Mapping[str, int | bool] = field(default_factory=dict)


def parse_update(request: agents_pb2.UpdateAgentRequest) -> AgentPatch:
    """Validate the mask and the masked values; one INVALID_ARGUMENT names every bad one."""
    v = Violations()
    agent = request.agent
    agent_id = check_uuid(v, "agent.id", agent.id)
    paths = set(request.update_mask.paths)
    if not paths:
        v.add("update_mask", "is required: list the fields to change")
    for index, path in enumerate(request.update_mask.paths):
        if path not in UPDATABLE_PATHS:
            v.add(
                f"update_mask.paths[{index}]",
                f"{path[:100]!r} is not updatable; updatable: {', '.join(UPDATABLE_PATHS)}",
            )
    runtime_fields: tuple[RuntimeField, ...] = (
        RUNTIME_FIELDS
        if "runtime_config" in paths
        else tuple(f for f in RUNTIME_FIELDS if f"runtime_config.{f}" in paths)
    )
    patch = AgentPatch(
        agent_id=agent_id,
        name=check_name(v, "agent.name", agent.name) if "name" in paths else None,
        role=check_role(v, "agent.role", agent.role) if "role" in paths else None,
        status=_check_status(v, agent.status) if "status" in paths else None,
        adapter=(
            check_adapter(v, "agent.adapter_config", agent.adapter_config)
            if "adapter_config" in paths
            else None
        ),
        runtime=check_runtime(
            v, "agent.runtime_config", agent.runtime_config, fields=runtime_fields
        ),
    )
    v.raise_if_any()
    return patch


def _check_status(v: Violations, value: int) -> str | None:
    status = STATUS_FROM_PROTO.get(value)
    if status is None:
        v.add(
            "agent.status",
            "must be AGENT_STATUS_ACTIVE, AGENT_STATUS_PAUSED or AGENT_STATUS_TERMINATED",
        )
    return status


def apply_patch(current: AgentRecord, patch: AgentPatch) -> tuple[AgentRecord, Changes]:
    """The agent after ``patch`` and what changed; a terminated agent refuses any change.

    Every other status change is in ``TRANSITIONS``: with terminated final, the three
    statuses allow exactly pause, resume and terminate.
    """
    updated = replace(
        current,
        name=current.name if patch.name is None else patch.name,
        role=current.role if patch.role is None else patch.role,
        status=current.status if patch.status is None else patch.status,
        adapter=current.adapter if patch.adapter is None else patch.adapter,
        runtime=apply_runtime(current.runtime, patch.runtime),
    )
    changes = diff(current, updated)
    if changes and current.status == TERMINATED:
        raise FailedPrecondition(
            "the agent is terminated; a terminated agent never changes again",
            reason="AGENT_TERMINATED",
            metadata={"agent_id": current.id},
        )
    return updated, changes


def diff(old: AgentRecord, new: AgentRecord) -> Changes:
    """Each changed field with its previous and new value, as the audit log records it."""
    changes: Changes = {}
    for name in ("name", "role", "status"):
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            changes[name] = {"from": before, "to": after}
    if old.adapter != new.adapter:
        env_keys = set(old.adapter.env) | set(new.adapter.env)
        changes["adapter_config"] = {
            "from": old.adapter.audit_form(),
            "to": new.adapter.audit_form(),
            "env_keys_changed": sorted(
                key for key in env_keys if old.adapter.env.get(key) != new.adapter.env.get(key)
            ),
        }
    for name in RUNTIME_FIELDS:
        before, after = getattr(old.runtime, name), getattr(new.runtime, name)
        if before != after:
            changes[f"runtime_config.{name}"] = {"from": before, "to": after}
    return changes


def audit_action(old_status: str, new_status: str) -> str:
    """``agent.paused`` / ``agent.resumed`` / ``agent.terminated``, else ``agent.updated``."""
    return TRANSITIONS.get((old_status, new_status), UPDATED_ACTION)
