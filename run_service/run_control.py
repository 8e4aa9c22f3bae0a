"""Controlling runs: CancelRun and ReportRunActivity.

CancelRun ends a run as ``cancelled`` whatever state it is in, idempotently:

- terminal: returned unchanged;
- queued: cancelled in one transaction (the run never started, so it holds no process;
  a queued *retry* may hold a transferred execution lock, released after commit);
- running under this process's runner: the runner kills the tree and its executor
  finalizes; we wait (bounded) for the terminal status;
- running without a local handle (another node, or a process adopted after a restart):
  the recorded tree is killed when its supervisor node is on this host, then the run is
  cancelled here, guarded by ``status = 'running'`` so a concurrent finalize wins cleanly.
  With the terminal write goes ``NOTIFY paperclip_run_cancel`` (payload: the run id):
  the runner of a live node that still executes the run (on another host, where we
  cannot kill it) cancels its execution on receipt; its finalize then finds the run
  already terminal. The agent's token is dead either way: the run is over.

ReportRunActivity renews a running run's liveness and clears ``process_detached``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from common import metrics
from common.actor import Actor
from common.audit import record_activity
from common.authz import require_company_access
from common.db import Database
from common.errors import FailedPrecondition, PermissionDenied
from common.sql import Row, Tx
from common.validation import require_text
from paperclip.runs.v1 import run_messages_pb2 as pb
from paperclip.runs.v1 import runs_pb2
from run_service import finalize, run_store, terminal_store
from run_service.issue_client import IssueClient
from run_service.run_queries import check_run_id, run_not_found, shared_listener
from run_service.run_store import TERMINAL
from run_service.workspace_client import WorkspaceClient
from supervision.process_tree import kill_tree

logger = logging.getLogger(__name__)

ENTITY_TYPE = "run"
CANCELLED_ACTION = "run.cancelled"
MAX_REASON = 500
DEFAULT_REASON = "cancelled by control plane"
CANCELLED_MESSAGE = "run cancelled"
DETACHED_CLEARED_MESSAGE = "Detached child process reported activity; cleared detached warning"
#: Grace used when neither the run nor its agent records one.
DEFAULT_GRACE_SECONDS = 15
#: Beyond the grace period, how long CancelRun waits for the local executor to finalize.
CANCEL_WAIT_EXTRA_S = 5.0
#: How often a waiting CancelRun re-reads the status without a notification.
CANCEL_POLL_S = 0.25
#: How long CancelRun waits for the after-terminal steps before leaving them running.
RELEASE_WAIT_S = 5.0
#: Tells the node supervising a run on another host that the run was cancelled.
CANCEL_CHANNEL = "paperclip_run_cancel"


class RunControl(Protocol):
    """What CancelRun and ReportRunActivity need of this node's runner."""

    #: The machine (or pod) whose processes this node can signal.
    hostname: str

    async def cancel(self, run_id: str, reason: str) -> bool:
        """Start terminating a run this node supervises (False: not supervised here)."""
        ...

    def touch(self, run_id: str) -> bool:
        """Renew the idle timer of a run this node supervises."""
        ...


#: After-cancel steps still running after their CancelRun returned (kept referenced).
_BACKGROUND: set[asyncio.Task[str | None]] = set()


# --- CancelRun ------------------------------------------------------------------------


def _authorize_cancel(actor: Actor, run: Row) -> None:
    """Board users with write access, services, or an agent cancelling its own run."""
    run_id, company_id = str(run["id"]), str(run["company_id"])
    if actor.is_agent:
        if actor.run_id != run_id or actor.agent_id != str(run["agent_id"]):
            raise PermissionDenied(
                "an agent may only cancel its own run",
                reason="AGENT_MISMATCH",
                metadata={"run_id": run_id},
            )
        require_company_access(actor, company_id, write=False)
        return
    require_company_access(actor, company_id, write=True)


async def _write_cancelled(
    tx: Tx, actor: Actor, run: Row, reason: str, *, from_status: str
) -> Row | None:
    """The terminal write of a cancellation (guarded by ``from_status``): the run,
    its wake, the terminal event and the audit row. None when the status moved on."""
    run_id = str(run["id"])
    updated = await terminal_store.cancel_run(
        tx, run_id, reason or DEFAULT_REASON, from_status=from_status
    )
    if updated is None:
        return None
    await terminal_store.finish_wake(tx, run_id, run["wakeup_request_id"], "cancelled")
    await terminal_store.record_runtime_state(
        tx, run["agent_id"], run_id, "cancelled", reason or DEFAULT_REASON
    )
    await run_store.append_events(
        tx,
        run_id,
        [("lifecycle", CANCELLED_MESSAGE, {"terminal": True, "status": "cancelled"})],
    )
    _audit_cancel(tx, actor, run, reason, from_status=from_status)
    return updated


def _audit_cancel(tx: Tx, actor: Actor, run: Row, reason: str, *, from_status: str) -> None:
    record_activity(
        tx,
        actor=actor,
        company_id=str(run["company_id"]),
        action=CANCELLED_ACTION,
        entity_type=ENTITY_TYPE,
        entity_id=str(run["id"]),
        details={"reason": reason, "previous_status": from_status},
    )


async def cancel_run(
    db: Database,
    runner: RunControl,
    actor: Actor,
    request: runs_pb2.CancelRunRequest,
) -> pb.Run:
    """Cancel a run (see the module docstring); the run as it is afterwards.

    When this service cancels a run itself (not through the runner), what follows a
    terminal write runs after the commit, as for any run (``finalize.after_terminal``:
    ``ReleaseRunLocks``, then the promotion of a deferred wake), using the runner's
    ``issues`` client; without one (tests' fakes) the issue service's stale-lock sweep
    clears the locks later."""
    run_id = check_run_id("run_id", request.run_id)
    reason = require_text("reason", request.reason, max_length=MAX_REASON, required=False)
    async with db.unit_of_work() as tx:
        run = await run_store.get_run(tx, run_id, lock=True)
        if run is None:
            raise run_not_found(run_id)
        _authorize_cancel(actor, run)
        status = run["status"]
        if status in TERMINAL:
            return run_store.run_to_proto(run)
        cancelled: Row | None = None
        if status == "queued":
            cancelled = await _write_cancelled(tx, actor, run, reason, from_status="queued")
    # No row lock is held from here on: the executor's finalize needs it.
    if cancelled is not None:
        await _after_cancel(db, runner, cancelled)
        return run_store.run_to_proto(cancelled)
    if await runner.cancel(run_id, reason or DEFAULT_REASON):
        async with db.unit_of_work() as tx:
            _audit_cancel(tx, actor, run, reason, from_status="running")
        return await _wait_terminal(db, run_id, await _grace(db, run_id))
    return await _cancel_unsupervised(db, runner, actor, run, reason)


async def _cancel_unsupervised(
    db: Database, runner: RunControl, actor: Actor, run: Row, reason: str
) -> pb.Run:
    """A running run this node has no handle on: kill its recorded tree when it runs on
    this host, then end it as cancelled unless a finalize got there first."""
    run_id = str(run["id"])
    async with db.unit_of_work() as tx:
        info = await run_store.grace_and_host(tx, run_id)
    grace = _grace_of(info)
    host = info["host"] if info is not None else None
    local = host is not None and host == runner.hostname
    pid, pgid, started = run["process_pid"], run["process_group_id"], run["process_started_at"]
    if local and pid and started is not None:
        await kill_tree(int(pid), int(pgid or 0), started.timestamp(), float(grace))
    elif host is not None and not local:
        logger.warning(
            "cancelling a run supervised on another host; its node is notified",
            extra={"run_id": run_id, "host": host},
        )
    async with db.unit_of_work() as tx:
        current = await run_store.get_run(tx, run_id, lock=True)
        if current is None:
            raise run_not_found(run_id)
        if current["status"] != "running":
            return run_store.run_to_proto(current)  # finalized meanwhile: that outcome stands
        cancelled = await _write_cancelled(tx, actor, current, reason, from_status="running")
        assert cancelled is not None
        # Delivered at commit: a live node still supervising the run (another host, or
        # another run-service process on this one) stops its execution too.
        await run_store.notify(tx, CANCEL_CHANNEL, run_id)
    await _after_cancel(db, runner, cancelled)
    return run_store.run_to_proto(cancelled)


def _grace_of(info: Row | None) -> int:
    if info is None or info["grace"] is None:
        return DEFAULT_GRACE_SECONDS
    return max(1, int(info["grace"]))


async def _grace(db: Database, run_id: str) -> int:
    async with db.unit_of_work() as tx:
        return _grace_of(await run_store.grace_and_host(tx, run_id))


async def _wait_terminal(db: Database, run_id: str, grace: int) -> pb.Run:
    """The run once terminal, or as it is after ``grace`` + a margin (still running:
    the local executor will finalize it later)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace + CANCEL_WAIT_EXTRA_S
    listener = shared_listener(db)
    subscription = listener.subscribe(run_id)  # the terminal event notifies
    try:
        while True:
            subscription.clear()
            async with db.unit_of_work() as tx:
                row = await run_store.get_run(tx, run_id)
            if row is None:
                raise run_not_found(run_id)
            remaining = deadline - loop.time()
            if row["status"] in TERMINAL or remaining <= 0:
                if row["status"] not in TERMINAL:
                    logger.warning("cancelled run not finalized in time", extra={"run_id": run_id})
                return run_store.run_to_proto(row)
            await subscription.wait(min(CANCEL_POLL_S, remaining))
    finally:
        listener.unsubscribe(subscription)


async def _after_cancel(db: Database, runner: RunControl, run: Row) -> None:
    """``finalize.after_terminal`` for a run cancelled here: waits a little, then lets
    it go on in the background (ReleaseRunLocks retries while the issue service is down)."""
    metrics.count_outcome("cancelled", "cancelled")
    issues = getattr(runner, "issues", None)
    run_id = str(run["id"])
    if not isinstance(issues, IssueClient):
        logger.info(
            "no issue client: run locks left to the stale-lock sweep", extra={"run_id": run_id}
        )
        return
    issue_id = str(run["issue_id"]) if run["issue_id"] is not None else None
    workspaces = getattr(runner, "workspaces", None)
    task = asyncio.get_running_loop().create_task(
        finalize.after_terminal(
            db,
            issues,
            run_id,
            issue_id,
            workspaces=workspaces if isinstance(workspaces, WorkspaceClient) else None,
        )
    )
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    try:
        await asyncio.wait_for(asyncio.shield(task), RELEASE_WAIT_S)
    except TimeoutError:
        logger.warning("after-cancel steps still running", extra={"run_id": run_id})
    except Exception:
        logger.exception("after-cancel steps failed", extra={"run_id": run_id})


# --- ReportRunActivity ----------------------------------------------------------------


def _authorize_activity(actor: Actor, run: Row) -> None:
    """The agent inside that very run, or a service of the suite."""
    if actor.is_service:
        return
    run_id = str(run["id"])
    if not (actor.is_agent and actor.agent_id == str(run["agent_id"]) and actor.run_id == run_id):
        raise PermissionDenied(
            "only the agent of the run may report its activity",
            reason="AGENT_MISMATCH",
            metadata={"run_id": run_id},
        )


async def report_run_activity(
    db: Database, runner: RunControl, actor: Actor, request: runs_pb2.ReportRunActivityRequest
) -> pb.Run:
    """The run is alive: ``last_activity_at`` = now, ``process_detached`` cleared (with a
    lifecycle event), the local idle timer renewed. FAILED_PRECONDITION unless running."""
    run_id = check_run_id("run_id", request.run_id)
    async with db.unit_of_work() as tx:
        run = await run_store.get_run(tx, run_id, lock=True)
        if run is None:
            raise run_not_found(run_id)
        _authorize_activity(actor, run)
        if run["status"] != "running":
            raise FailedPrecondition(
                "run is not running",
                reason="RUN_NOT_RUNNING",
                metadata={"run_id": run_id, "status": run["status"]},
            )
        updated = await run_store.touch(tx, run_id)
        assert updated is not None
        if run["error_code"] == "process_detached":
            await run_store.append_events(
                tx,
                run_id,
                [("lifecycle", DETACHED_CLEARED_MESSAGE, {"cleared": "process_detached"})],
            )
    runner.touch(run_id)
    return run_store.run_to_proto(updated)
