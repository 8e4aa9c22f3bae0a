"""SQL of environment leases (the RPCs' and the lease sweep's), their record and proto
form, and how leases end: the mapping from a run's end to its leases'.

Every statement runs in the unit of work of the caller. Ending leases is one
``UPDATE ... FROM unnest(...)`` for any number of them, with an audit row for each in
the same transaction, so the RPCs, the sweep and the archive of a workspace all end
(and audit) leases the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from common.actor import Actor
from common.audit import record_activity
from common.protoconv import text, text_or_none, timestamp
from common.sql import Row, Tx, sql
from paperclip.workspaces.v1 import workspace_messages_pb2 as pb
from workspace_service import foreign_reads

ACTIVE = "active"
RELEASED = "released"
EXPIRED = "expired"
FAILED = "failed"
STATUS_TO_PROTO = {
    ACTIVE: pb.LEASE_STATUS_ACTIVE,
    RELEASED: pb.LEASE_STATUS_RELEASED,
    EXPIRED: pb.LEASE_STATUS_EXPIRED,
    FAILED: pb.LEASE_STATUS_FAILED,
}
#: Run statuses in which a run may still hold (or take) a lease.
LIVE_RUN_STATUSES = frozenset({"queued", "running"})
#: The failure reason of a lease the sweep (or an acquire) found past its expiry.
TTL_EXPIRED = "ttl_expired"
#: The failure reason of the lease of a cancelled run (it ends ``expired``).
RUN_CANCELLED = "run_cancelled"
PROVIDER_LOCAL = "local"

ENTITY_TYPE = "environment_lease"
ACQUIRED = "environment.lease_acquired"
RELEASED_ACTION = "environment.lease_released"
EXPIRED_ACTION = "environment.lease_expired"

_COLUMNS = """
    id, company_id, environment_id, workspace_id, issue_id, run_id, status, lease_policy,
    provider, provider_lease_id, ttl_seconds, expires_at, released_at, failure_reason,
    created_at, renewed_at
"""
_GET = sql(f"SELECT {_COLUMNS} FROM workspaces.environment_leases WHERE id = :id FOR UPDATE")
_ACTIVE_FOR = sql(
    f"""
    SELECT {_COLUMNS} FROM workspaces.environment_leases
     WHERE environment_id = :environment_id AND workspace_id = :workspace_id
       AND status = 'active'
     FOR UPDATE
    """
)
# ON CONFLICT against the partial unique index: a concurrent acquire that inserted
# first makes this one wait for its commit and then insert nothing, so exactly one
# active lease exists per (environment, workspace) whatever the interleaving.
_INSERT = sql(
    f"""
    INSERT INTO workspaces.environment_leases (
        company_id, environment_id, workspace_id, issue_id, run_id, lease_policy, provider,
        holder_type, holder_id, ttl_seconds, expires_at
    ) VALUES (
        :company_id, :environment_id, :workspace_id, :issue_id, :run_id, :lease_policy,
        '{PROVIDER_LOCAL}', :holder_type, :holder_id, :ttl::int,
        now() + :ttl::int * interval '1 second'
    )
    ON CONFLICT (environment_id, workspace_id) WHERE status = 'active' DO NOTHING
    RETURNING id
    """
)
_SET_PROVIDER_ID = sql(
    f"""
    UPDATE workspaces.environment_leases SET provider_lease_id = provider || ':' || id
     WHERE id = :id RETURNING {_COLUMNS}
    """
)
_RENEW = sql(
    f"""
    UPDATE workspaces.environment_leases
       SET expires_at = now() + :ttl::int * interval '1 second', renewed_at = now()
     WHERE id = :id RETURNING {_COLUMNS}
    """
)
_END = sql(
    """
    UPDATE workspaces.environment_leases AS l
       SET status = e.status, failure_reason = e.reason, released_at = now()
      FROM unnest(:ids::uuid[], :statuses::text[], :reasons::text[]) AS e(id, status, reason)
     WHERE l.id = e.id AND l.status = 'active'
    RETURNING l.*
    """
)
_ACTIVE_OF_RUN = sql(
    f"""
    SELECT {_COLUMNS} FROM workspaces.environment_leases
     WHERE run_id = :run_id AND status = 'active' ORDER BY id FOR UPDATE
    """
)
_ACTIVE_OF_WORKSPACE = sql(
    f"""
    SELECT {_COLUMNS} FROM workspaces.environment_leases
     WHERE workspace_id = :workspace_id AND status = 'active' ORDER BY id FOR UPDATE
    """
)
_HOLDER = sql("SELECT holder_type, holder_id FROM workspaces.environment_leases WHERE id = :id")
_NOW = sql("SELECT now()")
_TRY_SWEEP_LOCK = sql("SELECT pg_try_advisory_xact_lock(hashtext(:key))")
_LAPSED = sql(
    """
    SELECT id FROM workspaces.environment_leases
     WHERE status = 'active' AND expires_at < now()
     ORDER BY expires_at LIMIT :batch
     FOR UPDATE SKIP LOCKED
    """
)
# LEFT JOIN: a lease whose run row is gone is released like one whose run ended.
_OF_ENDED_RUNS = sql(
    f"""
    SELECT l.id, r.status, r.error, r.error_code, r.id AS found
      FROM workspaces.environment_leases l
      {foreign_reads.LEASE_RUN_LEFT_JOIN}
     WHERE l.status = 'active' AND l.run_id IS NOT NULL
       AND (r.id IS NULL OR r.status NOT IN ('queued', 'running'))
     ORDER BY l.id LIMIT :batch
     FOR UPDATE OF l SKIP LOCKED
    """
)


@dataclass(frozen=True)
class LeaseRecord:
    """One ``workspaces.environment_leases`` row."""

    id: str
    company_id: str
    environment_id: str
    workspace_id: str
    issue_id: str | None
    run_id: str | None
    status: str
    lease_policy: str
    provider: str
    provider_lease_id: str | None
    ttl_seconds: int
    expires_at: datetime
    released_at: datetime | None
    failure_reason: str | None
    created_at: datetime
    renewed_at: datetime

    @classmethod
    def from_row(cls, row: Row) -> LeaseRecord:
        return cls(
            id=str(row["id"]),
            company_id=str(row["company_id"]),
            environment_id=str(row["environment_id"]),
            workspace_id=str(row["workspace_id"]),
            issue_id=text_or_none(row["issue_id"]),
            run_id=text_or_none(row["run_id"]),
            status=row["status"],
            lease_policy=row["lease_policy"],
            provider=row["provider"],
            provider_lease_id=row["provider_lease_id"],
            ttl_seconds=row["ttl_seconds"],
            expires_at=row["expires_at"],
            released_at=row["released_at"],
            failure_reason=row["failure_reason"],
            created_at=row["created_at"],
            renewed_at=row["renewed_at"],
        )

    @property
    def is_active(self) -> bool:
        return self.status == ACTIVE

    def to_proto(self) -> pb.EnvironmentLease:
        return pb.EnvironmentLease(
            id=self.id,
            company_id=self.company_id,
            environment_id=self.environment_id,
            workspace_id=self.workspace_id,
            issue_id=text(self.issue_id),
            run_id=text(self.run_id),
            status=STATUS_TO_PROTO[self.status],
            lease_policy=self.lease_policy,
            provider=self.provider,
            provider_lease_id=text(self.provider_lease_id),
            expires_at=timestamp(self.expires_at),
            released_at=timestamp(self.released_at),
            failure_reason=text(self.failure_reason),
            created_at=timestamp(self.created_at),
            renewed_at=timestamp(self.renewed_at),
        )


@dataclass(frozen=True)
class Ending:
    """How one active lease ends: its final status and failure reason (and, when it
    ends with its run, the status the run ended with)."""

    lease_id: str
    status: str
    reason: str | None
    run_status: str | None = None


def ending_for_run(lease_id: str, run: Row | None, *, claimed: str | None = None) -> Ending:
    """How a lease ends with its run (``run`` as :func:`get_run` reads it; None when it
    is missing, then with the status the caller ``claimed``): failed or timed_out ->
    ``failed`` (reason: the run's error, else its error code, else its status);
    cancelled -> ``expired``; any other status, or none known -> ``released``."""
    status = claimed if run is None else str(run["status"])
    if status in ("failed", "timed_out"):
        known = None if run is None else (run["error"] or run["error_code"])
        return Ending(lease_id, FAILED, known or status, status)
    if status == "cancelled":
        return Ending(lease_id, EXPIRED, RUN_CANCELLED, status)
    return Ending(lease_id, RELEASED, None, status)


async def get_lease(tx: Tx, lease_id: str) -> LeaseRecord | None:
    """The lease, row-locked, or None."""
    row = await tx.fetchrow(_GET, {"id": lease_id})
    return None if row is None else LeaseRecord.from_row(row)


async def active_lease(tx: Tx, *, environment_id: str, workspace_id: str) -> LeaseRecord | None:
    """The active lease of (environment, workspace), row-locked, or None."""
    row = await tx.fetchrow(
        _ACTIVE_FOR, {"environment_id": environment_id, "workspace_id": workspace_id}
    )
    return None if row is None else LeaseRecord.from_row(row)


async def insert_lease(
    tx: Tx,
    *,
    company_id: str,
    environment_id: str,
    workspace_id: str,
    issue_id: str | None,
    run_id: str | None,
    lease_policy: str,
    ttl_seconds: int,
    holder: tuple[str, str],
) -> LeaseRecord | None:
    """A new active lease, or None when (environment, workspace) already has one."""
    lease_id = await tx.fetchval(
        _INSERT,
        {
            "company_id": company_id,
            "environment_id": environment_id,
            "workspace_id": workspace_id,
            "issue_id": issue_id,
            "run_id": run_id,
            "lease_policy": lease_policy,
            "ttl": ttl_seconds,
            "holder_type": holder[0],
            "holder_id": holder[1],
        },
    )
    if lease_id is None:
        return None
    row = await tx.fetchrow(_SET_PROVIDER_ID, {"id": lease_id})
    assert row is not None
    return LeaseRecord.from_row(row)


async def renew_lease(tx: Tx, lease_id: str, *, ttl_seconds: int) -> LeaseRecord:
    """Push the lease's expiry to now + ``ttl_seconds``."""
    row = await tx.fetchrow(_RENEW, {"id": lease_id, "ttl": ttl_seconds})
    assert row is not None
    return LeaseRecord.from_row(row)


async def end_leases(
    tx: Tx, endings: Sequence[Ending], *, actor: Actor, source: str, note: str | None = None
) -> list[LeaseRecord]:
    """End the leases of ``endings`` that are still active, each audited as ended by
    ``actor`` from ``source`` (with ``note``, when given); the ended records."""
    if not endings:
        return []
    rows = await tx.fetch(
        _END,
        {
            "ids": [e.lease_id for e in endings],
            "statuses": [e.status for e in endings],
            "reasons": [e.reason for e in endings],
        },
    )
    ended = [LeaseRecord.from_row(row) for row in rows]
    run_status = {e.lease_id: e.run_status for e in endings}
    for lease in ended:
        _record_ended(tx, actor, lease, source=source, run_status=run_status[lease.id], note=note)
    return ended


def _record_ended(
    tx: Tx,
    actor: Actor,
    lease: LeaseRecord,
    *,
    source: str,
    run_status: str | None,
    note: str | None,
) -> None:
    """The audit row of a lease that just ended: ``environment.lease_expired`` when its
    TTL ran out, else ``environment.lease_released``."""
    details: dict[str, object] = {
        "environmentId": lease.environment_id,
        "workspaceId": lease.workspace_id,
        "runId": lease.run_id,
        "status": lease.status,
        "failureReason": lease.failure_reason,
        "source": source,
    }
    if run_status is not None:
        details["runStatus"] = run_status
    if note is not None:
        details["reason"] = note
    record_activity(
        tx,
        actor=actor,
        company_id=lease.company_id,
        action=EXPIRED_ACTION if lease.failure_reason == TTL_EXPIRED else RELEASED_ACTION,
        entity_type=ENTITY_TYPE,
        entity_id=lease.id,
        details=details,
    )


async def active_leases_of_run(tx: Tx, run_id: str) -> list[LeaseRecord]:
    """The run's active leases, row-locked."""
    return [LeaseRecord.from_row(r) for r in await tx.fetch(_ACTIVE_OF_RUN, {"run_id": run_id})]


async def active_leases_of_workspace(tx: Tx, workspace_id: str) -> list[LeaseRecord]:
    """The workspace's active leases, row-locked."""
    rows = await tx.fetch(_ACTIVE_OF_WORKSPACE, {"workspace_id": workspace_id})
    return [LeaseRecord.from_row(r) for r in rows]


async def holder_of(tx: Tx, lease: LeaseRecord) -> tuple[str, str] | None:
    """(actor_type, actor_id) of whoever acquired the lease."""
    row = await tx.fetchrow(_HOLDER, {"id": lease.id})
    return None if row is None else (row["holder_type"], row["holder_id"])


async def db_now(tx: Tx) -> datetime:
    """The transaction's clock (``now()``), which expiries are compared against."""
    value: datetime = await tx.fetchval(_NOW)
    return value


async def try_sweep_lock(tx: Tx, key: str) -> bool:
    """Take the transaction-scoped advisory lock ``key`` if no one holds it."""
    return bool(await tx.fetchval(_TRY_SWEEP_LOCK, {"key": key}))


async def leases_of_ended_runs(tx: Tx, batch: int) -> list[Row]:
    """Up to ``batch`` active leases whose run has ended or is gone, row-locked (rows
    others hold are skipped): (id, the run's status, error, error_code, found)."""
    return await tx.fetch(_OF_ENDED_RUNS, {"batch": batch})


async def lapsed_leases(tx: Tx, batch: int) -> list[Row]:
    """Up to ``batch`` active leases past their expiry, oldest first, row-locked (rows
    others hold are skipped)."""
    return await tx.fetch(_LAPSED, {"batch": batch})
