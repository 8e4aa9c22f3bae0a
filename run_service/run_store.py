"""Runs, wakeup requests and run events: columns, proto mapping, and the statements
that read runs and their events or touch one run (its liveness, its cancel notice)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from common import protoconv
from common.sql import Row, Tx, sql
from paperclip.runs.v1 import run_messages_pb2 as pb

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
ACTIVE = frozenset({"queued", "running"})

RUN_STATUS_TO_PROTO: dict[str, pb.RunStatus.ValueType] = {
    "queued": pb.RUN_STATUS_QUEUED,
    "running": pb.RUN_STATUS_RUNNING,
    "succeeded": pb.RUN_STATUS_SUCCEEDED,
    "failed": pb.RUN_STATUS_FAILED,
    "cancelled": pb.RUN_STATUS_CANCELLED,
    "timed_out": pb.RUN_STATUS_TIMED_OUT,
}
RUN_STATUS_FROM_PROTO = {v: k for k, v in RUN_STATUS_TO_PROTO.items()}
SOURCE_TO_PROTO: dict[str, pb.WakeSource.ValueType] = {
    "on_demand": pb.WAKE_SOURCE_ON_DEMAND,
    "assignment": pb.WAKE_SOURCE_ASSIGNMENT,
    "timer": pb.WAKE_SOURCE_TIMER,
    "automation": pb.WAKE_SOURCE_AUTOMATION,
}
SOURCE_FROM_PROTO = {v: k for k, v in SOURCE_TO_PROTO.items()}
WAKE_STATUS_TO_PROTO: dict[str, pb.WakeupStatus.ValueType] = {
    "queued": pb.WAKEUP_STATUS_QUEUED,
    "deferred": pb.WAKEUP_STATUS_DEFERRED,
    "claimed": pb.WAKEUP_STATUS_CLAIMED,
    "coalesced": pb.WAKEUP_STATUS_COALESCED,
    "skipped": pb.WAKEUP_STATUS_SKIPPED,
    "completed": pb.WAKEUP_STATUS_COMPLETED,
    "failed": pb.WAKEUP_STATUS_FAILED,
    "cancelled": pb.WAKEUP_STATUS_CANCELLED,
}
EVENT_TYPE_TO_PROTO: dict[str, pb.RunEventType.ValueType] = {
    "lifecycle": pb.RUN_EVENT_TYPE_LIFECYCLE,
    "stdout": pb.RUN_EVENT_TYPE_STDOUT,
    "stderr": pb.RUN_EVENT_TYPE_STDERR,
    "error": pb.RUN_EVENT_TYPE_ERROR,
}

RUN_COLUMNS = """
    id, company_id, agent_id, issue_id, status, invocation_source, wake_reason,
    trigger_detail, wakeup_request_id, retry_of_run_id, retry_reason,
    process_loss_retry_count, process_pid, process_group_id, process_started_at,
    supervisor_node_id, exit_code, signal, error_code, error, context, last_activity_at,
    last_output_at, stdout_bytes, stderr_bytes, log_truncated, timeout_seconds,
    idle_timeout_seconds, grace_seconds, created_at, started_at, finished_at, updated_at
"""
WAKEUP_COLUMNS = """
    id, company_id, agent_id, source, reason, issue_id, payload, status, skip_reason,
    coalesced_count, run_id, idempotency_key, requested_at, finished_at
"""
EVENT_COLUMNS = "run_id, seq, type, message, payload, created_at"

_RUN_BY_ID = sql(f"SELECT {RUN_COLUMNS} FROM runs.heartbeat_runs WHERE id = :id")
_LOCK_RUN = sql(f"SELECT {RUN_COLUMNS} FROM runs.heartbeat_runs WHERE id = :id FOR UPDATE")
_ALLOCATE_SEQ = sql(
    """
    UPDATE runs.heartbeat_runs SET next_event_seq = next_event_seq + :n
    WHERE id = :id RETURNING next_event_seq - :n AS first
    """
)
_INSERT_EVENTS = sql(
    """
    INSERT INTO runs.run_events (run_id, seq, type, message, payload)
    SELECT :run, * FROM unnest(CAST(:seqs AS bigint[]), CAST(:types AS text[]),
                               CAST(:messages AS text[]), CAST(:payloads AS jsonb[]))
    """
)
_RUN_STATUS = sql("SELECT company_id, status FROM runs.heartbeat_runs WHERE id = :id")
_EVENTS_AFTER = sql(
    f"""
    SELECT {EVENT_COLUMNS} FROM runs.run_events
    WHERE run_id = :run AND seq > :after ORDER BY seq LIMIT :limit
    """
)
_LIVE = sql(
    """
    SELECT id FROM runs.heartbeat_runs
    WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ('queued', 'running')
    """
)
_GRACE = sql(
    """
    SELECT COALESCE(r.grace_seconds, a.grace_seconds) AS grace, n.host
    FROM runs.heartbeat_runs r
    JOIN runs.agents a ON a.id = r.agent_id
    LEFT JOIN runs.supervisor_nodes n ON n.id = r.supervisor_node_id
    WHERE r.id = :id
    """
)
_NOTIFY = sql("SELECT pg_notify(:channel, :run)")
_TOUCH = sql(
    f"""
    UPDATE runs.heartbeat_runs
    SET last_activity_at = now(), updated_at = now(),
        error = CASE WHEN error_code = 'process_detached' THEN NULL ELSE error END,
        error_code = CASE WHEN error_code = 'process_detached' THEN NULL ELSE error_code END
    WHERE id = :id
    RETURNING {RUN_COLUMNS}
    """
)


def run_to_proto(row: Row) -> pb.Run:
    """The ``Run`` message of one run row."""
    run = pb.Run(
        id=str(row["id"]),
        company_id=str(row["company_id"]),
        agent_id=str(row["agent_id"]),
        issue_id=protoconv.text(row["issue_id"]),
        status=RUN_STATUS_TO_PROTO[row["status"]],
        invocation_source=SOURCE_TO_PROTO.get(
            row["invocation_source"] or "", pb.WAKE_SOURCE_UNSPECIFIED
        ),
        wake_reason=row["wake_reason"] or "",
        wakeup_request_id=protoconv.text(row["wakeup_request_id"]),
        retry_of_run_id=protoconv.text(row["retry_of_run_id"]),
        retry_reason=row["retry_reason"] or "",
        process_loss_retry_count=row["process_loss_retry_count"],
        process_pid=row["process_pid"] or 0,
        process_group_id=row["process_group_id"] or 0,
        signal=row["signal"] or "",
        error_code=row["error_code"] or "",
        error=row["error"] or "",
        supervisor_node_id=protoconv.text(row["supervisor_node_id"]),
        created_at=protoconv.timestamp(row["created_at"]),
        started_at=protoconv.timestamp(row["started_at"]),
        finished_at=protoconv.timestamp(row["finished_at"]),
        last_activity_at=protoconv.timestamp(row["last_activity_at"]),
        log_bytes=row["stdout_bytes"] + row["stderr_bytes"],
        log_truncated=row["log_truncated"],
    )
    if row["exit_code"] is not None:
        run.exit_code = row["exit_code"]
    return run


def wakeup_to_proto(row: Row) -> pb.WakeupRequest:
    """The ``WakeupRequest`` message of one wakeup row."""
    return pb.WakeupRequest(
        id=str(row["id"]),
        company_id=str(row["company_id"]),
        agent_id=str(row["agent_id"]),
        source=SOURCE_TO_PROTO[row["source"]],
        reason=row["reason"],
        issue_id=protoconv.text(row["issue_id"]),
        payload=protoconv.struct(row["payload"]),
        status=WAKE_STATUS_TO_PROTO[row["status"]],
        skip_reason=row["skip_reason"] or "",
        coalesced_count=row["coalesced_count"],
        run_id=protoconv.text(row["run_id"]),
        idempotency_key=row["idempotency_key"] or "",
        requested_at=protoconv.timestamp(row["requested_at"]),
        finished_at=protoconv.timestamp(row["finished_at"]),
    )


def event_to_proto(row: Row) -> pb.RunEvent:
    """The ``RunEvent`` message of one event row."""
    return pb.RunEvent(
        run_id=str(row["run_id"]),
        seq=row["seq"],
        type=EVENT_TYPE_TO_PROTO[row["type"]],
        message=row["message"],
        payload=protoconv.struct(row["payload"]),
        created_at=protoconv.timestamp(row["created_at"]),
    )


async def get_run(tx: Tx, run_id: str, *, lock: bool = False) -> Row | None:
    """A run row (locked FOR UPDATE with ``lock``), or None."""
    return await tx.fetchrow(_LOCK_RUN if lock else _RUN_BY_ID, {"id": run_id})


async def append_events(
    tx: Tx, run_id: str, events: Sequence[tuple[str, str, Mapping[str, Any] | None]]
) -> int:
    """Append (type, message, payload) events to a run with consecutive sequence
    numbers allocated on the run row (any node may append); the first number used."""
    if not events:
        return 0
    first = await tx.fetchval(_ALLOCATE_SEQ, {"id": run_id, "n": len(events)})
    seqs = [int(first) + i for i in range(len(events))]
    await tx.execute(
        _INSERT_EVENTS,
        {
            "run": run_id,
            "seqs": seqs,
            "types": [kind for kind, _, _ in events],
            "messages": [message for _, message, _ in events],
            "payloads": [json.dumps(dict(payload or {})) for _, _, payload in events],
        },
    )
    return int(first)


async def run_status(tx: Tx, run_id: str) -> Row | None:
    """(company_id, status) of a run, or None."""
    return await tx.fetchrow(_RUN_STATUS, {"id": run_id})


async def events_after(tx: Tx, run_id: str, after: int, limit: int) -> list[Row]:
    """Up to ``limit`` events of the run with ``seq > after``, in order."""
    return await tx.fetch(_EVENTS_AFTER, {"run": run_id, "after": after, "limit": limit})


def _list_runs_query(*, agent: bool, issue: bool, statuses: bool, after: bool) -> str:
    where = ["company_id = :company"]
    if agent:
        where.append("agent_id = :agent")
    if issue:
        where.append("issue_id = :issue")
    if statuses:
        where.append("status = ANY(CAST(:statuses AS text[]))")
    if after:
        where.append("(created_at, id) < (:after_t, :after_id)")
    return (
        f"SELECT {RUN_COLUMNS} FROM runs.heartbeat_runs WHERE {' AND '.join(where)}"
        " ORDER BY created_at DESC, id DESC LIMIT :limit"
    )


async def list_runs(tx: Tx, params: Mapping[str, Any]) -> list[Row]:
    """A ``ListRuns`` page of runs, newest first: ``company`` and ``limit``, and each of
    ``agent``, ``issue``, ``statuses`` and (``after_t``, ``after_id``) that is given
    narrows it."""
    query = sql(
        _list_runs_query(
            agent="agent" in params,
            issue="issue" in params,
            statuses="statuses" in params,
            after="after_t" in params,
        )
    )
    return await tx.fetch(query, params)


async def live_run_ids(tx: Tx, run_ids: Sequence[str]) -> list[Row]:
    """(id) of those of the runs that are queued or running."""
    return await tx.fetch(_LIVE, {"ids": list(run_ids)})


async def grace_and_host(tx: Tx, run_id: str) -> Row | None:
    """(grace, host) of a run: its grace seconds (else its agent's) and the host of its
    supervisor node (None when it has none); None when the run is gone."""
    return await tx.fetchrow(_GRACE, {"id": run_id})


async def notify(tx: Tx, channel: str, payload: str) -> None:
    """``NOTIFY channel, payload``, sent when the transaction commits."""
    await tx.execute(_NOTIFY, {"channel": channel, "run": payload})


async def touch(tx: Tx, run_id: str) -> Row | None:
    """Renew a run's activity time and clear its ``process_detached`` error; its row,
    or None when it is gone."""
    return await tx.fetchrow(_TOUCH, {"id": run_id})
