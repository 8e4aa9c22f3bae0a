"""Wake rules: request checks, pre-check skips, run context, merging and follow-ups.

No I/O here; ``run_service.wakes`` applies these inside the caller's transaction (its
statements are in ``run_service.wake_store``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format

from common.actor import Actor
from common.errors import invalid
from common.sql import Row
from common.validation import parse_uuid, require_enum, require_text
from paperclip.runs.v1 import runs_pb2
from run_service.run_store import SOURCE_FROM_PROTO

MAX_REASON = 200
MAX_IDEMPOTENCY_KEY = 200
#: The JSON of a wake payload (compact UTF-8) may not exceed this.
MAX_PAYLOAD_BYTES = 64 * 1024

SOURCES = ("on_demand", "assignment", "timer", "automation")

# Skip reasons (``wakeup_requests.skip_reason``).
AGENT_PAUSED = "agent_paused"
AGENT_TERMINATED = "agent_terminated"
HEARTBEAT_DISABLED = "heartbeat_disabled"
WAKE_ON_DEMAND_DISABLED = "wake_on_demand_disabled"
OWN_WRITE = "own_write"
ISSUE_NOT_FOUND = "issue_execution_issue_not_found"
#: A deferred wake whose agent could not run any more when the issue was released.
NOT_INVOKABLE = "agent_not_invokable"

#: Reasons that need a fresh run after a running one, like a comment.
FOLLOW_UP_REASONS = frozenset({"approval_approved", "issue_blockers_resolved"})
#: Context keys the service owns; a stale one in a payload is dropped.
_DROPPED_KEYS = ("paperclipWake",)


def payload_size(payload: Mapping[str, Any]) -> int:
    """Bytes of the compact JSON of ``payload``."""
    return len(json.dumps(payload, separators=(",", ":"), default=str).encode())


def precheck_skip(agent: Row, *, source: str, requested_by: Actor | None) -> str | None:
    """Why a wake for ``agent`` is refused before any run is looked at, or None.

    Order: paused/terminated, timer with the heartbeat off, non-timer with wakes on
    demand off, then the agent's own write (an agent never wakes itself)."""
    status = agent["status"]
    if status == "paused":
        return AGENT_PAUSED
    if status == "terminated":
        return AGENT_TERMINATED
    if source == "timer" and int(agent["heartbeat_interval_seconds"]) == 0:
        return HEARTBEAT_DISABLED
    if source != "timer" and not agent["wake_on_demand"]:
        return WAKE_ON_DEMAND_DISABLED
    if (
        requested_by is not None
        and requested_by.is_agent
        and requested_by.agent_id == str(agent["id"])
    ):
        return OWN_WRITE
    return None


def comment_ids(data: Mapping[str, Any]) -> list[str]:
    """The comment ids a payload or context names, in order, without repeats."""
    out: list[str] = []
    listed = data.get("commentIds")
    candidates: list[Any] = list(listed) if isinstance(listed, list) else []
    candidates.append(data.get("commentId"))
    for value in candidates:
        if isinstance(value, str) and value and value not in out:
            out.append(value)
    return out


def build_context(
    payload: Mapping[str, Any], *, source: str, reason: str, issue_id: str | None
) -> dict[str, Any]:
    """The run context of one wake: its payload plus the routing keys."""
    context = {k: v for k, v in payload.items() if k not in _DROPPED_KEYS}
    context["wakeReason"] = reason
    context["wakeSource"] = source
    if issue_id is not None:
        context["issueId"] = issue_id
    ids = comment_ids(payload)
    if ids:
        context["commentIds"] = ids
        context["latestCommentId"] = ids[-1]
    return context


def merge_context(existing: Mapping[str, Any], incoming: Mapping[str, Any]) -> dict[str, Any]:
    """``existing`` updated by ``incoming``: incoming keys win, comment ids are
    unioned in order (the oldest first)."""
    merged = {k: v for k, v in existing.items() if k not in _DROPPED_KEYS}
    merged.update({k: v for k, v in incoming.items() if k not in _DROPPED_KEYS})
    ids = comment_ids({"commentIds": comment_ids(existing)})
    for value in comment_ids(incoming):
        if value not in ids:
            ids.append(value)
    if ids:
        merged["commentIds"] = ids
        merged["latestCommentId"] = ids[-1]
        merged["commentId"] = ids[-1]
    return merged


def needs_follow_up(payload: Mapping[str, Any], reason: str) -> bool:
    """Whether the wake carries something a running run has not seen (a comment, an
    approval): such a wake waits for a fresh run instead of merging into the running one."""
    return bool(comment_ids(payload)) or reason in FOLLOW_UP_REASONS


def as_json(value: object) -> dict[str, Any]:
    """A jsonb column value as a dict (asyncpg returns jsonb as text)."""
    if value is None:
        return {}
    data = json.loads(value) if isinstance(value, str) else value
    return dict(data) if isinstance(data, Mapping) else {}


def validate_request(request: runs_pb2.WakeAgentRequest) -> dict[str, Any]:
    """The checked fields of a ``WakeAgent`` request (INVALID_ARGUMENT naming the
    first bad one); an empty reason defaults to the source (timer: heartbeat_timer)."""
    agent_id = parse_uuid("agent_id", request.agent_id)
    source_enum = require_enum("source", request.source, list(SOURCE_FROM_PROTO))
    assert source_enum is not None
    source = SOURCE_FROM_PROTO[source_enum]
    reason = require_text("reason", request.reason, max_length=MAX_REASON, required=False)
    issue_id = parse_uuid("issue_id", request.issue_id, required=False)
    payload: dict[str, Any] = json_format.MessageToDict(request.payload)
    if payload_size(payload) > MAX_PAYLOAD_BYTES:
        raise invalid("payload", f"must be at most {MAX_PAYLOAD_BYTES} bytes of JSON")
    key = require_text(
        "idempotency_key",
        request.idempotency_key,
        max_length=MAX_IDEMPOTENCY_KEY,
        required=False,
    )
    return {
        "agent_id": agent_id,
        "source": source,
        "reason": reason or ("heartbeat_timer" if source == "timer" else source),
        "issue_id": issue_id,
        "payload": payload,
        "idempotency_key": key or None,
    }
