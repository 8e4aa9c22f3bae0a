"""Environment leases: AcquireEnvironmentLease,
RenewEnvironmentLease, ReleaseEnvironmentLease and the internal ReleaseRunLeases.

A lease is a run's (or a board user's) claim on an environment for a workspace, with a
TTL: its holder renews it, or the sweep (``lease_sweep``) expires it. At most one lease
per (environment, workspace) is active, enforced by a partial unique index; an acquire
that finds the active lease past its expiry, or held by a run that has ended, ends that
lease first and takes its place, so a lost ``ReleaseRunLeases`` never blocks the next
run. Each function is one unit of work: validate (bad input writes nothing),
authorize, apply the rule, write the change and its audit row in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.actor import SYSTEM_ACTOR, Actor
from common.audit import record_activity
from common.authz import require_agent_run, require_company_access, require_service
from common.db import Database
from common.errors import Aborted, FailedPrecondition, NotFound, PermissionDenied
from common.protoconv import text_or_none
from common.sql import Row, Tx
from common.validation import Violations, collect_uuid
from paperclip.runs.v1 import run_messages_pb2 as runs_pb
from paperclip.workspaces.v1 import workspace_leases_pb2 as internal_pb
from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from workspace_service import foreign_reads, lease_store, store
from workspace_service.lease_store import Ending, LeaseRecord

DEFAULT_TTL_SECONDS = 300
MIN_TTL_SECONDS = 5
MAX_TTL_SECONDS = 86_400
POLICIES = ("ephemeral", "reuse_by_environment")
MAX_FAILURE_REASON = 2000
#: Acquire rounds within one transaction: a round only repeats when the lease another
#: acquire just inserted was released again before this one could read it.
ACQUIRE_ROUNDS = 3

RUN_STATUS_FROM_PROTO = {
    runs_pb.RUN_STATUS_QUEUED: "queued",
    runs_pb.RUN_STATUS_RUNNING: "running",
    runs_pb.RUN_STATUS_SUCCEEDED: "succeeded",
    runs_pb.RUN_STATUS_FAILED: "failed",
    runs_pb.RUN_STATUS_CANCELLED: "cancelled",
    runs_pb.RUN_STATUS_TIMED_OUT: "timed_out",
}


@dataclass(frozen=True)
class Wanted:
    """A validated AcquireEnvironmentLease request."""

    company_id: str
    environment_id: str
    workspace_id: str
    run_id: str | None
    issue_id: str | None
    ttl_seconds: int
    lease_policy: str


async def acquire_lease(
    db: Database, actor: Actor, request: pb.AcquireEnvironmentLeaseRequest
) -> messages.EnvironmentLease:
    """The active lease of (environment, workspace) for the caller: a new one, or its
    own renewed; FAILED_PRECONDITION ``ENVIRONMENT_LEASE_HELD`` when another holder has
    it. Audited as ``environment.lease_acquired``."""
    wanted = _parse_acquire(request)
    run_id = _acquiring_run(actor, wanted)
    async with db.unit_of_work() as tx:
        workspace = await store.get_workspace(tx, wanted.workspace_id)
        if workspace is None or workspace.company_id != wanted.company_id:
            raise NotFound(
                "workspace not found",
                reason="WORKSPACE_NOT_FOUND",
                metadata={"workspace_id": wanted.workspace_id},
            )
        if not workspace.is_open:
            raise FailedPrecondition(
                "workspace is closed",
                reason="WORKSPACE_CLOSED",
                metadata={"workspace_id": workspace.id, "status": workspace.status},
            )
        issue_id = wanted.issue_id
        if run_id is not None:
            run = await _live_run(tx, actor, run_id, company_id=wanted.company_id)
            issue_id = issue_id or text_or_none(run["issue_id"])
        lease = await _take(tx, actor, wanted, run_id=run_id, issue_id=issue_id)
    return lease.to_proto()


async def renew_lease(
    db: Database, actor: Actor, request: pb.RenewEnvironmentLeaseRequest
) -> messages.EnvironmentLease:
    """Push an active, unexpired lease's expiry to now + TTL (default: the TTL it was
    acquired with); FAILED_PRECONDITION ``LEASE_NOT_ACTIVE`` otherwise."""
    v = Violations()
    lease_id = collect_uuid(v, "lease_id", request.lease_id)
    ttl = _ttl(v, "ttl_seconds", request.ttl_seconds, default=None)
    v.raise_if_any()
    assert lease_id is not None
    # Not audited: renewals are heartbeats; the log records a lease's start and end.
    async with db.unit_of_work() as tx:
        lease = await _lease_for(tx, actor, lease_id)
        if not lease.is_active or lease.expires_at <= await lease_store.db_now(tx):
            raise FailedPrecondition(
                "lease is not active",
                reason="LEASE_NOT_ACTIVE",
                metadata={"lease_id": lease.id, "status": lease.status},
            )
        renewed = await lease_store.renew_lease(tx, lease.id, ttl_seconds=ttl or lease.ttl_seconds)
    return renewed.to_proto()


async def release_lease(
    db: Database, actor: Actor, request: pb.ReleaseEnvironmentLeaseRequest
) -> messages.EnvironmentLease:
    """End a lease: ``failed`` with ``failure_reason`` when one is given, else
    ``released``. Idempotent: a lease no longer active is returned as it is. Audited as
    ``environment.lease_released``."""
    v = Violations()
    lease_id = collect_uuid(v, "lease_id", request.lease_id)
    reason = request.failure_reason.strip()
    if len(request.failure_reason) > MAX_FAILURE_REASON:
        v.add("failure_reason", f"must be at most {MAX_FAILURE_REASON} characters")
    if "\x00" in request.failure_reason:
        v.add("failure_reason", "must not contain NUL characters")
    v.raise_if_any()
    assert lease_id is not None
    async with db.unit_of_work() as tx:
        lease = await _lease_for(tx, actor, lease_id)
        if not lease.is_active:
            return lease.to_proto()
        ending = (
            Ending(lease.id, lease_store.FAILED, reason)
            if reason
            else Ending(lease.id, lease_store.RELEASED, None)
        )
        (ended,) = await lease_store.end_leases(tx, [ending], actor=actor, source="release")
    return ended.to_proto()


async def release_run_leases(
    db: Database, actor: Actor, request: internal_pb.ReleaseRunLeasesRequest
) -> internal_pb.ReleaseRunLeasesResponse:
    """End the active leases of an ended run (services only). The run's recorded status
    wins over the request's; FAILED_PRECONDITION ``RUN_NOT_TERMINAL`` while it is queued
    or running. The ids ended by this call (none on a repeat)."""
    require_service(actor)
    v = Violations()
    run_id = collect_uuid(v, "run_id", request.run_id)
    claimed = None
    if request.run_status != runs_pb.RUN_STATUS_UNSPECIFIED:
        claimed = RUN_STATUS_FROM_PROTO.get(request.run_status)
        if claimed is None:
            v.add("run_status", f"unknown value {request.run_status}")
    v.raise_if_any()
    assert run_id is not None
    async with db.unit_of_work() as tx:
        leases = await lease_store.active_leases_of_run(tx, run_id)
        run = await foreign_reads.get_run(tx, run_id)
        if run is not None and run["status"] in lease_store.LIVE_RUN_STATUSES:
            raise FailedPrecondition(
                "the run is still live",
                reason="RUN_NOT_TERMINAL",
                metadata={"run_id": run_id, "run_status": run["status"]},
            )
        ended = await lease_store.end_leases(
            tx,
            [lease_store.ending_for_run(lease.id, run, claimed=claimed) for lease in leases],
            actor=actor,
            source="run_ended",
        )
    return internal_pb.ReleaseRunLeasesResponse(lease_ids=[lease.id for lease in ended])


async def release_workspace_leases(
    tx: Tx, *, workspace_id: str, reason: str, actor: Actor = SYSTEM_ACTOR
) -> list[str]:
    """End the active leases of a workspace being closed (``released``), in the
    caller's unit of work; audited with ``reason``. The ids ended."""
    leases = await lease_store.active_leases_of_workspace(tx, workspace_id)
    ended = await lease_store.end_leases(
        tx,
        [Ending(lease.id, lease_store.RELEASED, None) for lease in leases],
        actor=actor,
        source="workspace_closed",
        note=reason,
    )
    return [lease.id for lease in ended]


# -- acquire ------------------------------------------------------------------------


def _parse_acquire(request: pb.AcquireEnvironmentLeaseRequest) -> Wanted:
    v = Violations()
    company_id = collect_uuid(v, "company_id", request.company_id)
    environment_id = collect_uuid(v, "environment_id", request.environment_id)
    workspace_id = collect_uuid(v, "workspace_id", request.workspace_id)
    run_id = collect_uuid(v, "run_id", request.run_id, required=False)
    issue_id = collect_uuid(v, "issue_id", request.issue_id, required=False)
    ttl = _ttl(v, "ttl_seconds", request.ttl_seconds, default=DEFAULT_TTL_SECONDS)
    policy = request.lease_policy or POLICIES[0]
    if policy not in POLICIES:
        v.add("lease_policy", f"must be one of {', '.join(POLICIES)}")
    v.raise_if_any()
    assert company_id and environment_id and workspace_id and ttl
    return Wanted(company_id, environment_id, workspace_id, run_id, issue_id, ttl, policy)


def _acquiring_run(actor: Actor, wanted: Wanted) -> str | None:
    """The run the lease is for: an agent's own run (the only one it may name); for
    board users (write access) and services, the run named, if any."""
    require_company_access(actor, wanted.company_id, write=True)
    if not actor.is_agent:
        return wanted.run_id
    own = require_agent_run(actor)
    if wanted.run_id is not None and wanted.run_id != own:
        raise _agent_mismatch(actor, wanted.run_id)
    return own


async def _live_run(tx: Tx, actor: Actor, run_id: str, *, company_id: str) -> Row:
    """The queued or running run of the company, share-locked until commit."""
    run = await foreign_reads.get_run(tx, run_id, hold=True)
    if run is None or str(run["company_id"]) != company_id:
        raise NotFound("run not found", reason="RUN_NOT_FOUND", metadata={"run_id": run_id})
    if actor.is_agent and str(run["agent_id"]) != actor.agent_id:
        raise _agent_mismatch(actor, run_id)
    if run["status"] not in lease_store.LIVE_RUN_STATUSES:
        raise FailedPrecondition(
            "run is not active",
            reason="RUN_NOT_ACTIVE",
            metadata={"run_id": run_id, "run_status": run["status"]},
        )
    return run


async def _take(
    tx: Tx, actor: Actor, wanted: Wanted, *, run_id: str | None, issue_id: str | None
) -> LeaseRecord:
    """Insert the lease, or get back the caller's own, or refuse (see the module
    docstring). A lost insert race re-reads the winner's lease in the next round."""
    for _ in range(ACQUIRE_ROUNDS):
        current = await lease_store.active_lease(
            tx, environment_id=wanted.environment_id, workspace_id=wanted.workspace_id
        )
        if current is not None and not await _ended_if_stale(tx, actor, current):
            if not await _held_by_caller(tx, actor, current, run_id):
                raise _held(current)
            return await lease_store.renew_lease(tx, current.id, ttl_seconds=wanted.ttl_seconds)
        lease = await lease_store.insert_lease(
            tx,
            company_id=wanted.company_id,
            environment_id=wanted.environment_id,
            workspace_id=wanted.workspace_id,
            issue_id=issue_id,
            run_id=run_id,
            lease_policy=wanted.lease_policy,
            ttl_seconds=wanted.ttl_seconds,
            holder=actor.audit_identity()[:2],
        )
        if lease is not None:
            record_activity(
                tx,
                actor=actor,
                company_id=lease.company_id,
                action=lease_store.ACQUIRED,
                entity_type=lease_store.ENTITY_TYPE,
                entity_id=lease.id,
                details={
                    "environmentId": lease.environment_id,
                    "workspaceId": lease.workspace_id,
                    "runId": lease.run_id,
                    "issueId": lease.issue_id,
                    "leasePolicy": lease.lease_policy,
                    "provider": lease.provider,
                    "ttlSeconds": lease.ttl_seconds,
                },
            )
            return lease
    raise Aborted("the environment lease kept changing hands", reason="CONCURRENT_MODIFICATION")


async def _ended_if_stale(tx: Tx, actor: Actor, lease: LeaseRecord) -> bool:
    """End ``lease`` when it is past its expiry or its run has ended (what the sweep
    would do next pass); whether it was ended."""
    if lease.expires_at <= await lease_store.db_now(tx):
        ending = Ending(lease.id, lease_store.EXPIRED, lease_store.TTL_EXPIRED)
    elif lease.run_id is not None:
        run = await foreign_reads.get_run(tx, lease.run_id)
        if run is not None and run["status"] in lease_store.LIVE_RUN_STATUSES:
            return False
        ending = lease_store.ending_for_run(lease.id, run)
    else:
        return False
    await lease_store.end_leases(tx, [ending], actor=actor, source="acquire")
    return True


async def _held_by_caller(tx: Tx, actor: Actor, lease: LeaseRecord, run_id: str | None) -> bool:
    """Whether the active lease is the caller's: the same run, or for run-less leases
    the same actor."""
    if run_id is not None or lease.run_id is not None:
        return run_id == lease.run_id
    actor_type, actor_id, _, _ = actor.audit_identity()
    return await lease_store.holder_of(tx, lease) == (actor_type, actor_id)


def _held(lease: LeaseRecord) -> FailedPrecondition:
    return FailedPrecondition(
        "the environment is leased to another holder",
        reason="ENVIRONMENT_LEASE_HELD",
        metadata={
            "lease_id": lease.id,
            "holder_run_id": lease.run_id or "",
            "expires_at": lease.expires_at.isoformat(),
            "environment_id": lease.environment_id,
            "workspace_id": lease.workspace_id,
        },
    )


# -- shared -------------------------------------------------------------------------


async def _lease_for(tx: Tx, actor: Actor, lease_id: str) -> LeaseRecord:
    """The lease, row-locked, if ``actor`` may renew or release it: its run's agent, a
    board user with write access to its company, or a service."""
    lease = await lease_store.get_lease(tx, lease_id)
    if lease is None:
        raise NotFound("lease not found", reason="LEASE_NOT_FOUND", metadata={"lease_id": lease_id})
    require_company_access(actor, lease.company_id, write=True)
    if actor.is_agent and lease.run_id != require_agent_run(actor):
        raise _agent_mismatch(actor, lease.run_id or "")
    return lease


def _agent_mismatch(actor: Actor, run_id: str) -> PermissionDenied:
    return PermissionDenied(
        "an agent may only hold leases for its own run",
        reason="AGENT_MISMATCH",
        metadata={"actor_run_id": actor.run_id or "", "run_id": run_id},
    )


def _ttl(v: Violations, field: str, value: int, *, default: int | None) -> int | None:
    """A TTL in seconds within bounds; 0 is ``default``."""
    if value == 0:
        return default
    if not MIN_TTL_SECONDS <= value <= MAX_TTL_SECONDS:
        v.add(field, f"must be between {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS} seconds")
        return None
    return value
